//! Parameter groups against PyTorch: a small LoRA regression problem
//! trained for several scheduled steps with two groups (the default one,
//! weight decay 0.1; `slow_no_decay`, lr_scale 0.5 and weight decay 0: the
//! biases, the norm and one B), compared with `torch.optim.AdamW` given the
//! same two param groups in float64 (tools/adamw_groups.py). rho = 0 is
//! pure AdamW; with rho > 0 in adapter space the Python side adds MGPO's
//! perturbation, written there from the spec, around torch's AdamW, and
//! takes the gradients by autograd at the perturbed point.
//!
//! Needs the torch venv: `MGPO_TORCH_PYTHON` (exported by
//! `source scripts/setup-libtorch.sh`) or `<workspace>/.venv-torch`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::Named;
use mgpo_core::{is_bias_or_norm, AdamWConfig, Config, Direction, Layout, ParamGroup, Scope, StepReport, WarmupCosine};
use mgpo_ndarray::{MgpoOptimizer, NdBackend};
use ndarray::{Array2, ArrayD, Ix2, IxDyn, Zip};
use serde_json::{json, Value};

const PEAK_LR: f64 = 2e-2;
const STEPS: u64 = 8;
const WARMUP: u64 = 2;
const BATCH: usize = 6;
/// Largest |rust - torch| / max(|rust|, |torch|) accepted, over every entry of every step.
const RTOL: f64 = 1e-12;

/// One adapter of the problem: its loss is 0.5 ||(W0 + s B A) X - Y||^2.
struct Adapter {
    a: usize,
    b: usize,
    scale: f64,
    w0: Array2<f64>,
    x: Array2<f64>,
    y: Array2<f64>,
}

/// The tensors, their groups and the loss: the adapters' regressions plus
/// sum(w cos p) + p.p / 2 for each plain tensor p.
struct Problem {
    layout: Layout,
    init: Named<f64>,
    adapters: Vec<Adapter>,
    plain: Vec<(usize, ArrayD<f64>)>,
}

/// `n` values uniform in [-scale, scale] from a splitmix64 stream.
fn values(state: &mut u64, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            scale * (2.0 * (z >> 11) as f64 / (1u64 << 53) as f64 - 1.0)
        })
        .collect()
}

/// Adapters q and v, a head and a norm; with `groups`, the biases, the norm
/// and v.b form `slow_no_decay` (lr_scale 0.5, weight decay 0).
fn problem(groups: bool) -> Problem {
    let mut lb = Layout::builder()
        .adapter("q", 8.0, &[2, 5], &[4, 2], false)
        .plain("head.weight", &[3, 4])
        .adapter("v", 6.0, &[3, 5], &[3, 3], false)
        .plain("head.bias", &[3])
        .plain("norm.weight", &[4]);
    if groups {
        let slow = ParamGroup::new("slow_no_decay").lr_scale(0.5).weight_decay(0.0);
        lb = lb.param_group_where(slow, |n| is_bias_or_norm(n) || n == "v.b");
    }
    let layout = lb.build().unwrap();
    let mut rng = 20_261_202u64;
    let mut mat = |rows: usize, cols: usize, scale: f64| Array2::from_shape_vec((rows, cols), values(&mut rng, rows * cols, scale)).unwrap();
    let adapters = layout
        .adapters()
        .iter()
        .map(|ad| {
            let (out, inp) = (layout.tensors()[ad.b].shape[0], layout.tensors()[ad.a].shape[1]);
            Adapter { a: ad.a, b: ad.b, scale: ad.scale, w0: mat(out, inp, 0.5), x: mat(inp, BATCH, 1.0), y: mat(out, BATCH, 1.0) }
        })
        .collect();
    let plain = layout.plain().iter().map(|&i| (i, mat(1, layout.tensors()[i].shape.iter().product(), 1.0).into_shape_with_order(IxDyn(&layout.tensors()[i].shape)).unwrap())).collect();
    let init = layout.tensors().iter().map(|t| (t.name.clone(), mat(1, t.shape.iter().product(), 0.5).into_shape_with_order(IxDyn(&t.shape)).unwrap())).collect();
    Problem { layout, init, adapters, plain }
}

/// The gradient of the problem's loss at `t`, derived by hand:
/// R = (W0 + s B A) X - Y, dA = s B^T R X^T, dB = s R X^T A^T; -w sin p + p.
fn loss_grads(p: &Problem, t: &Named<f64>) -> Named<f64> {
    let mut g: Named<f64> = t.iter().map(|(n, x)| (n.clone(), x.mapv(|_| 0.0))).collect();
    for ad in &p.adapters {
        let a = t[ad.a].1.view().into_dimensionality::<Ix2>().unwrap();
        let b = t[ad.b].1.view().into_dimensionality::<Ix2>().unwrap();
        let r = (&ad.w0 + &(b.dot(&a) * ad.scale)).dot(&ad.x) - &ad.y;
        let dw = r.dot(&ad.x.t());
        g[ad.a].1 = (b.t().dot(&dw) * ad.scale).into_dyn();
        g[ad.b].1 = (dw.dot(&a.t()) * ad.scale).into_dyn();
    }
    for (i, w) in &p.plain {
        g[*i].1 = Zip::from(&t[*i].1).and(w).map_collect(|&x, &w| -w * x.sin() + x);
    }
    g
}

/// The optimizer on the problem for `STEPS` steps of the warm-up + cosine
/// schedule: the tensors after each step, and the reports.
fn run_rust(p: &Problem, config: Config) -> (Vec<Named<f64>>, Vec<StepReport>) {
    let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), config, p.layout.clone()).unwrap();
    let schedule = WarmupCosine { lr: config.adamw.lr, warmup: WARMUP, total: STEPS };
    let mut t = p.init.clone();
    let (mut history, mut reports) = (Vec::new(), Vec::new());
    for k in 0..STEPS {
        opt.set_lr(schedule.lr_at(k)).unwrap();
        opt.perturb(&mut t).unwrap();
        let g = loss_grads(p, &t);
        let rep = opt.step(&mut t, &g).unwrap();
        assert!(!rep.skipped, "step {k} skipped");
        history.push(t.clone());
        reports.push(rep);
    }
    (history, reports)
}

fn flat<D: ndarray::Dimension>(x: &ndarray::Array<f64, D>) -> Vec<f64> {
    x.iter().copied().collect()
}

/// The Python side's description of a run of `config` on `p`.
fn torch_run(name: &str, p: &Problem, config: Config) -> Value {
    json!({
        "name": name,
        "config": config,
        "warmup": WARMUP,
        "total": STEPS,
        "groups": p.layout.param_groups().iter().map(|g| json!({"lr_scale": g.lr_scale, "weight_decay": g.weight_decay})).collect::<Vec<_>>(),
        "tensors": p.layout.tensors().iter().zip(&p.init).map(|(info, (_, x))| json!({"name": info.name, "shape": info.shape, "data": flat(x), "group": info.param_group})).collect::<Vec<_>>(),
        "adapters": p.adapters.iter().map(|ad| json!({"a": ad.a, "b": ad.b, "scale": ad.scale, "w0": flat(&ad.w0), "x": flat(&ad.x), "y": flat(&ad.y)})).collect::<Vec<_>>(),
        "plain": p.plain.iter().map(|(i, w)| json!({"index": i, "w": flat(w)})).collect::<Vec<_>>(),
    })
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The torch venv's Python: `MGPO_TORCH_PYTHON`, else `<workspace>/.venv-torch`.
fn torch_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MGPO_TORCH_PYTHON") {
        return p.into();
    }
    let venv = workspace().join(".venv-torch/bin/python");
    assert!(
        venv.exists(),
        "no Python with torch: MGPO_TORCH_PYTHON is unset and {} does not exist; run `source scripts/setup-libtorch.sh` first (it installs torch into .venv-torch and exports MGPO_TORCH_PYTHON)",
        venv.display()
    );
    venv
}

/// Runs tools/adamw_groups.py on `runs`: per run, per step, per tensor, the values.
fn torch(runs: Vec<Value>) -> Vec<Vec<Vec<Vec<f64>>>> {
    let python = torch_python();
    let script = workspace().join("tools/adamw_groups.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; run `source scripts/setup-libtorch.sh` first", python.display()));
    let input = json!({ "runs": runs }).to_string();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{} {} failed ({}):\n{}", python.display(), script.display(), out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("adamw_groups.py wrote no JSON");
    v["runs"].as_array().unwrap().iter().map(|r| serde_json::from_value(r["params"].clone()).unwrap()).collect()
}

/// A run's tensors after each step as plain values, as the Python side gives them.
fn host(history: &[Named<f64>]) -> Vec<Vec<Vec<f64>>> {
    history.iter().map(|t| t.iter().map(|(_, x)| flat(x)).collect()).collect()
}

/// Largest relative difference over every entry of every step, and where.
fn max_rel(rust: &[Named<f64>], torch: &[Vec<Vec<f64>>]) -> (f64, String) {
    assert_eq!(rust.len(), torch.len(), "step counts differ");
    let mut worst = (0.0, String::new());
    for (k, (r, t)) in rust.iter().zip(torch).enumerate() {
        assert_eq!(r.len(), t.len(), "tensor counts differ");
        for ((name, x), y) in r.iter().zip(t) {
            assert_eq!(x.len(), y.len(), "`{name}`: sizes differ");
            for (j, (&a, &b)) in x.iter().zip(y).enumerate() {
                let rel = if a == b { 0.0 } else { (a - b).abs() / a.abs().max(b.abs()) };
                if rel > worst.0 || rel.is_nan() {
                    worst = (rel, format!("step {}, `{name}`[{j}]: {a:e} here, {b:e} in torch", k + 1));
                }
            }
        }
    }
    worst
}

fn adamw_config() -> Config {
    Config::adamw(AdamWConfig { lr: PEAK_LR, weight_decay: 0.1, ..AdamWConfig::default() })
}

/// The compared runs: pure AdamW (rho = 0), then MGPO in adapter space,
/// global ascent with APN, and per-adapter descent with the 1 / g_bar
/// clamp and clipping.
fn configs() -> [(&'static str, Config); 3] {
    let global = Config { rho: 0.05, adamw: adamw_config().adamw, ..Config::paper_nlu(PEAK_LR) };
    let per_adapter = Config { direction: Direction::Descent, scope: Scope::PerAdapter, max_inv_scale: Some(10.0), max_grad_norm: Some(1.0), ..global };
    [("adamw", adamw_config()), ("mgpo-global-ascent", global), ("mgpo-per-adapter-descent-clipped", per_adapter)]
}

/// torch's results for [`configs`] on the grouped problem, computed once
/// (one Python process, one import of torch) for every test of the file.
fn torch_results() -> &'static [Vec<Vec<Vec<f64>>>] {
    static RESULTS: OnceLock<Vec<Vec<Vec<Vec<f64>>>>> = OnceLock::new();
    RESULTS.get_or_init(|| {
        let p = problem(true);
        torch(configs().iter().map(|(name, cfg)| torch_run(name, &p, *cfg)).collect())
    })
}

#[test]
fn groups_are_as_registered() {
    let p = problem(true);
    let groups: Vec<(&str, usize)> = p.layout.tensors().iter().map(|t| (t.name.as_str(), t.param_group)).collect();
    assert_eq!(groups, [("q.a", 0), ("q.b", 0), ("head.weight", 0), ("v.a", 0), ("v.b", 1), ("head.bias", 1), ("norm.weight", 1)]);
    let pg = &p.layout.param_groups()[1];
    assert_eq!((pg.name.as_str(), pg.lr_scale, pg.weight_decay), ("slow_no_decay", 0.5, Some(0.0)));
}

/// rho = 0: the optimizer is AdamW with per-group learning rates and weight
/// decays, step for step as torch's AdamW with two param groups under
/// LambdaLR; without the groups it is not.
#[test]
fn adamw_with_two_groups_matches_torch() {
    let (name, cfg) = configs()[0];
    assert_eq!(cfg.rho, 0.0);
    let torch = &torch_results()[0];
    let (rust, _) = run_rust(&problem(true), cfg);
    let (rel, at) = max_rel(&rust, torch);
    eprintln!("{name}, two groups: largest relative difference from torch {rel:e} ({at})");
    assert!(rel <= RTOL, "{rel:e} at {at}");

    let (ungrouped, _) = run_rust(&problem(false), cfg);
    let (rel, _) = max_rel(&ungrouped, torch);
    assert!(rel > 1e-3, "the groups change nothing ({rel:e}): the comparison would not see them");
}

/// rho > 0 in adapter space: the optimizer with two groups equals MGPO
/// written in Python around torch's AdamW with two param groups, with the
/// gradients taken by autograd at the perturbed point; and the perturbation
/// matters (the result is not AdamW's).
#[test]
fn mgpo_with_two_groups_matches_torch() {
    let p = problem(true);
    let (plain_adamw, _) = run_rust(&p, configs()[0].1);
    for ((name, cfg), torch) in configs().iter().zip(torch_results()).skip(1) {
        assert!(cfg.rho > 0.0);
        let (rust, reports) = run_rust(&p, *cfg);
        assert!(reports[1..].iter().all(|r| r.groups.iter().all(|g| g.perturbation_norm > 0.0)), "{name}: a step was not perturbed");
        if cfg.max_grad_norm.is_some() {
            assert!(reports.iter().any(|r| r.clip_factor < 1.0), "{name}: clipping never binds");
        }
        let (rel, at) = max_rel(&rust, torch);
        eprintln!("{name}, two groups: largest relative difference from torch {rel:e} ({at})");
        assert!(rel <= RTOL, "{name}: {rel:e} at {at}");
        let (rel, _) = max_rel(&rust, &host(&plain_adamw));
        assert!(rel > 1e-4, "{name}: the perturbation changes nothing ({rel:e})");
    }
}
