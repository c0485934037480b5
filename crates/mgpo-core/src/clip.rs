//! Global-norm gradient clipping as PyTorch's `clip_grad_norm_`, applied as
//! a factor folded into the AdamW pass rather than by rewriting gradients.

/// min(1, max_norm / (total + 1e-6)), or 1 without clipping.
pub fn clip_factor(max_norm: Option<f64>, total: f64) -> f64 {
    match max_norm {
        Some(c) => (c / (total + 1e-6)).min(1.0),
        None => 1.0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clips_only_above_the_bound() {
        assert_eq!(super::clip_factor(None, 1e9), 1.0);
        assert_eq!(super::clip_factor(Some(1.0), 0.5), 1.0);
        assert!((super::clip_factor(Some(1.0), 4.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    }
}
