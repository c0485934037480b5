//! Which tensors the optimizer owns and how they form adapters.
//!
//! Trainable tensors (every A, B and plain tensor) are numbered in the order
//! they are registered: that is the order of the parameter and gradient
//! slices given to [`crate::Mgpo::perturb`] and [`crate::Mgpo::step`]. Frozen
//! base weights W0 are numbered separately, in the order of the adapters
//! that have one.

use crate::error::{MgpoError, Result};

/// One trainable tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

/// One LoRA adapter: y = W0 x + scale * B (A x).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    /// Index of A (r x in) among the trainable tensors.
    pub a: usize,
    /// Index of B (out x r) among the trainable tensors.
    pub b: usize,
    /// Index of W0 (out x in) among the frozen tensors. In `weight` space an
    /// adapter without W0 is perturbed in factored form: the caller's layer
    /// adds the perturbation from [`crate::Mgpo::weight_perturbation`].
    pub w0: Option<usize>,
    pub rank: usize,
    /// s = alpha / r (or alpha / sqrt(r) for rsLoRA).
    pub scale: f64,
}

/// The tensors the optimizer owns. Built with [`Layout::builder`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) frozen: Vec<TensorInfo>,
    pub(crate) adapters: Vec<AdapterInfo>,
    /// Trainable tensors that belong to no adapter (a classifier head, say).
    pub(crate) plain: Vec<usize>,
}

impl Layout {
    pub fn builder() -> LayoutBuilder {
        LayoutBuilder::default()
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn frozen(&self) -> &[TensorInfo] {
        &self.frozen
    }
    pub fn adapters(&self) -> &[AdapterInfo] {
        &self.adapters
    }
    pub fn plain(&self) -> &[usize] {
        &self.plain
    }
    /// Index of the trainable tensor called `name`.
    pub fn tensor_index(&self, name: &str) -> Result<usize> {
        self.tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| MgpoError::UnknownName(name.to_string()))
    }
    /// Index of the adapter called `name`.
    pub fn adapter_index(&self, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| MgpoError::UnknownName(name.to_string()))
    }
    /// Total number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }
}

/// Registers adapters and plain tensors; checks names and shapes.
#[derive(Debug, Default)]
pub struct LayoutBuilder {
    layout: Layout,
    error: Option<MgpoError>,
}

impl LayoutBuilder {
    /// An adapter with A of shape r x in, B of shape out x r and scaling
    /// alpha / r, with W0 (out x in) when `with_w0` (needed to perturb it in
    /// place in `weight` space). A and B are named `{name}.a`, `{name}.b`.
    pub fn adapter(self, name: &str, alpha: f64, a_shape: &[usize], b_shape: &[usize], with_w0: bool) -> Self {
        let rank = a_shape.first().copied().unwrap_or(0).max(1);
        self.adapter_scaled(name, alpha / rank as f64, a_shape, b_shape, with_w0)
    }

    /// As [`LayoutBuilder::adapter`] with an explicit scaling s (rsLoRA: alpha / sqrt(r)).
    pub fn adapter_scaled(mut self, name: &str, scale: f64, a_shape: &[usize], b_shape: &[usize], with_w0: bool) -> Self {
        if self.error.is_some() {
            return self;
        }
        if let Err(e) = self.try_adapter(name, scale, a_shape, b_shape, with_w0) {
            self.error = Some(e);
        }
        self
    }

    /// A trainable tensor outside any adapter: it gets AdamW and clipping;
    /// in `adapter` space it is perturbed too.
    pub fn plain(mut self, name: &str, shape: &[usize]) -> Self {
        if self.error.is_some() {
            return self;
        }
        match self.push_tensor(name, shape) {
            Ok(i) => self.layout.plain.push(i),
            Err(e) => self.error = Some(e),
        }
        self
    }

    pub fn build(self) -> Result<Layout> {
        match self.error {
            Some(e) => Err(e),
            None if self.layout.tensors.is_empty() => Err(MgpoError::Empty),
            None => Ok(self.layout),
        }
    }

    fn try_adapter(&mut self, name: &str, scale: f64, a: &[usize], b: &[usize], with_w0: bool) -> Result<()> {
        let bad = |detail: String| MgpoError::AdapterShape { name: name.to_string(), detail };
        if a.len() != 2 || b.len() != 2 {
            return Err(bad(format!("A and B must be matrices, got A {a:?} and B {b:?}")));
        }
        let (r, fan_in, fan_out) = (a[0], a[1], b[0]);
        if b[1] != r {
            return Err(bad(format!("A is {a:?} (r x in) so B must be out x {r}, got {b:?}")));
        }
        if r == 0 {
            return Err(bad("rank must be at least 1".into()));
        }
        if !scale.is_finite() {
            return Err(bad(format!("scaling must be finite, got {scale}")));
        }
        if self.layout.adapters.iter().any(|x| x.name == name) {
            return Err(MgpoError::DuplicateName(name.to_string()));
        }
        let ai = self.push_tensor(&format!("{name}.a"), a)?;
        let bi = self.push_tensor(&format!("{name}.b"), b)?;
        let w0 = with_w0.then(|| {
            self.layout.frozen.push(TensorInfo { name: format!("{name}.w0"), shape: vec![fan_out, fan_in] });
            self.layout.frozen.len() - 1
        });
        self.layout.adapters.push(AdapterInfo { name: name.to_string(), a: ai, b: bi, w0, rank: r, scale });
        Ok(())
    }

    fn push_tensor(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        if self.layout.tensors.iter().any(|t| t.name == name) {
            return Err(MgpoError::DuplicateName(name.to_string()));
        }
        self.layout.tensors.push(TensorInfo { name: name.to_string(), shape: shape.to_vec() });
        Ok(self.layout.tensors.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_tensors_in_registration_order() {
        let l = Layout::builder()
            .adapter("q", 8.0, &[4, 6], &[5, 4], true)
            .plain("head", &[3, 5])
            .adapter("v", 4.0, &[2, 3], &[4, 2], false)
            .build()
            .unwrap();
        let names: Vec<_> = l.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["q.a", "q.b", "head", "v.a", "v.b"]);
        assert_eq!(l.frozen()[0].shape, vec![5, 6]);
        assert_eq!(l.adapters()[0].scale, 2.0);
        assert_eq!(l.adapters()[1].w0, None);
        assert_eq!(l.num_params(), 24 + 20 + 15 + 6 + 8);
    }

    #[test]
    fn rejects_bad_adapters() {
        let e = Layout::builder().adapter("q", 8.0, &[4, 6], &[5, 3], false).build().unwrap_err();
        assert!(matches!(e, MgpoError::AdapterShape { .. }), "{e}");
        let e = Layout::builder()
            .adapter("q", 8.0, &[4, 6], &[5, 4], false)
            .adapter("q", 8.0, &[4, 6], &[5, 4], false)
            .build()
            .unwrap_err();
        assert_eq!(e, MgpoError::DuplicateName("q".into()));
        assert_eq!(Layout::builder().build().unwrap_err(), MgpoError::Empty);
        let e = Layout::builder().adapter("q", 8.0, &[0, 6], &[5, 0], false).build().unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
    }
}
