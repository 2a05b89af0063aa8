//! The crate's one error type for loading and running models.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model {model}: cannot read {path}: {source}")]
    ModelFile {
        model: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {model}: {path} is not valid: {reason}")]
    ModelConfig {
        model: String,
        path: PathBuf,
        reason: String,
    },
    #[error("model {model}: {reason}")]
    UnsupportedModel { model: String, reason: String },
    #[error("model {model}: tokenizer failed: {reason}")]
    Tokenizer { model: String, reason: String },
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
    #[error("the model's batcher stopped")]
    BatcherGone,
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
