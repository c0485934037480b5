//! # mgpo-ndarray
//!
//! The embedded default backend: [`NdBackend<F>`] runs LoRA-MGPO on
//! `ndarray::ArrayD<F>` for `F` = f32 or f64. Every element-wise update is
//! one fused `Zip` pass, split across rayon's threads above
//! [`NdBackend::par_threshold`] elements; reductions accumulate in f64.

use std::marker::PhantomData;

use mgpo_core::{adamw_element, AdamWStep, FusedUpdate, HostIo, LowRank, MgpoError, Reduce, Result, Tensors};
use ndarray::{linalg::general_mat_mul, ArrayD, ArrayView2, ArrayViewD, Ix2, IxDyn, Zip};
use num_traits::Float;

/// Element types the backend runs on.
pub trait Element: Float + ndarray::LinalgScalar + Send + Sync + std::fmt::Debug + 'static {}
impl Element for f32 {}
impl Element for f64 {}

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

impl<F: Element> NdBackend<F> {
    fn parallel(&self, len: usize) -> bool {
        len >= self.par_threshold
    }

    fn sum_map(&self, t: &ArrayViewD<'_, F>, f: impl Fn(F) -> f64 + Sync + Send) -> f64 {
        let z = Zip::from(t);
        if self.parallel(t.len()) {
            z.par_fold(|| 0.0, |acc, &x| acc + f(x), |a, b| a + b)
        } else {
            z.fold(0.0, |acc, &x| acc + f(x))
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
        Ok(self.sum_map(&t.view(), |x| {
            let x = f64_of(x);
            x * x
        }))
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

    fn adamw(&self, p: &mut ArrayD<F>, g: &ArrayD<F>, m: &mut ArrayD<F>, v: &mut ArrayD<F>, k: &AdamWStep) -> Result<f64> {
        for t in [&*g, &*m, &*v] {
            same_shape(p, t)?;
        }
        let c = k.consts::<F>();
        let len = p.len();
        let z = Zip::from(p).and(g).and(m).and(v);
        let step = |acc: f64, p: &mut F, &g: &F, m: &mut F, v: &mut F| {
            adamw_element(p, g, m, v, &c);
            let mm = f64_of(*m);
            acc + mm * mm
        };
        Ok(if self.parallel(len) {
            z.par_fold(|| 0.0, step, |a, b| a + b)
        } else {
            z.fold(0.0, step)
        })
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
