//! CPU kernels over plain slices, shared by the backends whose tensors live
//! in host memory (ndarray, candle, dfdx): the per-block loops of a step and
//! the r x r Gram matrices of rank-decomposed norms. Each is written once,
//! generically, and compiled three times on x86-64: for the baseline (SSE2,
//! which the workspace targets), AVX2 and AVX-512, picked at run time. The
//! wider builds change only the vector width: no FMA contraction, the same
//! operations in the same order, so every ISA gives the same bits.
//!
//! Everything here is serial; backends split work into blocks of
//! [`BLOCK`] elements and run blocks in parallel as they see fit.

use std::sync::OnceLock;

use num_traits::Float;

use super::{adamw_element, AdamWConsts};

/// A good block size for the element-wise kernels: small enough to split a
/// LoRA tensor across cores, large enough to amortise a task. Backends that
/// add block sums in block order get results independent of the thread
/// count.
pub const BLOCK: usize = 1 << 13;

/// Lanes of independent partial sums inside a block (lets the compiler
/// vectorise; combined in a fixed order).
const LANES: usize = 8;

/// Lanes of partial sums of [`gram_rows`]'s dot products.
const DOT_LANES: usize = 16;

/// The instruction set the dispatched kernels run with on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// SSE2 (every x86-64) or no SIMD.
    Baseline,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F.
    Avx512,
}

/// Detected once per process.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// `pub fn $name<F>(args) -> ret` calling the `#[inline(always)]` generic
/// `$inner` compiled for the detected [`Isa`].
macro_rules! dispatched {
    ($(#[$m:meta])* fn $name:ident<$g:ident>($($arg:ident: $ty:ty),*) -> $ret:ty => $inner:ident) => {
        $(#[$m])*
        pub fn $name<$g: Float>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn wide<$g: Float>($($arg: $ty),*) -> $ret {
                $inner::<$g>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn mid<$g: Float>($($arg: $ty),*) -> $ret {
                $inner::<$g>($($arg),*)
            }
            match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the feature was detected on this CPU.
                Isa::Avx512 => unsafe { wide::<$g>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the feature was detected on this CPU.
                Isa::Avx2 => unsafe { mid::<$g>($($arg),*) },
                _ => $inner::<$g>($($arg),*),
            }
        }
    };
}

#[inline(always)]
fn f64_of<F: Float>(x: F) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

#[inline(always)]
fn sq<F: Float>(x: F) -> f64 {
    let x = f64_of(x);
    x * x
}

#[inline(always)]
fn sum_sq_generic<F: Float>(x: &[F]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += sq(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        *a += sq(v);
    }
    acc.iter().sum()
}

#[inline(always)]
fn adamw_generic<F: Float>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], c: &AdamWConsts<F>) -> f64 {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        adamw_element(p, g, m, v, c);
    }
    sum_sq_generic(m)
}

#[inline(always)]
fn axpy_generic<F: Float>(y: &mut [F], a: F, x: &[F]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}

dispatched!(
    /// sum x^2 in f64, in 8 lanes combined in a fixed order.
    fn sum_sq<F>(x: &[F]) -> f64 => sum_sq_generic
);
dispatched!(
    /// The fused AdamW pass ([`adamw_element`]) over p, g, m, v of one
    /// length; returns [`sum_sq`] of the new first moment.
    fn adamw<F>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], c: &AdamWConsts<F>) -> f64 => adamw_generic
);
dispatched!(
    /// y <- y + a x.
    fn axpy<F>(y: &mut [F], a: F, x: &[F]) -> () => axpy_generic
);

/// acc (r x r, row-major) += X^T Y over the rows of row-major X, Y (n x r),
/// only b >= a when `sym`. A 4 x 8 tile of f64 accumulators stays in
/// registers over all rows; each accumulator sums its rows in order.
#[inline(always)]
fn gram_cols_span<F: Float>(x: &[F], y: &[F], r: usize, sym: bool, acc: &mut [f64]) {
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
                        *w = f64_of(v);
                    }
                    for (row, &xa) in t.iter_mut().zip(xr) {
                        let xa = f64_of(xa);
                        for (o, &w) in row.iter_mut().zip(&yw) {
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
                        let xa = f64_of(x[i * r + a]);
                        for b in b0..b0 + tb {
                            acc[a * r + b] += xa * f64_of(y[i * r + b]);
                        }
                    }
                }
            }
            b0 += TB;
        }
        a0 += TA;
    }
}

/// sum_j x_j y_j in f64 with [`DOT_LANES`] partial sums, combined in order.
#[inline(always)]
fn dot_generic<F: Float>(x: &[F], y: &[F]) -> f64 {
    let mut acc = [0.0f64; DOT_LANES];
    let (xc, yc) = (x.chunks_exact(DOT_LANES), y.chunks_exact(DOT_LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..DOT_LANES {
            acc[l] += f64_of(a[l]) * f64_of(b[l]);
        }
    }
    for (l, (&a, &b)) in xr.iter().zip(yr).enumerate() {
        acc[l] += f64_of(a) * f64_of(b);
    }
    acc.iter().sum()
}

dispatched!(
    /// acc (r x r, row-major) += X^T Y for row-major X, Y of n x r; only
    /// the upper triangle (b >= a) when `sym`.
    fn gram_cols_acc<F>(x: &[F], y: &[F], r: usize, sym: bool, acc: &mut [f64]) -> () => gram_cols_span
);
dispatched!(
    /// sum_j x_j y_j in f64, in 16 lanes combined in a fixed order.
    fn dot<F>(x: &[F], y: &[F]) -> f64 => dot_generic
);

/// y_j <- y_j + F(alpha z_{first + j}) with z_i = [`super::noise::gaussian`]`(seed, i)`:
/// the random-direction perturbation over a slice whose first element has
/// row-major index `first` in its tensor (so blocks give the whole
/// tensor's bits).
pub fn axpy_noise<F: Float>(y: &mut [F], alpha: f64, seed: u64, first: usize) {
    for (j, y) in y.iter_mut().enumerate() {
        *y = *y + F::from(alpha * super::noise::gaussian(seed, (first + j) as u64)).unwrap_or_else(F::nan);
    }
}

/// Fills the lower triangle of a row-major r x r matrix from the upper.
pub fn mirror_upper(acc: &mut [f64], r: usize) {
    for a in 0..r {
        for b in 0..a {
            acc[a * r + b] = acc[b * r + a];
        }
    }
}

/// X^T Y (r x r, row-major, f64) for row-major X, Y of n x r. When `sym`
/// (X is Y) only the upper triangle is computed and then mirrored.
pub fn gram_cols<F: Float>(x: &[F], y: &[F], r: usize, sym: bool) -> Vec<f64> {
    let mut acc = vec![0.0f64; r * r];
    if r > 0 {
        gram_cols_acc(x, y, r, sym, &mut acc);
    }
    if sym {
        mirror_upper(&mut acc, r);
    }
    acc
}

/// From this many rows [`gram_cols_halves`] sums a tall X's rows in two
/// halves.
pub const GRAM_SPLIT_ROWS: usize = 4096;

/// [`gram_cols`], from [`GRAM_SPLIT_ROWS`] rows on as two halves that
/// `join` may run in parallel (`|a, b| rayon::join(a, b)`), added half by
/// half: the split depends only on the shape, so the result does not
/// depend on the thread count.
pub fn gram_cols_halves<F, J>(x: &[F], y: &[F], r: usize, sym: bool, join: J) -> Vec<f64>
where
    F: Float + Sync,
    J: FnOnce(&(dyn Fn() -> Vec<f64> + Sync), &(dyn Fn() -> Vec<f64> + Sync)) -> (Vec<f64>, Vec<f64>),
{
    let n = x.len() / r.max(1);
    if r == 0 || n < GRAM_SPLIT_ROWS {
        return gram_cols(x, y, r, sym);
    }
    let span = |lo: usize, hi: usize| {
        let mut acc = vec![0.0f64; r * r];
        gram_cols_acc(&x[lo * r..hi * r], &y[lo * r..hi * r], r, sym, &mut acc);
        acc
    };
    let (a, b) = join(&|| span(0, n / 2), &|| span(n / 2, n));
    let mut acc: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a + b).collect();
    if sym {
        mirror_upper(&mut acc, r);
    }
    acc
}

/// Per-tensor sums of block sums laid out tensor after tensor (`lens`
/// elements each, [`BLOCK`] to a block), each tensor's added in block
/// order.
pub fn sums_per_tensor(lens: impl Iterator<Item = usize>, parts: &[f64]) -> Vec<f64> {
    let mut at = 0;
    lens.map(|len| {
        let n = len.div_ceil(BLOCK);
        let s = parts[at..at + n].iter().sum();
        at += n;
        s
    })
    .collect()
}

/// X Y^T (r x r, row-major, f64) for row-major X, Y of r x n: r^2 [`dot`]s,
/// r (r + 1) / 2 when `sym` (X is Y).
pub fn gram_rows<F: Float>(x: &[F], y: &[F], r: usize, sym: bool) -> Vec<f64> {
    let mut out = vec![0.0f64; r * r];
    if r == 0 {
        return out;
    }
    let n = x.len() / r;
    for a in 0..r {
        for b in if sym { a } else { 0 }..r {
            out[a * r + b] = dot(&x[a * n..(a + 1) * n], &y[b * n..(b + 1) * n]);
        }
    }
    if sym {
        mirror_upper(&mut out, r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::AdamWStep;

    fn filled(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The AVX2 / AVX-512 builds give the baseline build's bits.
    #[test]
    fn dispatched_kernels_match_the_baseline_bits() {
        let n = BLOCK + 37;
        let k = AdamWStep { unperturb: 0.01, decay: 0.999, grad_scale: 0.7, beta1: 0.9, beta2: 0.999, step_size: 1e-3, bias2_sqrt: 0.05, eps: 1e-8 };
        let c = k.consts::<f32>();
        let (g, m0, v0) = (filled(n, 2), filled(n, 3), filled(n, 4).iter().map(|x| x.abs()).collect::<Vec<_>>());
        let (mut p1, mut m1, mut v1) = (filled(n, 1), m0.clone(), v0.clone());
        let (mut p2, mut m2, mut v2) = (p1.clone(), m0, v0);
        let s1 = adamw(&mut p1, &g, &mut m1, &mut v1, &c);
        let s2 = adamw_generic(&mut p2, &g, &mut m2, &mut v2, &c);
        assert_eq!(s1.to_bits(), s2.to_bits(), "isa {:?}", isa());
        assert!(p1 == p2 && m1 == m2 && v1 == v2);
        assert_eq!(sum_sq(&g).to_bits(), sum_sq_generic(&g).to_bits());
        let r = 8;
        let rows = n / r;
        let (x, y) = (&g[..rows * r], &p1[..rows * r]);
        let mut a = vec![0.0; r * r];
        let mut b = vec![0.0; r * r];
        gram_cols_acc(x, y, r, false, &mut a);
        gram_cols_span(x, y, r, false, &mut b);
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(dot(x, y).to_bits(), dot_generic(x, y).to_bits());
    }

    /// X^T Y and X Y^T against a plain f64 product, symmetric or not, for
    /// ranks that do and do not fill the 4 x 8 tile.
    #[test]
    fn grams_match_a_plain_f64_product() {
        for (n, r) in [(37usize, 3usize), (5, 1), (9000, 8), (130, 13), (0, 4)] {
            let (x, y) = (filled(n * r, 1), filled(n * r, 2));
            let col = |x: &[f32], y: &[f32], a: usize, b: usize| (0..n).map(|i| x[i * r + a] as f64 * y[i * r + b] as f64).sum::<f64>();
            let row = |x: &[f32], y: &[f32], a: usize, b: usize| (0..n).map(|i| x[a * n + i] as f64 * y[b * n + i] as f64).sum::<f64>();
            let cases: [(Vec<f64>, &[f32], &[f32], bool); 4] = [
                (gram_cols(&x, &y, r, false), &x, &y, true),
                (gram_cols(&x, &x, r, true), &x, &x, true),
                (gram_rows(&x, &y, r, false), &x, &y, false),
                (gram_rows(&y, &y, r, true), &y, &y, false),
            ];
            for (got, xs, ys, cols) in cases {
                for a in 0..r {
                    for b in 0..r {
                        let w = if cols { col(xs, ys, a, b) } else { row(xs, ys, a, b) };
                        assert!((got[a * r + b] - w).abs() <= 1e-12 * (1.0 + w.abs()), "n {n} r {r} ({a},{b}) cols {cols}: {} vs {w}", got[a * r + b]);
                    }
                }
            }
        }
    }
}
