//! tch through the conformance kit: every vector and random cases against
//! the float64 reference, f32 and f64; and in lockstep with mgpo-ndarray.

use mgpo_ndarray::NdBackend;
use mgpo_tch::{cpu_f32, cpu_f64};

mgpo_conformance::conformance_tests! {
    tch_f32 => cpu_f32(),
    tch_f64 => cpu_f64();
    agree:
    f32_agrees_with_ndarray => (cpu_f32(), NdBackend::<f32>::new()),
    f64_agrees_with_ndarray => (cpu_f64(), NdBackend::<f64>::new()),
}
