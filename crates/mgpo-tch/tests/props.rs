//! Property tests: tch agrees step by step with the float64 reference and
//! with the ndarray backend, in f32 and f64, on random configurations,
//! shapes and gradient sequences (non-finite ones included).

use mgpo_conformance::props::{case_strategy, check_against_reference, check_agree};
use mgpo_ndarray::NdBackend;
use mgpo_tch::{cpu_f32, cpu_f64};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn f64_matches_the_reference(case in case_strategy()) {
        check_against_reference(&cpu_f64(), &case).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn f32_matches_the_reference(case in case_strategy()) {
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
