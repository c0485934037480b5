//! # mgpo-mpi
//!
//! Training across processes: a small [`Collective`] trait (sums of f64
//! partial sums; all-reduce, reduce-scatter, all-gather and broadcast of
//! flat f32 / f64 buffers) with an MPI implementation ([`MpiComm`], feature
//! `mpi`) and a one-rank one ([`SingleProcess`]), and bucketed data
//! parallelism on top ([`DataParallel`]), and sharded optimizer state
//! (ZeRO stage 1, [`Zero`] with [`CollectiveSums`]).
//!
//! A data-parallel step, on every rank:
//!
//! ```text
//! opt.perturb(&mut params, ...)?;                     // same state, same perturbation everywhere
//! let mut grads = /* backward over this rank's shard_range of the batch,
//!                    loss summed over the slice / global batch size */;
//! dp.all_reduce(&mut grads, 1.0)?;                    // gradient of the global mean loss
//! opt.step(&mut params, ..., &grads)?;                // same bits in, same bits out
//! ```
//!
//! Running and the guarantees: `docs/distributed.md` in the repository
//! (<https://github.com/lora-mgpo/lora-mgpo/blob/main/docs/distributed.md>).

#![warn(missing_docs)]

mod collective;
mod data_parallel;
#[cfg(feature = "mpi")]
mod mpi_comm;
mod single;
mod zero;

pub use collective::{Buf, BufMut, Collective, CommError, Result, Scalar};
pub use data_parallel::{shard_range, Bucketable, CommStats, DataParallel, DEFAULT_BUCKET_ELEMS};
#[cfg(feature = "mpi")]
pub use mpi_comm::{AllReduce, MpiComm};
pub use single::SingleProcess;
pub use zero::{CollectiveSums, Zero};
