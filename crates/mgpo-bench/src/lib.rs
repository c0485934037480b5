//! # mgpo-bench
//!
//! What `mgpo bench` measures: the cost of an optimizer step of LoRA-MGPO
//! against AdamW on each compiled backend, against the memory-bandwidth
//! limit of the machine, and against PyTorch, in one run.
//!
//! - **steps**: f32 LoRA parameter sets of 1e4, 1e6, 1e7 parameters
//!   ([`sizes::LoraShape`]), all cores; AdamW, MGPO in adapter space, MGPO
//!   in weight space (factored, and with W0 in place up to a size), per
//!   backend, next to the in-place streaming kernel ([`stream`]) that
//!   bounds any step, and to PyTorch's AdamW (fused, foreach, for-loop)
//!   and MGPO written in PyTorch ([`peer`]);
//! - **weight**: one adapter with a 4096 x 4096 W0 at r = 8 and 64: the
//!   rank-decomposed norms and updates against the authors' materialised
//!   computation ([`weight`]);
//! - **e2e**: a training step of a LoRA MLP on candle and tch ([`e2e`]);
//! - **memory**: optimizer state per parameter and peak RSS ([`memory`]).
//!
//! Measurements alternate: every round runs each measured item (ours and
//! the peer's) once, for a fixed number of calls; statistics are over all
//! rounds, so slow drifts of a shared machine hit both sides alike.

#![warn(missing_docs)]

#[cfg(feature = "burn")]
pub(crate) mod burn_module;
pub mod e2e;
pub mod memory;
pub mod peer;
pub mod sizes;
pub mod step;
pub mod stream;
pub mod timing;
pub mod weight;
mod report;

use std::cell::RefCell;
use std::ffi::OsString;
use std::path::PathBuf;
use std::rc::Rc;

use mgpo_core::backend::{HostIo, TensorOps};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use report::{print_markdown, print_report, Target};
use sizes::LoraShape;
use step::{StepBench, Variant};
use timing::Stats;

/// Backends this build can measure.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec!["ndarray"];
    if cfg!(feature = "candle") {
        v.push("candle");
    }
    if cfg!(feature = "tch") {
        v.push("tch");
    }
    if cfg!(feature = "dfdx") {
        v.push("dfdx");
    }
    if cfg!(feature = "burn") {
        v.push("burn");
    }
    v
}

/// Whether to run the PyTorch peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    /// Do not run it.
    Off,
    /// Run it when it starts; note why when it does not.
    Auto,
    /// Fail when it does not start.
    On,
}

/// What to measure and how long.
#[derive(Debug, Clone)]
pub struct Options {
    /// Trainable-parameter counts of the steps section, one [`sizes::LoraShape`] each.
    pub params: Vec<usize>,
    /// Backends to measure (names from [`compiled_backends`]).
    pub backends: Vec<String>,
    /// The W0 side of the weight-space case (square).
    pub weight_dim: usize,
    /// LoRA ranks of the weight-space case.
    pub weight_ranks: Vec<usize>,
    /// The in-place-W0 weight-space step is run up to this many trainable
    /// parameters (its W0s take d / (2 r) times the adapters' memory).
    pub w0_max_params: usize,
    /// The model of the end-to-end section.
    pub e2e: e2e::E2eShape,
    /// Alternation rounds; each round times every item once.
    pub rounds: usize,
    /// Seconds of calls per item per round (the call count is fixed from a
    /// first timed call).
    pub budget_s: f64,
    /// Whether to run the PyTorch peer.
    pub peer: PeerMode,
    /// The Python interpreter that runs the peer.
    pub python: PathBuf,
    /// The peer script file; `None` runs the copy embedded in this crate
    /// ([`peer::SCRIPT`]).
    pub peer_script: Option<PathBuf>,
    /// Run the steps section.
    pub steps: bool,
    /// Run the weight section.
    pub weight: bool,
    /// Run the end-to-end section.
    pub e2e_section: bool,
    /// Run the memory section.
    pub memory: bool,
    /// The program and leading arguments that run an RSS probe of ours
    /// (`mgpo bench`); `None` skips our probes.
    pub probe_cmd: Option<Vec<OsString>>,
    /// Progress lines on stderr.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            params: vec![10_000, 1_000_000, 10_000_000],
            backends: compiled_backends().into_iter().map(String::from).collect(),
            weight_dim: 4096,
            weight_ranks: vec![8, 64],
            w0_max_params: 2_000_000,
            e2e: e2e::E2eShape::default(),
            rounds: 5,
            budget_s: 0.25,
            peer: PeerMode::Auto,
            python: peer::default_python(),
            peer_script: None,
            steps: true,
            weight: true,
            e2e_section: true,
            memory: true,
            probe_cmd: None,
            verbose: true,
        }
    }
}

/// The machine and the conditions of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name (`/proc/cpuinfo`; the architecture where unknown).
    pub cpu: String,
    /// Logical CPUs the OS reports.
    pub logical_cpus: usize,
    /// rayon threads (ours) and intra-op threads (PyTorch's).
    pub threads: usize,
    /// The instruction set mgpo-ndarray's kernels run with.
    pub isa: String,
    /// 1-, 5-, 15-minute load averages before and after the run.
    pub load_before: Vec<f64>,
    /// The same, after the run.
    pub load_after: Vec<f64>,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The load averages, empty where unknown.
pub fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// One measured item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `steps`, `weight`, `e2e`.
    pub section: String,
    /// `ndarray`, `candle`, `tch`, `dfdx`, `torch`, `stream` (the bound).
    pub backend: String,
    /// The variant measured (`adamw`, `mgpo-adapter`, ..., or the peer's name for it).
    pub variant: String,
    /// Trainable parameters (weight section: of the adapter).
    pub params: usize,
    /// The shape measured, in words.
    pub shape: String,
    /// Time of one call, in seconds, over all rounds.
    #[serde(flatten)]
    pub stats: Stats,
    /// Median time of one call per trainable parameter, in nanoseconds.
    pub ns_per_param: f64,
    /// Least bytes a step moves per parameter (steps section).
    pub bytes_per_param: Option<f64>,
    /// bytes_per_param x params / median time.
    pub gbps: Option<f64>,
    /// gbps / the streaming kernel's GB/s at the same size.
    pub frac_bound: Option<f64>,
    /// The streaming kernel's time (28 bytes per parameter, AdamW's
    /// traffic) / this median time: the fraction of the ideal AdamW step.
    pub frac_adamw_bound: Option<f64>,
}

/// Optimizer state of each variant (ndarray, f32).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateRow {
    /// The variant ([`step::Variant::name`]).
    pub variant: String,
    /// Its state, in bytes and per parameter.
    #[serde(flatten)]
    pub size: step::StateSize,
}

/// A peak-RSS probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RssRow {
    /// Whose step was probed: `ours` or `torch`.
    pub side: String,
    /// What the probe measured.
    #[serde(flatten)]
    pub probe: memory::RssProbe,
    /// Peak RSS over the steps minus the RSS before them, in bytes.
    pub added_bytes: u64,
    /// `added_bytes` per trainable parameter.
    pub added_per_param: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Where and under what load it ran.
    pub machine: Machine,
    /// Alternation rounds ([`Options::rounds`]).
    pub rounds: usize,
    /// Seconds of calls per item per round ([`Options::budget_s`]).
    pub budget_s: f64,
    /// The PyTorch peer's versions; None when it did not run.
    pub peer: Option<peer::PeerInfo>,
    /// The timed items.
    pub rows: Vec<Row>,
    /// Optimizer state per variant.
    pub state: Vec<StateRow>,
    /// Peak-RSS probes.
    pub rss: Vec<RssRow>,
    /// The targets, evaluated on the rows.
    pub targets: Vec<Target>,
    /// Why something was skipped or may be off, for the reader.
    pub notes: Vec<String>,
}

type Runner<'a> = Box<dyn FnMut(usize) -> Result<Vec<f64>, String> + 'a>;

/// A measured item: its row identity, its runner and its samples.
struct Item<'a> {
    section: &'static str,
    backend: String,
    variant: String,
    params: usize,
    shape: String,
    bytes_per_param: Option<f64>,
    run: Runner<'a>,
    reps: usize,
    samples: Vec<f64>,
}

impl<'a> Item<'a> {
    fn new(section: &'static str, backend: &str, variant: &str, params: usize, shape: String, run: Runner<'a>) -> Self {
        Item { section, backend: backend.into(), variant: variant.into(), params, shape, bytes_per_param: None, run, reps: 1, samples: Vec::new() }
    }

    fn name(&self) -> String {
        format!("{} {} {} ({})", self.section, self.backend, self.variant, self.shape)
    }
}

fn say(opts: &Options, msg: impl AsRef<str>) {
    if opts.verbose {
        eprintln!("mgpo bench: {}", msg.as_ref());
    }
}

/// Calibrates the call counts, then runs `rounds` rounds over the items.
/// An item that fails is dropped with a note.
fn alternate(opts: &Options, items: &mut Vec<Item>, notes: &mut Vec<String>) {
    let mut failed = Vec::new();
    for (i, it) in items.iter_mut().enumerate() {
        match (it.run)(1) {
            Ok(t) => it.reps = timing::reps_for(t.first().copied().unwrap_or(0.0), opts.budget_s, 1, 5000),
            Err(e) => {
                notes.push(format!("{}: {e}", it.name()));
                failed.push(i);
            }
        }
    }
    for i in failed.into_iter().rev() {
        items.remove(i);
    }
    for round in 0..opts.rounds {
        say(opts, format!("  round {}/{}", round + 1, opts.rounds));
        let mut failed = Vec::new();
        for (i, it) in items.iter_mut().enumerate() {
            match (it.run)(it.reps) {
                Ok(t) => it.samples.extend(t),
                Err(e) => {
                    notes.push(format!("{}: {e}", it.name()));
                    failed.push(i);
                }
            }
        }
        for i in failed.into_iter().rev() {
            items.remove(i);
        }
    }
}

fn rows_of(items: &[Item]) -> Vec<Row> {
    let bound = items.iter().find(|i| i.backend == "stream").and_then(|i| Stats::of(&i.samples));
    items
        .iter()
        .filter_map(|it| {
            let stats = Stats::of(&it.samples)?;
            let t = stats.median_s;
            let gbps = it.bytes_per_param.map(|b| b * it.params as f64 / t / 1e9);
            let bound_gbps = bound.map(|b| stream::BYTES_PER_PARAM * it.params as f64 / b.median_s / 1e9);
            Some(Row {
                section: it.section.into(),
                backend: it.backend.clone(),
                variant: it.variant.clone(),
                params: it.params,
                shape: it.shape.clone(),
                stats,
                ns_per_param: t * 1e9 / it.params as f64,
                bytes_per_param: it.bytes_per_param,
                gbps,
                frac_bound: gbps.zip(bound_gbps).map(|(g, b)| g / b),
                frac_adamw_bound: if it.section == "steps" { bound.map(|b| b.median_s / t) } else { None },
            })
        })
        .collect()
}

/// The step items of backend `B` at `shape`.
fn backend_step_items<'a, B>(name: &str, be: impl Fn() -> B, shape: LoraShape, variants: &[Variant], items: &mut Vec<Item<'a>>) -> Result<(), String>
where
    B: TensorOps + HostIo + 'a,
{
    for &v in variants {
        let mut b = StepBench::new(be(), shape, v)?;
        let mut it = Item::new("steps", name, v.name(), shape.params(), shape.describe(), Box::new(move |reps| timing::sample(reps, || b.step())));
        it.bytes_per_param = Some(v.bytes_per_param() + v.w0_bytes_per_param(&shape));
        items.push(it);
    }
    Ok(())
}

/// Runs `$body` with `$be` bound to a constructor of the named backend.
macro_rules! with_backend {
    ($name:expr, $be:ident => $body:expr) => {
        match $name {
            "ndarray" => {
                let $be = mgpo_ndarray::NdBackend::<f32>::new;
                $body
            }
            #[cfg(feature = "candle")]
            "candle" => {
                let $be = mgpo_candle::cpu_f32;
                $body
            }
            #[cfg(feature = "tch")]
            "tch" => {
                let $be = mgpo_tch::cpu_f32;
                $body
            }
            #[cfg(feature = "dfdx")]
            "dfdx" => {
                let $be = mgpo_dfdx::cpu_f32;
                $body
            }
            #[cfg(feature = "burn")]
            "burn" => {
                let $be = mgpo_burn::cpu_f32;
                $body
            }
            other => Err(format!("backend {other:?} is not compiled in (compiled: {})", compiled_backends().join(", "))),
        }
    };
}

type SharedPeer = Rc<RefCell<peer::Peer>>;

fn peer_item<'a>(p: &SharedPeer, section: &'static str, variant: &str, params: usize, shape: String, req: serde_json::Value) -> Item<'a> {
    let p = Rc::clone(p);
    Item::new(section, "torch", variant, params, shape, Box::new(move |reps| p.borrow_mut().times(req.clone(), reps)))
}

/// The peer's step variants.
pub const PEER_STEP_VARIANTS: [&str; 5] = ["adamw-fused", "adamw-foreach", "adamw-forloop", "mgpo-adapter", "mgpo-weight-w0"];

fn steps_section(opts: &Options, peer: Option<&SharedPeer>, rows: &mut Vec<Row>, state: &mut Vec<StateRow>, notes: &mut Vec<String>) -> Result<(), String> {
    for &n in &opts.params {
        let shape = LoraShape::for_params(n);
        say(opts, format!("steps at {} parameters ({})", shape.params(), shape.describe()));
        let mut items: Vec<Item> = Vec::new();
        let mut st = stream::Stream::new(shape.params());
        st.calibrate(3);
        let mut bound = Item::new("steps", "stream", "in-place-stream", shape.params(), shape.describe(), Box::new(move |reps| {
            timing::sample(reps, || {
                st.pass();
                Ok::<_, String>(())
            })
        }));
        bound.bytes_per_param = Some(stream::BYTES_PER_PARAM);
        items.push(bound);
        let variants: Vec<Variant> = Variant::ALL.into_iter().filter(|v| !v.with_w0() || shape.params() <= opts.w0_max_params).collect();
        for b in &opts.backends {
            with_backend!(b.as_str(), be => backend_step_items(b, be, shape, &variants, &mut items))?;
        }
        if opts.backends.iter().any(|b| b == "ndarray") && n == *opts.params.iter().max().unwrap_or(&n) {
            for v in [Variant::Adamw, Variant::MgpoAdapter, Variant::MgpoWeight] {
                let b = StepBench::new(mgpo_ndarray::NdBackend::<f32>::new(), shape, v)?;
                state.push(StateRow { variant: v.name().into(), size: b.state_size(4) });
            }
        }
        // mgpo-ndarray's AdamW pass alone over the same tensors: batched
        // (`adamw_many`, one parallel region, what a step runs) and one
        // tensor at a time (`adamw`, a region per tensor, as before the
        // batched methods).
        if opts.backends.iter().any(|b| b == "ndarray") {
            for (variant, batched) in [("adamw-kernel", true), ("adamw-kernel-per-tensor", false)] {
                let mut k = KernelBench::new(shape)?;
                let mut it = Item::new("steps", "ndarray", variant, shape.params(), shape.describe(), Box::new(move |reps| timing::sample(reps, || k.run(batched))));
                it.bytes_per_param = Some(28.0);
                items.push(it);
            }
        }
        // burn's own AdamW and mgpo-burn's module optimizer on one module
        // of the same tensors (the MGPO / AdamW ratio against burn's AdamW).
        #[cfg(feature = "burn")]
        if opts.backends.iter().any(|b| b == "burn") {
            for v in burn_module::VARIANTS {
                let mut b = burn_module::ModuleBench::new(shape, v)?;
                let mut it = Item::new("steps", "burn", v, shape.params(), shape.describe(), Box::new(move |reps| timing::sample(reps, || b.step())));
                it.bytes_per_param = Some(if v == "module-mgpo-adapter" { 44.0 } else { 28.0 });
                items.push(it);
            }
        }
        if let Some(p) = peer {
            for v in PEER_STEP_VARIANTS {
                if v == "mgpo-weight-w0" && shape.params() > opts.w0_max_params {
                    continue;
                }
                let req = json!({"op": "step", "variant": v, "dim": shape.dim, "rank": shape.rank, "adapters": shape.adapters});
                let mut it = peer_item(p, "steps", v, shape.params(), shape.describe(), req);
                it.bytes_per_param = Some(match v {
                    "mgpo-adapter" => 44.0,
                    "mgpo-weight-w0" => 48.0 + Variant::MgpoWeightW0.w0_bytes_per_param(&shape),
                    _ => 28.0,
                });
                items.push(it);
            }
        }
        alternate(opts, &mut items, notes);
        rows.extend(rows_of(&items));
        drop(items);
        if let Some(p) = peer {
            p.borrow_mut().drop_cache()?;
        }
    }
    Ok(())
}

/// The raw AdamW kernel over a LoRA tensor set (no optimizer around it).
struct KernelBench {
    p: Vec<ndarray::ArrayD<f32>>,
    g: Vec<ndarray::ArrayD<f32>>,
    m: Vec<ndarray::ArrayD<f32>>,
    v: Vec<ndarray::ArrayD<f32>>,
}

impl KernelBench {
    fn new(shape: LoraShape) -> Result<Self, String> {
        let be = mgpo_ndarray::NdBackend::<f32>::new();
        let t = step::LoraTensors::new(&be, shape, false)?;
        let m = t.params.iter().map(|p| p.mapv(|_| 0.0)).collect();
        let v = t.params.iter().map(|p| p.mapv(|_| 0.0)).collect();
        Ok(KernelBench { p: t.params, g: t.grads, m, v })
    }

    /// One AdamW pass over every tensor: all at once (`adamw_many`, as
    /// `Mgpo::step` runs it) or tensor by tensor (`adamw`).
    fn run(&mut self, batched: bool) -> Result<(), String> {
        use mgpo_core::backend::{AdamWItem, FusedUpdate};
        let k = mgpo_core::backend::AdamWStep { unperturb: 0.0, decay: 1.0, grad_scale: 1.0, beta1: 0.9, beta2: 0.999, step_size: 1e-4, bias2_sqrt: 0.5, eps: 1e-8 };
        let be = mgpo_ndarray::NdBackend::<f32>::new();
        let mut items: Vec<AdamWItem<'_, ndarray::ArrayD<f32>>> =
            self.p.iter_mut().zip(&self.g).zip(self.m.iter_mut().zip(&mut self.v)).map(|((p, g), (m, v))| AdamWItem { p, g, m, v, k }).collect();
        if batched {
            std::hint::black_box(be.adamw_many(&mut items).map_err(|e| e.to_string())?);
        } else {
            for it in &mut items {
                std::hint::black_box(be.adamw(it.p, it.g, it.m, it.v, &k).map_err(|e| e.to_string())?);
            }
        }
        Ok(())
    }
}

fn weight_section(opts: &Options, peer: Option<&SharedPeer>, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<(), String> {
    let d = opts.weight_dim;
    for &r in &opts.weight_ranks {
        say(opts, format!("weight space at {d} x {d}, r {r}"));
        let shape = format!("{d}x{d} r{r}");
        let n = 2 * d * r;
        let mut items: Vec<Item> = Vec::new();
        for b in &opts.backends {
            with_backend!(b.as_str(), be => {
                let mut ours = weight::RankDecomposed::new(be(), d, d, r)?;
                items.push(Item::new("weight", b, "rank-decomposed-in-place", n, shape.clone(), Box::new(move |reps| timing::sample(reps, || ours.in_place()))));
                let norms = weight::RankDecomposed::new(be(), d, d, r)?;
                items.push(Item::new("weight", b, "rank-decomposed-norms", n, shape.clone(), Box::new(move |reps| timing::sample(reps, || norms.norms().map(|_| ())))));
                Ok::<(), String>(())
            })?;
        }
        if opts.backends.iter().any(|b| b == "ndarray") {
            let mut mat = weight::Materialised::new(d, d, r);
            items.push(Item::new("weight", "ndarray", "materialised-authors", n, shape.clone(), Box::new(move |reps| timing::sample(reps, || mat.step()))));
            let mat2 = weight::Materialised::new(d, d, r);
            items.push(Item::new("weight", "ndarray", "materialised-norms", n, shape.clone(), Box::new(move |reps| timing::sample(reps, || Ok::<_, String>(std::hint::black_box(mat2.norms())).map(|_| ())))));
            // The whole optimizer step of this one adapter.
            let one = LoraShape { dim: d, rank: r, adapters: 1 };
            for v in [Variant::Adamw, Variant::MgpoWeight, Variant::MgpoWeightW0] {
                let mut b = StepBench::new(mgpo_ndarray::NdBackend::<f32>::new(), one, v)?;
                items.push(Item::new("weight", "ndarray", &format!("step-{}", v.name()), n, shape.clone(), Box::new(move |reps| timing::sample(reps, || b.step()))));
            }
        }
        if let Some(p) = peer {
            for what in ["authors", "norms"] {
                let req = json!({"op": "weight", "out": d, "in": d, "rank": r, "what": what});
                items.push(peer_item(p, "weight", &format!("materialised-{what}"), n, shape.clone(), req));
            }
            for v in ["adamw-fused", "mgpo-weight-w0"] {
                let req = json!({"op": "step", "variant": v, "dim": d, "rank": r, "adapters": 1});
                items.push(peer_item(p, "weight", &format!("step-{v}"), n, shape.clone(), req));
            }
        }
        alternate(opts, &mut items, notes);
        rows.extend(rows_of(&items));
        drop(items);
        if let Some(p) = peer {
            p.borrow_mut().drop_cache()?;
        }
    }
    Ok(())
}

#[allow(unused_variables, unused_mut)]
fn e2e_section(opts: &Options, peer: Option<&SharedPeer>, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<(), String> {
    let s = opts.e2e;
    say(opts, format!("end to end: LoRA MLP {}", s.describe()));
    let mut items: Vec<Item> = Vec::new();
    #[cfg(feature = "candle")]
    if opts.backends.iter().any(|b| b == "candle") {
        for v in e2e::VARIANTS {
            let mut m = e2e::candle::E2e::new(s, v)?;
            items.push(Item::new("e2e", "candle", v.name(), s.params(), s.describe(), Box::new(move |reps| timing::sample(reps, || m.step()))));
        }
    }
    #[cfg(feature = "tch")]
    if opts.backends.iter().any(|b| b == "tch") {
        for v in e2e::VARIANTS {
            let mut m = e2e::tch_e2e::E2e::new(s, v)?;
            items.push(Item::new("e2e", "tch", v.name(), s.params(), s.describe(), Box::new(move |reps| timing::sample(reps, || m.step()))));
        }
    }
    if items.is_empty() {
        notes.push("e2e: needs the candle or tch backend (features `candle`, `tch`)".into());
    }
    for b in e2e::demo::backends() {
        if !opts.backends.iter().any(|x| x == b) {
            continue;
        }
        for v in e2e::VARIANTS {
            let mut m = e2e::demo::Demo::new(b, v)?;
            items.push(Item::new("e2e-demo", b, v.name(), e2e::demo::params(), e2e::demo::describe(), Box::new(move |reps| timing::sample(reps, || m.step()))));
        }
    }
    if let Some(p) = peer {
        for v in ["adamw-fused", "mgpo-adapter", "mgpo-weight-w0"] {
            let req = json!({"op": "e2e", "variant": v, "dim": s.dim, "rank": s.rank, "layers": s.layers, "tokens": s.tokens});
            items.push(peer_item(p, "e2e", v, s.params(), s.describe(), req));
        }
    }
    // A training step takes far longer than an optimizer step: four times
    // the budget, so each round has several calls per item.
    let long = Options { budget_s: 4.0 * opts.budget_s, ..opts.clone() };
    alternate(&long, &mut items, notes);
    rows.extend(rows_of(&items));
    drop(items);
    if let Some(p) = peer {
        p.borrow_mut().drop_cache()?;
    }
    Ok(())
}

fn memory_section(opts: &Options, peer_ok: bool, threads: usize, rss: &mut Vec<RssRow>, notes: &mut Vec<String>) {
    let n = opts.params.iter().copied().max().unwrap_or(10_000_000);
    let (d, r) = (opts.weight_dim, opts.weight_ranks.first().copied().unwrap_or(8));
    say(opts, format!("memory: peak RSS at {n} parameters and at {d} x {d}, r {r}"));
    let mut push = |side: &str, res: Result<memory::RssProbe, String>| match res {
        Ok(p) => rss.push(RssRow { side: side.into(), added_bytes: p.added(), added_per_param: p.added() as f64 / p.params as f64, probe: p }),
        Err(e) => notes.push(e),
    };
    if let Some(cmd) = &opts.probe_cmd {
        for k in ["step:none", "step:adamw", "step:mgpo-adapter", "step:mgpo-weight"] {
            push("ours", memory::probe_child(cmd, k, n, d, r));
        }
        for k in ["weight:none", "weight:ours", "weight:materialised"] {
            push("ours", memory::probe_child(cmd, k, n, d, r));
        }
    } else {
        push("ours", Err("memory: no probe command given, our RSS probes skipped".into()));
    }
    if peer_ok {
        for k in ["step:none", "step:adamw-fused", "step:adamw-foreach", "step:mgpo-adapter", "weight:none", "weight:authors"] {
            push("torch", peer::probe(&opts.python, opts.peer_script.as_deref(), threads, k, n, d, r));
        }
    }
}

/// Runs everything `opts` asks for.
pub fn run(opts: &Options) -> Result<Report, String> {
    let threads = rayon::current_num_threads();
    let load_before = load_average();
    let mut notes = Vec::new();
    for b in &opts.backends {
        if !compiled_backends().contains(&b.as_str()) {
            return Err(format!("backend {b:?} is not compiled in (compiled: {})", compiled_backends().join(", ")));
        }
    }
    let peer = match opts.peer {
        PeerMode::Off => None,
        mode => match peer::Peer::spawn(&opts.python, opts.peer_script.as_deref(), threads) {
            Ok(p) => Some(Rc::new(RefCell::new(p))),
            Err(e) if mode == PeerMode::Auto => {
                notes.push(format!("PyTorch peer not run: {e}"));
                None
            }
            Err(e) => return Err(e),
        },
    };
    let peer_info = peer.as_ref().map(|p| p.borrow().info.clone());
    let (mut rows, mut state, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    if opts.steps {
        steps_section(opts, peer.as_ref(), &mut rows, &mut state, &mut notes)?;
    }
    if opts.weight {
        weight_section(opts, peer.as_ref(), &mut rows, &mut notes)?;
    }
    if opts.e2e_section {
        e2e_section(opts, peer.as_ref(), &mut rows, &mut notes)?;
    }
    let peer_ok = peer.is_some();
    drop(peer);
    if opts.memory {
        memory_section(opts, peer_ok, threads, &mut rss, &mut notes);
    }
    let machine = Machine {
        cpu: cpu_model(),
        logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads,
        isa: format!("{:?}", mgpo_ndarray::isa()),
        load_before,
        load_after: load_average(),
    };
    let mut report = Report { machine, rounds: opts.rounds, budget_s: opts.budget_s, peer: peer_info, rows, state, rss, targets: Vec::new(), notes };
    report.targets = report::targets(&report, opts);
    Ok(report)
}

/// Tests of this crate take this lock: the RSS probe test measures the
/// whole process, so nothing else may allocate meanwhile.
#[cfg(test)]
pub(crate) fn test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
