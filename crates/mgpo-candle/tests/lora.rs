//! The LoRA layer: peft's initialisation and scaling, dropout, merging,
//! wrapping an existing model's layers, and training with MGPO (the
//! factored weight-space perturbation leaves W0 bit-identical, the loss at
//! the perturbed point differs from the clean one, the loss goes down,
//! gradient accumulation equals the whole batch).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use mgpo_candle::{is_target, wrap_linears, LoraLinear, MgpoOptimizer};
use mgpo_core::{Config, LoraConfig, LoraInit, Space, WarmupCosine};

mod common;
use common::{tensor, values};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    values(a).iter().zip(values(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// A layer over a base of shape out x in with a bias, adapter "q".
fn layer(out: usize, inp: usize, cfg: &LoraConfig, dtype: DType) -> (LoraLinear, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let base = Linear::new(tensor(&[out, inp], 1, dtype), Some(tensor(&[out], 2, dtype)));
    (LoraLinear::new(base, cfg, vb.pp("q")).unwrap(), vm)
}

#[test]
fn initialisation_is_peft_s() {
    let (l, vm) = layer(6, 25, &LoraConfig::new(4, 8.0), DType::F32);
    let ad = l.adapter().unwrap();
    assert_eq!(ad.name, "q");
    assert_eq!(ad.a.dims(), [4, 25]);
    assert_eq!(ad.b.dims(), [6, 4]);
    // kaiming_uniform_(a = sqrt 5) on fan_in 25: U(-1/5, 1/5).
    let a = values(ad.a.as_tensor());
    assert!(a.iter().all(|x| x.abs() <= 0.2), "A outside U(-0.2, 0.2)");
    assert!(a.iter().any(|x| x.abs() > 0.1), "A is not spread over its bound");
    assert!(values(ad.b.as_tensor()).iter().all(|&x| x == 0.0));
    assert_eq!(ad.scale, 2.0);
    assert_eq!(LoraConfig::new(4, 8.0).rslora().scale(), 4.0);
    // B = 0: the fresh layer is the base layer, exactly.
    let x = tensor(&[3, 25], 9, DType::F32);
    assert_eq!(values(&l.forward(&x).unwrap()), values(&l.base().forward(&x).unwrap()));
    let mut names: Vec<_> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["q.lora_a", "q.lora_b"]);
    // The layer's variables are the map's: an update through one is seen through the other.
    let mapped = vm.data().lock().unwrap()["q.lora_b"].clone();
    ad.b.set(&tensor(&[6, 4], 3, DType::F32)).unwrap();
    assert_eq!(values(mapped.as_tensor()), values(ad.b.as_tensor()));
}

/// peft's `init_lora_weights="gaussian"`: A ~ N(0, 1/r^2).
#[test]
fn gaussian_initialisation_has_standard_deviation_one_over_r() {
    let cfg = LoraConfig::new(4, 8.0).init(LoraInit::Gaussian);
    let (l, _vm) = layer(6, 2000, &cfg, DType::F64);
    let a = values(l.adapter().unwrap().a.as_tensor());
    let mean = a.iter().sum::<f64>() / a.len() as f64;
    let sd = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    // 8000 draws: the sample sd is within 3% of 1/4 with overwhelming probability.
    assert!((sd - 0.25).abs() < 0.0075 && mean.abs() < 0.01, "mean {mean}, sd {sd}");
    assert!(a.iter().any(|x| x.abs() > 0.5), "no tail: not a Gaussian");
}

#[test]
fn bad_configurations_are_refused() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let base = || Linear::new(tensor(&[3, 4], 1, DType::F32), None);
    assert!(LoraLinear::new(base(), &LoraConfig::new(0, 1.0), vb.pp("a")).is_err());
    assert!(LoraLinear::new(base(), &LoraConfig { dropout: 1.0, ..LoraConfig::new(2, 1.0) }, vb.pp("b")).is_err());
    assert!(LoraLinear::new(base(), &LoraConfig::new(2, f64::NAN), vb.pp("c")).is_err());
    let a = Var::from_tensor(&tensor(&[2, 5], 3, DType::F32)).unwrap();
    let b = Var::from_tensor(&tensor(&[3, 2], 4, DType::F32)).unwrap();
    assert!(LoraLinear::from_parts(base(), "d", a, b, 1.0, 0.0).is_err());
}

/// Forward = base(x) + s B A x with the base output unscaled, for batched
/// (3-D) input too; merged and unmerged agree with s != 1.
#[test]
fn forward_merge_and_unmerge_agree() {
    for rslora in [false, true] {
        let cfg = LoraConfig { rslora, ..LoraConfig::new(3, 7.0) };
        let (mut l, _vm) = layer(5, 4, &cfg, DType::F64);
        let ad = l.adapter().unwrap().clone();
        ad.b.set(&tensor(&[5, 3], 5, DType::F64)).unwrap();
        let s = ad.scale;
        assert!(s != 1.0);
        let x = tensor(&[2, 6, 4], 6, DType::F64);
        let y = l.forward(&x).unwrap();
        // By hand: x W0^T + bias + s x A^T B^T.
        let w0 = l.base().weight().clone();
        let ba = ad.b.as_tensor().matmul(ad.a.as_tensor()).unwrap();
        let want = (x.broadcast_matmul(&w0.t().unwrap()).unwrap().broadcast_add(l.base().bias().unwrap()).unwrap()
            + x.broadcast_matmul(&ba.t().unwrap()).unwrap().affine(s, 0.0).unwrap())
        .unwrap();
        assert!(max_diff(&y, &want) < 1e-12, "forward is not base(x) + s B A x");
        let w0_bits = values(&w0);
        l.merge().unwrap();
        assert!(l.is_merged());
        assert!(max_diff(&l.forward(&x).unwrap(), &y) < 1e-12, "merged forward differs");
        l.unmerge();
        assert_eq!(values(l.base().weight()), w0_bits, "unmerge did not restore W0 exactly");
        assert_eq!(values(&l.forward(&x).unwrap()), values(&y));
        let merged = l.clone().into_merged().unwrap();
        assert!(max_diff(&merged.forward(&x).unwrap(), &y) < 1e-12);
    }
}

#[test]
fn dropout_applies_to_the_adapter_input_in_training_only() {
    let cfg = LoraConfig { dropout: 0.5, ..LoraConfig::new(2, 2.0) };
    let (l, _vm) = layer(4, 64, &cfg, DType::F32);
    let x = tensor(&[8, 64], 7, DType::F32);
    let base = l.base().forward(&x).unwrap();
    // B = 0: dropout on the adapter input cannot reach the output.
    assert_eq!(values(&l.forward_t(&x, true).unwrap()), values(&base));
    l.adapter().unwrap().b.set(&tensor(&[4, 2], 8, DType::F32)).unwrap();
    let (e1, e2) = (l.forward_t(&x, false).unwrap(), l.forward_t(&x, false).unwrap());
    assert_eq!(values(&e1), values(&e2), "evaluation must be deterministic");
    let (t1, t2) = (l.forward_t(&x, true).unwrap(), l.forward_t(&x, true).unwrap());
    assert!(max_diff(&t1, &t2) > 1e-3, "training forward shows no dropout");
    assert!(max_diff(&t1, &e1) > 1e-3);
    // Module::forward follows the layer's mode.
    l.set_training(false);
    assert_eq!(values(&l.forward(&x).unwrap()), values(&e1));
    l.set_training(true);
    assert!(l.is_training());
}

#[test]
fn wrap_linears_adds_adapters_to_the_chosen_layers_only() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let lin = |s| Linear::new(tensor(&[3, 3], s, DType::F32), None);
    let model = vec![
        ("layers.0.q_proj".to_string(), lin(1)),
        ("layers.0.k_proj".to_string(), lin(2)),
        ("layers.0.v_proj".to_string(), lin(3)),
        ("head".to_string(), lin(4)),
    ];
    let wrapped = wrap_linears(model, &["q_proj", "v_proj"], &LoraConfig::new(2, 4.0), &vb).unwrap();
    let with: Vec<_> = wrapped.iter().map(|(n, l)| (n.as_str(), l.adapter().is_some())).collect();
    assert_eq!(with, [("layers.0.q_proj", true), ("layers.0.k_proj", false), ("layers.0.v_proj", true), ("head", false)]);
    assert_eq!(wrapped[0].1.adapter().unwrap().name, "layers.0.q_proj");
    assert_eq!(vm.all_vars().len(), 4);
    assert!(is_target("q_proj", &["q_proj"]) && !is_target("xq_proj", &["q_proj"]));
    let opt = MgpoOptimizer::for_lora(wrapped.iter().map(|(_, l)| l), Config::default()).unwrap();
    assert_eq!(opt.layout().adapters().len(), 2);
}

/// Regression target: y = x (W0 + delta)^T + bias with a rank-2 delta.
fn regression(dtype: DType) -> (Tensor, Tensor) {
    let x = tensor(&[64, 10], 20, dtype);
    let u = tensor(&[6, 2], 21, dtype);
    let v = tensor(&[2, 10], 22, dtype);
    let w = (tensor(&[6, 10], 1, dtype) + u.matmul(&v).unwrap()).unwrap();
    let y = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&tensor(&[6], 2, dtype)).unwrap();
    (x, y)
}

fn mse(l: &LoraLinear, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::mse(&l.forward(x)?, y)
}

/// MGPO fine-tunes a LoRA layer on the regression problem, in the paper's
/// setting (adapter space) and the trainer's (weight space, factored), with
/// the paper's warm-up + cosine schedule.
#[test]
fn training_with_mgpo_reduces_the_loss() {
    for dtype in [DType::F32, DType::F64] {
        for (name, cfg) in [("paper-nlu", Config::paper_nlu(2e-2)), ("trainer-nlu", Config::trainer_nlu(2e-2))] {
            let (l, _vm) = layer(6, 10, &LoraConfig::new(4, 8.0), dtype);
            // candle's CPU generator cannot be seeded: a fixed A (within
            // the Kaiming bound 1/sqrt(10)) makes the run reproducible.
            l.adapter().unwrap().a.set(&tensor(&[4, 10], 30, dtype).affine(0.3, 0.0).unwrap()).unwrap();
            let (x, y) = regression(dtype);
            let mut opt = MgpoOptimizer::for_lora([&l], cfg).unwrap();
            let first = mse(&l, &x, &y).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let schedule = WarmupCosine::paper(2e-2, 300);
            for k in 0..300 {
                opt.set_lr(schedule.lr_at(k)).unwrap();
                let (_, rep) = opt.training_step(|| mse(&l, &x, &y)).unwrap();
                assert!(!rep.skipped);
            }
            let last = mse(&l, &x, &y).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!(last < 0.05 * first, "{name} {dtype:?}: loss {first} -> {last}");
        }
    }
}

/// In weight space the layer adds the perturbation in factored form: W0
/// (and the bias) are never written, bit for bit, while the loss at the
/// perturbed point differs from the clean one.
#[test]
fn weight_space_leaves_w0_bit_identical() {
    let (l, _vm) = layer(6, 10, &LoraConfig::new(4, 8.0), DType::F32);
    let (x, y) = regression(DType::F32);
    let mut cfg = Config::trainer_nlu(1e-2);
    cfg.rho = 0.5;
    assert_eq!(cfg.space, Space::Weight);
    let mut opt = MgpoOptimizer::for_lora([&l], cfg).unwrap();
    let (w0, bias) = (values(l.base().weight()), values(l.base().bias().unwrap()));
    let mut perturbed_steps = 0;
    for _ in 0..25 {
        opt.perturb().unwrap();
        let p = l.adapter().unwrap().slot.with(|p| p.cloned());
        let perturbed = mse(&l, &x, &y).unwrap();
        if let Some(p) = &p {
            perturbed_steps += 1;
            assert!(p.coef < 0.0, "descent: coef {}", p.coef);
            let fp = opt.weight_perturbation("q").unwrap().unwrap();
            assert_eq!(fp.coef, p.coef);
        }
        opt.step(&perturbed.backward().unwrap()).unwrap();
        assert!(l.adapter().unwrap().slot.with(|p| p.cloned()).is_none(), "perturbation left after step");
        assert_eq!(values(l.base().weight()), w0);
        assert_eq!(values(l.base().bias().unwrap()), bias);
    }
    assert_eq!(perturbed_steps, 24, "every step after the first is perturbed");
}

/// The factored weight-space path computes the same training run as the
/// in-place one (W0 given to the optimizer and perturbed in place).
#[test]
fn factored_and_in_place_weight_space_paths_agree() {
    let dtype = DType::F64;
    let (l, _vm) = layer(6, 10, &LoraConfig::new(3, 6.0), dtype);
    let ad = l.adapter().unwrap();
    let (x, y) = regression(dtype);
    // The same adapter by hand, with its own W0 copy that the optimizer perturbs in place.
    let w0 = l.base().weight().copy().unwrap();
    let bias = l.base().bias().unwrap().clone();
    let a2 = Var::from_tensor(&ad.a.as_tensor().copy().unwrap()).unwrap();
    let b2 = Var::from_tensor(&ad.b.as_tensor().copy().unwrap()).unwrap();
    let mut cfg = Config::trainer_nlu(1e-2);
    cfg.rho = 0.3;
    let mut factored = MgpoOptimizer::for_lora([&l], cfg).unwrap();
    let mut in_place = MgpoOptimizer::builder(cfg).adapter_with_w0("q", &a2, &b2, &w0, ad.scale).build().unwrap();
    let by_hand = || -> candle_core::Result<Tensor> {
        let h = (x.matmul(&w0.t()?)?.broadcast_add(&bias)?
            + x.matmul(&a2.as_tensor().t()?)?.matmul(&b2.as_tensor().t()?)?.affine(ad.scale, 0.0)?)?;
        candle_nn::loss::mse(&h, &y)
    };
    for k in 0..15 {
        let (lf, _) = factored.training_step(|| mse(&l, &x, &y)).unwrap();
        let (li, _) = in_place.training_step(by_hand).unwrap();
        assert!(max_diff(&lf, &li) < 1e-10, "step {k}: perturbed losses differ");
        assert!(max_diff(ad.a.as_tensor(), a2.as_tensor()) < 1e-10, "step {k}: A differs");
        assert!(max_diff(ad.b.as_tensor(), b2.as_tensor()) < 1e-10, "step {k}: B differs");
    }
}

/// With rho > 0 the loss and the gradients at the perturbed point differ
/// from those at the clean point; with rho = 0 they are the same.
#[test]
fn the_perturbed_point_differs_from_the_clean_one() {
    for cfg in [Config::paper_nlu(1e-2), Config::trainer_nlu(1e-2), Config::adamw(Default::default())] {
        let (l, _vm) = layer(6, 10, &LoraConfig::new(4, 8.0), DType::F64);
        let (x, y) = regression(DType::F64);
        let mut opt = MgpoOptimizer::for_lora([&l], cfg).unwrap();
        for _ in 0..3 {
            opt.training_step(|| mse(&l, &x, &y)).unwrap();
        }
        let a = l.adapter().unwrap().a.clone();
        let clean = mse(&l, &x, &y).unwrap();
        let g_clean = clean.backward().unwrap().get(a.as_tensor()).unwrap().clone();
        opt.perturb().unwrap();
        let pert = mse(&l, &x, &y).unwrap();
        let g_pert = pert.backward().unwrap().get(a.as_tensor()).unwrap().clone();
        opt.unperturb().unwrap();
        let again = mse(&l, &x, &y).unwrap();
        let (dl, dg) = (max_diff(&clean, &pert), max_diff(&g_clean, &g_pert));
        assert!(max_diff(&clean, &again) < 1e-12, "unperturb did not restore the clean point");
        if cfg.rho > 0.0 {
            assert!(dl > 1e-8 && dg > 1e-8, "{:?}: loss moved {dl:e}, gradient {dg:e}", cfg.space);
        } else {
            assert_eq!((dl, dg), (0.0, 0.0));
        }
    }
}

/// Gradient accumulation: perturb once, k micro-batches at the perturbed
/// point, step once, is one step on the whole batch, in both spaces (the
/// factored weight-space perturbation stays in place for every micro-batch),
/// within the f64 conformance tolerance (rtol 1e-8, atol 1e-10).
#[test]
fn accumulated_micro_batches_equal_the_whole_batch() {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-10 + 1e-8 * y.abs();
    for cfg in [Config::paper_nlu(2e-2), Config::trainer_nlu(2e-2)] {
        let (x, y) = regression(DType::F64);
        let layers: Vec<(LoraLinear, VarMap)> = (0..2).map(|_| layer(6, 10, &LoraConfig::new(4, 8.0), DType::F64)).collect();
        for (l, _) in &layers {
            l.adapter().unwrap().a.set(&tensor(&[4, 10], 30, DType::F64).affine(0.3, 0.0).unwrap()).unwrap();
        }
        let (whole, parts) = (&layers[0].0, &layers[1].0);
        let mut big = MgpoOptimizer::for_lora([whole], cfg).unwrap();
        let mut acc = MgpoOptimizer::for_lora([parts], cfg).unwrap();
        let k = 4;
        let n = x.dims()[0] / k;
        for step in 0..6 {
            big.training_step(|| mse(whole, &x, &y)).unwrap();
            acc.perturb().unwrap();
            let mut grads = candle_core::backprop::GradStore::default();
            for i in 0..k {
                let (xi, yi) = (x.narrow(0, i * n, n).unwrap(), y.narrow(0, i * n, n).unwrap());
                let l = (mse(parts, &xi, &yi).unwrap() / k as f64).unwrap();
                acc.accumulate(&mut grads, l.backward().unwrap()).unwrap();
            }
            // Only the optimizer's tensors' gradients are kept.
            assert_eq!(grads.get_ids().count(), 2);
            let report = acc.step(&grads).unwrap();
            assert_eq!(report.groups.iter().any(|g| g.perturbation_norm > 0.0), step > 0, "{:?} step {step}", cfg.space);
            for (w, p) in [(&whole.adapter().unwrap().a, &parts.adapter().unwrap().a), (&whole.adapter().unwrap().b, &parts.adapter().unwrap().b)] {
                for (a, b) in values(p.as_tensor()).iter().zip(values(w.as_tensor())) {
                    assert!(close(*a, b), "{:?} step {step}: accumulated {a} vs whole batch {b}", cfg.space);
                }
            }
            assert_eq!(big.state().g_bar.len(), acc.state().g_bar.len());
            for (a, b) in acc.state().g_bar.iter().zip(&big.state().g_bar) {
                assert!(close(a.unwrap(), b.unwrap()));
            }
        }
        assert_ne!(values(parts.adapter().unwrap().b.as_tensor()), vec![0.0; 24], "nothing trained");
    }
}

/// A micro-batch that gives a registered tensor no gradient adds nothing
/// to it; a step whose accumulated store lacks one fails naming it.
#[test]
fn accumulation_keeps_what_it_has_and_a_missing_gradient_is_named() {
    let (l, _vm) = layer(6, 10, &LoraConfig::new(4, 8.0), DType::F64);
    let head = Var::from_tensor(&tensor(&[6], 40, DType::F64)).unwrap();
    let (x, y) = regression(DType::F64);
    let mut opt = MgpoOptimizer::builder(Config::paper_nlu(1e-2)).lora(&l).plain("head", &head).build().unwrap();
    let mut grads = candle_core::backprop::GradStore::default();
    opt.accumulate(&mut grads, mse(&l, &x, &y).unwrap().backward().unwrap()).unwrap();
    let b_grad = values(grads.get(l.adapter().unwrap().b.as_tensor()).unwrap());
    assert!(grads.get(head.as_tensor()).is_none());
    let with_head = (mse(&l, &x, &y).unwrap() + head.as_tensor().sum_all().unwrap()).unwrap();
    opt.accumulate(&mut grads, with_head.backward().unwrap()).unwrap();
    let doubled: Vec<f64> = b_grad.iter().map(|g| 2.0 * g).collect();
    assert_eq!(values(grads.get(l.adapter().unwrap().b.as_tensor()).unwrap()), doubled);
    assert_eq!(values(grads.get(head.as_tensor()).unwrap()), vec![1.0; 6]);

    opt.perturb().unwrap();
    let e = opt.step(&mse(&l, &x, &y).unwrap().backward().unwrap()).unwrap_err();
    assert_eq!(e, mgpo_core::MgpoError::MissingGradient("head".into()));
    assert!(!opt.is_perturbed());
    opt.step(&grads).unwrap();
}
