//! Fine-tunes a small two-layer burn MLP with LoRA and LoRA-MGPO in burn's
//! training-loop style: the model is a value moved through the optimizer
//! (`model = opt.perturb(model)?`, forward, `GradientsParams::from_grads`,
//! `model = opt.step(lr, model, grads)?`), evaluated with `model.valid()`.
//!
//! The "pretrained" model is a frozen MLP (16 -> 32 -> 4, tanh); the task is
//! to match a teacher whose two weight matrices differ from the student's
//! by a rank-2 shift, which LoRA adapters of rank 4 on both layers can
//! represent. The learning rate follows the paper's schedule (3% warm-up,
//! cosine decay). Runs on burn's ndarray backend with autodiff.
//!
//! ```text
//! cargo run --release -p mgpo-burn --example finetune -- [preset] [steps]
//! ```
//!
//! `preset` is one of `paper-nlu` (default), `paper-nlg`, `trainer-nlu`,
//! `trainer-nlg`, `adamw`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use mgpo_burn::{ndarray_device, LoraLinear, MgpoOptimizer};
use mgpo_core::{Config, LoraConfig, WarmupCosine};

/// Deterministic values in [-scale, scale) (splitmix64), so every run is the
/// same task.
fn weights<const D: usize>(shape: [usize; D], seed: u64, scale: f64, dev: &Device) -> Tensor<D> {
    let mut s = seed;
    let data: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((2.0 * ((z >> 11) as f64 / (1u64 << 53) as f64) - 1.0) * scale) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(data, shape), dev)
}

/// A frozen linear layer with weight `w` (in x out, burn's layout).
fn frozen_linear(w: Tensor<2>) -> Linear {
    Linear { weight: Param::from_tensor(w), bias: None }.no_grad()
}

/// The model being fine-tuned.
#[derive(Module, Debug)]
pub struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.fc1.forward(x).tanh())
    }

    fn mse(&self, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
        (self.forward(x.clone()) - y.clone()).square().mean()
    }
}

/// What a run gives: the clean loss before the first and after the last
/// step, and whether W0 stayed bit-identical.
pub struct Outcome {
    pub first_loss: f64,
    pub final_loss: f64,
    pub merged_loss: f64,
    pub w0_unchanged: bool,
}

/// `steps` steps of `config` at peak learning rate 1e-2; prints a line
/// every `steps / 20` steps when `verbose`.
pub fn train(config: Config, steps: u64, verbose: bool) -> Result<Outcome, Box<dyn std::error::Error>> {
    let lr = 1e-2;
    let dev = ndarray_device().clone().autodiff();

    // The pretrained student's weights (frozen) and the teacher it should become.
    let (w1, w2) = (weights([16, 32], 1, 0.25, &dev), weights([32, 4], 2, 0.18, &dev));
    let shift = |inp, out, seed| weights([inp, 2], seed, 0.5, &dev).matmul(weights([2, out], seed + 1, 0.5, &dev));
    let teacher = |x: Tensor<2>| (x.matmul(w1.clone() + shift(16, 32, 10))).tanh().matmul(w2.clone() + shift(32, 4, 20));
    let x = weights([256, 16], 3, 1.0, &dev);
    let y = teacher(x.clone()).detach();

    let cfg = LoraConfig::new(4, 8.0);
    let mut model = Mlp { fc1: LoraLinear::new(frozen_linear(w1), &cfg)?, fc2: LoraLinear::new(frozen_linear(w2), &cfg)? };
    let w0_before: Vec<Vec<f32>> = [&model.fc1, &model.fc2].iter().map(|l| l.base.weight.val().try_to_vec_as::<f32>()).collect::<Result<_, _>>()?;

    let mut opt = MgpoOptimizer::builder(config).loras([&model.fc1, &model.fc2]).build(&model)?;
    let schedule = WarmupCosine::paper(lr, steps);
    let eval = |m: &Mlp| m.valid().mse(&x, &y).into_scalar::<f64>();
    let first_loss = eval(&model);
    if verbose {
        println!("preset: {:?} space, {:?} direction, rho {}", config.space, config.direction, config.rho);
        println!("{:>5} {:>10} {:>10} {:>10} {:>8} {:>9}", "step", "lr", "loss", "perturbed", "|g|", "|eps|");
    }
    let every = (steps / 20).max(1);
    for k in 0..steps {
        let clean = if verbose { eval(&model) } else { f64::NAN };
        model = opt.perturb(model)?;
        let loss = model.mse(&x, &y);
        let perturbed = loss.clone().into_scalar::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(schedule.lr_at(k), model, grads)?;
        let report = opt.last_report().ok_or("no step report")?;
        if verbose && ((k + 1) % every == 0 || k == 0) {
            let eps: f64 = report.groups.iter().map(|g| g.perturbation_norm * g.perturbation_norm).sum::<f64>().sqrt();
            println!("{:>5} {:>10.3e} {:>10.6} {:>10.6} {:>8.4} {:>9.3e}", k + 1, report.lr, clean, perturbed, report.grad_norm, eps);
        }
    }

    // Evaluation at the clean point; the merged model computes the same,
    // and W0 was never written.
    let final_loss = eval(&model);
    let w0_after: Vec<Vec<f32>> = [&model.fc1, &model.fc2].iter().map(|l| l.base.weight.val().try_to_vec_as::<f32>()).collect::<Result<_, _>>()?;
    let mut merged = model.clone();
    merged.fc1.merge();
    merged.fc2.merge();
    let merged_loss = eval(&merged);
    Ok(Outcome { first_loss, final_loss, merged_loss, w0_unchanged: w0_before == w0_after })
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let preset = args.next().unwrap_or_else(|| "paper-nlu".into());
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let config = Config::preset(&preset, 1e-2).ok_or_else(|| format!("unknown preset {preset}; one of {:?}", Config::PRESETS))?;
    let o = train(config, steps, true)?;
    println!("loss {:.6} -> {:.6} (merged model: {:.6}); W0 unchanged: {}", o.first_loss, o.final_loss, o.merged_loss, o.w0_unchanged);
    Ok(())
}
