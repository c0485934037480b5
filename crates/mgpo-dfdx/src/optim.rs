//! [`DfdxMgpo`]: LoRA-MGPO in dfdx's optimizer conventions.
//!
//! ```text
//! let mut opt = DfdxMgpo::new(&model, config)?;
//! let mut grads = model.alloc_grads();
//! loop {
//!     opt.perturb(&mut model)?;                  // theta + eps, or the layers' factored eps_D
//!     let loss = loss_fn(model.forward(x.traced(grads)), y);
//!     grads = loss.backward();
//!     opt.update(&mut model, &grads)?;           // dfdx's Optimizer: remove eps, AdamW
//!     model.zero_grads(&mut grads);
//! }
//! ```
//!
//! The optimizer walks the model with dfdx's `TensorCollection` visitor.
//! Every tensor that dfdx would train (`do_gradient_update`) is a
//! trainable tensor of mgpo-core's [`Layout`], in walk order. A trainable
//! pair `P.lora_a`, `P.lora_b` next to a rank-0 `P.lora_scale` (as in
//! [`crate::LoraLinear`]) is adapter `P` with that scaling; any other
//! trainable tensor (a classifier head, say) is a plain tensor. The frozen
//! base weights are never registered: in `weight` space the perturbation is
//! handed to each layer in factored form (its `P.mgpo_*` tensors), so W0
//! is never written.
//!
//! A walk copies each trainable tensor into the backend's buffers and back
//! (dfdx 0.13 offers no public mutable view of a tensor's storage); the
//! frozen weights are not touched. The algorithm itself is mgpo-core's.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use dfdx::nn::tensor_collection::{RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorName, ViewTensorRef};
use dfdx::optim::{Optimizer, OptimizerUpdateError, UnusedTensors};
use dfdx::prelude::*;
use mgpo_core::{Config, HostIo, Layout, Mgpo, MgpoError, Result, Space, StepReport, Tensors};

use crate::backend::{DfTensor, DfdxBackend, Element};
use crate::lora::names;

/// What the walk does with one tensor of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// Trainable tensor with this index in the layout.
    Trainable(usize),
    /// Rank-0 scaling of adapter i.
    Scale(usize),
    /// Rank-0 merged flag of adapter i.
    Merged(usize),
    /// The factored perturbation of adapter i: coef, A_c, B_c, coef m_A, coef m_B.
    Coef(usize),
    Pa(usize),
    Pb(usize),
    Pma(usize),
    Pmb(usize),
    /// Frozen weights and everything else: never read.
    Other,
}

/// The model's tensors as the optimizer met them when it was built.
#[derive(Debug, Clone)]
struct Plan {
    /// Full dfdx name and role of every tensor, in walk order.
    visits: Vec<(String, Role)>,
    /// Model tensor name of each trainable tensor, in layout order.
    trainable_names: Vec<String>,
}

/// The factored weight-space perturbation of one adapter, ready to write.
struct Factored<E: Element> {
    coef: DfTensor<E>,
    a: DfTensor<E>,
    b: DfTensor<E>,
    ma: DfTensor<E>,
    mb: DfTensor<E>,
}

/// LoRA-MGPO over a dfdx model `M` on the CPU, in element type `E`.
pub struct DfdxMgpo<M, E: Element> {
    opt: Mgpo<DfdxBackend<E>>,
    plan: Plan,
    last_report: Option<StepReport>,
    last_error: Option<MgpoError>,
    /// The ids of the tensors the last gather found without a gradient.
    unused: Option<UnusedTensors>,
    _model: PhantomData<fn(&M)>,
}

fn shape_of<S: Shape>(s: &S) -> Vec<usize> {
    s.concrete().into()
}

/// `name` is `P` + `suffix` with `P` empty or ending in '.': returns `P`.
fn prefix_of<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let p = name.strip_suffix(suffix)?;
    (p.is_empty() || p.ends_with('.')).then_some(p)
}

/// Records every tensor's name, shape, trainability and, for rank-0
/// tensors, value.
struct Scan<E> {
    seen: Vec<Seen>,
    _e: PhantomData<E>,
}

impl<E: Element> TensorVisitor<E, Cpu> for Scan<E>
where
    Cpu: Device<E>,
{
    type Viewer = (ViewTensorRef, ViewTensorName);
    type Err = MgpoError;
    type E2 = E;
    type D2 = Cpu;

    fn visit<S: Shape>(&mut self, opts: TensorOptions<S, E, Cpu>, (t, name): (&Tensor<S, E, Cpu>, String)) -> Result<Option<Tensor<S, E, Cpu>>> {
        let shape = shape_of(t.shape());
        let value = shape.is_empty().then(|| t.as_vec().first().and_then(|x| x.to_f64()).unwrap_or(f64::NAN));
        self.seen.push((name, shape, opts.do_gradient_update, value));
        Ok(None)
    }
}

/// Copies the trainable tensors (and their gradients) out of the model and
/// checks that it still has the structure the optimizer was built for.
struct Gather<'a, E: Element> {
    plan: &'a Plan,
    layout: &'a Layout,
    pos: usize,
    params: Vec<Option<DfTensor<E>>>,
    grads: Option<&'a Gradients<E, Cpu>>,
    got_grads: Vec<Option<DfTensor<E>>>,
    unused: UnusedTensors,
    missing: Vec<String>,
}

fn structure_changed(at: usize, want: Option<&str>, got: &str) -> MgpoError {
    MgpoError::Corrupt(format!(
        "the model no longer has the structure the optimizer was built for: tensor {at} is `{got}`, expected {}",
        want.map_or("no more tensors".to_string(), |w| format!("`{w}`"))
    ))
}

fn next_role(plan: &Plan, pos: &mut usize, name: &str) -> Result<Role> {
    let at = *pos;
    match plan.visits.get(at) {
        Some((n, role)) if n == name => {
            *pos += 1;
            Ok(*role)
        }
        other => Err(structure_changed(at, other.map(|(n, _)| n.as_str()), name)),
    }
}

impl<E: Element> TensorVisitor<E, Cpu> for Gather<'_, E>
where
    Cpu: Device<E>,
{
    type Viewer = (ViewTensorMut, ViewTensorName);
    type Err = MgpoError;
    type E2 = E;
    type D2 = Cpu;

    fn visit<S: Shape>(&mut self, _: TensorOptions<S, E, Cpu>, (t, name): (&mut Tensor<S, E, Cpu>, String)) -> Result<Option<Tensor<S, E, Cpu>>> {
        match next_role(self.plan, &mut self.pos, &name)? {
            Role::Trainable(i) => {
                self.params[i] = Some(DfTensor::from_tensor(t)?);
                if let Some(grads) = self.grads {
                    // dfdx's `Gradients::get` unwraps a missing entry, and no
                    // public call tells whether one exists: a missing
                    // gradient is caught here and reported as unused.
                    match catch_unwind(AssertUnwindSafe(|| grads.get(&*t))) {
                        Ok(g) => self.got_grads[i] = Some(DfTensor::from_tensor(&g)?),
                        Err(_) => {
                            self.unused.add(&*t);
                            self.missing.push(name);
                        }
                    }
                }
            }
            Role::Scale(a) => {
                let info = &self.layout.adapters()[a];
                let now = t.as_vec().first().and_then(|x| x.to_f64()).unwrap_or(f64::NAN);
                if now != info.scale {
                    return Err(MgpoError::AdapterShape {
                        name: info.name.clone(),
                        detail: format!("scaling changed from {} to {now} since the optimizer was built: build a new one", info.scale),
                    });
                }
            }
            Role::Merged(a) if t.as_vec().iter().any(|&x| x != E::zero()) => {
                return Err(MgpoError::AdapterShape {
                    name: self.layout.adapters()[a].name.clone(),
                    detail: "the adapter is merged into its base weight: unmerge it before training".into(),
                });
            }
            _ => {}
        }
        Ok(None)
    }
}

/// Selects one tensor of a [`Factored`].
type Pick<E> = fn(&Factored<E>) -> &DfTensor<E>;

/// One scanned tensor: full name, shape, trained by dfdx, value if rank 0.
type Seen = (String, Vec<usize>, bool, Option<f64>);

/// Builds the role of a non-trainable tensor of adapter i.
type MakeRole = fn(usize) -> Role;

/// Parameters and gradients, in layout order.
type Gathered<E> = (Vec<DfTensor<E>>, Vec<DfTensor<E>>);

/// Writes the trainable tensors back into the model and sets (or clears)
/// the layers' factored perturbations.
struct Scatter<'a, E: Element> {
    plan: &'a Plan,
    pos: usize,
    params: &'a [DfTensor<E>],
    /// Per adapter; `None` entries clear that adapter's perturbation.
    factored: Option<&'a [Option<Factored<E>>]>,
    zero: DfTensor<E>,
}

impl<E: Element> TensorVisitor<E, Cpu> for Scatter<'_, E>
where
    Cpu: Device<E>,
{
    type Viewer = (ViewTensorMut, ViewTensorName);
    type Err = MgpoError;
    type E2 = E;
    type D2 = Cpu;

    fn visit<S: Shape>(&mut self, _: TensorOptions<S, E, Cpu>, (t, name): (&mut Tensor<S, E, Cpu>, String)) -> Result<Option<Tensor<S, E, Cpu>>> {
        let role = next_role(self.plan, &mut self.pos, &name)?;
        if let Role::Trainable(i) = role {
            return self.params[i].write_into(t).map(|_| None);
        }
        let Some(factored) = self.factored else { return Ok(None) };
        let (a, pick): (usize, Pick<E>) = match role {
            Role::Coef(a) => (a, |f| &f.coef),
            Role::Pa(a) => (a, |f| &f.a),
            Role::Pb(a) => (a, |f| &f.b),
            Role::Pma(a) => (a, |f| &f.ma),
            Role::Pmb(a) => (a, |f| &f.mb),
            _ => return Ok(None),
        };
        match factored.get(a).and_then(Option::as_ref) {
            Some(f) => pick(f).write_into(t)?,
            // Clearing: a zero coef switches the term off; the factors may stay.
            None if matches!(role, Role::Coef(_)) => self.zero.write_into(t)?,
            None => {}
        }
        Ok(None)
    }
}

impl<M, E> DfdxMgpo<M, E>
where
    E: Element,
    Cpu: Device<E>,
    M: TensorCollection<E, Cpu>,
{
    /// Builds the optimizer for `model` (module docs say which tensors it
    /// trains and which pairs it treats as adapters), on the model's device.
    pub fn new(model: &M, config: Config) -> Result<Self> {
        let mut scan = Scan::<E> { seen: Vec::new(), _e: PhantomData };
        M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut scan })?;
        let dev = find_device(model)?;
        let (plan, layout) = plan_of(&scan.seen, config.space)?;
        let opt = Mgpo::new(DfdxBackend::new(dev), config, layout)?;
        Ok(DfdxMgpo { opt, plan, last_report: None, last_error: None, unused: None, _model: PhantomData })
    }

    /// Adds this step's perturbation (SPEC step 1): to the trainable tensors
    /// in `adapter` space, or as each layer's factored eps_D in `weight`
    /// space. Call before the forward pass.
    pub fn perturb(&mut self, model: &mut M) -> Result<()> {
        let mut params = self.gather(model, None)?.0;
        self.opt.perturb(&mut params, &mut Vec::<DfTensor<E>>::new())?;
        let factored = if self.opt.config().space == Space::Weight { Some(self.factored(&params)?) } else { None };
        self.scatter(model, &params, Some(factored.as_deref().unwrap_or(&[])))
    }

    /// Removes the perturbation, if any, without a step (to evaluate, or to
    /// abandon a step).
    pub fn unperturb(&mut self, model: &mut M) -> Result<()> {
        let mut params = self.gather(model, None)?.0;
        self.opt.unperturb(&mut params, &mut Vec::<DfTensor<E>>::new())?;
        self.scatter(model, &params, Some(&[]))
    }

    /// One optimizer step from the gradients taken at the perturbed point
    /// (SPEC step 3): removes the perturbation, updates g_bar, clips, runs
    /// AdamW; a non-finite gradient makes it a no-op reported as skipped.
    /// The model is left clean.
    pub fn step(&mut self, model: &mut M, grads: &Gradients<E, Cpu>) -> Result<StepReport> {
        let (mut params, g) = self.gather(model, Some(grads))?;
        let report = self.opt.step(&mut params, &mut Vec::<DfTensor<E>>::new(), &g)?;
        self.scatter(model, &params, Some(&[]))?;
        Ok(report)
    }

    /// Sets the learning rate of the following steps (a schedule).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.opt.set_lr(lr)
    }

    /// The report of the last successful [`Optimizer::update`].
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last_report.as_ref()
    }

    /// The full error of the last failed [`Optimizer::update`] (dfdx's error
    /// type cannot carry it).
    pub fn last_error(&self) -> Option<&MgpoError> {
        self.last_error.as_ref()
    }

    /// The underlying mgpo-core optimizer: configuration, layout, state.
    pub fn mgpo(&self) -> &Mgpo<DfdxBackend<E>> {
        &self.opt
    }

    /// The model's name of each trainable tensor, in layout order.
    pub fn trainable_names(&self) -> &[String] {
        &self.plan.trainable_names
    }

    fn gather(&mut self, model: &mut M, grads: Option<&Gradients<E, Cpu>>) -> Result<Gathered<E>> {
        let n = self.plan.trainable_names.len();
        let mut g = Gather {
            plan: &self.plan,
            layout: self.opt.layout(),
            pos: 0,
            params: (0..n).map(|_| None).collect(),
            grads,
            got_grads: (0..n).map(|_| None).collect(),
            unused: UnusedTensors::default(),
            missing: Vec::new(),
        };
        M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut g })?;
        if g.pos != self.plan.visits.len() {
            return Err(structure_changed(g.pos, self.plan.visits.get(g.pos).map(|(n, _)| n.as_str()), "<end>"));
        }
        if let Some(name) = g.missing.first() {
            let e = MgpoError::MissingGradient(name.clone());
            self.unused = Some(g.unused);
            return Err(e);
        }
        let params: Vec<DfTensor<E>> = g.params.into_iter().collect::<Option<_>>().ok_or_else(|| structure_changed(n, None, "<end>"))?;
        let grads = if grads.is_some() {
            g.got_grads.into_iter().collect::<Option<_>>().ok_or_else(|| structure_changed(n, None, "<end>"))?
        } else {
            Vec::new()
        };
        Ok((params, grads))
    }

    fn scatter(&self, model: &mut M, params: &[DfTensor<E>], factored: Option<&[Option<Factored<E>>]>) -> Result<()> {
        let zero = self.opt.backend().from_f64(&[], &[0.0])?;
        let mut s = Scatter { plan: &self.plan, pos: 0, params, factored, zero };
        M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut s })?;
        Ok(())
    }

    /// Each adapter's eps_D = coef (m_B A + B m_A) as the layer applies it:
    /// coef, A_c = A, B_c = B, coef m_A, coef m_B.
    fn factored(&self, params: &[DfTensor<E>]) -> Result<Vec<Option<Factored<E>>>> {
        let be = self.opt.backend();
        let scaled = |m: &DfTensor<E>, c: f64| -> Result<DfTensor<E>> {
            let mut out = be.zeros_like(m)?;
            mgpo_core::FusedUpdate::axpy(be, &mut out, c, m)?;
            Ok(out)
        };
        let mut out = Vec::new();
        for (i, ad) in self.opt.layout().adapters().iter().enumerate() {
            out.push(match self.opt.weight_perturbation(i) {
                Some(wp) => Some(Factored {
                    coef: be.from_f64(&[], &[wp.coef])?,
                    a: params[ad.a].clone(),
                    b: params[ad.b].clone(),
                    ma: scaled(wp.m_a, wp.coef)?,
                    mb: scaled(wp.m_b, wp.coef)?,
                }),
                None => None,
            });
        }
        Ok(out)
    }
}

impl<M, E> Optimizer<M, Cpu, E> for DfdxMgpo<M, E>
where
    E: Element,
    Cpu: Device<E>,
    M: TensorCollection<E, Cpu>,
{
    /// [`DfdxMgpo::step`] in dfdx's terms. A trainable tensor without a
    /// gradient is reported as `UnusedParams` (nothing is changed); any
    /// other refusal as `DeviceError(WrongNumElements)`, with the full
    /// error in [`DfdxMgpo::last_error`].
    ///
    /// dfdx 0.13 can only tell a missing gradient by `Gradients::get`
    /// panicking; the panic is caught (its message still reaches stderr),
    /// so this needs the default `panic = "unwind"`. Gradients from
    /// `model.alloc_grads()` always hold every trainable tensor.
    fn update(&mut self, module: &mut M, gradients: &Gradients<E, Cpu>) -> std::result::Result<(), OptimizerUpdateError<CpuError>> {
        match self.step(module, gradients) {
            Ok(r) => {
                self.last_report = Some(r);
                self.last_error = None;
                Ok(())
            }
            Err(e) => {
                let out = match (&e, self.unused.take()) {
                    (MgpoError::MissingGradient(_), Some(unused)) => OptimizerUpdateError::UnusedParams(unused),
                    _ => OptimizerUpdateError::DeviceError(CpuError::WrongNumElements),
                };
                self.last_error = Some(e);
                Err(out)
            }
        }
    }
}

/// The device of the model's first tensor (a fresh CPU device if it has none).
fn find_device<M: TensorCollection<E, Cpu>, E: Element>(model: &M) -> Result<Cpu>
where
    Cpu: Device<E>,
{
    struct First(Option<Cpu>);
    impl<E: Element> TensorVisitor<E, Cpu> for First
    where
        Cpu: Device<E>,
    {
        type Viewer = ViewTensorRef;
        type Err = MgpoError;
        type E2 = E;
        type D2 = Cpu;
        fn visit<S: Shape>(&mut self, _: TensorOptions<S, E, Cpu>, t: &Tensor<S, E, Cpu>) -> Result<Option<Tensor<S, E, Cpu>>> {
            if self.0.is_none() {
                self.0 = Some(t.device().clone());
            }
            Ok(None)
        }
    }
    let mut f = First(None);
    M::iter_tensors(&mut RecursiveWalker { m: model, f: &mut f })?;
    Ok(f.0.unwrap_or_default())
}

/// The layout and walk plan of a scanned model.
fn plan_of(seen: &[Seen], space: Space) -> Result<(Plan, Layout)> {
    let find = |name: &str| seen.iter().find(|(n, ..)| n == name);
    // Adapter prefixes, in the order their first trainable tensor is met.
    let mut adapters: Vec<(String, f64, Vec<usize>, Vec<usize>)> = Vec::new();
    for (name, _, trainable, _) in seen {
        if !trainable {
            continue;
        }
        let Some(p) = prefix_of(name, names::A).or_else(|| prefix_of(name, names::B)) else { continue };
        if adapters.iter().any(|(q, ..)| q == p) {
            continue;
        }
        let (a, b, s) = (find(&format!("{p}{}", names::A)), find(&format!("{p}{}", names::B)), find(&format!("{p}{}", names::SCALE)));
        let (Some(a), Some(b), Some(s)) = (a, b, s) else { continue };
        let scale = match (a.2 && b.2, s.3) {
            (true, Some(v)) => v,
            _ => continue,
        };
        adapters.push((p.to_string(), scale, a.1.clone(), b.1.clone()));
    }
    let adapter_name = |p: &str| if p.is_empty() { "lora".to_string() } else { p.trim_end_matches('.').to_string() };

    let mut builder = Layout::builder();
    let mut registered = Vec::new();
    for (name, shape, trainable, _) in seen {
        if !trainable {
            continue;
        }
        let p = prefix_of(name, names::A).or_else(|| prefix_of(name, names::B));
        match p.and_then(|p| adapters.iter().find(|(q, ..)| q == p)) {
            Some((p, scale, a, b)) => {
                if !registered.contains(p) {
                    builder = builder.adapter_scaled(&adapter_name(p), *scale, a, b, false);
                    registered.push(p.clone());
                }
            }
            None => builder = builder.plain(name, shape),
        }
    }
    let layout = builder.build()?;

    let adapter_of = |p: &str| adapters.iter().position(|(q, ..)| q == p);
    let mut trainable_names = vec![String::new(); layout.tensors().len()];
    let mut visits = Vec::with_capacity(seen.len());
    let mut have_factors = vec![0u8; adapters.len()];
    for (name, _, trainable, _) in seen {
        let suffix_adapter = |suffix: &str| prefix_of(name, suffix).and_then(adapter_of);
        let role = if *trainable {
            let layout_name = match (suffix_adapter(names::A), suffix_adapter(names::B)) {
                (Some(i), _) => format!("{}.a", adapter_name(&adapters[i].0)),
                (_, Some(i)) => format!("{}.b", adapter_name(&adapters[i].0)),
                _ => name.clone(),
            };
            let li = layout.tensor_index(&layout_name)?;
            trainable_names[li] = name.clone();
            Role::Trainable(li)
        } else {
            const ROLES: [(&str, MakeRole); 7] = [
                (names::SCALE, Role::Scale),
                (names::MERGED, Role::Merged),
                (names::COEF, Role::Coef),
                (names::PA, Role::Pa),
                (names::PB, Role::Pb),
                (names::PMA, Role::Pma),
                (names::PMB, Role::Pmb),
            ];
            ROLES
                .iter()
                .find_map(|(suffix, make)| suffix_adapter(suffix).map(|i| (i, make(i))))
                .map_or(Role::Other, |(i, r)| {
                    if !matches!(r, Role::Scale(_) | Role::Merged(_)) {
                        have_factors[i] += 1;
                    }
                    r
                })
        };
        visits.push((name.clone(), role));
    }
    if space == Space::Weight {
        if let Some(i) = have_factors.iter().position(|&n| n != 5) {
            return Err(MgpoError::AdapterShape {
                name: adapter_name(&adapters[i].0),
                detail: "weight space needs the layer's factored perturbation tensors (mgpo_coef, mgpo_a, mgpo_b, mgpo_ma, mgpo_mb), as LoraLinear has".into(),
            });
        }
    }
    // Layout adapters are numbered in registration order, which is the order of `adapters`.
    debug_assert!(layout.adapters().iter().zip(&adapters).all(|(l, (p, ..))| l.name == adapter_name(p)));
    Ok((Plan { visits, trainable_names }, layout))
}
