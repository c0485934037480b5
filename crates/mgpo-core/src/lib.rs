//! # mgpo-core
//!
//! LoRA-MGPO (arXiv 2502.14538): AdamW plus a perturbation of the trainable
//! weights along AdamW's own first moment, with a radius rho scaled by
//! 1 / EMA of the gradient norm. The gradient is taken at the perturbed
//! point, the move is undone and AdamW steps; unlike SAM there is no second
//! backward pass. [`spec`] is the exact definition.
//!
//! The whole algorithm is [`Mgpo`] (`mgpo.rs`), written once over the small
//! capability traits of [`backend`]; each framework has its own crate
//! (`mgpo-ndarray`, `mgpo-candle`, `mgpo-tch`, `mgpo-dfdx`, `mgpo-burn`).
//! Tensors are handed over by name, in registration order:
//!
//! ```text
//! opt.perturb(&mut tensors)?;                        // theta <- theta + eps_t
//! let grads = /* forward + backward at the perturbed point */;
//! let report = opt.step(&mut tensors, &grads)?;      // remove eps_t, AdamW
//! ```
//!
//! The root holds what a user of the optimizer needs: [`Mgpo`], its
//! [`Config`] and presets, the [`Layout`] of named tensors with parameter
//! groups, [`StepReport`], [`State`], errors, the [`WarmupCosine`] schedule,
//! the shared [`LoraConfig`], and [`Bound`] / [`Registry`], the
//! framework-neutral half of the optimizers of frameworks whose tensors are
//! shared handles. Backend authors implement the traits of [`backend`].

#![warn(missing_docs)]

pub mod backend;

/// The exact definition of the algorithm, of its precision and of the
/// conformance-vector format (`docs/spec.md` in the repository, included here).
#[doc = include_str!("../SPEC.md")]
pub mod spec {}
mod bound;
pub mod checkpoint;
mod clip;
mod config;
mod error;
mod layout;
mod lora;
mod mgpo;
mod named;
mod schedule;
mod shard;

pub use bound::{Bound, FactoredPerturbation, PerturbationSlot, Registry, Shares};
pub use clip::clip_factor;
pub use config::{AdamWConfig, Config, Direction, Perturbation, Scope, Space};
pub use error::{CheckpointError, MgpoError, Result};
pub use layout::{is_bias_or_norm, AdapterInfo, Layout, LayoutBuilder, ParamGroup, TensorInfo};
pub use lora::{lora_scale, LoraConfig, LoraInit};
pub use mgpo::{Group, GroupReport, Mgpo, Moments, State, StepReport, WeightPerturbation};
pub use named::{NamedGrads, NamedTensors};
pub use schedule::WarmupCosine;
pub use shard::{OneProcess, PartialSums, Shard};
