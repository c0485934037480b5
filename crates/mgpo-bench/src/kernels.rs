//! Kernel variants measured next to the backend's own, to size changes
//! proposed for `mgpo-ndarray` (which this crate does not own):
//!
//! - [`add_low_rank_fused`]: W <- W + c (P Q + R S) in one pass over W,
//!   rows in parallel, instead of two single-threaded GEMMs that each read
//!   and write all of W;
//! - [`adamw_dispatch`]: the fused AdamW block of `mgpo-ndarray`, element
//!   for element `mgpo_core::adamw_element`, compiled for AVX-512 or
//!   AVX2+FMA when the CPU has them (the workspace builds for baseline
//!   x86-64, SSE2, where the square root and division of 4 lanes at a time
//!   can bound a memory-bound pass).

use mgpo_core::{adamw_element, AdamWConsts, AdamWStep};
use rayon::prelude::*;

/// Rows of W per parallel task in [`add_low_rank_fused`].
const ROWS: usize = 8;
/// Columns per tile: the tile of Q and S (2 r x COLS) stays in L2 across a
/// task's rows, each row tile of W in L1 across the 2 r updates.
const COLS: usize = 1024;

#[inline(always)]
fn lowrank_rows<const FMA: bool>(w: &mut [f32], row0: usize, inn: usize, rank: usize, c: f32, p: &[f32], q: &[f32], r: &[f32], s: &[f32]) {
    let rows = w.len() / inn;
    let mut a = vec![0f32; 2 * rank];
    for j0 in (0..inn).step_by(COLS) {
        let j1 = (j0 + COLS).min(inn);
        for i in 0..rows {
            let gi = row0 + i;
            for k in 0..rank {
                a[k] = c * p[gi * rank + k];
                a[rank + k] = c * r[gi * rank + k];
            }
            let wt = &mut w[i * inn + j0..i * inn + j1];
            for k in 0..2 * rank {
                let x = if k < rank { &q[k * inn + j0..k * inn + j1] } else { &s[(k - rank) * inn + j0..(k - rank) * inn + j1] };
                let ak = a[k];
                for (wj, &xj) in wt.iter_mut().zip(x) {
                    *wj = if FMA { ak.mul_add(xj, *wj) } else { ak * xj + *wj };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
fn lowrank_rows_avx512(w: &mut [f32], row0: usize, inn: usize, rank: usize, c: f32, p: &[f32], q: &[f32], r: &[f32], s: &[f32]) {
    lowrank_rows::<true>(w, row0, inn, rank, c, p, q, r, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn lowrank_rows_avx2(w: &mut [f32], row0: usize, inn: usize, rank: usize, c: f32, p: &[f32], q: &[f32], r: &[f32], s: &[f32]) {
    lowrank_rows::<true>(w, row0, inn, rank, c, p, q, r, s)
}

/// The instruction set the dispatching kernels use on this CPU.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            return "avx512f+fma";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
    }
    "baseline"
}

/// W (out x in, row-major) <- W + c (P Q + R S), P and R out x r, Q and S
/// r x in, all row-major: one read and one write of W, no temporary.
#[allow(clippy::too_many_arguments)]
pub fn add_low_rank_fused(w: &mut [f32], out: usize, inn: usize, rank: usize, c: f32, p: &[f32], q: &[f32], r: &[f32], s: &[f32]) -> Result<(), String> {
    if w.len() != out * inn || p.len() != out * rank || r.len() != out * rank || q.len() != rank * inn || s.len() != rank * inn {
        return Err(format!("add_low_rank_fused: shapes do not fit W {out} x {inn} at rank {rank}"));
    }
    let isa = isa();
    w.par_chunks_mut(ROWS * inn).enumerate().for_each(|(t, wt)| {
        let row0 = t * ROWS;
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features were detected on this CPU.
            "avx512f+fma" => unsafe { lowrank_rows_avx512(wt, row0, inn, rank, c, p, q, r, s) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features were detected on this CPU.
            "avx2+fma" => unsafe { lowrank_rows_avx2(wt, row0, inn, rank, c, p, q, r, s) },
            _ => lowrank_rows::<false>(wt, row0, inn, rank, c, p, q, r, s),
        }
    });
    Ok(())
}

/// Elements per block, as `mgpo-ndarray`.
const BLOCK: usize = 1 << 13;

#[inline(always)]
fn block_adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamWConsts<f32>) -> f64 {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        adamw_element(p, g, m, v, c);
    }
    // sum m^2 in f64, 8 lanes, as mgpo-ndarray (same order, same bits).
    let mut acc = [0.0f64; 8];
    let mut it = m.chunks_exact(8);
    for ch in &mut it {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a += x as f64 * x as f64;
        }
    }
    for (a, &x) in acc.iter_mut().zip(it.remainder()) {
        *a += x as f64 * x as f64;
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn block_adamw_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamWConsts<f32>) -> f64 {
    block_adamw(p, g, m, v, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_adamw_avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamWConsts<f32>) -> f64 {
    block_adamw(p, g, m, v, c)
}

/// The fused AdamW pass of `mgpo-ndarray` over slices (blocks of 8192 in
/// parallel, sum of m^2 in block order), with the block compiled for the
/// widest instruction set detected. Returns sum m^2.
pub fn adamw_dispatch(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamWStep) -> f64 {
    let c = k.consts::<f32>();
    let isa = isa();
    let parts: Vec<f64> = p
        .par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .map(|(((p, g), m), v)| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features were detected on this CPU.
            "avx512f+fma" => unsafe { block_adamw_avx512(p, g, m, v, &c) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features were detected on this CPU.
            "avx2+fma" => unsafe { block_adamw_avx2(p, g, m, v, &c) },
            _ => block_adamw(p, g, m, v, &c),
        })
        .collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::filled;

    fn f32s(n: usize, seed: u64, scale: f64) -> Vec<f32> {
        filled(n, seed, scale).into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn fused_low_rank_matches_two_gemms() {
        let _lock = crate::test_lock();
        let (out, inn, r) = (37, 2100, 3);
        let (p, q, rr, s) = (f32s(out * r, 1, 1.0), f32s(r * inn, 2, 1.0), f32s(out * r, 3, 1.0), f32s(r * inn, 4, 1.0));
        let w0 = f32s(out * inn, 5, 1.0);
        let mut w = w0.clone();
        add_low_rank_fused(&mut w, out, inn, r, 0.5, &p, &q, &rr, &s).unwrap();
        for i in 0..out {
            for j in 0..inn {
                let e: f64 = (0..r).map(|k| p[i * r + k] as f64 * q[k * inn + j] as f64 + rr[i * r + k] as f64 * s[k * inn + j] as f64).sum();
                let want = w0[i * inn + j] as f64 + 0.5 * e;
                assert!((w[i * inn + j] as f64 - want).abs() < 1e-5, "({i}, {j})");
            }
        }
        assert!(add_low_rank_fused(&mut w, out, inn + 1, r, 0.5, &p, &q, &rr, &s).is_err());
    }

    #[test]
    fn dispatched_adamw_is_mgpo_ndarray_bit_for_bit() {
        let _lock = crate::test_lock();
        use mgpo_core::FusedUpdate;
        let n = 3 * BLOCK + 77;
        let k = AdamWStep { unperturb: 0.01, decay: 0.999, grad_scale: 0.7, beta1: 0.9, beta2: 0.999, step_size: 1e-3, bias2_sqrt: 0.05, eps: 1e-8 };
        let (mut p, g, mut m) = (f32s(n, 1, 1.0), f32s(n, 2, 1.0), f32s(n, 3, 1.0));
        let mut v: Vec<f32> = f32s(n, 4, 1.0).iter().map(|x| x.abs()).collect();
        let nd = |x: &Vec<f32>| ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[n]), x.clone()).unwrap();
        let (mut pa, ga, mut ma, mut va) = (nd(&p), nd(&g), nd(&m), nd(&v));
        let want = mgpo_ndarray::NdBackend::<f32>::with_par_threshold(1).adamw(&mut pa, &ga, &mut ma, &mut va, &k).unwrap();
        let got = adamw_dispatch(&mut p, &g, &mut m, &mut v, &k);
        // FMA contraction is not allowed to change results: mul_add is never
        // emitted for adamw_element, so the bits agree.
        assert_eq!(got.to_bits(), want.to_bits());
        assert!(pa.as_slice().unwrap() == p.as_slice() && ma.as_slice().unwrap() == m.as_slice() && va.as_slice().unwrap() == v.as_slice());
    }
}
