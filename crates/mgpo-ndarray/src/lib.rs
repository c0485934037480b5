//! # mgpo-ndarray
//!
//! The embedded default backend: [`NdBackend<F>`] runs LoRA-MGPO on
//! `ndarray::ArrayD<F>` for `F` = f32, f64 or bf16. Every element-wise update is
//! one fused pass, split into fixed blocks that rayon runs in parallel above
//! [`NdBackend::par_threshold`] elements; reductions accumulate in f64 in an
//! order that does not depend on the thread count, so runs are
//! bit-reproducible.

#![warn(missing_docs)]

use std::marker::PhantomData;

use mgpo_core::backend::noise::gaussian;
pub use mgpo_core::backend::cpu::{isa, Isa};
use mgpo_core::backend::cpu::{self, BLOCK};
use mgpo_core::backend::{adamw_element, AdamWItem, AdamWStep, AxpyItem, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result};
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
    /// The backend with the default parallel threshold (32 Ki elements).
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend with tensors of `threshold` elements or more updated in parallel.
    pub fn with_par_threshold(threshold: usize) -> Self {
        NdBackend { par_threshold: threshold, _f: PhantomData }
    }
}

/// LoRA-MGPO on ndarray tensors of type `F`: `mgpo_core::Mgpo` over
/// [`NdBackend`], with the tensors passed by name to every call.
pub type MgpoOptimizer<F> = mgpo_core::Mgpo<NdBackend<F>>;

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

#[inline(always)]
fn f64_of<F: Element>(x: F) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

impl<F: Element> NdBackend<F> {
    fn parallel(&self, len: usize) -> bool {
        len >= self.par_threshold
    }

    /// `f` over the blocks of a call (`len` elements in all) in one parallel
    /// region, or serially below the threshold; results in block order.
    fn run_blocks<T: Send, R: Send>(&self, len: usize, blocks: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
        if self.parallel(len) {
            blocks.into_par_iter().map(f).collect()
        } else {
            blocks.into_iter().map(f).collect()
        }
    }
}

fn sum_sq_iter<'a, F: Element>(t: impl Iterator<Item = &'a F>) -> f64 {
    t.map(|&x| f64_of(x) * f64_of(x)).sum()
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
        Ok(self.sum_sq_many(&[t])?.pop().unwrap_or(f64::NAN))
    }

    fn all_finite(&self, t: &ArrayD<F>) -> Result<bool> {
        Ok(t.iter().all(|x| x.is_finite()))
    }

    /// Every block of every tensor is one task of a single parallel region.
    fn sum_sq_many(&self, ts: &[&ArrayD<F>]) -> Result<Vec<f64>> {
        let slices: Vec<Option<&[F]>> = ts.iter().map(|t| t.as_slice_memory_order()).collect();
        let flat = || slices.iter().flatten();
        let blocks: Vec<&[F]> = flat().flat_map(|x| x.chunks(BLOCK)).collect();
        let parts = self.run_blocks(flat().map(|x| x.len()).sum(), blocks, cpu::sum_sq);
        let mut sums = cpu::sums_per_tensor(flat().map(|x| x.len()), &parts).into_iter();
        Ok(ts
            .iter()
            .zip(&slices)
            .map(|(t, s)| match s {
                Some(_) => sums.next().unwrap_or(f64::NAN),
                None => sum_sq_iter(t.iter()),
            })
            .collect())
    }
}

impl<F: Element> FusedUpdate for NdBackend<F> {
    fn axpy(&self, y: &mut ArrayD<F>, alpha: f64, x: &ArrayD<F>) -> Result<()> {
        self.axpy_many(&mut [AxpyItem { y, alpha, x }])
    }

    fn axpy_noise(&self, y: &mut ArrayD<F>, alpha: f64, seed: u64) -> Result<()> {
        let len = y.len();
        match y.as_slice_mut() {
            Some(ys) if self.parallel(len) => ys.par_chunks_mut(BLOCK).enumerate().for_each(|(b, c)| cpu::axpy_noise(c, alpha, seed, b * BLOCK)),
            Some(ys) => cpu::axpy_noise(ys, alpha, seed, 0),
            None => y.iter_mut().enumerate().for_each(|(i, y)| *y = *y + F::from(alpha * gaussian(seed, i as u64)).unwrap_or_else(F::nan)),
        }
        Ok(())
    }

    fn adamw(&self, p: &mut ArrayD<F>, g: &ArrayD<F>, m: &mut ArrayD<F>, v: &mut ArrayD<F>, k: &AdamWStep) -> Result<f64> {
        Ok(self.adamw_many(&mut [AdamWItem { p, g, m, v, k: *k }])?.pop().unwrap_or(f64::NAN))
    }

    /// Every block of every tensor is one task of a single parallel region.
    fn axpy_many(&self, items: &mut [AxpyItem<'_, ArrayD<F>>]) -> Result<()> {
        for it in items.iter() {
            same_shape(it.y, it.x)?;
        }
        let (mut len, mut blocks) = (0, Vec::new());
        for it in items.iter_mut() {
            let a = F::from(it.alpha).unwrap_or_else(F::nan);
            if !(it.y.is_standard_layout() && it.x.is_standard_layout()) {
                Zip::from(&mut *it.y).and(it.x).for_each(|y, &x| *y = *y + a * x);
                continue;
            }
            let (Some(ys), Some(xs)) = (it.y.as_slice_mut(), it.x.as_slice()) else { continue };
            len += ys.len();
            blocks.extend(ys.chunks_mut(BLOCK).zip(xs.chunks(BLOCK)).map(|(y, x)| (y, x, a)));
        }
        self.run_blocks(len, blocks, |(y, x, a)| cpu::axpy(y, a, x));
        Ok(())
    }

    /// Every block of every tensor is one task of a single parallel region;
    /// the sums of m^2 are added per tensor in block order, so each result
    /// has the bits of the tensor's own pass.
    fn adamw_many(&self, items: &mut [AdamWItem<'_, ArrayD<F>>]) -> Result<Vec<f64>> {
        for it in items.iter() {
            for t in [it.g, &*it.m, &*it.v] {
                same_shape(it.p, t)?;
            }
        }
        let mut out = vec![f64::NAN; items.len()];
        let (mut lens, mut blocks) = (Vec::new(), Vec::new());
        for (i, it) in items.iter_mut().enumerate() {
            let c = it.k.consts::<F>();
            let standard = [it.p.is_standard_layout(), it.g.is_standard_layout(), it.m.is_standard_layout(), it.v.is_standard_layout()];
            if standard.contains(&false) {
                Zip::from(&mut *it.p).and(it.g).and(&mut *it.m).and(&mut *it.v).for_each(|p, &g, m, v| adamw_element(p, g, m, v, &c));
                out[i] = sum_sq_iter(it.m.iter());
                continue;
            }
            let (Some(ps), Some(gs), Some(ms), Some(vs)) = (it.p.as_slice_mut(), it.g.as_slice(), it.m.as_slice_mut(), it.v.as_slice_mut()) else {
                continue;
            };
            lens.push((i, ps.len()));
            let chunks = ps.chunks_mut(BLOCK).zip(gs.chunks(BLOCK)).zip(ms.chunks_mut(BLOCK)).zip(vs.chunks_mut(BLOCK));
            blocks.extend(chunks.map(|(((p, g), m), v)| (p, g, m, v, c)));
        }
        let parts = self.run_blocks(lens.iter().map(|l| l.1).sum(), blocks, |(p, g, m, v, c)| cpu::adamw(p, g, m, v, &c));
        for (&(i, _), s) in lens.iter().zip(cpu::sums_per_tensor(lens.iter().map(|l| l.1), &parts)) {
            out[i] = s;
        }
        Ok(out)
    }
}

/// [`cpu::gram_cols`], the two halves of a tall X in parallel.
fn gram_cols<F: Element>(x: &[F], y: &[F], r: usize, sym: bool) -> Vec<f64> {
    cpu::gram_cols_halves(x, y, r, sym, |a, b| rayon::join(a, b))
}

/// [`cpu::gram_rows`], the dot products in parallel when there is enough work.
fn gram_rows<F: Element>(x: &[F], y: &[F], r: usize, sym: bool) -> Vec<f64> {
    let n = x.len() / r.max(1);
    if r * r * n < 1 << 17 {
        return cpu::gram_rows(x, y, r, sym);
    }
    let pairs: Vec<(usize, usize)> = (0..r).flat_map(|a| (if sym { a } else { 0 }..r).map(move |b| (a, b))).collect();
    let vals: Vec<f64> = pairs.par_iter().map(|&(a, b)| cpu::dot(&x[a * n..(a + 1) * n], &y[b * n..(b + 1) * n])).collect();
    let mut out = vec![0.0f64; r * r];
    for (&(a, b), v) in pairs.iter().zip(vals) {
        out[a * r + b] = v;
    }
    if sym {
        cpu::mirror_upper(&mut out, r);
    }
    out
}

/// A Gram kernel of two matrices of one shape, run on their row-major
/// slices; `rank_axis` is the axis of length r.
fn gram_of<F: Element>(x: &ArrayD<F>, y: &ArrayD<F>, what: &str, rank_axis: usize, kernel: fn(&[F], &[F], usize, bool) -> Vec<f64>) -> Result<Vec<f64>> {
    let (xm, ym) = (matrix(x, what)?, matrix(y, what)?);
    if xm.dim() != ym.dim() {
        return Err(MgpoError::Backend(format!("{what}: {:?} vs {:?}", xm.dim(), ym.dim())));
    }
    let r = xm.shape()[rank_axis];
    let (xs, ys) = (xm.as_standard_layout(), ym.as_standard_layout());
    let (Some(xs), Some(ys)) = (xs.as_slice(), ys.as_slice()) else {
        return Err(MgpoError::Backend(format!("{what}: not contiguous")));
    };
    Ok(kernel(xs, ys, r, std::ptr::eq(x, y)))
}

impl<F: Element> LowRank for NdBackend<F> {
    fn gram_cols(&self, x: &ArrayD<F>, y: &ArrayD<F>) -> Result<Vec<f64>> {
        gram_of(x, y, "gram_cols", 1, gram_cols)
    }

    fn gram_rows(&self, x: &ArrayD<F>, y: &ArrayD<F>) -> Result<Vec<f64>> {
        gram_of(x, y, "gram_rows", 0, gram_rows)
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

    /// Forms P Q + R S with ndarray's matrix product where that is cheaper
    /// than the Grams ([`mgpo_core::backend::materialise_is_cheaper`]: small layers,
    /// high rank), in f32 or f64; bf16 always takes the Grams, whose sums
    /// run in f64.
    fn low_rank_norm_sq(&self, p: &ArrayD<F>, q: &ArrayD<F>, r: &ArrayD<F>, s: &ArrayD<F>) -> Result<f64> {
        let (pm, qm, rm, sm) = (matrix(p, "P")?, matrix(q, "Q")?, matrix(r, "R")?, matrix(s, "S")?);
        let (out, inp, rank) = (pm.nrows(), qm.ncols(), pm.ncols());
        let fits = rm.nrows() == out && sm.ncols() == inp && qm.nrows() == rank && rm.ncols() == sm.nrows();
        if !fits || std::mem::size_of::<F>() < 4 || !mgpo_core::backend::materialise_is_cheaper(out, inp, rank) {
            return mgpo_core::backend::lowrank::sum_of_products_sq(self, p, q, r, s);
        }
        let mut d = ndarray::Array2::<F>::zeros((out, inp));
        general_mat_mul(F::one(), &pm, &qm, F::zero(), &mut d);
        general_mat_mul(F::one(), &rm, &sm, F::one(), &mut d);
        Ok(d.as_slice().map_or_else(|| sum_sq_iter(d.iter()), cpu::sum_sq))
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

    /// One batched call over tensors of many sizes (and one transposed)
    /// gives each tensor the bits of its own call, serial or parallel.
    #[test]
    fn batched_calls_match_one_by_one() {
        let sizes = [0usize, 1, 7, BLOCK - 1, BLOCK, 3 * BLOCK + 5, 100];
        let k = AdamWStep { unperturb: 0.02, decay: 0.999, grad_scale: 0.9, beta1: 0.9, beta2: 0.999, step_size: 1e-3, bias2_sqrt: 0.05, eps: 1e-8 };
        let make = |seed: u32| -> Vec<ArrayD<f32>> {
            let mut ts: Vec<ArrayD<f32>> = sizes.iter().enumerate().map(|(i, &n)| filled(n, seed + 10 * i as u32)).collect();
            ts.push(filled(12, seed + 99).into_shape_with_order(IxDyn(&[3, 4])).unwrap().reversed_axes());
            ts
        };
        for be in [NdBackend::<f32>::with_par_threshold(1), NdBackend::with_par_threshold(usize::MAX)] {
            let (g, x) = (make(2), make(5));
            let (mut p1, mut m1, mut v1) = (make(1), make(3), make(4).into_iter().map(|v| v.mapv(f32::abs)).collect::<Vec<_>>());
            let (mut p2, mut m2, mut v2) = (p1.clone(), m1.clone(), v1.clone());
            let one: Vec<f64> = (0..p1.len()).map(|i| be.adamw(&mut p1[i], &g[i], &mut m1[i], &mut v1[i], &k).unwrap()).collect();
            let mut items: Vec<AdamWItem<'_, ArrayD<f32>>> = p2
                .iter_mut()
                .zip(&g)
                .zip(m2.iter_mut().zip(v2.iter_mut()))
                .map(|((p, g), (m, v))| AdamWItem { p, g, m, v, k })
                .collect();
            let many = be.adamw_many(&mut items).unwrap();
            assert!(one.iter().zip(&many).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(p1 == p2 && m1 == m2 && v1 == v2);
            let refs: Vec<&ArrayD<f32>> = g.iter().collect();
            let sums = be.sum_sq_many(&refs).unwrap();
            assert!(refs.iter().zip(&sums).all(|(t, s)| be.sum_sq(t).unwrap().to_bits() == s.to_bits()));
            for (i, y) in p1.iter_mut().enumerate() {
                be.axpy(y, 0.3 + i as f64, &x[i]).unwrap();
            }
            let mut items: Vec<AxpyItem<'_, ArrayD<f32>>> = p2.iter_mut().zip(&x).enumerate().map(|(i, (y, x))| AxpyItem { y, alpha: 0.3 + i as f64, x }).collect();
            be.axpy_many(&mut items).unwrap();
            assert!(p1 == p2);
        }
    }

    /// The parallel Grams (tall X split in halves; dot products spread over
    /// threads) agree with the serial kernels of the core.
    #[test]
    fn parallel_grams_match_serial() {
        let (n, r) = (cpu::GRAM_SPLIT_ROWS + 77, 12);
        let (x, y) = (filled(n * r, 1), filled(n * r, 2));
        let (x, y) = (x.as_slice().unwrap(), y.as_slice().unwrap());
        for sym in [false, true] {
            let y = if sym { x } else { y };
            for (got, want) in [(gram_cols(x, y, r, sym), cpu::gram_cols(x, y, r, sym)), (gram_rows(x, y, r, sym), cpu::gram_rows(x, y, r, sym))] {
                assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs())), "sym {sym}");
            }
        }
    }

    /// The weight-space norm formed as a product (small layer, high rank)
    /// agrees with the Gram route, in f64 and f32; bf16 keeps the Grams.
    #[test]
    fn materialised_norm_matches_the_grams() {
        let (out, inp, r) = (6, 5, 8);
        assert!(mgpo_core::backend::materialise_is_cheaper(out, inp, r));
        let mk = |shape: &[usize], seed: u32| filled(shape.iter().product(), seed).into_shape_with_order(IxDyn(shape)).unwrap().mapv(f64::from);
        let (p, q, rr, s) = (mk(&[out, r], 1), mk(&[r, inp], 2), mk(&[out, r], 3), mk(&[r, inp], 4));
        let be = NdBackend::<f64>::new();
        let want = mgpo_core::backend::lowrank::sum_of_products_sq(&be, &p, &q, &rr, &s).unwrap();
        let got = be.low_rank_norm_sq(&p, &q, &rr, &s).unwrap();
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        let f = |x: &ArrayD<f64>| x.mapv(|v| v as f32);
        let got32 = NdBackend::<f32>::new().low_rank_norm_sq(&f(&p), &f(&q), &f(&rr), &f(&s)).unwrap();
        assert!((got32 - want).abs() <= 1e-5 * want, "{got32} vs {want}");
        let bad = be.low_rank_norm_sq(&p, &mk(&[r + 1, inp], 2), &rr, &s);
        assert!(matches!(bad, Err(MgpoError::Backend(_))));
    }

    /// A shape mismatch anywhere in a batch is an error before any tensor moves.
    #[test]
    fn batched_shape_errors_update_nothing() {
        let be = NdBackend::<f32>::new();
        let k = AdamWStep { unperturb: 0.0, decay: 1.0, grad_scale: 1.0, beta1: 0.9, beta2: 0.999, step_size: 0.1, bias2_sqrt: 0.1, eps: 1e-8 };
        let (mut p, g, mut m, mut v) = (filled(10, 1), filled(10, 2), filled(10, 3), filled(10, 4));
        let (mut q, h, mut mq, mut vq) = (filled(5, 1), filled(6, 2), filled(5, 3), filled(5, 4));
        let before = (p.clone(), m.clone(), v.clone());
        let mut items = vec![AdamWItem { p: &mut p, g: &g, m: &mut m, v: &mut v, k }, AdamWItem { p: &mut q, g: &h, m: &mut mq, v: &mut vq, k }];
        assert!(matches!(be.adamw_many(&mut items), Err(MgpoError::Backend(_))));
        assert!((p, m, v) == before);
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
