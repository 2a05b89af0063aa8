//! embedder: a sentence-embedding HTTP server on candle.
//!
//! Modules follow the request path: [`connections`] (accepting, timeouts, drain) → [`api`]
//! (HTTP, admission; the native routes), [`openai`] and [`tei`] (those APIs' routes) →
//! [`embed`] (the pipeline they share: prompts, tokens, admission by work) → [`registry`]
//! (which model) →
//! [`batcher`] (queue and dynamic batching) → [`model`] (tokeniser and BERT forward pass) →
//! [`pooling`]; int8 layers come from the `embedroll-int8` crate. [`metrics`] is the contract with Prometheus and the operator.

pub mod api;
pub mod batcher;
pub mod bert;
pub mod config;
pub mod connections;
pub mod embed;
pub mod error;
pub mod fault;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod pooling;
pub mod registry;
pub mod server;
pub mod short_attention;
pub mod tei;

pub use bert::Quantization;
pub use config::Config;
pub use error::{Error, Result};
pub use model::SentenceModel;
