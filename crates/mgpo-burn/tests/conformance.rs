//! The conformance vectors on burn's ndarray backend, f32 and f64, through
//! the in-place host kernels and through the tensor-op path that burn's
//! other backends take.

use mgpo_burn::{cpu_f32, cpu_f64, BurnBackend};
use mgpo_conformance::{assert_dir_passes, project_vectors_dir};

fn tensor_ops(be: BurnBackend) -> BurnBackend {
    BurnBackend { host_kernels: false, ..be }
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
fn vectors_through_tensor_ops_f32_and_f64() {
    for be in [tensor_ops(cpu_f32()), tensor_ops(cpu_f64())] {
        assert_dir_passes(&be, project_vectors_dir());
    }
}

/// The host kernels switch to several threads above `par_threshold`; a
/// threshold of 1 sends every tensor of the vectors down that path.
#[test]
fn vectors_with_the_parallel_host_path() {
    for be in [cpu_f64(), cpu_f32()] {
        assert_dir_passes(&BurnBackend { par_threshold: 1, ..be }, project_vectors_dir());
    }
}
