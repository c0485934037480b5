//! # mgpo-candle
//!
//! LoRA-MGPO for [candle](https://github.com/huggingface/candle): the
//! `mgpo_core` tensor capabilities for `candle_core::Tensor`
//! ([`CandleBackend`]), an optimizer over candle `Var`s that is also a
//! `candle_nn::Optimizer` ([`MgpoOptimizer`]), and a LoRA linear layer
//! ([`LoraLinear`]) configured by [`mgpo_core::LoraConfig`].
//!
//! A training step is the usual candle loop with one more call, `perturb`,
//! before the forward pass; the loss and gradients are then taken at the
//! perturbed point and `step` removes the perturbation and runs AdamW:
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use mgpo_candle::{LoraLinear, MgpoOptimizer};
//! use mgpo_core::{Config, LoraConfig};
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
//! `opt.training_step(|| loss)` does the three calls at once. With
//! `Config::adamw(..)` (rho = 0) the optimizer is plain AdamW. The builder
//! ([`MgpoOptimizer::builder`]) also takes plain tensors, a whole `VarMap`
//! and parameter groups, e.g. no weight decay on biases and LayerNorms:
//! `.param_group_where(ParamGroup::no_decay(), mgpo_core::is_bias_or_norm)`.
//!
//! ## Gradient accumulation
//!
//! A batch too large for one backward pass is split into k micro-batches
//! *at one perturbed point*: perturb once, add up the gradients of the k
//! losses (each the micro-batch's mean loss divided by k, so that their sum
//! is the whole batch's mean) with [`MgpoOptimizer::accumulate`], step
//! once. That is one MGPO step on the whole batch, up to rounding:
//!
//! ```
//! # use candle_core::{DType, Device, Module, Tensor};
//! # use candle_nn::{VarBuilder, VarMap};
//! # use candle_core::backprop::GradStore;
//! # use mgpo_candle::{LoraLinear, MgpoOptimizer};
//! # use mgpo_core::{Config, LoraConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dev = Device::Cpu;
//! # let varmap = VarMap::new();
//! # let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! # let base = candle_nn::Linear::new(Tensor::randn(0f32, 0.5, (4, 6), &dev)?, None);
//! # let layer = LoraLinear::new(base, &LoraConfig::new(2, 4.0), vb.pp("q_proj"))?;
//! # let mut opt = MgpoOptimizer::for_lora([&layer], Config::paper_nlu(1e-2))?;
//! let (x, y) = (Tensor::randn(0f32, 1.0, (32, 6), &dev)?, Tensor::randn(0f32, 1.0, (32, 4), &dev)?);
//! let k = 4;
//! opt.perturb()?;
//! let mut grads = GradStore::default();
//! for i in 0..k {
//!     let (xi, yi) = (x.narrow(0, 8 * i, 8)?, y.narrow(0, 8 * i, 8)?);
//!     let loss = (candle_nn::loss::mse(&layer.forward(&xi)?, &yi)? / k as f64)?;
//!     opt.accumulate(&mut grads, loss.backward()?)?;
//! }
//! opt.step(&grads)?;
//! # Ok(())
//! # }
//! ```
//!
//! In `weight` space (the authors' trainer) the layer adds the perturbation
//! of its frozen base weight W0 in factored form and W0 itself is never
//! written, so it stays bit-identical (see [`lora`]).

#![warn(missing_docs)]

mod backend;
mod cpu;
pub mod lora;
mod optim;

pub use backend::CandleBackend;
pub use lora::{is_target, wrap_linears, LoraAdapter, LoraLinear};
pub use optim::{MgpoBuilder, MgpoOptimizer};

/// The candle backend on the CPU in f32.
pub fn cpu_f32() -> CandleBackend {
    CandleBackend::cpu(candle_core::DType::F32)
}

/// The candle backend on the CPU in f64.
pub fn cpu_f64() -> CandleBackend {
    CandleBackend::cpu(candle_core::DType::F64)
}
