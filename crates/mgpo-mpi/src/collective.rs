//! The collective operations data-parallel and sharded training need,
//! behind one small object-safe trait so that another engine (NCCL, say)
//! can be plugged in beside MPI.
//!
//! Buffers are flat slices of a supported element type, passed as the
//! [`Buf`] / [`BufMut`] enums: one method per operation rather than one per
//! dtype, and an engine that lacks a dtype says so with
//! [`CommError::Unsupported`].
//!
//! Every operation is collective: all ranks call it, in the same order, with
//! the same lengths. A rank that returns an error before calling into the
//! engine (a length check, say) leaves the others waiting on it; the checks
//! depend only on lengths, which agree on all ranks of a correct program.

/// What went wrong in a collective call or while bucketing tensors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// Buffers whose lengths do not fit the operation.
    #[error("{op}: {detail}")]
    Length {
        /// The operation.
        op: &'static str,
        /// Which lengths, and what they should be.
        detail: String,
    },
    /// A send and a receive buffer of different element types.
    #[error("{op}: send buffer is {send}, receive buffer is {recv}")]
    DtypeMismatch {
        /// The operation.
        op: &'static str,
        /// The send buffer's element type.
        send: &'static str,
        /// The receive buffer's element type.
        recv: &'static str,
    },
    /// A root rank outside the communicator.
    #[error("{op}: root rank {root} outside a communicator of {size} ranks")]
    Root {
        /// The operation.
        op: &'static str,
        /// The root given.
        root: usize,
        /// The communicator's size.
        size: usize,
    },
    /// A tensor whose elements are not one contiguous row-major slice.
    #[error("tensor {index} is not contiguous in row-major order (shape {shape:?})")]
    NotContiguous {
        /// Its position among the tensors of the call.
        index: usize,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// An invalid argument to a constructor (a zero-sized bucket, say).
    #[error("{0}")]
    Invalid(String),
    /// Something the engine cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// A failure reported by the engine (MPI initialisation, say).
    #[error("engine: {0}")]
    Engine(String),
    /// An error of the optimizer while a sharded driver read or wrote its
    /// state (a checkpoint that cannot be written, say).
    #[error("optimizer: {0}")]
    Optimizer(mgpo_core::MgpoError),
}

/// The result of a collective call.
pub type Result<T> = std::result::Result<T, CommError>;

/// A read-only flat buffer.
#[derive(Debug, Clone, Copy)]
pub enum Buf<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f64 elements.
    F64(&'a [f64]),
}

/// A writable flat buffer.
#[derive(Debug)]
pub enum BufMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f64 elements.
    F64(&'a mut [f64]),
}

impl Buf<'_> {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        match self {
            Buf::F32(x) => x.len(),
            Buf::F64(x) => x.len(),
        }
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its element type's name (`f32`, `f64`).
    pub fn dtype(&self) -> &'static str {
        match self {
            Buf::F32(_) => "f32",
            Buf::F64(_) => "f64",
        }
    }
}

impl BufMut<'_> {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufMut::F32(x) => x.len(),
            BufMut::F64(x) => x.len(),
        }
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its element type's name (`f32`, `f64`).
    pub fn dtype(&self) -> &'static str {
        match self {
            BufMut::F32(_) => "f32",
            BufMut::F64(_) => "f64",
        }
    }
}

/// Element types that travel through a [`Collective`].
pub trait Scalar: Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static {
    /// `x` as a read-only buffer.
    fn buf(x: &[Self]) -> Buf<'_>;
    /// `x` as a writable buffer.
    fn buf_mut(x: &mut [Self]) -> BufMut<'_>;
    /// The nearest value of this type.
    fn from_f64(x: f64) -> Self;
    /// `self * other` (averaging a sum: multiplying by 1 / ranks).
    fn mul(self, other: Self) -> Self;
}

impl Scalar for f32 {
    fn buf(x: &[f32]) -> Buf<'_> {
        Buf::F32(x)
    }
    fn buf_mut(x: &mut [f32]) -> BufMut<'_> {
        BufMut::F32(x)
    }
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn mul(self, other: f32) -> f32 {
        self * other
    }
}

impl Scalar for f64 {
    fn buf(x: &[f64]) -> Buf<'_> {
        Buf::F64(x)
    }
    fn buf_mut(x: &mut [f64]) -> BufMut<'_> {
        BufMut::F64(x)
    }
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn mul(self, other: f64) -> f64 {
        self * other
    }
}

/// A group of `size` ranks that exchange buffers.
///
/// Sums are element-wise; which order an engine adds the ranks' values in
/// is its own (f32 sums reassociate with the number of ranks), but every
/// result is computed once and sent to every rank, so all ranks receive the
/// same bits. The exception is [`Collective::all_reduce_partial_sums`], whose
/// order is fixed: rank 0 + rank 1 + ... on every rank.
pub trait Collective {
    /// This process's rank, 0 to `size() - 1`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;

    /// `sums[i] <- sum over ranks r (in rank order) of sums_r[i]`: the
    /// combination of per-rank partial sums (sums of squares of the tensors a
    /// rank owns, say). A value that only one rank contributes (the others
    /// holding 0) comes back with its own bits.
    fn all_reduce_partial_sums(&self, sums: &mut [f64]) -> Result<()>;

    /// `buf[i] <- sum over ranks of buf_r[i]`, in place, any length.
    fn all_reduce_sum(&self, buf: BufMut<'_>) -> Result<()>;

    /// With `recv.len() = n` and `send.len() = n * size`: rank r receives
    /// block r of the sum, `recv[i] = sum over ranks of send[r n + i]`.
    fn reduce_scatter_sum(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()>;

    /// With `send.len() = n` and `recv.len() = n * size`: every rank
    /// receives every rank's `send`, in rank order.
    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()>;

    /// Every rank's `buf` gets the contents of `root`'s.
    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<()>;

    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()>;
}

impl<C: Collective + ?Sized> Collective for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_reduce_partial_sums(&self, sums: &mut [f64]) -> Result<()> {
        (**self).all_reduce_partial_sums(sums)
    }
    fn all_reduce_sum(&self, buf: BufMut<'_>) -> Result<()> {
        (**self).all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
        (**self).reduce_scatter_sum(send, recv)
    }
    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
        (**self).all_gather(send, recv)
    }
    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
}

/// The checks every engine makes before a scatter or gather: same dtype,
/// and `long = short * size`.
pub(crate) fn check_blocks(op: &'static str, send: &Buf<'_>, recv: &BufMut<'_>, size: usize, send_is_long: bool) -> Result<()> {
    if send.dtype() != recv.dtype() {
        return Err(CommError::DtypeMismatch { op, send: send.dtype(), recv: recv.dtype() });
    }
    let (long, short) = if send_is_long { (send.len(), recv.len()) } else { (recv.len(), send.len()) };
    if short.checked_mul(size) != Some(long) {
        let (l, s) = if send_is_long { ("send", "receive") } else { ("receive", "send") };
        return Err(CommError::Length {
            op,
            detail: format!("{l} buffer has {long} elements, expected {size} ranks x {short} ({s} buffer)"),
        });
    }
    Ok(())
}

pub(crate) fn check_root(op: &'static str, root: usize, size: usize) -> Result<()> {
    if root < size {
        Ok(())
    } else {
        Err(CommError::Root { op, root, size })
    }
}
