//! The conformance vectors on tch, f32 and f64.

use mgpo_conformance::{assert_dir_passes, project_vectors_dir};
use mgpo_tch::{cpu_f32, cpu_f64};

#[test]
fn project_vectors_f32() {
    assert_dir_passes(&cpu_f32(), project_vectors_dir());
}

#[test]
fn project_vectors_f64() {
    assert_dir_passes(&cpu_f64(), project_vectors_dir());
}
