//! What an experiment can refuse or fail on.

use std::fmt;

/// Why an experiment could not be set up or run.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A sweep or run specification that cannot be run (the message says which field).
    InvalidSpec(String),
    /// `--backend` names a backend that is not compiled in.
    UnknownBackend {
        /// The name asked for.
        name: String,
        /// The backends this build has.
        available: Vec<&'static str>,
    },
    /// The optimizer refused (bad configuration, shapes, ...).
    Optimizer(mgpo_core::MgpoError),
    /// The tensor framework failed.
    Backend(String),
    /// A file could not be read or written.
    Io(String),
    /// The transformer task failed (model files, data, training).
    Finetune(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidSpec(s) => write!(f, "invalid experiment: {s}"),
            Error::UnknownBackend { name, available } => {
                write!(f, "backend `{name}` is not compiled in; available: {}", available.join(", "))
            }
            Error::Optimizer(e) => write!(f, "optimizer: {e}"),
            Error::Backend(s) => write!(f, "backend: {s}"),
            Error::Io(s) => write!(f, "{s}"),
            Error::Finetune(s) => write!(f, "transformer task: {s}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<mgpo_core::MgpoError> for Error {
    fn from(e: mgpo_core::MgpoError) -> Self {
        Error::Optimizer(e)
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Backend(format!("candle: {e}"))
    }
}

impl From<mgpo_finetune::FinetuneError> for Error {
    fn from(e: mgpo_finetune::FinetuneError) -> Self {
        Error::Finetune(e.to_string())
    }
}

/// The result of everything in this crate that can fail.
pub type Result<T> = std::result::Result<T, Error>;

/// An I/O error with the path it concerns.
pub(crate) fn io(path: &std::path::Path, e: impl fmt::Display) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}
