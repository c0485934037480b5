//! # mgpo-conformance
//!
//! Proof that a LoRA-MGPO backend computes what the specification defines:
//! the conformance vectors, embedded in this crate ([`vectors`]); an
//! independent float64 reference ([`reference`](mod@reference)); random property cases
//! compared with it step by step ([`props`]); and the kit that runs all of
//! them on any backend, [`Suite`], with [`conformance_tests!`] to generate
//! the `#[test]`s. The [`guide`] shows how to write a backend for a tensor
//! library of your own in about 150 lines and prove it with the kit:
//!
//! ```ignore
//! mgpo_conformance::conformance_tests! {
//!     my_backend_f32 => MyBackend::<f32>::default(),
//!     my_backend_f64 => MyBackend::<f64>::default(),
//! }
//! ```
//!
//! A failure names the vector (or property case), the step, the tensor and
//! index, the value, the expected value, the tolerance and the backend
//! method most likely at fault ([`Suspect`]).

#![warn(missing_docs)]

mod failure;
pub mod guide;
mod kit;
pub mod props;
pub mod reference;
mod run;
mod vector;
pub mod vectors;

pub use failure::{Failure, Mismatch, Origin, Quantity, Suspect};
pub use kit::{assert_conforms, suite, IntoSuite, Properties, Report, Suite, DEFAULT_CASES};
#[allow(deprecated)]
pub use run::assert_dir_passes;
pub use run::{run, run_dir, run_with, table, Outcome, QuantityError, Row};
pub use vector::{load_dir, AdapterData, Dtype, Expect, Number, Pair, ParamGroup, PerturbationData, PlainData, StepData, TensorData, Tolerance, Tolerances, Vector, VectorError};

/// The directory the embedded vectors come from: `vectors/` in this
/// crate's source, which a registry copy carries too. For tools that read
/// files; code should use [`vectors`] or [`Suite`].
#[deprecated(since = "0.1.0", note = "the vectors are embedded: `mgpo_conformance::vectors::all()`, or `Suite` to run them")]
pub fn project_vectors_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}
