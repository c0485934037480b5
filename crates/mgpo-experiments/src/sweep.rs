//! A sweep: every combination of task, learning rate, rank, method and
//! seed, run on one backend, with its output files:
//!
//! | file | what |
//! |---|---|
//! | `spec.json` | the sweep that made the files |
//! | `steps.csv` | every step of every run: loss as logged, smoothed loss, lr, gradient and perturbation norms |
//! | `evals.csv` | periodic evaluations of the clean model: training loss (the clean loss), validation and test sets |
//! | `runs.csv` | one line per run: rebounds of the logged and the clean loss with their phases, validation-selected test accuracy, digests of the initial adapters and of the batch order |
//! | `summary.csv`, `summary.json`, `summary.md` | per (task, lr, rank, method): mean and std over seeds |
//! | `decision.md`, `decision.json` | the decision rule ([`crate::rule`]) applied to the paired seeds |
//! | `plots/loss_<task>_lr<lr>.png` | smoothed logged loss, one panel per rank, one line per run |
//! | `plots/clean_<task>_lr<lr>.png` | clean training loss at the evaluations, likewise |
//! | `plots/rebound_<task>_lr<lr>.png` | clean rebound per method, one line per seed across methods (the pairing) |

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::backend;
use crate::error::{io, Error, Result};
use crate::method::Method;
use crate::metrics::{mean_std, smooth};
use crate::outcome::Outcome;
use crate::rule::{Decision, Rule, Scores};
use crate::run::{check, run, RunLog, RunSpec};
use crate::task::task;

/// The grid and the settings shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    /// Tasks to run ([`crate::task::TASKS`]).
    pub tasks: Vec<String>,
    /// Backend to run on (`candle`, `dfdx`, `tch`).
    pub backend: String,
    /// Methods compared.
    pub methods: Vec<Method>,
    /// LoRA ranks.
    pub ranks: Vec<usize>,
    /// Peak learning rates.
    pub lrs: Vec<f64>,
    /// Seeds; runs of one seed share adapters and batches across methods.
    pub seeds: Vec<u64>,
    /// Optimizer steps per run.
    pub steps: u64,
    /// Samples per batch.
    pub batch: usize,
    /// Evaluate the clean model every this many steps.
    pub eval_every: u64,
    /// Window of the trailing mean the logged loss is smoothed with.
    pub smooth: usize,
    /// Smallest rebound, as a fraction of the initial loss, that counts as
    /// the three phases ([`crate::metrics::rebound_phases`]).
    pub min_rise: f64,
    /// Seeds the task data and the base network.
    pub task_seed: u64,
    /// LoRA alpha; `None` is alpha = r, as the paper.
    pub alpha: Option<f64>,
}

impl SweepSpec {
    /// The runs, in the order they are run.
    pub fn runs(&self) -> Vec<RunSpec> {
        let mut v = Vec::new();
        for t in &self.tasks {
            for &lr in &self.lrs {
                for &rank in &self.ranks {
                    for &method in &self.methods {
                        for &seed in &self.seeds {
                            v.push(RunSpec {
                                task: t.clone(),
                                method,
                                rank,
                                alpha: self.alpha.unwrap_or(rank as f64),
                                lr,
                                seed,
                                steps: self.steps,
                                batch: self.batch,
                                eval_every: self.eval_every,
                            });
                        }
                    }
                }
            }
        }
        v
    }

    /// Refuses an empty grid and bad run settings: what every sweep needs,
    /// whatever runs it ([`run_sweep_with`]).
    pub fn validate_grid(&self) -> Result<()> {
        let empty = |what: &str, n: usize| if n == 0 { Err(Error::InvalidSpec(format!("no {what} given"))) } else { Ok(()) };
        empty("task", self.tasks.len())?;
        empty("method", self.methods.len())?;
        empty("rank", self.ranks.len())?;
        empty("learning rate", self.lrs.len())?;
        empty("seed", self.seeds.len())?;
        if self.smooth == 0 {
            return Err(Error::InvalidSpec("smoothing window must be at least 1".into()));
        }
        if !(self.min_rise.is_finite() && self.min_rise >= 0.0) {
            return Err(Error::InvalidSpec(format!("min_rise must be finite and >= 0, got {}", self.min_rise)));
        }
        self.runs().iter().try_for_each(check)
    }

    /// [`SweepSpec::validate_grid`], and refuses tasks that are not built
    /// in, unknown backends and a method the backend cannot run.
    pub fn validate(&self) -> Result<()> {
        self.validate_grid()?;
        for t in &self.tasks {
            if !crate::task::TASKS.contains(&t.as_str()) {
                return Err(Error::InvalidSpec(format!("unknown task `{t}`; one of {}", crate::task::TASKS.join(", "))));
            }
        }
        let be = backend::by_name(&self.backend)?;
        for m in &self.methods {
            backend::check_support(be.as_ref(), &m.config(1e-3, 0))?;
        }
        Ok(())
    }
}

/// What one run came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run.
    pub spec: RunSpec,
    /// Rebounds and accuracies read from its log.
    pub outcome: Outcome,
    /// Step of convergence and (lowest, peak, back-down) steps of the logged rebound.
    pub logged_steps: (Option<u64>, Option<(u64, u64, u64)>),
    /// The same for the clean rebound (steps of evaluations).
    pub clean_steps: (Option<u64>, Option<(u64, u64, u64)>),
    /// Wall time of the training loop, in seconds (evaluations excluded).
    pub train_seconds: f64,
    /// Digest of the initial adapters; equal across the methods of one seed.
    pub init_digest: u64,
    /// Digest of the batch order; equal across the methods of one seed.
    pub order_digest: u64,
}

impl RunSummary {
    /// What the decision rule reads, at setting "task lr .. r ..".
    pub fn scores(&self) -> Scores {
        let s = &self.spec;
        Scores {
            setting: setting(s),
            method: s.method,
            seed: s.seed,
            clean_rebound: self.outcome.clean.height,
            clean_three_phases: self.outcome.clean.three_phases,
            test_at_val: self.outcome.selected.test_accuracy,
        }
    }
}

/// The setting of a run: everything but the method and the seed.
pub fn setting(s: &RunSpec) -> String {
    format!("{} lr {} r {}", s.task, s.lr, s.rank)
}

/// Summarises a run ([`Outcome::from_curves`]).
pub fn summarize(log: &RunLog, window: usize, min_rise: f64) -> Result<RunSummary> {
    let outcome = Outcome::from_curves(&log.losses(), &log.evals, window, min_rise)
        .ok_or_else(|| Error::InvalidSpec(format!("run {} has no evaluation", log.spec.label())))?;
    Ok(RunSummary {
        spec: log.spec.clone(),
        logged_steps: outcome.logged_steps(),
        clean_steps: outcome.clean_steps(&log.evals),
        outcome,
        train_seconds: log.train_seconds,
        init_digest: log.init_digest,
        order_digest: log.order_digest,
    })
}

/// The trailing-mean smoothed per-step loss.
pub fn smoothed(log: &RunLog, window: usize) -> Vec<f64> {
    smooth(&log.losses(), window)
}

/// Runs that should be paired but are not: for every (task, lr, rank,
/// seed), all methods must share the initial adapters and the batch order.
/// One line per mismatch (empty when paired).
pub fn pairing_errors(runs: &[RunSummary]) -> Vec<String> {
    let mut first: BTreeMap<String, &RunSummary> = BTreeMap::new();
    let mut errors = Vec::new();
    for r in runs {
        let key = format!("{} seed {}", setting(&r.spec), r.spec.seed);
        match first.get(&key) {
            None => {
                first.insert(key, r);
            }
            Some(f) if (f.init_digest, f.order_digest) != (r.init_digest, r.order_digest) => {
                let what = if f.init_digest != r.init_digest { "initial adapters" } else { "batch order" };
                errors.push(format!("{key}: {} and {} have different {what}", f.spec.method, r.spec.method));
            }
            Some(_) => {}
        }
    }
    errors
}

/// mean and std over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean over seeds.
    pub mean: f64,
    /// Standard deviation over seeds.
    pub std: f64,
}

impl Stat {
    fn of(xs: impl Iterator<Item = f64>) -> Stat {
        let v: Vec<f64> = xs.collect();
        let (mean, std) = mean_std(&v);
        Stat { mean, std }
    }

    /// `mean ± std` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.mean.is_infinite() {
            return "diverged".into();
        }
        format!("{:.*} ± {:.*}", digits, self.mean, digits, self.std)
    }
}

/// One line of the summary table: a (task, lr, rank, method) over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Task name.
    pub task: String,
    /// Peak learning rate.
    pub lr: f64,
    /// LoRA rank.
    pub rank: usize,
    /// Method.
    pub method: Method,
    /// Number of seeds the statistics are over.
    pub seeds: usize,
    /// Clean training loss at the end.
    pub final_train_loss: Stat,
    /// Rebound of the smoothed logged loss.
    pub logged_rebound: Stat,
    /// Runs whose logged loss showed the three phases.
    pub logged_three_phases: usize,
    /// Rebound of the clean training loss.
    pub clean_rebound: Stat,
    /// Runs whose clean training loss showed the three phases.
    pub clean_three_phases: usize,
    /// Test accuracy at the checkpoint the validation split selected.
    pub test_at_val: Stat,
    /// Test accuracy at the last evaluation.
    pub final_test_accuracy: Stat,
    /// Wall time of the training loop, in seconds.
    pub train_seconds: Stat,
}

/// Groups run summaries by (task, lr, rank, method), in first-seen order.
pub fn rows(runs: &[RunSummary]) -> Vec<Row> {
    let mut keys: Vec<(String, f64, usize, Method)> = Vec::new();
    for r in runs {
        let k = (r.spec.task.clone(), r.spec.lr, r.spec.rank, r.spec.method);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(task, lr, rank, method)| {
            let g: Vec<&RunSummary> =
                runs.iter().filter(|r| r.spec.task == task && r.spec.lr == lr && r.spec.rank == rank && r.spec.method == method).collect();
            let st = |f: fn(&RunSummary) -> f64| Stat::of(g.iter().map(|r| f(r)));
            Row {
                task,
                lr,
                rank,
                method,
                seeds: g.len(),
                final_train_loss: st(|r| r.outcome.last.train_loss),
                logged_rebound: st(|r| r.outcome.logged.height),
                logged_three_phases: g.iter().filter(|r| r.outcome.logged.three_phases).count(),
                clean_rebound: st(|r| r.outcome.clean.height),
                clean_three_phases: g.iter().filter(|r| r.outcome.clean.three_phases).count(),
                test_at_val: st(|r| r.outcome.selected.test_accuracy),
                final_test_accuracy: st(|r| r.outcome.last.test_accuracy),
                train_seconds: st(|r| r.train_seconds),
            }
        })
        .collect()
}

/// The summary as a markdown table.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| task | lr | r | method | final clean train loss | rebound, logged loss (runs with 3 phases) | rebound, clean loss (runs with 3 phases) | test acc at val checkpoint | final test acc | s / run |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} ({}/{}) | {} ({}/{}) | {} | {} | {:.2} |\n",
            r.task,
            r.lr,
            r.rank,
            r.method,
            r.final_train_loss.show(4),
            r.logged_rebound.show(3),
            r.logged_three_phases,
            r.seeds,
            r.clean_rebound.show(3),
            r.clean_three_phases,
            r.seeds,
            r.test_at_val.show(3),
            r.final_test_accuracy.show(3),
            r.train_seconds.mean
        );
    }
    s
}

/// Progress of a sweep, for a user interface.
pub trait Observer {
    /// The base network of `task` is being trained (`cached` false) or was loaded.
    fn base_model(&mut self, _task: &str, _cached: bool) {}
    /// Run `index` of `total` starts.
    fn run_started(&mut self, _index: usize, _total: usize, _spec: &RunSpec) {}
    /// Run `index` has done `k` steps (reported every 10 steps).
    fn step(&mut self, _index: usize, _k: u64) {}
    /// Run finished; `summary` is what it came to.
    fn run_finished(&mut self, _summary: &RunSummary) {}
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Where a sweep's files went.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// The output directory.
    pub dir: PathBuf,
    /// `steps.csv`: every step of every run.
    pub steps_csv: PathBuf,
    /// `evals.csv`: the periodic evaluations of the clean model.
    pub evals_csv: PathBuf,
    /// `runs.csv`: one line per run.
    pub runs_csv: PathBuf,
    /// `summary.csv`: the summary table.
    pub summary_csv: PathBuf,
    /// `summary.json`: the summary table.
    pub summary_json: PathBuf,
    /// `summary.md`: the summary table.
    pub summary_md: PathBuf,
    /// `decision.md`: the decision rule's verdicts.
    pub decision_md: PathBuf,
    /// `decision.json`: the decision rule's comparisons and verdicts.
    pub decision_json: PathBuf,
    /// The plots under `plots/`.
    pub plots: Vec<PathBuf>,
}

/// The result of a sweep.
#[derive(Debug, Clone)]
pub struct SweepResult {
    /// One summary per run, in run order.
    pub runs: Vec<RunSummary>,
    /// The summary table, one row per (task, lr, rank, method).
    pub rows: Vec<Row>,
    /// The per-step smoothed logged losses of every run (same order as `runs`).
    pub curves: Vec<Vec<f64>>,
    /// The (step, clean training loss) evaluations of every run (same order).
    pub clean: Vec<Vec<(u64, f64)>>,
    /// The decision rule on the paired seeds.
    pub decision: Decision,
    /// Runs of one seed that were not paired ([`pairing_errors`]); empty when all were.
    pub pairing_errors: Vec<String>,
    /// Where the files went.
    pub outputs: Outputs,
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    File::create(path).map(BufWriter::new).map_err(|e| io(path, e))
}

fn csv_line(w: &mut impl Write, path: &Path, fields: &[String]) -> Result<()> {
    writeln!(w, "{}", fields.join(",")).map_err(|e| io(path, e))
}

fn num(x: f64) -> String {
    format!("{x}")
}

/// A value that came from f32 arithmetic, written with f32's shortest digits.
fn num32(x: f64) -> String {
    format!("{}", x as f32)
}

fn opt(x: Option<u64>) -> String {
    x.map_or(String::new(), |v| v.to_string())
}

const KEY: [&str; 5] = ["task", "method", "rank", "lr", "seed"];
const STEP_COLS: [&str; 7] = ["step", "lr_t", "loss", "smoothed_loss", "grad_norm", "perturbation_norm", "skipped"];
const EVAL_COLS: [&str; 7] = ["step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"];
const RUN_COLS: [&str; 27] = [
    "final_smoothed_loss",
    "final_clean_loss",
    "logged_rebound",
    "logged_rise",
    "logged_three_phases",
    "logged_converged_step",
    "logged_low_step",
    "logged_peak_step",
    "logged_back_step",
    "clean_rebound",
    "clean_rise",
    "clean_three_phases",
    "clean_converged_step",
    "clean_low_step",
    "clean_peak_step",
    "clean_back_step",
    "selected_step",
    "val_accuracy",
    "test_accuracy_at_val",
    "final_test_accuracy",
    "final_val_accuracy",
    "train_seconds",
    "init_digest",
    "order_digest",
    "alpha",
    "steps",
    "batch",
];

/// Appends one run to the per-step, evaluation and per-run files.
fn write_run(
    log: &RunLog,
    spec: &SweepSpec,
    o: &Outputs,
    steps_w: &mut impl Write,
    evals_w: &mut impl Write,
    runs_w: &mut impl Write,
) -> Result<(RunSummary, Vec<f64>)> {
    let rs = &log.spec;
    let sum = summarize(log, spec.smooth, spec.min_rise)?;
    let s = smoothed(log, spec.smooth);
    let k = [rs.task.clone(), rs.method.to_string(), rs.rank.to_string(), num(rs.lr), rs.seed.to_string()];
    let with = |extra: Vec<String>| k.iter().cloned().chain(extra).collect::<Vec<_>>();
    for (st, sm) in log.steps.iter().zip(&s) {
        let f = vec![
            st.step.to_string(),
            num(st.lr),
            num32(st.loss),
            num32(*sm),
            num32(st.grad_norm),
            num32(st.perturbation_norm),
            (st.skipped as u8).to_string(),
        ];
        csv_line(steps_w, &o.steps_csv, &with(f))?;
    }
    for e in &log.evals {
        let f = [e.step as f64, e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy, e.test_loss, e.test_accuracy].map(num32).to_vec();
        csv_line(evals_w, &o.evals_csv, &with(f))?;
    }
    let oc = &sum.outcome;
    let phases = |c: Option<u64>, at: Option<(u64, u64, u64)>| [opt(c), opt(at.map(|a| a.0)), opt(at.map(|a| a.1)), opt(at.map(|a| a.2))];
    let mut f = vec![num(oc.final_logged), num(oc.last.train_loss), num(oc.logged.height), num(oc.logged.rise), oc.logged.three_phases.to_string()];
    f.extend(phases(sum.logged_steps.0, sum.logged_steps.1));
    f.extend([num(oc.clean.height), num(oc.clean.rise), oc.clean.three_phases.to_string()]);
    f.extend(phases(sum.clean_steps.0, sum.clean_steps.1));
    f.extend([
        oc.selected.step.to_string(),
        num(oc.selected.val_accuracy),
        num(oc.selected.test_accuracy),
        num(oc.last.test_accuracy),
        num(oc.last.val_accuracy),
        num(sum.train_seconds),
        format!("{:016x}", sum.init_digest),
        format!("{:016x}", sum.order_digest),
        num(rs.alpha),
        rs.steps.to_string(),
        rs.batch.to_string(),
    ]);
    debug_assert_eq!(f.len(), RUN_COLS.len());
    csv_line(runs_w, &o.runs_csv, &with(f))?;
    steps_w.flush().map_err(|e| io(&o.steps_csv, e))?;
    evals_w.flush().map_err(|e| io(&o.evals_csv, e))?;
    runs_w.flush().map_err(|e| io(&o.runs_csv, e))?;
    Ok((sum, s))
}

/// What a worker thread reports.
enum Event {
    Started(usize),
    Step(usize, u64),
    Done(usize, Result<RunLog>),
}

/// Runs the sweep of the built-in tasks on `jobs` threads (runs are
/// independent, so the results do not depend on `jobs`), writing the files
/// under `out` (created if needed) in run order as runs finish; base
/// networks are cached under `cache`.
pub fn run_sweep(spec: &SweepSpec, out: &Path, cache: &Path, jobs: usize, obs: &mut dyn Observer) -> Result<SweepResult> {
    spec.validate()?;
    let be = backend::by_name(&spec.backend)?;
    // Tasks and their base networks, trained (or loaded) before any run.
    let mut tasks: Vec<(crate::task::Task, crate::model::BaseModel)> = Vec::new();
    for name in &spec.tasks {
        let t = task(name, spec.task_seed)?;
        let (base, cached) = t.base_model(cache)?;
        obs.base_model(name, cached);
        tasks.push((t, base));
    }
    let run_one = |rs: &RunSpec, on_step: &mut dyn FnMut(u64)| {
        let (t, base) = tasks.iter().find(|(t, _)| t.name == rs.task).expect("every task of the grid was built");
        run(t, base, be.as_ref(), rs, on_step)
    };
    run_sweep_with(spec, out, jobs, obs, &run_one)
}

/// Runs every run of `spec` with `run_one` on `jobs` threads and writes the
/// sweep's files under `out`: the same outputs, summary, decision rule and
/// plots for any fine-tuning whose runs come as [`RunLog`]s (the built-in
/// tasks, [`crate::transformer`]). `run_one(spec, on_step)` calls
/// `on_step(k)` after step k.
pub fn run_sweep_with(
    spec: &SweepSpec,
    out: &Path,
    jobs: usize,
    obs: &mut dyn Observer,
    run_one: &(dyn Fn(&RunSpec, &mut dyn FnMut(u64)) -> Result<RunLog> + Sync),
) -> Result<SweepResult> {
    spec.validate_grid()?;
    if jobs == 0 {
        return Err(Error::InvalidSpec("jobs must be at least 1".into()));
    }
    std::fs::create_dir_all(out.join("plots")).map_err(|e| io(out, e))?;
    let o = Outputs {
        dir: out.to_path_buf(),
        steps_csv: out.join("steps.csv"),
        evals_csv: out.join("evals.csv"),
        runs_csv: out.join("runs.csv"),
        summary_csv: out.join("summary.csv"),
        summary_json: out.join("summary.json"),
        summary_md: out.join("summary.md"),
        decision_md: out.join("decision.md"),
        decision_json: out.join("decision.json"),
        plots: Vec::new(),
    };
    let spec_path = out.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_string_pretty(spec).map_err(|e| io(&spec_path, e))?).map_err(|e| io(&spec_path, e))?;
    let (mut steps_w, mut evals_w, mut runs_w) = (create(&o.steps_csv)?, create(&o.evals_csv)?, create(&o.runs_csv)?);
    let cols = |extra: &[&str]| KEY.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>();
    csv_line(&mut steps_w, &o.steps_csv, &cols(&STEP_COLS))?;
    csv_line(&mut evals_w, &o.evals_csv, &cols(&EVAL_COLS))?;
    csv_line(&mut runs_w, &o.runs_csv, &cols(&RUN_COLS))?;

    let all = spec.runs();
    let mut runs = Vec::with_capacity(all.len());
    let mut curves = Vec::with_capacity(all.len());
    let mut clean = Vec::with_capacity(all.len());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Event>();
    let mut first_error: Option<Error> = None;
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(all.len()) {
            let tx = tx.clone();
            let (all, next, stop) = (&all, &next, &stop);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= all.len() || stop.load(Ordering::SeqCst) {
                    break;
                }
                let rs = &all[i];
                let _ = tx.send(Event::Started(i));
                let log = run_one(rs, &mut |k| {
                    if k % 10 == 0 {
                        let _ = tx.send(Event::Step(i, k));
                    }
                });
                let _ = tx.send(Event::Done(i, log));
            });
        }
        drop(tx);
        let mut done: BTreeMap<usize, RunLog> = BTreeMap::new();
        let mut written = 0usize;
        for ev in rx {
            match ev {
                Event::Started(i) => obs.run_started(i, all.len(), &all[i]),
                Event::Step(i, k) => obs.step(i, k),
                Event::Done(_, Err(e)) => {
                    stop.store(true, Ordering::SeqCst);
                    first_error.get_or_insert(e);
                }
                Event::Done(i, Ok(log)) => {
                    done.insert(i, log);
                    while let Some(log) = done.remove(&written) {
                        if first_error.is_none() {
                            match write_run(&log, spec, &o, &mut steps_w, &mut evals_w, &mut runs_w) {
                                Ok((sum, s)) => {
                                    obs.run_finished(&sum);
                                    runs.push(sum);
                                    curves.push(s);
                                    clean.push(log.evals.iter().map(|e| (e.step, e.train_loss)).collect());
                                }
                                Err(e) => {
                                    stop.store(true, Ordering::SeqCst);
                                    first_error = Some(e);
                                }
                            }
                        }
                        written += 1;
                    }
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }

    let rows = rows(&runs);
    let mut w = create(&o.summary_csv)?;
    let head = [
        "task", "lr", "rank", "method", "seeds", "final_train_loss_mean", "final_train_loss_std", "logged_rebound_mean", "logged_rebound_std",
        "logged_three_phases", "clean_rebound_mean", "clean_rebound_std", "clean_three_phases", "test_at_val_mean", "test_at_val_std",
        "final_test_accuracy_mean", "final_test_accuracy_std", "train_seconds_mean",
    ];
    csv_line(&mut w, &o.summary_csv, &head.map(String::from))?;
    for r in &rows {
        let f = vec![
            r.task.clone(),
            num(r.lr),
            r.rank.to_string(),
            r.method.to_string(),
            r.seeds.to_string(),
            num(r.final_train_loss.mean),
            num(r.final_train_loss.std),
            num(r.logged_rebound.mean),
            num(r.logged_rebound.std),
            r.logged_three_phases.to_string(),
            num(r.clean_rebound.mean),
            num(r.clean_rebound.std),
            r.clean_three_phases.to_string(),
            num(r.test_at_val.mean),
            num(r.test_at_val.std),
            num(r.final_test_accuracy.mean),
            num(r.final_test_accuracy.std),
            num(r.train_seconds.mean),
        ];
        csv_line(&mut w, &o.summary_csv, &f)?;
    }
    w.flush().map_err(|e| io(&o.summary_csv, e))?;
    let json = serde_json::to_string_pretty(&rows).map_err(|e| io(&o.summary_json, e))?;
    std::fs::write(&o.summary_json, json).map_err(|e| io(&o.summary_json, e))?;
    std::fs::write(&o.summary_md, markdown_table(&rows)).map_err(|e| io(&o.summary_md, e))?;

    let scores: Vec<Scores> = runs.iter().map(RunSummary::scores).collect();
    let decision = Rule::PREREGISTERED.decide(&scores);
    let pairing_errors = pairing_errors(&runs);
    let pairing = match pairing_errors.len() {
        0 => format!("Pairing: verified (for every setting and seed, all {} methods had the same initial adapters and batch order).\n\n", spec.methods.len()),
        n => format!("Pairing: FAILED for {n} run(s):\n\n{}\n\n", pairing_errors.iter().map(|e| format!("- {e}")).collect::<Vec<_>>().join("\n")),
    };
    std::fs::write(&o.decision_md, pairing + &decision.markdown()).map_err(|e| io(&o.decision_md, e))?;
    let json = serde_json::to_string_pretty(&decision).map_err(|e| io(&o.decision_json, e))?;
    std::fs::write(&o.decision_json, json).map_err(|e| io(&o.decision_json, e))?;

    let mut result = SweepResult { runs, rows, curves, clean, decision, pairing_errors, outputs: o };
    result.outputs.plots = crate::plot::plots(spec, &result, &out.join("plots"))?;
    Ok(result)
}
