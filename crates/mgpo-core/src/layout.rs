//! Which tensors the optimizer owns, by name, how they form adapters, and
//! which parameter group each belongs to.
//!
//! Trainable tensors (every A, B and plain tensor) are numbered in the order
//! they are registered; the frozen base weights W0 that the optimizer
//! perturbs in place follow, in the order of their adapters. That order,
//! [`Layout::names`], is the order of the named tensors given to
//! [`crate::Mgpo::perturb`] and [`crate::Mgpo::step`], which check every name.

use std::fmt;

use crate::error::{check, MgpoError, Result};

/// One trainable (or frozen) tensor.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TensorInfo {
    /// `{adapter}.a`, `{adapter}.b`, `{adapter}.w0`, or a plain tensor's own name.
    pub name: String,
    /// Outermost dimension first.
    pub shape: Vec<usize>,
    /// Index of its parameter group in [`Layout::param_groups`] (0: the default group).
    pub param_group: usize,
}

/// A parameter group, as in PyTorch optimizers and the Hugging Face Trainer:
/// its tensors step with learning rate `lr_scale * lr_t` and weight decay
/// `weight_decay` (the configuration's when `None`):
///
/// ```text
/// lr_g = lr_t * lr_scale,   p <- p (1 - lr_g wd_g),   step size lr_g / (1 - beta1^t)
/// ```
///
/// Parameter groups change only AdamW's hyper-parameters; MGPO's
/// perturbation groups (one global norm, or one per adapter) are unrelated.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// Its name, unique among the layout's groups.
    pub name: String,
    /// Multiplies the step's learning rate (a schedule scales every group alike).
    pub lr_scale: f64,
    /// Overrides `config.adamw.weight_decay` for the group's tensors.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group with the configuration's learning rate and weight decay.
    pub fn new(name: &str) -> Self {
        ParamGroup { name: name.to_string(), lr_scale: 1.0, weight_decay: None }
    }

    /// The Trainer's `no_decay` group: weight decay 0.
    pub fn no_decay() -> Self {
        ParamGroup::new("no_decay").weight_decay(0.0)
    }

    /// Sets the learning-rate multiplier.
    pub fn lr_scale(self, lr_scale: f64) -> Self {
        ParamGroup { lr_scale, ..self }
    }

    /// Sets the group's weight decay.
    pub fn weight_decay(self, weight_decay: f64) -> Self {
        ParamGroup { weight_decay: Some(weight_decay), ..self }
    }

    fn validate(&self) -> Result<()> {
        check(self.lr_scale.is_finite() && self.lr_scale >= 0.0, "param_group.lr_scale", self.lr_scale, "must be finite and >= 0")?;
        if let Some(wd) = self.weight_decay {
            check(wd.is_finite() && wd >= 0.0, "param_group.weight_decay", wd, "must be finite and >= 0")?;
        }
        Ok(())
    }
}

/// Whether the Hugging Face Trainer would exempt `name` from weight decay:
/// a bias, or a parameter of a normalisation layer (`norm` in a module name,
/// any case, as `LayerNorm`, `layer_norm`, `RMSNorm`; or `ln`, `ln_*`).
pub fn is_bias_or_norm(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.rsplit('.').next() == Some("bias") || lower.split('.').any(|part| part.contains("norm") || part == "ln" || part.starts_with("ln_"))
}

/// One LoRA adapter: y = W0 x + scale * B (A x).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AdapterInfo {
    /// Its name; A and B are `{name}.a`, `{name}.b`, W0 `{name}.w0`.
    pub name: String,
    /// Index of A (r x in) among the trainable tensors.
    pub a: usize,
    /// Index of B (out x r) among the trainable tensors.
    pub b: usize,
    /// Index of W0 (out x in) among the frozen tensors. In `weight` space an
    /// adapter without W0 is perturbed in factored form: the caller's layer
    /// adds the perturbation from [`crate::Mgpo::weight_perturbation`].
    pub w0: Option<usize>,
    /// r.
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
    /// Index 0 is the default group.
    pub(crate) param_groups: Vec<ParamGroup>,
}

impl Layout {
    /// Starts a layout.
    pub fn builder() -> LayoutBuilder {
        LayoutBuilder::default()
    }
    /// The trainable tensors, in registration order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// The W0s the optimizer perturbs in place, in their adapters' order.
    pub fn frozen(&self) -> &[TensorInfo] {
        &self.frozen
    }
    /// The adapters, in registration order.
    pub fn adapters(&self) -> &[AdapterInfo] {
        &self.adapters
    }
    /// The indices of the trainable tensors outside any adapter.
    pub fn plain(&self) -> &[usize] {
        &self.plain
    }
    /// The parameter groups; index 0 is the default group (`default`,
    /// lr_scale 1, the configuration's weight decay).
    pub fn param_groups(&self) -> &[ParamGroup] {
        &self.param_groups
    }
    /// The names the optimizer's calls expect, in order: every trainable
    /// tensor, then every W0 registered for in-place perturbation.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().chain(&self.frozen).map(|t| t.name.as_str())
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

/// Which tensors a parameter group takes.
enum Members {
    Names(Vec<String>),
    Matching(Box<dyn Fn(&str) -> bool + Send + Sync>),
}

/// Registers adapters, plain tensors and parameter groups; checks names and shapes.
#[derive(Default)]
pub struct LayoutBuilder {
    layout: Layout,
    groups: Vec<(ParamGroup, Members)>,
    error: Option<MgpoError>,
}

impl fmt::Debug for LayoutBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<&ParamGroup> = self.groups.iter().map(|g| &g.0).collect();
        f.debug_struct("LayoutBuilder").field("layout", &self.layout).field("param_groups", &groups).field("error", &self.error).finish()
    }
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

    /// A parameter group of the tensors named in `tensors` (trainable
    /// tensor names, e.g. `head.bias` or `q_proj.b`). A name that is not
    /// registered by [`LayoutBuilder::build`], or that an earlier group
    /// already took, is an error.
    pub fn param_group(mut self, group: ParamGroup, tensors: &[&str]) -> Self {
        self.groups.push((group, Members::Names(tensors.iter().map(|s| s.to_string()).collect())));
        self
    }

    /// A parameter group of every trainable tensor whose name satisfies
    /// `pred` and that no earlier group took, e.g.
    /// `param_group_where(ParamGroup::no_decay(), is_bias_or_norm)`.
    pub fn param_group_where(mut self, group: ParamGroup, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.groups.push((group, Members::Matching(Box::new(pred))));
        self
    }

    /// The layout, or the first error of any call.
    pub fn build(self) -> Result<Layout> {
        let LayoutBuilder { mut layout, groups, error } = self;
        if let Some(e) = error {
            return Err(e);
        }
        if layout.tensors.is_empty() {
            return Err(MgpoError::Empty);
        }
        layout.param_groups = vec![ParamGroup::new("default")];
        for (group, members) in groups {
            group.validate()?;
            if layout.param_groups.iter().any(|g| g.name == group.name) {
                return Err(MgpoError::DuplicateName(group.name));
            }
            let gi = layout.param_groups.len();
            match members {
                Members::Names(names) => {
                    for n in names {
                        let t = layout.tensors.iter_mut().find(|t| t.name == n).ok_or_else(|| MgpoError::UnknownName(n.clone()))?;
                        if t.param_group != 0 {
                            return Err(MgpoError::InvalidConfig { field: "param_group", value: n, reason: "the tensor is already in another parameter group" });
                        }
                        t.param_group = gi;
                    }
                }
                Members::Matching(pred) => {
                    for t in layout.tensors.iter_mut().filter(|t| t.param_group == 0 && pred(&t.name)) {
                        t.param_group = gi;
                    }
                }
            }
            layout.param_groups.push(group);
        }
        Ok(layout)
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
            self.layout.frozen.push(TensorInfo { name: format!("{name}.w0"), shape: vec![fan_out, fan_in], param_group: 0 });
            self.layout.frozen.len() - 1
        });
        self.layout.adapters.push(AdapterInfo { name: name.to_string(), a: ai, b: bi, w0, rank: r, scale });
        Ok(())
    }

    fn push_tensor(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        if self.layout.tensors.iter().any(|t| t.name == name) {
            return Err(MgpoError::DuplicateName(name.to_string()));
        }
        if self.layout.frozen.iter().any(|t| t.name == name) {
            return Err(MgpoError::DuplicateName(name.to_string()));
        }
        self.layout.tensors.push(TensorInfo { name: name.to_string(), shape: shape.to_vec(), param_group: 0 });
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

    #[test]
    fn assigns_parameter_groups_first_match_first() {
        let l = Layout::builder()
            .adapter("q", 8.0, &[4, 6], &[5, 4], true)
            .plain("head.weight", &[3, 5])
            .plain("head.bias", &[3])
            .plain("encoder.LayerNorm.weight", &[5])
            .param_group(ParamGroup::new("slow").lr_scale(0.1), &["q.b"])
            .param_group_where(ParamGroup::no_decay(), is_bias_or_norm)
            .build()
            .unwrap();
        let groups: Vec<usize> = l.tensors().iter().map(|t| t.param_group).collect();
        assert_eq!(groups, [0, 1, 0, 2, 2]);
        assert_eq!(l.param_groups()[2].weight_decay, Some(0.0));
        assert_eq!(l.names().collect::<Vec<_>>(), ["q.a", "q.b", "head.weight", "head.bias", "encoder.LayerNorm.weight", "q.w0"]);
    }

    #[test]
    fn rejects_bad_parameter_groups() {
        let base = || Layout::builder().adapter("q", 8.0, &[4, 6], &[5, 4], false);
        let e = base().param_group(ParamGroup::new("x"), &["q.c"]).build().unwrap_err();
        assert_eq!(e, MgpoError::UnknownName("q.c".into()));
        let e = base().param_group(ParamGroup::new("x"), &["q.a"]).param_group(ParamGroup::new("y"), &["q.a"]).build().unwrap_err();
        assert!(e.to_string().contains("already in another parameter group"), "{e}");
        let e = base().param_group(ParamGroup::new("x").lr_scale(-1.0), &["q.a"]).build().unwrap_err();
        assert!(e.to_string().contains("lr_scale"), "{e}");
        let e = base().param_group(ParamGroup::new("default"), &["q.a"]).build().unwrap_err();
        assert_eq!(e, MgpoError::DuplicateName("default".into()));
    }

    #[test]
    fn tells_biases_and_norms() {
        for n in ["bert.encoder.layer.0.output.dense.bias", "encoder.LayerNorm.weight", "h.0.ln_1.weight", "model.norm.weight", "classifier.bias"] {
            assert!(is_bias_or_norm(n), "{n}");
        }
        for n in ["bert.encoder.layer.0.attention.self.query.weight", "classifier.weight", "q.a", "biased.weight"] {
            assert!(!is_bias_or_norm(n), "{n}");
        }
    }
}
