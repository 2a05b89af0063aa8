//! Rollout scenarios on the local real cluster: real kube-apiserver, real embedder pods run by
//! the local kubelet, Traefik as the data plane (its ingress-nginx provider), real Prometheus,
//! and the operator binary, with traffic through Traefik during every rollout. Run by
//! `e2e/scenarios.sh` (cluster up, then
//! `cargo test -p embedroll-e2e --test rollouts -- --test-threads=1`), which sets:
//! KUBECONFIG, PROMETHEUS_URL, INGRESS_URL, TRAEFIK_API_URL, EMBEDROLL_BIN_DIR (operator and CLI binaries),
//! EMBEDROLL_CLUSTER (the e2e/cluster script), EMBEDROLL_E2E_LOGS.
//!
//! Analysis intervals are seconds instead of minutes; the logic is the same.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use embedroll_operator::conditions;
use embedroll_operator::crd::{
    CompatibilityResult, CompatibilityStage, EmbeddingRollout, EmbeddingRolloutStatus, Phase,
};
use embedroll_operator::resources::{
    ANNOTATION_CANARY_WEIGHT, FIELD_MANAGER, LABEL_COLOR, LABEL_ROLLOUT,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const OPERATOR_METRICS: &str = "127.0.0.1:18181";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; run e2e/scenarios.sh"))
}

fn say(scenario: &str, message: impl AsRef<str>) {
    println!("scenario {scenario}: {}", message.as_ref());
}

// ------------------------------------------------------------------ operator process

static OPERATOR: Mutex<Option<Child>> = Mutex::new(None);
static STALE_REMOVED: std::sync::Once = std::sync::Once::new();

fn start_operator() {
    // An operator left by an interrupted earlier run would hold the Lease and the port.
    STALE_REMOVED.call_once(|| {
        let pattern = format!("embedroll-operator --metrics-listen {OPERATOR_METRICS}");
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut slot = OPERATOR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(child) = slot.as_mut()
        && child.try_wait().ok().flatten().is_none()
    {
        return;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{}/operator.log", env("EMBEDROLL_E2E_LOGS")))
        .expect("operator log");
    let child = Command::new(format!("{}/embedroll-operator", env("EMBEDROLL_BIN_DIR")))
        .args([
            "--metrics-listen",
            OPERATOR_METRICS,
            "--prometheus-url",
            &env("PROMETHEUS_URL"),
        ])
        .args(["--lease-namespace", "default"])
        .env("RUST_LOG", "info,embedroll_operator=debug")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start embedroll-operator");
    *slot = Some(child);
}

/// The operator's reconcile latency (from its own histogram) and memory, for the record.
async fn operator_report() -> String {
    let pid = OPERATOR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(Child::id);
    let memory = pid
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let Ok(response) = reqwest::get(format!("http://{OPERATOR_METRICS}/metrics")).await else {
        return format!("operator memory: {memory}; metrics unreachable");
    };
    let text = response.text().await.unwrap_or_default();
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest =
                l.strip_prefix("embedroll_operator_reconcile_duration_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = value("embedroll_operator_reconcile_duration_seconds_count").unwrap_or(0.0);
    let sum = value("embedroll_operator_reconcile_duration_seconds_sum").unwrap_or(0.0);
    // histogram_quantile's linear interpolation within the bucket that holds the rank.
    let quantile = |q: f64| -> f64 {
        let rank = q * count;
        let mut lower = (0.0, 0.0);
        for &(le, cumulative) in &buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let width = cumulative - lower.1;
                let within = if width > 0.0 {
                    (rank - lower.1) / width
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * within;
            }
            lower = (le, cumulative);
        }
        f64::NAN
    };
    format!(
        "operator: {count} reconciles, mean {:.1} ms, p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; memory {memory}",
        if count > 0.0 {
            1000.0 * sum / count
        } else {
            f64::NAN
        },
        1000.0 * quantile(0.5),
        1000.0 * quantile(0.95),
        1000.0 * quantile(0.99),
    )
}

/// SIGKILL: no chance to release the Lease or finish a reconcile.
fn kill_operator() {
    let mut slot = OPERATOR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut child) = slot.take() {
        child.kill().expect("kill operator");
        child.wait().expect("reap operator");
    }
}

/// Runs `program` and returns its stdout and stderr; a failure fails the test with them.
fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{program} {args:?} failed: {text}");
    text
}

fn cli(args: &[&str]) -> String {
    run_ok(&format!("{}/embedroll", env("EMBEDROLL_BIN_DIR")), args)
}

fn kubectl(args: &[&str]) -> String {
    run_ok("kubectl", args)
}

// ------------------------------------------------------------------ cluster helpers

async fn client() -> Client {
    // reqwest's rustls has no built-in provider in this workspace (see operator/Cargo.toml);
    // every scenario builds this client before any HTTP client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default()
        .await
        .expect("kube client from KUBECONFIG")
}

/// A fresh namespace per scenario.
async fn namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(name).await.unwrap().is_some() {
        let _ = namespaces.delete(name, &DeleteParams::default()).await;
        wait_for(
            &format!("namespace {name} deleted"),
            Duration::from_secs(120),
            || async { namespaces.get_opt(name).await.unwrap().is_none() },
        )
        .await;
    }
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn host(scenario: &str) -> String {
    format!("{scenario}.e2e.local")
}

/// An EmbeddingRollout with one pod per color, fast analysis, and `extra_args` for the
/// embedder (fault flags make a bad revision).
fn rollout_manifest(name: &str, extra_args: &[&str], spec_patch: Value) -> Value {
    let mut args = vec!["--listen", "0.0.0.0:8080", "--threads", "1"];
    args.extend_from_slice(extra_args);
    let mut manifest = json!({
        "apiVersion": "embedroll.dev/v1alpha1",
        "kind": "EmbeddingRollout",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "model": {"name": "all-MiniLM-L6-v2", "dimensions": 384},
            "template": {"spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "embedder",
                    "image": "ghcr.io/embedroll/embedroll-embedder:e2e",
                    "args": args,
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/health/ready", "port": "http"}, "periodSeconds": 1}
                }]
            }},
            "traffic": {"nginx": {"host": host(name), "paths": ["/api/v1/embed"]}},
            "strategy": {"scaleDownDelaySeconds": 5, "progressDeadlineSeconds": 120},
            "analysis": {
                "interval": "2s",
                "failureLimit": 1,
                "minRequests": 3,
                "metrics": [
                    {"name": "p95-latency", "preset": "LatencyP95", "max": "100ms"},
                    {"name": "error-rate", "preset": "ErrorRate", "max": "0.05"}
                ]
            }
        }
    });
    merge(&mut manifest["spec"], spec_patch);
    manifest
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

async fn apply(client: &Client, ns: &str, manifest: &Value) {
    let api: Api<EmbeddingRollout> = Api::namespaced(client.clone(), ns);
    let name = manifest["metadata"]["name"].as_str().unwrap();
    api.patch(
        name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(manifest),
    )
    .await
    .unwrap();
}

async fn status(client: &Client, ns: &str, name: &str) -> EmbeddingRolloutStatus {
    let api: Api<EmbeddingRollout> = Api::namespaced(client.clone(), ns);
    api.get(name).await.unwrap().status.unwrap_or_default()
}

async fn wait_status<F>(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: F,
) -> EmbeddingRolloutStatus
where
    F: Fn(&EmbeddingRolloutStatus) -> bool,
{
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(client, ns, name).await;
        if check(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; status: {}",
            serde_json::to_string_pretty(&st).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The weight nginx is told: the canary Ingress annotation.
async fn ingress_weight(client: &Client, ns: &str, name: &str) -> Option<i32> {
    let api: Api<Ingress> = Api::namespaced(client.clone(), ns);
    let ingress = api.get_opt(&format!("{name}-canary")).await.unwrap()?;
    ingress
        .annotations()
        .get(ANNOTATION_CANARY_WEIGHT)?
        .parse()
        .ok()
}

/// Events are published after status and traffic are written, so give them a moment.
async fn await_event(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = events(client, ns, reason).await;
        if !found.is_empty() {
            return found;
        }
        assert!(Instant::now() < deadline, "no {reason} Event in {ns}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().fields(&format!("reason={reason}")))
        .await
        .unwrap()
        .items
}

/// 200s counted by each pod of `color` itself, from its own /metrics.
async fn served_by(client: &Client, ns: &str, name: &str, color: &str) -> f64 {
    counted_by(
        client,
        ns,
        name,
        color,
        "embedder_requests_total",
        "/api/v1/embed",
    )
    .await
}

/// The sum of `metric`'s series for `route` over the pods of `color`, from their own /metrics.
async fn counted_by(
    client: &Client,
    ns: &str,
    name: &str,
    color: &str,
    metric: &str,
    route: &str,
) -> f64 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("{LABEL_ROLLOUT}={name},{LABEL_COLOR}={color}");
    let mut total = 0.0;
    for pod in pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
    {
        let Some(ip) = pod.status.and_then(|s| s.pod_ip) else {
            continue;
        };
        let Ok(response) = reqwest::get(format!("http://{ip}:8080/metrics")).await else {
            continue;
        };
        let text = response.text().await.unwrap_or_default();
        total += text
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) && l.contains(&format!("route=\"{route}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

// ------------------------------------------------------------------ providers

/// Which traffic provider a scenario runs on: the same behaviour is checked on both.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Provider {
    /// ingress-nginx annotations (Traefik's ingress-nginx provider).
    Nginx,
    /// An HTTPRoute the operator owns (Traefik's Gateway API provider).
    GatewayApi,
}

impl Provider {
    /// [`rollout_manifest`] with this provider's traffic section.
    fn manifest(self, name: &str, extra_args: &[&str], spec_patch: Value) -> Value {
        let mut manifest = rollout_manifest(name, extra_args, spec_patch);
        if self == Provider::GatewayApi {
            manifest["spec"]["traffic"] = json!({"gatewayAPI": {
                "parentRefs": [{"name": env("GATEWAY_NAME"), "namespace": env("GATEWAY_NAMESPACE")}],
                "hostnames": [host(name)],
                "paths": ["/api/v1/embed"],
            }});
        }
        manifest
    }

    /// Where clients send their requests.
    fn base(self) -> String {
        match self {
            Provider::Nginx => env("INGRESS_URL"),
            Provider::GatewayApi => env("GATEWAY_URL"),
        }
    }

    /// The canary weight the data plane is told (not status): the canary Ingress's
    /// annotation, or the canary color's backendRef weight on the HTTPRoute.
    async fn told_weight(self, client: &Client, ns: &str, name: &str) -> Option<i32> {
        match self {
            Provider::Nginx => ingress_weight(client, ns, name).await,
            Provider::GatewayApi => route_weight(client, ns, name).await,
        }
    }
}

fn http_routes(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "httproutes",
        ),
    )
}

/// The weight of the canary on the HTTPRoute `route` (its first rule), read from the
/// backendRefs themselves: every backendRef but the stable color's (recorded on the route) is
/// the canary; none means 0.
async fn route_weight(client: &Client, ns: &str, route: &str) -> Option<i32> {
    let route = http_routes(client, ns).get_opt(route).await.unwrap()?;
    let stable = route
        .annotations()
        .get("embedroll.dev/stable-color")?
        .clone();
    let refs = route.data["spec"]["rules"][0]["backendRefs"]
        .as_array()?
        .clone();
    let canary: i64 = refs
        .iter()
        .filter(|b| {
            !b["name"]
                .as_str()
                .unwrap_or("")
                .ends_with(&format!("-{stable}"))
        })
        .map(|b| b["weight"].as_i64().unwrap_or(1))
        .sum();
    i32::try_from(canary).ok()
}

// ------------------------------------------------------------------ traffic

/// Clients posting embeddings through nginx until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    codes: Arc<Mutex<BTreeMap<u16, u64>>>,
    /// The first few failures (time since start, code, body) to explain a failed assertion.
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(host: String, clients: usize) -> Self {
        Self::start_at(&env("INGRESS_URL"), host, clients)
    }

    /// Clients posting to `base` (the Ingress or the Gateway entry point).
    fn start_at(base: &str, host: String, clients: usize) -> Self {
        let url = format!("{base}/api/v1/embed");
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let codes = Arc::new(Mutex::new(BTreeMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let tasks = (0..clients)
            .map(|worker| {
                let (url, host, stop, ok, failed, codes, failures) = (
                    url.clone(),
                    host.clone(),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    codes.clone(),
                    failures.clone(),
                );
                let note = move |what: String| {
                    let mut failures = failures.lock().unwrap();
                    if failures.len() < 5 {
                        let at = started.elapsed().as_secs_f64();
                        let wall = utc_clock();
                        failures.push(format!("+{at:.2}s ({wall}) {what}"));
                    }
                };
                tokio::spawn(async move {
                    // A fresh connection per request: an nginx reload (ingress-nginx reloads
                    // too when a backend changes, e.g. at promotion) closes idle keep-alive
                    // connections, and a request sent on one at that instant fails in the
                    // client whatever the rollout does. New connections are drained gracefully.
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .pool_max_idle_per_host(0)
                        .build()
                        .unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let body = json!({"texts": [format!("traffic {worker} request {n}")]});
                        let result = http
                            .post(&url)
                            .header("Host", &host)
                            .json(&body)
                            .send()
                            .await;
                        match result {
                            Ok(response) => {
                                let code = response.status().as_u16();
                                let body = response.bytes().await.unwrap_or_default();
                                if code != 200 {
                                    let body = String::from_utf8_lossy(&body);
                                    note(format!(
                                        "{code} {}",
                                        body.chars().take(120).collect::<String>()
                                    ));
                                }
                                *codes.lock().unwrap().entry(code).or_default() += 1;
                                if code == 200 { &ok } else { &failed }
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                note(format!("transport error: {e}"));
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            failed,
            codes,
            failures,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    async fn finish(mut self) -> Answers {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let codes = self.codes.lock().unwrap().clone();
        let answered_not_ok: u64 = codes
            .iter()
            .filter(|(c, _)| **c != 200)
            .map(|(_, n)| n)
            .sum();
        let first_failures = self.failures.lock().unwrap().clone();
        Answers {
            transport_errors: self.failed.load(Ordering::Relaxed) - answered_not_ok,
            codes,
            first_failures,
        }
    }
}

/// What the traffic generator got back: counts per status code, plus the first failures.
#[derive(Debug)]
struct Answers {
    codes: BTreeMap<u16, u64>,
    transport_errors: u64,
    #[allow(dead_code)] // read through Debug, in assertion messages
    first_failures: Vec<String>,
}

impl Answers {
    fn all_ok(&self) -> bool {
        self.transport_errors == 0 && self.codes.keys().all(|code| *code == 200)
    }
}

/// Wall-clock UTC time of day, to line failures up with the cluster's logs.
fn utc_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Installs the first revision and waits for Healthy with traffic answering through the
/// Ingress entry point.
async fn install(client: &Client, scenario: &str, manifest: &Value) -> EmbeddingRolloutStatus {
    install_at(client, scenario, manifest, &env("INGRESS_URL")).await
}

/// Installs the first revision and waits for Healthy with traffic answering at `base`.
async fn install_at(
    client: &Client,
    scenario: &str,
    manifest: &Value,
    base: &str,
) -> EmbeddingRolloutStatus {
    start_operator();
    namespace(client, scenario).await;
    apply(client, scenario, manifest).await;
    let st = wait_status(
        client,
        scenario,
        scenario,
        "first install Healthy",
        Duration::from_secs(120),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    // The data plane picks up the route and endpoints shortly after.
    wait_answering(base, &host(scenario), "an embedding through the data plane").await;
    wait_ingress_settled(client, scenario).await;
    st
}

/// Waits until an embedding posted to `base` for `host` is answered with a 200.
async fn wait_answering(base: &str, host: &str, what: &str) {
    let url = format!("{base}/api/v1/embed");
    let http = reqwest::Client::new();
    wait_for(what, Duration::from_secs(30), || async {
        http.post(&url)
            .header("Host", host)
            .json(&json!({"texts": ["hello"]}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// Waits until Traefik's configuration (its API, `/api/http/services`) sends the namespace's
/// traffic only to pods its EndpointSlices list as Ready: Traefik applies provider changes
/// in batches (`providersThrottleDuration`), so right after pods come or go it may still
/// hold the previous set.
async fn wait_ingress_settled(client: &Client, ns: &str) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let services = format!("{}/api/http/services?per_page=1000", env("TRAEFIK_API_URL"));
    let http = reqwest::Client::new();
    // Services of the ingress-nginx provider are named `<ns>-<service>-<port>`, those of the
    // Gateway provider `httproute-<ns>-<route>-...-svc-<ns>-<service>-<n>`.
    let (prefix, infix) = (format!("{ns}-"), format!("-{ns}-"));
    wait_for(
        "Traefik serves the current endpoints",
        Duration::from_secs(30),
        || async {
            let Ok(list) = slices.list(&ListParams::default()).await else {
                return false;
            };
            let ready: std::collections::BTreeSet<String> = list
                .items
                .iter()
                .flat_map(|slice| {
                    let ports: Vec<i32> = slice
                        .ports
                        .iter()
                        .flatten()
                        .filter_map(|p| p.port)
                        .collect();
                    slice
                        .endpoints
                        .iter()
                        .flatten()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                        .flat_map(|e| e.addresses.clone())
                        .flat_map(move |a| {
                            ports
                                .clone()
                                .into_iter()
                                .map(move |p| format!("http://{a}:{p}"))
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let Ok(response) = http.get(&services).send().await else {
                return false;
            };
            let Ok(services) = response.json::<Vec<Value>>().await else {
                return false;
            };
            let served: std::collections::BTreeSet<String> = services
                .iter()
                .filter(|s| {
                    s["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(&prefix) || n.contains(&infix))
                })
                .flat_map(|s| {
                    s["loadBalancer"]["servers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|server| server["url"].as_str().map(str::to_owned))
                .collect();
            !served.is_empty() && served.is_subset(&ready)
        },
    )
    .await;
}

fn condition(st: &EmbeddingRolloutStatus, type_: &str) -> (String, String, String) {
    let c =
        conditions::get(&st.conditions, type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

async fn cleanup(client: &Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
}

// ------------------------------------------------------------------ scenarios

/// a) A first install goes Healthy at 100% (no canary, no steps), and `kubectl get er` tells it.
#[tokio::test]
async fn a_first_install_goes_healthy() {
    let client = client().await;
    let started = Instant::now();
    let st = install(
        &client,
        "a-install",
        &rollout_manifest("a-install", &[], json!({})),
    )
    .await;
    say(
        "a",
        format!("Healthy after {:.1}s", started.elapsed().as_secs_f64()),
    );
    assert_eq!(st.canary_weight, 0);
    assert_eq!(
        st.stable_color.map(|c| c.to_string()).as_deref(),
        Some("blue")
    );
    assert_eq!(condition(&st, conditions::AVAILABLE).0, "True");
    let traffic = Traffic::start(host("a-install"), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "all answers 200: {answers:?}");
    let table = Command::new("kubectl")
        .args(["get", "er", "-n", "a-install"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    say("a", format!("kubectl get er:\n{table}"));
    assert!(
        table.contains("PHASE") && table.contains("Healthy") && table.contains("WEIGHT"),
        "{table}"
    );
    // Children deleted by hand (a stray `kubectl delete`) come back, unchanged as they are.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), "a-install");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), "a-install");
    let deleted = Instant::now();
    services
        .delete("a-install", &DeleteParams::default())
        .await
        .unwrap();
    ingresses
        .delete("a-install", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the stable Service and primary Ingress recreated",
        Duration::from_secs(30),
        || async {
            services.get_opt("a-install").await.unwrap().is_some()
                && ingresses.get_opt("a-install").await.unwrap().is_some()
        },
    )
    .await;
    say(
        "a",
        format!(
            "deleted stable Service and primary Ingress recreated after {:.1}s",
            deleted.elapsed().as_secs_f64()
        ),
    );
    wait_answering(&env("INGRESS_URL"), &host("a-install"), "a-install again").await;
    cleanup(&client, "a-install").await;
}

/// Follows an upgrade already started to the end: at each weight, the share of requests the
/// canary's pods served (counted by the pods themselves) matches the weight, and the weights
/// are 1, 10, 50, 100 in order.
async fn check_shares_at_every_weight(client: &Client, ns: &str, scenario: &str) {
    let client = client.clone();
    // Watch the weight; count each color's requests between one change and the next,
    // starting 1.5 s after a change: status is written before the route, and Traefik applies
    // provider changes in batches (providersThrottleDuration 500ms here). The window ends when
    // status shows the next weight, before the route carries it.
    let mut shares: Vec<(i32, f64, f64)> = Vec::new();
    let mut current = 0;
    let mut window_start: Option<(Instant, f64, f64)> = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        assert!(
            Instant::now() < deadline,
            "upgrade did not finish: {:?}",
            status(&client, ns, ns).await
        );
        let st = status(&client, ns, ns).await;
        let weight = if st.phase == Some(Phase::Healthy) {
            0
        } else {
            st.canary_weight
        };
        if weight != current {
            if let Some((_, blue0, green0)) = window_start.take() {
                let (blue, green) = (
                    served_by(&client, ns, ns, "blue").await - blue0,
                    served_by(&client, ns, ns, "green").await - green0,
                );
                shares.push((current, green, blue + green));
            }
            current = weight;
            if st.phase == Some(Phase::Healthy) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            window_start = Some((
                Instant::now(),
                served_by(&client, ns, ns, "blue").await,
                served_by(&client, ns, ns, "green").await,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let weights: Vec<i32> = shares.iter().map(|s| s.0).collect();
    assert_eq!(weights, [1, 10, 50, 100], "every step taken in order");
    for (weight, canary, total) in &shares {
        let p = f64::from(*weight) / 100.0;
        let observed = canary / total;
        // Binomial noise (4 sigma) plus 1 point for the edges of the counting window.
        let tolerance = 4.0 * (p * (1.0 - p) / total).sqrt() + 0.01;
        say(
            scenario,
            format!(
                "weight {weight}%: canary served {canary} of {total} ({:.1}%), tolerance ±{:.1} points",
                observed * 100.0,
                tolerance * 100.0
            ),
        );
        assert!(
            *total >= 50.0,
            "too little traffic counted at {weight}%: {total}"
        );
        assert!(
            (observed - p).abs() <= tolerance,
            "weight {weight}%: observed share {observed:.3}"
        );
    }
}

/// b) An upgrade walks 1 -> 10 -> 50 -> 100; at each weight the share of requests the canary
///    pods served (counted by the pods themselves) matches the weight; the old color is scaled
///    down after scaleDownDelaySeconds.
#[tokio::test]
async fn b_upgrade_promotes_through_every_step() {
    let client = client().await;
    let ns = "b-upgrade";
    let spec = json!({"analysis": {"interval": "4s"}});
    install(&client, ns, &rollout_manifest(ns, &[], spec.clone())).await;
    let traffic = Traffic::start(host(ns), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply(
        &client,
        ns,
        &rollout_manifest(ns, &["--max-batch-tokens", "8192"], spec),
    )
    .await;
    check_shares_at_every_weight(&client, ns, "b").await;
    let st = status(&client, ns, ns).await;
    assert_eq!(
        st.stable_color.map(|c| c.to_string()).as_deref(),
        Some("green")
    );
    assert_eq!(st.canary_weight, 0);
    // The vector gate passed it before its first weight and again before promotion: the same
    // model and weights give the same vectors (only the batching flag differs).
    let check = st.compatibility.clone().expect("a vector check");
    say(
        "b",
        format!(
            "vector check: {:?} {:?}: {}",
            check.stage, check.result, check.message
        ),
    );
    assert_eq!(check.result, CompatibilityResult::Compatible);
    assert_eq!(check.stage, CompatibilityStage::BeforePromotion);
    let min: f64 = check.min_cosine.as_deref().unwrap().parse().unwrap();
    assert!(min >= 0.9999, "min cosine {min}");
    assert_eq!(check.texts, Some(50));
    assert_eq!(
        events(&client, ns, "VectorsCompatible").await.len(),
        2,
        "checked before traffic and before promotion"
    );
    // The checks' requests reached the new stable pod marked as checks, and it counted them
    // apart: none is in the series the analysis judged (a check in a step's first seconds
    // once made a canary's P95).
    // Two checks, each 50 golden texts in requests of 8.
    let check_requests = 2.0 * 7.0;
    let checks = counted_by(
        &client,
        ns,
        ns,
        "green",
        "embedder_check_requests_total",
        "/v1/embeddings",
    )
    .await;
    let as_traffic = counted_by(
        &client,
        ns,
        ns,
        "green",
        "embedder_requests_total",
        "/v1/embeddings",
    )
    .await;
    say(
        "b",
        format!("check requests on green: {checks} counted apart, {as_traffic} as traffic"),
    );
    assert!(
        checks >= check_requests,
        "check requests counted apart: {checks}, expected at least {check_requests}"
    );
    assert_eq!(as_traffic, 0.0, "check requests counted as traffic");
    assert!(!await_event(&client, ns, "Promoted").await.is_empty());
    // One Event per weight change, each with its own message (not folded into one series).
    let weight_events: Vec<String> = events(&client, ns, "WeightUpdated")
        .await
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    for weight in [1, 10, 50, 100] {
        assert!(
            weight_events
                .iter()
                .any(|m| m.contains(&format!("-> {weight}% "))),
            "a WeightUpdated Event for {weight}%: {weight_events:?}"
        );
    }
    // Old color: scaled to 0 after scaleDownDelaySeconds (5 s).
    let promoted = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for("blue scaled to 0", Duration::from_secs(30), || async {
        deployments
            .get(&format!("{ns}-blue"))
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas
            == Some(0)
    })
    .await;
    say(
        "b",
        format!(
            "old color scaled to 0 {:.1}s after promotion (delay 5s)",
            promoted.elapsed().as_secs_f64()
        ),
    );
    let answers = traffic.finish().await;
    say(
        "b",
        format!("answers during the rollout: {:?}", answers.codes),
    );
    assert!(
        answers.all_ok(),
        "no failed request during the rollout: {answers:?}"
    );
    say("b", operator_report().await);
    cleanup(&client, ns).await;
}

/// Upgrades to a faulty revision and waits for the automatic rollback; returns the status.
async fn faulty_upgrade(
    client: &Client,
    provider: Provider,
    ns: &str,
    fault: &[&str],
    breach_query: &str,
    limit: f64,
    spec_patch: Value,
) -> EmbeddingRolloutStatus {
    // The failed canary stays up for 30 s, long enough to see that it gets no more traffic.
    let mut spec = json!({"strategy": {"scaleDownDelaySeconds": 30}});
    merge(&mut spec, spec_patch);
    install_at(
        client,
        ns,
        &provider.manifest(ns, &[], spec.clone()),
        &provider.base(),
    )
    .await;
    let traffic = Traffic::start_at(&provider.base(), host(ns), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply(client, ns, &provider.manifest(ns, fault, spec)).await;
    let canary_revision = wait_status(
        client,
        ns,
        ns,
        "canary at weight > 0",
        Duration::from_secs(60),
        |s| s.canary_weight > 0,
    )
    .await
    .canary_revision
    .unwrap();
    // Reaction time: the breach first visible in Prometheus -> nginx told weight 0. The
    // operator acts only on a window holding minRequests (3) canary requests (fewer is
    // inconclusive), and at 1% that can take a few intervals, so both moments are reported.
    let prometheus = env("PROMETHEUS_URL");
    let query = breach_query
        .replace("{ns}", ns)
        .replace("{rev}", &canary_revision);
    let requests = format!(
        r#"sum(increase(embedder_requests_total{{namespace="{ns}",color="green",revision="{canary_revision}"}}[2s]))"#
    );
    let http = reqwest::Client::new();
    let instant = |query: String| {
        let request = http
            .get(format!("{prometheus}/api/v1/query"))
            .query(&[("query", query)]);
        async move {
            let response: Value = request.send().await.unwrap().json().await.unwrap();
            response["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
        }
    };
    let mut breach_seen: Option<Instant> = None;
    let mut conclusive_seen: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    let zero_at = loop {
        assert!(
            Instant::now() < deadline,
            "no rollback: {:?}",
            status(client, ns, ns).await
        );
        if conclusive_seen.is_none() && instant(query.clone()).await.is_some_and(|v| v > limit) {
            let now = Instant::now();
            breach_seen.get_or_insert(now);
            if instant(requests.clone()).await.is_some_and(|n| n >= 3.0) {
                conclusive_seen = Some(now);
            }
        }
        if provider.told_weight(client, ns, ns).await == Some(0)
            && status(client, ns, ns).await.failed_revision.is_some()
        {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let since = |seen: Option<Instant>| {
        seen.map_or("before this test's own poll saw it".to_owned(), |seen| {
            format!(
                "{:.2}s",
                zero_at.saturating_duration_since(seen).as_secs_f64()
            )
        })
    };
    say(
        ns,
        format!(
            "rollback reaction: canary weight 0 after the breach was visible in Prometheus: {}; \
             after it was visible with minRequests canary requests in one interval: {}",
            since(breach_seen),
            since(conclusive_seen)
        ),
    );
    // Traffic is back on stable: the canary pods serve nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = served_by(client, ns, ns, "green").await;
    let ok_before = traffic.ok();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = served_by(client, ns, ns, "green").await;
    assert_eq!(
        after, before,
        "canary still receives traffic after the rollback"
    );
    assert!(traffic.ok() > ok_before + 20, "stable serves the traffic");
    let answers = traffic.finish().await;
    say(ns, format!("answers during the rollout: {answers:?}"));
    status(client, ns, ns).await
}

/// c) A canary slower than the P95 limit is rolled back automatically.
#[tokio::test]
async fn c_latency_breach_rolls_back() {
    c_latency_breach_rolls_back_with(Provider::Nginx, "c-latency").await;
}

/// The same on Gateway API: the route carries 0 to the canary again.
#[tokio::test]
async fn c_latency_breach_rolls_back_on_gateway_api() {
    c_latency_breach_rolls_back_with(Provider::GatewayApi, "c-latency-gw").await;
}

async fn c_latency_breach_rolls_back_with(provider: Provider, ns: &str) {
    let client = client().await;
    let query = r#"histogram_quantile(0.95, sum by (le) (rate(embedder_request_duration_seconds_bucket{namespace="{ns}",color="green",revision="{rev}"}[2s])))"#;
    let st = faulty_upgrade(
        &client,
        provider,
        ns,
        &["--fault-latency-ms", "250"],
        query,
        0.1,
        json!({}),
    )
    .await;
    assert_eq!(st.phase, Some(Phase::Failed));
    assert_eq!(
        st.stable_color.map(|c| c.to_string()).as_deref(),
        Some("blue"),
        "stable untouched"
    );
    let (cond_status, reason, message) = condition(&st, conditions::ROLLED_BACK);
    say(
        ns,
        format!("RolledBack={cond_status} reason={reason}: {message}"),
    );
    assert_eq!(
        (cond_status.as_str(), reason.as_str()),
        ("True", "AnalysisFailed")
    );
    assert!(
        message.contains("p95-latency") && message.contains("limit 100.0ms"),
        "{message}"
    );
    let rolled_back = await_event(&client, ns, "RolledBack").await;
    assert!(
        rolled_back
            .iter()
            .any(|e| e.message.as_deref().unwrap_or("").contains("p95-latency")),
        "a RolledBack Event names the metric"
    );
    cleanup(&client, ns).await;
}

/// d) A canary answering 5xx is rolled back automatically.
#[tokio::test]
async fn d_error_rate_breach_rolls_back() {
    let client = client().await;
    let ns = "d-errors";
    let query = r#"sum(rate(embedder_requests_total{namespace="{ns}",color="green",revision="{rev}",code=~"5.."}[2s])) / sum(rate(embedder_requests_total{namespace="{ns}",color="green",revision="{rev}"}[2s]))"#;
    // The vector gate is off here: this scenario is about the error-rate analysis, and a canary
    // failing half of its requests fails the vector check's requests too, which the gate
    // holds as inconclusive (and rolls back at the progress deadline) before any weight.
    let st = faulty_upgrade(
        &client,
        Provider::Nginx,
        ns,
        &["--fault-error-rate", "0.5"],
        query,
        0.05,
        json!({"compatibility": {"enabled": false}}),
    )
    .await;
    assert_eq!(st.phase, Some(Phase::Failed));
    let (cond_status, reason, message) = condition(&st, conditions::ROLLED_BACK);
    say(
        "d",
        format!("RolledBack={cond_status} reason={reason}: {message}"),
    );
    assert_eq!(
        (cond_status.as_str(), reason.as_str()),
        ("True", "AnalysisFailed")
    );
    assert!(message.contains("error-rate"), "{message}");
    cleanup(&client, ns).await;
}

/// e) Prometheus stopped mid-analysis: no promotion, an Inconclusive condition; the rollout
///    resumes when Prometheus is back.
#[tokio::test]
async fn e_prometheus_down_is_inconclusive_then_resumes() {
    let client = client().await;
    let ns = "e-prometheus";
    let spec =
        json!({"strategy": {"steps": [{"setWeight": 10}, {"setWeight": 50}, {"setWeight": 100}]}});
    install(&client, ns, &rollout_manifest(ns, &[], spec.clone())).await;
    let traffic = Traffic::start(host(ns), 4);
    apply(
        &client,
        ns,
        &rollout_manifest(ns, &["--max-batch-tokens", "8192"], spec),
    )
    .await;
    wait_status(&client, ns, ns, "weight 10", Duration::from_secs(60), |s| {
        s.canary_weight == 10
    })
    .await;
    let cluster = env("EMBEDROLL_CLUSTER");
    assert!(
        Command::new(&cluster)
            .args(["stop", "prometheus"])
            .status()
            .unwrap()
            .success()
    );
    let stopped = Instant::now();
    let st = wait_status(
        &client,
        ns,
        ns,
        "Analysis Unknown (Inconclusive)",
        Duration::from_secs(30),
        |s| {
            conditions::get(&s.conditions, conditions::ANALYSIS)
                .is_some_and(|c| c.reason == "Inconclusive")
        },
    )
    .await;
    let (_, _, message) = condition(&st, conditions::ANALYSIS);
    say("e", format!("Prometheus down: {message}"));
    assert!(message.contains("Prometheus"), "{message}");
    // Several intervals pass: no promotion, no rollback.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let st = status(&client, ns, ns).await;
    assert_eq!(st.canary_weight, 10, "no promotion without data");
    assert_eq!(st.phase, Some(Phase::Paused));
    assert!(st.failed_revision.is_none());
    assert!(
        !await_event(&client, ns, "AnalysisInconclusive")
            .await
            .is_empty()
    );
    assert!(
        Command::new(&cluster)
            .args(["start", "prometheus"])
            .status()
            .unwrap()
            .success()
    );
    say(
        "e",
        format!(
            "Prometheus restarted after {:.0}s down",
            stopped.elapsed().as_secs_f64()
        ),
    );
    wait_status(
        &client,
        ns,
        ns,
        "Healthy after Prometheus is back",
        Duration::from_secs(120),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "all answers 200: {answers:?}");
    cleanup(&client, ns).await;
}

/// f) The operator is killed (SIGKILL) at weight 10: traffic stays at 10 while it is down, and
///    the restarted operator resumes at weight 10, never lower.
#[tokio::test]
async fn f_operator_killed_at_weight_10_resumes_there() {
    f_operator_killed_at_weight_10_resumes_there_with(Provider::Nginx, "f-restart").await;
}

/// The same on Gateway API: the HTTPRoute keeps its weights while the operator is down, and they are read back from it.
#[tokio::test]
async fn f_operator_killed_at_weight_10_resumes_there_on_gateway_api() {
    f_operator_killed_at_weight_10_resumes_there_with(Provider::GatewayApi, "f-restart-gw").await;
}

async fn f_operator_killed_at_weight_10_resumes_there_with(provider: Provider, ns: &str) {
    let client = client().await;
    let spec = json!({"analysis": {"interval": "3s"},
                      "strategy": {"steps": [{"setWeight": 10}, {"setWeight": 50}, {"setWeight": 100}]}});
    install_at(
        &client,
        ns,
        &provider.manifest(ns, &[], spec.clone()),
        &provider.base(),
    )
    .await;
    let traffic = Traffic::start_at(&provider.base(), host(ns), 2);
    apply(
        &client,
        ns,
        &provider.manifest(ns, &["--max-batch-tokens", "8192"], spec),
    )
    .await;
    wait_status(&client, ns, ns, "weight 10", Duration::from_secs(60), |s| {
        s.canary_weight == 10
    })
    .await;
    // Status is written before the Ingress: kill once nginx has been told 10 as well.
    wait_for("canary Ingress at 10", Duration::from_secs(10), || async {
        provider.told_weight(&client, ns, ns).await == Some(10)
    })
    .await;
    kill_operator();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        provider.told_weight(&client, ns, ns).await,
        Some(10),
        "nginx keeps weight 10 while the operator is down"
    );
    assert_eq!(status(&client, ns, ns).await.canary_weight, 10);
    start_operator();
    // The killed process never released its Lease: the new one waits for it to expire.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "did not finish after restart; weights seen {seen:?}"
        );
        let st = status(&client, ns, ns).await;
        let weight = provider.told_weight(&client, ns, ns).await.unwrap_or(-1);
        if st.phase == Some(Phase::Healthy) {
            break;
        }
        if seen.last() != Some(&weight) {
            seen.push(weight);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(
        ns,
        format!(
            "after the restart nginx weights went {seen:?} then promotion ({:.0}s after the kill)",
            killed.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(seen.first(), Some(&10), "resumed at weight 10");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "no traffic regression: {seen:?}"
    );
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "all answers 200: {answers:?}");
    cleanup(&client, ns).await;
}

/// g) Mistakes are rejected by the apiserver with a message naming the field.
#[tokio::test]
async fn g_invalid_rollouts_are_rejected_with_the_field_named() {
    let client = client().await;
    let gvk = GroupVersionKind::gvk("embedroll.dev", "v1alpha1", "EmbeddingRollout");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk));
    let valid = rollout_manifest("g-valid", &[], json!({}));
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "weights not ascending",
            json!({"strategy": {"steps": [{"setWeight": 50}, {"setWeight": 10}, {"setWeight": 100}]}}),
            &["spec.strategy.steps", "strictly ascending"],
        ),
        (
            "last step below 100",
            json!({"strategy": {"steps": [{"setWeight": 10}, {"setWeight": 50}]}}),
            &["spec.strategy.steps", "setWeight: 100"],
        ),
        (
            "weight over 100",
            json!({"strategy": {"steps": [{"setWeight": 150}]}}),
            &["spec.strategy.steps[0].setWeight", "100"],
        ),
        (
            "step with weight and pause",
            json!({"strategy": {"steps": [{"setWeight": 10, "pause": {}}, {"setWeight": 100}]}}),
            &[
                "spec.strategy.steps[0]",
                "exactly one of setWeight or pause",
            ],
        ),
        (
            "two traffic providers",
            json!({"traffic": {"gatewayAPI": {"parentRefs": [{"name": "web"}]}}}),
            &["spec.traffic", "exactly one of nginx and gatewayAPI"],
        ),
        (
            "a Gateway route without a parent",
            json!({"traffic": {"nginx": null, "gatewayAPI": {"parentRefs": []}}}),
            &["spec.traffic.gatewayAPI.parentRefs", "exactly one"],
        ),
        (
            "both a managed and a referenced route",
            json!({"traffic": {"nginx": null, "gatewayAPI": {"parentRefs": [{"name": "web"}], "httpRouteRef": {"name": "mine"}}}}),
            &["spec.traffic.gatewayAPI.parentRefs", "exactly one"],
        ),
        (
            "paths on a referenced route",
            json!({"traffic": {"nginx": null, "gatewayAPI": {"httpRouteRef": {"name": "mine"}, "paths": ["/x"]}}}),
            &[
                "spec.traffic.gatewayAPI.httpRouteRef",
                "your route's own rules apply",
            ],
        ),
        (
            "re-index without a route for it",
            json!({"compatibility": {"onIncompatible": "Reindex"}}),
            &[
                "spec.compatibility.onIncompatible",
                "set traffic.canaryHeader",
            ],
        ),
        (
            "a cosine above 1",
            json!({"compatibility": {"minCosine": 1.5}}),
            &["spec.compatibility.minCosine"],
        ),
        (
            "unparseable interval",
            json!({"analysis": {"interval": "5 minutes"}}),
            &["spec.analysis.interval"],
        ),
        (
            "an interval under a second (a check and a status write each time)",
            json!({"analysis": {"interval": "0s"}}),
            &["spec.analysis.interval", "at least 1s"],
        ),
        (
            "a Prometheus timeout of nothing",
            json!({"analysis": {"prometheus": {"address": "http://prometheus:9090", "timeout": "0ms"}}}),
            &["spec.analysis.prometheus.timeout", "at least 1s"],
        ),
        (
            "a vector check timeout of nothing",
            json!({"compatibility": {"timeout": "0s"}}),
            &["spec.compatibility.timeout", "at least 1s"],
        ),
        (
            "max beside maxIncrease",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "LatencyP95VsStable", "maxIncrease": "5ms", "max": "1s"}]}}),
            &["spec.analysis.metrics[0].maxIncrease", "only threshold"],
        ),
        (
            "a pause longer than time arithmetic holds (it crashed the operator)",
            json!({"strategy": {"steps": [{"setWeight": 10}, {"pause": {"duration": "9999999999999999h"}}, {"setWeight": 100}]}}),
            &["spec.strategy.steps[1].pause.duration"],
        ),
        (
            "a latency threshold of a million years",
            json!({"analysis": {"metrics": [{"name": "p95", "preset": "LatencyP95", "max": "9999999999h"}]}}),
            &["spec.analysis.metrics[0].max"],
        ),
        (
            "a maxIncrease past ten years",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "LatencyP95VsStable", "maxIncrease": "87601h"}]}}),
            &["spec.analysis.metrics[0].maxIncrease", "at most 87600h"],
        ),
        (
            "unparseable pause",
            json!({"strategy": {"steps": [{"setWeight": 10}, {"pause": {"duration": "soon"}}, {"setWeight": 100}]}}),
            &["spec.strategy.steps[1].pause.duration"],
        ),
        (
            "preset and query",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "ErrorRate", "query": "up", "max": "1"}]}}),
            &["spec.analysis.metrics[0]", "exactly one of preset or query"],
        ),
        (
            "metric without threshold",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "ErrorRate"}]}}),
            &["spec.analysis.metrics[0]", "needs a threshold"],
        ),
        (
            "unknown preset",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "P99", "max": "1"}]}}),
            &["spec.analysis.metrics[0].preset", "Unsupported value"],
        ),
        (
            "latency limit not a duration",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "LatencyP95", "max": "0.035"}]}}),
            &["spec.analysis.metrics[0].max", "durations"],
        ),
        (
            "duplicate metric names",
            json!({"analysis": {"metrics": [{"name": "x", "preset": "ErrorRate", "max": "1"}, {"name": "x", "preset": "LatencyP95", "max": "1s"}]}}),
            &["spec.analysis.metrics", "unique"],
        ),
        ("zero replicas", json!({"replicas": 0}), &["spec.replicas"]),
        (
            "path without leading slash",
            json!({"traffic": {"nginx": {"paths": ["api"]}}}),
            &["spec.traffic.nginx.paths[0]"],
        ),
        (
            "canary annotation set by hand",
            json!({"traffic": {"nginx": {"annotations": {"nginx.ingress.kubernetes.io/canary-weight": "50"}}}}),
            &["spec.traffic.nginx.annotations", "managed by the operator"],
        ),
        (
            "onInconclusive typo",
            json!({"analysis": {"onInconclusive": "Ignore"}}),
            &["spec.analysis.onInconclusive", "Unsupported value"],
        ),
        (
            "Prometheus address not a URL",
            json!({"analysis": {"prometheus": {"address": "prometheus:9090"}}}),
            &["spec.analysis.prometheus.address"],
        ),
    ];
    let post = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let object = |manifest: Value| -> DynamicObject { serde_json::from_value(manifest).unwrap() };
    api.create(&post, &object(valid.clone()))
        .await
        .expect("the valid base rollout is accepted");
    let mut long_name = valid.clone();
    long_name["metadata"]["name"] = json!("a".repeat(58));
    let error = api
        .create(&post, &object(long_name))
        .await
        .expect_err("58-character name");
    assert!(error.to_string().contains("metadata.name"), "{error}");
    // Names its Services cannot take, and names that are another rollout's children.
    for (name, needle) in [
        ("9-lives", "starting with a letter"),
        ("search.v2", "starting with a letter"),
        ("g-valid-blue", "must not end in -blue"),
        ("g-valid-canary", "must not end in -blue, -green or -canary"),
    ] {
        let mut manifest = valid.clone();
        manifest["metadata"]["name"] = json!(name);
        let error = api
            .create(&post, &object(manifest))
            .await
            .expect_err(name)
            .to_string();
        assert!(error.contains(needle), "{name}: {needle:?} not in {error}");
    }
    for (what, patch, needles) in &cases {
        let mut manifest = valid.clone();
        merge(&mut manifest["spec"], patch.clone());
        let error = api
            .create(&post, &object(manifest))
            .await
            .expect_err(what)
            .to_string();
        for needle in *needles {
            assert!(error.contains(needle), "{what}: {needle:?} not in {error}");
        }
        say(
            "g",
            format!("{what}: {}", error.chars().take(220).collect::<String>()),
        );
    }
    say(
        "g",
        format!("{} kinds of mistakes rejected", cases.len() + 5),
    );
}

/// Installs `spec` on `provider`, starts traffic, upgrades to a new revision and waits for it
/// paused at 10% (steps 10%, pause, 100%): where the manual and fault scenarios begin.
async fn paused_at_10(client: &Client, provider: Provider, ns: &str, spec: &Value) -> Traffic {
    install_at(
        client,
        ns,
        &provider.manifest(ns, &[], spec.clone()),
        &provider.base(),
    )
    .await;
    let traffic = Traffic::start_at(&provider.base(), host(ns), 2);
    apply(
        client,
        ns,
        &provider.manifest(ns, &["--max-batch-tokens", "8192"], spec.clone()),
    )
    .await;
    wait_status(
        client,
        ns,
        ns,
        "paused at 10%",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::Paused) && s.current_step_index == Some(1),
    )
    .await;
    traffic
}

/// h) Manual control with the `embedroll` CLI: promote past a pause, abort, retry, promote in full.
#[tokio::test]
async fn h_manual_promote_abort_retry() {
    h_manual_promote_abort_retry_with(Provider::Nginx, "h-manual").await;
}

/// The same on Gateway API.
#[tokio::test]
async fn h_manual_promote_abort_retry_on_gateway_api() {
    h_manual_promote_abort_retry_with(Provider::GatewayApi, "h-manual-gw").await;
}

async fn h_manual_promote_abort_retry_with(provider: Provider, ns: &str) {
    let client = client().await;
    let spec =
        json!({"strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]}});
    let traffic = paused_at_10(&client, provider, ns, &spec).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        status(&client, ns, ns).await.current_step_index,
        Some(1),
        "pause {{}} waits for a promote"
    );
    let table = cli(&["status", ns, "-n", ns]);
    say(ns, format!("embedroll status:\n{table}"));
    assert!(
        table.contains("Step:") && table.contains("2/3") && table.contains("10%"),
        "{table}"
    );
    cli(&["promote", ns, "-n", ns]);
    wait_status(
        &client,
        ns,
        ns,
        "Healthy after promote",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    say(ns, "promote: past the pause to 100%, then promoted");

    // Nothing in flight: an abort is set, but the CLI says it has nothing to act on (exit 2)
    // and the operator drops it, so it cannot abort the next revision. A rollout that is not
    // there is named with the namespace looked in (exit 1).
    let embedroll = |args: &[&str]| {
        let output = Command::new(format!("{}/embedroll", env("EMBEDROLL_BIN_DIR")))
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = embedroll(&["abort", ns, "-n", ns]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no revision is in flight"), "{stderr}");
    let rollouts: Api<EmbeddingRollout> = Api::namespaced(client.clone(), ns);
    wait_for(
        "the operator drops the abort",
        Duration::from_secs(30),
        || async {
            !rollouts
                .get(ns)
                .await
                .unwrap()
                .annotations()
                .contains_key("embedroll.dev/abort")
        },
    )
    .await;
    let (code, stderr) = embedroll(&["status", "no-such-rollout", "-n", ns]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no-such-rollout not found in namespace {ns}")),
        "{stderr}"
    );
    say(
        ns,
        format!(
            "abort with nothing in flight: exit 2; a missing rollout: exit 1, {}",
            stderr.trim()
        ),
    );

    // Abort a second upgrade at the pause, then retry it and promote it in full.
    apply(
        &client,
        ns,
        &provider.manifest(ns, &["--max-batch-tokens", "4096"], spec),
    )
    .await;
    let st = wait_status(
        &client,
        ns,
        ns,
        "paused at 10% again",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::Paused) && s.current_step_index == Some(1),
    )
    .await;
    let revision = st.canary_revision.clone().unwrap();
    cli(&["abort", ns, "-n", ns]);
    let st = wait_status(
        &client,
        ns,
        ns,
        "Failed after abort",
        Duration::from_secs(30),
        |s| s.phase == Some(Phase::Failed),
    )
    .await;
    assert_eq!(condition(&st, conditions::ROLLED_BACK).1, "Aborted");
    assert_eq!(st.failed_revision.as_deref(), Some(revision.as_str()));
    // Status is written before the route.
    wait_for(
        "the data plane told weight 0",
        Duration::from_secs(10),
        || async { provider.told_weight(&client, ns, ns).await == Some(0) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        status(&client, ns, ns).await.phase,
        Some(Phase::Failed),
        "no automatic retry"
    );
    say(ns, "abort: weight 0, Failed, not retried by itself");
    cli(&["retry", ns, "-n", ns]);
    wait_status(
        &client,
        ns,
        ns,
        "paused at 10% after retry",
        Duration::from_secs(60),
        |s| {
            s.canary_revision.as_deref() == Some(revision.as_str())
                && s.current_step_index == Some(1)
        },
    )
    .await;
    cli(&["promote", "--full", ns, "-n", ns]);
    let st = wait_status(
        &client,
        ns,
        ns,
        "Healthy after promote --full",
        Duration::from_secs(30),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    assert_eq!(st.stable_revision.as_deref(), Some(revision.as_str()));
    say(
        ns,
        "retry then promote --full: the retried revision is stable",
    );
    for reason in ["RolledBack", "Retried", "Promoted", "PromotedStep"] {
        assert!(
            !await_event(&client, ns, reason).await.is_empty(),
            "Event {reason}"
        );
    }
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "all answers 200: {answers:?}");
    cleanup(&client, ns).await;
}

/// A ValidatingAdmissionPolicy refusing `operation` on the Ingresses of namespace `ns`, as
/// an admission webhook that is down (or a policy) would; in force once this returns.
struct IngressRefusal(String);

async fn refuse_ingress(client: &Client, ns: &str, operation: &str) -> IngressRefusal {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let name = format!("{ns}-refuse-ingress-{}", operation.to_lowercase());
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["networking.k8s.io"], "apiVersions": ["v1"],
                "operations": [operation], "resources": ["ingresses"],
            }]},
            "validations": [{"expression": "false", "message": "the data plane's webhook is down"}],
        },
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": ns},
            }},
        },
    }))
    .unwrap();
    let post = PostParams::default();
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(&post, &policy)
        .await
        .unwrap();
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .create(&post, &binding)
        .await
        .unwrap();
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), ns);
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let dry_delete = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    wait_for(
        "the policy refusing Ingress changes",
        Duration::from_secs(30),
        || async {
            let canary = format!("{ns}-canary");
            if operation == "DELETE" {
                ingresses.delete(&canary, &dry_delete).await.is_err()
            } else {
                let probe = Patch::Merge(json!({"metadata": {"annotations": {"e2e/probe": "x"}}}));
                ingresses.patch(&canary, &dry_run, &probe).await.is_err()
            }
        },
    )
    .await;
    IngressRefusal(name)
}

impl IngressRefusal {
    async fn lift(self, client: &Client) {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let delete = DeleteParams::default();
        Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
            .delete(&self.0, &delete)
            .await
            .unwrap();
        Api::<ValidatingAdmissionPolicy>::all(client.clone())
            .delete(&self.0, &delete)
            .await
            .unwrap();
    }
}

/// s) A data-plane write refused after the status that says so was saved (an admission
///    webhook down, here a ValidatingAdmissionPolicy that refuses Ingress updates): the
///    rollback's Event and counter are not lost, and the weight follows once writes pass.
#[tokio::test]
async fn s_a_refused_traffic_write_loses_no_event() {
    let client = client().await;
    let ns = "s-refused-write";
    let provider = Provider::Nginx;
    let spec = json!({
        "strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]},
        "compatibility": {"enabled": false},
    });
    let traffic = paused_at_10(&client, provider, ns, &spec).await;
    assert_eq!(provider.told_weight(&client, ns, ns).await, Some(10));

    let refusal = refuse_ingress(&client, ns, "UPDATE").await;

    cli(&["abort", ns, "-n", ns]);
    let st = wait_status(
        &client,
        ns,
        ns,
        "the rollback saved in status",
        Duration::from_secs(30),
        |s| s.failed_revision.is_some(),
    )
    .await;
    assert_eq!(st.phase, Some(Phase::RollingBack));
    say(
        ns,
        "abort saved as RollingBack while the Ingress refuses updates",
    );
    assert!(!await_event(&client, ns, "RolledBack").await.is_empty());
    let rollbacks = format!(
        "embedroll_operator_rollbacks_total{{namespace=\"{ns}\",rollout=\"{ns}\",reason=\"Aborted\"}}"
    );
    let rolling_back = format!(
        "embedroll_operator_rollout_phase{{namespace=\"{ns}\",rollout=\"{ns}\",phase=\"RollingBack\"}}"
    );
    let value = |series: String| async move {
        let text = reqwest::get(format!("http://{OPERATOR_METRICS}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok())
    };
    let counted = || value(rollbacks.clone());
    assert_eq!(counted().await, Some(1.0), "{rollbacks}");
    assert_eq!(
        provider.told_weight(&client, ns, ns).await,
        Some(10),
        "the policy refused the weight change"
    );
    // Retried writes keep failing; the status says so instead of Failed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        status(&client, ns, ns).await.phase,
        Some(Phase::RollingBack)
    );
    assert_eq!(
        value(rolling_back.clone()).await,
        Some(1.0),
        "the phase gauge says what status says"
    );
    say(
        ns,
        "RolledBack Event and rollback counted, Ingress still at 10%, RollingBack",
    );

    refusal.lift(&client).await;
    wait_for(
        "the data plane told weight 0 once updates pass",
        Duration::from_secs(90),
        || async { provider.told_weight(&client, ns, ns).await == Some(0) },
    )
    .await;
    let st = wait_status(&client, ns, ns, "Failed", Duration::from_secs(30), |s| {
        s.phase == Some(Phase::Failed)
    })
    .await;
    assert_eq!(condition(&st, conditions::ROLLED_BACK).1, "Aborted");
    assert_eq!(counted().await, Some(1.0), "counted once");
    assert_eq!(value(rolling_back).await, Some(0.0));
    say(ns, "weight 0 and Failed once the policy is gone");
    let _ = traffic.finish().await;
    cleanup(&client, ns).await;
}

/// t) Switching spec.traffic from nginx to the Gateway API mid-rollout: the HTTPRoute takes
///    the live weight, and the Ingresses go once a Gateway accepted it (the canary Ingress
///    would otherwise keep its 10% to the canary whatever happens to it); switching back
///    removes the route.
#[tokio::test]
async fn t_switching_the_traffic_provider_removes_the_old_routes() {
    let client = client().await;
    let ns = "t-switch";
    let spec = json!({
        "strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]},
        "compatibility": {"enabled": false},
    });
    let traffic = paused_at_10(&client, Provider::Nginx, ns, &spec).await;
    assert_eq!(ingress_weight(&client, ns, ns).await, Some(10));
    let _ = traffic.finish().await;

    // Deleting Ingresses refused at first (a Role without the verb, say): the switch goes on
    // and says what it could not delete.
    let refusal = refuse_ingress(&client, ns, "DELETE").await;
    apply(
        &client,
        ns,
        &Provider::GatewayApi.manifest(ns, &["--max-batch-tokens", "8192"], spec.clone()),
    )
    .await;
    wait_for(
        "the route at the live weight",
        Duration::from_secs(60),
        || async { route_weight(&client, ns, ns).await == Some(10) },
    )
    .await;
    assert!(!await_event(&client, ns, "PruneFailed").await.is_empty());
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), ns);
    assert_eq!(
        ingresses
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2,
        "kept while deleting is refused"
    );
    say(
        ns,
        "Ingress deletes refused: PruneFailed, the route at 10% all the same",
    );
    refusal.lift(&client).await;
    wait_for(
        "the route at the live weight and the Ingresses gone",
        Duration::from_secs(60),
        || async {
            route_weight(&client, ns, ns).await == Some(10)
                && ingresses
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .is_empty()
        },
    )
    .await;
    let st = status(&client, ns, ns).await;
    assert_eq!(condition(&st, conditions::TRAFFIC_ROUTED).0, "True");
    assert_eq!(st.canary_weight, 10, "the rollout stayed where it was");
    wait_answering(
        &Provider::GatewayApi.base(),
        &host(ns),
        "an embedding through the Gateway",
    )
    .await;
    say(
        ns,
        "nginx -> Gateway API at 10%: route at 10%, Ingresses deleted",
    );

    apply(
        &client,
        ns,
        &Provider::Nginx.manifest(ns, &["--max-batch-tokens", "8192"], spec),
    )
    .await;
    wait_for(
        "the Ingresses back and the route gone",
        Duration::from_secs(60),
        || async {
            ingress_weight(&client, ns, ns).await == Some(10)
                && http_routes(&client, ns)
                    .get_opt(ns)
                    .await
                    .unwrap()
                    .is_none()
        },
    )
    .await;
    let st = status(&client, ns, ns).await;
    assert!(
        st.conditions
            .iter()
            .all(|c| c.type_ != conditions::TRAFFIC_ROUTED),
        "no route left to report on: {:?}",
        st.conditions
    );
    wait_answering(
        &Provider::Nginx.base(),
        &host(ns),
        "an embedding through nginx",
    )
    .await;
    say(ns, "Gateway API -> nginx: Ingress at 10%, route deleted");
    cleanup(&client, ns).await;
}

/// i) A newer revision arriving mid-rollout supersedes the canary: its weight drops to 0 until
///    the newest revision is Ready, and the newest one is what gets promoted.
#[tokio::test]
async fn i_newer_revision_supersedes_the_canary() {
    i_newer_revision_supersedes_the_canary_with(Provider::Nginx, "i-supersede").await;
}

/// The same on Gateway API.
#[tokio::test]
async fn i_newer_revision_supersedes_the_canary_on_gateway_api() {
    i_newer_revision_supersedes_the_canary_with(Provider::GatewayApi, "i-supersede-gw").await;
}

async fn i_newer_revision_supersedes_the_canary_with(provider: Provider, ns: &str) {
    let client = client().await;
    let spec =
        json!({"strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]}});
    let traffic = paused_at_10(&client, provider, ns, &spec).await;
    let first = status(&client, ns, ns).await.canary_revision.unwrap();
    apply(
        &client,
        ns,
        &provider.manifest(ns, &["--max-batch-tokens", "2048"], spec),
    )
    .await;
    let st = wait_status(
        &client,
        ns,
        ns,
        "a new canary revision",
        Duration::from_secs(30),
        |s| s.canary_revision.as_deref().is_some_and(|r| r != first),
    )
    .await;
    let second = st.canary_revision.clone().unwrap();
    assert_eq!(
        st.stable_color.map(|c| c.to_string()).as_deref(),
        Some("blue"),
        "stable untouched"
    );
    assert_eq!(
        st.canary_color.map(|c| c.to_string()).as_deref(),
        Some("green")
    );
    assert!(
        st.canary_weight == 0 || st.current_step_index == Some(0),
        "restarts from the first step"
    );
    assert!(!await_event(&client, ns, "Superseded").await.is_empty());
    wait_status(
        &client,
        ns,
        ns,
        "second canary paused at 10%",
        Duration::from_secs(60),
        |s| {
            s.canary_revision.as_deref() == Some(second.as_str()) && s.current_step_index == Some(1)
        },
    )
    .await;
    cli(&["promote", "--full", ns, "-n", ns]);
    let st = wait_status(&client, ns, ns, "Healthy", Duration::from_secs(30), |s| {
        s.phase == Some(Phase::Healthy)
    })
    .await;
    assert_eq!(st.stable_revision.as_deref(), Some(second.as_str()));
    say(
        ns,
        format!("canary {first} superseded by {second}, which was promoted"),
    );
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "all answers 200: {answers:?}");
    cleanup(&client, ns).await;
}

/// j) `kubectl apply -f config/samples/` gives working rollouts: each goes Healthy and serves
///    embeddings through nginx on its host, and `kubectl get er` tells it. The custom-query
///    sample is then upgraded (its interval shortened to seconds) and promoted through every
///    step on its own PromQL checks, so those queries are proven to parse and return data.
#[tokio::test]
async fn j_config_samples_work() {
    let client = client().await;
    let ns = "j-samples";
    start_operator();
    namespace(&client, ns).await;
    let samples = format!("{}/../config/samples/", env("CARGO_MANIFEST_DIR"));
    kubectl(&["apply", "-n", ns, "-f", &samples]);
    // (name, host, entry point): the Gateway API sample answers on the Gateway's listener.
    let (ingress, gateway) = (env("INGRESS_URL"), env("GATEWAY_URL"));
    let hosts = [
        ("minilm", "embed.example.com", &ingress),
        ("minilm-full", "embed-full.example.com", &ingress),
        ("minilm-custom", "embed-custom.example.com", &ingress),
        ("minilm-gateway", "embed-gateway.example.com", &gateway),
    ];
    for (name, _, _) in hosts {
        wait_status(
            &client,
            ns,
            name,
            &format!("sample {name} Healthy"),
            Duration::from_secs(180),
            |s| s.phase == Some(Phase::Healthy),
        )
        .await;
    }
    wait_ingress_settled(&client, ns).await;
    let http = reqwest::Client::new();
    for (name, host, base) in hosts {
        let url = format!("{base}/api/v1/embed");
        let post = || {
            http.post(&url)
                .header("Host", host)
                .json(&json!({"texts": ["a sample rollout"]}))
                .send()
        };
        wait_for(
            &format!("an embedding from {name} through Traefik"),
            Duration::from_secs(30),
            || async { post().await.is_ok_and(|r| r.status() == 200) },
        )
        .await;
        let answer: Value = post().await.unwrap().json().await.unwrap();
        let dims = answer["embeddings"][0].as_array().map_or(0, Vec::len);
        assert_eq!(dims, 384, "{name}: {answer}");
    }
    say(
        "j",
        format!("kubectl get er:\n{}", kubectl(&["get", "er", "-n", ns])),
    );

    let name = "minilm-custom";
    let before = status(&client, ns, name).await.stable_revision.unwrap();
    let traffic = Traffic::start("embed-custom.example.com".to_owned(), 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    kubectl(&[
        "patch",
        "er",
        name,
        "-n",
        ns,
        "--type",
        "json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/analysis/interval", "value": "4s"},
            {"op": "replace", "path": "/spec/analysis/minRequests", "value": 3},
            {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--max-batch-tokens=8192"}]"#,
    ]);
    let st = wait_status(
        &client,
        ns,
        name,
        "the custom-query sample promoted",
        Duration::from_secs(180),
        |s| {
            s.phase == Some(Phase::Healthy) && s.stable_revision.as_deref() != Some(before.as_str())
        },
    )
    .await;
    let checks = st.analysis.clone().unwrap_or_default().metrics;
    let named: Vec<(String, Option<String>)> = checks
        .iter()
        .map(|m| (m.name.clone(), m.value.clone()))
        .collect();
    say("j", format!("custom checks at the last step: {named:?}"));
    for want in [
        "p99-latency",
        "non-2xx-ratio",
        "tokens-per-request-vs-stable",
    ] {
        let check = checks.iter().find(|m| m.name == want);
        assert!(
            check
                .is_some_and(|m| m.value.is_some()
                    && m.result == embedroll_operator::crd::CheckResult::Passed),
            "{want} evaluated and passed: {checks:?}"
        );
    }
    assert!(
        !await_event(&client, ns, "Promoted").await.is_empty(),
        "Promoted event"
    );
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "all answers 200: {answers:?}");
    cleanup(&client, ns).await;
}

/// The color the primary Ingress sends to (`<name>-<color>`).
async fn primary_color(client: &Client, ns: &str, name: &str) -> Option<String> {
    let api: Api<Ingress> = Api::namespaced(client.clone(), ns);
    let ingress = api.get_opt(name).await.unwrap()?;
    let service = ingress
        .spec?
        .rules?
        .first()?
        .http
        .as_ref()?
        .paths
        .first()?
        .backend
        .service
        .clone()?;
    service
        .name
        .strip_prefix(&format!("{name}-"))
        .map(str::to_owned)
}

/// `kubectl delete --cascade=orphan` (children stay, status is gone) and the same manifest
/// applied again, as a GitOps replace or a backup restore does. Returns every canary weight
/// and primary color nginx was told from the delete until `settled` holds.
async fn orphan_and_reapply<F>(
    client: &Client,
    ns: &str,
    manifest: &Value,
    settled: F,
) -> (Vec<i32>, Vec<String>)
where
    F: Fn(&EmbeddingRolloutStatus) -> bool,
{
    let mut weights = vec![ingress_weight(client, ns, ns).await.unwrap_or(-1)];
    let mut colors = vec![primary_color(client, ns, ns).await.unwrap_or_default()];
    kubectl(&[
        "delete",
        "er",
        ns,
        "-n",
        ns,
        "--cascade=orphan",
        "--wait=true",
    ]);
    apply(client, ns, manifest).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let weight = ingress_weight(client, ns, ns).await.unwrap_or(-1);
        let color = primary_color(client, ns, ns).await.unwrap_or_default();
        if weights.last() != Some(&weight) {
            weights.push(weight);
        }
        if colors.last() != Some(&color) {
            colors.push(color);
        }
        let st = status(client, ns, ns).await;
        if st.phase.is_some() && settled(&st) {
            // A little longer: nothing may move after it settled either.
            tokio::time::sleep(Duration::from_secs(2)).await;
            weights.push(ingress_weight(client, ns, ns).await.unwrap_or(-1));
            colors.push(primary_color(client, ns, ns).await.unwrap_or_default());
            weights.dedup();
            colors.dedup();
            return (weights, colors);
        }
        assert!(
            Instant::now() < deadline,
            "re-created rollout did not settle: {}",
            serde_json::to_string_pretty(&st).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// k) Lost status is not a first install: the rollout is orphan-deleted and re-applied
///    Healthy, mid-rollout at 10%, and after an abort. The serving color never changes, the
///    canary resumes at its weight, an aborted revision stays failed and gets no traffic, and
///    every answer under traffic is a 200.
#[tokio::test]
async fn k_lost_status_is_rebuilt_from_the_live_objects() {
    let client = client().await;
    let ns = "k-lost";
    let spec = json!({
        "strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]},
        // What is tested here is status recovery, not latency: a loose limit keeps a canary
        // that loads its model beside traffic on 2 cores from being rolled back for it.
        "analysis": {"metrics": [{"name": "p95-latency", "preset": "LatencyP95", "max": "2s"}]}
    });
    let r1 = rollout_manifest(ns, &[], spec.clone());
    install(&client, ns, &r1).await;
    let traffic = Traffic::start(host(ns), 2);

    // Healthy on blue.
    let (weights, colors) =
        orphan_and_reapply(&client, ns, &r1, |s| s.phase == Some(Phase::Healthy)).await;
    say(
        "k",
        format!("Healthy re-applied: weights {weights:?}, primary {colors:?}"),
    );
    assert_eq!(colors, ["blue"], "the serving color is unchanged");
    assert_eq!(weights, [0]);
    await_event(&client, ns, "StatusRecovered").await;

    // Mid-rollout, held at 10% by the pause.
    let r2 = rollout_manifest(ns, &["--max-batch-tokens", "8192"], spec.clone());
    apply(&client, ns, &r2).await;
    let before = wait_status(
        &client,
        ns,
        ns,
        "paused at 10%",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::Paused) && s.current_step_index == Some(1),
    )
    .await;
    wait_for("nginx told 10", Duration::from_secs(10), || async {
        ingress_weight(&client, ns, ns).await == Some(10)
    })
    .await;
    let (weights, colors) = orphan_and_reapply(&client, ns, &r2, |s| {
        s.phase == Some(Phase::Paused) && s.current_step_index == Some(1)
    })
    .await;
    say(
        "k",
        format!("re-applied at 10%: weights {weights:?}, primary {colors:?}"),
    );
    assert_eq!(weights, [10], "resumed at 10%, nothing else ever set");
    assert_eq!(colors, ["blue"]);
    let after = status(&client, ns, ns).await;
    assert_eq!(after.canary_revision, before.canary_revision);
    assert_eq!(
        after.canary_color,
        Some(embedroll_operator::crd::Color::Green)
    );
    // Every request through the re-applies so far was answered with a 200: Traefik swaps its
    // configuration whole when the Ingresses are re-applied with their new owner. (Scaling
    // down below ends serving pods: its traffic is counted separately.)
    let answers = traffic.finish().await;
    say(
        "k",
        format!("answers through two re-applies: {:?}", answers.codes),
    );
    assert!(answers.all_ok(), "every request answered 200: {answers:?}");

    // `kubectl scale` (what an HPA does) during the rollout: both colors follow under Full,
    // and the scale subresource counts the Ready pods of both.
    kubectl(&["scale", "er", ns, "-n", ns, "--replicas", "2"]);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for("both colors at 2 pods", Duration::from_secs(60), || async {
        let mut sizes = Vec::new();
        for color in ["blue", "green"] {
            let d = deployments.get(&format!("{ns}-{color}")).await.unwrap();
            sizes.push(d.status.and_then(|s| s.ready_replicas).unwrap_or(0));
        }
        sizes == [2, 2]
    })
    .await;
    let scaled = wait_status(
        &client,
        ns,
        ns,
        "status.replicas 4",
        Duration::from_secs(30),
        |s| s.replicas == 4,
    )
    .await;
    assert_eq!(
        scaled.selector.as_deref(),
        Some(format!("embedroll.dev/rollout={ns}").as_str())
    );
    assert_eq!(scaled.canary_weight, 10, "scaling does not move traffic");
    let scale = kubectl(&[
        "get",
        "--raw",
        &format!("/apis/embedroll.dev/v1alpha1/namespaces/{ns}/embeddingrollouts/{ns}/scale"),
    ]);
    say(
        "k",
        format!("scale subresource during the rollout: {scale}"),
    );
    kubectl(&["scale", "er", ns, "-n", ns, "--replicas", "1"]);
    wait_for(
        "both colors back at 1 pod",
        Duration::from_secs(60),
        || async {
            let mut sizes = Vec::new();
            for color in ["blue", "green"] {
                let d = deployments.get(&format!("{ns}-{color}")).await.unwrap();
                let status = d.status.unwrap_or_default();
                sizes.push((
                    status.replicas.unwrap_or(0),
                    status.ready_replicas.unwrap_or(0),
                ));
            }
            sizes == [(1, 1), (1, 1)]
        },
    )
    .await;
    // The removed pods leave the Services' EndpointSlices, then nginx's configuration.
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    wait_for(
        "one endpoint per color",
        Duration::from_secs(60),
        || async {
            let mut counts = Vec::new();
            for color in ["blue", "green"] {
                let selector = format!("kubernetes.io/service-name={ns}-{color}");
                let list = slices
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .unwrap();
                counts.push(
                    list.items
                        .iter()
                        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
                        .sum::<usize>(),
                );
            }
            counts == [1, 1]
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_ingress_settled(&client, ns).await;
    let traffic = Traffic::start(host(ns), 2);
    cli(&["promote", ns, "-n", ns]);
    wait_status(&client, ns, ns, "promoted", Duration::from_secs(60), |s| {
        s.phase == Some(Phase::Healthy) && s.stable_revision == before.canary_revision
    })
    .await;

    // Aborted: stable green at r2, r3 aborted on blue.
    let r3 = rollout_manifest(ns, &["--max-batch-tokens", "4096"], spec);
    apply(&client, ns, &r3).await;
    wait_status(
        &client,
        ns,
        ns,
        "r3 paused at 10%",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::Paused) && s.current_step_index == Some(1),
    )
    .await;
    cli(&["abort", ns, "-n", ns]);
    let aborted = wait_status(
        &client,
        ns,
        ns,
        "Failed after abort",
        Duration::from_secs(30),
        |s| s.phase == Some(Phase::Failed),
    )
    .await;
    let (weights, colors) =
        orphan_and_reapply(&client, ns, &r3, |s| s.phase == Some(Phase::Failed)).await;
    say(
        "k",
        format!("re-applied after abort: weights {weights:?}, primary {colors:?}"),
    );
    assert_eq!(weights, [0], "the aborted revision takes no traffic");
    assert_eq!(colors, ["green"], "the good revision keeps serving");
    let st = status(&client, ns, ns).await;
    assert_eq!(st.failed_revision, aborted.failed_revision);
    assert_eq!(st.stable_revision, before.canary_revision);
    let blue_before = served_by(&client, ns, ns, "blue").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Its pods may be scaled down meanwhile (their counters go with them); never up.
    let blue_after = served_by(&client, ns, ns, "blue").await;
    assert!(
        blue_after <= blue_before,
        "no request reaches the aborted revision: {blue_before} then {blue_after}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let green = deployments.get(&format!("{ns}-green")).await.unwrap();
    assert!(
        green
            .owner_references()
            .iter()
            .any(|r| r.kind == "EmbeddingRollout"),
        "the orphaned Deployments are adopted again"
    );
    let answers = traffic.finish().await;
    say("k", format!("answers: {:?}", answers.codes));
    assert!(answers.all_ok(), "every request answered 200: {answers:?}");
    cleanup(&client, ns).await;
}

// ------------------------------------------------------------------ Gateway API

/// A rollout whose traffic goes through the Gateway API: the Gateway the local cluster runs
/// (Traefik's Gateway provider), an HTTPRoute the operator owns.
fn gateway_manifest(name: &str, extra_args: &[&str], parent: &str) -> Value {
    let mut manifest = rollout_manifest(name, extra_args, json!({"analysis": {"interval": "4s"}}));
    manifest["spec"]["traffic"] = json!({"gatewayAPI": {
        "parentRefs": [{"name": parent, "namespace": env("GATEWAY_NAMESPACE")}],
        "hostnames": [host(name)],
        "paths": ["/api/v1/embed"],
    }});
    manifest
}

/// Waits until the rollout holds a new revision at 0% with `TrafficRouted` `status`, and
/// returns the condition's reason and message.
async fn wait_held_at_0(client: &Client, ns: &str, status: &str) -> (String, String) {
    let held = wait_status(
        client,
        ns,
        ns,
        &format!("TrafficRouted {status}, holding at 0%"),
        Duration::from_secs(90),
        |s| {
            s.phase == Some(Phase::Progressing)
                && conditions::get(&s.conditions, "TrafficRouted")
                    .is_some_and(|c| c.status == status)
                && s.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("holding 0%"))
        },
    )
    .await;
    let (_, reason, message) = condition(&held, "TrafficRouted");
    say(ns, format!("held: {reason}: {message}"));
    (reason, message)
}

/// m) Gateway API: a first install answers through the Gateway; an upgrade walks 1 -> 10 ->
///    50 -> 100 with each color's share counted by its pods at every weight; a revision whose
///    HTTPRoute no Gateway accepts (a parentRef to a missing Gateway) holds at 0% with
///    `TrafficRouted` False saying why, and goes on once the route is fixed.
#[tokio::test]
async fn m_gateway_api_routes_weights_and_holds_an_unaccepted_route() {
    let client = client().await;
    let ns = "m-gateway";
    let gateway = env("GATEWAY_NAME");
    let base = env("GATEWAY_URL");
    install_at(&client, ns, &gateway_manifest(ns, &[], &gateway), &base).await;
    let st = wait_status(
        &client,
        ns,
        ns,
        "TrafficRouted True",
        Duration::from_secs(30),
        |s| conditions::get(&s.conditions, "TrafficRouted").is_some_and(|c| c.status == "True"),
    )
    .await;
    let (_, reason, message) = condition(&st, "TrafficRouted");
    say("m", format!("TrafficRouted: {reason}: {message}"));
    let route = http_routes(&client, ns).get(ns).await.unwrap();
    say("m", format!("HTTPRoute status: {}", route.data["status"]));

    let traffic = Traffic::start_at(&base, host(ns), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply(
        &client,
        ns,
        &gateway_manifest(ns, &["--max-batch-tokens", "8192"], &gateway),
    )
    .await;
    check_shares_at_every_weight(&client, ns, "m").await;
    let st = status(&client, ns, ns).await;
    assert_eq!(
        st.stable_color.map(|c| c.to_string()).as_deref(),
        Some("green")
    );
    let answers = traffic.finish().await;
    say(
        "m",
        format!("answers during the rollout: {:?}", answers.codes),
    );
    assert!(
        answers.all_ok(),
        "no failed request during the rollout: {answers:?}"
    );

    // A new revision on a route no Gateway reports on: it holds at 0%, and says why.
    apply(
        &client,
        ns,
        &gateway_manifest(ns, &["--max-batch-tokens", "4096"], "missing"),
    )
    .await;
    let (reason, message) = wait_held_at_0(&client, ns, "Unknown").await;
    assert_eq!(reason, "RouteNotReported");
    assert!(message.contains("/missing"), "names the parent: {message}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let still = status(&client, ns, ns).await;
    assert_eq!(still.canary_weight, 0, "no weight on an unaccepted route");
    assert_eq!(still.phase, Some(Phase::Progressing));

    // The route fixed: answered through the Gateway again, the rollout goes on to the end
    // (the steps need canary traffic for their analysis).
    apply(
        &client,
        ns,
        &gateway_manifest(ns, &["--max-batch-tokens", "4096"], &gateway),
    )
    .await;
    wait_answering(&base, &host(ns), "an embedding through the Gateway again").await;
    let traffic = Traffic::start_at(&base, host(ns), 4);
    wait_status(
        &client,
        ns,
        ns,
        "promoted after the fix",
        Duration::from_secs(180),
        |s| {
            s.phase == Some(Phase::Healthy)
                && s.stable_color.map(|c| c.to_string()).as_deref() == Some("blue")
        },
    )
    .await;
    let (routed, _, _) = condition(&status(&client, ns, ns).await, "TrafficRouted");
    assert_eq!(routed, "True");
    let answers = traffic.finish().await;
    say("m", format!("answers after the fix: {:?}", answers.codes));
    assert!(
        answers.all_ok(),
        "no failed request after the fix: {answers:?}"
    );
    cleanup(&client, ns).await;
}

/// The HTTPRoute a team keeps in Git for rollout `name` (referenced mode): the rollout's two
/// color Services on the embed path, behind a filter the operator must leave alone, and a
/// second rule to the stable Service it must not touch either. `colors` lists the color
/// backendRefs with their weights.
fn team_route(name: &str, colors: &[(&str, i64)]) -> Value {
    let refs: Vec<Value> = colors
        .iter()
        .map(|(color, weight)| json!({"name": format!("{name}-{color}"), "port": 8080, "weight": weight}))
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "team-route"},
        "spec": {
            "parentRefs": [{"name": env("GATEWAY_NAME"), "namespace": env("GATEWAY_NAMESPACE")}],
            "hostnames": [host(name)],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api/v1/embed"}}],
                 "filters": [{"type": "ResponseHeaderModifier",
                              "responseHeaderModifier": {"add": [{"name": "X-Team-Route", "value": "kept"}]}}],
                 "backendRefs": refs},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/health"}}],
                 "backendRefs": [{"name": name, "port": 8080}]}
            ]
        }
    })
}

/// Whether everything in `written` is in `live` as written (objects may have more keys: the
/// API's defaults; lists keep their length and order).
fn written_kept(written: &Value, live: &Value) -> bool {
    match (written, live) {
        (Value::Object(w), Value::Object(l)) => w
            .iter()
            .all(|(k, v)| l.get(k).is_some_and(|lv| written_kept(v, lv))),
        (Value::Array(w), Value::Array(l)) => {
            w.len() == l.len() && w.iter().zip(l).all(|(a, b)| written_kept(a, b))
        }
        (w, l) => w == l,
    }
}

/// Applies the team's route as its own field manager (as a GitOps tool would).
async fn apply_team_route(client: &Client, ns: &str, route: &Value) {
    http_routes(client, ns)
        .patch(
            "team-route",
            &PatchParams::apply("team-gitops").force(),
            &Patch::Apply(route),
        )
        .await
        .unwrap();
}

/// o) Gateway API, referenced mode: the team's own HTTPRoute (a filter, a second rule) is
///    named by `httpRouteRef`. The operator sets only the weights of the color backendRefs,
///    through 1 -> 10 -> 50 -> 100 with each color's share counted by its pods, and the rest
///    of the route stays as the team wrote it. A route whose rule lists one color only holds
///    the next revision at 0% with `TrafficRouted` False naming the missing Service; fixed, the
///    revision goes on.
#[tokio::test]
async fn o_gateway_api_referenced_route_gets_only_its_weights_set() {
    let client = client().await;
    let ns = "o-referenced";
    let base = env("GATEWAY_URL");
    let manifest = |args: &[&str]| {
        let mut m = rollout_manifest(ns, args, json!({"analysis": {"interval": "4s"}}));
        m["spec"]["traffic"] = json!({"gatewayAPI": {"httpRouteRef": {"name": "team-route"}}});
        m
    };
    start_operator();
    namespace(&client, ns).await;
    let written = team_route(ns, &[("blue", 100), ("green", 0)]);
    apply_team_route(&client, ns, &written).await;
    apply(&client, ns, &manifest(&[])).await;
    wait_status(
        &client,
        ns,
        ns,
        "first install Healthy",
        Duration::from_secs(120),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    wait_answering(&base, &host(ns), "an embedding through the team's route").await;
    wait_ingress_settled(&client, ns).await;
    let st = wait_status(
        &client,
        ns,
        ns,
        "TrafficRouted True",
        Duration::from_secs(30),
        |s| conditions::get(&s.conditions, "TrafficRouted").is_some_and(|c| c.status == "True"),
    )
    .await;
    say(
        ns,
        format!("TrafficRouted: {:?}", condition(&st, "TrafficRouted")),
    );
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/embed"))
        .header("Host", host(ns))
        .json(&json!({"texts": ["hello"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("x-team-route")
            .map(|v| v.to_str().unwrap()),
        Some("kept"),
        "answered through the team's route, filter included"
    );

    let traffic = Traffic::start_at(&base, host(ns), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply(&client, ns, &manifest(&["--max-batch-tokens", "8192"])).await;
    check_shares_at_every_weight(&client, ns, ns).await;
    let answers = traffic.finish().await;
    say(
        ns,
        format!("answers during the rollout: {:?}", answers.codes),
    );
    assert!(
        answers.all_ok(),
        "no failed request during the rollout: {answers:?}"
    );

    // Only the color weights changed: the rest is as the team wrote it (the apiserver adds
    // the API's defaults, so what was written must be found as written).
    let route = http_routes(&client, ns).get("team-route").await.unwrap();
    let expected = team_route(ns, &[("blue", 0), ("green", 100)])["spec"].clone();
    assert!(
        written_kept(&expected, &route.data["spec"]),
        "only the color weights changed: wrote {expected}, live {}",
        route.data["spec"]
    );
    let managers: Vec<String> = route
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    say(ns, format!("route's field managers: {managers:?}"));
    assert!(managers.iter().any(|m| m == FIELD_MANAGER), "{managers:?}");

    // The team drops the idle color from the rule: the next revision cannot take weight.
    apply_team_route(&client, ns, &team_route(ns, &[("green", 100)])).await;
    apply(&client, ns, &manifest(&["--max-batch-tokens", "4096"])).await;
    let (reason, message) = wait_held_at_0(&client, ns, "False").await;
    assert_eq!(reason, "RouteNotAccepted");
    assert!(
        message.contains("rule 0") && message.contains(&format!("{ns}-blue")),
        "names the rule and the missing Service: {message}"
    );
    assert!(
        !await_event(&client, ns, "RouteNotAccepted")
            .await
            .is_empty()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(status(&client, ns, ns).await.canary_weight, 0);

    // Fixed (both colors listed again): the revision takes weight, and is promoted.
    apply_team_route(&client, ns, &team_route(ns, &[("blue", 0), ("green", 100)])).await;
    let traffic = Traffic::start_at(&base, host(ns), 2);
    wait_status(
        &client,
        ns,
        ns,
        "weight 1 after the fix",
        Duration::from_secs(60),
        |s| s.canary_weight >= 1,
    )
    .await;
    cli(&["promote", "--full", ns, "-n", ns]);
    wait_status(
        &client,
        ns,
        ns,
        "Healthy on blue",
        Duration::from_secs(60),
        |s| {
            s.phase == Some(Phase::Healthy)
                && s.stable_color.map(|c| c.to_string()).as_deref() == Some("blue")
        },
    )
    .await;
    wait_for(
        "the route gives blue 100",
        Duration::from_secs(10),
        || async {
            route_weight(&client, ns, "team-route").await == Some(0)
                && http_routes(&client, ns)
                    .get("team-route")
                    .await
                    .unwrap()
                    .data["spec"]["rules"][0]["backendRefs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["name"] == format!("{ns}-blue") && b["weight"] == 100)
        },
    )
    .await;
    let answers = traffic.finish().await;
    assert!(
        answers.all_ok(),
        "no failed request after the fix: {answers:?}"
    );
    cleanup(&client, ns).await;
}

/// n) `traffic.canaryHeader` reaches a canary held at 0% (a first step `pause: {}`), through
///    the real data plane, on both providers and on a team's own HTTPRoute (`httpRouteRef`,
///    with a rule of its own for the header): requests with the header are served by the
///    canary's pods only, requests without it by the stable pods only.
#[tokio::test]
async fn n_canary_header_reaches_a_0_percent_canary_on_both_providers() {
    let client = client().await;
    let ns = "n-header";
    start_operator();
    namespace(&client, ns).await;
    let header = json!({"name": "X-Embedroll-Canary", "value": "smoke"});
    let steps = json!([{"pause": {}}, {"setWeight": 50}, {"setWeight": 100}]);
    let gateway = |args: &[&str]| {
        let mut m = gateway_manifest("n-gateway", args, &env("GATEWAY_NAME"));
        m["spec"]["traffic"]["canaryHeader"] = header.clone();
        m["spec"]["strategy"]["steps"] = steps.clone();
        m
    };
    let nginx = |args: &[&str]| {
        let mut m = rollout_manifest("n-nginx", args, json!({}));
        m["spec"]["traffic"]["canaryHeader"] = header.clone();
        m["spec"]["strategy"]["steps"] = steps.clone();
        m
    };
    // The team's route: its own rule for the header (the name in lower case: HTTP header
    // names have no case), listing both colors like its other rule.
    let team = |args: &[&str]| {
        let mut m = rollout_manifest("n-team", args, json!({}));
        m["spec"]["traffic"] = json!({"gatewayAPI": {"httpRouteRef": {"name": "team-route"}},
                                      "canaryHeader": header.clone()});
        m["spec"]["strategy"]["steps"] = steps.clone();
        m
    };
    let mut route = team_route("n-team", &[("blue", 100), ("green", 0)]);
    route["spec"]["rules"].as_array_mut().unwrap().push(json!({
        "matches": [{"path": {"type": "PathPrefix", "value": "/api/v1/embed"},
                     "headers": [{"name": "x-embedroll-canary", "value": "smoke"}]}],
        "backendRefs": [{"name": "n-team-blue", "port": 8080},
                        {"name": "n-team-green", "port": 8080}]
    }));
    apply_team_route(&client, ns, &route).await;
    let providers = [
        (
            "n-team",
            env("GATEWAY_URL"),
            team(&[]),
            team(&["--max-batch-tokens", "8192"]),
        ),
        (
            "n-gateway",
            env("GATEWAY_URL"),
            gateway(&[]),
            gateway(&["--max-batch-tokens", "8192"]),
        ),
        (
            "n-nginx",
            env("INGRESS_URL"),
            nginx(&[]),
            nginx(&["--max-batch-tokens", "8192"]),
        ),
    ];
    for (name, _, first, _) in &providers {
        apply(&client, ns, first).await;
        wait_status(
            &client,
            ns,
            name,
            "first install Healthy",
            Duration::from_secs(120),
            |s| s.phase == Some(Phase::Healthy),
        )
        .await;
    }
    for (name, _, _, upgrade) in &providers {
        apply(&client, ns, upgrade).await;
        wait_status(
            &client,
            ns,
            name,
            "the canary held at 0%",
            Duration::from_secs(120),
            |s| {
                s.phase == Some(Phase::Paused)
                    && s.canary_weight == 0
                    && s.current_step_index == Some(0)
            },
        )
        .await;
    }
    wait_ingress_settled(&client, ns).await;
    let http = reqwest::Client::new();
    for (name, base, _, _) in &providers {
        let url = format!("{base}/api/v1/embed");
        let post = |with_header: bool| {
            let mut request = http
                .post(&url)
                .header("Host", host(name))
                .json(&json!({"texts": ["a header-routed request"]}));
            if with_header {
                request = request.header("X-Embedroll-Canary", "smoke");
            }
            request.send()
        };
        wait_for(
            &format!("{name}: the header reaches the canary"),
            Duration::from_secs(30),
            || async {
                let green = served_by(&client, ns, name, "green").await;
                post(true).await.is_ok_and(|r| r.status() == 200)
                    && served_by(&client, ns, name, "green").await > green
            },
        )
        .await;
        let (blue0, green0) = (
            served_by(&client, ns, name, "blue").await,
            served_by(&client, ns, name, "green").await,
        );
        for with_header in [true, false] {
            for _ in 0..20 {
                let response = post(with_header).await.unwrap();
                assert_eq!(response.status(), 200, "{name}");
            }
        }
        let (blue, green) = (
            served_by(&client, ns, name, "blue").await - blue0,
            served_by(&client, ns, name, "green").await - green0,
        );
        say(
            "n",
            format!(
                "{name} at 0%: 20 requests with the header, 20 without: canary served {green}, stable {blue}"
            ),
        );
        assert_eq!(
            (green, blue),
            (20.0, 20.0),
            "{name}: the header and only the header reaches the canary"
        );
        assert_eq!(status(&client, ns, name).await.canary_weight, 0);
    }

    // The 0% canary's one pod is deleted (an eviction): with no Ready pod for a moment it is
    // waited for, not rolled back, and the header reaches its replacement.
    let name = "n-gateway";
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("{LABEL_ROLLOUT}={name},{LABEL_COLOR}=green");
    let evicted: Vec<String> = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert!(!evicted.is_empty());
    for pod in &evicted {
        pods.delete(pod, &DeleteParams::default()).await.unwrap();
    }
    let warning = await_event(&client, ns, "CanaryUnavailable").await;
    say(
        "n",
        format!("{name}: {}", warning[0].message.clone().unwrap_or_default()),
    );
    let st = wait_status(
        &client,
        ns,
        name,
        "the canary Ready again, still held at 0% (or rolled back, reported below)",
        Duration::from_secs(120),
        |s| {
            s.failed_revision.is_some()
                || s.canary_unavailable_since.is_none()
                    && s.message
                        .as_deref()
                        .is_some_and(|m| !m.contains("no Ready pods"))
        },
    )
    .await;
    assert_eq!(
        (
            st.phase,
            st.current_step_index,
            st.canary_weight,
            st.failed_revision
        ),
        (Some(Phase::Paused), Some(0), 0, None),
        "not rolled back: {:?}",
        st.message
    );
    let url = format!("{}/api/v1/embed", env("GATEWAY_URL"));
    wait_for(
        &format!("{name}: the header reaches the new canary pod"),
        Duration::from_secs(30),
        || async {
            let green = served_by(&client, ns, name, "green").await;
            http.post(&url)
                .header("Host", host(name))
                .header("X-Embedroll-Canary", "smoke")
                .json(&json!({"texts": ["after the eviction"]}))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
                && served_by(&client, ns, name, "green").await > green
        },
    )
    .await;
    cleanup(&client, ns).await;
}

// ------------------------------------------------------------------ vector compatibility

/// The P95 latency and the error count of `n` one-text requests sent straight to a pod of
/// `color` (what the latency and error gates would measure of it).
/// The address of a pod of `color`.
async fn pod_ip(client: &Client, ns: &str, color: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("{LABEL_ROLLOUT}={ns},{LABEL_COLOR}={color}");
    pods.list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .find_map(|p| p.status.and_then(|s| s.pod_ip))
        .expect("a pod of the color")
}

async fn direct_p95(client: &Client, ns: &str, color: &str, n: usize) -> (f64, usize) {
    let pod = pod_ip(client, ns, color).await;
    let http = reqwest::Client::new();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for i in 0..n {
        let started = Instant::now();
        let ok = http
            .post(format!("http://{pod}:8080/api/v1/embed"))
            .json(&json!({"texts": [format!("direct request {i}")]}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        latencies.push(started.elapsed().as_secs_f64());
        errors += usize::from(!ok);
    }
    latencies.sort_by(f64::total_cmp);
    (latencies[(n * 95).div_ceil(100) - 1], errors)
}

/// p) A same-model revision whose vectors are wrong (`--fault-vector-noise 0.05`: fast, all
///    200s) never gets a request: the vector gate rolls it back at weight 0 with
///    `VectorMismatch`, naming the worst text and its cosine. Its own P95 and error rate,
///    measured straight at its pod, would have passed the latency and error gates.
#[tokio::test]
async fn p_wrong_vectors_never_get_traffic() {
    let client = client().await;
    let ns = "p-vectors";
    // The golden set from a ConfigMap this time (b uses the built-in one).
    let spec = json!({"strategy": {"abortScaleDownDelaySeconds": 60},
                      "compatibility": {"goldenSet": {"configMapKeyRef": {"name": "golden", "key": "texts"}}}});
    install(&client, ns, &rollout_manifest(ns, &[], spec.clone())).await;
    let texts: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "support ticket {i}: the search results for query {} look wrong",
                i * 7
            )
        })
        .collect();
    let golden: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "golden"},
        "data": {"texts": texts.join("\n")}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &golden)
        .await
        .unwrap();
    let traffic = Traffic::start(host(ns), 2);
    apply(
        &client,
        ns,
        &rollout_manifest(ns, &["--fault-vector-noise", "0.05"], spec),
    )
    .await;
    let mut weights = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        assert!(
            Instant::now() < deadline,
            "no rollback: {:?}",
            status(&client, ns, ns).await
        );
        let st = status(&client, ns, ns).await;
        weights.insert(st.canary_weight);
        weights.insert(ingress_weight(&client, ns, ns).await.unwrap_or(0));
        if st.phase == Some(Phase::Failed) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, reason, message) = condition(&st, conditions::ROLLED_BACK);
    say(ns, format!("RolledBack {reason}: {message}"));
    assert_eq!(reason, "VectorMismatch");
    assert!(
        message.contains("vectors differ from stable: min cosine") && message.contains("(text "),
        "{message}"
    );
    assert_eq!(
        weights,
        BTreeSet::from([0]),
        "weight 0 throughout (status and Ingress)"
    );
    let check = st.compatibility.clone().unwrap();
    assert_eq!(check.result, CompatibilityResult::Incompatible);
    assert_eq!(check.texts, Some(20), "the ConfigMap's texts");
    let (_, vectors_reason, _) = condition(&st, "VectorsCompatible");
    assert_eq!(vectors_reason, "VectorMismatch");
    let mismatch = await_event(&client, ns, "VectorMismatch").await;
    say(ns, format!("Event: {:?}", mismatch[0].message));
    // Not one user request reached the canary, by its own counters.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let canary_served = served_by(&client, ns, ns, "green").await;
    assert_eq!(canary_served, 0.0, "the canary served user requests");
    // What the latency and error gates would have seen of it (its pod is kept up for
    // abortScaleDownDelaySeconds): fast and error-free.
    let (p95, errors) = direct_p95(&client, ns, "green", 40).await;
    say(
        ns,
        format!(
            "the wrong canary straight at its pod: P95 {:.1}ms (limit 100ms), {errors} errors of 40 (limit 5%): the latency and error gates would have passed it",
            p95 * 1000.0
        ),
    );
    assert!(p95 < 0.1 && errors == 0, "P95 {p95}, errors {errors}");
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "stable served everything: {answers:?}");
    cleanup(&client, ns).await;
}

/// q) A model change (all-MiniLM-L6-v2 -> its fine-tune sre-embedding-model): first with
///    the wrong dimensions in `spec.model` (held: `DimensionMismatch`), then by default held
///    as `ModelChanged` with no traffic and a message that says what to set; with
///    `onIncompatible: Reindex` it serves only on the re-index route (the canary header) at
///    0%, and a promote moves 100% at once: no weight is ever set on the rollout.
#[tokio::test]
async fn q_a_model_change_is_a_reindex_cut_over() {
    let client = client().await;
    let ns = "q-reindex";
    let header = json!({"traffic": {"canaryHeader": {"name": "X-Reindex", "value": "1"}}});
    install(&client, ns, &rollout_manifest(ns, &[], header.clone())).await;
    let traffic = Traffic::start(host(ns), 2);
    let models = env("EMBEDROLL_MODELS_DIR");
    let sre_dir = format!("sre-embedding-model={models}/sre-embedding-model");
    let sre = |dimensions: i32, on_incompatible: &str| {
        let mut patch = header.clone();
        merge(
            &mut patch,
            json!({"model": {"name": "sre-embedding-model", "dimensions": dimensions},
                   "compatibility": {"onIncompatible": on_incompatible}}),
        );
        rollout_manifest(ns, &["--model", &sre_dir], patch)
    };
    // Watch every weight the rollout is ever given, in status and on the canary Ingress.
    let weights = Arc::new(Mutex::new(BTreeSet::new()));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (client, weights, watching) = (client.clone(), weights.clone(), watching.clone());
        async move {
            while watching.load(Ordering::Relaxed) {
                let st = status(&client, ns, ns).await;
                let told = ingress_weight(&client, ns, ns).await.unwrap_or(0);
                weights.lock().unwrap().extend([st.canary_weight, told]);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // spec.model says 768 dimensions; the pods answer 384.
    apply(&client, ns, &sre(768, "Block")).await;
    let held = wait_status(
        &client,
        ns,
        ns,
        "DimensionMismatch",
        Duration::from_secs(120),
        |s| {
            conditions::get(&s.conditions, "VectorsCompatible")
                .is_some_and(|c| c.reason == "DimensionMismatch")
        },
    )
    .await;
    let (_, _, message) = condition(&held, "VectorsCompatible");
    say(ns, format!("held: DimensionMismatch: {message}"));
    assert!(
        message.contains("384") && message.contains("768"),
        "{message}"
    );
    assert_eq!(held.phase, Some(Phase::Paused));

    // Right dimensions, default Block: held as a model change, saying what to set.
    apply(&client, ns, &sre(384, "Block")).await;
    let held = wait_status(
        &client,
        ns,
        ns,
        "ModelChanged",
        Duration::from_secs(120),
        |s| {
            conditions::get(&s.conditions, "VectorsCompatible")
                .is_some_and(|c| c.reason == "ModelChanged")
                && s.phase == Some(Phase::Paused)
        },
    )
    .await;
    let message = held.message.clone().unwrap_or_default();
    say(ns, format!("held: {message}"));
    assert!(
        message.contains("all-MiniLM-L6-v2") && message.contains("onIncompatible: Reindex"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        served_by(&client, ns, ns, "green").await,
        0.0,
        "no traffic while held"
    );

    // Reindex: served at 0% on the header route only.
    apply(&client, ns, &sre(384, "Reindex")).await;
    let st = wait_status(
        &client,
        ns,
        ns,
        "AwaitingReindex",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::AwaitingReindex),
    )
    .await;
    say(
        ns,
        format!(
            "AwaitingReindex: {}",
            st.message.clone().unwrap_or_default()
        ),
    );
    wait_ingress_settled(&client, ns).await;
    let base = env("INGRESS_URL");
    let http = reqwest::Client::new();
    let embed = |reindex: bool| {
        let mut request = http
            .post(format!("{base}/api/v1/embed"))
            .header("Host", host(ns))
            .json(&json!({"texts": ["kubernetes rollout of an embedding model"]}));
        if reindex {
            request = request.header("X-Reindex", "1");
        }
        async move {
            let answer: Value = request.send().await.unwrap().json().await.unwrap();
            answer["embeddings"][0]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<f64>>()
        }
    };
    let green_before = served_by(&client, ns, ns, "green").await;
    let (new_model, old_model) = (embed(true).await, embed(false).await);
    for _ in 0..9 {
        embed(true).await;
    }
    let cosine: f64 = new_model.iter().zip(&old_model).map(|(a, b)| a * b).sum();
    say(
        ns,
        format!("the same text on the re-index route and on the user route: cosine {cosine:.3}"),
    );
    assert!(
        cosine < 0.99,
        "the re-index route serves the new model: cosine {cosine}"
    );
    assert_eq!(
        served_by(&client, ns, ns, "green").await - green_before,
        10.0,
        "the new model served the header's requests, and the user traffic none of its own"
    );

    // Promote: 100% at once.
    cli(&["promote", ns, "-n", ns]);
    let st = wait_status(
        &client,
        ns,
        ns,
        "Healthy on the new model",
        Duration::from_secs(60),
        |s| s.phase == Some(Phase::Healthy),
    )
    .await;
    assert_eq!(
        st.stable_color.map(|c| c.to_string()).as_deref(),
        Some("green")
    );
    wait_for(
        "users on the new model",
        Duration::from_secs(15),
        || async {
            let cosine: f64 = embed(false)
                .await
                .iter()
                .zip(&new_model)
                .map(|(a, b)| a * b)
                .sum();
            cosine > 0.9999
        },
    )
    .await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    let weights = weights.lock().unwrap().clone();
    say(ns, format!("weights ever set: {weights:?}"));
    assert_eq!(weights, BTreeSet::from([0]), "no weight was ever set");
    assert!(events(&client, ns, "WeightUpdated").await.is_empty());
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "every user request answered: {answers:?}");
    cleanup(&client, ns).await;
}

/// The `/info` of a pod of `color`, asked straight at the pod.
async fn pod_info(client: &Client, ns: &str, color: &str) -> Value {
    let ip = pod_ip(client, ns, color).await;
    reqwest::get(format!("http://{ip}:8080/info"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// r) The same model moved from f32 to `--quantize int8` (a quarter of the weight memory,
///    about twice the speed): its vectors are within about 0.99 cosine of f32's, not 0.999,
///    so with the default `minCosine` the vector gate rolls it back at weight 0
///    (`VectorMismatch`). The team accepts int8's accuracy with `minCosine: 0.98`, retries,
///    and the same revision passes the gate and walks every step to 100%.
#[tokio::test]
async fn r_int8_is_gated_by_min_cosine() {
    let client = client().await;
    let ns = "r-int8";
    let spec = json!({"strategy": {"abortScaleDownDelaySeconds": 30}});
    install(&client, ns, &rollout_manifest(ns, &[], spec.clone())).await;
    let traffic = Traffic::start(host(ns), 2);
    let int8 = ["--quantize", "int8"];
    apply(&client, ns, &rollout_manifest(ns, &int8, spec.clone())).await;
    let mut weights = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st = status(&client, ns, ns).await;
        assert!(Instant::now() < deadline, "no rollback: {st:?}");
        weights.insert(st.canary_weight);
        if st.phase == Some(Phase::Failed) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, reason, message) = condition(&st, conditions::ROLLED_BACK);
    say(
        ns,
        format!("default minCosine 0.999: RolledBack {reason}: {message}"),
    );
    assert_eq!(reason, "VectorMismatch");
    assert_eq!(weights, BTreeSet::from([0]), "int8 took no traffic");
    let check = st.compatibility.clone().unwrap();
    assert_eq!(check.result, CompatibilityResult::Incompatible);
    let min: f64 = check.min_cosine.as_deref().unwrap().parse().unwrap();
    assert!((0.98..0.999).contains(&min), "int8 vs f32 min cosine {min}");
    // The canary that was refused really is the int8 build (its pod is kept for 30 s).
    let info = pod_info(&client, ns, "green").await;
    assert_eq!(info["models"][0]["quantization"], "int8", "{info}");

    // Accept int8's accuracy and retry the same revision.
    let relaxed = json!({"strategy": {"abortScaleDownDelaySeconds": 30},
                         "compatibility": {"minCosine": 0.98}});
    apply(&client, ns, &rollout_manifest(ns, &int8, relaxed)).await;
    cli(&["retry", ns, "-n", ns]);
    wait_status(
        &client,
        ns,
        ns,
        "the retry taken",
        Duration::from_secs(30),
        |s| s.failed_revision.is_none(),
    )
    .await;
    await_event(&client, ns, "Retried").await;
    let mut weights = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let st = loop {
        let st = status(&client, ns, ns).await;
        assert!(Instant::now() < deadline, "int8 not promoted: {st:?}");
        weights.insert(st.canary_weight);
        if st.phase == Some(Phase::Healthy)
            && st.stable_color.map(|c| c.to_string()).as_deref() == Some("green")
        {
            break st;
        }
        assert_ne!(st.phase, Some(Phase::Failed), "rolled back again: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let check = st.compatibility.clone().expect("a vector check");
    say(
        ns,
        format!(
            "minCosine 0.98: {:?} {:?}: {}; weights seen {weights:?}",
            check.stage, check.result, check.message
        ),
    );
    assert_eq!(check.result, CompatibilityResult::Compatible);
    for weight in [1, 10, 50, 100] {
        assert!(
            weights.contains(&weight),
            "{weight}% not walked: {weights:?}"
        );
    }
    let info = pod_info(&client, ns, "green").await;
    assert_eq!(info["models"][0]["quantization"], "int8", "{info}");
    let answers = traffic.finish().await;
    assert!(answers.all_ok(), "no failed request: {answers:?}");
    cleanup(&client, ns).await;
}

// ------------------------------------------------------------------ API load

/// The apiserver's own count of requests (`apiserver_request_total`) to the kinds only the
/// operator writes, by verb. Deployment status is left out: the deployment controller writes
/// it.
fn apiserver_requests() -> BTreeMap<String, f64> {
    let text = kubectl(&["get", "--raw", "/metrics"]);
    let mut by_verb = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let resource = label("resource");
        let subresource = label("subresource");
        let operator_kind = matches!(
            resource.as_str(),
            "deployments" | "services" | "ingresses" | "embeddingrollouts"
        );
        if !operator_kind || (resource == "deployments" && subresource == "status") {
            continue;
        }
        *by_verb.entry(label("verb")).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    by_verb
}

fn operator_reconciles() -> f64 {
    let text = Command::new("curl")
        .args(["-s", &format!("http://{OPERATOR_METRICS}/metrics")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("embedroll_operator_reconciles_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(f64::NAN)
}

/// Requests by verb made while `window` passes, and the reconciles the operator ran. Nothing
/// else talks to the apiserver about these kinds meanwhile (the test does not poll).
async fn measure(window: Duration) -> (BTreeMap<String, f64>, f64) {
    let (before, reconciles) = (apiserver_requests(), operator_reconciles());
    tokio::time::sleep(window).await;
    let after = apiserver_requests();
    let delta = after
        .iter()
        .map(|(verb, n)| (verb.clone(), n - before.get(verb).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    (delta, operator_reconciles() - reconciles)
}

const WRITES: [&str; 6] = [
    "APPLY",
    "PATCH",
    "POST",
    "PUT",
    "DELETE",
    "DELETECOLLECTION",
];

fn per_minute(requests: &BTreeMap<String, f64>, window: Duration, verbs: &[&str]) -> f64 {
    let n: f64 = requests
        .iter()
        .filter(|(v, _)| verbs.is_empty() || verbs.contains(&v.as_str()))
        .filter(|(v, _)| *v != "WATCH" && *v != "LIST")
        // fold, not sum: an empty f64 sum is -0.0, which prints as "-0.0".
        .fold(0.0, |total, (_, n)| total + n);
    n * 60.0 / window.as_secs_f64()
}

/// l) The operator's load on the apiserver, as the apiserver counts it, for one rollout with 2
///    pods per color and a 5s analysis interval, traffic through nginx: idle Healthy, a whole
///    1 -> 10 -> 50 -> 100 rollout, held at a weight, and a canary held partly Ready (one of
///    its pods stopped with SIGSTOP, so it goes unready). `e2e/bench/operator-load.sh` runs
///    this with minute-long windows; CI with shorter ones.
#[tokio::test]
async fn l_operator_api_load() {
    let client = client().await;
    let ns = "l-load";
    let window = Duration::from_secs(
        std::env::var("EMBEDROLL_LOAD_WINDOW_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let spec = json!({"replicas": 2, "analysis": {"interval": "5s"}});
    install(&client, ns, &rollout_manifest(ns, &[], spec.clone())).await;
    // Nothing else may write these kinds while they are counted: a rollout left by an earlier
    // scenario (one that failed before its cleanup) goes, and so does the deletion itself.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let rollouts: Api<EmbeddingRollout> = Api::all(client.clone());
    for other in rollouts.list(&ListParams::default()).await.unwrap() {
        let other_ns = other.namespace().unwrap_or_default();
        if other_ns != ns {
            say(
                "l",
                format!("deleting namespace {other_ns}, left by an earlier scenario"),
            );
            let _ = namespaces.delete(&other_ns, &DeleteParams::default()).await;
        }
    }
    wait_for(
        "other namespaces gone",
        Duration::from_secs(120),
        || async {
            namespaces
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .all(|n| n.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating"))
        },
    )
    .await;
    // The controller-manager's own follow-up to an install (ReplicaSet adoption re-checks,
    // garbage-collector owner lookups) GETs these kinds too; let it finish first.
    let traffic = Traffic::start(host(ns), 4);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut table = Vec::new();

    let (idle, reconciles) = measure(window).await;
    table.push(("idle Healthy", idle.clone(), reconciles));
    // The operator reads only from its caches (it issues no GET), so a stray GET here is the
    // controller-manager's; a write would be the operator's.
    assert_eq!(
        per_minute(&idle, window, &WRITES),
        0.0,
        "an idle Healthy rollout makes no writes: {idle:?}"
    );

    // A whole rollout: from the new spec to the old color scaled down.
    let before = apiserver_requests();
    apply(
        &client,
        ns,
        &rollout_manifest(ns, &["--max-batch-tokens", "8192"], spec.clone()),
    )
    .await;
    let promoted = wait_status(&client, ns, ns, "promoted", Duration::from_secs(180), |s| {
        s.phase == Some(Phase::Healthy)
            && s.stable_color == Some(embedroll_operator::crd::Color::Green)
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for("blue scaled down", Duration::from_secs(30), || async {
        deployments
            .get(&format!("{ns}-blue"))
            .await
            .unwrap()
            .spec
            .and_then(|s| s.replicas)
            == Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = apiserver_requests();
    // Less this test's own apply of the new spec.
    let rollout_writes: f64 = WRITES
        .iter()
        .map(|v| after.get(*v).copied().unwrap_or(0.0) - before.get(*v).copied().unwrap_or(0.0))
        .sum::<f64>()
        - 1.0;
    say(
        "l",
        format!(
            "whole rollout 1->10->50->100 to {:?}: {rollout_writes} writes",
            promoted.stable_revision
        ),
    );

    // Held at 10% by a pause, analysis running.
    let held_spec = json!({"replicas": 2, "analysis": {"interval": "5s"},
                           "strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]}});
    apply(
        &client,
        ns,
        &rollout_manifest(ns, &["--max-batch-tokens", "4096"], held_spec),
    )
    .await;
    let held = wait_status(
        &client,
        ns,
        ns,
        "paused at 10%",
        // A new revision: its two pods start and load the model, then the vector check and
        // one analysis pass; 58 s of pod start-up alone was seen on 2 loaded cores.
        Duration::from_secs(120),
        |s| s.phase == Some(Phase::Paused) && s.current_step_index == Some(1),
    )
    .await;
    let canary = held.canary_color.unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (at_weight, reconciles) = measure(window).await;
    table.push(("held at 10%, analysing", at_weight, reconciles));

    // One of the canary's two pods stops answering: it goes unready and stays so.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let canary_pods = pods
        .list(
            &ListParams::default().labels(&format!("{LABEL_ROLLOUT}={ns},{LABEL_COLOR}={canary}")),
        )
        .await
        .unwrap();
    let pid = canary_pods.items[0]
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref()?.first()?.container_id.clone())
        .and_then(|id| id.strip_prefix("process://")?.parse::<u32>().ok())
        .expect("the local kubelet reports process://<pid>");
    run_ok("kill", &["-STOP", &pid.to_string()]);
    wait_status(
        &client,
        ns,
        ns,
        "canary 1/2 Ready",
        Duration::from_secs(30),
        |s| {
            s.message
                .as_deref()
                .is_some_and(|m| m.contains("1/2 pods Ready"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (partly, reconciles) = measure(window).await;
    run_ok("kill", &["-CONT", &pid.to_string()]);
    table.push(("canary held partly Ready", partly.clone(), reconciles));

    let mut report = format!(
        "API requests per minute for one rollout ({}s windows; apiserver_request_total for deployments, services, ingresses, embeddingrollouts):\n",
        window.as_secs()
    );
    for (state, requests, reconciles) in &table {
        let verbs: Vec<String> = requests
            .iter()
            .filter(|(v, _)| *v != "WATCH" && *v != "LIST")
            .map(|(v, n)| format!("{v} {:.1}", n * 60.0 / window.as_secs_f64()))
            .collect();
        report.push_str(&format!(
            "  {state:<26} {:>6.1} req/min ({:.1} writes/min; {}); {:.0} reconciles/min\n",
            per_minute(requests, window, &[]),
            per_minute(requests, window, &WRITES),
            if verbs.is_empty() {
                "none".to_owned()
            } else {
                verbs.join(", ")
            },
            reconciles * 60.0 / window.as_secs_f64(),
        ));
    }
    report.push_str(&format!(
        "  whole 1->10->50->100 rollout: {rollout_writes} writes\n"
    ));
    say("l", report);
    assert!(
        per_minute(&partly, window, &[]) <= 6.0,
        "a canary held partly Ready costs at most 6 requests a minute: {partly:?}"
    );
    assert!(
        rollout_writes <= 60.0,
        "a whole rollout in at most 60 writes: {rollout_writes}"
    );
    let _ = traffic.finish().await;
    // Deleted with its namespace, the rollout's series leave the operator's /metrics too (its
    // alerts would fire on otherwise).
    cleanup(&client, ns).await;
    let series = format!("rollout=\"{ns}\"");
    wait_for(
        "the rollout's series removed",
        Duration::from_secs(90),
        || async {
            let text = reqwest::get(format!("http://{OPERATOR_METRICS}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            !text.contains(&series)
        },
    )
    .await;
}
