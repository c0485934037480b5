//! # mgpo-conformance
//!
//! Proof that a LoRA-MGPO backend computes what docs/spec.md (in this
//! crate's repository) defines: the conformance vectors, embedded
//! ([`vectors`]), a runner for them ([`run`], [`run_dir`],
//! [`assert_dir_passes`]), an independent float64 reference
//! ([`reference`]), and proptest generators that compare any backend with
//! that reference, or with another backend, step by step ([`props`]).

pub mod props;
pub mod reference;
mod run;
mod vector;
pub mod vectors;

use std::path::PathBuf;

pub use run::{assert_dir_passes, run, run_dir, table, Outcome, QuantityError, Row};
pub use vector::{load_dir, AdapterData, Dtype, Expect, Number, Pair, ParamGroup, PerturbationData, PlainData, StepData, TensorData, Tolerance, Tolerances, Vector, VectorError};

/// The directory the embedded vectors come from: `vectors/` in this crate's
/// source (present in a registry copy too). For tools that read files;
/// code should use [`vectors`].
pub fn project_vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}
