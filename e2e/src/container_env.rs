//! A container's environment and command line as a real kubelet computes them: literal
//! `env`, the downward API (`fieldRef`), and `$(VAR)` expansion in `command`/`args`
//! (`$$` escapes, unknown references stay as written).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

/// What the pod knows about itself at start: the values the downward API can expose.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub pod_ip: String,
    pub host_ip: String,
    pub service_account: String,
}

impl PodFacts {
    pub fn of(pod: &Pod, pod_ip: &str, host_ip: &str) -> Self {
        let spec = pod.spec.as_ref();
        Self {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            pod_ip: pod_ip.to_string(),
            host_ip: host_ip.to_string(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        }
    }

    fn field(&self, path: &str, pod: &Pod) -> Result<String, String> {
        let meta = &pod.metadata;
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.service_account.clone(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.clone(),
            _ => {
                let lookup = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
                    path.strip_prefix(prefix)
                        .and_then(|k| k.strip_suffix("']"))
                        .map(|key| {
                            map.as_ref()
                                .and_then(|m| m.get(key))
                                .cloned()
                                .unwrap_or_default()
                        })
                };
                lookup("metadata.labels['", &meta.labels)
                    .or_else(|| lookup("metadata.annotations['", &meta.annotations))
                    .ok_or_else(|| {
                        format!("fieldRef {path:?} is not supported by the local kubelet")
                    })?
            }
        })
    }
}

/// The container's environment, in declaration order, later entries able to reference
/// earlier ones with `$(VAR)` as on a real kubelet.
pub fn environment(
    container: &Container,
    pod: &Pod,
    facts: &PodFacts,
) -> Result<Vec<(String, String)>, String> {
    let mut resolved: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => {
                let known: BTreeMap<&str, &str> = resolved
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                expand(value, &known)
            }
            (None, Some(from)) => match &from.field_ref {
                Some(field) => facts.field(&field.field_path, pod)?,
                None => {
                    return Err(format!(
                        "env {}: only value and fieldRef are supported by the local kubelet",
                        var.name
                    ));
                }
            },
            (None, None) => String::new(),
        };
        resolved.retain(|(k, _)| k != &var.name);
        resolved.push((var.name.clone(), value));
    }
    Ok(resolved)
}

/// `command` + `args` with `$(VAR)` expanded against the container's environment. The image's
/// entrypoint is the mapped binary, so a `command` only contributes its arguments.
pub fn arguments(container: &Container, env: &[(String, String)]) -> Vec<String> {
    let known: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let command = container.command.iter().flatten().skip(1);
    command
        .chain(container.args.iter().flatten())
        .map(|arg| expand(arg, &known))
        .collect()
}

/// Kubernetes' `$(VAR)` expansion: defined references are replaced, `$$` becomes `$`,
/// anything else is kept verbatim.
pub fn expand(input: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "prod", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{
                "name": "main", "image": "embedroll-embedder:v1",
                "command": ["embedder", "--listen", "$(POD_IP):$(PORT)"],
                "args": ["--model", "m=$(MODEL_DIR)", "--price", "$$5", "$(UNDEFINED)"],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "PORT", "value": "8080"},
                    {"name": "URL", "value": "http://$(POD_IP):$(PORT)/"},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "MODEL_DIR", "value": "/models/a"}
                ]
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn downward_api_and_expansion_work_as_on_a_kubelet() {
        let pod = pod();
        let facts = PodFacts::of(&pod, "127.0.0.7", "127.0.0.1");
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let env = environment(container, &pod, &facts).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("POD_IP"), "127.0.0.7");
        assert_eq!(get("URL"), "http://127.0.0.7:8080/");
        assert_eq!(get("APP"), "web");
        let args = arguments(container, &env);
        assert_eq!(
            args,
            vec![
                "--listen",
                "127.0.0.7:8080",
                "--model",
                "m=/models/a",
                "--price",
                "$5",
                "$(UNDEFINED)"
            ]
        );
    }

    #[test]
    fn unsupported_sources_are_named() {
        let mut pod = pod();
        let container = &mut pod.spec.as_mut().unwrap().containers[0];
        container.env = Some(vec![
            serde_json::from_value(json!(
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
            ))
            .unwrap(),
        ]);
        let container = container.clone();
        let facts = PodFacts::of(&pod, "127.0.0.7", "127.0.0.1");
        let err = environment(&container, &pod, &facts).unwrap_err();
        assert!(err.contains("SECRET"), "{err}");
    }

    #[test]
    fn expand_edge_cases() {
        let vars = BTreeMap::from([("A", "1")]);
        assert_eq!(expand("$(A)$(A)", &vars), "11");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("trailing $", &vars), "trailing $");
        assert_eq!(expand("$(unclosed", &vars), "$(unclosed");
        assert_eq!(expand("€$(A)€", &vars), "€1€");
    }
}
