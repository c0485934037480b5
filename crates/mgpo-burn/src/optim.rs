//! [`MgpoOptimizer`]: LoRA-MGPO as a burn module optimizer, the same
//! builder, names and accessors as the candle, tch and dfdx wrappers:
//!
//! ```text
//! let mut opt = MgpoOptimizer::builder(config).lora(&model.q).param_group_where(ParamGroup::no_decay(), is_bias_or_norm).build(&model)?;
//! loop {
//!     model = opt.perturb(model)?;                       // theta <- theta + eps_t (before the forward pass)
//!     let grads = GradientsParams::from_grads(loss.backward(), &model);
//!     model = opt.step(lr, model, grads)?;               // remove eps_t, AdamW
//! }
//! ```
//!
//! burn 0.22's `Optimizer` trait is per tensor (`step(lr, tensor, grad,
//! state)`, what `ModuleOptimizer` maps over a module one parameter at a
//! time) and `ModuleOptimizer` is a concrete type, not a trait: neither can
//! see MGPO's norms over all parameters (the momentum norm that scales the
//! perturbation, the gradient norm of g_bar and of clipping). So this is a
//! standalone optimizer with `ModuleOptimizer`'s shape: `step(lr, module,
//! GradientsParams) -> module`, the module moved through it as a value,
//! parameters matched by [`ParamId`] and named by their module path (the
//! names of checkpoints, of parameter groups and of errors). Its record is
//! mgpo-core's checkpoint (`save_checkpoint` / `load_checkpoint`, through
//! `Deref`), so a checkpoint moves between burn and the other frameworks;
//! burn's `OptimizerRecord` keys state by `ParamId` and rank only and
//! could not.
//!
//! Gradient accumulation is burn's own: perturb once, sum the k
//! micro-batches' gradients (each loss divided by k) with
//! `burn::optim::GradientsAccumulator` at the perturbed point, step once.
//!
//! Each call takes the registered parameters out of the module (a
//! zero-element tensor holds each place meanwhile), so the optimizer holds
//! the only handle on their memory and the host kernels update them in
//! place; it puts them back with their autodiff state (gradient
//! requirement, checkpointing strategy) as burn's optimizers do.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};

use burn::module::{Module, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use mgpo_core::{Config, FactoredPerturbation, Layout, LayoutBuilder, Mgpo, MgpoError, ParamGroup, Result};

use crate::backend::{BurnBackend, BurnTensor};
use crate::lora::{LoraLinear, Slot};
use crate::walk::{Collect, Context, PutBack, Seen, TakeOut};

/// A call that failed, with the module it was given, back as it was
/// (parameters clean, optimizer state as before the call): burn moves
/// modules by value, so an error must hand the module back.
#[derive(Debug)]
pub struct Failed<M> {
    /// The module, clean.
    pub module: M,
    /// Why the call failed.
    pub error: MgpoError,
}

impl<M> std::fmt::Display for Failed<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<M: std::fmt::Debug> std::error::Error for Failed<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<M> From<Failed<M>> for MgpoError {
    fn from(f: Failed<M>) -> MgpoError {
        f.error
    }
}

/// An adapter registered by the ids of its A (r x in) and B (out x r).
#[derive(Debug, Clone)]
struct AdapterReg {
    a: ParamId,
    b: ParamId,
    scale: f64,
    slot: Option<Slot>,
}

/// Registers adapters and parameter groups; [`MgpoBuilder::build`] finds
/// every trainable parameter of the module. See [`MgpoOptimizer::builder`].
#[derive(Debug)]
pub struct MgpoBuilder {
    config: Config,
    layout: LayoutBuilder,
    adapters: Vec<AdapterReg>,
    backend: Option<BurnBackend>,
}

impl MgpoBuilder {
    /// The adapter of a [`LoraLinear`]: in `weight` space the layer adds
    /// the perturbation in factored form and W0 is never written.
    pub fn lora(mut self, layer: &LoraLinear) -> Self {
        self.adapters.push(AdapterReg { a: layer.lora_a.id, b: layer.lora_b.id, scale: layer.scale(), slot: Some(layer.slot().clone()) });
        self
    }

    /// [`MgpoBuilder::lora`] for each layer.
    pub fn loras<'a>(self, layers: impl IntoIterator<Item = &'a LoraLinear>) -> Self {
        layers.into_iter().fold(self, |b, l| b.lora(l))
    }

    /// An adapter y = W0 x + s B (A x) of the caller's own layer, A r x in
    /// and B out x r. In `weight` space its forward pass must add the
    /// perturbation read from [`MgpoOptimizer::weight_perturbation`].
    pub fn adapter(mut self, a: &Param<Tensor<2>>, b: &Param<Tensor<2>>, scale: f64) -> Self {
        self.adapters.push(AdapterReg { a: a.id, b: b.id, scale, slot: None });
        self
    }

    /// A parameter group (its own learning-rate multiplier and weight decay)
    /// of the named tensors (module paths: `{adapter}.a`, `{adapter}.b`,
    /// `head.bias`).
    pub fn param_group(mut self, group: ParamGroup, tensors: &[&str]) -> Self {
        self.layout = self.layout.param_group(group, tensors);
        self
    }

    /// A parameter group of the tensors whose names satisfy `pred`, e.g.
    /// `param_group_where(ParamGroup::no_decay(), mgpo_core::is_bias_or_norm)`
    /// (burn's `LayerNorm` parameters are `{path}.gamma` and `{path}.beta`
    /// under a field whose name the predicate must then recognise).
    pub fn param_group_where(mut self, group: ParamGroup, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.layout = self.layout.param_group_where(group, pred);
        self
    }

    /// Overrides the backend (its `par_threshold` or `host_kernels`); by
    /// default the device and dtype of the first trainable parameter.
    pub fn backend(mut self, backend: BurnBackend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The optimizer of `module`'s trainable parameters (those that require
    /// a gradient, so build it from the model on its autodiff device):
    /// every registered adapter's A and B, and every other trainable
    /// parameter as a plain tensor, in the module's order. Tensors are
    /// named by module path (`{path}.a` / `{path}.b` for an adapter whose
    /// A is at `{path}.lora_a`).
    pub fn build<M: Module>(self, module: &M) -> Result<MgpoOptimizer> {
        let mut v = Collect::default();
        module.visit(&mut v);
        let trainable: Vec<&Seen> = v.seen.iter().filter(|s| s.trainable).collect();
        let find = |id: ParamId| trainable.iter().position(|s| s.id == id);
        let mut adapter_of: HashMap<ParamId, usize> = HashMap::new();
        for (k, ad) in self.adapters.iter().enumerate() {
            for id in [ad.a, ad.b] {
                if find(id).is_none() {
                    return Err(MgpoError::UnknownName(format!("adapter parameter {id} is not a trainable parameter of the module")));
                }
                if adapter_of.insert(id, k).is_some() {
                    return Err(MgpoError::DuplicateName(format!("parameter {id} registered in two adapters")));
                }
            }
        }
        let mut layout = self.layout;
        let mut ids = Vec::new();
        let mut slots = Vec::new();
        let mut pushed = vec![false; self.adapters.len()];
        for s in &trainable {
            match adapter_of.get(&s.id) {
                Some(&k) if pushed[k] => {}
                Some(&k) => {
                    pushed[k] = true;
                    let ad = &self.adapters[k];
                    let (a, b) = (trainable[find(ad.a).unwrap_or(0)], trainable[find(ad.b).unwrap_or(0)]);
                    let name = a.path.strip_suffix(".lora_a").or_else(|| a.path.rsplit_once('.').map(|x| x.0)).unwrap_or(&a.path);
                    layout = layout.adapter_scaled(name, ad.scale, &a.shape, &b.shape, false);
                    ids.extend([ad.a, ad.b]);
                    slots.push(ad.slot.clone());
                }
                None => {
                    layout = layout.plain(&s.path, &s.shape);
                    ids.push(s.id);
                }
            }
        }
        let layout = layout.build()?;
        let first = trainable.first().ok_or(MgpoError::Empty)?;
        if let Some(s) = trainable.iter().find(|s| s.dtype != first.dtype) {
            return Err(MgpoError::Backend(format!("all trainable parameters must share one dtype: {} is {:?}, {} is {:?}", first.path, first.dtype, s.path, s.dtype)));
        }
        let backend = self.backend.unwrap_or_else(|| BurnBackend::new(first.device.clone(), first.dtype));
        let names = layout.names().map(str::to_string).collect();
        let mgpo = Mgpo::new(backend, self.config, layout)?;
        let index = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        Ok(MgpoOptimizer { mgpo, ids, names, index, slots })
    }
}

/// LoRA-MGPO over a burn module. Build it with [`MgpoOptimizer::builder`]
/// (`.lora(&layer)` per adapter, parameter groups, then `.build(&model)`)
/// or, with every trainable parameter a plain tensor, [`MgpoOptimizer::new`].
///
/// Dereferences to its [`Mgpo`]: `lr`, `set_lr` (validated at once),
/// `config`, `layout`, `state`, `last_report`, `is_perturbed`,
/// `save_checkpoint`, `load_checkpoint` are the core's, the same in every
/// framework.
pub struct MgpoOptimizer {
    mgpo: Mgpo<BurnBackend>,
    /// The trainable parameters, in layout order.
    ids: Vec<ParamId>,
    /// Their layout names, which the core checks on every call.
    names: Vec<String>,
    index: HashMap<ParamId, usize>,
    /// Per adapter: where its layer reads the factored weight-space perturbation.
    slots: Vec<Option<Slot>>,
}

impl std::fmt::Debug for MgpoOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MgpoOptimizer").field("config", self.config()).field("layout", self.layout()).field("step", &self.state().step).field("perturbed", &self.is_perturbed()).finish()
    }
}

impl Deref for MgpoOptimizer {
    type Target = Mgpo<BurnBackend>;
    fn deref(&self) -> &Mgpo<BurnBackend> {
        &self.mgpo
    }
}

impl DerefMut for MgpoOptimizer {
    fn deref_mut(&mut self) -> &mut Mgpo<BurnBackend> {
        &mut self.mgpo
    }
}

/// Parameters taken out of a module, in layout order, with their contexts.
struct Taken {
    params: Vec<BurnTensor>,
    ctx: Vec<Context>,
    grads: Vec<Option<BurnTensor>>,
}

/// `values` paired with their layout names, as the core takes them.
fn named<'a, T>(names: &'a [String], values: Vec<T>) -> Vec<(&'a str, T)> {
    names.iter().map(String::as_str).zip(values).collect()
}

impl MgpoOptimizer {
    /// Starts registering adapters and parameter groups.
    pub fn builder(config: Config) -> MgpoBuilder {
        MgpoBuilder { config, layout: Layout::builder(), adapters: Vec::new(), backend: None }
    }

    /// Every trainable parameter of `module` as a plain tensor (no
    /// adapters: adapter space only, or plain AdamW with `Config::adamw`).
    pub fn new<M: Module>(module: &M, config: Config) -> Result<Self> {
        Self::builder(config).build(module)
    }

    /// The registered parameters of `module`, taken out, with their
    /// gradients from `grads` when given. When one is missing, everything
    /// taken is put back and the module is returned in the error.
    fn take_out<M: Module>(&self, module: M, grads: Option<&mut GradientsParams>) -> std::result::Result<(M, Taken), Failed<M>> {
        let n = self.ids.len();
        let mut t = TakeOut { index: &self.index, params: vec![None; n], grads: grads.map(|g| (g, vec![None; n])) };
        let module = module.map(&mut t);
        let grads = t.grads.map(|g| g.1).unwrap_or_default();
        if let Some(i) = t.params.iter().position(Option::is_none) {
            let error = MgpoError::UnknownName(format!("{} (parameter {}) is not in the module", self.names[i], self.ids[i]));
            let module = module.map(&mut PutBack { index: &self.index, values: t.params });
            return Err(Failed { module, error });
        }
        let (params, ctx) = t.params.into_iter().flatten().unzip();
        Ok((module, Taken { params, ctx, grads }))
    }

    fn put_back<M: Module>(&self, module: M, tensors: Vec<(&str, BurnTensor)>, ctx: Vec<Context>) -> M {
        let values = tensors.into_iter().zip(ctx).map(|((_, t), c)| Some((t, c))).collect();
        module.map(&mut PutBack { index: &self.index, values })
    }

    /// Adds the perturbation eps_t computed from the previous step's
    /// momentum ([the spec](mgpo_core::spec), step 1); call before the forward pass.
    /// Adapter space: the parameters move; weight space: each
    /// [`LoraLinear`] registered with [`MgpoBuilder::lora`] adds it in
    /// factored form, W0 untouched.
    pub fn perturb<M: Module>(&mut self, module: M) -> std::result::Result<M, Failed<M>> {
        let (module, Taken { params, ctx, .. }) = self.take_out(module, None)?;
        let mut tensors = named(&self.names, params);
        let r = self.mgpo.perturb(&mut tensors);
        let module = self.put_back(module, tensors, ctx);
        match r {
            Ok(()) => {
                self.publish();
                Ok(module)
            }
            Err(error) => Err(Failed { module, error }),
        }
    }

    /// Removes the perturbation and, unless a gradient is non-finite, runs
    /// the step ([the spec](mgpo_core::spec), step 3) at learning rate `lr` (as burn's
    /// optimizers take it; it becomes [`Mgpo::lr`]) with `grads`, taken at
    /// the perturbed point. A registered parameter without a gradient is
    /// [`MgpoError::MissingGradient`] naming it. On any error the
    /// parameters come back clean and the state as before; a module that
    /// lacks a registered parameter is refused before anything changes
    /// (the optimizer stays perturbed until `step` or `unperturb` get the
    /// module it perturbed).
    pub fn step<M: Module>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> std::result::Result<M, Failed<M>> {
        let (module, Taken { params, ctx, grads }) = self.take_out(module, Some(&mut grads))?;
        // Dropping the layers' handles on m first lets AdamW write m in place.
        self.clear_slots();
        let mut tensors = named(&self.names, params);
        let grads = named(&self.names, grads);
        let r = self.mgpo.set_lr(lr).and_then(|()| self.mgpo.step(&mut tensors, &grads));
        let r = match r {
            Err(e) if self.mgpo.is_perturbed() => self.mgpo.unperturb(&mut tensors).and(Err(e)),
            r => r,
        };
        let module = self.put_back(module, tensors, ctx);
        match r {
            Ok(_) => Ok(module),
            Err(error) => Err(Failed { module, error }),
        }
    }

    /// Removes the perturbation without a step (to evaluate, or to abandon
    /// a step whose backward pass failed).
    pub fn unperturb<M: Module>(&mut self, module: M) -> std::result::Result<M, Failed<M>> {
        let (module, Taken { params, ctx, .. }) = self.take_out(module, None)?;
        self.clear_slots();
        let mut tensors = named(&self.names, params);
        let r = self.mgpo.unperturb(&mut tensors);
        let module = self.put_back(module, tensors, ctx);
        match r {
            Ok(()) => Ok(module),
            Err(error) => Err(Failed { module, error }),
        }
    }

    fn publish(&self) {
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot {
                slot.set(self.weight_perturbation_at(i));
            }
        }
    }

    /// Empties the layers' slots, which also drops their handles on the
    /// first moments (so the step updates m in place, unshared).
    fn clear_slots(&self) {
        for s in self.slots.iter().flatten() {
            s.set(None);
        }
    }

    fn weight_perturbation_at(&self, i: usize) -> Option<FactoredPerturbation<Tensor<2>>> {
        let w = self.mgpo.weight_perturbation(i)?;
        let (m_b, m_a) = (w.m_b.clone().into_tensor::<2>().ok()?, w.m_a.clone().into_tensor::<2>().ok()?);
        Some(FactoredPerturbation { coef: w.coef, m_b, m_a })
    }

    /// The factored weight-space perturbation of adapter `name` now applied
    /// (between `perturb` and `step`, `weight` space): the adapter's
    /// forward pass must add `coef * (m_b (A x) + B (m_a x))` with A, B
    /// detached. [`LoraLinear`] layers registered with
    /// [`MgpoBuilder::lora`] do so themselves.
    pub fn weight_perturbation(&self, name: &str) -> Result<Option<FactoredPerturbation<Tensor<2>>>> {
        Ok(self.weight_perturbation_at(self.mgpo.layout().adapter_index(name)?))
    }

    /// The parameters the optimizer updates, in layout order.
    pub fn param_ids(&self) -> &[ParamId] {
        &self.ids
    }
}
