//! The embedding pipeline every embed route shares, whatever its JSON dialect (native,
//! OpenAI, TEI): model choice, prompts, input caps, tokenisation or token-id checks,
//! admission by tokens, batching, then output dimensions and normalisation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::Value;

use crate::api::{ApiError, AppState};
use crate::batcher::Timing;
use crate::model::{Direction, InputError, ModelInfo, SentenceModel, Truncation};
use crate::pooling::l2_normalize;
use crate::registry::{LoadedModel, LookupError};

/// What a request asks to embed.
pub enum Inputs {
    Texts(Vec<String>),
    /// The model's own token ids, special tokens included (as `/tokenize` gives them).
    Ids(Vec<Vec<u32>>),
    /// Texts and token ids in one list, as TEI takes them.
    Mixed(Vec<Input>),
}

/// One input of a mixed list.
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Inputs::Texts(texts) => texts.len(),
            Inputs::Ids(ids) => ids.len(),
            Inputs::Mixed(items) => items.len(),
        }
    }

    fn has_texts(&self) -> bool {
        match self {
            Inputs::Texts(_) => true,
            Inputs::Ids(_) => false,
            Inputs::Mixed(items) => items.iter().any(|i| matches!(i, Input::Text(_))),
        }
    }

    fn into_items(self) -> Vec<Input> {
        match self {
            Inputs::Texts(texts) => texts.into_iter().map(Input::Text).collect(),
            Inputs::Ids(ids) => ids.into_iter().map(Input::Ids).collect(),
            Inputs::Mixed(items) => items,
        }
    }

    /// The first input that is an empty string or an empty list of ids.
    fn first_empty(&self) -> Option<usize> {
        match self {
            Inputs::Texts(texts) => texts.iter().position(String::is_empty),
            Inputs::Ids(ids) => ids.iter().position(Vec::is_empty),
            Inputs::Mixed(items) => items.iter().position(|item| match item {
                Input::Text(text) => text.is_empty(),
                Input::Ids(ids) => ids.is_empty(),
            }),
        }
    }

    /// OpenAI's `input`: a string, a list of strings, one list of token ids or a list of
    /// them (OpenAI's API does not mix the two kinds in one list).
    pub fn from_json(input: Value, field: &str) -> Result<Self, ApiError> {
        Self::parse(input, field, false)
    }

    /// TEI's `inputs`: as OpenAI's, and strings and lists of ids may mix in one list.
    pub fn from_tei_json(input: Value, field: &str) -> Result<Self, ApiError> {
        Self::parse(input, field, true)
    }

    fn parse(input: Value, field: &str, mixing: bool) -> Result<Self, ApiError> {
        let invalid = |message: String| Err(ApiError::invalid(message));
        let items = match input {
            Value::String(text) => return Ok(Inputs::Texts(vec![text])),
            Value::Array(items) => items,
            _ => {
                return invalid(format!(
                    "{field} must be a string, a list of strings or token ids"
                ));
            }
        };
        if let Some(Value::Number(_)) = items.first() {
            return token_ids(&items, field).map(|ids| Inputs::Ids(vec![ids]));
        }
        let mut parsed = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            parsed.push(match item {
                Value::String(text) => Input::Text(text),
                Value::Array(ids) => Input::Ids(token_ids(&ids, &format!("{field}[{index}]"))?),
                _ => {
                    return invalid(format!(
                        "{field}[{index}] must be a string or a list of token ids"
                    ));
                }
            });
        }
        let texts = parsed
            .iter()
            .filter(|i| matches!(i, Input::Text(_)))
            .count();
        if !mixing && texts != 0 && texts != parsed.len() {
            let first_text = matches!(parsed[0], Input::Text(_));
            let index = parsed
                .iter()
                .position(|i| matches!(i, Input::Text(_)) != first_text)
                .unwrap_or_default();
            let kind = if first_text {
                "a string"
            } else {
                "a list of token ids"
            };
            return invalid(format!(
                "{field}[{index}] must be {kind} like the items before it"
            ));
        }
        Ok(if texts == parsed.len() {
            Inputs::Texts(
                parsed
                    .into_iter()
                    .filter_map(|i| match i {
                        Input::Text(text) => Some(text),
                        Input::Ids(_) => None,
                    })
                    .collect(),
            )
        } else if texts == 0 {
            Inputs::Ids(
                parsed
                    .into_iter()
                    .filter_map(|i| match i {
                        Input::Ids(ids) => Some(ids),
                        Input::Text(_) => None,
                    })
                    .collect(),
            )
        } else {
            Inputs::Mixed(parsed)
        })
    }
}

fn token_ids(items: &[Value], field: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "{field}[{index}] must be a token id (a whole number from 0 to 2^32-1)"
                    ))
                })
        })
        .collect()
}

/// One embed request, parsed from any route's JSON.
pub struct EmbedJob {
    pub inputs: Inputs,
    pub model: Option<String>,
    pub normalize: bool,
    /// Keep the first `dimensions` components (Matryoshka models), then normalise.
    pub dimensions: Option<usize>,
    /// A prompt of the model's `config_sentence_transformers.json`; its default when none.
    pub prompt_name: Option<String>,
    /// Truncate over-long inputs; the server's `--auto-truncate` when unset.
    pub truncate: Option<bool>,
    pub direction: Direction,
}

impl EmbedJob {
    pub fn new(inputs: Inputs) -> Self {
        Self {
            inputs,
            model: None,
            normalize: true,
            dimensions: None,
            prompt_name: None,
            truncate: None,
            direction: Direction::Right,
        }
    }
}

/// Where a request's time went: TEI's timing headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub tokenization: Duration,
    pub batcher: Timing,
}

pub struct EmbedOutput {
    pub vectors: Vec<Vec<f32>>,
    /// The name the client asked for (an alias stays an alias), else the default model's.
    pub model: String,
    pub dimensions: usize,
    pub tokens: usize,
    pub characters: usize,
    pub timings: Timings,
}

/// Runs one embed request; `model_label` is set to the model's name for metrics once known.
pub async fn embed(
    state: &AppState,
    mut job: EmbedJob,
    model_label: &mut String,
) -> Result<EmbedOutput, ApiError> {
    let requested = job
        .model
        .take()
        .unwrap_or_else(|| state.registry.default_model().to_string());
    let name = resolve(state, &requested);
    // Only served names become label values: request data must not grow series without bound.
    if state.registry.is_served(&name) {
        model_label.clone_from(&name);
    }
    validate(&job, state)?;
    let (_, loaded) = model_for(state, Some(requested.clone())).await?;
    let info = &loaded.model.info;
    let dimensions = match job.dimensions {
        None => info.dimensions,
        Some(d) if d >= 1 && d <= info.dimensions => d,
        Some(d) => {
            return Err(ApiError::invalid(format!(
                "dimensions {d} is not supported: model {name:?} gives vectors of 1 to {} dimensions",
                info.dimensions
            )));
        }
    };
    // Token ids are the whole sequence as the client wants it: a prompt applies to texts.
    let prompt = if job.inputs.has_texts() {
        prompt(info, job.prompt_name.as_deref())?
    } else if job.prompt_name.is_some() {
        return Err(ApiError::invalid(
            "prompt_name applies to texts, not to token ids",
        ));
    } else {
        None
    };

    if state.faults.inject().await {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fault_injected",
            "error injected by --fault-error-rate",
        ));
    }

    let truncation = Truncation {
        truncate: job.truncate.unwrap_or(state.limits.auto_truncate),
        direction: job.direction,
    };
    let tokenizing_started = Instant::now();
    let (ids, characters) = tokenize(
        state,
        loaded.model.clone(),
        job.inputs,
        prompt.cloned(),
        truncation,
    )
    .await?;
    let tokenization = tokenizing_started.elapsed();
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

    let (mut vectors, batcher) = loaded.batcher.embed(ids).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "inference_failed",
            e.to_string(),
        )
    })?;
    state.faults.perturb(&mut vectors);
    for vector in &mut vectors {
        vector.truncate(dimensions);
        if job.normalize {
            l2_normalize(vector);
        }
    }
    Ok(EmbedOutput {
        vectors,
        model: requested,
        dimensions,
        tokens,
        characters,
        timings: Timings {
            tokenization,
            batcher,
        },
    })
}

/// The served model a request's `model` names (an alias of the default model included).
fn resolve(state: &AppState, requested: &str) -> String {
    if state.aliases.iter().any(|alias| alias == requested) {
        state.registry.default_model().to_string()
    } else {
        requested.to_string()
    }
}

/// The model a request names (the default when none), loaded, and its served name.
pub async fn model_for(
    state: &AppState,
    requested: Option<String>,
) -> Result<(String, Arc<LoadedModel>), ApiError> {
    let registry = &state.registry;
    let name = match requested {
        Some(requested) => resolve(state, &requested),
        None => registry.default_model().to_string(),
    };
    match registry.get(&name).await {
        Ok(loaded) => Ok((name, loaded)),
        Err(LookupError::Unknown(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "model {name:?} is not served; available: {}",
                registry
                    .names()
                    .chain(state.aliases.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        // Details (file paths) go to the server log, not to clients.
        Err(LookupError::LoadFailed { .. }) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            format!("model {name:?} could not be loaded; the server log says why"),
        )),
    }
}

/// The prompt a request gets: the one it names, else the model's default, else none.
pub fn prompt<'a>(
    info: &'a ModelInfo,
    prompt_name: Option<&str>,
) -> Result<Option<&'a String>, ApiError> {
    let Some(prompt_name) = prompt_name else {
        return Ok(info
            .default_prompt_name
            .as_ref()
            .and_then(|default| info.prompts.get(default)));
    };
    info.prompts.get(prompt_name).map(Some).ok_or_else(|| {
        let known: Vec<&str> = info.prompts.keys().map(String::as_str).collect();
        ApiError::invalid(format!(
            "prompt_name {prompt_name:?} is not one of model {:?}'s prompts ({})",
            info.name,
            if known.is_empty() {
                "it has none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

pub fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the server is stopping",
    )
}

/// The text the tokenizer sees: the prompt, then the text.
pub fn prompted(prompt: Option<&str>, text: String) -> String {
    match prompt {
        Some(prompt) => format!("{prompt}{text}"),
        None => text,
    }
}

/// Characters tokenised in one turn (at least one input). A request waits for at most one
/// turn of each request ahead of it, not for all their texts: tokenising a 2 MB request takes
/// hundreds of milliseconds, a turn a few.
const TOKENIZE_TURN_CHARS: usize = 16 * 1024;

/// Token ids for every input and the characters read, on blocking threads, in turns of
/// about [`TOKENIZE_TURN_CHARS`], at most one turn per compute thread at once.
async fn tokenize(
    state: &AppState,
    model: Arc<SentenceModel>,
    inputs: Inputs,
    prompt: Option<String>,
    truncation: Truncation,
) -> Result<(Vec<Vec<u32>>, usize), ApiError> {
    let mut turns: Vec<Vec<(usize, Input)>> = Vec::new();
    let mut size = 0;
    for (index, input) in inputs.into_items().into_iter().enumerate() {
        let chars = match &input {
            Input::Text(text) => text.len(),
            Input::Ids(ids) => ids.len() * 4,
        };
        match turns.last_mut() {
            Some(turn) if size + chars <= TOKENIZE_TURN_CHARS => turn.push((index, input)),
            _ => {
                turns.push(vec![(index, input)]);
                size = 0;
            }
        }
        size += chars;
    }
    let input_error = |index: usize, error: InputError| match error {
        InputError::TooLong { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_long",
            format!("input {index}: {error}; send truncate: true or shorten it"),
        ),
        InputError::Invalid(reason) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tokens",
            format!("input {index}: {reason}"),
        ),
    };
    let done = in_turns(&state.tokenizers, turns, move |turn| {
        let mut characters = 0;
        let mut ids = Vec::with_capacity(turn.len());
        for (index, input) in turn {
            let tokens = match input {
                Input::Text(text) => {
                    let text = prompted(prompt.as_deref(), text);
                    characters += text.chars().count();
                    model.tokenize_with(&text, truncation)
                }
                Input::Ids(sent) => model.accept_ids(sent, truncation),
            };
            ids.push(tokens.map_err(|e| input_error(index, e))?);
        }
        Ok((ids, characters))
    })
    .await?;
    let characters = done.iter().map(|(_, c)| c).sum();
    Ok((
        done.into_iter().flat_map(|(ids, _)| ids).collect(),
        characters,
    ))
}

/// Runs `work` on each turn in order, on a blocking thread, holding one of `permits` for the
/// turn only: requests queued on the permits take turns instead of waiting for each other
/// whole. The first error ends it; so does the caller going away (a request timed out),
/// after the turn in progress.
async fn in_turns<T, R, F>(
    permits: &Arc<tokio::sync::Semaphore>,
    turns: Vec<T>,
    work: F,
) -> Result<Vec<R>, ApiError>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Result<R, ApiError> + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let mut done = Vec::with_capacity(turns.len());
    for turn in turns {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| shutting_down())?;
        let work = work.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(turn)
        })
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
        done.push(result);
    }
    Ok(done)
}

fn validate(job: &EmbedJob, state: &AppState) -> Result<(), ApiError> {
    let count = job.inputs.len();
    if count == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            "no inputs to embed",
        ));
    }
    let limit = state.limits.max_client_batch;
    if count > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_inputs",
            format!("{count} inputs in one request; the limit is {limit} (--max-client-batch)"),
        ));
    }
    // Whitespace alone is a text ([CLS] [SEP]), as in sentence-transformers and TEI.
    if let Some(index) = job.inputs.first_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_input",
            format!("input {index} is empty"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_request_takes_its_turn_between_a_heavy_ones() {
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let log = Arc::new(Mutex::new(Vec::new()));
        let work = |log: Arc<Mutex<Vec<String>>>| {
            move |turn: String| {
                log.lock().unwrap().push(format!("{turn} started"));
                std::thread::sleep(Duration::from_millis(50));
                log.lock().unwrap().push(format!("{turn} done"));
                Ok(())
            }
        };
        let heavy_turns = (0..4).map(|i| format!("heavy {i}")).collect();
        let heavy = tokio::spawn({
            let (permits, log) = (permits.clone(), log.clone());
            async move { in_turns(&permits, heavy_turns, work(log)).await }
        });
        // The heavy request is in its first turn.
        while !log.lock().unwrap().iter().any(|e| e == "heavy 0 started") {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        in_turns(&permits, vec!["small".to_owned()], work(log.clone()))
            .await
            .unwrap();
        heavy.await.unwrap().unwrap();
        let log = log.lock().unwrap().clone();
        let at = |entry: &str| log.iter().position(|e| e == entry).unwrap();
        assert!(
            at("small done") < at("heavy 2 started"),
            "the small request waited for the heavy one's every turn: {log:?}"
        );
    }
}
