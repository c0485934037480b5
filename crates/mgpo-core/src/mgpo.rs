//! LoRA-MGPO: AdamW plus a perturbation along the optimizer's own first
//! moment ([the spec](crate::spec)). A training step is two calls:
//!
//! 1. [`Mgpo::perturb`] before the forward pass: for each group,
//!    eps = sigma rho k d / (n + eps) with d the momentum m_{t-1} (adapter
//!    space) or D_i = s_i (m_B A + B m_A) (weight space), n = ||d|| over the
//!    group and k = min(1 / (g_bar + eps), max_inv_scale) (1 without APN).
//! 2. [`Mgpo::step`] after the backward pass, with the gradients taken at
//!    the perturbed point: skip if any is non-finite; otherwise remove the
//!    perturbation, update g_bar <- beta g_bar + (1 - beta) ||g||, clip, and
//!    run AdamW.
//!
//! Between the two calls the parameters are perturbed; otherwise they are
//! always clean. Per parameter the optimizer keeps only AdamW's m and v;
//! everything MGPO adds is a few scalars per group.
//!
//! Tensors are given by name, in the order of [`Layout::names`]; every call
//! checks every name and shape before it changes anything.
//!
//! Sharded ([`Mgpo::sharded`], ZeRO stage 1, `shard.rs`), a rank keeps m and
//! v of its own tensors only and updates only those; every global sum is
//! formed from per-tensor partial sums combined across ranks, then added in
//! the order one process adds them. Unsharded, combining is a no-op.

use crate::backend::noise;
use crate::backend::{AdamWItem, AdamWStep, AxpyItem, TensorOps};
use crate::clip::clip_factor;
use crate::config::{validate_lr, Config, Perturbation, Scope, Space};
use crate::error::{MgpoError, Result};
use crate::layout::Layout;
use crate::named::{NamedGrads, NamedTensors};
use crate::shard::{OneProcess, PartialSums, Shard};

/// AdamW's moments of one trainable tensor.
#[derive(Debug, Clone)]
pub struct Moments<T> {
    /// First moment m (the perturbation's direction in adapter space).
    pub m: T,
    /// Second moment v.
    pub v: T,
}

/// Everything a checkpoint must hold to resume exactly.
#[derive(Debug, Clone)]
pub struct State<T> {
    /// Completed (not skipped) steps: AdamW's t of the last step.
    pub step: u64,
    /// Steps skipped for non-finite gradients.
    pub skipped: u64,
    /// Per trainable tensor, in layout order (sharded: per tensor this rank
    /// owns, see [`Shard::owned`]); empty until the first completed step.
    pub moments: Vec<Moments<T>>,
    /// Per group; `None` until the group's first completed step.
    pub g_bar: Vec<Option<f64>>,
}

/// A set of tensors (adapter space) or adapters (weight space) that share
/// one perturbation norm and one g_bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// `global`, or the adapter's (or plain tensor's) name under `per_adapter`.
    pub name: String,
    /// Trainable-tensor indices (adapter space) or adapter indices (weight space).
    pub members: Vec<usize>,
}

/// What one group did in a step, for logging.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GroupReport {
    /// The group's name (see [`Group::name`]).
    pub name: String,
    /// ||d|| at perturb time (0 when not perturbed).
    pub direction_norm: f64,
    /// k = min(1 / (g_bar + eps), max_inv_scale), or 1.
    pub inv_scale: f64,
    /// ||eps_d||.
    pub perturbation_norm: f64,
    /// ||g|| of this step (adapter space: over the group's tensors; weight
    /// space: of the gradients' weight-space image); NaN when skipped.
    pub grad_norm: f64,
    /// g_bar after the step.
    pub g_bar: Option<f64>,
}

/// The outcome of [`Mgpo::step`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StepReport {
    /// Completed steps after this one.
    pub step: u64,
    /// True when a non-finite gradient made the step a no-op.
    pub skipped: bool,
    /// Steps skipped so far, this one included.
    pub skipped_total: u64,
    /// The step's learning rate (before any parameter group's `lr_scale`).
    pub lr: f64,
    /// Global L2 norm of all raw gradients (NaN when skipped).
    pub grad_norm: f64,
    /// The clipping factor applied to the gradients (1 without clipping).
    pub clip_factor: f64,
    /// Per perturbation group.
    pub groups: Vec<GroupReport>,
}

/// A weight-space perturbation in factored form, for an adapter registered
/// without W0: its layer adds `coef * (m_b (A x) + B (m_a x))` to the base
/// output, with A and B detached from the graph.
#[derive(Debug)]
pub struct WeightPerturbation<'a, T> {
    /// c_i = sigma rho k s_i / (n + eps).
    pub coef: f64,
    /// The first moment of B (out x r).
    pub m_b: &'a T,
    /// The first moment of A (r x in).
    pub m_a: &'a T,
}

/// The perturbation now applied.
#[derive(Debug, Clone)]
struct Applied {
    /// Per group (adapter space) or per adapter (weight space), 0 when none.
    coef: Vec<f64>,
    direction_norm: Vec<f64>,
    inv_scale: Vec<f64>,
    /// ||eps_d|| per group.
    norm: Vec<f64>,
}

/// The LoRA-MGPO optimizer over a backend `B`, one of `S::size()` ranks.
pub struct Mgpo<B: TensorOps, S: PartialSums = OneProcess> {
    backend: B,
    config: Config,
    layout: Layout,
    groups: Vec<Group>,
    /// Adapter space: the group of each trainable tensor (`None` in weight space).
    group_of: Vec<Option<usize>>,
    state: State<B::Tensor>,
    /// Whether the moments exist (after the first completed step, or set):
    /// the same on every rank, even one that owns no tensor.
    has_moments: bool,
    /// ||m||^2 of each owned tensor, left by the last AdamW pass (0 for others).
    m_sq: Vec<f64>,
    shard: Shard,
    sums: S,
    /// Sharded, weight space: m of the adapter tensors other ranks own, which
    /// the perturbation of W0 needs; the driver copies in the owners' values
    /// after every step ([`Mgpo::replica_exchange`]).
    replicas: Vec<Option<B::Tensor>>,
    applied: Option<Applied>,
    last_report: Option<StepReport>,
}

impl<B: TensorOps> Mgpo<B> {
    /// An optimizer for the tensors of `layout`, computing on `backend`.
    pub fn new(backend: B, config: Config, layout: Layout) -> Result<Self> {
        Mgpo::sharded(backend, config, layout, OneProcess)
    }
}

impl<B: TensorOps, S: PartialSums> Mgpo<B, S> {
    /// Rank `sums.rank()`'s part of an optimizer sharded over `sums.size()`
    /// ranks (ZeRO stage 1): it keeps and updates the moments of the tensors
    /// [`Shard::new`] gives it and combines partial sums through `sums`. Each
    /// call needs every tensor's current value and the summed gradients of
    /// the tensors this rank owns (a driver, crate `mgpo-mpi`, moves them).
    pub fn sharded(backend: B, config: Config, layout: Layout, sums: S) -> Result<Self> {
        config.validate()?;
        let shard = Shard::new(&layout, sums.rank(), sums.size())?;
        let gaussian = matches!(config.perturbation, Perturbation::Gaussian { .. });
        if let Some(ad) = layout.adapters.iter().find(|ad| gaussian && config.space == Space::Weight && ad.w0.is_none()) {
            return Err(MgpoError::AdapterShape {
                name: ad.name.clone(),
                detail: "the Gaussian direction in weight space is a full-rank matrix added to W0: register the adapter with its W0".into(),
            });
        }
        let groups = make_groups(&config, &layout);
        let mut group_of = vec![None; layout.tensors.len()];
        if config.space == Space::Adapter {
            for (gi, g) in groups.iter().enumerate() {
                for &t in &g.members {
                    group_of[t] = Some(gi);
                }
            }
        }
        let state = State { step: 0, skipped: 0, moments: Vec::new(), g_bar: vec![None; groups.len()] };
        let m_sq = vec![0.0; layout.tensors.len()];
        let replicas = layout.tensors.iter().map(|_| None).collect();
        Ok(Mgpo { backend, config, layout, groups, group_of, state, has_moments: false, m_sq, shard, sums, replicas, applied: None, last_report: None })
    }

    /// Computes the perturbation from m_{t-1} and g_bar_{t-1} and adds it to
    /// the parameters (adapter space) or to W0 (weight space). Call before
    /// the forward pass. Names, shapes and state are checked before any
    /// tensor changes, so an error on the caller's input leaves them as they
    /// were (only a failure of the backend itself can stop it half-way).
    pub fn perturb<P: NamedTensors<B::Tensor> + ?Sized>(&mut self, tensors: &mut P) -> Result<()> {
        if self.applied.is_some() {
            return Err(MgpoError::AlreadyPerturbed);
        }
        self.check_tensors(tensors)?;
        self.applied = Some(self.perturbation(tensors)?);
        let applied = self.apply_perturbation(tensors, 1.0);
        if applied.is_err() {
            self.applied = None;
        }
        applied
    }

    /// Consumes the gradients taken at the perturbed point: removes the
    /// perturbation and, unless a gradient is non-finite, updates g_bar and
    /// runs AdamW. Works without a preceding `perturb` (a clean step).
    ///
    /// Gradients that are missing, misnamed or misshapen are an error after
    /// which the tensors are clean and the state is as before. (Tensors that
    /// are themselves misnamed cannot be cleaned: that error leaves the
    /// optimizer perturbed, for `unperturb` with the right tensors.)
    pub fn step<P, G>(&mut self, tensors: &mut P, grads: &G) -> Result<StepReport>
    where
        P: NamedTensors<B::Tensor> + ?Sized,
        G: NamedGrads<B::Tensor> + ?Sized,
    {
        self.check_tensors(tensors)?;
        let result = self.checked_step(tensors, grads);
        if result.is_err() && self.applied.is_some() {
            // The error already says what went wrong; cleaning is best effort.
            let _ = self.unperturb(tensors);
        }
        if let Ok(r) = &result {
            self.last_report = Some(r.clone());
        }
        result
    }

    fn checked_step<P, G>(&mut self, params: &mut P, grads: &G) -> Result<StepReport>
    where
        P: NamedTensors<B::Tensor> + ?Sized,
        G: NamedGrads<B::Tensor> + ?Sized,
    {
        let grads = self.check_grads(grads)?;
        let be = &self.backend;

        let sums = self.grad_sums(params, &grads)?;
        let (sq, rest) = sums.split_at(grads.len());
        if rest[0] != 0.0 {
            self.unperturb(params)?;
            self.state.skipped += 1;
            return Ok(self.report(None, true, &vec![f64::NAN; self.groups.len()], f64::NAN, 1.0));
        }

        let fresh = if self.has_moments {
            None
        } else {
            let mut ms = Vec::new();
            for t in self.shard.owned() {
                let p = params.tensor(t);
                ms.push(Moments { m: be.zeros_like(p)?, v: be.zeros_like(p)? });
            }
            let mut replicas = Vec::with_capacity(grads.len());
            for t in 0..grads.len() {
                replicas.push(if self.replicated(t) { Some(be.zeros_like(params.tensor(t))?) } else { None });
            }
            Some((ms, replicas))
        };

        let group_norms = self.group_grad_norms(sq, &rest[1..]);
        let total = sq.iter().sum::<f64>().sqrt();
        let clip = clip_factor(self.config.max_grad_norm, total);

        let fused_removal = self.config.space == Space::Adapter && self.config.perturbation == Perturbation::Momentum;
        if !fused_removal {
            self.apply_perturbation(params, -1.0)?;
        }
        let applied = self.applied.take();
        if let Some((ms, replicas)) = fresh {
            self.state.moments = ms;
            self.replicas = replicas;
            self.has_moments = true;
        }
        for (gb, &n) in self.state.g_bar.iter_mut().zip(&group_norms) {
            let b = self.config.beta;
            *gb = Some(gb.map_or(n, |prev| b * prev + (1.0 - b) * n));
        }

        let t = self.state.step + 1;
        let a = self.config.adamw;
        // One set of AdamW scalars per parameter group: lr_g = lr lr_scale.
        let consts: Vec<AdamWStep> = self
            .layout
            .param_groups
            .iter()
            .map(|pg| {
                let lr = a.lr * pg.lr_scale;
                AdamWStep {
                    unperturb: 0.0,
                    decay: 1.0 - lr * pg.weight_decay.unwrap_or(a.weight_decay),
                    grad_scale: clip,
                    beta1: a.beta1,
                    beta2: a.beta2,
                    step_size: lr / (1.0 - a.beta1.powf(t as f64)),
                    bias2_sqrt: (1.0 - a.beta2.powf(t as f64)).sqrt(),
                    eps: a.eps,
                }
            })
            .collect();
        let shard = &self.shard;
        let mut items: Vec<AdamWItem<'_, B::Tensor>> = params
            .tensors_mut()
            .into_iter()
            .enumerate()
            .filter(|(t, _)| shard.owns(*t))
            .zip(&mut self.state.moments)
            .map(|((t, p), Moments { m, v })| {
                let unperturb = match (&applied, self.group_of[t], fused_removal) {
                    (Some(ap), Some(gi), true) => ap.coef[gi],
                    _ => 0.0,
                };
                AdamWItem { p, g: grads[t], m, v, k: AdamWStep { unperturb, ..consts[self.layout.tensors[t].param_group] } }
            })
            .collect();
        let m_sq = self.backend.adamw_many(&mut items)?;
        let owned = items.len();
        drop(items);
        if m_sq.len() != owned {
            return Err(MgpoError::Backend(format!("adamw_many returned {} sums for {owned} tensors", m_sq.len())));
        }
        for (t, s) in self.shard.owned().zip(m_sq) {
            self.m_sq[t] = s;
        }
        self.state.step = t;
        Ok(self.report(applied.as_ref(), false, &group_norms, total, clip))
    }

    /// Removes the perturbation, if any, without a step (to evaluate, or to
    /// abandon a step whose backward pass failed).
    pub fn unperturb<P: NamedTensors<B::Tensor> + ?Sized>(&mut self, tensors: &mut P) -> Result<()> {
        self.check_tensors(tensors)?;
        self.apply_perturbation(tensors, -1.0)?;
        self.applied = None;
        Ok(())
    }

    /// The factored weight-space perturbation of adapter number `adapter`
    /// (in [`Layout::adapters`]) now applied, for adapters registered
    /// without W0 (see [`WeightPerturbation`]).
    pub fn weight_perturbation(&self, adapter: usize) -> Option<WeightPerturbation<'_, B::Tensor>> {
        let ap = self.applied.as_ref()?;
        let ad = self.layout.adapters.get(adapter)?;
        let coef = *ap.coef.get(adapter)?;
        let factored = self.config.space == Space::Weight && self.config.perturbation == Perturbation::Momentum && ad.w0.is_none();
        let (m_b, m_a) = (self.first_moment(ad.b).ok()?, self.first_moment(ad.a).ok()?);
        (factored && coef != 0.0).then_some(WeightPerturbation { coef, m_b, m_a })
    }

    /// Sets the learning rate of the following steps (a schedule).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        validate_lr(lr)?;
        self.config.adamw.lr = lr;
        Ok(())
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.config.adamw.lr
    }
    /// The configuration (its `adamw.lr` is the current learning rate).
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The tensors the optimizer owns.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The perturbation groups (one `global`, or one per adapter).
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }
    /// The backend the optimizer computes on.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The optimizer state (m, v per tensor, g_bar per group, step counts);
    /// sharded, the moments of this rank's own tensors.
    pub fn state(&self) -> &State<B::Tensor> {
        &self.state
    }
    /// Which rank owns which tensor's moments (one rank owning all, unsharded).
    pub fn shard(&self) -> &Shard {
        &self.shard
    }
    /// For a sharded run's driver in weight space: the first moments of the
    /// adapter tensors this rank owns, to send, and its replicas of those
    /// other ranks own, to overwrite with the owners' values after every
    /// step; each with its tensor index. Empty before the first step and
    /// in adapter space.
    #[allow(clippy::type_complexity)]
    pub fn replica_exchange(&mut self) -> (Vec<(usize, &B::Tensor)>, Vec<(usize, &mut B::Tensor)>) {
        let sent: Vec<usize> = self.shard.owned().filter(|&t| self.replicated_unit(t)).collect();
        let mine = self.shard.owned().zip(&self.state.moments).filter(|(t, _)| sent.contains(t)).map(|(t, mv)| (t, &mv.m)).collect();
        let theirs = self.replicas.iter_mut().enumerate().filter_map(|(t, r)| r.as_mut().map(|r| (t, r))).collect();
        (mine, theirs)
    }
    /// Whether every rank needs trainable tensor `t`'s first moment: sharded,
    /// in weight space with the momentum direction, the tensors of adapters
    /// (the perturbation of W0_i is built from m_A and m_B on every rank).
    /// A driver sends these from their owners after every step.
    pub fn replicated_moment(&self, t: usize) -> bool {
        self.replicated_unit(t)
    }
    /// Whether the moments exist (a step has completed, or a state with
    /// moments was set), on every rank alike, even one that owns no tensor.
    pub fn has_moments(&self) -> bool {
        self.has_moments
    }
    /// Elements of m and v this rank holds, replicas of m included: times
    /// the element size, the optimizer's memory for moments (2 per
    /// parameter unsharded; about 2 / N of them per rank sharded N ways in
    /// adapter space, plus one per adapter parameter owned elsewhere in
    /// weight space).
    pub fn moment_elems(&self) -> usize {
        let numel = |t: &B::Tensor| self.backend.shape(t).iter().product::<usize>();
        let own: usize = self.state.moments.iter().map(|mv| numel(&mv.m) + numel(&mv.v)).sum();
        own + self.replicas.iter().flatten().map(numel).sum::<usize>()
    }
    /// Whether a perturbation is applied (between `perturb` and `step`).
    pub fn is_perturbed(&self) -> bool {
        self.applied.is_some()
    }
    /// The report of the last successful step.
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last_report.as_ref()
    }

    /// Replaces the optimizer state (a checkpoint being loaded). Refused,
    /// with the state left as it was, while perturbed or when the shapes or
    /// group count do not match. Always the whole state, moments of every
    /// tensor; sharded, the rank keeps its own tensors' (and its replicas).
    pub fn set_state(&mut self, state: State<B::Tensor>) -> Result<()> {
        if self.applied.is_some() {
            return Err(MgpoError::AlreadyPerturbed);
        }
        if state.g_bar.len() != self.groups.len() {
            return Err(MgpoError::WrongCount { what: "groups", expected: self.groups.len(), got: state.g_bar.len() });
        }
        if !state.moments.is_empty() {
            let n = self.layout.tensors.len();
            if state.moments.len() != n {
                return Err(MgpoError::WrongCount { what: "moment pairs", expected: n, got: state.moments.len() });
            }
            for (info, mv) in self.layout.tensors.iter().zip(&state.moments) {
                for t in [&mv.m, &mv.v] {
                    let got = self.backend.shape(t);
                    if got != info.shape {
                        return Err(MgpoError::ShapeMismatch { name: info.name.clone(), expected: info.shape.clone(), got });
                    }
                }
            }
        }
        let n = self.layout.tensors.len();
        let mut m_sq = vec![0.0; n];
        for (t, mv) in state.moments.iter().enumerate().filter(|(t, _)| self.shard.owns(*t)) {
            m_sq[t] = self.backend.sum_sq(&mv.m)?;
        }
        let State { step, skipped, moments: all, g_bar } = state;
        let has_moments = !all.is_empty();
        let (mut moments, mut replicas) = (Vec::new(), Vec::with_capacity(n));
        for (t, Moments { m, v }) in all.into_iter().enumerate() {
            if self.shard.owns(t) {
                moments.push(Moments { m, v });
                replicas.push(None);
            } else {
                replicas.push(self.replicated(t).then_some(m));
            }
        }
        replicas.resize_with(n, || None);
        self.m_sq = m_sq;
        self.state = State { step, skipped, moments, g_bar };
        self.has_moments = has_moments;
        self.replicas = replicas;
        Ok(())
    }

    /// Whether this rank keeps a replica of tensor `t`'s m: sharded, in weight
    /// space, an adapter tensor another rank owns.
    fn replicated(&self, t: usize) -> bool {
        !self.shard.owns(t) && self.replicated_unit(t)
    }

    /// Whether tensor `t`'s m is needed on every rank: sharded, weight space
    /// with the momentum direction, a tensor of an adapter.
    fn replicated_unit(&self, t: usize) -> bool {
        let weight = self.config.space == Space::Weight && self.config.perturbation == Perturbation::Momentum;
        weight && self.shard.size() > 1 && self.layout.adapters.iter().any(|ad| ad.a == t || ad.b == t)
    }

    /// m of tensor `t`: this rank's own, or its replica.
    fn first_moment(&self, t: usize) -> Result<&B::Tensor> {
        match self.shard.slot(t) {
            Some(i) => self.state.moments.get(i).map(|mv| &mv.m),
            None => self.replicas.get(t).and_then(Option::as_ref),
        }
        .ok_or_else(|| MgpoError::Corrupt(format!("no first moment of `{}` on rank {}", self.layout.tensors[t].name, self.shard.rank())))
    }

    /// The coefficients of the perturbation of this step ([the spec](crate::spec), step 1).
    fn perturbation<P: NamedTensors<B::Tensor> + ?Sized>(&self, params: &P) -> Result<Applied> {
        let cfg = &self.config;
        let n_groups = self.groups.len();
        let mut ap = Applied {
            coef: vec![0.0; if cfg.space == Space::Weight { self.layout.adapters.len() } else { n_groups }],
            direction_norm: vec![0.0; n_groups],
            inv_scale: vec![1.0; n_groups],
            norm: vec![0.0; n_groups],
        };
        if !self.has_moments || cfg.rho == 0.0 {
            return Ok(ap);
        }
        let d = self.direction_sq(params)?;
        for (gi, g) in self.groups.iter().enumerate() {
            let n = match (cfg.space, cfg.perturbation) {
                (Space::Adapter, _) | (Space::Weight, Perturbation::Gaussian { .. }) => g.members.iter().map(|&i| d[i]).sum::<f64>().sqrt(),
                (Space::Weight, Perturbation::Momentum) => {
                    let mut s = 0.0;
                    for &i in &g.members {
                        s += d[i];
                    }
                    s.sqrt()
                }
            };
            let mut k = match (cfg.adaptive_norm, self.state.g_bar[gi]) {
                (true, Some(gb)) => 1.0 / (gb + cfg.eps),
                _ => 1.0,
            };
            if let Some(c) = cfg.max_inv_scale {
                k = k.min(c);
            }
            ap.direction_norm[gi] = n;
            ap.inv_scale[gi] = k;
            if n <= cfg.eps {
                continue;
            }
            let c = cfg.direction.sign() * cfg.rho * k / (n + cfg.eps);
            ap.norm[gi] = c.abs() * n;
            match cfg.space {
                Space::Adapter => ap.coef[gi] = c,
                Space::Weight => {
                    // D_i = s_i (m_B A + B m_A) carries the scaling; the noise does not.
                    let gaussian = matches!(cfg.perturbation, Perturbation::Gaussian { .. });
                    for &i in &g.members {
                        ap.coef[i] = if gaussian { c } else { c * self.layout.adapters[i].scale };
                    }
                }
            }
        }
        Ok(ap)
    }

    /// The squared norm of the step's direction ([the spec](crate::spec), step 1) per
    /// member of a group: ||d_t||^2 per trainable tensor (adapter space),
    /// s_i^2 ||m_B A + B m_A||^2 or ||noise on W0_i||^2 per adapter (weight
    /// space). Each rank computes its own tensors' and adapters'; combined.
    fn direction_sq<P: NamedTensors<B::Tensor> + ?Sized>(&self, params: &P) -> Result<Vec<f64>> {
        let mut d = self.m_sq.clone();
        let next = self.state.step + 1;
        let owned_adapters = self.layout.adapters.iter().enumerate().filter(|(_, ad)| self.shard.owns(ad.a));
        match (self.config.space, self.config.perturbation) {
            (Space::Adapter, Perturbation::Momentum) => {}
            (Space::Adapter, Perturbation::Gaussian { seed }) => {
                for t in self.shard.owned() {
                    d[t] = noise::sum_sq(noise::tensor_seed(seed, next, t), self.layout.tensors[t].shape.iter().product());
                }
            }
            (Space::Weight, perturbation) => {
                d = vec![0.0; self.layout.adapters.len()];
                for (i, ad) in owned_adapters {
                    d[i] = match (perturbation, ad.w0) {
                        (Perturbation::Gaussian { seed }, Some(w)) => noise::sum_sq(noise::tensor_seed(seed, next, w), self.layout.frozen[w].shape.iter().product()),
                        (Perturbation::Gaussian { .. }, None) => 0.0,
                        (Perturbation::Momentum, _) => {
                            let (a, b) = (params.tensor(ad.a), params.tensor(ad.b));
                            ad.scale * ad.scale * self.backend.low_rank_norm_sq(self.first_moment(ad.b)?, a, b, self.first_moment(ad.a)?)?
                        }
                    };
                }
            }
        }
        self.sums.all_reduce(&mut d)?;
        Ok(d)
    }

    /// This step's sums over the gradients, each computed by the rank that
    /// owns the tensor and combined: ||g_t||^2 per trainable tensor, then the
    /// number of tensors with a non-finite entry, then (weight space)
    /// s_i^2 ||g_B A + B g_A||^2 per adapter ([the spec](crate::spec), step 3.3).
    fn grad_sums<P: NamedTensors<B::Tensor> + ?Sized>(&self, params: &P, grads: &[&B::Tensor]) -> Result<Vec<f64>> {
        let (n, be) = (grads.len(), &self.backend);
        let per_adapter = if self.config.space == Space::Weight { self.layout.adapters.len() } else { 0 };
        let mut sums = vec![0.0; n + 1 + per_adapter];
        let owned: Vec<usize> = self.shard.owned().collect();
        let sq = be.sum_sq_many(&owned.iter().map(|&t| grads[t]).collect::<Vec<_>>())?;
        for (&t, s) in owned.iter().zip(sq) {
            sums[t] = s;
            if !(s.is_finite() || be.all_finite(grads[t])?) {
                sums[n] += 1.0;
            }
        }
        for (i, ad) in self.layout.adapters.iter().enumerate().filter(|(_, ad)| per_adapter > 0 && self.shard.owns(ad.a)) {
            let (a, b) = (params.tensor(ad.a), params.tensor(ad.b));
            sums[n + 1 + i] = ad.scale * ad.scale * be.low_rank_norm_sq(grads[ad.b], a, b, grads[ad.a])?;
        }
        self.sums.all_reduce(&mut sums)?;
        Ok(sums)
    }

    /// ||g|| per group ([the spec](crate::spec), step 3.3) from [`Mgpo::grad_sums`]:
    /// per-tensor sums in adapter space, per-adapter sums in weight space.
    fn group_grad_norms(&self, sq: &[f64], adapter_sq: &[f64]) -> Vec<f64> {
        let sum = |g: &Group| match self.config.space {
            Space::Adapter => g.members.iter().map(|&t| sq[t]).sum::<f64>(),
            Space::Weight => {
                let mut s = 0.0;
                for &i in &g.members {
                    s += adapter_sq[i];
                }
                s
            }
        };
        self.groups.iter().map(|g| sum(g).sqrt()).collect()
    }

    /// Adds (`sign` 1) or removes (-1) the recorded perturbation: theta or
    /// W0 in place; nothing for adapters perturbed in factored form.
    fn apply_perturbation<P: NamedTensors<B::Tensor> + ?Sized>(&self, tensors: &mut P, sign: f64) -> Result<()> {
        let Some(ap) = &self.applied else { return Ok(()) };
        if !self.has_moments {
            return Ok(());
        }
        match self.config.space {
            Space::Adapter => self.move_adapter_params(tensors, ap, sign)?,
            Space::Weight => {
                let n = self.layout.tensors.len();
                for (i, ad) in self.layout.adapters.iter().enumerate() {
                    let c = sign * ap.coef[i];
                    if let (Some(w), true) = (ad.w0, c != 0.0) {
                        let mut all = tensors.tensors_mut();
                        let (params, frozen) = all.split_at_mut(n);
                        match self.config.perturbation {
                            Perturbation::Momentum => self.backend.add_low_rank(frozen[w], c, self.first_moment(ad.b)?, params[ad.a], params[ad.b], self.first_moment(ad.a)?)?,
                            Perturbation::Gaussian { seed } => self.backend.axpy_noise(frozen[w], c, noise::tensor_seed(seed, self.state.step + 1, w))?,
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// theta <- theta + sign * c_g d in adapter space, d = m or the step's noise.
    fn move_adapter_params<P: NamedTensors<B::Tensor> + ?Sized>(&self, params: &mut P, ap: &Applied, sign: f64) -> Result<()> {
        let coef = |t: usize| sign * self.group_of[t].map_or(0.0, |g| ap.coef[g]);
        match self.config.perturbation {
            Perturbation::Momentum => {
                let mut items: Vec<AxpyItem<'_, B::Tensor>> = params
                    .tensors_mut()
                    .into_iter()
                    .enumerate()
                    .filter(|(t, _)| self.shard.owns(*t))
                    .zip(&self.state.moments)
                    .filter(|((t, _), _)| coef(*t) != 0.0)
                    .map(|((t, y), mv)| AxpyItem { y, alpha: coef(t), x: &mv.m })
                    .collect();
                self.backend.axpy_many(&mut items)
            }
            Perturbation::Gaussian { seed } => {
                for t in self.shard.owned().filter(|&t| coef(t) != 0.0) {
                    self.backend.axpy_noise(params.tensor_mut(t), coef(t), noise::tensor_seed(seed, self.state.step + 1, t))?;
                }
                Ok(())
            }
        }
    }

    fn report(&self, applied: Option<&Applied>, skipped: bool, grad_norms: &[f64], total: f64, clip: f64) -> StepReport {
        let groups = self
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                let (n, k, pn) = applied.map_or((0.0, 1.0, 0.0), |ap| (ap.direction_norm[gi], ap.inv_scale[gi], ap.norm[gi]));
                GroupReport {
                    name: g.name.clone(),
                    direction_norm: n,
                    inv_scale: k,
                    perturbation_norm: pn,
                    grad_norm: grad_norms[gi],
                    g_bar: self.state.g_bar[gi],
                }
            })
            .collect();
        StepReport {
            step: self.state.step,
            skipped,
            skipped_total: self.state.skipped,
            lr: self.config.adamw.lr,
            grad_norm: total,
            clip_factor: clip,
            groups,
        }
    }

    /// Every name in order and every shape; W0s are required only where
    /// the optimizer perturbs them in place.
    fn check_tensors<P: NamedTensors<B::Tensor> + ?Sized>(&self, tensors: &P) -> Result<()> {
        let (lt, lf) = (&self.layout.tensors, &self.layout.frozen);
        let w0_needed = self.config.space == Space::Weight && !lf.is_empty();
        let expected = if tensors.count() > lt.len() || w0_needed { lt.len() + lf.len() } else { lt.len() };
        for (i, info) in lt.iter().chain(lf).enumerate().take(expected) {
            if i >= tensors.count() {
                return Err(MgpoError::MissingTensor(info.name.clone()));
            }
            let got = tensors.name(i);
            if got != info.name {
                return Err(MgpoError::NameMismatch { position: i, expected: info.name.clone(), got: got.to_string() });
            }
            self.check_shape(&info.name, &info.shape, tensors.tensor(i))?;
        }
        if tensors.count() > expected {
            return Err(MgpoError::UnknownName(tensors.name(expected).to_string()));
        }
        Ok(())
    }

    fn check_grads<'g, G: NamedGrads<B::Tensor> + ?Sized>(&self, grads: &'g G) -> Result<Vec<&'g B::Tensor>> {
        let lt = &self.layout.tensors;
        let mut out = Vec::with_capacity(lt.len());
        for (i, info) in lt.iter().enumerate() {
            if i >= grads.count() {
                return Err(MgpoError::MissingGradient(info.name.clone()));
            }
            let got = grads.name(i);
            if got != info.name {
                return Err(MgpoError::NameMismatch { position: i, expected: format!("grad of {}", info.name), got: format!("grad of {got}") });
            }
            let g = grads.grad(i).ok_or_else(|| MgpoError::MissingGradient(info.name.clone()))?;
            self.check_shape(&format!("grad of {}", info.name), &info.shape, g)?;
            out.push(g);
        }
        if grads.count() > lt.len() {
            return Err(MgpoError::UnknownName(format!("grad of {}", grads.name(lt.len()))));
        }
        Ok(out)
    }

    fn check_shape(&self, name: &str, expected: &[usize], t: &B::Tensor) -> Result<()> {
        let got = self.backend.shape(t);
        if got == expected {
            Ok(())
        } else {
            Err(MgpoError::ShapeMismatch { name: name.to_string(), expected: expected.to_vec(), got })
        }
    }
}

/// The perturbation groups of [the spec](crate::spec): `global` is one group; `per_adapter` is one per adapter
/// and, in adapter space, one per plain tensor. In weight space plain
/// tensors belong to no group.
fn make_groups(config: &Config, layout: &Layout) -> Vec<Group> {
    let adapter_members = |i: usize| match config.space {
        Space::Adapter => vec![layout.adapters[i].a, layout.adapters[i].b],
        Space::Weight => vec![i],
    };
    let with_plain = config.space == Space::Adapter;
    match config.scope {
        Scope::Global => {
            let mut members: Vec<usize> = (0..layout.adapters.len()).flat_map(adapter_members).collect();
            if with_plain {
                members.extend(&layout.plain);
                members.sort_unstable();
            }
            vec![Group { name: "global".into(), members }]
        }
        Scope::PerAdapter => {
            let mut groups: Vec<Group> = layout
                .adapters
                .iter()
                .enumerate()
                .map(|(i, a)| Group { name: a.name.clone(), members: adapter_members(i) })
                .collect();
            if with_plain {
                groups.extend(layout.plain.iter().map(|&t| Group { name: layout.tensors[t].name.clone(), members: vec![t] }));
            }
            groups
        }
    }
}
