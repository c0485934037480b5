//! [`BurnBackend`]: the `mgpo_core` capability traits over burn tensors.
//!
//! burn 0.22's `Tensor<D>` has no backend type parameter: the device a
//! tensor lives on picks the backend at run time. The backend is therefore
//! one type for every burn backend, holding the device and float dtype that
//! [`HostIo::from_f64`] creates tensors with; the training-step operations
//! work on whatever device the tensors they are given live on.
//!
//! Its tensor, [`BurnTensor`], is a burn tensor flattened to rank 1 with its
//! shape beside it: mgpo-core needs one tensor type, and burn's rank is a
//! const generic. Flattening and restoring a contiguous tensor is a
//! reshape of metadata, not a copy.
//!
//! Two paths:
//!
//! - **host kernels** (the default for f32 / f64 tensors of burn's ndarray
//!   backend): each method is one fused pass over the tensors' own memory,
//!   reached through burn's `extension` API (the crate's `host` module), with the
//!   kernels of `mgpo_core::backend::cpu` that mgpo-ndarray runs, in the same blocks
//!   of `cpu::BLOCK` elements (parallel above [`BurnBackend::par_threshold`],
//!   partial sums added in block order): AdamW reads p, g, m, v once and
//!   writes p, m, v once, returning sum m^2 from the same pass; `axpy`,
//!   the Gaussian `axpy_noise` and `add_low_rank` write y and W in place.
//!   Results are bit-identical to mgpo-ndarray's.
//! - **tensor ops** (every other burn backend: wgpu, CUDA, ROCm, Metal,
//!   flex, LibTorch; and `host_kernels = false`, which tests set to run this
//!   path on the CPU): burn's tensors are values moved through functions, and
//!   a user kernel needs a backend extension per backend, so each method is
//!   a chain of burn tensor ops on the values taken out of their slots.
//!   Element-wise chains are one kernel where burn's `fusion` decorator is
//!   on (the CubeCL backends); otherwise they are one pass per op:
//!   AdamW about 12 passes (each op of the update reads and writes a
//!   parameter-sized tensor, reusing its input's buffer where it is
//!   unshared), `axpy` 2, `add_low_rank` one out x in temporary
//!   ([P R] [Q; S]), the Gram matrices a cast to f64 and a matrix product.
//!   Sums of squares and Grams are taken in f64 on the device when it has
//!   f64, else on the host from a copy; the Gaussian direction is drawn on
//!   the host and added with `axpy` (a parameter-sized upload per call, an
//!   ablation baseline only).

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
// Everything this backend takes from mgpo-core: the traits it implements,
// their argument types and the shared CPU kernels.
use mgpo_core::backend::cpu::{self, BLOCK};
use mgpo_core::backend::lowrank::sum_of_products_sq;
use mgpo_core::backend::noise::axpy_noise_via_host;
use mgpo_core::backend::{materialise_is_cheaper, AdamWItem, AdamWStep, AxpyItem, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::host::{host_dtype, ndarray_device, HostFloat, Read, Taken};

/// A burn float tensor as mgpo-core sees it: flattened to rank 1, with its
/// shape. Always without autodiff (the optimizer works on the inner
/// backend, as burn's own optimizers do).
#[derive(Debug, Clone)]
pub struct BurnTensor {
    flat: Tensor<1>,
    shape: Vec<usize>,
}

impl BurnTensor {
    /// `t` without its autodiff association, flattened.
    pub fn new<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let n = shape.iter().product::<usize>();
        BurnTensor { flat: t.inner().reshape([n]), shape }
    }

    /// Back to a rank-`D` tensor; an error when the shape has another rank.
    pub fn into_tensor<const D: usize>(self) -> Result<Tensor<D>> {
        let dims: [usize; D] = self
            .shape
            .as_slice()
            .try_into()
            .map_err(|_| MgpoError::Backend(format!("a tensor of shape {:?} is not of rank {D}", self.shape)))?;
        Ok(self.flat.reshape(dims))
    }

    /// Its shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The flattened tensor.
    pub fn flat(&self) -> &Tensor<1> {
        &self.flat
    }

    fn dims2(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(MgpoError::Backend(format!("{what} must be a matrix, got shape {:?}", self.shape))),
        }
    }

    fn matrix(&self, what: &str) -> Result<Tensor<2>> {
        let (r, c) = self.dims2(what)?;
        Ok(self.flat.clone().reshape([r, c]))
    }
}

/// The burn backend: see the module documentation.
#[derive(Debug, Clone)]
pub struct BurnBackend {
    /// Where [`HostIo::from_f64`] and the checkpoint loader create tensors.
    pub device: Device,
    /// The float dtype [`HostIo::from_f64`] creates.
    pub dtype: FloatDType,
    /// Tensors of at least this many elements are updated by several threads (host kernels).
    pub par_threshold: usize,
    /// Use the in-place host kernels on f32 / f64 ndarray tensors (default).
    /// When false every tensor takes the tensor-op path of the other burn
    /// backends.
    pub host_kernels: bool,
}

impl BurnBackend {
    /// A backend creating `dtype` tensors on `device`, with the host
    /// kernels and the default parallel threshold (2^15 elements).
    pub fn new(device: Device, dtype: FloatDType) -> Self {
        BurnBackend { device: device.inner(), dtype, par_threshold: 1 << 15, host_kernels: true }
    }

    /// burn's ndarray backend (the CPU) in `dtype`.
    pub fn ndarray(dtype: FloatDType) -> Self {
        Self::new(ndarray_device().clone(), dtype)
    }

    /// The host element type all of `ts` share when they can take the host
    /// kernels; an error when their dtypes differ.
    fn host_kind(&self, ts: &[&Tensor<1>]) -> Result<Option<DType>> {
        let d0 = ts[0].dtype();
        if let Some(t) = ts.iter().find(|t| t.dtype() != d0) {
            return Err(MgpoError::Backend(format!("dtype mismatch: {d0:?} vs {:?}", t.dtype())));
        }
        Ok(if self.host_kernels && ts.iter().all(|t| host_dtype(t).is_some()) { Some(d0) } else { None })
    }

    fn parallel(&self, len: usize) -> bool {
        len >= self.par_threshold
    }

    /// `f` over `blocks` in one parallel region (or serially below the
    /// threshold); results in block order.
    fn run_blocks<T: Send, R: Send>(&self, len: usize, blocks: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
        if self.parallel(len) {
            blocks.into_par_iter().map(f).collect()
        } else {
            blocks.into_iter().map(f).collect()
        }
    }
}

fn same_shape(a: &BurnTensor, b: &BurnTensor, what: &str) -> Result<()> {
    if a.shape == b.shape {
        Ok(())
    } else {
        Err(MgpoError::Backend(format!("{what}: shapes differ: {:?} vs {:?}", a.shape, b.shape)))
    }
}

fn read_err(e: impl std::fmt::Debug) -> MgpoError {
    MgpoError::Backend(format!("reading a burn tensor failed: {e:?}"))
}

/// The value of a slot, taken out (a zero-element tensor holds the slot
/// meanwhile) so that burn's ops may reuse its buffer.
fn take(slot: &mut Tensor<1>) -> Tensor<1> {
    let hold = Tensor::<1>::empty([0], &slot.device());
    std::mem::replace(slot, hold)
}

/// `t` as f64 on its device when the device has f64, else `None`.
fn on_device_f64<const D: usize>(t: Tensor<D>) -> Option<Tensor<D>> {
    t.device().supports_dtype(DType::F64).then(|| t.cast(FloatDType::F64))
}

// ---------------------------------------------------------------------------
// Host kernels (ndarray backend, f32 / f64).
// ---------------------------------------------------------------------------

impl BurnBackend {
    fn sum_sq_many_host<E: HostFloat>(&self, ts: &[&BurnTensor]) -> Result<Vec<f64>> {
        let reads = ts.iter().map(|t| Read::<E>::new(&t.flat)).collect::<Result<Vec<_>>>()?;
        let slices: Vec<&[E]> = reads.iter().map(Read::slice).collect();
        let blocks: Vec<&[E]> = slices.iter().flat_map(|x| x.chunks(BLOCK)).collect();
        let parts = self.run_blocks(slices.iter().map(|x| x.len()).sum(), blocks, cpu::sum_sq);
        Ok(cpu::sums_per_tensor(slices.iter().map(|x| x.len()), &parts))
    }

    fn axpy_many_host<E: HostFloat>(&self, items: &mut [AxpyItem<'_, BurnTensor>]) -> Result<()> {
        let reads = items.iter().map(|it| Read::<E>::new(&it.x.flat)).collect::<Result<Vec<_>>>()?;
        let alphas: Vec<E> = items.iter().map(|it| E::from(it.alpha).unwrap_or_else(E::nan)).collect();
        let mut taken = items.iter_mut().map(|it| Taken::<E>::new(&mut it.y.flat)).collect::<Result<Vec<_>>>()?;
        let mut len = 0;
        let mut blocks = Vec::new();
        for ((y, x), &a) in taken.iter_mut().zip(&reads).zip(&alphas) {
            let ys = y.slice_mut();
            len += ys.len();
            blocks.extend(ys.chunks_mut(BLOCK).zip(x.slice().chunks(BLOCK)).map(|(y, x)| (y, x, a)));
        }
        self.run_blocks(len, blocks, |(y, x, a)| cpu::axpy(y, a, x));
        Ok(())
    }

    fn adamw_many_host<E: HostFloat>(&self, items: &mut [AdamWItem<'_, BurnTensor>]) -> Result<Vec<f64>> {
        let reads = items.iter().map(|it| Read::<E>::new(&it.g.flat)).collect::<Result<Vec<_>>>()?;
        let consts: Vec<_> = items.iter().map(|it| it.k.consts::<E>()).collect();
        let n = items.len();
        let mut taken = Vec::with_capacity(n);
        for it in items.iter_mut() {
            taken.push((Taken::<E>::new(&mut it.p.flat)?, Taken::<E>::new(&mut it.m.flat)?, Taken::<E>::new(&mut it.v.flat)?));
        }
        let mut lens = Vec::with_capacity(n);
        let mut blocks = Vec::new();
        for (((p, m, v), g), c) in taken.iter_mut().zip(&reads).zip(&consts) {
            let (ps, ms, vs) = (p.slice_mut(), m.slice_mut(), v.slice_mut());
            lens.push(ps.len());
            let chunks = ps.chunks_mut(BLOCK).zip(g.slice().chunks(BLOCK)).zip(ms.chunks_mut(BLOCK)).zip(vs.chunks_mut(BLOCK));
            blocks.extend(chunks.map(|(((p, g), m), v)| (p, g, m, v, c)));
        }
        let parts = self.run_blocks(lens.iter().sum(), blocks, |(p, g, m, v, c)| cpu::adamw(p, g, m, v, c));
        Ok(cpu::sums_per_tensor(lens.into_iter(), &parts))
    }

    fn axpy_noise_host<E: HostFloat>(&self, y: &mut BurnTensor, alpha: f64, seed: u64) -> Result<()> {
        let mut t = Taken::<E>::new(&mut y.flat)?;
        let ys = t.slice_mut();
        if self.parallel(ys.len()) {
            ys.par_chunks_mut(BLOCK).enumerate().for_each(|(b, c)| cpu::axpy_noise(c, alpha, seed, b * BLOCK));
        } else {
            cpu::axpy_noise(ys, alpha, seed, 0);
        }
        Ok(())
    }

    fn gram_host<E: HostFloat>(&self, x: &BurnTensor, y: &BurnTensor, r: usize, kernel: fn(&[E], &[E], usize, bool) -> Vec<f64>) -> Result<Vec<f64>> {
        let (xr, yr) = (Read::<E>::new(&x.flat)?, Read::<E>::new(&y.flat)?);
        Ok(kernel(xr.slice(), yr.slice(), r, std::ptr::eq(x, y)))
    }

    /// W += c P Q + c R S through ndarray's matrix product on the tensors'
    /// memory (as mgpo-ndarray): no out x in temporary.
    fn add_low_rank_host<E: HostFloat>(&self, w: &mut BurnTensor, c: f64, pqrs: [&BurnTensor; 4], (out, inp, rank): (usize, usize, usize)) -> Result<()> {
        let reads = pqrs.iter().map(|t| Read::<E>::new(&t.flat)).collect::<Result<Vec<_>>>()?;
        let view = |i: usize, shape: (usize, usize)| ArrayView2::from_shape(shape, reads[i].slice()).map_err(|e| MgpoError::Backend(e.to_string()));
        let (p, q, r, s) = (view(0, (out, rank))?, view(1, (rank, inp))?, view(2, (out, rank))?, view(3, (rank, inp))?);
        let mut t = Taken::<E>::new(&mut w.flat)?;
        let mut wv = ArrayViewMut2::from_shape((out, inp), t.slice_mut()).map_err(|e| MgpoError::Backend(e.to_string()))?;
        let c = E::from(c).unwrap_or_else(E::nan);
        general_mat_mul(c, &p, &q, E::one(), &mut wv);
        general_mat_mul(c, &r, &s, E::one(), &mut wv);
        Ok(())
    }

    /// ||P Q + R S||^2 with P Q + R S formed by ndarray's matrix product.
    fn low_rank_norm_sq_host<E: HostFloat>(&self, pqrs: [&BurnTensor; 4], (out, inp, rank): (usize, usize, usize)) -> Result<f64> {
        let reads = pqrs.iter().map(|t| Read::<E>::new(&t.flat)).collect::<Result<Vec<_>>>()?;
        let view = |i: usize, shape: (usize, usize)| ArrayView2::from_shape(shape, reads[i].slice()).map_err(|e| MgpoError::Backend(e.to_string()));
        let mut d = ndarray::Array2::<E>::zeros((out, inp));
        general_mat_mul(E::one(), &view(0, (out, rank))?, &view(1, (rank, inp))?, E::zero(), &mut d);
        general_mat_mul(E::one(), &view(2, (out, rank))?, &view(3, (rank, inp))?, E::one(), &mut d);
        Ok(cpu::sum_sq(d.as_slice().expect("a fresh array is one slice")))
    }
}

/// Runs `$body` with `$e` the host element type of `$kind` (f32 or f64).
macro_rules! by_dtype {
    ($kind:expr, $e:ident => $body:expr) => {
        match $kind {
            DType::F32 => {
                type $e = f32;
                $body
            }
            _ => {
                type $e = f64;
                $body
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Tensor-op path (every backend).
// ---------------------------------------------------------------------------

fn sum_sq_ops(t: &BurnTensor) -> Result<f64> {
    match on_device_f64(t.flat.clone()) {
        Some(x) => x.square().sum().try_into_scalar::<f64>().map_err(read_err),
        None => Ok(t.flat.try_to_vec_as::<f64>().map_err(read_err)?.iter().map(|x| x * x).sum()),
    }
}

/// One AdamW step as a chain of tensor ops, in the order of
/// [`mgpo_core::backend::adamw_element`]; returns the new m.
fn adamw_ops(p: &mut BurnTensor, g: &BurnTensor, m: &mut BurnTensor, v: &mut BurnTensor, k: &AdamWStep) -> Tensor<1> {
    let (p0, m0, v0) = (take(&mut p.flat), take(&mut m.flat), take(&mut v.flat));
    let g = g.flat.clone().mul_scalar(k.grad_scale);
    let clean = if k.unperturb != 0.0 { p0 - m0.clone().mul_scalar(k.unperturb) } else { p0 };
    let mm = m0.mul_scalar(k.beta1) + g.clone().mul_scalar(1.0 - k.beta1);
    let vv = v0.mul_scalar(k.beta2) + g.square().mul_scalar(1.0 - k.beta2);
    let denom = vv.clone().sqrt().div_scalar(k.bias2_sqrt).add_scalar(k.eps);
    p.flat = clean.mul_scalar(k.decay) - mm.clone().mul_scalar(k.step_size).div(denom);
    m.flat = mm.clone();
    v.flat = vv;
    mm
}

/// The Gram matrix `f(x, y)` in f64: on the device when it has f64, else
/// from host copies with the CPU kernel.
fn gram_ops(x: &BurnTensor, y: &BurnTensor, r: usize, on_device: fn(Tensor<2>, Tensor<2>) -> Tensor<2>, host: fn(&[f64], &[f64], usize, bool) -> Vec<f64>) -> Result<Vec<f64>> {
    let (xm, ym) = (x.matrix("X")?, y.matrix("Y")?);
    match (on_device_f64(xm), on_device_f64(ym)) {
        (Some(a), Some(b)) => on_device(a, b).try_into_vec_as::<f64>().map_err(read_err),
        _ => {
            let (a, b) = (x.flat.try_to_vec_as::<f64>().map_err(read_err)?, y.flat.try_to_vec_as::<f64>().map_err(read_err)?);
            Ok(host(&a, &b, r, std::ptr::eq(x, y)))
        }
    }
}

/// [`cpu::gram_cols`], the two halves of a tall X in parallel, as
/// mgpo-ndarray sums them.
fn gram_cols_split<E: HostFloat>(x: &[E], y: &[E], r: usize, sym: bool) -> Vec<f64> {
    cpu::gram_cols_halves(x, y, r, sym, |a, b| rayon::join(a, b))
}

impl Tensors for BurnBackend {
    type Tensor = BurnTensor;

    fn shape(&self, t: &BurnTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn zeros_like(&self, t: &BurnTensor) -> Result<BurnTensor> {
        Ok(BurnTensor { flat: t.flat.zeros_like(), shape: t.shape.clone() })
    }
}

impl Reduce for BurnBackend {
    fn sum_sq(&self, t: &BurnTensor) -> Result<f64> {
        Ok(self.sum_sq_many(&[t])?.pop().unwrap_or(f64::NAN))
    }

    fn all_finite(&self, t: &BurnTensor) -> Result<bool> {
        match self.host_kind(&[&t.flat])? {
            Some(kind) => by_dtype!(kind, E => Ok(Read::<E>::new(&t.flat)?.slice().iter().all(|x| x.is_finite()))),
            None => t.flat.clone().is_finite().all().try_into_scalar::<bool>().map_err(read_err),
        }
    }

    /// Host kernels: every block of every tensor is one task of a single
    /// parallel region.
    fn sum_sq_many(&self, ts: &[&BurnTensor]) -> Result<Vec<f64>> {
        if ts.is_empty() {
            return Ok(Vec::new());
        }
        let flats: Vec<&Tensor<1>> = ts.iter().map(|t| &t.flat).collect();
        match self.host_kind(&flats)? {
            Some(kind) => by_dtype!(kind, E => self.sum_sq_many_host::<E>(ts)),
            None => ts.iter().map(|t| sum_sq_ops(t)).collect(),
        }
    }
}

impl FusedUpdate for BurnBackend {
    fn axpy(&self, y: &mut BurnTensor, alpha: f64, x: &BurnTensor) -> Result<()> {
        self.axpy_many(&mut [AxpyItem { y, alpha, x }])
    }

    /// Host kernels: z drawn in place, in mgpo-ndarray's blocks (same
    /// bits); elsewhere drawn on the host and added with `axpy`.
    fn axpy_noise(&self, y: &mut BurnTensor, alpha: f64, seed: u64) -> Result<()> {
        match self.host_kind(&[&y.flat])? {
            Some(kind) => by_dtype!(kind, E => self.axpy_noise_host::<E>(y, alpha, seed)),
            None => axpy_noise_via_host(self, y, alpha, seed),
        }
    }

    fn adamw(&self, p: &mut BurnTensor, g: &BurnTensor, m: &mut BurnTensor, v: &mut BurnTensor, k: &AdamWStep) -> Result<f64> {
        Ok(self.adamw_many(&mut [AdamWItem { p, g, m, v, k: *k }])?.pop().unwrap_or(f64::NAN))
    }

    fn axpy_many(&self, items: &mut [AxpyItem<'_, BurnTensor>]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut flats = Vec::with_capacity(2 * items.len());
        for it in items.iter() {
            same_shape(it.y, it.x, "axpy")?;
            flats.extend([&it.y.flat, &it.x.flat]);
        }
        match self.host_kind(&flats)? {
            Some(kind) => by_dtype!(kind, E => self.axpy_many_host::<E>(items)),
            None => {
                for it in items.iter_mut() {
                    let y = take(&mut it.y.flat);
                    it.y.flat = y + it.x.flat.clone().mul_scalar(it.alpha);
                }
                Ok(())
            }
        }
    }

    /// Shapes and dtypes of every item are checked before any is updated.
    fn adamw_many(&self, items: &mut [AdamWItem<'_, BurnTensor>]) -> Result<Vec<f64>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut flats = Vec::with_capacity(4 * items.len());
        for it in items.iter() {
            for (t, w) in [(it.g, "g"), (&*it.m, "m"), (&*it.v, "v")] {
                same_shape(it.p, t, w)?;
            }
            flats.extend([&it.p.flat, &it.g.flat, &it.m.flat, &it.v.flat]);
        }
        match self.host_kind(&flats)? {
            Some(kind) => by_dtype!(kind, E => self.adamw_many_host::<E>(items)),
            None => items
                .iter_mut()
                .map(|it| {
                    let mm = adamw_ops(it.p, it.g, it.m, it.v, &it.k);
                    sum_sq_ops(&BurnTensor { flat: mm, shape: it.p.shape.clone() })
                })
                .collect(),
        }
    }
}

impl LowRank for BurnBackend {
    fn gram_cols(&self, x: &BurnTensor, y: &BurnTensor) -> Result<Vec<f64>> {
        let (_, r) = x.dims2("gram_cols X")?;
        same_shape(x, y, "gram_cols")?;
        match self.host_kind(&[&x.flat, &y.flat])? {
            Some(kind) => by_dtype!(kind, E => self.gram_host::<E>(x, y, r, gram_cols_split::<E>)),
            None => gram_ops(x, y, r, |a, b| a.transpose().matmul(b), cpu::gram_cols::<f64>),
        }
    }

    fn gram_rows(&self, x: &BurnTensor, y: &BurnTensor) -> Result<Vec<f64>> {
        let (r, _) = x.dims2("gram_rows X")?;
        same_shape(x, y, "gram_rows")?;
        match self.host_kind(&[&x.flat, &y.flat])? {
            Some(kind) => by_dtype!(kind, E => self.gram_host::<E>(x, y, r, cpu::gram_rows::<E>)),
            None => gram_ops(x, y, r, |a, b| a.matmul(b.transpose()), cpu::gram_rows::<f64>),
        }
    }

    fn add_low_rank(&self, w: &mut BurnTensor, c: f64, p: &BurnTensor, q: &BurnTensor, r: &BurnTensor, s: &BurnTensor) -> Result<()> {
        let dims = low_rank_dims(Some(w), p, q, r, s)?;
        match self.host_kind(&[&w.flat, &p.flat, &q.flat, &r.flat, &s.flat])? {
            Some(kind) => by_dtype!(kind, E => self.add_low_rank_host::<E>(w, c, [p, q, r, s], dims)),
            None => {
                // [P R] (out x 2r) times [Q; S] (2r x in): one product, one
                // out x in temporary.
                let left = Tensor::cat(vec![p.matrix("P")?, r.matrix("R")?], 1);
                let right = Tensor::cat(vec![q.matrix("Q")?, s.matrix("S")?], 0);
                let n = dims.0 * dims.1;
                let w0 = take(&mut w.flat);
                w.flat = w0 + left.matmul(right).mul_scalar(c).reshape([n]);
                Ok(())
            }
        }
    }

    /// Forms P Q + R S where that is cheaper than the Gram matrices
    /// ([`materialise_is_cheaper`]), its sum of squares in f64.
    fn low_rank_norm_sq(&self, p: &BurnTensor, q: &BurnTensor, r: &BurnTensor, s: &BurnTensor) -> Result<f64> {
        let dims = low_rank_dims(None, p, q, r, s)?;
        if !materialise_is_cheaper(dims.0, dims.1, dims.2) {
            return sum_of_products_sq(self, p, q, r, s);
        }
        match self.host_kind(&[&p.flat, &q.flat, &r.flat, &s.flat])? {
            Some(kind) => by_dtype!(kind, E => self.low_rank_norm_sq_host::<E>([p, q, r, s], dims)),
            None => {
                let d = p.matrix("P")?.matmul(q.matrix("Q")?) + r.matrix("R")?.matmul(s.matrix("S")?);
                let n = dims.0 * dims.1;
                sum_sq_ops(&BurnTensor { flat: d.reshape([n]), shape: vec![n] })
            }
        }
    }
}

/// (out, in, r) of W (out x in) += P (out x r) Q (r x in) + R S, checked.
fn low_rank_dims(w: Option<&BurnTensor>, p: &BurnTensor, q: &BurnTensor, r: &BurnTensor, s: &BurnTensor) -> Result<(usize, usize, usize)> {
    let (out, rank) = p.dims2("P")?;
    let (qr, inp) = q.dims2("Q")?;
    same_shape(p, r, "R")?;
    same_shape(q, s, "S")?;
    let w_fits = match w {
        Some(w) => w.dims2("W")? == (out, inp),
        None => true,
    };
    if qr != rank || !w_fits {
        return Err(MgpoError::Backend(format!("low-rank update: P {:?} x Q {:?} does not fit W {:?}", p.shape, q.shape, w.map(|w| &w.shape))));
    }
    Ok((out, inp, rank))
}

impl HostIo for BurnBackend {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<BurnTensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(MgpoError::Backend(format!("shape {shape:?} needs {n} values, got {}", data.len())));
        }
        let td = TensorData::new(data.to_vec(), [n]);
        let flat = Tensor::<1>::from_data(td, (&self.device, DType::from(self.dtype)));
        Ok(BurnTensor { flat, shape: shape.to_vec() })
    }

    fn to_f64(&self, t: &BurnTensor) -> Result<Vec<f64>> {
        t.flat.try_to_vec_as::<f64>().map_err(read_err)
    }
}
