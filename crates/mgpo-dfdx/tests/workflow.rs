//! What a training loop relies on beyond one step: checkpoints that resume
//! bit-identically and refuse another optimizer's tensors, parameter groups
//! that change exactly their tensors, and gradient accumulation equal to
//! the whole batch.

use std::path::PathBuf;

mod common;

use common::{net, Net, IN, OUT};
use dfdx::nn::{Module, ModuleVisitor, TensorCollection, ZeroGrads};
use dfdx::prelude::*;
use mgpo_conformance::Tolerance;
use mgpo_core::{is_bias_or_norm, CheckpointError, Config, LoraConfig, MgpoError, ParamGroup, WarmupCosine};
use mgpo_dfdx::{LoraLinear, MgpoOptimizer};

const N: usize = 8;

/// The trainable tensors in layout order.
fn trainables(m: &Net) -> [Vec<f64>; 4] {
    [m.0.lora_a.as_vec(), m.0.lora_b.as_vec(), m.2.weight.as_vec(), m.2.bias.as_vec()]
}

fn data(dev: &Cpu) -> (Tensor<Rank2<N, IN>, f64, Cpu>, Tensor<Rank2<N, OUT>, f64, Cpu>) {
    (dev.sample_normal(), dev.sample_normal())
}

/// One full-batch step at learning rate `lr`.
fn step(opt: &mut MgpoOptimizer<Net, f64>, model: &mut Net, (x, y): &(Tensor<Rank2<N, IN>, f64, Cpu>, Tensor<Rank2<N, OUT>, f64, Cpu>), lr: f64) {
    opt.set_lr(lr).unwrap();
    opt.perturb(model).unwrap();
    let grads = mse_loss(model.forward(x.clone().traced(model.alloc_grads())), y.clone()).backward();
    opt.step(model, &grads).unwrap();
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mgpo-dfdx-{}-{name}.safetensors", std::process::id()))
}

#[test]
fn a_checkpoint_resumes_bit_identically_in_both_spaces() {
    for (i, config) in [Config::paper_nlu(2e-2), Config::trainer_nlu(2e-2)].into_iter().enumerate() {
        let dev = Cpu::seed_from_u64(8);
        let mut model = net(&dev);
        let batch = data(&dev);
        let schedule = WarmupCosine::paper(2e-2, 8);
        let mut opt = MgpoOptimizer::new(&model, config).unwrap();
        for k in 0..4 {
            step(&mut opt, &mut model, &batch, schedule.lr_at(k));
        }
        let path = temp_path(&format!("resume-{i}"));
        opt.save_checkpoint(&path).unwrap();
        let mut resumed = model.clone();
        for k in 4..8 {
            step(&mut opt, &mut model, &batch, schedule.lr_at(k));
        }
        let mut opt2 = MgpoOptimizer::new(&resumed, config).unwrap();
        opt2.load_checkpoint(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(opt2.state().step, 4);
        for k in 4..8 {
            step(&mut opt2, &mut resumed, &batch, schedule.lr_at(k));
        }
        assert_eq!(trainables(&resumed), trainables(&model), "config {i}: the resumed run differs");
        assert_eq!(opt2.state().g_bar, opt.state().g_bar);
        assert!(opt.last_report().unwrap().groups.iter().any(|g| g.perturbation_norm > 0.0), "config {i}: never perturbed");
    }
}

type Layer = LoraLinear<4, 4, 2, f64, Cpu>;

/// Two same-shape adapters `q` and `v`, visited in the order q, v (or v, q with SWAP).
struct Two<const SWAP: bool> {
    q: Layer,
    v: Layer,
}

impl<const SWAP: bool> TensorCollection<f64, Cpu> for Two<SWAP> {
    type To<E2: Dtype, D2: Device<E2>> = Two<SWAP>;
    fn iter_tensors<V: ModuleVisitor<Self, f64, Cpu>>(v: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let (q, vv) = (Self::module("q", |s| &s.q, |s| &mut s.q), Self::module("v", |s| &s.v, |s| &mut s.v));
        // The optimizer never rebuilds a model, so neither order constructs one.
        match SWAP {
            false => v.visit_fields((q, vv), |_| unreachable!()),
            true => v.visit_fields((vv, q), |_| unreachable!()),
        }
    }
}

fn two<const SWAP: bool>(dev: &Cpu) -> Two<SWAP> {
    let layer = || Layer::try_new(dev, LoraConfig::new(2, 4.0)).unwrap();
    Two { q: layer(), v: layer() }
}

#[test]
fn a_checkpoint_of_swapped_same_shape_adapters_is_refused_naming_them() {
    let dev = Cpu::seed_from_u64(3);
    let mut model = two::<false>(&dev);
    let mut opt = MgpoOptimizer::new(&model, Config::paper_nlu(1e-2)).unwrap();
    assert_eq!(opt.layout().names().collect::<Vec<_>>(), ["q.a", "q.b", "v.a", "v.b"]);
    let x: Tensor<Rank2<3, 4>, f64, Cpu> = dev.sample_normal();
    let grads = (model.q.forward(x.clone().traced(model.q.alloc_grads())).sum() + model.v.forward(x.traced(model.v.alloc_grads())).sum()).backward();
    opt.step(&mut model, &grads).unwrap();
    let path = temp_path("swapped");
    opt.save_checkpoint(&path).unwrap();

    let swapped = two::<true>(&dev);
    let mut other = MgpoOptimizer::new(&swapped, Config::paper_nlu(1e-2)).unwrap();
    assert_eq!(other.layout().names().collect::<Vec<_>>(), ["v.a", "v.b", "q.a", "q.b"]);
    let e = other.load_checkpoint(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    match &e {
        MgpoError::Checkpoint(CheckpointError::LayoutMismatch(msg)) => assert!(msg.contains("\"q.a\"") && msg.contains("\"v.a\""), "{msg}"),
        other => panic!("expected a layout mismatch, got {other:?}"),
    }
    assert_eq!(other.state().step, 0, "a refused checkpoint changes nothing");
}

#[test]
fn parameter_groups_change_exactly_their_tensors() {
    let dev = Cpu::seed_from_u64(4);
    let mut plain = net(&dev);
    let mut grouped = plain.clone();
    let mut config = Config::paper_nlu(1e-2);
    config.adamw.weight_decay = 0.1;
    let mut opt = MgpoOptimizer::new(&plain, config).unwrap();
    let mut opt_g = MgpoOptimizer::builder(config)
        .param_group_where(ParamGroup::no_decay(), is_bias_or_norm)
        .param_group(ParamGroup::new("frozen").lr_scale(0.0), &["0.b"])
        .build(&grouped)
        .unwrap();
    let groups: Vec<usize> = opt_g.layout().tensors().iter().map(|t| t.param_group).collect();
    assert_eq!(groups, [0, 2, 0, 1], "0.a, 0.b, 2.weight, 2.bias");
    let before = trainables(&plain);
    // The clone shares the tensors' ids, so one set of gradients serves both.
    let (x, y) = data(&dev);
    let grads = mse_loss(plain.forward(x.traced(plain.alloc_grads())), y).backward();
    opt.step(&mut plain, &grads).unwrap();
    opt_g.step(&mut grouped, &grads).unwrap();
    let (p, g) = (trainables(&plain), trainables(&grouped));
    assert_eq!(g[0], p[0], "0.a is in the default group");
    assert_eq!(g[2], p[2], "2.weight is in the default group");
    assert_ne!(p[1], before[1]);
    assert_eq!(g[1], before[1], "0.b has learning rate 0");
    // AdamW: p (1 - lr wd) - u without the group, p - u in no_decay.
    for ((a, b), p0) in g[3].iter().zip(&p[3]).zip(&before[3]) {
        assert!((a - b - 1e-2 * 0.1 * p0).abs() < 1e-15, "2.bias: {a} - {b} vs lr wd p = {}", 1e-3 * p0);
    }
    assert_ne!(g[3], p[3]);
}

/// Perturb once, k micro-batches at the perturbed point without zeroing
/// the gradients, step once: the same as one step on the whole batch.
fn accumulation_equals_the_big_batch(config: Config) {
    const K: usize = 4;
    const M: usize = N / K;
    let dev = Cpu::seed_from_u64(9);
    let mut big = net(&dev);
    let mut acc = big.clone();
    let (mut opt_big, mut opt_acc) = (MgpoOptimizer::new(&big, config).unwrap(), MgpoOptimizer::new(&acc, config).unwrap());
    let batch = data(&dev);
    let (xv, yv) = (batch.0.as_vec(), batch.1.as_vec());
    let micro: Vec<_> = (0..K)
        .map(|i| {
            let x: Tensor<Rank2<M, IN>, f64, Cpu> = dev.tensor_from_vec(xv[i * M * IN..(i + 1) * M * IN].to_vec(), Default::default());
            let y: Tensor<Rank2<M, OUT>, f64, Cpu> = dev.tensor_from_vec(yv[i * M * OUT..(i + 1) * M * OUT].to_vec(), Default::default());
            (x, y)
        })
        .collect();
    let tol = Tolerance { rtol: 1e-8, atol: 1e-10 };
    let mut grads = acc.alloc_grads();
    for s in 0..4 {
        step(&mut opt_big, &mut big, &batch, 1e-2);
        opt_acc.perturb(&mut acc).unwrap();
        for (x, y) in &micro {
            grads = (mse_loss(acc.forward(x.clone().traced(grads)), y.clone()) * (M as f64 / N as f64)).backward();
        }
        opt_acc.step(&mut acc, &grads).unwrap();
        acc.zero_grads(&mut grads);
        for (t, (a, b)) in trainables(&acc).iter().zip(&trainables(&big)).enumerate() {
            for (p, q) in a.iter().zip(b) {
                assert!(tol.accepts(*p, *q), "step {s}, tensor {t}: accumulated {p} vs whole batch {q}");
            }
        }
        let (ra, rb) = (opt_acc.last_report().unwrap(), opt_big.last_report().unwrap());
        assert!(tol.accepts(ra.grad_norm, rb.grad_norm) && !ra.skipped);
    }
    assert!(opt_big.last_report().unwrap().groups.iter().any(|g| g.perturbation_norm > 0.0), "never perturbed");
}

#[test]
fn accumulation_equals_the_big_batch_in_adapter_space() {
    accumulation_equals_the_big_batch(Config::paper_nlu(1e-2));
}

#[test]
fn accumulation_equals_the_big_batch_in_weight_space() {
    accumulation_equals_the_big_batch(Config::trainer_nlu(1e-2));
}
