//! The transformer task of a sweep, `minilm-wordnet`: a pretrained BERT
//! (all-MiniLM-L6-v2 by default) fine-tuned with LoRA on the WordNet noun
//! supersenses, the model and data of `mgpo finetune` ([`mgpo_finetune`]).
//! Its runs come out as [`RunLog`]s, so [`crate::sweep::run_sweep_with`]
//! gives them the digits sweep's files, table, decision rule and plots.
//!
//! What is frozen is computed once per sweep: the splits, tokenised and run
//! through the layers below `adapt_from`; each run then trains the adapted
//! layers and the classifier from those cached features. A seed fixes the
//! adapters' and classifier's initialisation and the batch order for every
//! method (paired seeds); the data splits are fixed by the sweep's task
//! seed. The clean training loss is the unperturbed model's loss on
//! `clean_subset` training examples spread evenly over the training split
//! (which is ordered by class, so every class is in it), evaluated with
//! the validation and test splits every `eval_every` steps.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use mgpo_core::{LoraConfig, WarmupCosine};
use mgpo_finetune::data::{self, PerClass};
use mgpo_finetune::train::{self, batch_indices, Features};
use mgpo_finetune::{LoraBert, ModelFiles};

use crate::error::{Error, Result};
use crate::rng::derive;
use crate::run::{check, digest, tensors_digest, EvalRecord, RunLog, RunSpec, StepRecord};

/// The task name in sweep specifications and output files.
pub const TASK: &str = "minilm-wordnet";

/// What the transformer task is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerSetup {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    pub model_dir: PathBuf,
    /// WordNet 3.0's `data.noun`.
    pub wordnet: PathBuf,
    /// Glosses per class in train, validation and test.
    pub per_class: PerClass,
    /// Tokens per text (truncated and padded).
    pub max_len: usize,
    /// First adapted layer; the layers below are frozen and cached.
    pub adapt_from: usize,
    /// Training examples the clean training loss is measured on (spread
    /// evenly over the class-ordered training split).
    pub clean_subset: usize,
    /// Seeds the data splits (not the runs).
    pub data_seed: u64,
}

/// The task, prepared: model files and cached frozen features.
pub struct TransformerTask {
    setup: TransformerSetup,
    files: ModelFiles,
    labels: usize,
    train: Features,
    clean: Features,
    val: Features,
    test: Features,
}

impl TransformerTask {
    /// Opens the model, builds the splits and runs them through the frozen
    /// layers once.
    pub fn prepare(setup: TransformerSetup) -> Result<Self> {
        if setup.clean_subset == 0 {
            return Err(Error::InvalidSpec("clean_subset must be at least 1".into()));
        }
        let files = ModelFiles::open(&setup.model_dir)?;
        let splits = data::wordnet(&setup.wordnet, setup.per_class, setup.data_seed)?;
        let dev = train::cpu();
        // The frozen layers do not depend on the adapters: any rank will do.
        let model = LoraBert::load(&files, LoraConfig::new(1, 1.0), setup.adapt_from, splits.labels.len(), 0, &dev)?;
        let enc = files.tokenizer(setup.max_len)?;
        let (train, val, test) = train::features(&model, &enc, &splits)?;
        let clean = train.spread(setup.clean_subset)?;
        Ok(TransformerTask { labels: splits.labels.len(), setup, files, train, clean, val, test })
    }

    /// The setup it was prepared from.
    pub fn setup(&self) -> &TransformerSetup {
        &self.setup
    }

    /// Sizes of the training, clean-loss, validation and test sets.
    pub fn sizes(&self) -> [usize; 4] {
        [self.train.len(), self.clean.len(), self.val.len(), self.test.len()]
    }

    fn evaluate(&self, model: &LoraBert, step: u64) -> Result<EvalRecord> {
        let (train_loss, train_accuracy) = self.clean.evaluate(model)?;
        let (val_loss, val_accuracy) = self.val.evaluate(model)?;
        let (test_loss, test_accuracy) = self.test.evaluate(model)?;
        Ok(EvalRecord { step, train_loss, train_accuracy, val_loss, val_accuracy, test_loss, test_accuracy })
    }

    /// One run: fresh adapters and classifier from `spec.seed`, the
    /// method's optimizer at the paper's schedule (3% warm-up, cosine
    /// decay), evaluations at step 0, every `eval_every` steps and at the
    /// end. `on_step(k)` is called after step k.
    pub fn run(&self, spec: &RunSpec, on_step: &mut dyn FnMut(u64)) -> Result<RunLog> {
        check(spec)?;
        if spec.task != TASK {
            return Err(Error::InvalidSpec(format!("spec is for task {}, this task is {TASK}", spec.task)));
        }
        let lora = LoraConfig::new(spec.rank, spec.alpha);
        let model = LoraBert::load(&self.files, lora, self.setup.adapt_from, self.labels, derive(spec.seed, "adapters"), &train::cpu())?;
        let mut opt = train::optimizer(&model, spec.method.config(spec.lr, derive(spec.seed, "noise")))?;
        let init: Vec<Vec<f32>> =
            model.trainable().iter().map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
        let init_digest = tensors_digest(&init);
        let schedule = WarmupCosine::paper(spec.lr, spec.steps);
        let order_seed = derive(spec.seed, "batches");
        let mut order = Vec::with_capacity(spec.steps as usize * spec.batch);
        let mut steps = Vec::with_capacity(spec.steps as usize);
        let mut evals = vec![self.evaluate(&model, 0)?];
        let mut train_seconds = 0.0;
        for k in 0..spec.steps {
            let idx = batch_indices(order_seed, self.train.len(), spec.batch, k);
            order.extend(idx.iter().map(|&i| i as u64));
            let (x, m, y): (Tensor, Tensor, Tensor) = self.train.select(&idx)?;
            let start = Instant::now();
            let lr = schedule.lr_at(k);
            opt.set_lr(lr)?;
            let out = train::step(&model, &mut opt, &x, &m, &y)?;
            train_seconds += start.elapsed().as_secs_f64();
            let r = &out.report;
            let pn = r.groups.iter().map(|g| g.perturbation_norm).fold(0.0, f64::max);
            steps.push(StepRecord { step: k + 1, lr, loss: out.loss, grad_norm: r.grad_norm, perturbation_norm: pn, skipped: r.skipped });
            if (k + 1) % spec.eval_every == 0 || k + 1 == spec.steps {
                evals.push(self.evaluate(&model, k + 1)?);
            }
            on_step(k + 1);
        }
        Ok(RunLog { spec: spec.clone(), backend: "candle".into(), steps, evals, train_seconds, init_digest, order_digest: digest(order) })
    }
}
