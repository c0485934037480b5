//! The paper's learning-rate schedule: linear warm-up over the first 3% of
//! steps, then cosine decay to 0 (transformers'
//! `get_cosine_schedule_with_warmup`).

/// lr_k = lr k / w for k < w, else lr (1 + cos(pi (k - w) / (T - w))) / 2,
/// for step index k = 0, 1, ... of T steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps w.
    pub warmup: u64,
    /// Total steps T.
    pub total: u64,
}

impl WarmupCosine {
    /// The paper's schedule: warm-up over ceil(3%) of `total` steps.
    pub fn paper(lr: f64, total: u64) -> Self {
        WarmupCosine { lr, warmup: (total as f64 * 0.03).ceil() as u64, total }
    }

    /// Learning rate at step index `k` (0-based); 0 past the end.
    pub fn lr_at(&self, k: u64) -> f64 {
        if k < self.warmup {
            return self.lr * k as f64 / self.warmup as f64;
        }
        if k >= self.total {
            return 0.0;
        }
        let progress = (k - self.warmup) as f64 / (self.total - self.warmup).max(1) as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        let s = WarmupCosine::paper(1e-3, 100);
        assert_eq!(s.warmup, 3);
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(1) - 1e-3 / 3.0).abs() < 1e-18);
        assert_eq!(s.lr_at(3), 1e-3);
        assert!((s.lr_at(3 + 97 / 2) - 0.5e-3).abs() < 2e-5);
        assert!(s.lr_at(99) > 0.0 && s.lr_at(99) < 1e-6);
        assert_eq!(s.lr_at(100), 0.0);
        let mut prev = f64::INFINITY;
        for k in 3..100 {
            assert!(s.lr_at(k) <= prev);
            prev = s.lr_at(k);
        }
    }
}
