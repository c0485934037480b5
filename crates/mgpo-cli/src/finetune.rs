//! `mgpo finetune`: LoRA-MGPO on a pretrained BERT-family model (default
//! all-MiniLM-L6-v2) for text classification (default: WordNet noun
//! supersenses), writing peft-format adapters (see `mgpo_finetune`).

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mgpo_core::{Config, LoraConfig};
use mgpo_experiments::Method;
use mgpo_finetune::data::{self, PerClass};
use mgpo_finetune::peft::{load_adapter, read_adapter_config};
use mgpo_finetune::train::{self, Progress, TrainOptions, Trainer};
use mgpo_finetune::{LoraBert, ModelFiles};

#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// Model directory (Hugging Face layout: config.json, model.safetensors, tokenizer.json); scripts/fetch-minilm.sh fetches the default.
    #[arg(long, default_value = "out/models/all-MiniLM-L6-v2")]
    pub model_dir: PathBuf,
    /// Examples as .csv (header with `text` and `label`) or .jsonl (`text`, `label`), split 80/10/10 by --seed; default: WordNet supersenses.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// WordNet 3.0's data.noun (scripts/setup-wordnet.sh installs it).
    #[arg(long, default_value = "/usr/share/wordnet/data.noun")]
    pub wordnet: PathBuf,
    /// WordNet examples per class in train, validation, test.
    #[arg(long, value_delimiter = ',', default_value = "100,30,50")]
    pub per_class: Vec<usize>,
    /// A method as in `mgpo experiment`: lora, mgpo-paper, mgpo-trainer, mgpo-no-apn, lora-random, lora-clip.
    #[arg(long, default_value = "mgpo-paper", conflicts_with = "preset")]
    pub method: String,
    /// An optimizer preset instead of a method: paper-nlu, paper-nlg, trainer-nlu, trainer-nlg, adamw.
    #[arg(long)]
    pub preset: Option<String>,
    /// Peak learning rate (the paper's schedule: 3% warm-up, cosine decay).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// rsLoRA scaling alpha / sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// First adapted layer; the layers below are frozen and their outputs cached.
    #[arg(long, default_value_t = 4)]
    pub adapt_from: usize,
    /// Tokens per text (truncated and padded). The default 24 holds about 85% of the default task's glosses whole (median 15, 95th percentile 33 tokens with `[CLS]` and `[SEP]`) and keeps the head of the others; cost per step is about linear in it.
    #[arg(long, default_value_t = 24)]
    pub max_len: usize,
    /// Optimizer steps. The default (200 x 16, 3.2 epochs of the default 1000 training glosses) keeps the whole default run under 2 minutes on 2 cores (docs/finetune.md).
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Validate every this many steps.
    #[arg(long, default_value_t = 25)]
    pub eval_every: u64,
    /// Write a resumable checkpoint every this many steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Seeds the splits, the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (log.jsonl, best/, adapter/, checkpoint/, summary.json).
    #[arg(long, default_value = "out/finetune")]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoint (same options).
    #[arg(long)]
    pub resume: bool,
    /// Start from this peft adapter (its r, alpha, rsLoRA and layers replace --rank, --alpha, --rslora, --adapt-from).
    #[arg(long, conflicts_with = "resume")]
    pub adapter: Option<PathBuf>,
    /// Only evaluate (--adapter on the test split), no training.
    #[arg(long, requires = "adapter")]
    pub eval_only: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

struct Bar(Option<ProgressBar>, f64);

impl Progress for Bar {
    fn step(&mut self, step: u64, loss: f64, acc: f64) {
        if let Some(b) = &self.0 {
            b.set_position(step);
            b.set_message(format!("loss {loss:.3} acc {acc:.2} | val acc {:.3}", self.1));
        }
    }
    fn validated(&mut self, _step: u64, _loss: f64, acc: f64) {
        self.1 = acc;
    }
}

fn config(args: &FinetuneArgs) -> Result<Config, String> {
    match &args.preset {
        Some(p) => Config::preset(p, args.lr).ok_or_else(|| format!("unknown preset `{p}`; one of {}", Config::PRESETS.join(", "))),
        None => Method::parse(&args.method)
            .map(|m| m.config(args.lr, args.seed))
            .ok_or_else(|| format!("unknown method `{}`; one of {}", args.method, Method::ALL.map(|m| m.name()).join(", "))),
    }
}

pub fn run(args: FinetuneArgs) -> Result<bool, String> {
    let e = |e: mgpo_finetune::FinetuneError| e.to_string();
    let config = config(&args)?;
    let files = ModelFiles::open(&args.model_dir).map_err(e)?;
    let splits = match &args.data {
        Some(path) => {
            let (labels, examples) = data::load_file(path).map_err(e)?;
            data::split(labels, examples, args.seed).map_err(e)?
        }
        None => {
            let [train, val, test] = args.per_class[..] else {
                return Err(format!("--per-class takes three numbers (train,val,test), not {:?}", args.per_class));
            };
            data::wordnet(&args.wordnet, PerClass { train, val, test }, args.seed).map_err(e)?
        }
    };
    let (mut lora, mut first) = (LoraConfig { rslora: args.rslora, ..LoraConfig::new(args.rank, args.alpha) }, args.adapt_from);
    if let Some(a) = &args.adapter {
        let c = read_adapter_config(a).map_err(e)?;
        (lora, first) = (c.lora, c.first_adapted);
    }
    let dev = train::cpu();
    let model = LoraBert::load(&files, lora, first, splits.labels.len(), args.seed, &dev).map_err(e)?;
    if let Some(a) = &args.adapter {
        load_adapter(&model, a).map_err(e)?;
    }
    let enc = files.tokenizer(args.max_len).map_err(e)?;
    let t0 = Instant::now();
    let (tr, va, te) = train::features(&model, &enc, &splits).map_err(e)?;
    if !args.quiet {
        eprintln!(
            "data: {} labels, train {} / val {} / test {}; frozen layers 0..{first} cached in {:.1}s",
            splits.labels.len(), tr.len(), va.len(), te.len(), t0.elapsed().as_secs_f64()
        );
    }
    if args.eval_only {
        let (loss, acc) = te.evaluate(&model).map_err(e)?;
        println!("test: loss {loss:.4} acc {acc:.4}");
        return Ok(true);
    }
    let options = TrainOptions { steps: args.steps, batch: args.batch, config, eval_every: args.eval_every, checkpoint_every: args.checkpoint_every, seed: args.seed };
    let base = files.dir.display().to_string();
    let mut trainer = Trainer::new(&model, options, &args.out, &base, args.resume).map_err(e)?;
    let start = trainer.step();
    let bar = (!args.quiet).then(|| {
        let b = ProgressBar::new(args.steps).with_position(start);
        b.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}").expect("template").progress_chars("=> "));
        b
    });
    let mut progress = Bar(bar, f64::NAN);
    let secs = trainer.run_until(args.steps, &tr, &va, &mut progress).map_err(e)?;
    if let Some(b) = &progress.0 {
        b.finish();
    }
    let s = trainer.finish(&te, secs, args.steps - start).map_err(e)?;
    println!(
        "steps {}: best val acc {:.4} at step {}, test acc {:.4} (loss {:.4}); {:.1} examples/s; adapter in {}",
        s.steps, s.best_val_acc, s.best_step, s.test_acc, s.test_loss, s.examples_per_second, args.out.join("best").display()
    );
    Ok(true)
}
