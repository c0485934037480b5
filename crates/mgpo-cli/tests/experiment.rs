//! `mgpo demo` / `mgpo experiment` and the library behind them: the
//! rebound metric, the sweep's files, determinism, and agreement between
//! backends on the first steps.

use std::path::{Path, PathBuf};
use std::process::Command;

use mgpo_experiments::backend::{self, Backend, SessionSpec};
use mgpo_experiments::metrics::{rebound, smooth};
use mgpo_experiments::model::{adapter_init, BaseModel};
use mgpo_experiments::run::{run, RunSpec};
use mgpo_experiments::sweep::summarize;
use mgpo_experiments::task::task;
use mgpo_experiments::{Error, Method};

fn mgpo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgpo"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mgpo-exp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// One base-network cache for every test of this binary (pre-training is
/// deterministic, so sharing it changes nothing but time).
fn cache() -> PathBuf {
    std::env::temp_dir().join("mgpo-exp-test-cache")
}

fn base(name: &str) -> (mgpo_experiments::task::Task, BaseModel) {
    let t = task(name, 0).unwrap();
    let (b, _) = t.base_model(&cache()).unwrap();
    (t, b)
}

fn spec(method: Method, rank: usize, seed: u64, steps: u64) -> RunSpec {
    RunSpec { task: "digits-rot".into(), method, rank, alpha: rank as f64, lr: 1e-2, seed, steps, batch: 16, eval_every: 5 }
}

#[test]
fn rebound_of_hand_made_curves() {
    // Converges, rises by 0.6 above its minimum, converges again: a rebound.
    let double_descent = [3.0, 2.0, 1.0, 0.5, 0.8, 1.1, 0.7, 0.3, 0.1];
    assert!((rebound(&double_descent) - 0.6).abs() < 1e-12);
    // Monotone: none.
    assert_eq!(rebound(&[3.0, 2.0, 1.0, 0.5, 0.5, 0.2]), 0.0);
    // Noise is what the smoothing is for: a zig-zag of +-0.1 around a
    // falling trend has a raw rebound, and none once smoothed over 2.
    let zigzag: Vec<f64> = (0..20).map(|t| 2.0 - 0.05 * t as f64 + if t % 2 == 0 { 0.1 } else { -0.1 }).collect();
    assert!(rebound(&zigzag) > 0.1);
    assert!(rebound(&smooth(&zigzag, 2)[1..]) < 1e-12);
    // Diverging after converging is an infinite rebound.
    assert_eq!(rebound(&[1.0, 0.5, f64::INFINITY]), f64::INFINITY);
}

#[test]
fn summary_measures_the_rebound_after_the_smoothing_window() {
    let (t, b) = base("digits-rot");
    let be = backend::by_name("candle").unwrap();
    let log = run(&t, &b, be.as_ref(), &spec(Method::Lora, 4, 0, 12), &mut |_| {}).unwrap();
    let s = summarize(&log, 4);
    let sm = smooth(&log.losses(), 4);
    assert_eq!(s.rebound, rebound(&sm[3..]));
    assert_eq!(s.final_loss, sm[11]);
    assert_eq!(log.evals.len(), 1 + 2 + 1, "evaluations at 0, 5, 10 and the last step");
    assert!(s.best_test_accuracy >= log.evals[0].test_accuracy);
}

#[test]
fn same_seed_same_curve_other_seed_other_curve() {
    let (t, b) = base("digits-rot");
    let be = backend::by_name("candle").unwrap();
    for m in [Method::Lora, Method::MgpoPaper, Method::MgpoTrainer, Method::LoraRandom] {
        let a = run(&t, &b, be.as_ref(), &spec(m, 4, 1, 8), &mut |_| {}).unwrap();
        let a2 = run(&t, &b, be.as_ref(), &spec(m, 4, 1, 8), &mut |_| {}).unwrap();
        let c = run(&t, &b, be.as_ref(), &spec(m, 4, 2, 8), &mut |_| {}).unwrap();
        assert_eq!(a.losses(), a2.losses(), "{m}: same seed, different losses");
        assert_eq!(a.evals, a2.evals, "{m}: same seed, different evaluations");
        assert_ne!(a.losses(), c.losses(), "{m}: another seed gave the same curve");
    }
    // The base network is deterministic too: training it again gives the same weights.
    let dir = tmp("base");
    let (fresh, cached) = t.base_model(&dir).unwrap();
    assert!(!cached);
    assert_eq!(fresh, b);
    assert!(t.base_model(&dir).unwrap().1, "the second call loads the cache");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `steps` steps of `method` on two backends from the same start and
/// returns the largest relative difference of the losses and of the
/// trainable tensors.
fn compare(a: &dyn Backend, b: &dyn Backend, method: Method, steps: usize) -> (f64, f64) {
    let (t, base) = base("digits-rot");
    let rank = 8;
    let mk = |be: &dyn Backend| {
        let spec = SessionSpec { base: &base, rank, alpha: 16.0, config: method.config(5e-3, 11), init_a: adapter_init(rank, 7) };
        be.session(&spec).unwrap()
    };
    let (mut sa, mut sb) = (mk(a), mk(b));
    assert_eq!(sa.shapes(), sb.shapes());
    let (mut dl, mut dp) = (0.0f64, 0.0f64);
    let rel = |x: f64, y: f64| (x - y).abs() / (1e-3 + x.abs().max(y.abs()));
    for k in 0..steps {
        let idx: Vec<usize> = (k * 16..(k + 1) * 16).collect();
        let sub = t.train.subset(&idx);
        let oa = sa.train_step(&sub.x, &sub.y).unwrap();
        let ob = sb.train_step(&sub.x, &sub.y).unwrap();
        assert!(!oa.report.skipped && !ob.report.skipped);
        dl = dl.max(rel(oa.loss, ob.loss));
        for (pa, pb) in sa.params().unwrap().iter().zip(&sb.params().unwrap()) {
            let scale = pa.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-3) as f64;
            let d = pa.iter().zip(pb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) as f64;
            dp = dp.max(d / scale);
        }
    }
    let ea = sa.evaluate(&t.test.x, &t.test.y).unwrap();
    let eb = sb.evaluate(&t.test.x, &t.test.y).unwrap();
    dl = dl.max(rel(ea.loss, eb.loss));
    (dl, dp)
}

#[test]
fn backends_agree_on_the_first_steps() {
    let names = backend::names();
    assert!(names.contains(&"candle") && names.contains(&"dfdx"), "the CLI compiles candle and dfdx in: {names:?}");
    let candle = backend::by_name("candle").unwrap();
    for other in names.iter().filter(|n| **n != "candle") {
        let o = backend::by_name(other).unwrap();
        for m in [Method::Lora, Method::MgpoPaper, Method::MgpoTrainer, Method::MgpoNoApn, Method::LoraRandom] {
            let (dl, dp) = compare(candle.as_ref(), o.as_ref(), m, 5);
            // Losses to f32 rounding. Parameters within 1% of each tensor's
            // scale: AdamW's first steps move each element by about
            // lr * g / (|g| + eps), so elements whose gradient is tiny take
            // steps whose size depends on rounding; a real difference (a
            // missing perturbation, a wrong scaling) is of order 1.
            assert!(dl < 1e-4 && dp < 1e-2, "candle vs {other}, {m}: loss differs by {dl:e}, parameters by {dp:e} (relative)");
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let (t, b) = base("digits-rot");
    let be = backend::by_name("candle").unwrap();
    let e = run(&t, &b, be.as_ref(), &RunSpec { rank: 0, ..spec(Method::Lora, 4, 0, 5) }, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidSpec(_)), "{e}");
    let e = run(&t, &b, be.as_ref(), &RunSpec { lr: f64::NAN, ..spec(Method::Lora, 4, 0, 5) }, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidSpec(_)), "{e}");
    assert!(matches!(backend::by_name("nope"), Err(Error::UnknownBackend { .. })));
    let mut s = be
        .session(&SessionSpec { base: &b, rank: 2, alpha: 2.0, config: Method::Lora.config(1e-3, 0), init_a: adapter_init(2, 0) })
        .unwrap();
    assert!(s.train_step(&[0.0; 63], &[1]).is_err(), "a batch of the wrong width");
    assert!(s.train_step(&[0.0; 64], &[10]).is_err(), "a label out of range");
    let bad_dfdx = backend::by_name("dfdx")
        .unwrap()
        .session(&SessionSpec { base: &b, rank: 3, alpha: 3.0, config: Method::Lora.config(1e-3, 0), init_a: adapter_init(3, 0) });
    assert!(matches!(bad_dfdx.err(), Some(Error::InvalidSpec(m)) if m.contains("ranks")));

    let out = mgpo().args(["experiment", "--methods", "sgd", "--quiet"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown method `sgd`"));
    let out = mgpo().args(["demo", "--backend", "jax"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not compiled in"));
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Parses a CSV with a header into rows of fields, checking the width.
fn csv(p: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = read(p);
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(String::from).collect()).collect();
    for r in &rows {
        assert_eq!(r.len(), header.len(), "{}: ragged row {r:?}", p.display());
    }
    (header, rows)
}

#[test]
fn experiment_writes_files_that_parse() {
    let out = tmp("sweep");
    let cache = cache();
    let status = mgpo()
        .args(["experiment", "--tasks", "digits-rot", "--methods", "lora,mgpo-paper,lora-random", "--ranks", "2,4", "--lrs", "0.01"])
        .args(["--seeds", "2", "--steps", "6", "--batch", "8", "--eval-every", "3", "--smooth", "2", "--quiet", "--out"])
        .arg(&out)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&status.stderr));
    assert!(stdout.contains("| digits-rot | 0.01 | 4 | mgpo-paper |"), "{stdout}");
    let runs = 2 * 3 * 2;

    let (h, rows) = csv(&out.join("steps.csv"));
    assert_eq!(rows.len(), runs * 6);
    let li = h.iter().position(|c| c == "loss").unwrap();
    assert!(rows.iter().all(|r| r[li].parse::<f64>().unwrap().is_finite()));
    let (_, rows) = csv(&out.join("evals.csv"));
    assert_eq!(rows.len(), runs * 3, "evaluations at 0, 3 and 6");
    let (h, rows) = csv(&out.join("runs.csv"));
    assert_eq!(rows.len(), runs);
    let ri = h.iter().position(|c| c == "rebound").unwrap();
    assert!(rows.iter().all(|r| r[ri].parse::<f64>().unwrap() >= 0.0));
    let (h, rows) = csv(&out.join("summary.csv"));
    assert_eq!(rows.len(), runs / 2);
    assert!(rows.iter().all(|r| r[h.iter().position(|c| c == "seeds").unwrap()] == "2"));

    let json: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), runs / 2);
    assert_eq!(json[0]["method"], "lora");
    let spec: serde_json::Value = serde_json::from_str(&read(&out.join("spec.json"))).unwrap();
    assert_eq!(spec["steps"], 6);
    assert_eq!(read(&out.join("summary.md")).lines().count(), 2 + runs / 2);

    let png = std::fs::read(out.join("plots").join("loss_digits-rot_lr0.01.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "a plot with curves and text is not tiny");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn demo_runs_and_names_its_outputs() {
    let out = tmp("demo");
    let o = mgpo().args(["demo", "--steps", "5", "--seeds", "1", "--quiet", "--out"]).arg(&out).arg("--cache").arg(cache()).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("| digits-rot | 0.01 | 128 | lora |"), "{stdout}");
    let plot = out.join("plots").join("loss_digits-rot_lr0.01.png");
    assert!(stdout.contains(&plot.display().to_string()), "{stdout}");
    assert!(plot.exists() && out.join("summary.md").exists());
    std::fs::remove_dir_all(&out).unwrap();
}
