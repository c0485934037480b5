//! A sweep: every combination of task, learning rate, rank, method and
//! seed, run on one backend, with its output files:
//!
//! | file | what |
//! |---|---|
//! | `spec.json` | the sweep that made the files |
//! | `steps.csv` | every step of every run: loss, smoothed loss, lr, gradient and perturbation norms |
//! | `evals.csv` | periodic evaluations of the clean model on the whole train and test sets |
//! | `runs.csv` | one line per run: final losses, rebounds, accuracies, time |
//! | `summary.csv`, `summary.json`, `summary.md` | per (task, lr, rank, method): mean and std over seeds |
//! | `plots/loss_<task>_lr<lr>.png` | smoothed training loss, one panel per rank, one line per method |

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
use crate::metrics::{mean_std, rebound, rebound_at, smooth};
use crate::run::{check, run, RunLog, RunSpec};
use crate::task::task;

/// The grid and the settings shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub tasks: Vec<String>,
    pub backend: String,
    pub methods: Vec<Method>,
    pub ranks: Vec<usize>,
    pub lrs: Vec<f64>,
    pub seeds: Vec<u64>,
    pub steps: u64,
    pub batch: usize,
    pub eval_every: u64,
    /// Window of the trailing mean the rebound is measured on.
    pub smooth: usize,
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

    /// Refuses an empty grid, unknown tasks or backends and bad run settings.
    pub fn validate(&self) -> Result<()> {
        let empty = |what: &str, n: usize| if n == 0 { Err(Error::InvalidSpec(format!("no {what} given"))) } else { Ok(()) };
        empty("task", self.tasks.len())?;
        empty("method", self.methods.len())?;
        empty("rank", self.ranks.len())?;
        empty("learning rate", self.lrs.len())?;
        empty("seed", self.seeds.len())?;
        if self.smooth == 0 {
            return Err(Error::InvalidSpec("smoothing window must be at least 1".into()));
        }
        for t in &self.tasks {
            if !crate::task::TASKS.contains(&t.as_str()) {
                return Err(Error::InvalidSpec(format!("unknown task `{t}`; one of {}", crate::task::TASKS.join(", "))));
            }
        }
        backend::by_name(&self.backend)?;
        self.runs().iter().try_for_each(check)
    }
}

/// What one run came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub spec: RunSpec,
    /// Smoothed training loss (as logged, at the perturbed point) at the last step.
    pub final_loss: f64,
    /// Loss of the clean model on the whole training set at the end.
    pub final_train_loss: f64,
    /// The rebound of the smoothed per-step training loss ([`crate::metrics`]).
    pub rebound: f64,
    /// Steps of the minimum and of the peak of that rebound.
    pub rebound_steps: Option<(u64, u64)>,
    /// The rebound of the clean training loss over the periodic evaluations.
    pub clean_rebound: f64,
    pub best_test_accuracy: f64,
    pub final_test_accuracy: f64,
    pub train_seconds: f64,
}

/// Summarises a run; the smoothed curve is defined once the window is
/// full (steps `smooth` and later), so a noisy first few batches do not
/// count as a rebound.
pub fn summarize(log: &RunLog, window: usize) -> RunSummary {
    let s = smoothed(log, window);
    let w = window.max(1).min(s.len().max(1));
    let tail = &s[w - 1..];
    let clean: Vec<f64> = log.evals.iter().map(|e| e.train_loss).collect();
    let last = log.evals.last();
    RunSummary {
        spec: log.spec.clone(),
        final_loss: s.last().copied().unwrap_or(f64::NAN),
        final_train_loss: last.map_or(f64::NAN, |e| e.train_loss),
        rebound: rebound(tail),
        rebound_steps: rebound_at(tail).map(|(a, b)| ((a + w) as u64, (b + w) as u64)),
        clean_rebound: rebound(&clean),
        best_test_accuracy: log.evals.iter().map(|e| e.test_accuracy).fold(f64::NAN, f64::max),
        final_test_accuracy: last.map_or(f64::NAN, |e| e.test_accuracy),
        train_seconds: log.train_seconds,
    }
}

/// The trailing-mean smoothed per-step loss.
pub fn smoothed(log: &RunLog, window: usize) -> Vec<f64> {
    smooth(&log.losses(), window)
}

/// mean and std over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
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
    pub task: String,
    pub lr: f64,
    pub rank: usize,
    pub method: Method,
    pub seeds: usize,
    pub final_train_loss: Stat,
    pub final_loss: Stat,
    pub rebound: Stat,
    pub clean_rebound: Stat,
    pub best_test_accuracy: Stat,
    pub final_test_accuracy: Stat,
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
                final_train_loss: st(|r| r.final_train_loss),
                final_loss: st(|r| r.final_loss),
                rebound: st(|r| r.rebound),
                clean_rebound: st(|r| r.clean_rebound),
                best_test_accuracy: st(|r| r.best_test_accuracy),
                final_test_accuracy: st(|r| r.final_test_accuracy),
                train_seconds: st(|r| r.train_seconds),
            }
        })
        .collect()
}

/// The summary as a markdown table.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| task | lr | r | method | final train loss | rebound (smoothed step loss) | rebound (clean train loss) | best test acc | s / run |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            r.task,
            r.lr,
            r.rank,
            r.method,
            r.final_train_loss.show(4),
            r.rebound.show(3),
            r.clean_rebound.show(3),
            r.best_test_accuracy.show(3),
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
    fn run_finished(&mut self, _summary: &RunSummary) {}
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Where a sweep's files went.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    pub dir: PathBuf,
    pub steps_csv: PathBuf,
    pub evals_csv: PathBuf,
    pub runs_csv: PathBuf,
    pub summary_csv: PathBuf,
    pub summary_json: PathBuf,
    pub summary_md: PathBuf,
    pub plots: Vec<PathBuf>,
}

/// The result of a sweep.
#[derive(Debug, Clone)]
pub struct SweepResult {
    pub runs: Vec<RunSummary>,
    pub rows: Vec<Row>,
    /// The per-step smoothed losses of every run, for plotting (same order as `runs`).
    pub curves: Vec<Vec<f64>>,
    pub outputs: Outputs,
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    File::create(path).map(BufWriter::new).map_err(|e| io(path, e))
}

fn csv_line(w: &mut impl Write, path: &Path, fields: &[String]) -> Result<()> {
    writeln!(w, "{}", fields.join(",")).map_err(|e| io(path, e))
}

/// Appends one run to the per-step, evaluation and per-run files.
fn write_run(
    log: &RunLog,
    window: usize,
    o: &Outputs,
    steps_w: &mut impl Write,
    evals_w: &mut impl Write,
    runs_w: &mut impl Write,
) -> Result<(RunSummary, Vec<f64>)> {
    let rs = &log.spec;
    let sum = summarize(log, window);
    let s = smoothed(log, window);
    let k = [rs.task.clone(), rs.method.to_string(), rs.rank.to_string(), num(rs.lr), rs.seed.to_string()];
    let with = |extra: Vec<String>| k.iter().cloned().chain(extra).collect::<Vec<_>>();
    for (st, sm) in log.steps.iter().zip(&s) {
        let f = vec![
            st.step.to_string(),
            num(st.lr),
            num(st.loss),
            num(*sm),
            num(st.grad_norm),
            num(st.perturbation_norm),
            (st.skipped as u8).to_string(),
        ];
        csv_line(steps_w, &o.steps_csv, &with(f))?;
    }
    for e in &log.evals {
        let f = vec![e.step.to_string(), num(e.train_loss), num(e.train_accuracy), num(e.test_loss), num(e.test_accuracy)];
        csv_line(evals_w, &o.evals_csv, &with(f))?;
    }
    let (rf, rp) = sum.rebound_steps.map_or((String::new(), String::new()), |(a, b)| (a.to_string(), b.to_string()));
    let f = vec![
        num(sum.final_loss),
        num(sum.final_train_loss),
        num(sum.rebound),
        rf,
        rp,
        num(sum.clean_rebound),
        num(sum.best_test_accuracy),
        num(sum.final_test_accuracy),
        num(sum.train_seconds),
    ];
    csv_line(runs_w, &o.runs_csv, &with(f))?;
    steps_w.flush().map_err(|e| io(&o.steps_csv, e))?;
    evals_w.flush().map_err(|e| io(&o.evals_csv, e))?;
    runs_w.flush().map_err(|e| io(&o.runs_csv, e))?;
    Ok((sum, s))
}

fn num(x: f64) -> String {
    format!("{x}")
}

/// What a worker thread reports.
enum Event {
    Started(usize),
    Step(usize, u64),
    Done(usize, Result<RunLog>),
}

/// Runs the sweep on `jobs` threads (runs are independent, so the results
/// do not depend on `jobs`), writing the files under `out` (created if
/// needed) in run order as runs finish; base networks are cached under
/// `cache`.
pub fn run_sweep(spec: &SweepSpec, out: &Path, cache: &Path, jobs: usize, obs: &mut dyn Observer) -> Result<SweepResult> {
    spec.validate()?;
    if jobs == 0 {
        return Err(Error::InvalidSpec("jobs must be at least 1".into()));
    }
    let be = backend::by_name(&spec.backend)?;
    std::fs::create_dir_all(out.join("plots")).map_err(|e| io(out, e))?;
    let o = Outputs {
        dir: out.to_path_buf(),
        steps_csv: out.join("steps.csv"),
        evals_csv: out.join("evals.csv"),
        runs_csv: out.join("runs.csv"),
        summary_csv: out.join("summary.csv"),
        summary_json: out.join("summary.json"),
        summary_md: out.join("summary.md"),
        plots: Vec::new(),
    };
    let spec_path = out.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_string_pretty(spec).map_err(|e| io(&spec_path, e))?).map_err(|e| io(&spec_path, e))?;
    let key = ["task", "method", "rank", "lr", "seed"].map(String::from);
    let (mut steps_w, mut evals_w, mut runs_w) = (create(&o.steps_csv)?, create(&o.evals_csv)?, create(&o.runs_csv)?);
    let cols = |extra: &[&str]| key.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect::<Vec<_>>();
    csv_line(&mut steps_w, &o.steps_csv, &cols(&["step", "lr_t", "loss", "smoothed_loss", "grad_norm", "perturbation_norm", "skipped"]))?;
    csv_line(&mut evals_w, &o.evals_csv, &cols(&["step", "train_loss", "train_accuracy", "test_loss", "test_accuracy"]))?;
    csv_line(
        &mut runs_w,
        &o.runs_csv,
        &cols(&[
            "final_loss",
            "final_train_loss",
            "rebound",
            "rebound_from_step",
            "rebound_peak_step",
            "clean_rebound",
            "best_test_accuracy",
            "final_test_accuracy",
            "train_seconds",
        ]),
    )?;

    // Tasks and their base networks, trained (or loaded) before any run.
    let mut tasks: Vec<(crate::task::Task, crate::model::BaseModel)> = Vec::new();
    for name in &spec.tasks {
        let t = task(name, spec.task_seed)?;
        let (base, cached) = t.base_model(cache)?;
        obs.base_model(name, cached);
        tasks.push((t, base));
    }

    let all = spec.runs();
    let mut runs = Vec::with_capacity(all.len());
    let mut curves = Vec::with_capacity(all.len());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Event>();
    let mut first_error: Option<Error> = None;
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(all.len()) {
            let tx = tx.clone();
            let (all, tasks, be, next, stop) = (&all, &tasks, &be, &next, &stop);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= all.len() || stop.load(Ordering::SeqCst) {
                    break;
                }
                let rs = &all[i];
                let _ = tx.send(Event::Started(i));
                let (t, base) = tasks.iter().find(|(t, _)| t.name == rs.task).expect("every task of the grid was built");
                let log = run(t, base, be.as_ref(), rs, &mut |k| {
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
                            match write_run(&log, spec.smooth, &o, &mut steps_w, &mut evals_w, &mut runs_w) {
                                Ok((sum, s)) => {
                                    obs.run_finished(&sum);
                                    runs.push(sum);
                                    curves.push(s);
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
    csv_line(
        &mut w,
        &o.summary_csv,
        &[
            "task", "lr", "rank", "method", "seeds", "final_train_loss_mean", "final_train_loss_std", "rebound_mean", "rebound_std",
            "clean_rebound_mean", "clean_rebound_std", "best_test_accuracy_mean", "best_test_accuracy_std", "train_seconds_mean",
        ]
        .map(String::from),
    )?;
    for r in &rows {
        let f = vec![
            r.task.clone(),
            num(r.lr),
            r.rank.to_string(),
            r.method.to_string(),
            r.seeds.to_string(),
            num(r.final_train_loss.mean),
            num(r.final_train_loss.std),
            num(r.rebound.mean),
            num(r.rebound.std),
            num(r.clean_rebound.mean),
            num(r.clean_rebound.std),
            num(r.best_test_accuracy.mean),
            num(r.best_test_accuracy.std),
            num(r.train_seconds.mean),
        ];
        csv_line(&mut w, &o.summary_csv, &f)?;
    }
    w.flush().map_err(|e| io(&o.summary_csv, e))?;
    let json = serde_json::to_string_pretty(&rows).map_err(|e| io(&o.summary_json, e))?;
    std::fs::write(&o.summary_json, json).map_err(|e| io(&o.summary_json, e))?;
    std::fs::write(&o.summary_md, markdown_table(&rows)).map_err(|e| io(&o.summary_md, e))?;

    let mut result = SweepResult { runs, rows, curves, outputs: o };
    result.outputs.plots = crate::plot::loss_plots(spec, &result, &out.join("plots"))?;
    Ok(result)
}
