//! Sharded optimizer state (ZeRO stage 1): each of N ranks keeps AdamW's m
//! and v only for the tensors [`Shard`] gives it (whole adapters or plain
//! tensors, about 1/N of the parameters) and updates only those. A step,
//! on every rank:
//!
//! ```text
//! opt.perturb(&mut params)?;                 // the owners perturb their tensors (adapter space) or every rank W0 (weight space)
//! zero.before_forward(&mut params)?;          // adapter space: every rank gets every (perturbed) tensor
//! let mut grads = /* backward over this rank's slice of the batch */;
//! zero.reduce_scatter(&mut grads, 1.0)?;      // each owner gets the sum of its tensors' gradients
//! opt.step(&mut params, &grads)?;            // owners step their own tensors; norms from all-reduced partial sums
//! zero.after_step(&mut opt, &mut params)?;    // weight space: updated A, B and the owners' m to every rank
//! ```
//!
//! and `zero.all_gather(&mut params)` whenever every rank needs the clean
//! parameters (adapter space: evaluation, saving, the end of training).
//!
//! with the optimizer built by `Mgpo::sharded(backend, config, layout,
//! CollectiveSums(&comm))`. The global sums (momentum norm, gradient norms,
//! weight-space norms) come from per-tensor or per-adapter partial sums,
//! each computed by one rank and added in one process's order, so a rank
//! steps with the bits one process would compute from the same summed
//! gradients.
//!
//! Transfers go in buckets. Rank r's block is its own tensors back to back
//! in layout order; every block is padded to the longest one, and the
//! blocks are cut into windows of `bucket_elems / N` elements: one
//! reduce-scatter (or all-gather) per window, each moving at most
//! `bucket_elems` elements through one buffer that is allocated on first
//! use and reused. A step moves two such buffers in adapter space (the
//! gradients scattered, the perturbed tensors gathered: the bytes of one
//! all-reduce) and three in weight space (also the replicas of m). The
//! padding is the price of ownership by whole tensors: with N blocks of
//! length max_r L_r each buffer is N max_r L_r elements instead of P.

use mgpo_core::backend::TensorOps;
use mgpo_core::checkpoint::write_atomically;
use mgpo_core::{Mgpo, MgpoError, Moments, PartialSums, Shard, State};

use crate::collective::{Collective, CommError, Result, Scalar};
use crate::data_parallel::{flat, flat_mut, Bucketable, CommStats};

/// [`PartialSums`] over a [`Collective`]: the optimizer's partial sums
/// go through [`Collective::all_reduce_partial_sums`], added in rank order.
#[derive(Debug, Clone, Copy)]
pub struct CollectiveSums<C>(pub C);

impl<C: Collective> PartialSums for CollectiveSums<C> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn all_reduce(&self, sums: &mut [f64]) -> mgpo_core::Result<()> {
        self.0.all_reduce_partial_sums(sums).map_err(|e| MgpoError::Backend(format!("all-reduce of partial sums: {e}")))
    }
}

/// Where each rank's tensors lie in its block of a scatter or a gather.
#[derive(Debug, Clone, Default)]
struct Blocks {
    /// Per rank: (tensor, offset in the rank's block, length), in layout order.
    pieces: Vec<Vec<(usize, usize, usize)>>,
    /// The longest block; every block is padded to it.
    len: usize,
}

impl Blocks {
    /// The tensors `t < lens.len()` with `include(t)`, each in its owner's block.
    fn new(shard: &Shard, lens: &[usize], include: impl Fn(usize) -> bool) -> Blocks {
        let mut pieces = vec![Vec::new(); shard.size()];
        let mut fill = vec![0; shard.size()];
        for (t, &len) in lens.iter().enumerate().filter(|(t, _)| include(*t)) {
            let r = shard.owner(t).unwrap_or(0);
            pieces[r].push((t, fill[r], len));
            fill[r] += len;
        }
        Blocks { pieces, len: fill.into_iter().max().unwrap_or(0) }
    }

    /// The pieces of rank `r`'s block inside the window `lo..hi`:
    /// (tensor, start in the tensor, start in the window, length).
    fn window(&self, r: usize, lo: usize, hi: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        self.pieces[r].iter().filter_map(move |&(t, off, len)| {
            let (a, b) = (off.max(lo), (off + len).min(hi));
            (a < b).then(|| (t, a - off, a - lo, b - a))
        })
    }
}

/// The ZeRO-1 driver of one rank for tensors of element type `E`: moves
/// gradients to their owners and tensors from their owners, in buckets.
#[derive(Debug)]
pub struct Zero<C, E> {
    comm: C,
    shard: Shard,
    /// Elements of one rank's window: `bucket_elems / N`, at least 1.
    window: usize,
    /// Every trainable tensor, by owner: gradients, parameters, moments.
    params: Blocks,
    /// The first moments every rank needs (weight space), by owner.
    replicas: Blocks,
    /// Elements of each trainable tensor.
    lens: Vec<usize>,
    /// Whether the optimizer perturbs the trainable tensors themselves
    /// (adapter space), which must then be gathered before the forward pass.
    adapter_space: bool,
    send: Vec<E>,
    recv: Vec<E>,
    stats: CommStats,
}

impl<C: Collective, E: Scalar> Zero<C, E> {
    /// The driver of `opt`, an optimizer built with `Mgpo::sharded` over
    /// the same ranks as `comm`, with buckets of at most `bucket_elems`
    /// elements (at least the number of ranks).
    pub fn new<B: TensorOps, S: PartialSums>(comm: C, opt: &Mgpo<B, S>, bucket_elems: usize) -> Result<Self> {
        let shard = opt.shard().clone();
        if (shard.rank(), shard.size()) != (comm.rank(), comm.size()) {
            return Err(CommError::Invalid(format!(
                "the optimizer is rank {} of {}, the communicator rank {} of {}",
                shard.rank(),
                shard.size(),
                comm.rank(),
                comm.size()
            )));
        }
        if bucket_elems < comm.size() {
            return Err(CommError::Invalid(format!("a bucket of {bucket_elems} elements cannot hold one element of each of {} ranks", comm.size())));
        }
        let lens: Vec<usize> = opt.layout().tensors().iter().map(|t| t.shape.iter().product()).collect();
        let params = Blocks::new(&shard, &lens, |_| true);
        let replicas = Blocks::new(&shard, &lens, |t| opt.replicated_moment(t));
        let adapter_space = opt.config().space == mgpo_core::Space::Adapter;
        Ok(Zero { window: bucket_elems / comm.size(), comm, shard, params, replicas, lens, adapter_space, send: Vec::new(), recv: Vec::new(), stats: CommStats::default() })
    }

    /// The communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// Totals since construction; `elements` counts each call's whole
    /// buffer (N windows), of which each rank sends (N - 1) / N.
    pub fn stats(&self) -> CommStats {
        self.stats
    }

    /// The longest rank's block of trainable elements (the padded share):
    /// a reduce-scatter or all-gather of the parameters moves N times it.
    pub fn block_elems(&self) -> usize {
        self.params.len
    }

    fn count(&mut self, elems: usize) {
        self.stats.calls += 1;
        self.stats.elements += elems as u64;
        self.stats.bytes += (elems * std::mem::size_of::<E>()) as u64;
    }

    /// `g <- scale * sum over ranks of g` for the tensors this rank owns;
    /// the others keep this rank's own contribution, which nothing reads.
    /// Every rank passes every trainable tensor's gradient, in layout order.
    pub fn reduce_scatter<T: Bucketable<Elem = E>>(&mut self, grads: &mut [T], scale: f64) -> Result<()> {
        if !scale.is_finite() {
            return Err(CommError::Invalid(format!("gradient scale must be finite, got {scale}")));
        }
        self.check(grads)?;
        let (p, me) = (self.comm.size(), self.comm.rank());
        let s = (scale != 1.0).then(|| E::from_f64(scale));
        if p == 1 {
            if let Some(s) = s {
                for t in 0..grads.len() {
                    flat_mut(grads, t)?.iter_mut().for_each(|x| *x = x.mul(s));
                }
            }
            return Ok(());
        }
        let mut lo = 0;
        while lo < self.params.len {
            let w = self.window.min(self.params.len - lo);
            grow(&mut self.send, w * p);
            grow(&mut self.recv, w);
            let send = &mut self.send[..w * p];
            send.fill(E::default());
            for r in 0..p {
                for (t, at, pos, n) in self.params.window(r, lo, lo + w) {
                    send[r * w + pos..r * w + pos + n].copy_from_slice(&flat(grads, t)?[at..at + n]);
                }
            }
            self.comm.reduce_scatter_sum(E::buf(send), E::buf_mut(&mut self.recv[..w]))?;
            for (t, at, pos, n) in self.params.window(me, lo, lo + w) {
                let (dst, src) = (&mut flat_mut(grads, t)?[at..at + n], &self.recv[pos..pos + n]);
                match s {
                    None => dst.copy_from_slice(src),
                    Some(s) => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x.mul(s)),
                }
            }
            self.count(w * p);
            lo += w;
        }
        Ok(())
    }

    /// Every rank's copy of each trainable tensor gets its owner's values
    /// (after a step, or after a perturbation in adapter space).
    pub fn all_gather<T: Bucketable<Elem = E>>(&mut self, params: &mut [T]) -> Result<()> {
        self.check(params)?;
        if self.comm.size() == 1 {
            return Ok(());
        }
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (t, x) in params.iter_mut().enumerate() {
            if self.shard.owns(t) {
                let x: &T = x;
                mine.push((t, x.flat().ok_or_else(|| CommError::NotContiguous { index: t, shape: x.dims() })?));
            } else {
                let shape = x.dims();
                theirs.push((t, x.flat_mut().ok_or(CommError::NotContiguous { index: t, shape })?));
            }
        }
        let blocks = std::mem::take(&mut self.params);
        let result = self.gather(&blocks, &mine, &mut theirs);
        self.params = blocks;
        result
    }

    /// Before the forward pass, after [`Mgpo::perturb`]. In adapter space
    /// the owners perturbed their own tensors (or, unperturbed, hold the
    /// last update), and every rank needs every tensor: all-gathered here,
    /// which is also how the last step's updates reach the other ranks. In
    /// weight space every rank perturbed W0 itself and the tensors came
    /// after the step ([`Zero::after_step`]): nothing moves.
    pub fn before_forward<T: Bucketable<Elem = E>>(&mut self, params: &mut [T]) -> Result<()> {
        if self.adapter_space {
            self.all_gather(params)?;
        }
        Ok(())
    }

    /// After [`Mgpo::step`]. Weight space: every rank gets the updated A
    /// and B (the next perturbation of W0 is built from them) and the
    /// owners' m of them ([`Zero::exchange_replicas`]). Adapter space:
    /// nothing, as the next [`Zero::before_forward`] gathers the tensors
    /// perturbed; until then a rank's copies of tensors it does not own are
    /// stale (perturbed), so gather them with [`Zero::all_gather`] before
    /// reading all parameters (evaluation, saving, the end of training).
    pub fn after_step<T: Bucketable<Elem = E>, B: TensorOps, S: PartialSums>(&mut self, opt: &mut Mgpo<B, S>, params: &mut [T]) -> Result<()>
    where
        B::Tensor: Bucketable<Elem = E>,
    {
        if !self.adapter_space {
            self.all_gather(params)?;
            self.exchange_replicas(opt)?;
        }
        Ok(())
    }

    /// After every step in weight space: each rank's replicas of the first
    /// moments other ranks own get the owners' values. Nothing in adapter
    /// space or before the first step.
    pub fn exchange_replicas<B: TensorOps, S: PartialSums>(&mut self, opt: &mut Mgpo<B, S>) -> Result<()>
    where
        B::Tensor: Bucketable<Elem = E>,
    {
        if self.comm.size() == 1 || self.replicas.len == 0 || !opt.has_moments() {
            return Ok(());
        }
        let (mine, theirs) = opt.replica_exchange();
        let mine = mine.into_iter().map(|(t, x)| Ok((t, x.flat().ok_or_else(|| CommError::NotContiguous { index: t, shape: x.dims() })?))).collect::<Result<Vec<_>>>()?;
        let mut theirs = theirs
            .into_iter()
            .map(|(t, x)| {
                let shape = x.dims();
                Ok((t, x.flat_mut().ok_or(CommError::NotContiguous { index: t, shape })?))
            })
            .collect::<Result<Vec<_>>>()?;
        let blocks = std::mem::take(&mut self.replicas);
        let result = self.gather(&blocks, &mine, &mut theirs);
        self.replicas = blocks;
        result
    }

    /// One all-gather per window of `blocks`: this rank sends the pieces of
    /// `mine` in its block and writes the other ranks' into `theirs`
    /// (both by tensor index, in layout order).
    fn gather(&mut self, blocks: &Blocks, mine: &[(usize, &[E])], theirs: &mut [(usize, &mut [E])]) -> Result<()> {
        let (p, me) = (self.comm.size(), self.comm.rank());
        let find = |list: &[usize], t: usize| list.binary_search(&t).map_err(|_| CommError::Invalid(format!("tensor {t} has no buffer on rank {me}")));
        let mine_ids: Vec<usize> = mine.iter().map(|x| x.0).collect();
        let theirs_ids: Vec<usize> = theirs.iter().map(|x| x.0).collect();
        let mut lo = 0;
        while lo < blocks.len {
            let w = self.window.min(blocks.len - lo);
            grow(&mut self.send, w);
            grow(&mut self.recv, w * p);
            let send = &mut self.send[..w];
            send.fill(E::default());
            for (t, at, pos, n) in blocks.window(me, lo, lo + w) {
                send[pos..pos + n].copy_from_slice(&mine[find(&mine_ids, t)?].1[at..at + n]);
            }
            self.comm.all_gather(E::buf(send), E::buf_mut(&mut self.recv[..w * p]))?;
            for r in (0..p).filter(|&r| r != me) {
                for (t, at, pos, n) in blocks.window(r, lo, lo + w) {
                    theirs[find(&theirs_ids, t)?].1[at..at + n].copy_from_slice(&self.recv[r * w + pos..r * w + pos + n]);
                }
            }
            self.count(w * p);
            lo += w;
        }
        Ok(())
    }

    /// Every rank gets the whole optimizer state (each tensor's moments
    /// from its owner): what a checkpoint holds. Allocates the moments of
    /// the tensors other ranks own, for as long as the caller keeps them.
    pub fn gather_state<B: TensorOps<Tensor = T>, S: PartialSums, T: Bucketable<Elem = E> + Clone>(&mut self, opt: &Mgpo<B, S>, params: &[T]) -> Result<State<T>> {
        self.check(params)?;
        let state = opt.state();
        let mut moments = Vec::new();
        if opt.has_moments() {
            let be = opt.backend();
            let mut own = state.moments.iter();
            for (t, p) in params.iter().enumerate() {
                moments.push(match self.shard.owns(t) {
                    true => own.next().cloned().ok_or_else(|| CommError::Invalid(format!("rank {} has no moments of its tensor {t}", self.comm.rank())))?,
                    false => Moments { m: be.zeros_like(p).map_err(CommError::Optimizer)?, v: be.zeros_like(p).map_err(CommError::Optimizer)? },
                });
            }
            let mut ms: Vec<&mut T> = moments.iter_mut().map(|mv| &mut mv.m).collect();
            self.all_gather(&mut ms)?;
            let mut vs: Vec<&mut T> = moments.iter_mut().map(|mv| &mut mv.v).collect();
            self.all_gather(&mut vs)?;
        }
        Ok(State { step: state.step, skipped: state.skipped, moments, g_bar: state.g_bar.clone() })
    }

    /// Gathers the whole state ([`Zero::gather_state`]) and has rank 0 write
    /// it to `path` as one single-process checkpoint (atomically); returns
    /// on every rank once the file is in place. Each rank of a later run,
    /// sharded any way or not at all, loads it with `Mgpo::load_checkpoint`
    /// and keeps its own share.
    pub fn save_checkpoint<B: TensorOps<Tensor = T> + mgpo_core::backend::HostIo, S: PartialSums, T: Bucketable<Elem = E> + Clone>(
        &mut self,
        opt: &Mgpo<B, S>,
        params: &[T],
        path: impl AsRef<std::path::Path>,
    ) -> Result<()> {
        let state = self.gather_state(opt, params)?;
        let written = match self.comm.rank() {
            0 => opt.checkpoint_bytes_of(&state).and_then(|bytes| write_atomically(path.as_ref(), &bytes)).map_err(CommError::Optimizer),
            _ => Ok(()),
        };
        drop(state);
        // Every rank waits for the file, also when writing it failed (the
        // others would otherwise wait for rank 0 in their next collective).
        self.comm.barrier()?;
        written
    }

    fn check<T: Bucketable>(&self, ts: &[T]) -> Result<()> {
        if ts.len() != self.lens.len() {
            return Err(CommError::Length { op: "zero", detail: format!("{} tensors, the layout has {} trainable tensors", ts.len(), self.lens.len()) });
        }
        for (t, (x, &expected)) in ts.iter().zip(&self.lens).enumerate() {
            let len = x.flat().ok_or_else(|| CommError::NotContiguous { index: t, shape: x.dims() })?.len();
            if len != expected {
                return Err(CommError::Length { op: "zero", detail: format!("tensor {t} has {len} elements, the layout {expected}") });
            }
        }
        Ok(())
    }
}

fn grow<E: Scalar>(buf: &mut Vec<E>, n: usize) {
    if buf.len() < n {
        buf.resize(n, E::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SingleProcess;
    use mgpo_core::{Config, Layout};
    use mgpo_ndarray::NdBackend;
    use ndarray::{ArrayD, IxDyn};

    fn layout() -> Layout {
        Layout::builder().adapter("q", 8.0, &[2, 5], &[7, 2], false).plain("head", &[3, 4]).adapter("v", 8.0, &[2, 3], &[7, 2], false).build().unwrap()
    }

    /// Rank 0 of a pretend 2-rank job whose other rank contributes nothing.
    struct FirstOfTwo;

    impl PartialSums for FirstOfTwo {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_reduce(&self, _: &mut [f64]) -> mgpo_core::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sharded_rank_steps_only_its_own_tensors_and_refuses_a_partial_checkpoint() {
        let lay = layout();
        let names: Vec<String> = lay.names().map(str::to_string).collect();
        let mut opt = Mgpo::sharded(NdBackend::<f64>::new(), Config::preset("paper-nlu", 1e-2).unwrap(), lay, FirstOfTwo).unwrap();
        // Largest unit first: q (24 elements) to rank 0, v (20) to rank 1, head (12) to rank 1.
        assert_eq!(opt.shard().owned().collect::<Vec<_>>(), [0, 1]);
        let shapes: Vec<Vec<usize>> = opt.layout().tensors().iter().map(|t| t.shape.clone()).collect();
        let start: Vec<ArrayD<f64>> = shapes.iter().map(|s| ArrayD::from_elem(IxDyn(s), 0.5)).collect();
        let mut params = start.clone();
        let grads: Vec<ArrayD<f64>> = shapes.iter().map(|s| ArrayD::from_elem(IxDyn(s), 0.25)).collect();
        for _ in 0..2 {
            let mut named: Vec<(&str, &mut ArrayD<f64>)> = names.iter().map(String::as_str).zip(params.iter_mut()).collect();
            opt.perturb(&mut named).unwrap();
            let g: Vec<(&str, &ArrayD<f64>)> = names.iter().map(String::as_str).zip(&grads).collect();
            opt.step(&mut named, &g).unwrap();
        }
        for (t, (p, s)) in params.iter().zip(&start).enumerate() {
            assert_eq!(p != s, t < 2, "tensor {t}: only the owner's tensors move");
        }
        assert_eq!(opt.state().moments.len(), 2);
        assert_eq!(opt.moment_elems(), 2 * 24, "m and v of q.a and q.b only");
        assert!(matches!(opt.checkpoint_bytes(), Err(MgpoError::InvalidConfig { .. })), "a shard is not a checkpoint");
        let own = opt.state().clone();
        assert!(matches!(opt.set_state(own), Err(MgpoError::WrongCount { .. })), "set_state takes the whole state");
        assert_eq!(opt.state().step, 2);
    }

    #[test]
    fn windows_cover_each_rank_block_once() {
        let lay = layout();
        let lens: Vec<usize> = lay.tensors().iter().map(|t| t.shape.iter().product()).collect();
        for size in 1..=5 {
            let shard = Shard::new(&lay, 0, size).unwrap();
            let blocks = Blocks::new(&shard, &lens, |_| true);
            for w in [1, 3, 7, 100] {
                for r in 0..size {
                    let mut seen: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0; n]).collect();
                    let mut lo = 0;
                    while lo < blocks.len {
                        let hi = (lo + w).min(blocks.len);
                        for (t, at, pos, n) in blocks.window(r, lo, hi) {
                            assert!(pos + n <= hi - lo && shard.owner(t) == Some(r));
                            seen[t][at..at + n].iter_mut().for_each(|x| *x += 1);
                        }
                        lo = hi;
                    }
                    for (t, s) in seen.iter().enumerate() {
                        let want = u8::from(shard.owner(t) == Some(r));
                        assert!(s.iter().all(|&x| x == want), "{size} ranks, window {w}, rank {r}, tensor {t}: {s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_rank_scales_and_moves_nothing_and_bad_input_is_refused() {
        let opt = Mgpo::sharded(NdBackend::<f64>::new(), Config::preset("paper-nlu", 1e-3).unwrap(), layout(), CollectiveSums(SingleProcess)).unwrap();
        assert!(matches!(Zero::<_, f64>::new(SingleProcess, &opt, 0), Err(CommError::Invalid(_))));
        let mut z = Zero::<_, f64>::new(SingleProcess, &opt, 16).unwrap();
        let shapes: Vec<Vec<usize>> = opt.layout().tensors().iter().map(|t| t.shape.clone()).collect();
        let mut g: Vec<ArrayD<f64>> = shapes.iter().map(|s| ArrayD::from_elem(IxDyn(s), 3.0)).collect();
        z.reduce_scatter(&mut g, 0.5).unwrap();
        assert!(g.iter().all(|t| t.iter().all(|&x| x == 1.5)));
        z.all_gather(&mut g).unwrap();
        assert!(g.iter().all(|t| t.iter().all(|&x| x == 1.5)));
        assert_eq!(z.stats(), CommStats::default(), "one rank sends nothing");
        assert!(matches!(z.reduce_scatter(&mut g[..2], 1.0), Err(CommError::Length { .. })));
        assert!(matches!(z.reduce_scatter(&mut g, f64::NAN), Err(CommError::Invalid(_))));
        g[1] = ArrayD::zeros(IxDyn(&[3, 3]));
        assert!(matches!(z.all_gather(&mut g), Err(CommError::Length { .. })));
        let state = z.gather_state(&opt, &g[..]);
        assert!(matches!(state, Err(CommError::Length { .. })), "a misshapen tensor is refused before anything moves");
    }
}
