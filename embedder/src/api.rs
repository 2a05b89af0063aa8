//! HTTP API: the native `/api/v1/embed`, OpenAI-compatible `/v1/embeddings`, health, info
//! and metrics routes. Every error is JSON `{"error":{"code","message"}}` with a 4xx/5xx
//! status that says whose fault it was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::fault::Faults;
use crate::metrics::Metrics;
use crate::pooling::l2_normalize;
use crate::registry::{LookupError, Registry};

pub const NATIVE_ROUTE: &str = "/api/v1/embed";
pub const OPENAI_ROUTE: &str = "/v1/embeddings";
/// Model label for requests refused before a model was chosen (overload, bad JSON).
const NO_MODEL: &str = "";

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    pub max_client_batch: usize,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub max_batch_tokens: usize,
    pub max_queued_tokens: usize,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

/// Characters of one text kept before tokenising, per token of `max_seq_length` (TEI's
/// multiplier): no token is this long, so the tokens a truncated text gives are the same,
/// and a megabyte-long string costs the tokenizer nothing.
pub const CHARS_PER_TOKEN_CAP: usize = 250;

/// Readiness: true once the default model is warm, false again while draining.
pub struct Health {
    model_ready: AtomicBool,
    draining: AtomicBool,
    /// Set once the server stops accepting connections: bodies still arriving then are cut
    /// off, so a slow client cannot hold up shutdown.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            model_ready: AtomicBool::default(),
            draining: AtomicBool::default(),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Health {
    pub fn start_closing(&self) {
        self.closing.send_replace(true);
    }

    pub fn set_model_ready(&self) {
        self.model_ready.store(true, Ordering::SeqCst);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn status(&self) -> (&'static str, bool) {
        if self.draining.load(Ordering::SeqCst) {
            ("draining", false)
        } else if self.model_ready.load(Ordering::SeqCst) {
            ("ready", true)
        } else {
            ("loading", false)
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    /// Requests in flight (`--max-concurrent-requests`), taken once the body is read.
    pub admission: Arc<Semaphore>,
    /// Tokens in flight (`--max-queued-tokens`): the work admitted, not the requests.
    pub queued_tokens: Arc<Semaphore>,
    /// Tokenisations at once: one per compute thread, so a flood of long texts queues here
    /// instead of occupying every blocking thread.
    pub tokenizers: Arc<Semaphore>,
    pub limits: Limits,
    pub faults: Faults,
    pub health: Arc<Health>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    // The body is read (within its timeout) before admission, so a client trickling bytes
    // holds no permit; the last layer added runs first.
    let embed_routes = Router::new()
        .route(NATIVE_ROUTE, post(embed_native))
        .route(OPENAI_ROUTE, post(embed_openai))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body));
    Router::new()
        .merge(embed_routes)
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

// ---------- errors ----------

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    fn from_json(error: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match error.classify() {
            Category::Data => Self::invalid(error.to_string()),
            Category::Syntax | Category::Eof | Category::Io => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("body is not valid JSON: {error}"),
            ),
        }
    }

    fn from_body(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(status, "body_too_large", rejection.body_text())
        } else {
            Self::new(status, "invalid_body", rejection.body_text())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            (self.status, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

// ---------- the embedding pipeline shared by both routes ----------

struct EmbedJob {
    texts: Vec<String>,
    model: Option<String>,
    normalize: bool,
    /// OpenAI's `dimensions`: accepted only when it equals the model's.
    dimensions: Option<usize>,
    format: EncodingFormat,
}

struct EmbedOutput {
    vectors: Vec<Vec<f32>>,
    format: EncodingFormat,
    model: String,
    dimensions: usize,
    tokens: usize,
}

/// The route label of an embed request (only the two embed routes carry these layers).
fn embed_route(request: &Request) -> &'static str {
    if request.uri().path() == OPENAI_ROUTE {
        OPENAI_ROUTE
    } else {
        NATIVE_ROUTE
    }
}

/// Reads the whole body within `--body-read-timeout-ms` and `--max-body-bytes`: a client
/// that trickles its body is answered 408 and holds nothing while it does.
async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = embed_route(&request);
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let limit = state.limits.max_body_bytes;
    let timeout = Duration::from_millis(state.limits.body_read_timeout_ms);
    let mut closing = state.health.closing.subscribe();
    let read = tokio::select! {
        read = tokio::time::timeout(
            timeout,
            http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)),
        ) => Some(read),
        _ = closing.wait_for(|closing| *closing) => None,
    };
    let Some(read) = read else {
        let error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is stopping; the request body was not complete",
        );
        state
            .metrics
            .observe_request(NO_MODEL, route, 503, started.elapsed());
        return error.into_response();
    };
    let error = match read {
        Ok(Ok(collected)) => {
            let body = axum::body::Body::from(collected.to_bytes());
            return next.run(Request::from_parts(parts, body)).await;
        }
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        ),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes (--max-body-bytes)"),
        ),
        Ok(Err(error)) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("cannot read the request body: {error}"),
        ),
    };
    state
        .metrics
        .observe_request(NO_MODEL, route, error.status.as_u16(), started.elapsed());
    error.into_response()
}

/// Turns requests away with 429 once `--max-concurrent-requests` are in flight; the permit
/// is held until the response is ready.
async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = state.admission.clone().try_acquire_owned() else {
        let route = embed_route(&request);
        state
            .metrics
            .observe_request(NO_MODEL, route, 429, Duration::ZERO);
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "more than {} requests in flight; retry shortly",
                state.limits.max_concurrent_requests
            ),
        )
        .into_response();
    };
    next.run(request).await
}

/// Records one request's metrics exactly once: with its status when answered, or as 499
/// (client closed the request) when the client went away first, so requests abandoned
/// because the server was slow still count.
struct RequestRecord<'a> {
    metrics: &'a Metrics,
    route: &'static str,
    model: String,
    started: Instant,
    answered: bool,
}

impl RequestRecord<'_> {
    fn answer(mut self, status: StatusCode) {
        self.answered = true;
        self.metrics.observe_request(
            &self.model,
            self.route,
            status.as_u16(),
            self.started.elapsed(),
        );
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics
                .observe_request(&self.model, self.route, 499, self.started.elapsed());
        }
    }
}

/// Runs parsing, validation, model lookup, faults, tokenisation and batching, and records the
/// request's metrics whatever the outcome.
async fn serve_embed(
    state: &AppState,
    route: &'static str,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&[u8]) -> Result<EmbedJob, ApiError>,
    render: impl FnOnce(EmbedOutput) -> Response,
) -> Response {
    let _inflight = state.metrics.inflight();
    let mut record = RequestRecord {
        metrics: &state.metrics,
        route,
        model: NO_MODEL.to_string(),
        started: Instant::now(),
        answered: false,
    };
    let deadline = Duration::from_millis(state.limits.request_timeout_ms);
    let result =
        match tokio::time::timeout(deadline, embed(state, body, parse, &mut record.model)).await {
            Ok(result) => result,
            // Dropping the request drops its place in the queue: the batcher skips texts whose
            // requester is gone.
            Err(_) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "not answered within {} ms (--request-timeout-ms); retry later",
                    deadline.as_millis()
                ),
            )),
        };
    let response = match result {
        Ok(output) => render(output),
        Err(error) => {
            if error.status.is_server_error() {
                tracing::warn!(route, model = %record.model, code = error.code, error = %error.message, "request failed");
            }
            error.into_response()
        }
    };
    record.answer(response.status());
    response
}

async fn embed(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&[u8]) -> Result<EmbedJob, ApiError>,
    model_label: &mut String,
) -> Result<EmbedOutput, ApiError> {
    let body = body.map_err(ApiError::from_body)?;
    let mut job = parse(&body)?;
    // The texts are owned by the job now; the raw body goes before the request waits.
    drop(body);
    let registry = &state.registry;
    let name = job
        .model
        .take()
        .unwrap_or_else(|| registry.default_model().to_string());
    // Only served names become label values: request data must not grow series without bound.
    if registry.is_served(&name) {
        model_label.clone_from(&name);
    }
    validate(&job, &state.limits)?;

    let loaded = registry.get(&name).await.map_err(|error| match error {
        LookupError::Unknown(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "model {name:?} is not served; available: {}",
                registry.names().collect::<Vec<_>>().join(", ")
            ),
        ),
        // Details (file paths) go to the server log, not to clients.
        LookupError::LoadFailed { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            format!("model {name:?} could not be loaded; the server log says why"),
        ),
    })?;
    let info = &loaded.model.info;
    if let Some(dimensions) = job.dimensions
        && dimensions != info.dimensions
    {
        return Err(ApiError::invalid(format!(
            "dimensions {dimensions} is not supported: model {name:?} produces {}",
            info.dimensions
        )));
    }

    if state.faults.inject().await {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fault_injected",
            "error injected by --fault-error-rate",
        ));
    }

    let model = loaded.model.clone();
    let mut texts = job.texts;
    let cap = info.max_seq_length.saturating_mul(CHARS_PER_TOKEN_CAP);
    for text in &mut texts {
        if let Some((cut, _)) = text.char_indices().nth(cap) {
            text.truncate(cut);
        }
    }
    let tokenizing = state
        .tokenizers
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is stopping",
            )
        })?;
    let ids = tokio::task::spawn_blocking(move || {
        let _tokenizing = tokenizing;
        texts
            .iter()
            .map(|text| model.tokenize(text))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    let tokens: usize = ids.iter().map(Vec::len).sum();

    // Admission by work: the request's tokens, held until it is answered.
    let capacity = state.limits.max_queued_tokens;
    if tokens > capacity {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_tokens",
            format!(
                "{tokens} tokens in one request; the server takes at most {capacity} at once (--max-queued-tokens): split it"
            ),
        ));
    }
    let _work = u32::try_from(tokens)
        .ok()
        .and_then(|n| state.queued_tokens.clone().try_acquire_many_owned(n).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "{tokens} more tokens would exceed the {capacity} the server takes at once; retry shortly"
                ),
            )
        })?;

    let mut vectors = loaded.batcher.embed(ids).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "inference_failed",
            e.to_string(),
        )
    })?;
    state.faults.perturb(&mut vectors);
    if job.normalize {
        vectors.iter_mut().for_each(|v| l2_normalize(v));
    }
    Ok(EmbedOutput {
        vectors,
        format: job.format,
        model: name,
        dimensions: info.dimensions,
        tokens,
    })
}

fn validate(job: &EmbedJob, limits: &Limits) -> Result<(), ApiError> {
    if job.texts.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            "no texts to embed",
        ));
    }
    if job.texts.len() > limits.max_client_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_inputs",
            format!(
                "{} texts in one request; the limit is {} (--max-client-batch)",
                job.texts.len(),
                limits.max_client_batch
            ),
        ));
    }
    if let Some(index) = job.texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            format!("text {index} is empty"),
        ));
    }
    Ok(())
}

// ---------- native route ----------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeRequest {
    texts: Vec<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    normalize: Option<bool>,
}

#[derive(Serialize)]
struct NativeResponse {
    embeddings: Vec<Vec<f32>>,
    model: String,
    dimensions: usize,
    usage: NativeUsage,
}

#[derive(Serialize)]
struct NativeUsage {
    tokens: usize,
}

fn parse_native(body: &[u8]) -> Result<EmbedJob, ApiError> {
    let request: NativeRequest = serde_json::from_slice(body).map_err(ApiError::from_json)?;
    Ok(EmbedJob {
        texts: request.texts,
        model: request.model,
        normalize: request.normalize.unwrap_or(true),
        dimensions: None,
        format: EncodingFormat::Float,
    })
}

async fn embed_native(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_embed(&state, NATIVE_ROUTE, body, parse_native, |out| {
        Json(NativeResponse {
            embeddings: out.vectors,
            model: out.model,
            dimensions: out.dimensions,
            usage: NativeUsage { tokens: out.tokens },
        })
        .into_response()
    })
    .await
}

// ---------- OpenAI-compatible route ----------

#[derive(Deserialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Deserialize)]
struct OpenAiRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<usize>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OpenAiVector {
    Float(Vec<f32>),
    Base64(String),
}

fn parse_openai(body: &[u8]) -> Result<EmbedJob, ApiError> {
    let request: OpenAiRequest = serde_json::from_slice(body).map_err(ApiError::from_json)?;
    let texts = match request.input {
        Value::String(text) => vec![text],
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text),
                Value::Number(_) | Value::Array(_) => Err(ApiError::invalid(
                    "input: token arrays are not supported; send strings",
                )),
                _ => Err(ApiError::invalid(format!(
                    "input[{index}] must be a string"
                ))),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::invalid(
                "input must be a string or an array of strings",
            ));
        }
    };
    Ok(EmbedJob {
        texts,
        model: request.model,
        normalize: true,
        dimensions: request.dimensions,
        format: request.encoding_format.unwrap_or_default(),
    })
}

async fn embed_openai(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_embed(&state, OPENAI_ROUTE, body, parse_openai, |out| {
        let format = out.format;
        let data: Vec<Value> = out
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, vector)| {
                let embedding = match format {
                    EncodingFormat::Float => OpenAiVector::Float(vector),
                    EncodingFormat::Base64 => OpenAiVector::Base64(base64_f32(&vector)),
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Json(json!({
            "object": "list",
            "data": data,
            "model": out.model,
            "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
        }))
        .into_response()
    })
    .await
}

/// OpenAI's base64 encoding: the little-endian f32 bytes of the vector.
fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------- health, info, metrics ----------

async fn live() -> Json<Value> {
    Json(json!({"status": "alive"}))
}

async fn ready(State(state): State<AppState>) -> Response {
    let (status, ready) = state.health.status();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"status": status}))).into_response()
}

async fn info(State(state): State<AppState>) -> Json<Value> {
    let registry = &state.registry;
    let loaded = registry.loaded();
    let models: Vec<Value> = registry
        .names()
        .map(|name| match loaded.iter().find(|m| m.name == name) {
            Some(info) => json!({
                "name": name, "loaded": true, "dimensions": info.dimensions,
                "max_seq_length": info.max_seq_length, "pooling": info.pooling,
                "normalized": info.normalized,
            }),
            None => json!({"name": name, "loaded": false}),
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": {
            "git_sha": option_env!("EMBEDROLL_GIT_SHA").unwrap_or("unknown"),
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "default_model": registry.default_model(),
        "models": models,
        "limits": state.limits,
        "threads": rayon::current_num_threads(),
        "fault_injection": {
            "latency_ms": state.faults.latency.as_millis() as u64,
            "error_rate": state.faults.error_rate,
            "vector_noise": state.faults.vector_noise,
        },
    }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
