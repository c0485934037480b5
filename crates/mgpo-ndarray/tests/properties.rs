//! Algorithm-level properties, on the ndarray backend in f64.

use mgpo_conformance::props::{case_strategy, Case};
use mgpo_core::lowrank::sum_of_products_sq;
use mgpo_core::{Config, Layout, MgpoError, Moments, NoFrozen, Scope, Space, State};
use mgpo_ndarray::{Mgpo, NdBackend};
use ndarray::{Array2, ArrayD, IxDyn};
use proptest::prelude::*;

type T = ArrayD<f64>;

fn arr(shape: &[usize], data: &[f64]) -> T {
    ArrayD::from_shape_vec(IxDyn(shape), data.to_vec()).unwrap()
}

/// The optimizer, parameters and frozen weights of a case.
fn build(case: &Case, config: Config) -> (Mgpo<f64>, Vec<T>, Vec<T>) {
    let weight = config.space == Space::Weight;
    let mut lb = Layout::builder();
    let mut params = Vec::new();
    let mut frozen = Vec::new();
    for a in &case.adapters {
        lb = lb.adapter(&a.name, a.alpha, &[a.rank, a.fan_in], &[a.fan_out, a.rank], weight);
        params.push(arr(&[a.rank, a.fan_in], &a.a));
        params.push(arr(&[a.fan_out, a.rank], &a.b));
        if weight {
            frozen.push(arr(&[a.fan_out, a.fan_in], &a.w0));
        }
    }
    for (name, shape, data) in &case.plain {
        lb = lb.plain(name, shape);
        params.push(arr(shape, data));
    }
    let opt = Mgpo::new(NdBackend::new(), config, lb.build().unwrap()).unwrap();
    (opt, params, frozen)
}

fn grads_of(params: &[T], g: &[Vec<f64>]) -> Vec<T> {
    params.iter().zip(g).map(|(p, g)| arr(p.shape(), g)).collect()
}

fn finite(case: &mut Case) {
    for s in &mut case.steps {
        for g in &mut s.grads {
            for x in g.iter_mut().filter(|x| !x.is_finite()) {
                *x = 0.5;
            }
        }
    }
}

fn close(a: &[T], b: &[T], rtol: f64) -> Result<(), String> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        for (p, q) in x.iter().zip(y.iter()) {
            if (p - q).abs() > rtol * (1.0 + q.abs()) {
                return Err(format!("tensor {i}: {p} vs {q}"));
            }
        }
    }
    Ok(())
}

fn same_state(a: &State<T>, b: &State<T>) -> bool {
    a.step == b.step
        && a.g_bar == b.g_bar
        && a.moments.len() == b.moments.len()
        && a.moments.iter().zip(&b.moments).all(|(x, y)| x.m == y.m && x.v == y.v)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// rho = 0: perturb changes nothing and the steps are torch's AdamW,
    /// checked against a plain f64 AdamW written here.
    #[test]
    fn rho_zero_is_plain_adamw(mut case in case_strategy()) {
        finite(&mut case);
        let cfg = Config { rho: 0.0, max_grad_norm: None, ..case.config };
        let (mut opt, mut params, mut frozen) = build(&case, cfg);
        let mut mine = params.clone();
        let mut m: Vec<T> = params.iter().map(|p| p.mapv(|_| 0.0)).collect();
        let mut v = m.clone();
        let a = cfg.adamw;
        for (k, s) in case.steps.iter().enumerate() {
            let before = (params.clone(), frozen.clone());
            opt.perturb(&mut params, &mut frozen).unwrap();
            prop_assert!(before.0 == params && before.1 == frozen, "rho = 0 perturbed something");
            opt.set_lr(s.lr).unwrap();
            let g = grads_of(&params, &s.grads);
            opt.step(&mut params, &mut frozen, &g).unwrap();
            let t = (k + 1) as i32;
            for i in 0..mine.len() {
                for (((p, g), m), v) in mine[i].iter_mut().zip(g[i].iter()).zip(m[i].iter_mut()).zip(v[i].iter_mut()) {
                    *p *= 1.0 - s.lr * a.weight_decay;
                    *m = a.beta1 * *m + (1.0 - a.beta1) * g;
                    *v = a.beta2 * *v + (1.0 - a.beta2) * g * g;
                    let denom = v.sqrt() / (1.0 - a.beta2.powi(t)).sqrt() + a.eps;
                    *p -= s.lr / (1.0 - a.beta1.powi(t)) * *m / denom;
                }
            }
            close(&params, &mine, 1e-13).map_err(TestCaseError::fail)?;
        }
    }

    /// A non-finite gradient changes no state and, within rounding, no
    /// parameter; training then goes on as if that step never happened.
    #[test]
    fn skipped_step_changes_nothing(mut case in case_strategy(), at in 0usize..6, bad in prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY])) {
        finite(&mut case);
        let at = at.min(case.steps.len());
        let (mut opt, mut params, mut frozen) = build(&case, case.config);
        let (mut twin, mut tparams, mut tfrozen) = build(&case, case.config);
        for (k, s) in case.steps.iter().enumerate() {
            if k == at {
                let (p0, f0, s0) = (params.clone(), frozen.clone(), opt.state().clone());
                opt.perturb(&mut params, &mut frozen).unwrap();
                let mut g = grads_of(&params, &s.grads);
                let last = g.len() - 1;
                g[last].iter_mut().for_each(|x| *x = bad);
                let rep = opt.step(&mut params, &mut frozen, &g).unwrap();
                prop_assert!(rep.skipped && !opt.is_perturbed());
                prop_assert_eq!(opt.state().skipped, 1);
                prop_assert!(same_state(opt.state(), &s0), "state changed by a skipped step");
                // p + c d - c d: exact only up to rounding at the scale of c d
                close(&params, &p0, 1e-11).map_err(TestCaseError::fail)?;
                close(&frozen, &f0, 1e-11).map_err(TestCaseError::fail)?;
            }
            for (o, p, f) in [(&mut opt, &mut params, &mut frozen), (&mut twin, &mut tparams, &mut tfrozen)] {
                o.set_lr(s.lr).unwrap();
                o.perturb(p, f).unwrap();
                let g = grads_of(p, &s.grads);
                o.step(p, f, &g).unwrap();
            }
            close(&params, &tparams, 1e-12).map_err(TestCaseError::fail)?;
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
            let (mut opt, mut params, mut frozen) = build(&case, Config { scope, ..case.config });
            for s in &case.steps {
                opt.set_lr(s.lr).unwrap();
                opt.perturb(&mut params, &mut frozen).unwrap();
                let g = grads_of(&params, &s.grads);
                opt.step(&mut params, &mut frozen, &g).unwrap();
            }
            (params, frozen, opt.state().g_bar.clone())
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

fn small() -> (Mgpo<f64>, Vec<T>, Vec<T>, Vec<T>) {
    let case = Case::from_seed(7);
    let mut cfg = Config::trainer_nlu(1e-2);
    cfg.max_grad_norm = None;
    let (mut opt, mut params, mut frozen) = build(&case, cfg);
    let g: Vec<T> = params.iter().map(|p| p.mapv(|x| x + 0.3)).collect();
    for _ in 0..2 {
        opt.perturb(&mut params, &mut frozen).unwrap();
        opt.step(&mut params, &mut frozen, &g).unwrap();
    }
    (opt, params, frozen, g)
}

#[test]
fn bad_gradients_are_typed_errors_that_leave_things_clean() {
    let (mut opt, mut params, mut frozen, g) = small();
    let (p0, f0, s0) = (params.clone(), frozen.clone(), opt.state().clone());

    opt.perturb(&mut params, &mut frozen).unwrap();
    let mut wrong = g.clone();
    wrong[0] = ArrayD::zeros(IxDyn(&[1, 1]));
    let e = opt.step(&mut params, &mut frozen, &wrong).unwrap_err();
    assert!(matches!(&e, MgpoError::ShapeMismatch { name, .. } if name.contains(".a")), "{e}");
    assert!(!opt.is_perturbed());
    close(&params, &p0, 1e-14).unwrap();
    close(&frozen, &f0, 1e-14).unwrap();
    assert!(same_state(opt.state(), &s0));

    let missing: Vec<Option<T>> = g.iter().enumerate().map(|(i, x)| (i != 1).then(|| x.clone())).collect();
    let e = opt.step(&mut params, &mut frozen, &missing).unwrap_err();
    assert!(matches!(e, MgpoError::MissingGradient(_)), "{e}");
    let e = opt.step(&mut params, &mut frozen, &g[..1]).unwrap_err();
    assert!(matches!(e, MgpoError::WrongCount { what: "gradients", .. }), "{e}");
    assert!(same_state(opt.state(), &s0));
}

#[test]
fn misuse_is_refused_without_side_effects() {
    let (mut opt, mut params, mut frozen, g) = small();
    opt.perturb(&mut params, &mut frozen).unwrap();
    let (p1, f1) = (params.clone(), frozen.clone());
    assert_eq!(opt.perturb(&mut params, &mut frozen).unwrap_err(), MgpoError::AlreadyPerturbed);
    assert!(params == p1 && frozen == f1, "a refused perturb changed parameters");
    assert!(opt.set_state(opt.state().clone()).is_err(), "state replaced while perturbed");
    opt.unperturb(&mut params, &mut frozen).unwrap();

    let e = opt.perturb(&mut params[..1].to_vec(), &mut frozen).unwrap_err();
    assert!(matches!(e, MgpoError::WrongCount { what: "trainable tensors", .. }), "{e}");
    let e = opt.perturb(&mut params, &mut NoFrozen).unwrap_err();
    assert!(matches!(e, MgpoError::WrongCount { what: "frozen base weights", .. }), "{e}");
    assert!(!opt.is_perturbed());

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
    opt.step(&mut params, &mut frozen, &g).unwrap();
}

#[test]
fn invalid_configuration_is_refused_at_construction() {
    let layout = Layout::builder().adapter("q", 8.0, &[2, 3], &[4, 2], false).build().unwrap();
    for (cfg, field) in [
        (Config { rho: -1.0, ..Config::default() }, "rho"),
        (Config { beta: 1.0, ..Config::default() }, "beta"),
        (Config { max_inv_scale: Some(-1.0), ..Config::default() }, "max_inv_scale"),
    ] {
        match Mgpo::<f64>::new(NdBackend::new(), cfg, layout.clone()) {
            Err(MgpoError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field} accepted"),
        }
    }
}

#[test]
fn zero_size_plain_tensor_is_harmless() {
    let layout = Layout::builder().adapter("q", 2.0, &[1, 3], &[2, 1], false).plain("empty", &[0]).build().unwrap();
    let mut opt = Mgpo::<f32>::new(NdBackend::new(), Config::paper_nlu(1e-2), layout).unwrap();
    let mut params = vec![ArrayD::from_elem(IxDyn(&[1, 3]), 0.5f32), ArrayD::from_elem(IxDyn(&[2, 1]), 0.1), ArrayD::zeros(IxDyn(&[0]))];
    let g = vec![ArrayD::from_elem(IxDyn(&[1, 3]), 1.0f32), ArrayD::from_elem(IxDyn(&[2, 1]), -1.0), ArrayD::zeros(IxDyn(&[0]))];
    for _ in 0..3 {
        opt.perturb(&mut params, &mut NoFrozen).unwrap();
        let rep = opt.step(&mut params, &mut NoFrozen, &g).unwrap();
        assert!(!rep.skipped && rep.groups[0].g_bar.unwrap() > 0.0);
    }
    assert!(params[0].iter().all(|&x| x < 0.5));
}

/// The random-direction baseline: a perturbation of norm rho k (as MGPO's),
/// pointing elsewhere than the momentum, removed exactly, and reproducible.
#[test]
fn gaussian_mode_has_mgpo_norm_and_is_reproducible() {
    use mgpo_core::Perturbation;
    let layout = Layout::builder().adapter("q", 8.0, &[4, 6], &[5, 4], false).plain("head", &[3, 5]).build().unwrap();
    let run = |perturbation: Perturbation| {
        let cfg = Config { perturbation, ..Config::paper_nlu(1e-2) };
        let mut opt = Mgpo::<f64>::new(NdBackend::new(), cfg, layout.clone()).unwrap();
        let mut params: Vec<T> = layout.tensors().iter().map(|t| ArrayD::from_elem(IxDyn(&t.shape), 0.2)).collect();
        let mut moves = Vec::new();
        for step in 0..5 {
            let before = params.clone();
            opt.perturb(&mut params, &mut NoFrozen).unwrap();
            moves.push(params.iter().zip(&before).map(|(a, b)| a - b).collect::<Vec<_>>());
            let g: Vec<T> = params.iter().enumerate().map(|(i, p)| p.mapv(|x| (x * 3.0 + i as f64 + step as f64).sin())).collect();
            let rep = opt.step(&mut params, &mut NoFrozen, &g).unwrap();
            if step > 0 {
                let norm = moves[step].iter().map(|d| d.mapv(|x| x * x).sum()).sum::<f64>().sqrt();
                let want = 0.05 * rep.groups[0].inv_scale;
                assert!((norm - want).abs() < 1e-9 * want, "perturbation norm {norm}, expected rho k = {want}");
                assert!((rep.groups[0].perturbation_norm - want).abs() < 1e-9 * want);
            }
        }
        (params, moves)
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
    let cfg = Config { perturbation: Perturbation::Gaussian { seed: 1 }, ..Config::trainer_nlu(1e-3) };
    assert!(matches!(cfg.validate(), Err(MgpoError::InvalidConfig { field: "perturbation", .. })));
}
