//! `mgpo demo` / `mgpo experiment` and the library behind them: the
//! rebound metric, the sweep's files and decision rule, determinism, the
//! pairing of seeds across methods, and agreement between backends on the
//! first steps.

use std::path::{Path, PathBuf};
use std::process::Command;

use mgpo_experiments::backend::{self, Backend, SessionSpec};
use mgpo_experiments::metrics::{largest_rise, rebound_phases, select_checkpoint, smooth, MIN_RISE};
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
    // Converges below half of 3, rises by 0.6 above its minimum, converges again: three phases.
    let double_descent = [3.0, 2.0, 1.0, 0.5, 0.8, 1.1, 0.7, 0.3, 0.1];
    let r = rebound_phases(&double_descent, MIN_RISE);
    assert!((r.height - 0.6).abs() < 1e-12 && r.three_phases, "{r:?}");
    assert_eq!((r.converged, r.at), (Some(2), Some((3, 5, 6))));
    // Monotone: none.
    assert_eq!(rebound_phases(&[3.0, 2.0, 1.0, 0.5, 0.5, 0.2], MIN_RISE).height, 0.0);
    // A bump before the loss has halved is the first descent's noise, not a rebound.
    let early = [3.0, 2.0, 2.9, 1.0, 0.4];
    assert_eq!((largest_rise(&early) > 0.8, rebound_phases(&early, MIN_RISE).height), (true, 0.0));
    // Noise is what the smoothing is for: a zig-zag of +-0.1 around a
    // falling trend rebounds raw, and not once smoothed over 2.
    let zigzag: Vec<f64> = (0..30).map(|t| 2.0 - 0.06 * t as f64 + if t % 2 == 0 { 0.1 } else { -0.1 }).collect();
    assert!(rebound_phases(&zigzag, MIN_RISE).three_phases);
    assert_eq!(rebound_phases(&smooth(&zigzag, 2)[1..], 0.0).height, 0.0);
    // Diverging after converging, and staying there, is a rise and not a rebound.
    let r = rebound_phases(&[1.0, 0.4, f64::INFINITY], MIN_RISE);
    assert_eq!((r.height, r.rise, r.three_phases), (0.0, f64::INFINITY, false));
}

#[test]
fn summary_reads_both_curves_and_the_validation_checkpoint() {
    let (t, b) = base("digits-rot");
    let be = backend::by_name("candle").unwrap();
    let log = run(&t, &b, be.as_ref(), &spec(Method::Lora, 4, 0, 12), &mut |_| {}).unwrap();
    let s = summarize(&log, 4, MIN_RISE).unwrap();
    let sm = smooth(&log.losses(), 4);
    assert_eq!(s.outcome.logged, rebound_phases(&sm, MIN_RISE));
    let clean: Vec<f64> = log.evals.iter().map(|e| e.train_loss).collect();
    assert_eq!(s.outcome.clean, rebound_phases(&clean, MIN_RISE));
    assert_eq!(s.outcome.final_logged, sm[11]);
    assert_eq!(log.evals.len(), 1 + 2 + 1, "evaluations at 0, 5, 10 and the last step");
    // The reported test accuracy is the one at the best validation accuracy, not the best test accuracy.
    let va: Vec<f64> = log.evals.iter().map(|e| e.val_accuracy).collect();
    let vl: Vec<f64> = log.evals.iter().map(|e| e.val_loss).collect();
    assert_eq!(s.outcome.selected, log.evals[select_checkpoint(&va, &vl).unwrap()]);
    assert!(log.evals.iter().all(|e| e.val_accuracy <= s.outcome.selected.val_accuracy));
    assert_eq!((s.init_digest, s.order_digest), (log.init_digest, log.order_digest));
}

#[test]
fn seeds_are_paired_across_methods() {
    let (t, b) = base("digits-rot");
    let be = backend::by_name("candle").unwrap();
    let logs: Vec<_> = Method::ALL.iter().map(|&m| run(&t, &b, be.as_ref(), &spec(m, 4, 3, 6), &mut |_| {}).unwrap()).collect();
    let other = run(&t, &b, be.as_ref(), &spec(Method::Lora, 4, 4, 6), &mut |_| {}).unwrap();
    for l in &logs {
        let m = l.spec.method;
        assert_eq!((l.init_digest, l.order_digest), (logs[0].init_digest, logs[0].order_digest), "{m}: not paired with lora");
        // The same start: the clean model before any step is the same.
        assert_eq!(l.evals[0], logs[0].evals[0], "{m}");
    }
    assert_ne!(other.init_digest, logs[0].init_digest, "another seed, other adapters");
    assert_ne!(other.order_digest, logs[0].order_digest, "another seed, other batches");
    let sums: Vec<_> = logs.iter().chain([&other]).map(|l| summarize(l, 2, MIN_RISE).unwrap()).collect();
    assert!(mgpo_experiments::sweep::pairing_errors(&sums).is_empty());
    // A run of the same seed with another batch order is reported.
    let mut bad = sums[1].clone();
    bad.order_digest ^= 1;
    let errors = mgpo_experiments::sweep::pairing_errors(&[sums[0].clone(), bad]);
    assert!(errors.len() == 1 && errors[0].contains("batch order"), "{errors:?}");
    // The controls are not their variants: the weight-space noise changes the trainer's curve, and clipping changes lora's at lr 0.01.
    let loss = |m: Method| logs[Method::ALL.iter().position(|&x| x == m).unwrap()].losses();
    assert_ne!(loss(Method::LoraRandomWeight), loss(Method::MgpoTrainer));
    assert_ne!(loss(Method::LoraRandomWeight), loss(Method::LoraClip));
    assert_ne!(loss(Method::MgpoTrainerNoClip), loss(Method::MgpoTrainer));
}

#[test]
fn same_seed_same_curve_other_seed_other_curve() {
    let (t, b) = base("digits-rot");
    let be = backend::by_name("candle").unwrap();
    for m in [Method::Lora, Method::MgpoPaper, Method::MgpoTrainer, Method::LoraRandom, Method::LoraRandomWeight] {
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
        for m in Method::ALL.into_iter().filter(|m| !m.needs_w0_in_place() || o.holds_w0_in_place()) {
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
    // The weight-space Gaussian control needs W0 in place, which dfdx's layers do not read.
    let spec_rw = SessionSpec { base: &b, rank: 2, alpha: 2.0, config: Method::LoraRandomWeight.config(1e-3, 0), init_a: adapter_init(2, 0) };
    let e = backend::by_name("dfdx").unwrap().session(&spec_rw).err();
    assert!(matches!(e, Some(Error::InvalidSpec(ref m)) if m.contains("candle")), "{e:?}");
    assert!(be.session(&spec_rw).is_ok(), "candle holds W0 in place");
    let out = mgpo().args(["experiment", "--backend", "dfdx", "--methods", "lora,lora-random-weight", "--quiet"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lora-random-weight"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mgpo().args(["experiment", "--min-rise=-1", "--quiet"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_rise"), "{}", String::from_utf8_lossy(&out.stderr));

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
        .args(["experiment", "--tasks", "digits-rot", "--methods", "lora,lora-clip,mgpo-trainer,lora-random-weight", "--ranks", "2,4", "--lrs", "0.01"])
        .args(["--seeds", "2", "--steps", "6", "--batch", "8", "--eval-every", "3", "--smooth", "2", "--quiet", "--out"])
        .arg(&out)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&status.stderr));
    assert!(stdout.contains("| digits-rot | 0.01 | 4 | mgpo-trainer |"), "{stdout}");
    assert!(stdout.contains("| mgpo-trainer |") && stdout.contains("Verdicts"), "{stdout}");
    let runs = 2 * 4 * 2;

    let (h, rows) = csv(&out.join("steps.csv"));
    assert_eq!(rows.len(), runs * 6);
    let li = h.iter().position(|c| c == "loss").unwrap();
    assert!(rows.iter().all(|r| r[li].parse::<f64>().unwrap().is_finite()));
    let (_, rows) = csv(&out.join("evals.csv"));
    assert_eq!(rows.len(), runs * 3, "evaluations at 0, 3 and 6");
    let (h, rows) = csv(&out.join("runs.csv"));
    assert_eq!(rows.len(), runs);
    for col in ["logged_rebound", "clean_rebound", "test_accuracy_at_val"] {
        let ri = h.iter().position(|c| c == col).unwrap();
        assert!(rows.iter().all(|r| r[ri].parse::<f64>().unwrap() >= 0.0), "{col}");
    }
    let ti = h.iter().position(|c| c == "clean_three_phases").unwrap();
    assert!(rows.iter().all(|r| r[ti] == "true" || r[ti] == "false"));
    // Paired: one digest of the initial adapters per seed, whatever the method.
    let (si, di) = (h.iter().position(|c| c == "seed").unwrap(), h.iter().position(|c| c == "init_digest").unwrap());
    let digests = |seed: &str| rows.iter().filter(|r| r[si] == seed && r[h.iter().position(|c| c == "rank").unwrap()] == "4").map(|r| r[di].clone()).collect::<Vec<_>>();
    let d0 = digests("0");
    assert_eq!(d0.len(), 4);
    assert!(d0.iter().all(|d| *d == d0[0]) && digests("1")[0] != d0[0]);
    let decision = read(&out.join("decision.md"));
    assert!(decision.starts_with("Pairing: verified") && decision.contains("| mgpo-trainer |"), "{decision}");
    let dj: serde_json::Value = serde_json::from_str(&read(&out.join("decision.json"))).unwrap();
    assert_eq!(dj["verdicts"].as_array().unwrap().len(), 1, "one variant: mgpo-trainer");
    let (h, rows) = csv(&out.join("summary.csv"));
    assert_eq!(rows.len(), runs / 2);
    assert!(rows.iter().all(|r| r[h.iter().position(|c| c == "seeds").unwrap()] == "2"));

    let json: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), runs / 2);
    assert_eq!(json[0]["method"], "lora");
    let spec: serde_json::Value = serde_json::from_str(&read(&out.join("spec.json"))).unwrap();
    assert_eq!(spec["steps"], 6);
    assert_eq!(read(&out.join("summary.md")).lines().count(), 2 + runs / 2);

    for kind in ["loss", "clean", "rebound"] {
        let png = std::fs::read(out.join("plots").join(format!("{kind}_digits-rot_lr0.01.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 10_000, "{kind}: a plot with curves and text is not tiny");
    }
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
