//! `mgpo checkpoint-stress`: a process that writes checkpoints in a loop (to
//! be killed mid-write by a test) and a check that whatever file it left
//! loads. Hidden from `--help`: it exists for the crash test.

use std::path::Path;

use mgpo_core::{Config, Layout};
use mgpo_ndarray::{MgpoOptimizer, NdBackend};
use ndarray::{ArrayD, IxDyn};

/// One adapter of `params` parameters (rank 8), trained a step.
fn setup(params: usize) -> Result<(MgpoOptimizer<f32>, Vec<(&'static str, ArrayD<f32>)>), String> {
    let side = (params / 16).max(1);
    let layout = Layout::builder().adapter("w", 16.0, &[8, side], &[side, 8], false).build().map_err(|e| e.to_string())?;
    let opt = MgpoOptimizer::new(NdBackend::new(), Config::paper_nlu(1e-3), layout).map_err(|e| e.to_string())?;
    let p = vec![("w.a", ArrayD::from_elem(IxDyn(&[8, side]), 0.1f32)), ("w.b", ArrayD::from_elem(IxDyn(&[side, 8]), 0.0f32))];
    Ok((opt, p))
}

/// Steps and saves to `path` forever (`rounds` = 0) or `rounds` times.
pub fn write(path: &Path, params: usize, rounds: u64) -> Result<(), String> {
    let (mut opt, mut p) = setup(params)?;
    let g: Vec<(&str, ArrayD<f32>)> = p.iter().map(|(n, x)| (*n, x.mapv(|_| 0.01))).collect();
    let mut k = 0;
    while rounds == 0 || k < rounds {
        opt.perturb(&mut p).map_err(|e| e.to_string())?;
        opt.step(&mut p, &g).map_err(|e| e.to_string())?;
        opt.save_checkpoint(path).map_err(|e| e.to_string())?;
        println!("saved step {}", opt.state().step);
        k += 1;
    }
    Ok(())
}

/// Loads `path` into a fresh optimizer of the same shape.
pub fn verify(path: &Path, params: usize) -> Result<(), String> {
    let (mut opt, _) = setup(params)?;
    opt.load_checkpoint(path).map_err(|e| e.to_string())?;
    println!("loaded step {}", opt.state().step);
    Ok(())
}
