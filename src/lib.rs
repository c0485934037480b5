//! # lora-mgpo
//!
//! LoRA-MGPO (arXiv 2502.14538): AdamW plus a perturbation of the
//! trainable weights along AdamW's own first moment, so that the gradient
//! is taken at a slightly moved point without a second backward pass.
//! This facade re-exports the algorithm ([`mgpo_core`]) and, one cargo
//! feature each, the backends: `ndarray` (default), `candle`, `tch`, `dfdx`, `burn`.
//!
//! ```
//! use lora_mgpo::ndarray::{Mgpo, NdBackend};
//! use lora_mgpo::{Config, Layout, NoFrozen};
//! use ndarray::{ArrayD, IxDyn};
//!
//! // One adapter: A is r x in (2 x 3), B is out x r (4 x 2), alpha 8.
//! let layout = Layout::builder().adapter("q", 8.0, &[2, 3], &[4, 2], false).build()?;
//! let mut opt = Mgpo::<f32>::new(NdBackend::new(), Config::paper_nlu(1e-3), layout)?;
//! let mut params = vec![ArrayD::from_elem(IxDyn(&[2, 3]), 0.1f32), ArrayD::zeros(IxDyn(&[4, 2]))];
//! for _ in 0..3 {
//!     opt.perturb(&mut params, &mut NoFrozen)?;       // before the forward pass
//!     let grads = vec![ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32), ArrayD::from_elem(IxDyn(&[4, 2]), -0.5)];
//!     let report = opt.step(&mut params, &mut NoFrozen, &grads)?; // after the backward pass
//!     assert!(!report.skipped);
//! }
//! # Ok::<(), lora_mgpo::MgpoError>(())
//! ```

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
