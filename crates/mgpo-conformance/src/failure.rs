//! What a failed check says: where (vector or property case, step, tensor,
//! index), what (value, expected value, tolerance), and which backend
//! method most likely computed it wrong.

use std::fmt;

use mgpo_core::{Perturbation, Space};

use crate::vector::Tolerance;

/// Where a failure was found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// The conformance vector of this name.
    Vector(String),
    /// A property case: that of this seed ([`crate::props::kit_case`],
    /// replayed by [`crate::Suite::check_case`]), or one given directly.
    Case {
        /// The case's seed, when it came from one.
        seed: Option<u64>,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Vector(name) => write!(f, "vector `{name}`"),
            Origin::Case { seed: Some(seed) } => write!(f, "property case {seed:#018x}"),
            Origin::Case { seed: None } => write!(f, "property case"),
        }
    }
}

/// The quantity a check compares, in the order a step produces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Quantity {
    /// The perturbation `perturb` added: perturbed minus clean (vectors), or
    /// the perturbed tensors themselves (property cases).
    Perturbation,
    /// Whether the step was skipped for a non-finite gradient.
    Skipped,
    /// g_bar, the EMA of a group's gradient norm.
    GradNormEma,
    /// The trainable tensors after the step.
    Params,
    /// W0 after the step (weight space), which must be back to clean.
    W0,
    /// The run itself: the optimizer or the backend returned an error.
    Run,
}

impl Quantity {
    /// Every quantity, in the order of [`Quantity`].
    pub const ALL: [Quantity; 6] = [Quantity::Perturbation, Quantity::Skipped, Quantity::GradNormEma, Quantity::Params, Quantity::W0, Quantity::Run];

    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Quantity::Perturbation => "perturbation",
            Quantity::Skipped => "skipped",
            Quantity::GradNormEma => "grad_norm_ema",
            Quantity::Params => "params",
            Quantity::W0 => "w0",
            Quantity::Run => "run",
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backend trait method most likely at fault for a failure.
///
/// The kit only sees what the optimizer produced, not which method
/// produced it, so this is a heuristic from the first failing quantity of
/// a run and the configuration it ran under (checks run in the order a
/// step computes, so the first failure is the most upstream one):
///
/// | first failure | space, direction | suspect |
/// |---|---|---|
/// | `skipped` | any | [`Suspect::FiniteTest`] |
/// | `grad_norm_ema` | adapter | [`Suspect::SumSq`] |
/// | `grad_norm_ema` | weight | [`Suspect::Grams`] |
/// | `params` | any | [`Suspect::AdamW`] |
/// | `w0` | weight | [`Suspect::AddLowRank`] (the removal) |
/// | `perturbation`, off by one common factor | adapter, momentum | [`Suspect::AdamWMomentNorm`] |
/// | `perturbation`, off by one common factor | weight, momentum | [`Suspect::Grams`] |
/// | `perturbation`, otherwise | adapter, momentum | [`Suspect::Axpy`] |
/// | `perturbation`, otherwise | weight, momentum | [`Suspect::AddLowRank`] |
/// | `perturbation` | Gaussian | [`Suspect::AxpyNoise`] |
/// | `run` | any | [`Suspect::Error`] |
///
/// "Off by one common factor": the perturbation is c d with c from a norm
/// (the first moment's sum of squares that `adamw` returned, or the
/// weight-space norm through Gram matrices) and d a tensor the previous
/// step already checked, so a perturbation that is the expected one times
/// a single scalar (within tolerance) points at the norm, and one with the
/// wrong shape points at the method that adds it. Gradient norms are
/// checked (g_bar) before the parameters, so a wrong norm that also moves
/// the parameters through clipping is blamed on the norm. Two cases the
/// table gets wrong: a `sum_sq` that is wrong only on the clipping norm in
/// weight space (blamed on `adamw`), and any fault whose first effect a
/// vector does not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suspect {
    /// `Reduce::sum_sq` (or `sum_sq_many`): a gradient norm.
    SumSq,
    /// `Reduce::sum_sq` / `Reduce::all_finite`: the non-finite-gradient test.
    FiniteTest,
    /// `FusedUpdate::adamw` (or `adamw_many`): the update of p, m or v.
    AdamW,
    /// `FusedUpdate::adamw` (or `adamw_many`): its returned sum m^2, the
    /// norm of the next adapter-space perturbation.
    AdamWMomentNorm,
    /// `FusedUpdate::axpy` (or `axpy_many`): adding the momentum perturbation.
    Axpy,
    /// `FusedUpdate::axpy_noise`: the Gaussian noise stream.
    AxpyNoise,
    /// `LowRank::gram_cols` / `LowRank::gram_rows` (or `low_rank_norm_sq`):
    /// a weight-space norm.
    Grams,
    /// `LowRank::add_low_rank`: adding or removing the W0 perturbation.
    AddLowRank,
    /// The backend or the optimizer returned an error (in the failure's
    /// message); `HostIo` when it is about the vector's tensors.
    Error,
}

impl Suspect {
    /// The trait method, as `Trait::method`.
    pub fn method(self) -> &'static str {
        match self {
            Suspect::SumSq => "Reduce::sum_sq",
            Suspect::FiniteTest => "Reduce::sum_sq / Reduce::all_finite",
            Suspect::AdamW | Suspect::AdamWMomentNorm => "FusedUpdate::adamw",
            Suspect::Axpy => "FusedUpdate::axpy",
            Suspect::AxpyNoise => "FusedUpdate::axpy_noise",
            Suspect::Grams => "LowRank::gram_cols / LowRank::gram_rows",
            Suspect::AddLowRank => "LowRank::add_low_rank",
            Suspect::Error => "the error returned",
        }
    }

    /// What that method computes here.
    pub fn role(self) -> &'static str {
        match self {
            Suspect::SumSq => "a gradient norm (sum_sq_many too; accumulate in f64)",
            Suspect::FiniteTest => "the non-finite-gradient test",
            Suspect::AdamW => "the update of p, m or v (adamw_many too)",
            Suspect::AdamWMomentNorm => "its returned sum m^2 of the new m, the norm of the next perturbation (accumulate in f64)",
            Suspect::Axpy => "adding the momentum perturbation (axpy_many too)",
            Suspect::AxpyNoise => "the Gaussian noise stream z(seed, i), i the row-major index",
            Suspect::Grams => "a weight-space norm through r x r Gram matrices (low_rank_norm_sq too; accumulate in f64)",
            Suspect::AddLowRank => "adding or removing the W0 perturbation c (P Q + R S)",
            Suspect::Error => "by the backend or the optimizer",
        }
    }

    /// The suspect of a first failure on `quantity` (not a perturbation)
    /// under `space`.
    pub(crate) fn of(quantity: Quantity, space: Space) -> Suspect {
        match (quantity, space) {
            (Quantity::Skipped, _) => Suspect::FiniteTest,
            (Quantity::GradNormEma, Space::Adapter) => Suspect::SumSq,
            (Quantity::GradNormEma, Space::Weight) => Suspect::Grams,
            (Quantity::Params, _) => Suspect::AdamW,
            (Quantity::W0, _) => Suspect::AddLowRank,
            (Quantity::Perturbation, _) | (Quantity::Run, _) => Suspect::Error,
        }
    }

    /// The suspect of W0 not restored after a step: the method that added
    /// the perturbation removes it.
    pub(crate) fn of_w0(mode: Perturbation) -> Suspect {
        match mode {
            Perturbation::Momentum => Suspect::AddLowRank,
            _ => Suspect::AxpyNoise,
        }
    }

    /// The suspect of a wrong perturbation `got` where `want` was expected
    /// (both the added amounts): a common factor points at the norm,
    /// anything else at the method that adds it.
    pub(crate) fn of_perturbation(space: Space, mode: Perturbation, got: &[f64], want: &[f64], tol: Tolerance) -> Suspect {
        if mode != Perturbation::Momentum {
            return Suspect::AxpyNoise;
        }
        let scaled = common_factor(got, want, tol).is_some();
        match (space, scaled) {
            (Space::Adapter, true) => Suspect::AdamWMomentNorm,
            (Space::Adapter, false) => Suspect::Axpy,
            (Space::Weight, true) => Suspect::Grams,
            (Space::Weight, false) => Suspect::AddLowRank,
        }
    }
}

impl fmt::Display for Suspect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.method(), self.role())
    }
}

/// The scalar lambda with got = lambda * want entry by entry within `tol`
/// (least squares, finite entries only), if there is one.
fn common_factor(got: &[f64], want: &[f64], tol: Tolerance) -> Option<f64> {
    if got.len() != want.len() || got.iter().chain(want).any(|x| !x.is_finite()) {
        return None;
    }
    let ww: f64 = want.iter().map(|w| w * w).sum();
    if ww == 0.0 {
        return None;
    }
    let lambda = got.iter().zip(want).map(|(g, w)| g * w).sum::<f64>() / ww;
    got.iter().zip(want).all(|(&g, &w)| tol.accepts(g, lambda * w)).then_some(lambda)
}

/// How a checked quantity differs from what was expected.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Mismatch {
    /// Entry `index` (row-major) is `got` where `expected` was, outside the tolerance.
    Value {
        /// Row-major index in the tensor (0 for a scalar).
        index: usize,
        /// What the backend produced.
        got: f64,
        /// What the reference says.
        expected: f64,
    },
    /// A flag (skipped) differs.
    Flag {
        /// What the backend produced.
        got: bool,
        /// What the reference says.
        expected: bool,
    },
    /// The tensor has the wrong number of entries.
    Len {
        /// Entries the backend produced.
        got: usize,
        /// Entries expected.
        expected: usize,
    },
    /// One side has a value where the other has none (g_bar before a group's first step).
    Presence {
        /// What the backend produced.
        got: Option<f64>,
        /// What the reference says.
        expected: Option<f64>,
    },
    /// The run stopped with this error.
    Error(String),
}

/// One failed check of the conformance kit.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Failure {
    /// The vector or property case.
    pub origin: Origin,
    /// The step, from 1 (0: before the first step).
    pub step: usize,
    /// What was compared.
    pub quantity: Quantity,
    /// The tensor (`q.a`, `q.w0`, a plain tensor's name) or scalar
    /// (`g_bar[global]`) compared; empty for [`Quantity::Run`].
    pub tensor: String,
    /// How it differs.
    pub mismatch: Mismatch,
    /// The tolerance it was held to (none for flags and errors).
    pub tolerance: Option<Tolerance>,
    /// The trait method most likely at fault (see [`Suspect`]).
    pub suspect: Suspect,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, step {}", self.origin, self.step)?;
        if !self.tensor.is_empty() {
            write!(f, ", {} {}", self.quantity, self.tensor)?;
        }
        match &self.mismatch {
            Mismatch::Value { index, got, expected } => {
                write!(f, "[{index}]: got {got:e}, expected {expected:e}")?;
                if let Some(t) = self.tolerance {
                    write!(f, " (|diff| {:.3e} > atol {:e} + rtol {:e} * |expected|)", (got - expected).abs(), t.atol, t.rtol)?;
                }
            }
            Mismatch::Flag { got, expected } => write!(f, ": got {got}, expected {expected}")?,
            Mismatch::Len { got, expected } => write!(f, ": {got} entries, expected {expected}")?,
            Mismatch::Presence { got, expected } => write!(f, ": got {got:?}, expected {expected:?}")?,
            Mismatch::Error(e) => write!(f, ": the run stopped: {e}")?,
        }
        write!(f, "; most likely at fault: {}", self.suspect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_common_factor_blames_the_norm_and_a_wrong_shape_the_update() {
        let tol = Tolerance { rtol: 1e-5, atol: 1e-9 };
        let want = [1.0, -2.0, 0.5];
        let scaled = [1.001, -2.002, 0.5005];
        let bent = [1.0, -2.0, 0.6];
        let m = Perturbation::Momentum;
        assert_eq!(Suspect::of_perturbation(Space::Adapter, m, &scaled, &want, tol), Suspect::AdamWMomentNorm);
        assert_eq!(Suspect::of_perturbation(Space::Adapter, m, &bent, &want, tol), Suspect::Axpy);
        assert_eq!(Suspect::of_perturbation(Space::Weight, m, &scaled, &want, tol), Suspect::Grams);
        assert_eq!(Suspect::of_perturbation(Space::Weight, m, &bent, &want, tol), Suspect::AddLowRank);
        assert_eq!(Suspect::of_perturbation(Space::Adapter, Perturbation::Gaussian { seed: 1 }, &scaled, &want, tol), Suspect::AxpyNoise);
        assert_eq!(Suspect::of_perturbation(Space::Adapter, m, &[0.0; 3], &[0.0; 3], tol), Suspect::Axpy);
    }

    #[test]
    fn says_where_what_and_who() {
        let f = Failure {
            origin: Origin::Vector("clamp-active".into()),
            step: 2,
            quantity: Quantity::Params,
            tensor: "q.a".into(),
            mismatch: Mismatch::Value { index: 3, got: 1.5, expected: 1.25 },
            tolerance: Some(Tolerance { rtol: 1e-5, atol: 1e-8 }),
            suspect: Suspect::AdamW,
        };
        let s = f.to_string();
        for needle in ["vector `clamp-active`", "step 2", "params q.a[3]", "got 1.5e0", "expected 1.25e0", "atol 1e-8", "rtol 1e-5", "FusedUpdate::adamw"] {
            assert!(s.contains(needle), "{needle:?} not in {s}");
        }
    }
}
