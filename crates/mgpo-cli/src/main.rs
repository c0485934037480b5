//! `mgpo`: conformance of the backends against the float64 vectors (and,
//! as they land, experiments and benchmarks).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod conformance;
mod experiment;
mod finetune;
mod stress;

#[derive(Parser)]
#[command(name = "mgpo", version, about = "LoRA-MGPO: conformance, experiments, benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F64,
    All,
}

#[derive(Subcommand)]
enum Command {
    /// Run conformance vectors on one or all compiled backends and print
    /// the largest errors; exits non-zero on any failure or unreadable vector.
    Conformance {
        /// A directory of vector files (*.json); may be repeated.
        #[arg(long = "vectors", required = true)]
        vectors: Vec<PathBuf>,
        /// A compiled backend, or `all`.
        #[arg(long, default_value = "ndarray")]
        backend: String,
        #[arg(long, value_enum, default_value = "all")]
        dtype: Dtype,
        /// Instead of pass/fail: the atol each vector needs on the chosen backends and the tolerance that suggests (docs/spec.md, "Comparison"); fails when a backend passes a generated vector with less than a tenfold margin.
        #[arg(long)]
        measure: bool,
    },
    /// A small sweep (about two minutes on 2 cores): plain LoRA vs LoRA-MGPO
    /// loss curves, rebound table and plot.
    Demo(experiment::DemoArgs),
    /// The full sweep over ranks, learning rates, seeds and methods.
    Experiment(experiment::ExperimentArgs),
    /// LoRA-MGPO fine-tuning of a pretrained BERT (default all-MiniLM-L6-v2) on
    /// text classification (default WordNet supersenses), peft-format adapters.
    Finetune(finetune::FinetuneArgs),
    /// Optimizer-step benchmarks against the memory-bandwidth bound.
    Bench(bench::BenchArgs),
    /// Write checkpoints in a loop, or verify one loads (for the crash test).
    #[command(hide = true)]
    CheckpointStress {
        #[arg(long)]
        path: PathBuf,
        #[arg(long, default_value_t = 1 << 20)]
        params: usize,
        /// Verify instead of write.
        #[arg(long)]
        verify: bool,
        /// Rounds to write; 0 = until killed.
        #[arg(long, default_value_t = 0)]
        rounds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Conformance { vectors, backend, dtype, measure: false } => conformance::run(&vectors, &backend, dtype),
        Command::Conformance { vectors, backend, dtype, measure: true } => conformance::measure(&vectors, &backend, dtype),
        Command::Demo(args) => experiment::demo(args),
        Command::Experiment(args) => experiment::experiment(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Bench(args) => bench::run(args),
        Command::CheckpointStress { path, params, verify, rounds } => {
            if verify { stress::verify(&path, params) } else { stress::write(&path, params, rounds) }.map(|()| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mgpo: {e}");
            ExitCode::from(2)
        }
    }
}
