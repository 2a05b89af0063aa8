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
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::embed::{self, EmbedJob, EmbedOutput, Inputs};
use crate::fault::Faults;
use crate::metrics::Metrics;
use crate::model::Direction;
use crate::registry::Registry;
use crate::{openai, tei};

pub const NATIVE_ROUTE: &str = "/api/v1/embed";
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
    pub idle_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// Over-long inputs are truncated unless a request says `truncate: false`.
    pub auto_truncate: bool,
}

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
    /// `--served-model-name`: other names the default model answers to.
    pub aliases: Arc<Vec<String>>,
    pub faults: Faults,
    pub health: Arc<Health>,
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    // The body is read (within its timeout) before admission, so a client trickling bytes
    // holds no permit; the last layer added runs first.
    let embed_routes = Router::new()
        .route(NATIVE_ROUTE, post(embed_native))
        .route(openai::ROUTE, post(openai::embed))
        .route(tei::EMBED_ROUTE, post(tei::embed))
        // TEI serves its embed route at the root too, where huggingface_hub's client posts.
        .route("/", post(tei::embed))
        .route(tei::TOKENIZE_ROUTE, post(tei::tokenize))
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
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    pub fn from_json(error: serde_json::Error) -> Self {
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

    pub fn from_body(rejection: BytesRejection) -> Self {
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

/// The route label of a request to one of the routes these layers wrap.
fn embed_route(request: &Request) -> &'static str {
    match request.uri().path() {
        openai::ROUTE => openai::ROUTE,
        tei::EMBED_ROUTE | "/" => tei::EMBED_ROUTE,
        tei::TOKENIZE_ROUTE => tei::TOKENIZE_ROUTE,
        _ => NATIVE_ROUTE,
    }
}

/// Reads the whole body within `--body-read-timeout-ms` and `--max-body-bytes`: a client
/// that trickles its body is answered 408 and holds nothing while it does.
async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = embed_route(&request);
    let dialect = Dialect::of(request.uri().path());
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let limit = state.limits.max_body_bytes;
    let timeout = Duration::from_millis(state.limits.body_read_timeout_ms);
    let mut closing = state.health.closing.subscribe();
    let read = tokio::select! {
        // A body already complete when shutdown begins is served, not refused at random.
        biased;
        read = tokio::time::timeout(
            timeout,
            http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)),
        ) => Some(read),
        _ = closing.wait_for(|closing| *closing) => None,
    };
    let error = match read {
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is stopping; the request body was not complete",
        ),
        Some(Ok(Ok(collected))) => {
            let body = axum::body::Body::from(collected.to_bytes());
            return next.run(Request::from_parts(parts, body)).await;
        }
        Some(Err(_)) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        ),
        Some(Ok(Err(error))) if error.is::<http_body_util::LengthLimitError>() => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes (--max-body-bytes)"),
        ),
        Some(Ok(Err(error))) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("cannot read the request body: {error}"),
        ),
    };
    let response = dialect.render(error);
    observe_refused(
        &state.metrics,
        &parts.headers,
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Counts a request turned away before its handler ran: as traffic, or, marked
/// [`CHECK_HEADER`], as a rollout's check (a check refused for its size or by admission is not
/// the canary failing its users).
fn observe_refused(
    metrics: &Metrics,
    headers: &axum::http::HeaderMap,
    route: &'static str,
    code: u16,
    elapsed: Duration,
) {
    if is_check(headers) {
        metrics.observe_check(NO_MODEL, route, code);
    } else {
        metrics.observe_request(NO_MODEL, route, code, elapsed);
    }
}

/// Turns requests away with 429 once `--max-concurrent-requests` are in flight; the permit
/// is held until the response is ready.
async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = state.admission.clone().try_acquire_owned() else {
        let route = embed_route(&request);
        observe_refused(
            &state.metrics,
            request.headers(),
            route,
            429,
            Duration::ZERO,
        );
        let error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "more than {} requests in flight; retry shortly",
                state.limits.max_concurrent_requests
            ),
        );
        return Dialect::of(request.uri().path()).render(error);
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
    /// Marked [`CHECK_HEADER`]: counted apart from the traffic.
    check: bool,
}

impl RequestRecord<'_> {
    fn answer(mut self, status: StatusCode, tokens: Option<usize>) {
        self.answered = true;
        self.observe(status.as_u16());
        if let Some(tokens) = tokens.filter(|_| !self.check) {
            self.metrics.observe_tokens(&self.model, tokens);
        }
    }

    fn observe(&self, code: u16) {
        if self.check {
            self.metrics.observe_check(&self.model, self.route, code);
        } else {
            self.metrics
                .observe_request(&self.model, self.route, code, self.started.elapsed());
        }
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.observe(499);
        }
    }
}

/// Marks a request as a rollout's check rather than traffic (the operator's vector check sends
/// it to the canary and stable pods directly). Such requests are answered as any other but
/// counted in `embedder_check_requests_total` only: the canary's P95, error rate, request count
/// and tokens are what its users saw.
pub const CHECK_HEADER: &str = "x-embedroll-check";

/// Whether a request carries [`CHECK_HEADER`], whatever its value.
pub fn is_check(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(CHECK_HEADER)
}

/// The JSON shape errors take: each API's own, so its clients read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error":{"code","message"}}`: the native and OpenAI routes (OpenAI's shape).
    Native,
    /// `{"error","error_type"}` with TEI's status codes.
    Tei,
}

impl Dialect {
    fn of(path: &str) -> Self {
        if tei::ROUTES.contains(&path) {
            Dialect::Tei
        } else {
            Dialect::Native
        }
    }

    pub fn render(self, error: ApiError) -> Response {
        match self {
            Dialect::Native => error.into_response(),
            Dialect::Tei => tei::error_response(error),
        }
    }
}

/// A route's request parser: the job, and what its renderer needs besides the output.
pub type Parse<R> = fn(&[u8]) -> Result<(EmbedJob, R), ApiError>;

/// Runs an embed request through the shared pipeline, renders it in the route's dialect with
/// TEI's timing headers, and records the request's metrics whatever the outcome.
/// `parse` returns the job and what rendering needs besides the output (e.g. OpenAI's
/// `encoding_format`).
pub async fn serve_embed<R>(
    state: &AppState,
    route: &'static str,
    dialect: Dialect,
    check: bool,
    body: Result<Bytes, BytesRejection>,
    parse: Parse<R>,
    render: fn(EmbedOutput, R) -> Response,
) -> Response {
    let _inflight = state.metrics.inflight();
    let mut record = RequestRecord {
        metrics: &state.metrics,
        route,
        model: NO_MODEL.to_string(),
        started: Instant::now(),
        answered: false,
        check,
    };
    let deadline = Duration::from_millis(state.limits.request_timeout_ms);
    let run = async {
        let body = body.map_err(ApiError::from_body)?;
        let (job, extra) = parse(&body)?;
        // The inputs are owned by the job now; the raw body goes before the request waits.
        drop(body);
        Ok((embed::embed(state, job, &mut record.model).await?, extra))
    };
    let result = match tokio::time::timeout(deadline, run).await {
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
    let mut tokens = None;
    let mut failed = None;
    let response = match result {
        Ok((output, extra)) => {
            let headers = timing_headers(&output, record.started.elapsed());
            tokens = Some(output.tokens);
            (headers, render(output, extra)).into_response()
        }
        Err(error) => {
            if error.status.is_server_error() {
                tracing::warn!(route, model = %record.model, code = error.code, error = %error.message, "request failed");
                failed = Some(error.status);
            }
            dialect.render(error)
        }
    };
    // A server failure is counted as one whatever the dialect answers (TEI's 424): error
    // rates on 5xx, the rollout gate's among them, and the latency quantiles must see it.
    record.answer(failed.unwrap_or(response.status()), tokens);
    response
}

/// TEI's timing headers (integer milliseconds), so clients and proxies written for TEI see
/// where a request's time went. These are the request's own times, not per-input averages.
fn timing_headers(output: &EmbedOutput, total: Duration) -> [(&'static str, String); 8] {
    let ms = |d: Duration| d.as_millis().to_string();
    let timings = &output.timings;
    [
        ("x-compute-type", "cpu".to_string()),
        ("x-compute-time", ms(total)),
        ("x-total-time", ms(total)),
        ("x-compute-characters", output.characters.to_string()),
        ("x-compute-tokens", output.tokens.to_string()),
        ("x-tokenization-time", ms(timings.tokenization)),
        ("x-queue-time", ms(timings.batcher.queue)),
        ("x-inference-time", ms(timings.batcher.inference)),
    ]
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
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<Direction>,
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

fn parse_native(body: &[u8]) -> Result<(EmbedJob, ()), ApiError> {
    let request: NativeRequest = serde_json::from_slice(body).map_err(ApiError::from_json)?;
    let job = EmbedJob {
        model: request.model,
        normalize: request.normalize.unwrap_or(true),
        dimensions: request.dimensions,
        prompt_name: request.prompt_name,
        truncate: request.truncate,
        direction: request.truncation_direction.unwrap_or_default(),
        ..EmbedJob::new(Inputs::Texts(request.texts))
    };
    Ok((job, ()))
}

async fn embed_native(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_embed(
        &state,
        NATIVE_ROUTE,
        Dialect::Native,
        is_check(&headers),
        body,
        parse_native,
        |out, ()| {
            Json(NativeResponse {
                embeddings: out.vectors,
                model: out.model,
                dimensions: out.dimensions,
                usage: NativeUsage { tokens: out.tokens },
            })
            .into_response()
        },
    )
    .await
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
        .sources()
        .map(
            |(name, source)| match loaded.iter().find(|m| m.name == name) {
                Some(info) => json!({
                    "name": name, "loaded": true, "dimensions": info.dimensions,
                    "max_seq_length": info.max_seq_length, "pooling": info.pooling,
                    "normalized": info.normalized,
                    "prompts": info.prompts.keys().collect::<Vec<_>>(),
                    "default_prompt_name": info.default_prompt_name,
                    "quantization": info.quantization,
                    "int8_kernel": info.int8_kernel,
                    "weight_bytes": info.weight_bytes,
                }),
                None => json!({"name": name, "loaded": false, "quantization": source.quantization}),
            },
        )
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": {
            "git_sha": option_env!("EMBEDROLL_GIT_SHA").unwrap_or("unknown"),
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "default_model": registry.default_model(),
        "served_model_names": *state.aliases,
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
