//! Renders Ingress objects of class `nginx` into an nginx configuration with ingress-nginx's
//! semantics for host/path routing and canaries. This is a test stand-in for ingress-nginx,
//! not a replacement: it implements what the e2e tests need (`canary`, `canary-weight`,
//! `canary-by-header` and `canary-by-header-value`), nothing more.
//!
//! A canary Ingress (annotation `nginx.ingress.kubernetes.io/canary: "true"`) attaches to the
//! primary Ingress with the same host and path; requests go to the canary when the header rule
//! says so (`always`, or the configured value), never when it says `never`, and otherwise with
//! probability `canary-weight`/100, drawn per request.

use std::collections::BTreeMap;
use std::fmt::Write;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressServiceBackend};

pub const CLASS: &str = "nginx";
const ANNOTATION: &str = "nginx.ingress.kubernetes.io/";

/// Everything the renderer reads, as listed from the apiserver.
#[derive(Default)]
pub struct Snapshot {
    pub ingresses: Vec<Ingress>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}

#[derive(Debug, Clone, PartialEq)]
struct Canary {
    backend: Vec<String>,
    weight: u32,
    header: Option<String>,
    header_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Route {
    host: String,
    path: String,
    exact: bool,
    primary: Vec<String>,
    canary: Option<Canary>,
}

fn annotation<'a>(ingress: &'a Ingress, name: &str) -> Option<&'a str> {
    ingress
        .metadata
        .annotations
        .as_ref()?
        .get(&format!("{ANNOTATION}{name}"))
        .map(String::as_str)
}

fn is_ours(ingress: &Ingress) -> bool {
    let class = ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref());
    let legacy = ingress
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubernetes.io/ingress.class"))
        .map(String::as_str);
    class.or(legacy) == Some(CLASS)
}

/// `ip:port` of the ready endpoints behind a Service port.
fn endpoints(snapshot: &Snapshot, namespace: &str, backend: &IngressServiceBackend) -> Vec<String> {
    let Some(service) = snapshot.services.iter().find(|s| {
        s.metadata.name.as_deref() == Some(backend.name.as_str())
            && s.metadata.namespace.as_deref() == Some(namespace)
    }) else {
        return Vec::new();
    };
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    let wanted = backend.port.as_ref();
    let service_port = ports.into_iter().flatten().find(|p| match wanted {
        Some(w) if w.number.is_some() => w.number == Some(p.port),
        Some(w) if w.name.is_some() => w.name == p.name,
        _ => true,
    });
    let Some(service_port) = service_port else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for slice in &snapshot.endpoint_slices {
        let labels = slice.metadata.labels.as_ref();
        let owner = labels.and_then(|l| l.get("kubernetes.io/service-name"));
        if owner != Some(&backend.name) || slice.metadata.namespace.as_deref() != Some(namespace) {
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name == service_port.name)
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if ready {
                out.extend(endpoint.addresses.iter().map(|a| format!("{a}:{port}")));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn routes(snapshot: &Snapshot) -> Vec<Route> {
    let mut primaries: BTreeMap<(String, String, bool), Route> = BTreeMap::new();
    let mut canaries = Vec::new();
    let mut ingresses: Vec<&Ingress> = snapshot.ingresses.iter().filter(|i| is_ours(i)).collect();
    // Oldest first, as ingress-nginx resolves conflicting primaries.
    ingresses.sort_by_key(|i| {
        (
            i.metadata.creation_timestamp.clone(),
            i.metadata.name.clone(),
        )
    });
    for ingress in ingresses {
        let namespace = ingress.metadata.namespace.as_deref().unwrap_or("default");
        let is_canary = annotation(ingress, "canary") == Some("true");
        for rule in ingress.spec.iter().flat_map(|s| s.rules.iter().flatten()) {
            let host = rule.host.clone().unwrap_or_default();
            for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
                let Some(service) = path.backend.service.as_ref() else {
                    continue;
                };
                let key = (
                    host.clone(),
                    path.path.clone().unwrap_or_else(|| "/".into()),
                    path.path_type == "Exact",
                );
                let backend = endpoints(snapshot, namespace, service);
                if is_canary {
                    let weight = annotation(ingress, "canary-weight")
                        .and_then(|w| w.trim().parse::<u32>().ok())
                        .unwrap_or(0)
                        .min(100);
                    let canary = Canary {
                        backend,
                        weight,
                        header: annotation(ingress, "canary-by-header").map(str::to_string),
                        header_value: annotation(ingress, "canary-by-header-value")
                            .map(str::to_string),
                    };
                    canaries.push((key, canary));
                } else {
                    primaries.entry(key.clone()).or_insert(Route {
                        host: key.0,
                        path: key.1,
                        exact: key.2,
                        primary: backend,
                        canary: None,
                    });
                }
            }
        }
    }
    for (key, canary) in canaries {
        // A canary without a primary for the same host and path is ignored, as in ingress-nginx.
        if let Some(route) = primaries.get_mut(&key) {
            route.canary.get_or_insert(canary);
        }
    }
    primaries.into_values().collect()
}

fn upstream(out: &mut String, name: &str, servers: &[String]) {
    let _ = writeln!(out, "  upstream {name} {{");
    if servers.is_empty() {
        // No ready endpoint: nginx needs a server; this one refuses, so clients get 502.
        let _ = writeln!(out, "    server 127.0.0.1:9 down;");
    }
    for server in servers {
        let _ = writeln!(out, "    server {server} max_fails=0;");
    }
    let _ = writeln!(out, "    keepalive 32;\n  }}");
}

/// The complete nginx.conf for `snapshot`, listening on `listen` (`ip:port`), with pid,
/// logs and temp files under `runtime_dir`.
pub fn render(snapshot: &Snapshot, listen: &str, runtime_dir: &str) -> String {
    let routes = routes(snapshot);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by embedroll's local ingress (ingress-nginx stand-in for tests).\n\
         worker_processes 1;\npid {runtime_dir}/nginx.pid;\nerror_log {runtime_dir}/error.log warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n\
         client_body_temp_path {runtime_dir}/body;\n  proxy_temp_path {runtime_dir}/proxy;\n\
         fastcgi_temp_path {runtime_dir}/fastcgi;\n  uwsgi_temp_path {runtime_dir}/uwsgi;\n\
         scgi_temp_path {runtime_dir}/scgi;\n  client_max_body_size 16m;"
    );
    let mut by_host: BTreeMap<&str, Vec<(usize, &Route)>> = BTreeMap::new();
    for (i, route) in routes.iter().enumerate() {
        upstream(&mut out, &format!("r{i}_primary"), &route.primary);
        if let Some(canary) = &route.canary {
            upstream(&mut out, &format!("r{i}_canary"), &canary.backend);
            // nginx rejects a 0% split; weight 0 (a canary Ingress between rollouts) is all primary.
            let split = match canary.weight {
                0 => "* primary;".to_owned(),
                weight => format!("{weight}% canary; * primary;"),
            };
            let _ = writeln!(
                out,
                "  split_clients \"${{request_id}}\" $r{i}_weighted {{ {split} }}"
            );
            let header_rule = match &canary.header {
                Some(header) => {
                    let variable =
                        format!("$http_{}", header.to_ascii_lowercase().replace('-', "_"));
                    match &canary.header_value {
                        Some(value) => format!(
                            "map {variable} $r{i}_header {{ default \"\"; \"{value}\" canary; }}"
                        ),
                        None => format!(
                            "map {variable} $r{i}_header {{ default \"\"; always canary; never primary; }}"
                        ),
                    }
                }
                None => format!("map \"\" $r{i}_header {{ default \"\"; }}"),
            };
            let _ = writeln!(out, "  {header_rule}");
            let _ = writeln!(
                out,
                "  map $r{i}_header $r{i}_target {{ default $r{i}_weighted; canary canary; primary primary; }}"
            );
        }
        by_host
            .entry(route.host.as_str())
            .or_default()
            .push((i, route));
    }
    let has_default_host = by_host.contains_key("");
    for (host, routes) in &by_host {
        let default = if host.is_empty() {
            " default_server"
        } else {
            ""
        };
        let name = if host.is_empty() { "_" } else { host };
        let _ = writeln!(
            out,
            "  server {{\n    listen {listen}{default};\n    server_name {name};"
        );
        for (i, route) in routes {
            let modifier = if route.exact { "= " } else { "" };
            let target = if route.canary.is_some() {
                format!("r{i}_$r{i}_target")
            } else {
                format!("r{i}_primary")
            };
            let _ = writeln!(
                out,
                "    location {modifier}{} {{\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      proxy_pass http://{target};\n    }}",
                route.path
            );
        }
        let _ = writeln!(out, "  }}");
    }
    if !has_default_host {
        let _ = writeln!(
            out,
            "  server {{\n    listen {listen} default_server;\n    return 404;\n  }}"
        );
    }
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snapshot(canary_annotations: serde_json::Value) -> Snapshot {
        let ingress = |name: &str, service: &str, annotations: serde_json::Value| -> Ingress {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
                "spec": {"ingressClassName": "nginx", "rules": [{"host": "api.example.com", "http": {"paths": [
                    {"path": "/api/v1/embed", "pathType": "Prefix",
                     "backend": {"service": {"name": service, "port": {"number": 80}}}}
                ]}}]}
            }))
            .unwrap()
        };
        let service = |name: &str| -> Service {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
            }))
            .unwrap()
        };
        let slice = |service: &str, addresses: &[(&str, bool)]| -> EndpointSlice {
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-x"), "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": addresses.iter().map(|(a, ready)| json!({"addresses": [a], "conditions": {"ready": ready}})).collect::<Vec<_>>()
            }))
            .unwrap()
        };
        Snapshot {
            ingresses: vec![
                ingress("web", "stable", json!({})),
                ingress("web-canary", "canary", canary_annotations),
            ],
            services: vec![service("stable"), service("canary")],
            endpoint_slices: vec![
                slice("stable", &[("10.88.0.2", true), ("10.88.0.3", false)]),
                slice("canary", &[("10.88.0.4", true)]),
            ],
        }
    }

    #[test]
    fn weighted_canary_splits_and_only_ready_endpoints_serve() {
        let conf = render(
            &snapshot(
                json!({"nginx.ingress.kubernetes.io/canary": "true", "nginx.ingress.kubernetes.io/canary-weight": "30"}),
            ),
            "127.0.0.1:8088",
            "/tmp/rt",
        );
        assert!(
            conf.contains("upstream r0_primary {\n    server 10.88.0.2:8080 max_fails=0;"),
            "{conf}"
        );
        assert!(
            !conf.contains("10.88.0.3"),
            "unready endpoint routed:\n{conf}"
        );
        assert!(
            conf.contains("upstream r0_canary {\n    server 10.88.0.4:8080"),
            "{conf}"
        );
        assert!(
            conf.contains(
                "split_clients \"${request_id}\" $r0_weighted { 30% canary; * primary; }"
            )
        );
        assert!(conf.contains("server_name api.example.com;"));
        assert!(conf.contains("location /api/v1/embed {"));
        assert!(conf.contains("proxy_pass http://r0_$r0_target;"));
    }

    #[test]
    fn header_rules_override_the_weight() {
        let conf = render(
            &snapshot(json!({
                "nginx.ingress.kubernetes.io/canary": "true",
                "nginx.ingress.kubernetes.io/canary-weight": "0",
                "nginx.ingress.kubernetes.io/canary-by-header": "X-Canary"
            })),
            "127.0.0.1:8088",
            "/tmp/rt",
        );
        assert!(
            conf.contains(
                "map $http_x_canary $r0_header { default \"\"; always canary; never primary; }"
            ),
            "{conf}"
        );
        assert!(conf.contains("$r0_weighted { * primary; }"));
    }

    #[test]
    fn without_the_canary_annotation_there_is_no_split() {
        let conf = render(&snapshot(json!({})), "127.0.0.1:8088", "/tmp/rt");
        assert!(!conf.contains("split_clients"), "{conf}");
        assert!(conf.contains("proxy_pass http://r0_primary;"));
        // The second Ingress for the same host and path is a conflicting primary: the older
        // one keeps the route.
        assert_eq!(conf.matches("location /api/v1/embed").count(), 1);
    }

    #[test]
    fn weights_are_clamped_and_other_classes_ignored() {
        let mut snap = snapshot(
            json!({"nginx.ingress.kubernetes.io/canary": "true", "nginx.ingress.kubernetes.io/canary-weight": "250"}),
        );
        assert!(render(&snap, "127.0.0.1:1", "/r").contains("100% canary"));
        let zero = snapshot(
            json!({"nginx.ingress.kubernetes.io/canary": "true", "nginx.ingress.kubernetes.io/canary-weight": "0"}),
        );
        let conf = render(&zero, "127.0.0.1:1", "/r");
        assert!(conf.contains("$r0_weighted { * primary; }"), "{conf}");
        for ingress in &mut snap.ingresses {
            ingress.spec.as_mut().unwrap().ingress_class_name = Some("traefik".into());
        }
        let conf = render(&snap, "127.0.0.1:1", "/r");
        assert!(!conf.contains("location /api"), "{conf}");
        assert!(conf.contains("return 404;"));
    }
}

/// The rendered configuration must be one real nginx accepts (`nginx -t`).
#[cfg(test)]
mod nginx_accepts {
    use super::*;
    use serde_json::json;

    #[test]
    fn nginx_t_accepts_the_rendered_config() {
        for weight in ["0", "10", "100"] {
            nginx_t(weight);
        }
    }

    fn nginx_t(weight: &str) {
        let dir =
            std::env::temp_dir().join(format!("embedroll-nginx-t-{}-{weight}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let snap = tests_snapshot(weight);
        let conf = render(&snap, "127.0.0.1:18099", dir.to_str().unwrap());
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|n| std::process::Command::new(n).arg("-v").output().is_ok())
            .expect("nginx is not installed; e2e/cluster deps installs it");
        let out = std::process::Command::new(nginx)
            .args(["-t", "-q", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "nginx -t at weight {weight}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tests_snapshot(weight: &str) -> Snapshot {
        let ingress = |name: &str, service: &str, annotations: serde_json::Value| -> Ingress {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
                "spec": {"ingressClassName": "nginx", "rules": [
                    {"host": "api.example.com", "http": {"paths": [
                        {"path": "/api/v1/embed", "pathType": "Prefix",
                         "backend": {"service": {"name": service, "port": {"name": "http"}}}},
                        {"path": "/v1/embeddings", "pathType": "Exact",
                         "backend": {"service": {"name": service, "port": {"number": 80}}}}]}},
                    {"http": {"paths": [{"path": "/", "pathType": "Prefix",
                         "backend": {"service": {"name": service, "port": {"number": 80}}}}]}}
                ]}
            }))
            .unwrap()
        };
        Snapshot {
            ingresses: vec![
                ingress("web", "stable", json!({})),
                ingress(
                    "web-canary",
                    "canary",
                    json!({"nginx.ingress.kubernetes.io/canary": "true",
                           "nginx.ingress.kubernetes.io/canary-weight": weight,
                           "nginx.ingress.kubernetes.io/canary-by-header": "X-Canary",
                           "nginx.ingress.kubernetes.io/canary-by-header-value": "yes"}),
                ),
            ],
            services: Vec::new(),
            endpoint_slices: Vec::new(),
        }
    }
}
