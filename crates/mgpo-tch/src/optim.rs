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
//! The optimizer holds shallow clones of the variables (shared storage) and
//! updates them in place under `no_grad`; nothing goes through the autograd
//! graph.

use std::collections::HashMap;

use mgpo_core::{Config, Layout, LayoutBuilder, MgpoError, Result, Space, State, StepReport};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::backend::{err, TchBackend};
use crate::lora::{FactoredPerturbation, LoraLinear, PerturbationSlot};

/// How [`MgpoBuilder::var_store`] picks adapters out of a var store by
/// name: a trainable variable `{prefix}.{a_suffix}` (A, r x in) and its
/// sibling `{prefix}.{b_suffix}` (B, out x r) form the adapter `{prefix}`.
/// The defaults are the names [`LoraLinear`] gives its variables.
#[derive(Debug, Clone, PartialEq)]
pub struct VarStoreAdapters {
    pub a_suffix: String,
    pub b_suffix: String,
    /// alpha of the adapters found by name (s = alpha / r, or alpha /
    /// sqrt(r) with `rslora`); `None` requires each of them to have been
    /// registered already with [`MgpoBuilder::lora`], which knows its s.
    pub alpha: Option<f64>,
    pub rslora: bool,
    /// In `weight` space, for an adapter found by name without its
    /// [`LoraLinear`]: the name of its frozen base weight relative to
    /// `{prefix}` (e.g. `base.weight`), which the optimizer then perturbs in
    /// place (W0 comes back within rounding, not bit-identical).
    pub w0_suffix: Option<String>,
    /// Register every other trainable variable (`requires_grad`) as a plain
    /// tensor (a classifier head, say). Frozen variables are never touched.
    pub plain: bool,
}

impl Default for VarStoreAdapters {
    fn default() -> Self {
        VarStoreAdapters {
            a_suffix: "lora_a".into(),
            b_suffix: "lora_b".into(),
            alpha: None,
            rslora: false,
            w0_suffix: None,
            plain: true,
        }
    }
}

/// Registers the tensors the optimizer owns; see [`MgpoOptimizer::builder`].
#[derive(Debug)]
pub struct MgpoBuilder {
    config: Config,
    layout: LayoutBuilder,
    params: Vec<Tensor>,
    frozen: Vec<Tensor>,
    /// Per adapter: where its layer reads the factored weight-space perturbation.
    slots: Vec<Option<PerturbationSlot>>,
    error: Option<MgpoError>,
}

/// Identity of a tensor's storage, to refuse registering one twice.
fn key(t: &Tensor) -> (usize, Vec<i64>) {
    (t.data_ptr() as usize, t.size())
}

fn dims(t: &Tensor) -> Vec<usize> {
    t.size().into_iter().map(|d| d as usize).collect()
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

    fn registered(&self, t: &Tensor) -> bool {
        let k = key(t);
        k.0 != 0 && self.params.iter().any(|p| key(p) == k)
    }

    fn push_adapter(mut self, name: &str, a: &Tensor, b: &Tensor, scale: f64, w0: Option<&Tensor>, slot: Option<PerturbationSlot>) -> Self {
        if self.error.is_some() {
            return self;
        }
        if self.registered(a) || self.registered(b) {
            return self.fail(MgpoError::DuplicateName(name.to_string()));
        }
        self = self.with_layout(|l| l.adapter_scaled(name, scale, &dims(a), &dims(b), w0.is_some()));
        self.params.push(a.shallow_clone());
        self.params.push(b.shallow_clone());
        self.frozen.extend(w0.map(Tensor::shallow_clone));
        self.slots.push(slot);
        self
    }

    /// An adapter y = W0 x + s B (A x) whose base weight the optimizer does
    /// not see. In `weight` space its perturbation is applied by the
    /// caller's forward pass, read from [`MgpoOptimizer::weight_perturbation`].
    pub fn adapter(self, name: &str, a: &Tensor, b: &Tensor, scale: f64) -> Self {
        self.push_adapter(name, a, b, scale, None, None)
    }

    /// An adapter with its base weight W0 (out x in): in `weight` space the
    /// optimizer adds the perturbation to W0 in place and subtracts it again
    /// in `step`, so W0 comes back to its value within rounding (the path
    /// the conformance vectors test). [`MgpoBuilder::lora`] avoids writing
    /// W0 at all.
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
        if self.error.is_some() {
            return self;
        }
        if self.registered(t) {
            return self.fail(MgpoError::DuplicateName(name.to_string()));
        }
        self = self.with_layout(|l| l.plain(name, &dims(t)));
        self.params.push(t.shallow_clone());
        self
    }

    /// The adapters of `vs` found by name as `spec` says (in name order,
    /// skipping those registered already with [`MgpoBuilder::lora`]), then,
    /// with `spec.plain`, every other trainable variable as a plain tensor.
    pub fn var_store(mut self, vs: &VarStore, spec: &VarStoreAdapters) -> Self {
        let vars: HashMap<String, Tensor> = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let suffix = format!(".{}", spec.a_suffix);
        for n in &names {
            let Some(prefix) = n.strip_suffix(&suffix) else { continue };
            let a = &vars[*n];
            if !a.requires_grad() || self.registered(a) {
                continue;
            }
            let b_name = format!("{prefix}.{}", spec.b_suffix);
            let Some(b) = vars.get(&b_name) else {
                return self.fail(MgpoError::UnknownName(b_name));
            };
            let Some(alpha) = spec.alpha else {
                return self.fail(MgpoError::AdapterShape {
                    name: prefix.to_string(),
                    detail: "its scaling is unknown: register its LoraLinear with .lora() or set VarStoreAdapters::alpha".into(),
                });
            };
            let r = a.size().first().copied().unwrap_or(0).max(1) as f64;
            let scale = if spec.rslora { alpha / r.sqrt() } else { alpha / r };
            let w0 = if self.config.space == Space::Weight {
                let w0 = spec.w0_suffix.as_ref().and_then(|s| vars.get(&format!("{prefix}.{s}")));
                if w0.is_none() {
                    return self.fail(MgpoError::AdapterShape {
                        name: prefix.to_string(),
                        detail: "weight space needs its LoraLinear (.lora(), factored perturbation) or its base weight (VarStoreAdapters::w0_suffix)".into(),
                    });
                }
                w0
            } else {
                None
            };
            self = self.push_adapter(prefix, a, b, scale, w0, None);
        }
        if spec.plain {
            for n in &names {
                let t = &vars[*n];
                if t.requires_grad() && !self.registered(t) {
                    self = self.plain(n, t);
                }
            }
        }
        self
    }

    pub fn build(self) -> Result<MgpoOptimizer> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let layout: Layout = self.layout.build()?;
        let first = &self.params[0];
        let (kind, device) = (first.f_kind().map_err(err)?, first.device());
        for t in self.params.iter().chain(&self.frozen) {
            let k = t.f_kind().map_err(err)?;
            if k != kind || t.device() != device {
                return Err(MgpoError::Backend(format!(
                    "all tensors must share one dtype and device: {kind:?} on {device:?} vs {k:?} on {:?}",
                    t.device()
                )));
            }
        }
        if !matches!(kind, Kind::Float | Kind::Double) {
            return Err(MgpoError::Backend(format!("{kind:?} tensors cannot be trained (f32, f64)")));
        }
        let backend = TchBackend::new(device, kind)?;
        let mgpo = mgpo_core::Mgpo::new(backend, self.config, layout)?;
        Ok(MgpoOptimizer { mgpo, params: self.params, frozen: self.frozen, slots: self.slots, last_report: None })
    }
}

/// LoRA-MGPO over tch tensors. Build it with [`MgpoOptimizer::builder`]
/// (LoRA layers, adapters, plain tensors, a var store by name),
/// [`MgpoOptimizer::from_var_store`] or [`MgpoOptimizer::for_lora`].
pub struct MgpoOptimizer {
    mgpo: mgpo_core::Mgpo<TchBackend>,
    /// Shallow clones of the variables, in layout order.
    params: Vec<Tensor>,
    frozen: Vec<Tensor>,
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

impl MgpoOptimizer {
    pub fn builder(config: Config) -> MgpoBuilder {
        MgpoBuilder {
            config,
            layout: Layout::builder(),
            params: Vec::new(),
            frozen: Vec::new(),
            slots: Vec::new(),
            error: None,
        }
    }

    /// An optimizer for the adapters of `layers` (frozen layers are skipped).
    pub fn for_lora<'a>(layers: impl IntoIterator<Item = &'a LoraLinear>, config: Config) -> Result<Self> {
        Self::builder(config).loras(layers).build()
    }

    /// An optimizer for every trainable variable of `vs`: the adapters of
    /// `layers` first (their variables must be in `vs`), then the other
    /// `lora_a`/`lora_b` pairs (which then need `alpha`), then the other
    /// trainable variables as plain tensors. See [`VarStoreAdapters`].
    pub fn from_var_store<'a>(
        vs: &VarStore,
        layers: impl IntoIterator<Item = &'a LoraLinear>,
        config: Config,
        alpha: Option<f64>,
    ) -> Result<Self> {
        let spec = VarStoreAdapters { alpha, ..VarStoreAdapters::default() };
        Self::builder(config).loras(layers).var_store(vs, &spec).build()
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
    /// the step (SPEC step 3) with each variable's `.grad()`, taken at the
    /// perturbed point. Every registered variable needs a gradient. On any
    /// error the parameters are left clean.
    pub fn step(&mut self) -> Result<StepReport> {
        let grads: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|p| {
                let g = p.grad();
                g.defined().then_some(g)
            })
            .collect();
        let result = self.mgpo.step(&mut self.params, &mut self.frozen, &grads);
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

    /// Removes the perturbation without a step (to evaluate, or to abandon
    /// a step whose backward pass failed).
    pub fn unperturb(&mut self) -> Result<()> {
        let r = self.mgpo.unperturb(&mut self.params, &mut self.frozen);
        self.clear_slots();
        r
    }

    /// Zeroes the gradients of the registered variables (libtorch
    /// accumulates them across backward passes).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
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

    fn clear_slots(&self) {
        for s in self.slots.iter().flatten() {
            s.set(None);
        }
    }

    fn weight_perturbation_at(&self, i: usize) -> Option<FactoredPerturbation> {
        self.mgpo.weight_perturbation(i).map(|w| FactoredPerturbation {
            coef: w.coef,
            m_b: w.m_b.shallow_clone(),
            m_a: w.m_a.shallow_clone(),
        })
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

    /// The variables (shallow clones), in layout order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
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

    /// The underlying optimizer.
    pub fn inner(&self) -> &mgpo_core::Mgpo<TchBackend> {
        &self.mgpo
    }
}
