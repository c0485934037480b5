//! # mgpo-ndarray
//!
//! The embedded default backend: [`NdBackend<F>`] runs LoRA-MGPO on
//! `ndarray::ArrayD<F>` for `F` = f32, f64 or bf16. Every element-wise update is
//! one fused pass, split into fixed blocks that rayon runs in parallel above
//! [`NdBackend::par_threshold`] elements; reductions accumulate in f64 in an
//! order that does not depend on the thread count, so runs are
//! bit-reproducible.

use std::marker::PhantomData;

use mgpo_core::noise::gaussian;
use mgpo_core::{adamw_element, AdamWConsts, AdamWStep, FusedUpdate, HostIo, LowRank, MgpoError, Reduce, Result, Tensors};
use ndarray::{linalg::general_mat_mul, ArrayD, ArrayView2, Ix2, IxDyn, Zip};
use rayon::prelude::*;
use num_traits::Float;

/// Element types the backend runs on.
pub trait Element: Float + ndarray::LinalgScalar + Send + Sync + std::fmt::Debug + 'static {}
impl Element for f32 {}
impl Element for f64 {}
/// bf16 storage with bf16 arithmetic per element (reductions still in f64).
impl Element for half::bf16 {}

/// The ndarray backend for element type `F`.
#[derive(Debug, Clone, Copy)]
pub struct NdBackend<F> {
    /// Tensors with at least this many elements are updated in parallel.
    pub par_threshold: usize,
    _f: PhantomData<F>,
}

impl<F> Default for NdBackend<F> {
    fn default() -> Self {
        NdBackend { par_threshold: 1 << 15, _f: PhantomData }
    }
}

impl<F> NdBackend<F> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend with tensors of `threshold` elements or more updated in parallel.
    pub fn with_par_threshold(threshold: usize) -> Self {
        NdBackend { par_threshold: threshold, _f: PhantomData }
    }
}

/// The optimizer on ndarray tensors of type `F`.
pub type Mgpo<F> = mgpo_core::Mgpo<NdBackend<F>>;

fn matrix<'a, F>(t: &'a ArrayD<F>, what: &str) -> Result<ArrayView2<'a, F>> {
    t.view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| MgpoError::Backend(format!("{what} must be a matrix, got shape {:?}", t.shape())))
}

fn same_shape<F>(a: &ArrayD<F>, b: &ArrayD<F>) -> Result<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(MgpoError::Backend(format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape())))
    }
}

fn f64_of<F: Element>(x: F) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

/// Reductions and fused updates work on fixed blocks of this many elements:
/// blocks run in parallel, but each block's sum is taken in the same order
/// and block sums are added in index order, so results are bit-identical
/// whatever the thread count or the parallel threshold.
const BLOCK: usize = 1 << 13;

/// Lanes of independent partial sums inside a block (lets the compiler
/// vectorise; combined in a fixed order).
const LANES: usize = 8;

fn sq<F: Element>(x: F) -> f64 {
    let x = f64_of(x);
    x * x
}

/// sum x^2 over one block, in a fixed order.
fn block_sum_sq<F: Element>(x: &[F]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += sq(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        *a += sq(v);
    }
    acc.iter().sum()
}

/// The fused AdamW pass over one block; returns sum m^2 of the block.
fn block_adamw<F: Element>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], c: &AdamWConsts<F>) -> f64 {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        adamw_element(p, g, m, v, c);
    }
    block_sum_sq(m)
}

impl<F: Element> NdBackend<F> {
    fn parallel(&self, len: usize) -> bool {
        len >= self.par_threshold
    }

    /// sum over blocks of `f(block index range)`, in block order.
    fn sum_blocks(&self, len: usize, f: impl Fn(std::ops::Range<usize>) -> f64 + Sync + Send) -> f64 {
        let n = len.div_ceil(BLOCK);
        let range = |b: usize| b * BLOCK..((b + 1) * BLOCK).min(len);
        if self.parallel(len) {
            let parts: Vec<f64> = (0..n).into_par_iter().map(|b| f(range(b))).collect();
            parts.iter().sum()
        } else {
            (0..n).map(|b| f(range(b))).sum()
        }
    }
}

impl<F: Element> Tensors for NdBackend<F> {
    type Tensor = ArrayD<F>;

    fn shape(&self, t: &ArrayD<F>) -> Vec<usize> {
        t.shape().to_vec()
    }

    fn zeros_like(&self, t: &ArrayD<F>) -> Result<ArrayD<F>> {
        Ok(ArrayD::zeros(t.raw_dim()))
    }
}

impl<F: Element> Reduce for NdBackend<F> {
    fn sum_sq(&self, t: &ArrayD<F>) -> Result<f64> {
        Ok(match t.as_slice_memory_order() {
            Some(x) => self.sum_blocks(x.len(), |r| block_sum_sq(&x[r])),
            None => t.iter().map(|&x| sq(x)).sum(),
        })
    }

    fn all_finite(&self, t: &ArrayD<F>) -> Result<bool> {
        Ok(t.iter().all(|x| x.is_finite()))
    }
}

impl<F: Element> FusedUpdate for NdBackend<F> {
    fn axpy(&self, y: &mut ArrayD<F>, alpha: f64, x: &ArrayD<F>) -> Result<()> {
        same_shape(y, x)?;
        let a = F::from(alpha).unwrap_or_else(F::nan);
        let z = Zip::from(y).and(x);
        if self.parallel(x.len()) {
            z.par_for_each(|y, &x| *y = *y + a * x);
        } else {
            z.for_each(|y, &x| *y = *y + a * x);
        }
        Ok(())
    }

    fn axpy_noise(&self, y: &mut ArrayD<F>, alpha: f64, seed: u64) -> Result<()> {
        let add = |i: usize, y: &mut F| *y = *y + F::from(alpha * gaussian(seed, i as u64)).unwrap_or_else(F::nan);
        let len = y.len();
        match y.as_slice_mut() {
            Some(ys) if self.parallel(len) => ys.par_chunks_mut(BLOCK).enumerate().for_each(|(b, c)| {
                c.iter_mut().enumerate().for_each(|(j, y)| add(b * BLOCK + j, y));
            }),
            _ => y.iter_mut().enumerate().for_each(|(i, y)| add(i, y)),
        }
        Ok(())
    }

    fn adamw(&self, p: &mut ArrayD<F>, g: &ArrayD<F>, m: &mut ArrayD<F>, v: &mut ArrayD<F>, k: &AdamWStep) -> Result<f64> {
        for t in [&*g, &*m, &*v] {
            same_shape(p, t)?;
        }
        let c = k.consts::<F>();
        let standard = [p.is_standard_layout(), g.is_standard_layout(), m.is_standard_layout(), v.is_standard_layout()];
        if standard.contains(&false) {
            Zip::from(&mut *p).and(g).and(&mut *m).and(&mut *v).for_each(|p, &g, m, v| adamw_element(p, g, m, v, &c));
            return self.sum_sq(m);
        }
        let ps = p.as_slice_mut().expect("standard layout");
        let gs = g.as_slice().expect("standard layout");
        let ms = m.as_slice_mut().expect("standard layout");
        let vs = v.as_slice_mut().expect("standard layout");
        let len = ps.len();
        if self.parallel(len) {
            let parts: Vec<f64> = ps
                .par_chunks_mut(BLOCK)
                .zip(gs.par_chunks(BLOCK))
                .zip(ms.par_chunks_mut(BLOCK))
                .zip(vs.par_chunks_mut(BLOCK))
                .map(|(((p, g), m), v)| block_adamw(p, g, m, v, &c))
                .collect();
            Ok(parts.iter().sum())
        } else {
            Ok(ps
                .chunks_mut(BLOCK)
                .zip(gs.chunks(BLOCK))
                .zip(ms.chunks_mut(BLOCK))
                .zip(vs.chunks_mut(BLOCK))
                .map(|(((p, g), m), v)| block_adamw(p, g, m, v, &c))
                .sum())
        }
    }
}

impl<F: Element> LowRank for NdBackend<F> {
    fn gram_cols(&self, x: &ArrayD<F>, y: &ArrayD<F>) -> Result<Vec<f64>> {
        let (x, y) = (matrix(x, "gram_cols X")?, matrix(y, "gram_cols Y")?);
        if x.dim() != y.dim() {
            return Err(MgpoError::Backend(format!("gram_cols: {:?} vs {:?}", x.dim(), y.dim())));
        }
        let r = x.ncols();
        let mut out = vec![0.0f64; r * r];
        for (xr, yr) in x.rows().into_iter().zip(y.rows()) {
            for (i, &xi) in xr.iter().enumerate() {
                let xi = f64_of(xi);
                for (o, &yj) in out[i * r..(i + 1) * r].iter_mut().zip(yr.iter()) {
                    *o += xi * f64_of(yj);
                }
            }
        }
        Ok(out)
    }

    fn gram_rows(&self, x: &ArrayD<F>, y: &ArrayD<F>) -> Result<Vec<f64>> {
        let (x, y) = (matrix(x, "gram_rows X")?, matrix(y, "gram_rows Y")?);
        if x.dim() != y.dim() {
            return Err(MgpoError::Backend(format!("gram_rows: {:?} vs {:?}", x.dim(), y.dim())));
        }
        let r = x.nrows();
        let mut out = vec![0.0f64; r * r];
        for (i, xr) in x.rows().into_iter().enumerate() {
            for (j, yr) in y.rows().into_iter().enumerate() {
                out[i * r + j] = xr.iter().zip(yr.iter()).map(|(&a, &b)| f64_of(a) * f64_of(b)).sum();
            }
        }
        Ok(out)
    }

    fn add_low_rank(&self, w: &mut ArrayD<F>, c: f64, p: &ArrayD<F>, q: &ArrayD<F>, r: &ArrayD<F>, s: &ArrayD<F>) -> Result<()> {
        let (p, q, r, s) = (matrix(p, "P")?, matrix(q, "Q")?, matrix(r, "R")?, matrix(s, "S")?);
        let mut w = w
            .view_mut()
            .into_dimensionality::<Ix2>()
            .map_err(|_| MgpoError::Backend("W must be a matrix".into()))?;
        let (out, inp) = w.dim();
        for (x, y) in [(&p, &q), (&r, &s)] {
            if x.nrows() != out || y.ncols() != inp || x.ncols() != y.nrows() {
                return Err(MgpoError::Backend(format!(
                    "add_low_rank: W {:?} += {:?} x {:?} does not fit",
                    (out, inp),
                    x.dim(),
                    y.dim()
                )));
            }
        }
        let c = F::from(c).unwrap_or_else(F::nan);
        general_mat_mul(c, &p, &q, F::one(), &mut w);
        general_mat_mul(c, &r, &s, F::one(), &mut w);
        Ok(())
    }
}

impl<F: Element> HostIo for NdBackend<F> {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<ArrayD<F>> {
        let v: Vec<F> = data.iter().map(|&x| F::from(x).unwrap_or_else(F::nan)).collect();
        ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|e| MgpoError::Backend(format!("shape {shape:?}: {e}")))
    }

    fn to_f64(&self, t: &ArrayD<F>) -> Result<Vec<f64>> {
        Ok(t.iter().map(|&x| f64_of(x)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize, seed: u32) -> ArrayD<f32> {
        let mut x = seed;
        ArrayD::from_shape_fn(IxDyn(&[n]), |_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
    }

    /// Parallel and serial passes give the same bits, several blocks deep.
    #[test]
    fn parallel_is_bit_identical_to_serial() {
        let n = 5 * BLOCK + 123;
        let k = AdamWStep { unperturb: 0.01, decay: 0.999, grad_scale: 0.7, beta1: 0.9, beta2: 0.999, step_size: 1e-3, bias2_sqrt: 0.05, eps: 1e-8 };
        let mut out = Vec::new();
        for be in [NdBackend::<f32>::with_par_threshold(1), NdBackend::with_par_threshold(usize::MAX)] {
            let (mut p, g, mut m, mut v) = (filled(n, 1), filled(n, 2), filled(n, 3), filled(n, 4).mapv(f32::abs));
            let msq = be.adamw(&mut p, &g, &mut m, &mut v, &k).unwrap();
            out.push((p, m, v, msq.to_bits(), be.sum_sq(&g).unwrap().to_bits()));
        }
        assert!(out[0] == out[1]);
    }

    #[test]
    fn non_standard_layout_is_updated_correctly() {
        let be = NdBackend::<f64>::new();
        let k = AdamWStep { unperturb: 0.0, decay: 1.0, grad_scale: 1.0, beta1: 0.9, beta2: 0.999, step_size: 0.1, bias2_sqrt: (0.001f64).sqrt(), eps: 0.0 };
        let mk = || ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let (mut p, mut m, mut v) = (mk(), mk().mapv(|_| 0.0), mk().mapv(|_| 0.0));
        let g = mk().reversed_axes().as_standard_layout().into_owned().into_shape_with_order(IxDyn(&[2, 3])).unwrap();
        let mut pt = mk().reversed_axes();
        let (mut mt, mut vt) = (pt.mapv(|_| 0.0), pt.mapv(|_| 0.0));
        let gt = g.clone().reversed_axes();
        be.adamw(&mut p, &g, &mut m, &mut v, &k).unwrap();
        be.adamw(&mut pt, &gt, &mut mt, &mut vt, &k).unwrap();
        // first step, eps = 0: m / (sqrt(v) / sqrt(1 - beta2)) = (1 - beta1) sign(g), so p moves by -0.1 * 0.1
        assert!(p.iter().zip(mk().iter()).all(|(a, b)| (a - (b - 0.01)).abs() < 1e-12));
        assert!(pt.iter().zip(mk().reversed_axes().iter()).all(|(a, b)| (a - (b - 0.01)).abs() < 1e-12));
    }
}
