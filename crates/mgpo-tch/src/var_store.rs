//! Finding a model's adapters and other trainable variables in a
//! `tch::nn::VarStore` by name, as peft names them (`{layer}.lora_a`,
//! `{layer}.lora_b`), for [`MgpoBuilder::var_store`].

use std::collections::HashMap;

use mgpo_core::{lora_scale, MgpoError, Space};
use tch::nn::VarStore;
use tch::Tensor;

use crate::optim::{key, MgpoBuilder};

/// How [`MgpoBuilder::var_store`] picks adapters out of a var store by
/// name: a trainable variable `{prefix}.{a_suffix}` (A, r x in) and its
/// sibling `{prefix}.{b_suffix}` (B, out x r) form the adapter `{prefix}`.
/// The defaults are the names [`crate::LoraLinear`] gives its variables.
#[derive(Debug, Clone, PartialEq)]
pub struct VarStoreAdapters {
    /// The name of A relative to its adapter (`lora_a`).
    pub a_suffix: String,
    /// The name of B relative to its adapter (`lora_b`).
    pub b_suffix: String,
    /// alpha of the adapters found by name (s = alpha / r, or alpha /
    /// sqrt(r) with `rslora`); `None` requires each of them to have been
    /// registered already with [`MgpoBuilder::lora`], which knows its s.
    pub alpha: Option<f64>,
    /// s = alpha / sqrt(r) for the adapters found by name.
    pub rslora: bool,
    /// In `weight` space, for an adapter found by name without its layer:
    /// the name of its frozen base weight relative to `{prefix}` (e.g.
    /// `base.weight`), which the optimizer then perturbs in place (W0 comes
    /// back within rounding, not bit-identical).
    pub w0_suffix: Option<String>,
    /// Register every other trainable variable (`requires_grad`) as a plain
    /// tensor (a classifier head, say). Frozen variables are never touched.
    pub plain: bool,
}

impl Default for VarStoreAdapters {
    fn default() -> Self {
        VarStoreAdapters { a_suffix: "lora_a".into(), b_suffix: "lora_b".into(), alpha: None, rslora: false, w0_suffix: None, plain: true }
    }
}

impl MgpoBuilder {
    /// The adapters of `vs` found by name as `spec` says (in name order,
    /// skipping those registered already with [`MgpoBuilder::lora`]), then,
    /// with `spec.plain`, every other trainable variable as a plain tensor
    /// under its var-store name.
    pub fn var_store(mut self, vs: &VarStore, spec: &VarStoreAdapters) -> Self {
        let vars: HashMap<String, Tensor> = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let known = |b: &Self, t: &Tensor| b.registry.contains(|p| key(p) == key(t));
        let suffix = format!(".{}", spec.a_suffix);
        for n in &names {
            let Some(prefix) = n.strip_suffix(&suffix) else { continue };
            let a = &vars[*n];
            if !a.requires_grad() || known(&self, a) {
                continue;
            }
            let fail = |mut b: Self, detail: &str| {
                b.registry.fail(MgpoError::AdapterShape { name: prefix.to_string(), detail: detail.into() });
                b
            };
            let b_name = format!("{prefix}.{}", spec.b_suffix);
            let Some(b) = vars.get(&b_name) else {
                self.registry.fail(MgpoError::UnknownName(b_name));
                return self;
            };
            let Some(alpha) = spec.alpha else {
                return fail(self, "its scaling is unknown: register its LoraLinear with .lora() or set VarStoreAdapters::alpha");
            };
            let w0 = spec.w0_suffix.as_ref().and_then(|s| vars.get(&format!("{prefix}.{s}")));
            if self.space == Space::Weight && w0.is_none() {
                return fail(self, "weight space needs its LoraLinear (.lora(), factored perturbation) or its base weight (VarStoreAdapters::w0_suffix)");
            }
            let w0 = w0.filter(|_| self.space == Space::Weight);
            let scale = lora_scale(alpha, a.size().first().map_or(1, |&r| r.max(1) as usize), spec.rslora);
            self = self.push_adapter(prefix, a, b, scale, w0, None);
        }
        if spec.plain {
            for n in &names {
                let t = &vars[*n];
                if t.requires_grad() && !known(&self, t) {
                    self = self.plain(n, t);
                }
            }
        }
        self
    }
}
