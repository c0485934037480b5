//! The `Vec` backend of docs/backend-guide.md, with switches that inject the
//! faults a hand-written backend is likely to have.
use std::marker::PhantomData;

use mgpo_core::{cpu, AdamWStep, FusedUpdate, HostIo, LowRank, MgpoError, Reduce, Result, Tensors};
use num_traits::Float;

#[derive(Debug, Clone, PartialEq)]
pub struct VecTensor<F> {
    pub shape: Vec<usize>,
    pub data: Vec<F>,
}

/// The backend as docs/backend-guide.md writes it (`Correct`), or with one
/// fault injected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Acc {
    Correct,
    /// `sum_sq` accumulated naively in f32 (`s += x * x`).
    NaiveSumSq,
    /// `adamw` returns sum m^2 accumulated naively in f32.
    NaiveMoment,
    /// Gram entries accumulated naively in f32.
    NaiveGram,
    /// `gram_cols` returns (X^T Y)^T.
    TransposedGram,
    /// `add_low_rank` adds c P Q and forgets c R S.
    DropLowRankTerm,
    /// AdamW steps up the gradient (step size negated).
    AdamWSign,
    /// The noise drawn with seed + 1.
    NoiseSeed,
    /// The noise index restarts at every block of 8192 entries.
    NoiseBlockOffset,
}

#[derive(Debug, Clone, Copy)]
pub struct VecBackend<F> { pub acc: Acc, _f: PhantomData<F> }

impl<F> VecBackend<F> {
    pub fn new(acc: Acc) -> Self { VecBackend { acc, _f: PhantomData } }
}

fn same<F>(what: &str, a: &VecTensor<F>, b: &VecTensor<F>) -> Result<()> {
    if a.shape == b.shape { Ok(()) } else { Err(MgpoError::Backend(format!("{what}: shapes {:?} and {:?}", a.shape, b.shape))) }
}

fn matrix<F>(what: &str, t: &VecTensor<F>) -> Result<(usize, usize)> {
    match t.shape[..] {
        [r, c] => Ok((r, c)),
        _ => Err(MgpoError::Backend(format!("{what}: not a matrix: {:?}", t.shape))),
    }
}

fn naive_sum<F: Float>(x: impl Iterator<Item = (F, F)>) -> f64 {
    let mut s = 0f32;
    for (a, b) in x { let (a, b) = (a.to_f32().unwrap(), b.to_f32().unwrap()); s += a * b; }
    s as f64
}

impl<F: Float> Tensors for VecBackend<F> {
    type Tensor = VecTensor<F>;
    fn shape(&self, t: &VecTensor<F>) -> Vec<usize> { t.shape.clone() }
    fn zeros_like(&self, t: &VecTensor<F>) -> Result<VecTensor<F>> {
        Ok(VecTensor { shape: t.shape.clone(), data: vec![F::zero(); t.data.len()] })
    }
}

impl<F: Float> Reduce for VecBackend<F> {
    fn sum_sq(&self, t: &VecTensor<F>) -> Result<f64> {
        Ok(match self.acc { Acc::NaiveSumSq => naive_sum(t.data.iter().map(|&x| (x, x))), _ => cpu::sum_sq(&t.data) })
    }
    fn all_finite(&self, t: &VecTensor<F>) -> Result<bool> { Ok(t.data.iter().all(|x| x.is_finite())) }
}

impl<F: Float> FusedUpdate for VecBackend<F> {
    fn axpy(&self, y: &mut VecTensor<F>, alpha: f64, x: &VecTensor<F>) -> Result<()> {
        same("axpy", y, x)?;
        cpu::axpy(&mut y.data, F::from(alpha).unwrap_or_else(F::nan), &x.data);
        Ok(())
    }
    fn axpy_noise(&self, y: &mut VecTensor<F>, alpha: f64, seed: u64) -> Result<()> {
        match self.acc {
            Acc::NoiseSeed => cpu::axpy_noise(&mut y.data, alpha, seed.wrapping_add(1), 0),
            Acc::NoiseBlockOffset => { for c in y.data.chunks_mut(8192) { cpu::axpy_noise(c, alpha, seed, 0) } }
            _ => cpu::axpy_noise(&mut y.data, alpha, seed, 0),
        }
        Ok(())
    }
    fn adamw(&self, p: &mut VecTensor<F>, g: &VecTensor<F>, m: &mut VecTensor<F>, v: &mut VecTensor<F>, k: &AdamWStep) -> Result<f64> {
        for t in [g, &*m, &*v] { same("adamw", p, t)?; }
        let mut k = *k;
        if self.acc == Acc::AdamWSign { k.step_size = -k.step_size; }
        let s = cpu::adamw(&mut p.data, &g.data, &mut m.data, &mut v.data, &k.consts::<F>());
        Ok(match self.acc { Acc::NaiveMoment => naive_sum(m.data.iter().map(|&x| (x, x))), _ => s })
    }
}

impl<F: Float> LowRank for VecBackend<F> {
    fn gram_cols(&self, x: &VecTensor<F>, y: &VecTensor<F>) -> Result<Vec<f64>> {
        same("gram_cols", x, y)?;
        let (n, r) = matrix("gram_cols", x)?;
        Ok(match self.acc {
            Acc::TransposedGram => { let g = cpu::gram_cols(&x.data, &y.data, r, std::ptr::eq(x, y)); (0..r * r).map(|ab| g[(ab % r) * r + ab / r]).collect() }
            Acc::NaiveGram => (0..r * r).map(|ab| naive_sum((0..n).map(|i| (x.data[i * r + ab / r], y.data[i * r + ab % r])))).collect(),
            _ => cpu::gram_cols(&x.data, &y.data, r, std::ptr::eq(x, y)),
        })
    }
    fn gram_rows(&self, x: &VecTensor<F>, y: &VecTensor<F>) -> Result<Vec<f64>> {
        same("gram_rows", x, y)?;
        let (r, n) = matrix("gram_rows", x)?;
        Ok(match self.acc {
            Acc::NaiveGram => (0..r * r).map(|ab| naive_sum((0..n).map(|j| (x.data[(ab / r) * n + j], y.data[(ab % r) * n + j])))).collect(),
            _ => cpu::gram_rows(&x.data, &y.data, r, std::ptr::eq(x, y)),
        })
    }
    fn add_low_rank(&self, w: &mut VecTensor<F>, c: f64, p: &VecTensor<F>, q: &VecTensor<F>, r: &VecTensor<F>, s: &VecTensor<F>) -> Result<()> {
        let ((out, inp), (po, rk), (qr, qi)) = (matrix("W", w)?, matrix("P", p)?, matrix("Q", q)?);
        if po != out || qr != rk || qi != inp || r.shape != p.shape || s.shape != q.shape {
            return Err(MgpoError::Backend(format!("add_low_rank: W {:?} += P {:?} Q {:?} + R {:?} S {:?}", w.shape, p.shape, q.shape, r.shape, s.shape)));
        }
        let c = F::from(c).unwrap_or_else(F::nan);
        for i in 0..out {
            for j in 0..inp {
                let mut acc = F::zero();
                for k in 0..rk {
                    acc = acc + p.data[i * rk + k] * q.data[k * inp + j];
                    if self.acc != Acc::DropLowRankTerm { acc = acc + r.data[i * rk + k] * s.data[k * inp + j]; }
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
