//! Data parallelism: every rank holds the whole model and the whole
//! optimizer, computes gradients on its slice of the global batch
//! ([`shard_range`]), and [`DataParallel::all_reduce`] replaces each rank's
//! gradients with
//!
//! ```text
//! g <- scale * sum over ranks r of g_r
//! ```
//!
//! after which every rank takes the same optimizer step on the same bits.
//! With each rank's gradient the sum over its slice of per-example
//! gradients divided by the global batch size, `scale = 1` gives the
//! gradient of the mean loss over the global batch, whatever the slices'
//! sizes; with each rank's gradient the mean over its own (equal-sized)
//! slice, `scale = 1 / size` does.
//!
//! The gradients travel in buckets: the tensors are read as one stream of
//! elements in registration order, cut into buckets of at most
//! `bucket_elems` elements (a tensor may straddle two buckets), and each
//! bucket is one collective call. A bucket that lies inside one tensor is
//! reduced in place; the others are packed into one buffer, allocated on
//! first use and reused, so nothing parameter-sized is allocated per step.
//! On one rank nothing is communicated or copied.

use std::ops::Range;

use crate::collective::{Collective, CommError, Result, Scalar};

/// A tensor whose elements can be read and written as one host slice in
/// row-major order, the form in which they are packed into a bucket.
/// Implemented for `ndarray::ArrayD` in standard layout; a device backend
/// would implement its own buckets on device memory instead.
pub trait Bucketable {
    /// The element type.
    type Elem: Scalar;
    /// The elements, or `None` when they are not one row-major slice.
    fn flat(&self) -> Option<&[Self::Elem]>;
    /// The elements to write, or `None` when they are not one row-major slice.
    fn flat_mut(&mut self) -> Option<&mut [Self::Elem]>;
    /// For error messages.
    fn dims(&self) -> Vec<usize>;
}

impl<F: Scalar> Bucketable for ndarray::ArrayD<F> {
    type Elem = F;
    fn flat(&self) -> Option<&[F]> {
        self.as_slice()
    }
    fn flat_mut(&mut self) -> Option<&mut [F]> {
        self.as_slice_mut()
    }
    fn dims(&self) -> Vec<usize> {
        self.shape().to_vec()
    }
}

impl<T: Bucketable + ?Sized> Bucketable for &mut T {
    type Elem = T::Elem;
    fn flat(&self) -> Option<&[T::Elem]> {
        (**self).flat()
    }
    fn flat_mut(&mut self) -> Option<&mut [T::Elem]> {
        (**self).flat_mut()
    }
    fn dims(&self) -> Vec<usize> {
        (**self).dims()
    }
}

/// The rank's share of `len` items split into `size` contiguous slices
/// whose lengths differ by at most one (the first `len % size` slices are
/// one longer). Empty when `rank >= size`.
pub fn shard_range(len: usize, rank: usize, size: usize) -> Range<usize> {
    if size == 0 || rank >= size {
        return 0..0;
    }
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// What has gone through the collective so far, counted on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommStats {
    /// Collective calls (one per bucket).
    pub calls: u64,
    /// Elements handed to the collective (the payload; each rank sends
    /// about 2 (N - 1) / N of it under [`crate::MpiComm`]'s algorithm).
    pub elements: u64,
    /// The payload in bytes.
    pub bytes: u64,
}

/// The operation a bucket goes through.
#[derive(Debug, Clone, Copy)]
enum Op {
    Sum { scale: f64 },
    Broadcast { root: usize },
}

/// Bucketed gradient averaging (and parameter broadcast) over a
/// [`Collective`], for tensors of element type `E`.
#[derive(Debug)]
pub struct DataParallel<C, E> {
    comm: C,
    bucket_elems: usize,
    bucket: Vec<E>,
    /// (tensor, start, len) of each piece packed in the bucket being
    /// filled, in bucket order; cleared, never shrunk.
    pieces: Vec<(usize, usize, usize)>,
    stats: CommStats,
}

/// 2^22 elements: 16 MiB of f32 per bucket.
pub const DEFAULT_BUCKET_ELEMS: usize = 1 << 22;

impl<C: Collective, E: Scalar> DataParallel<C, E> {
    /// Buckets of at most `bucket_elems` elements (at least 1).
    pub fn new(comm: C, bucket_elems: usize) -> Result<Self> {
        if bucket_elems == 0 {
            return Err(CommError::Invalid("a bucket must hold at least one element".into()));
        }
        Ok(DataParallel { comm, bucket_elems, bucket: Vec::new(), pieces: Vec::new(), stats: CommStats::default() })
    }

    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Totals since construction.
    pub fn stats(&self) -> CommStats {
        self.stats
    }

    /// `g <- scale * sum over ranks of g` for every tensor of `grads`, in
    /// buckets. Every rank must pass tensors of the same sizes in the same
    /// order; afterwards every rank holds the same bits. Nothing is changed
    /// when a tensor is not contiguous or `scale` is not finite.
    pub fn all_reduce<T: Bucketable<Elem = E>>(&mut self, grads: &mut [T], scale: f64) -> Result<()> {
        if !scale.is_finite() {
            return Err(CommError::Invalid(format!("gradient scale must be finite, got {scale}")));
        }
        self.run(grads, Op::Sum { scale })
    }

    /// Every rank's tensors get `root`'s values (to start all ranks from the
    /// same parameters), in buckets.
    pub fn broadcast<T: Bucketable<Elem = E>>(&mut self, tensors: &mut [T], root: usize) -> Result<()> {
        crate::collective::check_root("broadcast", root, self.comm.size())?;
        self.run(tensors, Op::Broadcast { root })
    }

    fn run<T: Bucketable<Elem = E>>(&mut self, ts: &mut [T], op: Op) -> Result<()> {
        let mut total = 0usize;
        for (index, t) in ts.iter().enumerate() {
            total += t.flat().ok_or_else(|| CommError::NotContiguous { index, shape: t.dims() })?.len();
        }
        if self.comm.size() == 1 {
            if let Op::Sum { scale } = op {
                if scale != 1.0 {
                    let s = E::from_f64(scale);
                    for t in 0..ts.len() {
                        flat_mut(ts, t)?.iter_mut().for_each(|x| *x = x.mul(s));
                    }
                }
            }
            return Ok(());
        }
        let cap = self.bucket_elems.min(total);
        self.pieces.clear();
        let mut fill = 0;
        for t in 0..ts.len() {
            let len = flat(ts, t)?.len();
            let mut start = 0;
            while start < len {
                // Packing is for small tensors: a bucket that one tensor
                // fills on its own is reduced where it lies.
                if fill == 0 && len - start >= cap {
                    self.in_place(ts, t, start..start + cap, op)?;
                    start += cap;
                    continue;
                }
                if self.bucket.len() < cap {
                    self.bucket.resize(cap, E::default());
                }
                let n = (cap - fill).min(len - start);
                self.bucket[fill..fill + n].copy_from_slice(&flat(ts, t)?[start..start + n]);
                self.pieces.push((t, start, n));
                fill += n;
                start += n;
                if fill == cap {
                    self.flush(ts, fill, op)?;
                    fill = 0;
                }
            }
        }
        if fill > 0 {
            self.flush(ts, fill, op)?;
        }
        Ok(())
    }

    /// One collective call on a bucket-sized piece of one tensor, in place.
    fn in_place<T: Bucketable<Elem = E>>(&mut self, ts: &mut [T], t: usize, range: Range<usize>, op: Op) -> Result<()> {
        let n = range.len();
        let piece = &mut flat_mut(ts, t)?[range];
        match op {
            Op::Sum { scale } => {
                self.comm.all_reduce_sum(E::buf_mut(piece))?;
                if scale != 1.0 {
                    let s = E::from_f64(scale);
                    piece.iter_mut().for_each(|x| *x = x.mul(s));
                }
            }
            Op::Broadcast { root } => self.comm.broadcast(E::buf_mut(piece), root)?,
        }
        self.count(n);
        Ok(())
    }

    fn count(&mut self, elems: usize) {
        self.stats.calls += 1;
        self.stats.elements += elems as u64;
        self.stats.bytes += (elems * std::mem::size_of::<E>()) as u64;
    }

    /// One collective call on the bucket's first `fill` elements, then the
    /// result copied back into the tensors it came from.
    fn flush<T: Bucketable<Elem = E>>(&mut self, ts: &mut [T], fill: usize, op: Op) -> Result<()> {
        let buf = &mut self.bucket[..fill];
        let scale = match op {
            Op::Sum { scale } => {
                self.comm.all_reduce_sum(E::buf_mut(buf))?;
                (scale != 1.0).then(|| E::from_f64(scale))
            }
            Op::Broadcast { root } => {
                self.comm.broadcast(E::buf_mut(buf), root)?;
                None
            }
        };
        self.count(fill);
        let mut at = 0;
        for &(t, start, n) in &self.pieces {
            let dst = &mut flat_mut(ts, t)?[start..start + n];
            let src = &self.bucket[at..at + n];
            match scale {
                None => dst.copy_from_slice(src),
                Some(s) => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x.mul(s)),
            }
            at += n;
        }
        self.pieces.clear();
        Ok(())
    }
}

pub(crate) fn flat<T: Bucketable>(ts: &[T], index: usize) -> Result<&[T::Elem]> {
    ts[index].flat().ok_or_else(|| CommError::NotContiguous { index, shape: ts[index].dims() })
}

pub(crate) fn flat_mut<T: Bucketable>(ts: &mut [T], index: usize) -> Result<&mut [T::Elem]> {
    let shape = ts[index].dims();
    ts[index].flat_mut().ok_or(CommError::NotContiguous { index, shape })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{Buf, BufMut};
    use crate::SingleProcess;
    use ndarray::{ArrayD, IxDyn};
    use std::cell::RefCell;

    /// One rank of a pretend communicator of `size` ranks whose other ranks
    /// all hold `others` times this rank's values: a sum multiplies by
    /// 1 + (size - 1) * others. Records each call's length.
    struct Pretend {
        size: usize,
        others: f64,
        calls: RefCell<Vec<usize>>,
    }

    impl Collective for Pretend {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_partial_sums(&self, _: &mut [f64]) -> Result<()> {
            Err(CommError::Unsupported("not used by DataParallel".into()))
        }
        fn all_reduce_sum(&self, buf: BufMut<'_>) -> Result<()> {
            self.calls.borrow_mut().push(buf.len());
            let k = 1.0 + (self.size - 1) as f64 * self.others;
            match buf {
                BufMut::F32(b) => b.iter_mut().for_each(|x| *x *= k as f32),
                BufMut::F64(b) => b.iter_mut().for_each(|x| *x *= k),
            }
            Ok(())
        }
        fn reduce_scatter_sum(&self, _: Buf<'_>, _: BufMut<'_>) -> Result<()> {
            Err(CommError::Unsupported("not used by DataParallel".into()))
        }
        fn all_gather(&self, _: Buf<'_>, _: BufMut<'_>) -> Result<()> {
            Err(CommError::Unsupported("not used by DataParallel".into()))
        }
        fn broadcast(&self, buf: BufMut<'_>, _root: usize) -> Result<()> {
            self.calls.borrow_mut().push(buf.len());
            match buf {
                BufMut::F32(b) => b.iter_mut().for_each(|x| *x = 7.0),
                BufMut::F64(b) => b.iter_mut().for_each(|x| *x = 7.0),
            }
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    fn tensors(sizes: &[usize]) -> Vec<ArrayD<f64>> {
        let mut k = 0.0;
        sizes
            .iter()
            .map(|&n| {
                ArrayD::from_shape_fn(IxDyn(&[n]), |_| {
                    k += 1.0;
                    k
                })
            })
            .collect()
    }

    #[test]
    fn buckets_split_the_stream_and_every_element_comes_back_scaled() {
        let sizes = [0, 1, 5, 13, 2, 0, 7];
        for cap in [1, 3, 7, 8, 28, 100] {
            let comm = Pretend { size: 4, others: 1.0, calls: RefCell::default() };
            let mut dp = DataParallel::<_, f64>::new(&comm, cap).unwrap();
            let mut g = tensors(&sizes);
            dp.all_reduce(&mut g, 0.5).unwrap();
            let want: Vec<ArrayD<f64>> = tensors(&sizes).into_iter().map(|t| t * 4.0 * 0.5).collect();
            assert_eq!(g, want, "cap {cap}");
            let total: usize = sizes.iter().sum();
            let calls = comm.calls.borrow().clone();
            assert_eq!(calls.len(), total.div_ceil(cap.min(total)), "cap {cap}: {calls:?}");
            assert!(calls.iter().all(|&n| n <= cap) && calls.iter().sum::<usize>() == total);
            assert_eq!(dp.stats(), CommStats { calls: calls.len() as u64, elements: total as u64, bytes: 8 * total as u64 });
            // a second call reuses the bucket: same capacity, same calls
            let before = dp.bucket.capacity();
            dp.all_reduce(&mut g, 1.0).unwrap();
            assert_eq!(dp.bucket.capacity(), before);
            assert_eq!(g, tensors(&sizes).into_iter().map(|t| t * 8.0).collect::<Vec<_>>());
        }
    }

    #[test]
    fn tensors_that_fill_whole_buckets_are_reduced_in_place() {
        let comm = Pretend { size: 2, others: 1.0, calls: RefCell::default() };
        let mut dp = DataParallel::<_, f64>::new(&comm, 8).unwrap();
        let mut g = tensors(&[8, 16]);
        dp.all_reduce(&mut g, 1.0).unwrap();
        assert_eq!(g, tensors(&[8, 16]).into_iter().map(|t| t * 2.0).collect::<Vec<_>>());
        assert_eq!((dp.bucket.capacity(), comm.calls.borrow().clone()), (0, vec![8, 8, 8]));
        let mut g = tensors(&[8, 3, 9]);
        dp.all_reduce(&mut g, 1.0).unwrap();
        assert_eq!(g, tensors(&[8, 3, 9]).into_iter().map(|t| t * 2.0).collect::<Vec<_>>());
        assert_eq!(dp.bucket.len(), 8, "the 3 + 5 elements straddling two tensors are packed");
    }

    #[test]
    fn broadcast_overwrites_every_element_through_mut_refs() {
        let comm = Pretend { size: 2, others: 0.0, calls: RefCell::default() };
        let mut dp = DataParallel::<_, f64>::new(&comm, 4).unwrap();
        let (mut a, mut b) = (tensors(&[3])[0].clone(), tensors(&[6])[0].clone());
        dp.broadcast(&mut [&mut a, &mut b], 1).unwrap();
        assert!(a.iter().chain(b.iter()).all(|&x| x == 7.0));
        assert_eq!(*comm.calls.borrow(), vec![4, 4, 1]);
        assert!(matches!(dp.broadcast(&mut [&mut a], 2), Err(CommError::Root { root: 2, size: 2, .. })));
    }

    #[test]
    fn bad_input_is_refused_before_anything_moves() {
        let comm = Pretend { size: 2, others: 1.0, calls: RefCell::default() };
        assert!(matches!(DataParallel::<_, f32>::new(&comm, 0), Err(CommError::Invalid(_))));
        let mut dp = DataParallel::<_, f64>::new(&comm, 4).unwrap();
        let ok = tensors(&[5])[0].clone();
        let transposed = tensors(&[6])[0].clone().into_shape_with_order(IxDyn(&[2, 3])).unwrap().reversed_axes();
        let mut g = vec![ok.clone(), transposed.clone()];
        assert_eq!(dp.all_reduce(&mut g, 1.0), Err(CommError::NotContiguous { index: 1, shape: vec![3, 2] }));
        assert!(matches!(dp.all_reduce(&mut g[..1], f64::NAN), Err(CommError::Invalid(_))));
        assert!(g[0] == ok && g[1] == transposed && comm.calls.borrow().is_empty());
    }

    #[test]
    fn one_rank_leaves_gradients_alone_unless_scaled() {
        let mut dp = DataParallel::<_, f32>::new(SingleProcess, DEFAULT_BUCKET_ELEMS).unwrap();
        let mut g = vec![ArrayD::from_elem(IxDyn(&[3, 2]), 1.5f32), ArrayD::from_elem(IxDyn(&[4]), -2.0f32)];
        dp.all_reduce(&mut g, 1.0).unwrap();
        assert!(g[0].iter().all(|&x| x == 1.5) && g[1].iter().all(|&x| x == -2.0));
        dp.all_reduce(&mut g, 0.25).unwrap();
        assert!(g[0].iter().all(|&x| x == 0.375) && g[1].iter().all(|&x| x == -0.5));
        assert_eq!(dp.stats(), CommStats::default(), "one rank communicates nothing");
        assert_eq!(dp.bucket.capacity(), 0, "one rank packs nothing");
    }

    #[test]
    fn shards_cover_the_batch_in_order() {
        for (len, size) in [(10, 4), (3, 4), (0, 2), (8, 2), (7, 1)] {
            let parts: Vec<Range<usize>> = (0..size).map(|r| shard_range(len, r, size)).collect();
            assert_eq!(parts.first().unwrap().start, 0);
            assert_eq!(parts.last().unwrap().end, len);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start && w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1));
        }
        assert_eq!(shard_range(10, 4, 4), 0..0);
    }
}
