//! Property-test generators: random configurations, adapter shapes, plain
//! tensors and gradient sequences (non-finite ones included), and checks
//! that run a backend step by step against the float64 [`Reference`] or
//! against another backend.

use mgpo_core::backend::{HostIo, TensorOps};
use mgpo_core::{AdamWConfig, Config, Direction, Layout, Mgpo, Perturbation, Scope, Space};
use proptest::prelude::*;

use crate::failure::{Failure, Mismatch, Origin, Quantity, Suspect};
use crate::reference::{Mat, RefAdapter, Reference};
use crate::vector::{Dtype, Tolerance};

/// One adapter of a [`Case`]: A is rank x fan_in, B is fan_out x rank.
#[derive(Debug, Clone)]
pub struct CaseAdapter {
    /// `ad<i>`.
    pub name: String,
    /// LoRA alpha.
    pub alpha: f64,
    /// The rank r.
    pub rank: usize,
    /// Input features.
    pub fan_in: usize,
    /// Output features.
    pub fan_out: usize,
    /// A, r x fan_in, row-major.
    pub a: Vec<f64>,
    /// B, fan_out x r, row-major.
    pub b: Vec<f64>,
    /// W0, fan_out x fan_in, row-major (used in weight space).
    pub w0: Vec<f64>,
}

/// One step: its learning rate and a gradient per trainable tensor, in
/// layout order (A, B of each adapter, then the plain tensors).
#[derive(Debug, Clone)]
pub struct CaseStep {
    /// The step's learning rate.
    pub lr: f64,
    /// Per trainable tensor, in layout order, row-major.
    pub grads: Vec<Vec<f64>>,
}

/// A random optimisation problem without a model: the gradients are given.
#[derive(Debug, Clone)]
pub struct Case {
    /// The configuration.
    pub config: Config,
    /// The adapters, in registration order.
    pub adapters: Vec<CaseAdapter>,
    /// Plain trainable tensors: (name, shape, initial data).
    pub plain: Vec<(String, Vec<usize>, Vec<f64>)>,
    /// The steps.
    pub steps: Vec<CaseStep>,
}

/// splitmix64: a tiny deterministic generator, so a case is a pure function of its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn normals(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * self.normal()).collect()
    }
}

impl Case {
    /// The case of `seed`: every configuration axis, 1-3 adapters of ranks
    /// 1-4 and sides 1-7, up to one plain tensor, 1-6 steps; about one step
    /// in eight carries a NaN or an infinity.
    pub fn from_seed(seed: u64) -> Case {
        let mut r = Rng(seed);
        let config = Config {
            rho: r.pick(&[0.0, 0.01, 0.05, 0.5]),
            beta: r.pick(&[0.0, 0.5, 0.9]),
            eps: 1e-12,
            direction: r.pick(&[Direction::Ascent, Direction::Descent]),
            space: r.pick(&[Space::Adapter, Space::Weight]),
            scope: r.pick(&[Scope::Global, Scope::PerAdapter]),
            adaptive_norm: r.pick(&[true, false]),
            max_inv_scale: r.pick(&[None, Some(0.5), Some(10.0)]),
            adamw: AdamWConfig {
                lr: 1e-3,
                beta1: r.pick(&[0.0, 0.8, 0.9]),
                beta2: r.pick(&[0.9, 0.999]),
                eps: 1e-8,
                weight_decay: r.pick(&[0.0, 0.1]),
            },
            max_grad_norm: r.pick(&[None, Some(0.5), Some(5.0)]),
            perturbation: Perturbation::Momentum,
        };
        let adapters: Vec<CaseAdapter> = (0..1 + r.below(3))
            .map(|i| {
                let (rank, fan_in, fan_out) = (1 + r.below(4), 1 + r.below(7), 1 + r.below(7));
                CaseAdapter {
                    name: format!("ad{i}"),
                    alpha: r.pick(&[1.0, 4.0, 16.0]),
                    rank,
                    fan_in,
                    fan_out,
                    a: r.normals(rank * fan_in, 0.4),
                    b: r.normals(fan_out * rank, 0.1),
                    w0: r.normals(fan_out * fan_in, 0.5),
                }
            })
            .collect();
        let plain: Vec<_> = (0..r.below(2)).map(|i| {
            let shape = vec![1 + r.below(4), 1 + r.below(4)];
            let n = shape.iter().product();
            (format!("plain{i}"), shape, r.normals(n, 0.3))
        }).collect();
        let sizes: Vec<usize> = adapters
            .iter()
            .flat_map(|a| [a.rank * a.fan_in, a.fan_out * a.rank])
            .chain(plain.iter().map(|p| p.2.len()))
            .collect();
        let steps = (0..1 + r.below(6))
            .map(|_| {
                let scale = r.pick(&[1e-3, 1.0, 10.0]);
                let mut grads: Vec<Vec<f64>> = sizes.iter().map(|&n| r.normals(n, scale)).collect();
                if r.below(8) == 0 {
                    let t = r.below(grads.len());
                    let j = r.below(grads[t].len());
                    grads[t][j] = r.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
                }
                CaseStep { lr: r.pick(&[1e-3, 1e-2, 5e-2]), grads }
            })
            .collect();
        Case { config, adapters, plain, steps }
    }

    /// The optimizer layout of the case: adapters (with W0 in weight space), then plain tensors.
    pub fn layout(&self) -> mgpo_core::Result<Layout> {
        let weight = self.config.space == Space::Weight;
        let mut b = Layout::builder();
        for a in &self.adapters {
            b = b.adapter(&a.name, a.alpha, &[a.rank, a.fan_in], &[a.fan_out, a.rank], weight);
        }
        for (name, shape, _) in &self.plain {
            b = b.plain(name, shape);
        }
        b.build()
    }

    /// Shapes and data of the trainable tensors, in layout order.
    pub fn trainable(&self) -> Vec<(Vec<usize>, &[f64])> {
        let mut out = Vec::new();
        for a in &self.adapters {
            out.push((vec![a.rank, a.fan_in], a.a.as_slice()));
            out.push((vec![a.fan_out, a.rank], a.b.as_slice()));
        }
        for (_, shape, data) in &self.plain {
            out.push((shape.clone(), data.as_slice()));
        }
        out
    }

    /// The float64 reference at the case's initial point.
    pub fn reference(&self) -> Reference {
        let t = self.trainable();
        let params = t.iter().map(|(s, d)| Mat::new(s[0], s[1], d.to_vec())).collect();
        let mut names: Vec<String> = self.adapters.iter().flat_map(|a| [format!("{}.a", a.name), format!("{}.b", a.name)]).collect();
        names.extend(self.plain.iter().map(|p| p.0.clone()));
        let weight = self.config.space == Space::Weight;
        let ads = self
            .adapters
            .iter()
            .enumerate()
            .map(|(i, a)| RefAdapter {
                name: a.name.clone(),
                a: 2 * i,
                b: 2 * i + 1,
                scale: a.alpha / a.rank as f64,
                w0: weight.then(|| Mat::new(a.fan_out, a.fan_in, a.w0.clone())),
            })
            .collect();
        let plain = (2 * self.adapters.len()..t.len()).collect();
        Reference::new(self.config, params, names, ads, plain)
    }
}

/// The case of `seed` as the conformance kit runs it: [`Case::from_seed`],
/// and in one case in four the Gaussian direction (adapter space, a seed
/// drawn from `seed`) instead of the momentum.
pub fn kit_case(seed: u64) -> Case {
    let mut case = Case::from_seed(seed);
    let mut r = Rng(seed ^ 0x6a09_e667_f3bc_c908);
    if r.below(4) == 0 {
        case.config.space = Space::Adapter;
        case.config.perturbation = Perturbation::Gaussian { seed: r.next() };
    }
    case
}

/// Any case: a proptest strategy over seeds (shrinking moves to other seeds).
pub fn case_strategy() -> impl Strategy<Value = Case> {
    any::<u64>().prop_map(Case::from_seed)
}

/// A backend driven through a case: its optimizer and its tensors.
pub struct CaseRun<B: TensorOps + HostIo> {
    /// The optimizer.
    pub opt: Mgpo<B>,
    /// Every tensor by name, in the order of `opt.layout().names()`: the
    /// trainable ones, then W0 in weight space.
    pub tensors: Vec<(String, B::Tensor)>,
}

/// One observation after each phase of a step, as f64.
#[derive(Debug, Clone)]
struct Snapshot {
    params: Vec<Vec<f64>>,
    frozen: Vec<Vec<f64>>,
    g_bar: Vec<Option<f64>>,
    skipped: bool,
}

impl<B: TensorOps + HostIo + Clone> CaseRun<B> {
    /// The case's optimizer and tensors on `be`.
    pub fn new(be: &B, case: &Case) -> Result<Self, String> {
        let e = |e: mgpo_core::MgpoError| e.to_string();
        let opt = Mgpo::new(be.clone(), case.config, case.layout().map_err(e)?).map_err(e)?;
        let mut values: Vec<B::Tensor> = case.trainable().iter().map(|(s, d)| be.from_f64(s, d)).collect::<Result<_, _>>().map_err(e)?;
        if case.config.space == Space::Weight {
            for a in &case.adapters {
                values.push(be.from_f64(&[a.fan_out, a.fan_in], &a.w0).map_err(e)?);
            }
        }
        let tensors = opt.layout().names().map(str::to_string).zip(values).collect();
        Ok(CaseRun { opt, tensors })
    }

    fn host(&self, skipped: bool) -> Result<Snapshot, String> {
        let be = self.opt.backend();
        let mut params = self.tensors.iter().map(|(_, x)| be.to_f64(x)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        let frozen = params.split_off(self.opt.layout().tensors().len());
        Ok(Snapshot { params, frozen, g_bar: self.opt.state().g_bar.clone(), skipped })
    }

    fn perturb(&mut self) -> Result<Snapshot, String> {
        self.opt.perturb(&mut self.tensors).map_err(|e| e.to_string())?;
        self.host(false)
    }

    /// Perturb, then step with `s`'s gradients and learning rate.
    pub fn full_step(&mut self, s: &CaseStep) -> Result<(), String> {
        self.perturb()?;
        self.step(s).map(|_| ())
    }

    /// Parameters and W0 on the host.
    pub fn host_tensors(&self) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>), String> {
        self.host(false).map(|s| (s.params, s.frozen))
    }

    fn step(&mut self, s: &CaseStep) -> Result<Snapshot, String> {
        self.opt.set_lr(s.lr).map_err(|e| e.to_string())?;
        let be = self.opt.backend().clone();
        let grads = s
            .grads
            .iter()
            .zip(self.opt.layout().tensors())
            .map(|(g, info)| be.from_f64(&info.shape, g).map(|g| (info.name.clone(), g)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let rep = self.opt.step(&mut self.tensors, &grads).map_err(|e| e.to_string())?;
        self.host(rep.skipped)
    }
}

/// The default tolerance of the property tests for a backend computing in
/// `dtype`: rtol 1e-8, atol 1e-10 in f64; rtol 2e-3, atol 2e-5 in f32
/// (random cases reach far larger perturbation coefficients and longer
/// chains of f32 rounding than the vectors, whose tolerances are measured
/// per vector). Entries that went through a perturbation and its removal
/// get more room, see [`check_against_reference`].
pub fn default_tolerance(dtype: Dtype) -> Tolerance {
    match dtype {
        Dtype::F64 => Tolerance { rtol: 1e-8, atol: 1e-10 },
        Dtype::F32 => Tolerance { rtol: 2e-3, atol: 2e-5 },
    }
}

/// Per entry of every tensor: the sum of |perturbation| added to it so
/// far. Adding a perturbation e to x and removing it again in the element
/// type F is exact only up to F's rounding of x + e, which is relative to
/// |x| + |e|, not to |x| ([the spec](mgpo_core::spec), "Precision": restored "to within
/// rounding"); the rounding of each such round trip stays in the entry.
#[derive(Debug, Clone)]
struct Budget {
    params: Vec<Vec<f64>>,
    frozen: Vec<Vec<f64>>,
}

impl Budget {
    fn new(s: &Snapshot) -> Self {
        let zero = |xs: &[Vec<f64>]| xs.iter().map(|x| vec![0.0; x.len()]).collect();
        Budget { params: zero(&s.params), frozen: zero(&s.frozen) }
    }

    /// Adds |perturbed - clean| entry by entry (non-finite differences add nothing).
    fn add(&mut self, clean: &Snapshot, perturbed: &Snapshot) {
        for (b, (c, p)) in self.params.iter_mut().chain(&mut self.frozen).zip(clean.params.iter().chain(&clean.frozen).zip(perturbed.params.iter().chain(&perturbed.frozen))) {
            for (b, (c, p)) in b.iter_mut().zip(c.iter().zip(p)) {
                let d = (p - c).abs();
                if d.is_finite() {
                    *b += d;
                }
            }
        }
    }
}

/// |x - ref| <= atol + rtol (|ref| + budget): [`Tolerance::accepts`] with
/// the magnitude of the perturbations the entry went through added to the
/// reference's.
fn accepts(tol: Tolerance, x: f64, r: f64, budget: f64) -> bool {
    tol.accepts(x, r) || (x.is_finite() && r.is_finite() && (x - r).abs() <= tol.atol + tol.rtol * (r.abs() + budget))
}

/// What a comparison knows about the run: where it is and how to blame.
struct Ctx<'a> {
    origin: Origin,
    tol: Tolerance,
    config: Config,
    /// Names of the trainable tensors, then of W0.
    names: &'a [String],
    groups: &'a [String],
}

impl Ctx<'_> {
    fn failure(&self, step: usize, quantity: Quantity, tensor: &str, mismatch: Mismatch, suspect: Suspect) -> Failure {
        let tolerance = matches!(mismatch, Mismatch::Value { .. }).then_some(self.tol);
        Failure { origin: self.origin.clone(), step, quantity, tensor: tensor.to_string(), mismatch, tolerance, suspect }
    }

    fn error(&self, step: usize, e: String) -> Failure {
        self.failure(step, Quantity::Run, "", Mismatch::Error(e), Suspect::Error)
    }

    /// The perturbed point `got` against `want` (`clean_*`: both before
    /// the perturbation, to blame a wrong one).
    fn perturbed(&self, step: usize, got: &Snapshot, want: &Snapshot, clean_got: &Snapshot, clean_want: &Snapshot, budget: &Budget) -> Result<(), Failure> {
        let n = got.params.len();
        self.tensors(step, Quantity::Perturbation, got, want, budget, |t| {
            let pick = |s: &Snapshot| if t < n { s.params[t].clone() } else { s.frozen[t - n].clone() };
            let delta = |p: Vec<f64>, c: Vec<f64>| p.iter().zip(&c).map(|(p, c)| p - c).collect::<Vec<_>>();
            let (g, w) = (delta(pick(got), pick(clean_got)), delta(pick(want), pick(clean_want)));
            Suspect::of_perturbation(self.config.space, self.config.perturbation, &g, &w, self.tol)
        })
    }

    /// The state after a step: skipped, g_bar, parameters, W0, in that order.
    fn after(&self, step: usize, got: &Snapshot, want: &Snapshot, budget: &Budget) -> Result<(), Failure> {
        if got.skipped != want.skipped {
            return Err(self.failure(step, Quantity::Skipped, "skipped", Mismatch::Flag { got: got.skipped, expected: want.skipped }, Suspect::FiniteTest));
        }
        let norm = Suspect::of(Quantity::GradNormEma, self.config.space);
        for (gi, (x, y)) in got.g_bar.iter().zip(&want.g_bar).enumerate() {
            let tensor = format!("g_bar[{}]", self.groups.get(gi).map_or("?", String::as_str));
            match (x, y) {
                (Some(p), Some(q)) if !self.tol.accepts(*p, *q) => {
                    return Err(self.failure(step, Quantity::GradNormEma, &tensor, Mismatch::Value { index: 0, got: *p, expected: *q }, norm));
                }
                (Some(_), None) | (None, Some(_)) => return Err(self.failure(step, Quantity::GradNormEma, &tensor, Mismatch::Presence { got: *x, expected: *y }, norm)),
                _ => {}
            }
        }
        let n = got.params.len();
        let w0 = Suspect::of_w0(self.config.perturbation);
        let adamw = Suspect::of(Quantity::Params, self.config.space);
        self.tensors(step, Quantity::Params, got, want, budget, |t| if t < n { adamw } else { w0 })
    }

    /// Every entry of every tensor (trainable, then W0); a failure on
    /// tensor t is blamed on `blame(t)`. After a step, a failure on W0 is
    /// reported as [`Quantity::W0`].
    fn tensors(&self, step: usize, quantity: Quantity, got: &Snapshot, want: &Snapshot, budget: &Budget, blame: impl Fn(usize) -> Suspect) -> Result<(), Failure> {
        let n = got.params.len();
        if got.params.len() != want.params.len() || got.frozen.len() != want.frozen.len() {
            let m = Mismatch::Len { got: n + got.frozen.len(), expected: want.params.len() + want.frozen.len() };
            return Err(self.failure(step, quantity, "the tensors", m, Suspect::Error));
        }
        let all = |s: &Snapshot| s.params.iter().chain(&s.frozen).cloned().collect::<Vec<_>>();
        let (xs, ys) = (all(got), all(want));
        for (t, ((x, y), b)) in xs.iter().zip(&ys).zip(budget.params.iter().chain(&budget.frozen)).enumerate() {
            let q = if t >= n && quantity == Quantity::Params { Quantity::W0 } else { quantity };
            let name = self.names.get(t).map_or("?", String::as_str);
            if x.len() != y.len() {
                return Err(self.failure(step, q, name, Mismatch::Len { got: x.len(), expected: y.len() }, blame(t)));
            }
            for (index, ((&p, &r), &b)) in x.iter().zip(y).zip(b).enumerate() {
                if !accepts(self.tol, p, r, b) {
                    return Err(self.failure(step, q, name, Mismatch::Value { index, got: p, expected: r }, blame(t)));
                }
            }
        }
        Ok(())
    }
}

fn reference_snapshot(r: &Reference, skipped: bool) -> Snapshot {
    Snapshot {
        params: r.params.iter().map(|m| m.data.clone()).collect(),
        frozen: r.adapters.iter().filter_map(|a| a.w0.as_ref().map(|w| w.data.clone())).collect(),
        g_bar: r.g_bar.clone(),
        skipped,
    }
}

/// Runs `case` on `backend` and on the float64 reference, comparing the
/// perturbed point, the clean parameters, W0 and g_bar after every step,
/// with `tol` on every entry: |x - ref| <= atol + rtol (|ref| + P), where P
/// is the sum of the magnitudes of the perturbations the entry has gone
/// through so far (0 for g_bar). An element type F rounds x + e - e to
/// within its precision of |x| + |e|, not of |x|: with k = 1 / g_bar
/// unbounded (`max_inv_scale` unset) and small gradients, e is hundreds of
/// times W0, and f32's rounding of W0 + e - e alone exceeds an rtol
/// relative to W0. A method that gets the perturbation or its removal
/// wrong is off by about |e| itself, far outside rtol |e|.
pub fn check_case<B: TensorOps + HostIo + Clone>(backend: &B, case: &Case, tol: Tolerance, seed: Option<u64>) -> Result<(), Failure> {
    let mut r = case.reference();
    let groups = r.group_names();
    let mut names = r.names.clone();
    names.extend(r.adapters.iter().filter(|a| a.w0.is_some()).map(|a| format!("{}.w0", a.name)));
    let ctx = Ctx { origin: Origin::Case { seed }, tol, config: case.config, names: &names, groups: &groups };
    let mut run = CaseRun::new(backend, case).map_err(|e| ctx.error(0, e))?;
    let mut clean_got = run.host(false).map_err(|e| ctx.error(0, e))?;
    let mut clean_want = reference_snapshot(&r, false);
    let mut budget = Budget::new(&clean_want);
    for (k, s) in case.steps.iter().enumerate() {
        let step = k + 1;
        let got = run.perturb().map_err(|e| ctx.error(step, e))?;
        r.perturb();
        let want = reference_snapshot(&r, false);
        budget.add(&clean_want, &want);
        ctx.perturbed(step, &got, &want, &clean_got, &clean_want, &budget)?;
        clean_got = run.step(s).map_err(|e| ctx.error(step, e))?;
        let skipped = r.step(&s.grads.iter().zip(&r.params.clone()).map(|(g, p)| Mat::new(p.rows, p.cols, g.clone())).collect::<Vec<_>>(), s.lr);
        clean_want = reference_snapshot(&r, skipped);
        ctx.after(step, &clean_got, &clean_want, &budget)?;
    }
    Ok(())
}

/// [`check_case`] with the default tolerance of `backend`'s element type
/// ([`default_tolerance`]), the failure as text.
pub fn check_against_reference<B: TensorOps + HostIo + Clone>(backend: &B, case: &Case) -> Result<(), String> {
    check_case(backend, case, default_tolerance(Dtype::of(backend)), None).map_err(|f| f.to_string())
}

/// Runs `case` on two backends in lockstep and compares them after every
/// phase, with the default tolerance of the less precise one and the
/// perturbation allowance of [`check_case`] (from `a`'s perturbations).
pub fn check_agree<A, B>(a: &A, b: &B, case: &Case) -> Result<(), String>
where
    A: TensorOps + HostIo + Clone,
    B: TensorOps + HostIo + Clone,
{
    let dtype = if Dtype::of(a) == Dtype::F32 || Dtype::of(b) == Dtype::F32 { Dtype::F32 } else { Dtype::F64 };
    let groups: Vec<String> = case.reference().group_names();
    let (mut ra, mut rb) = (CaseRun::new(a, case)?, CaseRun::new(b, case)?);
    let names: Vec<String> = ra.tensors.iter().map(|(n, _)| n.clone()).collect();
    let ctx = Ctx { origin: Origin::Case { seed: None }, tol: default_tolerance(dtype), config: case.config, names: &names, groups: &groups };
    let (mut clean_a, mut clean_b) = (ra.host(false)?, rb.host(false)?);
    let mut budget = Budget::new(&clean_a);
    for (k, s) in case.steps.iter().enumerate() {
        let step = k + 1;
        let (pa, pb) = (ra.perturb()?, rb.perturb()?);
        budget.add(&clean_a, &pa);
        ctx.perturbed(step, &pa, &pb, &clean_a, &clean_b, &budget).map_err(|f| f.to_string())?;
        (clean_a, clean_b) = (ra.step(s)?, rb.step(s)?);
        ctx.after(step, &clean_a, &clean_b, &budget).map_err(|f| f.to_string())?;
    }
    Ok(())
}
