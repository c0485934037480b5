//! `mgpo conformance`: every requested backend and dtype on every vector of
//! the given directories, with each vector's own tolerance; with
//! `--measure`, the tolerance each vector needs (docs/spec.md,
//! "Comparison"): per vector and dtype, the smallest atol with which every
//! correct backend passes at a fixed rtol (f32 1e-6, f64 1e-13), and ten
//! times the worst of them beside the tolerance the vector carries.

use std::path::{Path, PathBuf};

use mgpo_conformance::{load_dir, run_with, table, Dtype as Dt, Outcome, Row, Tolerance, Vector};
use mgpo_core::backend::{HostIo, TensorOps};

use crate::Dtype;

/// A backend run on one vector with a given tolerance.
type Check = Box<dyn Fn(&Vector, Tolerance) -> Outcome>;

fn check<B: TensorOps + HostIo + Clone + 'static>(be: B) -> Check {
    Box::new(move |v, t| run_with(&be, v, t))
}

/// The compiled backends: (name, dtype, check). `ndarray-par` is mgpo-ndarray
/// with every pass split into parallel blocks; `candle-ops` and `burn-ops`
/// run candle's and burn's tensor-op paths instead of the host kernels.
fn backends() -> Vec<(&'static str, Dt, Check)> {
    use mgpo_ndarray::NdBackend;
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Dt, Check)> = vec![
        ("ndarray", Dt::F32, check(NdBackend::<f32>::new())),
        ("ndarray", Dt::F64, check(NdBackend::<f64>::new())),
        ("ndarray-par", Dt::F32, check(NdBackend::<f32>::with_par_threshold(1))),
        ("ndarray-par", Dt::F64, check(NdBackend::<f64>::with_par_threshold(1))),
    ];
    #[cfg(feature = "candle")]
    {
        let ops = |b: mgpo_candle::CandleBackend| mgpo_candle::CandleBackend { cpu_kernels: false, ..b };
        v.push(("candle", Dt::F32, check(mgpo_candle::cpu_f32())));
        v.push(("candle", Dt::F64, check(mgpo_candle::cpu_f64())));
        v.push(("candle-ops", Dt::F32, check(ops(mgpo_candle::cpu_f32()))));
        v.push(("candle-ops", Dt::F64, check(ops(mgpo_candle::cpu_f64()))));
    }
    #[cfg(feature = "tch")]
    {
        v.push(("tch", Dt::F32, check(mgpo_tch::cpu_f32())));
        v.push(("tch", Dt::F64, check(mgpo_tch::cpu_f64())));
    }
    #[cfg(feature = "dfdx")]
    {
        v.push(("dfdx", Dt::F32, check(mgpo_dfdx::cpu_f32())));
        v.push(("dfdx", Dt::F64, check(mgpo_dfdx::cpu_f64())));
    }
    #[cfg(feature = "burn")]
    {
        let ops = |b: mgpo_burn::BurnBackend| mgpo_burn::BurnBackend { host_kernels: false, ..b };
        v.push(("burn", Dt::F32, check(mgpo_burn::cpu_f32())));
        v.push(("burn", Dt::F64, check(mgpo_burn::cpu_f64())));
        v.push(("burn-ops", Dt::F32, check(ops(mgpo_burn::cpu_f32()))));
        v.push(("burn-ops", Dt::F64, check(ops(mgpo_burn::cpu_f64()))));
    }
    v
}

fn dtype_name(d: Dt) -> &'static str {
    match d {
        Dt::F32 => "f32",
        Dt::F64 => "f64",
    }
}

/// The vectors of `dir`, by file name; a file that does not parse is an
/// `Err` row.
fn load(dir: &Path) -> Result<Vec<(String, Result<Vector, String>)>, String> {
    let files = load_dir(dir).map_err(|e| format!("cannot read vectors: {e}"))?;
    Ok(files
        .into_iter()
        .map(|(path, v)| (path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned()), v.map_err(|e| e.to_string())))
        .collect())
}

/// The chosen backends, or an error naming the compiled ones.
fn choose(backend: &str, dtype: Dtype) -> Result<Vec<(&'static str, Dt, Check)>, String> {
    let all = backends();
    let mut names: Vec<&str> = all.iter().map(|b| b.0).collect();
    names.dedup();
    if backend != "all" && !names.contains(&backend) {
        return Err(format!(
            "backend `{backend}` is not compiled into this binary (compiled: {}; enable a cargo feature of mgpo-cli for the others)",
            names.join(", ")
        ));
    }
    let wanted = |d: Dt| dtype == Dtype::All || (dtype == Dtype::F32) == (d == Dt::F32);
    Ok(all.into_iter().filter(|(n, d, _)| (backend == "all" || *n == backend) && wanted(*d)).collect())
}

/// Prints one table per vector directory; Ok(false) when anything failed.
pub fn run(dirs: &[PathBuf], backend: &str, dtype: Dtype) -> Result<bool, String> {
    let chosen = choose(backend, dtype)?;
    let mut ok = true;
    for dir in dirs {
        println!("vectors: {}", dir.display());
        let vectors = load(dir)?;
        let mut rows: Vec<(String, Row)> = Vec::new();
        for (name, d, f) in &chosen {
            let label = format!("{name}/{}", dtype_name(*d));
            for (file, v) in &vectors {
                let outcome = v.as_ref().map(|v| f(v, v.tolerances.get(*d))).map_err(Clone::clone);
                rows.push((label.clone(), Row { file: file.clone(), outcome }));
            }
        }
        rows.sort_by(|a, b| (&a.1.file, &a.0).cmp(&(&b.1.file, &b.0)));
        print!("{}", table(&rows.iter().map(|(l, r)| (l.as_str(), r)).collect::<Vec<_>>()));
        let failed = rows.iter().filter(|(_, r)| !r.passed()).count();
        println!("{} passed, {} failed\n", rows.len() - failed, failed);
        ok &= failed == 0;
    }
    Ok(ok)
}

/// Byte-identical copies of an earlier independent example set: their single
/// tolerance is theirs, reported but not held to the margin of ten.
const COPIED: [&str; 4] =
    ["nan-gradient-skips.json", "official-weight-peradapter-descent.json", "paper-adapter-global-ascent.json", "rho-zero-is-adamw.json"];

/// The smallest atol (to about 3%) with which `f` passes `v` at `rtol`;
/// None when it fails even at atol 1.
fn needed_atol(f: &Check, v: &Vector, rtol: f64) -> Option<f64> {
    let passes = |atol: f64| f(v, Tolerance { rtol, atol }).passed();
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

/// `--measure`: per vector and dtype, the worst backend's needed atol, the
/// atol that suggests (ten times it, at least 1e-8 / 1e-16) and the
/// vector's own; Ok(false) when a backend fails a vector outright or passes
/// a generated vector with less than a tenfold margin (at a tenth of the
/// vector's tolerance).
pub fn measure(dirs: &[PathBuf], backend: &str, dtype: Dtype) -> Result<bool, String> {
    let chosen = choose(backend, dtype)?;
    let mut ok = true;
    for dir in dirs {
        println!("vectors: {}", dir.display());
        println!("{:<44} {:<5} {:>9} {:<16} {:>9} {:>9}  margin", "vector", "dtype", "needs", "(worst backend)", "suggest", "has");
        for (file, v) in load(dir)? {
            let v = v?;
            for (d, rtol, floor) in [(Dt::F32, 1e-6, 1e-8), (Dt::F64, 1e-13, 1e-16)] {
                let of_dtype: Vec<_> = chosen.iter().filter(|b| b.1 == d).collect();
                if of_dtype.is_empty() {
                    continue;
                }
                let has = v.tolerances.get(d);
                let (mut worst, mut tight) = ((0.0, "-"), Vec::new());
                for (name, _, f) in &of_dtype {
                    match needed_atol(f, &v, rtol) {
                        Some(n) if n >= worst.0 => worst = (n, *name),
                        Some(_) => {}
                        None => {
                            println!("{file}: FAILS on {name} {} even at atol 1", dtype_name(d));
                            ok = false;
                        }
                    }
                    if !f(&v, Tolerance { rtol: has.rtol / 10.0, atol: has.atol / 10.0 }).passed() {
                        tight.push(*name);
                    }
                }
                let margin = match (tight.is_empty(), COPIED.contains(&file.as_str())) {
                    (true, _) => "ok".to_string(),
                    (false, true) => format!("< 10 on {} (copied vector, its tolerance kept)", tight.join(",")),
                    (false, false) => {
                        ok = false;
                        format!("< 10 on {}", tight.join(","))
                    }
                };
                let suggest = round_up(10.0 * worst.0).max(floor);
                println!("{file:<44} {:<5} {:>9.2e} {:<16} {suggest:>9.0e} {:>9.0e}  {margin}", dtype_name(d), worst.0, format!("({})", worst.1), has.atol);
            }
        }
    }
    Ok(ok)
}
