//! Every way a call into the optimizer can fail. None of them leaves the
//! parameters perturbed or the optimizer state half-updated.

/// Errors of the optimizer and its backends.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MgpoError {
    /// A configuration value outside its valid range.
    #[error("invalid configuration: {field} = {value} ({reason})")]
    InvalidConfig {
        /// The field, e.g. `adamw.lr`.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A tensor whose shape differs from the one the optimizer was built for.
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The registered shape.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// An adapter whose A, B and W0 do not fit together (A r x in, B out x r, W0 out x in).
    #[error("adapter `{name}`: {detail}")]
    AdapterShape {
        /// The adapter.
        name: String,
        /// What does not fit.
        detail: String,
    },
    /// Two tensors or adapters registered under one name.
    #[error("duplicate name `{0}`")]
    DuplicateName(String),
    /// A name that the optimizer does not know.
    #[error("unknown tensor or adapter `{0}`")]
    UnknownName(String),
    /// A step was given no gradient for a trainable tensor.
    #[error("no gradient for trainable tensor `{0}`")]
    MissingGradient(String),
    /// A call was not given a tensor that the optimizer registered.
    #[error("tensor `{0}` is missing from the call (give every tensor of Layout::names, in that order)")]
    MissingTensor(String),
    /// A tensor given under another name than the one registered at its
    /// position: tensors swapped, renamed, or in another order.
    #[error("tensor {position} of the call is `{got}`, but `{expected}` was registered there (give the tensors of Layout::names, in that order)")]
    NameMismatch {
        /// Position in the call.
        position: usize,
        /// The name registered there.
        expected: String,
        /// The name given.
        got: String,
    },
    /// A parameter list of the wrong length.
    #[error("expected {expected} {what}, got {got}")]
    WrongCount {
        /// What was counted.
        what: &'static str,
        /// How many were expected.
        expected: usize,
        /// How many were given.
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
#[non_exhaustive]
pub enum CheckpointError {
    /// A file that cannot be read or written.
    #[error("cannot read or write {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// Not a safetensors file, truncated, or a header that does not parse.
    #[error("not a readable safetensors file: {0}")]
    Malformed(String),
    /// The stored checksum does not match the contents.
    #[error("checksum mismatch (stored {stored:016x}, computed {computed:016x}): the file is corrupted")]
    Checksum {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of the contents.
        computed: u64,
    },
    /// The file's `format` metadata: another kind of safetensors file.
    #[error("not a lora-mgpo optimizer checkpoint (format {0:?})")]
    Format(String),
    /// A format version this build does not read.
    #[error("unsupported format version {found:?} (this build reads {expected})")]
    Version {
        /// The file's version.
        found: String,
        /// The version this build reads.
        expected: u32,
    },
    /// A metadata field that is missing or does not parse.
    #[error("metadata field `{field}`: {reason}")]
    Metadata {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration field other than the learning rate differs.
    #[error("configuration differs from the optimizer's: {field} is {stored} in the checkpoint, {current} here")]
    ConfigMismatch {
        /// The field.
        field: &'static str,
        /// Its value in the checkpoint.
        stored: String,
        /// Its value in the optimizer.
        current: String,
    },
    /// The checkpoint's tensors or groups are not this optimizer's.
    #[error("tensors differ from the optimizer's: {0}")]
    LayoutMismatch(String),
    /// A moment stored in a dtype other than F32 or F64.
    #[error("tensor `{name}` has dtype {dtype}; only F32 and F64 are accepted")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A moment the checkpoint should hold.
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    /// A tensor the optimizer does not know.
    #[error("unexpected tensor `{0}`")]
    ExtraTensor(String),
    /// A moment of the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// The optimizer's shape.
        expected: Vec<usize>,
        /// The checkpoint's shape.
        got: Vec<usize>,
    },
}

/// The result of every fallible call.
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
