//! A LoRA-MGPO backend over a plain `Vec` tensor: the five traits of
//! `mgpo_core::backend` for any `F: Float`, on the slice kernels of
//! `mgpo_core::backend::cpu` (f64 accumulation of every sum, AdamW in the
//! element type). The code is that of mgpo-conformance's guide ("Your
//! tensor library in about 150 lines"); `tests/conformance.rs` proves it
//! with the whole conformance kit.

use std::marker::PhantomData;

use mgpo_core::backend::{cpu, AdamWStep, Float, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result};

/// A row-major tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct VecTensor<F> {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The entries, row-major.
    pub data: Vec<F>,
}

/// The backend: no state, one per element type.
#[derive(Debug, Clone, Copy, Default)]
pub struct VecBackend<F>(PhantomData<F>);

fn same<F>(what: &str, a: &VecTensor<F>, b: &VecTensor<F>) -> Result<()> {
    if a.shape == b.shape {
        Ok(())
    } else {
        Err(MgpoError::Backend(format!("{what}: shapes {:?} and {:?}", a.shape, b.shape)))
    }
}

fn matrix<F>(what: &str, t: &VecTensor<F>) -> Result<(usize, usize)> {
    match t.shape[..] {
        [rows, cols] => Ok((rows, cols)),
        _ => Err(MgpoError::Backend(format!("{what}: not a matrix: {:?}", t.shape))),
    }
}

impl<F: Float> Tensors for VecBackend<F> {
    type Tensor = VecTensor<F>;

    fn shape(&self, t: &VecTensor<F>) -> Vec<usize> {
        t.shape.clone()
    }

    fn zeros_like(&self, t: &VecTensor<F>) -> Result<VecTensor<F>> {
        Ok(VecTensor { shape: t.shape.clone(), data: vec![F::zero(); t.data.len()] })
    }
}

impl<F: Float> Reduce for VecBackend<F> {
    fn sum_sq(&self, t: &VecTensor<F>) -> Result<f64> {
        Ok(cpu::sum_sq(&t.data)) // f64 accumulation
    }

    fn all_finite(&self, t: &VecTensor<F>) -> Result<bool> {
        Ok(t.data.iter().all(|x| x.is_finite()))
    }
}

impl<F: Float> FusedUpdate for VecBackend<F> {
    fn axpy(&self, y: &mut VecTensor<F>, alpha: f64, x: &VecTensor<F>) -> Result<()> {
        same("axpy", y, x)?;
        cpu::axpy(&mut y.data, F::from(alpha).unwrap_or_else(F::nan), &x.data);
        Ok(())
    }

    fn axpy_noise(&self, y: &mut VecTensor<F>, alpha: f64, seed: u64) -> Result<()> {
        cpu::axpy_noise(&mut y.data, alpha, seed, 0);
        Ok(())
    }

    fn adamw(&self, p: &mut VecTensor<F>, g: &VecTensor<F>, m: &mut VecTensor<F>, v: &mut VecTensor<F>, k: &AdamWStep) -> Result<f64> {
        for t in [g, &*m, &*v] {
            same("adamw", p, t)?;
        }
        Ok(cpu::adamw(&mut p.data, &g.data, &mut m.data, &mut v.data, &k.consts::<F>()))
    }
}

impl<F: Float> LowRank for VecBackend<F> {
    fn gram_cols(&self, x: &VecTensor<F>, y: &VecTensor<F>) -> Result<Vec<f64>> {
        same("gram_cols", x, y)?;
        let (_, r) = matrix("gram_cols", x)?;
        Ok(cpu::gram_cols(&x.data, &y.data, r, std::ptr::eq(x, y)))
    }

    fn gram_rows(&self, x: &VecTensor<F>, y: &VecTensor<F>) -> Result<Vec<f64>> {
        same("gram_rows", x, y)?;
        let (r, _) = matrix("gram_rows", x)?;
        Ok(cpu::gram_rows(&x.data, &y.data, r, std::ptr::eq(x, y)))
    }

    fn add_low_rank(&self, w: &mut VecTensor<F>, c: f64, p: &VecTensor<F>, q: &VecTensor<F>, r: &VecTensor<F>, s: &VecTensor<F>) -> Result<()> {
        let ((out, inp), (p_rows, rank), (q_rows, q_cols)) = (matrix("W", w)?, matrix("P", p)?, matrix("Q", q)?);
        if p_rows != out || q_rows != rank || q_cols != inp || r.shape != p.shape || s.shape != q.shape {
            return Err(MgpoError::Backend(format!(
                "add_low_rank: W {:?} += P {:?} Q {:?} + R {:?} S {:?}",
                w.shape, p.shape, q.shape, r.shape, s.shape
            )));
        }
        let c = F::from(c).unwrap_or_else(F::nan);
        for i in 0..out {
            for j in 0..inp {
                let mut acc = F::zero();
                for k in 0..rank {
                    acc = acc + p.data[i * rank + k] * q.data[k * inp + j] + r.data[i * rank + k] * s.data[k * inp + j];
                }
                w.data[i * inp + j] = w.data[i * inp + j] + c * acc;
            }
        }
        Ok(())
    }
}

impl<F: Float> HostIo for VecBackend<F> {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<VecTensor<F>> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(MgpoError::Backend(format!("shape {shape:?} does not hold {} values", data.len())));
        }
        Ok(VecTensor { shape: shape.to_vec(), data: data.iter().map(|&x| F::from(x).unwrap_or_else(F::nan)).collect() })
    }

    fn to_f64(&self, t: &VecTensor<F>) -> Result<Vec<f64>> {
        Ok(t.data.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect())
    }
}
