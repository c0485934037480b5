//! `ProtoNd`: the ndarray backend with the kernel changes this crate
//! proposes for `mgpo-ndarray`, so their effect is measured through the
//! real optimizer (`mgpo_core::Mgpo`), not only kernel against kernel:
//!
//! - `adamw`: the same fused element update ([`crate::kernels::adamw_dispatch`]),
//!   compiled for AVX-512 / AVX2+FMA at run time;
//! - `gram_cols` / `gram_rows` ([`crate::kernels::gram_cols`],
//!   [`crate::kernels::gram_rows`]): the same f64 accumulation over plain
//!   slices, vectorised (16 lanes of partial sums for the dot products),
//!   half the work for the symmetric X^T X, and the long dimension split
//!   over the cores, instead of ndarray row iterators and one f64
//!   dependency chain per dot product;
//! - `add_low_rank`: both rank-r updates in one parallel pass over W
//!   ([`crate::kernels::add_low_rank_fused`]) instead of two
//!   single-threaded GEMMs.
//!
//! Everything else is `NdBackend<f32>`'s.

use mgpo_core::{AdamWStep, FusedUpdate, HostIo, LowRank, MgpoError, Reduce, Result, Tensors};
use mgpo_ndarray::NdBackend;
use ndarray::{ArrayD, ArrayView2, Ix2};

use crate::kernels::{adamw_dispatch, add_low_rank_fused};

/// `NdBackend<f32>` with the proposed kernels.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtoNd {
    inner: NdBackend<f32>,
}

impl ProtoNd {
    pub fn new() -> Self {
        ProtoNd { inner: NdBackend::new() }
    }
}

fn matrix<'a>(t: &'a ArrayD<f32>, what: &str) -> Result<ArrayView2<'a, f32>> {
    t.view().into_dimensionality::<Ix2>().map_err(|_| MgpoError::Backend(format!("{what} must be a matrix, got {:?}", t.shape())))
}

impl Tensors for ProtoNd {
    type Tensor = ArrayD<f32>;
    fn shape(&self, t: &ArrayD<f32>) -> Vec<usize> {
        self.inner.shape(t)
    }
    fn zeros_like(&self, t: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.inner.zeros_like(t)
    }
}

impl Reduce for ProtoNd {
    fn sum_sq(&self, t: &ArrayD<f32>) -> Result<f64> {
        self.inner.sum_sq(t)
    }
    fn all_finite(&self, t: &ArrayD<f32>) -> Result<bool> {
        self.inner.all_finite(t)
    }
}

impl FusedUpdate for ProtoNd {
    fn axpy(&self, y: &mut ArrayD<f32>, alpha: f64, x: &ArrayD<f32>) -> Result<()> {
        self.inner.axpy(y, alpha, x)
    }

    fn adamw(&self, p: &mut ArrayD<f32>, g: &ArrayD<f32>, m: &mut ArrayD<f32>, v: &mut ArrayD<f32>, k: &AdamWStep) -> Result<f64> {
        let same = [g.shape(), m.shape(), v.shape()].iter().all(|s| *s == p.shape());
        if !same || p.len() < self.inner.par_threshold {
            return self.inner.adamw(p, g, m, v, k);
        }
        match (p.as_slice_mut(), g.as_slice(), m.as_slice_mut(), v.as_slice_mut()) {
            (Some(p), Some(g), Some(m), Some(v)) => Ok(adamw_dispatch(p, g, m, v, k)),
            _ => Err(MgpoError::Backend("prototype adamw: tensors must be contiguous".into())),
        }
    }
}

impl LowRank for ProtoNd {
    fn gram_cols(&self, x: &ArrayD<f32>, y: &ArrayD<f32>) -> Result<Vec<f64>> {
        let (xm, ym) = (matrix(x, "gram_cols X")?, matrix(y, "gram_cols Y")?);
        if xm.dim() != ym.dim() {
            return Err(MgpoError::Backend(format!("gram_cols: {:?} vs {:?}", xm.dim(), ym.dim())));
        }
        match (x.as_slice(), y.as_slice()) {
            (Some(xs), Some(ys)) => Ok(crate::kernels::gram_cols(xs, ys, xm.ncols())),
            _ => self.inner.gram_cols(x, y),
        }
    }

    fn gram_rows(&self, x: &ArrayD<f32>, y: &ArrayD<f32>) -> Result<Vec<f64>> {
        let (xm, ym) = (matrix(x, "gram_rows X")?, matrix(y, "gram_rows Y")?);
        if xm.dim() != ym.dim() {
            return Err(MgpoError::Backend(format!("gram_rows: {:?} vs {:?}", xm.dim(), ym.dim())));
        }
        match (x.as_slice(), y.as_slice()) {
            (Some(xs), Some(ys)) => Ok(crate::kernels::gram_rows(xs, ys, xm.nrows())),
            _ => self.inner.gram_rows(x, y),
        }
    }

    fn add_low_rank(&self, w: &mut ArrayD<f32>, c: f64, p: &ArrayD<f32>, q: &ArrayD<f32>, r: &ArrayD<f32>, s: &ArrayD<f32>) -> Result<()> {
        let dims = [w, p, q, r, s].map(|t| t.shape().to_vec());
        if dims.iter().any(|d| d.len() != 2) {
            return Err(MgpoError::Backend("add_low_rank: all tensors must be matrices".into()));
        }
        let (out, inn, rank) = (dims[0][0], dims[0][1], dims[1][1]);
        let slices = (p.as_slice(), q.as_slice(), r.as_slice(), s.as_slice());
        match (w.as_slice_mut(), slices) {
            (Some(w), (Some(p), Some(q), Some(r), Some(s))) => add_low_rank_fused(w, out, inn, rank, c as f32, p, q, r, s).map_err(MgpoError::Backend),
            _ => Err(MgpoError::Backend("prototype add_low_rank: tensors must be contiguous".into())),
        }
    }
}

impl HostIo for ProtoNd {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<ArrayD<f32>> {
        self.inner.from_f64(shape, data)
    }
    fn to_f64(&self, t: &ArrayD<f32>) -> Result<Vec<f64>> {
        self.inner.to_f64(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgpo_core::HostIo;

    /// The prototype computes what NdBackend computes (Grams and low-rank
    /// updates to rounding, AdamW bit for bit), on shapes on both sides of
    /// the parallel split.
    #[test]
    fn agrees_with_ndarray() {
        let _lock = crate::test_lock();
        let (nd, pr) = (NdBackend::<f32>::new(), ProtoNd::new());
        for (n, r) in [(100usize, 3usize), (5000, 8)] {
            let mk = |shape: &[usize], seed| nd.from_f64(shape, &crate::step::filled(shape.iter().product(), seed, 1.0)).unwrap();
            let (x, y) = (mk(&[n, r], 1), mk(&[n, r], 2));
            let (a, b) = (nd.gram_cols(&x, &y).unwrap(), pr.gram_cols(&x, &y).unwrap());
            assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-9 * (1.0 + a.abs())), "gram_cols {n}x{r}");
            let (xt, yt) = (mk(&[r, n], 3), mk(&[r, n], 4));
            let (a, b) = (nd.gram_rows(&xt, &yt).unwrap(), pr.gram_rows(&xt, &yt).unwrap());
            assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-9 * (1.0 + a.abs())), "gram_rows {r}x{n}");
            let w0 = mk(&[n, 64], 5);
            let (p, q, rr, s) = (mk(&[n, r], 6), mk(&[r, 64], 7), mk(&[n, r], 8), mk(&[r, 64], 9));
            let (mut w1, mut w2) = (w0.clone(), w0.clone());
            nd.add_low_rank(&mut w1, 0.3, &p, &q, &rr, &s).unwrap();
            pr.add_low_rank(&mut w2, 0.3, &p, &q, &rr, &s).unwrap();
            assert!(w1.iter().zip(w2.iter()).all(|(a, b)| (a - b).abs() <= 1e-5), "add_low_rank {n}x{r}");
        }
        let bad = nd.from_f64(&[3], &[1.0, 2.0, 3.0]).unwrap();
        assert!(pr.gram_cols(&bad, &bad).is_err());
    }
}
