//! Data parallelism against one process: the example data_parallel.rs runs
//! once without MPI on the whole batch, then under `mpirun -np 2` and
//! `-np 4` on slices of it, with both ways of summing (`AllReduce`). The
//! ranks draw different adapters and start from rank 0's by broadcast. Every rank must end with the same bits, and
//! those must equal the one-process run within the conformance tolerance of
//! the dtype (f32 sums reassociate across ranks; f64 ones barely do).
//!
//! Open MPI is configured through the environment, so that the command line
//! stays plain `mpirun -np N`: running as root is allowed (CI is root), more
//! ranks than cores are allowed (`-np 4` on 2 cores), and the byte transfer
//! layers are limited to shared memory (`self,vader`), which is all one
//! machine needs and works without a network. docs/distributed.md says the
//! same for people.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{example, mpirun, MPIRUN};

fn out_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mpirun-{name}-{}.bin", std::process::id()))
}

fn read_f64(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Runs the example with `ranks` processes (0: without MPI) and returns its
/// JSON summary and the tensors of every rank.
fn run(ranks: usize, name: &str, args: &[&str]) -> (serde_json::Value, Vec<Vec<f64>>) {
    let out = out_file(&format!("{}-{ranks}", name.replace([' ', '(', ')'], "")));
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
    let all = read_f64(&out);
    let _ = std::fs::remove_file(&out);
    let n = ranks.max(1);
    assert_eq!(all.len() % n, 0, "{cmd:?}: {} values for {n} ranks", all.len());
    let per_rank = all.chunks(all.len() / n).map(<[f64]>::to_vec).collect();
    (summary, per_rank)
}

/// Runs one configuration on 1 process, 2 and 4 ranks and checks the
/// guarantees; returns the largest difference from the one-process run.
fn check(name: &str, args: &[&str], rtol: f64, atol: f64, all_reduce: &[&str]) -> f64 {
    let (single, reference) = run(0, name, args);
    assert_eq!(single["ranks"], 1);
    let reference = &reference[0];
    let mut worst: f64 = 0.0;
    for (ranks, how) in [2, 4].into_iter().flat_map(|r| all_reduce.iter().map(move |h| (r, *h))) {
        let name = &format!("{name} ({how})");
        let args: Vec<&str> = args.iter().copied().chain(["--all-reduce", how]).collect();
        let (summary, per_rank) = run(ranks, name, &args);
        assert_eq!(summary["ranks"], ranks);
        assert_eq!(per_rank.len(), ranks);
        for (r, tensors) in per_rank.iter().enumerate() {
            let same = tensors.iter().zip(&per_rank[0]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: rank {r} of {ranks} differs from rank 0");
        }
        assert_eq!(summary["identical_across_ranks"], true);
        assert_eq!(per_rank[0].len(), reference.len());
        for (i, (&got, &want)) in per_rank[0].iter().zip(reference).enumerate() {
            assert!((got - want).abs() <= atol + rtol * want.abs(), "{name}, {ranks} ranks: value {i} is {got}, one process has {want}");
            worst = worst.max((got - want).abs());
        }
        let (l1, l2) = (summary["loss_last"].as_f64().unwrap(), single["loss_last"].as_f64().unwrap());
        assert!((l1 - l2).abs() <= 1e-4 * l2.abs(), "{name}, {ranks} ranks: final loss {l1} vs {l2}");
        let (params, elem) = (summary["trainable_params"].as_f64().unwrap(), if summary["dtype"] == "f64" { 8.0 } else { 4.0 });
        assert_eq!(summary["payload_bytes_per_step"].as_f64().unwrap(), params * elem, "the whole gradient once a step");
    }
    // The runs moved the parameters: a comparison of untrained networks would prove nothing.
    let (first, last) = (single["loss_first"].as_f64().unwrap(), single["loss_last"].as_f64().unwrap());
    assert!(last < first, "{name}: loss {first} -> {last} did not fall");
    eprintln!("{name}: largest difference from one process {worst:e} ({all_reduce:?})");
    worst
}

/// The paper's setting (adapter space, one global norm) in f32, with the
/// demo network's shapes; the f32 tolerance of the conformance suite.
#[test]
fn f32_adapter_space_matches_one_process() {
    check("f32-paper", &["--dtype", "f32", "--preset", "paper-nlu", "--steps", "15", "--batch", "64"], 2e-3, 2e-5, &["native", "scatter-gather"]);
}

/// The authors' trainer (weight space with W0 perturbed in place,
/// per-adapter norms, clipping) in f64, with a global batch of 30 that 4
/// ranks split 8, 8, 7, 7; the f64 tolerance of the conformance suite.
#[test]
fn f64_weight_space_with_uneven_slices_matches_one_process() {
    check("f64-trainer", &["--dtype", "f64", "--preset", "trainer-nlu", "--steps", "15", "--batch", "30"], 1e-8, 1e-10, &["native", "scatter-gather"]);
}

/// The two settings in the other dtype each.
#[test]
fn f64_adapter_space_and_f32_weight_space_match_one_process() {
    check("f64-paper", &["--dtype", "f64", "--preset", "paper-nlu", "--steps", "15", "--batch", "64"], 1e-8, 1e-10, &["native"]);
    check("f32-trainer", &["--dtype", "f32", "--preset", "trainer-nlu", "--steps", "15", "--batch", "30"], 2e-3, 2e-5, &["native"]);
}

/// Full fine-tuning (plain tensors, no adapter) with buckets of 1000
/// elements, so that tensors straddle buckets and a step makes several calls.
#[test]
fn f32_small_buckets_straddling_tensors_match_one_process() {
    let args = ["--dtype", "f32", "--rank", "0", "--widths", "16,40,24,5", "--bucket-elems", "1000", "--steps", "10", "--batch", "24"];
    check("f32-buckets", &args, 2e-3, 2e-5, &["native", "scatter-gather"]);
    let (summary, _) = run(2, "f32-buckets-calls", &args);
    // 16*40 + 40*24 + 24*5 = 1720 elements: two buckets a step.
    assert_eq!(summary["calls_per_step"], 2.0);
    assert_eq!(summary["payload_bytes_per_step"], 1720.0 * 4.0);
}

/// A rank that fails mid-run ends the whole job with an error instead of
/// leaving the other ranks blocked in the all-reduce.
#[test]
fn a_failing_rank_ends_the_job() {
    let _guard = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let start = std::time::Instant::now();
    let output = mpirun(2).args(["--fail-rank", "1", "--steps", "5"]).output().expect("mpirun starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the job succeeded: {stderr}");
    assert!(stderr.contains("rank 1: forward pass failed"), "{stderr}");
    assert!(start.elapsed().as_secs() < 60, "the job took {:?} to end", start.elapsed());
}
