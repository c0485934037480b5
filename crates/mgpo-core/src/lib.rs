//! # mgpo-core
//!
//! LoRA-MGPO (arXiv 2502.14538) written once over the [`TensorOps`] traits:
//! AdamW plus a perturbation of the trainable weights along AdamW's own
//! first moment, with a radius rho scaled by 1 / EMA of the gradient norm.
//! The whole algorithm is in [`mgpo`]; backends live in their own crates.
//!
//! ```text
//! opt.perturb(&mut params, &mut frozen)?;   // theta <- theta + eps_t
//! let grads = /* forward + backward at the perturbed point */;
//! let report = opt.step(&mut params, &mut frozen, &grads)?;  // remove eps_t, AdamW
//! ```

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod cpu;
pub mod error;
pub mod layout;
pub mod lowrank;
pub mod mgpo;
pub mod noise;
pub mod ops;
pub mod schedule;
pub mod slots;

pub use config::{AdamWConfig, Config, Direction, Perturbation, Scope, Space};
pub use error::{CheckpointError, MgpoError, Result};
pub use layout::{AdapterInfo, Layout, LayoutBuilder, TensorInfo};
pub use mgpo::{Group, GroupReport, Mgpo, Moments, State, StepReport, WeightPerturbation};
pub use ops::{adamw_element, materialise_is_cheaper, AdamWConsts, AdamWItem, AdamWStep, AxpyItem, FusedUpdate, HostIo, LowRank, Reduce, TensorOps, Tensors};
pub use schedule::WarmupCosine;
pub use slots::{GradSlots, NoFrozen, Slots};
