//! Algorithm-level properties, on the ndarray backend in f64.

mod common;

use common::{arr, build, close, grads, same_state, Named};
use mgpo_conformance::props::{case_strategy, Case};
use mgpo_core::backend::lowrank::sum_of_products_sq;
use mgpo_core::{Config, Layout, MgpoError, Moments, Scope, State};
use mgpo_ndarray::{MgpoOptimizer, NdBackend};
use ndarray::{Array2, ArrayD, IxDyn};
use proptest::prelude::*;

type T = ArrayD<f64>;

fn finite(case: &mut Case) {
    for s in &mut case.steps {
        for g in &mut s.grads {
            for x in g.iter_mut().filter(|x| !x.is_finite()) {
                *x = 0.5;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// rho = 0: perturb changes nothing and the steps are torch's AdamW,
    /// checked against a plain f64 AdamW written here; W0 is never touched.
    #[test]
    fn rho_zero_is_plain_adamw(mut case in case_strategy()) {
        finite(&mut case);
        let cfg = Config { rho: 0.0, max_grad_norm: None, ..case.config };
        let (mut opt, mut tensors) = build::<f64>(&case, cfg);
        let n = opt.layout().tensors().len();
        let w0 = tensors[n..].to_vec();
        let mut mine: Named<f64> = tensors[..n].to_vec();
        let mut m: Vec<T> = mine.iter().map(|p| p.1.mapv(|_| 0.0)).collect();
        let mut v = m.clone();
        let a = cfg.adamw;
        for (k, s) in case.steps.iter().enumerate() {
            let before = tensors.clone();
            opt.perturb(&mut tensors).unwrap();
            prop_assert!(before == tensors, "rho = 0 perturbed something");
            opt.set_lr(s.lr).unwrap();
            let g = grads(&opt, &s.grads);
            opt.step(&mut tensors, &g).unwrap();
            let t = (k + 1) as i32;
            for i in 0..n {
                for (((p, g), m), v) in mine[i].1.iter_mut().zip(g[i].1.iter()).zip(m[i].iter_mut()).zip(v[i].iter_mut()) {
                    *p *= 1.0 - s.lr * a.weight_decay;
                    *m = a.beta1 * *m + (1.0 - a.beta1) * g;
                    *v = a.beta2 * *v + (1.0 - a.beta2) * g * g;
                    let denom = v.sqrt() / (1.0 - a.beta2.powi(t)).sqrt() + a.eps;
                    *p -= s.lr / (1.0 - a.beta1.powi(t)) * *m / denom;
                }
            }
            close(&tensors[..n], &mine, 1e-13).map_err(TestCaseError::fail)?;
            prop_assert!(tensors[n..] == w0[..], "rho = 0 moved W0");
        }
    }

    /// A non-finite gradient changes no state and, within rounding, no
    /// parameter or W0; training then goes on as if that step never happened.
    #[test]
    fn skipped_step_changes_nothing(mut case in case_strategy(), at in 0usize..6, bad in prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY])) {
        finite(&mut case);
        let at = at.min(case.steps.len());
        let (mut opt, mut tensors) = build::<f64>(&case, case.config);
        let (mut twin, mut twin_tensors) = build::<f64>(&case, case.config);
        for (k, s) in case.steps.iter().enumerate() {
            if k == at {
                let (t0, s0) = (tensors.clone(), opt.state().clone());
                opt.perturb(&mut tensors).unwrap();
                let mut g = grads(&opt, &s.grads);
                let last = g.len() - 1;
                g[last].1.iter_mut().for_each(|x| *x = bad);
                let rep = opt.step(&mut tensors, &g).unwrap();
                prop_assert!(rep.skipped && !opt.is_perturbed());
                prop_assert_eq!(opt.state().skipped, 1);
                prop_assert!(same_state(opt.state(), &State { skipped: 1, ..s0 }), "state changed by a skipped step");
                // p + c d - c d: exact only up to rounding at the scale of c d
                close(&tensors, &t0, 1e-11).map_err(TestCaseError::fail)?;
            }
            for (o, t) in [(&mut opt, &mut tensors), (&mut twin, &mut twin_tensors)] {
                o.set_lr(s.lr).unwrap();
                o.perturb(t).unwrap();
                let g = grads(o, &s.grads);
                o.step(t, &g).unwrap();
            }
            close(&tensors, &twin_tensors, 1e-12).map_err(TestCaseError::fail)?;
        }
    }

    /// With one adapter, per-adapter scope is global scope, bit for bit.
    #[test]
    fn per_adapter_with_one_adapter_is_global(mut case in case_strategy()) {
        case.adapters.truncate(1);
        case.plain.clear();
        for s in &mut case.steps {
            s.grads.truncate(2);
        }
        let run = |scope: Scope| {
            let (mut opt, mut tensors) = build::<f64>(&case, Config { scope, ..case.config });
            for s in &case.steps {
                opt.set_lr(s.lr).unwrap();
                opt.perturb(&mut tensors).unwrap();
                let g = grads(&opt, &s.grads);
                opt.step(&mut tensors, &g).unwrap();
            }
            (tensors, opt.state().g_bar.clone())
        };
        prop_assert_eq!(run(Scope::Global), run(Scope::PerAdapter));
    }

    /// ||P Q + R S||^2 through r x r Grams equals the materialised norm.
    #[test]
    fn gram_norm_equals_materialised(out in 1usize..40, inp in 1usize..40, r in 1usize..9, seed in any::<u64>()) {
        let mut x = seed | 1;
        let mut rnd = |n: usize, m: usize| {
            Array2::from_shape_fn((n, m), |_| {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                (x % 2001) as f64 / 1000.0 - 1.0
            })
        };
        let (p, q, rr, s) = (rnd(out, r), rnd(r, inp), rnd(out, r), rnd(r, inp));
        let full = (p.dot(&q) + rr.dot(&s)).mapv(|v| v * v).sum();
        let d = |a: Array2<f64>| a.into_dyn();
        let gram = sum_of_products_sq(&NdBackend::<f64>::new(), &d(p), &d(q), &d(rr), &d(s)).unwrap();
        prop_assert!((gram - full).abs() <= 1e-10 * (1.0 + full), "{gram} vs {full}");
    }
}

/// Two steps of the trainer preset (weight space, W0 perturbed in place)
/// on a fixed case: the optimizer, its tensors, and a set of gradients.
fn small() -> (MgpoOptimizer<f64>, Named<f64>, Named<f64>) {
    let case = Case::from_seed(7);
    let mut cfg = Config::trainer_nlu(1e-2);
    cfg.max_grad_norm = None;
    let (mut opt, mut tensors) = build::<f64>(&case, cfg);
    assert!(!opt.layout().frozen().is_empty(), "the case has no W0 to perturb in place");
    let n = opt.layout().tensors().len();
    let g: Named<f64> = tensors[..n].iter().map(|(name, p)| (name.clone(), p.mapv(|x| x + 0.3))).collect();
    for _ in 0..2 {
        opt.perturb(&mut tensors).unwrap();
        opt.step(&mut tensors, &g).unwrap();
    }
    (opt, tensors, g)
}

/// Every bad gradient list is a typed error naming the tensor, after which
/// the perturbation is gone, the tensors are clean and the state is as before.
#[test]
fn bad_gradients_are_typed_errors_that_leave_things_clean() {
    let (mut opt, mut tensors, g) = small();
    let (t0, s0) = (tensors.clone(), opt.state().clone());
    let names: Vec<String> = g.iter().map(|x| x.0.clone()).collect();
    let clean = |opt: &MgpoOptimizer<f64>, tensors: &Named<f64>| {
        assert!(!opt.is_perturbed());
        close(tensors, &t0, 1e-14).unwrap();
        assert!(same_state(opt.state(), &s0));
    };

    opt.perturb(&mut tensors).unwrap();
    assert!(close(&tensors, &t0, 1e-6).is_err(), "the perturbation moved nothing");
    let mut wrong = g.clone();
    wrong[0].1 = ArrayD::zeros(IxDyn(&[1, 1]));
    let e = opt.step(&mut tensors, &wrong).unwrap_err();
    let want = format!("grad of {}", names[0]);
    assert!(matches!(&e, MgpoError::ShapeMismatch { name, expected, got } if *name == want && *expected == g[0].1.shape() && *got == [1, 1]), "{e}");
    clean(&opt, &tensors);

    opt.perturb(&mut tensors).unwrap();
    let missing: Vec<(String, Option<T>)> = g.iter().enumerate().map(|(i, (n, x))| (n.clone(), (i != 1).then(|| x.clone()))).collect();
    assert_eq!(opt.step(&mut tensors, &missing).unwrap_err(), MgpoError::MissingGradient(names[1].clone()));
    clean(&opt, &tensors);

    opt.perturb(&mut tensors).unwrap();
    assert_eq!(opt.step(&mut tensors, &g[..1]).unwrap_err(), MgpoError::MissingGradient(names[1].clone()));
    clean(&opt, &tensors);
}

#[test]
fn misuse_is_refused_without_side_effects() {
    let (mut opt, mut tensors, g) = small();
    let n = opt.layout().tensors().len();
    opt.perturb(&mut tensors).unwrap();
    let t1 = tensors.clone();
    assert_eq!(opt.perturb(&mut tensors).unwrap_err(), MgpoError::AlreadyPerturbed);
    assert!(tensors == t1, "a refused perturb changed tensors");
    assert!(opt.set_state(opt.state().clone()).is_err(), "state replaced while perturbed");
    opt.unperturb(&mut tensors).unwrap();
    let t0 = tensors.clone();

    let e = opt.perturb(&mut tensors[..1].to_vec()).unwrap_err();
    assert_eq!(e, MgpoError::MissingTensor(tensors[1].0.clone()));
    // weight space with W0 registered: the W0s are required
    let e = opt.perturb(&mut tensors[..n].to_vec()).unwrap_err();
    assert_eq!(e, MgpoError::MissingTensor(opt.layout().frozen()[0].name.clone()));
    assert!(e.to_string().contains(".w0"), "{e}");
    assert!(!opt.is_perturbed() && tensors == t0);

    let lr = opt.lr();
    assert!(matches!(opt.set_lr(-1.0), Err(MgpoError::InvalidConfig { field: "lr", .. })));
    assert!(opt.set_lr(f64::INFINITY).is_err());
    assert_eq!(opt.lr(), lr);

    let s0 = opt.state().clone();
    let mut bad = s0.clone();
    bad.moments[0] = Moments { m: ArrayD::zeros(IxDyn(&[2])), v: ArrayD::zeros(IxDyn(&[2])) };
    assert!(matches!(opt.set_state(bad).unwrap_err(), MgpoError::ShapeMismatch { .. }));
    let mut bad = s0.clone();
    bad.g_bar.push(None);
    assert!(matches!(opt.set_state(bad).unwrap_err(), MgpoError::WrongCount { what: "groups", .. }));
    assert!(same_state(opt.state(), &s0));
    opt.step(&mut tensors, &g).unwrap();
}

#[test]
fn invalid_configuration_is_refused_at_construction() {
    let layout = Layout::builder().adapter("q", 8.0, &[2, 3], &[4, 2], false).build().unwrap();
    for (cfg, field) in [
        (Config { rho: -1.0, ..Config::default() }, "rho"),
        (Config { beta: 1.0, ..Config::default() }, "beta"),
        (Config { max_inv_scale: Some(-1.0), ..Config::default() }, "max_inv_scale"),
    ] {
        match MgpoOptimizer::<f64>::new(NdBackend::new(), cfg, layout.clone()) {
            Err(MgpoError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field} accepted"),
        }
    }
}

#[test]
fn zero_size_plain_tensor_is_harmless() {
    let layout = Layout::builder().adapter("q", 2.0, &[1, 3], &[2, 1], false).plain("empty", &[0]).build().unwrap();
    let mut opt = MgpoOptimizer::<f32>::new(NdBackend::new(), Config::paper_nlu(1e-2), layout).unwrap();
    let mut tensors = vec![("q.a", ArrayD::from_elem(IxDyn(&[1, 3]), 0.5f32)), ("q.b", ArrayD::from_elem(IxDyn(&[2, 1]), 0.1)), ("empty", ArrayD::zeros(IxDyn(&[0])))];
    let g = vec![("q.a", ArrayD::from_elem(IxDyn(&[1, 3]), 1.0f32)), ("q.b", ArrayD::from_elem(IxDyn(&[2, 1]), -1.0)), ("empty", ArrayD::zeros(IxDyn(&[0])))];
    for _ in 0..3 {
        opt.perturb(&mut tensors).unwrap();
        let rep = opt.step(&mut tensors, &g).unwrap();
        assert!(!rep.skipped && rep.groups[0].g_bar.unwrap() > 0.0);
    }
    assert!(tensors[0].1.iter().all(|&x| x < 0.5));
}

/// The random-direction baseline: a perturbation of norm rho k (as MGPO's),
/// pointing elsewhere than the momentum, removed exactly, and reproducible.
#[test]
fn gaussian_mode_has_mgpo_norm_and_is_reproducible() {
    use mgpo_core::Perturbation;
    let layout = Layout::builder().adapter("q", 8.0, &[4, 6], &[5, 4], false).plain("head", &[3, 5]).build().unwrap();
    let run = |perturbation: Perturbation| {
        let cfg = Config { perturbation, ..Config::paper_nlu(1e-2) };
        let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), cfg, layout.clone()).unwrap();
        let mut tensors: Named<f64> = layout.tensors().iter().map(|t| (t.name.clone(), arr(&t.shape, &vec![0.2; t.shape.iter().product()]))).collect();
        let mut moves = Vec::new();
        for step in 0..5 {
            let before = tensors.clone();
            opt.perturb(&mut tensors).unwrap();
            moves.push(tensors.iter().zip(&before).map(|(a, b)| &a.1 - &b.1).collect::<Vec<_>>());
            let g: Named<f64> = tensors.iter().enumerate().map(|(i, (n, p))| (n.clone(), p.mapv(|x| (x * 3.0 + i as f64 + step as f64).sin()))).collect();
            let rep = opt.step(&mut tensors, &g).unwrap();
            if step > 0 {
                let norm = moves[step].iter().map(|d| d.mapv(|x| x * x).sum()).sum::<f64>().sqrt();
                let want = 0.05 * rep.groups[0].inv_scale;
                assert!((norm - want).abs() < 1e-9 * want, "perturbation norm {norm}, expected rho k = {want}");
                assert!((rep.groups[0].perturbation_norm - want).abs() < 1e-9 * want);
            }
        }
        (tensors, moves)
    };
    let (p1, m1) = run(Perturbation::Gaussian { seed: 9 });
    let (p2, m2) = run(Perturbation::Gaussian { seed: 9 });
    assert!(p1 == p2 && m1 == m2, "same seed, different run");
    let (_, m3) = run(Perturbation::Gaussian { seed: 10 });
    assert!(m1[1] != m3[1], "the seed does not matter");
    let (_, mm) = run(Perturbation::Momentum);
    let dot: f64 = m1[2].iter().zip(&mm[2]).map(|(a, b)| (a * b).sum()).sum();
    let norms: f64 = [&m1[2], &mm[2]].iter().map(|m| m.iter().map(|d| d.mapv(|x| x * x).sum()).sum::<f64>().sqrt()).product();
    assert!(dot.abs() < 0.9 * norms, "noise direction equals the momentum direction");
}
