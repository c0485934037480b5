//! `measure` (default): runs every embedded conformance vector on every
//! correct backend of the project, finds per vector and dtype the smallest
//! atol with which each passes at a fixed rtol (f32: 1e-6, f64: 1e-13), and
//! prints ten times the worst of them (at least 1e-8 / 1e-16) beside the
//! tolerance the vector carries: the rule docs/spec.md ("Comparison") sets.
//! Exits 1 when a backend fails a vector at a tenth of the vector's own
//! tolerance (a margin under ten).
//!
//! `faults`: runs every vector on the `Vec` backend of docs/backend-guide.md
//! with one injected fault at a time and prints which vectors fail.
//!
//! ```sh
//! cp Cargo.lock tools/measure-tolerances/
//! cargo run --manifest-path tools/measure-tolerances/Cargo.toml --target-dir target -- measure
//! # with tch: source scripts/setup-libtorch.sh, then --features tch
//! ```

mod grouped;
mod vecbackend;

use mgpo_conformance::{run, vectors, Dtype, Outcome, Tolerance, Tolerances, Vector};
use mgpo_core::{HostIo, TensorOps};
use vecbackend::{Acc, VecBackend};

/// Byte-identical copies of an earlier independent example set: their single
/// `tolerance` is theirs, reported here but not held to the margin.
const COPIED: [&str; 4] = ["nan-gradient-skips", "official-weight-peradapter-descent", "paper-adapter-global-ascent", "rho-zero-is-adamw"];

const RTOL_F32: f64 = 1e-6;
const RTOL_F64: f64 = 1e-13;

/// Runs `v` on `be`, through the parameter-group emulation when `v` has groups.
fn run_any<B: TensorOps + HostIo + Clone>(be: &B, v: &Vector) -> Outcome {
    if v.param_groups.is_empty() {
        return run(be, v);
    }
    let groups = v.tensor_names().iter().map(|n| v.param_group_of(n)).collect();
    let mut w = v.clone();
    w.param_groups.clear();
    run(&grouped::Grouped { inner: be.clone(), groups, wd_cfg: v.config.adamw.weight_decay }, &w)
}

fn passes_with<B: TensorOps + HostIo + Clone>(be: &B, v: &Vector, t: Tolerance) -> bool {
    let mut w = v.clone();
    w.tolerances = Tolerances { f32: t, f64: t };
    run_any(be, &w).passed()
}

/// The smallest atol (to about 3%) with which `v` passes on `be` at `rtol`.
fn needed_atol<B: TensorOps + HostIo + Clone>(be: &B, v: &Vector, rtol: f64) -> Option<f64> {
    let passes = |atol: f64| passes_with(be, v, Tolerance { rtol, atol });
    if !passes(1.0) {
        return None;
    }
    if passes(0.0) {
        return Some(0.0);
    }
    let (mut lo, mut hi) = (-30.0f64, 0.0f64);
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        if passes(10f64.powf(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(10f64.powf(hi))
}

/// x rounded up to one significant digit, as the decimal a vector would carry.
fn round_up(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let e = x.log10().floor() as i32;
    let m = (x / 10f64.powi(e) - 1e-9).ceil();
    format!("{m}e{e}").parse().unwrap_or(x)
}

/// Per vector: the needed atol at the reference rtol, and whether the
/// vector passes with a tenth of its own tolerance (a margin of ten).
type Measure = Box<dyn Fn(&Vector, Tolerance) -> (Option<f64>, bool)>;

fn backends() -> Vec<(&'static str, Dtype, Measure)> {
    fn m<B: TensorOps + HostIo + Clone + 'static>(be: B, rtol: f64) -> Measure {
        Box::new(move |v, own| (needed_atol(&be, v, rtol), passes_with(&be, v, Tolerance { rtol: own.rtol / 10.0, atol: own.atol / 10.0 })))
    }
    let device = |d| mgpo_candle::CandleBackend { cpu_kernels: false, ..mgpo_candle::CandleBackend::cpu(d) };
    #[allow(unused_mut)]
    let mut out: Vec<(&'static str, Dtype, Measure)> = vec![
        ("ndarray", Dtype::F32, m(mgpo_ndarray::NdBackend::<f32>::new(), RTOL_F32)),
        ("ndarray", Dtype::F64, m(mgpo_ndarray::NdBackend::<f64>::new(), RTOL_F64)),
        ("ndarray-par", Dtype::F32, m(mgpo_ndarray::NdBackend::<f32>::with_par_threshold(1), RTOL_F32)),
        ("ndarray-par", Dtype::F64, m(mgpo_ndarray::NdBackend::<f64>::with_par_threshold(1), RTOL_F64)),
        ("candle", Dtype::F32, m(mgpo_candle::cpu_f32(), RTOL_F32)),
        ("candle", Dtype::F64, m(mgpo_candle::cpu_f64(), RTOL_F64)),
        ("candle-dev", Dtype::F32, m(device(candle_core::DType::F32), RTOL_F32)),
        ("candle-dev", Dtype::F64, m(device(candle_core::DType::F64), RTOL_F64)),
        ("dfdx", Dtype::F32, m(mgpo_dfdx::cpu_f32(), RTOL_F32)),
        ("dfdx", Dtype::F64, m(mgpo_dfdx::cpu_f64(), RTOL_F64)),
        ("vec", Dtype::F32, m(VecBackend::<f32>::new(Acc::Correct), RTOL_F32)),
        ("vec", Dtype::F64, m(VecBackend::<f64>::new(Acc::Correct), RTOL_F64)),
    ];
    #[cfg(feature = "tch")]
    {
        out.push(("tch", Dtype::F32, m(mgpo_tch::cpu_f32(), RTOL_F32)));
        out.push(("tch", Dtype::F64, m(mgpo_tch::cpu_f64(), RTOL_F64)));
    }
    out
}

fn measure() -> bool {
    let bes = backends();
    println!("{:<36} {:>9} {:<12} {:>9} {:>9}   {:>9} {:<12} {:>9} {:>9}", "vector", "f32 need", "(backend)", "suggest", "has", "f64 need", "(backend)", "suggest", "has");
    let mut ok = true;
    for (name, v) in vectors::all() {
        let mut cols = Vec::new();
        for (dtype, floor) in [(Dtype::F32, 1e-8), (Dtype::F64, 1e-16)] {
            let mut worst: (f64, &str) = (0.0, "-");
            let has = v.tolerances.get(dtype);
            let mut tight = Vec::new();
            for (be, _, f) in bes.iter().filter(|b| b.1 == dtype) {
                let (need, margin) = f(&v, has);
                if !margin {
                    tight.push(*be);
                }
                match need {
                    Some(n) if n >= worst.0 => worst = (n, be),
                    Some(_) => {}
                    None => {
                        println!("{name}: FAILS on {be} {dtype:?} even at atol 1");
                        ok = false;
                    }
                }
            }
            let suggest = round_up(10.0 * worst.0).max(floor);
            let flag = if tight.is_empty() {
                String::new()
            } else if COPIED.contains(&name) {
                format!(" margin < 10 on {} (copied vector, tolerance kept)", tight.join(","))
            } else {
                ok = false;
                format!(" margin < 10 on {}", tight.join(","))
            };
            cols.push(format!("{:>9.2e} {:<12} {:>9.0e} {:>9.0e}{flag}", worst.0, format!("({})", worst.1), suggest, has.atol));
        }
        println!("{name:<36} {}   {}", cols[0], cols[1]);
    }
    ok
}

fn faults() {
    use Acc::*;
    for acc in [NaiveSumSq, NaiveMoment, NaiveGram, TransposedGram, DropLowRankTerm, AdamWSign, NoiseSeed, NoiseBlockOffset] {
        for (dt, outs) in [
            ("f32", vectors::all().map(|(n, v)| (n, run_any(&VecBackend::<f32>::new(acc), &v))).collect::<Vec<_>>()),
            ("f64", vectors::all().map(|(n, v)| (n, run_any(&VecBackend::<f64>::new(acc), &v))).collect::<Vec<_>>()),
        ] {
            let failed: Vec<String> = outs
                .iter()
                .filter(|(_, o)| !o.passed())
                .map(|(n, o)| format!("{n}[{}]", o.quantities.iter().filter(|q| q.failed > 0).map(|q| q.quantity).collect::<Vec<_>>().join("+")))
                .collect();
            println!("{acc:?} {dt}: {} of {} vectors fail: {}", failed.len(), outs.len(), failed.join(" "));
        }
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        None | Some("measure") => std::process::exit(if measure() { 0 } else { 1 }),
        Some("faults") => faults(),
        Some(other) => {
            eprintln!("unknown mode {other:?}: measure | faults");
            std::process::exit(2);
        }
    }
}
