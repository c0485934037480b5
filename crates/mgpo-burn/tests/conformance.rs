//! burn's ndarray backend through the conformance kit: every vector and
//! random cases against the float64 reference, f32 and f64, through the
//! in-place host kernels (serially and with every tensor on the parallel
//! path) and through the tensor-op path that burn's other backends take;
//! and in lockstep with mgpo-ndarray.

use mgpo_burn::{cpu_f32, cpu_f64, BurnBackend};
use mgpo_ndarray::NdBackend;

fn tensor_ops(be: BurnBackend) -> BurnBackend {
    BurnBackend { host_kernels: false, ..be }
}

mgpo_conformance::conformance_tests! {
    host_f32 => cpu_f32(),
    host_f64 => cpu_f64(),
    parallel_f32 => BurnBackend { par_threshold: 1, ..cpu_f32() },
    parallel_f64 => BurnBackend { par_threshold: 1, ..cpu_f64() },
    tensor_ops_f32 => tensor_ops(cpu_f32()),
    tensor_ops_f64 => tensor_ops(cpu_f64());
    agree:
    f32_agrees_with_ndarray => (cpu_f32(), NdBackend::<f32>::new()),
    f64_agrees_with_ndarray => (cpu_f64(), NdBackend::<f64>::new()),
}
