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
#[allow(clippy::too_many_arguments)]
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

/// One block of the fused AdamW pass, compiled for the widest ISA detected.
pub fn adamw_block(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamWConsts<f32>) -> f64 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected on this CPU.
        "avx512f+fma" => unsafe { block_adamw_avx512(p, g, m, v, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected on this CPU.
        "avx2+fma" => unsafe { block_adamw_avx2(p, g, m, v, c) },
        _ => block_adamw(p, g, m, v, c),
    }
}

/// p, g, m, v of one tensor.
pub type AdamWSlices<'a> = (&'a mut [f32], &'a [f32], &'a mut [f32], &'a mut [f32]);

/// AdamW over many tensors in one parallel region: every block of every
/// tensor is one task, so a step pays one fork-join instead of one per
/// tensor (a LoRA model has hundreds of small tensors). Returns sum m^2 per
/// tensor.
pub fn adamw_batched(ts: Vec<AdamWSlices<'_>>, k: &AdamWStep) -> Vec<f64> {
    let c = k.consts::<f32>();
    let count = ts.len();
    let mut blocks = Vec::new();
    for (t, (p, g, m, v)) in ts.into_iter().enumerate() {
        for (((p, g), m), v) in p.chunks_mut(BLOCK).zip(g.chunks(BLOCK)).zip(m.chunks_mut(BLOCK)).zip(v.chunks_mut(BLOCK)) {
            blocks.push((t, p, g, m, v));
        }
    }
    let sums: Vec<(usize, f64)> = blocks.into_par_iter().map(|(t, p, g, m, v)| (t, adamw_block(p, g, m, v, &c))).collect();
    let mut out = vec![0.0; count];
    for (t, s) in sums {
        out[t] += s;
    }
    out
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

/// Rows of X, Y from which [`gram_cols`] splits its work in two parallel halves.
const GRAM_PAR_ROWS: usize = 4096;
/// Lanes of partial sums of [`gram_rows`]'s dot products.
const DOT_LANES: usize = 16;

macro_rules! dispatched {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $inner:ident) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn wide($($arg: $ty),*) -> $ret {
                $inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn mid($($arg: $ty),*) -> $ret {
                $inner($($arg),*)
            }
            match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the feature was detected on this CPU.
                "avx512f+fma" => unsafe { wide($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the feature was detected on this CPU.
                "avx2+fma" => unsafe { mid($($arg),*) },
                _ => $inner($($arg),*),
            }
        }
    };
}

/// acc (r x r, row-major) += X^T Y for row-major X, Y of n x r (the
/// rows of one span); only b >= a when `sym` (the rest is filled by the
/// caller). Register-tiled: a 4 x 8 tile of accumulators stays in
/// registers over all rows, each row's 8 entries of Y widened once and
/// multiplied by 4 broadcast entries of X; per accumulator the sum runs
/// over the rows in order, as mgpo-ndarray's loop.
#[inline(always)]
fn gram_cols_span(x: &[f32], y: &[f32], r: usize, sym: bool, acc: &mut [f64]) {
    const TA: usize = 4;
    const TB: usize = 8;
    let n = x.len() / r;
    let mut a0 = 0;
    while a0 < r {
        let ta = TA.min(r - a0);
        let mut b0 = if sym { a0 - a0 % TB } else { 0 };
        while b0 < r {
            let tb = TB.min(r - b0);
            if ta == TA && tb == TB {
                let mut t = [[0.0f64; TB]; TA];
                for i in 0..n {
                    let xr = &x[i * r + a0..i * r + a0 + TA];
                    let yr = &y[i * r + b0..i * r + b0 + TB];
                    let mut yw = [0.0f64; TB];
                    for (w, &v) in yw.iter_mut().zip(yr) {
                        *w = v as f64;
                    }
                    for (ta_row, &xa) in t.iter_mut().zip(xr) {
                        let xa = xa as f64;
                        for (o, &w) in ta_row.iter_mut().zip(&yw) {
                            *o += xa * w;
                        }
                    }
                }
                for (a, row) in t.iter().enumerate() {
                    for (b, &v) in row.iter().enumerate() {
                        acc[(a0 + a) * r + b0 + b] += v;
                    }
                }
            } else {
                for i in 0..n {
                    for a in a0..a0 + ta {
                        let xa = x[i * r + a] as f64;
                        for b in b0..b0 + tb {
                            acc[a * r + b] += xa * y[i * r + b] as f64;
                        }
                    }
                }
            }
            b0 += TB;
        }
        a0 += TA;
    }
}

/// sum_j x_j y_j in f64 with DOT_LANES partial sums (combined in order).
#[inline(always)]
fn dot_lanes(x: &[f32], y: &[f32]) -> f64 {
    let mut acc = [0.0f64; DOT_LANES];
    let (xc, yc) = (x.chunks_exact(DOT_LANES), y.chunks_exact(DOT_LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..DOT_LANES {
            acc[l] += a[l] as f64 * b[l] as f64;
        }
    }
    for (l, (&a, &b)) in xr.iter().zip(yr).enumerate() {
        acc[l] += a as f64 * b as f64;
    }
    acc.iter().sum()
}

dispatched!(fn gram_cols_span_d(x: &[f32], y: &[f32], r: usize, sym: bool, acc: &mut [f64]) -> () => gram_cols_span);
dispatched!(fn dot_lanes_d(x: &[f32], y: &[f32]) -> f64 => dot_lanes);

/// X^T Y (r x r, row-major, f64) for row-major X, Y of n x r. Symmetric
/// when X and Y are the same slice: only the upper triangle is computed.
/// From [`GRAM_PAR_ROWS`] rows, two halves run in parallel and are added
/// in order (results do not depend on the thread count).
pub fn gram_cols(x: &[f32], y: &[f32], r: usize) -> Vec<f64> {
    let sym = std::ptr::eq(x, y);
    let n = x.len() / r.max(1);
    let span = |lo: usize, hi: usize| {
        let mut acc = vec![0.0f64; r * r];
        gram_cols_span_d(&x[lo * r..hi * r], &y[lo * r..hi * r], r, sym, &mut acc);
        acc
    };
    let mut acc = if n >= GRAM_PAR_ROWS {
        let (a, b) = rayon::join(|| span(0, n / 2), || span(n / 2, n));
        a.iter().zip(&b).map(|(a, b)| a + b).collect()
    } else {
        span(0, n)
    };
    if sym {
        for a in 0..r {
            for b in 0..a {
                acc[a * r + b] = acc[b * r + a];
            }
        }
    }
    acc
}

/// X Y^T (r x r, row-major, f64) for row-major X, Y of r x n: r^2 (or
/// r (r + 1) / 2 when X is Y) dot products with 16 lanes of partial sums,
/// in parallel over the pairs when large.
pub fn gram_rows(x: &[f32], y: &[f32], r: usize) -> Vec<f64> {
    let sym = std::ptr::eq(x, y);
    let n = x.len() / r.max(1);
    let pairs: Vec<(usize, usize)> = (0..r).flat_map(|a| (if sym { a } else { 0 }..r).map(move |b| (a, b))).collect();
    let dot = |&(a, b): &(usize, usize)| dot_lanes_d(&x[a * n..(a + 1) * n], &y[b * n..(b + 1) * n]);
    let vals: Vec<f64> = if pairs.len() * n >= 1 << 16 { pairs.par_iter().map(dot).collect() } else { pairs.iter().map(dot).collect() };
    let mut out = vec![0.0f64; r * r];
    for (&(a, b), v) in pairs.iter().zip(vals) {
        out[a * r + b] = v;
        if sym {
            out[b * r + a] = v;
        }
    }
    out
}

#[cfg(test)]
mod gram_tests {
    use super::*;
    use crate::step::filled;

    fn f32s(n: usize, seed: u64) -> Vec<f32> {
        filled(n, seed, 1.0).into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn grams_match_a_plain_f64_product() {
        let _lock = crate::test_lock();
        for (n, r) in [(37usize, 3usize), (9000, 8)] {
            let (x, y) = (f32s(n * r, 1), f32s(n * r, 2));
            let want = |x: &[f32], y: &[f32], a: usize, b: usize, cols: bool| -> f64 {
                (0..n).map(|i| if cols { x[i * r + a] as f64 * y[i * r + b] as f64 } else { x[a * n + i] as f64 * y[b * n + i] as f64 }).sum()
            };
            for (got, xs, ys, cols) in [(gram_cols(&x, &y, r), &x, &y, true), (gram_cols(&x, &x, r), &x, &x, true), (gram_rows(&x, &y, r), &x, &y, false), (gram_rows(&y, &y, r), &y, &y, false)] {
                for a in 0..r {
                    for b in 0..r {
                        let w = want(xs, ys, a, b, cols);
                        assert!((got[a * r + b] - w).abs() <= 1e-10 * (1.0 + w.abs()), "n {n} r {r} ({a},{b}) cols {cols}");
                    }
                }
            }
        }
    }
}
