//! A complete backend over a plain `Vec` tensor (the one of the crate's
//! guide), with a switch that injects one fault at a time: what the kit's
//! own tests run it on to prove that the kit passes a correct backend and
//! catches each fault, naming the method that has it.

use std::marker::PhantomData;

use mgpo_core::backend::{cpu, AdamWStep, Float, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result};

/// One fault, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The correct backend.
    None,
    /// `sum_sq` squares and adds in f32, whatever the element type, and
    /// returns the f32 sum widened to f64.
    SumSqInF32,
    /// `adamw` moves p against the descent: + step_size m / (...).
    AdamWSign,
    /// `gram_cols` returns Y^T X instead of X^T Y.
    GramTransposed,
    /// `add_low_rank` adds c P Q and drops c R S.
    AddLowRankDropsRs,
    /// `adamw` returns sum m^2 of the old first moment instead of the new.
    MomentNormOfOldM,
    /// `adamw` returns sum m^2 of the new first moment accumulated in f32.
    MomentNormInF32,
    /// `axpy_noise` draws the stream of seed + 1.
    NoiseSeed,
}

/// A row-major tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct VecTensor<F> {
    pub shape: Vec<usize>,
    pub data: Vec<F>,
}

/// The backend: one per element type, and the fault it carries.
#[derive(Debug, Clone, Copy)]
pub struct VecBackend<F> {
    pub fault: Fault,
    _f: PhantomData<F>,
}

impl<F> VecBackend<F> {
    pub fn new(fault: Fault) -> Self {
        VecBackend { fault, _f: PhantomData }
    }
}

impl<F> Default for VecBackend<F> {
    fn default() -> Self {
        VecBackend::new(Fault::None)
    }
}

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

fn f<F: Float>(x: f64) -> F {
    F::from(x).unwrap_or_else(F::nan)
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
        if self.fault == Fault::SumSqInF32 {
            let s: f32 = t.data.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).map(|x| x * x).sum();
            return Ok(s as f64);
        }
        Ok(cpu::sum_sq(&t.data))
    }

    fn all_finite(&self, t: &VecTensor<F>) -> Result<bool> {
        Ok(t.data.iter().all(|x| x.is_finite()))
    }
}

impl<F: Float> FusedUpdate for VecBackend<F> {
    fn axpy(&self, y: &mut VecTensor<F>, alpha: f64, x: &VecTensor<F>) -> Result<()> {
        same("axpy", y, x)?;
        cpu::axpy(&mut y.data, f(alpha), &x.data);
        Ok(())
    }

    fn axpy_noise(&self, y: &mut VecTensor<F>, alpha: f64, seed: u64) -> Result<()> {
        let seed = if self.fault == Fault::NoiseSeed { seed.wrapping_add(1) } else { seed };
        cpu::axpy_noise(&mut y.data, alpha, seed, 0);
        Ok(())
    }

    fn adamw(&self, p: &mut VecTensor<F>, g: &VecTensor<F>, m: &mut VecTensor<F>, v: &mut VecTensor<F>, k: &AdamWStep) -> Result<f64> {
        for t in [g, &*m, &*v] {
            same("adamw", p, t)?;
        }
        match self.fault {
            Fault::AdamWSign => {
                let c = k.consts::<F>();
                let mut sum = 0.0;
                for i in 0..p.data.len() {
                    let g = g.data[i] * c.grad_scale;
                    let clean = p.data[i] - c.unperturb * m.data[i];
                    let mm = c.beta1 * m.data[i] + c.one_minus_beta1 * g;
                    let vv = c.beta2 * v.data[i] + c.one_minus_beta2 * g * g;
                    p.data[i] = clean * c.decay + c.step_size * mm / (vv.sqrt() / c.bias2_sqrt + c.eps);
                    m.data[i] = mm;
                    v.data[i] = vv;
                    sum += mm.to_f64().unwrap_or(f64::NAN).powi(2);
                }
                Ok(sum)
            }
            Fault::MomentNormOfOldM => {
                let old = cpu::sum_sq(&m.data);
                cpu::adamw(&mut p.data, &g.data, &mut m.data, &mut v.data, &k.consts::<F>());
                Ok(old)
            }
            Fault::MomentNormInF32 => {
                cpu::adamw(&mut p.data, &g.data, &mut m.data, &mut v.data, &k.consts::<F>());
                Ok(m.data.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).map(|x| x * x).sum::<f32>() as f64)
            }
            _ => Ok(cpu::adamw(&mut p.data, &g.data, &mut m.data, &mut v.data, &k.consts::<F>())),
        }
    }
}

impl<F: Float> LowRank for VecBackend<F> {
    fn gram_cols(&self, x: &VecTensor<F>, y: &VecTensor<F>) -> Result<Vec<f64>> {
        same("gram_cols", x, y)?;
        let (_, r) = matrix("gram_cols", x)?;
        if self.fault == Fault::GramTransposed {
            return Ok(cpu::gram_cols(&y.data, &x.data, r, std::ptr::eq(x, y)));
        }
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
            return Err(MgpoError::Backend(format!("add_low_rank: W {:?} += P {:?} Q {:?} + R {:?} S {:?}", w.shape, p.shape, q.shape, r.shape, s.shape)));
        }
        let keep_rs = if self.fault == Fault::AddLowRankDropsRs { F::zero() } else { F::one() };
        let c: F = f(c);
        for i in 0..out {
            for j in 0..inp {
                let mut acc = F::zero();
                for k in 0..rank {
                    acc = acc + p.data[i * rank + k] * q.data[k * inp + j] + keep_rs * r.data[i * rank + k] * s.data[k * inp + j];
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
        Ok(VecTensor { shape: shape.to_vec(), data: data.iter().map(|&x| f(x)).collect() })
    }

    fn to_f64(&self, t: &VecTensor<F>) -> Result<Vec<f64>> {
        Ok(t.data.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect())
    }
}
