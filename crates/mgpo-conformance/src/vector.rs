//! The conformance-vector format of [the spec](mgpo_core::spec) ("Conformance vectors"):
//! parsing, with the string forms "NaN", "Infinity" and "-Infinity" of
//! non-finite numbers and the `b64` encoding of large tensors, and checks
//! that a vector is self-consistent before it is run. Every error names the
//! field it is about (`steps[2].grads.q.a.b64`, say); nothing here panics
//! on a malformed file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mgpo_core::{Config, Scope, Space};
use serde_json::{Map, Value};

/// What is wrong with a vector file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum VectorError {
    /// The file or directory could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's message.
        reason: String,
    },
    /// The text is not JSON.
    #[error("not JSON: {0}")]
    Json(String),
    /// A field is missing, has the wrong type, or does not fit the rest of
    /// the vector. `field` is its path from the top of the file.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field's path, e.g. `steps[2].grads.q.a.b64` (empty for the whole file).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, VectorError>;

fn invalid<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T> {
    Err(VectorError::Invalid { field: field.into(), reason: reason.into() })
}

/// A row-major tensor in float64.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Dimensions, outermost first (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The entries, row-major.
    pub data: Vec<f64>,
}

impl TensorData {
    /// Number of entries the shape holds (1 for shape `[]`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One LoRA adapter: A (r x in), B (out x r), scaling alpha / r, and W0
/// (out x in) in `weight` space.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterData {
    /// The adapter's name (its tensors are `<name>.a`, `<name>.b`).
    pub name: String,
    /// LoRA alpha; the scaling is alpha / rank.
    pub alpha: f64,
    /// The rank r.
    pub rank: usize,
    /// A, r x in.
    pub a: TensorData,
    /// B, out x r.
    pub b: TensorData,
    /// The frozen W0, out x in (weight space only).
    pub w0: Option<TensorData>,
}

/// A trainable tensor outside any adapter (a classifier head, a bias).
#[derive(Debug, Clone, PartialEq)]
pub struct PlainData {
    /// The tensor's name.
    pub name: String,
    /// Its initial value.
    pub tensor: TensorData,
}

/// A parameter group: its tensors step with lr * `lr_scale` and weight
/// decay `weight_decay` (the config's when `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// The group's name (its g_bar key).
    pub name: String,
    /// Multiplies the learning rate.
    pub lr_scale: f64,
    /// The group's weight decay; the config's when `None`.
    pub weight_decay: Option<f64>,
    /// Tensor names: `<adapter>.a`, `<adapter>.b`, or a plain tensor's name.
    pub tensors: Vec<String>,
}

/// Gradients (or expected values) of one adapter's A and B.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The A part.
    pub a: TensorData,
    /// The B part.
    pub b: TensorData,
}

/// What step 1 of a step added: `a`/`b` in adapter space, `w0` in weight
/// space. An absent part is not compared.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PerturbationData {
    /// Added to A (adapter space).
    pub a: Option<TensorData>,
    /// Added to B (adapter space).
    pub b: Option<TensorData>,
    /// Added to W0 (weight space).
    pub w0: Option<TensorData>,
}

/// What a step must produce. Every map may leave entries out; what is
/// absent is not compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// Whether the step is skipped for a non-finite gradient.
    pub skipped: bool,
    /// Per adapter: what `perturb` added.
    pub perturbation: BTreeMap<String, PerturbationData>,
    /// Per adapter: A and B after the step.
    pub params: BTreeMap<String, Pair>,
    /// Per adapter: W0 after the step (weight space), restored to clean.
    pub w0: BTreeMap<String, TensorData>,
    /// g_bar per group after the step; `None` for a group with no g_bar yet.
    pub grad_norm_ema: BTreeMap<String, Option<Number>>,
    /// Per plain tensor: what `perturb` added.
    pub plain_perturbation: BTreeMap<String, TensorData>,
    /// Per plain tensor: its value after the step.
    pub plain_params: BTreeMap<String, TensorData>,
}

/// One training step: its learning rate, the gradients at the perturbed
/// point, and what must come out.
#[derive(Debug, Clone, PartialEq)]
pub struct StepData {
    /// Overrides `config.adamw.lr` for this step (a schedule).
    pub lr: Option<f64>,
    /// Per adapter: the gradients of A and B at the perturbed point.
    pub grads: BTreeMap<String, Pair>,
    /// Per plain tensor: its gradient at the perturbed point.
    pub plain_grads: BTreeMap<String, TensorData>,
    /// What the step must produce.
    pub expect: Expect,
}

/// A check passes where |x - ref| <= atol + rtol |ref|.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative part, times |ref|.
    pub rtol: f64,
    /// Absolute part.
    pub atol: f64,
}

impl Tolerance {
    /// |x - ref| <= atol + rtol |ref|, with non-finite values equal only to themselves.
    pub fn accepts(&self, x: f64, reference: f64) -> bool {
        if !reference.is_finite() || !x.is_finite() {
            return x == reference || (x.is_nan() && reference.is_nan());
        }
        (x - reference).abs() <= self.atol + self.rtol * reference.abs()
    }
}

/// The element type a backend computes in, as far as tolerances go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// f32, and anything narrower (bf16, f16).
    F32,
    /// f64.
    F64,
}

impl Dtype {
    /// The dtype a backend computes in, as far as tolerances go:
    /// [`Dtype::F64`] when its tensors keep f64 values exactly
    /// (`HostIo::f64_exact`), else [`Dtype::F32`].
    pub fn of<B: mgpo_core::backend::HostIo>(backend: &B) -> Dtype {
        if backend.f64_exact() {
            Dtype::F64
        } else {
            Dtype::F32
        }
    }

    /// `f32` or `f64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
}

/// A vector's tolerance per element type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// For backends computing in f32 (or narrower).
    pub f32: Tolerance,
    /// For backends that keep f64 exactly.
    pub f64: Tolerance,
}

impl Tolerances {
    /// The tolerance for `dtype`.
    pub fn get(&self, dtype: Dtype) -> Tolerance {
        match dtype {
            Dtype::F32 => self.f32,
            Dtype::F64 => self.f64,
        }
    }
}

/// One conformance vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Vector {
    /// The vector's name (its file name without `.json`).
    pub name: String,
    /// What the vector checks, in words.
    pub description: String,
    /// The optimizer configuration.
    pub config: Config,
    /// The adapters, in registration order.
    pub adapters: Vec<AdapterData>,
    /// Plain trainable tensors, after the adapters.
    pub plain: Vec<PlainData>,
    /// Parameter groups beyond the default one (empty: one group).
    pub param_groups: Vec<ParamGroup>,
    /// The steps, in order.
    pub steps: Vec<StepData>,
    /// The tolerance per element type.
    pub tolerances: Tolerances,
}

/// A JSON number or one of the strings the format uses for non-finite numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number(pub f64);

impl Vector {
    /// Parses and checks a vector.
    pub fn from_json(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| VectorError::Json(e.to_string()))?;
        let v = parse_vector(&root)?;
        v.validate()?;
        Ok(v)
    }

    /// Reads, parses and checks a vector file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| VectorError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::from_json(&text)
    }

    /// Scaling s = alpha / r of adapter `i`.
    pub fn scale(&self, i: usize) -> f64 {
        self.adapters[i].alpha / self.adapters[i].rank as f64
    }

    /// The trainable tensors' names in layout order: `<adapter>.a`,
    /// `<adapter>.b` of each adapter as listed, then the plain tensors as
    /// listed. A tensor's position here is its index t in the Gaussian
    /// direction's seed.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.adapters.iter().flat_map(|a| [format!("{}.a", a.name), format!("{}.b", a.name)]).collect();
        names.extend(self.plain.iter().map(|p| p.name.clone()));
        names
    }

    /// (lr multiplier, weight decay) of the tensor called `name`: its
    /// parameter group's, or (1, config weight decay) in the default group.
    pub fn param_group_of(&self, name: &str) -> (f64, f64) {
        self.param_groups
            .iter()
            .find(|g| g.tensors.iter().any(|t| t == name))
            .map_or((1.0, self.config.adamw.weight_decay), |g| (g.lr_scale, g.weight_decay.unwrap_or(self.config.adamw.weight_decay)))
    }

    /// The names of the perturbation groups, the keys of `grad_norm_ema`:
    /// `global`, or under `per_adapter` each adapter's name and, in adapter
    /// space, each plain tensor's name.
    pub fn group_names(&self) -> Vec<String> {
        match self.config.scope {
            Scope::Global => vec!["global".to_string()],
            Scope::PerAdapter => {
                let mut g: Vec<String> = self.adapters.iter().map(|a| a.name.clone()).collect();
                if self.config.space == Space::Adapter {
                    g.extend(self.plain.iter().map(|p| p.name.clone()));
                }
                g
            }
        }
    }

    /// Shapes fit, names are unique and known, parameter groups are
    /// well-formed, every step has every gradient.
    fn validate(&self) -> Result<()> {
        self.config.validate().map_err(|e| VectorError::Invalid { field: "config".into(), reason: e.to_string() })?;
        if self.adapters.is_empty() && self.plain.is_empty() {
            return invalid("adapters", "a vector needs at least one adapter or plain tensor");
        }
        if self.steps.is_empty() {
            return invalid("steps", "a vector needs at least one step");
        }
        let weight = self.config.space == Space::Weight;
        let mut names = BTreeSet::new();
        for (i, ad) in self.adapters.iter().enumerate() {
            let at = format!("adapters[{i}]");
            if ad.name.is_empty() {
                return invalid(format!("{at}.name"), "must not be empty");
            }
            if !names.insert(ad.name.clone()) {
                return invalid(format!("{at}.name"), format!("adapter `{}` is listed twice", ad.name));
            }
            if ad.rank == 0 {
                return invalid(format!("{at}.rank"), "must be at least 1");
            }
            if !ad.alpha.is_finite() {
                return invalid(format!("{at}.alpha"), format!("must be finite, got {}", ad.alpha));
            }
            let (r, fan_in, fan_out) = (ad.rank, ad.a.shape.get(1).copied().unwrap_or(0), ad.b.shape.first().copied().unwrap_or(0));
            if ad.a.shape.len() != 2 || ad.a.shape[0] != r {
                return invalid(format!("{at}.a.shape"), format!("A must be rank x in = [{r}, in], got {:?}", ad.a.shape));
            }
            shape_is(&format!("{at}.b"), &ad.b, &[fan_out, r])?;
            match (&ad.w0, weight) {
                (Some(w), _) => shape_is(&format!("{at}.w0"), w, &[fan_out, fan_in])?,
                (None, true) => return invalid(format!("{at}.w0"), "weight space needs W0"),
                (None, false) => {}
            }
        }
        let tensor_names = self.tensor_names();
        let mut seen = BTreeSet::new();
        for (i, name) in tensor_names.iter().enumerate() {
            if !seen.insert(name.as_str()) {
                let field = if i < 2 * self.adapters.len() { format!("adapters[{}].name", i / 2) } else { format!("plain[{}].name", i - 2 * self.adapters.len()) };
                return invalid(field, format!("tensor name `{name}` is used twice"));
            }
        }
        for (i, p) in self.plain.iter().enumerate() {
            if p.name.is_empty() {
                return invalid(format!("plain[{i}].name"), "must not be empty");
            }
        }
        self.validate_param_groups(&seen)?;
        let groups = self.group_names();
        for (k, s) in self.steps.iter().enumerate() {
            self.validate_step(k, s, &groups)?;
        }
        Ok(())
    }

    fn validate_param_groups(&self, tensors: &BTreeSet<&str>) -> Result<()> {
        let mut group_names = BTreeSet::new();
        let mut grouped: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, g) in self.param_groups.iter().enumerate() {
            let at = format!("param_groups[{i}]");
            if g.name.is_empty() {
                return invalid(format!("{at}.name"), "must not be empty");
            }
            if !group_names.insert(g.name.as_str()) {
                return invalid(format!("{at}.name"), format!("parameter group `{}` is listed twice", g.name));
            }
            if !(g.lr_scale.is_finite() && g.lr_scale >= 0.0) {
                return invalid(format!("{at}.lr_scale"), format!("must be finite and >= 0, got {}", g.lr_scale));
            }
            if let Some(wd) = g.weight_decay {
                if !(wd.is_finite() && wd >= 0.0) {
                    return invalid(format!("{at}.weight_decay"), format!("must be finite and >= 0, got {wd}"));
                }
            }
            for (j, t) in g.tensors.iter().enumerate() {
                if !tensors.contains(t.as_str()) {
                    return invalid(format!("{at}.tensors[{j}]"), format!("no trainable tensor is called `{t}` (tensors: {})", tensors.iter().copied().collect::<Vec<_>>().join(", ")));
                }
                if let Some(other) = grouped.insert(t.as_str(), g.name.as_str()) {
                    return invalid(format!("{at}.tensors[{j}]"), format!("tensor `{t}` is already in parameter group `{other}`"));
                }
            }
        }
        Ok(())
    }

    fn validate_step(&self, k: usize, s: &StepData, groups: &[String]) -> Result<()> {
        let at = format!("steps[{k}]");
        if let Some(lr) = s.lr {
            if !(lr.is_finite() && lr >= 0.0) {
                return invalid(format!("{at}.lr"), format!("must be finite and >= 0, got {lr}"));
            }
        }
        let adapter = |name: &str, field: &str| -> Result<&AdapterData> {
            match self.adapters.iter().find(|a| a.name == name) {
                Some(a) => Ok(a),
                None => invalid(field, format!("no adapter is called `{name}`")),
            }
        };
        let plain = |name: &str, field: &str| -> Result<&PlainData> {
            match self.plain.iter().find(|p| p.name == name) {
                Some(p) => Ok(p),
                None => invalid(field, format!("no plain tensor is called `{name}`")),
            }
        };
        for ad in &self.adapters {
            if !s.grads.contains_key(&ad.name) {
                return invalid(format!("{at}.grads"), format!("no gradient for adapter `{}`", ad.name));
            }
        }
        for (name, g) in &s.grads {
            let f = format!("{at}.grads.{name}");
            let ad = adapter(name, &f)?;
            shape_is(&format!("{f}.a"), &g.a, &ad.a.shape)?;
            shape_is(&format!("{f}.b"), &g.b, &ad.b.shape)?;
        }
        for p in &self.plain {
            if !s.plain_grads.contains_key(&p.name) {
                return invalid(format!("{at}.plain_grads"), format!("no gradient for plain tensor `{}`", p.name));
            }
        }
        for (name, g) in &s.plain_grads {
            let f = format!("{at}.plain_grads.{name}");
            shape_is(&f, g, &plain(name, &f)?.tensor.shape)?;
        }
        let e = &s.expect;
        let at = format!("{at}.expect");
        for (name, p) in &e.perturbation {
            let f = format!("{at}.perturbation.{name}");
            let ad = adapter(name, &f)?;
            if let Some(t) = &p.a {
                shape_is(&format!("{f}.a"), t, &ad.a.shape)?;
            }
            if let Some(t) = &p.b {
                shape_is(&format!("{f}.b"), t, &ad.b.shape)?;
            }
            if let Some(t) = &p.w0 {
                shape_is(&format!("{f}.w0"), t, &[ad.b.shape[0], ad.a.shape[1]])?;
            }
        }
        for (name, p) in &e.params {
            let f = format!("{at}.params.{name}");
            let ad = adapter(name, &f)?;
            shape_is(&format!("{f}.a"), &p.a, &ad.a.shape)?;
            shape_is(&format!("{f}.b"), &p.b, &ad.b.shape)?;
        }
        for (name, w) in &e.w0 {
            let f = format!("{at}.w0.{name}");
            let ad = adapter(name, &f)?;
            shape_is(&f, w, &[ad.b.shape[0], ad.a.shape[1]])?;
        }
        for (field, map) in [("plain_perturbation", &e.plain_perturbation), ("plain_params", &e.plain_params)] {
            for (name, t) in map {
                let f = format!("{at}.{field}.{name}");
                shape_is(&f, t, &plain(name, &f)?.tensor.shape)?;
            }
        }
        for key in e.grad_norm_ema.keys() {
            if !groups.contains(key) {
                return invalid(format!("{at}.grad_norm_ema.{key}"), format!("not a group of this configuration (groups: {})", groups.join(", ")));
            }
        }
        Ok(())
    }
}

fn shape_is(field: &str, t: &TensorData, shape: &[usize]) -> Result<()> {
    if t.shape != shape {
        return invalid(format!("{field}.shape"), format!("expected {shape:?}, got {:?}", t.shape));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// reading the JSON tree, naming every field on error
// ---------------------------------------------------------------------------

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn object<'a>(v: &'a Value, path: &str, allowed: &[&str]) -> Result<&'a Map<String, Value>> {
    let Some(m) = v.as_object() else {
        return invalid(path, format!("expected an object, got {}", kind(v)));
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return invalid(join(path, k), format!("unknown field (known here: {})", allowed.join(", ")));
    }
    Ok(m)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field that must be present (and not null).
fn required<'a>(m: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value> {
    match m.get(key) {
        Some(Value::Null) | None => invalid(join(path, key), "missing"),
        Some(v) => Ok(v),
    }
}

/// A field that may be absent; null counts as absent.
fn optional<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

fn number(v: &Value, path: &str) -> Result<f64> {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) => Ok(x),
            None => invalid(path, format!("{n} is not a float64")),
        },
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => invalid(path, format!("expected a number, \"NaN\", \"Infinity\" or \"-Infinity\", got {other:?}")),
        },
        other => invalid(path, format!("expected a number, got {}", kind(other))),
    }
}

fn finite(v: &Value, path: &str) -> Result<f64> {
    let x = number(v, path)?;
    if x.is_finite() {
        Ok(x)
    } else {
        invalid(path, format!("must be finite, got {x}"))
    }
}

fn size(v: &Value, path: &str) -> Result<usize> {
    match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
        Some(x) => Ok(x),
        None => invalid(path, format!("expected a non-negative integer, got {v}")),
    }
}

fn string(v: &Value, path: &str) -> Result<String> {
    match v.as_str() {
        Some(s) => Ok(s.to_string()),
        None => invalid(path, format!("expected a string, got {}", kind(v))),
    }
}

fn boolean(v: &Value, path: &str) -> Result<bool> {
    match v.as_bool() {
        Some(b) => Ok(b),
        None => invalid(path, format!("expected true or false, got {}", kind(v))),
    }
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    match v.as_array() {
        Some(a) => Ok(a),
        None => invalid(path, format!("expected an array, got {}", kind(v))),
    }
}

/// `{"shape": [...], "data": [...]}` or `{"shape": [...], "b64": "..."}`.
fn tensor(v: &Value, path: &str) -> Result<TensorData> {
    let m = object(v, path, &["shape", "data", "b64"])?;
    let shape_at = join(path, "shape");
    let shape = array(required(m, path, "shape")?, &shape_at)?
        .iter()
        .enumerate()
        .map(|(i, d)| size(d, &format!("{shape_at}[{i}]")))
        .collect::<Result<Vec<usize>>>()?;
    let Some(n) = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)) else {
        return invalid(shape_at, format!("{shape:?} holds more entries than memory can"));
    };
    let data = match (optional(m, "data"), optional(m, "b64")) {
        (Some(d), None) => {
            let at = join(path, "data");
            array(d, &at)?.iter().enumerate().map(|(i, x)| number(x, &format!("{at}[{i}]"))).collect::<Result<Vec<f64>>>()?
        }
        (None, Some(b)) => {
            let at = join(path, "b64");
            let bytes = base64_decode(&string(b, &at)?).map_err(|reason| VectorError::Invalid { field: at.clone(), reason })?;
            if bytes.len() % 8 != 0 {
                return invalid(at, format!("{} bytes is not a whole number of float64 values", bytes.len()));
            }
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
        }
        (Some(_), Some(_)) => return invalid(path, "give `data` or `b64`, not both"),
        (None, None) => return invalid(path, "needs `data` or `b64`"),
    };
    if data.len() != n {
        return invalid(path, format!("shape {shape:?} needs {n} values, has {}", data.len()));
    }
    Ok(TensorData { shape, data })
}

/// Standard base64 (RFC 4648 alphabet, `=` padding to a multiple of 4).
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the workspace supports 1.80
fn base64_decode(s: &str) -> std::result::Result<Vec<u8>, String> {
    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if b.len() % 4 != 0 {
        return Err(format!("base64 length {} is not a multiple of 4", b.len()));
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (ci, chunk) in b.chunks_exact(4).enumerate() {
        let last = ci + 1 == b.len() / 4;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(format!("misplaced `=` padding at character {}", ci * 4));
        }
        let mut acc = 0u32;
        for (j, &c) in chunk[..4 - pad].iter().enumerate() {
            let Some(x) = sextet(c) else {
                return Err(format!("invalid base64 character {:?} at position {}", c as char, ci * 4 + j));
            };
            acc |= u32::from(x) << (18 - 6 * j);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Ok(out)
}

fn pair(v: &Value, path: &str) -> Result<Pair> {
    let m = object(v, path, &["a", "b"])?;
    Ok(Pair { a: tensor(required(m, path, "a")?, &join(path, "a"))?, b: tensor(required(m, path, "b")?, &join(path, "b"))? })
}

/// An optional object of name -> T.
fn named<T>(m: &Map<String, Value>, path: &str, key: &str, each: impl Fn(&Value, &str) -> Result<T>) -> Result<BTreeMap<String, T>> {
    let Some(v) = optional(m, key) else { return Ok(BTreeMap::new()) };
    let at = join(path, key);
    let Some(obj) = v.as_object() else {
        return invalid(at, format!("expected an object keyed by name, got {}", kind(v)));
    };
    obj.iter().map(|(name, x)| Ok((name.clone(), each(x, &join(&at, name))?))).collect()
}

fn tolerance(v: &Value, path: &str) -> Result<Tolerance> {
    let m = object(v, path, &["rtol", "atol"])?;
    let get = |key: &str| -> Result<f64> {
        let at = join(path, key);
        let x = finite(required(m, path, key)?, &at)?;
        if x < 0.0 {
            return invalid(at, format!("must be >= 0, got {x}"));
        }
        Ok(x)
    };
    Ok(Tolerance { rtol: get("rtol")?, atol: get("atol")? })
}

fn expect(v: &Value, path: &str) -> Result<Expect> {
    let m = object(v, path, &["skipped", "perturbation", "params", "w0", "grad_norm_ema", "plain_perturbation", "plain_params"])?;
    Ok(Expect {
        skipped: boolean(required(m, path, "skipped")?, &join(path, "skipped"))?,
        perturbation: named(m, path, "perturbation", |v, at| {
            let p = object(v, at, &["a", "b", "w0"])?;
            let part = |key: &str| optional(p, key).map(|t| tensor(t, &join(at, key))).transpose();
            Ok(PerturbationData { a: part("a")?, b: part("b")?, w0: part("w0")? })
        })?,
        params: named(m, path, "params", pair)?,
        w0: named(m, path, "w0", tensor)?,
        grad_norm_ema: match m.get("grad_norm_ema") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, x)| Ok((k.clone(), if x.is_null() { None } else { Some(Number(number(x, &join(&join(path, "grad_norm_ema"), k))?)) })))
                .collect::<Result<_>>()?,
            Some(other) => return invalid(join(path, "grad_norm_ema"), format!("expected an object keyed by group, got {}", kind(other))),
        },
        plain_perturbation: named(m, path, "plain_perturbation", tensor)?,
        plain_params: named(m, path, "plain_params", tensor)?,
    })
}

fn parse_vector(root: &Value) -> Result<Vector> {
    let top = object(root, "", &["name", "description", "config", "adapters", "plain", "param_groups", "steps", "tolerance", "tolerances"])?;
    let config: Config = serde_json::from_value(required(top, "", "config")?.clone()).map_err(|e| VectorError::Invalid { field: "config".into(), reason: e.to_string() })?;

    let adapters = array(required(top, "", "adapters")?, "adapters")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("adapters[{i}]");
            let m = object(v, &at, &["name", "alpha", "rank", "a", "b", "w0"])?;
            Ok(AdapterData {
                name: string(required(m, &at, "name")?, &join(&at, "name"))?,
                alpha: finite(required(m, &at, "alpha")?, &join(&at, "alpha"))?,
                rank: size(required(m, &at, "rank")?, &join(&at, "rank"))?,
                a: tensor(required(m, &at, "a")?, &join(&at, "a"))?,
                b: tensor(required(m, &at, "b")?, &join(&at, "b"))?,
                w0: optional(m, "w0").map(|w| tensor(w, &join(&at, "w0"))).transpose()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let plain = match optional(top, "plain") {
        None => Vec::new(),
        Some(v) => array(v, "plain")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let at = format!("plain[{i}]");
                let m = object(v, &at, &["name", "tensor"])?;
                Ok(PlainData { name: string(required(m, &at, "name")?, &join(&at, "name"))?, tensor: tensor(required(m, &at, "tensor")?, &join(&at, "tensor"))? })
            })
            .collect::<Result<Vec<_>>>()?,
    };

    let param_groups = match optional(top, "param_groups") {
        None => Vec::new(),
        Some(v) => array(v, "param_groups")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let at = format!("param_groups[{i}]");
                let m = object(v, &at, &["name", "lr_scale", "weight_decay", "tensors"])?;
                let tensors_at = join(&at, "tensors");
                Ok(ParamGroup {
                    name: string(required(m, &at, "name")?, &join(&at, "name"))?,
                    lr_scale: optional(m, "lr_scale").map(|x| number(x, &join(&at, "lr_scale"))).transpose()?.unwrap_or(1.0),
                    weight_decay: optional(m, "weight_decay").map(|x| number(x, &join(&at, "weight_decay"))).transpose()?,
                    tensors: array(required(m, &at, "tensors")?, &tensors_at)?
                        .iter()
                        .enumerate()
                        .map(|(j, t)| string(t, &format!("{tensors_at}[{j}]")))
                        .collect::<Result<Vec<_>>>()?,
                })
            })
            .collect::<Result<Vec<_>>>()?,
    };

    let steps = array(required(top, "", "steps")?, "steps")?
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let at = format!("steps[{k}]");
            let m = object(v, &at, &["lr", "grads", "plain_grads", "expect"])?;
            if !m.get("grads").is_some_and(Value::is_object) {
                return invalid(join(&at, "grads"), "expected an object keyed by adapter name");
            }
            Ok(StepData {
                lr: optional(m, "lr").map(|x| number(x, &join(&at, "lr"))).transpose()?,
                grads: named(m, &at, "grads", pair)?,
                plain_grads: named(m, &at, "plain_grads", tensor)?,
                expect: expect(required(m, &at, "expect")?, &join(&at, "expect"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let tolerances = match (optional(top, "tolerance"), optional(top, "tolerances")) {
        (Some(t), None) => {
            let t = tolerance(t, "tolerance")?;
            Tolerances { f32: t, f64: t }
        }
        (None, Some(ts)) => {
            let m = object(ts, "tolerances", &["f32", "f64"])?;
            Tolerances { f32: tolerance(required(m, "tolerances", "f32")?, "tolerances.f32")?, f64: tolerance(required(m, "tolerances", "f64")?, "tolerances.f64")? }
        }
        (Some(_), Some(_)) => return invalid("tolerances", "give `tolerance` (both dtypes) or `tolerances` (per dtype), not both"),
        (None, None) => return invalid("tolerances", "missing (or the single `tolerance`)"),
    };

    Ok(Vector {
        name: string(required(top, "", "name")?, "name")?,
        description: optional(top, "description").map(|d| string(d, "description")).transpose()?.unwrap_or_default(),
        config,
        adapters,
        plain,
        param_groups,
        steps,
        tolerances,
    })
}

/// Every `*.json` file of `dir`, sorted by name, each parsed or with the
/// reason it could not be.
pub fn load_dir(dir: &Path) -> Result<Vec<(PathBuf, Result<Vector>)>> {
    let read_err = |e: std::io::Error| VectorError::Read { path: dir.to_path_buf(), reason: e.to_string() };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(VectorError::Read { path: dir.to_path_buf(), reason: "no *.json vectors".into() });
    }
    Ok(paths
        .into_iter()
        .map(|p| {
            let v = Vector::load(&p);
            (p, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(json: &str) -> Result<TensorData> {
        tensor(&serde_json::from_str(json).unwrap(), "x")
    }

    #[test]
    fn reads_non_finite_strings_and_rejects_others() {
        let x = t(r#"{"shape": [3], "data": [1.5, "NaN", "-Infinity"]}"#).unwrap();
        assert_eq!(x.data[0], 1.5);
        assert!(x.data[1].is_nan());
        assert_eq!(x.data[2], f64::NEG_INFINITY);
        let e = t(r#"{"shape": [1], "data": ["nan"]}"#).unwrap_err();
        assert!(matches!(&e, VectorError::Invalid { field, .. } if field == "x.data[0]"), "{e}");
    }

    #[test]
    fn reads_b64_as_little_endian_f64() {
        // 1.0, -2.5 and NaN as little-endian f64, base64 by Python's base64.b64encode
        let x = t(r#"{"shape": [3], "b64": "AAAAAAAA8D8AAAAAAAAEwAAAAAAAAPh/"}"#).unwrap();
        assert_eq!(&x.data[..2], &[1.0, -2.5]);
        assert!(x.data[2].is_nan());
        let x = t(r#"{"shape": [1, 1], "b64": "mpmZmZmZuT8="}"#).unwrap();
        assert_eq!(x.data, [0.1]);
    }

    #[test]
    fn bad_tensors_are_named_errors() {
        for (json, field, needle) in [
            (r#"{"shape": [2], "b64": "AAAAAAAA8D8AAA=="}"#, "x.b64", "whole number"),
            (r#"{"shape": [2], "b64": "AAAAAAAA8D8="}"#, "x", "needs 2 values, has 1"),
            (r#"{"shape": [2], "b64": "AAAAAAAA8D8AAAAAAAAEwA"}"#, "x.b64", "multiple of 4"),
            (r#"{"shape": [2], "b64": "AAAAAAAA8D8AAAAAAAAEw!=="}"#, "x.b64", "invalid base64 character"),
            (r#"{"shape": [2], "b64": "AAAAAAAA8D8AAAAAAAA*wA=="}"#, "x.b64", "invalid base64 character"),
            (r#"{"shape": [2], "b64": "AA==AAAA"}"#, "x.b64", "padding"),
            (r#"{"shape": [3], "data": [1, 2]}"#, "x", "needs 3 values"),
            (r#"{"shape": [1], "data": [1], "b64": "AAAAAAAA8D8="}"#, "x", "not both"),
            (r#"{"shape": [1]}"#, "x", "needs `data` or `b64`"),
            (r#"{"shape": [-1], "data": []}"#, "x.shape[0]", "non-negative integer"),
            (r#"{"shape": [1], "data": [1], "dtype": "f32"}"#, "x.dtype", "unknown field"),
        ] {
            match t(json) {
                Err(VectorError::Invalid { field: f, reason }) => {
                    assert_eq!(f, field, "{json}: {reason}");
                    assert!(reason.contains(needle), "{json}: {reason}");
                }
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn tolerance_is_spec_formula() {
        let t = Tolerance { rtol: 1e-4, atol: 1e-6 };
        assert!(t.accepts(1.0001, 1.0));
        assert!(!t.accepts(1.0002, 1.0));
        assert!(t.accepts(f64::NAN, f64::NAN));
        assert!(!t.accepts(1.0, f64::NAN));
        assert!(!t.accepts(f64::INFINITY, f64::NEG_INFINITY));
    }

    /// A small valid vector, edited by each case below into an invalid one.
    fn base() -> Value {
        serde_json::json!({
            "name": "v",
            "config": {"rho": 0.05, "beta": 0.9, "eps": 1e-12, "direction": "ascent", "space": "adapter",
                       "scope": "per_adapter", "adaptive_norm": true, "max_inv_scale": null,
                       "adamw": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1},
                       "max_grad_norm": null},
            "adapters": [{"name": "q", "alpha": 2.0, "rank": 1,
                          "a": {"shape": [1, 2], "data": [0.1, 0.2]}, "b": {"shape": [3, 1], "data": [0.0, 0.1, 0.2]}}],
            "plain": [{"name": "head", "tensor": {"shape": [2], "data": [1.0, 2.0]}}],
            "param_groups": [{"name": "no_decay", "lr_scale": 0.5, "weight_decay": 0.0, "tensors": ["q.b", "head"]}],
            "steps": [{"lr": 0.001,
                       "grads": {"q": {"a": {"shape": [1, 2], "data": [1.0, 2.0]}, "b": {"shape": [3, 1], "data": [1.0, 2.0, 3.0]}}},
                       "plain_grads": {"head": {"shape": [2], "data": [0.5, 0.5]}},
                       "expect": {"skipped": false, "params": {}, "grad_norm_ema": {"q": 1.0, "head": 0.5},
                                  "plain_params": {"head": {"shape": [2], "data": [1.0, 2.0]}}}}],
            "tolerances": {"f32": {"rtol": 1e-5, "atol": 1e-7}, "f64": {"rtol": 1e-12, "atol": 1e-15}}
        })
    }

    fn parse(v: &Value) -> Result<Vector> {
        Vector::from_json(&v.to_string())
    }

    #[test]
    fn reads_plain_tensors_groups_and_tolerances() {
        let v = parse(&base()).unwrap();
        assert_eq!(v.tensor_names(), ["q.a", "q.b", "head"]);
        assert_eq!(v.param_group_of("q.b"), (0.5, 0.0));
        assert_eq!(v.param_group_of("q.a"), (1.0, 0.1));
        assert_eq!(v.group_names(), ["q", "head"]);
        assert_eq!(v.tolerances.get(Dtype::F64), Tolerance { rtol: 1e-12, atol: 1e-15 });
        assert_eq!(v.steps[0].plain_grads["head"].data, [0.5, 0.5]);

        let mut old = base();
        let o = old.as_object_mut().unwrap();
        o.remove("tolerances");
        o.insert("tolerance".into(), serde_json::json!({"rtol": 1e-4, "atol": 1e-6}));
        let v = parse(&old).unwrap();
        assert_eq!(v.tolerances.f32, v.tolerances.f64);

        let mut gauss = base();
        gauss["config"]["perturbation"] = serde_json::json!({"gaussian": {"seed": 7}});
        assert_eq!(parse(&gauss).unwrap().config.perturbation, mgpo_core::Perturbation::Gaussian { seed: 7 });
    }

    #[test]
    fn inconsistent_vectors_are_named_errors() {
        type Edit = fn(&mut Value);
        let cases: [(Edit, &str, &str); 13] = [
            (|v| v["param_groups"][0]["tensors"][1] = "tail".into(), "param_groups[0].tensors[1]", "no trainable tensor is called `tail`"),
            (
                |v| v["param_groups"].as_array_mut().unwrap().push(serde_json::json!({"name": "again", "tensors": ["head"]})),
                "param_groups[1].tensors[0]",
                "already in parameter group `no_decay`",
            ),
            (|v| v["param_groups"][0]["tensors"][1] = "q.b".into(), "param_groups[0].tensors[1]", "already in parameter group"),
            (|v| v["param_groups"][0]["lr_scale"] = (-1.0).into(), "param_groups[0].lr_scale", ">= 0"),
            (|v| v["param_groups"][0]["weight_decay"] = "NaN".into(), "param_groups[0].weight_decay", ">= 0"),
            (|v| v["plain"][0]["name"] = "q.a".into(), "plain[0].name", "used twice"),
            (|v| v["steps"][0]["plain_grads"] = serde_json::json!({}), "steps[0].plain_grads", "no gradient for plain tensor `head`"),
            (|v| v["steps"][0]["plain_grads"]["head"]["shape"] = serde_json::json!([1, 2]), "steps[0].plain_grads.head.shape", "expected [2]"),
            (|v| v["steps"][0]["expect"]["plain_params"]["tail"] = v["plain"][0]["tensor"].clone(), "steps[0].expect.plain_params.tail", "no plain tensor"),
            (|v| v["steps"][0]["expect"]["grad_norm_ema"]["global"] = 1.0.into(), "steps[0].expect.grad_norm_ema.global", "not a group"),
            (|v| v["tolerance"] = serde_json::json!({"rtol": 0.0, "atol": 0.0}), "tolerances", "not both"),
            (|v| v["tolerances"]["f32"]["rtol"] = (-1.0).into(), "tolerances.f32.rtol", ">= 0"),
            (|v| v["param_group"] = serde_json::json!([]), "param_group", "unknown field"),
        ];
        for (i, (edit, field, needle)) in cases.into_iter().enumerate() {
            let mut v = base();
            edit(&mut v);
            match parse(&v) {
                Err(VectorError::Invalid { field: f, reason }) => {
                    assert_eq!(f, field, "case {i}: {reason}");
                    assert!(reason.contains(needle), "case {i}: {reason}");
                }
                other => panic!("case {i}: {other:?}"),
            }
        }
        // The Gaussian direction in weight space is a valid configuration
        // (the spec: full-rank noise on W0), no longer refused: what
        // stops this vector is its g_bar of the plain tensor `head`, which
        // is in no group in weight space.
        let mut v = base();
        v["config"]["space"] = "weight".into();
        v["adapters"][0]["w0"] = serde_json::json!({"shape": [3, 2], "data": [0, 0, 0, 0, 0, 0]});
        v["config"]["perturbation"] = serde_json::json!({"gaussian": {"seed": 1}});
        match parse(&v) {
            Err(VectorError::Invalid { field, .. }) => assert_eq!(field, "steps[0].expect.grad_norm_ema.head"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Vector::from_json("{"), Err(VectorError::Json(_))));
        assert!(matches!(Vector::load(Path::new("/nonexistent/v.json")), Err(VectorError::Read { .. })));
    }
}
