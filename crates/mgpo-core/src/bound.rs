//! The framework-neutral half of an optimizer for frameworks whose tensors
//! are shared handles (candle `Var`, `tch::Tensor`): the tensors registered
//! by name ([`Registry`]), held by the optimizer ([`Bound`]), and the
//! factored weight-space perturbation published to each LoRA layer
//! ([`PerturbationSlot`]). A framework crate adds only its idioms: building
//! from its variable stores and layers, and finding each tensor's gradient.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use crate::backend::TensorOps;
use crate::config::Config;
use crate::error::{MgpoError, Result};
use crate::layout::{LayoutBuilder, ParamGroup};
use crate::mgpo::{Mgpo, StepReport};

/// Backends whose tensors are handles to shared storage: `share` is a new
/// handle to the same storage (candle's `clone`, tch's `shallow_clone`), so
/// an update through one is seen through the other.
pub trait Shares: TensorOps {
    /// A new handle to `t`'s storage.
    fn share(&self, t: &Self::Tensor) -> Self::Tensor;
}

/// The weight-space perturbation of one adapter in factored form: its
/// layer adds `coef * (m_b (A x) + B (m_a x))` to the base output, with A
/// and B detached, so W0 is never written.
#[derive(Debug, Clone)]
pub struct FactoredPerturbation<T> {
    /// c_i = sigma rho k s_i / (n + eps).
    pub coef: f64,
    /// The first moment of B (out x r).
    pub m_b: T,
    /// The first moment of A (r x in).
    pub m_a: T,
}

/// Where the optimizer publishes an adapter's factored perturbation for
/// its layer to read during the forward pass (between `perturb` and
/// `step`); empty otherwise. Clones share the slot.
#[derive(Debug)]
pub struct PerturbationSlot<T>(Arc<Mutex<Option<FactoredPerturbation<T>>>>);

impl<T> Default for PerturbationSlot<T> {
    fn default() -> Self {
        PerturbationSlot(Arc::new(Mutex::new(None)))
    }
}

impl<T> Clone for PerturbationSlot<T> {
    fn clone(&self) -> Self {
        PerturbationSlot(Arc::clone(&self.0))
    }
}

impl<T> PerturbationSlot<T> {
    /// Runs `f` on the perturbation now applied, if any.
    pub fn with<R>(&self, f: impl FnOnce(Option<&FactoredPerturbation<T>>) -> R) -> R {
        f(self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref())
    }

    fn set(&self, p: Option<FactoredPerturbation<T>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

/// Collects tensor handles by name while a framework's optimizer is built:
/// adapters (with their W0 or their layer's [`PerturbationSlot`]), plain
/// tensors and parameter groups. The first error is kept and returned by
/// [`Registry::build`], so a framework builder can chain calls.
pub struct Registry<T> {
    config: Config,
    layout: LayoutBuilder,
    params: Vec<T>,
    w0: Vec<T>,
    slots: Vec<Option<PerturbationSlot<T>>>,
    error: Option<MgpoError>,
}

impl<T> Registry<T> {
    /// An empty registry for an optimizer with `config`.
    pub fn new(config: Config) -> Self {
        Registry {
            config,
            layout: LayoutBuilder::default(),
            params: Vec::new(),
            w0: Vec::new(),
            slots: Vec::new(),
            error: None,
        }
    }

    /// Adapter `name`: A (shape `a_shape`, r x in), B (`b_shape`, out x r),
    /// scaling s; with `w0`, weight space perturbs it in place; with `slot`,
    /// the adapter's layer reads the factored perturbation from there.
    #[allow(clippy::too_many_arguments)]
    pub fn adapter(
        &mut self,
        name: &str,
        a: T,
        b: T,
        a_shape: &[usize],
        b_shape: &[usize],
        scale: f64,
        w0: Option<T>,
        slot: Option<PerturbationSlot<T>>,
    ) {
        if self.error.is_some() {
            return;
        }
        let layout = std::mem::take(&mut self.layout);
        self.layout = layout.adapter_scaled(name, scale, a_shape, b_shape, w0.is_some());
        self.params.push(a);
        self.params.push(b);
        self.w0.extend(w0);
        self.slots.push(slot);
    }

    /// A trainable tensor outside any adapter.
    pub fn plain(&mut self, name: &str, t: T, shape: &[usize]) {
        if self.error.is_some() {
            return;
        }
        self.layout = std::mem::take(&mut self.layout).plain(name, shape);
        self.params.push(t);
    }

    /// A parameter group of the named tensors (see [`LayoutBuilder::param_group`]).
    pub fn param_group(&mut self, group: ParamGroup, tensors: &[&str]) {
        self.layout = std::mem::take(&mut self.layout).param_group(group, tensors);
    }

    /// A parameter group of the tensors whose names satisfy `pred` (see
    /// [`LayoutBuilder::param_group_where`]).
    pub fn param_group_where(
        &mut self,
        group: ParamGroup,
        pred: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) {
        self.layout = std::mem::take(&mut self.layout).param_group_where(group, pred);
    }

    /// Records an error found by the framework builder (the first one wins).
    pub fn fail(&mut self, e: MgpoError) {
        self.error.get_or_insert(e);
    }

    /// Whether any registered tensor satisfies `same` (a framework's identity test).
    pub fn contains(&self, same: impl Fn(&T) -> bool) -> bool {
        self.params.iter().chain(&self.w0).any(same)
    }

    /// The first registered tensor (to pick a default device and dtype).
    pub fn first(&self) -> Option<&T> {
        self.params.first()
    }

    /// The optimizer over `backend`, holding the registered handles.
    pub fn build<B: TensorOps<Tensor = T>>(self, backend: B) -> Result<Bound<B>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let layout = self.layout.build()?;
        let names: Vec<String> = layout.names().map(str::to_string).collect();
        let grad_names = names[..layout.tensors().len()].to_vec();
        let tensors = names
            .into_iter()
            .zip(self.params.into_iter().chain(self.w0))
            .collect();
        let mgpo = Mgpo::new(backend, self.config, layout)?;
        Ok(Bound {
            mgpo,
            tensors,
            grad_names,
            slots: self.slots,
        })
    }
}

/// LoRA-MGPO holding its tensors by name: `perturb()`, then the forward and
/// backward pass, then the framework's step with the gradients. Every call
/// checks names and shapes, and on any error the tensors are left clean.
///
/// Dereferences to its [`Mgpo`], so the learning rate, state, reports and
/// checkpoints are the same methods in every framework.
pub struct Bound<B: TensorOps> {
    mgpo: Mgpo<B>,
    tensors: Vec<(String, B::Tensor)>,
    /// The trainable tensors' names, which name their gradients.
    grad_names: Vec<String>,
    /// Per adapter.
    slots: Vec<Option<PerturbationSlot<B::Tensor>>>,
}

impl<B: Shares> Bound<B> {
    /// Adds the perturbation ([the spec](crate::spec), step 1) and publishes the
    /// factored ones to their layers. Call before the forward pass.
    pub fn perturb(&mut self) -> Result<()> {
        self.mgpo.perturb(&mut self.tensors)?;
        let be = self.mgpo.backend();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot {
                let p = self
                    .mgpo
                    .weight_perturbation(i)
                    .map(|w| FactoredPerturbation {
                        coef: w.coef,
                        m_b: be.share(w.m_b),
                        m_a: be.share(w.m_a),
                    });
                slot.set(p);
            }
        }
        Ok(())
    }

    /// Removes the perturbation and runs the step on the gradients taken at
    /// the perturbed point, one per trainable tensor in registration order
    /// (`None` where the backward pass produced none: an error naming it).
    pub fn step_grads(&mut self, grads: Vec<Option<B::Tensor>>) -> Result<StepReport> {
        let named: Vec<(&str, Option<B::Tensor>)> = self
            .grad_names
            .iter()
            .map(String::as_str)
            .zip(grads)
            .collect();
        let report = self.mgpo.step(&mut self.tensors, &named);
        self.clear_slots();
        report
    }

    /// Removes the perturbation without a step (to evaluate, or to abandon
    /// a step whose backward pass failed).
    pub fn unperturb(&mut self) -> Result<()> {
        let r = self.mgpo.unperturb(&mut self.tensors);
        self.clear_slots();
        r
    }

    /// The factored weight-space perturbation of adapter `name` now applied,
    /// for an adapter registered without W0 or slot: its forward pass must
    /// add `coef * (m_b (A x) + B (m_a x))` with A, B detached.
    pub fn weight_perturbation(
        &self,
        name: &str,
    ) -> Result<Option<FactoredPerturbation<B::Tensor>>> {
        let i = self.mgpo.layout().adapter_index(name)?;
        let be = self.mgpo.backend();
        Ok(self
            .mgpo
            .weight_perturbation(i)
            .map(|w| FactoredPerturbation {
                coef: w.coef,
                m_b: be.share(w.m_b),
                m_a: be.share(w.m_a),
            }))
    }

    fn clear_slots(&self) {
        for s in self.slots.iter().flatten() {
            s.set(None);
        }
    }
}

impl<B: TensorOps> Bound<B> {
    /// The trainable tensors, in registration order, with their names.
    pub fn params(&self) -> &[(String, B::Tensor)] {
        &self.tensors[..self.mgpo.layout().tensors().len()]
    }
}

impl<B: TensorOps> Deref for Bound<B> {
    type Target = Mgpo<B>;
    fn deref(&self) -> &Mgpo<B> {
        &self.mgpo
    }
}

impl<B: TensorOps> DerefMut for Bound<B> {
    fn deref_mut(&mut self) -> &mut Mgpo<B> {
        &mut self.mgpo
    }
}
