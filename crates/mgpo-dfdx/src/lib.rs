//! # mgpo-dfdx
//!
//! LoRA-MGPO for [dfdx](https://docs.rs/dfdx/0.13) on the CPU:
//!
//! - [`DfdxBackend<E>`] implements mgpo-core's `TensorOps` (and `HostIo`)
//!   for `E` = f32 or f64, on dfdx's CPU storage ([`DfTensor`]);
//! - [`DfdxMgpo`] is the optimizer in dfdx's conventions: it walks a model
//!   through dfdx's `TensorCollection` visitor and implements dfdx's
//!   `Optimizer`, so `opt.update(&mut model, &grads)` works;
//!   `opt.perturb(&mut model)` before the forward pass walks the same tensors;
//! - [`LoraLinear`] is a dfdx module y = W0 x + b + s B (A x) with peft's
//!   initialisation, merge/unmerge, and the weight-space perturbation in
//!   factored form, so the frozen W0 is never written.

mod backend;
mod lora;
mod optim;

pub use backend::{DfTensor, DfdxBackend, Element};
pub use lora::{LoraConfig, LoraError, LoraLinear};
pub use optim::DfdxMgpo;

/// The backend on the CPU in f32.
pub fn cpu_f32() -> DfdxBackend<f32> {
    DfdxBackend::default()
}

/// The backend on the CPU in f64.
pub fn cpu_f64() -> DfdxBackend<f64> {
    DfdxBackend::default()
}
