//! [`MgpoOptimizer`]: LoRA-MGPO over candle `Var`s, used like
//! `candle_nn::AdamW` plus one call before the forward pass:
//!
//! ```text
//! opt.perturb()?;                       // theta <- theta + eps_t (or W0, in weight space)
//! let loss = model.forward(&x)?...;     // loss at the perturbed point
//! opt.step(&loss.backward()?)?;         // remove eps_t, AdamW on the gradients
//! ```
//!
//! The optimizer writes the variables in place (their storage is shared
//! with the model); nothing goes through the autograd graph.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use mgpo_core::{Config, Layout, LayoutBuilder, MgpoError, Result, State, StepReport};

use crate::backend::CandleBackend;
use crate::lora::{FactoredPerturbation, LoraLinear, PerturbationSlot};

/// An adapter whose A and B live in a [`VarMap`], by variable path, with
/// its alpha: the scaling is s = alpha / r (rsLoRA: alpha / sqrt(r)), r
/// read from A's shape (r x in).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    /// Path of A (r x in) in the map.
    pub a: String,
    /// Path of B (out x r) in the map.
    pub b: String,
    pub alpha: f64,
    pub rslora: bool,
}

impl AdapterSpec {
    pub fn new(name: &str, a: &str, b: &str, alpha: f64) -> Self {
        AdapterSpec { name: name.to_string(), a: a.to_string(), b: b.to_string(), alpha, rslora: false }
    }

    /// The variables of a [`LoraLinear`] created under `vb.pp(prefix)`:
    /// `{prefix}.lora_a`, `{prefix}.lora_b`.
    pub fn lora(prefix: &str, alpha: f64) -> Self {
        Self::new(prefix, &format!("{prefix}.lora_a"), &format!("{prefix}.lora_b"), alpha)
    }

    /// s = alpha / sqrt(r) instead of alpha / r.
    pub fn rslora(self) -> Self {
        AdapterSpec { rslora: true, ..self }
    }

    /// s for an adapter of rank `r`.
    pub fn scale(&self, r: usize) -> f64 {
        let r = r as f64;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

/// Registers the tensors the optimizer owns; see [`MgpoOptimizer::builder`].
#[derive(Debug)]
pub struct MgpoBuilder {
    config: Config,
    layout: LayoutBuilder,
    vars: Vec<Var>,
    frozen: Vec<Tensor>,
    /// Per adapter: where its layer reads the factored weight-space perturbation.
    slots: Vec<Option<PerturbationSlot>>,
    backend: Option<CandleBackend>,
    error: Option<MgpoError>,
}

impl MgpoBuilder {
    fn with_layout(mut self, f: impl FnOnce(LayoutBuilder) -> LayoutBuilder) -> Self {
        self.layout = f(std::mem::take(&mut self.layout));
        self
    }

    fn fail(mut self, e: MgpoError) -> Self {
        self.error.get_or_insert(e);
        self
    }

    fn registered(&self, v: &Var) -> bool {
        self.vars.iter().any(|x| x.as_tensor().id() == v.as_tensor().id())
    }

    fn push_adapter(mut self, name: &str, a: &Var, b: &Var, scale: f64, w0: Option<&Tensor>, slot: Option<PerturbationSlot>) -> Self {
        if self.registered(a) || self.registered(b) {
            return self.fail(MgpoError::DuplicateName(name.to_string()));
        }
        let n = self.vars.len();
        self = self.with_layout(|l| l.adapter_scaled(name, scale, a.dims(), b.dims(), w0.is_some()));
        self.vars.push(a.clone());
        self.vars.push(b.clone());
        self.frozen.extend(w0.cloned());
        self.slots.push(slot);
        debug_assert_eq!(self.vars.len(), n + 2);
        self
    }

    /// An adapter y = W0 x + s B (A x) whose base weight the optimizer does
    /// not see. In `weight` space its perturbation is applied by the
    /// caller's forward pass, read from [`MgpoOptimizer::weight_perturbation`].
    pub fn adapter(self, name: &str, a: &Var, b: &Var, scale: f64) -> Self {
        self.push_adapter(name, a, b, scale, None, None)
    }

    /// An adapter with its base weight W0 (out x in): in `weight` space the
    /// optimizer adds the perturbation to W0 in place and subtracts it again
    /// in `step`, so W0 comes back to its value within rounding (the path
    /// the conformance vectors test). [`MgpoBuilder::lora`] avoids touching
    /// W0 at all.
    pub fn adapter_with_w0(self, name: &str, a: &Var, b: &Var, w0: &Tensor, scale: f64) -> Self {
        self.push_adapter(name, a, b, scale, Some(w0), None)
    }

    /// The adapter of a [`LoraLinear`] (none for a frozen layer). In `weight`
    /// space the layer adds the perturbation in factored form and W0 is
    /// never written.
    pub fn lora(self, layer: &LoraLinear) -> Self {
        match layer.adapter() {
            Some(ad) => {
                let (name, a, b, s, slot) = (ad.name().to_string(), ad.a().clone(), ad.b().clone(), ad.scale(), ad.slot().clone());
                self.push_adapter(&name, &a, &b, s, None, Some(slot))
            }
            None => self,
        }
    }

    /// [`MgpoBuilder::lora`] for each layer.
    pub fn loras<'a>(self, layers: impl IntoIterator<Item = &'a LoraLinear>) -> Self {
        layers.into_iter().fold(self, |b, l| b.lora(l))
    }

    /// A trainable tensor outside any adapter (a classifier head): AdamW and
    /// clipping; perturbed in `adapter` space only.
    pub fn plain(mut self, name: &str, var: &Var) -> Self {
        if self.registered(var) {
            return self.fail(MgpoError::DuplicateName(name.to_string()));
        }
        self = self.with_layout(|l| l.plain(name, var.dims()));
        self.vars.push(var.clone());
        self
    }

    /// The adapters of `specs`, looked up in `varmap` (in `weight` space
    /// their perturbation is for the caller's forward pass to apply, see
    /// [`MgpoBuilder::adapter`]), then every other
    /// variable of the map not registered yet as a plain tensor (in name order).
    pub fn varmap(mut self, varmap: &VarMap, specs: &[AdapterSpec]) -> Self {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner()).clone();
        for s in specs {
            match (data.get(&s.a), data.get(&s.b)) {
                (Some(a), Some(b)) => {
                    let r = a.dims().first().copied().unwrap_or(0);
                    self = self.adapter(&s.name, a, b, s.scale(r));
                }
                (None, _) => return self.fail(MgpoError::UnknownName(s.a.clone())),
                (_, None) => return self.fail(MgpoError::UnknownName(s.b.clone())),
            }
        }
        self.rest_of(varmap)
    }

    /// Every variable of `varmap` not registered yet, as a plain tensor, in
    /// name order (the LoRA variables of layers added with
    /// [`MgpoBuilder::lora`] are registered already).
    pub fn rest_of(mut self, varmap: &VarMap) -> Self {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for n in names {
            let v = &data[n];
            if !self.registered(v) {
                self = self.plain(n, v);
            }
        }
        self
    }

    /// Overrides the backend (for its `par_threshold`, or `cpu_kernels`);
    /// by default the device and dtype of the first variable.
    pub fn backend(mut self, backend: CandleBackend) -> Self {
        self.backend = Some(backend);
        self
    }

    pub fn build(self) -> Result<MgpoOptimizer> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let layout: Layout = self.layout.build()?;
        let first = self.vars[0].as_tensor();
        for t in self.vars.iter().map(Var::as_tensor).chain(&self.frozen) {
            if t.dtype() != first.dtype() || !t.device().same_device(first.device()) {
                return Err(MgpoError::Backend(format!(
                    "all tensors must share one dtype and device: {:?} on {:?} vs {:?} on {:?}",
                    first.dtype(),
                    first.device().location(),
                    t.dtype(),
                    t.device().location()
                )));
            }
            if !t.dtype().is_float() {
                return Err(MgpoError::Backend(format!("{:?} tensors cannot be trained", t.dtype())));
            }
        }
        let backend = self.backend.unwrap_or_else(|| CandleBackend::new(first.device().clone(), first.dtype()));
        let mgpo = mgpo_core::Mgpo::new(backend, self.config, layout)?;
        let params = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        Ok(MgpoOptimizer { mgpo, vars: self.vars, params, frozen: self.frozen, slots: self.slots, pending_error: None, last_report: None })
    }
}

/// LoRA-MGPO over candle variables. Build it with [`MgpoOptimizer::builder`]
/// (adapters, LoRA layers, plain tensors, a `VarMap`) or, with every
/// variable a plain tensor, with [`candle_nn::Optimizer::new`].
///
/// `step` is both an inherent method, returning the [`StepReport`] and
/// typed [`MgpoError`]s, and the `candle_nn::Optimizer` method (method-call
/// syntax picks the inherent one). The trait's `backward_step` is backward
/// plus `step`: without a `perturb` before the forward pass, a plain
/// (unperturbed) step.
pub struct MgpoOptimizer {
    mgpo: mgpo_core::Mgpo<CandleBackend>,
    vars: Vec<Var>,
    /// The variables' tensors (shared storage), in layout order.
    params: Vec<Tensor>,
    frozen: Vec<Tensor>,
    slots: Vec<Option<PerturbationSlot>>,
    /// An invalid learning rate given to `set_learning_rate` (which cannot
    /// fail), reported by the next step.
    pending_error: Option<MgpoError>,
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

impl MgpoOptimizer {
    pub fn builder(config: Config) -> MgpoBuilder {
        MgpoBuilder {
            config,
            layout: Layout::builder(),
            vars: Vec::new(),
            frozen: Vec::new(),
            slots: Vec::new(),
            backend: None,
            error: None,
        }
    }

    /// An optimizer for the adapters of `layers` (frozen layers are skipped).
    pub fn for_lora<'a>(layers: impl IntoIterator<Item = &'a LoraLinear>, config: Config) -> Result<Self> {
        Self::builder(config).loras(layers).build()
    }

    /// Adds the perturbation eps_t computed from the previous step's
    /// momentum (SPEC step 1). Call before the forward pass.
    pub fn perturb(&mut self) -> Result<()> {
        self.mgpo.perturb(&mut self.params, &mut self.frozen)?;
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot {
                slot.set(self.weight_perturbation_at(i));
            }
        }
        Ok(())
    }

    /// Removes the perturbation and, unless a gradient is non-finite, runs
    /// the step (SPEC step 3) with the gradients of `grads`, taken at the
    /// perturbed point. Every registered variable needs a gradient. On any
    /// error the parameters are left clean.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        let result = self.try_step(grads);
        if result.is_err() && self.mgpo.is_perturbed() {
            // Best effort: the error already says what went wrong.
            let _ = self.mgpo.unperturb(&mut self.params, &mut self.frozen);
        }
        self.clear_slots();
        if let Ok(r) = &result {
            self.last_report = Some(r.clone());
        }
        result
    }

    fn try_step(&mut self, grads: &GradStore) -> Result<StepReport> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let g: Vec<Option<Tensor>> = self.vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect();
        self.mgpo.step(&mut self.params, &mut self.frozen, &g)
    }

    /// Removes the perturbation without a step (to evaluate, or to abandon
    /// a step whose backward pass failed).
    pub fn unperturb(&mut self) -> Result<()> {
        let r = self.mgpo.unperturb(&mut self.params, &mut self.frozen);
        self.clear_slots();
        r
    }

    /// One whole MGPO step: perturb, `loss_fn` at the perturbed point,
    /// backward, step. Returns the loss (at the perturbed point) and the report.
    pub fn training_step(&mut self, loss_fn: impl FnOnce() -> candle_core::Result<Tensor>) -> Result<(Tensor, StepReport)> {
        self.perturb()?;
        let grads = loss_fn().and_then(|loss| Ok((loss.backward()?, loss)));
        match grads {
            Ok((g, loss)) => Ok((loss, self.step(&g)?)),
            Err(e) => {
                self.unperturb()?;
                Err(MgpoError::Backend(e.to_string()))
            }
        }
    }

    fn clear_slots(&self) {
        for s in self.slots.iter().flatten() {
            s.set(None);
        }
    }

    fn weight_perturbation_at(&self, i: usize) -> Option<FactoredPerturbation> {
        self.mgpo.weight_perturbation(i).map(|w| FactoredPerturbation { coef: w.coef, m_b: w.m_b.clone(), m_a: w.m_a.clone() })
    }

    /// The factored weight-space perturbation of adapter `name` now applied
    /// (between `perturb` and `step`, `weight` space): the adapter's forward
    /// pass must add `coef * (m_b (A x) + B (m_a x))` with A, B detached.
    /// [`LoraLinear`] layers registered with [`MgpoBuilder::lora`] do so
    /// themselves.
    pub fn weight_perturbation(&self, name: &str) -> Result<Option<FactoredPerturbation>> {
        Ok(self.weight_perturbation_at(self.mgpo.layout().adapter_index(name)?))
    }

    /// Sets the learning rate of the following steps (a schedule).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.mgpo.set_lr(lr)
    }

    pub fn lr(&self) -> f64 {
        self.mgpo.lr()
    }

    /// The variables, in layout order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The report of the last successful step.
    pub fn last_report(&self) -> Option<&StepReport> {
        self.last_report.as_ref()
    }

    pub fn config(&self) -> &Config {
        self.mgpo.config()
    }

    pub fn layout(&self) -> &Layout {
        self.mgpo.layout()
    }

    pub fn is_perturbed(&self) -> bool {
        self.mgpo.is_perturbed()
    }

    /// The optimizer state (m, v per variable, g_bar per group, step counts).
    pub fn state(&self) -> &State<Tensor> {
        self.mgpo.state()
    }

    /// Restores a saved state (see `mgpo_core::Mgpo::set_state`).
    pub fn set_state(&mut self, state: State<Tensor>) -> Result<()> {
        self.mgpo.set_state(state)
    }

    /// Writes the optimizer state (m, v, g_bar, step counts, configuration)
    /// to a checkpoint file atomically; refused while perturbed. The
    /// variables themselves are the model's to save (`VarMap::save`).
    pub fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.mgpo.save_checkpoint(path)
    }

    /// Loads a checkpoint written by any backend's `save_checkpoint`; on any
    /// error nothing changes.
    pub fn load_checkpoint(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.mgpo.load_checkpoint(path)
    }

    /// The underlying optimizer.
    pub fn inner(&self) -> &mgpo_core::Mgpo<CandleBackend> {
        &self.mgpo
    }
}

/// `candle_nn::Optimizer` with every variable a plain tensor. With
/// `rho = 0` (`Config::adamw`) it is AdamW as `torch.optim.AdamW`, which is
/// what `candle_nn::AdamW` computes.
impl Optimizer for MgpoOptimizer {
    type Config = Config;

    /// Every floating-point variable becomes a plain tensor `param{i}`
    /// (non-float ones are ignored, as candle's AdamW does). At least one
    /// is needed. The names follow the order of `vars`, and
    /// `VarMap::all_vars` has no fixed order: to save and load checkpoints
    /// register named tensors with [`MgpoBuilder::rest_of`] or
    /// [`MgpoBuilder::varmap`] instead.
    fn new(vars: Vec<Var>, config: Config) -> candle_core::Result<Self> {
        let b = vars
            .iter()
            .filter(|v| v.dtype().is_float())
            .enumerate()
            .fold(MgpoOptimizer::builder(config), |b, (i, v)| b.plain(&format!("param{i}"), v));
        b.build().map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        MgpoOptimizer::step(self, grads).map(|_| ()).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.mgpo.lr()
    }

    /// An invalid rate (negative, not finite) is refused: the rate stays as
    /// it was and the next `step` returns the error.
    fn set_learning_rate(&mut self, lr: f64) {
        if let Err(e) = self.mgpo.set_lr(lr) {
            self.pending_error = Some(e);
        }
    }
}
