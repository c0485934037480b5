//! The LoRA layer: peft's initialisation, scaling and dropout, merge and
//! unmerge, and the factored weight-space perturbation, which must train
//! exactly as perturbing W0 in place would while leaving W0 bit-identical.

use mgpo_core::{Config, LoraConfig, LoraInit, MgpoError};
use mgpo_tch::{is_target, LoraLinear, MgpoOptimizer};
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

/// Deterministic values (no global seed: tests run in parallel).
fn det(shape: &[i64], seed: f64, scale: f64, kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| scale * ((i as f64 + 1.0) * seed).sin()).collect();
    Tensor::from_slice(&v).reshape(shape).to_kind(kind)
}

fn bits(t: &Tensor) -> Vec<u64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).reshape([-1])).unwrap().iter().map(|x| x.to_bits()).collect()
}

fn f64_store() -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    vs
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn peft_initialisation_and_scaling() {
    let vs = nn::VarStore::new(Device::Cpu);
    let (out, inp, r) = (24, 100, 8);
    let w0 = det(&[out, inp], 0.37, 0.2, Kind::Float);
    let layer = LoraLinear::from_pretrained(&w0, None, &LoraConfig::new(r as usize, 16.0), &(vs.root() / "attn" / "q")).unwrap();
    let ad = layer.adapter().unwrap();
    assert_eq!(ad.name(), "attn.q");
    assert_eq!(ad.scale(), 2.0);
    assert_eq!(ad.rank(), 8);
    assert_eq!(ad.a().size(), vec![r, inp]);
    assert_eq!(ad.b().size(), vec![out, r]);
    // A ~ U(-1/sqrt(in), 1/sqrt(in)): inside the bound, and spread over it.
    let bound = 1.0 / (inp as f64).sqrt();
    let amax = ad.a().abs().max().double_value(&[]);
    assert!(amax <= bound && amax > 0.9 * bound, "max |A| {amax} vs bound {bound}");
    let std = ad.a().std(true).double_value(&[]);
    assert!((std - bound / 3f64.sqrt()).abs() < 0.1 * bound, "std {std}");
    assert_eq!(ad.b().abs().sum(Kind::Double).double_value(&[]), 0.0);
    // Variables: A and B trainable, W0 a frozen variable of the store.
    let vars = vs.variables();
    assert!(vars["attn.q.lora_a"].requires_grad() && vars["attn.q.lora_b"].requires_grad());
    assert!(!vars["attn.q.base.weight"].requires_grad());
    assert_eq!(vs.trainable_variables().len(), 2);
    // A fresh adapter leaves the base output unchanged.
    let x = det(&[3, inp], 0.11, 1.0, Kind::Float);
    assert_eq!(bits(&layer.forward(&x)), bits(&x.matmul(&w0.tr())));

    let rs = LoraConfig::new(4, 8.0).rslora();
    let layer = LoraLinear::from_pretrained(&w0, None, &rs, &(vs.root() / "rs")).unwrap();
    assert_eq!(layer.adapter().unwrap().scale(), 4.0);
}

#[test]
fn gaussian_initialisation_as_peft() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w0 = det(&[16, 400], 0.37, 0.2, Kind::Float);
    let cfg = LoraConfig::new(4, 8.0).init(LoraInit::Gaussian);
    let layer = LoraLinear::from_pretrained(&w0, None, &cfg, &(vs.root() / "g")).unwrap();
    let ad = layer.adapter().unwrap();
    // A ~ N(0, 1/r^2): 1600 draws with standard deviation 0.25.
    let (mean, std) = (ad.a().mean(Kind::Double).double_value(&[]), ad.a().std(true).double_value(&[]));
    assert!(mean.abs() < 0.03 && (std - 0.25).abs() < 0.02, "mean {mean}, std {std}");
    assert!(ad.a().abs().max().double_value(&[]) > 0.5, "a Gaussian, not U(-1/sqrt(in), 1/sqrt(in)) (bound 0.05)");
    assert_eq!(ad.b().abs().sum(Kind::Double).double_value(&[]), 0.0);
}

#[test]
fn forward_is_base_plus_scaled_low_rank() {
    let vs = f64_store();
    let w0 = det(&[5, 7], 0.3, 0.5, Kind::Double);
    let b0 = det(&[5], 0.9, 0.1, Kind::Double);
    let layer = LoraLinear::from_pretrained(&w0, Some(&b0), &LoraConfig::new(3, 4.5), &(vs.root() / "l")).unwrap();
    let ad = layer.adapter().unwrap();
    tch::no_grad(|| ad.b().shallow_clone().copy_(&det(&[5, 3], 0.7, 0.3, Kind::Double)));
    let x = det(&[2, 4, 7], 0.21, 1.0, Kind::Double); // batched input
    let want = x.matmul(&w0.tr()) + &b0 + x.matmul(&ad.a().tr()).matmul(&ad.b().tr()) * 1.5;
    assert!(max_diff(&layer.forward(&x), &want) < 1e-14);
}

#[test]
fn dropout_only_on_the_adapter_input_and_only_in_training() {
    let vs = f64_store();
    let w0 = det(&[6, 50], 0.3, 0.5, Kind::Double);
    let cfg = LoraConfig { dropout: 0.5, ..LoraConfig::new(4, 4.0) };
    let layer = LoraLinear::from_pretrained(&w0, None, &cfg, &(vs.root() / "l")).unwrap();
    let x = det(&[8, 50], 0.17, 1.0, Kind::Double);
    let base = x.matmul(&w0.tr());
    // B = 0: whatever dropout does to the adapter input, the base path is untouched.
    assert!(layer.is_training());
    assert_eq!(bits(&layer.forward(&x)), bits(&base));

    let ad = layer.adapter().unwrap();
    tch::no_grad(|| ad.b().shallow_clone().copy_(&det(&[6, 4], 0.7, 0.3, Kind::Double)));
    let clean = &base + x.matmul(&ad.a().tr()).matmul(&ad.b().tr());
    let (t1, t2) = (layer.forward(&x), layer.forward(&x));
    assert!(max_diff(&t1, &clean) > 1e-3, "training mode must drop adapter inputs");
    assert!(max_diff(&t1, &t2) > 1e-6, "two training passes draw different masks");
    assert!(max_diff(&layer.forward_t(&x, false), &clean) < 1e-13);
    layer.set_training(false);
    assert!(max_diff(&layer.forward(&x), &clean) < 1e-13);
    assert_eq!(bits(&layer.forward(&x)), bits(&layer.forward(&x)));
}

#[test]
fn merge_and_unmerge_keep_w0_exact() {
    let vs = f64_store();
    let w0 = det(&[5, 7], 0.3, 0.5, Kind::Double);
    let b0 = det(&[5], 0.9, 0.1, Kind::Double);
    let mut layer = LoraLinear::from_pretrained(&w0, Some(&b0), &LoraConfig::new(2, 2.0), &(vs.root() / "l")).unwrap();
    tch::no_grad(|| layer.adapter().unwrap().b().shallow_clone().copy_(&det(&[5, 2], 0.7, 0.3, Kind::Double)));
    let w0_bits = bits(&layer.base().ws);
    let x = det(&[3, 7], 0.21, 1.0, Kind::Double);
    let unmerged = layer.forward(&x);
    layer.merge().unwrap();
    assert!(layer.is_merged());
    assert!(max_diff(&layer.forward(&x), &unmerged) < 1e-14);
    let ad = layer.adapter().unwrap();
    assert!(max_diff(&layer.merged_weight().unwrap(), &(&w0 + ad.b().mm(ad.a()))) < 1e-15);
    layer.unmerge();
    assert!(!layer.is_merged());
    assert_eq!(bits(&layer.base().ws), w0_bits);
    assert_eq!(bits(&layer.forward(&x)), bits(&unmerged));
    let merged = layer.into_merged().unwrap();
    assert!(max_diff(&merged.forward(&x), &unmerged) < 1e-14);
}

#[test]
fn invalid_layers_are_typed_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w0 = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
    for cfg in [LoraConfig::new(0, 1.0), LoraConfig::new(2, f64::NAN), LoraConfig { dropout: 1.0, ..LoraConfig::new(2, 1.0) }] {
        let e = LoraLinear::from_pretrained(&w0, None, &cfg, &vs.root()).unwrap_err();
        assert!(matches!(e, MgpoError::InvalidConfig { .. }), "{e}");
    }
    let base = nn::Linear { ws: w0.copy(), bs: None };
    let a = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
    let e = LoraLinear::from_parts(base, "x", a, b, 1.0, 0.0).unwrap_err();
    assert!(matches!(e, MgpoError::AdapterShape { .. }), "{e}");
    let base = nn::Linear { ws: w0.copy(), bs: None };
    let a = Tensor::zeros([2, 3], (Kind::Double, Device::Cpu));
    let b = Tensor::zeros([4, 2], (Kind::Double, Device::Cpu));
    assert!(LoraLinear::from_parts(base, "x", a, b, 1.0, 0.0).is_err());
    let base = nn::Linear { ws: Tensor::zeros([4], (Kind::Float, Device::Cpu)), bs: None };
    assert!(LoraLinear::new(base, &LoraConfig::new(2, 1.0), &vs.root()).is_err());
}

#[test]
fn frozen_layer_is_the_base_layer() {
    let w0 = det(&[3, 4], 0.5, 1.0, Kind::Float).set_requires_grad(true);
    let layer = LoraLinear::frozen(nn::Linear { ws: w0.shallow_clone(), bs: None });
    assert!(!w0.requires_grad(), "the base weight is frozen");
    assert!(layer.adapter().is_none());
    let x = det(&[2, 4], 0.3, 1.0, Kind::Float);
    assert_eq!(bits(&layer.forward(&x)), bits(&x.matmul(&w0.tr())));
    let opt = MgpoOptimizer::for_lora([&layer], Config::default());
    assert_eq!(opt.unwrap_err(), MgpoError::Empty);
}

#[test]
fn target_names_as_peft() {
    assert!(is_target("model.layers.0.q_proj", &["q_proj", "v_proj"]));
    assert!(is_target("q_proj", &["q_proj"]));
    assert!(!is_target("model.layers.0.qq_proj", &["q_proj"]));
    assert!(is_target("a.b.c", &["b.c"]));
}

/// Two layers over the same W0, A and B: one perturbed in factored form by
/// its LoraLinear, one whose W0 the optimizer perturbs in place.
#[test]
fn factored_weight_perturbation_trains_as_the_in_place_one_and_never_writes_w0() {
    let (out, inp, r, s) = (6i64, 5i64, 2i64, 4.0);
    let config = Config::trainer_nlu(5e-2);
    let w0 = det(&[out, inp], 0.3, 0.5, Kind::Double);
    let a0 = det(&[r, inp], 0.77, 0.4, Kind::Double);
    let b0 = det(&[out, r], 0.41, 0.4, Kind::Double);
    let x = det(&[10, inp], 0.13, 1.0, Kind::Double);
    let y = det(&[10, out], 0.29, 1.0, Kind::Double);

    // Factored: a LoraLinear registered with .lora().
    let vs = f64_store();
    let layer = LoraLinear::from_pretrained(&w0, None, &LoraConfig::new(r as usize, s * r as f64), &(vs.root() / "l")).unwrap();
    let ad = layer.adapter().unwrap();
    tch::no_grad(|| {
        ad.a().shallow_clone().copy_(&a0);
        ad.b().shallow_clone().copy_(&b0);
    });
    let w0_bits = bits(&layer.base().ws);
    let mut opt = MgpoOptimizer::for_lora([&layer], config).unwrap();

    // In place: W0 is a tensor the optimizer perturbs.
    let w0_ip = w0.copy();
    let a_ip = a0.copy().set_requires_grad(true);
    let b_ip = b0.copy().set_requires_grad(true);
    let mut opt_ip = MgpoOptimizer::builder(config).adapter_with_w0("l", &a_ip, &b_ip, &w0_ip, s).build().unwrap();
    let forward_ip = || x.matmul(&w0_ip.tr()) + x.matmul(&a_ip.tr()).matmul(&b_ip.tr()) * s;

    let mut perturbed_steps = 0;
    for step in 1..=12 {
        opt.zero_grad();
        opt_ip.zero_grad();
        opt.perturb().unwrap();
        opt_ip.perturb().unwrap();
        let coef = ad.slot().with(|p| p.map(|p| p.coef));
        if step > 1 {
            assert!(coef.is_some_and(|c| c != 0.0), "step {step}: the layer must hold the perturbation");
            perturbed_steps += 1;
        }
        let (ya, yb) = (layer.forward(&x), forward_ip());
        assert!(max_diff(&ya, &yb) < 1e-12, "step {step}: perturbed outputs differ");
        ya.mse_loss(&y, Reduction::Mean).backward();
        yb.mse_loss(&y, Reduction::Mean).backward();
        let (ra, rb) = (opt.step().unwrap(), opt_ip.step().unwrap());
        assert!(ad.slot().with(|p| p.is_none()), "the slot is cleared by step");
        assert!((ra.groups[0].perturbation_norm - rb.groups[0].perturbation_norm).abs() < 1e-12);
        assert!(max_diff(ad.a(), &a_ip) < 1e-11 && max_diff(ad.b(), &b_ip) < 1e-11, "step {step}: A, B differ");
        assert_eq!(bits(&layer.base().ws), w0_bits, "step {step}: W0 was written");
    }
    assert_eq!(perturbed_steps, 11);
    // The in-place W0 came back only within rounding; the factored one is exact.
    assert!(max_diff(&w0_ip, &w0) < 1e-13);
}
