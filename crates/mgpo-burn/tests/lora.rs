//! The LoRA layer: peft's init and scaling, dropout in training only,
//! merge / unmerge, and the factored weight-space perturbation, which
//! computes (W0 + eps) x without writing W0.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Distribution, Tensor};
use mgpo_burn::{ndarray_device, LoraLinear, MgpoOptimizer};
use mgpo_core::{Config, LoraConfig, MgpoError};

fn device() -> Device {
    ndarray_device().clone().autodiff()
}

fn host(t: Tensor<2>) -> Vec<f64> {
    t.try_to_vec_as::<f64>().unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn base(inp: usize, out: usize, dtype: DType) -> Linear {
    let l = LinearConfig::new(inp, out).init(&device());
    Linear { weight: Param::from_tensor(l.weight.val().inner().cast(dtype).autodiff()), bias: l.bias.map(|b| Param::from_tensor(b.val().inner().cast(dtype).autodiff())) }
}

#[test]
fn init_is_peft_kaiming_uniform_a_and_zero_b() {
    let layer = LoraLinear::new(base(64, 8, DType::F32), &LoraConfig::new(4, 8.0)).unwrap();
    let a = host(layer.lora_a.val());
    let b = host(layer.lora_b.val());
    assert_eq!(layer.lora_a.val().dims(), [4, 64]);
    assert_eq!(layer.lora_b.val().dims(), [8, 4]);
    let bound = 1.0 / 8.0;
    assert!(a.iter().all(|x| x.abs() <= bound), "A outside U(-1/sqrt(in), 1/sqrt(in))");
    assert!(a.iter().any(|x| x.abs() > 0.5 * bound), "A is not spread over its range");
    assert!(b.iter().all(|&x| x == 0.0));
    assert_eq!(layer.scale(), 2.0);
    assert_eq!(LoraConfig { rslora: true, ..LoraConfig::new(4, 8.0) }.scale(), 4.0);
    // A fresh adapter leaves the base output unchanged.
    let x = Tensor::<2>::random([3, 64], Distribution::Normal(0.0, 1.0), &device());
    assert_eq!(host(layer.forward(x.clone())), host(layer.base.forward(x)));
    // The base is frozen, the factors are trainable.
    assert!(!layer.base.weight.val().is_require_grad());
    assert!(layer.lora_a.val().is_require_grad() && layer.lora_b.val().is_require_grad());
}

#[test]
fn bad_configs_are_typed_errors() {
    for cfg in [LoraConfig::new(0, 8.0), LoraConfig::new(2, f64::NAN), LoraConfig { dropout: 1.0, ..LoraConfig::new(2, 8.0) }] {
        let e = LoraLinear::new(base(4, 3, DType::F32), &cfg).unwrap_err();
        assert!(matches!(e, MgpoError::InvalidConfig { .. }), "{e}");
    }
    let e = LoraLinear::from_parts(base(4, 3, DType::F32), Tensor::zeros([2, 5], &device()), Tensor::zeros([3, 2], &device()), 1.0, 0.0).unwrap_err();
    assert!(matches!(e, MgpoError::AdapterShape { .. }), "{e}");
}

#[test]
fn dropout_only_in_training() {
    let mut layer = LoraLinear::new(base(16, 4, DType::F32), &LoraConfig { dropout: 0.5, ..LoraConfig::new(2, 4.0) }).unwrap();
    layer.lora_b = Param::from_tensor(Tensor::ones([4, 2], &device()));
    let x = Tensor::<2>::ones([8, 16], &device());
    let (y1, y2) = (host(layer.forward(x.clone())), host(layer.forward(x.clone())));
    assert!(max_diff(&y1, &y2) > 0.0, "dropout inactive in training");
    let eval = layer.valid();
    let x = x.inner();
    assert_eq!(host(eval.forward(x.clone())), host(eval.forward(x)));
}

#[test]
fn merge_computes_the_same_and_unmerge_restores() {
    let mut layer = LoraLinear::new(base(6, 5, DType::F64), &LoraConfig::new(3, 6.0)).unwrap();
    layer.lora_b = Param::from_tensor(Tensor::random([5, 3], Distribution::Normal(0.0, 1.0), (&device(), DType::F64)));
    let x = Tensor::<2>::random([4, 6], Distribution::Normal(0.0, 1.0), (&device(), DType::F64));
    let w0 = host(layer.base.weight.val());
    let y = host(layer.forward(x.clone()));
    layer.merge();
    assert!(layer.is_merged());
    assert!(max_diff(&host(layer.forward(x.clone())), &y) < 1e-12);
    layer.unmerge();
    assert_eq!(host(layer.forward(x.clone())), y);
    assert_eq!(host(layer.base.weight.val()), w0);
    let merged = layer.into_merged();
    assert!(max_diff(&host(merged.forward(x)), &y) < 1e-12);
}

/// In weight space, between `perturb` and `step` the layer computes
/// (W0 + eps) x with eps = coef (m_B A + B m_A), which the test forms
/// explicitly; W0 itself is never written.
#[test]
fn weight_space_perturbation_is_factored_and_w0_is_never_written() {
    let d = device();
    let mut layer = LoraLinear::new(base(6, 5, DType::F64), &LoraConfig::new(2, 4.0)).unwrap();
    layer.lora_b = Param::from_tensor(Tensor::random([5, 2], Distribution::Normal(0.0, 0.5), (&d, DType::F64)));
    let mut opt = MgpoOptimizer::builder(Config::trainer_nlu(1e-2)).lora(&layer).build(&layer).unwrap();
    let w0 = host(layer.base.weight.val());
    let x = Tensor::<2>::random([7, 6], Distribution::Normal(0.0, 1.0), (&d, DType::F64));
    let target = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), (&d, DType::F64));
    for k in 0..4 {
        layer = opt.perturb(layer).unwrap();
        let p = layer.perturbation();
        assert_eq!(p.is_some(), k > 0, "a perturbation exists from the second step on");
        if let Some(p) = p {
            // W0 + eps in burn's in x out layout: W0^T + coef (m_B A + B m_A)^T.
            let (a, b) = (layer.lora_a.val().inner(), layer.lora_b.val().inner());
            let eps = (p.m_b.clone().matmul(a.clone()) + b.clone().matmul(p.m_a.clone())).mul_scalar(p.coef);
            let w = layer.base.weight.val().inner() + eps.transpose();
            let expect = x.clone().inner().matmul(w) + layer.base.bias.as_ref().unwrap().val().inner().unsqueeze() + x.clone().inner().matmul(a.transpose()).matmul(b.transpose()).mul_scalar(layer.scale());
            assert!(max_diff(&host(layer.forward(x.clone())), &host(expect)) < 1e-12);
        }
        let loss = (layer.forward(x.clone()) - target.clone()).square().mean();
        let g = GradientsParams::from_grads(loss.backward(), &layer);
        layer = opt.step(1e-2, layer, g).unwrap();
        assert!(layer.perturbation().is_none(), "the slot is emptied by step");
        assert_eq!(host(layer.base.weight.val()), w0);
    }
}
