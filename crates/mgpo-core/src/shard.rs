//! Sharded optimizer state (ZeRO stage 1): in a data-parallel job of N
//! ranks, each rank keeps AdamW's m and v only for the tensors it owns,
//! about 1/N of them, and updates only those; a driver (crate `mgpo-mpi`)
//! reduce-scatters the gradients to their owners and all-gathers the
//! updated tensors.
//!
//! MGPO's norms are global (the momentum norm of the perturbation, the
//! gradient norm behind g_bar and clipping, the weight-space norms), so each
//! is built from per-tensor (or per-adapter) partial sums: every rank
//! computes those of its own tensors, leaves the others' slots at 0, and
//! [`PartialSums::all_reduce`] adds the vectors in rank order. A slot that
//! one rank fills comes back with that rank's bits (x + 0 = x), and the
//! optimizer then adds the slots in the order one process does, so every
//! rank computes the very bits one process would from the same gradients.

use crate::error::{MgpoError, Result};
use crate::layout::Layout;

/// The one collective operation the optimizer needs: element-wise sums of
/// a short f64 vector across the ranks of a job.
pub trait PartialSums {
    /// This process's rank, in `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// `sums[i] <- sums_0[i] + sums_1[i] + ... + sums_{N-1}[i]`, added in
    /// rank order, with the same result on every rank. Every rank calls it
    /// at the same points with vectors of the same length.
    fn all_reduce(&self, sums: &mut [f64]) -> Result<()>;
}

/// A job of one rank: nothing to combine. What [`crate::Mgpo::new`] uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OneProcess;

impl PartialSums for OneProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _sums: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Which rank owns each trainable tensor. Ownership is by whole units, an
/// adapter's A and B together (its weight-space norm needs both) or a plain
/// tensor, assigned largest first to the least-loaded rank (the lowest on a
/// tie), so every rank derives the same map from the layout alone. A rank
/// may own nothing when there are fewer units than ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    rank: usize,
    size: usize,
    /// The owning rank of each trainable tensor.
    owner: Vec<usize>,
    /// Position of each owned tensor among this rank's own (its moments' index).
    slot: Vec<Option<usize>>,
}

impl Shard {
    /// Rank `rank`'s share of `layout` among `size` ranks.
    pub fn new(layout: &Layout, rank: usize, size: usize) -> Result<Shard> {
        if size == 0 || rank >= size {
            return Err(MgpoError::InvalidConfig { field: "shard", value: format!("rank {rank} of {size}"), reason: "needs 0 <= rank < size" });
        }
        let elems = |t: usize| layout.tensors[t].shape.iter().product::<usize>();
        let mut units: Vec<Vec<usize>> = layout.adapters.iter().map(|a| vec![a.a, a.b]).collect();
        units.extend(layout.plain.iter().map(|&t| vec![t]));
        units.sort_by_key(|u| std::cmp::Reverse(u.iter().map(|&t| elems(t)).sum::<usize>()));
        let mut load = vec![0usize; size];
        let mut owner = vec![0; layout.tensors.len()];
        for unit in &units {
            let r = (0..size).min_by_key(|&r| load[r]).unwrap_or(0);
            for &t in unit {
                owner[t] = r;
                load[r] += elems(t);
            }
        }
        let mut slot = vec![None; owner.len()];
        for (i, t) in (0..owner.len()).filter(|&t| owner[t] == rank).enumerate() {
            slot[t] = Some(i);
        }
        Ok(Shard { rank, size, owner, slot })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The rank that owns trainable tensor `t` (`None` past the last one).
    pub fn owner(&self, t: usize) -> Option<usize> {
        self.owner.get(t).copied()
    }
    /// Whether this rank owns trainable tensor `t`.
    pub fn owns(&self, t: usize) -> bool {
        self.owner(t) == Some(self.rank)
    }
    /// The tensors this rank owns, in layout order: the order of its moments in [`crate::State`].
    pub fn owned(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.owner.len()).filter(|&t| self.owns(t))
    }
    /// Index of owned tensor `t` among [`Shard::owned`].
    pub(crate) fn slot(&self, t: usize) -> Option<usize> {
        self.slot.get(t).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_units_balanced_and_the_same_map_on_every_rank() {
        let layout = Layout::builder()
            .adapter("q", 8.0, &[4, 100], &[100, 4], true)
            .plain("head", &[10, 50])
            .adapter("v", 8.0, &[4, 100], &[100, 4], false)
            .plain("bias", &[10])
            .build()
            .unwrap();
        let shards: Vec<Shard> = (0..3).map(|r| Shard::new(&layout, r, 3).unwrap()).collect();
        assert!(shards.iter().all(|s| s.owner == shards[0].owner));
        let s = &shards[0];
        assert_eq!((s.owner(0), s.owner(1), s.owner(3), s.owner(4)), (Some(0), Some(0), Some(1), Some(1)), "A and B together");
        assert_eq!((s.owner(2), s.owner(5), s.owner(6)), (Some(2), Some(2), None));
        assert_eq!(shards[1].owned().collect::<Vec<_>>(), [3, 4]);
        assert_eq!((shards[1].slot(4), shards[1].slot(0)), (Some(1), None));
        let one = Shard::new(&layout, 0, 1).unwrap();
        assert_eq!(one.owned().count(), 6);
        assert!((0..6).all(|t| one.slot(t) == Some(t)));
        let idle = Shard::new(&layout, 5, 6).unwrap();
        assert_eq!(idle.owned().count(), 0, "more ranks than units");
        assert!(Shard::new(&layout, 2, 2).is_err() && Shard::new(&layout, 0, 0).is_err());
    }
}
