//! What one run came to, from its curves alone: the logged per-step loss
//! and periodic evaluations of the clean model. Nothing here knows the
//! model or the framework, so any classification fine-tuning (the MLP
//! tasks of this crate, a transformer) summarises its runs the same way:
//!
//! - the rebound ([`crate::metrics::rebound_phases`]) of the smoothed
//!   logged loss (at the perturbed point under MGPO, as a trainer logs it)
//!   and of the clean training loss (unperturbed parameters, a fixed
//!   training subset, every evaluation);
//! - the test accuracy at the checkpoint chosen on the validation split
//!   ([`crate::metrics::select_checkpoint`]), not the best test accuracy.

use serde::{Deserialize, Serialize};

use crate::metrics::{rebound_phases, select_checkpoint, smooth, Rebound};

/// The clean (unperturbed) model evaluated after `step` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Steps taken before this evaluation (0: the initial model).
    pub step: u64,
    /// Loss and accuracy on the fixed training subset (the clean training loss).
    pub train_loss: f64,
    /// Accuracy on the same subset, in [0, 1].
    pub train_accuracy: f64,
    /// On the validation split, which selects the checkpoint.
    pub val_loss: f64,
    /// Accuracy on the validation split, in [0, 1].
    pub val_accuracy: f64,
    /// Mean cross-entropy on the test split.
    pub test_loss: f64,
    /// Accuracy on the test split, in [0, 1].
    pub test_accuracy: f64,
}

/// A run's summary numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Rebound of the smoothed logged loss; its indices are steps - 1.
    pub logged: Rebound,
    /// Rebound of the clean training loss; its indices are evaluation indices.
    pub clean: Rebound,
    /// The evaluation the validation split selects.
    pub selected: EvalRecord,
    /// The last evaluation.
    pub last: EvalRecord,
    /// The smoothed logged loss at the last step.
    pub final_logged: f64,
}

impl Outcome {
    /// Summarises a run: `logged` holds the loss of every step (step 1
    /// first), `evals` the evaluations in step order (the first before any
    /// step). `window` is the trailing mean the logged loss is smoothed
    /// with; `min_rise` the smallest rebound, as a fraction of the initial
    /// loss, that counts as the three phases. None without evaluations.
    pub fn from_curves(logged: &[f64], evals: &[EvalRecord], window: usize, min_rise: f64) -> Option<Outcome> {
        let last = *evals.last()?;
        let s = smooth(logged, window);
        let clean: Vec<f64> = evals.iter().map(|e| e.train_loss).collect();
        let val_acc: Vec<f64> = evals.iter().map(|e| e.val_accuracy).collect();
        let val_loss: Vec<f64> = evals.iter().map(|e| e.val_loss).collect();
        // With no finite validation accuracy at all, the last checkpoint stands.
        let selected = select_checkpoint(&val_acc, &val_loss).map_or(last, |i| evals[i]);
        Some(Outcome {
            logged: rebound_phases(&s, min_rise),
            clean: rebound_phases(&clean, min_rise),
            selected,
            last,
            final_logged: s.last().copied().unwrap_or(f64::NAN),
        })
    }

    /// Steps of the logged rebound: (converged, lowest, peak, back down).
    pub fn logged_steps(&self) -> (Option<u64>, Option<(u64, u64, u64)>) {
        let st = |t: usize| t as u64 + 1;
        (self.logged.converged.map(st), self.logged.at.map(|(a, b, c)| (st(a), st(b), st(c))))
    }

    /// Steps of the clean rebound, from the evaluations' steps.
    pub fn clean_steps(&self, evals: &[EvalRecord]) -> (Option<u64>, Option<(u64, u64, u64)>) {
        let st = |i: usize| evals.get(i).map_or(u64::MAX, |e| e.step);
        (self.clean.converged.map(st), self.clean.at.map(|(a, b, c)| (st(a), st(b), st(c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(step: u64, train_loss: f64, val_accuracy: f64, test_accuracy: f64) -> EvalRecord {
        EvalRecord { step, train_loss, train_accuracy: 0.0, val_loss: 1.0, val_accuracy, test_loss: 1.0, test_accuracy }
    }

    #[test]
    fn outcome_reads_both_curves_and_selects_on_validation() {
        // Clean loss: converges, rebounds at step 30, comes back down.
        let evals = [ev(0, 2.0, 0.1, 0.1), ev(10, 0.5, 0.7, 0.9), ev(20, 0.2, 0.8, 0.6), ev(30, 0.9, 0.5, 0.95), ev(40, 0.1, 0.75, 0.7)];
        let logged = [2.0, 2.0, 0.4, 0.4, 0.1, 0.1, 0.1, 0.1];
        let o = Outcome::from_curves(&logged, &evals, 2, 0.1).unwrap();
        assert!((o.clean.height - 0.7).abs() < 1e-12 && o.clean.three_phases);
        assert_eq!(o.clean_steps(&evals), (Some(10), Some((20, 30, 40))));
        // The test accuracy where validation is best (step 20), not the best test accuracy (step 30).
        assert_eq!((o.selected.step, o.selected.test_accuracy), (20, 0.6));
        assert_eq!(o.last.step, 40);
        // Smoothed over 2: 2, 2, 1.2, 0.4, 0.25, 0.1, ...: monotone.
        assert_eq!((o.logged.height, o.logged.converged), (0.0, Some(3)));
        assert!((o.final_logged - 0.1).abs() < 1e-12, "{}", o.final_logged);
        assert_eq!(o.logged_steps().0, Some(4));
        assert!(Outcome::from_curves(&logged, &[], 2, 0.1).is_none());
    }
}
