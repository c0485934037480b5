//! One optimizer step of a LoRA parameter set on any backend, as a user
//! runs it: `Mgpo::perturb` (MGPO only), then `Mgpo::step` with the
//! gradients. The step is timed whole: the non-finite check and gradient
//! norms, the perturbation, its removal and AdamW.

use mgpo_core::backend::{HostIo, TensorOps};
use mgpo_core::{AdamWConfig, Config, Mgpo};
use serde::{Deserialize, Serialize};

use crate::sizes::LoraShape;

/// What a step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// `Config::adamw`: rho = 0, no `perturb` call; torch.optim.AdamW.
    Adamw,
    /// The paper (`Config::paper_nlu`): ascent on A and B, one global norm.
    MgpoAdapter,
    /// The authors' trainer (`Config::trainer_nlu`) in factored form, as the
    /// candle, tch and dfdx LoRA layers run it: the optimizer takes the
    /// rank-decomposed norms and leaves W0 to the layer's forward pass.
    MgpoWeight,
    /// The authors' trainer with W0 (d x d per adapter) held by the
    /// optimizer and perturbed in place: two rank-r updates of W0 per
    /// `perturb` and per `step`.
    MgpoWeightW0,
}

impl Variant {
    /// Every variant, in table order.
    pub const ALL: [Variant; 4] = [Variant::Adamw, Variant::MgpoAdapter, Variant::MgpoWeight, Variant::MgpoWeightW0];

    /// The name in tables, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Adamw => "adamw",
            Variant::MgpoAdapter => "mgpo-adapter",
            Variant::MgpoWeight => "mgpo-weight",
            Variant::MgpoWeightW0 => "mgpo-weight-w0",
        }
    }

    /// The variant whose [`name`](Variant::name) is `s`; None for any other string.
    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    /// The configuration, lr 1e-4 (any rate costs the same).
    pub fn config(self) -> Config {
        let lr = 1e-4;
        match self {
            Variant::Adamw => Config::adamw(AdamWConfig { lr, ..AdamWConfig::default() }),
            Variant::MgpoAdapter => Config::paper_nlu(lr),
            Variant::MgpoWeight | Variant::MgpoWeightW0 => Config::trainer_nlu(lr),
        }
    }

    /// Whether the optimizer holds W0 and perturbs it in place.
    pub fn with_w0(self) -> bool {
        self == Variant::MgpoWeightW0
    }

    /// The least memory traffic of a step, in bytes per f32 trainable
    /// parameter, for the effective bandwidth:
    ///
    /// - AdamW: read g once for the non-finite check and ||g|| (4), then
    ///   the fused update (read p, g, m, v, write p, m, v: 28);
    /// - adapter space: plus the perturbation p <- p + c m (read p, m,
    ///   write p: 12); its removal is folded into the update;
    /// - weight space (factored): plus the Gram matrices of the direction
    ///   (read m, p: 8) and of the gradient's image (read g, p: 8);
    /// - weight space with W0 in place: plus, per trainable parameter,
    ///   d x d / (2 r d) entries of W0 read and written twice (perturb and
    ///   removal), 16 d / (2 r d) bytes; that term is returned by
    ///   [`Variant::w0_bytes_per_param`].
    pub fn bytes_per_param(self) -> f64 {
        match self {
            Variant::Adamw => 32.0,
            Variant::MgpoAdapter => 44.0,
            Variant::MgpoWeight => 48.0,
            Variant::MgpoWeightW0 => 48.0,
        }
    }

    /// The W0 traffic per trainable parameter of [`Variant::MgpoWeightW0`].
    pub fn w0_bytes_per_param(self, shape: &LoraShape) -> f64 {
        if self.with_w0() {
            let d = shape.dim as f64;
            16.0 * d * d / (2.0 * shape.rank as f64 * d)
        } else {
            0.0
        }
    }
}

/// Uniform values in [-scale, scale) from a fixed LCG (reproducible, no RNG crate).
pub fn filled(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The trainable tensors of a [`LoraShape`], their gradients and W0s.
pub struct LoraTensors<T> {
    /// A and B of every adapter, in order.
    pub params: Vec<T>,
    /// Their gradients, in the same order.
    pub grads: Vec<T>,
    /// One W0 per adapter when built with W0; else empty.
    pub frozen: Vec<T>,
}

impl<T> LoraTensors<T> {
    /// A ~ U(+-1/sqrt d), B ~ U(+-0.01) (non-zero, so the weight-space
    /// direction is), gradients ~ U(+-1e-3), W0 = 0 (d x d) when `with_w0`.
    pub fn new<B: HostIo<Tensor = T>>(be: &B, shape: LoraShape, with_w0: bool) -> Result<Self, String> {
        let (r, d) = (shape.rank, shape.dim);
        let mut params = Vec::with_capacity(shape.tensors());
        let mut grads = Vec::with_capacity(shape.tensors());
        for i in 0..shape.adapters {
            let s = i as u64 * 4;
            params.push(be.from_f64(&[r, d], &filled(r * d, s, 1.0 / (d as f64).sqrt())).map_err(err)?);
            params.push(be.from_f64(&[d, r], &filled(r * d, s + 1, 0.01)).map_err(err)?);
            grads.push(be.from_f64(&[r, d], &filled(r * d, s + 2, 1e-3)).map_err(err)?);
            grads.push(be.from_f64(&[d, r], &filled(r * d, s + 3, 1e-3)).map_err(err)?);
        }
        let mut frozen = Vec::new();
        if with_w0 {
            let zeros = vec![0.0; d * d];
            for _ in 0..shape.adapters {
                frozen.push(be.from_f64(&[d, d], &zeros).map_err(err)?);
            }
        }
        Ok(LoraTensors { params, grads, frozen })
    }
}

/// A LoRA parameter set, its fixed gradients and the optimizer, on backend `B`.
pub struct StepBench<B: TensorOps + HostIo> {
    opt: Mgpo<B>,
    /// The trainable tensors, then the W0s, by name.
    tensors: Vec<(String, B::Tensor)>,
    grads: Vec<(String, B::Tensor)>,
    variant: Variant,
    shape: LoraShape,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl<B: TensorOps + HostIo> StepBench<B> {
    /// Builds the tensors ([`LoraTensors::new`]) and the optimizer and runs
    /// two warm-up steps, so the moments exist and the timed steps perturb.
    pub fn new(be: B, shape: LoraShape, variant: Variant) -> Result<Self, String> {
        let t = LoraTensors::new(&be, shape, variant.with_w0())?;
        let mut b = Self::with_tensors(be, shape, variant, t)?;
        b.step()?;
        b.step()?;
        Ok(b)
    }

    /// The optimizer over tensors built before (no step run yet).
    pub fn with_tensors(be: B, shape: LoraShape, variant: Variant, t: LoraTensors<B::Tensor>) -> Result<Self, String> {
        let layout = shape.layout(variant.with_w0()).map_err(err)?;
        let opt = Mgpo::new(be, variant.config(), layout).map_err(err)?;
        let names: Vec<String> = opt.layout().names().map(str::to_string).collect();
        let grads = names.iter().cloned().zip(t.grads).collect();
        let tensors = names.into_iter().zip(t.params.into_iter().chain(t.frozen)).collect();
        Ok(StepBench { opt, tensors, grads, variant, shape })
    }

    /// One training step's optimizer work (the forward and backward pass
    /// of a real step would sit between `perturb` and `step`).
    pub fn step(&mut self) -> Result<(), String> {
        if self.variant != Variant::Adamw {
            self.opt.perturb(&mut self.tensors).map_err(err)?;
        }
        let rep = self.opt.step(&mut self.tensors, &self.grads).map_err(err)?;
        if rep.skipped {
            return Err(format!("{}: the benchmark step was skipped (non-finite gradient)", self.variant.name()));
        }
        Ok(())
    }

    /// The variant measured.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The parameter set measured.
    pub fn shape(&self) -> LoraShape {
        self.shape
    }

    /// The optimizer, for its state.
    pub fn optimizer(&self) -> &Mgpo<B> {
        &self.opt
    }

    /// Whether the last `perturb` moved anything (false would mean the
    /// benchmark measures no perturbation at all).
    pub fn perturbs(&mut self) -> Result<bool, String> {
        if self.variant == Variant::Adamw {
            return Ok(false);
        }
        self.opt.perturb(&mut self.tensors).map_err(err)?;
        let rep = self.opt.step(&mut self.tensors, &self.grads).map_err(err)?;
        Ok(rep.groups.iter().any(|g| g.perturbation_norm > 0.0))
    }
}

/// Optimizer state held per parameter and per group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StateSize {
    /// Trainable parameters.
    pub params: usize,
    /// Elements of per-tensor state (m and v) per parameter.
    pub elements_per_param: f64,
    /// Bytes of that state per parameter at `elem_bytes` per element.
    pub bytes_per_param: f64,
    /// Groups, each holding g_bar and the coefficient of the perturbation
    /// now applied (a few f64, independent of the parameter count).
    pub groups: usize,
}

impl<B: TensorOps + HostIo> StepBench<B> {
    /// The size of the optimizer state, counted from the state itself.
    pub fn state_size(&self, elem_bytes: usize) -> StateSize {
        let be = self.opt.backend();
        let elems: usize = self
            .opt
            .state()
            .moments
            .iter()
            .map(|mv| be.shape(&mv.m).iter().product::<usize>() + be.shape(&mv.v).iter().product::<usize>())
            .sum();
        let n = self.shape.params();
        StateSize {
            params: n,
            elements_per_param: elems as f64 / n as f64,
            bytes_per_param: (elems * elem_bytes) as f64 / n as f64,
            groups: self.opt.groups().len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgpo_ndarray::NdBackend;

    #[test]
    fn every_variant_steps_and_mgpo_perturbs() {
        let _lock = crate::test_lock();
        let shape = LoraShape { dim: 32, rank: 4, adapters: 3 };
        for v in Variant::ALL {
            let mut b = StepBench::new(NdBackend::<f32>::new(), shape, v).unwrap();
            b.step().unwrap();
            assert_eq!(b.perturbs().unwrap(), v != Variant::Adamw, "{}", v.name());
            let s = b.state_size(4);
            assert_eq!(s.elements_per_param, 2.0);
            assert_eq!(s.bytes_per_param, 8.0);
            assert_eq!(b.optimizer().state().step, if v == Variant::Adamw { 3 } else { 4 });
        }
    }

    #[test]
    fn filled_is_in_range_and_reproducible() {
        let _lock = crate::test_lock();
        let a = filled(1000, 7, 0.5);
        assert!(a.iter().all(|x| x.abs() <= 0.5));
        assert_eq!(a, filled(1000, 7, 0.5));
        assert_ne!(a, filled(1000, 8, 0.5));
        assert!(a.iter().any(|&x| x < -0.4) && a.iter().any(|&x| x > 0.4));
    }
}
