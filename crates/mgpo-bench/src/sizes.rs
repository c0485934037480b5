//! Parameter counts split into realistic LoRA tensors.
//!
//! A count N becomes `adapters` square adapters of width `dim` and rank
//! `rank` (A is r x d, B is d x r, 2 r d parameters each), the shapes of
//! the q/k/v/o projections of a transformer: d = 64 below 1e5 parameters,
//! 1024 below 3e6, 4096 (a 7B model's width) above; r = 8.

use mgpo_core::Layout;
use serde::{Deserialize, Serialize};

/// `adapters` LoRA adapters with A: rank x dim and B: dim x rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraShape {
    /// Side d of each adapter's W0.
    pub dim: usize,
    /// LoRA rank r.
    pub rank: usize,
    /// Number of adapters.
    pub adapters: usize,
}

impl LoraShape {
    /// The adapter split of about `n` trainable parameters (at least one adapter).
    pub fn for_params(n: usize) -> LoraShape {
        let dim = if n < 100_000 {
            64
        } else if n < 3_000_000 {
            1024
        } else {
            4096
        };
        let rank = 8;
        let per = 2 * rank * dim;
        LoraShape { dim, rank, adapters: ((n + per / 2) / per).max(1) }
    }

    /// Trainable parameters: 2 r d per adapter.
    pub fn params(&self) -> usize {
        2 * self.rank * self.dim * self.adapters
    }

    /// Trainable tensors: A and B per adapter.
    pub fn tensors(&self) -> usize {
        2 * self.adapters
    }

    /// The optimizer layout: adapters `l{i}` with alpha = 2 r (s = 2), with
    /// a d x d W0 each when `with_w0`.
    pub fn layout(&self, with_w0: bool) -> mgpo_core::Result<Layout> {
        let (r, d) = (self.rank, self.dim);
        (0..self.adapters)
            .fold(Layout::builder(), |b, i| b.adapter(&format!("l{i}"), 2.0 * r as f64, &[r, d], &[d, r], with_w0))
            .build()
    }

    /// "61 x (1024, r 8)".
    pub fn describe(&self) -> String {
        format!("{} x ({}, r {})", self.adapters, self.dim, self.rank)
    }
}

/// Parses a parameter count: `10000`, `1e6`, `2.5e6`, `1M`, `10k`.
pub fn parse_count(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let x: f64 = num.parse().map_err(|_| format!("not a parameter count: {s:?}"))?;
    let n = x * mult;
    if !(1.0..=1e11).contains(&n) {
        return Err(format!("parameter count out of range (1 to 1e11): {s:?}"));
    }
    Ok(n.round() as usize)
}

/// "1e7" style label for a count that is a power of ten, else the number.
pub fn label(n: usize) -> String {
    let e = (n as f64).log10();
    if e.fract() == 0.0 {
        format!("1e{}", e as i32)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_into_lora_tensors_near_the_count() {
        let _lock = crate::test_lock();
        for n in [10_000usize, 1_000_000, 10_000_000] {
            let s = LoraShape::for_params(n);
            let rel = (s.params() as f64 - n as f64).abs() / n as f64;
            assert!(rel < 0.05, "{n}: {s:?} gives {}", s.params());
            assert_eq!(s.layout(false).unwrap().num_params(), s.params());
        }
        assert_eq!(LoraShape::for_params(10_000_000).dim, 4096);
        assert_eq!(LoraShape::for_params(1).adapters, 1);
    }

    #[test]
    fn parses_counts() {
        let _lock = crate::test_lock();
        assert_eq!(parse_count("1e7").unwrap(), 10_000_000);
        assert_eq!(parse_count("10k").unwrap(), 10_000);
        assert_eq!(parse_count("2.5M").unwrap(), 2_500_000);
        assert!(parse_count("abc").is_err());
        assert!(parse_count("0").is_err());
        assert!(parse_count("-5").is_err());
        assert_eq!(label(1_000_000), "1e6");
        assert_eq!(label(1_234), "1234");
    }
}
