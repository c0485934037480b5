//! The fine-tuning loop: cached frozen features, LoRA-MGPO steps on the
//! paper's schedule (linear warm-up over 3% of the steps, cosine decay),
//! validation every N steps, the best adapter kept by validation accuracy,
//! test accuracy at it, a JSONL log, and checkpoints that resume exactly.
//!
//! A step k draws its batch from a pure function of (seed, k) (a seeded
//! permutation per epoch), the optimizer checkpoint holds the whole
//! optimizer state, and the adapter file holds A, B and the head in f32:
//! a run resumed from step k's checkpoint computes the same steps
//! k+1, ... as the run that never stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use mgpo_candle::MgpoOptimizer;
use mgpo_core::{Config, Space, StepReport, WarmupCosine};
use serde::{Deserialize, Serialize};

use crate::data::{Example, Splits};
use crate::error::{io, FinetuneError, Result};
use crate::model::{correct, cross_entropy, LoraBert, TextEncoder};
use crate::peft::{atomic_write, load_adapter, write_adapter};
use crate::rng::SplitMix64;

/// A split tokenised and run through the frozen layers once.
pub struct Features {
    /// Frozen-part output `[n, L, H]`.
    pub frozen: Tensor,
    /// Attention mask `[n, L]` u32.
    pub mask: Tensor,
    /// Labels `[n]` u32.
    pub labels: Tensor,
}

impl Features {
    /// Tokenises `examples` and runs the frozen layers on them in chunks of 64.
    pub fn new(model: &LoraBert, enc: &TextEncoder, examples: &[Example]) -> Result<Self> {
        let dev = model.device();
        let (mut frozen, mut mask) = (Vec::new(), Vec::new());
        for c in examples.chunks(64) {
            let texts: Vec<&str> = c.iter().map(|e| e.text.as_str()).collect();
            let e = enc.encode(&texts, dev)?;
            frozen.push(model.encode_frozen(&e)?);
            mask.push(e.mask);
        }
        if frozen.is_empty() {
            return Err(FinetuneError::Data("an empty split".into()));
        }
        let labels: Vec<u32> = examples.iter().map(|e| e.label as u32).collect();
        Ok(Features { frozen: Tensor::cat(&frozen, 0)?, mask: Tensor::cat(&mask, 0)?, labels: Tensor::new(labels, dev)? })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.dims()[0]
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows `idx`: (frozen output, mask, labels).
    pub fn select(&self, idx: &[u32]) -> Result<(Tensor, Tensor, Tensor)> {
        let i = Tensor::new(idx, self.labels.device())?;
        Ok((self.frozen.index_select(&i, 0)?, self.mask.index_select(&i, 0)?, self.labels.index_select(&i, 0)?))
    }

    /// `n` examples spread evenly over the split (rows i len / n, all of
    /// them if there are fewer): every class of a class-ordered split.
    pub fn spread(&self, n: usize) -> Result<Features> {
        let n = n.min(self.len());
        let idx: Vec<u32> = (0..n).map(|i| (i * self.len() / n) as u32).collect();
        let (frozen, mask, labels) = self.select(&idx)?;
        Ok(Features { frozen, mask, labels })
    }

    /// Mean loss and accuracy of the clean model, in batches of 128.
    pub fn evaluate(&self, model: &LoraBert) -> Result<(f64, f64)> {
        let (mut loss, mut right) = (0.0, 0usize);
        for start in (0..self.len()).step_by(128) {
            let n = 128.min(self.len() - start);
            let logits = model.logits(&self.frozen.narrow(0, start, n)?, &self.mask.narrow(0, start, n)?)?;
            let y = self.labels.narrow(0, start, n)?;
            loss += cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * n as f64;
            right += correct(&logits, &y)?;
        }
        Ok((loss / self.len() as f64, right as f64 / self.len() as f64))
    }
}

/// What a run does; everything that changes the numbers is here and in the
/// checkpoint's fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// The optimizer configuration (its `adamw.lr` is the schedule's peak).
    pub config: Config,
    /// Validate every this many steps (and after the last).
    pub eval_every: u64,
    /// Write a resumable checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Seeds the batch order.
    pub seed: u64,
}

/// One JSONL log record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Steps done.
    pub step: u64,
    /// `train` (a step) or `val` (a validation).
    pub kind: String,
    /// Loss: the batch's at the perturbed point, or the validation mean.
    pub loss: f64,
    /// Accuracy on the batch or the validation split.
    pub acc: f64,
    /// Learning rate of the step (train lines).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    /// Whether the optimizer skipped the step (non-finite gradient).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped: Option<bool>,
}

/// Trainer state stored beside the optimizer checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    best_val_acc: f64,
    best_step: u64,
    options: TrainOptions,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Steps done.
    pub steps: u64,
    /// Best validation accuracy.
    pub best_val_acc: f64,
    /// Step of the best validation accuracy (the adapter in `best/`).
    pub best_step: u64,
    /// Test accuracy of that adapter.
    pub test_acc: f64,
    /// Test loss of that adapter.
    pub test_loss: f64,
    /// Wall-clock seconds of this invocation's training steps (not the caching).
    pub train_seconds: f64,
    /// Training examples per second in those steps.
    pub examples_per_second: f64,
}

/// What the loop reports as it goes (a progress bar, say).
pub trait Progress {
    /// After each step: steps done, the batch loss and accuracy.
    fn step(&mut self, _step: u64, _loss: f64, _acc: f64) {}
    /// After each validation.
    fn validated(&mut self, _step: u64, _loss: f64, _acc: f64) {}
}

/// No reporting.
pub struct Silent;
impl Progress for Silent {}

/// The optimizer over `model`'s adapters (named by module path, with W0 in
/// `weight` space so that the perturbation lands on the pretrained weight)
/// and head (plain tensors).
pub fn optimizer(model: &LoraBert, config: Config) -> Result<MgpoOptimizer> {
    let mut b = MgpoOptimizer::builder(config);
    for t in &model.targets {
        b = match config.space {
            Space::Weight => b.adapter_with_w0(&t.name, &t.a, &t.b, &t.w0, t.scale),
            Space::Adapter => b.adapter(&t.name, &t.a, &t.b, t.scale),
        };
    }
    Ok(b.plain("classifier.weight", &model.classifier.0).plain("classifier.bias", &model.classifier.1).build()?)
}

/// The example indices of step `k` (0-based): positions k B .. (k+1) B of
/// the endless sequence of seeded per-epoch permutations of 0..n.
pub fn batch_indices(seed: u64, n: usize, batch: usize, k: u64) -> Vec<u32> {
    let mut cache: Option<(u64, Vec<u32>)> = None;
    (0..batch as u64)
        .map(|i| {
            let q = k * batch as u64 + i;
            let epoch = q / n as u64;
            if cache.as_ref().map(|c| c.0) != Some(epoch) {
                let mut p: Vec<u32> = (0..n as u32).collect();
                SplitMix64::new(seed.wrapping_mul(0x9e37_79b9).wrapping_add(epoch)).shuffle(&mut p);
                cache = Some((epoch, p));
            }
            cache.as_ref().expect("set above").1[(q % n as u64) as usize]
        })
        .collect()
}

/// A training run writing into `out`: `log.jsonl`, `best/` (the adapter
/// of the best validation accuracy), `checkpoint/` (adapter, optimizer,
/// trainer state), `adapter/` (the last adapter), `summary.json`.
pub struct Trainer<'a> {
    model: &'a LoraBert,
    opt: MgpoOptimizer,
    options: TrainOptions,
    out: PathBuf,
    base_model: String,
    state: TrainerState,
}

impl<'a> Trainer<'a> {
    /// A fresh run, or with `resume` the run continued from
    /// `out/checkpoint` (refused unless its options equal `options`).
    pub fn new(model: &'a LoraBert, options: TrainOptions, out: &Path, base_model: &str, resume: bool) -> Result<Self> {
        let opt_err = |name, detail: String| FinetuneError::Option { name, detail };
        if options.steps == 0 {
            return Err(opt_err("steps", "0: at least one step".into()));
        }
        if options.batch == 0 {
            return Err(opt_err("batch", "0: at least one example".into()));
        }
        if options.eval_every == 0 {
            return Err(opt_err("eval-every", "0: at least 1".into()));
        }
        options.config.validate()?;
        let opt = optimizer(model, options.config)?;
        std::fs::create_dir_all(out).map_err(io(out))?;
        let state = TrainerState { step: 0, best_val_acc: f64::NEG_INFINITY, best_step: 0, options: options.clone() };
        let mut t = Trainer { model, opt, options, out: out.into(), base_model: base_model.into(), state };
        if resume {
            t.resume()?;
        } else {
            let log = t.out.join("log.jsonl");
            std::fs::write(&log, b"").map_err(io(&log))?;
        }
        Ok(t)
    }

    fn resume(&mut self) -> Result<()> {
        let dir = self.out.join("checkpoint");
        let bad = |detail: String| FinetuneError::Checkpoint { dir: dir.clone(), detail };
        let text = std::fs::read_to_string(dir.join("trainer.json")).map_err(io(dir.join("trainer.json")))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(format!("trainer.json: {e}")))?;
        if state.options != self.options {
            return Err(bad(format!("written by a run with options {:?}, not {:?}", state.options, self.options)));
        }
        // The optimizer first: it checks its layout before changing anything.
        let mut opt = optimizer(self.model, self.options.config)?;
        opt.load_checkpoint(dir.join("optimizer.safetensors"))?;
        load_adapter(self.model, &dir)?;
        self.opt = opt;
        // The log keeps the lines of the steps the checkpoint holds.
        let log = self.out.join("log.jsonl");
        let kept: String = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<LogLine>(l).is_ok_and(|r| r.step <= state.step))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&log, kept).map_err(io(&log))?;
        self.state = state;
        Ok(())
    }

    /// Steps done so far.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &MgpoOptimizer {
        &self.opt
    }

    fn log(&self, line: &LogLine) -> Result<()> {
        let path = self.out.join("log.jsonl");
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&path).map_err(io(&path))?;
        writeln!(f, "{}", serde_json::to_string(line).expect("serialisable")).map_err(io(&path))
    }

    /// Writes the resumable checkpoint of the steps done so far.
    pub fn checkpoint(&self) -> Result<()> {
        let dir = self.out.join("checkpoint");
        write_adapter(self.model, &dir, &self.base_model)?;
        self.opt.save_checkpoint(dir.join("optimizer.safetensors"))?;
        atomic_write(&dir.join("trainer.json"), serde_json::to_string_pretty(&self.state).expect("serialisable").as_bytes())
    }

    fn train_step(&mut self, train: &Features) -> Result<LogLine> {
        let k = self.state.step;
        let lr = WarmupCosine::paper(self.options.config.adamw.lr, self.options.steps).lr_at(k);
        self.opt.set_lr(lr)?;
        let (x, m, y) = train.select(&batch_indices(self.options.seed, train.len(), self.options.batch, k))?;
        let out = step(self.model, &mut self.opt, &x, &m, &y)?;
        self.state.step += 1;
        Ok(LogLine { step: self.state.step, kind: "train".into(), loss: out.loss, acc: out.acc, lr: Some(lr), skipped: Some(out.report.skipped) })
    }

    /// Trains up to `until` steps (at most the options' total), validating,
    /// keeping the best adapter and checkpointing on the way.
    pub fn run_until(&mut self, until: u64, train: &Features, val: &Features, progress: &mut dyn Progress) -> Result<f64> {
        let until = until.min(self.options.steps);
        let start = Instant::now();
        while self.state.step < until {
            let line = self.train_step(train)?;
            self.log(&line)?;
            progress.step(line.step, line.loss, line.acc);
            let k = self.state.step;
            if k % self.options.eval_every == 0 || k == self.options.steps {
                let (loss, acc) = val.evaluate(self.model)?;
                self.log(&LogLine { step: k, kind: "val".into(), loss, acc, lr: None, skipped: None })?;
                progress.validated(k, loss, acc);
                if acc > self.state.best_val_acc {
                    self.state.best_val_acc = acc;
                    self.state.best_step = k;
                    write_adapter(self.model, &self.out.join("best"), &self.base_model)?;
                }
            }
            if self.options.checkpoint_every > 0 && k % self.options.checkpoint_every == 0 {
                self.checkpoint()?;
            }
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Finishes the run: the last checkpoint and adapter, then the test
    /// accuracy of the best adapter (loaded into the model, which keeps it),
    /// and `summary.json`.
    pub fn finish(self, test: &Features, train_seconds: f64, steps_timed: u64) -> Result<Summary> {
        self.checkpoint()?;
        write_adapter(self.model, &self.out.join("adapter"), &self.base_model)?;
        load_adapter(self.model, &self.out.join("best"))?;
        let (test_loss, test_acc) = test.evaluate(self.model)?;
        let s = Summary {
            steps: self.state.step,
            best_val_acc: self.state.best_val_acc,
            best_step: self.state.best_step,
            test_acc,
            test_loss,
            train_seconds,
            examples_per_second: (steps_timed * self.options.batch as u64) as f64 / train_seconds.max(1e-9),
        };
        atomic_write(&self.out.join("summary.json"), serde_json::to_string_pretty(&s).expect("serialisable").as_bytes())?;
        Ok(s)
    }
}

/// What one optimizer step saw.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The batch's loss at the perturbed point (what a trainer logs).
    pub loss: f64,
    /// The batch's accuracy there.
    pub acc: f64,
    /// The optimizer's report (norms, clipping, skipped).
    pub report: StepReport,
}

/// One step on a batch (x, m, y) at the optimizer's current learning rate:
/// perturb, sync the weights, forward, backward, project the weight
/// gradients onto the adapters, step, sync. On error the perturbation is
/// removed and the weights synced back, so the model is never left
/// perturbed.
pub fn step(model: &LoraBert, opt: &mut MgpoOptimizer, x: &Tensor, m: &Tensor, y: &Tensor) -> Result<StepOutcome> {
    opt.perturb()?;
    let inner = |opt: &mut MgpoOptimizer| -> Result<StepOutcome> {
        model.sync()?;
        let logits = model.logits(x, m)?;
        let loss = cross_entropy(&logits, y)?;
        let grads = model.project(&loss.backward()?)?;
        let acc = correct(&logits, y)? as f64 / y.dims()[0] as f64;
        let loss = loss.to_scalar::<f32>()? as f64;
        let report = opt.step(&grads)?;
        Ok(StepOutcome { loss, acc, report })
    };
    let r = inner(opt);
    if r.is_err() && opt.is_perturbed() {
        opt.unperturb()?;
    }
    model.sync()?;
    r
}

/// Caches the three splits' frozen features.
pub fn features(model: &LoraBert, enc: &TextEncoder, splits: &Splits) -> Result<(Features, Features, Features)> {
    Ok((Features::new(model, enc, &splits.train)?, Features::new(model, enc, &splits.val)?, Features::new(model, enc, &splits.test)?))
}

/// The CPU device (the loop is CPU-only here).
pub fn cpu() -> Device {
    Device::Cpu
}
