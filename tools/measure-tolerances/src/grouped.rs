//! Parameter groups on top of any backend, for as long as the runner does
//! not apply them itself: each tensor's AdamW scalars are rewritten from
//! the default group's, lr_g = lr lr_scale, decay 1 - lr_g wd_g,
//! step size lr_g / (1 - beta1^t) (the runner hands the tensors to
//! `adamw_many` in layout order). lr is recovered from the default decay,
//! so the configured weight decay must not be 0.
use mgpo_core::{AdamWItem, AdamWStep, AxpyItem, FusedUpdate, HostIo, LowRank, MgpoError, Reduce, Result, Tensors};

#[derive(Clone)]
pub struct Grouped<B> { pub inner: B, pub groups: Vec<(f64, f64)>, pub wd_cfg: f64 }

impl<B: Tensors> Tensors for Grouped<B> {
    type Tensor = B::Tensor;
    fn shape(&self, t: &B::Tensor) -> Vec<usize> { self.inner.shape(t) }
    fn zeros_like(&self, t: &B::Tensor) -> Result<B::Tensor> { self.inner.zeros_like(t) }
}
impl<B: Reduce> Reduce for Grouped<B> {
    fn sum_sq(&self, t: &B::Tensor) -> Result<f64> { self.inner.sum_sq(t) }
    fn all_finite(&self, t: &B::Tensor) -> Result<bool> { self.inner.all_finite(t) }
    fn sum_sq_many(&self, ts: &[&B::Tensor]) -> Result<Vec<f64>> { self.inner.sum_sq_many(ts) }
}
impl<B: FusedUpdate> FusedUpdate for Grouped<B> {
    fn axpy(&self, y: &mut B::Tensor, a: f64, x: &B::Tensor) -> Result<()> { self.inner.axpy(y, a, x) }
    fn axpy_noise(&self, y: &mut B::Tensor, a: f64, s: u64) -> Result<()> { self.inner.axpy_noise(y, a, s) }
    fn axpy_many(&self, items: &mut [AxpyItem<'_, B::Tensor>]) -> Result<()> { self.inner.axpy_many(items) }
    fn adamw(&self, _p: &mut B::Tensor, _g: &B::Tensor, _m: &mut B::Tensor, _v: &mut B::Tensor, _k: &AdamWStep) -> Result<f64> {
        Err(MgpoError::Backend("parameter groups need adamw_many (all tensors in layout order)".into()))
    }
    fn adamw_many(&self, items: &mut [AdamWItem<'_, B::Tensor>]) -> Result<Vec<f64>> {
        if items.len() != self.groups.len() || self.wd_cfg == 0.0 {
            return Err(MgpoError::Backend(format!("{} tensors for {} groups, weight decay {}", items.len(), self.groups.len(), self.wd_cfg)));
        }
        let mut out = Vec::new();
        for (it, &(scale, wd)) in items.iter_mut().zip(&self.groups) {
            let k = it.k;
            let lr = (1.0 - k.decay) / self.wd_cfg;
            let k = AdamWStep { decay: 1.0 - lr * scale * wd, step_size: k.step_size * scale, ..k };
            out.push(self.inner.adamw(it.p, it.g, it.m, it.v, &k)?);
        }
        Ok(out)
    }
}
impl<B: LowRank> LowRank for Grouped<B> {
    fn gram_cols(&self, x: &B::Tensor, y: &B::Tensor) -> Result<Vec<f64>> { self.inner.gram_cols(x, y) }
    fn gram_rows(&self, x: &B::Tensor, y: &B::Tensor) -> Result<Vec<f64>> { self.inner.gram_rows(x, y) }
    fn add_low_rank(&self, w: &mut B::Tensor, c: f64, p: &B::Tensor, q: &B::Tensor, r: &B::Tensor, s: &B::Tensor) -> Result<()> { self.inner.add_low_rank(w, c, p, q, r, s) }
    fn low_rank_norm_sq(&self, p: &B::Tensor, q: &B::Tensor, r: &B::Tensor, s: &B::Tensor) -> Result<f64> { self.inner.low_rank_norm_sq(p, q, r, s) }
}
impl<B: HostIo> HostIo for Grouped<B> {
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<B::Tensor> { self.inner.from_f64(shape, data) }
    fn to_f64(&self, t: &B::Tensor) -> Result<Vec<f64>> { self.inner.to_f64(t) }
    fn f64_exact(&self) -> bool { self.inner.f64_exact() }
}
