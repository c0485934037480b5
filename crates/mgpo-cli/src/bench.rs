//! `mgpo bench`: optimizer-step benchmarks per backend, against the
//! memory-bandwidth bound and, side by side in the same run, against
//! PyTorch (`crates/mgpo-bench/peers/torch_peer.py`). The measurements live in the
//! `mgpo-bench` crate; this is the command line.

use std::path::PathBuf;

use mgpo_bench::{sizes, Options, PeerMode};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Trainable-parameter counts, split into LoRA adapters (A: 8 x d, B: d x 8).
    #[arg(long, value_delimiter = ',', default_value = "1e4,1e6,1e7")]
    params: Vec<String>,
    /// Backends to measure (compiled ones; default all of them).
    #[arg(long, value_delimiter = ',')]
    backend: Vec<String>,
    /// Sections to run: steps, weight, e2e, memory.
    #[arg(long, value_delimiter = ',', default_value = "steps,weight,e2e,memory")]
    only: Vec<String>,
    /// Side of the square W0 of the weight-space case.
    #[arg(long, default_value_t = 4096)]
    weight_dim: usize,
    /// Ranks of the weight-space case.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    ranks: Vec<usize>,
    /// The in-place-W0 weight-space step runs up to this many parameters.
    #[arg(long, default_value = "2e6")]
    w0_max_params: String,
    /// End-to-end model: width, layers, tokens per step (rank: the first of --ranks is not used; r = 8).
    #[arg(long, default_value_t = 1024)]
    e2e_dim: usize,
    #[arg(long, default_value_t = 4)]
    e2e_layers: usize,
    #[arg(long, default_value_t = 256)]
    e2e_tokens: usize,
    /// Alternating rounds (each times every item once).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of calls per item per round.
    #[arg(long, default_value_t = 0.25)]
    budget: f64,
    /// The PyTorch peer: auto (run it if it starts), on (required), off.
    #[arg(long, default_value = "auto")]
    peer: String,
    /// Python with torch for the peer (default: $MGPO_TORCH_PYTHON, ./.venv-torch, python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The peer script (default: the copy of torch_peer.py embedded in mgpo).
    #[arg(long)]
    peer_script: Option<PathBuf>,
    /// Print the report as JSON on stdout (progress still on stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Print Markdown tables (as in docs/benchmarks.md) instead of plain ones.
    #[arg(long)]
    markdown: bool,
    /// Render a report saved with --json-out instead of measuring.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Exit non-zero when a target of the report is missed.
    #[arg(long)]
    check_targets: bool,
    /// Internal: run one peak-RSS probe in this process and print it as JSON.
    #[arg(long, hide = true)]
    rss_probe: Option<String>,
    /// Internal: the probe's W0 rank.
    #[arg(long, hide = true, default_value_t = 8)]
    rank: usize,
}

pub fn run(args: BenchArgs) -> Result<bool, String> {
    let counts = args.params.iter().map(|s| sizes::parse_count(s)).collect::<Result<Vec<_>, _>>()?;
    if let Some(kind) = &args.rss_probe {
        let n = counts.first().copied().unwrap_or(10_000_000);
        let p = mgpo_bench::memory::probe(kind, n, args.weight_dim, args.rank, 5)?;
        println!("{}", serde_json::to_string(&p).map_err(|e| e.to_string())?);
        return Ok(true);
    }
    if let Some(path) = &args.from_json {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let report: mgpo_bench::Report = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if args.markdown {
            mgpo_bench::print_markdown(&report);
        } else {
            mgpo_bench::print_report(&report);
        }
        return Ok(!args.check_targets || report.targets.iter().all(|t| t.met));
    }
    let mut opts = Options { params: counts, ..Options::default() };
    if !args.backend.is_empty() {
        opts.backends = if args.backend.iter().any(|b| b == "all") { mgpo_bench::compiled_backends().into_iter().map(String::from).collect() } else { args.backend.clone() };
    }
    for s in &args.only {
        if !["steps", "weight", "e2e", "memory"].contains(&s.as_str()) {
            return Err(format!("--only: unknown section {s:?} (steps, weight, e2e, memory)"));
        }
    }
    let has = |s: &str| args.only.iter().any(|x| x == s);
    (opts.steps, opts.weight, opts.e2e_section, opts.memory) = (has("steps"), has("weight"), has("e2e"), has("memory"));
    if args.ranks.is_empty() || args.ranks.contains(&0) || args.weight_dim == 0 {
        return Err("--ranks and --weight-dim must be positive".into());
    }
    opts.weight_dim = args.weight_dim;
    opts.weight_ranks = args.ranks.clone();
    opts.w0_max_params = sizes::parse_count(&args.w0_max_params)?;
    if args.e2e_dim == 0 || args.e2e_layers == 0 || args.e2e_tokens == 0 {
        return Err("--e2e-dim, --e2e-layers and --e2e-tokens must be positive".into());
    }
    opts.e2e = mgpo_bench::e2e::E2eShape { dim: args.e2e_dim, rank: 8, layers: args.e2e_layers, tokens: args.e2e_tokens };
    if args.rounds == 0 || !(args.budget > 0.0 && args.budget.is_finite()) {
        return Err("--rounds and --budget must be positive".into());
    }
    opts.rounds = args.rounds;
    opts.budget_s = args.budget;
    opts.peer = match args.peer.as_str() {
        "auto" => PeerMode::Auto,
        "on" => PeerMode::On,
        "off" => PeerMode::Off,
        p => return Err(format!("--peer: {p:?} is not auto, on or off")),
    };
    if let Some(p) = args.python {
        opts.python = p;
    }
    if args.peer_script.is_some() {
        opts.peer_script = args.peer_script;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the mgpo binary for the RSS probes: {e}"))?;
    opts.probe_cmd = Some(vec![exe.into_os_string(), "bench".into()]);

    // The output directory is made before measuring, so a bad path fails
    // in a second rather than after the whole run.
    if let Some(dir) = args.json_out.as_deref().and_then(std::path::Path::parent).filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let report = mgpo_bench::run(&opts)?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else if args.markdown {
        mgpo_bench::print_markdown(&report);
    } else {
        mgpo_bench::print_report(&report);
    }
    Ok(!args.check_targets || report.targets.iter().all(|t| t.met))
}
