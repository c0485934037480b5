//! The dfdx backend against the float64 conformance vectors, the float64
//! reference and the ndarray backend.

use mgpo_conformance::props::{case_strategy, check_against_reference, check_agree};
use mgpo_conformance::{assert_dir_passes, project_vectors_dir};
use mgpo_dfdx::{cpu_f32, cpu_f64};
use mgpo_ndarray::NdBackend;
use proptest::prelude::*;

#[test]
fn project_vectors_f64() {
    assert_dir_passes(&cpu_f64(), project_vectors_dir());
}

#[test]
fn project_vectors_f32() {
    assert_dir_passes(&cpu_f32(), project_vectors_dir());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn f64_agrees_with_reference(case in case_strategy()) {
        check_against_reference(&cpu_f64(), &case).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn f32_agrees_with_reference(case in case_strategy()) {
        check_against_reference(&cpu_f32(), &case).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn f64_agrees_with_ndarray(case in case_strategy()) {
        check_agree(&cpu_f64(), &NdBackend::<f64>::new(), &case).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn f32_agrees_with_ndarray(case in case_strategy()) {
        check_agree(&cpu_f32(), &NdBackend::<f32>::new(), &case).map_err(TestCaseError::fail)?;
    }
}
