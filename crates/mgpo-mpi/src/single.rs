//! The communicator of one rank: every collective is the identity (or a
//! copy). For tests, and for programs written against [`Collective`] that
//! run without MPI.

use crate::collective::{check_blocks, check_root, Buf, BufMut, Collective, CommError, Result};

/// A communicator of size 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

fn copy(op: &'static str, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
    match (send, recv) {
        (Buf::F32(s), BufMut::F32(r)) => r.copy_from_slice(s),
        (Buf::F64(s), BufMut::F64(r)) => r.copy_from_slice(s),
        (s, r) => return Err(CommError::DtypeMismatch { op, send: s.dtype(), recv: r.dtype() }),
    }
    Ok(())
}

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_partial_sums(&self, _sums: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _buf: BufMut<'_>) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
        check_blocks("reduce_scatter_sum", &send, &recv, 1, true)?;
        copy("reduce_scatter_sum", send, recv)
    }
    fn all_gather(&self, send: Buf<'_>, recv: BufMut<'_>) -> Result<()> {
        check_blocks("all_gather", &send, &recv, 1, false)?;
        copy("all_gather", send, recv)
    }
    fn broadcast(&self, _buf: BufMut<'_>, root: usize) -> Result<()> {
        check_root("broadcast", root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_and_scatters_are_copies_and_lengths_are_checked() {
        let c = SingleProcess;
        let send = [1.0f32, 2.0, 3.0];
        let mut recv = [0.0f32; 3];
        c.all_gather(Buf::F32(&send), BufMut::F32(&mut recv)).unwrap();
        assert_eq!(recv, send);
        let mut recv = [0.0f32; 3];
        c.reduce_scatter_sum(Buf::F32(&send), BufMut::F32(&mut recv)).unwrap();
        assert_eq!(recv, send);
        let mut short = [0.0f32; 2];
        assert!(matches!(c.all_gather(Buf::F32(&send), BufMut::F32(&mut short)), Err(CommError::Length { .. })));
        let mut wrong = [0.0f64; 3];
        assert!(matches!(c.all_gather(Buf::F32(&send), BufMut::F64(&mut wrong)), Err(CommError::DtypeMismatch { .. })));
        assert!(matches!(c.broadcast(BufMut::F64(&mut wrong), 1), Err(CommError::Root { root: 1, size: 1, .. })));
        let mut sums = [1.5, -2.0];
        c.all_reduce_partial_sums(&mut sums).unwrap();
        assert_eq!(sums, [1.5, -2.0]);
    }
}
