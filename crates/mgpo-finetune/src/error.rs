//! One error type for the crate: every bad input (a file, a row, a model
//! directory, an adapter) is a typed error naming where and why.

use std::path::PathBuf;

/// Anything that stops loading data, a model or an adapter, or training.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A data file's row (1-based line) is not a usable example.
    #[error("{path}:{line}: {detail}")]
    BadRow {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// A data set cannot be used as asked (too few examples, one label, ...).
    #[error("data: {0}")]
    Data(String),
    /// A WordNet data file is not in the WordNet 3.0 format.
    #[error("{path}:{line}: not a WordNet data line: {detail}")]
    WordNet {
        /// The `data.noun` file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// The model directory lacks a file or holds a malformed one.
    #[error("model directory {dir}: {detail}")]
    Model {
        /// The directory.
        dir: PathBuf,
        /// What is missing or wrong.
        detail: String,
    },
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An adapter directory (peft format) does not fit the model.
    #[error("adapter {dir}: {detail}")]
    Adapter {
        /// The adapter directory.
        dir: PathBuf,
        /// What does not fit.
        detail: String,
    },
    /// A training option is out of range.
    #[error("option {name}: {detail}")]
    Option {
        /// The option.
        name: &'static str,
        /// Why it is refused.
        detail: String,
    },
    /// A trainer checkpoint does not belong to this run.
    #[error("checkpoint {dir}: {detail}")]
    Checkpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What does not match.
        detail: String,
    },
    /// The optimizer refused (configuration, names, checkpoint).
    #[error("optimizer: {0}")]
    Mgpo(#[from] mgpo_core::MgpoError),
    /// candle failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, FinetuneError>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FinetuneError {
    let path = path.into();
    move |source| FinetuneError::Io { path, source }
}
