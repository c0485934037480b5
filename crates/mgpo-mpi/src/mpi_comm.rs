//! [`Collective`] over MPI (the `mpi` crate, any MPI-3 library; built and
//! tested with Open MPI 4.1 from Debian).
//!
//! `all_reduce_sum` runs one of two ways ([`AllReduce`]): `MPI_Allreduce`
//! (the default), or a reduce-scatter followed by an all-gather, in which
//! each element's sum is computed on one rank and copied to the others.
//! Both give every rank the same bits with Open MPI 4.1, whose all-reduce
//! algorithms (basic linear, reduce + broadcast, recursive doubling, ring,
//! segmented ring, Rabenseifner) either compute each sum once and copy it
//! or have both partners of a pair add the same two values, and IEEE
//! addition is commutative; but the MPI standard only recommends that
//! ranks agree, while the scatter-gather form agrees by construction, at a
//! price (`docs/distributed.md` in the repository).

use std::cell::RefCell;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use crate::collective::{check_blocks, check_root, Buf, BufMut, Collective, CommError, Result};

/// How [`MpiComm`] sums a buffer across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllReduce {
    /// `MPI_Allreduce` into a scratch buffer, copied back: the library's own
    /// algorithm for the message size.
    #[default]
    Native,
    /// `MPI_Reduce_scatter_block` then `MPI_Allgather` (each rank sends
    /// about 2 (N - 1) / N of the buffer, as a ring all-reduce does): every
    /// sum is computed on one rank, so all ranks hold the same bits whatever
    /// the library. The `len % N` trailing elements that fill no block are
    /// all-gathered and added in rank order.
    ScatterGather,
}

/// `MPI_COMM_WORLD`, owning the MPI environment: MPI is finalised when this
/// is dropped, and cannot be initialised again in the same process.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Receive blocks and gathered partial sums, grown to the largest call
    /// and then reused: no allocation per call once warm.
    scratch_f32: RefCell<Vec<f32>>,
    scratch_f64: RefCell<Vec<f64>>,
    all_reduce: AllReduce,
    // Declared last: dropped (MPI_Finalize) after the communicator.
    _universe: mpi::environment::Universe,
}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl MpiComm {
    /// Initialises MPI (single-threaded use: MPI is called from one thread)
    /// and returns the world communicator. Fails when MPI was already
    /// initialised in this process.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| CommError::Engine("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiComm {
            world,
            rank,
            size,
            scratch_f32: RefCell::default(),
            scratch_f64: RefCell::default(),
            all_reduce: AllReduce::default(),
            _universe: universe,
        })
    }

    /// The same communicator, summing buffers the way `how` says.
    pub fn with_all_reduce(mut self, how: AllReduce) -> Self {
        self.all_reduce = how;
        self
    }

    /// Ends every rank of the job with exit status `code` (`MPI_Abort`).
    /// A rank that cannot go on must call this rather than return: returning
    /// finalises MPI on this rank while the others wait in their next
    /// collective, and the job hangs.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// The MPI library's own description (`MPI_Get_library_version`).
    pub fn library_version() -> String {
        mpi::environment::library_version().unwrap_or_else(|e| format!("unknown ({e})"))
    }
}

/// MPI counts are C ints: a longer buffer is refused rather than truncated.
fn fits_mpi_count(op: &'static str, n: usize) -> Result<()> {
    if n <= i32::MAX as usize {
        Ok(())
    } else {
        Err(CommError::Length { op, detail: format!("{n} elements exceed MPI's count limit of {}", i32::MAX) })
    }
}

/// `scratch` grown to at least `n` elements (never shrunk).
fn grown<T: Default + Clone>(scratch: &mut Vec<T>, n: usize) -> &mut [T] {
    if scratch.len() < n {
        scratch.resize(n, T::default());
    }
    &mut scratch[..n]
}

macro_rules! all_reduce_typed {
    ($self:ident, $buf:ident, $scratch:ident) => {{
        let (p, n) = ($self.size, $buf.len());
        if p == 1 || n == 0 {
            return Ok(());
        }
        let mut scratch = $self.$scratch.borrow_mut();
        if $self.all_reduce == AllReduce::Native {
            let s = grown(&mut scratch, n);
            $self.world.all_reduce_into(&*$buf, &mut *s, SystemOperation::sum());
            $buf.copy_from_slice(s);
            return Ok(());
        }
        let block = n / p;
        let even = block * p;
        if block > 0 {
            let s = grown(&mut scratch, block);
            $self.world.reduce_scatter_block_into(&$buf[..even], &mut *s, SystemOperation::sum());
            $self.world.all_gather_into(&*s, &mut $buf[..even]);
        }
        let rest = n - even;
        if rest > 0 {
            let s = grown(&mut scratch, rest * p);
            $self.world.all_gather_into(&$buf[even..], &mut *s);
            for (i, x) in $buf[even..].iter_mut().enumerate() {
                *x = s[i];
                for r in 1..p {
                    *x += s[r * rest + i];
                }
            }
        }
        Ok(())
    }};
}

impl Collective for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_partial_sums(&self, sums: &mut [f64]) -> Result<()> {
        let (p, n) = (self.size, sums.len());
        if p == 1 || n == 0 {
            return Ok(());
        }
        fits_mpi_count("all_reduce_partial_sums", n.saturating_mul(p))?;
        let mut scratch = self.scratch_f64.borrow_mut();
        let all = grown(&mut scratch, n * p);
        self.world.all_gather_into(&*sums, &mut *all);
        for (i, x) in sums.iter_mut().enumerate() {
            *x = all[i];
            for r in 1..p {
                *x += all[r * n + i];
            }
        }
        Ok(())
    }

    fn all_reduce_sum(&self, buf: BufMut<'_>) -> Result<()> {
        fits_mpi_count("all_reduce_sum", buf.len())?;
        match buf {
            BufMut::F32(buf) => all_reduce_typed!(self, buf, scratch_f32),
            BufMut::F64(buf) => all_reduce_typed!(self, buf, scratch_f64),
        }
    }

    fn reduce_scatter_sum(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
        check_blocks("reduce_scatter_sum", &send, &recv, self.size, true)?;
        fits_mpi_count("reduce_scatter_sum", send.len())?;
        match (send, recv) {
            (Buf::F32(s), BufMut::F32(r)) => self.world.reduce_scatter_block_into(s, r, SystemOperation::sum()),
            (Buf::F64(s), BufMut::F64(r)) => self.world.reduce_scatter_block_into(s, r, SystemOperation::sum()),
            (s, r) => return Err(CommError::DtypeMismatch { op: "reduce_scatter_sum", send: s.dtype(), recv: r.dtype() }),
        }
        Ok(())
    }

    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
        check_blocks("all_gather", &send, &recv, self.size, false)?;
        fits_mpi_count("all_gather", recv.len())?;
        match (send, recv) {
            (Buf::F32(s), BufMut::F32(r)) => self.world.all_gather_into(s, r),
            (Buf::F64(s), BufMut::F64(r)) => self.world.all_gather_into(s, r),
            (s, r) => return Err(CommError::DtypeMismatch { op: "all_gather", send: s.dtype(), recv: r.dtype() }),
        }
        Ok(())
    }

    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<()> {
        check_root("broadcast", root, self.size)?;
        fits_mpi_count("broadcast", buf.len())?;
        let root = self.world.process_at_rank(root as i32);
        match buf {
            BufMut::F32(b) => root.broadcast_into(b),
            BufMut::F64(b) => root.broadcast_into(b),
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
