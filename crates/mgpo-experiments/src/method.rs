//! The optimizers a sweep compares.

use mgpo_core::{AdamWConfig, Config, Perturbation};
use serde::{Deserialize, Serialize};

/// A fine-tuning method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    /// Plain LoRA: AdamW (torch defaults, no weight decay, no clipping).
    #[serde(rename = "lora")]
    Lora,
    /// LoRA-MGPO as in the paper (`Config::paper_nlu`: ascent on A and B,
    /// one global norm, rho 0.05, beta 0.9).
    #[serde(rename = "mgpo-paper")]
    MgpoPaper,
    /// LoRA-MGPO as in the authors' trainer (`Config::trainer_nlu`:
    /// descent on W0 by the weight-space momentum, per-adapter norms,
    /// 1/g_bar clamped at 10, gradients clipped at 1).
    #[serde(rename = "mgpo-trainer")]
    MgpoTrainer,
    /// The paper's method without adaptive perturbation normalisation
    /// (radius rho, not rho / g_bar): its Fig. 4 ablation.
    #[serde(rename = "mgpo-no-apn")]
    MgpoNoApn,
    /// LoRA with a random Gaussian perturbation of the same radius as
    /// `mgpo-paper`'s, rho / g_bar, instead of the momentum direction: the
    /// paper's Table 4 ablation.
    #[serde(rename = "lora-random")]
    LoraRandom,
    /// Plain LoRA with the trainer's gradient clipping at 1 (separates the
    /// effect of clipping from that of the perturbation in `mgpo-trainer`).
    #[serde(rename = "lora-clip")]
    LoraClip,
}

impl Method {
    pub const ALL: [Method; 6] =
        [Method::Lora, Method::MgpoPaper, Method::MgpoTrainer, Method::MgpoNoApn, Method::LoraRandom, Method::LoraClip];

    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::MgpoPaper => "mgpo-paper",
            Method::MgpoTrainer => "mgpo-trainer",
            Method::MgpoNoApn => "mgpo-no-apn",
            Method::LoraRandom => "lora-random",
            Method::LoraClip => "lora-clip",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The optimizer configuration at peak learning rate `lr`; `seed`
    /// seeds the noise of `lora-random` (mgpo-core's Gaussian mode: the
    /// noise of step t is a pure function of (seed, t, tensor)).
    pub fn config(self, lr: f64, seed: u64) -> Config {
        match self {
            Method::Lora => Config::adamw(AdamWConfig { lr, ..AdamWConfig::default() }),
            Method::LoraClip => Config { max_grad_norm: Some(1.0), ..Config::adamw(AdamWConfig { lr, ..AdamWConfig::default() }) },
            Method::MgpoPaper => Config::paper_nlu(lr),
            Method::MgpoTrainer => Config::trainer_nlu(lr),
            Method::MgpoNoApn => Config { adaptive_norm: false, ..Config::paper_nlu(lr) },
            Method::LoraRandom => Config { perturbation: Perturbation::Gaussian { seed }, ..Config::paper_nlu(lr) },
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
