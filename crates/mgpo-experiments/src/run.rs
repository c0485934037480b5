//! One fine-tuning run: a task, a method, a rank, a peak learning rate and
//! a seed, on one backend, with the paper's schedule (3% linear warm-up,
//! cosine decay to 0) and mini-batches drawn in a seeded order.
//!
//! Runs are **paired** across methods: the adapter initialisation and the
//! batch order depend on the seed only, never on the method, so for one
//! seed every method starts from the same adapters and sees the same
//! batches. Each log carries digests of both, read back from the session
//! and from the batches actually used, so a sweep can check the pairing.

use std::time::Instant;

use mgpo_core::WarmupCosine;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Session, SessionSpec};
use crate::error::{Error, Result};
use crate::method::Method;
use crate::model::{adapter_init, BaseModel, INPUT};
use crate::rng::{derive, mix, Rng};
use crate::task::Task;

pub use crate::outcome::EvalRecord;

/// What one run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Task name ([`crate::task::TASKS`]).
    pub task: String,
    /// What is trained and how ([`Method`]).
    pub method: Method,
    /// LoRA rank r of every adapter.
    pub rank: usize,
    /// LoRA alpha; the paper sets alpha = r (s = 1).
    pub alpha: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Seeds the adapter initialisation, the batch order and the noise.
    pub seed: u64,
    /// Optimizer steps to take.
    pub steps: u64,
    /// Samples per batch.
    pub batch: usize,
    /// Evaluate the clean model every this many steps (and at 0 and the end).
    pub eval_every: u64,
}

impl RunSpec {
    /// A file-name-safe label: `digits-rot_lora_r64_lr0.003_s1`.
    pub fn label(&self) -> String {
        format!("{}_{}_r{}_lr{}_s{}", self.task, self.method, self.rank, self.lr, self.seed)
    }
}

/// One training step, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based.
    pub step: u64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Batch loss where the gradient was taken (perturbed point under MGPO).
    pub loss: f64,
    /// Gradient norm the optimizer saw; NaN when the step was skipped.
    pub grad_norm: f64,
    /// Largest perturbation norm over groups (0 for plain LoRA).
    pub perturbation_norm: f64,
    /// Whether the optimizer skipped the step for a non-finite gradient.
    pub skipped: bool,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunLog {
    /// The run that was done.
    pub spec: RunSpec,
    /// Name of the backend it ran on.
    pub backend: String,
    /// Every training step, in order.
    pub steps: Vec<StepRecord>,
    /// The evaluations of the clean model, in step order.
    pub evals: Vec<EvalRecord>,
    /// Wall time of the training loop (evaluations excluded).
    pub train_seconds: f64,
    /// [`digest`] of the trainable tensors before the first step, as the session holds them.
    pub init_digest: u64,
    /// [`digest`] of the sample indices of every batch, in order.
    pub order_digest: u64,
}

impl RunLog {
    /// The logged (batch) loss of every step, in order.
    pub fn losses(&self) -> Vec<f64> {
        self.steps.iter().map(|s| s.loss).collect()
    }
}

/// Checks the parts of a spec that do not depend on the backend.
pub fn check(spec: &RunSpec) -> Result<()> {
    let bad = |s: String| Err(Error::InvalidSpec(s));
    if spec.steps == 0 {
        return bad("steps must be at least 1".into());
    }
    if spec.batch == 0 {
        return bad("batch must be at least 1".into());
    }
    if spec.rank == 0 {
        return bad("rank must be at least 1".into());
    }
    if !(spec.lr.is_finite() && spec.lr > 0.0) {
        return bad(format!("learning rate must be finite and > 0, got {}", spec.lr));
    }
    if !spec.alpha.is_finite() {
        return bad(format!("alpha must be finite, got {}", spec.alpha));
    }
    if spec.eval_every == 0 {
        return bad("eval_every must be at least 1".into());
    }
    Ok(())
}

/// A 64-bit digest of a sequence of words (splitmix64's mixer, chained):
/// equal sequences give equal digests, and different ones, in practice,
/// different digests.
pub fn digest(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(0x243f_6a88_85a3_08d3, |h, w| mix(h ^ mix(w)))
}

/// The digest of tensors' values (their f32 bits) and lengths.
pub fn tensors_digest(tensors: &[Vec<f32>]) -> u64 {
    digest(tensors.iter().flat_map(|t| std::iter::once(t.len() as u64).chain(t.iter().map(|v| v.to_bits() as u64))))
}

/// The batch order of a run: an endless stream of epochs, each a fresh
/// permutation of 0..n drawn from the run's seed (never from the method).
#[derive(Debug, Clone)]
pub struct Batches {
    rng: Rng,
    order: Vec<usize>,
    at: usize,
}

impl Batches {
    /// Batches over `n` samples, reshuffled every epoch from a stream fixed by `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        Batches { rng: Rng::new(derive(seed, "batches")), order: Vec::new(), at: n }
    }

    /// The next `size` indices (at most n) of the stream.
    pub fn next(&mut self, n: usize, size: usize) -> Vec<usize> {
        (0..size.min(n))
            .map(|_| {
                if self.at >= self.order.len() {
                    self.order = self.rng.permutation(n);
                    self.at = 0;
                }
                self.at += 1;
                self.order[self.at - 1]
            })
            .collect()
    }
}

/// The clean model after `step` steps: the clean training loss on the
/// whole training set (the fixed subset, for tasks this small), the
/// validation split and the test set.
fn evaluate(session: &mut dyn Session, task: &Task, step: u64) -> Result<EvalRecord> {
    let tr = session.evaluate(&task.train.x, &task.train.y)?;
    let va = session.evaluate(&task.val.x, &task.val.y)?;
    let te = session.evaluate(&task.test.x, &task.test.y)?;
    Ok(EvalRecord {
        step,
        train_loss: tr.loss,
        train_accuracy: tr.accuracy,
        val_loss: va.loss,
        val_accuracy: va.accuracy,
        test_loss: te.loss,
        test_accuracy: te.accuracy,
    })
}

/// Runs `spec` on `backend`; `on_step(k)` is called after step k.
pub fn run(task: &Task, base: &BaseModel, backend: &dyn Backend, spec: &RunSpec, on_step: &mut dyn FnMut(u64)) -> Result<RunLog> {
    check(spec)?;
    if spec.task != task.name {
        return Err(Error::InvalidSpec(format!("spec is for task {}, got task {}", spec.task, task.name)));
    }
    let config = spec.method.config(spec.lr, derive(spec.seed, "noise"));
    let session_spec =
        SessionSpec { base, rank: spec.rank, alpha: spec.alpha, config, init_a: adapter_init(spec.rank, derive(spec.seed, "adapters")) };
    let mut session = backend.session(&session_spec)?;
    let init_digest = tensors_digest(&session.params()?);
    let schedule = WarmupCosine::paper(spec.lr, spec.steps);
    let mut batches = Batches::new(task.train.len(), spec.seed);
    let mut order = Vec::with_capacity(spec.steps as usize * spec.batch);

    let mut steps = Vec::with_capacity(spec.steps as usize);
    let mut evals = vec![evaluate(session.as_mut(), task, 0)?];
    let mut train_seconds = 0.0;
    for k in 0..spec.steps {
        let idx = batches.next(task.train.len(), spec.batch);
        order.extend(idx.iter().map(|&i| i as u64));
        let sub = task.train.subset(&idx);
        debug_assert_eq!(sub.x.len(), idx.len() * INPUT);
        let start = Instant::now();
        let lr = schedule.lr_at(k);
        session.set_lr(lr)?;
        let out = session.train_step(&sub.x, &sub.y)?;
        train_seconds += start.elapsed().as_secs_f64();
        let r = &out.report;
        let pn = r.groups.iter().map(|g| g.perturbation_norm).fold(0.0, f64::max);
        steps.push(StepRecord { step: k + 1, lr, loss: out.loss, grad_norm: r.grad_norm, perturbation_norm: pn, skipped: r.skipped });
        if (k + 1) % spec.eval_every == 0 || k + 1 == spec.steps {
            evals.push(evaluate(session.as_mut(), task, k + 1)?);
        }
        on_step(k + 1);
    }
    let order_digest = digest(order);
    Ok(RunLog { spec: spec.clone(), backend: backend.name().to_string(), steps, evals, train_seconds, init_digest, order_digest })
}
