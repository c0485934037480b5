//! [`CandleBackend`]: the `mgpo_core` capability traits for `candle_core::Tensor`.
//!
//! Two paths:
//!
//! - **CPU, f32 / f64** (the default): every update is one fused pass over
//!   the tensors' own memory, reached through candle's public in-place op
//!   machinery (see [`crate::cpu`]). AdamW runs [`mgpo_core::backend::adamw_element`]
//!   per element over p, g, m, v and returns sum m^2 from the same pass;
//!   `axpy` and `add_low_rank` write y and W in place. Tensors above
//!   [`CandleBackend::par_threshold`] elements are split over rayon's
//!   threads in fixed chunks whose partial sums are added in chunk order, so
//!   results do not depend on the thread count.
//! - **any other device or dtype** (CUDA, Metal, bf16...): a chain of candle
//!   tensor ops on detached tensors, whose results are copied back into the
//!   destination's storage with `slice_set` (in place, outside the autograd
//!   graph). candle 0.11 offers user kernels only through `InplaceOp`'s
//!   per-device `cuda_fwd` / `metal_fwd`, which would need this crate to
//!   carry its own CUDA and Metal kernels; the chain costs a few temporaries
//!   per step instead.
//!
//! Reductions (sum of squares, the r x r Gram matrices) always accumulate in
//! f64: on the CPU by reading the storage slices directly, elsewhere by
//! casting to f64 on the device first (or, where the device has no f64, such
//! as Metal, by copying to the host).

use candle_core::{DType, Device, Tensor, D};
use mgpo_core::backend::cpu as kernels;
use mgpo_core::backend::{materialise_is_cheaper, noise, AdamWConsts, AdamWStep, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result, Shares};
use rayon::prelude::*;

use crate::cpu::{backend_err, check_distinct, with_mut, with_refs, CpuFloat};

/// Elements per chunk of the parallel CPU passes (and of their partial sums).
const CHUNK: usize = 1 << 14;

/// The candle backend: tensors of one dtype on one device.
///
/// `dtype` and `device` are what [`HostIo::from_f64`] creates; the
/// training-step operations work on whatever the tensors they are given
/// hold, as long as all tensors of one call agree.
#[derive(Debug, Clone)]
pub struct CandleBackend {
    /// Where new tensors (m, v, vectors' inputs) are created.
    pub device: Device,
    /// The element type of new tensors.
    pub dtype: DType,
    /// Tensors with at least this many elements are updated by several threads.
    pub par_threshold: usize,
    /// Use the fused CPU kernels for f32 / f64 CPU tensors (default). When
    /// false every tensor takes the device path: a chain of tensor ops,
    /// which is what CUDA and Metal run; tests set it to check that path on
    /// the CPU.
    pub cpu_kernels: bool,
}

impl CandleBackend {
    /// A backend creating `dtype` tensors on `device`, with the fused CPU
    /// kernels and the default parallel threshold (2^15 elements).
    pub fn new(device: Device, dtype: DType) -> Self {
        CandleBackend { device, dtype, par_threshold: 1 << 15, cpu_kernels: true }
    }

    /// [`CandleBackend::new`] on the CPU.
    pub fn cpu(dtype: DType) -> Self {
        Self::new(Device::Cpu, dtype)
    }

    /// The element type of the fused CPU path all of `ts` can take, if any.
    fn cpu_kind(&self, ts: &[&Tensor]) -> Result<Option<DType>> {
        let d0 = ts[0].dtype();
        for t in ts {
            if t.dtype() != d0 {
                return Err(MgpoError::Backend(format!("dtype mismatch: {:?} vs {:?}", d0, t.dtype())));
            }
            if !t.device().same_device(ts[0].device()) {
                return Err(MgpoError::Backend(format!("device mismatch: {:?} vs {:?}", ts[0].device().location(), t.device().location())));
            }
        }
        let cpu = self.cpu_kernels && ts.iter().all(|t| t.device().is_cpu());
        Ok((cpu && matches!(d0, DType::F32 | DType::F64)).then_some(d0))
    }
}

/// Fails unless `a` and `b` have the same shape.
fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() == b.dims() {
        Ok(())
    } else {
        Err(MgpoError::Backend(format!("{what}: shapes differ: {:?} vs {:?}", a.dims(), b.dims())))
    }
}

fn matrix(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    match t.dims() {
        &[r, c] => Ok((r, c)),
        d => Err(MgpoError::Backend(format!("{what} must be a matrix, got shape {d:?}"))),
    }
}

/// Copies `src` into the storage of `dst` (same shape), in place and
/// outside the autograd graph: the device path's write-back.
fn write_into(dst: &Tensor, src: &Tensor, what: &str) -> Result<()> {
    same_shape(dst, src, what)?;
    if !dst.is_contiguous() {
        return Err(MgpoError::Backend(format!("{what} must be contiguous to be updated in place")));
    }
    let flat_dst = dst.detach().flatten_all().map_err(backend_err)?;
    let flat_src = src.detach().flatten_all().map_err(backend_err)?;
    flat_dst.slice_set(&flat_src, 0, 0).map_err(backend_err)
}

/// `t` as f64 where the computation can run: on its device when the device
/// has f64, else on the host.
fn as_f64(t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    match t.to_dtype(DType::F64) {
        Ok(x) => Ok(x),
        Err(_) => t.to_device(&Device::Cpu).and_then(|x| x.to_dtype(DType::F64)).map_err(backend_err),
    }
}

fn f64_of<E: CpuFloat>(x: E) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

/// sum x^2 in f64, chunked so that the order of additions is fixed (the
/// same order as the sum of m^2 returned by [`adamw_slices`]).
fn sum_sq_slice<E: CpuFloat>(x: &[E], par: bool) -> f64 {
    let part = kernels::sum_sq::<E>;
    if par {
        x.par_chunks(CHUNK).map(part).collect::<Vec<_>>().iter().sum()
    } else {
        x.chunks(CHUNK).map(part).sum()
    }
}

/// The fused AdamW pass over one tensor; returns sum m^2 of the new m.
fn adamw_slices<E: CpuFloat>(p: &mut [E], g: &[E], m: &mut [E], v: &mut [E], c: &AdamWConsts<E>, par: bool) -> f64 {
    let body = |p: &mut [E], g: &[E], m: &mut [E], v: &mut [E]| kernels::adamw(p, g, m, v, c);
    if par {
        let parts: Vec<f64> = p
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .map(|(((p, g), m), v)| body(p, g, m, v))
            .collect();
        parts.iter().sum()
    } else {
        p.chunks_mut(CHUNK)
            .zip(g.chunks(CHUNK))
            .zip(m.chunks_mut(CHUNK))
            .zip(v.chunks_mut(CHUNK))
            .map(|(((p, g), m), v)| body(p, g, m, v))
            .sum()
    }
}

impl CandleBackend {
    fn adamw_cpu<E: CpuFloat>(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: &AdamWStep) -> Result<f64> {
        let c = k.consts::<E>();
        let par = p.elem_count() >= self.par_threshold;
        with_mut::<E, _>(p, "p", |ps| {
            with_mut::<E, _>(m, "m", |ms| {
                with_mut::<E, _>(v, "v", |vs| with_refs::<E, _>(&[g], "g", |gs| Ok(adamw_slices(ps, gs[0], ms, vs, &c, par))))
            })
        })
    }

    fn adamw_chain(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: &AdamWStep) -> candle_core::Result<Tensor> {
        let (p0, g0, m0, v0) = (p.detach(), g.detach(), m.detach(), v.detach());
        let g = g0.affine(k.grad_scale, 0.0)?;
        let clean = if k.unperturb != 0.0 { (&p0 - m0.affine(k.unperturb, 0.0)?)? } else { p0 };
        let mm = (m0.affine(k.beta1, 0.0)? + g.affine(1.0 - k.beta1, 0.0)?)?;
        let vv = (v0.affine(k.beta2, 0.0)? + g.sqr()?.affine(1.0 - k.beta2, 0.0)?)?;
        let denom = vv.sqrt()?.affine(1.0 / k.bias2_sqrt, k.eps)?;
        let pn = (clean.affine(k.decay, 0.0)? - (&mm / &denom)?.affine(k.step_size, 0.0)?)?;
        let wr = |d: &Tensor, s: &Tensor, w| write_into(d, s, w).map_err(candle_core::Error::wrap);
        wr(p, &pn, "p")?;
        wr(m, &mm, "m")?;
        wr(v, &vv, "v")?;
        Ok(mm)
    }

    fn axpy_cpu<E: CpuFloat>(&self, y: &Tensor, alpha: f64, x: &Tensor) -> Result<()> {
        let a = E::from(alpha).unwrap_or_else(E::nan);
        let par = y.elem_count() >= self.par_threshold;
        with_mut::<E, _>(y, "y", |ys| {
            with_refs::<E, _>(&[x], "x", |xs| {
                let xs = xs[0];
                if par {
                    ys.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(y, x)| kernels::axpy(y, a, x));
                } else {
                    kernels::axpy(ys, a, xs);
                }
                Ok(())
            })
        })
    }

    /// y_i <- y_i + alpha z_i, z_i = gaussian(seed, i) drawn in place, in
    /// the element order of mgpo-ndarray (same bits).
    fn axpy_noise_cpu<E: CpuFloat>(&self, y: &Tensor, alpha: f64, seed: u64) -> Result<()> {
        let par = y.elem_count() >= self.par_threshold;
        with_mut::<E, _>(y, "y", |ys| {
            if par {
                ys.par_chunks_mut(CHUNK).enumerate().for_each(|(b, c)| kernels::axpy_noise(c, alpha, seed, b * CHUNK));
            } else {
                kernels::axpy_noise(ys, alpha, seed, 0);
            }
            Ok(())
        })
    }

    fn sum_sq_cpu<E: CpuFloat>(&self, t: &Tensor) -> Result<f64> {
        let par = t.elem_count() >= self.par_threshold;
        with_refs::<E, _>(&[t], "tensor", |x| Ok(sum_sq_slice(x[0], par)))
    }

    /// X^T Y (n x r each) in f64.
    fn gram_cols_cpu<E: CpuFloat>(&self, x: &Tensor, y: &Tensor, r: usize) -> Result<Vec<f64>> {
        let sym = x.id() == y.id();
        with_refs::<E, _>(&[x, y], "gram_cols", |xy| Ok(kernels::gram_cols(xy[0], xy[1], r, sym)))
    }

    /// X Y^T (r x n each) in f64.
    fn gram_rows_cpu<E: CpuFloat>(&self, x: &Tensor, y: &Tensor, r: usize) -> Result<Vec<f64>> {
        let sym = x.id() == y.id();
        with_refs::<E, _>(&[x, y], "gram_rows", |xy| Ok(kernels::gram_rows(xy[0], xy[1], r, sym)))
    }

    /// W += c (P Q + R S), row by row: each row o of W gets
    /// sum_k (P[o,k] Q[k,:] + R[o,k] S[k,:]) accumulated in an f64 buffer of
    /// one row, then one rounding into W. Memory: one row, never an out x in temporary.
    fn add_low_rank_cpu<E: CpuFloat>(
        &self,
        w: &Tensor,
        c: f64,
        (p, q, r, s): (&Tensor, &Tensor, &Tensor, &Tensor),
        (inp, rank): (usize, usize),
    ) -> Result<()> {
        let par = w.elem_count() >= self.par_threshold;
        with_mut::<E, _>(w, "W", |ws| {
            with_refs::<E, _>(&[p, q, r, s], "add_low_rank", |pqrs| {
                let (ps, qs, rs, ss) = (pqrs[0], pqrs[1], pqrs[2], pqrs[3]);
                let row = |(o, wr): (usize, &mut [E])| {
                    let mut acc = vec![0.0f64; inp];
                    for k in 0..rank {
                        let (pk, rk) = (f64_of(ps[o * rank + k]), f64_of(rs[o * rank + k]));
                        let (qk, sk) = (&qs[k * inp..(k + 1) * inp], &ss[k * inp..(k + 1) * inp]);
                        for ((a, &qv), &sv) in acc.iter_mut().zip(qk).zip(sk) {
                            *a += pk * f64_of(qv) + rk * f64_of(sv);
                        }
                    }
                    for (wv, a) in wr.iter_mut().zip(&acc) {
                        *wv = E::from(f64_of(*wv) + c * a).unwrap_or_else(E::nan);
                    }
                };
                if par {
                    ws.par_chunks_mut(inp.max(1)).enumerate().for_each(row);
                } else {
                    ws.chunks_mut(inp.max(1)).enumerate().for_each(row);
                }
                Ok(())
            })
        })
    }
}

impl Tensors for CandleBackend {
    type Tensor = Tensor;

    fn shape(&self, t: &Tensor) -> Vec<usize> {
        t.dims().to_vec()
    }

    fn zeros_like(&self, t: &Tensor) -> Result<Tensor> {
        Tensor::zeros(t.shape(), t.dtype(), t.device()).map_err(backend_err)
    }
}

impl Reduce for CandleBackend {
    fn sum_sq(&self, t: &Tensor) -> Result<f64> {
        match self.cpu_kind(&[t])? {
            Some(DType::F32) => self.sum_sq_cpu::<f32>(t),
            Some(_) => self.sum_sq_cpu::<f64>(t),
            None => as_f64(t).and_then(|x| x.sqr().and_then(|x| x.sum_all()).and_then(|x| x.to_scalar::<f64>()).map_err(backend_err)),
        }
    }

    fn all_finite(&self, t: &Tensor) -> Result<bool> {
        let v = as_f64(t)?.flatten_all().and_then(|x| x.to_vec1::<f64>()).map_err(backend_err)?;
        Ok(v.iter().all(|x| x.is_finite()))
    }
}

impl FusedUpdate for CandleBackend {
    fn axpy_noise(&self, y: &mut Tensor, alpha: f64, seed: u64) -> Result<()> {
        match self.cpu_kind(&[y])? {
            Some(DType::F32) => self.axpy_noise_cpu::<f32>(y, alpha, seed),
            Some(_) => self.axpy_noise_cpu::<f64>(y, alpha, seed),
            None => noise::axpy_noise_via_host(self, y, alpha, seed),
        }
    }

    fn axpy(&self, y: &mut Tensor, alpha: f64, x: &Tensor) -> Result<()> {
        same_shape(y, x, "axpy")?;
        check_distinct(&[(y, "y"), (x, "x")])?;
        match self.cpu_kind(&[y, x])? {
            Some(DType::F32) => self.axpy_cpu::<f32>(y, alpha, x),
            Some(_) => self.axpy_cpu::<f64>(y, alpha, x),
            None => {
                let n = (y.detach() + x.detach().affine(alpha, 0.0).map_err(backend_err)?).map_err(backend_err)?;
                write_into(y, &n, "y")
            }
        }
    }

    fn adamw(&self, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, k: &AdamWStep) -> Result<f64> {
        for (t, w) in [(g, "g"), (&*m, "m"), (&*v, "v")] {
            same_shape(p, t, w)?;
        }
        check_distinct(&[(p, "p"), (g, "g"), (m, "m"), (v, "v")])?;
        match self.cpu_kind(&[p, g, m, v])? {
            Some(DType::F32) => self.adamw_cpu::<f32>(p, g, m, v, k),
            Some(_) => self.adamw_cpu::<f64>(p, g, m, v, k),
            None => {
                let mm = self.adamw_chain(p, g, m, v, k).map_err(backend_err)?;
                let sq = as_f64(&mm)?.sqr().and_then(|x| x.sum_all()).and_then(|x| x.to_scalar::<f64>());
                sq.map_err(backend_err)
            }
        }
    }
}

impl LowRank for CandleBackend {
    fn gram_cols(&self, x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
        let (_, r) = matrix(x, "gram_cols X")?;
        matrix(y, "gram_cols Y")?;
        same_shape(x, y, "gram_cols")?;
        match self.cpu_kind(&[x, y])? {
            Some(DType::F32) => self.gram_cols_cpu::<f32>(x, y, r),
            Some(_) => self.gram_cols_cpu::<f64>(x, y, r),
            None => {
                let (x, y) = (as_f64(x)?, as_f64(y)?);
                let g = x.t().and_then(|xt| xt.matmul(&y)).and_then(|g| g.flatten_all()).and_then(|g| g.to_vec1::<f64>());
                g.map_err(backend_err)
            }
        }
    }

    fn gram_rows(&self, x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
        let (r, _) = matrix(x, "gram_rows X")?;
        matrix(y, "gram_rows Y")?;
        same_shape(x, y, "gram_rows")?;
        match self.cpu_kind(&[x, y])? {
            Some(DType::F32) => self.gram_rows_cpu::<f32>(x, y, r),
            Some(_) => self.gram_rows_cpu::<f64>(x, y, r),
            None => {
                let (x, y) = (as_f64(x)?, as_f64(y)?);
                let g = y.t().and_then(|yt| x.matmul(&yt)).and_then(|g| g.flatten_all()).and_then(|g| g.to_vec1::<f64>());
                g.map_err(backend_err)
            }
        }
    }

    fn add_low_rank(&self, w: &mut Tensor, c: f64, p: &Tensor, q: &Tensor, r: &Tensor, s: &Tensor) -> Result<()> {
        let (out, inp) = matrix(w, "W")?;
        let (pr, pc) = matrix(p, "P")?;
        let (qr, qc) = matrix(q, "Q")?;
        same_shape(p, r, "R")?;
        same_shape(q, s, "S")?;
        if pr != out || qc != inp || pc != qr {
            return Err(MgpoError::Backend(format!("add_low_rank: W {:?} += {:?} x {:?} does not fit", (out, inp), (pr, pc), (qr, qc))));
        }
        check_distinct(&[(w, "W"), (p, "P"), (q, "Q")])?;
        check_distinct(&[(w, "W"), (r, "R"), (s, "S")])?;
        match self.cpu_kind(&[w, p, q, r, s])? {
            Some(DType::F32) => self.add_low_rank_cpu::<f32>(w, c, (p, q, r, s), (inp, pc)),
            Some(_) => self.add_low_rank_cpu::<f64>(w, c, (p, q, r, s), (inp, pc)),
            None => {
                // [P R] (out x 2r) times [Q; S] (2r x in): one product, one
                // out x in temporary on the device.
                let f = || -> candle_core::Result<Tensor> {
                    let left = Tensor::cat(&[&p.detach(), &r.detach()], D::Minus1)?;
                    let right = Tensor::cat(&[&q.detach(), &s.detach()], 0)?;
                    w.detach() + left.matmul(&right)?.affine(c, 0.0)?
                };
                let n = f().map_err(backend_err)?;
                write_into(w, &n, "W")
            }
        }
    }

    /// Forms [P R] [Q; S] with candle's matrix product where that is
    /// cheaper than the Gram matrices ([`mgpo_core::backend::materialise_is_cheaper`]:
    /// small layers at high rank, where the product is no larger than the
    /// adapter); its sum of squares is taken in f64.
    fn low_rank_norm_sq(&self, p: &Tensor, q: &Tensor, r: &Tensor, s: &Tensor) -> Result<f64> {
        let (out, rank) = matrix(p, "P")?;
        let (qr, inp) = matrix(q, "Q")?;
        same_shape(p, r, "R")?;
        same_shape(q, s, "S")?;
        if qr != rank {
            return Err(MgpoError::Backend(format!("low_rank_norm_sq: P {:?} x Q {:?} does not fit", (out, rank), (qr, inp))));
        }
        if !materialise_is_cheaper(out, inp, rank) {
            return mgpo_core::backend::lowrank::sum_of_products_sq(self, p, q, r, s);
        }
        let d = (|| {
            let left = Tensor::cat(&[&p.detach(), &r.detach()], 1)?;
            let right = Tensor::cat(&[&q.detach(), &s.detach()], 0)?;
            left.matmul(&right)
        })()
        .map_err(backend_err)?;
        self.sum_sq(&d)
    }
}

impl HostIo for CandleBackend {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(MgpoError::Backend(format!("shape {shape:?} needs {n} values, got {}", data.len())));
        }
        Tensor::from_slice(data, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(self.dtype))
            .and_then(|t| t.to_device(&self.device))
            .map_err(backend_err)
    }

    fn to_f64(&self, t: &Tensor) -> Result<Vec<f64>> {
        as_f64(t)?.flatten_all().and_then(|x| x.to_vec1::<f64>()).map_err(backend_err)
    }
}

/// A candle tensor is a reference-counted handle to its storage, so a clone
/// is a second handle to the same values (and keeps the tensor's id, which
/// is how a `GradStore` finds its gradient).
impl Shares for CandleBackend {
    fn share(&self, t: &Tensor) -> Tensor {
        t.clone()
    }
}
