//! Timing: samples of wall-clock seconds per call, and their summary.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Seconds per call of `f`, `reps` calls, each timed on its own.
pub fn sample<E>(reps: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<Vec<f64>, E> {
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// How many calls of about `one_call` seconds fill `budget` seconds, in [lo, hi].
pub fn reps_for(one_call: f64, budget: f64, lo: usize, hi: usize) -> usize {
    if one_call.is_nan() || one_call <= 0.0 {
        return hi;
    }
    ((budget / one_call).round() as usize).clamp(lo, hi)
}

/// Median, minimum and mean of a set of samples (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Median, in seconds.
    pub median_s: f64,
    /// Minimum, in seconds.
    pub min_s: f64,
    /// Mean, in seconds.
    pub mean_s: f64,
    /// Number of samples.
    pub n: usize,
}

impl Stats {
    /// None for no samples.
    pub fn of(xs: &[f64]) -> Option<Stats> {
        if xs.is_empty() {
            return None;
        }
        let mut s = xs.to_vec();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 { s[mid] } else { 0.5 * (s[mid - 1] + s[mid]) };
        Some(Stats { median_s: median, min_s: s[0], mean_s: s.iter().sum::<f64>() / s.len() as f64, n: s.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_samples() {
        let _lock = crate::test_lock();
        let s = Stats::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median_s, 2.5);
        assert_eq!(s.min_s, 1.0);
        assert_eq!(s.mean_s, 4.0);
        assert_eq!(s.n, 4);
        assert!(Stats::of(&[]).is_none());
        assert_eq!(Stats::of(&[5.0, 1.0, 3.0]).unwrap().median_s, 3.0);
    }

    #[test]
    fn reps_fill_the_budget() {
        let _lock = crate::test_lock();
        assert_eq!(reps_for(0.01, 0.1, 3, 100), 10);
        assert_eq!(reps_for(1.0, 0.1, 3, 100), 3);
        assert_eq!(reps_for(0.0, 0.1, 3, 100), 100);
    }
}
