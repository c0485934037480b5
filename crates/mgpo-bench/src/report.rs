//! The targets, evaluated on a [`Report`], and the human-readable tables.

use serde::Serialize;

use crate::{Options, Report, Row};

/// One target: what was measured, the threshold, and whether it was met.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    /// `<=` or `>=`.
    pub op: String,
    pub threshold: f64,
    pub met: bool,
    pub detail: String,
}

fn target(name: String, value: f64, op: &str, threshold: f64, detail: String) -> Target {
    let met = match op {
        "<=" => value <= threshold,
        _ => value >= threshold,
    };
    Target { name, value, op: op.into(), threshold, met, detail }
}

fn find<'a>(r: &'a Report, section: &str, backend: &str, variant: &str, params: Option<usize>) -> Option<&'a Row> {
    r.rows.iter().find(|x| x.section == section && x.backend == backend && x.variant == variant && params.map_or(true, |p| x.params == p))
}

/// The targets of issue 7 that this report has the measurements for.
pub fn targets(r: &Report, opts: &Options) -> Vec<Target> {
    let mut out = Vec::new();
    let med = |x: &Row| x.stats.median_s;
    // The largest size that ran (1e7 by default).
    let top = r.rows.iter().filter(|x| x.section == "steps" && x.backend == "ndarray" && x.variant == "mgpo-adapter").map(|x| x.params).max();
    if let Some(n) = top {
        let ours = find(r, "steps", "ndarray", "mgpo-adapter", Some(n));
        if let (Some(o), Some(t)) = (ours, find(r, "steps", "torch", "adamw-fused", Some(n))) {
            out.push(target(
                format!("ndarray MGPO adapter step / torch fused AdamW step, {n} params"),
                med(o) / med(t),
                "<=",
                1.0,
                format!("{:.3} ms vs {:.3} ms (medians, alternated in one run)", med(o) * 1e3, med(t) * 1e3),
            ));
        }
        if let Some(o) = ours {
            if let Some(f) = o.frac_bound {
                out.push(target(
                    format!("ndarray MGPO adapter step, fraction of the bandwidth bound, {n} params"),
                    f,
                    ">=",
                    0.70,
                    format!(
                        "{:.1} GB/s at {} bytes/param vs the streaming kernel; of the 28-byte AdamW bound: {:.0}%",
                        o.gbps.unwrap_or(f64::NAN),
                        o.bytes_per_param.unwrap_or(f64::NAN),
                        100.0 * o.frac_adamw_bound.unwrap_or(f64::NAN)
                    ),
                ));
            }
        }
        for b in &opts.backends {
            let Some(a) = find(r, "steps", b, "adamw", Some(n)) else { continue };
            for v in ["mgpo-adapter", "mgpo-weight"] {
                if let Some(m) = find(r, "steps", b, v, Some(n)) {
                    out.push(target(format!("{b}: {v} step / AdamW step, {n} params"), med(m) / med(a), "<=", 1.5, format!("{:.3} ms vs {:.3} ms", med(m) * 1e3, med(a) * 1e3)));
                }
            }
        }
        if let Some(nd) = ours {
            for b in ["candle", "tch", "dfdx"] {
                if let Some(m) = find(r, "steps", b, "mgpo-adapter", Some(n)) {
                    out.push(target(format!("{b} MGPO adapter step / ndarray's, {n} params"), med(m) / med(nd), "<=", 2.0, format!("{:.3} ms vs {:.3} ms", med(m) * 1e3, med(nd) * 1e3)));
                }
            }
        }
    }
    for b in ["candle", "tch"] {
        let Some(a) = find(r, "e2e", b, "adamw", None) else { continue };
        for v in ["mgpo-adapter", "mgpo-weight"] {
            if let Some(m) = find(r, "e2e", b, v, None) {
                out.push(target(
                    format!("{b} e2e: {v} training step overhead over AdamW (%)"),
                    100.0 * (med(m) / med(a) - 1.0),
                    "<=",
                    5.0,
                    format!("{:.2} ms vs {:.2} ms per training step", med(m) * 1e3, med(a) * 1e3),
                ));
            }
        }
    }
    if let Some(&rank) = opts.weight_ranks.first() {
        let d = opts.weight_dim;
        let n = 2 * d * rank;
        if let (Some(o), Some(t)) = (find(r, "weight", "ndarray", "rank-decomposed-in-place", Some(n)), find(r, "weight", "torch", "materialised-authors", Some(n))) {
            out.push(target(
                format!("weight space {d}x{d} r {rank}: torch materialised / ndarray rank-decomposed (norms + in-place updates)"),
                med(t) / med(o),
                ">=",
                5.0,
                format!("{:.2} ms vs {:.2} ms", med(t) * 1e3, med(o) * 1e3),
            ));
        }
        if let Some(p) = r.rss.iter().find(|x| x.side == "ours" && x.probe.kind == "weight:ours") {
            let w0 = (d * d * 4) as f64;
            out.push(target(
                format!("weight space {d}x{d}: peak memory added by in-place perturb/unperturb, in out x in f32 matrices"),
                p.added_bytes as f64 / w0,
                "<=",
                0.25,
                format!("{} bytes over the inputs (one out x in f32 matrix is {} bytes)", p.added_bytes, w0),
            ));
        }
    }
    let state = |v: &str| r.state.iter().find(|s| s.variant == v).map(|s| s.size.bytes_per_param);
    if let Some(a) = state("adamw") {
        out.push(target("optimizer state, bytes per f32 parameter (AdamW)".into(), a, "<=", 8.0, "m and v".into()));
        for v in ["mgpo-adapter", "mgpo-weight"] {
            if let Some(m) = state(v) {
                out.push(target(format!("state {v} minus AdamW, bytes per parameter"), m - a, "<=", 0.0, "per-group scalars only".into()));
            }
        }
    }
    out
}

fn ms(s: f64) -> String {
    if s >= 0.1 {
        format!("{:.1}", s * 1e3)
    } else if s >= 1e-3 {
        format!("{:.3}", s * 1e3)
    } else {
        format!("{:.4}", s * 1e3)
    }
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or("-".into(), f)
}

/// Prints the report as tables.
pub fn print_report(r: &Report) {
    let m = &r.machine;
    println!("machine: {} ({} logical CPUs), {} threads, kernels: {}", m.cpu, m.logical_cpus, m.threads, m.isa);
    println!("load average before {:?}, after {:?}", m.load_before, m.load_after);
    match &r.peer {
        Some(p) => println!("peer: torch {} ({} threads, {})", p.torch, p.threads, p.python),
        None => println!("peer: not run"),
    }
    println!("{} alternating rounds, about {} s of calls per item per round; times are medians over all calls", r.rounds, r.budget_s);

    let steps: Vec<&Row> = r.rows.iter().filter(|x| x.section == "steps").collect();
    if !steps.is_empty() {
        println!("\n== optimizer step (f32) ==");
        println!("{:>9} {:<22} {:<10} {:<16} {:>10} {:>9} {:>6} {:>7} {:>7} {:>8} {:>9}", "params", "shape", "backend", "variant", "ms", "ns/param", "B/par", "GB/s", "%bound", "%AdamW", "x torch");
        for x in &steps {
            let torch = r
                .rows
                .iter()
                .find(|t| t.section == "steps" && t.backend == "torch" && t.variant == "adamw-fused" && t.params == x.params)
                .map(|t| x.stats.median_s / t.stats.median_s);
            println!(
                "{:>9} {:<22} {:<10} {:<16} {:>10} {:>9.3} {:>6} {:>7} {:>7} {:>8} {:>9}",
                x.params,
                x.shape,
                x.backend,
                x.variant,
                ms(x.stats.median_s),
                x.ns_per_param,
                opt(x.bytes_per_param, |b| format!("{b:.0}")),
                opt(x.gbps, |g| format!("{g:.1}")),
                opt(x.frac_bound, |f| format!("{:.0}%", 100.0 * f)),
                opt(x.frac_adamw_bound, |f| format!("{:.0}%", 100.0 * f)),
                opt(torch, |t| format!("{t:.2}")),
            );
        }
        println!("(B/par: least bytes moved per parameter; %bound: GB/s / the streaming kernel's; %AdamW: streaming time of 28 B/param / this time; x torch: this time / torch fused AdamW's)");
    }
    for (section, title) in [("weight", "weight-space work of one adapter"), ("e2e", "end-to-end training step")] {
        let rows: Vec<&Row> = r.rows.iter().filter(|x| x.section == section).collect();
        if rows.is_empty() {
            continue;
        }
        println!("\n== {title} ==");
        println!("{:<28} {:<10} {:<30} {:>10} {:>10} {:>6}", "shape", "backend", "variant", "median ms", "min ms", "calls");
        for x in rows {
            println!("{:<28} {:<10} {:<30} {:>10} {:>10} {:>6}", x.shape, x.backend, x.variant, ms(x.stats.median_s), ms(x.stats.min_s), x.stats.n);
        }
    }
    if !r.state.is_empty() || !r.rss.is_empty() {
        println!("\n== memory ==");
        for s in &r.state {
            println!("state {:<14} {:.1} elements = {:.1} bytes per parameter, {} group(s) of O(1) scalars", s.variant, s.size.elements_per_param, s.size.bytes_per_param, s.size.groups);
        }
        for x in &r.rss {
            println!(
                "peak RSS {:<6} {:<24} inputs {:>8.1} MB, peak {:>8.1} MB, added {:>8.1} MB = {:>6.2} B/param{}",
                x.side,
                x.probe.kind,
                x.probe.base_rss as f64 / 1e6,
                x.probe.peak_rss as f64 / 1e6,
                x.added_bytes as f64 / 1e6,
                x.added_per_param,
                if x.probe.reset_ok { "" } else { " (peak not reset: includes setup)" }
            );
        }
    }
    if !r.targets.is_empty() {
        println!("\n== targets ==");
        for t in &r.targets {
            println!("[{}] {}: {:.3} {} {} ({})", if t.met { "met" } else { "MISSED" }, t.name, t.value, t.op, t.threshold, t.detail);
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}
