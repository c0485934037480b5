//! # mgpo-experiments
//!
//! The experiments behind `mgpo demo` and `mgpo experiment`: does plain
//! LoRA's training loss rebound after converging at high rank and learning
//! rate (the "double descent" of arXiv 2502.14538, Fig. 1-3), and does
//! LoRA-MGPO remove it?
//!
//! - [`task`]: built-in fine-tuning tasks (a base network pre-trained and
//!   cached as safetensors, adapters fine-tuned on a shifted task), one of
//!   them on real data (UCI digits);
//! - [`backend`]: the same run on candle (default), dfdx or tch;
//! - [`run`]: one run, logged per step and evaluated periodically;
//! - [`metrics`]: smoothing and the rebound;
//! - [`sweep`]: the grid over tasks, ranks, learning rates, methods and
//!   seeds, its output files, summary table and plots ([`plot`]).

pub mod backend;
pub mod data;
pub mod error;
pub mod method;
pub mod metrics;
pub mod model;
pub mod rng;
pub mod plot;
pub mod run;
pub mod sweep;
pub mod task;

pub use error::{Error, Result};
pub use method::Method;
pub use sweep::{run_sweep, SweepSpec};
