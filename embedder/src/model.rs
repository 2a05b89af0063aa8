//! A sentence-embedding model loaded from a Hugging Face / sentence-transformers directory.
//!
//! Layout read: `config.json` (BERT family), `tokenizer.json`, `model.safetensors` (or
//! `pytorch_model.bin`), and when present `modules.json`, `sentence_bert_config.json`
//! (max_seq_length, do_lower_case), `config_sentence_transformers.json` (prompts,
//! default_prompt_name) and the pooling module's `config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;
use tokenizers::{
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
    utils::padding::PaddingParams,
};

use crate::bert::{BertEncoder, Pass, Quantization};
use crate::error::{Error, Result};
use crate::pooling::{Pooling, PoolingConfig};

/// What the server needs to know about a model without touching its weights.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub dimensions: usize,
    pub max_seq_length: usize,
    pub pooling: Pooling,
    /// The model's own pipeline ends in a Normalize module.
    pub normalized: bool,
    /// Named prompts prepended to texts (sentence-transformers' `prompts`).
    pub prompts: BTreeMap<String, String>,
    /// The prompt used when a request names none.
    pub default_prompt_name: Option<String>,
    pub quantization: Quantization,
    /// The int8 matrix kernel multiplying its layers, if quantized.
    pub int8_kernel: Option<&'static str>,
    /// Memory held by its weights.
    pub weight_bytes: usize,
}

#[cfg(test)]
impl ModelInfo {
    pub fn for_tests(name: &str) -> Self {
        Self {
            name: name.to_string(),
            dimensions: 4,
            max_seq_length: 8,
            pooling: Pooling::Mean,
            normalized: true,
            prompts: BTreeMap::new(),
            default_prompt_name: None,
            quantization: Quantization::None,
            int8_kernel: None,
            weight_bytes: 1000,
        }
    }
}

pub struct SentenceModel {
    pub info: ModelInfo,
    /// Truncating at `max_seq_length`, keeping the start of a text (the default) ...
    keep_start: Tokenizer,
    /// ... or its end.
    keep_end: Tokenizer,
    /// Not truncating: for `/tokenize` and for counting what truncation would cut.
    whole: Tokenizer,
    lowercase_input: bool,
    vocab_size: usize,
    bert: BertEncoder,
}

/// Which end of an over-long text is cut (TEI's `truncation_direction`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Direction {
    /// Cut the end: keep the start.
    #[default]
    #[serde(alias = "right", alias = "RIGHT")]
    Right,
    /// Cut the start: keep the end.
    #[serde(alias = "left", alias = "LEFT")]
    Left,
}

/// How a text longer than `max_seq_length` tokens is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    /// Cut it to `max_seq_length` (sentence-transformers' behaviour); otherwise refuse it.
    pub truncate: bool,
    pub direction: Direction,
}

impl Default for Truncation {
    fn default() -> Self {
        Self {
            truncate: true,
            direction: Direction::Right,
        }
    }
}

/// Why one input cannot be embedded: the request's fault, answered with a 4xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error(
        "{tokens} tokens is more than the model's {max} (max_seq_length) and truncation is off"
    )]
    TooLong { tokens: usize, max: usize },
    #[error("{0}")]
    Invalid(String),
}

/// Characters of a text read before tokenising, per token of `max_seq_length` (TEI's
/// multiplier): see [`SentenceModel::tokenize_with`].
pub const CHARS_PER_TOKEN: usize = 250;

/// The end of `text` truncation keeps, at least `chars` characters of it, ending (or, kept
/// from the end, starting) at whitespace; the whole text when it is no longer or has no
/// whitespace to cut at.
fn piece_of(text: &str, chars: usize, direction: Direction) -> &str {
    match direction {
        Direction::Right => {
            let Some((cut, _)) = text.char_indices().nth(chars) else {
                return text;
            };
            match text[cut..].find(char::is_whitespace) {
                Some(space) => &text[..cut + space],
                None => text,
            }
        }
        Direction::Left => {
            let count = text.chars().count();
            if count <= chars {
                return text;
            }
            let cut = text
                .char_indices()
                .nth(count - chars)
                .map_or(text.len(), |(i, _)| i);
            let space = if text[cut..].starts_with(char::is_whitespace) {
                Some(cut)
            } else {
                text[..cut].rfind(char::is_whitespace)
            };
            space.map_or(text, |space| &text[space..])
        }
    }
}

/// Maps byte offsets into `text.to_lowercase()` (what a `do_lower_case` model tokenises)
/// back to `text`: lowercasing can change a character's length (`İ` 2 → 3 bytes, the
/// Kelvin sign 3 → 1).
struct LowercaseOffsets {
    /// Per character of `text`: where its lowercase starts, and where it starts in `text`.
    starts: Vec<(usize, usize)>,
    len: usize,
}

impl LowercaseOffsets {
    fn new(text: &str) -> Self {
        let mut lower = 0;
        let starts = text
            .char_indices()
            .map(|(at, c)| {
                let start = (lower, at);
                // `str::to_lowercase` differs from this per-character form only for a final
                // sigma, which is as long either way.
                lower += c.to_lowercase().map(char::len_utf8).sum::<usize>();
                start
            })
            .collect();
        Self {
            starts,
            len: text.len(),
        }
    }

    /// The characters of `text` whose lowercase covers `start..stop`.
    fn span(&self, start: usize, stop: usize) -> (usize, usize) {
        let first = self.starts.partition_point(|&(lower, _)| lower <= start);
        let from = first.checked_sub(1).map_or(0, |i| self.starts[i].1);
        let after = self.starts.partition_point(|&(lower, _)| lower < stop);
        let to = self.starts.get(after).map_or(self.len, |&(_, at)| at);
        (from, to.max(from))
    }
}

/// One token of a text, as `/tokenize` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub special: bool,
    /// Byte offsets of the token in the input; none for special tokens.
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
struct SentenceTransformersConfig {
    #[serde(default)]
    prompts: BTreeMap<String, String>,
    #[serde(default)]
    default_prompt_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// Which sentence-transformers modules follow the transformer.
struct Pipeline {
    pooling_dir: Option<PathBuf>,
    normalized: bool,
}

impl SentenceModel {
    /// What can be checked without reading the weights: the configs parse, the model type
    /// and pipeline are supported, a tokenizer and a weights file are there. The registry
    /// runs it before it evicts a model to make room, so that a broken model never costs a
    /// healthy one its place.
    pub fn preflight(name: &str, dir: &Path) -> Result<()> {
        let config: BertConfig = read_json(name, &dir.join("config.json"))?;
        if let Some(other) = config.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(Error::UnsupportedModel {
                model: name.to_string(),
                reason: format!("model_type {other:?} is not served; only BERT-family models are"),
            });
        }
        read_pipeline(name, dir)?;
        let missing = |path: std::path::PathBuf, what: &str| Error::ModelFile {
            model: name.to_string(),
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()),
        };
        if !dir.join("tokenizer.json").exists() {
            return Err(missing(
                dir.join("tokenizer.json"),
                "tokenizer.json is required",
            ));
        }
        if !dir.join("model.safetensors").exists() && !dir.join("pytorch_model.bin").exists() {
            return Err(missing(
                dir.join("model.safetensors"),
                "neither model.safetensors nor pytorch_model.bin exists",
            ));
        }
        Ok(())
    }

    pub fn load(name: &str, dir: &Path, quantization: Quantization) -> Result<Self> {
        let device = Device::Cpu;
        let err_config = |path: &Path, reason: String| Error::ModelConfig {
            model: name.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let unsupported = |reason: String| Error::UnsupportedModel {
            model: name.to_string(),
            reason,
        };

        let config_path = dir.join("config.json");
        let config: BertConfig = read_json(name, &config_path)?;
        match config.model_type.as_deref() {
            None | Some("bert") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "model_type {other:?} is not served; only BERT-family models are"
                )));
            }
        }

        let pipeline = read_pipeline(name, dir)?;
        let pooling = match &pipeline.pooling_dir {
            Some(pooling_dir) => {
                let path = pooling_dir.join("config.json");
                let pooling: PoolingConfig = read_json(name, &path)?;
                pooling.mode().map_err(|reason| err_config(&path, reason))?
            }
            None => {
                tracing::warn!(model = name, "no pooling config found; using mean pooling");
                Pooling::Mean
            }
        };

        let st_config_path = dir.join("sentence_bert_config.json");
        let st_config: SentenceBertConfig = if st_config_path.exists() {
            read_json(name, &st_config_path)?
        } else {
            SentenceBertConfig::default()
        };
        let max_seq_length = st_config
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        if max_seq_length < 2 {
            return Err(err_config(
                &st_config_path,
                "max_seq_length must be at least 2".into(),
            ));
        }

        let st_path = dir.join("config_sentence_transformers.json");
        let prompts: SentenceTransformersConfig = if st_path.exists() {
            read_json(name, &st_path)?
        } else {
            SentenceTransformersConfig::default()
        };
        if let Some(default) = &prompts.default_prompt_name
            && !prompts.prompts.contains_key(default)
        {
            return Err(err_config(
                &st_path,
                format!("default_prompt_name {default:?} is not one of its prompts"),
            ));
        }

        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::ModelFile {
                model: name.to_string(),
                path: tokenizer_path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer.json is required",
                ),
            });
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| err_config(&tokenizer_path, e.to_string()))?;
        // tokenizer.json often carries the training-time settings (fixed padding to 128,
        // truncation at 128); sentence-transformers truncates at max_seq_length and pads per
        // batch, so both are replaced. Padding is done by the batcher, per forward pass.
        tokenizer.with_padding(None::<PaddingParams>);
        tokenizer
            .with_truncation(None)
            .map_err(|e| err_config(&tokenizer_path, e.to_string()))?;
        let truncating = |direction| {
            let mut truncating = tokenizer.clone();
            truncating
                .with_truncation(Some(TruncationParams {
                    max_length: max_seq_length,
                    strategy: TruncationStrategy::LongestFirst,
                    stride: 0,
                    direction,
                }))
                .map_err(|e| err_config(&tokenizer_path, e.to_string()))?;
            Ok::<_, Error>(truncating)
        };
        let keep_start = truncating(TruncationDirection::Right)?;
        let keep_end = truncating(TruncationDirection::Left)?;

        let vb = load_weights(name, dir, &device)?;
        let bert = BertEncoder::load(vb, &config, quantization).map_err(|e| {
            unsupported(format!(
                "weights do not match a BERT model with this config.json: {e}"
            ))
        })?;

        Ok(Self {
            info: ModelInfo {
                name: name.to_string(),
                dimensions: config.hidden_size,
                max_seq_length,
                pooling,
                normalized: pipeline.normalized,
                prompts: prompts.prompts,
                default_prompt_name: prompts.default_prompt_name,
                quantization,
                int8_kernel: (quantization == Quantization::Int8)
                    .then(|| embedroll_int8::selected().name()),
                weight_bytes: bert.weight_bytes(),
            },
            keep_start,
            keep_end,
            whole: tokenizer,
            lowercase_input: st_config.do_lower_case,
            vocab_size: config.vocab_size,
            bert,
        })
    }

    /// Token ids for one text, with special tokens, truncated at `max_seq_length` (keeping
    /// its start).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenize_with(text, Truncation::default())
            .map_err(|e| Error::Tokenizer {
                model: self.info.name.clone(),
                reason: e.to_string(),
            })
    }

    /// Token ids for one text, with special tokens, truncated (or refused) as asked.
    ///
    /// A long text is tokenised from the end truncation keeps, [`CHARS_PER_TOKEN`] characters
    /// per token of `max_seq_length` at first, so a megabyte of text costs the tokenizer no
    /// more than the tokens kept. The piece read ends at whitespace, where the tokens of a
    /// piece are the text's own; if it gives too few tokens (WordPiece makes a word of over
    /// 100 characters one `[UNK]`), a piece four times as long is read, up to the whole text.
    pub fn tokenize_with(
        &self,
        text: &str,
        truncation: Truncation,
    ) -> Result<Vec<u32>, InputError> {
        let tokenizer = match truncation.direction {
            Direction::Right => &self.keep_start,
            Direction::Left => &self.keep_end,
        };
        let mut window = self.info.max_seq_length.saturating_mul(CHARS_PER_TOKEN);
        loop {
            let piece = piece_of(text, window, truncation.direction);
            let encoding = self.encode(tokenizer, piece, true)?;
            let overflowing = !encoding.get_overflowing().is_empty();
            if overflowing && !truncation.truncate {
                // Rare (the request fails); the whole text counted for the message.
                let tokens = self.encode(&self.whole, text, true)?.len();
                return Err(InputError::TooLong {
                    tokens,
                    max: self.info.max_seq_length,
                });
            }
            if overflowing || piece.len() == text.len() {
                let ids = encoding.get_ids().to_vec();
                self.check_ids(&ids)?;
                return Ok(ids);
            }
            window = window.saturating_mul(4);
        }
    }

    /// Token ids a client sent itself (the model's own ids, special tokens included, as
    /// `/tokenize` gives them): checked against the vocabulary and truncated as asked.
    pub fn accept_ids(
        &self,
        mut ids: Vec<u32>,
        truncation: Truncation,
    ) -> Result<Vec<u32>, InputError> {
        let max = self.info.max_seq_length;
        if ids.len() > max {
            if !truncation.truncate {
                return Err(InputError::TooLong {
                    tokens: ids.len(),
                    max,
                });
            }
            match truncation.direction {
                Direction::Right => ids.truncate(max),
                Direction::Left => {
                    ids.drain(..ids.len() - max);
                }
            }
        }
        self.check_ids(&ids)?;
        Ok(ids)
    }

    /// The tokens of one text as the model sees them, without truncation: for `/tokenize`.
    /// Offsets are into `text` itself, also when the model lowercases it first.
    pub fn tokens(&self, text: &str, add_special_tokens: bool) -> Result<Vec<Token>, InputError> {
        let encoding = self.encode(&self.whole, text, add_special_tokens)?;
        let specials = encoding.get_special_tokens_mask();
        let to_text = self.lowercase_input.then(|| LowercaseOffsets::new(text));
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(specials)
            .map(|(((&id, token), &(start, stop)), &special)| {
                let special = special == 1;
                let (start, stop) = match &to_text {
                    Some(map) => map.span(start, stop),
                    None => (start, stop),
                };
                Token {
                    id,
                    text: token.clone(),
                    special,
                    start: (!special).then_some(start),
                    stop: (!special).then_some(stop),
                }
            })
            .collect())
    }

    fn encode(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<tokenizers::Encoding, InputError> {
        let encoded = if self.lowercase_input {
            tokenizer.encode(text.to_lowercase(), add_special_tokens)
        } else {
            tokenizer.encode(text, add_special_tokens)
        };
        encoded.map_err(|e| InputError::Invalid(format!("tokenizer failed: {e}")))
    }

    // Checked per text, so a text the model cannot take fails its own request with a 4xx
    // instead of the forward pass it would share with other requests.
    fn check_ids(&self, ids: &[u32]) -> Result<(), InputError> {
        if ids.is_empty() {
            return Err(InputError::Invalid("the text produced no tokens".into()));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(InputError::Invalid(format!(
                "token id {id} is outside the model's vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(())
    }

    /// Pooled, not yet normalised, embeddings for a batch of tokenised texts, in input order.
    /// Texts are packed without padding, so batching texts of any lengths together costs
    /// nothing extra.
    pub fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut pass = self.begin(batch)?;
        while !self.step(&mut pass) {}
        Ok(self.pool(pass))
    }

    /// Starts a forward pass to run layer by layer ([`step`](Self::step), then
    /// [`pool`](Self::pool)).
    pub fn begin(&self, batch: &[&[u32]]) -> Result<Pass> {
        if let Some(empty) = batch.iter().position(|ids| ids.is_empty()) {
            return Err(Error::Inference(candle_core::Error::Msg(format!(
                "text {empty} has no tokens"
            ))));
        }
        Ok(self.bert.begin(batch)?)
    }

    /// Runs the pass's next layer; true once it is done.
    pub fn step(&self, pass: &mut Pass) -> bool {
        self.bert.step(pass)
    }

    /// The pooled vectors of a finished pass.
    pub fn pool(&self, pass: Pass) -> Vec<Vec<f32>> {
        let (hidden, spans) = pass.into_hidden();
        let width = self.info.dimensions;
        spans
            .into_iter()
            .map(|span| self.info.pooling.pool(&hidden, span, width))
            .collect()
    }

    /// Layers of the encoder: the steps of one pass.
    pub fn layers(&self) -> usize {
        self.bert.layers()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(model: &str, path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| Error::ModelFile {
        model: model.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::ModelConfig {
        model: model.to_string(),
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_pipeline(model: &str, dir: &Path) -> Result<Pipeline> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        let default_pooling = dir.join("1_Pooling");
        return Ok(Pipeline {
            pooling_dir: default_pooling.is_dir().then_some(default_pooling),
            normalized: false,
        });
    }
    let modules: Vec<ModuleEntry> = read_json(model, &modules_path)?;
    let mut pipeline = Pipeline {
        pooling_dir: None,
        normalized: false,
    };
    for module in modules {
        let kind = module.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Pooling" => pipeline.pooling_dir = Some(dir.join(&module.path)),
            "Normalize" => pipeline.normalized = true,
            other => {
                return Err(Error::UnsupportedModel {
                    model: model.to_string(),
                    reason: format!(
                        "modules.json uses module type {other}, which is not supported"
                    ),
                });
            }
        }
    }
    Ok(pipeline)
}

fn load_weights(model: &str, dir: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let safetensors = dir.join("model.safetensors");
    let pytorch = dir.join("pytorch_model.bin");
    let invalid = |path: &Path, e: candle_core::Error| Error::ModelConfig {
        model: model.to_string(),
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if safetensors.exists() {
        // SAFETY: the weights file is memory-mapped read-only; the server never writes to
        // model directories, and an operator replacing files under a running server is
        // outside what any mmap-based loader (TEI, candle) can defend against.
        unsafe { VarBuilder::from_mmaped_safetensors(&[&safetensors], DType::F32, device) }
            .map_err(|e| invalid(&safetensors, e))
    } else if pytorch.exists() {
        VarBuilder::from_pth(&pytorch, DType::F32, device).map_err(|e| invalid(&pytorch, e))
    } else {
        Err(Error::ModelFile {
            model: model.to_string(),
            path: safetensors,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor pytorch_model.bin exists",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_ends_at_whitespace_and_holds_at_least_what_was_asked() {
        let text = "one two three four";
        assert_eq!(piece_of(text, 100, Direction::Right), text);
        assert_eq!(piece_of(text, 5, Direction::Right), "one two");
        assert_eq!(piece_of(text, 3, Direction::Right), "one");
        assert_eq!(piece_of(text, 5, Direction::Left), " four");
        assert_eq!(piece_of(text, 6, Direction::Left), " three four");
        // Nowhere to cut: the whole text.
        assert_eq!(piece_of("abcdef", 2, Direction::Right), "abcdef");
        assert_eq!(piece_of("abcdef", 2, Direction::Left), "abcdef");
        // Characters, not bytes.
        assert_eq!(piece_of("éé éé éé", 4, Direction::Right), "éé éé");
        assert_eq!(piece_of("éé éé éé", 4, Direction::Left), " éé éé");
    }

    #[test]
    fn lowercase_offsets_map_back_to_the_text() {
        for text in ["İx Ab", "\u{212A}elvin HELLO", "plain text", "ΣΑΣ σ"] {
            let lower = text.to_lowercase();
            let map = LowercaseOffsets::new(text);
            // Every character's lowercase maps back to that character.
            let mut at = 0;
            for c in text.chars() {
                let len: usize = c.to_lowercase().map(char::len_utf8).sum();
                let (start, stop) = map.span(at, at + len);
                assert_eq!(&text[start..stop], c.to_string(), "{text:?}");
                at += len;
            }
            assert_eq!(at, lower.len(), "{text:?}");
            assert_eq!(map.span(0, lower.len()), (0, text.len()));
        }
    }
}
