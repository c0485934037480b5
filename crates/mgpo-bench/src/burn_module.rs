//! burn's own AdamW (burn-optim's `ModuleOptimizer`) and mgpo-burn's
//! module optimizer, side by side on the same LoRA tensors: a burn module
//! holding the A and B of every adapter on burn's ndarray backend (with
//! autodiff, as in training), stepped with fixed gradients. Both take the
//! module by value and return it, as a burn training loop does, so the
//! times include the module traversals and, for MGPO, the perturbation.

use burn::module::{Module, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use mgpo_burn::{ndarray_device, MgpoOptimizer};
use mgpo_core::Config;

use crate::sizes::LoraShape;
use crate::step::filled;

/// The adapters' tensors as one burn module.
#[derive(Module, Debug)]
pub struct Adapters {
    ts: Vec<Param<Tensor<2>>>,
}

/// What steps the module.
enum Stepper {
    Burn(burn::optim::ModuleOptimizer),
    Mgpo(MgpoOptimizer),
}

/// One optimizer over a LoRA module of a [`LoraShape`], f32.
pub struct ModuleBench {
    module: Option<Adapters>,
    grads: Vec<(ParamId, Tensor<2>)>,
    stepper: Stepper,
    perturb: bool,
}

/// The variants this module measures: burn's AdamW, mgpo-burn's optimizer
/// as AdamW (rho = 0) and as MGPO in adapter space (the paper's setting).
pub const VARIANTS: [&str; 3] = ["burn-optim-adamw", "module-adamw", "module-mgpo-adapter"];

impl ModuleBench {
    /// Builds the adapters of `shape` and the optimizer of `variant` (one of [`VARIANTS`]).
    pub fn new(shape: LoraShape, variant: &str) -> Result<Self, String> {
        let dev = ndarray_device().clone().autodiff();
        let (r, d) = (shape.rank, shape.dim);
        let tensor = |dims: [usize; 2], seed: u64, scale: f64| {
            let v: Vec<f32> = filled(dims[0] * dims[1], seed, scale).into_iter().map(|x| x as f32).collect();
            Tensor::<2>::from_data(TensorData::new(v, dims), &dev)
        };
        let mut ts = Vec::with_capacity(shape.tensors());
        let mut grads = Vec::with_capacity(shape.tensors());
        for i in 0..shape.adapters as u64 {
            for (k, dims, scale) in [(0, [r, d], 1.0 / (d as f64).sqrt()), (1, [d, r], 0.01)] {
                let p = Param::from_tensor(tensor(dims, 4 * i + k, scale));
                grads.push((p.id, tensor(dims, 4 * i + k + 2, 1e-3).inner()));
                ts.push(p);
            }
        }
        let module = Adapters { ts };
        let lr = 1e-4;
        let (stepper, perturb) = match variant {
            "burn-optim-adamw" => (Stepper::Burn(AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.0).init()), false),
            "module-adamw" => (Stepper::Mgpo(MgpoOptimizer::new(&module, Config::adamw(mgpo_core::AdamWConfig { lr, weight_decay: 0.0, ..Default::default() })).map_err(|e| e.to_string())?), false),
            "module-mgpo-adapter" => (Stepper::Mgpo(MgpoOptimizer::new(&module, Config::paper_nlu(lr)).map_err(|e| e.to_string())?), true),
            other => return Err(format!("unknown burn module variant {other:?}")),
        };
        Ok(ModuleBench { module: Some(module), grads, stepper, perturb })
    }

    /// One training step's optimizer calls.
    pub fn step(&mut self) -> Result<(), String> {
        let mut m = self.module.take().ok_or("the module was lost by an earlier failed step")?;
        let mut g = GradientsParams::new();
        for (id, t) in &self.grads {
            g.register(*id, t.clone());
        }
        m = match &mut self.stepper {
            Stepper::Burn(o) => o.step(1e-4, m, g),
            Stepper::Mgpo(o) => {
                if self.perturb {
                    m = o.perturb(m).map_err(|e| e.to_string())?;
                }
                o.step(1e-4, m, g).map_err(|e| e.to_string())?
            }
        };
        self.module = Some(m);
        Ok(())
    }
}
