//! A LoRA linear layer for candle, as peft's `lora.Linear`:
//!
//! ```text
//! y = base(x) + s * B (A (dropout(x)))        s = alpha / r   (rsLoRA: alpha / sqrt(r))
//! ```
//!
//! with the base layer (W0 and its bias) frozen and unscaled, A (r x in)
//! drawn Kaiming-uniform with a = sqrt(5) (peft's `reset_lora_parameters`:
//! U(-1/sqrt(in), 1/sqrt(in))), B (out x r) zero, so a fresh adapter leaves
//! the base output unchanged, and dropout on the adapter input only, in
//! training only.
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
use std::sync::{Arc, Mutex};

use candle_core::{bail, Module, Result, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder};

/// Rank, scaling and dropout of the adapters, as peft's `LoraConfig`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// r: the inner dimension of B A.
    pub rank: usize,
    /// alpha in s = alpha / r.
    pub alpha: f64,
    /// Dropout probability on the adapter input, in [0, 1).
    pub dropout: f32,
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
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1")
        }
        if !self.alpha.is_finite() {
            bail!("LoRA alpha must be finite, got {}", self.alpha)
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", self.dropout)
        }
        Ok(())
    }
}

/// A weight-space perturbation in factored form: the layer adds
/// `coef * (m_b (A x) + B (m_a x))`. `m_b` and `m_a` are the optimizer's
/// first moments (shared storage), valid until the step that follows.
#[derive(Debug, Clone)]
pub struct FactoredPerturbation {
    pub coef: f64,
    pub m_b: Tensor,
    pub m_a: Tensor,
}

/// Where the optimizer publishes an adapter's weight-space perturbation for
/// its layer to read; shared between the layer (and its clones) and the
/// optimizer. Empty whenever the parameters are clean.
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

/// The trainable part of a [`LoraLinear`].
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    name: String,
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    slot: PerturbationSlot,
}

impl LoraAdapter {
    /// The adapter's name: the path of its variables (`{name}.lora_a`, `{name}.lora_b`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A, r x in.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// B, out x r.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// s, the factor of B A in the forward pass.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    pub fn slot(&self) -> &PerturbationSlot {
        &self.slot
    }
}

/// x W^T with candle's batched-input handling.
fn lin(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Linear::new(w.clone(), None).forward(x)
}

/// A linear layer with an optional LoRA adapter; without one it is the
/// base layer. A drop-in for `candle_nn::Linear` (it implements
/// [`Module`]).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    adapter: Option<LoraAdapter>,
    /// The merged layer W0 + s B A while merged; W0 itself is kept untouched.
    merged: Option<Linear>,
    training: Arc<AtomicBool>,
}

impl LoraLinear {
    /// Wraps `base` (weight out x in) with a new adapter whose variables
    /// `lora_a` (A, Kaiming-uniform a = sqrt(5)) and `lora_b` (B, zero) are
    /// created under `vb`; the adapter is named after `vb`'s prefix. Starts
    /// in training mode (dropout active), as a fresh torch module.
    pub fn new(base: Linear, cfg: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (out, inp) = base.weight().dims2()?;
        // kaiming_uniform_(a = sqrt 5): gain sqrt(2 / (1 + 5)), bound
        // gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
        let bound = 1.0 / (inp.max(1) as f64).sqrt();
        let a = vb.get_with_hints((cfg.rank, inp), "lora_a", Init::Uniform { lo: -bound, up: bound })?;
        let b = vb.get_with_hints((out, cfg.rank), "lora_b", Init::Const(0.0))?;
        let adapter = LoraAdapter {
            name: vb.prefix(),
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            slot: PerturbationSlot::default(),
        };
        Ok(LoraLinear { base, adapter: Some(adapter), merged: None, training: Arc::new(AtomicBool::new(true)) })
    }

    /// Wraps `base` with given A (r x in) and B (out x r) variables and
    /// scaling s, for adapters loaded from a checkpoint.
    pub fn from_parts(base: Linear, name: &str, a: Var, b: Var, scale: f64, dropout: f32) -> Result<Self> {
        let (out, inp) = base.weight().dims2()?;
        let (r, ai) = a.dims2()?;
        let (bo, br) = b.dims2()?;
        if ai != inp || bo != out || br != r || r == 0 {
            bail!("adapter {name}: A {:?} and B {:?} do not fit W0 {:?}", a.dims(), b.dims(), (out, inp))
        }
        if a.dtype() != base.weight().dtype() || b.dtype() != a.dtype() {
            bail!("adapter {name}: A, B and W0 must share a dtype")
        }
        if !scale.is_finite() || !(0.0..1.0).contains(&dropout) {
            bail!("adapter {name}: scale must be finite and dropout in [0, 1)")
        }
        let adapter = LoraAdapter { name: name.to_string(), a, b, scale, dropout, slot: PerturbationSlot::default() };
        Ok(LoraLinear { base, adapter: Some(adapter), merged: None, training: Arc::new(AtomicBool::new(true)) })
    }

    /// The base layer alone, without an adapter.
    pub fn frozen(base: Linear) -> Self {
        LoraLinear { base, adapter: None, merged: None, training: Arc::new(AtomicBool::new(true)) }
    }

    pub fn base(&self) -> &Linear {
        &self.base
    }

    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Training mode turns the adapter's dropout on ([`Module::forward`] reads it).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// y = base(x) + s B(A(dropout(x))) [+ the factored weight-space
    /// perturbation while the optimizer holds one]; with dropout only when
    /// `train`. While merged: the merged layer alone.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(m) = &self.merged {
            return m.forward(x);
        }
        let y = self.base.forward(x)?;
        let Some(ad) = &self.adapter else { return Ok(y) };
        let xd = if train && ad.dropout > 0.0 { candle_nn::ops::dropout(x, ad.dropout)? } else { x.clone() };
        let lora = lin(&lin(&xd, ad.a.as_tensor())?, ad.b.as_tensor())?;
        let mut y = (y + lora.affine(ad.scale, 0.0)?)?;
        if let Some(p) = ad.slot.get() {
            let (a, b) = (ad.a.as_tensor().detach(), ad.b.as_tensor().detach());
            let t = (lin(&lin(x, &a)?, &p.m_b)? + lin(&lin(x, &p.m_a)?, &b)?)?;
            y = (y + t.affine(p.coef, 0.0)?)?;
        }
        Ok(y)
    }

    /// W0 + s B A (out x in), the weight of the merged layer.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w0 = self.base.weight();
        match &self.adapter {
            Some(ad) => w0 + ad.b.as_tensor().matmul(ad.a.as_tensor())?.affine(ad.scale, 0.0)?,
            None => Ok(w0.clone()),
        }
    }

    /// Switches the forward pass to one layer with weight W0 + s B A (for
    /// inference: gradients no longer reach A and B). The original W0 is
    /// kept, so [`LoraLinear::unmerge`] restores it exactly. Call between
    /// steps (the parameters are clean there); merging again refreshes the
    /// merged weight from the current A and B.
    pub fn merge(&mut self) -> Result<()> {
        let w = self.merged_weight()?.detach();
        self.merged = Some(Linear::new(w, self.base.bias().cloned()));
        Ok(())
    }

    /// Back to the base layer plus the adapter; W0 is as it was before `merge`.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// The merged layer for export, without the adapter.
    pub fn into_merged(self) -> Result<Linear> {
        let w = self.merged_weight()?.detach();
        Ok(Linear::new(w, self.base.bias().cloned()))
    }
}

impl Module for LoraLinear {
    /// [`LoraLinear::forward_t`] in the layer's mode ([`LoraLinear::set_training`]).
    /// candle implements `ModuleT` for every `Module` by ignoring its
    /// `train` flag, so `x.apply_t(&layer, train)` also follows the layer's
    /// mode; the inherent `layer.forward_t(x, train)` takes the flag.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, self.is_training())
    }
}

/// Whether a layer called `name` is one of `targets`, as peft's
/// `target_modules`: the whole name, or its last dotted components.
pub fn is_target(name: &str, targets: &[&str]) -> bool {
    targets.iter().any(|t| name == *t || name.ends_with(&format!(".{t}")))
}

/// Wraps the chosen layers of an existing model: each `(name, linear)`
/// whose name [`is_target`] gets an adapter with variables under
/// `vb.pp(name)`; the others become [`LoraLinear::frozen`]. Order is kept.
pub fn wrap_linears(
    layers: impl IntoIterator<Item = (String, Linear)>,
    targets: &[&str],
    cfg: &LoraConfig,
    vb: &VarBuilder,
) -> Result<Vec<(String, LoraLinear)>> {
    cfg.validate()?;
    layers
        .into_iter()
        .map(|(name, lin)| {
            let l = if is_target(&name, targets) { LoraLinear::new(lin, cfg, vb.pp(&name))? } else { LoraLinear::frozen(lin) };
            Ok((name, l))
        })
        .collect()
}
