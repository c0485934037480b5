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
//! use mgpo_core::Config;
//! use mgpo_tch::{LoraConfig, LoraLinear, MgpoOptimizer};
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
//!     assert!(!report.skipped);
//! }
//! assert_eq!(opt.state().step, 3);
//! # Ok(())
//! # }
//! ```
//!
//! `training_step` is `zero_grad`, `perturb`, the closure, `backward`,
//! `step`. With `Config::adamw(..)` (rho = 0) the optimizer is plain AdamW,
//! step for step what `tch::nn::adamw` (libtorch's own) computes.
//!
//! In `weight` space (the authors' trainer) the layer adds the perturbation
//! of its frozen base weight W0 in factored form and W0 itself is never
//! written, so it stays bit-identical (see [`lora`]).

mod backend;
pub mod lora;
mod optim;

pub use backend::TchBackend;
pub use lora::{is_target, FactoredPerturbation, LoraAdapter, LoraConfig, LoraLinear, PerturbationSlot};
pub use optim::{MgpoBuilder, MgpoOptimizer, VarStoreAdapters};

/// The tch backend on the CPU in f32.
pub fn cpu_f32() -> TchBackend {
    TchBackend::cpu_f32()
}

/// The tch backend on the CPU in f64.
pub fn cpu_f64() -> TchBackend {
    TchBackend::cpu_f64()
}
