//! The numbers a loss curve is judged by.
//!
//! The paper's "double descent" over steps is a training loss that first
//! converges, then rises for a while, then comes down again. Three phases,
//! and [`rebound_phases`] looks for all three on a curve S (smoothed
//! logged loss, or the clean loss of periodic evaluations):
//!
//! 1. **converged**: the first t1 with S_t1 < S_0 / 2 (the loss fell below
//!    half its initial value);
//! 2. **rose**: a peak t_p > t1 above the lowest value since t1,
//!    h = S_tp - min_{t1 <= u < tp} S_u;
//! 3. **came back down**: some t > t_p with S_t <= S_tp - h / 2 (the loss
//!    fell again by at least half of the rise).
//!
//! The **rebound** is the largest h of a rise with all three phases (0 if
//! none). A rise that never comes back down (a loss still climbing at the
//! end, a divergence) is not a rebound; it is reported as `rise`. The
//! run "shows the three phases" when its rebound is at least `min_rise`
//! times S_0, so that the wiggles of a converged loss do not count.
//! Non-finite values count as +inf (a divergence that recovers is an
//! infinite rebound).

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

/// The largest rise from the start, max_t (s_t - min_{u<t} s_u), with no
/// condition on convergence or recovery: at least 0; +inf when a
/// non-finite s_t follows a finite one; 0 for fewer than two values.
pub fn largest_rise(s: &[f64]) -> f64 {
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

/// Where [`largest_rise`] happens: (t_min, t_peak). None for a monotone curve.
pub fn largest_rise_at(s: &[f64]) -> Option<(usize, usize)> {
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

/// Fall, as a fraction of the rise, that counts as "came back down".
pub const RECOVERY: f64 = 0.5;

/// The default `min_rise` of [`rebound_phases`] (the one docs/results.md
/// fixes before its runs): a rebound of at least 2% of the initial loss.
/// On digits-rot the initial clean loss is 15.2 (the base network is
/// confidently wrong on rotated digits), so this is a rise of 0.30.
pub const MIN_RISE: f64 = 0.02;

/// The three phases of a curve ([module docs](self)); indices into the curve.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Rebound {
    /// Phase 1: the first index with a value below half the initial one.
    pub converged: Option<usize>,
    /// The largest rise after `converged` that came back down (0 if none).
    pub height: f64,
    /// That rise: (index of the lowest value before it, of its peak, of the
    /// first value back down by [`RECOVERY`] of it).
    pub at: Option<(usize, usize, usize)>,
    /// The largest rise after `converged`, whether it came back down or not.
    pub rise: f64,
    /// All three phases, with a rebound of at least `min_rise` times the
    /// initial value.
    pub three_phases: bool,
}

/// The rebound of curve `s` ([module docs](self)); `min_rise` is the
/// smallest rebound, as a fraction of the initial value s_0, for which the
/// curve counts as showing the three phases. Leading non-finite values are
/// skipped (s_0 is the first finite one).
pub fn rebound_phases(s: &[f64], min_rise: f64) -> Rebound {
    let mut out = Rebound::default();
    let Some(i0) = s.iter().position(|x| x.is_finite()) else { return out };
    let v = |t: usize| if s[t].is_finite() { s[t] } else { f64::INFINITY };
    let initial = s[i0];
    let Some(t1) = (i0..s.len()).find(|&t| s[t] < initial / 2.0) else { return out };
    out.converged = Some(t1);
    // after[t] = min of v over t.., for "does it come back down later".
    let mut after = vec![f64::INFINITY; s.len() + 1];
    for t in (0..s.len()).rev() {
        after[t] = after[t + 1].min(v(t));
    }
    let (mut low, mut low_at) = (v(t1), t1);
    for t in t1 + 1..s.len() {
        let h = v(t) - low;
        if h > 0.0 {
            out.rise = out.rise.max(h);
            let back = if h.is_finite() { v(t) - RECOVERY * h } else { f64::MAX };
            if h > out.height && after[t + 1] <= back {
                let down = (t + 1..s.len()).find(|&u| v(u) <= back).expect("the suffix minimum is reached");
                out.height = h;
                out.at = Some((low_at, t, down));
            }
        }
        if v(t) < low {
            (low, low_at) = (v(t), t);
        }
    }
    out.three_phases = out.at.is_some() && out.height >= min_rise * initial;
    out
}

/// The checkpoint a validation split selects: the highest validation
/// accuracy, ties broken by the lower validation loss, then by the earlier
/// checkpoint. Non-finite accuracies are never selected; None if all are.
pub fn select_checkpoint(val_accuracy: &[f64], val_loss: &[f64]) -> Option<usize> {
    let loss = |i: usize| val_loss.get(i).copied().filter(|l| l.is_finite()).unwrap_or(f64::INFINITY);
    let mut best: Option<usize> = None;
    for (i, &a) in val_accuracy.iter().enumerate() {
        if !a.is_finite() {
            continue;
        }
        best = match best {
            Some(b) if val_accuracy[b] > a || (val_accuracy[b] == a && loss(b) <= loss(i)) => Some(b),
            _ => Some(i),
        };
    }
    best
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
    fn largest_rise_of_hand_made_curves() {
        // Monotone: none.
        assert_eq!(largest_rise(&[5.0, 4.0, 3.0, 3.0, 1.0]), 0.0);
        // Down to 1, up to 2.5, down to 0.5: the rise above the earlier minimum.
        assert_eq!(largest_rise(&[5.0, 1.0, 2.0, 2.5, 1.5, 0.5]), 1.5);
        // The largest of two bumps, each against the minimum before it.
        assert_eq!(largest_rise(&[4.0, 2.0, 3.0, 1.0, 2.5, 0.0]), 1.5);
        // A later bump counts against the lowest point before it, not the last dip.
        assert_eq!(largest_rise(&[3.0, 1.0, 1.2, 1.1, 1.9]), 0.8999999999999999);
        // Rising from the start (never converged) counts too.
        assert_eq!(largest_rise(&[1.0, 2.0]), 1.0);
        assert_eq!(largest_rise(&[1.0]), 0.0);
        assert_eq!(largest_rise(&[]), 0.0);
        // Divergence after convergence.
        assert_eq!(largest_rise(&[2.0, 1.0, f64::NAN]), f64::INFINITY);
        // Leading non-finite values (a smoothing window) are ignored.
        assert_eq!(largest_rise(&[f64::NAN, 2.0, 1.0]), 0.0);
        assert_eq!(largest_rise_at(&[5.0, 1.0, 2.0, 2.5, 1.5]), Some((1, 3)));
        assert_eq!(largest_rise_at(&[3.0, 2.0, 1.0]), None);
    }

    #[test]
    fn three_phases_of_hand_made_curves() {
        // Converges (4 -> 1.5 < 2), rises to 3 above the low 1, comes back down to 0.5.
        let r = rebound_phases(&[4.0, 3.0, 1.5, 1.0, 2.0, 3.0, 2.0, 0.5], 0.1);
        assert_eq!((r.converged, r.height, r.at, r.rise, r.three_phases), (Some(2), 2.0, Some((3, 5, 6)), 2.0, true));
        // Too small a rise for the three phases (0.2 < 0.1 * 4), but a rebound all the same.
        let r = rebound_phases(&[4.0, 1.0, 1.2, 0.8], 0.1);
        assert!((r.height - 0.2).abs() < 1e-12 && !r.three_phases);
        // A rise before the loss fell below half its initial value does not count.
        let r = rebound_phases(&[4.0, 2.5, 3.9, 2.5, 1.0, 0.5], 0.01);
        assert_eq!((r.converged, r.height, r.rise, r.three_phases), (Some(4), 0.0, 0.0, false));
        // A rise that never comes back down (still climbing at the end): a rise, not a rebound.
        let r = rebound_phases(&[4.0, 1.0, 0.5, 1.0, 2.0, 2.5], 0.01);
        assert_eq!((r.height, r.rise, r.three_phases), (0.0, 2.0, false));
        // Coming down by less than half the rise is not "back down"...
        let r = rebound_phases(&[4.0, 1.0, 0.5, 2.5, 1.6], 0.01);
        assert_eq!((r.height, r.three_phases), (0.0, false));
        // ... by half of it is.
        assert_eq!(rebound_phases(&[4.0, 1.0, 0.5, 2.5, 1.5], 0.01).at, Some((2, 3, 4)));
        // Never converged: nothing.
        assert_eq!(rebound_phases(&[4.0, 3.0, 3.5, 2.5], 0.0), Rebound::default());
        // The largest rise that came back down, not the largest rise.
        let r = rebound_phases(&[4.0, 1.0, 2.0, 0.5, 3.5], 0.01);
        assert_eq!((r.height, r.at, r.rise), (1.0, Some((1, 2, 3)), 3.0));
        // A divergence that recovers is an infinite rebound; one that does not is an infinite rise.
        let r = rebound_phases(&[4.0, 1.0, f64::NAN, 0.5], 0.1);
        assert_eq!((r.height, r.three_phases), (f64::INFINITY, true));
        let r = rebound_phases(&[4.0, 1.0, f64::NAN], 0.1);
        assert_eq!((r.height, r.rise, r.three_phases), (0.0, f64::INFINITY, false));
        // Leading non-finite values (a smoothing window) are skipped.
        assert_eq!(rebound_phases(&[f64::NAN, 4.0, 1.0, 3.0, 0.5], 0.1).at, Some((2, 3, 4)));
        assert_eq!(rebound_phases(&[], 0.1), Rebound::default());
    }

    #[test]
    fn validation_selects_the_checkpoint() {
        assert_eq!(select_checkpoint(&[0.1, 0.9, 0.8], &[2.0, 0.5, 0.4]), Some(1));
        // A tie on accuracy goes to the lower loss, then to the earlier checkpoint.
        assert_eq!(select_checkpoint(&[0.1, 0.9, 0.9], &[2.0, 0.5, 0.4]), Some(2));
        assert_eq!(select_checkpoint(&[0.9, 0.9, 0.9], &[0.5, 0.4, 0.4]), Some(1));
        assert_eq!(select_checkpoint(&[f64::NAN, 0.2], &[0.1, 0.3]), Some(1));
        assert_eq!(select_checkpoint(&[], &[]), None);
    }

    #[test]
    fn mean_and_sample_deviation() {
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 2f64.sqrt()));
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }
}
