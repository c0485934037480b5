//! A LoRA linear layer for burn, as peft's `lora.Linear`, configured by the
//! [`mgpo_core::LoraConfig`] that every framework's layer takes:
//!
//! ```text
//! y = base(x) + s * B (A (dropout(x)))        s = lora_scale(alpha, r, rslora)
//! ```
//!
//! with the base layer (burn's `Linear`, W0 and its bias) frozen, A (r x in)
//! drawn as peft's `reset_lora_parameters` ([`LoraInit`]: Kaiming-uniform
//! with a = sqrt(5), U(-1/sqrt(in), 1/sqrt(in)), or N(0, 1/r^2)), B (out x r) zero, so a fresh adapter leaves
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
//! optimizer holds a perturbation it leaves it with the layer
//! ([`LoraLinear::perturbation`]) and the forward pass adds the same term
//! in factored form,
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
use mgpo_core::{FactoredPerturbation, LoraConfig, LoraInit, MgpoError, Result};

/// Where the optimizer leaves a layer's factored perturbation; shared by
/// the layer, its clones (burn moves and clones modules freely) and the
/// optimizer; empty whenever the parameters are clean. This is
/// `mgpo_core::PerturbationSlot` but for its setter, which the core keeps
/// to itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot(Arc<Mutex<Option<FactoredPerturbation<Tensor<2>>>>>);

impl Slot {
    pub(crate) fn get(&self) -> Option<FactoredPerturbation<Tensor<2>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, p: Option<FactoredPerturbation<Tensor<2>>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

/// A burn `Linear` with a LoRA adapter. Module paths of its parameters:
/// `base.weight` (in x out, frozen), `base.bias`, `lora_a` (r x in),
/// `lora_b` (out x r).
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen base layer: W0 (in x out, burn's layout) and its bias.
    pub base: Linear,
    /// A, r x in.
    pub lora_a: Param<Tensor<2>>,
    /// B, out x r.
    pub lora_b: Param<Tensor<2>>,
    /// Dropout on the adapter's input, active in training only.
    pub dropout: Dropout,
    /// While merged: the layer with weight W0 + s (B A)^T, frozen.
    pub merged: Option<Linear>,
    #[module(skip)]
    scale: f64,
    #[module(skip)]
    slot: Slot,
}

impl LoraLinear {
    /// Wraps `base` (frozen here) with a new adapter of `cfg`: A as
    /// [`LoraInit`] says, B zero, in W0's dtype and device.
    pub fn new(base: Linear, cfg: &LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let w = base.weight.val();
        let [inp, out] = w.dims();
        let (device, dtype) = (w.device(), w.dtype());
        let dist = match cfg.init {
            // kaiming_uniform_(a = sqrt 5): gain sqrt(2 / (1 + 5)), bound
            // gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
            LoraInit::Kaiming => {
                let bound = 1.0 / (inp.max(1) as f64).sqrt();
                Distribution::Uniform(-bound, bound)
            }
            LoraInit::Gaussian => Distribution::Normal(0.0, 1.0 / cfg.rank as f64),
        };
        let a = Tensor::<2>::random([cfg.rank, inp], dist, (&device, dtype));
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
        LoraConfig::new(r, 1.0).dropout(dropout).validate()?;
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
            slot: Slot::default(),
        })
    }

    /// s, the factor of B A in the forward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// r, the rows of A.
    pub fn rank(&self) -> usize {
        self.lora_a.val().dims()[0]
    }

    /// The factored weight-space perturbation the forward pass now adds
    /// (between the optimizer's `perturb` and `step`, in `weight` space).
    pub fn perturbation(&self) -> Option<FactoredPerturbation<Tensor<2>>> {
        self.slot.get()
    }

    pub(crate) fn slot(&self) -> &Slot {
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

    /// Whether the forward pass runs the merged layer.
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
