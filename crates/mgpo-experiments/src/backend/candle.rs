//! The candle backend (the embedded default): [`mgpo_candle::LoraLinear`]
//! layers over the frozen base weights and [`mgpo_candle::MgpoOptimizer`],
//! on the CPU in f32. Also trains the base network ([`pretrain`]).
//!
//! In weight space the layers normally receive MGPO's perturbation in
//! factored form and W0 is never written. The Gaussian direction in weight
//! space has no factored form, so for it each adapter is registered with
//! its layer's W0 (`adapter_with_w0`): the optimizer adds the noise to W0's
//! storage, which the layer's base `Linear` shares and reads, and removes
//! it in the step (W0 comes back within rounding, one f32 rounding per
//! step and element).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, Optimizer};
use mgpo_candle::{LoraLinear, MgpoOptimizer};

use super::{check_batch, check_spec, check_support, Backend, EvalOut, Session, SessionSpec, StepOut};
use crate::method::needs_w0_in_place;
use crate::error::Result;
use crate::model::{BaseModel, LinearWeights, INPUT, LAYERS};
use crate::rng::{derive, Rng};

/// Runs sessions on candle's CPU device (the default backend).
#[derive(Debug, Clone, Copy)]
pub struct CandleBackend;

fn tensor(v: &[f32], shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, shape, dev)?)
}

fn linear(lw: &LinearWeights, dev: &Device) -> Result<Linear> {
    Ok(Linear::new(tensor(&lw.w, &[lw.out, lw.inp], dev)?, Some(tensor(&lw.b, &[lw.out], dev)?)))
}

/// fc3(relu(fc2(relu(fc1(x))))) for any three layers.
fn mlp<M: Module>(layers: &[M], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for (i, l) in layers.iter().enumerate() {
        h = l.forward(&h)?;
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    Ok(h)
}

fn batch(x: &[f32], y: &[u32], dev: &Device) -> Result<(Tensor, Tensor)> {
    let n = check_batch(x, y)?;
    Ok((tensor(x, &[n, INPUT], dev)?, Tensor::from_slice(y, n, dev)?))
}

/// Mean cross-entropy and accuracy of `logits` against `y`.
fn loss_and_accuracy(logits: &Tensor, y: &Tensor) -> Result<(Tensor, f64)> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?;
    let hits = logits.argmax(1)?.eq(y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok((loss, hits as f64 / y.dims()[0] as f64))
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn holds_w0_in_place(&self) -> bool {
        true
    }

    fn session(&self, spec: &SessionSpec) -> Result<Box<dyn Session>> {
        check_spec(spec)?;
        check_support(self, &spec.config)?;
        let dev = Device::Cpu;
        let scale = spec.alpha / spec.rank as f64;
        let mut layers = Vec::with_capacity(LAYERS.len());
        for (l, name) in LAYERS.iter().enumerate() {
            let lw = &spec.base.layers[l];
            let a = Var::from_tensor(&tensor(&spec.init_a[l], &[spec.rank, lw.inp], &dev)?)?;
            let b = Var::zeros((lw.out, spec.rank), DType::F32, &dev)?;
            layers.push(LoraLinear::from_parts(linear(lw, &dev)?, name, a, b, scale, 0.0)?);
        }
        let opt = if needs_w0_in_place(&spec.config) {
            let with_w0 = |b: mgpo_candle::MgpoBuilder, l: &LoraLinear| match l.adapter() {
                Some(ad) => b.adapter_with_w0(&ad.name, &ad.a, &ad.b, l.base().weight(), ad.scale),
                None => b,
            };
            layers.iter().fold(MgpoOptimizer::builder(spec.config), with_w0).build()?
        } else {
            MgpoOptimizer::for_lora(&layers, spec.config)?
        };
        Ok(Box::new(CandleSession { layers, opt, dev }))
    }
}

struct CandleSession {
    layers: Vec<LoraLinear>,
    opt: MgpoOptimizer,
    dev: Device,
}

impl Session for CandleSession {
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        Ok(self.opt.set_lr(lr)?)
    }

    fn train_step(&mut self, x: &[f32], y: &[u32]) -> Result<StepOut> {
        let (x, y) = batch(x, y, &self.dev)?;
        let layers = &self.layers;
        let (loss, report) = self.opt.training_step(|| candle_nn::loss::cross_entropy(&mlp(layers, &x)?, &y))?;
        Ok(StepOut { loss: loss.to_scalar::<f32>()? as f64, report })
    }

    fn evaluate(&mut self, x: &[f32], y: &[u32]) -> Result<EvalOut> {
        let (x, y) = batch(x, y, &self.dev)?;
        let logits = mlp(&self.layers, &x)?.detach();
        let (loss, accuracy) = loss_and_accuracy(&logits, &y)?;
        Ok(EvalOut { loss: loss.to_scalar::<f32>()? as f64, accuracy })
    }

    fn shapes(&self) -> Vec<Vec<usize>> {
        self.opt.params().iter().map(|(_, t)| t.dims().to_vec()).collect()
    }

    fn params(&self) -> Result<Vec<Vec<f32>>> {
        self.opt.params().iter().map(|(_, t)| Ok(t.flatten_all()?.to_vec1::<f32>()?)).collect()
    }
}

/// How the base network is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PretrainRecipe {
    /// Passes over the pre-training data.
    pub epochs: usize,
    /// Samples per batch.
    pub batch: usize,
    /// Learning rate of the AdamW pre-training.
    pub lr: f64,
    /// Decoupled weight decay of the AdamW pre-training.
    pub weight_decay: f64,
}

/// Trains every weight of the base network from [`BaseModel::init`]`(seed)`
/// on (x, y) with AdamW, mini-batches in a seeded order; returns the
/// weights and the final training accuracy.
pub fn pretrain(x: &[f32], y: &[u32], recipe: &PretrainRecipe, seed: u64) -> Result<(BaseModel, f64)> {
    let dev = Device::Cpu;
    let n = check_batch(x, y)?;
    let init = BaseModel::init(seed);
    let mut vars = Vec::new();
    let mut layers = Vec::new();
    for lw in &init.layers {
        let w = Var::from_tensor(&tensor(&lw.w, &[lw.out, lw.inp], &dev)?)?;
        let b = Var::from_tensor(&tensor(&lw.b, &[lw.out], &dev)?)?;
        layers.push(Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())));
        vars.push(w);
        vars.push(b);
    }
    let params = candle_nn::ParamsAdamW { lr: recipe.lr, weight_decay: recipe.weight_decay, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(vars.clone(), params)?;
    let mut rng = Rng::new(derive(seed, "pretrain-batches"));
    let bs = recipe.batch.clamp(1, n);
    for _ in 0..recipe.epochs {
        let order = rng.permutation(n);
        for chunk in order.chunks(bs) {
            let xb: Vec<f32> = chunk.iter().flat_map(|&i| x[i * INPUT..(i + 1) * INPUT].iter().copied()).collect();
            let yb: Vec<u32> = chunk.iter().map(|&i| y[i]).collect();
            let (xt, yt) = batch(&xb, &yb, &dev)?;
            let loss = candle_nn::loss::cross_entropy(&mlp(&layers, &xt)?, &yt)?;
            opt.backward_step(&loss)?;
        }
    }
    let (xt, yt) = batch(x, y, &dev)?;
    let (_, acc) = loss_and_accuracy(&mlp(&layers, &xt)?, &yt)?;
    let mut out = init.clone();
    for (l, lw) in out.layers.iter_mut().enumerate() {
        lw.w = vars[2 * l].as_tensor().flatten_all()?.to_vec1::<f32>()?;
        lw.b = vars[2 * l + 1].as_tensor().to_vec1::<f32>()?;
    }
    Ok((out, acc))
}
