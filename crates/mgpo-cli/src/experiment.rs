//! `mgpo demo` and `mgpo experiment`: fine-tune the built-in tasks with
//! plain LoRA (with and without clipping), the LoRA-MGPO variants and their
//! random-direction controls, over ranks, learning rates and paired seeds;
//! write per-step CSVs, a summary table, the pre-registered decision rule's
//! verdicts and plots (see `mgpo_experiments::sweep` for the files).

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use mgpo_experiments::run::RunSpec;
use mgpo_experiments::metrics::MIN_RISE;
use mgpo_experiments::sweep::{markdown_table, run_sweep_with, Observer, RunSummary, SweepResult};
use mgpo_experiments::transformer::{TransformerSetup, TransformerTask, TASK};
use mgpo_experiments::{backend, run_sweep, Method, SweepSpec};
use mgpo_finetune::data::PerClass;

/// Options shared by both commands.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Backend: candle (default, pure Rust), dfdx (the CLI's dfdx feature, on by default) or tch (the tch feature; needs libtorch).
    #[arg(long, default_value = "candle")]
    pub backend: String,
    /// Where the base networks are cached (safetensors).
    #[arg(long, default_value = "out/cache")]
    pub cache: PathBuf,
    /// Seeds the task data and the base networks.
    #[arg(long, default_value_t = 0)]
    pub task_seed: u64,
    /// Runs at a time (runs are independent: the results do not depend on it).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Output directory.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Number of seeds (0, 1, ...).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Steps per run.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// Output directory.
    #[arg(long, default_value = "out/experiment")]
    pub out: PathBuf,
    /// Tasks, comma-separated (digits-rot, teacher), or minilm-wordnet alone: the pretrained transformer of `mgpo finetune` (options below; give --steps, --batch, --eval-every for it).
    #[arg(long, value_delimiter = ',', default_value = "digits-rot")]
    pub tasks: Vec<String>,
    /// Methods, comma-separated: lora, lora-clip, mgpo-paper, mgpo-trainer, mgpo-trainer-noclip, mgpo-no-apn, lora-random (adapter-space Gaussian control of mgpo-paper), lora-random-weight (weight-space Gaussian control of mgpo-trainer; candle or tch).
    #[arg(long, value_delimiter = ',', default_value = "lora,lora-clip,mgpo-paper,mgpo-trainer,mgpo-trainer-noclip,lora-random,lora-random-weight")]
    pub methods: Vec<String>,
    /// LoRA ranks, comma-separated (alpha = r unless --alpha).
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128")]
    pub ranks: Vec<usize>,
    /// Peak learning rates, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.003,0.01")]
    pub lrs: Vec<f64>,
    /// Number of paired seeds (--first-seed, +1, ...): one seed fixes the adapter initialisation and the batch order for every method.
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Evaluate the clean model every this many steps.
    #[arg(long, default_value_t = 20)]
    pub eval_every: u64,
    /// Window of the trailing mean the logged-loss rebound is measured on.
    #[arg(long, default_value_t = 20)]
    pub smooth: usize,
    /// Smallest rebound, as a fraction of the initial loss, for which a run counts as showing the three phases.
    #[arg(long, default_value_t = MIN_RISE)]
    pub min_rise: f64,
    /// LoRA alpha for every rank (default: alpha = r, as the paper).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub transformer: TransformerArgs,
}

/// The `minilm-wordnet` task's model and data (as `mgpo finetune`).
#[derive(clap::Args, Debug)]
pub struct TransformerArgs {
    /// minilm-wordnet: model directory (scripts/fetch-minilm.sh).
    #[arg(long, default_value = "out/models/all-MiniLM-L6-v2")]
    pub model_dir: PathBuf,
    /// minilm-wordnet: WordNet 3.0's data.noun (scripts/setup-wordnet.sh).
    #[arg(long, default_value = "/usr/share/wordnet/data.noun")]
    pub wordnet: PathBuf,
    /// minilm-wordnet: glosses per class in train, validation, test.
    #[arg(long, value_delimiter = ',', default_value = "100,15,20")]
    pub per_class: Vec<usize>,
    /// minilm-wordnet: tokens per text.
    #[arg(long, default_value_t = 24)]
    pub max_len: usize,
    /// minilm-wordnet: first adapted layer (the layers below are frozen and cached once for the sweep).
    #[arg(long, default_value_t = 5)]
    pub adapt_from: usize,
    /// minilm-wordnet: training examples the clean training loss is measured on (spread evenly over the class-ordered training split).
    #[arg(long, default_value_t = 150)]
    pub clean_subset: usize,
}

fn methods(names: &[String]) -> Result<Vec<Method>, String> {
    names
        .iter()
        .map(|n| {
            Method::parse(n.trim()).ok_or_else(|| {
                format!("unknown method `{n}`; one of {}", Method::ALL.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "))
            })
        })
        .collect()
}

/// The demo's sweep: the real-data task, a low and a high rank at a high
/// learning rate, plain LoRA (with and without clipping) against both MGPO
/// variants.
pub fn demo_spec(args: &DemoArgs) -> SweepSpec {
    SweepSpec {
        tasks: vec!["digits-rot".into()],
        backend: args.common.backend.clone(),
        methods: vec![Method::Lora, Method::LoraClip, Method::MgpoPaper, Method::MgpoTrainer],
        ranks: vec![8, 128],
        lrs: vec![0.01],
        seeds: (0..args.seeds).collect(),
        steps: args.steps,
        batch: 32,
        eval_every: 20,
        smooth: 20,
        min_rise: MIN_RISE,
        task_seed: args.common.task_seed,
        alpha: None,
    }
}

pub fn experiment_spec(args: &ExperimentArgs) -> Result<SweepSpec, String> {
    Ok(SweepSpec {
        tasks: args.tasks.iter().map(|t| t.trim().to_string()).collect(),
        backend: args.common.backend.clone(),
        methods: methods(&args.methods)?,
        ranks: args.ranks.clone(),
        lrs: args.lrs.clone(),
        seeds: (args.first_seed..args.first_seed + args.seeds).collect(),
        steps: args.steps,
        batch: args.batch,
        eval_every: args.eval_every,
        smooth: args.smooth,
        min_rise: args.min_rise,
        task_seed: args.common.task_seed,
        alpha: args.alpha,
    })
}

/// Progress bars: runs overall, and the steps of the current run.
struct Bars {
    runs: ProgressBar,
    steps: ProgressBar,
    /// The run the steps bar follows (the latest started).
    current: usize,
    start: Instant,
}

impl Bars {
    fn new(total: usize, steps: u64, quiet: bool) -> Self {
        let mp = MultiProgress::new();
        if quiet {
            mp.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let style = |t: &str| ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar());
        let runs = mp.add(ProgressBar::new(total as u64));
        runs.set_style(style("runs  [{bar:40.cyan/blue}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}"));
        let steps_bar = mp.add(ProgressBar::new(steps));
        steps_bar.set_style(style("steps [{bar:40.green/white}] {pos}/{len} {msg}"));
        Bars { runs, steps: steps_bar, current: 0, start: Instant::now() }
    }
}

impl Observer for Bars {
    fn base_model(&mut self, task: &str, cached: bool) {
        let how = if cached { "loaded from cache" } else { "pre-trained and cached" };
        self.runs.println(format!("base network of {task}: {how} ({:.1}s)", self.start.elapsed().as_secs_f64()));
    }
    fn run_started(&mut self, index: usize, _total: usize, spec: &RunSpec) {
        self.current = index;
        self.steps.reset();
        self.steps.set_length(spec.steps);
        self.steps.set_message(spec.label());
    }
    fn step(&mut self, index: usize, k: u64) {
        if index == self.current {
            self.steps.set_position(k);
        }
    }
    fn run_finished(&mut self, s: &RunSummary) {
        self.runs.inc(1);
        self.runs.set_message(format!("last: {} clean rebound {:.3}", s.spec.label(), s.outcome.clean.height));
    }
}

fn execute(spec: &SweepSpec, out: &Path, common: &Common, command: &str, transformer: Option<&TransformerArgs>) -> Result<SweepResult, String> {
    let e = |e: mgpo_experiments::Error| e.to_string();
    let task = match transformer {
        Some(t) => {
            spec.validate_grid().map_err(e)?;
            if spec.backend != "candle" {
                return Err(format!("{TASK} runs on candle, not `{}`", spec.backend));
            }
            let [train, val, test] = t.per_class[..] else {
                return Err(format!("--per-class takes three numbers (train,val,test), not {:?}", t.per_class));
            };
            let setup = TransformerSetup {
                model_dir: t.model_dir.clone(),
                wordnet: t.wordnet.clone(),
                per_class: PerClass { train, val, test },
                max_len: t.max_len,
                adapt_from: t.adapt_from,
                clean_subset: t.clean_subset,
                data_seed: spec.task_seed,
            };
            let start = Instant::now();
            let task = TransformerTask::prepare(setup).map_err(e)?;
            let [tr, cl, va, te] = task.sizes();
            println!(
                "{TASK}: train {tr} (clean loss on {cl} of them, spread over the classes), val {va}, test {te}; frozen layers 0..{} cached in {:.1}s",
                t.adapt_from,
                start.elapsed().as_secs_f64()
            );
            Some(task)
        }
        None => {
            spec.validate().map_err(e)?;
            None
        }
    };
    let total = spec.runs().len();
    println!(
        "{command}: {total} runs on {}, {} at a time ({} task(s) x {} lr x {} ranks x {} methods x {} seeds, {} steps each); output in {}",
        spec.backend,
        common.jobs,
        spec.tasks.len(),
        spec.lrs.len(),
        spec.ranks.len(),
        spec.methods.len(),
        spec.seeds.len(),
        spec.steps,
        out.display()
    );
    let start = Instant::now();
    let mut bars = Bars::new(total, spec.steps, common.quiet);
    let res = match &task {
        Some(t) => run_sweep_with(spec, out, common.jobs, &mut bars, &|rs, on_step| t.run(rs, on_step)),
        None => run_sweep(spec, out, &common.cache, common.jobs, &mut bars),
    }
    .map_err(e)?;
    bars.steps.finish_and_clear();
    bars.runs.finish_and_clear();
    println!("\n{}", markdown_table(&res.rows));
    println!(
        "rebound = the largest rise after the loss first fell below half its initial value that came back down by half of it; \
         (k/n) = runs with the three phases (a rebound of at least {} x the initial loss); logged loss smoothed over {} steps, clean loss every {} steps.",
        spec.min_rise, spec.smooth, spec.eval_every
    );
    println!("\n{}", res.decision.markdown());
    println!("{total} runs in {:.1}s.", start.elapsed().as_secs_f64());
    println!("table: {}", res.outputs.summary_md.display());
    println!("decision rule: {}", res.outputs.decision_md.display());
    for p in &res.outputs.plots {
        println!("plot:  {}", p.display());
    }
    println!("per-step data: {} and {}", res.outputs.steps_csv.display(), res.outputs.evals_csv.display());
    if !res.pairing_errors.is_empty() {
        return Err(format!("runs of one seed were not paired:\n{}", res.pairing_errors.join("\n")));
    }
    Ok(res)
}

/// `mgpo demo`: a small sweep (about a minute on 2 cores in --release).
pub fn demo(args: DemoArgs) -> Result<bool, String> {
    if !backend::names().contains(&args.common.backend.as_str()) {
        return Err(format!("backend `{}` is not compiled in; available: {}", args.common.backend, backend::names().join(", ")));
    }
    let spec = demo_spec(&args);
    execute(&spec, &args.out, &args.common, "mgpo demo", None)?;
    Ok(true)
}

/// `mgpo experiment`: the full sweep.
pub fn experiment(args: ExperimentArgs) -> Result<bool, String> {
    let spec = experiment_spec(&args)?;
    let transformer = spec.tasks.iter().any(|t| t == TASK);
    if transformer && spec.tasks.len() > 1 {
        return Err(format!("{TASK} runs alone, not with {:?}", spec.tasks));
    }
    execute(&spec, &args.out, &args.common, "mgpo experiment", transformer.then_some(&args.transformer))?;
    Ok(true)
}
