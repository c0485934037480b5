//! [`MgpoOptimizer`]: LoRA-MGPO over the variables of a `tch::nn::VarStore`,
//! used like `tch::nn::Optimizer` plus one call before the forward pass:
//!
//! ```text
//! opt.zero_grad();
//! opt.perturb()?;                  // theta <- theta + eps_t (or W0, in weight space)
//! let loss = model.forward(&x)...; // loss at the perturbed point
//! loss.backward();
//! opt.step()?;                     // remove eps_t, AdamW on each variable's .grad()
//! ```
//!
//! The optimizer is a [`mgpo_core::Bound`] holding shallow clones of the
//! variables (shared storage), which it updates in place under `no_grad`;
//! nothing goes through the autograd graph. This module adds only tch's
//! idioms: registering layers and variables (a whole var store by name:
//! [`VarStoreAdapters`]) and reading their `.grad()`.

use std::ops::{Deref, DerefMut};

use mgpo_core::{Bound, Config, MgpoError, ParamGroup, PerturbationSlot, Registry, Result, Space, StepReport};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::backend::{err, TchBackend};
use crate::lora::LoraLinear;
use crate::var_store::VarStoreAdapters;

/// Registers the tensors the optimizer owns; see [`MgpoOptimizer::builder`].
/// The first mistake (a tensor registered twice, mixed dtypes or devices, a
/// bad shape) is returned by [`MgpoBuilder::build`].
pub struct MgpoBuilder {
    pub(crate) registry: Registry<Tensor>,
    pub(crate) space: Space,
}

fn dims(t: &Tensor) -> Vec<usize> {
    t.size().into_iter().map(|d| d as usize).collect()
}

/// Identity of a tensor's storage (shallow clones share it).
pub(crate) fn key(t: &Tensor) -> (usize, Vec<i64>) {
    (t.data_ptr() as usize, t.size())
}

impl MgpoBuilder {
    /// Checks that `t` can be registered as `name`: defined, f32 or f64, of
    /// the kind and device of the tensors before it, and not registered yet.
    fn check(&self, name: &str, t: &Tensor) -> Result<()> {
        let kind = t.f_kind().map_err(|e| MgpoError::Backend(format!("`{name}`: {e}")))?;
        if !matches!(kind, Kind::Float | Kind::Double) {
            return Err(MgpoError::Backend(format!("`{name}` is {kind:?}: only f32 and f64 tensors can be trained")));
        }
        if let Some(first) = self.registry.first() {
            if first.kind() != kind || first.device() != t.device() {
                let (fk, fd) = (first.kind(), first.device());
                return Err(MgpoError::Backend(format!("`{name}` is {kind:?} on {:?}, the tensors before it {fk:?} on {fd:?}: all must share one dtype and device", t.device())));
            }
        }
        let k = key(t);
        if k.0 != 0 && self.registry.contains(|p| key(p) == k) {
            return Err(MgpoError::DuplicateName(name.to_string()));
        }
        Ok(())
    }

    fn admit(&mut self, name: &str, t: &Tensor) -> bool {
        let checked = self.check(name, t);
        checked.map_err(|e| self.registry.fail(e)).is_ok()
    }

    pub(crate) fn push_adapter(mut self, name: &str, a: &Tensor, b: &Tensor, scale: f64, w0: Option<&Tensor>, slot: Option<PerturbationSlot<Tensor>>) -> Self {
        let ok = self.admit(&format!("{name}.a"), a) && self.admit(&format!("{name}.b"), b);
        if ok && w0.iter().all(|w| self.admit(&format!("{name}.w0"), w)) {
            let w0 = w0.map(Tensor::shallow_clone);
            self.registry.adapter(name, a.shallow_clone(), b.shallow_clone(), &dims(a), &dims(b), scale, w0, slot);
        }
        self
    }

    /// An adapter y = W0 x + s B (A x) whose base weight the optimizer does
    /// not see. In `weight` space its perturbation is applied by the
    /// caller's forward pass, read from `weight_perturbation(name)`.
    pub fn adapter(self, name: &str, a: &Tensor, b: &Tensor, scale: f64) -> Self {
        self.push_adapter(name, a, b, scale, None, None)
    }

    /// An adapter with its base weight W0 (out x in): in `weight` space the
    /// optimizer adds the perturbation to W0 in place and subtracts it again
    /// in `step`, so W0 comes back to its value within rounding.
    /// [`MgpoBuilder::lora`] avoids writing W0 at all.
    pub fn adapter_with_w0(self, name: &str, a: &Tensor, b: &Tensor, w0: &Tensor, scale: f64) -> Self {
        self.push_adapter(name, a, b, scale, Some(w0), None)
    }

    /// The adapter of a [`LoraLinear`] (none for a frozen layer). In `weight`
    /// space the layer adds the perturbation in factored form and W0 is
    /// never written.
    pub fn lora(self, layer: &LoraLinear) -> Self {
        match layer.adapter() {
            Some(ad) => self.push_adapter(ad.name(), ad.a(), ad.b(), ad.scale(), None, Some(ad.slot().clone())),
            None => self,
        }
    }

    /// [`MgpoBuilder::lora`] for each layer.
    pub fn loras<'a>(self, layers: impl IntoIterator<Item = &'a LoraLinear>) -> Self {
        layers.into_iter().fold(self, |b, l| b.lora(l))
    }

    /// A trainable tensor outside any adapter (a classifier head): AdamW and
    /// clipping; perturbed in `adapter` space only.
    pub fn plain(mut self, name: &str, t: &Tensor) -> Self {
        if self.admit(name, t) {
            self.registry.plain(name, t.shallow_clone(), &dims(t));
        }
        self
    }

    /// A parameter group (its own learning-rate multiplier and weight decay)
    /// of the named tensors (`{adapter}.a`, `{adapter}.b`, plain names).
    pub fn param_group(mut self, group: ParamGroup, tensors: &[&str]) -> Self {
        self.registry.param_group(group, tensors);
        self
    }

    /// A parameter group of the tensors whose names satisfy `pred`, e.g.
    /// `param_group_where(ParamGroup::no_decay(), mgpo_core::is_bias_or_norm)`.
    pub fn param_group_where(mut self, group: ParamGroup, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.registry.param_group_where(group, pred);
        self
    }

    /// The optimizer, on the dtype and device of the tensors registered.
    pub fn build(self) -> Result<MgpoOptimizer> {
        let backend = match self.registry.first() {
            Some(t) => TchBackend::new(t.device(), t.kind())?,
            None => TchBackend::cpu_f32(), // nothing to train: the registry says so
        };
        Ok(MgpoOptimizer(self.registry.build(backend)?))
    }
}

/// LoRA-MGPO over tch tensors. Build it with [`MgpoOptimizer::builder`],
/// [`MgpoOptimizer::from_var_store`] or [`MgpoOptimizer::for_lora`].
///
/// Dereferences to [`mgpo_core::Bound`]: `perturb()`, `unperturb()`,
/// `weight_perturbation(name)`, `params()`, and through it the learning
/// rate (`lr`, `set_lr`, validated at once), `config`, `layout`, `state`,
/// `last_report`, `is_perturbed`, `save_checkpoint` and `load_checkpoint`
/// are the core's, the same in every framework.
pub struct MgpoOptimizer(Bound<TchBackend>);

impl std::fmt::Debug for MgpoOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let step = self.state().step;
        f.debug_struct("MgpoOptimizer").field("config", self.config()).field("layout", self.layout()).field("step", &step).field("perturbed", &self.is_perturbed()).finish()
    }
}

impl MgpoOptimizer {
    /// Starts registering adapters, layers, plain tensors and parameter groups.
    pub fn builder(config: Config) -> MgpoBuilder {
        MgpoBuilder { registry: Registry::new(config), space: config.space }
    }

    /// An optimizer for the adapters of `layers` (frozen layers are skipped).
    pub fn for_lora<'a>(layers: impl IntoIterator<Item = &'a LoraLinear>, config: Config) -> Result<Self> {
        Self::builder(config).loras(layers).build()
    }

    /// An optimizer for every trainable variable of `vs`: the adapters of
    /// `layers` first (their variables must be in `vs`), then the other
    /// `lora_a`/`lora_b` pairs (which then need `alpha`), then the other
    /// trainable variables as plain tensors. See [`VarStoreAdapters`].
    pub fn from_var_store<'a>(vs: &VarStore, layers: impl IntoIterator<Item = &'a LoraLinear>, config: Config, alpha: Option<f64>) -> Result<Self> {
        let spec = VarStoreAdapters { alpha, ..VarStoreAdapters::default() };
        Self::builder(config).loras(layers).var_store(vs, &spec).build()
    }

    /// Removes the perturbation and, unless a gradient is non-finite, runs
    /// the step ([the spec](mgpo_core::spec), step 3) on each variable's `.grad()`, taken
    /// at the perturbed point. A variable without a gradient is
    /// [`MgpoError::MissingGradient`] naming it. On any error the
    /// parameters are left clean and the state unchanged.
    pub fn step(&mut self) -> Result<StepReport> {
        let grads = self.params().iter().map(|(_, p)| Some(p.grad()).filter(Tensor::defined)).collect();
        self.0.step_grads(grads)
    }

    /// Zeroes the gradients of the registered variables. libtorch adds each
    /// backward pass to `.grad()`, which is what gradient accumulation uses.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.params() {
            p.shallow_clone().zero_grad();
        }
    }

    /// One whole MGPO step: zero the gradients, perturb, `loss_fn` at the
    /// perturbed point, backward, step. Returns the loss (at the perturbed
    /// point) and the report; a failed backward pass leaves the parameters
    /// clean.
    pub fn training_step(&mut self, loss_fn: impl FnOnce() -> Tensor) -> Result<(Tensor, StepReport)> {
        self.zero_grad();
        self.perturb()?;
        let loss = loss_fn();
        if let Err(e) = loss.f_backward() {
            self.unperturb()?;
            return Err(err(e));
        }
        let report = self.step()?;
        Ok((loss, report))
    }
}

impl Deref for MgpoOptimizer {
    type Target = Bound<TchBackend>;
    fn deref(&self) -> &Bound<TchBackend> {
        &self.0
    }
}

impl DerefMut for MgpoOptimizer {
    fn deref_mut(&mut self) -> &mut Bound<TchBackend> {
        &mut self.0
    }
}
