//! The random-direction control in weight space: W0 moves by full-rank
//! Gaussian noise of norm rho k (the norm MGPO's own perturbation has), the
//! move is removed again, and runs with one seed are identical.

use mgpo_core::{Config, Layout, MgpoError, Perturbation};
use mgpo_ndarray::{MgpoOptimizer, NdBackend};
use ndarray::{ArrayD, IxDyn};

type T = ArrayD<f64>;

fn layout(with_w0: bool) -> Layout {
    Layout::builder().adapter("q", 8.0, &[4, 6], &[5, 4], with_w0).adapter("v", 4.0, &[2, 6], &[5, 2], with_w0).build().unwrap()
}

fn tensors(l: &Layout) -> Vec<(String, T)> {
    l.tensors().iter().chain(l.frozen()).enumerate().map(|(i, t)| (t.name.clone(), ArrayD::from_shape_fn(IxDyn(&t.shape), |ix| 0.1 * ((i + ix[0] * 7 + ix[1] * 3) as f64).sin()))).collect()
}

/// Steps with the Gaussian direction; per step, the change of every W0 at perturb time.
fn run(seed: u64, config: Config) -> (Vec<(String, T)>, Vec<Vec<T>>, Vec<f64>) {
    let l = layout(true);
    let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), Config { perturbation: Perturbation::Gaussian { seed }, ..config }, l.clone()).unwrap();
    let mut t = tensors(&l);
    let n = l.tensors().len();
    let (mut moves, mut norms) = (Vec::new(), Vec::new());
    for step in 0..4 {
        let before = t.clone();
        let w0: Vec<T> = t[n..].iter().map(|(_, w)| w.clone()).collect();
        opt.perturb(&mut t).unwrap();
        moves.push(t[n..].iter().zip(&w0).map(|((_, a), b)| a - b).collect::<Vec<_>>());
        assert!(t[..n] == before[..n], "step {step}: the adapters themselves moved");
        let g: Vec<(String, T)> = t[..n].iter().map(|(name, p)| (name.clone(), p.mapv(|x| (3.0 * x + step as f64).cos()))).collect();
        let rep = opt.step(&mut t, &g).unwrap();
        norms.push(rep.groups.iter().map(|g| g.perturbation_norm.powi(2)).sum::<f64>().sqrt());
        for ((_, a), b) in t[n..].iter().zip(&w0) {
            let err = (a - b).mapv(f64::abs).iter().cloned().fold(0.0, f64::max);
            assert!(err < 1e-15, "W0 not restored after step {step}: {err}");
        }
    }
    (t, moves, norms)
}

#[test]
fn moves_w0_by_noise_of_mgpo_norm_and_restores_it() {
    for config in [Config::trainer_nlu(1e-2), Config { scope: mgpo_core::Scope::Global, ..Config::trainer_nlu(1e-2) }] {
        let (t1, m1, norms) = run(5, config);
        for (step, (moves, norm)) in m1.iter().zip(&norms).enumerate().skip(1) {
            let moved = moves.iter().map(|d| d.mapv(|x| x * x).sum()).sum::<f64>().sqrt();
            assert!(moved > 0.0 && (moved - norm).abs() < 1e-12 * norm, "step {step}: W0 moved by {moved}, reported {norm}");
            assert!(moves.iter().all(|d| d.iter().filter(|x| **x != 0.0).count() == d.len()), "the noise is not full-rank dense");
        }
        assert!(m1[0].iter().all(|d| d.iter().all(|x| *x == 0.0)), "perturbed before any state exists");
        let (t2, m2, _) = run(5, config);
        assert!(t1 == t2 && m1 == m2, "same seed, different run");
        let (_, m3, _) = run(6, config);
        assert!(m1[2] != m3[2], "the seed does not matter");
    }
}

#[test]
fn needs_w0_registered_in_place() {
    let cfg = Config { perturbation: Perturbation::Gaussian { seed: 1 }, ..Config::trainer_nlu(1e-2) };
    match MgpoOptimizer::<f64>::new(NdBackend::new(), cfg, layout(false)) {
        Err(MgpoError::AdapterShape { name, detail }) => assert!(name == "q" && detail.contains("W0"), "{detail}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted without W0"),
    }
}
