//! # mgpo-dfdx
//!
//! LoRA-MGPO for [dfdx](https://docs.rs/dfdx/0.13) on the CPU:
//!
//! - [`DfdxBackend<E>`] implements mgpo-core's backend traits (and
//!   `HostIo`) for `E` = f32 or f64, on dfdx's CPU storage ([`DfTensor`]);
//! - [`MgpoOptimizer`] is the optimizer in dfdx's conventions: it walks a
//!   model through dfdx's `TensorCollection` visitor, finds the LoRA
//!   adapters by their tensor names, and implements dfdx's `Optimizer`, so
//!   `opt.update(&mut model, &grads)` works; `opt.perturb(&mut model)`
//!   before the forward pass walks the same tensors. It dereferences to its
//!   [`mgpo_core::Mgpo`], so the learning rate, state, reports and
//!   checkpoints are the same methods as in every other framework;
//! - [`LoraLinear`] is a dfdx module y = W0 x + b + s B (A dropout(x)) with
//!   peft's initialisation, configured by the shared
//!   [`mgpo_core::LoraConfig`], with merge/unmerge and the weight-space
//!   perturbation in factored form, so the frozen W0 is never written.
//!
//! ## Gradient accumulation
//!
//! dfdx adds the gradients of every backward pass into the `Gradients` it
//! was traced with until they are zeroed, so accumulation needs nothing
//! from the optimizer: perturb once, run the k micro-batches at the
//! perturbed point without zeroing, step once. With each micro-batch's
//! loss weighted by its share of the batch (n_i / N for a mean loss) the
//! sum is the gradient of the whole batch, and the step equals one step on
//! the whole batch (`tests/optim.rs` checks it to the conformance tolerance):
//!
//! ```
//! use dfdx::prelude::*;
//! use mgpo_core::{Config, LoraConfig};
//! use mgpo_dfdx::{LoraLinear, MgpoOptimizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Cpu::seed_from_u64(0);
//! let mut model = LoraLinear::<4, 3, 2, f64, Cpu>::try_new(&dev, LoraConfig::new(2, 4.0))?;
//! let mut opt = MgpoOptimizer::new(&model, Config::paper_nlu(1e-2))?;
//! let micro: Vec<(Tensor<Rank2<2, 4>, f64, Cpu>, Tensor<Rank2<2, 3>, f64, Cpu>)> =
//!     (0..4).map(|_| (dev.sample_normal(), dev.sample_normal())).collect();
//! let mut grads = model.alloc_grads();
//! opt.perturb(&mut model)?;
//! for (x, y) in &micro {
//!     let loss = mse_loss(model.forward(x.clone().traced(grads)), y.clone()) * 0.25;
//!     grads = loss.backward(); // adds to the gradients of the earlier micro-batches
//! }
//! let report = opt.step(&mut model, &grads)?;
//! model.zero_grads(&mut grads);
//! assert_eq!(report.step, 1);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod backend;
mod lora;
mod optim;
mod walk;

pub use backend::{DfTensor, DfdxBackend, Element};
pub use lora::{LoraError, LoraLinear};
pub use optim::{MgpoBuilder, MgpoOptimizer};

/// The backend on the CPU in f32.
pub fn cpu_f32() -> DfdxBackend<f32> {
    DfdxBackend::default()
}

/// The backend on the CPU in f64.
pub fn cpu_f64() -> DfdxBackend<f64> {
    DfdxBackend::default()
}
