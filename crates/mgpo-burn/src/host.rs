//! In-place access to the memory of f32 / f64 tensors of burn's ndarray
//! backend, through burn's `extension` API (`Tensor::try_into_primitive`):
//! a tensor is taken out of its slot as the `ndarray::ArcArray` it wraps,
//! written through `as_slice_mut` and put back, with no copy when the array
//! is uniquely owned (copy-on-write when it is shared, as burn-ndarray's own
//! in-place operations do).

#![allow(deprecated)] // burn-ndarray is deprecated in burn 0.22 (for burn-flex) but still shipped.

use std::sync::OnceLock;

use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::{DType, Device, Tensor};
use mgpo_core::{MgpoError, Result};
use ndarray::{ArcArray, IxDyn};
use num_traits::Float;

/// burn's ndarray device (the deprecated constructor is the only way to name it).
#[allow(deprecated)]
pub fn ndarray_device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(Device::ndarray)
}

/// Element types with in-place host kernels.
pub(crate) trait HostFloat: Float + ndarray::LinalgScalar + Send + Sync + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn unwrap(t: NdArrayTensor) -> Option<ArcArray<Self, IxDyn>>;
    fn wrap(a: ArcArray<Self, IxDyn>) -> NdArrayTensor;
}

impl HostFloat for f32 {
    const DTYPE: DType = DType::F32;
    fn unwrap(t: NdArrayTensor) -> Option<ArcArray<f32, IxDyn>> {
        match t {
            NdArrayTensor::F32(s) => Some(s.into_owned()),
            _ => None,
        }
    }
    fn wrap(a: ArcArray<f32, IxDyn>) -> NdArrayTensor {
        NdArrayTensor::F32(a.into())
    }
}

impl HostFloat for f64 {
    const DTYPE: DType = DType::F64;
    fn unwrap(t: NdArrayTensor) -> Option<ArcArray<f64, IxDyn>> {
        match t {
            NdArrayTensor::F64(s) => Some(s.into_owned()),
            _ => None,
        }
    }
    fn wrap(a: ArcArray<f64, IxDyn>) -> NdArrayTensor {
        NdArrayTensor::F64(a.into())
    }
}

/// The host element type of `t` when it can take the in-place kernels: an
/// f32 or f64 tensor of the ndarray backend without autodiff.
pub(crate) fn host_dtype(t: &Tensor<1>) -> Option<DType> {
    let d = t.dtype();
    (matches!(d, DType::F32 | DType::F64) && !t.is_autodiff() && t.device() == *ndarray_device()).then_some(d)
}

fn array_of<E: HostFloat>(t: Tensor<1>) -> Result<ArcArray<E, IxDyn>> {
    let prim = t.try_into_primitive::<NdArray>().map_err(|e| MgpoError::Backend(format!("not an ndarray tensor: {e:?}")))?;
    E::unwrap(prim).ok_or_else(|| MgpoError::Backend(format!("expected a {:?} tensor", E::DTYPE)))
}

/// A zero-element tensor that holds a slot while its tensor is taken out.
fn placeholder<E: HostFloat>() -> Tensor<1> {
    let empty = ArcArray::from_shape_vec(IxDyn(&[0]), Vec::new()).expect("an empty array has shape [0]");
    Tensor::from_primitive::<NdArray>(E::wrap(empty))
}

/// A tensor taken out of its slot to be written in place; put back when
/// dropped (also on an early return), so the slot always holds a tensor.
pub(crate) struct Taken<'a, E: HostFloat> {
    slot: &'a mut Tensor<1>,
    array: Option<ArcArray<E, IxDyn>>,
}

impl<'a, E: HostFloat> Taken<'a, E> {
    pub(crate) fn new(slot: &'a mut Tensor<1>) -> Result<Self> {
        let t = std::mem::replace(slot, placeholder::<E>());
        match array_of::<E>(t) {
            Ok(a) => Ok(Taken { slot, array: Some(a) }),
            Err(e) => Err(e),
        }
    }

    /// The elements in row-major order, unshared first (a copy only when
    /// another handle still holds the same memory).
    pub(crate) fn slice_mut(&mut self) -> &mut [E] {
        let a = self.array.as_mut().expect("taken until dropped");
        if !a.is_standard_layout() {
            *a = a.as_standard_layout().into_owned().into_shared();
        }
        a.as_slice_mut().expect("a standard-layout array is one slice")
    }
}

impl<E: HostFloat> Drop for Taken<'_, E> {
    fn drop(&mut self) {
        if let Some(a) = self.array.take() {
            *self.slot = Tensor::from_primitive::<NdArray>(E::wrap(a));
        }
    }
}

/// A read-only view of a tensor's elements (a handle on the same memory).
pub(crate) struct Read<E: HostFloat>(ArcArray<E, IxDyn>);

impl<E: HostFloat> Read<E> {
    pub(crate) fn new(t: &Tensor<1>) -> Result<Self> {
        let a = array_of::<E>(t.clone())?;
        Ok(Read(if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned().into_shared() }))
    }

    pub(crate) fn slice(&self) -> &[E] {
        self.0.as_slice().expect("standard layout")
    }
}
