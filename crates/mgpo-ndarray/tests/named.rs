//! Tensors and gradients are matched by name on every call: swapped,
//! missing, unknown or misnamed ones are typed errors that name them and
//! change nothing; W0 is optional where nothing perturbs it in place; the
//! report of the last step, the learning rate and the order of
//! `Layout::names` behave as documented.

mod common;

use common::{close, same_state, Named};
use mgpo_core::{Config, Layout, MgpoError, Space};
use mgpo_ndarray::{MgpoOptimizer, NdBackend};
use ndarray::{ArrayD, IxDyn};

type T = ArrayD<f64>;
/// Gradients by name, `None` where a tensor got none.
type OptGrads = Vec<(String, Option<T>)>;

/// Two adapters of one shape, q and v (both with W0 registered), and a plain
/// tensor: names q.a, q.b, v.a, v.b, head, q.w0, v.w0.
fn layout() -> Layout {
    Layout::builder()
        .adapter("q", 8.0, &[2, 3], &[4, 2], true)
        .adapter("v", 8.0, &[2, 3], &[4, 2], true)
        .plain("head", &[3])
        .build()
        .unwrap()
}

/// Distinct values for every tensor the layout names, trainable and W0.
fn tensors_of(layout: &Layout) -> Named<f64> {
    let infos = layout.tensors().iter().chain(layout.frozen());
    infos
        .enumerate()
        .map(|(i, t)| {
            let n: usize = t.shape.iter().product();
            let data = (0..n).map(|j| ((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.4 + 0.01 * i as f64).collect();
            (t.name.clone(), ArrayD::from_shape_vec(IxDyn(&t.shape), data).unwrap())
        })
        .collect()
}

/// Gradients of step `k` for the trainable tensors (the first `n` of `tensors`).
fn grads_at(tensors: &Named<f64>, n: usize, k: usize) -> Named<f64> {
    tensors[..n].iter().map(|(name, p)| (name.clone(), p.mapv(|x| (2.0 * x + k as f64).sin()))).collect()
}

/// An optimizer on [`layout`] after two steps (so that the next perturbation
/// is not zero), given W0 or not.
fn trained(config: Config, with_w0: bool) -> (MgpoOptimizer<f64>, Named<f64>) {
    let layout = layout();
    let n = layout.tensors().len();
    let mut tensors = tensors_of(&layout);
    if !with_w0 {
        tensors.truncate(n);
    }
    let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), config, layout).unwrap();
    for k in 0..2 {
        opt.perturb(&mut tensors).unwrap();
        let g = grads_at(&tensors, n, k);
        opt.step(&mut tensors, &g).unwrap();
    }
    (opt, tensors)
}

fn mismatch(position: usize, expected: &str, got: &str) -> MgpoError {
    MgpoError::NameMismatch { position, expected: expected.into(), got: got.into() }
}

/// `t` with the tensors at positions `pairs` exchanged, names and all.
fn swapped(t: &Named<f64>, pairs: &[(usize, usize)]) -> Named<f64> {
    let mut s = t.clone();
    for &(i, j) in pairs {
        s.swap(i, j);
    }
    s
}

/// q and v have the same shapes, so only their names tell them apart: given
/// in swapped order they are refused, naming both, and nothing changes.
#[test]
fn swapped_same_shape_adapters_are_refused_naming_both() {
    for (config, pairs, err) in [
        (Config::paper_nlu(1e-2), vec![(0, 2), (1, 3)], mismatch(0, "q.a", "v.a")),
        (Config::trainer_nlu(1e-2), vec![(0, 2), (1, 3)], mismatch(0, "q.a", "v.a")),
        (Config::trainer_nlu(1e-2), vec![(5, 6)], mismatch(5, "q.w0", "v.w0")),
    ] {
        let (mut opt, mut tensors) = trained(config, true);
        let (t0, s0) = (tensors.clone(), opt.state().clone());
        let mut bad = swapped(&tensors, &pairs);
        assert_eq!(opt.perturb(&mut bad).unwrap_err(), err);
        let text = err.to_string();
        let MgpoError::NameMismatch { expected, got, .. } = &err else { unreachable!() };
        assert!(text.contains(&format!("`{expected}`")) && text.contains(&format!("`{got}`")), "{text}");
        assert!(bad == swapped(&t0, &pairs) && !opt.is_perturbed() && same_state(opt.state(), &s0));
        assert_eq!(opt.unperturb(&mut bad).unwrap_err(), err);
        let g = grads_at(&tensors, 5, 2);
        assert_eq!(opt.step(&mut bad, &g).unwrap_err(), err);
        assert!(bad == swapped(&t0, &pairs) && !opt.is_perturbed() && same_state(opt.state(), &s0));

        // Between perturb and step: the swapped tensors are refused before
        // anything is written. The optimizer cannot clean tensors whose
        // names are not theirs, so it stays perturbed (`Mgpo::step`) until
        // `unperturb` gets the right ones, which restores the clean values.
        opt.perturb(&mut tensors).unwrap();
        let perturbed = tensors.clone();
        assert!(close(&perturbed, &t0, 1e-6).is_err(), "the perturbation moved nothing");
        let mut bad = swapped(&perturbed, &pairs);
        assert_eq!(opt.step(&mut bad, &g).unwrap_err(), err);
        assert!(bad == swapped(&perturbed, &pairs) && same_state(opt.state(), &s0));
        assert!(opt.is_perturbed());
        opt.unperturb(&mut tensors).unwrap();
        assert!(!opt.is_perturbed());
        close(&tensors, &t0, 1e-14).unwrap();
    }
}

/// A missing tensor, an unknown one, or W0 under another name: each a typed
/// error naming it, from perturb, step and unperturb alike, with no effect.
#[test]
fn missing_and_unknown_tensors_are_named() {
    let (mut opt, tensors) = trained(Config::paper_nlu(1e-2), true);
    let extra = |mut t: Named<f64>| {
        t.push(("extra".into(), ArrayD::zeros(IxDyn(&[3]))));
        t
    };
    let renamed_w0 = {
        let mut t = tensors.clone();
        t[5].0 = "k.w0".into();
        t
    };
    let without_qb: Named<f64> = tensors.iter().filter(|t| t.0 != "q.b").cloned().collect();
    let cases: Vec<(Named<f64>, MgpoError)> = vec![
        (tensors[..4].to_vec(), MgpoError::MissingTensor("head".into())),
        (without_qb, mismatch(1, "q.b", "v.a")),
        (tensors[..6].to_vec(), MgpoError::MissingTensor("v.w0".into())),
        (extra(tensors.clone()), MgpoError::UnknownName("extra".into())),
        // past the trainable tensors come the registered W0s, so an extra tensor there is read as one
        (extra(tensors[..5].to_vec()), mismatch(5, "q.w0", "extra")),
        (renamed_w0, mismatch(5, "q.w0", "k.w0")),
    ];
    let s0 = opt.state().clone();
    for (given, err) in cases {
        let mut t = given.clone();
        assert_eq!(opt.perturb(&mut t).unwrap_err(), err);
        assert_eq!(opt.unperturb(&mut t).unwrap_err(), err);
        assert_eq!(opt.step(&mut t, &grads_at(&tensors, 5, 2)).unwrap_err(), err);
        assert!(t == given && !opt.is_perturbed() && same_state(opt.state(), &s0), "{err}");
    }

    // Without any W0 registered, whatever follows the trainable tensors is unknown.
    let layout = Layout::builder().adapter("q", 8.0, &[2, 3], &[4, 2], false).build().unwrap();
    let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), Config::paper_nlu(1e-2), layout.clone()).unwrap();
    let mut t = extra(tensors_of(&layout));
    assert_eq!(opt.perturb(&mut t).unwrap_err(), MgpoError::UnknownName("extra".into()));
    assert!(!opt.is_perturbed());
}

/// A gradient that is missing (absent or `None`), misnamed, swapped or
/// unknown is a typed error naming it, after which the perturbation is
/// gone, every tensor (W0 included) is clean and the state is as before.
#[test]
fn missing_and_misnamed_gradients_are_named_and_leave_things_clean() {
    for config in [Config::paper_nlu(1e-2), Config::trainer_nlu(1e-2)] {
        let (mut opt, mut tensors) = trained(config, true);
        let (t0, s0) = (tensors.clone(), opt.state().clone());
        let good: OptGrads = grads_at(&tensors, 5, 2).into_iter().map(|(n, g)| (n, Some(g))).collect();
        let edit = |f: &dyn Fn(&mut OptGrads)| {
            let mut g = good.clone();
            f(&mut g);
            g
        };
        let cases = [
            (edit(&|g| g[3].1 = None), MgpoError::MissingGradient("v.b".into())),
            (edit(&|g| g.truncate(4)), MgpoError::MissingGradient("head".into())),
            (edit(&|g| g[3].0 = "v.c".into()), mismatch(3, "grad of v.b", "grad of v.c")),
            (edit(&|g| g.swap(0, 2)), mismatch(0, "grad of q.a", "grad of v.a")),
            (edit(&|g| g.push(("extra".into(), Some(ArrayD::zeros(IxDyn(&[3])))))), MgpoError::UnknownName("grad of extra".into())),
        ];
        for (grads, err) in cases {
            opt.perturb(&mut tensors).unwrap();
            assert!(close(&tensors, &t0, 1e-6).is_err(), "the perturbation moved nothing");
            assert_eq!(opt.step(&mut tensors, &grads).unwrap_err(), err);
            assert!(!opt.is_perturbed(), "{err}");
            close(&tensors, &t0, 1e-14).unwrap();
            assert!(same_state(opt.state(), &s0), "{err}");
        }
        opt.perturb(&mut tensors).unwrap();
        assert_eq!(opt.step(&mut tensors, &good).unwrap().step, s0.step + 1);
    }
}

/// In adapter space W0 is never written, so it may be left out (or given
/// and left untouched); in weight space a W0 registered for in-place
/// perturbation is required, and is moved and restored.
#[test]
fn w0_is_optional_in_adapter_space_and_required_in_weight_space() {
    let layout = layout();
    let n = layout.tensors().len();
    let run = |with_w0: bool| trained(Config::paper_nlu(1e-2), with_w0).1;
    let (without, with) = (run(false), run(true));
    assert!(without[..] == with[..n], "giving W0 changed the adapter-space result");
    assert!(with[n..] == tensors_of(&layout)[n..], "adapter space wrote W0");

    let (mut opt, with) = trained(Config::trainer_nlu(1e-2), true);
    assert_eq!(opt.config().space, Space::Weight);
    let s0 = opt.state().clone();
    let mut t = with[..n].to_vec();
    assert_eq!(opt.perturb(&mut t).unwrap_err(), MgpoError::MissingTensor("q.w0".into()));
    assert_eq!(opt.step(&mut t, &grads_at(&with, n, 2)).unwrap_err(), MgpoError::MissingTensor("q.w0".into()));
    assert!(t[..] == with[..n] && !opt.is_perturbed() && same_state(opt.state(), &s0));

    let mut t = with.clone();
    opt.perturb(&mut t).unwrap();
    assert!(t[..n] == with[..n] && t[n..] != with[n..], "weight space must move W0 only");
    let g = grads_at(&t, n, 2);
    opt.step(&mut t, &g).unwrap();
    close(&t[n..], &with[n..], 1e-14).unwrap();
}

/// `last_report` is `None` before the first step, then the report of the
/// last step that returned `Ok` (a skipped one included); a failed step
/// leaves it as it was.
#[test]
fn last_report_is_the_last_successful_step() {
    let layout = layout();
    let n = layout.tensors().len();
    let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), Config::paper_nlu(1e-2), layout.clone()).unwrap();
    let mut t = tensors_of(&layout)[..n].to_vec();
    assert!(opt.last_report().is_none());

    opt.perturb(&mut t).unwrap();
    let g = grads_at(&t, n, 0);
    let first = opt.step(&mut t, &g).unwrap();
    assert_eq!((first.step, first.skipped, first.lr), (1, false, 1e-2));
    assert_eq!(opt.last_report(), Some(&first));

    opt.set_lr(5e-3).unwrap();
    opt.perturb(&mut t).unwrap();
    let g = grads_at(&t, n - 1, 1);
    assert!(opt.step(&mut t, &g).is_err());
    assert_eq!(opt.last_report(), Some(&first), "a failed step replaced the report");

    opt.perturb(&mut t).unwrap();
    let mut g = grads_at(&t, n, 1);
    g[2].1[[1, 0]] = f64::NAN;
    let skipped = opt.step(&mut t, &g).unwrap();
    assert!(skipped.skipped && skipped.step == 1 && skipped.skipped_total == 1);
    // its gradient norms are NaN, so compare the printed reports
    assert_eq!(format!("{:?}", opt.last_report()), format!("{:?}", Some(&skipped)));

    opt.perturb(&mut t).unwrap();
    let g = grads_at(&t, n, 2);
    let second = opt.step(&mut t, &g).unwrap();
    assert_eq!((second.step, second.skipped, second.lr), (2, false, 5e-3));
    assert!(second.groups[0].perturbation_norm > 0.0);
    assert_eq!(opt.last_report(), Some(&second));
}

/// An invalid learning rate is refused by `set_lr` itself, and the rate in
/// force stays: the next step runs with it, bit for bit as an optimizer
/// that never saw the bad value.
#[test]
fn set_lr_refuses_invalid_rates_at_once() {
    let (mut opt, mut t) = trained(Config::paper_nlu(1e-2), false);
    let (mut twin, mut twin_t) = trained(Config::paper_nlu(1e-2), false);
    opt.set_lr(3e-3).unwrap();
    twin.set_lr(3e-3).unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1e-3] {
        match opt.set_lr(bad) {
            Err(MgpoError::InvalidConfig { field: "lr", value, .. }) => assert_eq!(value, bad.to_string()),
            other => panic!("set_lr({bad}) gave {other:?}"),
        }
        assert_eq!((opt.lr(), opt.config().adamw.lr), (3e-3, 3e-3));
    }
    for (o, t) in [(&mut opt, &mut t), (&mut twin, &mut twin_t)] {
        o.perturb(t).unwrap();
        let g = grads_at(t, 5, 2);
        assert_eq!(o.step(t, &g).unwrap().lr, 3e-3);
    }
    assert!(t == twin_t && same_state(opt.state(), twin.state()));

    // lr = 0 is valid: a step then moves nothing but the moments.
    opt.set_lr(0.0).unwrap();
    let before = t.clone();
    opt.perturb(&mut t).unwrap();
    let g = grads_at(&t, 5, 3);
    assert_eq!(opt.step(&mut t, &g).unwrap().lr, 0.0);
    close(&t, &before, 1e-14).unwrap();
}

/// `Layout::names`: every trainable tensor in registration order (adapters'
/// A and B and plain tensors interleaved as registered), then the W0 of each
/// adapter registered with one, in adapter order. The optimizer takes its
/// tensors in exactly that order and refuses any other.
#[test]
fn names_are_trainable_tensors_in_registration_order_then_w0s() {
    let layout = Layout::builder()
        .adapter("q", 8.0, &[2, 3], &[4, 2], true)
        .plain("head.weight", &[3, 4])
        .adapter("v", 4.0, &[1, 3], &[4, 1], false)
        .adapter("k", 2.0, &[2, 3], &[4, 2], true)
        .plain("head.bias", &[3])
        .build()
        .unwrap();
    let names: Vec<&str> = layout.names().collect();
    assert_eq!(names, ["q.a", "q.b", "head.weight", "v.a", "v.b", "k.a", "k.b", "head.bias", "q.w0", "k.w0"]);

    let n = layout.tensors().len();
    let mut opt = MgpoOptimizer::<f64>::new(NdBackend::new(), Config::trainer_nlu(1e-2), layout.clone()).unwrap();
    let mut t = tensors_of(&layout);
    assert!(t.iter().map(|x| x.0.as_str()).eq(names.iter().copied()));
    for k in 0..3 {
        opt.perturb(&mut t).unwrap();
        let g = grads_at(&t, n, k);
        assert!(!opt.step(&mut t, &g).unwrap().skipped);
    }
    let mut sorted = t.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(opt.perturb(&mut sorted).unwrap_err(), mismatch(0, "q.a", "head.bias"));
}
