//! What the child caches keep of a live object: the fields this operator owns, and the few
//! facts it reads. At thousands of rollouts the caches are most of the operator's memory, and
//! a live Deployment or Service is mostly fields the apiserver defaulted or others set.
//!
//! The apiserver says which fields are ours: `metadata.managedFields` entries of our field
//! manager list them (structured-merge-diff's `fieldsV1`). Keeping exactly those is also what
//! [`crate::diff::in_place`] needs: it compares the fields we set, and a field someone else
//! took over by editing it leaves our set, so it reads as missing and is applied again.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Metadata every cached child keeps whoever owns it.
const METADATA_FACTS: [&str; 7] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
];

/// Replaces `object` by its projection on `manager`'s fields (both Apply and Update entries,
/// status subresources left out), plus the metadata facts above, `spec.replicas`, and
/// `status` without its conditions. Leaves it whole (managedFields dropped) if the projection
/// does not read back as a `K`.
pub fn keep_owned<K>(object: &mut K, manager: &str)
where
    K: kube::Resource + Serialize + DeserializeOwned,
{
    if let Some(projected) = project_object(object, manager) {
        *object = projected;
    }
    object.meta_mut().managed_fields = None;
}

fn project_object<K>(object: &K, manager: &str) -> Option<K>
where
    K: kube::Resource + Serialize + DeserializeOwned,
{
    let mut owned = Map::new();
    for entry in object.meta().managed_fields.iter().flatten() {
        if entry.manager.as_deref() != Some(manager) || entry.subresource.is_some() {
            continue;
        }
        if let Some(Value::Object(fields)) = entry.fields_v1.as_ref().map(|f| &f.0) {
            merge_sets(&mut owned, fields);
        }
    }
    let live = serde_json::to_value(object).ok()?;
    let mut kept = match project(&live, &owned) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for key in ["apiVersion", "kind"] {
        if let Some(value) = live.get(key) {
            kept.insert(key.to_owned(), value.clone());
        }
    }
    let meta = kept
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let (Value::Object(meta), Some(Value::Object(live_meta))) = (meta, live.get("metadata")) {
        for key in METADATA_FACTS {
            if let Some(value) = live_meta.get(key) {
                meta.insert(key.to_owned(), value.clone());
            }
        }
    }
    if let Some(replicas) = live.pointer("/spec/replicas") {
        let spec = kept
            .entry("spec")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(spec) = spec {
            spec.insert("replicas".to_owned(), replicas.clone());
        }
    }
    if let Some(Value::Object(status)) = live.get("status") {
        let mut status = status.clone();
        status.remove("conditions");
        kept.insert("status".to_owned(), Value::Object(status));
    }
    serde_json::from_value(Value::Object(kept)).ok()
}

/// Unions two field sets (a manager can hold an Apply and an Update entry).
fn merge_sets(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (key, sub) in from {
        match (into.get_mut(key), sub) {
            (Some(Value::Object(existing)), Value::Object(sub)) => merge_sets(existing, sub),
            (None, sub) => {
                into.insert(key.clone(), sub.clone());
            }
            _ => {}
        }
    }
}

/// The parts of `live` named by the field set `set`. An empty set owns the whole value (a
/// scalar, or an atomic list or map).
fn project(live: &Value, set: &Map<String, Value>) -> Option<Value> {
    if set.is_empty() {
        return Some(live.clone());
    }
    match live {
        Value::Object(fields) => {
            let mut kept = Map::new();
            for (key, sub) in set {
                let (Some(name), Value::Object(sub)) = (key.strip_prefix("f:"), sub) else {
                    continue;
                };
                if let Some(value) = fields.get(name).and_then(|v| project(v, sub)) {
                    kept.insert(name.to_owned(), value);
                }
            }
            Some(Value::Object(kept))
        }
        Value::Array(items) => {
            let members: Vec<(Member, &Map<String, Value>)> = set
                .iter()
                .filter_map(|(key, sub)| Some((Member::parse(key)?, sub.as_object()?)))
                .collect();
            let kept = items
                .iter()
                .enumerate()
                .filter_map(|(index, item)| {
                    let (_, sub) = members.iter().find(|(m, _)| m.matches(index, item))?;
                    // `.` alone: the item is ours as a whole.
                    if sub.keys().all(|k| k == ".") {
                        Some(item.clone())
                    } else {
                        project(item, sub)
                    }
                })
                .collect();
            Some(Value::Array(kept))
        }
        scalar => Some(scalar.clone()),
    }
}

/// How a field set names one item of a list.
enum Member {
    /// `k:{"name":"x"}`: an associative list's item by its key fields.
    Key(Map<String, Value>),
    /// `v:"x"`: a set's item by value.
    Value(Value),
    /// `i:3`: an item by index.
    Index(usize),
}

impl Member {
    fn parse(key: &str) -> Option<Self> {
        if let Some(json) = key.strip_prefix("k:") {
            serde_json::from_str(json).ok().map(Self::Key)
        } else if let Some(json) = key.strip_prefix("v:") {
            serde_json::from_str(json).ok().map(Self::Value)
        } else if let Some(index) = key.strip_prefix("i:") {
            index.parse().ok().map(Self::Index)
        } else {
            None
        }
    }

    fn matches(&self, index: usize, item: &Value) -> bool {
        match self {
            Self::Key(keys) => keys.iter().all(|(k, v)| item.get(k) == Some(v)),
            Self::Value(value) => item == value,
            Self::Index(i) => *i == index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff;
    use k8s_openapi::api::apps::v1::Deployment;
    use serde_json::json;

    const MANAGER: &str = "embedroll";

    /// A live Deployment as the apiserver returns it after our apply: defaults added, a
    /// label and a sidecar someone else added, a status.
    fn live() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "demo-blue", "namespace": "ml", "uid": "u1", "resourceVersion": "7",
                "generation": 3,
                "labels": {"app": "demo", "team": "search"},
                "annotations": {"embedroll.dev/applied": "abc", "deployment.kubernetes.io/revision": "2"},
                "managedFields": [
                    {"manager": MANAGER, "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                     "fieldsV1": {
                        "f:metadata": {"f:labels": {"f:app": {}}, "f:annotations": {"f:embedroll.dev/applied": {}}},
                        "f:spec": {
                            "f:selector": {},
                            "f:template": {
                                "f:metadata": {"f:labels": {"f:app": {}}},
                                "f:spec": {"f:containers": {
                                    "k:{\"name\":\"embedder\"}": {
                                        ".": {}, "f:name": {}, "f:image": {}, "f:args": {},
                                        "f:env": {"k:{\"name\":\"A\"}": {".": {}, "f:name": {}, "f:value": {}}},
                                        "f:resources": {"f:limits": {"f:cpu": {}}}
                                    }
                                }}
                            }
                        }
                     }},
                    {"manager": MANAGER, "operation": "Update", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:replicas": {}}}},
                    {"manager": "kubectl-edit", "operation": "Update", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:metadata": {"f:labels": {"f:team": {}}}}},
                    {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
                     "apiVersion": "apps/v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:replicas": {}}}}
                ]
            },
            "spec": {
                "replicas": 2, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
                "selector": {"matchLabels": {"app": "demo"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                "template": {
                    "metadata": {"labels": {"app": "demo"}},
                    "spec": {
                        "dnsPolicy": "ClusterFirst", "restartPolicy": "Always",
                        "containers": [
                            {"name": "sidecar", "image": "proxy:1"},
                            {"name": "embedder", "image": "embedder:2", "args": ["--port", "8080"],
                             "env": [{"name": "A", "value": "1"}, {"name": "INJECTED", "value": "x"}],
                             "imagePullPolicy": "IfNotPresent", "terminationMessagePath": "/dev/termination-log",
                             "resources": {"limits": {"cpu": "500m"}}}
                        ]
                    }
                }
            },
            "status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "observedGeneration": 3,
                       "conditions": [{"type": "Available", "status": "True", "message": "long text"}]}
        })
    }

    fn kept() -> Deployment {
        let mut deployment: Deployment = serde_json::from_value(live()).unwrap();
        keep_owned(&mut deployment, MANAGER);
        deployment
    }

    #[test]
    fn keeps_our_fields_and_the_facts_and_drops_the_rest() {
        let kept = serde_json::to_value(kept()).unwrap();
        let expected = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "demo-blue", "namespace": "ml", "uid": "u1", "resourceVersion": "7",
                "generation": 3,
                "labels": {"app": "demo"},
                "annotations": {"embedroll.dev/applied": "abc"}
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "demo"}},
                "template": {
                    "metadata": {"labels": {"app": "demo"}},
                    "spec": {"containers": [
                        {"name": "embedder", "image": "embedder:2", "args": ["--port", "8080"],
                         "env": [{"name": "A", "value": "1"}],
                         "resources": {"limits": {"cpu": "500m"}}}
                    ]}
                }
            },
            "status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "observedGeneration": 3}
        });
        assert_eq!(kept, expected);
    }

    #[test]
    fn what_we_applied_is_still_in_place_and_an_edit_of_our_field_is_not() {
        let mut desired: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "demo-blue", "namespace": "ml", "labels": {"app": "demo"},
                         "annotations": {"embedroll.dev/applied": "abc"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "demo"}},
                "template": {
                    "metadata": {"labels": {"app": "demo"}},
                    "spec": {"containers": [{"name": "embedder", "image": "embedder:2",
                        "args": ["--port", "8080"], "env": [{"name": "A", "value": "1"}],
                        "resources": {"limits": {"cpu": "0.5"}}}]}
                }
            }
        }))
        .unwrap();
        assert!(diff::in_place(&desired, &kept()));

        // Someone took the image over with `kubectl set image`: it left our set.
        let mut edited = live();
        edited["spec"]["template"]["spec"]["containers"][1]["image"] = json!("other:1");
        let ours = &mut edited["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]
            ["f:spec"]["f:containers"]["k:{\"name\":\"embedder\"}"];
        ours.as_object_mut().unwrap().remove("f:image");
        let mut edited: Deployment = serde_json::from_value(edited).unwrap();
        keep_owned(&mut edited, MANAGER);
        assert!(!diff::in_place(&desired, &edited));

        desired.spec.as_mut().unwrap().replicas = Some(3);
        assert!(!diff::in_place(&desired, &kept()));
    }

    #[test]
    fn an_object_without_our_entries_keeps_only_the_facts() {
        let mut live = live();
        live["metadata"]["managedFields"] = json!([]);
        let mut deployment: Deployment = serde_json::from_value(live).unwrap();
        keep_owned(&mut deployment, MANAGER);
        // spec.selector and template are required in a Deployment: the projection does not
        // read back, so the object is kept whole (less its managedFields).
        assert!(deployment.metadata.managed_fields.is_none());
        assert_eq!(
            deployment.spec.as_ref().unwrap().revision_history_limit,
            Some(10)
        );
    }
}
