//! dfdx through the conformance kit: every vector and random cases against
//! the float64 reference, f32 and f64; and in lockstep with mgpo-ndarray.

use mgpo_conformance::Suite;
use mgpo_dfdx::{cpu_f32, cpu_f64};
use mgpo_ndarray::NdBackend;

mgpo_conformance::conformance_tests! {
    dfdx_f32 => Suite::new(cpu_f32()).cases(128),
    dfdx_f64 => Suite::new(cpu_f64()).cases(128);
    agree:
    f32_agrees_with_ndarray => (Suite::new(cpu_f32()).cases(128), NdBackend::<f32>::new()),
    f64_agrees_with_ndarray => (Suite::new(cpu_f64()).cases(128), NdBackend::<f64>::new()),
}
