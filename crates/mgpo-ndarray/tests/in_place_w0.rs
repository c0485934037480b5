//! In place (W0 handed to the optimizer) the weight-space perturbation is
//! added and subtracted, so W0 returns only within rounding.

use mgpo_core::{Config, Layout};
use mgpo_ndarray::{MgpoOptimizer, NdBackend};
use ndarray::{ArrayD, IxDyn};

/// In place (W0 given to the optimizer) W0 comes back only within rounding:
/// the drift over 10,000 steps stays at the level of f32 rounding noise.
#[test]
fn in_place_w0_drift_stays_at_rounding_level() {
    let (r, fan_in, fan_out) = (4, 48, 32);
    let layout = Layout::builder().adapter("q", 8.0, &[r, fan_in], &[fan_out, r], true).build().unwrap();
    assert_eq!(layout.names().collect::<Vec<_>>(), ["q.a", "q.b", "q.w0"]);
    let mut opt = MgpoOptimizer::<f32>::new(NdBackend::new(), Config::trainer_nlu(1e-3), layout).unwrap();
    let w0 = ArrayD::from_shape_fn(IxDyn(&[fan_out, fan_in]), |d| ((d[0] * 31 + d[1] * 7) % 19) as f32 / 19.0 - 0.5);
    let mut tensors = vec![("q.a", ArrayD::from_elem(IxDyn(&[r, fan_in]), 0.05f32)), ("q.b", ArrayD::zeros(IxDyn(&[fan_out, r]))), ("q.w0", w0.clone())];
    let mut grads: Vec<(&str, ArrayD<f32>)> = tensors[..2].iter().map(|(n, p)| (*n, p.mapv(|_| 0.0))).collect();
    let mut moved = 0.0f32;
    for step in 1..=10_000u64 {
        opt.perturb(&mut tensors).unwrap();
        moved = moved.max(tensors[2].1.iter().zip(w0.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
        for (k, (_, g)) in grads.iter_mut().enumerate() {
            let phase = (step as f32 * 0.37 + k as f32).sin();
            g.iter_mut().enumerate().for_each(|(j, x)| *x = phase * (1.0 + (j % 5) as f32) * 0.1);
        }
        opt.step(&mut tensors, &grads).unwrap();
    }
    let drift = tensors[2].1.iter().zip(w0.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("in-place W0: largest perturbation {moved:e}, max drift after 10,000 steps {drift:e}");
    assert!(moved > 1e-3, "W0 was never perturbed (largest move {moved})");
    assert!(drift < 1e-4, "W0 drifted by {drift}");
}
