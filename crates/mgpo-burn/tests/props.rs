//! The host kernels give mgpo-ndarray's bits, on random configurations,
//! shapes and gradient sequences (non-finite ones included); agreement
//! within tolerance, with the reference and with mgpo-ndarray, is in
//! tests/conformance.rs.

use mgpo_burn::{cpu_f32, cpu_f64};
use mgpo_conformance::props::{case_strategy, CaseRun};
use mgpo_ndarray::NdBackend;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

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
