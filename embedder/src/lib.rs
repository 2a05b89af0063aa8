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

/// The optimisation level this crate was compiled at (`"0"`–`"3"`, `"s"`, `"z"`), from its
/// build script. At `"0"` the kernels in [`short_attention`] and [`bert`] run several times
/// slower than they should.
pub const OPT_LEVEL: &str = env!("EMBEDDER_OPT_LEVEL");

pub use bert::Quantization;
pub use config::Config;
pub use error::{Error, Result};
pub use model::SentenceModel;

#[cfg(test)]
mod build_tests {
    /// The e2e scenarios and `cargo test` use the dev profile; its `[profile.dev.package.embedder]`
    /// override must keep this crate optimised, or pods answer 2-3x slower and latency-gated
    /// rollouts roll back.
    #[test]
    fn the_crate_is_compiled_optimised_in_every_profile() {
        assert_ne!(
            super::OPT_LEVEL,
            "0",
            "embedder built at opt-level 0: set [profile.dev.package.embedder] opt-level in the workspace Cargo.toml"
        );
    }
}
