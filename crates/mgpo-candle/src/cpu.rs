//! Direct access to the memory of CPU tensors, through candle's public API.
//!
//! candle 0.11 keeps a tensor's storage behind a private lock; the only
//! public ways in are [`Tensor::storage_and_layout`] (a read guard) and the
//! user-defined in-place ops ([`candle_core::InplaceOp1`] and friends), whose
//! `cpu_fwd` receives `&mut CpuStorage` for exactly one destination tensor.
//! An AdamW step must write three tensors (p, m, v) in one pass, so
//! [`with_mut`] runs a closure inside the `cpu_fwd` of a one-off in-place op
//! and nests: the write lock of p is held while the op of m runs, and so on.
//! No `unsafe` is needed. Nesting locks on one storage twice would deadlock
//! (`parking_lot`'s lock is not reentrant), so every caller first checks
//! that the tensors it locks are backed by distinct storages
//! ([`check_distinct`]).

use std::cell::Cell;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use mgpo_core::{MgpoError, Result};
use num_traits::Float;

/// Element types with a fused CPU path.
pub(crate) trait CpuFloat: Float + Send + Sync + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl CpuFloat for f32 {
    const DTYPE: DType = DType::F32;
    fn slice(s: &CpuStorage) -> Option<&[f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CpuFloat for f64 {
    const DTYPE: DType = DType::F64;
    fn slice(s: &CpuStorage) -> Option<&[f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f64]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

pub(crate) fn backend_err(e: impl std::fmt::Display) -> MgpoError {
    MgpoError::Backend(e.to_string())
}

/// The element range of a contiguous layout.
fn range(l: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    l.contiguous_offsets().map(|(a, b)| a..b).ok_or_else(|| MgpoError::Backend(format!("{what} must be contiguous to be updated in place")))
}

/// An identity of the storage behind `t`: equal for tensors that share
/// memory (views, clones, a `Var` and its tensor).
pub(crate) fn storage_id(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const Storage as usize
}

/// Fails unless all tensors are backed by pairwise distinct storages.
pub(crate) fn check_distinct(ts: &[(&Tensor, &str)]) -> Result<()> {
    let ids: Vec<usize> = ts.iter().map(|(t, _)| storage_id(t)).collect();
    for i in 0..ids.len() {
        for j in i + 1..ids.len() {
            if ids[i] == ids[j] {
                return Err(MgpoError::Backend(format!(
                    "{} and {} share their storage; an in-place update needs distinct tensors",
                    ts[i].1, ts[j].1
                )));
            }
        }
    }
    Ok(())
}

/// The one-off in-place op that hands `cpu_fwd`'s storage to a closure.
struct WithMut<F, R> {
    f: Cell<Option<F>>,
    out: Cell<Option<R>>,
}

impl<F, R> InplaceOp1 for WithMut<F, R>
where
    F: FnOnce(&mut CpuStorage, &Layout) -> R,
{
    fn name(&self) -> &'static str {
        "mgpo-cpu-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        if let Some(f) = self.f.take() {
            self.out.set(Some(f(storage, layout)));
        }
        Ok(())
    }
}

/// Runs `f` on the mutable contiguous slice of the CPU tensor `t`, holding
/// its write lock. The caller must not lock `t`'s storage again inside `f`.
pub(crate) fn with_mut<E: CpuFloat, R>(t: &Tensor, what: &str, f: impl FnOnce(&mut [E]) -> Result<R>) -> Result<R> {
    let op = WithMut {
        f: Cell::new(Some(|s: &mut CpuStorage, l: &Layout| -> Result<R> {
            let r = range(l, what)?;
            let d = E::slice_mut(s).ok_or_else(|| MgpoError::Backend(format!("{what}: expected {:?} storage", E::DTYPE)))?;
            f(&mut d[r])
        })),
        out: Cell::new(None),
    };
    t.inplace_op1(&op).map_err(backend_err)?;
    op.out.take().unwrap_or_else(|| Err(MgpoError::Backend(format!("{what}: not a CPU tensor"))))
}

/// Runs `f` on the contiguous slices of the CPU tensors `ts` (each made
/// contiguous first when it is a strided view, such as the gradient of a
/// transposed weight). Tensors that share a storage are read-locked once.
pub(crate) fn with_refs<E: CpuFloat, R>(ts: &[&Tensor], what: &str, f: impl FnOnce(&[&[E]]) -> Result<R>) -> Result<R> {
    let owned: Vec<Tensor> = ts
        .iter()
        .map(|t| if t.is_contiguous() { Ok((*t).clone()) } else { t.contiguous() })
        .collect::<candle_core::Result<_>>()
        .map_err(backend_err)?;
    let ids: Vec<usize> = owned.iter().map(storage_id).collect();
    // One read guard per distinct storage, then each tensor's slice of it.
    let mut guards = Vec::new();
    let mut which = Vec::with_capacity(owned.len());
    for (i, t) in owned.iter().enumerate() {
        match ids[..i].iter().position(|&id| id == ids[i]) {
            Some(j) => which.push(which[j]),
            None => {
                guards.push(t.storage_and_layout().0);
                which.push(guards.len() - 1);
            }
        }
    }
    let mut slices = Vec::with_capacity(owned.len());
    for (t, &g) in owned.iter().zip(&which) {
        let r = range(t.layout(), what)?;
        match &*guards[g] {
            Storage::Cpu(c) => {
                let d = E::slice(c).ok_or_else(|| MgpoError::Backend(format!("{what}: expected {:?} storage", E::DTYPE)))?;
                slices.push(&d[r]);
            }
            _ => return Err(MgpoError::Backend(format!("{what}: not a CPU tensor"))),
        }
    }
    f(&slices)
}
