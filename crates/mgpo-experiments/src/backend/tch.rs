//! The tch (libtorch) backend: [`mgpo_tch::LoraLinear`] layers over the
//! frozen base weights and [`mgpo_tch::MgpoOptimizer`], on the CPU in f32.
//! Needs libtorch (`source scripts/setup-libtorch.sh`) and the `tch` feature.
//! For the Gaussian direction in weight space each adapter is registered
//! with its layer's W0 (`adapter_with_w0`), which the optimizer writes in
//! place and the layer's base `Linear` reads, as in the candle backend.

use ::tch::{nn, Device, Kind, Tensor};
use mgpo_tch::{LoraLinear, MgpoOptimizer};

use super::{check_batch, check_spec, check_support, Backend, EvalOut, Session, SessionSpec, StepOut};
use crate::method::needs_w0_in_place;
use crate::error::{Error, Result};
use crate::model::{INPUT, LAYERS};

/// Runs sessions on libtorch through tch, on the CPU.
#[derive(Debug, Clone, Copy)]
pub struct TchBackend;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("tch: {e}"))
}

fn tensor(v: &[f32], shape: &[i64]) -> Result<Tensor> {
    Tensor::f_from_slice(v).and_then(|t| t.f_view(shape)).map_err(err)
}

fn mlp(layers: &[LoraLinear], x: &Tensor) -> Result<Tensor> {
    let mut h = x.shallow_clone();
    for (i, l) in layers.iter().enumerate() {
        h = l.f_forward_t(&h, false)?;
        if i + 1 < layers.len() {
            h = h.f_relu().map_err(err)?;
        }
    }
    Ok(h)
}

fn batch(x: &[f32], y: &[u32]) -> Result<(Tensor, Tensor)> {
    let n = check_batch(x, y)?;
    let labels: Vec<i64> = y.iter().map(|&c| c as i64).collect();
    Ok((tensor(x, &[n as i64, INPUT as i64])?, Tensor::f_from_slice(&labels).map_err(err)?))
}

impl Backend for TchBackend {
    fn name(&self) -> &'static str {
        "tch"
    }

    fn holds_w0_in_place(&self) -> bool {
        true
    }

    fn session(&self, spec: &SessionSpec) -> Result<Box<dyn Session>> {
        check_spec(spec)?;
        check_support(self, &spec.config)?;
        let scale = spec.alpha / spec.rank as f64;
        let mut layers = Vec::with_capacity(LAYERS.len());
        for (l, name) in LAYERS.iter().enumerate() {
            let lw = &spec.base.layers[l];
            let (out, inp, r) = (lw.out as i64, lw.inp as i64, spec.rank as i64);
            let base = nn::Linear { ws: tensor(&lw.w, &[out, inp])?, bs: Some(tensor(&lw.b, &[out])?) };
            let a = tensor(&spec.init_a[l], &[r, inp])?.set_requires_grad(true);
            let b = Tensor::f_zeros([out, r], (Kind::Float, Device::Cpu)).map_err(err)?.set_requires_grad(true);
            layers.push(LoraLinear::from_parts(base, name, a, b, scale, 0.0)?);
        }
        let opt = if needs_w0_in_place(&spec.config) {
            let mut b = MgpoOptimizer::builder(spec.config);
            for l in &layers {
                let ad = l.adapter().ok_or_else(|| err("a layer without adapter"))?;
                b = b.adapter_with_w0(ad.name(), ad.a(), ad.b(), &l.base().ws, ad.scale());
            }
            b.build()?
        } else {
            MgpoOptimizer::for_lora(&layers, spec.config)?
        };
        Ok(Box::new(TchSession { layers, opt }))
    }
}

struct TchSession {
    layers: Vec<LoraLinear>,
    opt: MgpoOptimizer,
}

impl Session for TchSession {
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        Ok(self.opt.set_lr(lr)?)
    }

    fn train_step(&mut self, x: &[f32], y: &[u32]) -> Result<StepOut> {
        let (x, y) = batch(x, y)?;
        let layers = &self.layers;
        // Shapes and labels were checked, so the forward pass cannot fail on
        // them; a failure of libtorch itself gives a NaN loss, which the
        // optimizer skips and the error below reports.
        let mut failure = None;
        let (loss, report) = self.opt.training_step(|| match mlp(layers, &x) {
            Ok(logits) => logits.cross_entropy_for_logits(&y),
            Err(e) => {
                failure = Some(e);
                Tensor::from(f32::NAN).set_requires_grad(true)
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(StepOut { loss: loss.f_double_value(&[]).map_err(err)?, report })
    }

    fn evaluate(&mut self, x: &[f32], y: &[u32]) -> Result<EvalOut> {
        let (x, y) = batch(x, y)?;
        ::tch::no_grad(|| {
            let logits = mlp(&self.layers, &x)?;
            let loss = logits.cross_entropy_for_logits(&y).f_double_value(&[]).map_err(err)?;
            let acc = logits
                .f_argmax(1, false)
                .and_then(|a| a.f_eq_tensor(&y))
                .and_then(|e| e.f_to_kind(Kind::Double))
                .and_then(|e| e.f_mean(Kind::Double))
                .and_then(|m| m.f_double_value(&[]))
                .map_err(err)?;
            Ok(EvalOut { loss, accuracy: acc })
        })
    }

    fn shapes(&self) -> Vec<Vec<usize>> {
        self.opt.layout().tensors().iter().map(|t| t.shape.clone()).collect()
    }

    fn params(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for l in &self.layers {
            let ad = l.adapter().ok_or_else(|| err("a layer without adapter"))?;
            for t in [ad.a(), ad.b()] {
                let flat = t.f_flatten(0, -1).map_err(err)?;
                out.push(Vec::<f32>::try_from(&flat).map_err(err)?);
            }
        }
        Ok(out)
    }
}
