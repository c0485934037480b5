//! 10,000 steps in weight space: the frozen base weights stay bit-identical
//! (factored perturbation: the optimizer never writes them), parameters
//! stay finite, skipped steps are counted, and memory does not grow.
//! Alone in its test binary so that no other test moves the RSS.

use mgpo_core::{Config, Layout};
use mgpo_ndarray::{Element, MgpoOptimizer, NdBackend};
use ndarray::{ArrayD, IxDyn};

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

fn long_run<F: Element>() -> (u64, u64) {
    let (r, fan_in, fan_out) = (4, 48, 32);
    let layout = Layout::builder()
        .adapter("q", 8.0, &[r, fan_in], &[fan_out, r], false)
        .adapter("v", 4.0, &[2, fan_in], &[fan_out, 2], false)
        .build()
        .unwrap();
    let mut opt = MgpoOptimizer::<F>::new(NdBackend::new(), Config::trainer_nlu(1e-3), layout).unwrap();
    let f = |x: f64| F::from(x).unwrap();
    let w0: Vec<ArrayD<F>> = (0..2).map(|i| ArrayD::from_shape_fn(IxDyn(&[fan_out, fan_in]), |d| f(((d[0] * 31 + d[1] * 7 + i) % 19) as f64 / 19.0 - 0.5))).collect();
    let w0_bits: Vec<ArrayD<F>> = w0.clone();
    let mut params: Vec<(&str, ArrayD<F>)> = vec![
        ("q.a", ArrayD::from_elem(IxDyn(&[r, fan_in]), f(0.05))),
        ("q.b", ArrayD::zeros(IxDyn(&[fan_out, r]))),
        ("v.a", ArrayD::from_elem(IxDyn(&[2, fan_in]), f(-0.05))),
        ("v.b", ArrayD::zeros(IxDyn(&[fan_out, 2]))),
    ];
    let mut grads: Vec<(&str, ArrayD<F>)> = params.iter().map(|(n, p)| (*n, p.mapv(|_| f(0.0)))).collect();
    let (mut rss_1000, mut skipped) = (0, 0);
    for step in 1..=10_000u64 {
        opt.perturb(&mut params).unwrap();
        // the factored perturbation the layer would add (from step 2, once
        // there is a momentum): finite, and W0 itself untouched
        let wp = opt.weight_perturbation(0);
        assert_eq!(wp.is_some(), step > 1, "step {step}");
        if let Some(wp) = wp {
            assert!(wp.coef.is_finite() && wp.coef != 0.0, "step {step}: coefficient {}", wp.coef);
        }
        for (k, (_, g)) in grads.iter_mut().enumerate() {
            let phase = (step as f64 * 0.37 + k as f64).sin();
            g.iter_mut().enumerate().for_each(|(j, x)| *x = f(phase * (1.0 + (j % 5) as f64) * 0.1));
        }
        if step % 997 == 0 {
            grads[1].1[[0, 0]] = f(f64::NAN);
        }
        let rep = opt.step(&mut params, &grads).unwrap();
        skipped += rep.skipped as u64;
        assert_eq!(rep.skipped_total, skipped);
        if step == 1_000 {
            rss_1000 = rss_kib();
        }
    }
    assert!(params.iter().all(|(_, p)| p.iter().all(|x| x.is_finite())), "non-finite parameters");
    assert!(w0.iter().zip(&w0_bits).all(|(a, b)| a.iter().zip(b.iter()).all(|(x, y)| x.to_f64().unwrap().to_bits() == y.to_f64().unwrap().to_bits())));
    assert_eq!(opt.state().skipped, 10);
    assert_eq!(opt.state().step, 10_000 - 10);
    (rss_1000, rss_kib())
}

#[test]
fn ten_thousand_weight_space_steps() {
    for (name, (at_1000, at_10000)) in [("f32", long_run::<f32>()), ("bf16", long_run::<half::bf16>()), ("f64", long_run::<f64>())] {
        eprintln!("{name}: RSS {at_1000} KiB at step 1000, {at_10000} KiB at step 10000");
        assert!(at_10000 <= at_1000 + 64, "{name}: memory grew from {at_1000} to {at_10000} KiB");
    }
}

