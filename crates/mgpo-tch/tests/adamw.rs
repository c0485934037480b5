//! rho = 0 is plain AdamW: on the same model, data and initial weights,
//! MGPO with `Config::adamw` and libtorch's own AdamW (`tch::nn::adamw`,
//! i.e. `torch::optim::AdamW`) produce the same weights after every step,
//! with weight decay, a learning-rate schedule, (against
//! `backward_step_clip_norm`) gradient clipping, and parameter groups
//! (against libtorch's per-group learning rate and weight decay).

use mgpo_core::{is_bias_or_norm, AdamWConfig, Config, LoraConfig, ParamGroup};
use mgpo_tch::{LoraLinear, MgpoOptimizer, VarStoreAdapters};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// A LoRA layer over a fixed frozen W0, then a tanh and a plain head whose
/// bias is in libtorch's parameter group 1.
struct Model {
    lora: LoraLinear,
    head: Tensor,
    bias: Tensor,
}

impl Model {
    fn new(vs: &nn::VarStore, kind: Kind) -> Model {
        let root = vs.root();
        let w0 = Tensor::randn([6, 5], (kind, Device::Cpu)) * 0.4;
        let b0 = Tensor::randn([6], (kind, Device::Cpu)) * 0.1;
        let lora = LoraLinear::from_pretrained(&w0, Some(&b0), &LoraConfig::new(3, 6.0), &(&root / "layer")).unwrap();
        // B starts at zero (peft); give it values so both factors move from step 1.
        let _ = tch::no_grad(|| lora.adapter().unwrap().b().shallow_clone().uniform_(-0.3, 0.3));
        let head = (&root / "head").var("weight", &[2, 6], nn::Init::Uniform { lo: -0.5, up: 0.5 });
        let bias = (&root / "head").set_group(1).var("bias", &[2], nn::Init::Uniform { lo: -0.5, up: 0.5 });
        Model { lora, head, bias }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        (self.lora.forward(x).tanh().matmul(&self.head.tr()) + &self.bias).mse_loss(y, Reduction::Mean)
    }
}

fn store(kind: Kind) -> nn::VarStore {
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(kind);
    vs
}

/// The trainable variables of a store, by name, as f64.
fn weights(vs: &nn::VarStore) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<(String, Vec<f64>)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).reshape([-1])).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_close(step: usize, a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)], rtol: f64, atol: f64) {
    assert_eq!(a.len(), b.len());
    for ((na, xa), (nb, xb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (i, (p, q)) in xa.iter().zip(xb).enumerate() {
            assert!((p - q).abs() <= atol + rtol * q.abs(), "step {step}: {na}[{i}] mgpo {p:e} vs torch AdamW {q:e}");
        }
    }
}

/// The learning-rate multiplier of the bias's group, when groups are on
/// (weight decay 0 there, as the Trainer's `no_decay` group).
const BIAS_LR_SCALE: f64 = 0.5;

/// Runs `steps` steps on both optimizers and compares after each; returns
/// how far the weights moved from their start (so that the test cannot pass
/// with two optimizers that do nothing).
fn compare(kind: Kind, clip: Option<f64>, groups: bool, rtol: f64, atol: f64) -> f64 {
    let (beta1, beta2, wd) = (0.85, 0.99, 0.05);
    let (vs_t, mut vs_m) = (store(kind), store(kind));
    let (model_t, model_m) = (Model::new(&vs_t, kind), Model::new(&vs_m, kind));
    // Same initial weights (tests run in parallel: no global seed).
    vs_m.copy(&vs_t).unwrap();
    let start = weights(&vs_t);
    assert_close(0, &weights(&vs_m), &start, 0.0, 0.0);

    let mut torch_opt = nn::adamw(beta1, beta2, wd).build(&vs_t, 1e-2).unwrap();
    if groups {
        torch_opt.set_weight_decay_group(1, 0.0);
    }
    let config = Config {
        max_grad_norm: clip,
        ..Config::adamw(AdamWConfig { lr: 1e-2, beta1, beta2, eps: 1e-8, weight_decay: wd })
    };
    let mut builder = MgpoOptimizer::builder(config).lora(&model_m.lora).var_store(&vs_m, &VarStoreAdapters::default());
    if groups {
        builder = builder.param_group_where(ParamGroup::no_decay().lr_scale(BIAS_LR_SCALE), is_bias_or_norm);
    }
    let mut opt = builder.build().unwrap();
    // Adapter A, B and the head; W0 and its bias are frozen.
    let names: Vec<&str> = opt.layout().tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["layer.a", "layer.b", "head.bias", "head.weight"]);
    assert_eq!(opt.layout().tensors()[2].param_group, usize::from(groups));

    let data = |n: usize, seed: f64| Tensor::from_slice(&(0..n).map(|i| (i as f64 * seed).sin()).collect::<Vec<f64>>()).to_kind(kind);
    let x = data(16 * 5, 1.3).reshape([16, 5]);
    let y = data(16 * 2, 0.7).reshape([16, 2]);
    for step in 1..=25 {
        let lr = 1e-2 * (1.0 - step as f64 / 30.0);
        torch_opt.set_lr(lr);
        if groups {
            torch_opt.set_lr_group(1, lr * BIAS_LR_SCALE);
        }
        opt.set_lr(lr).unwrap();
        let loss = model_t.loss(&x, &y);
        match clip {
            Some(c) => torch_opt.backward_step_clip_norm(&loss, c),
            None => torch_opt.backward_step(&loss),
        }
        let (_, report) = opt.training_step(|| model_m.loss(&x, &y)).unwrap();
        assert!(!report.skipped);
        if clip.is_some() {
            assert!(report.clip_factor < 1.0, "step {step}: the clipping must be active");
        }
        assert_close(step, &weights(&vs_m), &weights(&vs_t), rtol, atol);
    }
    let end = weights(&vs_m);
    end.iter().zip(&start).flat_map(|(a, b)| a.1.iter().zip(&b.1)).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max)
}

#[test]
fn rho_zero_is_libtorch_adamw_f64() {
    let moved = compare(Kind::Double, None, false, 1e-10, 1e-12);
    assert!(moved > 0.05, "weights moved only {moved}");
}

#[test]
fn rho_zero_is_libtorch_adamw_f32() {
    let moved = compare(Kind::Float, None, false, 1e-4, 1e-6);
    assert!(moved > 0.05, "weights moved only {moved}");
}

#[test]
fn rho_zero_with_clipping_is_libtorch_adamw_with_clip_grad_norm() {
    let moved = compare(Kind::Double, Some(0.002), false, 1e-10, 1e-12);
    assert!(moved > 0.05, "weights moved only {moved}");
}

#[test]
fn parameter_groups_are_libtorch_adamw_param_groups() {
    let moved = compare(Kind::Double, None, true, 1e-10, 1e-12);
    assert!(moved > 0.05, "weights moved only {moved}");
}
