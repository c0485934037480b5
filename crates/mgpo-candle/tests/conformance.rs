//! candle through the conformance kit: every vector and random cases
//! against the float64 reference, f32 and f64, through the fused CPU
//! kernels (serially and with every tensor on the parallel path) and
//! through the tensor-op path that CUDA and Metal take; and in lockstep
//! with mgpo-ndarray.

use candle_core::DType;
use mgpo_candle::{cpu_f32, cpu_f64, CandleBackend};
use mgpo_ndarray::NdBackend;

fn device_path(dtype: DType) -> CandleBackend {
    CandleBackend { cpu_kernels: false, ..CandleBackend::cpu(dtype) }
}

mgpo_conformance::conformance_tests! {
    fused_f32 => cpu_f32(),
    fused_f64 => cpu_f64(),
    parallel_f32 => CandleBackend { par_threshold: 1, ..cpu_f32() },
    parallel_f64 => CandleBackend { par_threshold: 1, ..cpu_f64() },
    device_path_f32 => device_path(DType::F32),
    device_path_f64 => device_path(DType::F64);
    agree:
    f32_agrees_with_ndarray => (cpu_f32(), NdBackend::<f32>::new()),
    f64_agrees_with_ndarray => (cpu_f64(), NdBackend::<f64>::new()),
}
