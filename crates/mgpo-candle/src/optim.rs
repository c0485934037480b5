//! [`MgpoOptimizer`]: LoRA-MGPO over candle `Var`s. The algorithm, name
//! checks and clean-after-error guarantee are [`mgpo_core::Bound`]'s; this
//! file finds candle's tensors (variables, `VarMap` paths, [`LoraLinear`]s)
//! and their gradients in a [`GradStore`]. The optimizer updates the
//! variables' storage in place, outside the autograd graph.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use mgpo_core::{Bound, Config, LoraConfig, MgpoError, ParamGroup, PerturbationSlot, Registry, Result, StepReport};

use crate::backend::CandleBackend;
use crate::cpu::{backend_err, storage_id};
use crate::lora::LoraLinear;

/// The variables of `varmap` in path order (handles sharing their storage).
fn variables(varmap: &VarMap) -> BTreeMap<String, Var> {
    varmap.data().lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Registers the optimizer's tensors by name ([`MgpoOptimizer::builder`]),
/// checking each (new storage, one float dtype, one device); the first
/// error is [`MgpoBuilder::build`]'s.
pub struct MgpoBuilder {
    registry: Registry<Tensor>,
}

impl MgpoBuilder {
    fn with(mut self, f: impl FnOnce(&mut Registry<Tensor>)) -> Self {
        f(&mut self.registry);
        self
    }

    /// Whether the tensors of one registration may join those before it;
    /// if not, the registry records why.
    fn admit(&mut self, new: &[(String, &Tensor)]) -> bool {
        for (i, (name, t)) in new.iter().enumerate() {
            let (id, first) = (storage_id(t), self.registry.first().unwrap_or(t));
            let error = if self.registry.contains(|p| storage_id(p) == id) || new[..i].iter().any(|(_, u)| storage_id(u) == id) {
                MgpoError::DuplicateName(name.clone())
            } else if !t.dtype().is_float() || t.dtype() != first.dtype() || !t.device().same_device(first.device()) {
                let (d, l) = (first.dtype(), first.device().location());
                MgpoError::Backend(format!("`{name}` is {:?} on {:?}, the first tensor {d:?} on {l:?}: one float dtype on one device", t.dtype(), t.device().location()))
            } else {
                continue;
            };
            self.registry.fail(error);
            return false;
        }
        true
    }

    fn push_adapter(mut self, name: &str, (a, b): (&Tensor, &Tensor), scale: f64, w0: Option<&Tensor>, slot: Option<PerturbationSlot<Tensor>>) -> Self {
        let mut new = vec![(format!("{name}.a"), a), (format!("{name}.b"), b)];
        new.extend(w0.map(|w| (format!("{name}.w0"), w)));
        if self.admit(&new) {
            self.registry.adapter(name, a.clone(), b.clone(), a.dims(), b.dims(), scale, w0.cloned(), slot);
        }
        self
    }

    /// Adapter `name`, y = W0 x + s B (A x), with A (r x in) and B (out x r).
    /// The optimizer does not see W0: in `weight` space the caller's forward
    /// pass adds the perturbation read from `weight_perturbation(name)`.
    pub fn adapter(self, name: &str, a: &Var, b: &Var, scale: f64) -> Self {
        self.push_adapter(name, (a, b), scale, None, None)
    }

    /// An adapter with its base weight W0 (out x in), which `weight` space
    /// then perturbs in place (and restores within rounding in `step`).
    /// [`MgpoBuilder::lora`] leaves W0 untouched instead.
    pub fn adapter_with_w0(self, name: &str, a: &Var, b: &Var, w0: &Tensor, scale: f64) -> Self {
        self.push_adapter(name, (a, b), scale, Some(w0), None)
    }

    /// The adapter of `layer` (none for a frozen one), under its name. In
    /// `weight` space the layer adds the perturbation in factored form.
    pub fn lora(self, layer: &LoraLinear) -> Self {
        let Some(ad) = layer.adapter() else { return self };
        self.push_adapter(&ad.name, (&ad.a, &ad.b), ad.scale, None, Some(ad.slot.clone()))
    }

    /// [`MgpoBuilder::lora`] of every layer, in order.
    pub fn loras<'a>(self, layers: impl IntoIterator<Item = &'a LoraLinear>) -> Self {
        layers.into_iter().fold(self, Self::lora)
    }

    /// A trainable tensor outside any adapter (a head, a LayerNorm): AdamW
    /// and clipping, and the perturbation in `adapter` space only.
    pub fn plain(mut self, name: &str, var: &Var) -> Self {
        if self.admit(&[(name.to_string(), var)]) {
            self.registry.plain(name, var.as_tensor().clone(), var.dims());
        }
        self
    }

    /// Parameter group `group` (lr multiplier, weight decay) of the named tensors.
    pub fn param_group(self, group: ParamGroup, tensors: &[&str]) -> Self {
        self.with(|r| r.param_group(group, tensors))
    }

    /// Parameter group `group` of the tensors no earlier group took whose names
    /// satisfy `pred` (the Trainer's: `no_decay()`, `mgpo_core::is_bias_or_norm`).
    pub fn param_group_where(self, group: ParamGroup, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.with(|r| r.param_group_where(group, pred))
    }

    /// The adapters `{prefix}.lora_a`, `{prefix}.lora_b` of `varmap` (the
    /// variables a [`LoraLinear`] creates under `vb.pp(prefix)`) for each of
    /// `prefixes`, scaled as `lora` says (its rank must be A's), then
    /// [`MgpoBuilder::rest_of`] the map. Without their layers, `weight`
    /// space leaves their perturbation to the caller, as [`MgpoBuilder::adapter`].
    pub fn varmap(mut self, varmap: &VarMap, prefixes: &[&str], lora: &LoraConfig) -> Self {
        let vars = variables(varmap);
        for prefix in prefixes {
            let [a, b] = ["lora_a", "lora_b"].map(|v| format!("{prefix}.{v}"));
            let (Some(va), Some(vb)) = (vars.get(&a), vars.get(&b)) else {
                let missing = if vars.contains_key(&a) { b } else { a };
                return self.with(|r| r.fail(MgpoError::UnknownName(missing)));
            };
            if va.dims().first() != Some(&lora.rank) {
                let detail = format!("A is {:?}, the LoRA configuration's rank {}", va.dims(), lora.rank);
                return self.with(|r| r.fail(MgpoError::AdapterShape { name: prefix.to_string(), detail }));
            }
            self = self.adapter(prefix, va, vb, lora.scale());
        }
        self.rest_of(varmap)
    }

    /// Every variable of `varmap` not registered yet (by [`MgpoBuilder::lora`],
    /// say), as a plain tensor named by its path, in path order.
    pub fn rest_of(self, varmap: &VarMap) -> Self {
        let known = |b: &Self, v: &Var| b.registry.contains(|p| storage_id(p) == storage_id(v));
        variables(varmap).iter().fold(self, |b, (path, v)| if known(&b, v) { b } else { b.plain(path, v) })
    }

    /// The optimizer, computing on the tensors' device in their dtype, or
    /// the first registration error.
    pub fn build(self) -> Result<MgpoOptimizer> {
        // With nothing registered the registry reports it; the backend is moot.
        let backend = self.registry.first().map_or_else(crate::cpu_f32, |t| CandleBackend::new(t.device().clone(), t.dtype()));
        Ok(MgpoOptimizer { bound: self.registry.build(backend)?, rejected_lr: None })
    }
}

/// LoRA-MGPO over candle variables. Dereferences to [`mgpo_core::Bound`],
/// so `perturb()`, `unperturb()`, `weight_perturbation(name)`, `params()`,
/// `lr`, `set_lr` (refused at once when invalid), `config`, `layout`,
/// `state`, `last_report`, `is_perturbed`, `save_checkpoint` and
/// `load_checkpoint` are the core's, as in every framework.
pub struct MgpoOptimizer {
    bound: Bound<CandleBackend>,
    /// A rate refused by `Optimizer::set_learning_rate`, for the next step to report.
    rejected_lr: Option<MgpoError>,
}

impl std::fmt::Debug for MgpoOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.layout().names().collect();
        write!(f, "MgpoOptimizer {{ tensors: {names:?}, step: {}, perturbed: {}, config: {:?} }}", self.state().step, self.is_perturbed(), self.config())
    }
}

impl MgpoOptimizer {
    /// Starts registering adapters, layers, plain tensors and parameter groups.
    pub fn builder(config: Config) -> MgpoBuilder {
        MgpoBuilder { registry: Registry::new(config) }
    }

    /// The optimizer of the adapters of `layers` (frozen layers add none).
    pub fn for_lora<'a>(layers: impl IntoIterator<Item = &'a LoraLinear>, config: Config) -> Result<Self> {
        Self::builder(config).loras(layers).build()
    }

    /// Removes the perturbation and, unless a gradient is non-finite, runs
    /// AdamW ([the spec](mgpo_core::spec), step 3) on the gradients in `grads`, taken at the
    /// perturbed point; one missing is [`MgpoError::MissingGradient`] naming
    /// it. On any error the tensors are clean and the state unchanged. (The
    /// `candle_nn::Optimizer` step is this one without the report.)
    pub fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        if let Some(e) = self.rejected_lr.take() {
            self.bound.unperturb()?;
            return Err(e);
        }
        let found = self.params().iter().map(|(_, p)| grads.get(p).cloned()).collect();
        self.bound.step_grads(found)
    }

    /// One whole MGPO step: perturb, `loss_fn` at the perturbed point,
    /// backward, step. Returns that loss and the report; when `loss_fn` or
    /// the backward pass fails the tensors are left clean.
    pub fn training_step(&mut self, loss_fn: impl FnOnce() -> candle_core::Result<Tensor>) -> Result<(Tensor, StepReport)> {
        self.perturb()?;
        match loss_fn().and_then(|loss| Ok((loss.backward()?, loss))) {
            Ok((grads, loss)) => Ok((loss, self.step(&grads)?)),
            Err(e) => self.unperturb().and(Err(backend_err(e))),
        }
    }

    /// Adds one micro-batch's gradients of the registered tensors into `acc`
    /// (gradient accumulation, see the crate docs). `GradStore::extend`
    /// sums too, but keeps every intermediate tensor's gradient of every
    /// micro-batch. `acc` changes only on success.
    pub fn accumulate(&self, acc: &mut GradStore, mut grads: GradStore) -> Result<()> {
        let mut sums = Vec::with_capacity(self.params().len());
        for (p, g) in self.params().iter().filter_map(|(_, p)| Some((p, grads.remove(p)?))) {
            sums.push((p, match acc.get(p) { Some(prev) => (prev + g).map_err(backend_err)?, None => g }));
        }
        for (p, sum) in sums {
            acc.insert(p, sum);
        }
        Ok(())
    }
}

impl Deref for MgpoOptimizer {
    type Target = Bound<CandleBackend>;
    fn deref(&self) -> &Self::Target {
        &self.bound
    }
}

impl DerefMut for MgpoOptimizer {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.bound
    }
}

/// `candle_nn::Optimizer`, every variable a plain tensor. With `rho = 0`
/// (`Config::adamw`) this is `torch.optim.AdamW`, as `candle_nn::AdamW`.
impl Optimizer for MgpoOptimizer {
    type Config = Config;

    /// Float variable i becomes plain tensor `param{i}` (others are skipped,
    /// as by candle's AdamW). `VarMap::all_vars` has no fixed order: for
    /// checkpoints, register by path ([`MgpoBuilder::rest_of`]).
    fn new(vars: Vec<Var>, config: Config) -> candle_core::Result<Self> {
        let floats = vars.iter().filter(|v| v.dtype().is_float());
        let builder = floats.enumerate().fold(MgpoOptimizer::builder(config), |b, (i, v)| b.plain(&format!("param{i}"), v));
        builder.build().map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        MgpoOptimizer::step(self, grads).map(drop).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.lr()
    }

    /// The trait cannot refuse a rate: an invalid one leaves the rate as it
    /// was, and the next step returns the error before changing anything
    /// (unless a valid rate is set here first). `set_lr` refuses at once.
    fn set_learning_rate(&mut self, lr: f64) {
        self.rejected_lr = self.bound.set_lr(lr).err();
    }
}
