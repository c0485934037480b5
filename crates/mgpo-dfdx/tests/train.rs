//! End to end: a two-layer dfdx LoRA model learns a low-rank change of its
//! frozen base with MgpoOptimizer (both spaces, f32), through dfdx's own
//! `Optimizer::update`, and the loss goes down while W0 stays as it was.

use dfdx::nn::modules::ReLU;
use dfdx::nn::{BuildModule, Module, ZeroGrads};
use dfdx::optim::Optimizer;
use dfdx::prelude::*;
use mgpo_core::{Config, LoraConfig, WarmupCosine};
use mgpo_dfdx::{LoraLinear, MgpoOptimizer};

const IN: usize = 8;
const HID: usize = 16;
const OUT: usize = 4;
const N: usize = 64;
type Net = (LoraLinear<IN, HID, 4, f32, Cpu>, ReLU, LoraLinear<HID, OUT, 4, f32, Cpu>);

/// The losses of `steps` full-batch steps of `config` on the teacher task.
fn train(config: Config, steps: u64) -> Vec<f32> {
    let dev = Cpu::seed_from_u64(11);
    let mut student = Net::build(&dev);
    student.0.set_config(LoraConfig::new(4, 8.0)).unwrap();
    student.2.set_config(LoraConfig::new(4, 4.0).rslora()).unwrap();
    // The teacher is the base with a rank-2 change of each W0.
    let mut teacher = student.clone();
    teacher.0.weight = teacher.0.weight.clone() + dev.sample_normal::<Rank2<HID, 2>>().matmul(dev.sample_normal::<Rank2<2, IN>>()) * 0.3;
    teacher.2.weight = teacher.2.weight.clone() + dev.sample_normal::<Rank2<OUT, 2>>().matmul(dev.sample_normal::<Rank2<2, HID>>()) * 0.3;
    let x: Tensor<Rank2<N, IN>, f32, Cpu> = dev.sample_normal();
    let y = teacher.forward(x.clone());
    let (w0a, w0b) = (student.0.weight.as_vec(), student.2.weight.as_vec());

    let schedule = WarmupCosine::paper(config.adamw.lr, steps);
    let mut opt = MgpoOptimizer::new(&student, config).unwrap();
    let mut grads = student.alloc_grads();
    let mut losses = Vec::new();
    for k in 0..steps {
        opt.set_lr(schedule.lr_at(k)).unwrap();
        opt.perturb(&mut student).unwrap();
        let loss = dfdx::losses::mse_loss(student.forward(x.clone().traced(grads)), y.clone());
        losses.push(loss.array());
        grads = loss.backward();
        opt.update(&mut student, &grads).unwrap();
        student.zero_grads(&mut grads);
        assert!(!opt.last_report().unwrap().skipped);
    }
    assert_eq!(student.0.weight.as_vec(), w0a, "W0 of layer 0 changed");
    assert_eq!(student.2.weight.as_vec(), w0b, "W0 of layer 2 changed");
    // The clean model at the end, not the perturbed point of the last step.
    losses.push(dfdx::losses::mse_loss(student.forward(x), y).array());
    losses
}

fn assert_learns(losses: &[f32]) {
    let first = losses[0];
    let last = *losses.last().unwrap();
    let head: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let tail: f32 = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    assert!(first > 0.05, "the task is trivial: initial loss {first}");
    assert!(last < 0.25 * first, "loss {first} -> {last}: not learning ({losses:?})");
    assert!(tail < 0.5 * head, "mean of the first 10 steps {head}, of the last 10 {tail}");
}

#[test]
fn adapter_space_paper_config_learns() {
    assert_learns(&train(Config::paper_nlu(2e-2), 200));
}

#[test]
fn weight_space_trainer_config_learns() {
    assert_learns(&train(Config::trainer_nlu(2e-2), 200));
}
