//! A LoRA linear layer for tch, as peft's `lora.Linear`:
//!
//! ```text
//! y = base(x) + s * B (A (dropout(x)))        s = alpha / r   (rsLoRA: alpha / sqrt(r))
//! ```
//!
//! configured by [`mgpo_core::LoraConfig`] (the one every framework's layer
//! takes), with the base layer (W0 and its bias) frozen
//! (`requires_grad = false`) and unscaled, A (r x in) drawn as peft's
//! `reset_lora_parameters` (Kaiming-uniform with a = sqrt(5), i.e.
//! U(-1/sqrt(in), 1/sqrt(in)), or N(0, 1/r^2) with [`LoraInit::Gaussian`]),
//! B (out x r) zero, so a fresh adapter leaves the base output unchanged,
//! and dropout on the adapter input only, in training only. A and B are
//! variables of a `VarStore`, named `{path}.lora_a` and `{path}.lora_b`.
//!
//! In MGPO's `weight` space the optimizer perturbs W0 by
//! eps = coef (m_B A + B m_A). This layer never writes W0: while the
//! optimizer holds a perturbation it publishes it in the adapter's
//! [`PerturbationSlot`] and the forward pass adds the same term in factored
//! form,
//!
//! ```text
//! y += coef * (m_B (A' x) + B' (m_A x))       A', B' = A, B detached
//! ```
//!
//! which is (W0 + eps) x - W0 x without ever forming eps, and gives A and B
//! the gradient they would get with W0 perturbed (the perturbation is a
//! constant of the forward pass, so no gradient flows through A', B'). W0 is
//! therefore bit-identical to its initial value after any number of steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mgpo_core::{LoraConfig, LoraInit, MgpoError, PerturbationSlot, Result};
use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

use crate::backend::err;

/// The trainable part of a [`LoraLinear`].
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    slot: PerturbationSlot<Tensor>,
}

impl LoraAdapter {
    /// The adapter's name: the path of its variables (`{name}.lora_a`, `{name}.lora_b`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A, r x in (shares storage with the var store's variable).
    pub fn a(&self) -> &Tensor {
        &self.a
    }
    /// B, out x r.
    pub fn b(&self) -> &Tensor {
        &self.b
    }
    /// s, the factor of B A in the forward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// r.
    pub fn rank(&self) -> usize {
        self.a.size()[0] as usize
    }
    /// Where the optimizer publishes this adapter's weight-space perturbation.
    pub fn slot(&self) -> &PerturbationSlot<Tensor> {
        &self.slot
    }
}

/// A linear layer with an optional LoRA adapter; without one it is the base
/// layer. A drop-in for `tch::nn::Linear` (it implements [`Module`], and so
/// `ModuleT`, whose `train` argument tch's blanket impl ignores: dropout
/// follows [`LoraLinear::set_training`], or call [`LoraLinear::forward_t`]).
#[derive(Debug)]
pub struct LoraLinear {
    base: nn::Linear,
    adapter: Option<LoraAdapter>,
    /// W0 + s B A while merged; W0 itself is kept untouched.
    merged: Option<Tensor>,
    training: Arc<AtomicBool>,
}

fn freeze(t: &Tensor) -> Tensor {
    // Shares the TensorImpl: the caller's tensor is frozen too.
    t.set_requires_grad(false)
}

fn dims2(t: &Tensor, what: &str) -> Result<(i64, i64)> {
    match t.size()[..] {
        [r, c] => Ok((r, c)),
        ref s => Err(MgpoError::Backend(format!("{what} must be a matrix, got shape {s:?}"))),
    }
}

impl LoraLinear {
    /// Wraps `base` (weight out x in) with a new adapter whose variables
    /// `lora_a` (A, initialised as `cfg.init` says) and `lora_b` (B, zero)
    /// are created under `path`; the adapter is named after `path`. The base
    /// weight and bias are frozen (`requires_grad = false`, as peft does);
    /// they may live in any var store, or none. Starts in training mode
    /// (dropout active), as a fresh torch module.
    pub fn new(base: nn::Linear, cfg: &LoraConfig, path: &nn::Path) -> Result<Self> {
        cfg.validate()?;
        let (out, inp) = dims2(&base.ws, "base weight")?;
        let r = cfg.rank as i64;
        let init = match cfg.init {
            // kaiming_uniform_(a = sqrt 5): gain sqrt(2 / (1 + 5)), bound
            // gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
            LoraInit::Kaiming => {
                let bound = 1.0 / (inp.max(1) as f64).sqrt();
                Init::Uniform { lo: -bound, up: bound }
            }
            LoraInit::Gaussian => Init::Randn { mean: 0.0, stdev: 1.0 / cfg.rank as f64 },
        };
        let a = path.f_var("lora_a", &[r, inp], init).map_err(err)?;
        let b = path.f_var("lora_b", &[out, r], Init::Const(0.0)).map_err(err)?;
        let name = path.components().collect::<Vec<_>>().join(".");
        Self::from_parts(base, &name, a, b, cfg.scale(), cfg.dropout)
    }

    /// A new layer with base weight `w0` (out x in) and `bias` copied into
    /// `path` as non-trainable variables `base.weight`, `base.bias` (saved
    /// and loaded with the var store, never listed among its trainable
    /// variables, so `VarStore::unfreeze` leaves them frozen), in the var
    /// store's kind and on its device, plus a new adapter under `path`.
    pub fn from_pretrained(w0: &Tensor, bias: Option<&Tensor>, cfg: &LoraConfig, path: &nn::Path) -> Result<Self> {
        let base_path = path / "base";
        let frozen_copy = |name: &str, t: &Tensor| -> Result<Tensor> {
            let t = t.f_detach_copy().and_then(|t| t.f_to_kind(path.kind())).and_then(|t| t.f_to_device(path.device()));
            Ok(base_path.add(name, t.map_err(err)?, false))
        };
        let ws = frozen_copy("weight", w0)?;
        let bs = bias.map(|b| frozen_copy("bias", b)).transpose()?;
        Self::new(nn::Linear { ws, bs }, cfg, path)
    }

    /// Wraps `base` with given A (r x in) and B (out x r) tensors (e.g.
    /// variables loaded from a checkpoint) and scaling s.
    pub fn from_parts(base: nn::Linear, name: &str, a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Result<Self> {
        let (out, inp) = dims2(&base.ws, "base weight")?;
        let (r, ai) = dims2(&a, "A")?;
        let (bo, br) = dims2(&b, "B")?;
        let bad = |detail: String| MgpoError::AdapterShape { name: name.to_string(), detail };
        if ai != inp || bo != out || br != r || r == 0 {
            return Err(bad(format!("A {:?} and B {:?} do not fit W0 {:?}", a.size(), b.size(), (out, inp))));
        }
        let kind = base.ws.kind();
        if a.kind() != kind || b.kind() != kind || a.device() != base.ws.device() || b.device() != base.ws.device() {
            return Err(bad("A, B and W0 must share a dtype and a device".into()));
        }
        if !matches!(kind, Kind::Float | Kind::Double) {
            return Err(bad(format!("{kind:?} layers are not supported (f32, f64)")));
        }
        if !scale.is_finite() || !(0.0..1.0).contains(&dropout) {
            return Err(bad("scale must be finite and dropout in [0, 1)".into()));
        }
        let base = nn::Linear { ws: freeze(&base.ws), bs: base.bs.as_ref().map(freeze) };
        let adapter = LoraAdapter { name: name.to_string(), a, b, scale, dropout, slot: PerturbationSlot::default() };
        Ok(LoraLinear { base, adapter: Some(adapter), merged: None, training: Arc::new(AtomicBool::new(true)) })
    }

    /// The base layer alone, without an adapter (frozen).
    pub fn frozen(base: nn::Linear) -> Self {
        let base = nn::Linear { ws: freeze(&base.ws), bs: base.bs.as_ref().map(freeze) };
        LoraLinear { base, adapter: None, merged: None, training: Arc::new(AtomicBool::new(true)) }
    }

    /// The frozen base layer (W0 and bias).
    pub fn base(&self) -> &nn::Linear {
        &self.base
    }

    /// The adapter, or `None` for a layer left frozen.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Training mode turns the adapter's dropout on ([`Module::forward`] reads it).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Whether the adapter's dropout is on.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// y = base(x) + s B(A(dropout(x))) [+ the factored weight-space
    /// perturbation while the optimizer holds one]; dropout only when
    /// `train`. While merged: x (W0 + s B A)^T + bias alone.
    pub fn f_forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let bias = self.base.bs.as_ref();
        if let Some(w) = &self.merged {
            return x.f_linear(w, bias).map_err(err);
        }
        let y = x.f_linear(&self.base.ws, bias).map_err(err)?;
        let Some(ad) = &self.adapter else { return Ok(y) };
        let xd = if train && ad.dropout > 0.0 { x.f_dropout(ad.dropout, true).map_err(err)? } else { x.shallow_clone() };
        let lin = |x: &Tensor, w: &Tensor| x.f_linear::<&Tensor>(w, None).map_err(err);
        let lora = lin(&lin(&xd, &ad.a)?, &ad.b)?;
        let y = y.f_add(&lora.f_mul_scalar(ad.scale).map_err(err)?).map_err(err)?;
        ad.slot.with(|p| {
            let Some(p) = p else { return Ok(y) };
            let (a, b) = (ad.a.detach(), ad.b.detach());
            let t = lin(&lin(x, &a)?, &p.m_b)?.f_add(&lin(&lin(x, &p.m_a)?, &b)?).map_err(err)?;
            y.f_add(&t.f_mul_scalar(p.coef).map_err(err)?).map_err(err)
        })
    }

    /// [`LoraLinear::f_forward_t`], panicking on a libtorch error as tch's
    /// own layers do.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(x, train) {
            Ok(y) => y,
            Err(e) => panic!("LoraLinear forward: {e}"),
        }
    }

    /// W0 + s B A (out x in), detached: the weight of the merged layer.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let w0 = &self.base.ws;
        match &self.adapter {
            Some(ad) => {
                let ba = ad.b.f_mm(&ad.a).map_err(err)?;
                w0.f_add(&ba.f_mul_scalar(ad.scale).map_err(err)?).map_err(err)
            }
            None => w0.f_detach_copy().map_err(err),
        }
    }

    /// Switches the forward pass to one linear map with weight W0 + s B A
    /// (for inference: gradients no longer reach A and B). The original W0
    /// is kept, so [`LoraLinear::unmerge`] restores it exactly. Call between
    /// steps (the parameters are clean there); merging again refreshes the
    /// merged weight from the current A and B.
    pub fn merge(&mut self) -> Result<()> {
        self.merged = Some(self.merged_weight()?);
        Ok(())
    }

    /// Back to the base layer plus the adapter; W0 is as it was before `merge`.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    /// Whether s B A has been added into the base weight ([`Self::merge`]).
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// The merged layer for export, without the adapter.
    pub fn into_merged(self) -> Result<nn::Linear> {
        let ws = self.merged_weight()?;
        Ok(nn::Linear { ws, bs: self.base.bs })
    }
}

impl Module for LoraLinear {
    /// [`LoraLinear::forward_t`] in the layer's mode ([`LoraLinear::set_training`]).
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_t(xs, self.is_training())
    }
}

/// Whether a layer called `name` is one of `targets`, as peft's
/// `target_modules`: the whole name, or its last dotted components.
pub fn is_target(name: &str, targets: &[&str]) -> bool {
    targets.iter().any(|t| name == *t || name.ends_with(&format!(".{t}")))
}
