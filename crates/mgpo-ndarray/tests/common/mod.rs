//! What the ndarray test binaries share: a conformance case's optimizer with
//! its tensors by name, the named gradients of a step, a training loop, and
//! comparisons of tensors and states.

#![allow(dead_code)]

use std::ops::Range;

use mgpo_conformance::props::{Case, CaseRun};
use mgpo_core::{Config, State};
use mgpo_ndarray::{Element, MgpoOptimizer, NdBackend};
use ndarray::{ArrayD, IxDyn};

/// Tensors (or gradients) by name, in the order of `Layout::names`.
pub type Named<F> = Vec<(String, ArrayD<F>)>;

/// A tensor of `shape` holding `data` (row-major), converted to `F`.
pub fn arr<F: Element>(shape: &[usize], data: &[f64]) -> ArrayD<F> {
    ArrayD::from_shape_vec(IxDyn(shape), data.iter().map(|&x| F::from(x).unwrap()).collect()).unwrap()
}

/// The optimizer of `case` under `config` on `NdBackend<F>`, and its tensors
/// by name: the trainable ones, then W0 of each adapter in weight space.
pub fn build<F: Element>(case: &Case, config: Config) -> (MgpoOptimizer<F>, Named<F>) {
    let case = Case { config, ..case.clone() };
    let CaseRun { opt, tensors } = CaseRun::new(&NdBackend::<F>::new(), &case).unwrap();
    (opt, tensors)
}

/// The gradients `data` (one per trainable tensor, in layout order) named
/// and shaped as `opt`'s trainable tensors.
pub fn grads<F: Element>(opt: &MgpoOptimizer<F>, data: &[Vec<f64>]) -> Named<F> {
    opt.layout().tensors().iter().zip(data).map(|(info, g)| (info.name.clone(), arr(&info.shape, g))).collect()
}

/// Steps `steps` of `case` (cycling through its steps): learning rate, perturb, step.
pub fn train<F: Element>(opt: &mut MgpoOptimizer<F>, tensors: &mut Named<F>, case: &Case, steps: Range<usize>) {
    for k in steps {
        let s = &case.steps[k % case.steps.len()];
        opt.set_lr(s.lr).unwrap();
        opt.perturb(tensors).unwrap();
        let g = grads(opt, &s.grads);
        opt.step(tensors, &g).unwrap();
    }
}

/// Same names, and every entry within `rtol * (1 + |b|)` of `b`'s.
pub fn close<F: Element>(a: &[(String, ArrayD<F>)], b: &[(String, ArrayD<F>)], rtol: f64) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} tensors vs {}", a.len(), b.len()));
    }
    for ((na, x), (nb, y)) in a.iter().zip(b) {
        if na != nb || x.shape() != y.shape() {
            return Err(format!("`{na}` {:?} vs `{nb}` {:?}", x.shape(), y.shape()));
        }
        for (p, q) in x.iter().zip(y.iter()) {
            let (p, q) = (p.to_f64().unwrap(), q.to_f64().unwrap());
            if (p - q).abs() > rtol * (1.0 + q.abs()) {
                return Err(format!("`{na}`: {p} vs {q}"));
            }
        }
    }
    Ok(())
}

/// Bit-identical states: step and skip counts, g_bar, every moment.
pub fn same_state<F: PartialEq>(a: &State<ArrayD<F>>, b: &State<ArrayD<F>>) -> bool {
    a.step == b.step
        && a.skipped == b.skipped
        && a.g_bar.len() == b.g_bar.len()
        && a.g_bar.iter().zip(&b.g_bar).all(|(x, y)| x.map(f64::to_bits) == y.map(f64::to_bits))
        && a.moments.len() == b.moments.len()
        && a.moments.iter().zip(&b.moments).all(|(x, y)| x.m == y.m && x.v == y.v)
}
