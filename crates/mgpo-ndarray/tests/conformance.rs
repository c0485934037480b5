//! The ndarray backend against the float64 vectors and reference.

use mgpo_conformance::props::{case_strategy, check_against_reference, check_agree};
use mgpo_conformance::{assert_dir_passes, project_vectors_dir};
use mgpo_ndarray::NdBackend;
use proptest::prelude::*;

#[test]
fn project_vectors_f64() {
    assert_dir_passes(&NdBackend::<f64>::new(), project_vectors_dir());
}

#[test]
fn project_vectors_f32() {
    assert_dir_passes(&NdBackend::<f32>::new(), project_vectors_dir());
}

/// The parallel code path (threshold 1) computes what the serial one does.
#[test]
fn parallel_path_passes_vectors() {
    let be = NdBackend::<f64>::with_par_threshold(1);
    assert_dir_passes(&be, project_vectors_dir());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn f64_agrees_with_reference(case in case_strategy()) {
        check_against_reference(&NdBackend::<f64>::new(), &case).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn f32_agrees_with_reference(case in case_strategy()) {
        check_against_reference(&NdBackend::<f32>::new(), &case).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn parallel_agrees_with_serial(case in case_strategy()) {
        let par = NdBackend::<f64>::with_par_threshold(1);
        check_agree(&par, &NdBackend::<f64>::new(), &case).map_err(TestCaseError::fail)?;
    }
}
