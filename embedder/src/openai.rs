//! OpenAI's `POST /v1/embeddings`, as the official clients call it: `input` as a string, a
//! list of strings or token ids, `encoding_format` float or base64 (the Python client's
//! default), `dimensions` (truncated, then re-normalised), and `model` naming a served model
//! or a `--served-model-name` alias.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{ApiError, AppState, Dialect, serve_embed};
use crate::embed::{EmbedJob, EmbedOutput, Inputs};

pub const ROUTE: &str = "/v1/embeddings";

#[derive(Deserialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Deserialize)]
struct Request {
    input: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<usize>,
    // `user` and other fields OpenAI defines are accepted and ignored.
}

// Typed, so vectors are written as f32 (shortest round-trip digits), not widened to f64.
#[derive(Serialize)]
struct Response_ {
    object: &'static str,
    data: Vec<Embedding>,
    model: String,
    usage: Usage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

fn parse(body: &[u8]) -> Result<(EmbedJob, EncodingFormat), ApiError> {
    let request: Request = serde_json::from_slice(body).map_err(ApiError::from_json)?;
    let job = EmbedJob {
        model: request.model,
        dimensions: request.dimensions,
        ..EmbedJob::new(Inputs::from_json(request.input, "input")?)
    };
    Ok((job, request.encoding_format.unwrap_or_default()))
}

pub async fn embed(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let check = crate::api::is_check(&headers);
    serve_embed(&state, ROUTE, Dialect::Native, check, body, parse, render).await
}

fn render(out: EmbedOutput, format: EncodingFormat) -> Response {
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| Embedding {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => Vector::Float(vector),
                EncodingFormat::Base64 => Vector::Base64(base64_f32(&vector)),
            },
        })
        .collect();
    Json(Response_ {
        object: "list",
        data,
        model: out.model,
        usage: Usage {
            prompt_tokens: out.tokens,
            total_tokens: out.tokens,
        },
    })
    .into_response()
}

/// OpenAI's base64 encoding: the little-endian f32 bytes of the vector.
fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
