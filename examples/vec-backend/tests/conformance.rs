//! The whole conformance kit on the Vec backend, as a user runs it: every
//! embedded vector and random property cases against the float64
//! reference, in f32 and f64, from the registry copies of the crates.

use mgpo_conformance::{Dtype, Suite, Tolerance};
use vec_backend::VecBackend;

mgpo_conformance::conformance_tests! {
    vec_f32 => VecBackend::<f32>::default(),
    vec_f64 => VecBackend::<f64>::default(),
}

/// The packaged crate carries its vectors, and they load by name.
#[test]
fn the_packaged_kit_carries_its_vectors() {
    let names: Vec<&str> = mgpo_conformance::vectors::names().collect();
    assert!(names.len() >= 35, "{names:?}");
    for name in ["f32-accumulation-adapter", "f32-accumulation-weight", "gaussian-large", "plain-tensors", "param-groups"] {
        let v = mgpo_conformance::vectors::by_name(name).unwrap_or_else(|| panic!("{name} is not embedded"));
        assert_eq!(v.name, name);
    }
}

/// One call runs vectors and property cases; a declared tolerance is
/// reported, and a strict run of a correct backend passes as well.
#[test]
fn one_call_and_a_declared_tolerance() {
    mgpo_conformance::assert_conforms(VecBackend::<f64>::default());
    let loose = Tolerance { rtol: 1e-3, atol: 1e-6 };
    let r = Suite::new(VecBackend::<f32>::default()).tolerance(Dtype::F32, loose).cases(16).seed(7).run();
    assert!(r.passed(), "{r}");
    assert_eq!(r.declared, Some(loose));
    assert!(r.looser_than > 0, "{r}");
    assert!(r.to_string().contains("DECLARED"), "{r}");
}
