//! A dfdx model as the named tensors of mgpo-core, through dfdx's
//! `TensorCollection` visitor.
//!
//! Every tensor that dfdx would train (`do_gradient_update`) is a trainable
//! tensor of the [`Layout`], in walk order. A trainable pair `P.lora_a`,
//! `P.lora_b` beside a rank-0 `P.lora_scale` (as in [`crate::LoraLinear`])
//! is adapter `P` with that scaling, its tensors named `P.a` and `P.b` in
//! the layout (`lora` when `P` is empty); any other trainable tensor (a
//! classifier head, say) is a plain tensor under its dfdx name. Those are
//! the names the core checks on every call, parameter groups select, and
//! errors and checkpoints use. The frozen base weights are never
//! registered: in `weight` space each layer receives the perturbation in
//! factored form, in its `P.mgpo_*` tensors.
//!
//! dfdx 0.13 offers no view of a tensor's storage, so each walk copies the
//! trainable tensors into buffers kept here, and back, as dense row-major
//! data (which is how dfdx allocates module tensors and gradients).
//!
//! A missing gradient: `Gradients::get` panics on a tensor it does not
//! hold, and the test dfdx's own optimizers make (`get_ref_checked`) is
//! private to dfdx; its one public answer is theirs, `UnusedParams`. So
//! before reading a gradient the walk lets dfdx's `Sgd` with learning rate 0
//! visit a clone of the tensor (same id, so the same gradient; its write
//! lands in the clone's own copy, which is dropped): a tensor it reports
//! unused is a [`MgpoError::MissingGradient`]. That costs, per trainable
//! tensor and step, one copy, one zero-filled buffer (SGD's velocity) and
//! one pass, allocated afresh unless the device's cache is enabled
//! (`dfdx::tensor::Cache::enable_cache`).

use dfdx::nn::tensor_collection::{RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorName, ViewTensorRef};
use dfdx::optim::{Sgd, UnusedTensors};
use dfdx::prelude::{Cpu, CpuError, Device, Gradients, HasShape, SgdConfig, Shape, Tensor};
use mgpo_core::{Layout, LayoutBuilder, Mgpo, MgpoError, Result, Space};

use crate::backend::{DfTensor, DfdxBackend, Element};
use crate::lora::names;

/// What a walk does with one tensor of the model.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Trainable tensor with this index in the layout.
    Trainable(usize),
    /// Rank-0 scaling of adapter i.
    Scale(usize),
    /// Rank-0 merged flag of adapter i.
    Merged(usize),
    /// Tensor k of [`names::FACTORS`] of adapter i.
    Factor(usize, usize),
    Other,
}

/// What a read walk found besides the tensors; reset by each read.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// The first refusal that still lets the walk go on (the model is then
    /// read whole, so a perturbation can be removed).
    pub(crate) error: Option<MgpoError>,
    /// The trainable tensors without a gradient, and all of them, for dfdx's `UnusedParams`.
    pub(crate) missing: UnusedTensors,
    pub(crate) all: UnusedTensors,
    /// A failure of the dfdx device.
    pub(crate) device: Option<CpuError>,
}

/// The model's tensors as the optimizer sees them: the walk plan, the
/// buffers the trainable tensors and their gradients are copied into, and
/// what the last read found.
pub(crate) struct ModelTensors<E: Element> {
    /// Full dfdx name and role of every tensor of the model, in walk order.
    visits: Vec<(String, Role)>,
    /// The trainable tensors and their gradients by layout name.
    pub(crate) params: Vec<(String, DfTensor<E>)>,
    pub(crate) grads: Vec<(String, DfTensor<E>)>,
    pub(crate) found: Found,
}

impl<E: Element> ModelTensors<E>
where
    Cpu: Device<E>,
{
    /// Scans `model`: its tensors, the layout of its trainable ones (with
    /// the parameter groups of `lb`), and its device.
    pub(crate) fn scan<M: TensorCollection<E, Cpu>>(model: &M, space: Space, lb: LayoutBuilder) -> Result<(Self, Layout, Cpu)> {
        let mut scan = Scan { seen: Vec::new(), dev: None };
        M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut scan })?;
        let (visits, layout) = plan(&scan.seen, space, lb)?;
        let dev = scan.dev.unwrap_or_default();
        let buffers = || -> Result<Vec<(String, DfTensor<E>)>> { layout.tensors().iter().map(|t| Ok((t.name.clone(), DfTensor::zeros(&dev, &t.shape)?))).collect() };
        let (params, grads) = (buffers()?, buffers()?);
        Ok((ModelTensors { visits, params, grads, found: Found::default() }, layout, dev))
    }

    /// Copies the trainable tensors (and, given them, their gradients) into
    /// the buffers; checks the adapters' scaling and merged flag.
    pub(crate) fn read<M: TensorCollection<E, Cpu>>(&mut self, model: &mut M, grads: Option<&Gradients<E, Cpu>>, mgpo: &Mgpo<DfdxBackend<E>>) -> Result<()> {
        self.found = Found::default();
        self.walk(model, grads, mgpo, false)
    }

    /// Writes the buffers back into the model, with each adapter's factored
    /// perturbation now applied (or none).
    pub(crate) fn write<M: TensorCollection<E, Cpu>>(&mut self, model: &mut M, mgpo: &Mgpo<DfdxBackend<E>>) -> Result<()> {
        self.walk(model, None, mgpo, true)
    }

    fn walk<M: TensorCollection<E, Cpu>>(&mut self, model: &mut M, src: Option<&Gradients<E, Cpu>>, mgpo: &Mgpo<DfdxBackend<E>>, write: bool) -> Result<()> {
        let oracle = Sgd::new(&(), SgdConfig { lr: 0.0, momentum: None, weight_decay: None });
        let ModelTensors { visits, params, grads, found } = self;
        let mut w = Walk { visits, pos: 0, mgpo, params, grads, src, oracle, found, write };
        M::iter_tensors(&mut RecursiveWalker { m: (model, String::new()), f: &mut w })?;
        match visits.get(w.pos) {
            None => Ok(()),
            Some((want, _)) => Err(structure_changed(w.pos, Some(want), "<end>")),
        }
    }
}

fn structure_changed(at: usize, want: Option<&str>, got: &str) -> MgpoError {
    let want = want.map_or("no more tensors".to_string(), |w| format!("`{w}`"));
    MgpoError::Corrupt(format!("the model no longer has the structure the optimizer was built for: tensor {at} is `{got}`, expected {want}"))
}

/// The value of a rank-0 tensor.
fn value<S: Shape, E: Element>(t: &Tensor<S, E, Cpu>) -> f64 {
    t.as_vec().first().and_then(|x| x.to_f64()).unwrap_or(f64::NAN)
}

/// One tensor of the model as the builder met it.
struct Seen {
    name: String,
    shape: Vec<usize>,
    trainable: bool,
    /// The value of a rank-0 tensor, NaN otherwise.
    value: f64,
}

/// Records every tensor of the model, and its device.
struct Scan {
    seen: Vec<Seen>,
    dev: Option<Cpu>,
}

impl<E: Element> TensorVisitor<E, Cpu> for Scan
where
    Cpu: Device<E>,
{
    type Viewer = (ViewTensorRef, ViewTensorName);
    type Err = MgpoError;
    type E2 = E;
    type D2 = Cpu;

    fn visit<S: Shape>(&mut self, opts: TensorOptions<S, E, Cpu>, (t, name): (&Tensor<S, E, Cpu>, String)) -> Result<Option<Tensor<S, E, Cpu>>> {
        let shape: Vec<usize> = t.shape().concrete().into();
        let value = if shape.is_empty() { value(t) } else { f64::NAN };
        self.dev.get_or_insert_with(|| t.device().clone());
        self.seen.push(Seen { name, shape, trainable: opts.do_gradient_update, value });
        Ok(None)
    }
}

/// `name` is `P` + `suffix` with `P` empty or ending in '.': returns `P`.
fn prefix_of<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let p = name.strip_suffix(suffix)?;
    (p.is_empty() || p.ends_with('.')).then_some(p)
}

fn adapter_name(p: &str) -> String {
    if p.is_empty() { "lora".into() } else { p.trim_end_matches('.').into() }
}

fn find<'s>(seen: &'s [Seen], p: &str, suffix: &str) -> Option<&'s Seen> {
    seen.iter().find(|s| s.name.strip_prefix(p).is_some_and(|rest| rest == suffix))
}

/// `P` if `name` is `P.lora_a` or `P.lora_b` of an adapter: both trainable, beside a rank-0 `P.lora_scale`.
fn adapter_prefix<'a>(seen: &[Seen], name: &'a str) -> Option<&'a str> {
    let p = prefix_of(name, names::A).or_else(|| prefix_of(name, names::B))?;
    match (find(seen, p, names::A), find(seen, p, names::B), find(seen, p, names::SCALE)) {
        (Some(a), Some(b), Some(s)) if a.trainable && b.trainable && s.shape.is_empty() => Some(p),
        _ => None,
    }
}

/// The walk plan and layout of a scanned model (module docs).
fn plan(seen: &[Seen], space: Space, mut lb: LayoutBuilder) -> Result<(Vec<(String, Role)>, Layout)> {
    let find = |p: &str, suffix: &str| find(seen, p, suffix);
    let adapter_of = |name| adapter_prefix(seen, name);
    let mut prefixes: Vec<&str> = Vec::new();
    for s in seen.iter().filter(|s| s.trainable) {
        match adapter_of(&s.name) {
            Some(p) if prefixes.contains(&p) => {}
            Some(p) => {
                let (a, b, scale) = (find(p, names::A), find(p, names::B), find(p, names::SCALE));
                let shape = |t: Option<&Seen>| t.map(|t| t.shape.clone()).unwrap_or_default();
                lb = lb.adapter_scaled(&adapter_name(p), scale.map_or(f64::NAN, |s| s.value), &shape(a), &shape(b), false);
                prefixes.push(p);
            }
            None => lb = lb.plain(&s.name, &s.shape),
        }
    }
    let layout = lb.build()?;
    let mut factors = vec![0; prefixes.len()];
    let mut visits = Vec::with_capacity(seen.len());
    for s in seen {
        let of = |suffix: &str| prefix_of(&s.name, suffix).and_then(|p| prefixes.iter().position(|q| *q == p));
        // Tensor k of FACTORS must have the shape of: nothing (coef), A, B, A, B.
        let fits = |k: usize, i: usize| {
            let ad = &layout.adapters()[i];
            s.shape == [vec![], layout.tensors()[ad.a].shape.clone(), layout.tensors()[ad.b].shape.clone()][[0, 1, 2, 1, 2][k]]
        };
        let role = match (s.trainable, adapter_of(&s.name).and_then(|p| prefixes.iter().position(|q| *q == p))) {
            (true, Some(i)) => Role::Trainable(layout.tensor_index(&format!("{}.{}", adapter_name(prefixes[i]), if of(names::A).is_some() { "a" } else { "b" }))?),
            (true, None) => Role::Trainable(layout.tensor_index(&s.name)?),
            _ if s.shape.is_empty() && of(names::SCALE).is_some() => Role::Scale(of(names::SCALE).unwrap_or(0)),
            _ if s.shape.is_empty() && of(names::MERGED).is_some() => Role::Merged(of(names::MERGED).unwrap_or(0)),
            _ => match names::FACTORS.iter().enumerate().find_map(|(k, f)| of(f).filter(|&i| fits(k, i)).map(|i| (i, k))) {
                Some((i, k)) => {
                    factors[i] += 1;
                    Role::Factor(i, k)
                }
                None => Role::Other,
            },
        };
        visits.push((s.name.clone(), role));
    }
    if let (Space::Weight, Some(i)) = (space, factors.iter().position(|&n| n != names::FACTORS.len())) {
        let detail = "weight space needs the layer's factored perturbation tensors (mgpo_coef, mgpo_a, mgpo_b, mgpo_ma, mgpo_mb), as LoraLinear has";
        return Err(MgpoError::AdapterShape { name: adapter_name(prefixes[i]), detail: detail.into() });
    }
    Ok((visits, layout))
}

/// One pass over the model in the order of the plan (see `MgpoOptimizer::walk`).
struct Walk<'a, E: Element> {
    visits: &'a [(String, Role)],
    pos: usize,
    mgpo: &'a Mgpo<DfdxBackend<E>>,
    params: &'a mut [(String, DfTensor<E>)],
    grads: &'a mut [(String, DfTensor<E>)],
    src: Option<&'a Gradients<E, Cpu>>,
    /// Tells whether a gradient exists (module docs).
    oracle: Sgd<(), E, Cpu>,
    found: &'a mut Found,
    write: bool,
}

impl<E: Element> TensorVisitor<E, Cpu> for Walk<'_, E>
where
    Cpu: Device<E>,
{
    type Viewer = (ViewTensorMut, ViewTensorName);
    type Err = MgpoError;
    type E2 = E;
    type D2 = Cpu;

    fn visit<S: Shape>(&mut self, opts: TensorOptions<S, E, Cpu>, (t, name): (&mut Tensor<S, E, Cpu>, String)) -> Result<Option<Tensor<S, E, Cpu>>> {
        let role = match self.visits.get(self.pos) {
            Some((n, role)) if *n == name => *role,
            other => return Err(structure_changed(self.pos, other.map(|v| v.0.as_str()), &name)),
        };
        self.pos += 1;
        let adapters = self.mgpo.layout().adapters();
        match (role, self.write) {
            (Role::Trainable(i), true) => self.params[i].1.write_into(t)?,
            (Role::Factor(a, k), true) => {
                let (ad, wp) = (&adapters[a], self.mgpo.weight_perturbation(a));
                match (k, wp) {
                    (0, wp) => t.copy_from(&[E::from(wp.map_or(0.0, |w| w.coef)).unwrap_or_else(E::nan)]),
                    (_, None) => {}
                    (1, _) => self.params[ad.a].1.write_into(t)?,
                    (2, _) => self.params[ad.b].1.write_into(t)?,
                    (3, Some(wp)) => wp.m_a.write_into(t)?,
                    (_, Some(wp)) => wp.m_b.write_into(t)?,
                }
            }
            (Role::Trainable(i), false) => {
                let (got, (name, buf)): (Vec<usize>, _) = (t.shape().concrete().into(), &mut self.params[i]);
                if got != buf.shape() {
                    return Err(MgpoError::ShapeMismatch { name: name.clone(), expected: buf.shape().to_vec(), got });
                }
                buf.read_from(t)?;
                if let Some(src) = self.src {
                    let mut probe = t.clone();
                    let mut ask = (&mut self.oracle, src, UnusedTensors::default());
                    if let Err(e) = ask.visit(opts, &mut probe) {
                        self.found.device = Some(e);
                        return Err(MgpoError::Backend(format!("dfdx: {e}")));
                    }
                    self.found.all.add(&*t);
                    if ask.2.is_empty() {
                        self.grads[i].1.read_from(&src.get(&*t))?;
                    } else {
                        self.found.missing.add(&*t);
                        self.found.error.get_or_insert_with(|| MgpoError::MissingGradient(self.params[i].0.clone()));
                    }
                }
            }
            (Role::Scale(a), false) if value(t) != adapters[a].scale => {
                let detail = format!("scaling changed from {} to {} since the optimizer was built: build a new one", adapters[a].scale, value(t));
                self.found.error.get_or_insert(MgpoError::AdapterShape { name: adapters[a].name.clone(), detail });
            }
            (Role::Merged(a), false) if value(t) != 0.0 => {
                let detail = "the adapter is merged into its base weight: unmerge it before training".into();
                self.found.error.get_or_insert(MgpoError::AdapterShape { name: adapters[a].name.clone(), detail });
            }
            _ => {}
        }
        Ok(None)
    }
}
