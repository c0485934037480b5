//! The tch backend's operations one by one: the AdamW chain against
//! `mgpo_core::backend::adamw_element`, the low-rank helpers against explicit
//! products, in-place updates that leave variables as autograd leaves, and
//! typed errors for bad input.

use mgpo_core::backend::{adamw_element, AdamWStep, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::MgpoError;
use mgpo_tch::{cpu_f32, cpu_f64, TchBackend};
use tch::{Device, Kind, Tensor};

/// Deterministic values in (-scale, scale), with a few exact zeros.
fn data(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if i % 17 == 5 {
                0.0
            } else {
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            }
        })
        .collect()
}

fn steps() -> Vec<AdamWStep> {
    let mk = |unperturb: f64, lr: f64, wd: f64, grad_scale: f64, t: i32, beta1: f64, beta2: f64| AdamWStep {
        unperturb,
        decay: 1.0 - lr * wd,
        grad_scale,
        beta1,
        beta2,
        step_size: lr / (1.0 - beta1.powi(t)),
        bias2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
        eps: 1e-8,
    };
    vec![
        mk(0.0, 1e-3, 0.0, 1.0, 1, 0.9, 0.999),
        mk(0.37, 1e-2, 0.1, 0.25, 3, 0.9, 0.999),
        mk(-1.5, 0.5, 0.01, 1.0, 7, 0.3, 0.5),
        mk(2.0, 0.0, 0.0, 0.0, 2, 0.0, 0.0),
    ]
}

/// adamw_element on one element (p, g, m, v) in the backend's float type.
type Element = fn(f64, f64, f64, f64, &AdamWStep) -> (f64, f64, f64);

fn element_f64(p: f64, g: f64, m: f64, v: f64, k: &AdamWStep) -> (f64, f64, f64) {
    let (mut p, mut m, mut v) = (p, m, v);
    adamw_element(&mut p, g, &mut m, &mut v, &k.consts::<f64>());
    (p, m, v)
}

fn element_f32(p: f64, g: f64, m: f64, v: f64, k: &AdamWStep) -> (f64, f64, f64) {
    let (mut p, mut m, mut v) = (p as f32, m as f32, v as f32);
    adamw_element(&mut p, g as f32, &mut m, &mut v, &k.consts::<f32>());
    (p as f64, m as f64, v as f64)
}

/// One AdamW call on tch against adamw_element in the same float type.
fn check_adamw(be: &TchBackend, tol: f64, element: Element) {
    let n = 203;
    for (si, k) in steps().iter().enumerate() {
        let (p0, g0, m0) = (data(n, 1 + si as u64, 1.0), data(n, 11 + si as u64, 3.0), data(n, 21 + si as u64, 0.5));
        let v0: Vec<f64> = data(n, 31 + si as u64, 0.2).iter().map(|x| x * x).collect();
        let mut p = be.from_f64(&[7, 29], &p0).unwrap();
        let g = be.from_f64(&[7, 29], &g0).unwrap();
        let mut m = be.from_f64(&[7, 29], &m0).unwrap();
        let mut v = be.from_f64(&[7, 29], &v0).unwrap();
        let msq = be.adamw(&mut p, &g, &mut m, &mut v, k).unwrap();

        let (mut ep, mut em, mut ev) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let (pp, mm, vv) = element(p0[i], g0[i], m0[i], v0[i], k);
            ep.push(pp);
            em.push(mm);
            ev.push(vv);
        }
        for (what, got, want) in [("p", be.to_f64(&p).unwrap(), ep), ("m", be.to_f64(&m).unwrap(), em), ("v", be.to_f64(&v).unwrap(), ev)] {
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!((x - y).abs() <= tol * (1.0 + y.abs()), "step {si} {what}[{i}]: tch {x:e} vs adamw_element {y:e}");
            }
        }
        // The returned sum of squares is of the new m as stored, in f64.
        let want_sq: f64 = be.to_f64(&m).unwrap().iter().map(|x| x * x).sum();
        assert!((msq - want_sq).abs() <= 1e-12 * (1.0 + want_sq), "sum m^2 {msq} vs {want_sq}");
    }
}

#[test]
fn adamw_matches_adamw_element_f64() {
    check_adamw(&cpu_f64(), 1e-14, element_f64);
}

#[test]
fn adamw_matches_adamw_element_f32() {
    check_adamw(&cpu_f32(), 1e-6, element_f32);
}

#[test]
fn sum_sq_accumulates_in_f64() {
    // 2^24 + 1 ones squared: an f32 accumulator would stop at 2^24.
    let n = (1 << 24) + 1;
    let t = Tensor::ones([n], (Kind::Float, Device::Cpu));
    assert_eq!(cpu_f32().sum_sq(&t).unwrap(), n as f64);
    // Squares that overflow f32 are finite in f64.
    let t = cpu_f32().from_f64(&[2], &[1e30, -1e30]).unwrap();
    assert_eq!(cpu_f32().sum_sq(&t).unwrap(), 2.0 * (1e30f32 as f64).powi(2));
    assert!(cpu_f32().all_finite(&t).unwrap());
}

#[test]
fn non_finite_entries_are_seen() {
    let be = cpu_f64();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let t = be.from_f64(&[2, 2], &[1.0, bad, 3.0, 4.0]).unwrap();
        assert!(!be.sum_sq(&t).unwrap().is_finite());
        assert!(!be.all_finite(&t).unwrap());
    }
    assert!(be.all_finite(&be.from_f64(&[1], &[f64::MAX]).unwrap()).unwrap());
}

#[test]
fn axpy_and_low_rank_match_explicit_products() {
    let be = cpu_f64();
    let (out, inp, r) = (5, 7, 3);
    let mk = |rows: usize, cols: usize, seed| be.from_f64(&[rows, cols], &data(rows * cols, seed, 1.0)).unwrap();
    let (p, q, rr, s) = (mk(out, r, 1), mk(r, inp, 2), mk(out, r, 3), mk(r, inp, 4));
    let mut w = mk(out, inp, 5);
    let want = &w + (p.mm(&q) + rr.mm(&s)) * 0.3;
    be.add_low_rank(&mut w, 0.3, &p, &q, &rr, &s).unwrap();
    assert!(w.allclose(&want, 1e-14, 1e-14, false));

    let gc = be.gram_cols(&p, &rr).unwrap();
    let want = Vec::<f64>::try_from(&p.tr().mm(&rr).reshape([-1])).unwrap();
    assert_eq!(gc.len(), r * r);
    gc.iter().zip(&want).for_each(|(a, b)| assert!((a - b).abs() < 1e-14));
    let gr = be.gram_rows(&q, &s).unwrap();
    let want = Vec::<f64>::try_from(&q.mm(&s.tr()).reshape([-1])).unwrap();
    gr.iter().zip(&want).for_each(|(a, b)| assert!((a - b).abs() < 1e-14));

    let mut y = mk(out, r, 6);
    let want = &y + &p * -2.5;
    be.axpy(&mut y, -2.5, &p).unwrap();
    assert!(y.allclose(&want, 1e-15, 1e-15, false));
}

/// The updates write the variable's own storage, record nothing in the
/// graph, and leave it a leaf that still requires grad.
#[test]
fn updates_are_in_place_on_autograd_leaves() {
    let be = cpu_f32();
    let p = be.from_f64(&[3, 4], &data(12, 1, 1.0)).unwrap().set_requires_grad(true);
    let mut handle = p.shallow_clone();
    let ptr = p.data_ptr();
    let g = be.from_f64(&[3, 4], &data(12, 2, 1.0)).unwrap();
    let mut m = be.zeros_like(&p).unwrap();
    let mut v = be.zeros_like(&p).unwrap();
    assert!(!m.requires_grad() && !v.requires_grad());
    let before = Vec::<f32>::try_from(&p.detach().reshape([-1])).unwrap();
    be.adamw(&mut handle, &g, &mut m, &mut v, &steps()[1]).unwrap();
    be.axpy(&mut handle, 0.5, &m).unwrap();
    let after = Vec::<f32>::try_from(&p.detach().reshape([-1])).unwrap();
    assert_ne!(before, after, "the caller's tensor must change");
    assert_eq!(p.data_ptr(), ptr);
    assert!(p.requires_grad() && p.is_leaf(), "still a trainable leaf");
    // A forward pass through the updated variable still differentiates.
    let loss = (&p * &p).sum(Kind::Float);
    loss.backward();
    assert!(p.grad().allclose(&(&p.detach() * 2.0), 1e-6, 1e-6, false));
}

#[test]
fn bad_input_is_a_typed_error() {
    let be = cpu_f32();
    let backend_err = |r: mgpo_core::Result<()>| match r {
        Err(MgpoError::Backend(msg)) => msg,
        other => panic!("expected a backend error, got {other:?}"),
    };
    let a = be.from_f64(&[2, 3], &[0.0; 6]).unwrap();
    let mut y = be.from_f64(&[3, 2], &[0.0; 6]).unwrap();
    // Same element count, other shape: libtorch would not broadcast, but a
    // [1, 2] x would; both are refused.
    assert!(backend_err(be.axpy(&mut y, 1.0, &a)).contains("shapes differ"));
    let row = be.from_f64(&[1, 2], &[1.0, 2.0]).unwrap();
    assert!(backend_err(be.axpy(&mut y, 1.0, &row)).contains("shapes differ"));
    // Mixed dtypes.
    let d = cpu_f64().from_f64(&[3, 2], &[0.0; 6]).unwrap();
    assert!(backend_err(be.axpy(&mut y, 1.0, &d)).contains("Double"));
    // Integer tensors.
    let mut i = Tensor::zeros([3, 2], (Kind::Int64, Device::Cpu));
    assert!(backend_err(be.axpy(&mut i, 1.0, &y)).contains("f32 and f64"));
    // AdamW with a wrong-shaped moment.
    let (mut p, g, mut m) = (y.copy(), y.copy(), y.copy());
    let mut v = a.copy();
    assert!(be.adamw(&mut p, &g, &mut m, &mut v, &steps()[0]).is_err());
    // Low-rank products that do not fit W, and non-matrices.
    let mut w = be.from_f64(&[3, 3], &[0.0; 9]).unwrap();
    let p = be.from_f64(&[3, 2], &[0.0; 6]).unwrap();
    let q = be.from_f64(&[2, 4], &[0.0; 8]).unwrap();
    assert!(backend_err(be.add_low_rank(&mut w, 1.0, &p, &q, &p, &q)).contains("does not fit"));
    let v1 = be.from_f64(&[6], &[0.0; 6]).unwrap();
    assert!(be.gram_cols(&v1, &v1).is_err());
    assert!(be.gram_rows(&p, &q).is_err());
    // Host data of the wrong length, undefined tensors, unsupported kinds.
    assert!(be.from_f64(&[2, 2], &[1.0; 3]).is_err());
    assert!(be.from_f64(&[usize::MAX, 2], &[]).is_err());
    assert!(be.sum_sq(&Tensor::new()).is_err());
    assert!(TchBackend::new(Device::Cpu, Kind::Half).is_err());
    assert!(TchBackend::new(Device::Cpu, Kind::Double).is_ok());
}

#[test]
fn host_round_trip_and_shapes() {
    for be in [cpu_f32(), cpu_f64()] {
        let x = data(24, 9, 1.0);
        let t = be.from_f64(&[2, 3, 4], &x).unwrap();
        assert_eq!(be.shape(&t), vec![2, 3, 4]);
        assert_eq!(t.kind(), be.kind());
        let back = be.to_f64(&t).unwrap();
        back.iter().zip(&x).for_each(|(a, b)| assert!((a - b).abs() <= 1e-7 * b.abs()));
        let z = be.zeros_like(&t).unwrap();
        assert_eq!(be.to_f64(&z).unwrap(), vec![0.0; 24]);
        assert_eq!(be.shape(&Tensor::new()), Vec::<usize>::new());
    }
}
