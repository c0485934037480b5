//! The LoRA configuration every framework's LoRA layer shares, with peft's
//! names and defaults: y = W0 x + s B (A dropout(x)), A of shape r x in,
//! B of shape out x r, s = alpha / r (rsLoRA: alpha / sqrt(r)).

use serde::{Deserialize, Serialize};

use crate::error::{check, MgpoError, Result};

/// How A is initialised (B always starts at zero, so a fresh adapter
/// leaves the base layer's output unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// peft's default (`init_lora_weights=True`): A ~ U(-b, b) with
    /// b = 1 / sqrt(in), `kaiming_uniform_(a = sqrt(5))`.
    #[default]
    Kaiming,
    /// peft's `init_lora_weights="gaussian"`: A ~ N(0, 1 / r^2).
    Gaussian,
}

/// rank, alpha, dropout, rsLoRA and init of a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// r: the inner dimension of B A.
    pub rank: usize,
    /// alpha in s = alpha / r.
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in [0, 1); training only.
    pub dropout: f64,
    /// rsLoRA: s = alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
    /// How A is initialised.
    pub init: LoraInit,
}

impl Default for LoraConfig {
    /// peft's `LoraConfig()` defaults: r 8, alpha 8, no dropout.
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 8.0,
            dropout: 0.0,
            rslora: false,
            init: LoraInit::Kaiming,
        }
    }
}

impl LoraConfig {
    /// Rank `rank` and `alpha`, no dropout, alpha / r scaling, Kaiming init.
    pub fn new(rank: usize, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            ..Default::default()
        }
    }

    /// Sets the dropout probability.
    pub fn dropout(self, dropout: f64) -> Self {
        LoraConfig { dropout, ..self }
    }

    /// s = alpha / sqrt(r).
    pub fn rslora(self) -> Self {
        LoraConfig {
            rslora: true,
            ..self
        }
    }

    /// Sets the initialisation of A.
    pub fn init(self, init: LoraInit) -> Self {
        LoraConfig { init, ..self }
    }

    /// The adapter's scaling s.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.rank, self.rslora)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(MgpoError::InvalidConfig {
                field: "lora.rank",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        check(
            self.alpha.is_finite(),
            "lora.alpha",
            self.alpha,
            "must be finite",
        )?;
        check(
            (0.0..1.0).contains(&self.dropout),
            "lora.dropout",
            self.dropout,
            "must be in [0, 1)",
        )
    }
}

/// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
pub fn lora_scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    let r = rank as f64;
    if rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_validates() {
        assert_eq!(LoraConfig::new(8, 16.0).scale(), 2.0);
        assert_eq!(LoraConfig::new(16, 16.0).rslora().scale(), 4.0);
        assert!(LoraConfig::new(0, 1.0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lora.rank"));
        assert!(LoraConfig::new(4, 1.0)
            .dropout(1.0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dropout"));
        assert!(LoraConfig::new(4, f64::NAN).validate().is_err());
        LoraConfig::new(4, 8.0).dropout(0.1).validate().unwrap();
    }
}
