//! Hugging Face text-embeddings-inference's routes, so a client written for TEI works
//! unchanged: `POST /embed` (also at `/`, where huggingface_hub's client posts) answering a
//! bare `[[f32]]`, `POST /tokenize`, and TEI's error shape and status codes
//! (`{"error","error_type"}`: Validation 422, Tokenizer 422, Empty 400, Overloaded 429,
//! Backend 424, Unhealthy 503).

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, Dialect, serve_embed};
use crate::embed::{self, EmbedJob, EmbedOutput, Inputs};
use crate::model::{Direction, Token};

pub const EMBED_ROUTE: &str = "/embed";
pub const TOKENIZE_ROUTE: &str = "/tokenize";
/// Paths whose errors take TEI's shape.
pub const ROUTES: [&str; 3] = [EMBED_ROUTE, "/", TOKENIZE_ROUTE];

#[derive(Deserialize)]
struct EmbedRequest {
    inputs: Value,
    #[serde(default)]
    normalize: Option<bool>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<Direction>,
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    /// Not TEI's (it serves one model); lets a TEI client pick one of several.
    #[serde(default)]
    model: Option<String>,
}

fn parse_embed(body: &[u8]) -> Result<(EmbedJob, ()), ApiError> {
    let request: EmbedRequest = serde_json::from_slice(body).map_err(ApiError::from_json)?;
    let job = EmbedJob {
        model: request.model,
        normalize: request.normalize.unwrap_or(true),
        dimensions: request.dimensions,
        prompt_name: request.prompt_name,
        truncate: request.truncate,
        direction: request.truncation_direction.unwrap_or_default(),
        ..EmbedJob::new(Inputs::from_tei_json(request.inputs, "inputs")?)
    };
    Ok((job, ()))
}

fn render_embed(out: EmbedOutput, (): ()) -> Response {
    Json(out.vectors).into_response()
}

pub async fn embed(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve_embed(
        &state,
        EMBED_ROUTE,
        Dialect::Tei,
        crate::api::is_check(&headers),
        body,
        parse_embed,
        render_embed,
    )
    .await
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenizeInputs {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct TokenizeRequest {
    inputs: TokenizeInputs,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

fn yes() -> bool {
    true
}

/// The tokens of each input, untruncated, with byte offsets into the (prompted) text.
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = tokenize_body(&state, body).await;
    let (model, response) = match result {
        Ok((model, tokens)) => (model, Json(tokens).into_response()),
        Err((model, error)) => (model, error_response(error)),
    };
    state.metrics.observe_request(
        &model,
        TOKENIZE_ROUTE,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

type Tokenized = Result<(String, Vec<Vec<Token>>), (String, ApiError)>;

async fn tokenize_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Tokenized {
    let unlabelled = |error| (String::new(), error);
    let body = body.map_err(|e| unlabelled(ApiError::from_body(e)))?;
    let request: TokenizeRequest =
        serde_json::from_slice(&body).map_err(|e| unlabelled(ApiError::from_json(e)))?;
    drop(body);
    let texts = match request.inputs {
        TokenizeInputs::One(text) => vec![text],
        TokenizeInputs::Many(texts) => texts,
    };
    if texts.is_empty() || texts.iter().any(|t| t.is_empty()) {
        return Err(unlabelled(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            "`inputs` cannot be empty",
        )));
    }
    let limit = state.limits.max_client_batch;
    if texts.len() > limit {
        return Err(unlabelled(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_inputs",
            format!(
                "{} inputs in one request; the limit is {limit} (--max-client-batch)",
                texts.len()
            ),
        )));
    }
    let (name, loaded) = embed::model_for(state, request.model)
        .await
        .map_err(unlabelled)?;
    let label = |error| (name.clone(), error);
    let info = &loaded.model.info;
    let prompt = embed::prompt(info, request.prompt_name.as_deref())
        .map_err(label)?
        .cloned();
    let permit = state
        .tokenizers
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| label(embed::shutting_down()))?;
    let model = loaded.model.clone();
    let add_special_tokens = request.add_special_tokens;
    let tokens = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        texts
            .into_iter()
            .enumerate()
            .map(|(index, text)| {
                // The whole text (the body limit bounds it): /tokenize does not truncate.
                let text = embed::prompted(prompt.as_deref(), text);
                let mut tokens = model.tokens(&text, add_special_tokens).map_err(|e| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_tokens",
                        format!("input {index}: {e}"),
                    )
                })?;
                // TEI shows what each token covers in the input, not the vocabulary's spelling.
                for token in &mut tokens {
                    if let (Some(start), Some(stop)) = (token.start, token.stop)
                        && let Some(piece) = text.get(start..stop)
                    {
                        token.text = piece.to_owned();
                    }
                }
                Ok(tokens)
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| {
        label(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        ))
    })?
    .map_err(label)?;
    Ok((name, tokens))
}

/// TEI's error type for one of the server's error codes, with TEI's status for it; errors
/// TEI never gives (a body read timeout, an unknown model) keep their own status.
fn error_type(error: &ApiError) -> (&'static str, StatusCode) {
    match error.code {
        "overloaded" => ("Overloaded", StatusCode::TOO_MANY_REQUESTS),
        "empty_input" => ("Empty", StatusCode::BAD_REQUEST),
        "invalid_tokens" => ("Tokenizer", StatusCode::UNPROCESSABLE_ENTITY),
        "inference_failed" | "fault_injected" | "internal" => {
            ("Backend", StatusCode::FAILED_DEPENDENCY)
        }
        "model_unavailable" | "shutting_down" | "timeout" => {
            ("Unhealthy", StatusCode::SERVICE_UNAVAILABLE)
        }
        // TEI answers its validation errors (too many inputs or tokens) with 413.
        "too_many_inputs" | "input_too_long" | "too_many_tokens" => {
            ("Validation", StatusCode::PAYLOAD_TOO_LARGE)
        }
        "invalid_request" => ("Validation", StatusCode::UNPROCESSABLE_ENTITY),
        _ => ("Validation", error.status),
    }
}

pub fn error_response(error: ApiError) -> Response {
    let (kind, status) = error_type(&error);
    let message = match kind {
        "Validation" | "Empty" => format!("Input validation error: {}", error.message),
        "Tokenizer" => format!("tokenizer error {}", error.message),
        _ => error.message,
    };
    let body = Json(json!({"error": message, "error_type": kind}));
    if status == StatusCode::TOO_MANY_REQUESTS {
        (status, [(header::RETRY_AFTER, "1")], body).into_response()
    } else {
        (status, body).into_response()
    }
}
