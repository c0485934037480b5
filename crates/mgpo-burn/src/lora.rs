//! A LoRA linear layer for burn, as peft's `lora.Linear`:
//!
//! ```text
//! y = base(x) + s * B (A (dropout(x)))        s = alpha / r   (rsLoRA: alpha / sqrt(r))
//! ```
//!
//! with the base layer (burn's `Linear`, W0 and its bias) frozen, A (r x in)
//! drawn Kaiming-uniform with a = sqrt(5) (peft's `reset_lora_parameters`:
//! U(-1/sqrt(in), 1/sqrt(in))), B (out x r) zero, so a fresh adapter leaves
//! the base output unchanged, and dropout on the adapter input only, in
//! training only (burn's `Dropout`: on an autodiff device with the training
//! flag set). A and B have peft's layout (A r x in, B out x r, where burn's
//! `Linear` stores in x out), so their values and an optimizer checkpoint
//! carry over to and from peft and the other frameworks by name.
//!
//! burn 0.22 has its own LoRA (`Module::apply_lora`), a reparameterization
//! of every 2-D parameter as `base + (alpha / r) a b` with a ~ N(0, 1/r)
//! (in x r) and b = 0 (r x out). It does not fit here: its forward pass
//! composes the dense in x out weight at every call (what MGPO's factored
//! perturbation exists to avoid), it has no adapter dropout, its init is not
//! peft's, and its factors are transposed relative to peft.
//!
//! In MGPO's `weight` space the optimizer perturbs W0 by
//! eps = coef (m_B A + B m_A). This layer never writes W0: while the
//! optimizer holds a perturbation it publishes it in the layer's
//! [`PerturbationSlot`] and the forward pass adds the same term in factored
//! form,
//!
//! ```text
//! y += coef * (m_B (A' x) + B' (m_A x))       A', B' = A, B detached
//! ```
//!
//! which is (W0 + eps) x - W0 x without forming eps, and gives A and B the
//! gradient they would get with W0 perturbed (the perturbation is a
//! constant of the forward pass). W0 stays bit-identical.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::module::linear;
use burn::tensor::{Distribution, Tensor};
use mgpo_core::{MgpoError, Result};

/// Rank, scaling and dropout of an adapter, as peft's `LoraConfig`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// r: the inner dimension of B A.
    pub rank: usize,
    /// alpha in s = alpha / r.
    pub alpha: f64,
    /// Dropout probability on the adapter input, in [0, 1).
    pub dropout: f64,
    /// rsLoRA: s = alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, rslora: false }
    }
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f64) -> Self {
        LoraConfig { rank, alpha, ..Default::default() }
    }

    /// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.rank as f64;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// Rank >= 1, finite alpha, dropout in [0, 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: String, reason| Err(MgpoError::InvalidConfig { field, value, reason });
        if self.rank == 0 {
            return bad("lora.rank", "0".into(), "must be at least 1");
        }
        if !self.alpha.is_finite() {
            return bad("lora.alpha", self.alpha.to_string(), "must be finite");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("lora.dropout", self.dropout.to_string(), "must be in [0, 1)");
        }
        Ok(())
    }
}

/// A weight-space perturbation in factored form: the layer adds
/// `coef * (m_b (A x) + B (m_a x))`. `m_b` (out x r) and `m_a` (r x in) are
/// the optimizer's first moments (handles on its memory, dropped at `step`).
#[derive(Debug, Clone)]
pub struct FactoredPerturbation {
    pub coef: f64,
    pub m_b: Tensor<2>,
    pub m_a: Tensor<2>,
}

/// Where the optimizer publishes a layer's weight-space perturbation;
/// shared by the layer, its clones and the optimizer. Empty whenever the
/// parameters are clean.
#[derive(Debug, Clone, Default)]
pub struct PerturbationSlot(Arc<Mutex<Option<FactoredPerturbation>>>);

impl PerturbationSlot {
    /// The perturbation now applied, if any.
    pub fn get(&self) -> Option<FactoredPerturbation> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, p: Option<FactoredPerturbation>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

/// A burn `Linear` with a LoRA adapter. Module paths of its parameters:
/// `base.weight` (in x out, frozen), `base.bias`, `lora_a` (r x in),
/// `lora_b` (out x r).
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    /// A, r x in.
    pub lora_a: Param<Tensor<2>>,
    /// B, out x r.
    pub lora_b: Param<Tensor<2>>,
    pub dropout: Dropout,
    /// While merged: the layer with weight W0 + s (B A)^T, frozen.
    pub merged: Option<Linear>,
    #[module(skip)]
    scale: f64,
    #[module(skip)]
    slot: PerturbationSlot,
}

impl LoraLinear {
    /// Wraps `base` (frozen here) with a new adapter of `cfg`: A
    /// Kaiming-uniform (a = sqrt 5), B zero, in W0's dtype and device.
    pub fn new(base: Linear, cfg: &LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let w = base.weight.val();
        let [inp, out] = w.dims();
        let (device, dtype) = (w.device(), w.dtype());
        // kaiming_uniform_(a = sqrt 5): gain sqrt(2 / (1 + 5)), bound
        // gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
        let bound = 1.0 / (inp.max(1) as f64).sqrt();
        let a = Tensor::<2>::random([cfg.rank, inp], Distribution::Uniform(-bound, bound), (&device, dtype));
        let b = Tensor::<2>::zeros([out, cfg.rank], (&device, dtype));
        Self::assemble(base, a, b, cfg.scale(), cfg.dropout)
    }

    /// Wraps `base` with given A (r x in) and B (out x r) and scaling s,
    /// for adapters loaded from a checkpoint (peft's layout).
    pub fn from_parts(base: Linear, a: Tensor<2>, b: Tensor<2>, scale: f64, dropout: f64) -> Result<Self> {
        let [inp, out] = base.weight.val().dims();
        let ([r, ai], [bo, br]) = (a.dims(), b.dims());
        if ai != inp || bo != out || br != r || r == 0 {
            return Err(MgpoError::AdapterShape {
                name: "LoraLinear".into(),
                detail: format!("A {:?} and B {:?} do not fit W0 (out x in) {:?}", a.dims(), b.dims(), [out, inp]),
            });
        }
        if !scale.is_finite() {
            return Err(MgpoError::InvalidConfig { field: "lora.scale", value: scale.to_string(), reason: "must be finite" });
        }
        LoraConfig { rank: r, alpha: 1.0, dropout, rslora: false }.validate()?;
        Self::assemble(base, a, b, scale, dropout)
    }

    fn assemble(base: Linear, a: Tensor<2>, b: Tensor<2>, scale: f64, dropout: f64) -> Result<Self> {
        Ok(LoraLinear {
            base: base.no_grad(),
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(dropout).init(),
            merged: None,
            scale,
            slot: PerturbationSlot::default(),
        })
    }

    /// s, the factor of B A in the forward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[0]
    }

    /// Where the optimizer publishes this layer's weight-space perturbation.
    pub fn slot(&self) -> &PerturbationSlot {
        &self.slot
    }

    /// y = base(x) + s B(A(dropout(x))) [+ the factored weight-space
    /// perturbation while the optimizer holds one]. While merged: the
    /// merged layer alone.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(m) = &self.merged {
            return m.forward(x);
        }
        let y = self.base.forward(x.clone());
        let (a, b) = (self.lora_a.val(), self.lora_b.val());
        let xd = self.dropout.forward(x.clone());
        let mut y = y + linear(linear(xd, a.clone().transpose(), None), b.clone().transpose(), None).mul_scalar(self.scale);
        if let Some(p) = self.slot.get() {
            let (a, b) = (a.detach(), b.detach());
            let t = linear(linear(x.clone(), a.transpose(), None), p.m_b.transpose(), None) + linear(linear(x, p.m_a.transpose(), None), b.transpose(), None);
            y = y + t.mul_scalar(p.coef);
        }
        y
    }

    /// W0 + s (B A)^T in burn's in x out layout: the merged weight.
    pub fn merged_weight(&self) -> Tensor<2> {
        let (a, b) = (self.lora_a.val().inner(), self.lora_b.val().inner());
        let w0 = self.base.weight.val().inner();
        let delta = b.matmul(a).mul_scalar(self.scale).transpose();
        Tensor::from_inner(w0 + delta)
    }

    /// Switches the forward pass to one layer with weight W0 + s B A (for
    /// inference: gradients no longer reach A and B). W0 is kept, so
    /// [`LoraLinear::unmerge`] restores the layer exactly. Call between
    /// steps; merging again refreshes the merged weight from A and B.
    pub fn merge(&mut self) {
        self.merged = Some(self.merged_layer());
    }

    /// Back to the base layer plus the adapter.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// The merged layer for export, without the adapter.
    pub fn into_merged(self) -> Linear {
        self.merged_layer()
    }

    fn merged_layer(&self) -> Linear {
        let bias = self.base.bias.as_ref().map(|b| Param::from_tensor(b.val()));
        Linear { weight: Param::from_tensor(self.merged_weight()), bias }.no_grad()
    }
}
