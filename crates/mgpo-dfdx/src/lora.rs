//! [`LoraLinear`]: a dfdx linear layer with a low-rank adapter,
//!
//! ```text
//! y = W0 x + b + s B (A x)        s = alpha / r   (rsLoRA: alpha / sqrt(r))
//! ```
//!
//! with peft's semantics: W0 (O x I) and b are frozen, A (R x I) starts
//! Kaiming-uniform with a = sqrt(5) (U(-1/sqrt(I), 1/sqrt(I))), B (O x R)
//! starts at zero, so a fresh adapter leaves the base output unchanged; the
//! base output is not scaled. [`LoraLinear::merge`] folds s B A into W0 and
//! [`LoraLinear::unmerge`] takes it out again.
//!
//! LoRA-MGPO's weight-space perturbation is applied in factored form: while
//! [`crate::DfdxMgpo`] has the model perturbed, the layer also adds
//!
//! ```text
//! coef (m_B (A_c x) + B_c (m_A x))
//! ```
//!
//! where A_c, B_c are copies of the clean A, B taken at perturb time (fresh
//! tensors, so no gradient of this term reaches A or B) and m_A, m_B are
//! AdamW's first moments. That is exactly (W0 + eps_D) x with
//! eps_D = coef (m_B A + B m_A), without ever writing W0.
//!
//! Every piece of state is a tensor of the dfdx `TensorCollection`, so
//! saving, loading, `to_dtype` and `to_device` keep it: the scaling s, the
//! merged flag and the perturbation (rank-0 tensors and detached factors).
//! dfdx's `reset_params` resets the layer as a fresh build would, which
//! sets s back to 1: call [`LoraLinear::set_config`] again after it.

use std::fmt;

use dfdx::nn::modules::Linear;
use dfdx::nn::{BuildModule, Module, ModuleVisitor, NonMutableModule, TensorCollection, TensorOptions};
use dfdx::prelude::*;
use num_traits::Float;
use rand_distr::uniform::SampleUniform;
use rand_distr::Uniform;

/// The adapter's scaling, as peft's `lora_alpha` and `use_rslora`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub alpha: f64,
    /// rsLoRA: s = alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
}

impl LoraConfig {
    pub fn new(alpha: f64) -> Self {
        LoraConfig { alpha, rslora: false }
    }
    pub fn rslora(alpha: f64) -> Self {
        LoraConfig { alpha, rslora: true }
    }
    /// s for rank `r`.
    pub fn scale(&self, r: usize) -> f64 {
        let r = r as f64;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

/// What a [`LoraLinear`] call can refuse.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraError {
    /// `merge` on a merged layer, or a change of scaling while merged.
    AlreadyMerged,
    /// `unmerge` on a layer that is not merged.
    NotMerged,
    /// A scaling that is not a finite number, or a rank of 0.
    InvalidConfig(String),
    /// The device failed.
    Device(String),
}

impl fmt::Display for LoraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoraError::AlreadyMerged => f.write_str("the adapter is merged into the base weight: unmerge it first"),
            LoraError::NotMerged => f.write_str("the adapter is not merged"),
            LoraError::InvalidConfig(s) => write!(f, "invalid LoRA configuration: {s}"),
            LoraError::Device(s) => write!(f, "device: {s}"),
        }
    }
}

impl std::error::Error for LoraError {}

fn dev_err<T: fmt::Display>(e: T) -> LoraError {
    LoraError::Device(e.to_string())
}

/// A linear layer I -> O with a rank-R adapter (module docs).
///
/// Tensor names in the dfdx collection (and so in saved files): `weight`,
/// `bias` (frozen), `lora_a`, `lora_b` (trained), `lora_scale`,
/// `lora_merged` (rank 0), and the perturbation `mgpo_coef`, `mgpo_a`,
/// `mgpo_b`, `mgpo_ma`, `mgpo_mb`, which [`crate::DfdxMgpo`] writes.
#[derive(Debug, Clone)]
pub struct LoraLinear<const I: usize, const O: usize, const R: usize, E: Dtype, D: Storage<E>> {
    /// W0, O x I, frozen (W0 + s B A while merged).
    pub weight: Tensor<Rank2<O, I>, E, D>,
    /// The base bias, frozen.
    pub bias: Tensor<Rank1<O>, E, D>,
    /// A, R x I.
    pub lora_a: Tensor<Rank2<R, I>, E, D>,
    /// B, O x R.
    pub lora_b: Tensor<Rank2<O, R>, E, D>,
    pub(crate) lora_scale: Tensor<Rank0, E, D>,
    pub(crate) lora_merged: Tensor<Rank0, E, D>,
    /// coef of the factored perturbation; 0 when none is applied.
    pub(crate) mgpo_coef: Tensor<Rank0, E, D>,
    /// A_c, the clean A at perturb time.
    pub(crate) mgpo_a: Tensor<Rank2<R, I>, E, D>,
    /// B_c, the clean B at perturb time.
    pub(crate) mgpo_b: Tensor<Rank2<O, R>, E, D>,
    /// coef m_A.
    pub(crate) mgpo_ma: Tensor<Rank2<R, I>, E, D>,
    /// coef m_B.
    pub(crate) mgpo_mb: Tensor<Rank2<O, R>, E, D>,
}

/// Names the optimizer recognises an adapter by (suffixes of full paths).
pub(crate) mod names {
    pub const A: &str = "lora_a";
    pub const B: &str = "lora_b";
    pub const SCALE: &str = "lora_scale";
    pub const MERGED: &str = "lora_merged";
    pub const COEF: &str = "mgpo_coef";
    pub const PA: &str = "mgpo_a";
    pub const PB: &str = "mgpo_b";
    pub const PMA: &str = "mgpo_ma";
    pub const PMB: &str = "mgpo_mb";
}

fn first<E: Dtype, D: Storage<E>>(t: &Tensor<Rank0, E, D>) -> E {
    t.as_vec().first().copied().unwrap_or_default()
}

impl<const I: usize, const O: usize, const R: usize, E, D> LoraLinear<I, O, R, E, D>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    /// A fresh layer: W0 and b as dfdx's `Linear` (U(-1/sqrt(I), 1/sqrt(I))),
    /// A Kaiming-uniform, B zero, scaling from `cfg`.
    pub fn try_new(dev: &D, cfg: LoraConfig) -> Result<Self, LoraError> {
        let mut m = Self::try_build(dev).map_err(dev_err)?;
        m.set_config(cfg)?;
        Ok(m)
    }

    /// Wraps a (pretrained) dfdx `Linear` as the frozen base of a fresh adapter.
    pub fn from_linear(base: Linear<I, O, E, D>, cfg: LoraConfig) -> Result<Self, LoraError> {
        let mut m = Self::try_new(base.weight.device(), cfg)?;
        m.weight = base.weight;
        m.bias = base.bias;
        Ok(m)
    }

    /// Sets s = alpha / R (or alpha / sqrt(R)). Refused while merged, since
    /// the merged weight holds the old s.
    pub fn set_config(&mut self, cfg: LoraConfig) -> Result<(), LoraError> {
        let s = cfg.scale(R);
        if R == 0 || !s.is_finite() {
            return Err(LoraError::InvalidConfig(format!("alpha {} with rank {R} gives scaling {s}", cfg.alpha)));
        }
        if self.is_merged() {
            return Err(LoraError::AlreadyMerged);
        }
        let s = E::from(s).ok_or_else(|| LoraError::InvalidConfig(format!("scaling {s} does not fit the dtype")))?;
        self.lora_scale.copy_from(&[s]);
        Ok(())
    }

    /// The scaling s, as stored (in the layer's dtype).
    pub fn scale(&self) -> f64 {
        first(&self.lora_scale).to_f64().unwrap_or(f64::NAN)
    }

    pub fn is_merged(&self) -> bool {
        first(&self.lora_merged) != E::default()
    }

    /// Whether a factored weight-space perturbation is being added.
    pub fn is_perturbed(&self) -> bool {
        first(&self.mgpo_coef) != E::default()
    }

    /// W0 <- W0 + s B A; the forward then uses the merged weight alone.
    pub fn merge(&mut self) -> Result<(), LoraError> {
        if self.is_merged() {
            return Err(LoraError::AlreadyMerged);
        }
        self.add_delta(E::one())?;
        self.lora_merged.copy_from(&[E::one()]);
        Ok(())
    }

    /// W0 <- W0 - s B A, undoing [`LoraLinear::merge`] (to within rounding).
    pub fn unmerge(&mut self) -> Result<(), LoraError> {
        if !self.is_merged() {
            return Err(LoraError::NotMerged);
        }
        self.add_delta(-E::one())?;
        self.lora_merged.copy_from(&[E::zero()]);
        Ok(())
    }

    /// W0 <- W0 + sign s B A, in place (W0 keeps its id).
    fn add_delta(&mut self, sign: E) -> Result<(), LoraError> {
        let s = first(&self.lora_scale) * sign;
        let ba = self.lora_b.clone().try_matmul(self.lora_a.clone()).map_err(dev_err)?;
        let w = self.weight.clone().try_add(ba.try_mul(s).map_err(dev_err)?).map_err(dev_err)?;
        self.weight.copy_from(&w.as_vec());
        Ok(())
    }
}

fn fan_in_uniform<S: Shape, const FAN_IN: usize, E, D>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    let b = E::one() / E::from(FAN_IN.max(1)).unwrap_or_else(E::one).sqrt();
    t.try_fill_with_distr(Uniform::new(-b, b))
}

fn zero<S: Shape, E: Dtype, D: Device<E>>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err> {
    t.try_fill_with_zeros()
}

fn one<S: Shape, E: Dtype, D: Device<E>>(t: &mut Tensor<S, E, D>) -> Result<(), D::Err> {
    t.try_fill_with_ones()
}

impl<const I: usize, const O: usize, const R: usize, E: Dtype, D: Storage<E>> NonMutableModule for LoraLinear<I, O, R, E, D> {}

impl<const I: usize, const O: usize, const R: usize, E, D> TensorCollection<E, D> for LoraLinear<I, O, R, E, D>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = LoraLinear<I, O, R, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(visitor: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        use names::*;
        visitor.visit_fields(
            (
                (
                    Self::tensor("weight", |s| &s.weight, |s| &mut s.weight, TensorOptions::detached(fan_in_uniform::<_, I, E, D>)),
                    Self::tensor("bias", |s| &s.bias, |s| &mut s.bias, TensorOptions::detached(fan_in_uniform::<_, I, E, D>)),
                    Self::tensor(A, |s| &s.lora_a, |s| &mut s.lora_a, TensorOptions::reset_with(fan_in_uniform::<_, I, E, D>)),
                    Self::tensor(B, |s| &s.lora_b, |s| &mut s.lora_b, TensorOptions::reset_to_zeros()),
                    Self::tensor(SCALE, |s| &s.lora_scale, |s| &mut s.lora_scale, TensorOptions::detached(one)),
                    Self::tensor(MERGED, |s| &s.lora_merged, |s| &mut s.lora_merged, TensorOptions::detached(zero)),
                ),
                (
                    Self::tensor(COEF, |s| &s.mgpo_coef, |s| &mut s.mgpo_coef, TensorOptions::detached(zero)),
                    Self::tensor(PA, |s| &s.mgpo_a, |s| &mut s.mgpo_a, TensorOptions::detached(zero)),
                    Self::tensor(PB, |s| &s.mgpo_b, |s| &mut s.mgpo_b, TensorOptions::detached(zero)),
                    Self::tensor(PMA, |s| &s.mgpo_ma, |s| &mut s.mgpo_ma, TensorOptions::detached(zero)),
                    Self::tensor(PMB, |s| &s.mgpo_mb, |s| &mut s.mgpo_mb, TensorOptions::detached(zero)),
                ),
            ),
            |((weight, bias, lora_a, lora_b, lora_scale, lora_merged), (mgpo_coef, mgpo_a, mgpo_b, mgpo_ma, mgpo_mb))| {
                LoraLinear { weight, bias, lora_a, lora_b, lora_scale, lora_merged, mgpo_coef, mgpo_a, mgpo_b, mgpo_ma, mgpo_mb }
            },
        )
    }
}

/// Batched forward, x of shape (batch, I).
impl<Bt: Dim, const I: usize, const O: usize, const R: usize, E, D, T> Module<Tensor<(Bt, Const<I>), E, D, T>> for LoraLinear<I, O, R, E, D>
where
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
{
    type Output = Tensor<(Bt, Const<O>), E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<(Bt, Const<I>), E, D, T>) -> Result<Self::Output, D::Err> {
        let shape = (x.shape().0, Const::<O>);
        let bias = self.bias.clone().try_broadcast_like(&shape)?;
        // W0 and b are used without a tape: no gradient is recorded for them.
        let (x, tape) = x.split_tape();
        let base = x.clone().put_tape(tape).try_matmul(self.weight.clone().try_permute()?)?;
        if first(&self.lora_merged) != E::default() {
            return base.try_add(bias);
        }
        let (base, tape) = base.split_tape();
        let lora = x
            .clone()
            .put_tape(tape)
            .try_matmul(self.lora_a.retaped::<T>().try_permute()?)?
            .try_matmul(self.lora_b.retaped::<T>().try_permute()?)?
            .try_mul(first(&self.lora_scale))?;
        let (lora, tape) = lora.split_tape();
        let mut out = base.put_tape(tape).try_add(lora)?;
        if first(&self.mgpo_coef) != E::default() {
            // coef m_B (A_c x) + B_c (coef m_A x): the factors are fresh
            // tensors without a tape, so only x receives gradient from it.
            let (o, tape) = out.split_tape();
            let t1 = x
                .clone()
                .put_tape(tape)
                .try_matmul(self.mgpo_a.clone().try_permute()?)?
                .try_matmul(self.mgpo_mb.clone().try_permute()?)?;
            let (t1, tape) = t1.split_tape();
            let t2 = x.put_tape(tape).try_matmul(self.mgpo_ma.clone().try_permute()?)?.try_matmul(self.mgpo_b.clone().try_permute()?)?;
            let (t2, tape) = t2.split_tape();
            out = o.put_tape(tape).try_add(t1)?.try_add(t2)?;
        }
        out.try_add(bias)
    }
}

/// Single-vector forward, x of shape (I,).
impl<const I: usize, const O: usize, const R: usize, E, D, T> Module<Tensor<Rank1<I>, E, D, T>> for LoraLinear<I, O, R, E, D>
where
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
{
    type Output = Tensor<Rank1<O>, E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<Rank1<I>, E, D, T>) -> Result<Self::Output, D::Err> {
        let y = self.try_forward(x.try_reshape_like(&(Const::<1>, Const::<I>))?)?;
        y.try_reshape_like(&(Const::<O>,))
    }
}
