//! [`LoraLinear`]: a dfdx linear layer with a low-rank adapter,
//!
//! ```text
//! y = W0 x + b + s B (A dropout(x))        s = lora_scale(alpha, r, rslora)
//! ```
//!
//! configured by the one [`LoraConfig`] of mgpo-core, with peft's
//! semantics: W0 (O x I) and b are frozen; A (R x I) starts
//! Kaiming-uniform with a = sqrt(5) (U(-1/sqrt(I), 1/sqrt(I))) or, with
//! [`LoraInit::Gaussian`], N(0, 1/R^2); B (O x R) starts at zero, so a
//! fresh adapter leaves the base output unchanged; the base output is not
//! scaled. Dropout (probability `dropout`) applies to the adapter's input
//! in dfdx's training forward (`forward_mut`) only. [`LoraLinear::merge`]
//! folds s B A into W0 and [`LoraLinear::unmerge`] takes it out again.
//!
//! LoRA-MGPO's weight-space perturbation is applied in factored form: while
//! [`crate::MgpoOptimizer`] has the model perturbed, the layer also adds
//!
//! ```text
//! coef (m_B (A_c x) + B_c (m_A x))
//! ```
//!
//! where A_c, B_c are copies of the clean A, B taken at perturb time (tensors
//! of their own, so no gradient of this term reaches A or B) and m_A, m_B
//! are AdamW's first moments. That is exactly (W0 + eps_D) x with
//! eps_D = coef (m_B A + B m_A), without ever writing W0.
//!
//! Every piece of state is a tensor of the dfdx `TensorCollection`, so
//! saving, loading, `to_dtype` and `to_device` keep it: the scaling s, the
//! dropout probability, the merged flag and the perturbation. dfdx's
//! `reset_params` resets the layer as a fresh build would, which sets s back
//! to 1 and the dropout to 0: call [`LoraLinear::set_config`] again after it.

use std::fmt;

use dfdx::nn::modules::Linear;
use dfdx::nn::{BuildModule, Module, ModuleMut, ModuleVisitor, TensorCollection, TensorOptions};
use dfdx::prelude::*;
use mgpo_core::{lora_scale, LoraConfig, LoraInit, MgpoError};
use num_traits::Float;
use rand_distr::uniform::SampleUniform;
use rand_distr::{Distribution, Normal, StandardNormal, Uniform};

/// What a [`LoraLinear`] call can refuse. A refused call changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraError {
    /// `merge` on a merged layer, or a change of configuration while merged.
    AlreadyMerged,
    /// `unmerge` on a layer that is not merged.
    NotMerged,
    /// The configuration's rank is not the layer's R.
    RankMismatch {
        /// `LoraConfig::rank`.
        config: usize,
        /// The layer's const generic R.
        layer: usize,
    },
    /// A configuration field out of range (see `LoraConfig::validate`), or
    /// a scaling that the layer's dtype cannot hold.
    InvalidConfig(MgpoError),
    /// The device failed.
    Device(String),
}

impl fmt::Display for LoraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoraError::AlreadyMerged => f.write_str("the adapter is merged into the base weight: unmerge it first"),
            LoraError::NotMerged => f.write_str("the adapter is not merged"),
            LoraError::RankMismatch { config, layer } => write!(f, "LoraConfig has rank {config}, but the layer's rank R is {layer}"),
            LoraError::InvalidConfig(e) => write!(f, "{e}"),
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
/// `lora_dropout`, `lora_merged` (rank 0), and the perturbation
/// `mgpo_coef`, `mgpo_a`, `mgpo_b`, `mgpo_ma`, `mgpo_mb`, which
/// [`crate::MgpoOptimizer`] writes.
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
    pub(crate) lora_dropout: Tensor<Rank0, E, D>,
    pub(crate) lora_merged: Tensor<Rank0, E, D>,
    /// coef of the factored perturbation; 0 when none is applied.
    pub(crate) mgpo_coef: Tensor<Rank0, E, D>,
    /// A_c, the clean A at perturb time.
    pub(crate) mgpo_a: Tensor<Rank2<R, I>, E, D>,
    /// B_c, the clean B at perturb time.
    pub(crate) mgpo_b: Tensor<Rank2<O, R>, E, D>,
    /// m_A.
    pub(crate) mgpo_ma: Tensor<Rank2<R, I>, E, D>,
    /// m_B.
    pub(crate) mgpo_mb: Tensor<Rank2<O, R>, E, D>,
}

/// Names the optimizer recognises an adapter by (suffixes of full paths).
pub(crate) mod names {
    pub const A: &str = "lora_a";
    pub const B: &str = "lora_b";
    pub const SCALE: &str = "lora_scale";
    pub const MERGED: &str = "lora_merged";
    /// The factored perturbation, in the order of `walk::Role::Factor`.
    pub const FACTORS: [&str; 5] = ["mgpo_coef", "mgpo_a", "mgpo_b", "mgpo_ma", "mgpo_mb"];
}

/// A batch of `batch x F` rows.
type Rows<Bt, const F: usize, E, D, T> = Tensor<(Bt, Const<F>), E, D, T>;

fn first<E: Dtype, D: Storage<E>>(t: &Tensor<Rank0, E, D>) -> E {
    t.as_vec().first().copied().unwrap_or_default()
}

fn bad_value(field: &'static str, value: f64) -> LoraError {
    LoraError::InvalidConfig(MgpoError::InvalidConfig { field, value: value.to_string(), reason: "does not fit the layer's dtype" })
}

impl<const I: usize, const O: usize, const R: usize, E, D> LoraLinear<I, O, R, E, D>
where
    E: Dtype + Float + SampleUniform,
    StandardNormal: Distribution<E>,
    D: Device<E>,
{
    /// A fresh layer: W0 and b as dfdx's `Linear` (U(-1/sqrt(I), 1/sqrt(I))),
    /// A by `cfg.init`, B zero, scaling and dropout from `cfg`, whose rank
    /// must be R.
    pub fn try_new(dev: &D, cfg: LoraConfig) -> Result<Self, LoraError> {
        let mut m = Self::try_build(dev).map_err(dev_err)?;
        m.set_config(cfg)?;
        if cfg.init == LoraInit::Gaussian {
            let normal = Normal::new(E::zero(), E::one() / E::from(R).ok_or_else(|| bad_value("lora.rank", R as f64))?).map_err(dev_err)?;
            m.lora_a.try_fill_with_distr(normal).map_err(dev_err)?;
        }
        Ok(m)
    }

    /// Wraps a (pretrained) dfdx `Linear` as the frozen base of a fresh adapter.
    pub fn from_linear(base: Linear<I, O, E, D>, cfg: LoraConfig) -> Result<Self, LoraError> {
        let mut m = Self::try_new(base.weight.device(), cfg)?;
        m.weight = base.weight;
        m.bias = base.bias;
        Ok(m)
    }

    /// Sets s = `lora_scale(alpha, R, rslora)` and the dropout probability
    /// (`cfg.init` only matters to [`LoraLinear::try_new`]). Refused while
    /// merged, since the merged weight holds the old s.
    pub fn set_config(&mut self, cfg: LoraConfig) -> Result<(), LoraError> {
        cfg.validate().map_err(LoraError::InvalidConfig)?;
        if cfg.rank != R {
            return Err(LoraError::RankMismatch { config: cfg.rank, layer: R });
        }
        if self.is_merged() {
            return Err(LoraError::AlreadyMerged);
        }
        let s = lora_scale(cfg.alpha, R, cfg.rslora);
        let s = E::from(s).filter(|x| x.is_finite()).ok_or_else(|| bad_value("lora.alpha", cfg.alpha))?;
        let p = E::from(cfg.dropout).ok_or_else(|| bad_value("lora.dropout", cfg.dropout))?;
        self.lora_scale.copy_from(&[s]);
        self.lora_dropout.copy_from(&[p]);
        Ok(())
    }

    /// The scaling s, as stored (in the layer's dtype).
    pub fn scale(&self) -> f64 {
        first(&self.lora_scale).to_f64().unwrap_or(f64::NAN)
    }

    /// The dropout probability of the adapter's input in training.
    pub fn dropout(&self) -> f64 {
        first(&self.lora_dropout).to_f64().unwrap_or(f64::NAN)
    }

    /// Whether s B A has been added into the base weight ([`Self::merge`]).
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

impl<const I: usize, const O: usize, const R: usize, E, D> TensorCollection<E, D> for LoraLinear<I, O, R, E, D>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = LoraLinear<I, O, R, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(visitor: &mut V) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        use names::*;
        let [coef, pa, pb, pma, pmb] = FACTORS;
        visitor.visit_fields(
            (
                (
                    Self::tensor("weight", |s| &s.weight, |s| &mut s.weight, TensorOptions::detached(fan_in_uniform::<_, I, E, D>)),
                    Self::tensor("bias", |s| &s.bias, |s| &mut s.bias, TensorOptions::detached(fan_in_uniform::<_, I, E, D>)),
                    Self::tensor(A, |s| &s.lora_a, |s| &mut s.lora_a, TensorOptions::reset_with(fan_in_uniform::<_, I, E, D>)),
                    Self::tensor(B, |s| &s.lora_b, |s| &mut s.lora_b, TensorOptions::reset_to_zeros()),
                ),
                (
                    Self::tensor(SCALE, |s| &s.lora_scale, |s| &mut s.lora_scale, TensorOptions::detached(one)),
                    Self::tensor("lora_dropout", |s| &s.lora_dropout, |s| &mut s.lora_dropout, TensorOptions::detached(zero)),
                    Self::tensor(MERGED, |s| &s.lora_merged, |s| &mut s.lora_merged, TensorOptions::detached(zero)),
                ),
                (
                    Self::tensor(coef, |s| &s.mgpo_coef, |s| &mut s.mgpo_coef, TensorOptions::detached(zero)),
                    Self::tensor(pa, |s| &s.mgpo_a, |s| &mut s.mgpo_a, TensorOptions::detached(zero)),
                    Self::tensor(pb, |s| &s.mgpo_b, |s| &mut s.mgpo_b, TensorOptions::detached(zero)),
                    Self::tensor(pma, |s| &s.mgpo_ma, |s| &mut s.mgpo_ma, TensorOptions::detached(zero)),
                    Self::tensor(pmb, |s| &s.mgpo_mb, |s| &mut s.mgpo_mb, TensorOptions::detached(zero)),
                ),
            ),
            |((weight, bias, lora_a, lora_b), (lora_scale, lora_dropout, lora_merged), (mgpo_coef, mgpo_a, mgpo_b, mgpo_ma, mgpo_mb))| LoraLinear {
                weight,
                bias,
                lora_a,
                lora_b,
                lora_scale,
                lora_dropout,
                lora_merged,
                mgpo_coef,
                mgpo_a,
                mgpo_b,
                mgpo_ma,
                mgpo_mb,
            },
        )
    }
}

impl<const I: usize, const O: usize, const R: usize, E: Dtype, D: Device<E>> LoraLinear<I, O, R, E, D> {
    /// The batched forward, x of shape (batch, I); `train` applies the dropout.
    fn forward_batch<Bt: Dim, T>(&self, x: Rows<Bt, I, E, D, T>, train: bool) -> Result<Rows<Bt, O, E, D, T>, D::Err>
    where
        T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
    {
        let shape = (x.shape().0, Const::<O>);
        let bias = self.bias.clone().try_broadcast_like(&shape)?;
        // W0 and b are used without a tape: no gradient is recorded for them.
        let (x, tape) = x.split_tape();
        let base = x.clone().put_tape(tape).try_matmul(self.weight.clone().try_permute()?)?;
        if first(&self.lora_merged) != E::default() {
            return base.try_add(bias);
        }
        let (base, tape) = base.split_tape();
        let mut input = x.clone().put_tape(tape);
        let p = first(&self.lora_dropout).to_f64().unwrap_or(0.0);
        if train && p > 0.0 {
            input = input.try_dropout(p)?;
        }
        let lora = input
            .try_matmul(self.lora_a.retaped::<T>().try_permute()?)?
            .try_matmul(self.lora_b.retaped::<T>().try_permute()?)?
            .try_mul(first(&self.lora_scale))?;
        let (lora, tape) = lora.split_tape();
        let mut out = base.put_tape(tape).try_add(lora)?;
        let coef = first(&self.mgpo_coef);
        if coef != E::default() {
            // coef (m_B (A_c x) + B_c (m_A x)): the factors carry no tape,
            // so only x receives gradient from this term.
            let (o, tape) = out.split_tape();
            let t1 = x.clone().put_tape(tape).try_matmul(self.mgpo_a.clone().try_permute()?)?.try_matmul(self.mgpo_mb.clone().try_permute()?)?;
            let (t1, tape) = t1.split_tape();
            let t2 = x.put_tape(tape).try_matmul(self.mgpo_ma.clone().try_permute()?)?.try_matmul(self.mgpo_b.clone().try_permute()?)?;
            let (eps, tape) = t2.try_add(t1)?.try_mul(coef)?.split_tape();
            out = o.put_tape(tape).try_add(eps)?;
        }
        out.try_add(bias)
    }

    /// The single-vector forward, x of shape (I,).
    fn forward_one<T>(&self, x: Tensor<Rank1<I>, E, D, T>, train: bool) -> Result<Tensor<Rank1<O>, E, D, T>, D::Err>
    where
        T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
    {
        let y = self.forward_batch(x.try_reshape_like(&(Const::<1>, Const::<I>))?, train)?;
        y.try_reshape_like(&(Const::<O>,))
    }
}

/// Inference forward (no dropout), x of shape (batch, I).
impl<Bt: Dim, const I: usize, const O: usize, const R: usize, E: Dtype, D: Device<E>, T> Module<Rows<Bt, I, E, D, T>> for LoraLinear<I, O, R, E, D>
where
    T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
{
    type Output = Rows<Bt, O, E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Rows<Bt, I, E, D, T>) -> Result<Self::Output, D::Err> {
        self.forward_batch(x, false)
    }
}

/// Training forward (with the adapter's dropout), x of shape (batch, I).
impl<Bt: Dim, const I: usize, const O: usize, const R: usize, E: Dtype, D: Device<E>, T> ModuleMut<Rows<Bt, I, E, D, T>> for LoraLinear<I, O, R, E, D>
where
    T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
{
    type Output = Rows<Bt, O, E, D, T>;
    type Error = D::Err;

    fn try_forward_mut(&mut self, x: Rows<Bt, I, E, D, T>) -> Result<Self::Output, D::Err> {
        self.forward_batch(x, true)
    }
}

/// Inference forward (no dropout), x of shape (I,).
impl<const I: usize, const O: usize, const R: usize, E: Dtype, D: Device<E>, T> Module<Tensor<Rank1<I>, E, D, T>> for LoraLinear<I, O, R, E, D>
where
    T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
{
    type Output = Tensor<Rank1<O>, E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<Rank1<I>, E, D, T>) -> Result<Self::Output, D::Err> {
        self.forward_one(x, false)
    }
}

/// Training forward (with the adapter's dropout), x of shape (I,).
impl<const I: usize, const O: usize, const R: usize, E: Dtype, D: Device<E>, T> ModuleMut<Tensor<Rank1<I>, E, D, T>> for LoraLinear<I, O, R, E, D>
where
    T: Tape<E, D> + Merge<NoneTape> + Merge<T>,
{
    type Output = Tensor<Rank1<O>, E, D, T>;
    type Error = D::Err;

    fn try_forward_mut(&mut self, x: Tensor<Rank1<I>, E, D, T>) -> Result<Self::Output, D::Err> {
        self.forward_one(x, true)
    }
}
