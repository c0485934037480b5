//! The in-place memory-bandwidth bound: a streaming kernel with AdamW's
//! exact memory traffic (read p, g, m, v; write p, m, v: 28 bytes per f32
//! parameter) and next to no arithmetic, run on all cores over flat buffers
//! of the same size as the benchmarked parameters. An optimizer step cannot
//! move its bytes faster than this kernel does.

use rayon::prelude::*;

/// Bytes per parameter of one pass of the streaming kernel (and of AdamW).
pub const BYTES_PER_PARAM: f64 = 28.0;

/// p, g, m, v of `n` f32 each, and the chunk size that streams them fastest.
pub struct Stream {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    chunk: usize,
}

impl Stream {
    /// Allocates and touches the four buffers (no page faults while timed).
    pub fn new(n: usize) -> Stream {
        Stream { p: vec![0.5; n], g: vec![0.25; n], m: vec![0.0; n], v: vec![0.0; n], chunk: 1 << 13 }
    }

    /// Elements per buffer.
    pub fn len(&self) -> usize {
        self.p.len()
    }

    /// Whether the buffers are empty.
    pub fn is_empty(&self) -> bool {
        self.p.is_empty()
    }

    /// Chunk sizes tried by [`Stream::calibrate`]: the ndarray backend's
    /// block (8192), 64 Ki, and an equal share per thread.
    fn candidates(&self) -> Vec<usize> {
        let share = self.len().div_ceil(rayon::current_num_threads()).max(1);
        let mut c = vec![1 << 13, 1 << 16, share];
        c.sort_unstable();
        c.dedup();
        c
    }

    /// Keeps the chunk size whose best of `reps` passes is fastest, so the
    /// bound is the best this kernel achieves, not an artefact of chunking.
    pub fn calibrate(&mut self, reps: usize) {
        let mut best = (f64::INFINITY, self.chunk);
        for c in self.candidates() {
            self.chunk = c;
            let t = (0..reps.max(1))
                .map(|_| {
                    let t = std::time::Instant::now();
                    self.pass();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            if t < best.0 {
                best = (t, c);
            }
        }
        self.chunk = best.1;
    }

    /// Elements per parallel chunk (set by [`Stream::calibrate`]).
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// One in-place pass: p <- p + g, m <- m + g, v <- v + g (values stay
    /// finite: they grow by at most 0.25 a pass).
    pub fn pass(&mut self) {
        let c = self.chunk;
        self.p
            .par_chunks_mut(c)
            .zip(self.g.par_chunks(c))
            .zip(self.m.par_chunks_mut(c))
            .zip(self.v.par_chunks_mut(c))
            .for_each(|(((p, g), m), v)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *p += g;
                    *m += g;
                    *v += g;
                }
            });
    }

    /// A value that depends on every buffer (keeps the passes observable).
    pub fn checksum(&self) -> f64 {
        [&self.p, &self.m, &self.v].iter().map(|x| x.first().copied().unwrap_or(0.0) as f64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_touches_every_element() {
        let _lock = crate::test_lock();
        let mut s = Stream::new(100_003);
        s.calibrate(1);
        let before = s.calibrate_passes();
        s.pass();
        assert!(s.p.iter().all(|&x| x == 0.5 + 0.25 * (before + 1) as f32));
        assert!(s.v.iter().all(|&x| x == 0.25 * (before + 1) as f32));
    }

    impl Stream {
        /// Passes run so far, read off the data (v grows 0.25 per pass).
        fn calibrate_passes(&self) -> usize {
            (self.v[0] / 0.25).round() as usize
        }
    }
}
