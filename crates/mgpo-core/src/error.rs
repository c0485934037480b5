//! Every way a call into the optimizer can fail. None of them leaves the
//! parameters perturbed or the optimizer state half-updated.

/// Errors of the optimizer and its backends.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MgpoError {
    /// A configuration value outside its valid range.
    #[error("invalid configuration: {field} = {value} ({reason})")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A tensor whose shape differs from the one the optimizer was built for.
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// An adapter whose A, B and W0 do not fit together (A r x in, B out x r, W0 out x in).
    #[error("adapter `{name}`: {detail}")]
    AdapterShape { name: String, detail: String },
    /// Two tensors or adapters registered under one name.
    #[error("duplicate name `{0}`")]
    DuplicateName(String),
    /// A name that the optimizer does not know.
    #[error("unknown tensor or adapter `{0}`")]
    UnknownName(String),
    /// A step was given no gradient for a trainable tensor.
    #[error("no gradient for trainable tensor `{0}`")]
    MissingGradient(String),
    /// A parameter list of the wrong length.
    #[error("expected {expected} {what}, got {got}")]
    WrongCount {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// `perturb` called twice without a `step` or `unperturb` in between.
    #[error("parameters are already perturbed: call step() or unperturb() first")]
    AlreadyPerturbed,
    /// The optimizer has no trainable tensor.
    #[error("the optimizer has no trainable tensor")]
    Empty,
    /// A failure reported by the tensor backend.
    #[error("backend: {0}")]
    Backend(String),
    /// Input that no longer fits what the optimizer was built for (a model
    /// whose structure changed, say).
    #[error("inconsistent input: {0}")]
    Corrupt(String),
    /// A checkpoint that cannot be loaded into this optimizer.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
}

/// What is wrong with a checkpoint. Loading one never changes the optimizer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read or write {path}: {reason}")]
    Io { path: String, reason: String },
    /// Not a safetensors file, truncated, or a header that does not parse.
    #[error("not a readable safetensors file: {0}")]
    Malformed(String),
    /// The stored checksum does not match the contents.
    #[error("checksum mismatch (stored {stored:016x}, computed {computed:016x}): the file is corrupted")]
    Checksum { stored: u64, computed: u64 },
    #[error("not a lora-mgpo optimizer checkpoint (format {0:?})")]
    Format(String),
    #[error("unsupported format version {found:?} (this build reads {expected})")]
    Version { found: String, expected: u32 },
    #[error("metadata field `{field}`: {reason}")]
    Metadata { field: &'static str, reason: String },
    #[error("configuration differs from the optimizer's: {field} is {stored} in the checkpoint, {current} here")]
    ConfigMismatch { field: &'static str, stored: String, current: String },
    #[error("tensors differ from the optimizer's: {0}")]
    LayoutMismatch(String),
    #[error("tensor `{name}` has dtype {dtype}; only F32 and F64 are accepted")]
    Dtype { name: String, dtype: String },
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("unexpected tensor `{0}`")]
    ExtraTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
}

pub type Result<T, E = MgpoError> = std::result::Result<T, E>;

/// Rejects a value unless `ok` holds.
pub(crate) fn check(ok: bool, field: &'static str, value: f64, reason: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(MgpoError::InvalidConfig {
            field,
            value: value.to_string(),
            reason,
        })
    }
}
