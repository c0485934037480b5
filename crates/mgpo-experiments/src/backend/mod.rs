//! The frameworks a fine-tuning run can use. Each backend builds the same
//! network ([`crate::model`]) from the same host-side weights and adapter
//! initialisation, with the framework's own autodiff, LoRA layer and
//! LoRA-MGPO optimizer wrapper; a [`Session`] is one fine-tuning run.

use mgpo_core::{Config, StepReport};

use crate::error::{Error, Result};
use crate::model::BaseModel;

pub mod candle;
#[cfg(feature = "dfdx")]
pub mod dfdx;
#[cfg(feature = "tch")]
pub mod tch;

/// What a session is built from.
#[derive(Debug, Clone)]
pub struct SessionSpec<'a> {
    /// The frozen base network.
    pub base: &'a BaseModel,
    /// LoRA rank r of every adapter.
    pub rank: usize,
    /// LoRA alpha (s = alpha / r).
    pub alpha: f64,
    /// The optimizer: plain AdamW is `Config::adamw`.
    pub config: Config,
    /// Initial A of each layer (r x in, row-major); B starts at zero.
    pub init_a: Vec<Vec<f32>>,
}

/// The outcome of one training step.
#[derive(Debug, Clone)]
pub struct StepOut {
    /// Mean cross-entropy of the batch at the point where the gradient was
    /// taken (the perturbed point under MGPO): the training loss as a
    /// trainer logs it.
    pub loss: f64,
    /// What the optimizer did in this step (perturbation and gradient norms, whether it was skipped).
    pub report: StepReport,
}

/// Loss and accuracy of the clean (unperturbed) model on a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOut {
    /// Mean cross-entropy over the data set.
    pub loss: f64,
    /// Fraction of samples classified correctly, in [0, 1].
    pub accuracy: f64,
}

/// One fine-tuning run on one backend.
pub trait Session {
    /// The learning rate of the following steps.
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// One optimizer step on the batch `x` (n x 64, row-major), `y` (n):
    /// perturb (as the optimizer's configuration says), forward, backward,
    /// step.
    fn train_step(&mut self, x: &[f32], y: &[u32]) -> Result<StepOut>;

    /// Loss and accuracy of the clean model on (x, y).
    fn evaluate(&mut self, x: &[f32], y: &[u32]) -> Result<EvalOut>;

    /// Shapes of the trainable tensors, in layout order (A, B of fc1, fc2, fc3).
    fn shapes(&self) -> Vec<Vec<usize>>;

    /// Values of the trainable tensors, in layout order.
    fn params(&self) -> Result<Vec<Vec<f32>>>;
}

/// A framework that can run sessions.
pub trait Backend: Send + Sync {
    /// The name `--backend` selects it by (`candle`, `dfdx`, `tch`).
    fn name(&self) -> &'static str;
    /// Starts a fine-tuning run: the base network of `spec` with fresh adapters and optimizer.
    fn session(&self, spec: &SessionSpec) -> Result<Box<dyn Session>>;

    /// Whether its layers can compute with a W0 the optimizer writes in
    /// place, as the Gaussian direction in weight space needs
    /// ([`crate::method::needs_w0_in_place`]).
    fn holds_w0_in_place(&self) -> bool {
        false
    }
}

/// Refuses a configuration `backend` cannot run.
pub fn check_support(backend: &dyn Backend, config: &Config) -> Result<()> {
    if crate::method::needs_w0_in_place(config) && !backend.holds_w0_in_place() {
        let can: Vec<&str> = names().into_iter().filter(|n| by_name(n).is_ok_and(|b| b.holds_w0_in_place())).collect();
        return Err(Error::InvalidSpec(format!(
            "the Gaussian direction in weight space (lora-random-weight) adds noise to W0 in place, which the {} backend's layers do not read; use {}",
            backend.name(),
            can.join(" or ")
        )));
    }
    Ok(())
}

/// Names of the compiled-in backends, the default first.
pub fn names() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = vec!["candle"];
    #[cfg(feature = "dfdx")]
    v.push("dfdx");
    #[cfg(feature = "tch")]
    v.push("tch");
    v
}

/// The compiled-in backend called `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Backend>> {
    match name {
        "candle" => Ok(Box::new(candle::CandleBackend)),
        #[cfg(feature = "dfdx")]
        "dfdx" => Ok(Box::new(dfdx::DfdxBackend)),
        #[cfg(feature = "tch")]
        "tch" => Ok(Box::new(tch::TchBackend)),
        _ => Err(Error::UnknownBackend { name: name.to_string(), available: names() }),
    }
}

/// Checks a spec against the fixed architecture (shared by the backends).
pub(crate) fn check_spec(spec: &SessionSpec) -> Result<()> {
    use crate::model::DIMS;
    if spec.rank == 0 {
        return Err(Error::InvalidSpec("rank must be at least 1".into()));
    }
    if !spec.alpha.is_finite() {
        return Err(Error::InvalidSpec(format!("alpha must be finite, got {}", spec.alpha)));
    }
    if spec.base.layers.len() != DIMS.len() || spec.init_a.len() != DIMS.len() {
        return Err(Error::InvalidSpec("the base network and the adapter init must have one entry per layer".into()));
    }
    for (l, &(out, inp)) in DIMS.iter().enumerate() {
        let lw = &spec.base.layers[l];
        if (lw.out, lw.inp, lw.w.len(), lw.b.len()) != (out, inp, out * inp, out) {
            return Err(Error::InvalidSpec(format!("base layer {l} is not {out} x {inp}")));
        }
        if spec.init_a[l].len() != spec.rank * inp {
            return Err(Error::InvalidSpec(format!("initial A of layer {l} must have {} values", spec.rank * inp)));
        }
    }
    spec.config.validate()?;
    Ok(())
}

/// Checks a batch's sizes.
pub(crate) fn check_batch(x: &[f32], y: &[u32]) -> Result<usize> {
    let n = y.len();
    if n == 0 || x.len() != n * crate::model::INPUT {
        return Err(Error::InvalidSpec(format!("a batch of {n} labels needs {} inputs, got {}", n * crate::model::INPUT, x.len())));
    }
    if let Some(c) = y.iter().find(|&&c| c as usize >= crate::model::CLASSES) {
        return Err(Error::InvalidSpec(format!("label {c} out of range")));
    }
    Ok(n)
}
