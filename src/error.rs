//! The one error type of the library. Every failure a user can cause (bad model files, prompts
//! past the context, too little GPU memory, no adapter) is a variant with a message that names
//! the problem; the library never panics on input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no GPU adapter found. {hint}")]
    NoAdapter { hint: String },

    #[error("GPU error: {0}")]
    Gpu(String),

    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),

    #[error("model file {path}: {msg}")]
    BadModel { path: PathBuf, msg: String },

    #[error("unsupported model: {0}")]
    Unsupported(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("context is full: {needed} tokens needed, the context holds {limit}")]
    ContextFull { needed: usize, limit: usize },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn bad_model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadModel { path: path.into(), msg: msg.into() }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
