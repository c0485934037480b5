//! Fine-tunes a small two-layer MLP with LoRA and LoRA-MGPO on candle,
//! printing the loss of every step.
//!
//! The "pretrained" model is a frozen MLP (16 -> 32 -> 4, tanh); the task is
//! to match a teacher whose two weight matrices differ from the student's
//! by a rank-2 shift, which LoRA adapters of rank 4 on both layers can
//! represent. The learning rate follows the paper's schedule (3% warm-up,
//! cosine decay).
//!
//! ```text
//! cargo run -p mgpo-candle --example lora_finetune -- [preset] [steps]
//! ```
//!
//! `preset` is one of `paper-nlu` (default), `paper-nlg`, `trainer-nlu`,
//! `trainer-nlg`, `adamw`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder, VarMap};
use mgpo_candle::{wrap_linears, LoraLinear, MgpoOptimizer};
use mgpo_core::{Config, LoraConfig, WarmupCosine};

/// Deterministic weights (splitmix64), so every run is the same task.
fn weights(shape: (usize, usize), seed: u64, scale: f64, dev: &Device) -> candle_core::Result<Tensor> {
    let mut s = seed;
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((2.0 * ((z >> 11) as f64 / (1u64 << 53) as f64) - 1.0) * scale) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, dev)
}

/// The model being fine-tuned: its layers are `LoraLinear`s, which are the
/// base `Linear`s where no adapter was asked for.
struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.tanh()?)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let preset = args.next().unwrap_or_else(|| "paper-nlu".into());
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let lr = 1e-2;
    let config = Config::preset(&preset, lr).ok_or_else(|| format!("unknown preset {preset}; one of {:?}", Config::PRESETS))?;
    let dev = Device::Cpu;

    // The pretrained student (frozen) and the teacher it should become.
    let (w1, w2) = (weights((32, 16), 1, 0.25, &dev)?, weights((4, 32), 2, 0.18, &dev)?);
    let shift = |out, inp, seed| -> candle_core::Result<Tensor> {
        weights((out, 2), seed, 0.5, &dev)?.matmul(&weights((2, inp), seed + 1, 0.5, &dev)?)
    };
    let teacher = Mlp {
        fc1: LoraLinear::frozen(Linear::new((&w1 + shift(32, 16, 10)?)?, None)),
        fc2: LoraLinear::frozen(Linear::new((&w2 + shift(4, 32, 20)?)?, None)),
    };
    let x = weights((256, 16), 3, 1.0, &dev)?;
    let y = teacher.forward(&x)?;

    // Add adapters to the chosen layers of the existing model.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layers = vec![("fc1".to_string(), Linear::new(w1, None)), ("fc2".to_string(), Linear::new(w2, None))];
    let mut wrapped = wrap_linears(layers, &["fc1", "fc2"], &LoraConfig::new(4, 8.0), &vb)?.into_iter().map(|(_, l)| l);
    let (fc1, fc2) = (wrapped.next().ok_or("fc1")?, wrapped.next().ok_or("fc2")?);
    let model = Mlp { fc1, fc2 };

    let mut opt = MgpoOptimizer::for_lora([&model.fc1, &model.fc2], config)?;
    let schedule = WarmupCosine::paper(lr, steps);
    println!("preset {preset}: {:?} space, {:?} direction, rho {}", config.space, config.direction, config.rho);
    // loss: at the clean parameters before the step; perturbed: where the
    // gradient is taken; |eps|: the perturbation's norm.
    println!("{:>5} {:>10} {:>10} {:>10} {:>8} {:>9}", "step", "lr", "loss", "perturbed", "|g|", "|eps|");
    for k in 0..steps {
        opt.set_lr(schedule.lr_at(k))?;
        let clean = candle_nn::loss::mse(&model.forward(&x)?, &y)?.to_scalar::<f32>()?;
        let (loss, report) = opt.training_step(|| candle_nn::loss::mse(&model.forward(&x)?, &y))?;
        let eps: f64 = report.groups.iter().map(|g| g.perturbation_norm * g.perturbation_norm).sum::<f64>().sqrt();
        let perturbed = loss.to_scalar::<f32>()?;
        println!("{:>5} {:>10.3e} {:>10.6} {:>10.6} {:>8.4} {:>9.3e}", k + 1, report.lr, clean, perturbed, report.grad_norm, eps);
    }

    // Evaluation at the clean point; the merged model computes the same.
    let clean = candle_nn::loss::mse(&model.forward(&x)?, &y)?.to_scalar::<f32>()?;
    let merged =
        Mlp { fc1: LoraLinear::frozen(model.fc1.clone().into_merged()?), fc2: LoraLinear::frozen(model.fc2.clone().into_merged()?) };
    let merged_loss = candle_nn::loss::mse(&merged.forward(&x)?, &y)?.to_scalar::<f32>()?;
    println!("final loss {clean:.6} (merged model: {merged_loss:.6})");
    Ok(())
}
