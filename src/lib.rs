//! # lora-mgpo
//!
//! LoRA-MGPO (arXiv 2502.14538): AdamW plus a perturbation of the
//! trainable weights along AdamW's own first moment, so that the gradient
//! is taken at a slightly moved point without a second backward pass.
//! This facade re-exports the algorithm ([`mgpo_core`]) and, one cargo
//! feature each, the backends: `ndarray` (default), `candle`, `tch`, `dfdx`, `burn`.
//!
//! ```
//! use lora_mgpo::ndarray::{MgpoOptimizer, NdBackend};
//! use lora_mgpo::{Config, Layout};
//! use ndarray::{ArrayD, IxDyn};
//!
//! // One adapter: A is r x in (2 x 3), B is out x r (4 x 2), alpha 8.
//! let layout = Layout::builder().adapter("q", 8.0, &[2, 3], &[4, 2], false).build()?;
//! let mut opt = MgpoOptimizer::<f32>::new(NdBackend::new(), Config::paper_nlu(1e-3), layout)?;
//! // Every tensor with its name, in the order of `opt.layout().names()`.
//! let mut params = vec![("q.a", ArrayD::from_elem(IxDyn(&[2, 3]), 0.1f32)), ("q.b", ArrayD::zeros(IxDyn(&[4, 2])))];
//! for _ in 0..3 {
//!     opt.perturb(&mut params)?; // before the forward pass
//!     let grads = vec![("q.a", ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)), ("q.b", ArrayD::from_elem(IxDyn(&[4, 2]), -0.5))];
//!     let report = opt.step(&mut params, &grads)?; // after the backward pass
//!     assert!(!report.skipped);
//! }
//! // Tensors given in another order are refused, naming them.
//! params.swap(0, 1);
//! assert!(matches!(opt.perturb(&mut params), Err(lora_mgpo::MgpoError::NameMismatch { .. })));
//! # Ok::<(), lora_mgpo::MgpoError>(())
//! ```

#![warn(missing_docs)]

pub use mgpo_core::*;

#[cfg(feature = "ndarray")]
pub use mgpo_ndarray as ndarray;

#[cfg(feature = "candle")]
pub use mgpo_candle as candle;

#[cfg(feature = "tch")]
pub use mgpo_tch as tch;

#[cfg(feature = "dfdx")]
pub use mgpo_dfdx as dfdx;

#[cfg(feature = "burn")]
pub use mgpo_burn as burn;

/// The README's code blocks, compiled and run as doctests.
#[cfg(all(doctest, feature = "candle"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
