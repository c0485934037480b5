//! Property-test generators: random configurations, adapter shapes, plain
//! tensors and gradient sequences (non-finite ones included), and checks
//! that run a backend step by step against the float64 [`Reference`] or
//! against another backend.

use mgpo_core::backend::{HostIo, TensorOps};
use mgpo_core::{AdamWConfig, Config, Direction, Layout, Mgpo, Perturbation, Scope, Space};
use proptest::prelude::*;

use crate::reference::{Mat, RefAdapter, Reference};
use crate::Tolerance;

/// One adapter of a [`Case`]: A is rank x fan_in, B is fan_out x rank.
#[derive(Debug, Clone)]
pub struct CaseAdapter {
    pub name: String,
    pub alpha: f64,
    pub rank: usize,
    pub fan_in: usize,
    pub fan_out: usize,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub w0: Vec<f64>,
}

/// One step: its learning rate and a gradient per trainable tensor, in
/// layout order (A, B of each adapter, then the plain tensors).
#[derive(Debug, Clone)]
pub struct CaseStep {
    pub lr: f64,
    pub grads: Vec<Vec<f64>>,
}

/// A random optimisation problem without a model: the gradients are given.
#[derive(Debug, Clone)]
pub struct Case {
    pub config: Config,
    pub adapters: Vec<CaseAdapter>,
    /// Plain trainable tensors: (name, shape, initial data).
    pub plain: Vec<(String, Vec<usize>, Vec<f64>)>,
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
#[derive(Debug)]
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

/// The comparison tolerance for a backend: tight when it keeps f64, loose
/// for f32 (detected by a round trip of 1 + 2^-40).
fn tolerance_of<B: HostIo>(be: &B) -> Tolerance {
    let x = 1.0 + 2f64.powi(-40);
    let exact = be.from_f64(&[1], &[x]).and_then(|t| be.to_f64(&t)).is_ok_and(|v| v[0] == x);
    if exact {
        Tolerance { rtol: 1e-8, atol: 1e-10 }
    } else {
        Tolerance { rtol: 2e-3, atol: 2e-5 }
    }
}

fn compare(what: &str, a: &Snapshot, b: &Snapshot, tol: Tolerance) -> Result<(), String> {
    if a.skipped != b.skipped {
        return Err(format!("{what}: skipped {} vs {}", a.skipped, b.skipped));
    }
    for (kind, xs, ys) in [("param", &a.params, &b.params), ("w0", &a.frozen, &b.frozen)] {
        if xs.len() != ys.len() {
            return Err(format!("{what}: {} {kind} tensors vs {}", xs.len(), ys.len()));
        }
        for (t, (x, y)) in xs.iter().zip(ys).enumerate() {
            for (j, (&p, &q)) in x.iter().zip(y).enumerate() {
                if !tol.accepts(p, q) {
                    return Err(format!("{what}: {kind} {t}[{j}] = {p:e}, reference {q:e}"));
                }
            }
        }
    }
    for (gi, (x, y)) in a.g_bar.iter().zip(&b.g_bar).enumerate() {
        let ok = match (x, y) {
            (Some(p), Some(q)) => tol.accepts(*p, *q),
            (None, None) => true,
            _ => false,
        };
        if !ok {
            return Err(format!("{what}: g_bar[{gi}] = {x:?}, reference {y:?}"));
        }
    }
    Ok(())
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
/// perturbed point, the clean parameters, W0 and g_bar after every step.
pub fn check_against_reference<B: TensorOps + HostIo + Clone>(backend: &B, case: &Case) -> Result<(), String> {
    let tol = tolerance_of(backend);
    let mut run = CaseRun::new(backend, case)?;
    let mut r = case.reference();
    for (k, s) in case.steps.iter().enumerate() {
        let got = run.perturb()?;
        r.perturb();
        compare(&format!("step {} perturbed", k + 1), &got, &reference_snapshot(&r, false), tol)?;
        let got = run.step(s)?;
        let skipped = r.step(&s.grads.iter().zip(&r.params.clone()).map(|(g, p)| Mat::new(p.rows, p.cols, g.clone())).collect::<Vec<_>>(), s.lr);
        compare(&format!("step {} after", k + 1), &got, &reference_snapshot(&r, skipped), tol)?;
    }
    Ok(())
}

/// Runs `case` on two backends in lockstep and compares them after every
/// phase, with the tolerance of the less precise one.
pub fn check_agree<A, B>(a: &A, b: &B, case: &Case) -> Result<(), String>
where
    A: TensorOps + HostIo + Clone,
    B: TensorOps + HostIo + Clone,
{
    let (ta, tb) = (tolerance_of(a), tolerance_of(b));
    let tol = if ta.rtol >= tb.rtol { ta } else { tb };
    let (mut ra, mut rb) = (CaseRun::new(a, case)?, CaseRun::new(b, case)?);
    for (k, s) in case.steps.iter().enumerate() {
        compare(&format!("step {} perturbed", k + 1), &ra.perturb()?, &rb.perturb()?, tol)?;
        compare(&format!("step {} after", k + 1), &ra.step(s)?, &rb.step(s)?, tol)?;
    }
    Ok(())
}
