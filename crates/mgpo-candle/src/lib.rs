//! # mgpo-candle
//!
//! LoRA-MGPO for [candle](https://github.com/huggingface/candle): the
//! `mgpo_core` tensor capabilities for `candle_core::Tensor`
//! ([`CandleBackend`]), an optimizer over candle `Var`s that is a
//! `candle_nn::Optimizer` ([`MgpoOptimizer`]) and a LoRA linear layer
//! ([`LoraLinear`]) as peft's.
//!
//! A training step is the usual candle loop with one more call, `perturb`,
//! before the forward pass; the loss and gradients are then taken at the
//! perturbed point and `step` removes the perturbation and runs AdamW:
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use mgpo_candle::{LoraConfig, LoraLinear, MgpoOptimizer};
//! use mgpo_core::Config;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // A frozen base layer (loaded from a checkpoint in real use).
//! let w0 = Tensor::randn(0f32, 0.5, (4, 6), &dev)?;
//! let base = candle_nn::Linear::new(w0, None);
//!
//! // Add an adapter: its A and B are variables of `varmap`.
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let layer = LoraLinear::new(base, &LoraConfig::new(2, 4.0), vb.pp("q_proj"))?;
//!
//! // The paper's setting; Config::trainer_nlu for the authors' trainer.
//! let mut opt = MgpoOptimizer::for_lora([&layer], Config::paper_nlu(1e-2))?;
//!
//! let x = Tensor::randn(0f32, 1.0, (8, 6), &dev)?;
//! let target = Tensor::randn(0f32, 1.0, (8, 4), &dev)?;
//! for _ in 0..3 {
//!     opt.perturb()?;
//!     let loss = candle_nn::loss::mse(&layer.forward(&x)?, &target)?;
//!     let report = opt.step(&loss.backward()?)?;
//!     assert!(!report.skipped);
//! }
//! assert_eq!(opt.state().step, 3);
//! # Ok(())
//! # }
//! ```
//!
//! `MgpoOptimizer::training_step(|| loss)` does the three calls at once.
//! With `Config::adamw(..)` (rho = 0) the optimizer is plain AdamW.
//!
//! In `weight` space (the authors' trainer) the layer adds the perturbation
//! of its frozen base weight W0 in factored form and W0 itself is never
//! written, so it stays bit-identical (see [`lora`]).

mod backend;
mod cpu;
pub mod lora;
mod optim;

pub use backend::CandleBackend;
pub use lora::{is_target, wrap_linears, FactoredPerturbation, LoraAdapter, LoraConfig, LoraLinear, PerturbationSlot};
pub use optim::{AdapterSpec, MgpoBuilder, MgpoOptimizer};

/// The candle backend on the CPU in f32.
pub fn cpu_f32() -> CandleBackend {
    CandleBackend::cpu(candle_core::DType::F32)
}

/// The candle backend on the CPU in f64.
pub fn cpu_f64() -> CandleBackend {
    CandleBackend::cpu(candle_core::DType::F64)
}
