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
//! - [`run`]: one run, logged per step and evaluated periodically, paired
//!   across methods (same adapters and batches for a seed);
//! - [`sweep`]: the grid over tasks, ranks, learning rates, methods and
//!   seeds, its output files, summary table and plots ([`plot`]);
//! - [`transformer`]: the same sweep on a pretrained transformer
//!   (`minilm-wordnet`: all-MiniLM-L6-v2 on WordNet supersenses).
//!
//! The parts that do not depend on the model, for any fine-tuning sweep
//! (a transformer's too): [`method`] (the configurations compared and how
//! they pair up: baselines, random controls), [`metrics`] (smoothing, the
//! three-phase rebound, validation checkpoint selection), [`outcome`] (a
//! run's summary from its logged loss and evaluations) and [`rule`] (the
//! pre-registered decision rule over paired seeds).

#![warn(missing_docs)]

pub mod backend;
pub mod data;
pub mod error;
pub mod method;
pub mod metrics;
pub mod model;
pub mod outcome;
pub mod rng;
pub mod plot;
pub mod rule;
pub mod run;
pub mod sweep;
pub mod task;
pub mod transformer;

pub use error::{Error, Result};
pub use method::Method;
pub use sweep::{run_sweep, SweepSpec};
