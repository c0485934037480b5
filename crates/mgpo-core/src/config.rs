//! Configuration and the named presets. The serialised form is the one of
//! the conformance vectors ([the spec](crate::spec), "Conformance vectors").

use serde::{Deserialize, Serialize};

use crate::error::{check, Result};

/// Sign of the perturbation: the paper's equation 3 ascends along the
/// momentum, the authors' trainer descends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// eps = +rho k d / (n + eps): the paper's equation 3.
    Ascent,
    /// eps = -rho k d / (n + eps): the authors' trainer.
    Descent,
}

impl Direction {
    /// sigma in eps_d = sigma * rho * k * d / (n + eps).
    pub fn sign(self) -> f64 {
        match self {
            Direction::Ascent => 1.0,
            Direction::Descent => -1.0,
        }
    }
}

/// What is perturbed: the adapters' own A and B (the paper), or the frozen
/// base weight W0 by the weight-space image of the momentum,
/// D = s (m_B A + B m_A) (the authors' trainer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// Perturb A and B themselves.
    Adapter,
    /// Perturb W0 by D = s (m_B A + B m_A).
    Weight,
}

/// Whether the perturbation norm and the gradient-norm EMA are taken over
/// all adapters together (the paper) or per adapter (the authors' trainer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One norm and one g_bar over every adapter.
    Global,
    /// One norm and one g_bar per adapter.
    PerAdapter,
}

/// Where the perturbation points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Perturbation {
    /// Along AdamW's first moment: LoRA-MGPO.
    #[default]
    Momentum,
    /// Along fresh Gaussian noise of the same norm, rho k: the paper's
    /// Table 4 ablation in adapter space, and in weight space a full-rank
    /// noise matrix added to each W0 (which must then be registered in
    /// place). The noise of step t is a pure function of (seed, t, tensor),
    /// so runs are reproducible.
    Gaussian {
        /// The seed of the noise stream.
        seed: u64,
    },
}

/// Hyper-parameters of the base optimizer, `torch.optim.AdamW` (non-amsgrad).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// The paper's momentum coefficient mu.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// AdamW's eps, added to sqrt(v_hat).
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The whole LoRA-MGPO configuration. `Default` is the paper's NLU setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Perturbation radius; 0 reduces the optimizer exactly to AdamW.
    pub rho: f64,
    /// Decay of the gradient-norm EMA g_bar.
    pub beta: f64,
    /// Guard in norms and reciprocals.
    pub eps: f64,
    /// Ascent (paper) or descent (trainer).
    pub direction: Direction,
    /// Adapter space (paper) or weight space (trainer).
    pub space: Space,
    /// One global group (paper) or one per adapter (trainer).
    pub scope: Scope,
    /// Scale the radius by 1 / g_bar (the paper's adaptive perturbation normalisation).
    pub adaptive_norm: bool,
    /// Upper clamp on 1 / g_bar.
    pub max_inv_scale: Option<f64>,
    /// The base optimizer's hyper-parameters.
    pub adamw: AdamWConfig,
    /// Global-norm gradient clipping before AdamW, as `clip_grad_norm_`.
    pub max_grad_norm: Option<f64>,
    /// The perturbation's direction (absent in a vector means momentum).
    #[serde(default, skip_serializing_if = "is_momentum")]
    pub perturbation: Perturbation,
}

fn is_momentum(p: &Perturbation) -> bool {
    *p == Perturbation::Momentum
}

impl Default for Config {
    fn default() -> Self {
        Config::paper_nlu(AdamWConfig::default().lr)
    }
}

impl Config {
    /// The paper's NLU setting (section 2.2, appendix B.2): ascent on the
    /// adapters, one global norm, rho 0.05, beta 0.9, mu 0.9.
    pub fn paper_nlu(lr: f64) -> Self {
        Config {
            rho: 0.05,
            beta: 0.9,
            eps: 1e-12,
            direction: Direction::Ascent,
            space: Space::Adapter,
            scope: Scope::Global,
            adaptive_norm: true,
            max_inv_scale: None,
            adamw: AdamWConfig { lr, ..AdamWConfig::default() },
            max_grad_norm: None,
            perturbation: Perturbation::Momentum,
        }
    }

    /// The paper's NLG setting: rho 0.01, beta 0.8, mu 0.8.
    pub fn paper_nlg(lr: f64) -> Self {
        let mut c = Config::paper_nlu(lr);
        c.rho = 0.01;
        c.beta = 0.8;
        c.adamw.beta1 = 0.8;
        c
    }

    /// The authors' trainer with the NLU radius: descent in weight space,
    /// per-adapter norms, 1 / g_bar clamped at 10, gradients clipped at 1.
    pub fn trainer_nlu(lr: f64) -> Self {
        Config {
            direction: Direction::Descent,
            space: Space::Weight,
            scope: Scope::PerAdapter,
            max_inv_scale: Some(10.0),
            max_grad_norm: Some(1.0),
            ..Config::paper_nlu(lr)
        }
    }

    /// The authors' trainer with the NLG radius and momentum.
    pub fn trainer_nlg(lr: f64) -> Self {
        Config {
            direction: Direction::Descent,
            space: Space::Weight,
            scope: Scope::PerAdapter,
            max_inv_scale: Some(10.0),
            max_grad_norm: Some(1.0),
            ..Config::paper_nlg(lr)
        }
    }

    /// Plain AdamW: MGPO with rho = 0.
    pub fn adamw(adamw: AdamWConfig) -> Self {
        Config {
            rho: 0.0,
            adamw,
            ..Config::default()
        }
    }

    /// Looks a preset up by name: `paper-nlu`, `paper-nlg`, `trainer-nlu`,
    /// `trainer-nlg`, `adamw`.
    pub fn preset(name: &str, lr: f64) -> Option<Self> {
        Some(match name {
            "paper-nlu" => Config::paper_nlu(lr),
            "paper-nlg" => Config::paper_nlg(lr),
            "trainer-nlu" => Config::trainer_nlu(lr),
            "trainer-nlg" => Config::trainer_nlg(lr),
            "adamw" => Config::adamw(AdamWConfig { lr, ..AdamWConfig::default() }),
            _ => return None,
        })
    }

    /// Names accepted by [`Config::preset`].
    pub const PRESETS: [&'static str; 5] = ["paper-nlu", "paper-nlg", "trainer-nlu", "trainer-nlg", "adamw"];

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        let f = |x: f64| x.is_finite();
        check(f(self.rho) && self.rho >= 0.0, "rho", self.rho, "must be finite and >= 0")?;
        check(f(self.beta) && (0.0..1.0).contains(&self.beta), "beta", self.beta, "must be in [0, 1)")?;
        check(f(self.eps) && self.eps >= 0.0, "eps", self.eps, "must be finite and >= 0")?;
        if let Some(c) = self.max_inv_scale {
            check(c > 0.0 && !c.is_nan(), "max_inv_scale", c, "must be > 0")?;
        }
        if let Some(c) = self.max_grad_norm {
            check(c > 0.0 && !c.is_nan(), "max_grad_norm", c, "must be > 0")?;
        }
        validate_lr(self.adamw.lr)?;
        let a = &self.adamw;
        check(f(a.beta1) && (0.0..1.0).contains(&a.beta1), "adamw.beta1", a.beta1, "must be in [0, 1)")?;
        check(f(a.beta2) && (0.0..1.0).contains(&a.beta2), "adamw.beta2", a.beta2, "must be in [0, 1)")?;
        check(f(a.eps) && a.eps >= 0.0, "adamw.eps", a.eps, "must be finite and >= 0")?;
        check(f(a.weight_decay) && a.weight_decay >= 0.0, "adamw.weight_decay", a.weight_decay, "must be finite and >= 0")
    }
}

pub(crate) fn validate_lr(lr: f64) -> Result<()> {
    check(lr.is_finite() && lr >= 0.0, "lr", lr, "must be finite and >= 0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_distinct() {
        for name in Config::PRESETS {
            let c = Config::preset(name, 2e-4).unwrap();
            c.validate().unwrap();
            assert_eq!(c.adamw.lr, 2e-4);
        }
        assert_eq!(Config::trainer_nlg(1.0).rho, 0.01);
        assert_eq!(Config::trainer_nlu(1.0).space, Space::Weight);
        assert!(Config::preset("nope", 1.0).is_none());
    }

    #[test]
    fn out_of_range_values_are_named() {
        let mut c = Config::default();
        c.beta = 1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("beta") && e.contains("[0, 1)"), "{e}");
        let mut c = Config::default();
        c.rho = -0.1;
        assert!(c.validate().unwrap_err().to_string().contains("rho"));
        let mut c = Config::default();
        c.adamw.lr = f64::NAN;
        assert!(c.validate().unwrap_err().to_string().contains("lr"));
        let mut c = Config::default();
        c.max_grad_norm = Some(0.0);
        assert!(c.validate().is_err());
    }

    #[test]
    fn reads_the_vector_format() {
        let json = r#"{"rho": 0.05, "beta": 0.9, "eps": 1e-12, "direction": "descent",
            "space": "weight", "scope": "per_adapter", "adaptive_norm": true,
            "max_inv_scale": 10.0, "adamw": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999,
            "eps": 1e-8, "weight_decay": 0.0}, "max_grad_norm": null}"#;
        let c: Config = serde_json::from_str(json).unwrap();
        assert_eq!(c, Config { max_grad_norm: None, ..Config::trainer_nlu(0.001) });
    }
}
