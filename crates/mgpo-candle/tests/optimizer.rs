//! The optimizer wrapper: `candle_nn::Optimizer` behaviour, AdamW
//! equivalence with `candle_nn::AdamW`, registration, parameter groups,
//! checkpoints and error handling, and the in-place backend operations on
//! candle tensors.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use mgpo_candle::{cpu_f32, cpu_f64, CandleBackend, MgpoOptimizer};
use mgpo_core::backend::{materialise_is_cheaper, noise, AdamWStep, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{is_bias_or_norm, AdamWConfig, CheckpointError, Config, LoraConfig, MgpoError, ParamGroup, Space};

mod common;
use common::{det, values, var};

/// A loss whose gradient changes with the parameters: sum (v - t)^2 + 0.1 sum v^3.
fn loss(vars: &[Var], dtype: DType) -> Tensor {
    let mut total = Tensor::zeros((), dtype, &Device::Cpu).unwrap();
    for (i, v) in vars.iter().enumerate() {
        let t = Tensor::from_vec(det(v.elem_count(), 100 + i as u64), v.shape(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let sq = v.as_tensor().sub(&t).unwrap().sqr().unwrap().sum_all().unwrap();
        let cube = v.as_tensor().powf(3.0).unwrap().sum_all().unwrap().affine(0.1, 0.0).unwrap();
        total = (total + sq + cube).unwrap();
    }
    total
}

fn adamw_equivalence(dtype: DType, tol: f64) {
    let shapes: [&[usize]; 3] = [&[5, 3], &[4], &[2, 6]];
    let mk = || shapes.iter().enumerate().map(|(i, s)| var(s, i as u64, dtype)).collect::<Vec<_>>();
    let (v1, v2) = (mk(), mk());
    let p = ParamsAdamW { lr: 0.05, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.01 };
    let mut reference = AdamW::new(v1.clone(), p.clone()).unwrap();
    let cfg = Config::adamw(AdamWConfig { lr: p.lr, beta1: p.beta1, beta2: p.beta2, eps: p.eps, weight_decay: p.weight_decay });
    let mut ours = <MgpoOptimizer as Optimizer>::new(v2.clone(), cfg).unwrap();
    for step in 0..20 {
        reference.backward_step(&loss(&v1, dtype)).unwrap();
        Optimizer::backward_step(&mut ours, &loss(&v2, dtype)).unwrap();
        for (a, b) in v1.iter().zip(&v2) {
            for (x, y) in values(a).iter().zip(values(b)) {
                assert!((x - y).abs() <= tol * (1.0 + x.abs()), "step {step}: candle_nn::AdamW {x} vs MGPO(rho=0) {y}");
            }
        }
        // The two must actually be moving.
        assert_ne!(values(&v2[0]), det(15, 0).iter().map(|&x| x as f32 as f64).collect::<Vec<_>>());
    }
    assert_eq!(ours.state().step, 20);
    assert_eq!(Optimizer::learning_rate(&ours), 0.05);
}

#[test]
fn rho_zero_matches_candle_nn_adamw_f64() {
    adamw_equivalence(DType::F64, 1e-12);
}

#[test]
fn rho_zero_matches_candle_nn_adamw_f32() {
    adamw_equivalence(DType::F32, 2e-5);
}

#[test]
fn a_missing_gradient_is_an_error_and_leaves_parameters_clean() {
    let (a, b) = (var(&[3, 2], 1, DType::F64), var(&[2], 2, DType::F64));
    let mut opt = <MgpoOptimizer as Optimizer>::new(vec![a.clone(), b.clone()], Config::paper_nlu(0.1)).unwrap();
    // Two complete steps give the optimizer a momentum, so perturb moves a and b.
    for _ in 0..2 {
        opt.perturb().unwrap();
        opt.step(&loss(&[a.clone(), b.clone()], DType::F64).backward().unwrap()).unwrap();
    }
    let (a0, b0) = (values(&a), values(&b));
    opt.perturb().unwrap();
    assert_ne!(values(&a), a0, "perturb moved nothing");
    let only_a = loss(std::slice::from_ref(&a), DType::F64).backward().unwrap();
    let e = opt.step(&only_a).unwrap_err();
    assert_eq!(e, MgpoError::MissingGradient("param1".into()));
    assert!(!opt.is_perturbed());
    for (x, y) in values(&a).iter().zip(&a0).chain(values(&b).iter().zip(&b0)) {
        assert!((x - y).abs() < 1e-15, "{x} vs clean {y}");
    }
    assert_eq!(opt.state().step, 2);
}

#[test]
fn an_invalid_learning_rate_is_refused_at_once() {
    let a = var(&[3], 1, DType::F32);
    let grads = || loss(std::slice::from_ref(&a), DType::F32).backward().unwrap();
    let mut opt = <MgpoOptimizer as Optimizer>::new(vec![a.clone()], Config::paper_nlu(0.1)).unwrap();
    for bad in [f64::NAN, -1e-3, f64::INFINITY] {
        let e = opt.set_lr(bad).unwrap_err();
        assert!(matches!(e, MgpoError::InvalidConfig { field: "lr", .. }), "{e}");
        assert_eq!(opt.lr(), 0.1);
    }
    // The trait cannot return the error: the rate stays, the next step reports it and changes nothing.
    Optimizer::set_learning_rate(&mut opt, f64::NAN);
    assert_eq!(Optimizer::learning_rate(&opt), 0.1);
    let before = values(&a);
    opt.perturb().unwrap();
    let e = opt.step(&grads()).unwrap_err();
    assert!(matches!(e, MgpoError::InvalidConfig { field: "lr", .. }), "{e}");
    assert!(!opt.is_perturbed());
    assert_eq!((values(&a), opt.state().step), (before, 0));
    opt.step(&grads()).unwrap();
    // A valid rate given to the trait withdraws a refused one.
    Optimizer::set_learning_rate(&mut opt, -1.0);
    Optimizer::set_learning_rate(&mut opt, 0.2);
    assert_eq!(opt.lr(), 0.2);
    assert!(Optimizer::step(&mut opt, &grads()).is_ok());
    assert_eq!(opt.state().step, 2);
}

#[test]
fn registration_errors_are_typed() {
    let (a, b) = (var(&[2, 3], 1, DType::F32), var(&[4, 2], 2, DType::F32));
    let e = MgpoOptimizer::builder(Config::default()).adapter("q", &a, &b, 2.0).plain("again", &a).build().unwrap_err();
    assert_eq!(e, MgpoError::DuplicateName("again".into()));
    let e = MgpoOptimizer::builder(Config::default()).adapter("q", &a, &a, 2.0).build().unwrap_err();
    assert!(matches!(e, MgpoError::DuplicateName(_) | MgpoError::AdapterShape { .. }), "{e}");
    let e = MgpoOptimizer::builder(Config::default()).adapter("q", &b, &b, 2.0).build().unwrap_err();
    assert!(matches!(e, MgpoError::DuplicateName(_) | MgpoError::AdapterShape { .. }), "{e}");
    // A square A given as B too would fit every shape: refused by identity.
    let sq = var(&[2, 2], 4, DType::F32);
    let e = MgpoOptimizer::builder(Config::default()).adapter("q", &sq, &sq, 1.0).build().unwrap_err();
    assert_eq!(e, MgpoError::DuplicateName("q.b".into()));
    // A view of a registered variable shares its storage: refused as well.
    let flat = var(&[8], 5, DType::F32);
    let w0 = flat.as_tensor().reshape((4, 2)).unwrap();
    let a2 = var(&[2, 2], 6, DType::F32);
    let e = MgpoOptimizer::builder(Config::default()).plain("flat", &flat).adapter_with_w0("q", &a2, &b, &w0, 1.0).build().unwrap_err();
    assert_eq!(e, MgpoError::DuplicateName("q.w0".into()));
    let c = var(&[2, 3], 3, DType::F64);
    let e = MgpoOptimizer::builder(Config::default()).plain("x", &a).plain("y", &c).build().unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    assert_eq!(MgpoOptimizer::builder(Config::default()).build().unwrap_err(), MgpoError::Empty);
    assert!(<MgpoOptimizer as Optimizer>::new(vec![], Config::default()).is_err());
    let bad = Config { rho: -1.0, ..Config::default() };
    assert!(matches!(MgpoOptimizer::builder(bad).plain("x", &a).build().unwrap_err(), MgpoError::InvalidConfig { .. }));
}

#[test]
fn a_varmap_gives_adapters_by_path_and_the_rest_as_plain_tensors() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
    vb.pp("q").get((2, 5), "lora_a").unwrap();
    vb.pp("q").get((3, 2), "lora_b").unwrap();
    vb.get((3, 3), "head").unwrap();
    let opt = MgpoOptimizer::builder(Config::default()).varmap(&vm, &["q"], &LoraConfig::new(2, 4.0)).build().unwrap();
    let names: Vec<_> = opt.layout().tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["q.a", "q.b", "head"]);
    // alpha 4 over rank 2.
    assert_eq!(opt.layout().adapters()[0].scale, 2.0);
    let opt = MgpoOptimizer::builder(Config::default()).varmap(&vm, &["q"], &LoraConfig::new(2, 4.0).rslora()).build().unwrap();
    assert_eq!(opt.layout().adapters()[0].scale, 4.0 / 2f64.sqrt());
    let e = MgpoOptimizer::builder(Config::default()).varmap(&vm, &["k"], &LoraConfig::new(2, 1.0)).build().unwrap_err();
    assert_eq!(e, MgpoError::UnknownName("k.lora_a".into()));
    let e = MgpoOptimizer::builder(Config::default()).varmap(&vm, &["q"], &LoraConfig::new(3, 1.0)).build().unwrap_err();
    assert!(matches!(&e, MgpoError::AdapterShape { name, .. } if name == "q"), "{e}");
}

/// In weight space with W0 given to the optimizer, `perturb` writes W0 in
/// place and `step` takes the perturbation out again.
#[test]
fn the_in_place_w0_path_restores_w0_within_rounding() {
    let (a, b) = (var(&[2, 5], 1, DType::F64), var(&[4, 2], 2, DType::F64));
    let w0 = Tensor::from_vec(det(20, 3), (4, 5), &Device::Cpu).unwrap();
    let w_init = values(&w0);
    let mut cfg = Config::trainer_nlu(0.05);
    cfg.rho = 0.5;
    assert_eq!(cfg.space, Space::Weight);
    let mut opt = MgpoOptimizer::builder(cfg).adapter_with_w0("q", &a, &b, &w0, 2.0).build().unwrap();
    let x = Tensor::from_vec(det(30, 4), (6, 5), &Device::Cpu).unwrap();
    let mut moved = false;
    for _ in 0..5 {
        opt.perturb().unwrap();
        moved |= values(&w0) != w_init;
        let y = (x.matmul(&w0.t().unwrap()).unwrap()
            + x.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&b.as_tensor().t().unwrap()).unwrap().affine(2.0, 0.0).unwrap())
        .unwrap();
        let l = y.sqr().unwrap().sum_all().unwrap();
        opt.step(&l.backward().unwrap()).unwrap();
        for (p, q) in values(&w0).iter().zip(&w_init) {
            assert!((p - q).abs() <= 1e-14 * (1.0 + q.abs()), "W0 {p} vs initial {q}");
        }
    }
    assert!(moved, "W0 was never perturbed");
}

fn step_consts() -> AdamWStep {
    AdamWStep { unperturb: 0.1, decay: 0.99, grad_scale: 0.5, beta1: 0.9, beta2: 0.999, step_size: 0.01, bias2_sqrt: 0.3, eps: 1e-8 }
}

#[test]
fn aliased_tensors_are_refused_not_deadlocked() {
    for be in [cpu_f32(), cpu_f64()] {
        let mut p = be.from_f64(&[2, 3], &det(6, 1)).unwrap();
        let g = be.from_f64(&[2, 3], &det(6, 2)).unwrap();
        let mut v = be.zeros_like(&p).unwrap();
        let mut m = p.clone();
        let e = be.adamw(&mut p, &g, &mut m, &mut v, &step_consts()).unwrap_err();
        assert!(e.to_string().contains("share"), "{e}");
        let view = p.reshape((3, 2)).unwrap().reshape((2, 3)).unwrap();
        assert!(be.axpy(&mut p, 1.0, &view).is_err());
        let mut w = be.from_f64(&[3, 3], &det(9, 3)).unwrap();
        let q = be.from_f64(&[1, 3], &det(3, 4)).unwrap();
        let wv = w.narrow(0, 0, 3).unwrap().narrow(1, 0, 1).unwrap();
        assert!(be.add_low_rank(&mut w, 1.0, &wv, &q, &wv, &q).is_err());
    }
}

/// Gradients of transposed weights come out as strided views; the fused
/// kernels read them as the same values.
#[test]
fn strided_gradients_are_read_by_value() {
    let be = cpu_f32();
    let gt = be.from_f64(&[3, 2], &det(6, 2)).unwrap().t().unwrap();
    assert!(!gt.is_contiguous());
    let g = gt.contiguous().unwrap();
    let run = |g: &Tensor| {
        let mut p = be.from_f64(&[2, 3], &det(6, 1)).unwrap();
        let mut m = be.from_f64(&[2, 3], &det(6, 5)).unwrap();
        let mut v = be.from_f64(&[2, 3], &det(6, 6)).unwrap().abs().unwrap();
        let sq = be.adamw(&mut p, g, &mut m, &mut v, &step_consts()).unwrap();
        (values(&p), values(&m), values(&v), sq)
    };
    assert_eq!(run(&gt), run(&g));
    assert_eq!(be.sum_sq(&gt).unwrap(), be.sum_sq(&g).unwrap());
}

/// The fused CPU pass and the tensor-op chain compute the same update.
#[test]
fn fused_and_tensor_op_paths_agree() {
    for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
        let fused = CandleBackend::cpu(dtype);
        let chain = CandleBackend { cpu_kernels: false, ..fused.clone() };
        let mk = |be: &CandleBackend, s| be.from_f64(&[7, 9], &det(63, s)).unwrap();
        let run = |be: &CandleBackend| {
            let (mut p, g, mut m) = (mk(be, 1), mk(be, 2), mk(be, 3));
            let mut v = mk(be, 4).abs().unwrap();
            let sq = be.adamw(&mut p, &g, &mut m, &mut v, &step_consts()).unwrap();
            be.axpy(&mut p, -0.3, &g).unwrap();
            let mut w = mk(be, 5);
            let (pp, q) = (be.from_f64(&[7, 2], &det(14, 6)).unwrap(), be.from_f64(&[2, 9], &det(18, 7)).unwrap());
            let (r, s) = (be.from_f64(&[7, 2], &det(14, 8)).unwrap(), be.from_f64(&[2, 9], &det(18, 9)).unwrap());
            be.add_low_rank(&mut w, 0.7, &pp, &q, &r, &s).unwrap();
            let grams = [be.gram_cols(&pp, &r).unwrap(), be.gram_rows(&q, &s).unwrap()].concat();
            (values(&p), values(&m), values(&v), values(&w), grams, sq, be.sum_sq(&w).unwrap())
        };
        let (a, b) = (run(&fused), run(&chain));
        let close = |x: &[f64], y: &[f64]| x.iter().zip(y).all(|(p, q)| (p - q).abs() <= tol * (1.0 + q.abs()));
        assert!(close(&a.0, &b.0) && close(&a.1, &b.1) && close(&a.2, &b.2) && close(&a.3, &b.3), "{dtype:?}");
        assert!(close(&a.4, &b.4) && close(&[a.5, a.6], &[b.5, b.6]), "{dtype:?}");
    }
}

#[test]
fn reductions_accumulate_in_f64_and_see_non_finite_values() {
    let be = cpu_f32();
    // 2^24 + 1 is not an f32; accumulated in f32 the ones below would vanish.
    let mut data = vec![4096.0; 1];
    data.extend(std::iter::repeat_n(1.0, 4096));
    let t = be.from_f64(&[data.len()], &data).unwrap();
    assert_eq!(be.sum_sq(&t).unwrap(), 4096.0 * 4096.0 + 4096.0);
    let t = be.from_f64(&[3], &[1.0, f64::INFINITY, 0.0]).unwrap();
    assert!(!be.sum_sq(&t).unwrap().is_finite());
    assert!(!be.all_finite(&t).unwrap());
    assert!(be.all_finite(&be.from_f64(&[2], &[1.0, -2.0]).unwrap()).unwrap());
    assert!(be.from_f64(&[2, 2], &[1.0]).is_err());
}

#[test]
fn shape_and_dtype_mismatches_are_errors() {
    let (f, d) = (cpu_f32(), cpu_f64());
    let mut y = f.from_f64(&[2, 2], &[1.0; 4]).unwrap();
    assert!(f.axpy(&mut y, 1.0, &f.from_f64(&[4], &[1.0; 4]).unwrap()).is_err());
    assert!(f.axpy(&mut y, 1.0, &d.from_f64(&[2, 2], &[1.0; 4]).unwrap()).is_err());
    assert!(f.gram_cols(&y, &f.from_f64(&[4], &[1.0; 4]).unwrap()).is_err());
    let mut w = f.from_f64(&[2, 3], &[0.0; 6]).unwrap();
    let p = f.from_f64(&[2, 1], &[1.0; 2]).unwrap();
    assert!(f.add_low_rank(&mut w, 1.0, &p, &p, &p, &p).is_err());
}

/// A run saved and resumed from a checkpoint continues exactly as the
/// uninterrupted run.
#[test]
fn a_checkpoint_resumes_exactly() {
    let dir = std::env::temp_dir().join(format!("mgpo-candle-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    for dtype in [DType::F32, DType::F64] {
        let mk = || (var(&[2, 5], 1, dtype), var(&[4, 2], 2, dtype), var(&[3], 3, dtype));
        let build = |(a, b, h): &(Var, Var, Var)| {
            MgpoOptimizer::builder(Config::trainer_nlu(0.05)).adapter("q", a, b, 2.0).plain("h", h).build().unwrap()
        };
        let run = |opt: &mut MgpoOptimizer, v: &(Var, Var, Var), n: usize| {
            for _ in 0..n {
                opt.perturb().unwrap();
                let l = loss(&[v.0.clone(), v.1.clone(), v.2.clone()], dtype);
                opt.step(&l.backward().unwrap()).unwrap();
            }
        };
        let (v1, v2) = (mk(), mk());
        let mut straight = build(&v1);
        run(&mut straight, &v1, 6);
        let mut first = build(&v2);
        run(&mut first, &v2, 3);
        first.save_checkpoint(&path).unwrap();
        drop(first);
        let mut resumed = build(&v2);
        resumed.load_checkpoint(&path).unwrap();
        assert_eq!(resumed.state().step, 3);
        run(&mut resumed, &v2, 3);
        for (x, y) in [(&v1.0, &v2.0), (&v1.1, &v2.1), (&v1.2, &v2.2)] {
            assert_eq!(values(x), values(y), "{dtype:?}: resumed run differs");
        }
        assert_eq!(straight.state().g_bar, resumed.state().g_bar);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The weight-space norm formed as a product (small layer, high rank) and
/// through Grams (large layer) agree with the materialised f64 norm, on the
/// fused CPU kernels and on the tensor-op path.
#[test]
fn low_rank_norm_sq_matches_its_definition_in_both_regimes() {
    for (out, inp, r) in [(6usize, 5usize, 8usize), (40, 30, 2)] {
        assert_eq!(materialise_is_cheaper(out, inp, r), r == 8);
        let (p, q, rr, s) = (det(out * r, 1), det(r * inp, 2), det(out * r, 3), det(r * inp, 4));
        let mut want = 0.0;
        for o in 0..out {
            for i in 0..inp {
                let d: f64 = (0..r).map(|k| p[o * r + k] * q[k * inp + i] + rr[o * r + k] * s[k * inp + i]).sum();
                want += d * d;
            }
        }
        for (be, tol) in [(cpu_f64(), 1e-12), (cpu_f32(), 1e-5), (CandleBackend { cpu_kernels: false, ..cpu_f64() }, 1e-12)] {
            let t = |v: &[f64], shape: &[usize]| be.from_f64(shape, v).unwrap();
            let got = be.low_rank_norm_sq(&t(&p, &[out, r]), &t(&q, &[r, inp]), &t(&rr, &[out, r]), &t(&s, &[r, inp])).unwrap();
            assert!((got - want).abs() <= tol * want, "{out}x{inp} r {r}: {got} vs {want}");
        }
        let be = cpu_f64();
        let bad = be.low_rank_norm_sq(&be.from_f64(&[out, r], &p).unwrap(), &be.from_f64(&[r + 1, inp], &det((r + 1) * inp, 2)).unwrap(), &be.from_f64(&[out, r], &rr).unwrap(), &be.from_f64(&[r, inp], &s).unwrap());
        assert!(matches!(bad, Err(MgpoError::Backend(_))));
    }
}

/// The Gaussian direction is drawn in place on the CPU, element i getting
/// y_i + f32(alpha * gaussian(seed, i)), as every CPU backend; the device
/// path (noise made on the host) agrees to rounding.
#[test]
fn gaussian_axpy_is_drawn_in_place_with_the_reference_bits() {
    let (n, alpha, seed) = (70_000usize, 0.3, 99u64);
    let y0 = det(n, 5);
    let want: Vec<f32> = y0.iter().enumerate().map(|(i, &y)| y as f32 + (alpha * noise::gaussian(seed, i as u64)) as f32).collect();
    for be in [cpu_f32(), CandleBackend { par_threshold: usize::MAX, ..cpu_f32() }] {
        let mut y = be.from_f64(&[n], &y0).unwrap();
        be.axpy_noise(&mut y, alpha, seed).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), want);
    }
    let be = CandleBackend { cpu_kernels: false, ..cpu_f32() };
    let mut y = be.from_f64(&[n], &y0).unwrap();
    be.axpy_noise(&mut y, alpha, seed).unwrap();
    assert!(y.to_vec1::<f32>().unwrap().iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())));
}

/// Two adapters of one shape registered in the other order are other
/// tensors: a checkpoint of one optimizer is refused by the other, with an
/// error naming them, and the refused load changes nothing.
#[test]
fn a_checkpoint_of_swapped_same_shape_adapters_is_refused() {
    let path = std::env::temp_dir().join(format!("mgpo-candle-swap-{}.safetensors", std::process::id()));
    let (qa, qb, va, vb) = (var(&[2, 5], 1, DType::F32), var(&[4, 2], 2, DType::F32), var(&[2, 5], 3, DType::F32), var(&[4, 2], 4, DType::F32));
    let all = [qa.clone(), qb.clone(), va.clone(), vb.clone()];
    let mut saved = MgpoOptimizer::builder(Config::paper_nlu(0.05)).adapter("q", &qa, &qb, 2.0).adapter("v", &va, &vb, 2.0).build().unwrap();
    for _ in 0..2 {
        saved.training_step(|| Ok(loss(&all, DType::F32))).unwrap();
    }
    saved.save_checkpoint(&path).unwrap();
    let mut swapped = MgpoOptimizer::builder(Config::paper_nlu(0.05)).adapter("v", &va, &vb, 2.0).adapter("q", &qa, &qb, 2.0).build().unwrap();
    let e = swapped.load_checkpoint(&path).unwrap_err();
    match &e {
        MgpoError::Checkpoint(CheckpointError::LayoutMismatch(msg)) => assert!(msg.contains("\"q.a\", \"q.b\", \"v.a\"") && msg.contains("\"v.a\", \"v.b\", \"q.a\""), "{msg}"),
        other => panic!("expected a layout mismatch, got {other}"),
    }
    assert_eq!(swapped.state().step, 0);
    assert!(swapped.state().moments.is_empty());
    // Registered in the same order, it loads.
    let mut same = MgpoOptimizer::builder(Config::paper_nlu(0.05)).adapter("q", &qa, &qb, 2.0).adapter("v", &va, &vb, 2.0).build().unwrap();
    same.load_checkpoint(&path).unwrap();
    assert_eq!(same.state().step, 2);
    std::fs::remove_file(&path).unwrap();
}

/// Parameter groups change AdamW's hyper-parameters of exactly their
/// tensors: with no-decay on biases and LayerNorm weights and a half
/// learning rate on one B, each tensor ends bit-identical to a run with its
/// group's settings for every tensor. The loss is a sum of one term per
/// tensor and rho = 0, so no tensor's update depends on another's.
#[test]
fn parameter_groups_change_exactly_their_tensors() {
    let shapes: [(&str, &[usize]); 5] = [("q.a", &[2, 5]), ("q.b", &[4, 2]), ("head.weight", &[3, 4]), ("head.bias", &[3]), ("encoder.LayerNorm.weight", &[4])];
    let adamw = |lr: f64, weight_decay: f64| Config::adamw(AdamWConfig { lr, weight_decay, ..AdamWConfig::default() });
    let run = |config: Config, groups: bool| -> Vec<Vec<f64>> {
        let vars: Vec<Var> = shapes.iter().enumerate().map(|(i, (_, s))| var(s, i as u64, DType::F64)).collect();
        let mut b = MgpoOptimizer::builder(config).adapter("q", &vars[0], &vars[1], 2.0);
        for (v, (name, _)) in vars.iter().zip(&shapes).skip(2) {
            b = b.plain(name, v);
        }
        if groups {
            b = b.param_group(ParamGroup::new("slow").lr_scale(0.5), &["q.b"]).param_group_where(ParamGroup::no_decay(), is_bias_or_norm);
        }
        let mut opt = b.build().unwrap();
        for _ in 0..8 {
            opt.training_step(|| Ok(loss(&vars, DType::F64))).unwrap();
        }
        if groups {
            let group_of: Vec<usize> = opt.layout().tensors().iter().map(|t| t.param_group).collect();
            assert_eq!(group_of, [0, 1, 0, 2, 2]);
        }
        vars.iter().map(|v| values(v)).collect()
    };
    let grouped = run(adamw(0.05, 0.1), true);
    let (decay, no_decay, slow) = (run(adamw(0.05, 0.1), false), run(adamw(0.05, 0.0), false), run(adamw(0.025, 0.1), false));
    let want = [&decay[0], &slow[1], &decay[2], &no_decay[3], &no_decay[4]];
    for ((got, want), (name, _)) in grouped.iter().zip(want).zip(&shapes) {
        assert_eq!(got, want, "{name}");
    }
    // The settings differ enough to tell the groups apart.
    assert_ne!(decay[3], no_decay[3]);
    assert_ne!(decay[1], slow[1]);
}

/// A loss closure that fails leaves the tensors clean and the state as it was.
#[test]
fn a_failed_loss_in_training_step_leaves_the_tensors_clean() {
    let (a, b) = (var(&[3, 2], 1, DType::F64), var(&[2], 2, DType::F64));
    let both = [a.clone(), b.clone()];
    let mut opt = MgpoOptimizer::builder(Config::paper_nlu(0.1)).plain("a", &a).plain("b", &b).build().unwrap();
    for _ in 0..2 {
        opt.training_step(|| Ok(loss(&both, DType::F64))).unwrap();
    }
    let before = (values(&a), values(&b));
    let e = opt.training_step(|| a.as_tensor().matmul(b.as_tensor())).unwrap_err();
    assert!(matches!(e, MgpoError::Backend(_)), "{e}");
    assert!(!opt.is_perturbed());
    assert_eq!((values(&a), values(&b)), before);
    assert_eq!(opt.state().step, 2);
    assert!(format!("{opt:?}").contains(r#"tensors: ["a", "b"], step: 2, perturbed: false"#));
}
