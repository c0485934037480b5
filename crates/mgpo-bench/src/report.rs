//! The targets, evaluated on a [`Report`], and the human-readable tables.

use serde::{Deserialize, Serialize};

use crate::{Options, Report, Row};

/// One target: what was measured, the threshold, and whether it was met.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// What was measured.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// `<=` or `>=`.
    pub op: String,
    /// The value it is compared with by `op`.
    pub threshold: f64,
    /// Whether `value op threshold` holds.
    pub met: bool,
    /// The measurements behind the value, in words.
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
    r.rows.iter().find(|x| x.section == section && x.backend == backend && x.variant == variant && match params {
        Some(p) => x.params == p,
        None => true,
    })
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
        if let Some(f) = ours.and_then(|o| o.frac_bound.map(|f| (o, f))) {
            let (o, f) = f;
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
        for b in &opts.backends {
            let Some(a) = find(r, "steps", b, "adamw", Some(n)) else { continue };
            for v in ["mgpo-adapter", "mgpo-weight"] {
                if let Some(m) = find(r, "steps", b, v, Some(n)) {
                    out.push(target(format!("{b}: {v} step / AdamW step, {n} params"), med(m) / med(a), "<=", 1.5, format!("{:.3} ms vs {:.3} ms", med(m) * 1e3, med(a) * 1e3)));
                }
            }
        }
        if let (Some(m), Some(a)) = (find(r, "steps", "burn", "module-mgpo-adapter", Some(n)), find(r, "steps", "burn", "burn-optim-adamw", Some(n))) {
            out.push(target(
                format!("burn: module MGPO adapter step / burn-optim AdamW step, {n} params"),
                med(m) / med(a),
                "<=",
                1.5,
                format!("{:.3} ms vs {:.3} ms (same module, same gradients)", med(m) * 1e3, med(a) * 1e3),
            ));
        }
        if let Some(nd) = ours {
            for b in ["candle", "tch", "dfdx", "burn"] {
                if let Some(m) = find(r, "steps", b, "mgpo-adapter", Some(n)) {
                    out.push(target(format!("{b} MGPO adapter step / ndarray's, {n} params"), med(m) / med(nd), "<=", 2.0, format!("{:.3} ms vs {:.3} ms", med(m) * 1e3, med(nd) * 1e3)));
                }
            }
        }
    }
    for (section, b) in [("e2e", "candle"), ("e2e", "tch"), ("e2e-demo", "candle"), ("e2e-demo", "dfdx"), ("e2e-demo", "tch")] {
        let Some(a) = find(r, section, b, "adamw", None) else { continue };
        for v in ["mgpo-adapter", "mgpo-weight"] {
            if let Some(m) = find(r, section, b, v, None) {
                out.push(target(
                    format!("{b} {section}: {v} training step overhead over AdamW (%)"),
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
                opt(torch, ratio),
            );
        }
        println!("(B/par: least bytes moved per parameter; %bound: GB/s / the streaming kernel's; %AdamW: streaming time of 28 B/param / this time; x torch: this time / torch fused AdamW's)");
    }
    for (section, title) in [("weight", "weight-space work of one adapter"), ("e2e", "end-to-end training step"), ("e2e-demo", "end-to-end training step, demo model")] {
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

/// A ratio with three significant digits.
fn ratio(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn pct(x: Option<f64>) -> String {
    opt(x, |f| format!("{:.0}%", 100.0 * f))
}

/// The median of the row matching (section, backend, variant, params).
fn median_of(r: &Report, section: &str, backend: &str, variant: &str, params: usize) -> Option<f64> {
    find(r, section, backend, variant, Some(params)).map(|x| x.stats.median_s)
}

/// Prints the report as the Markdown tables of `docs/benchmarks.md`.
pub fn print_markdown(r: &Report) {
    let m = &r.machine;
    println!("Machine: {}, {} logical CPUs; {} threads for ours (rayon) and for PyTorch (intra-op); ndarray kernels: {}.", m.cpu, m.logical_cpus, m.threads, m.isa);
    println!("Load average (1, 5, 15 min) before the run {:?}, after {:?}.", m.load_before, m.load_after);
    match &r.peer {
        Some(p) => println!("Peer: PyTorch {} ({} threads).", p.torch, p.threads),
        None => println!("Peer: not run."),
    }
    println!("{} alternating rounds; in each round every item runs for about {} s of calls; times are medians over all calls of all rounds.", r.rounds, r.budget_s);

    let mut sizes: Vec<usize> = r.rows.iter().filter(|x| x.section == "steps").map(|x| x.params).collect();
    sizes.dedup();
    for &n in &sizes {
        let shape = r.rows.iter().find(|x| x.section == "steps" && x.params == n).map(|x| x.shape.clone()).unwrap_or_default();
        println!("\n#### {n} parameters: {shape}\n");
        println!("| backend | variant | ms / step | ns / param | bytes / param | GB/s | % of bound | % of AdamW bound | x torch fused AdamW |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        let torch = median_of(r, "steps", "torch", "adamw-fused", n);
        for x in r.rows.iter().filter(|x| x.section == "steps" && x.params == n) {
            println!(
                "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
                x.backend,
                x.variant,
                ms(x.stats.median_s),
                x.ns_per_param,
                opt(x.bytes_per_param, |b| format!("{b:.0}")),
                opt(x.gbps, |g| format!("{g:.1}")),
                pct(x.frac_bound),
                pct(x.frac_adamw_bound),
                opt(torch.map(|t| x.stats.median_s / t), ratio),
            );
        }
        println!("\nMGPO / AdamW on the same backend:\n");
        println!("| backend | adapter / AdamW | weight (factored) / AdamW | weight (W0 in place) / AdamW |");
        println!("|---|---:|---:|---:|");
        let mut backends: Vec<&str> = r.rows.iter().filter(|x| x.section == "steps" && x.params == n && x.variant == "adamw").map(|x| x.backend.as_str()).collect();
        backends.dedup();
        for b in backends {
            let a = median_of(r, "steps", b, "adamw", n);
            let rt = |v: &str| opt(median_of(r, "steps", b, v, n).zip(a).map(|(m, a)| m / a), ratio);
            println!("| {b} | {} | {} | {} |", rt("mgpo-adapter"), rt("mgpo-weight"), rt("mgpo-weight-w0"));
        }
        if let Some(t) = torch {
            let rt = |v: &str| opt(median_of(r, "steps", "torch", v, n).map(|m| m / t), ratio);
            println!("| torch (vs fused AdamW) | {} | - | {} |", rt("mgpo-adapter"), rt("mgpo-weight-w0"));
        }
    }
    let weight: Vec<&Row> = r.rows.iter().filter(|x| x.section == "weight").collect();
    if !weight.is_empty() {
        let mut shapes: Vec<&str> = weight.iter().map(|x| x.shape.as_str()).collect();
        shapes.dedup();
        for s in shapes {
            println!("\n#### Weight space, one adapter, W0 {s}\n");
            println!("| backend | computation | median ms | min ms | calls | torch materialised (authors) / this |");
            println!("|---|---|---:|---:|---:|---:|");
            let t = weight.iter().find(|x| x.shape == s && x.backend == "torch" && x.variant == "materialised-authors").map(|x| x.stats.median_s);
            for x in weight.iter().filter(|x| x.shape == s) {
                println!("| {} | {} | {} | {} | {} | {} |", x.backend, x.variant, ms(x.stats.median_s), ms(x.stats.min_s), x.stats.n, opt(t.map(|t| t / x.stats.median_s), ratio));
            }
        }
    }
    for section in ["e2e", "e2e-demo"] {
    let e2e: Vec<&Row> = r.rows.iter().filter(|x| x.section == section).collect();
    if let Some(first) = e2e.first() {
        println!("\n#### End to end: one training step, {}\n", first.shape);
        println!("| backend | optimizer | median ms | min ms | calls | overhead over the backend's AdamW |");
        println!("|---|---|---:|---:|---:|---:|");
        for x in &e2e {
            let base = if x.backend == "torch" { "adamw-fused" } else { "adamw" };
            let a = e2e.iter().find(|y| y.backend == x.backend && y.variant == base).map(|y| y.stats.median_s);
            println!("| {} | {} | {} | {} | {} | {} |", x.backend, x.variant, ms(x.stats.median_s), ms(x.stats.min_s), x.stats.n, opt(a.map(|a| 100.0 * (x.stats.median_s / a - 1.0)), |v| format!("{v:+.1}%")));
        }
    }
    }
    if !r.state.is_empty() {
        println!("\n#### Optimizer state (ndarray, f32)\n");
        println!("| variant | parameters | state elements / param | state bytes / param | groups (O(1) scalars each) |");
        println!("|---|---:|---:|---:|---:|");
        for s in &r.state {
            println!("| {} | {} | {:.2} | {:.2} | {} |", s.variant, s.size.params, s.size.elements_per_param, s.size.bytes_per_param, s.size.groups);
        }
    }
    if !r.rss.is_empty() {
        println!("\n#### Peak RSS\n");
        println!("| side | probe | params | RSS of inputs MB | peak MB | added MB | added bytes / param |");
        println!("|---|---|---:|---:|---:|---:|---:|");
        for x in &r.rss {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
                x.side,
                x.probe.kind,
                x.probe.params,
                x.probe.base_rss as f64 / 1e6,
                x.probe.peak_rss as f64 / 1e6,
                x.added_bytes as f64 / 1e6,
                x.added_per_param
            );
        }
    }
    if !r.targets.is_empty() {
        println!("\n#### Targets\n");
        println!("| | target | measured | threshold | detail |");
        println!("|---|---|---:|---:|---|");
        for t in &r.targets {
            println!("| {} | {} | {:.3} | {} {} | {} |", if t.met { "met" } else { "**missed**" }, t.name, t.value, t.op, t.threshold, t.detail);
        }
    }
    for n in &r.notes {
        println!("\nNote: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timing::Stats;
    use crate::{Machine, Options};

    fn row(section: &str, backend: &str, variant: &str, params: usize, median: f64) -> Row {
        Row {
            section: section.into(),
            backend: backend.into(),
            variant: variant.into(),
            params,
            shape: String::new(),
            stats: Stats { median_s: median, min_s: median, mean_s: median, n: 1 },
            ns_per_param: 0.0,
            bytes_per_param: None,
            gbps: None,
            frac_bound: None,
            frac_adamw_bound: None,
        }
    }

    /// Ratios are taken between the right rows, and thresholds decide met.
    #[test]
    fn targets_compare_the_right_rows() {
        let _lock = crate::test_lock();
        let n = 1000;
        let rows = vec![
            row("steps", "ndarray", "adamw", n, 1.0),
            row("steps", "ndarray", "mgpo-adapter", n, 1.4),
            row("steps", "ndarray", "mgpo-weight", n, 2.0),
            row("steps", "torch", "adamw-fused", n, 2.8),
            row("e2e", "candle", "adamw", 10, 100.0),
            row("e2e", "candle", "mgpo-adapter", 10, 106.0),
        ];
        let machine = Machine { cpu: String::new(), logical_cpus: 2, threads: 2, isa: String::new(), load_before: vec![], load_after: vec![] };
        let r = Report { machine, rounds: 1, budget_s: 0.1, peer: None, rows, state: vec![], rss: vec![], targets: vec![], notes: vec![] };
        let opts = Options { backends: vec!["ndarray".into()], ..Options::default() };
        let t = targets(&r, &opts);
        let get = |prefix: &str| t.iter().find(|x| x.name.starts_with(prefix)).unwrap_or_else(|| panic!("no target {prefix}: {t:?}"));
        let vs_torch = get("ndarray MGPO adapter step / torch");
        assert!((vs_torch.value - 0.5).abs() < 1e-12 && vs_torch.met);
        let adapter = get("ndarray: mgpo-adapter step / AdamW");
        assert!((adapter.value - 1.4).abs() < 1e-12 && adapter.met);
        let weight = get("ndarray: mgpo-weight step / AdamW");
        assert!(!weight.met);
        let e2e = get("candle e2e: mgpo-adapter");
        assert!((e2e.value - 6.0).abs() < 1e-9 && !e2e.met);
    }
}
