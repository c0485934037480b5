//! How the burn optimizer walks a module: [`Collect`] lists its float
//! parameters with their module paths, [`TakeOut`] moves the registered
//! ones (and their gradients) out so the optimizer holds the only handle,
//! [`PutBack`] returns them with their autodiff state.

use std::collections::HashMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{FloatDType, GradientCheckpointingStrategy, Tensor};

use crate::backend::BurnTensor;

/// A float parameter met by [`Collect`].
#[derive(Debug)]
pub(crate) struct Seen {
    pub(crate) id: ParamId,
    pub(crate) path: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) trainable: bool,
    pub(crate) dtype: FloatDType,
    pub(crate) device: burn::tensor::Device,
}

/// Lists a module's float parameters with their module paths.
#[derive(Default)]
pub(crate) struct Collect {
    pub(crate) path: Vec<String>,
    pub(crate) seen: Vec<Seen>,
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
pub(crate) struct Context {
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
pub(crate) struct TakeOut<'a> {
    pub(crate) index: &'a HashMap<ParamId, usize>,
    pub(crate) params: Vec<Option<(BurnTensor, Context)>>,
    pub(crate) grads: Option<(&'a mut GradientsParams, Vec<Option<BurnTensor>>)>,
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
pub(crate) struct PutBack<'a> {
    pub(crate) index: &'a HashMap<ParamId, usize>,
    pub(crate) values: Vec<Option<(BurnTensor, Context)>>,
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
