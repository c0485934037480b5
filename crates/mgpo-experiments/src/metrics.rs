//! The numbers a loss curve is judged by.
//!
//! The paper's "double descent" over steps is a training loss that first
//! converges, then rises for a while, then comes down again. Its size is
//! the **rebound**:
//!
//! ```text
//! rebound = max_t ( S_t - min_{u < t} S_u )        S = smoothed loss
//! ```
//!
//! the largest rise of the smoothed loss above the lowest value it had
//! reached before. A monotone curve has rebound 0; noise alone gives a
//! small positive one (hence the smoothing); a curve that reaches a
//! non-finite value after a finite one has rebound +inf (it diverged).

/// Trailing mean over the last `window` values (fewer at the start):
/// S_t = mean(x_{t-w+1..=t}). A non-finite value makes every mean whose
/// window holds it non-finite. `window` 0 or 1 is the identity.
pub fn smooth(xs: &[f64], window: usize) -> Vec<f64> {
    let w = window.max(1);
    let mut out = Vec::with_capacity(xs.len());
    let mut sum = 0.0;
    let mut bad = 0usize;
    for (t, &x) in xs.iter().enumerate() {
        if x.is_finite() {
            sum += x;
        } else {
            bad += 1;
        }
        if t >= w {
            let old = xs[t - w];
            if old.is_finite() {
                sum -= old;
            } else {
                bad -= 1;
            }
        }
        let n = (t + 1).min(w);
        out.push(if bad > 0 { f64::NAN } else { sum / n as f64 });
    }
    out
}

/// max_t (s_t - min_{u<t} s_u), at least 0; +inf when a non-finite s_t
/// follows a finite one. 0 for fewer than two values.
pub fn rebound(s: &[f64]) -> f64 {
    let mut best = f64::INFINITY;
    let mut worst = 0.0f64;
    for &x in s {
        if !x.is_finite() {
            if best.is_finite() {
                return f64::INFINITY;
            }
            continue;
        }
        if best.is_finite() {
            worst = worst.max(x - best);
        }
        best = best.min(x);
    }
    worst
}

/// The step at which the rebound peaks and the step of the minimum before
/// it, for reading curves: (t_min, t_peak). None for a monotone curve.
pub fn rebound_at(s: &[f64]) -> Option<(usize, usize)> {
    let mut best = (f64::INFINITY, 0);
    let mut worst = (0.0, None);
    for (t, &x) in s.iter().enumerate() {
        if !x.is_finite() {
            continue;
        }
        if best.0.is_finite() && x - best.0 > worst.0 {
            worst = (x - best.0, Some((best.1, t)));
        }
        if x < best.0 {
            best = (x, t);
        }
    }
    worst.1
}

/// Mean and sample standard deviation (n - 1; 0 for one value). Infinite
/// values give an infinite mean and a NaN deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_a_trailing_mean() {
        assert_eq!(smooth(&[1.0, 3.0, 5.0, 7.0], 2), vec![1.0, 2.0, 4.0, 6.0]);
        assert_eq!(smooth(&[1.0, 3.0], 1), vec![1.0, 3.0]);
        let s = smooth(&[1.0, f64::NAN, 3.0, 4.0, 5.0], 2);
        assert!(s[1].is_nan() && s[2].is_nan());
        assert_eq!(&s[3..], &[3.5, 4.5]);
    }

    #[test]
    fn rebound_of_hand_made_curves() {
        // Monotone: none.
        assert_eq!(rebound(&[5.0, 4.0, 3.0, 3.0, 1.0]), 0.0);
        // Down to 1, up to 2.5, down to 0.5: the rise above the earlier minimum.
        assert_eq!(rebound(&[5.0, 1.0, 2.0, 2.5, 1.5, 0.5]), 1.5);
        // The largest of two bumps, each against the minimum before it.
        assert_eq!(rebound(&[4.0, 2.0, 3.0, 1.0, 2.5, 0.0]), 1.5);
        // A later bump counts against the lowest point before it, not the last dip.
        assert_eq!(rebound(&[3.0, 1.0, 1.2, 1.1, 1.9]), 0.8999999999999999);
        // Rising from the start (never converged) counts too.
        assert_eq!(rebound(&[1.0, 2.0]), 1.0);
        assert_eq!(rebound(&[1.0]), 0.0);
        assert_eq!(rebound(&[]), 0.0);
        // Divergence after convergence.
        assert_eq!(rebound(&[2.0, 1.0, f64::NAN]), f64::INFINITY);
        // Leading non-finite values (a smoothing window) are ignored.
        assert_eq!(rebound(&[f64::NAN, 2.0, 1.0]), 0.0);
        assert_eq!(rebound_at(&[5.0, 1.0, 2.0, 2.5, 1.5]), Some((1, 3)));
        assert_eq!(rebound_at(&[3.0, 2.0, 1.0]), None);
    }

    #[test]
    fn mean_and_sample_deviation() {
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 2f64.sqrt()));
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
