//! # mgpo-burn
//!
//! LoRA-MGPO for [burn](https://burn.dev) 0.22: the `mgpo_core` tensor
//! capabilities over burn tensors ([`BurnBackend`], one fused in-place pass
//! per method on burn's ndarray backend, burn tensor ops on every other
//! backend), an optimizer that moves a burn module through `perturb` and
//! `step` and matches parameters by `ParamId` ([`MgpoOptimizer`]), and a
//! LoRA linear layer as peft's ([`LoraLinear`]).
//!
//! A training step is burn's usual loop with one more call, `perturb`,
//! before the forward pass; the loss and gradients are then taken at the
//! perturbed point and `step` removes the perturbation and runs AdamW:
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::LinearConfig;
//! use burn::optim::GradientsParams;
//! use burn::tensor::{Distribution, Tensor};
//! use mgpo_burn::{ndarray_device, LoraLinear, MgpoOptimizer};
//! use mgpo_core::{Config, LoraConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = ndarray_device().clone().autodiff();
//! // A frozen base layer (loaded from a checkpoint in real use) with an adapter.
//! let mut layer = LoraLinear::new(LinearConfig::new(6, 4).init(&device), &LoraConfig::new(2, 4.0))?;
//! let mut opt = MgpoOptimizer::builder(Config::paper_nlu(1e-2)).lora(&layer).build(&layer)?;
//!
//! let x = Tensor::<2>::random([8, 6], Distribution::Normal(0.0, 1.0), &device);
//! let target = Tensor::<2>::random([8, 4], Distribution::Normal(0.0, 1.0), &device);
//! for _ in 0..3 {
//!     layer = opt.perturb(layer)?;
//!     let loss = (layer.forward(x.clone()) - target.clone()).square().mean();
//!     let grads = GradientsParams::from_grads(loss.backward(), &layer);
//!     layer = opt.step(opt.lr(), layer, grads)?;
//!     assert!(!opt.last_report().unwrap().skipped);
//! }
//! assert_eq!(opt.state().step, 3);
//! # Ok(())
//! # }
//! ```
//!
//! With `Config::adamw(..)` (rho = 0) the optimizer is plain AdamW. In
//! `weight` space (the authors' trainer) the layer adds the perturbation of
//! its frozen W0 in factored form and W0 itself is never written (see
//! [`lora`]).
//!
//! ## What is fused, and what burn's value semantics cost
//!
//! On burn's ndarray backend (f32, f64) every backend method is one pass
//! over the tensors' memory, in place, bit-identical to mgpo-ndarray
//! ([`backend`] has the details). Three things of burn's design show:
//!
//! - the optimizer takes each parameter out of the module and puts it back
//!   (two module traversals per call; no tensor data is copied);
//! - a parameter whose memory another handle still holds (a forward graph
//!   kept alive past `backward`, a clone of the module) is copied once by
//!   copy-on-write before the in-place update;
//! - on other backends the methods are chains of burn tensor ops, one
//!   kernel per op unless burn's `fusion` decorator fuses them: AdamW about
//!   a dozen element-wise passes, `axpy` two, `add_low_rank` one out x in
//!   temporary.
//!
//! Which `TensorOps` methods cannot be one fused pass in burn, and why: on
//! the ndarray backend none (all are in-place host kernels). On every
//! other backend, `adamw`/`adamw_many` (about 12 passes), `axpy`/`axpy_many`
//! (2), `axpy_noise` (the noise drawn on the host, uploaded, then `axpy`),
//! `add_low_rank` (a matrix product into an out x in temporary, then an
//! add), `sum_sq`/`all_finite` (a cast to f64 and a reduction) and
//! `gram_cols`/`gram_rows` (a cast and a matrix product): a burn tensor is
//! a value, and a custom fused kernel needs a backend extension written
//! for each burn backend (CubeCL, LibTorch, ...), which burn's public API
//! does not give generically; only burn's `fusion` decorator can merge the
//! element-wise chains into one kernel.

#![warn(missing_docs)]

pub mod backend;
mod host;
pub mod lora;
mod optim;
mod walk;

pub use backend::{BurnBackend, BurnTensor};
pub use host::ndarray_device;
pub use lora::LoraLinear;
pub use optim::{Failed, MgpoBuilder, MgpoOptimizer};

/// The burn backend on burn's ndarray device (CPU) in f32.
pub fn cpu_f32() -> BurnBackend {
    BurnBackend::ndarray(burn::tensor::FloatDType::F32)
}

/// The burn backend on burn's ndarray device (CPU) in f64.
pub fn cpu_f64() -> BurnBackend {
    BurnBackend::ndarray(burn::tensor::FloatDType::F64)
}
