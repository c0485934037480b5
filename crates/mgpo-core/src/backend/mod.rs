//! For backend authors: what the algorithm needs from a tensor library, one
//! small trait per capability (after argmin-math). A backend implements
//! these for its own tensor type; the algorithm in [`crate::Mgpo`] never
//! sees the backend. The conformance crate's guide (`mgpo_conformance::guide`)
//! walks through a complete one and its tests.
//!
//! | trait | methods | precision |
//! |---|---|---|
//! | [`Tensors`] | `shape`, `zeros_like` | - |
//! | [`Reduce`] | `sum_sq`, `all_finite`, `sum_sq_many` | accumulate in f64 |
//! | [`FusedUpdate`] | `axpy`, `axpy_noise`, `adamw` (returns sum m^2 in f64), the `_many` forms | element type, in the order of [`adamw_element`] |
//! | [`LowRank`] | `gram_cols`, `gram_rows` (f64 results), `add_low_rank`, `low_rank_norm_sq` | Grams accumulate in f64 |
//! | [`HostIo`] | `from_f64`, `to_f64` | conformance and checkpoints only |
//!
//! [`TensorOps`] is the first four together: what a training step needs.
//! [`cpu`] has ready slice kernels (AdamW, sums of squares, axpy, Grams,
//! noise) for any backend whose tensors can lend a `&mut [F]`; [`noise`]
//! defines the Gaussian direction. Mutated tensors are passed as `&mut`:
//! backends whose tensors are shared handles (candle `Var`, `tch::Tensor`)
//! update their storage in place.

pub mod cpu;
pub mod lowrank;
pub mod noise;

pub use num_traits::Float;

use crate::error::Result;

/// The backend's tensor type, its shape and fresh zero tensors.
pub trait Tensors {
    /// The tensor type: a value (ndarray) or a handle to shared storage (candle, tch).
    type Tensor;

    /// The tensor's shape, outermost dimension first.
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;

    /// A zero tensor of `t`'s shape, dtype and device (for AdamW's m and v).
    fn zeros_like(&self, t: &Self::Tensor) -> Result<Self::Tensor>;
}

/// Reductions, accumulated in f64 whatever the element type.
pub trait Reduce: Tensors {
    /// sum_i t_i^2. Non-finite when `t` holds a NaN or an infinity.
    fn sum_sq(&self, t: &Self::Tensor) -> Result<f64>;

    /// Whether every entry is finite. Only asked when [`Reduce::sum_sq`]
    /// came out non-finite, which can also be an overflow of finite values.
    fn all_finite(&self, t: &Self::Tensor) -> Result<bool>;

    /// [`Reduce::sum_sq`] of many tensors at once, each result bit-identical
    /// to `sum_sq` of that tensor alone. A step calls this once, so a
    /// backend can cover a model's hundreds of small tensors in one parallel
    /// region instead of one per tensor.
    fn sum_sq_many(&self, ts: &[&Self::Tensor]) -> Result<Vec<f64>> {
        ts.iter().map(|t| self.sum_sq(t)).collect()
    }
}

/// The element-wise updates of a step, each one fused pass over memory.
pub trait FusedUpdate: Tensors {
    /// y <- y + alpha x.
    fn axpy(&self, y: &mut Self::Tensor, alpha: f64, x: &Self::Tensor) -> Result<()>;

    /// y <- y + alpha z with z_i = [`noise::gaussian`]`(seed, i)`, i
    /// the row-major index: the random-direction baseline. Backends that do
    /// not draw noise keep this default, and that mode is refused on them.
    fn axpy_noise(&self, y: &mut Self::Tensor, alpha: f64, seed: u64) -> Result<()> {
        let _ = (y, alpha, seed);
        Err(crate::MgpoError::Backend("this backend does not implement the Gaussian perturbation mode".into()))
    }

    /// One AdamW step of one tensor with the perturbation removal and the
    /// clipping factor folded in, element by element as [`adamw_element`].
    /// Returns sum_i m_i^2 of the new first moment, which is the next
    /// step's adapter-space perturbation norm.
    fn adamw(
        &self,
        p: &mut Self::Tensor,
        g: &Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        k: &AdamWStep,
    ) -> Result<f64>;

    /// [`FusedUpdate::axpy`] over many tensors at once (one parallel region
    /// per step rather than one per tensor); the same bits as one by one.
    fn axpy_many(&self, items: &mut [AxpyItem<'_, Self::Tensor>]) -> Result<()> {
        items.iter_mut().try_for_each(|it| self.axpy(it.y, it.alpha, it.x))
    }

    /// [`FusedUpdate::adamw`] over many tensors at once, returning sum m^2
    /// per item, each bit-identical to `adamw` of that item alone. Backends
    /// check every item's shapes before updating any.
    fn adamw_many(&self, items: &mut [AdamWItem<'_, Self::Tensor>]) -> Result<Vec<f64>> {
        items.iter_mut().map(|it| self.adamw(it.p, it.g, it.m, it.v, &it.k)).collect()
    }
}

/// One tensor of [`FusedUpdate::axpy_many`]: y <- y + alpha x.
pub struct AxpyItem<'a, T> {
    /// Updated in place.
    pub y: &'a mut T,
    /// The coefficient.
    pub alpha: f64,
    /// The direction.
    pub x: &'a T,
}

/// One tensor of [`FusedUpdate::adamw_many`].
pub struct AdamWItem<'a, T> {
    /// The parameter, updated in place.
    pub p: &'a mut T,
    /// Its gradient at the perturbed point.
    pub g: &'a T,
    /// First moment, updated in place.
    pub m: &'a mut T,
    /// Second moment, updated in place.
    pub v: &'a mut T,
    /// The step's scalars for this tensor.
    pub k: AdamWStep,
}

/// The small matrix products of a rank-decomposed adapter (A is r x in,
/// B and the momenta of B are out x r). No out x in matrix is ever built to
/// take a norm.
pub trait LowRank: Tensors {
    /// X^T Y for X, Y of shape n x r: an r x r matrix, row-major, in f64.
    fn gram_cols(&self, x: &Self::Tensor, y: &Self::Tensor) -> Result<Vec<f64>>;

    /// X Y^T for X, Y of shape r x n: an r x r matrix, row-major, in f64.
    fn gram_rows(&self, x: &Self::Tensor, y: &Self::Tensor) -> Result<Vec<f64>>;

    /// W <- W + c (P Q + R S) with P, R of shape out x r and Q, S of shape
    /// r x in: two rank-r updates of W, without an out x in temporary.
    #[allow(clippy::too_many_arguments)]
    fn add_low_rank(
        &self,
        w: &mut Self::Tensor,
        c: f64,
        p: &Self::Tensor,
        q: &Self::Tensor,
        r: &Self::Tensor,
        s: &Self::Tensor,
    ) -> Result<()>;

    /// ||P Q + R S||_F^2 for P, R of shape out x r and Q, S of shape r x in
    /// (the weight-space norms of a step). The default takes it through
    /// r x r Gram matrices ([`lowrank::sum_of_products_sq`]):
    /// O(r^2 (out + in)) work and no out x in matrix. Where
    /// out in <= r (out + in) forming P Q + R S is both cheaper and no
    /// larger than the adapter itself, and a backend with a fast matrix
    /// product may do that instead.
    fn low_rank_norm_sq(&self, p: &Self::Tensor, q: &Self::Tensor, r: &Self::Tensor, s: &Self::Tensor) -> Result<f64> {
        lowrank::sum_of_products_sq(self, p, q, r, s)
    }
}

/// Whether forming the out x in product of a rank-`r` pair is cheaper than
/// its Gram matrices and no larger than the adapter (see
/// [`LowRank::low_rank_norm_sq`]).
pub fn materialise_is_cheaper(out: usize, inp: usize, r: usize) -> bool {
    out.saturating_mul(inp) <= r.saturating_mul(out + inp)
}

/// Moving tensors to and from the host as f64, for conformance vectors,
/// checkpoints and tests. Not used by a training step.
pub trait HostIo: Tensors {
    /// A tensor of `shape` with row-major `data`, rounded to the backend's element type.
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<Self::Tensor>;
    /// The tensor's values, row-major, widened to f64.
    fn to_f64(&self, t: &Self::Tensor) -> Result<Vec<f64>>;

    /// Whether tensors keep f64 values exactly (decides a checkpoint's
    /// dtype). The default probes a round trip of 1 + 2^-40.
    fn f64_exact(&self) -> bool {
        let x = 1.0 + 2f64.powi(-40);
        self.from_f64(&[1], &[x]).and_then(|t| self.to_f64(&t)).is_ok_and(|v| v == [x])
    }
}

/// Everything a training step needs.
pub trait TensorOps: Reduce + FusedUpdate + LowRank {}
impl<B: Reduce + FusedUpdate + LowRank> TensorOps for B {}

/// The scalars of one AdamW step of one tensor, precomputed once per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Removed before the update: p <- p - unperturb * m (the adapter-space
    /// perturbation that `perturb` added; 0 when there is none).
    pub unperturb: f64,
    /// 1 - lr * weight_decay.
    pub decay: f64,
    /// Multiplies the gradient: the clipping factor min(1, c / (||g|| + 1e-6)).
    pub grad_scale: f64,
    /// beta1 (the paper's mu).
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// lr / (1 - beta1^t).
    pub step_size: f64,
    /// sqrt(1 - beta2^t).
    pub bias2_sqrt: f64,
    /// AdamW's eps.
    pub eps: f64,
}

/// The per-element update every CPU backend runs, in the element type `F`,
/// in the order of `torch.optim.AdamW` (single-tensor, non-amsgrad):
///
/// ```text
/// p <- p - unperturb * m          (remove the perturbation, m = m_{t-1})
/// p <- p * (1 - lr wd)
/// g <- grad_scale * g
/// m <- beta1 m + (1 - beta1) g     (exact for beta1 = 0, unlike m + (1 - beta1)(g - m))
/// v <- beta2 v + (1 - beta2) g^2
/// p <- p - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// ```
#[inline(always)]
pub fn adamw_element<F: Float>(p: &mut F, g: F, m: &mut F, v: &mut F, k: &AdamWConsts<F>) {
    let g = g * k.grad_scale;
    let clean = *p - k.unperturb * *m;
    let mm = k.beta1 * *m + k.one_minus_beta1 * g;
    let vv = k.beta2 * *v + k.one_minus_beta2 * g * g;
    *p = clean * k.decay - k.step_size * mm / (vv.sqrt() / k.bias2_sqrt + k.eps);
    *m = mm;
    *v = vv;
}

/// [`AdamWStep`] cast once to the element type.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConsts<F> {
    /// See [`AdamWStep::unperturb`].
    pub unperturb: F,
    /// See [`AdamWStep::decay`].
    pub decay: F,
    /// See [`AdamWStep::grad_scale`].
    pub grad_scale: F,
    /// beta1.
    pub beta1: F,
    /// 1 - beta1.
    pub one_minus_beta1: F,
    /// beta2.
    pub beta2: F,
    /// 1 - beta2.
    pub one_minus_beta2: F,
    /// See [`AdamWStep::step_size`].
    pub step_size: F,
    /// See [`AdamWStep::bias2_sqrt`].
    pub bias2_sqrt: F,
    /// AdamW's eps.
    pub eps: F,
}

impl AdamWStep {
    /// The scalars cast once to the element type `F`.
    pub fn consts<F: Float>(&self) -> AdamWConsts<F> {
        let c = |x: f64| F::from(x).expect("f64 converts to every Float");
        AdamWConsts {
            unperturb: c(self.unperturb),
            decay: c(self.decay),
            grad_scale: c(self.grad_scale),
            beta1: c(self.beta1),
            one_minus_beta1: c(1.0 - self.beta1),
            beta2: c(self.beta2),
            one_minus_beta2: c(1.0 - self.beta2),
            step_size: c(self.step_size),
            bias2_sqrt: c(self.bias2_sqrt),
            eps: c(self.eps),
        }
    }
}
