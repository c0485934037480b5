//! Fine-tunes a small dfdx model with LoRA adapters and LoRA-MGPO, printing
//! the loss of every step.
//!
//! The "pretrained" base is a random two-layer MLP; the task is to match a
//! teacher whose base weights differ by a rank-2 change, which the rank-4
//! adapters can represent. The base weights stay frozen throughout.
//!
//! ```text
//! cargo run -p mgpo-dfdx --example train_lora [-- PRESET [STEPS]]
//! ```
//!
//! PRESET is one of mgpo-core's presets (`paper-nlu` by default,
//! `trainer-nlu` for the authors' weight-space variant, `adamw` for plain
//! AdamW); STEPS defaults to 100.

use dfdx::nn::modules::ReLU;
use dfdx::nn::{BuildModule, Module, ZeroGrads};
use dfdx::prelude::*;
use mgpo_core::{Config, LoraConfig, WarmupCosine};
use mgpo_dfdx::{LoraLinear, MgpoOptimizer};

const IN: usize = 16;
const HID: usize = 32;
const OUT: usize = 4;
const N: usize = 128;
type Net = (LoraLinear<IN, HID, 4, f32, Cpu>, ReLU, LoraLinear<HID, OUT, 4, f32, Cpu>);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let preset = args.next().unwrap_or_else(|| "paper-nlu".into());
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100);
    let lr = 2e-2;
    let config = Config::preset(&preset, lr).ok_or_else(|| format!("unknown preset `{preset}`; one of {:?}", Config::PRESETS))?;

    let dev = Cpu::seed_from_u64(0);
    let mut model = Net::try_build(&dev)?;
    model.0.set_config(LoraConfig::new(4, 8.0))?;
    model.2.set_config(LoraConfig::new(4, 8.0))?;
    let mut teacher = model.clone();
    teacher.0.weight = teacher.0.weight.clone() + dev.sample_normal::<Rank2<HID, 2>>().matmul(dev.sample_normal::<Rank2<2, IN>>()) * 0.25;
    teacher.2.weight = teacher.2.weight.clone() + dev.sample_normal::<Rank2<OUT, 2>>().matmul(dev.sample_normal::<Rank2<2, HID>>()) * 0.25;
    let x: Tensor<Rank2<N, IN>, f32, Cpu> = dev.sample_normal();
    let y = teacher.forward(x.clone());

    let mut opt = MgpoOptimizer::new(&model, config)?;
    println!(
        "preset {preset}: {} trainable tensors ({} adapters), space {:?}, rho {}",
        opt.layout().tensors().len(),
        opt.layout().adapters().len(),
        config.space,
        config.rho
    );
    let schedule = WarmupCosine::paper(lr, steps);
    let mut grads = model.alloc_grads();
    for k in 0..steps {
        opt.set_lr(schedule.lr_at(k))?;
        opt.perturb(&mut model)?;
        let loss = dfdx::losses::mse_loss(model.forward(x.clone().traced(grads)), y.clone());
        let at_perturbed = loss.array();
        grads = loss.backward();
        let r = opt.step(&mut model, &grads)?;
        model.zero_grads(&mut grads);
        println!(
            "step {:>4}  loss {at_perturbed:.6}  lr {:.2e}  |g| {:.4}  |eps| {:.4}{}",
            k + 1,
            r.lr,
            r.grad_norm,
            r.groups.iter().map(|g| g.perturbation_norm).fold(0.0, f64::max),
            if r.skipped { "  (skipped: non-finite gradient)" } else { "" }
        );
    }
    let clean = dfdx::losses::mse_loss(model.forward(x), y).array();
    println!("final clean loss {clean:.6}");
    Ok(())
}
