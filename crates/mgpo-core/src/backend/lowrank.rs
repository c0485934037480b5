//! Frobenius norms of rank-decomposed sums through r x r Gram matrices.

use crate::error::Result;
use super::LowRank;

/// ||P Q + R S||_F^2 for P, R of shape out x r and Q, S of shape r x in:
///
/// ```text
/// <P^T P, Q Q^T> + 2 <P^T R, Q S^T> + <R^T R, S S^T>
/// ```
///
/// six r x r products, O(r^2 (out + in)) work, no out x in matrix. Clamped
/// at 0 against rounding when the sum nearly cancels.
pub fn sum_of_products_sq<B: LowRank + ?Sized>(
    be: &B,
    p: &B::Tensor,
    q: &B::Tensor,
    r: &B::Tensor,
    s: &B::Tensor,
) -> Result<f64> {
    let dot = |x: Vec<f64>, y: Vec<f64>| x.iter().zip(&y).map(|(a, b)| a * b).sum::<f64>();
    let pp = dot(be.gram_cols(p, p)?, be.gram_rows(q, q)?);
    let pr = dot(be.gram_cols(p, r)?, be.gram_rows(q, s)?);
    let rr = dot(be.gram_cols(r, r)?, be.gram_rows(s, s)?);
    Ok((pp + 2.0 * pr + rr).max(0.0))
}
