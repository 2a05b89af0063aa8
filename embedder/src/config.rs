//! Command-line flags and `EMBEDDER_*` environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::bert::Quantization;
use crate::error::{Error, Result};

/// Where a served model's files are and how its weights are held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    pub dir: PathBuf,
    pub quantization: Quantization,
}

/// Name the bundled default model is served under, and its directory in the model cache.
pub const BUNDLED_MODEL: &str = "all-MiniLM-L6-v2";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "embedder",
    version,
    about = "Sentence-embedding server: BERT-family models on candle, dynamic batching, Prometheus metrics.",
    after_help = "Every flag can also be set with the environment variable shown, e.g. \
EMBEDDER_LISTEN=0.0.0.0:8080. Lists (--model, --preload) take comma-separated values there."
)]
pub struct Config {
    /// Address to serve HTTP on.
    #[arg(long, env = "EMBEDDER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A model to serve, as NAME=DIR where DIR is a Hugging Face / sentence-transformers model
    /// directory (config.json, tokenizer.json, model.safetensors, 1_Pooling/...), optionally
    /// followed by :int8 or :none to set that model's quantization (else --quantize's).
    /// Repeatable. Without any, the bundled all-MiniLM-L6-v2 is served from --model-cache.
    #[arg(
        long = "model",
        env = "EMBEDDER_MODEL",
        value_name = "NAME=DIR[:int8|:none]",
        value_delimiter = ','
    )]
    pub models: Vec<String>,

    /// How models' weights are held unless their --model says otherwise: none (f32, the
    /// checkpoint as trained) or int8 (linear layers and word embeddings int8, about a
    /// quarter of the memory, faster; vectors within about 0.99 cosine of f32, see
    /// docs/embedder.md).
    #[arg(long, env = "EMBEDDER_QUANTIZE", default_value = "none", value_parser = quantization)]
    pub quantize: Quantization,

    /// The int8 matrix kernel: auto (the fastest this CPU runs), avx512-vnni, avx-vnni,
    /// avx512vl-vnni-256, avx2 or portable. For benchmarks and debugging; a kernel this CPU
    /// lacks is refused at start-up.
    #[arg(long, env = "EMBEDDER_INT8_KERNEL", default_value = "auto")]
    pub int8_kernel: String,

    /// Model used when a request names none; readiness waits for it. Defaults to the first
    /// --model.
    #[arg(long, env = "EMBEDDER_DEFAULT_MODEL")]
    pub default_model: Option<String>,

    /// Where embedder/models/fetch.sh puts model directories; used when no --model is given.
    #[arg(long, env = "EMBEDDER_MODEL_CACHE", value_name = "DIR")]
    pub model_cache: Option<PathBuf>,

    /// Models to load and warm at start-up besides the default one. Repeatable.
    #[arg(
        long,
        env = "EMBEDDER_PRELOAD",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub preload: Vec<String>,

    /// Other names the default model answers to in requests' `model` (comma-separated in
    /// the environment), for clients that hard-code one, e.g. text-embedding-3-small.
    /// Responses name the model as the request did.
    #[arg(
        long = "served-model-name",
        env = "EMBEDDER_SERVED_MODEL_NAME",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub served_model_names: Vec<String>,

    /// Truncate inputs longer than the model's max_seq_length (sentence-transformers'
    /// behaviour). With false, they are refused (413; 422 on TEI's routes) unless the request
    /// says `truncate: true`.
    #[arg(long, env = "EMBEDDER_AUTO_TRUNCATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_truncate: bool,

    /// Most models kept in memory at once; the least recently used is evicted first, the
    /// default model never.
    #[arg(long, env = "EMBEDDER_MAX_MODELS", default_value_t = 4)]
    pub max_models: usize,

    /// Token budget of one forward pass: texts waiting are packed fairly between requests,
    /// without padding, until their tokens reach it (a single longer text still runs alone).
    /// A small request waits up to about one pass behind a heavy one; 256 tokens is tens of
    /// milliseconds on 2 cores, and throughput is flat from 64 to 16384 (benches/forward.rs).
    #[arg(long, env = "EMBEDDER_MAX_BATCH_TOKENS", default_value_t = 256)]
    pub max_batch_tokens: usize,

    /// Requests admitted at once (counted once their body is read); beyond it the server
    /// answers 429 with Retry-After.
    #[arg(long, env = "EMBEDDER_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,

    /// Tokens admitted at once, queued or in a pass: the work the server takes on. Beyond
    /// it a request gets 429 with Retry-After; a single request larger than it gets 413.
    #[arg(long, env = "EMBEDDER_MAX_QUEUED_TOKENS", default_value_t = 131_072)]
    pub max_queued_tokens: usize,

    /// How long a client may take to send its request headers, from their first byte, before
    /// the connection is closed.
    #[arg(long, env = "EMBEDDER_HEADER_READ_TIMEOUT_MS", default_value_t = 5_000)]
    pub header_read_timeout_ms: u64,

    /// How long a keep-alive connection may stay idle between requests. Keep it longer than
    /// the upstream idle timeout of the proxies in front (Traefik 90 s, Google Cloud load
    /// balancers 600 s), or a request they send on a connection closing under them fails.
    #[arg(long, env = "EMBEDDER_IDLE_TIMEOUT_MS", default_value_t = 620_000)]
    pub idle_timeout_ms: u64,

    /// How long a client may take to send its request body (408 beyond). A client trickling
    /// bytes holds no admission permit meanwhile.
    #[arg(long, env = "EMBEDDER_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_read_timeout_ms: u64,

    /// How long writing an answer may stall because the client is not reading it, before
    /// the connection is closed. The clock runs only while the socket's buffers are full, so
    /// a large answer to a slow reader that keeps reading is not cut off.
    #[arg(long, env = "EMBEDDER_WRITE_TIMEOUT_MS", default_value_t = 30_000)]
    pub write_timeout_ms: u64,

    /// The most time a request may take once its body is read: tokenising, queueing and
    /// inference (503 beyond; its queued texts are dropped).
    #[arg(long, env = "EMBEDDER_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    pub request_timeout_ms: u64,

    /// On shutdown, the most time given to open connections to finish before exiting; a
    /// request still running then (`--request-timeout-ms` allows longer) is cut off. Keep
    /// the drain delay plus this under the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "EMBEDDER_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    pub shutdown_timeout_ms: u64,

    /// Most texts in one request (413 beyond).
    #[arg(long, env = "EMBEDDER_MAX_CLIENT_BATCH", default_value_t = 256)]
    pub max_client_batch: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "EMBEDDER_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Compute threads for inference (0: one per core). Sets the candle/rayon pool size.
    #[arg(long, env = "EMBEDDER_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// On SIGTERM, how long to keep serving with readiness false before refusing new
    /// connections, so load balancers notice first. In-flight requests then get
    /// `--shutdown-timeout-ms` to finish.
    #[arg(long, env = "EMBEDDER_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,

    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "EMBEDDER_LOG_JSON")]
    pub log_json: bool,

    /// FAULT INJECTION (tests and chaos only): extra latency added to every embedding request.
    #[arg(long, env = "EMBEDDER_FAULT_LATENCY_MS", default_value_t = 0)]
    pub fault_latency_ms: u64,

    /// FAULT INJECTION (tests and chaos only): fraction of embedding requests, 0 to 1, answered
    /// with HTTP 500.
    #[arg(long, env = "EMBEDDER_FAULT_ERROR_RATE", default_value_t = 0.0)]
    pub fault_error_rate: f64,

    /// FAULT INJECTION (tests and chaos only): standard deviation of Gaussian noise added to
    /// every component of every vector before normalisation: answers stay fast and 200, but
    /// their vectors differ from the model's (a drill for the operator's compatibility gate).
    #[arg(long, env = "EMBEDDER_FAULT_VECTOR_NOISE", default_value_t = 0.0, value_parser = non_negative)]
    pub fault_vector_noise: f32,

    /// FAULT INJECTION (tests and chaos only): wait this long before loading the default model,
    /// keeping the server unready (e.g. to exercise progress deadlines).
    #[arg(long, env = "EMBEDDER_FAULT_STARTUP_DELAY_MS", default_value_t = 0)]
    pub fault_startup_delay_ms: u64,
}

fn quantization(value: &str) -> Result<Quantization, String> {
    Quantization::from_name(value).ok_or_else(|| format!("{value:?} is not one of none, int8"))
}

fn non_negative(value: &str) -> Result<f32, String> {
    match value.parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{value:?} is not a finite number ≥ 0")),
    }
}

impl Config {
    /// The served models (name → directory) and the default one's name.
    pub fn model_catalog(&self) -> Result<(BTreeMap<String, ModelSource>, String)> {
        let mut catalog = BTreeMap::new();
        let mut first = None;
        for spec in &self.models {
            let (name, dir) = spec.split_once('=').ok_or_else(|| {
                Error::Config(format!("--model {spec:?} must look like NAME=DIR"))
            })?;
            let (name, dir) = (name.trim(), dir.trim());
            if name.is_empty() || dir.is_empty() {
                return Err(Error::Config(format!(
                    "--model {spec:?} needs both NAME and DIR"
                )));
            }
            // A known suffix sets the quantization; any other colon is part of the path.
            let (dir, quantization) = match dir.rsplit_once(':') {
                Some((path, suffix)) if !path.is_empty() => match Quantization::from_name(suffix) {
                    Some(q) => (path, q),
                    None => (dir, self.quantize),
                },
                _ => (dir, self.quantize),
            };
            let source = ModelSource {
                dir: PathBuf::from(dir),
                quantization,
            };
            if catalog.insert(name.to_string(), source).is_some() {
                return Err(Error::Config(format!("model {name:?} is given twice")));
            }
            first.get_or_insert_with(|| name.to_string());
        }
        if catalog.is_empty() {
            let dir = self.model_cache_dir().join(BUNDLED_MODEL);
            if !dir.join("config.json").exists() {
                return Err(Error::Config(format!(
                    "no --model given and the bundled model is not at {}; \
                     run embedder/models/fetch.sh or pass --model NAME=DIR",
                    dir.display()
                )));
            }
            catalog.insert(
                BUNDLED_MODEL.to_string(),
                ModelSource {
                    dir,
                    quantization: self.quantize,
                },
            );
            first = Some(BUNDLED_MODEL.to_string());
        }
        let default = match &self.default_model {
            Some(name) => name.clone(),
            None => first.unwrap_or_default(),
        };
        for alias in &self.served_model_names {
            if alias.trim().is_empty() || catalog.contains_key(alias) {
                return Err(Error::Config(format!(
                    "--served-model-name {alias:?} must be a name no --model uses"
                )));
            }
        }
        for name in &self.preload {
            if !catalog.contains_key(name) {
                return Err(Error::Config(format!(
                    "--preload {name:?} is not a configured model"
                )));
            }
        }
        Ok((catalog, default))
    }

    pub fn validate(&self) -> Result<()> {
        // The default model is never evicted: with room for one, another would be loaded
        // beside it anyway, past the limit the pod's memory was sized for.
        if self.max_models == 1 && self.models.len() > 1 {
            return Err(Error::Config(format!(
                "--max-models 1 holds only the default model, which is never evicted; serving {} models needs --max-models 2 or more",
                self.models.len()
            )));
        }
        if !(0.0..=1.0).contains(&self.fault_error_rate) {
            return Err(Error::Config(
                "--fault-error-rate must be between 0 and 1".into(),
            ));
        }
        for (flag, value) in [
            ("--max-batch-tokens", self.max_batch_tokens),
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-client-batch", self.max_client_batch),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-queued-tokens", self.max_queued_tokens),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{flag} must be at least 1")));
            }
        }
        // Zero would refuse every request (or close every reused connection) rather than
        // mean "no limit".
        for (flag, value) in [
            ("--request-timeout-ms", self.request_timeout_ms),
            ("--body-read-timeout-ms", self.body_read_timeout_ms),
            ("--idle-timeout-ms", self.idle_timeout_ms),
            ("--write-timeout-ms", self.write_timeout_ms),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{flag} must be at least 1")));
            }
        }
        // Counted by semaphores, which hold at most this many permits (beyond, tokio panics).
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        for (flag, value) in [
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-queued-tokens", self.max_queued_tokens),
        ] {
            if value > most {
                return Err(Error::Config(format!("{flag} must be at most {most}")));
            }
        }
        Ok(())
    }

    fn model_cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.model_cache {
            return dir.clone();
        }
        let cache_home = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        cache_home.join("embedroll").join("models")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("embedder").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn limits_that_would_break_the_server_are_refused() {
        for args in [
            &["--request-timeout-ms", "0"][..],
            &["--body-read-timeout-ms", "0"],
            &["--idle-timeout-ms", "0"],
            &["--write-timeout-ms", "0"],
            &["--max-concurrent-requests", "18446744073709551615"],
            &["--max-queued-tokens", "18446744073709551615"],
            &["--max-batch-tokens", "0"],
            &[
                "--max-models",
                "1",
                "--model",
                "a=/m/a",
                "--model",
                "b=/m/b",
            ],
        ] {
            let error = parse(args).validate().expect_err(args[0]).to_string();
            assert!(error.contains(args[0]), "{error}");
        }
        parse(&["--shutdown-timeout-ms", "0"])
            .validate()
            .expect("exit at once on SIGTERM is a choice");
    }

    #[test]
    fn models_and_default() {
        let config = parse(&["--model", "a=/m/a", "--model", "b=/m/b"]);
        let (catalog, default) = config.model_catalog().unwrap();
        assert_eq!(catalog.len(), 2);
        assert_eq!(default, "a");
        let config = parse(&[
            "--model",
            "a=/m/a",
            "--model",
            "b=/m/b",
            "--default-model",
            "b",
        ]);
        assert_eq!(config.model_catalog().unwrap().1, "b");
    }

    #[test]
    fn quantization_per_model_and_default() {
        let config = parse(&[
            "--model",
            "a=/m/a:int8",
            "--model",
            "b=/m/b",
            "--model",
            "c=/m/c:none",
            "--model",
            "d=/m/odd:dir",
        ]);
        let (catalog, _) = config.model_catalog().unwrap();
        let q = |name: &str| (catalog[name].dir.clone(), catalog[name].quantization);
        assert_eq!(q("a"), (PathBuf::from("/m/a"), Quantization::Int8));
        assert_eq!(q("b"), (PathBuf::from("/m/b"), Quantization::None));
        assert_eq!(q("c"), (PathBuf::from("/m/c"), Quantization::None));
        assert_eq!(q("d"), (PathBuf::from("/m/odd:dir"), Quantization::None));
        let config = parse(&[
            "--quantize",
            "int8",
            "--model",
            "a=/a",
            "--model",
            "b=/b:none",
        ]);
        let (catalog, _) = config.model_catalog().unwrap();
        assert_eq!(catalog["a"].quantization, Quantization::Int8);
        assert_eq!(catalog["b"].quantization, Quantization::None);
        let err = Config::try_parse_from(["embedder", "--quantize", "int4"]).unwrap_err();
        assert!(err.to_string().contains("none, int8"), "{err}");
    }

    #[test]
    fn bad_model_specs_are_explained() {
        for bad in ["noequals", "=dir", "name="] {
            let err = parse(&["--model", bad])
                .model_catalog()
                .unwrap_err()
                .to_string();
            assert!(err.contains("--model"), "{err}");
        }
        let err = parse(&["--model", "a=/x", "--model", "a=/y"])
            .model_catalog()
            .unwrap_err();
        assert!(err.to_string().contains("twice"));
        let err = parse(&["--model", "a=/x", "--preload", "b"])
            .model_catalog()
            .unwrap_err();
        assert!(err.to_string().contains("--preload"));
        let err = parse(&[
            "--model",
            "a=/x",
            "--model",
            "b=/y",
            "--served-model-name",
            "b",
        ])
        .model_catalog()
        .unwrap_err();
        assert!(err.to_string().contains("--served-model-name"), "{err}");
    }

    #[test]
    fn missing_bundled_model_says_how_to_fetch() {
        let config = parse(&["--model-cache", "/nonexistent"]);
        let err = config.model_catalog().unwrap_err().to_string();
        assert!(err.contains("fetch.sh"), "{err}");
    }

    #[test]
    fn fault_rate_is_bounded() {
        assert!(parse(&["--fault-error-rate", "1.5"]).validate().is_err());
        assert!(parse(&["--fault-error-rate", "0.5"]).validate().is_ok());
    }
}
