//! End to end: one LoRA training step (forward, backward, optimizer) of a
//! LoRA MLP on the backends with autodiff: `layers` frozen d x d linear
//! layers (W0 ~ U(+-1/sqrt d)), each with a rank-r adapter (alpha = 2 r,
//! peft's initialisation), exact GELU between them, MSE loss against a fixed
//! target, `tokens` rows of input. The optimizer is the backend's
//! `MgpoOptimizer` with the step [`Variant`]'s configuration; the
//! weight-space MGPO runs in factored form (the layer adds the
//! perturbation; W0 is never written).
//!
//! [`demo`] times the same step on the demo model of `mgpo demo`
//! (`mgpo-experiments`: an MLP 64-128-128-10 with adapters on every layer)
//! through its own training sessions, where the adapters are a much larger
//! share of the work.

use serde::{Deserialize, Serialize};

#[allow(unused_imports)]
use crate::step::{filled, Variant};

/// The model's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct E2eShape {
    /// Width of every layer (d x d W0).
    pub dim: usize,
    /// LoRA rank of every layer.
    pub rank: usize,
    /// Number of LoRA linear layers.
    pub layers: usize,
    /// Rows of the input batch.
    pub tokens: usize,
}

impl Default for E2eShape {
    fn default() -> Self {
        E2eShape { dim: 1024, rank: 8, layers: 4, tokens: 256 }
    }
}

impl E2eShape {
    /// Trainable parameters (A and B of every layer).
    pub fn params(&self) -> usize {
        2 * self.rank * self.dim * self.layers
    }

    /// The shape in words, for tables.
    pub fn describe(&self) -> String {
        format!("{} x ({}, r {}), {} tokens", self.layers, self.dim, self.rank, self.tokens)
    }
}

/// The variants run end to end (weight space in factored form).
pub const VARIANTS: [Variant; 3] = [Variant::Adamw, Variant::MgpoAdapter, Variant::MgpoWeight];

/// The end-to-end step on candle.
#[cfg(feature = "candle")]
pub mod candle {
    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::{Linear, VarBuilder, VarMap};
    use mgpo_candle::{LoraLinear, MgpoOptimizer};
    use mgpo_core::LoraConfig;

    use super::{filled, E2eShape, Variant};

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    fn tensor(rows: usize, cols: usize, seed: u64, scale: f64) -> Result<Tensor, String> {
        let v: Vec<f32> = filled(rows * cols, seed, scale).into_iter().map(|x| x as f32).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).map_err(err)
    }

    /// The LoRA MLP and its optimizer on candle.
    pub struct E2e {
        layers: Vec<LoraLinear>,
        x: Tensor,
        y: Tensor,
        opt: MgpoOptimizer,
        _varmap: VarMap,
    }

    impl E2e {
        /// Builds the model with deterministic weights and a fixed batch, and the optimizer of `variant`.
        pub fn new(shape: E2eShape, variant: Variant) -> Result<E2e, String> {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let d = shape.dim;
            let cfg = LoraConfig::new(shape.rank, 2.0 * shape.rank as f64);
            let layers = (0..shape.layers)
                .map(|i| {
                    let w0 = tensor(d, d, 100 + i as u64, 1.0 / (d as f64).sqrt())?;
                    LoraLinear::new(Linear::new(w0, None), &cfg, vb.pp(format!("l{i}"))).map_err(err)
                })
                .collect::<Result<Vec<_>, String>>()?;
            let opt = MgpoOptimizer::for_lora(&layers, variant.config()).map_err(err)?;
            let mut e = E2e { x: tensor(shape.tokens, d, 1, 1.0)?, y: tensor(shape.tokens, d, 2, 1.0)?, layers, opt, _varmap: varmap };
            e.step()?;
            e.step()?;
            Ok(e)
        }

        /// perturb, forward, backward, step.
        pub fn step(&mut self) -> Result<(), String> {
            let (layers, x, y) = (&self.layers, &self.x, &self.y);
            let (_, rep) = self
                .opt
                .training_step(|| {
                    let mut h = x.clone();
                    for (i, l) in layers.iter().enumerate() {
                        h = l.forward(&h)?;
                        if i + 1 < layers.len() {
                            h = h.gelu_erf()?;
                        }
                    }
                    candle_nn::loss::mse(&h, y)
                })
                .map_err(err)?;
            if rep.skipped {
                return Err("candle e2e: step skipped".into());
            }
            Ok(())
        }
    }
}

/// The end-to-end step on tch (libtorch).
#[cfg(feature = "tch")]
pub mod tch_e2e {
    use mgpo_tch::{LoraLinear, MgpoOptimizer};
    use mgpo_core::LoraConfig;
    use tch::{nn, Device, Kind, Reduction, Tensor};

    use super::{filled, E2eShape, Variant};

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    fn tensor(rows: usize, cols: usize, seed: u64, scale: f64) -> Tensor {
        let v: Vec<f32> = filled(rows * cols, seed, scale).into_iter().map(|x| x as f32).collect();
        Tensor::from_slice(&v).reshape([rows as i64, cols as i64])
    }

    /// The LoRA MLP and its optimizer on tch.
    pub struct E2e {
        layers: Vec<LoraLinear>,
        x: Tensor,
        y: Tensor,
        opt: MgpoOptimizer,
        _vs: nn::VarStore,
    }

    impl E2e {
        /// Builds the model with deterministic weights and a fixed batch, and the optimizer of `variant`.
        pub fn new(shape: E2eShape, variant: Variant) -> Result<E2e, String> {
            let vs = nn::VarStore::new(Device::Cpu);
            let d = shape.dim;
            let cfg = LoraConfig::new(shape.rank, 2.0 * shape.rank as f64);
            let layers = (0..shape.layers)
                .map(|i| {
                    let w0 = tensor(d, d, 100 + i as u64, 1.0 / (d as f64).sqrt());
                    LoraLinear::from_pretrained(&w0, None, &cfg, &(vs.root() / format!("l{i}"))).map_err(err)
                })
                .collect::<Result<Vec<_>, String>>()?;
            let opt = MgpoOptimizer::for_lora(&layers, variant.config()).map_err(err)?;
            let x = tensor(shape.tokens, d, 1, 1.0).to_kind(Kind::Float);
            let y = tensor(shape.tokens, d, 2, 1.0).to_kind(Kind::Float);
            let mut e = E2e { layers, x, y, opt, _vs: vs };
            e.step()?;
            e.step()?;
            Ok(e)
        }

        /// zero_grad, perturb, forward, backward, step.
        pub fn step(&mut self) -> Result<(), String> {
            let (layers, x, y) = (&self.layers, &self.x, &self.y);
            let (_, rep) = self
                .opt
                .training_step(|| {
                    let mut h = x.shallow_clone();
                    for (i, l) in layers.iter().enumerate() {
                        h = l.forward_t(&h, true);
                        if i + 1 < layers.len() {
                            h = h.gelu("none");
                        }
                    }
                    h.mse_loss(y, Reduction::Mean)
                })
                .map_err(err)?;
            if rep.skipped {
                return Err("tch e2e: step skipped".into());
            }
            Ok(())
        }
    }
}

/// The demo model of `mgpo-experiments` through its `Session`s (candle,
/// dfdx): one `train_step` (perturb, forward, backward, step) on a fixed
/// batch.
pub mod demo {
    use mgpo_experiments::backend::{by_name, names, Session, SessionSpec};
    use mgpo_experiments::model::{adapter_init, BaseModel, INPUT};

    use super::{filled, Variant};

    /// Adapter rank (alpha = r, as the demo) and batch size (the demo's).
    pub const RANK: usize = 32;
    /// Samples per batch.
    pub const BATCH: usize = 32;

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    /// The backends the demo can run on in this build.
    pub fn backends() -> Vec<&'static str> {
        names()
    }

    /// "MLP 64-128-128-10, r 32, batch 32".
    pub fn describe() -> String {
        format!("demo MLP 64-128-128-10, r {RANK}, batch {BATCH}")
    }

    /// Trainable parameters of the demo's adapters at [`RANK`].
    pub fn params() -> usize {
        mgpo_experiments::model::DIMS.iter().map(|&(out, inp)| RANK * (out + inp)).sum()
    }

    /// A demo session and its batch.
    pub struct Demo {
        session: Box<dyn Session>,
        x: Vec<f32>,
        y: Vec<u32>,
    }

    impl Demo {
        /// A demo session on `backend` with the optimizer of `variant`, after two warm-up steps.
        pub fn new(backend: &str, variant: Variant) -> Result<Demo, String> {
            let base = BaseModel::init(1);
            let spec = SessionSpec { base: &base, rank: RANK, alpha: RANK as f64, config: variant.config(), init_a: adapter_init(RANK, 2) };
            let session = by_name(backend).map_err(err)?.session(&spec).map_err(err)?;
            let x = filled(BATCH * INPUT, 3, 1.0).into_iter().map(|v| v as f32).collect();
            let y = (0..BATCH as u32).map(|i| i % 10).collect();
            let mut d = Demo { session, x, y };
            d.step()?;
            d.step()?;
            Ok(d)
        }

        /// One training step on the fixed batch; an error when the optimizer skipped it.
        pub fn step(&mut self) -> Result<(), String> {
            let out = self.session.train_step(&self.x, &self.y).map_err(err)?;
            if out.report.skipped {
                return Err("demo: step skipped".into());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo model trains under every variant on its default backend.
    #[test]
    fn demo_steps_on_candle() {
        let _lock = crate::test_lock();
        for v in VARIANTS {
            let mut d = demo::Demo::new("candle", v).unwrap();
            d.step().unwrap();
        }
        assert!(demo::params() > 0);
        assert!(demo::Demo::new("no-such-backend", Variant::Adamw).is_err());
    }
}
