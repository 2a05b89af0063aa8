//! Sentence pooling over token embeddings, as configured by `1_Pooling/config.json`.

use candle_core::{D, DType, Tensor};
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
#[derive(Debug, Default, Deserialize)]
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
    /// Pools `hidden` `(batch, seq, dim)` under `mask` `(batch, seq)` (1 for real tokens,
    /// 0 for padding) into `(batch, dim)`. Padding never contributes.
    pub fn apply(self, hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                // sentence-transformers clamps the token count at 1e-9; a sequence always
                // holds at least [CLS] and [SEP], so the count is never zero here.
                let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
                summed.broadcast_div(&counts)
            }
            Pooling::Max => {
                // Padding positions are pushed to a very low value so they never win the max.
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
                let penalty = ((mask.ones_like()? - &mask)? * -1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)
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
    use candle_core::Device;

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
    }

    #[test]
    fn pooling_ignores_padding() {
        let dev = Device::Cpu;
        // one sequence of 3 positions, the last one padding
        let hidden = Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 0]], &dev).unwrap();
        let mean = Pooling::Mean
            .apply(&hidden, &mask)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mean, vec![vec![2., 3.]]);
        let cls = Pooling::Cls
            .apply(&hidden, &mask)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(cls, vec![vec![1., 2.]]);
        let max = Pooling::Max
            .apply(&hidden, &mask)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(max, vec![vec![3., 4.]]);
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
