//! The network every task fine-tunes: an MLP
//!
//! ```text
//! x (64) -> fc1 -> ReLU -> fc2 -> ReLU -> fc3 -> logits (10)
//! ```
//!
//! with hidden width [`HIDDEN`]. Its base weights are trained on the
//! task's pre-training data ([`crate::task`]), cached as safetensors, and
//! then frozen; fine-tuning adds a LoRA adapter y = W0 x + b + s B (A x),
//! s = alpha / r, to every linear layer (fc1, fc2, fc3), as the paper puts
//! LoRA on all linear layers. The shapes are constants because the dfdx
//! backend needs them at compile time.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{io, Result};
use crate::rng::{derive, Rng};

/// Input features of the base network (an 8 x 8 digit image).
pub const INPUT: usize = 64;
/// Width of both hidden layers.
pub const HIDDEN: usize = 128;
/// Output classes.
pub const CLASSES: usize = 10;
/// Layer names, input to output.
pub const LAYERS: [&str; 3] = ["fc1", "fc2", "fc3"];
/// (out, in) of each layer.
pub const DIMS: [(usize, usize); 3] = [(HIDDEN, INPUT), (HIDDEN, HIDDEN), (CLASSES, HIDDEN)];

/// One frozen linear layer: W (out x in, row-major) and b.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearWeights {
    /// Output features (rows of W).
    pub out: usize,
    /// Input features (columns of W).
    pub inp: usize,
    /// Weight matrix, `out x inp`, row-major.
    pub w: Vec<f32>,
    /// Bias, one per output feature.
    pub b: Vec<f32>,
}

/// The base network's weights, layer by layer ([`LAYERS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BaseModel {
    /// The layers, in [`LAYERS`] order.
    pub layers: Vec<LinearWeights>,
}

impl BaseModel {
    /// torch.nn.Linear's initialisation, W and b ~ U(-1/sqrt(in), 1/sqrt(in)),
    /// drawn from `seed`.
    pub fn init(seed: u64) -> Self {
        let layers = DIMS
            .iter()
            .enumerate()
            .map(|(l, &(out, inp))| {
                let mut rng = Rng::new(derive(seed, &format!("base-init-{l}")));
                let bound = 1.0 / (inp as f64).sqrt();
                LinearWeights {
                    out,
                    inp,
                    w: (0..out * inp).map(|_| rng.range(-bound, bound) as f32).collect(),
                    b: (0..out).map(|_| rng.range(-bound, bound) as f32).collect(),
                }
            })
            .collect();
        BaseModel { layers }
    }

    /// Logits of a batch (n x INPUT) computed on the host in f64: the
    /// reference the backends are checked against.
    pub fn forward_host(&self, x: &[f32]) -> Vec<f64> {
        let mut h: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let mut width = INPUT;
        for (l, lw) in self.layers.iter().enumerate() {
            let n = h.len() / width;
            let mut out = vec![0.0; n * lw.out];
            for i in 0..n {
                for o in 0..lw.out {
                    let mut s = lw.b[o] as f64;
                    for k in 0..lw.inp {
                        s += lw.w[o * lw.inp + k] as f64 * h[i * width + k];
                    }
                    out[i * lw.out + o] = if l + 1 < self.layers.len() { s.max(0.0) } else { s };
                }
            }
            h = out;
            width = lw.out;
        }
        h
    }

    /// Writes the weights as safetensors (`fc1.weight`, `fc1.bias`, ...),
    /// atomically (a temporary file renamed into place).
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .layers
            .iter()
            .zip(LAYERS)
            .flat_map(|(lw, name)| {
                [
                    (format!("{name}.weight"), to_bytes(&lw.w), vec![lw.out, lw.inp]),
                    (format!("{name}.bias"), to_bytes(&lw.b), vec![lw.out]),
                ]
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, b, s)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| io(path, e))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    }

    /// Reads weights written by [`BaseModel::save`]; wrong names, shapes or
    /// dtypes are an error.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(path, e))?;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|e| io(path, format!("{name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(io(path, format!("{name} is {:?} {:?}, expected F32 {shape:?}", t.dtype(), t.shape())));
            }
            Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let layers = DIMS
            .iter()
            .zip(LAYERS)
            .map(|(&(out, inp), name)| {
                Ok(LinearWeights { out, inp, w: get(&format!("{name}.weight"), &[out, inp])?, b: get(&format!("{name}.bias"), &[out])? })
            })
            .collect::<Result<_>>()?;
        Ok(BaseModel { layers })
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The initial A of every adapter, as peft draws it (Kaiming-uniform with
/// a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), from the run's seed; B
/// starts at zero. Drawn on the host so every backend starts from the same
/// numbers.
pub fn adapter_init(rank: usize, seed: u64) -> Vec<Vec<f32>> {
    DIMS.iter()
        .enumerate()
        .map(|(l, &(_, inp))| {
            let mut rng = Rng::new(derive(seed, &format!("lora-a-{l}")));
            let bound = 1.0 / (inp as f64).sqrt();
            (0..rank * inp).map(|_| rng.range(-bound, bound) as f32).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_refuses_wrong_shapes() {
        let m = BaseModel::init(3);
        let dir = std::env::temp_dir().join(format!("mgpo-exp-model-{}", std::process::id()));
        let p = dir.join("base.safetensors");
        m.save(&p, HashMap::new()).unwrap();
        assert_eq!(BaseModel::load(&p).unwrap(), m);
        std::fs::write(&p, b"not safetensors").unwrap();
        assert!(BaseModel::load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(BaseModel::init(4), m);
    }

    #[test]
    fn adapter_init_is_bounded_and_seeded() {
        let a = adapter_init(4, 1);
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![4 * INPUT, 4 * HIDDEN, 4 * HIDDEN]);
        assert!(a[0].iter().all(|v| v.abs() <= 1.0 / 8.0));
        assert_eq!(a, adapter_init(4, 1));
        assert_ne!(a, adapter_init(4, 2));
    }
}
