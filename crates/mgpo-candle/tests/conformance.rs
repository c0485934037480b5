//! The conformance vectors on candle, f32 and f64,
//! through the fused CPU kernels and through the tensor-op path that CUDA
//! and Metal take.

use candle_core::DType;
use mgpo_candle::{cpu_f32, cpu_f64, CandleBackend};
use mgpo_conformance::{assert_dir_passes, project_vectors_dir};

fn device_path(dtype: DType) -> CandleBackend {
    CandleBackend { cpu_kernels: false, ..CandleBackend::cpu(dtype) }
}

#[test]
fn project_vectors_f32() {
    assert_dir_passes(&cpu_f32(), project_vectors_dir());
}

#[test]
fn project_vectors_f64() {
    assert_dir_passes(&cpu_f64(), project_vectors_dir());
}

#[test]
fn project_vectors_device_path_f32_and_f64() {
    assert_dir_passes(&device_path(DType::F32), project_vectors_dir());
    assert_dir_passes(&device_path(DType::F64), project_vectors_dir());
}

/// The fused kernels switch to several threads above `par_threshold`; a
/// threshold of 1 sends every tensor of the vectors down that path.
#[test]
fn vectors_with_the_parallel_cpu_path() {
    let be = CandleBackend { par_threshold: 1, ..cpu_f64() };
    assert_dir_passes(&be, project_vectors_dir());
    let be = CandleBackend { par_threshold: 1, ..cpu_f32() };
    assert_dir_passes(&be, project_vectors_dir());
}
