//! [`MgpoOptimizer`]: LoRA-MGPO over a dfdx model, in dfdx's conventions.
//!
//! ```text
//! let mut opt = MgpoOptimizer::new(&model, config)?;   // or ::builder(config).param_group_where(..).build(&model)?
//! let mut grads = model.alloc_grads();
//! loop {
//!     opt.perturb(&mut model)?;                         // theta + eps, or the layers' factored eps_D
//!     let loss = loss_fn(model.forward(x.traced(grads)), y);
//!     grads = loss.backward();
//!     opt.step(&mut model, &grads)?;                    // or dfdx's opt.update(&mut model, &grads)
//!     model.zero_grads(&mut grads);
//! }
//! ```
//!
//! Which tensors it trains, under which names, and how a missing gradient
//! is found: `walk.rs`. Everything else is mgpo-core's [`Mgpo`].

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use dfdx::nn::tensor_collection::TensorCollection;
use dfdx::optim::{Optimizer, OptimizerUpdateError};
use dfdx::prelude::{Cpu, CpuError, Device, Gradients};
use mgpo_core::{Config, Layout, LayoutBuilder, Mgpo, MgpoError, ParamGroup, Result, StepReport};

use crate::backend::{DfdxBackend, Element};
use crate::walk::ModelTensors;

/// Starts an optimizer: parameter groups, then [`MgpoBuilder::build`] on the model.
#[derive(Debug)]
pub struct MgpoBuilder<M, E> {
    config: Config,
    layout: LayoutBuilder,
    _model: PhantomData<fn(&M) -> E>,
}

impl<M: TensorCollection<E, Cpu>, E: Element> MgpoBuilder<M, E>
where
    Cpu: Device<E>,
{
    /// A parameter group of the tensors named (layout names, e.g. `2.bias` or `0.b`).
    pub fn param_group(self, group: ParamGroup, tensors: &[&str]) -> Self {
        MgpoBuilder { layout: self.layout.param_group(group, tensors), ..self }
    }

    /// A parameter group of the tensors whose layout names satisfy `pred`,
    /// e.g. `param_group_where(ParamGroup::no_decay(), mgpo_core::is_bias_or_norm)`.
    /// dfdx names a `LayerNorm1D`'s tensors `gamma` and `beta` under the
    /// module's field name or position, so a predicate for them must test those.
    pub fn param_group_where(self, group: ParamGroup, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        MgpoBuilder { layout: self.layout.param_group_where(group, pred), ..self }
    }

    /// The optimizer for `model`'s trainable tensors, on the model's device.
    pub fn build(self, model: &M) -> Result<MgpoOptimizer<M, E>> {
        let (tensors, layout, dev) = ModelTensors::scan(model, self.config.space, self.layout)?;
        let mgpo = Mgpo::new(DfdxBackend::new(dev), self.config, layout)?;
        Ok(MgpoOptimizer { mgpo, tensors, last_error: None, _model: PhantomData })
    }
}

/// LoRA-MGPO over a dfdx model `M` on the CPU, in element type `E` (module
/// docs). Dereferences to its [`Mgpo`]: `set_lr`, `lr`, `config`, `layout`,
/// `state`, `last_report`, `save_checkpoint`, `load_checkpoint`,
/// `is_perturbed`, `weight_perturbation` are the core's.
pub struct MgpoOptimizer<M, E: Element> {
    mgpo: Mgpo<DfdxBackend<E>>,
    tensors: ModelTensors<E>,
    last_error: Option<MgpoError>,
    _model: PhantomData<fn(&M)>,
}

impl<M, E: Element> Deref for MgpoOptimizer<M, E> {
    type Target = Mgpo<DfdxBackend<E>>;
    fn deref(&self) -> &Self::Target {
        &self.mgpo
    }
}

impl<M, E: Element> DerefMut for MgpoOptimizer<M, E> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.mgpo
    }
}

impl<M: TensorCollection<E, Cpu>, E: Element> MgpoOptimizer<M, E>
where
    Cpu: Device<E>,
{
    /// Starts a builder with `config`.
    pub fn builder(config: Config) -> MgpoBuilder<M, E> {
        MgpoBuilder { config, layout: Layout::builder(), _model: PhantomData }
    }

    /// The optimizer for `model` without parameter groups, as dfdx's `Adam::new(&model, cfg)`.
    pub fn new(model: &M, config: Config) -> Result<Self> {
        Self::builder(config).build(model)
    }

    /// Adds this step's perturbation ([the spec](mgpo_core::spec), step 1): to the
    /// trainable tensors in `adapter` space, or as each layer's factored
    /// eps_D in `weight` space. Call before the forward pass. A refusal
    /// changes nothing.
    pub fn perturb(&mut self, model: &mut M) -> Result<()> {
        self.tensors.read(model, None, &self.mgpo)?;
        if let Some(e) = self.tensors.found.error.take() {
            return Err(e);
        }
        self.mgpo.perturb(&mut self.tensors.params)?;
        self.tensors.write(model, &self.mgpo)
    }

    /// Removes the perturbation, if any, without a step (to evaluate, or to
    /// abandon a step).
    pub fn unperturb(&mut self, model: &mut M) -> Result<()> {
        self.tensors.read(model, None, &self.mgpo)?;
        self.mgpo.unperturb(&mut self.tensors.params)?;
        self.tensors.write(model, &self.mgpo)
    }

    /// One optimizer step from the gradients taken at the perturbed point
    /// ([the spec](mgpo_core::spec), step 3): removes the perturbation, updates g_bar,
    /// clips, runs AdamW; a non-finite gradient makes it a no-op reported as
    /// skipped. A trainable tensor that `grads` does not hold is
    /// [`MgpoError::MissingGradient`] with its layout name. After any error
    /// (but a model whose structure changed) the model is clean and the
    /// state as it was.
    pub fn step(&mut self, model: &mut M, grads: &Gradients<E, Cpu>) -> Result<StepReport> {
        self.tensors.read(model, Some(grads), &self.mgpo)?;
        let t = &mut self.tensors;
        let result = match t.found.error.take() {
            Some(e) => {
                // The refusal is the error to report; removing the perturbation is best effort.
                let _ = self.mgpo.unperturb(&mut t.params);
                Err(e)
            }
            None => self.mgpo.step(&mut t.params, &t.grads),
        };
        self.tensors.write(model, &self.mgpo)?;
        result
    }

    /// The full error of the last failed [`Optimizer::update`].
    pub fn last_error(&self) -> Option<&MgpoError> {
        self.last_error.as_ref()
    }
}

impl<M: TensorCollection<E, Cpu>, E: Element> Optimizer<M, Cpu, E> for MgpoOptimizer<M, E>
where
    Cpu: Device<E>,
{
    /// [`MgpoOptimizer::step`] in dfdx's terms; a refused update changes
    /// nothing. Tensors without a gradient are `UnusedParams` with exactly
    /// those tensors, a failure of the dfdx device is its `DeviceError`; any
    /// other refusal (a layer merged or rescaled since the optimizer was
    /// built, a model whose structure changed) has no dfdx counterpart and
    /// is `UnusedParams` with every trainable tensor met (all of them unless
    /// the structure changed), none of which was updated.
    /// [`MgpoOptimizer::last_error`] has the typed error.
    fn update(&mut self, module: &mut M, gradients: &Gradients<E, Cpu>) -> std::result::Result<(), OptimizerUpdateError<CpuError>> {
        let Err(e) = self.step(module, gradients) else {
            self.last_error = None;
            return Ok(());
        };
        let found = std::mem::take(&mut self.tensors.found);
        let out = match (found.device, &e) {
            (Some(d), _) => OptimizerUpdateError::DeviceError(d),
            (None, MgpoError::MissingGradient(_)) => OptimizerUpdateError::UnusedParams(found.missing),
            _ => OptimizerUpdateError::UnusedParams(found.all),
        };
        self.last_error = Some(e);
        Err(out)
    }
}
