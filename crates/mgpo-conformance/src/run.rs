//! Runs a vector on any backend and measures how far it lands from the
//! float64 reference, per compared quantity.

use std::fmt::Write as _;
use std::path::Path;

use mgpo_core::backend::{HostIo, TensorOps};
use mgpo_core::{Layout, Mgpo, Space};

use crate::failure::{Failure, Mismatch, Origin, Quantity, Suspect};
use crate::vector::{load_dir, Dtype, TensorData, Tolerance, Vector};

/// The largest errors seen on one compared quantity.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QuantityError {
    /// What was compared.
    pub quantity: Quantity,
    /// Largest |x - ref| over finite differences.
    pub max_abs: f64,
    /// Largest |x - ref| / |ref| over entries with ref != 0.
    pub max_rel: f64,
    /// Entries (or flags) compared.
    pub checked: usize,
    /// Entries (or flags) outside the tolerance.
    pub failed: usize,
}

/// The result of one vector on one backend.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Outcome {
    /// The vector's name.
    pub name: String,
    /// The tolerance every entry was held to.
    pub tolerance: Tolerance,
    /// Per compared quantity, in the order of [`Quantity::ALL`].
    pub quantities: Vec<QuantityError>,
    /// The first failures (at most eight), in the order the run met them;
    /// the first names the most likely faulty method.
    pub failures: Vec<Failure>,
}

impl Outcome {
    /// Every check passed and the run completed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.quantities.iter().all(|q| q.failed == 0)
    }
    /// The largest absolute error over every quantity.
    pub fn max_abs(&self) -> f64 {
        self.quantities.iter().map(|q| q.max_abs).fold(0.0, f64::max)
    }
    /// The largest relative error over every quantity.
    pub fn max_rel(&self) -> f64 {
        self.quantities.iter().map(|q| q.max_rel).fold(0.0, f64::max)
    }
    /// The trait method most likely at fault: that of the first failure.
    pub fn suspect(&self) -> Option<Suspect> {
        self.failures.first().map(|f| f.suspect)
    }
}

const MAX_FAILURES: usize = 8;

struct Meter<'v> {
    v: &'v Vector,
    tol: Tolerance,
    step: usize,
    q: Vec<QuantityError>,
    failures: Vec<Failure>,
}

impl Meter<'_> {
    fn slot(&mut self, quantity: Quantity) -> &mut QuantityError {
        let i = Quantity::ALL.iter().position(|&q| q == quantity).expect("every quantity has a slot");
        &mut self.q[i]
    }

    fn fail(&mut self, quantity: Quantity, tensor: &str, mismatch: Mismatch, suspect: Suspect) {
        self.slot(quantity).failed += 1;
        if self.failures.len() < MAX_FAILURES {
            let tolerance = matches!(mismatch, Mismatch::Value { .. }).then_some(self.tol);
            self.failures.push(Failure { origin: Origin::Vector(self.v.name.clone()), step: self.step, quantity, tensor: tensor.to_string(), mismatch, tolerance, suspect });
        }
    }

    /// Compares `got` with `want` entry by entry; a failure's suspect comes
    /// from `suspect(got, want)`, asked once per call.
    fn values(&mut self, quantity: Quantity, tensor: &str, got: &[f64], want: &[f64], suspect: impl Fn(&[f64], &[f64]) -> Suspect) {
        if got.len() != want.len() {
            let s = suspect(got, want);
            self.fail(quantity, tensor, Mismatch::Len { got: got.len(), expected: want.len() }, s);
            return;
        }
        let mut blamed = None;
        for (index, (&x, &r)) in got.iter().zip(want).enumerate() {
            let (tol, q) = (self.tol, self.slot(quantity));
            q.checked += 1;
            let abs = (x - r).abs();
            if abs.is_finite() {
                q.max_abs = q.max_abs.max(abs);
                if r != 0.0 {
                    q.max_rel = q.max_rel.max(abs / r.abs());
                }
            }
            if !tol.accepts(x, r) {
                let s = *blamed.get_or_insert_with(|| suspect(got, want));
                self.fail(quantity, tensor, Mismatch::Value { index, got: x, expected: r }, s);
            }
        }
    }

    fn perturbation(&mut self, tensor: &str, got: &[f64], want: &[f64]) {
        let (c, tol) = (self.v.config, self.tol);
        self.values(Quantity::Perturbation, tensor, got, want, |g, w| Suspect::of_perturbation(c.space, c.perturbation, g, w, tol));
    }
}

/// Runs `v` on `backend` with the vector's own tolerance for the backend's
/// element type ([`Dtype::of`]).
pub fn run<B: TensorOps + HostIo + Clone>(backend: &B, v: &Vector) -> Outcome {
    run_with(backend, v, v.tolerances.get(Dtype::of(backend)))
}

/// Runs `v` on `backend`: perturb, feed the step's gradients, step, and
/// compare everything the vector expects with tolerance `tol`, in the
/// order a step computes it.
pub fn run_with<B: TensorOps + HostIo + Clone>(backend: &B, v: &Vector, tol: Tolerance) -> Outcome {
    let q = Quantity::ALL.iter().map(|&quantity| QuantityError { quantity, max_abs: 0.0, max_rel: 0.0, checked: 0, failed: 0 }).collect();
    let mut meter = Meter { v, tol, step: 0, q, failures: Vec::new() };
    if let Err(e) = drive(backend, v, &mut meter) {
        let error = Failure { origin: Origin::Vector(v.name.clone()), step: meter.step, quantity: Quantity::Run, tensor: String::new(), mismatch: Mismatch::Error(e.to_string()), tolerance: None, suspect: Suspect::Error };
        meter.slot(Quantity::Run).failed += 1;
        // After the failures met before it, which are more upstream.
        meter.failures.push(error);
    }
    Outcome { name: v.name.clone(), tolerance: tol, quantities: meter.q, failures: meter.failures }
}

fn drive<B: TensorOps + HostIo + Clone>(be: &B, v: &Vector, meter: &mut Meter<'_>) -> mgpo_core::Result<()> {
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
        meter.step = k + 1;
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
                    meter.perturbation(&format!("{}.{part}", ad.name), &got, &want.data);
                }
            }
        }
        for (j, p) in v.plain.iter().enumerate() {
            if let Some(want) = s.expect.plain_perturbation.get(&p.name) {
                meter.perturbation(&p.name, &diff(&p0[2 * n_ad + j], &p1[2 * n_ad + j]), &want.data);
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
        meter.slot(Quantity::Skipped).checked += 1;
        if report.skipped != s.expect.skipped {
            meter.fail(Quantity::Skipped, "skipped", Mismatch::Flag { got: report.skipped, expected: s.expect.skipped }, Suspect::FiniteTest);
        }

        for (key, want) in &s.expect.grad_norm_ema {
            let gi = names.iter().position(|n| n == key);
            let got = gi.and_then(|gi| opt.state().g_bar[gi]);
            let tensor = format!("g_bar[{key}]");
            let suspect = Suspect::of(Quantity::GradNormEma, v.config.space);
            match (got, want) {
                (Some(x), Some(w)) => meter.values(Quantity::GradNormEma, &tensor, &[x], &[w.0], move |_, _| suspect),
                (None, None) if gi.is_some() => meter.slot(Quantity::GradNormEma).checked += 1,
                _ => meter.fail(Quantity::GradNormEma, &tensor, Mismatch::Presence { got, expected: want.map(|w| w.0) }, suspect),
            }
        }
        let (p2, w2) = host(&tensors)?;
        let adamw = Suspect::of(Quantity::Params, v.config.space);
        for (i, ad) in v.adapters.iter().enumerate() {
            if let Some(e) = s.expect.params.get(&ad.name) {
                meter.values(Quantity::Params, &format!("{}.a", ad.name), &p2[2 * i], &e.a.data, move |_, _| adamw);
                meter.values(Quantity::Params, &format!("{}.b", ad.name), &p2[2 * i + 1], &e.b.data, move |_, _| adamw);
            }
        }
        for (j, p) in v.plain.iter().enumerate() {
            if let Some(e) = s.expect.plain_params.get(&p.name) {
                meter.values(Quantity::Params, &p.name, &p2[2 * n_ad + j], &e.data, move |_, _| adamw);
            }
        }
        for (i, ad) in v.adapters.iter().enumerate() {
            if let (Some(e), true) = (s.expect.w0.get(&ad.name), weight) {
                let removal = Suspect::of_w0(v.config.perturbation);
                meter.values(Quantity::W0, &format!("{}.w0", ad.name), &w2[i], &e.data, move |_, _| removal);
            }
        }
    }
    Ok(())
}

/// One row of a conformance table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The vector's file name.
    pub file: String,
    /// Its outcome, or why it could not be read.
    pub outcome: Result<Outcome, String>,
}

impl Row {
    /// The vector was read and passed.
    pub fn passed(&self) -> bool {
        self.outcome.as_ref().is_ok_and(Outcome::passed)
    }
}

/// Runs every vector file of `dir` on `backend` with each vector's own
/// tolerance; unreadable files become failed rows. (The embedded vectors
/// need no directory: [`crate::Suite`], [`crate::vectors`].)
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

/// Every vector of `dir` passes on `backend`, or a panic with the table.
#[deprecated(since = "0.1.0", note = "the vectors are embedded: `Suite::new(backend).assert_vectors()`, or `assert_conforms(backend)` for the vectors and the property cases")]
pub fn assert_dir_passes<B: TensorOps + HostIo + Clone>(backend: &B, dir: impl AsRef<Path>) {
    let dir = dir.as_ref();
    let rows = run_dir(backend, dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(rows.iter().all(Row::passed), "conformance failures in {}:\n{}", dir.display(), table(&rows.iter().map(|r| ("backend", r)).collect::<Vec<_>>()));
}
