#!/usr/bin/env python3
"""Data-parallel and ZeRO-1 scaling of LoRA-MGPO: step time, bytes communicated and
efficiency for 1, 2 and 4 MPI ranks (weak scaling: a fixed batch per rank),
on the demo network's shape and on a 1e7-parameter network.

Runs the binary mgpo-data-parallel (crates/mgpo-mpi/examples/data_parallel.rs)
under mpirun with one thread per rank, `--runs` times per point, and prints
a markdown table of the medians (the row shown is the run with the median
step time); `--json-out` keeps every run's summary. Each step is timed in
phases: compute (forward + backward on the rank's slice), wait (a barrier:
the time until the slowest rank is done), all-reduce (the bucketed
gradient sum; under ZeRO-1 the reduce-scatter of the gradients and the
all-gathers of the parameters and of the replicas of m), optimizer
(perturb + step). Modes (`--all-reduce`): `native` and `scatter-gather`
(data parallelism, mgpo_mpi::AllReduce), `zero1` (sharded optimizer state,
`--zero`). "rank 0 CPU share" is rank 0's
CPU time over its wall time in the timed steps: 1.00 when it had a core to
itself, less when other processes (or other ranks) took turns on it.

    cargo build --release -p mgpo-mpi --features example
    python3 tools/bench_mpi.py --runs 3 --json-out benches/results/mpi.json

Standard library only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {
    # The demo's network (64 -> 128 -> 128 -> 10), LoRA r = 8 on every layer: 4,688 trainable parameters.
    "demo": dict(args=["--widths", "64,128,128,10", "--rank", "8", "--steps", "300", "--warmup", "20"], per_rank_batch=64),
    # Every weight trained in full (plain tensors): 64*2224 + 2*2224^2 + 2224*10 = 10,056,928 parameters.
    "1e7": dict(args=["--widths", "64,2224,2224,2224,10", "--rank", "0", "--steps", "12", "--warmup", "2"], per_rank_batch=32),
}

ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_btl": "self,vader",
    "RAYON_NUM_THREADS": "1",
}


def run(exe, case, ranks, how):
    c = CASES[case]
    mode = ["--zero"] if how == "zero1" else ["--all-reduce", how]
    cmd = ["mpirun", "-np", str(ranks), "--timeout", "600", exe, "--time-wait"] + mode + ["--dtype", "f32", "--preset", "paper-nlu",
           "--batch", str(c["per_rank_batch"] * ranks)] + c["args"]
    out = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    s = json.loads(out.stdout.strip().splitlines()[-1])
    if not s["identical_across_ranks"]:
        sys.exit(f"{' '.join(cmd)}: ranks ended with different parameters")
    return s


def table(results):
    rows = ["| case | mode | ranks | global batch | step ms | compute ms | wait ms | all-reduce ms | optimizer ms | payload MB/step | sent MB/rank/step | calls/step | samples/s | efficiency T1/TN | vs min(N, 2 cores) | rank 0 CPU share | m+v MB/rank (max) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, how in sorted({(c, h) for (c, h, _) in results}, key=lambda k: (list(CASES).index(k[0]), k[1])):
        pts = {r: v for (c, h, r), v in results.items() if (c, h) == (case, how)}
        if 1 not in pts:
            continue
        med = {r: statistics.median(s["step_ms"] for s in runs) for r, runs in pts.items()}
        for r in sorted(pts):
            runs = sorted(pts[r], key=lambda s: s["step_ms"])
            s = runs[len(runs) // 2]
            eff = med[1] / med[r]
            ideal = min(r, 2)
            rows.append(
                f"| {case} ({s['trainable_params']:,} params) | {how} | {r} | {s['global_batch']} | {med[r]:.2f} | {s['compute_ms']:.2f} | {s['wait_ms']:.2f} | {s['comm_ms']:.2f} | "
                f"{s['optimizer_ms']:.2f} | {s['payload_bytes_per_step'] / 1e6:.3f} | {s['sent_bytes_per_rank_per_step'] / 1e6:.3f} | "
                f"{s['calls_per_step']:.0f} | {s['samples_per_s']:.0f} | {eff:.0%} | {eff * r / ideal:.0%} | {s['cpu_share_rank0'] or 0:.2f} | "
                f"{max(s.get('optimizer_bytes_per_rank') or [float('nan')]) / 1e6:.3f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exe", default="target/release/mgpo-data-parallel")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--all-reduce", default="native,scatter-gather", help="modes to measure: native, scatter-gather (data parallel), zero1")
    ap.add_argument("--json-out")
    ap.add_argument("--from-json", help="print the table of a saved --json-out file instead of running")
    a = ap.parse_args()
    if a.from_json:
        saved = json.load(open(a.from_json))
        results = {}
        for s in saved["runs"]:
            results.setdefault((s["case"], s["all_reduce"], s["ranks"]), []).append(s)
        print(table(results))
        return
    results = {}
    # The modes alternate run by run, so that they see the same machine.
    for case in a.cases.split(","):
        for ranks in map(int, a.ranks.split(",")):
            for _ in range(a.runs):
                for how in a.all_reduce.split(","):
                    s = run(a.exe, case, ranks, how)
                    s["case"], s["all_reduce"] = case, how
                    s["loadavg_1min"] = os.getloadavg()[0]
                    results.setdefault((case, how, ranks), []).append(s)
                    print(f"{case} {how} np={ranks}: step {s['step_ms']:.2f} ms (compute {s['compute_ms']:.2f}, wait {s['wait_ms']:.2f}, all-reduce {s['comm_ms']:.2f}, rank 0 CPU share {s['cpu_share_rank0'] or 0:.2f}, load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": os.uname().nodename, "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(),
                       "runs": [s for runs in results.values() for s in runs]}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
