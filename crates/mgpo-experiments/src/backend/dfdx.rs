//! The dfdx backend: the network as a tuple of [`mgpo_dfdx::LoraLinear`]
//! modules and ReLUs, trained by [`mgpo_dfdx::MgpoOptimizer`], on the CPU in
//! f32. dfdx fixes shapes at compile time, so the rank is a const generic:
//! the supported ranks are [`RANKS`]. Its layers take MGPO's weight-space
//! perturbation in factored form only, so the Gaussian direction in weight
//! space (`lora-random-weight`) is refused.

use ::dfdx::nn::modules::ReLU;
use ::dfdx::nn::{BuildModule, Module, ZeroGrads};
use ::dfdx::prelude::*;
use mgpo_core::LoraConfig;
use mgpo_dfdx::{LoraLinear, MgpoOptimizer};

use super::{check_batch, check_spec, check_support, Backend, EvalOut, Session, SessionSpec, StepOut};
use crate::error::{Error, Result};
use crate::model::{CLASSES, HIDDEN, INPUT};

/// Ranks the dfdx backend is compiled for.
pub const RANKS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

type Net<const R: usize> = (
    LoraLinear<INPUT, HIDDEN, R, f32, Cpu>,
    ReLU,
    LoraLinear<HIDDEN, HIDDEN, R, f32, Cpu>,
    ReLU,
    LoraLinear<HIDDEN, CLASSES, R, f32, Cpu>,
);

/// Runs sessions on dfdx's CPU device.
#[derive(Debug, Clone, Copy)]
pub struct DfdxBackend;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("dfdx: {e}"))
}

impl Backend for DfdxBackend {
    fn name(&self) -> &'static str {
        "dfdx"
    }

    fn session(&self, spec: &SessionSpec) -> Result<Box<dyn Session>> {
        check_spec(spec)?;
        check_support(self, &spec.config)?;
        macro_rules! dispatch {
            ($($r:literal),*) => {
                match spec.rank {
                    $($r => Ok(Box::new(DfdxSession::<$r>::new(spec)?) as Box<dyn Session>),)*
                    r => Err(Error::InvalidSpec(format!("the dfdx backend is compiled for ranks {RANKS:?}, not {r}"))),
                }
            };
        }
        dispatch!(1, 2, 4, 8, 16, 32, 64, 128)
    }
}

struct DfdxSession<const R: usize> {
    dev: Cpu,
    model: Net<R>,
    opt: MgpoOptimizer<Net<R>, f32>,
    grads: Option<Gradients<f32, Cpu>>,
}

/// Sets a layer's frozen weights, its A and its scaling.
fn setup<const I: usize, const O: usize, const R: usize>(
    layer: &mut LoraLinear<I, O, R, f32, Cpu>,
    spec: &SessionSpec,
    l: usize,
) -> Result<()> {
    let lw = &spec.base.layers[l];
    layer.weight.copy_from(&lw.w);
    layer.bias.copy_from(&lw.b);
    layer.lora_a.copy_from(&spec.init_a[l]);
    layer.lora_b.fill_with_zeros();
    layer.set_config(LoraConfig::new(R, spec.alpha)).map_err(err)
}

impl<const R: usize> DfdxSession<R> {
    fn new(spec: &SessionSpec) -> Result<Self> {
        let dev = Cpu::seed_from_u64(0);
        let mut model = Net::<R>::try_build(&dev).map_err(err)?;
        setup(&mut model.0, spec, 0)?;
        setup(&mut model.2, spec, 1)?;
        setup(&mut model.4, spec, 2)?;
        let opt = MgpoOptimizer::new(&model, spec.config)?;
        let names: Vec<&str> = opt.layout().tensors().iter().map(|t| t.name.as_str()).collect();
        if names != ["0.a", "0.b", "2.a", "2.b", "4.a", "4.b"] {
            return Err(err(format!("unexpected trainable tensors {names:?}")));
        }
        let grads = Some(model.alloc_grads());
        Ok(DfdxSession { dev, model, opt, grads })
    }

    fn input(&self, x: &[f32], n: usize) -> Tensor<(usize, Const<INPUT>), f32, Cpu> {
        self.dev.tensor_from_vec(x.to_vec(), (n, Const::<INPUT>))
    }

    /// The trainable tensors in layout order, as host vectors.
    fn trainable(&self) -> [Vec<f32>; 6] {
        let m = &self.model;
        [m.0.lora_a.as_vec(), m.0.lora_b.as_vec(), m.2.lora_a.as_vec(), m.2.lora_b.as_vec(), m.4.lora_a.as_vec(), m.4.lora_b.as_vec()]
    }
}

fn one_hot(y: &[u32]) -> Vec<f32> {
    let mut v = vec![0.0; y.len() * CLASSES];
    for (i, &c) in y.iter().enumerate() {
        v[i * CLASSES + c as usize] = 1.0;
    }
    v
}

impl<const R: usize> Session for DfdxSession<R> {
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        Ok(self.opt.set_lr(lr)?)
    }

    fn train_step(&mut self, x: &[f32], y: &[u32]) -> Result<StepOut> {
        let n = check_batch(x, y)?;
        self.opt.perturb(&mut self.model)?;
        let xt = self.input(x, n);
        let target = self.dev.tensor_from_vec(one_hot(y), (n, Const::<CLASSES>));
        let grads = self.grads.take().ok_or_else(|| err("gradients lost"))?;
        let loss = ::dfdx::losses::cross_entropy_with_logits_loss(self.model.forward(xt.traced(grads)), target);
        let value = loss.array() as f64;
        let mut grads = loss.backward();
        let report = self.opt.step(&mut self.model, &grads);
        self.model.zero_grads(&mut grads);
        self.grads = Some(grads);
        Ok(StepOut { loss: value, report: report? })
    }

    fn evaluate(&mut self, x: &[f32], y: &[u32]) -> Result<EvalOut> {
        let n = check_batch(x, y)?;
        let logits = self.model.forward(self.input(x, n)).as_vec();
        let (mut loss, mut hits) = (0.0f64, 0usize);
        for (i, &c) in y.iter().enumerate() {
            let row: Vec<f64> = logits[i * CLASSES..(i + 1) * CLASSES].iter().map(|&v| v as f64).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            loss += lse - row[c as usize];
            let arg = (0..CLASSES).fold(0, |b, k| if row[k] > row[b] { k } else { b });
            hits += (arg == c as usize) as usize;
        }
        Ok(EvalOut { loss: loss / n as f64, accuracy: hits as f64 / n as f64 })
    }

    fn shapes(&self) -> Vec<Vec<usize>> {
        self.opt.layout().tensors().iter().map(|t| t.shape.clone()).collect()
    }

    fn params(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.trainable().to_vec())
    }
}
