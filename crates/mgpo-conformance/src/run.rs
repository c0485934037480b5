//! Runs a vector on any backend and measures how far it lands from the
//! float64 reference, per compared quantity.

use std::fmt::Write as _;
use std::path::Path;

use mgpo_core::backend::{HostIo, TensorOps};
use mgpo_core::{Layout, Mgpo, Space};

use crate::vector::{load_dir, Dtype, Tolerance, TensorData, Vector};

/// The largest errors seen on one compared quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantityError {
    pub quantity: &'static str,
    pub max_abs: f64,
    /// Largest |x - ref| / |ref| over entries with ref != 0.
    pub max_rel: f64,
    pub checked: usize,
    pub failed: usize,
}

/// The result of one vector on one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub name: String,
    pub quantities: Vec<QuantityError>,
    /// Human-readable descriptions of the first failures (or the error that stopped the run).
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.quantities.iter().all(|q| q.failed == 0)
    }
    pub fn max_abs(&self) -> f64 {
        self.quantities.iter().map(|q| q.max_abs).fold(0.0, f64::max)
    }
    pub fn max_rel(&self) -> f64 {
        self.quantities.iter().map(|q| q.max_rel).fold(0.0, f64::max)
    }
}

const QUANTITIES: [&str; 5] = ["skipped", "perturbation", "params", "w0", "grad_norm_ema"];
const MAX_FAILURE_LINES: usize = 8;

struct Meter {
    tol: Tolerance,
    q: Vec<QuantityError>,
    failures: Vec<String>,
}

impl Meter {
    fn new(tol: Tolerance) -> Self {
        let q = QUANTITIES.iter().map(|&quantity| QuantityError { quantity, max_abs: 0.0, max_rel: 0.0, checked: 0, failed: 0 }).collect();
        Meter { tol, q, failures: Vec::new() }
    }

    fn fail(&mut self, msg: String) {
        if self.failures.len() < MAX_FAILURE_LINES {
            self.failures.push(msg);
        }
    }

    fn values(&mut self, quantity: &'static str, what: &str, got: &[f64], want: &[f64]) {
        let qi = QUANTITIES.iter().position(|&q| q == quantity).expect("known quantity");
        if got.len() != want.len() {
            self.q[qi].failed += 1;
            self.fail(format!("{what}: {} values, expected {}", got.len(), want.len()));
            return;
        }
        for (j, (&x, &r)) in got.iter().zip(want).enumerate() {
            let q = &mut self.q[qi];
            q.checked += 1;
            let abs = (x - r).abs();
            if abs.is_finite() {
                q.max_abs = q.max_abs.max(abs);
                if r != 0.0 {
                    q.max_rel = q.max_rel.max(abs / r.abs());
                }
            }
            if !self.tol.accepts(x, r) {
                self.q[qi].failed += 1;
                self.fail(format!("{what}[{j}]: got {x:e}, expected {r:e}"));
            }
        }
    }

    fn flag(&mut self, what: &str, got: bool, want: bool) {
        self.q[0].checked += 1;
        if got != want {
            self.q[0].failed += 1;
            self.fail(format!("{what}: got {got}, expected {want}"));
        }
    }
}

/// Runs `v` on `backend`: perturb, feed the step's gradients, step, and
/// compare everything the vector expects.
pub fn run<B: TensorOps + HostIo + Clone>(backend: &B, v: &Vector) -> Outcome {
    let mut meter = Meter::new(v.tolerances.get(if backend.f64_exact() { Dtype::F64 } else { Dtype::F32 }));
    if let Err(e) = drive(backend, v, &mut meter) {
        meter.failures.insert(0, format!("run stopped: {e}"));
    }
    Outcome { name: v.name.clone(), quantities: meter.q, failures: meter.failures }
}

fn drive<B: TensorOps + HostIo + Clone>(be: &B, v: &Vector, meter: &mut Meter) -> mgpo_core::Result<()> {
    let weight = v.config.space == Space::Weight;
    let mut lb = Layout::builder();
    for ad in &v.adapters {
        lb = lb.adapter(&ad.name, ad.alpha, &ad.a.shape, &ad.b.shape, weight);
    }
    for p in &v.plain {
        lb = lb.plain(&p.name, &p.tensor.shape);
    }
    for g in &v.param_groups {
        let group = mgpo_core::ParamGroup { name: g.name.clone(), lr_scale: g.lr_scale, weight_decay: g.weight_decay };
        lb = lb.param_group(group, &g.tensors.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let mut opt = Mgpo::new(be.clone(), v.config, lb.build()?)?;
    let t = |d: &TensorData| be.from_f64(&d.shape, &d.data);
    let mut values = Vec::new();
    let mut frozen = Vec::new();
    for ad in &v.adapters {
        values.push(t(&ad.a)?);
        values.push(t(&ad.b)?);
        if let (true, Some(w)) = (weight, &ad.w0) {
            frozen.push(t(w)?);
        }
    }
    for p in &v.plain {
        values.push(t(&p.tensor)?);
    }
    let n_ad = v.adapters.len();
    let n_params = values.len();
    values.extend(frozen);
    let mut tensors: Vec<(String, B::Tensor)> = opt.layout().names().map(str::to_string).zip(values).collect();
    let host = |xs: &[(String, B::Tensor)]| -> mgpo_core::Result<(Vec<Vec<f64>>, Vec<Vec<f64>>)> {
        let mut all = xs.iter().map(|(_, x)| be.to_f64(x)).collect::<mgpo_core::Result<Vec<_>>>()?;
        let w0 = all.split_off(n_params);
        Ok((all, w0))
    };
    let names: Vec<String> = opt.groups().iter().map(|g| g.name.clone()).collect();

    for (k, s) in v.steps.iter().enumerate() {
        let step = k + 1;
        opt.set_lr(s.lr.unwrap_or(v.config.adamw.lr))?;
        let (p0, w0) = host(&tensors)?;
        opt.perturb(&mut tensors)?;
        let (p1, w1) = host(&tensors)?;
        let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| y - x).collect::<Vec<_>>();
        for (i, ad) in v.adapters.iter().enumerate() {
            let Some(e) = s.expect.perturbation.get(&ad.name) else { continue };
            let parts = [(&e.a, 2 * i, "a", false), (&e.b, 2 * i + 1, "b", false), (&e.w0, i, "w0", true)];
            for (want, idx, part, is_w0) in parts {
                if let Some(want) = want {
                    let got = if is_w0 { diff(&w0[idx], &w1[idx]) } else { diff(&p0[idx], &p1[idx]) };
                    meter.values("perturbation", &format!("step {step} perturbation {}.{part}", ad.name), &got, &want.data);
                }
            }
        }
        for (j, p) in v.plain.iter().enumerate() {
            if let Some(want) = s.expect.plain_perturbation.get(&p.name) {
                meter.values("perturbation", &format!("step {step} perturbation {}", p.name), &diff(&p0[2 * n_ad + j], &p1[2 * n_ad + j]), &want.data);
            }
        }

        let mut grads = Vec::new();
        for ad in &v.adapters {
            let g = &s.grads[&ad.name];
            grads.push((format!("{}.a", ad.name), t(&g.a)?));
            grads.push((format!("{}.b", ad.name), t(&g.b)?));
        }
        for p in &v.plain {
            grads.push((p.name.clone(), t(&s.plain_grads[&p.name])?));
        }
        let report = opt.step(&mut tensors, &grads)?;
        meter.flag(&format!("step {step} skipped"), report.skipped, s.expect.skipped);

        let (p2, w2) = host(&tensors)?;
        for (i, ad) in v.adapters.iter().enumerate() {
            if let Some(e) = s.expect.params.get(&ad.name) {
                meter.values("params", &format!("step {step} {}.a", ad.name), &p2[2 * i], &e.a.data);
                meter.values("params", &format!("step {step} {}.b", ad.name), &p2[2 * i + 1], &e.b.data);
            }
            if let (Some(e), true) = (s.expect.w0.get(&ad.name), weight) {
                meter.values("w0", &format!("step {step} {}.w0", ad.name), &w2[i], &e.data);
            }
        }
        for (j, p) in v.plain.iter().enumerate() {
            if let Some(e) = s.expect.plain_params.get(&p.name) {
                meter.values("params", &format!("step {step} {}", p.name), &p2[2 * n_ad + j], &e.data);
            }
        }
        for (key, want) in &s.expect.grad_norm_ema {
            let gi = names.iter().position(|n| n == key);
            let got = gi.and_then(|gi| opt.state().g_bar[gi]);
            match (got, want) {
                (Some(x), Some(w)) => meter.values("grad_norm_ema", &format!("step {step} g_bar[{key}]"), &[x], &[w.0]),
                (None, None) if gi.is_some() => meter.flag(&format!("step {step} g_bar[{key}] absent"), true, true),
                _ => {
                    meter.q[4].failed += 1;
                    meter.fail(format!("step {step} g_bar[{key}]: got {got:?}, expected {:?}", want.map(|w| w.0)));
                }
            }
        }
    }
    Ok(())
}

/// One row of a conformance table.
#[derive(Debug, Clone)]
pub struct Row {
    pub file: String,
    pub outcome: Result<Outcome, String>,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.outcome.as_ref().is_ok_and(Outcome::passed)
    }
}

/// Runs every vector of `dir` on `backend`; unreadable files become failed rows.
pub fn run_dir<B: TensorOps + HostIo + Clone>(backend: &B, dir: &Path) -> Result<Vec<Row>, String> {
    Ok(load_dir(dir)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(path, v)| Row {
            file: path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned()),
            outcome: v.map_err(|e| e.to_string()).map(|v| run(backend, &v)),
        })
        .collect())
}

/// A plain-text table of (backend label, row) pairs, with the failures of
/// each failed row below it.
pub fn table(rows: &[(&str, &Row)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<44} {:<14} {:>10} {:>10}  result", "vector", "backend", "max abs", "max rel");
    for (label, r) in rows {
        match &r.outcome {
            Ok(o) => {
                let verdict = if o.passed() { "pass" } else { "FAIL" };
                let _ = writeln!(s, "{:<44} {:<14} {:>10.2e} {:>10.2e}  {verdict}", r.file, label, o.max_abs(), o.max_rel());
                for f in &o.failures {
                    let _ = writeln!(s, "    {f}");
                }
            }
            Err(e) => {
                let _ = writeln!(s, "{:<44} {:<14} {:>10} {:>10}  FAIL", r.file, label, "-", "-");
                let _ = writeln!(s, "    unreadable: {e}");
            }
        }
    }
    s
}

/// For tests: every vector of `dir` passes on `backend`, or a panic with the table.
pub fn assert_dir_passes<B: TensorOps + HostIo + Clone>(backend: &B, dir: impl AsRef<Path>) {
    let dir = dir.as_ref();
    let rows = run_dir(backend, dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(rows.iter().all(Row::passed), "conformance failures in {}:\n{}", dir.display(), table(&rows.iter().map(|r| ("backend", r)).collect::<Vec<_>>()));
}
