//! [`DfdxBackend<E>`]: the LoRA-MGPO tensor operations on dfdx's CPU
//! storage, for `E` = f32 or f64.
//!
//! dfdx 0.13 keeps a CPU tensor's elements in an `Arc` of its storage buffer
//! (`<Cpu as Storage<E>>::Vec`) and offers no public mutable view of it: a
//! tensor can only be read by copying (`as_vec`, `copy_into`) and written
//! by copying (`copy_from`). The optimizer's tensors therefore live in that
//! same storage buffer type, owned outright ([`DfTensor`]), so that every
//! element-wise update is one fused pass over slices, exactly as
//! [`mgpo_core::backend::adamw_element`] prescribes, with no copy in
//! between. The model-facing optimizer ([`crate::MgpoOptimizer`]) moves a
//! model's tensors in and out of buffers it keeps with one copy each way
//! ([`DfTensor::read_from`], [`DfTensor::write_into`]);
//! [`DfTensor::from_tensor`] and [`DfTensor::to_tensor`] do the same for callers.

use std::fmt;
use std::marker::PhantomData;

use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{Cpu, Storage, Tensor, TensorFromVec};
use mgpo_core::backend::{cpu as kernels, AdamWStep, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result};
use num_traits::Float;

/// Element types of the backend: f32 and f64. The two methods expose dfdx's
/// CPU storage buffer as a slice; the buffer type is only nameable through
/// the `Storage` projection, and only for a concrete `E` is it known to
/// dereference to a `Vec<E>`, hence one impl per type.
pub trait Element: Dtype + Float + fmt::Debug + Send + Sync + 'static {
    /// The elements of a storage buffer.
    fn slice(buf: &<Cpu as Storage<Self>>::Vec) -> &[Self];
    /// The elements of a storage buffer, mutably.
    fn slice_mut(buf: &mut <Cpu as Storage<Self>>::Vec) -> &mut [Self];
    /// Moves the elements out of a storage buffer, leaving it empty.
    fn take(buf: &mut <Cpu as Storage<Self>>::Vec) -> Vec<Self>;
}

macro_rules! element {
    ($t:ty) => {
        impl Element for $t {
            fn slice(buf: &<Cpu as Storage<$t>>::Vec) -> &[$t] {
                buf
            }
            fn slice_mut(buf: &mut <Cpu as Storage<$t>>::Vec) -> &mut [$t] {
                &mut *buf
            }
            fn take(buf: &mut <Cpu as Storage<$t>>::Vec) -> Vec<$t> {
                std::mem::take(&mut *buf)
            }
        }
    };
}
element!(f32);
element!(f64);

/// A dense row-major tensor of any rank in dfdx's CPU storage buffer: the
/// `Tensor` of [`DfdxBackend`]. The shape is dynamic because one optimizer
/// holds tensors of every rank (dfdx encodes the rank in the type).
pub struct DfTensor<E: Element> {
    buf: <Cpu as Storage<E>>::Vec,
    shape: Vec<usize>,
}

impl<E: Element> Clone for DfTensor<E> {
    fn clone(&self) -> Self {
        DfTensor { buf: self.buf.clone(), shape: self.shape.clone() }
    }
}

impl<E: Element> fmt::Debug for DfTensor<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DfTensor").field("shape", &self.shape).field("data", &self.as_slice()).finish()
    }
}

fn cpu_err(e: dfdx::tensor::CpuError) -> MgpoError {
    MgpoError::Backend(format!("dfdx: {e}"))
}

impl<E: Element> DfTensor<E> {
    /// A zero tensor of `shape`, allocated through `dev` (and its cache).
    pub fn zeros(dev: &Cpu, shape: &[usize]) -> Result<Self> {
        let n = checked_numel(shape)?;
        Ok(DfTensor { buf: Storage::<E>::try_alloc_len(dev, n).map_err(cpu_err)?, shape: shape.to_vec() })
    }

    /// A copy of a dfdx tensor's elements, in row-major order whatever its strides.
    pub fn from_tensor<S: Shape, T>(t: &Tensor<S, E, Cpu, T>) -> Result<Self> {
        let shape: Vec<usize> = t.shape().concrete().into();
        let mut out = Self::zeros(t.device(), &shape)?;
        let v = t.as_vec();
        out.as_mut_slice().copy_from_slice(&v);
        Ok(out)
    }

    /// A dfdx tensor of shape `s` holding a copy of these elements; `s` must
    /// have the same dimensions as the tensor.
    pub fn to_tensor<S: Shape>(&self, dev: &Cpu, s: S) -> Result<Tensor<S, E, Cpu>> {
        let dims: Vec<usize> = s.concrete().into();
        if dims != self.shape {
            return Err(MgpoError::Backend(format!("to_tensor: tensor is {:?}, asked for {dims:?}", self.shape)));
        }
        dev.try_tensor_from_vec(self.as_slice().to_vec(), s).map_err(cpu_err)
    }

    /// Copies a dfdx tensor of the same dimensions into this one, without
    /// allocating. The tensor must be dense row-major (as dfdx allocates
    /// module tensors and gradients): its storage is copied as it lies.
    pub fn read_from<S: Shape, T>(&mut self, t: &Tensor<S, E, Cpu, T>) -> Result<()> {
        let dims: Vec<usize> = t.shape().concrete().into();
        if dims != self.shape {
            return Err(MgpoError::Backend(format!("read_from: tensor is {dims:?}, buffer is {:?}", self.shape)));
        }
        t.copy_into(self.as_mut_slice());
        Ok(())
    }

    /// Writes these elements into a dfdx tensor of the same dimensions, in
    /// place: the tensor keeps its id, so gradients and dfdx optimizer state
    /// keyed by it stay attached.
    pub fn write_into<S: Shape, T>(&self, t: &mut Tensor<S, E, Cpu, T>) -> Result<()> {
        let dims: Vec<usize> = t.shape().concrete().into();
        if dims != self.shape {
            return Err(MgpoError::Backend(format!("write_into: tensor is {:?}, target is {dims:?}", self.shape)));
        }
        t.copy_from(self.as_slice());
        Ok(())
    }

    /// Its shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Its number of elements.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements, row-major.
    pub fn as_slice(&self) -> &[E] {
        E::slice(&self.buf)
    }
    /// The elements, row-major, to write in place.
    pub fn as_mut_slice(&mut self) -> &mut [E] {
        E::slice_mut(&mut self.buf)
    }
    /// The elements, moved out without a copy.
    pub fn into_vec(mut self) -> Vec<E> {
        E::take(&mut self.buf)
    }
}

fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| MgpoError::Backend(format!("shape {shape:?} has too many elements")))
}

/// The LoRA-MGPO backend on dfdx's CPU device for element type `E`.
pub struct DfdxBackend<E> {
    dev: Cpu,
    _e: PhantomData<fn() -> E>,
}

impl<E> Clone for DfdxBackend<E> {
    fn clone(&self) -> Self {
        DfdxBackend { dev: self.dev.clone(), _e: PhantomData }
    }
}

impl<E> fmt::Debug for DfdxBackend<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DfdxBackend<{}>(Cpu)", std::any::type_name::<E>())
    }
}

impl<E> Default for DfdxBackend<E> {
    fn default() -> Self {
        Self::new(Cpu::default())
    }
}

impl<E> DfdxBackend<E> {
    /// The backend on `dev` (its allocation cache is shared with the models on it).
    pub fn new(dev: Cpu) -> Self {
        DfdxBackend { dev, _e: PhantomData }
    }
    /// The device new tensors are allocated on.
    pub fn device(&self) -> &Cpu {
        &self.dev
    }
}

fn same_shape<E: Element>(what: &str, a: &DfTensor<E>, b: &DfTensor<E>) -> Result<()> {
    if a.shape == b.shape {
        Ok(())
    } else {
        Err(MgpoError::Backend(format!("{what}: shapes differ: {:?} vs {:?}", a.shape, b.shape)))
    }
}

/// (rows, cols) of a matrix.
fn dims<E: Element>(t: &DfTensor<E>, what: &str) -> Result<(usize, usize)> {
    match t.shape[..] {
        [r, c] => Ok((r, c)),
        _ => Err(MgpoError::Backend(format!("{what} must be a matrix, got shape {:?}", t.shape))),
    }
}

fn f64_of<E: Element>(x: E) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

fn elem<E: Element>(x: f64) -> E {
    E::from(x).unwrap_or_else(E::nan)
}

impl<E: Element> Tensors for DfdxBackend<E> {
    type Tensor = DfTensor<E>;

    fn shape(&self, t: &DfTensor<E>) -> Vec<usize> {
        t.shape.clone()
    }

    fn zeros_like(&self, t: &DfTensor<E>) -> Result<DfTensor<E>> {
        DfTensor::zeros(&self.dev, &t.shape)
    }
}

impl<E: Element> Reduce for DfdxBackend<E> {
    fn sum_sq(&self, t: &DfTensor<E>) -> Result<f64> {
        Ok(kernels::sum_sq(t.as_slice()))
    }

    fn all_finite(&self, t: &DfTensor<E>) -> Result<bool> {
        Ok(t.as_slice().iter().all(|x| x.is_finite()))
    }
}

impl<E: Element> FusedUpdate for DfdxBackend<E> {
    /// y <- y + alpha x, one pass.
    fn axpy(&self, y: &mut DfTensor<E>, alpha: f64, x: &DfTensor<E>) -> Result<()> {
        same_shape("axpy", y, x)?;
        kernels::axpy(y.as_mut_slice(), elem::<E>(alpha), x.as_slice());
        Ok(())
    }

    fn axpy_noise(&self, y: &mut DfTensor<E>, alpha: f64, seed: u64) -> Result<()> {
        kernels::axpy_noise(y.as_mut_slice(), alpha, seed, 0);
        Ok(())
    }

    /// One pass of [`mgpo_core::backend::adamw_element`] over p, g, m, v, summing the new m^2 in f64.
    fn adamw(&self, p: &mut DfTensor<E>, g: &DfTensor<E>, m: &mut DfTensor<E>, v: &mut DfTensor<E>, k: &AdamWStep) -> Result<f64> {
        same_shape("adamw grad", p, g)?;
        same_shape("adamw m", p, m)?;
        same_shape("adamw v", p, v)?;
        Ok(kernels::adamw(p.as_mut_slice(), g.as_slice(), m.as_mut_slice(), v.as_mut_slice(), &k.consts::<E>()))
    }
}

impl<E: Element> LowRank for DfdxBackend<E> {
    /// X^T Y (r x r) for X, Y of shape n x r, accumulated in f64.
    fn gram_cols(&self, x: &DfTensor<E>, y: &DfTensor<E>) -> Result<Vec<f64>> {
        same_shape("gram_cols", x, y)?;
        let (_, r) = dims(x, "gram_cols X")?;
        Ok(kernels::gram_cols(x.as_slice(), y.as_slice(), r, std::ptr::eq(x, y)))
    }

    /// X Y^T (r x r) for X, Y of shape r x n, accumulated in f64.
    fn gram_rows(&self, x: &DfTensor<E>, y: &DfTensor<E>) -> Result<Vec<f64>> {
        same_shape("gram_rows", x, y)?;
        let (r, _) = dims(x, "gram_rows X")?;
        Ok(kernels::gram_rows(x.as_slice(), y.as_slice(), r, std::ptr::eq(x, y)))
    }

    /// W <- W + c (P Q + R S): for each row o of W and each k < r, two
    /// row updates W[o, :] += c P[o, k] Q[k, :] + c R[o, k] S[k, :]; no
    /// out x in temporary.
    fn add_low_rank(&self, w: &mut DfTensor<E>, c: f64, p: &DfTensor<E>, q: &DfTensor<E>, r: &DfTensor<E>, s: &DfTensor<E>) -> Result<()> {
        let (out, inp) = dims(w, "W")?;
        let (pd, qd, rd, sd) = (dims(p, "P")?, dims(q, "Q")?, dims(r, "R")?, dims(s, "S")?);
        for (x, y) in [(pd, qd), (rd, sd)] {
            if x.0 != out || y.1 != inp || x.1 != y.0 {
                return Err(MgpoError::Backend(format!(
                    "add_low_rank: W {:?} += {x:?} x {y:?} does not fit",
                    (out, inp)
                )));
            }
        }
        if inp == 0 {
            return Ok(());
        }
        let c: E = elem(c);
        let (p, q, r, s) = (p.as_slice(), q.as_slice(), r.as_slice(), s.as_slice());
        let (k1, k2) = (pd.1, rd.1);
        for (o, wr) in w.as_mut_slice().chunks_exact_mut(inp).enumerate() {
            for (coef, rows) in [(&p[o * k1..(o + 1) * k1], q), (&r[o * k2..(o + 1) * k2], s)] {
                for (&f, row) in coef.iter().zip(rows.chunks_exact(inp)) {
                    let a = c * f;
                    for (wj, &z) in wr.iter_mut().zip(row) {
                        *wj += a * z;
                    }
                }
            }
        }
        Ok(())
    }
}

impl<E: Element> HostIo for DfdxBackend<E> {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<DfTensor<E>> {
        let n = checked_numel(shape)?;
        if n != data.len() {
            return Err(MgpoError::Backend(format!("shape {shape:?} needs {n} elements, got {}", data.len())));
        }
        let mut t = DfTensor::zeros(&self.dev, shape)?;
        for (o, &x) in t.as_mut_slice().iter_mut().zip(data) {
            *o = elem(x);
        }
        Ok(t)
    }

    fn to_f64(&self, t: &DfTensor<E>) -> Result<Vec<f64>> {
        Ok(t.as_slice().iter().map(|&x| f64_of(x)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::prelude::*;

    fn be() -> DfdxBackend<f64> {
        DfdxBackend::default()
    }

    #[test]
    fn host_round_trip_and_shape_errors() {
        let b = be();
        let t = b.from_f64(&[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        assert_eq!(b.shape(&t), vec![2, 3]);
        assert_eq!(b.to_f64(&t).unwrap(), vec![1., 2., 3., 4., 5., 6.]);
        assert!(matches!(b.from_f64(&[2, 2], &[1.0]), Err(MgpoError::Backend(_))));
        assert!(matches!(b.from_f64(&[usize::MAX, 3], &[]), Err(MgpoError::Backend(_))));
        let z = b.zeros_like(&t).unwrap();
        assert_eq!(b.sum_sq(&z).unwrap(), 0.0);
    }

    #[test]
    fn dfdx_tensor_round_trip_keeps_id_and_values() {
        let dev = Cpu::default();
        let mut t: Tensor<Rank2<2, 3>, f32, Cpu> = dev.tensor([[1., 2., 3.], [4., 5., 6.]]);
        let x = DfTensor::from_tensor(&t).unwrap();
        assert_eq!(x.shape(), &[2, 3]);
        let mut y = x.clone();
        y.as_mut_slice()[4] = -1.0;
        // Gradients are keyed by tensor id: the write must keep it.
        let grads = t.leaky_trace().sum().backward();
        y.write_into(&mut t).unwrap();
        assert_eq!(t.array(), [[1., 2., 3.], [4., -1., 6.]]);
        assert_eq!(grads.get(&t).array(), [[1.0; 3]; 2]);
        // A transposed (strided) view comes out row-major in its own shape.
        let tt = DfTensor::from_tensor(&t.clone().permute::<Rank2<3, 2>, _>()).unwrap();
        assert_eq!(tt.as_slice(), &[1., 4., 2., -1., 3., 6.]);
        let back: Tensor<Rank2<3, 2>, f32, Cpu> = tt.to_tensor(&dev, Default::default()).unwrap();
        assert_eq!(back.array(), [[1., 4.], [2., -1.], [3., 6.]]);
        assert!(tt.to_tensor(&dev, Rank2::<2, 3>::default()).is_err());
        assert!(tt.write_into(&mut dev.zeros::<Rank2<2, 3>>()).is_err());
    }

    #[test]
    fn add_low_rank_matches_dense_products() {
        let b = be();
        let (out, inp, r) = (3, 4, 2);
        let v = |n: usize, s: f64| (0..n).map(|i| (i as f64 * 0.37 + s).sin()).collect::<Vec<_>>();
        let (p, q, rr, s, w0) = (v(out * r, 0.1), v(r * inp, 0.2), v(out * r, 0.3), v(r * inp, 0.4), v(out * inp, 0.5));
        let mut w = b.from_f64(&[out, inp], &w0).unwrap();
        let t = |d: &[f64], sh: &[usize]| b.from_f64(sh, d).unwrap();
        b.add_low_rank(&mut w, 0.5, &t(&p, &[out, r]), &t(&q, &[r, inp]), &t(&rr, &[out, r]), &t(&s, &[r, inp])).unwrap();
        let got = b.to_f64(&w).unwrap();
        for o in 0..out {
            for j in 0..inp {
                let dense: f64 = (0..r).map(|k| p[o * r + k] * q[k * inp + j] + rr[o * r + k] * s[k * inp + j]).sum();
                assert!((got[o * inp + j] - (w0[o * inp + j] + 0.5 * dense)).abs() < 1e-12);
            }
        }
        let bad = t(&q, &[inp, r]);
        assert!(b.add_low_rank(&mut w, 1.0, &bad, &t(&q, &[r, inp]), &t(&rr, &[out, r]), &t(&s, &[r, inp])).is_err());
    }

    #[test]
    fn grams_match_definitions() {
        let b = be();
        let x = b.from_f64(&[3, 2], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let y = b.from_f64(&[3, 2], &[1., 0., 0., 1., 1., 1.]).unwrap();
        // X^T Y: [[1+5, 3+5], [2+6, 4+6]]
        assert_eq!(b.gram_cols(&x, &y).unwrap(), vec![6., 8., 8., 10.]);
        let x = b.from_f64(&[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let y = b.from_f64(&[2, 3], &[1., 0., 0., 0., 1., 1.]).unwrap();
        assert_eq!(b.gram_rows(&x, &y).unwrap(), vec![1., 5., 4., 11.]);
        assert!(b.gram_rows(&x, &b.from_f64(&[3, 2], &[0.; 6]).unwrap()).is_err());
    }

    #[test]
    fn adamw_rejects_mismatched_shapes() {
        let b = be();
        let mut p = b.from_f64(&[2], &[1., 2.]).unwrap();
        let g = b.from_f64(&[3], &[1., 2., 3.]).unwrap();
        let (mut m, mut v) = (b.zeros_like(&p).unwrap(), b.zeros_like(&p).unwrap());
        let k = AdamWStep { unperturb: 0., decay: 1., grad_scale: 1., beta1: 0.9, beta2: 0.999, step_size: 1e-3, bias2_sqrt: 1., eps: 1e-8 };
        assert!(b.adamw(&mut p, &g, &mut m, &mut v, &k).is_err());
        assert!(b.axpy(&mut p, 1.0, &g).is_err());
    }
}
