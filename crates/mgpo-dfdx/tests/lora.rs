//! The dfdx LoRA module: the shared LoraConfig (rank checked against R,
//! scaling, dropout, init), peft's initialisation, the forward
//! y = W0 x + b + s B (A dropout(x)), merge/unmerge, and which tensors get
//! gradients.

use dfdx::nn::modules::Linear;
use dfdx::nn::{BuildModule, Module, ModuleMut, ToDtype, ZeroGrads};
use dfdx::prelude::*;
use mgpo_core::{LoraConfig, LoraInit, MgpoError};
use mgpo_dfdx::{LoraError, LoraLinear};

const I: usize = 6;
const O: usize = 5;
const R: usize = 4;
const BATCH: usize = 3;
type Layer = LoraLinear<I, O, R, f64, Cpu>;

fn host<S: Shape, T>(t: &Tensor<S, f64, Cpu, T>) -> Vec<f64> {
    t.as_vec()
}

/// A layer with a non-zero B (as after some training), scale 6/4 = 1.5.
fn trained_layer(dev: &Cpu) -> Layer {
    let mut l = Layer::try_new(dev, LoraConfig::new(R, 6.0)).unwrap();
    l.lora_b = dev.sample_normal();
    l
}

/// y = W0 x + b + s B (A x), row by row, in f64 on the host.
fn expected(l: &Layer, x: &[f64]) -> Vec<f64> {
    let (w, b, a, bb) = (host(&l.weight), host(&l.bias), host(&l.lora_a), host(&l.lora_b));
    let s = l.scale();
    let mut out = Vec::new();
    for xr in x.chunks(I) {
        let ax: Vec<f64> = (0..R).map(|k| (0..I).map(|i| a[k * I + i] * xr[i]).sum()).collect();
        for o in 0..O {
            let base: f64 = (0..I).map(|i| w[o * I + i] * xr[i]).sum::<f64>() + b[o];
            let lora: f64 = (0..R).map(|k| bb[o * R + k] * ax[k]).sum();
            out.push(base + s * lora);
        }
    }
    out
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn init_follows_peft() {
    let dev = Cpu::default();
    let l = LoraLinear::<64, 8, 4, f64, Cpu>::try_new(&dev, LoraConfig::new(4, 8.0)).unwrap();
    // Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)).
    let bound = 1.0 / 64f64.sqrt();
    let a = host(&l.lora_a);
    assert!(a.iter().all(|x| x.abs() <= bound));
    let spread = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(spread > 0.5 * bound, "A looks degenerate: max |a| = {spread}");
    assert!(host(&l.lora_b).iter().all(|&x| x == 0.0));
    assert_eq!(l.scale(), 2.0);
    assert!(!l.is_merged() && !l.is_perturbed());
}

#[test]
fn scaling_plain_and_rslora() {
    let dev = Cpu::default();
    let mut l = Layer::try_new(&dev, LoraConfig::new(R, 6.0)).unwrap();
    assert_eq!(l.scale(), 1.5);
    l.set_config(LoraConfig::new(R, 6.0).rslora()).unwrap();
    assert_eq!(l.scale(), 3.0); // 6 / sqrt(4)
    assert!(matches!(l.set_config(LoraConfig::new(R, f64::NAN)), Err(LoraError::InvalidConfig(MgpoError::InvalidConfig { field: "lora.alpha", .. }))));
    let e = l.set_config(LoraConfig::new(R, 6.0).dropout(1.0)).unwrap_err();
    assert!(e.to_string().contains("lora.dropout"), "{e}");
    assert_eq!(l.set_config(LoraConfig::new(8, 6.0)), Err(LoraError::RankMismatch { config: 8, layer: R }));
    assert_eq!(l.scale(), 3.0, "a refused config changes nothing");
    assert_eq!(l.dropout(), 0.0);
}

#[test]
fn fresh_adapter_leaves_the_base_output_unchanged() {
    let dev = Cpu::default();
    let base = Linear::<I, O, f64, Cpu>::build(&dev);
    let x: Tensor<Rank2<BATCH, I>, f64, Cpu> = dev.sample_normal();
    let want = base.forward(x.clone()).as_vec();
    let l = Layer::from_linear(base, LoraConfig::new(R, 16.0)).unwrap();
    assert_eq!(l.forward(x).as_vec(), want);
}

#[test]
fn forward_is_base_plus_scaled_adapter() {
    let dev = Cpu::default();
    let l = trained_layer(&dev);
    let x: Tensor<Rank2<BATCH, I>, f64, Cpu> = dev.sample_normal();
    let want = expected(&l, &x.as_vec());
    assert!(close(&l.forward(x.clone()).as_vec(), &want, 1e-12));
    // The single-vector forward agrees with the batched one.
    let x0: Tensor<Rank1<I>, f64, Cpu> = dev.tensor_from_vec(x.as_vec()[..I].to_vec(), Rank1::<I>::default());
    assert!(close(&l.forward(x0).as_vec(), &want[..O], 1e-12));
    // The base output is not scaled: doubling alpha moves y by exactly s B A x.
    let mut l2 = l.clone();
    l2.set_config(LoraConfig::new(R, 12.0)).unwrap();
    let y1 = l.forward(x.clone()).as_vec();
    let y2 = l2.forward(x.clone()).as_vec();
    let base = {
        let mut z = l.clone();
        z.lora_b = dev.zeros();
        z.forward(x).as_vec()
    };
    for ((a, b), c) in y1.iter().zip(&y2).zip(&base) {
        assert!(((b - c) - 2.0 * (a - c)).abs() < 1e-12);
    }
}

#[test]
fn merged_and_unmerged_forwards_agree() {
    let dev = Cpu::default();
    let mut l = trained_layer(&dev);
    assert_ne!(l.scale(), 1.0);
    let w0 = host(&l.weight);
    let x: Tensor<Rank2<BATCH, I>, f64, Cpu> = dev.sample_normal();
    let unmerged = l.forward(x.clone()).as_vec();
    l.merge().unwrap();
    assert!(l.is_merged());
    assert!(!close(&host(&l.weight), &w0, 1e-6), "merge must change W");
    let merged = l.forward(x.clone()).as_vec();
    assert!(close(&merged, &unmerged, 1e-12), "{merged:?} vs {unmerged:?}");
    // While merged the adapter path is off: changing B does not change y.
    let mut l2 = l.clone();
    l2.lora_b = dev.zeros();
    assert_eq!(l2.forward(x.clone()).as_vec(), merged);
    assert_eq!(l.merge(), Err(LoraError::AlreadyMerged));
    assert_eq!(l.set_config(LoraConfig::new(R, 1.0)), Err(LoraError::AlreadyMerged));
    l.unmerge().unwrap();
    assert!(close(&host(&l.weight), &w0, 1e-14));
    assert!(close(&l.forward(x).as_vec(), &unmerged, 1e-12));
    assert_eq!(l.unmerge(), Err(LoraError::NotMerged));
}

#[test]
fn merged_forward_agrees_in_f32_with_rslora() {
    let dev = Cpu::default();
    let mut l = LoraLinear::<I, O, R, f32, Cpu>::try_new(&dev, LoraConfig::new(R, 5.0).rslora()).unwrap();
    l.lora_b = dev.sample_normal();
    let x: Tensor<Rank2<BATCH, I>, f32, Cpu> = dev.sample_normal();
    let unmerged = l.forward(x.clone()).as_vec();
    l.merge().unwrap();
    let merged = l.forward(x).as_vec();
    for (a, b) in merged.iter().zip(&unmerged) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// For L = sum(y): dL/dB = s 1 (A x)^T, dL/dA = s B^T 1 x^T; W0 and b get none.
#[test]
fn gradients_reach_a_and_b_only() {
    let dev = Cpu::default();
    let l = trained_layer(&dev);
    let x: Tensor<Rank2<BATCH, I>, f64, Cpu> = dev.sample_normal();
    let grads = l.alloc_grads();
    let g = l.forward(x.trace(grads)).sum().backward();
    let (a, b, xs, s) = (host(&l.lora_a), host(&l.lora_b), x.as_vec(), l.scale());
    let mut ga = vec![0.0; R * I];
    let mut gb = vec![0.0; O * R];
    for xr in xs.chunks(I) {
        let ax: Vec<f64> = (0..R).map(|k| (0..I).map(|i| a[k * I + i] * xr[i]).sum()).collect();
        for o in 0..O {
            for k in 0..R {
                gb[o * R + k] += s * ax[k];
            }
        }
        for k in 0..R {
            let col: f64 = (0..O).map(|o| b[o * R + k]).sum();
            for i in 0..I {
                ga[k * I + i] += s * col * xr[i];
            }
        }
    }
    assert!(close(&g.get(&l.lora_a).as_vec(), &ga, 1e-12));
    assert!(close(&g.get(&l.lora_b).as_vec(), &gb, 1e-12));
    // alloc_grads only keeps the trained tensors: dfdx counts 2 of them.
    use dfdx::nn::NumParams;
    assert_eq!(l.num_trainable_params(), R * I + O * R);
}

#[test]
fn conversions_keep_scale_and_merged_flag() {
    let dev = Cpu::default();
    let mut l = trained_layer(&dev);
    l.merge().unwrap();
    let l32: LoraLinear<I, O, R, f32, Cpu> = l.to_dtype::<f32>();
    assert_eq!(l32.scale(), 1.5);
    assert!(l32.is_merged());
}

#[test]
fn a_config_of_another_rank_is_refused() {
    let dev = Cpu::default();
    let e = Layer::try_new(&dev, LoraConfig::new(R + 1, 8.0)).unwrap_err();
    assert_eq!(e, LoraError::RankMismatch { config: R + 1, layer: R });
    assert!(e.to_string().contains("rank"), "{e}");
    let base = Linear::<I, O, f64, Cpu>::build(&dev);
    assert!(matches!(Layer::from_linear(base, LoraConfig::new(0, 8.0)), Err(LoraError::InvalidConfig(_))));
}

#[test]
fn gaussian_init_draws_a_with_standard_deviation_one_over_r() {
    let dev = Cpu::seed_from_u64(3);
    let l = LoraLinear::<256, 4, 8, f64, Cpu>::try_new(&dev, LoraConfig::new(8, 8.0).init(LoraInit::Gaussian)).unwrap();
    let a = host(&l.lora_a);
    let n = a.len() as f64;
    let mean = a.iter().sum::<f64>() / n;
    let sd = (a.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
    // 2048 draws of N(0, 1/64): the sample sd is within a few percent of 1/8.
    assert!((sd - 0.125).abs() < 0.01 && mean.abs() < 0.01, "mean {mean}, sd {sd}");
    assert!(host(&l.lora_b).iter().all(|&x| x == 0.0));
}

/// Dropout acts on the adapter's input in training only: the inference
/// forward keeps every entry, the training one drops entries of the
/// adapter path's input and leaves the base path alone.
#[test]
fn dropout_applies_to_the_adapter_input_in_training_only() {
    let dev = Cpu::seed_from_u64(5);
    let mut l = trained_layer(&dev);
    l.set_config(LoraConfig::new(R, 6.0).dropout(0.5)).unwrap();
    assert_eq!(l.dropout(), 0.5);
    let x: Tensor<Rank2<BATCH, I>, f64, Cpu> = dev.sample_normal();
    let want = expected(&l, &x.as_vec());
    assert!(close(&l.forward(x.clone()).as_vec(), &want, 1e-12), "inference must not drop");
    let trained = l.forward_mut(x.clone()).as_vec();
    assert!(!close(&trained, &want, 1e-6), "training must drop some of the adapter input");
    // With B = 0 the adapter path vanishes and dropout has nothing to act on.
    l.lora_b = dev.zeros();
    let base = expected(&l, &x.as_vec());
    assert!(close(&l.forward_mut(x).as_vec(), &base, 1e-12));
}
