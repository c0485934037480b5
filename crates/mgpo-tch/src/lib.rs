//! # mgpo-tch
//!
//! LoRA-MGPO for [tch](https://github.com/LaurentMazare/tch-rs) (libtorch
//! 2.13): the `mgpo_core` tensor capabilities for `tch::Tensor`
//! ([`TchBackend`], f32 and f64, CPU or CUDA), an optimizer over the
//! variables of a `tch::nn::VarStore` ([`MgpoOptimizer`]) and a LoRA linear
//! layer ([`LoraLinear`]) as peft's.
//!
//! libtorch comes from `scripts/setup-libtorch.sh` (PyTorch's wheel in a
//! project-local venv); source it before `cargo test -p mgpo-tch`.
//!
//! A training step is the usual tch loop with one more call, `perturb`,
//! before the forward pass; the loss and gradients are then taken at the
//! perturbed point and `step` removes the perturbation and runs AdamW on
//! each variable's `.grad()`:
//!
//! ```
//! use mgpo_core::{Config, LoraConfig};
//! use mgpo_tch::{LoraLinear, MgpoOptimizer};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! // A frozen base layer (loaded from a checkpoint in real use).
//! let w0 = Tensor::randn([4, 6], (Kind::Float, Device::Cpu)) * 0.5;
//! let layer = LoraLinear::from_pretrained(&w0, None, &LoraConfig::new(2, 4.0), &(vs.root() / "q_proj"))?;
//!
//! // The paper's setting; Config::trainer_nlu for the authors' trainer.
//! let mut opt = MgpoOptimizer::from_var_store(&vs, [&layer], Config::paper_nlu(1e-2), None)?;
//!
//! let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu));
//! let target = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
//! for _ in 0..3 {
//!     let (_loss, report) = opt.training_step(|| layer.forward(&x).mse_loss(&target, tch::Reduction::Mean))?;
//!     assert!(!report.skipped && report.grad_norm > 0.0);
//! }
//! assert_eq!((opt.state().step, opt.is_perturbed()), (3, false));
//! # Ok(())
//! # }
//! ```
//!
//! `training_step` is `zero_grad`, `perturb`, the closure, `backward`,
//! `step`. The optimizer dereferences to [`mgpo_core::Bound`], so the
//! learning rate (`set_lr`, checked at once), the state, the reports and
//! checkpoints (`save_checkpoint`, `load_checkpoint`, readable by every
//! framework's optimizer over the same tensor names) are the core's.
//! Parameter groups are registered by name:
//! `.param_group_where(ParamGroup::no_decay(), mgpo_core::is_bias_or_norm)`
//! on the builder exempts biases and LayerNorms from weight decay, as the
//! Hugging Face Trainer does. With `Config::adamw(..)` (rho = 0) the
//! optimizer is plain AdamW, step for step what `tch::nn::adamw`
//! (libtorch's own) computes, parameter groups included.
//!
//! ## Gradient accumulation
//!
//! libtorch adds every backward pass to `.grad()`, so accumulating k
//! micro-batches is the plain loop: perturb once, run every micro-batch at
//! the perturbed point with its loss divided by k, step once. The step then
//! sees the mean gradient of the whole batch, g = (1/k) sum_j g_j, and
//! equals one step on the whole batch within rounding:
//!
//! ```
//! # use mgpo_core::{Config, LoraConfig};
//! # use mgpo_tch::{LoraLinear, MgpoOptimizer};
//! # use tch::{nn, nn::Module, Device, Kind, Reduction, Tensor};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let vs = nn::VarStore::new(Device::Cpu);
//! # let w0 = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
//! # let layer = LoraLinear::from_pretrained(&w0, None, &LoraConfig::new(2, 4.0), &(vs.root() / "q_proj"))?;
//! # let mut opt = MgpoOptimizer::for_lora([&layer], Config::paper_nlu(1e-2))?;
//! let batches: Vec<(Tensor, Tensor)> =
//!     (0..4).map(|_| (Tensor::randn([8, 6], (Kind::Float, Device::Cpu)), Tensor::randn([8, 4], (Kind::Float, Device::Cpu)))).collect();
//! opt.zero_grad();
//! opt.perturb()?;
//! for (x, y) in &batches {
//!     (layer.forward(x).mse_loss(y, Reduction::Mean) / batches.len() as f64).backward();
//! }
//! let report = opt.step()?;
//! assert_eq!(report.step, 1);
//! # Ok(())
//! # }
//! ```
//!
//! [`LoraLinear`] layers registered with `.lora(&layer)` take MGPO's
//! `weight`-space perturbation (the authors' trainer) in factored form in
//! their forward pass: their frozen W0 is never written and stays
//! bit-identical (see [`lora`]).

#![warn(missing_docs)]

mod backend;
pub mod lora;
mod optim;
mod var_store;

pub use backend::TchBackend;
pub use lora::{is_target, LoraAdapter, LoraLinear};
pub use optim::{MgpoBuilder, MgpoOptimizer};
pub use var_store::VarStoreAdapters;
/// The tch crate (0.26, libtorch 2.13) this crate is built against, so that users and tests name the same version.
pub use tch;

/// The tch backend on the CPU in f32.
pub fn cpu_f32() -> TchBackend {
    TchBackend::cpu_f32()
}

/// The tch backend on the CPU in f64.
pub fn cpu_f64() -> TchBackend {
    TchBackend::cpu_f64()
}
