//! [`MgpoOptimizer`]: LoRA-MGPO as a burn module optimizer.
//!
//! ```text
//! model = opt.perturb(model)?;                        // theta <- theta + eps_t (before the forward pass)
//! let grads = GradientsParams::from_grads(loss.backward(), &model);
//! model = opt.step(lr, model, grads)?;                // remove eps_t, AdamW
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
//! names of checkpoints). Its record is mgpo-core's checkpoint format
//! (safetensors), so a checkpoint moves between burn and the other
//! frameworks; burn's burnpack `OptimizerRecord` keys state by `ParamId`
//! and rank only and could not.
//!
//! Each call takes the registered parameters out of the module (a
//! zero-element tensor holds each place meanwhile), so the optimizer holds
//! the only handle on their memory and the host kernels update them in
//! place; it puts them back with their autodiff state (gradient
//! requirement, checkpointing strategy) as burn's optimizers do.
//!
//! Every call into `mgpo_core::Mgpo` is in this module.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{FloatDType, GradientCheckpointingStrategy, Tensor};
use mgpo_core::{Config, Layout, LayoutBuilder, MgpoError, NoFrozen, Result, State, StepReport};

use crate::backend::{BurnBackend, BurnTensor};
use crate::lora::{FactoredPerturbation, LoraLinear, PerturbationSlot};

/// A call that failed, with the module it was given, back as it was
/// (parameters clean, optimizer state as before the call).
#[derive(Debug)]
pub struct Failed<M> {
    pub module: M,
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
    slot: Option<PerturbationSlot>,
}

/// Registers adapters; [`MgpoBuilder::build`] finds every trainable
/// parameter of the module. See [`MgpoOptimizer::builder`].
#[derive(Debug)]
pub struct MgpoBuilder {
    config: Config,
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
        let mut layout = Layout::builder();
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
                    let name = a.path.strip_suffix(".lora_a").or_else(|| a.path.rsplit_once('.').map(|x| x.0)).unwrap_or(&a.path).to_string();
                    layout = add_adapter(layout, &name, ad.scale, a, b);
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
        let mgpo = mgpo_core::Mgpo::new(backend, self.config, layout)?;
        let index = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        Ok(MgpoOptimizer { mgpo, ids, index, slots, last_report: None })
    }
}

fn add_adapter(layout: LayoutBuilder, name: &str, scale: f64, a: &Seen, b: &Seen) -> LayoutBuilder {
    layout.adapter_scaled(name, scale, &a.shape, &b.shape, false)
}

/// A float parameter met by [`Collect`].
#[derive(Debug)]
struct Seen {
    id: ParamId,
    path: String,
    shape: Vec<usize>,
    trainable: bool,
    dtype: FloatDType,
    device: burn::tensor::Device,
}

/// Lists a module's float parameters with their module paths.
#[derive(Default)]
struct Collect {
    path: Vec<String>,
    seen: Vec<Seen>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.seen.push(Seen {
            id: param.id,
            path: self.path.join("."),
            shape: t.dims().to_vec(),
            trainable: t.is_require_grad(),
            dtype: FloatDType::from(t.dtype()),
            device: t.device(),
        });
    }
}

/// The autodiff state of a parameter taken out of its module, put back on
/// its updated value (as burn-optim's `ParameterContext`).
#[derive(Debug, Clone, Copy)]
struct Context {
    autodiff: bool,
    require_grad: bool,
    checkpointing: Option<GradientCheckpointingStrategy>,
}

impl Context {
    fn capture<const D: usize>(t: &Tensor<D>) -> Self {
        Context { autodiff: t.is_autodiff(), require_grad: t.is_require_grad(), checkpointing: t.gradient_checkpointing_strategy() }
    }

    fn restore<const D: usize>(self, t: Tensor<D>) -> Tensor<D> {
        if !self.autodiff {
            return t;
        }
        let mut t = Tensor::from_inner(t);
        if let Some(s) = self.checkpointing {
            t = t.with_gradient_checkpointing_strategy(s);
        }
        if self.require_grad {
            t = t.require_grad();
        }
        t
    }
}

/// Takes the registered parameters (and their gradients) out of a module.
struct TakeOut<'a> {
    index: &'a HashMap<ParamId, usize>,
    params: Vec<Option<(BurnTensor, Context)>>,
    grads: Option<(&'a mut GradientsParams, Vec<Option<BurnTensor>>)>,
}

impl ModuleMapper for TakeOut<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(&i) = self.index.get(&param.id) else { return param };
        if self.params[i].is_some() {
            return param;
        }
        let (id, t, mapper) = param.consume();
        let ctx = Context::capture(&t);
        let hold = Tensor::<D>::empty([0; D], &t.device());
        self.params[i] = Some((BurnTensor::new(t), ctx));
        if let Some((grads, out)) = &mut self.grads {
            out[i] = grads.remove::<D>(id).map(BurnTensor::new);
        }
        Param::from_mapped_value(id, hold, mapper)
    }
}

/// Puts them back.
struct PutBack<'a> {
    index: &'a HashMap<ParamId, usize>,
    values: Vec<Option<(BurnTensor, Context)>>,
}

impl ModuleMapper for PutBack<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(&i) = self.index.get(&param.id) else { return param };
        let Some((t, ctx)) = self.values[i].take() else { return param };
        match t.into_tensor::<D>() {
            Ok(t) => {
                let (id, _, mapper) = param.consume();
                Param::from_mapped_value(id, ctx.restore(t), mapper)
            }
            Err(_) => param,
        }
    }
}

/// LoRA-MGPO over a burn module. Build it with [`MgpoOptimizer::builder`]
/// (`.lora(&layer)` per adapter, then `.build(&model)`) or, with every
/// trainable parameter a plain tensor, [`MgpoOptimizer::new`].
pub struct MgpoOptimizer {
    mgpo: mgpo_core::Mgpo<BurnBackend>,
    /// The trainable parameters, in layout order.
    ids: Vec<ParamId>,
    index: HashMap<ParamId, usize>,
    /// Per adapter: where its layer reads the factored weight-space perturbation.
    slots: Vec<Option<PerturbationSlot>>,
    last_report: Option<StepReport>,
}

impl std::fmt::Debug for MgpoOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MgpoOptimizer")
            .field("config", self.mgpo.config())
            .field("layout", self.mgpo.layout())
            .field("step", &self.mgpo.state().step)
            .field("perturbed", &self.mgpo.is_perturbed())
            .finish()
    }
}

/// Parameters taken out of a module, in layout order, with their contexts.
struct Taken {
    params: Vec<BurnTensor>,
    ctx: Vec<Context>,
    grads: Vec<Option<BurnTensor>>,
}

impl MgpoOptimizer {
    pub fn builder(config: Config) -> MgpoBuilder {
        MgpoBuilder { config, adapters: Vec::new(), backend: None }
    }

    /// Every trainable parameter of `module` as a plain tensor (no
    /// adapters: adapter space only, or plain AdamW with `Config::adamw`).
    pub fn new<M: Module>(config: Config, module: &M) -> Result<Self> {
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
            let error = MgpoError::UnknownName(format!("{} (parameter {}) is not in the module", self.mgpo.layout().tensors()[i].name, self.ids[i]));
            let module = module.map(&mut PutBack { index: &self.index, values: t.params });
            return Err(Failed { module, error });
        }
        let (params, ctx) = t.params.into_iter().flatten().unzip();
        Ok((module, Taken { params, ctx, grads }))
    }

    fn put_back<M: Module>(&self, module: M, params: Vec<BurnTensor>, ctx: Vec<Context>) -> M {
        module.map(&mut PutBack { index: &self.index, values: params.into_iter().zip(ctx).map(Some).collect() })
    }

    /// Adds the perturbation eps_t computed from the previous step's
    /// momentum (SPEC step 1); call before the forward pass. Adapter space:
    /// the parameters move; weight space: each [`LoraLinear`] registered
    /// with [`MgpoBuilder::lora`] adds it in factored form, W0 untouched.
    pub fn perturb<M: Module>(&mut self, module: M) -> std::result::Result<M, Failed<M>> {
        let (module, Taken { mut params, ctx, .. }) = self.take_out(module, None)?;
        let r = self.mgpo.perturb(&mut params, &mut NoFrozen);
        let module = self.put_back(module, params, ctx);
        match r {
            Ok(()) => {
                self.publish();
                Ok(module)
            }
            Err(error) => Err(Failed { module, error }),
        }
    }

    /// Removes the perturbation and, unless a gradient is non-finite, runs
    /// the step (SPEC step 3) at learning rate `lr` with `grads`, taken at
    /// the perturbed point. Every registered parameter needs a gradient.
    /// On an error the parameters come back clean and the state as before;
    /// a module that lacks a registered parameter is refused before
    /// anything changes (the optimizer stays perturbed until `step` or
    /// `unperturb` get the module it perturbed).
    pub fn step<M: Module>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> std::result::Result<M, Failed<M>> {
        let (module, Taken { mut params, ctx, grads }) = self.take_out(module, Some(&mut grads))?;
        self.clear_slots();
        let r = self.mgpo.set_lr(lr).and_then(|()| self.mgpo.step(&mut params, &mut NoFrozen, &grads));
        let r = match r {
            Err(e) if self.mgpo.is_perturbed() => self.mgpo.unperturb(&mut params, &mut NoFrozen).and(Err(e)),
            r => r,
        };
        let module = self.put_back(module, params, ctx);
        match r {
            Ok(rep) => {
                self.last_report = Some(rep);
                Ok(module)
            }
            Err(error) => Err(Failed { module, error }),
        }
    }

    /// Removes the perturbation without a step (to evaluate, or to abandon
    /// a step whose backward pass failed).
    pub fn unperturb<M: Module>(&mut self, module: M) -> std::result::Result<M, Failed<M>> {
        let (module, Taken { mut params, ctx, .. }) = self.take_out(module, None)?;
        self.clear_slots();
        let r = self.mgpo.unperturb(&mut params, &mut NoFrozen);
        let module = self.put_back(module, params, ctx);
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

    fn weight_perturbation_at(&self, i: usize) -> Option<FactoredPerturbation> {
        let w = self.mgpo.weight_perturbation(i)?;
        let (m_b, m_a) = (w.m_b.clone().into_tensor::<2>().ok()?, w.m_a.clone().into_tensor::<2>().ok()?);
        Some(FactoredPerturbation { coef: w.coef, m_b, m_a })
    }

    /// The factored weight-space perturbation of adapter `name` now applied
    /// (between `perturb` and `step`, `weight` space): the adapter's
    /// forward pass must add `coef * (m_b (A x) + B (m_a x))` with A, B
    /// detached. [`LoraLinear`] layers registered with
    /// [`MgpoBuilder::lora`] do so themselves.
    pub fn weight_perturbation(&self, name: &str) -> Result<Option<FactoredPerturbation>> {
        Ok(self.weight_perturbation_at(self.mgpo.layout().adapter_index(name)?))
    }

    /// The learning rate `step` was last given.
    pub fn lr(&self) -> f64 {
        self.mgpo.lr()
    }

    /// The report of the last successful step.
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last_report.as_ref()
    }

    pub fn config(&self) -> &Config {
        self.mgpo.config()
    }

    /// Names and shapes of the trainable tensors, in the order of [`MgpoOptimizer::param_ids`].
    pub fn layout(&self) -> &Layout {
        self.mgpo.layout()
    }

    /// The parameters the optimizer updates, in layout order.
    pub fn param_ids(&self) -> &[ParamId] {
        &self.ids
    }

    pub fn is_perturbed(&self) -> bool {
        self.mgpo.is_perturbed()
    }

    /// The optimizer state (m, v per tensor, g_bar per group, step counts).
    pub fn state(&self) -> &State<BurnTensor> {
        self.mgpo.state()
    }

    /// Restores a saved state (see `mgpo_core::Mgpo::set_state`).
    pub fn set_state(&mut self, state: State<BurnTensor>) -> Result<()> {
        self.mgpo.set_state(state)
    }

    /// The optimizer's record: mgpo-core's checkpoint (m, v by tensor name,
    /// g_bar, step counts, configuration and layout), as bytes. Refused
    /// while perturbed. The module itself is burn's to save.
    pub fn checkpoint_bytes(&self) -> Result<Vec<u8>> {
        self.mgpo.checkpoint_bytes()
    }

    /// Loads a checkpoint written by any backend's optimizer for the same
    /// names and shapes; on any error nothing changes.
    pub fn load_checkpoint_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.mgpo.load_checkpoint_bytes(bytes)
    }

    /// [`MgpoOptimizer::checkpoint_bytes`] written to `path` atomically.
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        self.mgpo.save_checkpoint(path)
    }

    /// [`MgpoOptimizer::load_checkpoint_bytes`] from a file.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.mgpo.load_checkpoint(path)
    }

    /// The underlying optimizer.
    pub fn inner(&self) -> &mgpo_core::Mgpo<BurnBackend> {
        &self.mgpo
    }
}
