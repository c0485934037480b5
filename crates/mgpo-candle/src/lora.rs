//! [`LoraLinear`]: a `candle_nn::Linear` with a LoRA adapter, configured by
//! the [`mgpo_core::LoraConfig`] that every framework's layer takes:
//!
//! ```text
//! y = x W0^T + bias + s (dropout(x) A^T) B^T        s = lora_scale(alpha, r, rslora)
//! ```
//!
//! W0 and the bias are plain tensors, never variables, so nothing trains
//! them. A (r x in) and B (out x r) are variables of a `VarMap` under the
//! layer's prefix (`{prefix}.lora_a`, `{prefix}.lora_b`); A is initialised as
//! peft's `reset_lora_parameters` ([`LoraInit`]), B is zero, so the fresh
//! layer computes exactly what its base did. Dropout touches the adapter's
//! input only, and only in training mode.
//!
//! MGPO's `weight` space perturbs the frozen weight: W0 + c (m_B A + B m_A)
//! during the forward pass. The layer gets the same output without writing
//! W0: between `perturb` and `step` the optimizer leaves a
//! [`FactoredPerturbation`] in the adapter's [`PerturbationSlot`], and the
//! forward pass adds
//!
//! ```text
//! c [ (x A'^T) m_B^T + (x m_A^T) B'^T ]        A', B' = A, B detached
//! ```
//!
//! Detaching A and B there makes the perturbation a constant, as a
//! perturbed W0 would be, so A and B receive the gradient of the perturbed
//! model. W0 keeps its bits through any number of steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{bail, Error, Module, Result, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder};
use mgpo_core::{FactoredPerturbation, LoraConfig, LoraInit, PerturbationSlot};

/// The trainable half of a [`LoraLinear`], read by
/// [`crate::MgpoBuilder::lora`] to register it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoraAdapter {
    /// The path of its variables in the `VarMap` (`{name}.lora_a`,
    /// `{name}.lora_b`), and its name in the optimizer.
    pub name: String,
    /// A, r x in.
    pub a: Var,
    /// B, out x r.
    pub b: Var,
    /// s, the factor of B A.
    pub scale: f64,
    /// Probability of dropping an input of the adapter while training.
    pub dropout: f64,
    /// Where the optimizer leaves the weight-space perturbation for the forward pass.
    pub slot: PerturbationSlot<Tensor>,
}

impl LoraAdapter {
    /// s (dropout(x) A^T) B^T, plus the factored weight-space perturbation
    /// while the optimizer holds one.
    fn delta(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        let xd = match train && self.dropout > 0.0 {
            true => candle_nn::ops::dropout(x, self.dropout as f32)?,
            false => x.clone(),
        };
        let lora = matmul_t(&matmul_t(&xd, a)?, b)?.affine(self.scale, 0.0)?;
        self.slot.with(|p| match p {
            None => Ok(lora),
            Some(FactoredPerturbation { coef, m_b, m_a }) => {
                let via_a = matmul_t(&matmul_t(x, &a.detach())?, m_b)?;
                let via_b = matmul_t(&matmul_t(x, m_a)?, &b.detach())?;
                lora + (via_a + via_b)?.affine(*coef, 0.0)?
            }
        })
    }
}

/// x W^T for a weight W (out x in) and inputs of any batch shape, as
/// `candle_nn::Linear` computes it.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Linear::new(w.clone(), None).forward(x)
}

/// A linear layer with an optional LoRA adapter, usable wherever a
/// `candle_nn::Linear` is ([`Module`]). `Module::forward` applies dropout
/// in training mode ([`LoraLinear::set_training`]); candle's blanket
/// `ModuleT` ignores its flag, so [`LoraLinear::forward_t`] takes it
/// explicitly. Clones share the adapter's variables, slot and mode.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    adapter: Option<LoraAdapter>,
    /// While merged: one `Linear` of weight W0 + s B A (W0 is kept as it was).
    merged: Option<Linear>,
    training: Arc<AtomicBool>,
}

impl LoraLinear {
    fn assemble(base: Linear, adapter: Option<LoraAdapter>) -> Self {
        LoraLinear { base, adapter, merged: None, training: Arc::new(AtomicBool::new(true)) }
    }

    /// `base` (weight out x in) with a new adapter of `cfg`, its variables
    /// `lora_a` and `lora_b` created under `vb` (named after `vb`'s prefix).
    /// Starts in training mode, as a fresh torch module.
    pub fn new(base: Linear, cfg: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(Error::wrap)?;
        let (out, inp) = base.weight().dims2()?;
        let init = match cfg.init {
            // kaiming_uniform_(a = sqrt 5) has bound sqrt(6 / (1 + 5)) sqrt(3 / in) = 1 / sqrt(in).
            LoraInit::Kaiming => {
                let bound = (inp.max(1) as f64).sqrt().recip();
                Init::Uniform { lo: -bound, up: bound }
            }
            LoraInit::Gaussian => Init::Randn { mean: 0.0, stdev: (cfg.rank as f64).recip() },
        };
        let a = vb.get_with_hints((cfg.rank, inp), "lora_a", init)?;
        let b = vb.get_with_hints((out, cfg.rank), "lora_b", Init::Const(0.0))?;
        // From a VarMap these are its variables, and Var::from_tensor shares their storage.
        Self::from_parts(base, &vb.prefix(), Var::from_tensor(&a)?, Var::from_tensor(&b)?, cfg.scale(), cfg.dropout)
    }

    /// `base` with an adapter made of existing variables (loaded from a
    /// checkpoint, say): A (r x in), B (out x r), scaling s, dropout.
    pub fn from_parts(base: Linear, name: &str, a: Var, b: Var, scale: f64, dropout: f64) -> Result<Self> {
        let w0 = base.weight();
        let (out, inp) = w0.dims2()?;
        let ((r, a_in), (b_out, b_r)) = (a.dims2()?, b.dims2()?);
        if r == 0 || a_in != inp || b_out != out || b_r != r {
            bail!("adapter {name}: A {:?} (r x in) and B {:?} (out x r) do not fit W0 {:?}", a.dims(), b.dims(), w0.dims())
        }
        if a.dtype() != w0.dtype() || b.dtype() != w0.dtype() || !a.device().same_device(w0.device()) || !b.device().same_device(w0.device()) {
            bail!("adapter {name}: A, B and W0 must share one dtype and device")
        }
        if !scale.is_finite() || !(0.0..1.0).contains(&dropout) {
            bail!("adapter {name}: the scaling must be finite and the dropout in [0, 1), got {scale} and {dropout}")
        }
        let slot = PerturbationSlot::default();
        Ok(Self::assemble(base, Some(LoraAdapter { name: name.to_string(), a, b, scale, dropout, slot })))
    }

    /// The base layer without an adapter.
    pub fn frozen(base: Linear) -> Self {
        Self::assemble(base, None)
    }

    /// W0 and its bias.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// The adapter, if the layer has one.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Training mode: [`Module::forward`] applies the adapter's dropout.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed)
    }

    /// Whether [`Module::forward`] applies dropout.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The layer's output, with dropout when `train`; while merged, the
    /// merged layer's.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match (&self.merged, &self.adapter) {
            (Some(merged), _) => merged.forward(x),
            (None, None) => self.base.forward(x),
            (None, Some(ad)) => self.base.forward(x)? + ad.delta(x, train)?,
        }
    }

    /// W0 + s B A (out x in), outside the autograd graph.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w0 = self.base.weight();
        let w = match &self.adapter {
            Some(ad) => (w0 + ad.b.as_tensor().matmul(ad.a.as_tensor())?.affine(ad.scale, 0.0)?)?,
            None => w0.clone(),
        };
        Ok(w.detach())
    }

    /// Replaces the forward pass by one `Linear` of weight W0 + s B A, for
    /// inference (A and B get no gradient while merged). W0 is kept, so
    /// [`LoraLinear::unmerge`] gives back the exact layer; merging again
    /// takes the current A and B. Call it between steps, when the
    /// parameters are clean.
    pub fn merge(&mut self) -> Result<()> {
        self.merged = Some(Linear::new(self.merged_weight()?, self.base.bias().cloned()));
        Ok(())
    }

    /// Back to W0 plus the adapter.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    /// Whether [`LoraLinear::merge`] is in effect.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// One `Linear` of weight W0 + s B A, for export.
    pub fn into_merged(self) -> Result<Linear> {
        Ok(Linear::new(self.merged_weight()?, self.base.bias().cloned()))
    }
}

impl Module for LoraLinear {
    /// [`LoraLinear::forward_t`] in the layer's mode.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, self.is_training())
    }
}

/// Whether the layer `name` is one of peft's `target_modules`: equal to a
/// target, or ending in `.{target}`.
pub fn is_target(name: &str, targets: &[&str]) -> bool {
    targets.iter().any(|t| name.strip_suffix(t).is_some_and(|rest| rest.is_empty() || rest.ends_with('.')))
}

/// Adds adapters to an existing model's linear layers: each `(name, linear)`
/// that [`is_target`] becomes a [`LoraLinear`] with variables under
/// `vb.pp(name)`, the others [`LoraLinear::frozen`]; the order is kept.
pub fn wrap_linears(
    layers: impl IntoIterator<Item = (String, Linear)>,
    targets: &[&str],
    cfg: &LoraConfig,
    vb: &VarBuilder,
) -> Result<Vec<(String, LoraLinear)>> {
    cfg.validate().map_err(Error::wrap)?;
    let wrap = |(name, linear): (String, Linear)| {
        let layer = if is_target(&name, targets) { LoraLinear::new(linear, cfg, vb.pp(&name))? } else { LoraLinear::frozen(linear) };
        Ok((name, layer))
    };
    layers.into_iter().map(wrap).collect()
}
