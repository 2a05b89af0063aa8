//! The revision: a short stable hash of what the pods run (`template` + `model`). Replicas,
//! traffic and analysis settings are not part of it, so changing them rolls nothing.

use crate::crd::EmbeddingRolloutSpec;

pub fn revision(spec: &EmbeddingRolloutSpec) -> String {
    // serde_json writes struct fields in declaration order and k8s-openapi maps are
    // BTreeMaps, so the bytes are canonical for a given spec.
    let bytes = serde_json::to_vec(&(&spec.template, &spec.model)).expect("spec serialises");
    format!("{:010x}", fnv1a64(&bytes) & 0xff_ffff_ffff)
}

/// FNV-1a, as Kubernetes' pod-template-hash uses: stable across Rust versions and platforms,
/// unlike `std::hash`.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str, model: Option<&str>) -> EmbeddingRolloutSpec {
        serde_json::from_value(serde_json::json!({
            "replicas": 2,
            "template": {"spec": {"containers": [{"name": "embedder", "image": image}]}},
            "model": model.map(|m| serde_json::json!({"name": m})),
            "traffic": {"nginx": {}}
        }))
        .unwrap()
    }

    #[test]
    fn revision_follows_template_and_model_only() {
        let base = spec("embedder:1", Some("a"));
        assert_eq!(revision(&base), revision(&base.clone()));
        assert_eq!(revision(&base).len(), 10);
        let mut scaled = base.clone();
        scaled.replicas = 7;
        scaled.analysis.interval = "5s".into();
        assert_eq!(
            revision(&base),
            revision(&scaled),
            "replicas and analysis are not the revision"
        );
        assert_ne!(revision(&base), revision(&spec("embedder:2", Some("a"))));
        assert_ne!(revision(&base), revision(&spec("embedder:1", Some("b"))));
    }

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
