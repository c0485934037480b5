//! The ndarray examples of the facade's crate documentation (src/lib.rs at
//! the repository root) and of the README, verbatim, under the facade's
//! paths, so that they are compiled and run with this crate's tests too.

/// The facade's paths: `lora_mgpo` re-exports `mgpo_core` and, as `ndarray`, this crate.
mod lora_mgpo {
    pub use mgpo_core::*;
    pub use mgpo_ndarray as ndarray;
}

#[test]
fn facade_doc_example() -> Result<(), lora_mgpo::MgpoError> {
    use lora_mgpo::ndarray::{MgpoOptimizer, NdBackend};
    use lora_mgpo::{Config, Layout};
    use ndarray::{ArrayD, IxDyn};

    // One adapter: A is r x in (2 x 3), B is out x r (4 x 2), alpha 8.
    let layout = Layout::builder().adapter("q", 8.0, &[2, 3], &[4, 2], false).build()?;
    let mut opt = MgpoOptimizer::<f32>::new(NdBackend::new(), Config::paper_nlu(1e-3), layout)?;
    // Every tensor with its name, in the order of `opt.layout().names()`.
    let mut params = vec![("q.a", ArrayD::from_elem(IxDyn(&[2, 3]), 0.1f32)), ("q.b", ArrayD::zeros(IxDyn(&[4, 2])))];
    for _ in 0..3 {
        opt.perturb(&mut params)?; // before the forward pass
        let grads = vec![("q.a", ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)), ("q.b", ArrayD::from_elem(IxDyn(&[4, 2]), -0.5))];
        let report = opt.step(&mut params, &grads)?; // after the backward pass
        assert!(!report.skipped);
    }
    // Tensors given in another order are refused, naming them.
    params.swap(0, 1);
    assert!(matches!(opt.perturb(&mut params), Err(lora_mgpo::MgpoError::NameMismatch { .. })));
    Ok(())
}

mod readme {
    use super::lora_mgpo;

    use lora_mgpo::ndarray::{MgpoOptimizer, NdBackend};
    use lora_mgpo::{Config, Layout};
    use ndarray::{ArrayD, IxDyn};

    pub fn main() -> Result<(), lora_mgpo::MgpoError> {
        // A is r x in, B is out x r, alpha 16; `true` would register W0 for weight space.
        let layout = Layout::builder().adapter("q_proj", 16.0, &[8, 64], &[64, 8], false).build()?;
        let mut opt = MgpoOptimizer::<f32>::new(NdBackend::new(), Config::paper_nlu(2e-4), layout)?;
        // Tensors by name, in the order of `opt.layout().names()`; a swapped or missing one is an error naming it.
        let mut params = vec![("q_proj.a", ArrayD::from_elem(IxDyn(&[8, 64]), 0.01f32)), ("q_proj.b", ArrayD::zeros(IxDyn(&[64, 8])))];
        for _ in 0..3 {
            opt.perturb(&mut params)?;
            let grads: Vec<_> = params.iter().map(|(name, p)| (*name, p.mapv(|x| x - 0.5))).collect(); // your backward pass
            let report = opt.step(&mut params, &grads)?;
            assert!(!report.skipped);
        }
        Ok(())
    }
}

#[test]
fn readme_example() {
    readme::main().unwrap();
}
