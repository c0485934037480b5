//! [`TchBackend`]: the `mgpo_core` capabilities for `tch::Tensor` (f32 and
//! f64, on any device libtorch runs on).
//!
//! Every update writes the caller's storage in place (`addcmul_`, `lerp_`,
//! `mul_`, `addmm_`, ...) under `no_grad`, so variables of a `VarStore`
//! stay the leaves of the autograd graph and nothing is recorded. Scalars
//! travel as kernel arguments or as 0-dim tensors created on the tensor's
//! own device, so a step never copies a tensor between host and device; the
//! only host reads are the one f64 scalar of each reduction (and the r x r
//! Gram matrices, which the trait returns to the host by contract).
//!
//! libtorch has a fused multi-tensor AdamW (`_fused_adamw_`), but tch does
//! not bind it and it could not run this optimizer's step anyway: it takes
//! the step count t instead of the precomputed bias corrections, divides
//! the gradients by an AMP scale, and has no place for the perturbation
//! removal p <- p - unperturb m. The step is therefore a chain of in-place
//! kernels in the order of [`mgpo_core::backend::adamw_element`].

use mgpo_core::backend::{noise, AdamWStep, FusedUpdate, HostIo, LowRank, Reduce, Tensors};
use mgpo_core::{MgpoError, Result, Shares};
use tch::{Device, Kind, TchError, Tensor};

/// The tch backend: tensors of `kind` (f32 or f64) on `device`. The kind
/// and device are those of the tensors [`HostIo`] and `zeros_like` create;
/// the updates accept any f32 or f64 tensors as long as the tensors of one
/// call share their kind and device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TchBackend {
    device: Device,
    kind: Kind,
}

impl TchBackend {
    /// A backend for `kind` (`Kind::Float` or `Kind::Double`) on `device`.
    pub fn new(device: Device, kind: Kind) -> Result<Self> {
        check_kind(kind)?;
        Ok(TchBackend { device, kind })
    }

    /// f32 on the CPU.
    pub fn cpu_f32() -> Self {
        TchBackend { device: Device::Cpu, kind: Kind::Float }
    }

    /// f64 on the CPU.
    pub fn cpu_f64() -> Self {
        TchBackend { device: Device::Cpu, kind: Kind::Double }
    }

    /// Where new tensors are created.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The element type of new tensors.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

/// Converts a libtorch error into the optimizer's.
pub(crate) fn err(e: TchError) -> MgpoError {
    MgpoError::Backend(e.to_string())
}

fn check_kind(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::Double => Ok(()),
        k => Err(MgpoError::Backend(format!("only f32 and f64 tensors are supported, got {k:?}"))),
    }
}

fn dims(t: &Tensor) -> Vec<usize> {
    t.size().into_iter().map(|d| d as usize).collect()
}

/// All of `ts` defined, f32 or f64, of `first`'s kind and device, and (when
/// `same_shape`) of its shape. libtorch would otherwise broadcast or promote
/// silently.
fn check_alike(what: &str, first: &Tensor, rest: &[&Tensor], same_shape: bool) -> Result<()> {
    let bad = |detail: String| Err(MgpoError::Backend(format!("{what}: {detail}")));
    for t in std::iter::once(first).chain(rest.iter().copied()) {
        if !t.defined() {
            return bad("undefined tensor".into());
        }
    }
    let kind = first.f_kind().map_err(err)?;
    check_kind(kind)?;
    let (dev, shape) = (first.device(), first.size());
    for t in rest {
        let k = t.f_kind().map_err(err)?;
        if k != kind || t.device() != dev {
            return bad(format!("{k:?} on {:?} mixed with {kind:?} on {dev:?}", t.device()));
        }
        if same_shape && t.size() != shape {
            return bad(format!("shapes differ: {:?} vs {:?}", shape, t.size()));
        }
    }
    Ok(())
}

/// The result of an in-place op (an alias of its target, dropped).
fn inplace(r: std::result::Result<Tensor, TchError>) -> Result<()> {
    r.map(drop).map_err(err)
}

/// A 0-dim tensor holding `v`, of `like`'s kind and on its device (a fill
/// kernel there, not a host-to-device copy).
fn scalar(like: &Tensor, v: f64) -> Result<Tensor> {
    Tensor::f_scalar_tensor(v, (like.kind(), like.device())).map_err(err)
}

/// sum_i t_i^2 with t cast to f64 on its device first; one scalar read.
fn sum_sq_f64(t: &Tensor) -> Result<f64> {
    let x = t.f_to_kind(Kind::Double).map_err(err)?.f_reshape([-1]).map_err(err)?;
    x.f_dot(&x).map_err(err)?.f_double_value(&[]).map_err(err)
}

fn matrix(t: &Tensor, what: &str) -> Result<(i64, i64)> {
    match t.size()[..] {
        [r, c] => Ok((r, c)),
        ref s => Err(MgpoError::Backend(format!("{what} must be a matrix, got shape {s:?}"))),
    }
}

/// An r x r f64 matrix from the device, row-major.
fn host_square(t: Tensor) -> Result<Vec<f64>> {
    let t = t.f_to_device(Device::Cpu).map_err(err)?.f_reshape([-1]).map_err(err)?;
    Vec::<f64>::try_from(&t).map_err(err)
}

impl Tensors for TchBackend {
    type Tensor = Tensor;

    fn shape(&self, t: &Tensor) -> Vec<usize> {
        if t.defined() {
            dims(t)
        } else {
            Vec::new()
        }
    }

    /// Zeros of `t`'s shape, kind and device, outside the autograd graph.
    fn zeros_like(&self, t: &Tensor) -> Result<Tensor> {
        check_alike("zeros_like", t, &[], false)?;
        let _g = tch::no_grad_guard();
        t.f_zeros_like().map_err(err)
    }
}

impl Reduce for TchBackend {
    fn sum_sq(&self, t: &Tensor) -> Result<f64> {
        check_alike("sum_sq", t, &[], false)?;
        let _g = tch::no_grad_guard();
        sum_sq_f64(t)
    }

    fn all_finite(&self, t: &Tensor) -> Result<bool> {
        check_alike("all_finite", t, &[], false)?;
        let _g = tch::no_grad_guard();
        let all = t.f_isfinite().map_err(err)?.f_all().map_err(err)?;
        Ok(all.f_int64_value(&[]).map_err(err)? != 0)
    }
}

impl FusedUpdate for TchBackend {
    fn axpy_noise(&self, y: &mut Tensor, alpha: f64, seed: u64) -> Result<()> {
        noise::axpy_noise_via_host(self, y, alpha, seed)
    }

    /// y <- y + alpha x: one `addcmul_` with alpha as a 0-dim tensor.
    fn axpy(&self, y: &mut Tensor, alpha: f64, x: &Tensor) -> Result<()> {
        check_alike("axpy", y, &[x], true)?;
        let _g = tch::no_grad_guard();
        let a = scalar(y, alpha)?;
        inplace(y.f_addcmul_(x, &a))?;
        Ok(())
    }

    /// The kernels, in [`mgpo_core::backend::adamw_element`]'s order (g' = s g):
    ///
    /// ```text
    /// p <- p + (-unperturb) m              addcmul_   (m = m_{t-1}; skipped when 0)
    /// p <- p * (1 - lr wd)                 mul_       (skipped when 1)
    /// m <- m + (1 - beta1) (g' - m)        lerp_      (torch's AdamW)
    /// v <- beta2 v + g' ((1 - beta2) g')   mul_, addcmul_
    /// d <- sqrt(v) / sqrt(1 - beta2^t) + eps_adam
    /// p <- p + (-step_size) (m / d)        div, addcmul_
    /// ```
    ///
    /// with two temporaries of p's size (g' when s != 1, and one buffer
    /// reused for (1 - beta2) g', then d, then m / d). Returns sum m^2 in f64.
    fn adamw(&self, p: &mut Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, k: &AdamWStep) -> Result<f64> {
        check_alike("adamw", p, &[g, m, v], true)?;
        let _guard = tch::no_grad_guard();
        if k.unperturb != 0.0 {
            inplace(p.f_addcmul_(m, &scalar(p, -k.unperturb)?))?;
        }
        if k.decay != 1.0 {
            inplace(p.f_mul_scalar_(k.decay))?;
        }
        let scaled;
        let g = if k.grad_scale != 1.0 {
            scaled = g.f_mul_scalar(k.grad_scale).map_err(err)?;
            &scaled
        } else {
            g
        };
        inplace(m.f_lerp_(g, 1.0 - k.beta1))?;
        let mut buf = g.f_mul_scalar(1.0 - k.beta2).map_err(err)?;
        inplace(v.f_mul_scalar_(k.beta2))?;
        inplace(v.f_addcmul_(g, &buf))?;
        inplace(v.f_sqrt_out(&buf))?;
        inplace(buf.f_div_scalar_(k.bias2_sqrt))?;
        inplace(buf.f_add_scalar_(k.eps))?;
        inplace(m.f_div_out(&buf, &buf))?;
        inplace(p.f_addcmul_(&buf, &scalar(p, -k.step_size)?))?;
        sum_sq_f64(m)
    }
}

impl LowRank for TchBackend {
    fn gram_cols(&self, x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
        check_alike("gram_cols", x, &[y], true)?;
        matrix(x, "gram_cols X")?;
        let _g = tch::no_grad_guard();
        let (x, y) = (x.f_to_kind(Kind::Double).map_err(err)?, y.f_to_kind(Kind::Double).map_err(err)?);
        host_square(x.f_tr().map_err(err)?.f_mm(&y).map_err(err)?)
    }

    fn gram_rows(&self, x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
        check_alike("gram_rows", x, &[y], true)?;
        matrix(x, "gram_rows X")?;
        let _g = tch::no_grad_guard();
        let (x, y) = (x.f_to_kind(Kind::Double).map_err(err)?, y.f_to_kind(Kind::Double).map_err(err)?);
        host_square(x.f_mm(&y.f_tr().map_err(err)?).map_err(err)?)
    }

    /// Two `addmm_` into W (GEMM accumulating in place); the only
    /// temporaries are c P and c R, out x r each.
    fn add_low_rank(&self, w: &mut Tensor, c: f64, p: &Tensor, q: &Tensor, r: &Tensor, s: &Tensor) -> Result<()> {
        check_alike("add_low_rank", w, &[p, q, r, s], false)?;
        let (out, inp) = matrix(w, "W")?;
        for (x, y) in [(p, q), (r, s)] {
            let ((xr, xc), (yr, yc)) = (matrix(x, "P, R")?, matrix(y, "Q, S")?);
            if xr != out || yc != inp || xc != yr {
                return Err(MgpoError::Backend(format!(
                    "add_low_rank: W {:?} += {:?} x {:?} does not fit",
                    (out, inp),
                    (xr, xc),
                    (yr, yc)
                )));
            }
        }
        let _g = tch::no_grad_guard();
        for (x, y) in [(p, q), (r, s)] {
            inplace(w.f_addmm_(&x.f_mul_scalar(c).map_err(err)?, y))?;
        }
        Ok(())
    }
}

impl HostIo for TchBackend {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<Tensor> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            return Err(MgpoError::Backend(format!("shape {shape:?} does not hold {} values", data.len())));
        }
        let dims = shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| MgpoError::Backend(format!("shape {shape:?} too large")))?;
        let t = Tensor::f_from_slice(data).map_err(err)?;
        t.f_reshape(dims.as_slice())
            .and_then(|t| t.f_to_kind(self.kind))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(err)
    }

    fn to_f64(&self, t: &Tensor) -> Result<Vec<f64>> {
        check_alike("to_f64", t, &[], false)?;
        let _g = tch::no_grad_guard();
        host_square(t.f_to_kind(Kind::Double).map_err(err)?)
    }
}

/// A `tch::Tensor` is a handle: `shallow_clone` shares the storage, so the
/// optimizer updates a `VarStore`'s variables through its own handles.
impl Shares for TchBackend {
    fn share(&self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }
}
