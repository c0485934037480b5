//! Property tests: burn agrees step by step with the float64 reference and
//! with the ndarray backend, in f32 and f64, on random configurations,
//! shapes and gradient sequences (non-finite ones included); the host
//! kernels give mgpo-ndarray's bits.

use mgpo_burn::{cpu_f32, cpu_f64, BurnBackend};
use mgpo_conformance::props::{case_strategy, check_against_reference, check_agree, CaseRun};
use mgpo_ndarray::NdBackend;
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

    /// The tensor-op path (what wgpu, CUDA and the other burn backends run)
    /// against the reference.
    #[test]
    fn tensor_ops_match_the_reference(case in case_strategy()) {
        for be in [cpu_f64(), cpu_f32()] {
            check_against_reference(&BurnBackend { host_kernels: false, ..be }, &case).map_err(TestCaseError::fail)?;
        }
    }

    /// The host kernels are mgpo-ndarray's, in its blocks and order: the
    /// same bits after every full step, f32 and f64.
    #[test]
    fn host_kernels_give_ndarrays_bits(case in case_strategy()) {
        bits_agree(&cpu_f32(), &NdBackend::<f32>::new(), &case)?;
        bits_agree(&cpu_f64(), &NdBackend::<f64>::new(), &case)?;
    }
}

fn bits_agree<A, B>(a: &A, b: &B, case: &mgpo_conformance::props::Case) -> Result<(), TestCaseError>
where
    A: mgpo_core::backend::TensorOps + mgpo_core::backend::HostIo + Clone,
    B: mgpo_core::backend::TensorOps + mgpo_core::backend::HostIo + Clone,
{
    let (mut ra, mut rb) = (CaseRun::new(a, case).map_err(TestCaseError::fail)?, CaseRun::new(b, case).map_err(TestCaseError::fail)?);
    for s in &case.steps {
        ra.full_step(s).map_err(TestCaseError::fail)?;
        rb.full_step(s).map_err(TestCaseError::fail)?;
        let (x, y) = (ra.host_tensors().map_err(TestCaseError::fail)?, rb.host_tensors().map_err(TestCaseError::fail)?);
        let bits = |v: &(Vec<Vec<f64>>, Vec<Vec<f64>>)| v.0.iter().chain(&v.1).flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&x), bits(&y));
    }
    Ok(())
}
