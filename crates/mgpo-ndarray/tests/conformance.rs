//! The ndarray backend through the conformance kit: every vector and
//! random cases against the float64 reference, f32 and f64, serially and
//! with the parallel path taken by every tensor (threshold 1).

use mgpo_conformance::Suite;
use mgpo_ndarray::NdBackend;

mgpo_conformance::conformance_tests! {
    ndarray_f32 => Suite::new(NdBackend::<f32>::new()).cases(256),
    ndarray_f64 => Suite::new(NdBackend::<f64>::new()).cases(256),
    parallel_f32 => NdBackend::<f32>::with_par_threshold(1),
    parallel_f64 => NdBackend::<f64>::with_par_threshold(1),
}
