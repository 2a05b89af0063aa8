//! Whether a child the operator would apply is already in place, so a reconcile that changes
//! nothing writes nothing.
//!
//! Two tests together: every field the operator sets has the same value on the live object
//! (the apiserver adds defaults, so the desired object is compared as a subset of the live
//! one, and quantities are compared by value because the apiserver rewrites `0.5` as `500m`),
//! and the live object carries the hash of the desired one in `embedroll.dev/applied`, so a
//! field the operator stopped setting (a removed annotation) is noticed too: the hash changes.
//! Someone else's edit of an operator field (say, `kubectl edit` of the canary weight) fails
//! the first test and is put back.

use serde::Serialize;
use serde_json::Value;

use crate::revision::fnv1a64;

pub const ANNOTATION_APPLIED: &str = "embedroll.dev/applied";

/// Adds the hash of `desired` (as it is before the stamp) to its annotations; returns it.
pub fn stamp<K: kube::Resource + Serialize>(desired: &mut K) -> String {
    let bytes = serde_json::to_vec(&*desired).expect("objects serialise");
    let hash = format!("{:016x}", fnv1a64(&bytes));
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_APPLIED.to_owned(), hash.clone());
    hash
}

/// Whether `live` already holds every field of `desired` (stamp included).
pub fn in_place<K: Serialize>(desired: &K, live: &K) -> bool {
    let (Ok(desired), Ok(live)) = (serde_json::to_value(desired), serde_json::to_value(live))
    else {
        return false;
    };
    contains(&live, &desired)
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

fn contains(live: &Value, desired: &Value) -> bool {
    match (live, desired) {
        // The apiserver drops empty maps and lists, and null means "not set".
        (_, d) if is_empty(d) => is_empty(live) || live == d,
        (Value::Object(live), Value::Object(desired)) => desired
            .iter()
            .all(|(key, d)| live.get(key).map_or(is_empty(d), |l| contains(l, d))),
        (Value::Array(live), Value::Array(desired)) => {
            live.len() == desired.len() && live.iter().zip(desired).all(|(l, d)| contains(l, d))
        }
        (Value::String(l), Value::String(d)) => l == d || same_quantity(l, d),
        (Value::Number(l), Value::Number(d)) => l.as_f64() == d.as_f64(),
        (l, d) => l == d,
    }
}

/// Kubernetes quantities (`500m`, `0.5`, `1Gi`, `1024Mi`, `1e3`) by value.
fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => false,
    }
}

fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let text = text.trim();
    if !text.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '+' || c == '-') {
        return None;
    }
    for (suffix, scale) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix)
            && let Ok(value) = number.parse::<f64>()
        {
            return Some(value * scale);
        }
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    fn cm(value: Value) -> ConfigMap {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn defaults_added_by_the_apiserver_are_in_place() {
        let mut desired =
            cm(json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "data": {"k": "v"}}));
        stamp(&mut desired);
        let mut live = serde_json::to_value(&desired).unwrap();
        live["metadata"]["resourceVersion"] = json!("42");
        live["metadata"]["labels"]["added-by-someone"] = json!("y");
        live["metadata"]["managedFields"] = json!([{"manager": "x"}]);
        assert!(in_place(&desired, &cm(live)));
    }

    #[test]
    fn a_changed_field_or_a_stale_stamp_is_not_in_place() {
        let mut desired = cm(json!({"metadata": {"name": "a"}, "data": {"weight": "10"}}));
        stamp(&mut desired);
        let mut edited = serde_json::to_value(&desired).unwrap();
        edited["data"]["weight"] = json!("50");
        assert!(
            !in_place(&desired, &cm(edited)),
            "someone else's edit is put back"
        );
        // The operator stopped setting a field: same values for what it sets, other stamp.
        let mut before =
            cm(json!({"metadata": {"name": "a"}, "data": {"weight": "10", "old": "x"}}));
        stamp(&mut before);
        assert!(!in_place(&desired, &before));
        assert!(!in_place(&desired, &cm(json!({"metadata": {"name": "a"}}))));
    }

    #[test]
    fn quantities_compare_by_value_and_empty_matches_absent() {
        assert!(same_quantity("500m", "0.5"));
        assert!(same_quantity("1Gi", "1024Mi"));
        assert!(same_quantity("1e3", "1k"));
        assert!(!same_quantity("1G", "1Gi"));
        assert!(!same_quantity("http", "http2"));
        assert!(contains(
            &json!({"a": 1}),
            &json!({"a": 1, "b": {}, "c": [], "d": null})
        ));
        assert!(!contains(&json!({"a": [1, 2]}), &json!({"a": [1]})));
    }
}
