//! Fine-tunes a small two-layer MLP with LoRA and LoRA-MGPO on tch
//! (libtorch), printing the loss as it goes.
//!
//! The "pretrained" model is a frozen MLP (16 -> 32 -> 4, tanh); the task is
//! to match a teacher whose two weight matrices differ from the student's
//! by a rank-2 shift, which LoRA adapters of rank 4 on both layers can
//! represent. The learning rate follows the paper's schedule (3% warm-up,
//! cosine decay). Runs on CUDA when libtorch sees a GPU, else on the CPU.
//!
//! ```text
//! source scripts/setup-libtorch.sh
//! cargo run -p mgpo-tch --example finetune -- [preset] [steps]
//! ```
//!
//! `preset` is one of `paper-nlu` (default), `paper-nlg`, `trainer-nlu`,
//! `trainer-nlg`, `adamw`.

use mgpo_core::{Config, LoraConfig, WarmupCosine};
use mgpo_tch::{LoraLinear, MgpoOptimizer};
use tch::nn::{self, Module};
use tch::{Device, Reduction, Tensor};

/// Deterministic weights (splitmix64), so every run is the same task.
fn weights(shape: [i64; 2], seed: u64, scale: f64, dev: Device) -> Tensor {
    let mut s = seed;
    let data: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((2.0 * ((z >> 11) as f64 / (1u64 << 53) as f64) - 1.0) * scale) as f32
        })
        .collect();
    Tensor::from_slice(&data).reshape(shape).to_device(dev)
}

/// The model being fine-tuned.
#[derive(Debug)]
struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc1.forward(x).tanh())
    }
}

fn mse(model: &impl Module, x: &Tensor, y: &Tensor) -> Tensor {
    model.forward(x).mse_loss(y, Reduction::Mean)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let preset = args.next().unwrap_or_else(|| "paper-nlu".into());
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let lr = 1e-2;
    let config = Config::preset(&preset, lr).ok_or_else(|| format!("unknown preset {preset}; one of {:?}", Config::PRESETS))?;
    let dev = Device::cuda_if_available();

    // The pretrained student (frozen) and the teacher it should become.
    let (w1, w2) = (weights([32, 16], 1, 0.25, dev), weights([4, 32], 2, 0.18, dev));
    let shift = |out, inp, seed| weights([out, 2], seed, 0.5, dev).matmul(&weights([2, inp], seed + 1, 0.5, dev));
    let teacher = Mlp {
        fc1: LoraLinear::frozen(nn::Linear { ws: &w1 + shift(32, 16, 10), bs: None }),
        fc2: LoraLinear::frozen(nn::Linear { ws: &w2 + shift(4, 32, 20), bs: None }),
    };
    let x = weights([256, 16], 3, 1.0, dev);
    let y = tch::no_grad(|| teacher.forward(&x));

    // The student: its frozen base weights and the adapters, all in one
    // var store (so that `vs.save` writes a complete checkpoint).
    let vs = nn::VarStore::new(dev);
    let cfg = LoraConfig::new(4, 8.0);
    let model = Mlp {
        fc1: LoraLinear::from_pretrained(&w1, None, &cfg, &(vs.root() / "fc1"))?,
        fc2: LoraLinear::from_pretrained(&w2, None, &cfg, &(vs.root() / "fc2"))?,
    };
    let w0_before: Vec<Tensor> = [&model.fc1, &model.fc2].iter().map(|l| l.base().ws.copy()).collect();

    // Every trainable variable of the store: here the two adapters, chosen
    // by name and scaled as their layers say.
    let mut opt = MgpoOptimizer::from_var_store(&vs, [&model.fc1, &model.fc2], config, None)?;
    let schedule = WarmupCosine::paper(lr, steps);
    println!("device {dev:?}; preset {preset}: {:?} space, {:?} direction, rho {}", config.space, config.direction, config.rho);
    // loss: at the clean parameters before the step; perturbed: where the
    // gradient is taken; |eps|: the perturbation's norm.
    println!("{:>5} {:>10} {:>10} {:>10} {:>8} {:>9}", "step", "lr", "loss", "perturbed", "|g|", "|eps|");
    let every = (steps / 20).max(1);
    for k in 0..steps {
        opt.set_lr(schedule.lr_at(k))?;
        let clean = tch::no_grad(|| mse(&model, &x, &y)).double_value(&[]);
        let (loss, report) = opt.training_step(|| mse(&model, &x, &y))?;
        if (k + 1) % every == 0 || k == 0 {
            let eps: f64 = report.groups.iter().map(|g| g.perturbation_norm * g.perturbation_norm).sum::<f64>().sqrt();
            let perturbed = loss.double_value(&[]);
            println!("{:>5} {:>10.3e} {:>10.6} {:>10.6} {:>8.4} {:>9.3e}", k + 1, report.lr, clean, perturbed, report.grad_norm, eps);
        }
    }

    // Evaluation at the clean point; the merged model computes the same,
    // and W0 was never written (bit-identical in every mode).
    let clean = tch::no_grad(|| mse(&model, &x, &y)).double_value(&[]);
    let unchanged = [&model.fc1, &model.fc2].iter().zip(&w0_before).all(|(l, w)| l.base().ws.equal(w));
    let Mlp { fc1, fc2 } = model;
    let merged = Mlp { fc1: LoraLinear::frozen(fc1.into_merged()?), fc2: LoraLinear::frozen(fc2.into_merged()?) };
    let merged_loss = tch::no_grad(|| mse(&merged, &x, &y)).double_value(&[]);
    println!("final loss {clean:.6} (merged model: {merged_loss:.6}); W0 unchanged: {unchanged}");
    Ok(())
}
