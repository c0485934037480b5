//! The optimizers a sweep compares, and how they pair up: each MGPO
//! variant against the plain-LoRA baselines (with and without the
//! gradient clipping some variants have) and against a random direction
//! of the same norm in the same space. Independent of the task, so any
//! sweep (the MLP tasks here, a transformer fine-tuning) uses the same
//! configurations and the same comparisons.

use mgpo_core::{AdamWConfig, Config, Perturbation, Space};
use serde::{Deserialize, Serialize};

/// A fine-tuning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    /// Plain LoRA: AdamW (torch defaults, no weight decay, no clipping).
    #[serde(rename = "lora")]
    Lora,
    /// Plain LoRA with the trainer's gradient clipping at 1 (as the
    /// authors' Hugging Face trainer clips every method, the LoRA baseline
    /// included): separates the effect of clipping from that of the
    /// perturbation in `mgpo-trainer`.
    #[serde(rename = "lora-clip")]
    LoraClip,
    /// LoRA-MGPO as in the paper (`Config::paper_nlu`: ascent on A and B,
    /// one global norm, rho 0.05, beta 0.9, no clipping).
    #[serde(rename = "mgpo-paper")]
    MgpoPaper,
    /// LoRA-MGPO as in the authors' trainer (`Config::trainer_nlu`:
    /// descent on W0 by the weight-space momentum, per-adapter norms,
    /// 1/g_bar clamped at 10, gradients clipped at 1).
    #[serde(rename = "mgpo-trainer")]
    MgpoTrainer,
    /// `mgpo-trainer` without the gradient clipping: the same perturbation
    /// against plain `lora`.
    #[serde(rename = "mgpo-trainer-noclip")]
    MgpoTrainerNoClip,
    /// The paper's method without adaptive perturbation normalisation
    /// (radius rho, not rho / g_bar): its Fig. 4 ablation.
    #[serde(rename = "mgpo-no-apn")]
    MgpoNoApn,
    /// Adapter-space random control of `mgpo-paper`: the same
    /// configuration with a fresh Gaussian direction of the same radius,
    /// rho / g_bar, instead of the momentum (the paper's Table 4 ablation).
    #[serde(rename = "lora-random")]
    LoraRandom,
    /// Weight-space random control of `mgpo-trainer`: the same
    /// configuration (descent sign irrelevant, per-adapter norms rho k_i,
    /// 1/g_bar clamped at 10, clipping at 1) with full-rank Gaussian noise
    /// of norm rho k_i added to each W0 instead of s (m_B A + B m_A). Needs
    /// W0 held in place by the backend ([`Method::needs_w0_in_place`]).
    #[serde(rename = "lora-random-weight")]
    LoraRandomWeight,
}

impl Method {
    /// Every method, in the order sweeps and tables list them.
    pub const ALL: [Method; 8] = [
        Method::Lora,
        Method::LoraClip,
        Method::MgpoPaper,
        Method::MgpoTrainer,
        Method::MgpoTrainerNoClip,
        Method::MgpoNoApn,
        Method::LoraRandom,
        Method::LoraRandomWeight,
    ];

    /// The plain-LoRA baselines every MGPO variant is judged against.
    pub const BASELINES: [Method; 2] = [Method::Lora, Method::LoraClip];

    /// The name on the command line and in output files (`lora`, `mgpo-paper`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::LoraClip => "lora-clip",
            Method::MgpoPaper => "mgpo-paper",
            Method::MgpoTrainer => "mgpo-trainer",
            Method::MgpoTrainerNoClip => "mgpo-trainer-noclip",
            Method::MgpoNoApn => "mgpo-no-apn",
            Method::LoraRandom => "lora-random",
            Method::LoraRandomWeight => "lora-random-weight",
        }
    }

    /// The method whose [`name`](Method::name) is `s`; None for any other string.
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The optimizer configuration at peak learning rate `lr`; `seed`
    /// seeds the noise of the random controls (mgpo-core's Gaussian mode:
    /// the noise of step t is a pure function of (seed, t, tensor)).
    pub fn config(self, lr: f64, seed: u64) -> Config {
        let gaussian = Perturbation::Gaussian { seed };
        match self {
            Method::Lora => Config::adamw(AdamWConfig { lr, ..AdamWConfig::default() }),
            Method::LoraClip => Config { max_grad_norm: Some(1.0), ..Config::adamw(AdamWConfig { lr, ..AdamWConfig::default() }) },
            Method::MgpoPaper => Config::paper_nlu(lr),
            Method::MgpoTrainer => Config::trainer_nlu(lr),
            Method::MgpoTrainerNoClip => Config { max_grad_norm: None, ..Config::trainer_nlu(lr) },
            Method::MgpoNoApn => Config { adaptive_norm: false, ..Config::paper_nlu(lr) },
            Method::LoraRandom => Config { perturbation: gaussian, ..Config::paper_nlu(lr) },
            Method::LoraRandomWeight => Config { perturbation: gaussian, ..Config::trainer_nlu(lr) },
        }
    }

    /// The MGPO variants whose claims a sweep tests (the others are
    /// baselines and controls).
    pub fn is_variant(self) -> bool {
        matches!(self, Method::MgpoPaper | Method::MgpoTrainer | Method::MgpoTrainerNoClip | Method::MgpoNoApn)
    }

    /// The random-direction control of a variant: its own configuration
    /// with a Gaussian direction of the same norm in the same space.
    pub fn random_control(self) -> Option<Method> {
        match self {
            Method::MgpoPaper => Some(Method::LoraRandom),
            Method::MgpoTrainer => Some(Method::LoraRandomWeight),
            _ => None,
        }
    }

    /// Whether the backend must register each W0 with the optimizer and
    /// compute with it in place ([`needs_w0_in_place`]).
    pub fn needs_w0_in_place(self) -> bool {
        needs_w0_in_place(&self.config(1e-3, 0))
    }
}

/// A Gaussian direction in weight space is a full-rank matrix added to W0
/// itself (it has no factored form), so the layer must compute with the W0
/// the optimizer writes: `MgpoBuilder::adapter_with_w0` instead of the
/// layer's factored slot.
pub fn needs_w0_in_place(config: &Config) -> bool {
    config.space == Space::Weight && matches!(config.perturbation, Perturbation::Gaussian { .. })
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgpo_core::{Direction, Scope};

    #[test]
    fn names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()), Some(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{}\"", m.name()));
        }
        assert_eq!(Method::parse("sgd"), None);
    }

    #[test]
    fn controls_differ_from_their_variant_only_where_they_should() {
        let lr = 3e-3;
        let trainer = Method::MgpoTrainer.config(lr, 7);
        // No clipping, everything else the trainer's.
        let noclip = Method::MgpoTrainerNoClip.config(lr, 7);
        assert_eq!(noclip.max_grad_norm, None);
        assert_eq!(Config { max_grad_norm: trainer.max_grad_norm, ..noclip }, trainer);
        // Weight-space Gaussian direction, everything else the trainer's (norm rho k, clamp, clipping).
        let rw = Method::LoraRandomWeight.config(lr, 7);
        assert_eq!(rw.perturbation, Perturbation::Gaussian { seed: 7 });
        assert_eq!((rw.space, rw.scope, rw.direction), (Space::Weight, Scope::PerAdapter, Direction::Descent));
        assert_eq!((rw.max_grad_norm, rw.max_inv_scale, rw.rho), (Some(1.0), Some(10.0), trainer.rho));
        assert_eq!(Config { perturbation: Perturbation::Momentum, ..rw }, trainer);
        // Adapter-space Gaussian direction, everything else the paper's.
        let ra = Method::LoraRandom.config(lr, 7);
        assert_eq!(Config { perturbation: Perturbation::Momentum, ..ra }, Method::MgpoPaper.config(lr, 7));
        assert_eq!(ra.space, Space::Adapter);
        // Clipping is the only difference between the two baselines.
        let (lora, clip) = (Method::Lora.config(lr, 0), Method::LoraClip.config(lr, 0));
        assert_eq!((lora.rho, lora.max_grad_norm, clip.max_grad_norm), (0.0, None, Some(1.0)));
        assert_eq!(Config { max_grad_norm: None, ..clip }, lora);
        for m in Method::ALL {
            m.config(lr, 1).validate().unwrap();
            assert_eq!(m.needs_w0_in_place(), m == Method::LoraRandomWeight, "{m}");
            assert_eq!(m.config(lr, 1).adamw.lr, lr);
        }
        assert_eq!(Method::MgpoPaper.random_control(), Some(Method::LoraRandom));
        assert_eq!(Method::MgpoTrainer.random_control(), Some(Method::LoraRandomWeight));
        assert!(Method::ALL.iter().filter(|m| m.is_variant()).all(|m| !Method::BASELINES.contains(m)));
    }
}
