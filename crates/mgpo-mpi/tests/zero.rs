//! Sharded optimizer state (ZeRO stage 1) against one process: the example
//! data_parallel.rs with `--zero` under `mpirun -np 2` and `-np 4`.
//!
//! - With `--exact` rank 0 computes the gradient of the whole batch and the
//!   other ranks add zeros, so the summed gradient has the bits of one
//!   process's; the sharded optimizer must then give the very bits of one
//!   process (every norm is built from partial sums added in one process's
//!   order), in f32 and f64, adapter and weight space, with parameter groups.
//! - With real slices of the batch, the gradient sums reassociate: the run
//!   must match one process within the conformance tolerance of the dtype.
//! - Checkpoints: sharded -> one process and one process -> sharded resume
//!   to the same bits as an uninterrupted run.
//! - Memory: the bytes of m and v each rank holds.
//!
//! Open MPI is configured through the environment, as in tests/mpirun.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{example, mpirun, MPIRUN};

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("zero-{name}-{}", std::process::id()))
}

/// Runs the example with `ranks` processes (0: one process without MPI)
/// and returns its JSON summary and the final tensors of every rank.
fn run(ranks: usize, name: &str, args: &[&str]) -> (serde_json::Value, Vec<Vec<f64>>) {
    let out = tmp(&format!("{name}-{ranks}.bin"));
    let mut cmd = if ranks == 0 {
        let mut c = Command::new(example());
        c.arg("--single");
        c
    } else {
        mpirun(ranks)
    };
    cmd.args(args).arg("--out").arg(&out);
    let guard = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot start {cmd:?} (is Open MPI installed? scripts/setup-mpi.sh): {e}"));
    drop(guard);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}", output.status, String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("summary of {cmd:?}: {e}\n{stdout}"));
    let bytes = std::fs::read(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let _ = std::fs::remove_file(&out);
    let all: Vec<f64> = bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    let n = ranks.max(1);
    assert_eq!(all.len() % n, 0);
    let per_rank: Vec<Vec<f64>> = all.chunks(all.len() / n).map(<[f64]>::to_vec).collect();
    for (r, t) in per_rank.iter().enumerate() {
        assert!(t.iter().zip(&per_rank[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: rank {r} of {ranks} differs from rank 0");
    }
    assert_eq!(summary["identical_across_ranks"], true);
    (summary, per_rank)
}

/// The number of values whose bits differ.
fn differing(a: &[f64], b: &[f64]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

/// One configuration, exact gradients: one process, then ZeRO-1 on 2 and 4
/// ranks, bit for bit.
fn exact(name: &str, args: &[&str]) {
    let (single, reference) = run(0, name, args);
    let (first, last) = (single["loss_first"].as_f64().unwrap(), single["loss_last"].as_f64().unwrap());
    assert!(last < first, "{name}: loss {first} -> {last} did not fall: the comparison would prove little");
    for ranks in [2, 4] {
        let zargs: Vec<&str> = args.iter().copied().chain(["--zero", "--exact"]).collect();
        let (summary, per_rank) = run(ranks, name, &zargs);
        assert_eq!((summary["ranks"].as_u64(), summary["mode"].as_str()), (Some(ranks as u64), Some("zero1")));
        assert_eq!(differing(&per_rank[0], &reference[0]), 0, "{name}: ZeRO-1 on {ranks} ranks differs from one process");
        eprintln!("{name}: ZeRO-1 on {ranks} ranks has the bits of one process ({} values)", reference[0].len());
    }
}

#[test]
fn exact_gradients_give_the_bits_of_one_process() {
    exact("f32-paper", &["--dtype", "f32", "--preset", "paper-nlu", "--steps", "12", "--batch", "32"]);
    exact("f64-trainer-groups", &["--dtype", "f64", "--preset", "trainer-nlu", "--steps", "12", "--batch", "30", "--groups"]);
    exact("f64-paper-groups", &["--dtype", "f64", "--preset", "paper-nlu", "--steps", "12", "--batch", "32", "--groups", "--lr", "1e-2"]);
    exact("f32-trainer", &["--dtype", "f32", "--preset", "trainer-nlu", "--steps", "12", "--batch", "30"]);
    // Full fine-tuning: plain tensors only, small buckets so that blocks take several windows.
    exact("f32-full", &["--dtype", "f32", "--rank", "0", "--widths", "16,40,24,5", "--bucket-elems", "1000", "--steps", "10", "--batch", "24"]);
}

/// Real slices of the batch: within the conformance tolerance of one
/// process; returns the largest difference.
fn sliced(name: &str, args: &[&str], rtol: f64, atol: f64) -> f64 {
    let (single, reference) = run(0, name, args);
    let mut worst: f64 = 0.0;
    for ranks in [2, 4] {
        let zargs: Vec<&str> = args.iter().copied().chain(["--zero"]).collect();
        let (summary, per_rank) = run(ranks, name, &zargs);
        for (i, (&got, &want)) in per_rank[0].iter().zip(&reference[0]).enumerate() {
            assert!((got - want).abs() <= atol + rtol * want.abs(), "{name}, {ranks} ranks: value {i} is {got}, one process has {want}");
            worst = worst.max((got - want).abs());
        }
        let (l1, l2) = (summary["loss_last"].as_f64().unwrap(), single["loss_last"].as_f64().unwrap());
        assert!((l1 - l2).abs() <= 1e-4 * l2.abs(), "{name}, {ranks} ranks: final loss {l1} vs {l2}");
        // A step moves padded blocks: gradients scattered and perturbed
        // tensors gathered in adapter space; gradients scattered, updated
        // tensors and the replicas of m (all adapter tensors here) gathered
        // in weight space.
        let elem = if summary["dtype"] == "f64" { 8.0 } else { 4.0 };
        let block = summary["zero_block_elems"].as_f64().unwrap();
        let buffers = if summary["preset"] == "trainer-nlu" { 3.0 } else { 2.0 };
        assert_eq!(summary["payload_bytes_per_step"].as_f64().unwrap(), buffers * ranks as f64 * block * elem, "{name}, {ranks} ranks");
    }
    eprintln!("{name}: largest difference from one process {worst:e}");
    worst
}

#[test]
fn batch_slices_match_one_process_within_the_tolerance() {
    sliced("f32-paper-sliced", &["--dtype", "f32", "--preset", "paper-nlu", "--steps", "15", "--batch", "64"], 2e-3, 2e-5);
    sliced("f64-trainer-sliced", &["--dtype", "f64", "--preset", "trainer-nlu", "--steps", "15", "--batch", "30", "--groups"], 1e-8, 1e-10);
}

/// Sharded -> one process, one process -> sharded, and sharded N -> sharded
/// M: each resumed run ends with the bits of an uninterrupted one.
fn resume(name: &str, args: &[&str]) {
    let (d1, d2) = (tmp(&format!("{name}-single-ckpt")), tmp(&format!("{name}-zero-ckpt")));
    let with = |extra: &[&str]| -> Vec<String> { args.iter().chain(extra).map(|s| s.to_string()).collect() };
    let call = |ranks: usize, what: &str, a: Vec<String>| run(ranks, &format!("{name}-{what}"), &a.iter().map(String::as_str).collect::<Vec<_>>()).1.swap_remove(0);
    let (d1s, d2s) = (d1.to_str().unwrap(), d2.to_str().unwrap());
    let whole = call(0, "whole", with(&["--save-at", "4", "--ckpt", d1s]));
    let zero_resumed = call(2, "single-to-zero", with(&["--zero", "--exact", "--resume", d1s]));
    assert_eq!(differing(&zero_resumed, &whole), 0, "{name}: one process -> ZeRO-1 on 2 ranks");
    let zero_whole = call(4, "zero-saving", with(&["--zero", "--exact", "--save-at", "4", "--ckpt", d2s]));
    assert_eq!(differing(&zero_whole, &whole), 0, "{name}: ZeRO-1 on 4 ranks");
    let single_resumed = call(0, "zero-to-single", with(&["--resume", d2s]));
    assert_eq!(differing(&single_resumed, &whole), 0, "{name}: ZeRO-1 on 4 ranks -> one process");
    let zero2_resumed = call(2, "zero4-to-zero2", with(&["--zero", "--exact", "--resume", d2s]));
    assert_eq!(differing(&zero2_resumed, &whole), 0, "{name}: ZeRO-1 on 4 ranks -> on 2");
    for d in [d1, d2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn checkpoints_move_between_sharded_and_single_runs_exactly() {
    resume("ckpt-f32-paper", &["--dtype", "f32", "--preset", "paper-nlu", "--steps", "8", "--batch", "32"]);
    resume("ckpt-f64-trainer", &["--dtype", "f64", "--preset", "trainer-nlu", "--steps", "8", "--batch", "30", "--groups"]);
}

/// The demo network, deeper, so that 7 adapters share out over 4 ranks.
const DEEP: [&str; 2] = ["--widths", "64,128,128,128,128,128,128,10"];
/// The largest adapter of [`DEEP`]: 8 x 128 + 128 x 8 parameters.
const LARGEST_UNIT: f64 = 2048.0;

#[test]
fn optimizer_memory_per_rank_is_about_8_over_n_bytes_per_parameter() {
    for ranks in [1, 2, 4] {
        let args = ["--dtype", "f32", "--preset", "paper-nlu", "--steps", "3", "--batch", "16", "--zero", DEEP[0], DEEP[1]];
        let (summary, _) = if ranks == 1 { run(0, "memory", &args) } else { run(ranks, "memory", &args) };
        let p = summary["trainable_params"].as_f64().unwrap();
        let bytes: Vec<f64> = summary["optimizer_bytes_per_rank"].as_array().unwrap().iter().map(|b| b.as_f64().unwrap()).collect();
        assert_eq!(bytes.len(), ranks);
        assert_eq!(bytes.iter().sum::<f64>(), 8.0 * p, "adapter space: every m and v once, 4 + 4 bytes");
        let n = ranks as f64;
        for (r, &b) in bytes.iter().enumerate() {
            // Whole adapters, largest first to the least loaded: at most one unit over the even share.
            assert!(b <= 8.0 * (p / n + LARGEST_UNIT), "rank {r} of {ranks} holds {b} bytes for {p} parameters");
        }
        let per_param: Vec<String> = bytes.iter().map(|b| format!("{:.2}", b / p)).collect();
        eprintln!("adapter space, f32, {ranks} ranks, {p} parameters: bytes of m and v per parameter per rank {per_param:?} (8/N = {:.2})", 8.0 / n);

        // Weight space keeps a replica of every adapter's m: 4 bytes per parameter owned elsewhere.
        let wargs = ["--dtype", "f32", "--preset", "trainer-nlu", "--steps", "3", "--batch", "16", "--zero", DEEP[0], DEEP[1]];
        let (summary, _) = if ranks == 1 { run(0, "memory-w", &wargs) } else { run(ranks, "memory-w", &wargs) };
        let wbytes: Vec<f64> = summary["optimizer_bytes_per_rank"].as_array().unwrap().iter().map(|b| b.as_f64().unwrap()).collect();
        for (r, (&w, &a)) in wbytes.iter().zip(&bytes).enumerate() {
            let own = a / 8.0;
            assert_eq!(w, 8.0 * own + 4.0 * (p - own), "weight space, rank {r} of {ranks}");
        }
    }
}
