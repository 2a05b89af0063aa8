//! Sentence pooling over token embeddings, as configured by `1_Pooling/config.json`.

use std::ops::Range;

use serde::Deserialize;

/// How token embeddings are reduced to one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

/// The subset of sentence-transformers' pooling config that decides the mode.
#[derive(Debug, Deserialize)]
pub struct PoolingConfig {
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
    #[serde(default)]
    pub pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pub pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_lasttoken: bool,
    /// Whether prompt tokens count in the pooled vector (sentence-transformers' default).
    #[serde(default = "yes")]
    pub include_prompt: bool,
}

fn yes() -> bool {
    true
}

impl PoolingConfig {
    /// The single supported mode this config selects. sentence-transformers can concatenate
    /// several modes; that changes the output dimension and no served model needs it, so it is
    /// refused rather than half-supported.
    pub fn mode(&self) -> Result<Pooling, String> {
        let unsupported = [
            (
                self.pooling_mode_mean_sqrt_len_tokens,
                "mean_sqrt_len_tokens",
            ),
            (self.pooling_mode_weightedmean_tokens, "weightedmean_tokens"),
            (self.pooling_mode_lasttoken, "lasttoken"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!("pooling mode {name} is not supported"));
        }
        if !self.include_prompt {
            return Err(
                "include_prompt false (pooling without the prompt's tokens) is not supported"
                    .into(),
            );
        }
        let modes: Vec<Pooling> = [
            (self.pooling_mode_cls_token, Pooling::Cls),
            (self.pooling_mode_mean_tokens, Pooling::Mean),
            (self.pooling_mode_max_tokens, Pooling::Max),
        ]
        .into_iter()
        .filter_map(|(on, mode)| on.then_some(mode))
        .collect();
        match modes.as_slice() {
            [mode] => Ok(*mode),
            [] => Err("pooling config selects no mode".to_string()),
            _ => Err("pooling config combines several modes; only one is supported".to_string()),
        }
    }
}

impl Pooling {
    /// Pools the rows `span` of `hidden` (row-major, `width` columns) into one vector.
    /// `span` holds exactly one sequence's tokens, so no mask is needed.
    pub fn pool(self, hidden: &[f32], span: Range<usize>, width: usize) -> Vec<f32> {
        let rows = hidden[span.start * width..span.end * width].chunks_exact(width);
        match self {
            Pooling::Cls => hidden[span.start * width..(span.start + 1) * width].to_vec(),
            Pooling::Mean => {
                let count = span.len().max(1) as f32;
                let mut out = vec![0f32; width];
                for row in rows {
                    out.iter_mut().zip(row).for_each(|(o, x)| *o += x);
                }
                out.iter_mut().for_each(|o| *o /= count);
                out
            }
            Pooling::Max => {
                let mut out = vec![f32::NEG_INFINITY; width];
                for row in rows {
                    out.iter_mut().zip(row).for_each(|(o, x)| *o = o.max(*x));
                }
                out
            }
        }
    }
}

/// Scales each row to unit L2 norm in place; an all-zero row stays zero.
pub fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    // Same epsilon as torch.nn.functional.normalize, which sentence-transformers uses.
    let norm = norm.max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> PoolingConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn mode_from_sentence_transformers_config() {
        let mean = r#"{"word_embedding_dimension":384,"pooling_mode_cls_token":false,"pooling_mode_mean_tokens":true}"#;
        assert_eq!(config(mean).mode(), Ok(Pooling::Mean));
        assert_eq!(
            config(r#"{"pooling_mode_cls_token":true}"#).mode(),
            Ok(Pooling::Cls)
        );
        assert!(config("{}").mode().is_err());
        assert!(
            config(r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":true}"#)
                .mode()
                .is_err()
        );
        assert!(config(r#"{"pooling_mode_lasttoken":true}"#).mode().is_err());
        let without_prompt = r#"{"pooling_mode_mean_tokens":true,"include_prompt":false}"#;
        assert!(
            config(without_prompt)
                .mode()
                .unwrap_err()
                .contains("include_prompt")
        );
    }

    #[test]
    fn pooling_reads_only_its_own_rows() {
        // two packed sequences of width 2: rows 0..2 and 2..3
        let hidden = [1f32, 2., 3., 4., 100., 100.];
        assert_eq!(Pooling::Mean.pool(&hidden, 0..2, 2), vec![2., 3.]);
        assert_eq!(Pooling::Cls.pool(&hidden, 0..2, 2), vec![1., 2.]);
        assert_eq!(Pooling::Max.pool(&hidden, 0..2, 2), vec![3., 4.]);
        assert_eq!(Pooling::Mean.pool(&hidden, 2..3, 2), vec![100., 100.]);
    }

    #[test]
    fn normalize_gives_unit_vectors_and_keeps_zero() {
        let mut v = vec![3f32, 4.];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0f32; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.; 3]);
    }
}
