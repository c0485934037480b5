//! # mgpo-conformance
//!
//! Proof that a LoRA-MGPO backend computes what SPEC.md defines: a runner
//! for the float64 conformance vectors ([`run`], [`run_dir`],
//! [`assert_dir_passes`]), an independent float64 reference
//! ([`reference`]), and proptest generators that compare any backend with
//! that reference, or with another backend, step by step ([`props`]).

pub mod props;
pub mod reference;
mod run;
mod vector;

use std::path::PathBuf;

pub use run::{assert_dir_passes, run, run_dir, table, Outcome, QuantityError, Row};
pub use vector::{load_dir, AdapterData, Expect, Number, Pair, PerturbationData, StepData, TensorData, Tolerance, Vector};

/// The project's vectors, `conformance/vectors` at the repository root.
pub fn project_vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/vectors")
}

/// The shared example vectors, `../shared/conformance/vectors` beside the repository.
pub fn shared_vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/vectors")
}
