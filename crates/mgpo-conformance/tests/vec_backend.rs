//! The kit on a backend written from its guide, over a plain `Vec`: the
//! correct backend passes every vector and the property cases in f32 and
//! f64, and each injected fault fails the suite with the method that has it
//! named as the most likely at fault (`cargo test -- --nocapture` prints
//! each report: how many vectors and cases each fault fails).

mod support;

use mgpo_conformance::{Report, Suite};
use support::{Fault, VecBackend};

mgpo_conformance::conformance_tests! {
    vec_f32 => VecBackend::<f32>::default(),
    vec_f64 => VecBackend::<f64>::default(),
}

/// Property cases of each faulty run: fixed, so a fault test does not
/// depend on the draw.
const SEED: u64 = 0x5eed_0f_fa17;
const CASES: u32 = 48;

fn report<F: mgpo_core::backend::Float>(fault: Fault) -> Report {
    Suite::new(VecBackend::<F>::new(fault)).seed(SEED).cases(CASES).run()
}

/// The suite fails and blames `method` first.
fn assert_caught(r: &Report, method: &str) {
    println!("{r}");
    assert!(!r.passed(), "the fault went unnoticed:\n{r}");
    let suspect = r.suspect().expect("a failed report names a suspect");
    assert_eq!(suspect.method(), method, "wrong method blamed:\n{r}");
}

/// A sum of squares in f32 in an f32 backend: only the vector whose
/// 10^4 entries make f32 accumulation visible catches it.
#[test]
fn sum_sq_accumulated_in_f32_in_an_f32_backend() {
    let r = report::<f32>(Fault::SumSqInF32);
    assert_caught(&r, "Reduce::sum_sq");
    let failed: Vec<&str> = r.vectors.iter().flatten().filter(|o| !o.passed()).map(|o| o.name.as_str()).collect();
    assert!(failed.contains(&"f32-accumulation-adapter"), "{failed:?}");
}

/// The same fault in an f64 backend, where the f64 tolerance (about
/// 1e-12 relative) sees f32 rounding everywhere.
#[test]
fn sum_sq_accumulated_in_f32_in_an_f64_backend() {
    let r = report::<f64>(Fault::SumSqInF32);
    assert_caught(&r, "Reduce::sum_sq");
    assert!(r.failed_vectors() >= 10, "{r}");
    assert!(r.failed_cases() > 0, "{r}");
}

#[test]
fn adamw_sign_flipped() {
    for r in [report::<f32>(Fault::AdamWSign), report::<f64>(Fault::AdamWSign)] {
        assert_caught(&r, "FusedUpdate::adamw");
        assert_eq!(r.suspect(), Some(mgpo_conformance::Suspect::AdamW), "{r}");
        assert!(r.failed_cases() > 0, "{r}");
    }
}

#[test]
fn transposed_gram() {
    for r in [report::<f32>(Fault::GramTransposed), report::<f64>(Fault::GramTransposed)] {
        assert_caught(&r, "LowRank::gram_cols / LowRank::gram_rows");
    }
}

#[test]
fn add_low_rank_drops_a_term() {
    for r in [report::<f32>(Fault::AddLowRankDropsRs), report::<f64>(Fault::AddLowRankDropsRs)] {
        assert_caught(&r, "LowRank::add_low_rank");
        assert!(r.failed_cases() > 0, "{r}");
    }
}

#[test]
fn wrong_sum_of_m_squared() {
    for r in [report::<f32>(Fault::MomentNormOfOldM), report::<f64>(Fault::MomentNormOfOldM)] {
        assert_caught(&r, "FusedUpdate::adamw");
        assert_eq!(r.suspect(), Some(mgpo_conformance::Suspect::AdamWMomentNorm), "{r}");
    }
}

/// The same sum accumulated in f32: in an f32 backend only the vector of
/// 10^4-entry adapters sees it.
#[test]
fn sum_of_m_squared_accumulated_in_f32() {
    let r = report::<f32>(Fault::MomentNormInF32);
    assert_caught(&r, "FusedUpdate::adamw");
    let failed: Vec<&str> = r.vectors.iter().flatten().filter(|o| !o.passed()).map(|o| o.name.as_str()).collect();
    assert!(failed.contains(&"f32-accumulation-adapter"), "{failed:?}");
    let r = report::<f64>(Fault::MomentNormInF32);
    assert_caught(&r, "FusedUpdate::adamw");
}

#[test]
fn wrong_noise_seed() {
    for r in [report::<f32>(Fault::NoiseSeed), report::<f64>(Fault::NoiseSeed)] {
        assert_caught(&r, "FusedUpdate::axpy_noise");
        assert!(r.failed_cases() > 0, "{r}");
    }
}

/// A failure says where and what: vector, step, tensor, index, value,
/// expected value, tolerance and method.
#[test]
fn a_failure_names_everything() {
    let r = Suite::new(VecBackend::<f64>::new(Fault::AdamWSign)).run_vectors();
    let o = r.vectors.iter().flatten().find(|o| o.name == "rho-zero").expect("rho-zero is embedded");
    let f = o.failures.first().expect("rho-zero fails with the sign flipped");
    let text = f.to_string();
    for needle in ["vector `rho-zero`", "step 1", "params", "got", "expected", "atol", "rtol", "FusedUpdate::adamw"] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert_eq!(f.step, 1);
    assert!(matches!(f.mismatch, mgpo_conformance::Mismatch::Value { .. }), "{f:?}");
    assert_eq!(f.tolerance, Some(o.tolerance));
}
