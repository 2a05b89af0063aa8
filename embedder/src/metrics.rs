//! Prometheus metrics: the contract the operator's analysis queries rely on
//! (see DESIGN.md §5). Names are stable; add, don't rename.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::model::ModelInfo;

/// Fine around the 20–50 ms SLOs rollouts gate on, so `histogram_quantile` can tell 20 ms
/// from 35 ms; coarse beyond.
const LATENCY_BUCKETS: [f64; 21] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const BATCH_SIZE_BUCKETS: [f64; 10] = [1., 2., 4., 8., 16., 32., 64., 128., 256., 512.];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    route: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    model: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelInfoLabels {
    model: String,
    /// `none` or `int8`.
    quantization: String,
    /// The int8 matrix kernel (`avx512-vnni`, `avx2`, ...); empty for unquantized models.
    kernel: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    checks: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    inflight: Gauge,
    queue_depth: Family<ModelLabels, Gauge>,
    batch_size: HistogramFamily<ModelLabels>,
    batch_duration: HistogramFamily<ModelLabels>,
    tokens: Family<ModelLabels, Counter>,
    model_loaded: Family<ModelLabels, Gauge>,
    model_info: Family<ModelInfoLabels, Gauge>,
    weight_bytes: Family<ModelLabels, Gauge>,
    resident_memory: Gauge,
}

/// Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("embedder");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Embedding requests by model, route and HTTP status code",
            requests.clone(),
        );
        // A rollout's vector check is not the canary's traffic: the analysis reads P95, error
        // rate, request count and tokens per request from the series above and below.
        let checks = Family::<RequestLabels, Counter>::default();
        registry.register(
            "check_requests",
            "Requests marked x-embedroll-check (a rollout's vector check), by model, route and HTTP status code; not in requests, request_duration or tokens",
            checks.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register_with_unit(
            "request_duration",
            "Embedding request latency, queueing included, of requests answered 2xx or 5xx or abandoned by the client (499)",
            Unit::Seconds,
            request_duration.clone(),
        );
        let inflight = Gauge::default();
        registry.register(
            "inflight_requests",
            "Embedding requests being served now",
            inflight.clone(),
        );
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Texts waiting for a forward pass",
            queue_depth.clone(),
        );
        let batch_size: HistogramFamily<ModelLabels> =
            Family::new_with_constructor(|| Histogram::new(BATCH_SIZE_BUCKETS));
        registry.register("batch_size", "Texts per forward pass", batch_size.clone());
        let batch_duration: HistogramFamily<ModelLabels> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register_with_unit(
            "batch_duration",
            "Forward pass duration",
            Unit::Seconds,
            batch_duration.clone(),
        );
        let tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens of answered embedding requests, special tokens included (checks not counted)",
            tokens.clone(),
        );
        let model_loaded = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "model_loaded",
            "1 while the model is loaded and serving",
            model_loaded.clone(),
        );
        let model_info = Family::<ModelInfoLabels, Gauge>::default();
        registry.register(
            "model_info",
            "1 per loaded model, labelled with how its weights are held",
            model_info.clone(),
        );
        let weight_bytes = Family::<ModelLabels, Gauge>::default();
        registry.register_with_unit(
            "model_weights",
            "Memory held by the loaded model's weights",
            Unit::Bytes,
            weight_bytes.clone(),
        );
        // Memory and restarts without cAdvisor or kube-state-metrics: the alerts on embedder
        // memory and crash loops read these.
        let resident_memory = Gauge::default();
        registry.register(
            "resident_memory_bytes",
            "Resident set size of the embedder process (VmRSS), read at each scrape",
            resident_memory.clone(),
        );
        let start_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        registry.register(
            "start_time_seconds",
            "Unix time the process started; a change is a restart",
            start_time,
        );
        Self(Arc::new(Inner {
            registry,
            requests,
            checks,
            request_duration,
            inflight,
            queue_depth,
            batch_size,
            batch_duration,
            tokens,
            model_loaded,
            model_info,
            weight_bytes,
            resident_memory,
        }))
    }

    pub fn observe_request(&self, model: &str, route: &str, code: u16, elapsed: Duration) {
        let inner = &self.0;
        inner
            .requests
            .get_or_create(&RequestLabels {
                model: model.to_string(),
                route: route.to_string(),
                code,
            })
            .inc();
        // Client errors and overload rejections answer in microseconds; counting them would
        // drag the latency quantiles rollouts gate on down exactly when things go wrong.
        // 499 (client gave up waiting) is the opposite: its duration is server slowness.
        if (400..500).contains(&code) && code != 499 {
            return;
        }
        inner
            .request_duration
            .get_or_create(&RouteLabels {
                model: model.to_string(),
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A request marked `x-embedroll-check`: counted apart, so a rollout's own check never
    /// becomes the canary's latency, errors or request count.
    pub fn observe_check(&self, model: &str, route: &str, code: u16) {
        self.0
            .checks
            .get_or_create(&RequestLabels {
                model: model.to_string(),
                route: route.to_string(),
                code,
            })
            .inc();
    }

    /// The tokens of an answered request (checks are not counted).
    pub fn observe_tokens(&self, model: &str, tokens: usize) {
        self.0
            .tokens
            .get_or_create(&labels(model))
            .inc_by(tokens as u64);
    }

    /// Counts a request as in flight until the guard drops.
    pub fn inflight(&self) -> InflightGuard {
        self.0.inflight.inc();
        InflightGuard(self.0.inflight.clone())
    }

    pub fn queue_depth(&self, model: &str) -> Gauge {
        self.0.queue_depth.get_or_create_owned(&labels(model))
    }

    pub fn observe_pass(&self, model: &str, texts: usize, elapsed: Duration) {
        let labels = labels(model);
        self.0
            .batch_size
            .get_or_create(&labels)
            .observe(texts as f64);
        self.0
            .batch_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_model_loaded(&self, model: &ModelInfo, loaded: bool) {
        let name = labels(&model.name);
        self.0
            .model_loaded
            .get_or_create(&name)
            .set(i64::from(loaded));
        let info = ModelInfoLabels {
            model: model.name.clone(),
            quantization: model.quantization.name().to_string(),
            kernel: model.int8_kernel.unwrap_or_default().to_string(),
        };
        if loaded {
            self.0.model_info.get_or_create(&info).set(1);
            self.0
                .weight_bytes
                .get_or_create(&name)
                .set(model.weight_bytes as i64);
        } else {
            self.0.model_info.remove(&info);
            self.0.weight_bytes.remove(&name);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        if let Some(bytes) = resident_memory_bytes() {
            self.0.resident_memory.set(bytes);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.0.registry);
        out
    }
}

/// VmRSS of this process from /proc (Linux); `None` elsewhere.
fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn labels(model: &str) -> ModelLabels {
    ModelLabels {
        model: model.to_string(),
    }
}

pub struct InflightGuard(Gauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_contract_names() {
        let metrics = Metrics::new();
        metrics.observe_request("m", "/api/v1/embed", 200, Duration::from_millis(22));
        metrics.observe_pass("m", 3, Duration::from_millis(5));
        metrics.observe_tokens("m", 30);
        metrics.observe_check("m", "/v1/embeddings", 200);
        let mut info = crate::model::ModelInfo::for_tests("m");
        metrics.set_model_loaded(&info, true);
        let _guard = metrics.inflight();
        let text = metrics.encode();
        for name in [
            r#"embedder_requests_total{model="m",route="/api/v1/embed",code="200"} 1"#,
            r#"embedder_request_duration_seconds_bucket{le="0.025",model="m",route="/api/v1/embed"} 1"#,
            r#"embedder_request_duration_seconds_bucket{le="0.02",model="m",route="/api/v1/embed"} 0"#,
            "embedder_inflight_requests 1",
            r#"embedder_batch_size_count{model="m"} 1"#,
            r#"embedder_tokens_total{model="m"} 30"#,
            r#"embedder_check_requests_total{model="m",route="/v1/embeddings",code="200"} 1"#,
            r#"embedder_model_loaded{model="m"} 1"#,
            r#"embedder_model_info{model="m",quantization="none",kernel=""} 1"#,
            r#"embedder_model_weights_bytes{model="m"} 1000"#,
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        // Process memory and start time, for the memory and crash-loop alerts.
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("embedder_resident_memory_bytes "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(rss.is_some_and(|b| b > 1e6), "resident memory in\n{text}");
        let started = text
            .lines()
            .find_map(|l| l.strip_prefix("embedder_start_time_seconds "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(started.is_some_and(|t| t > 1.7e9), "start time in\n{text}");

        // Evicted: loaded drops to 0; the info and weight series go with the weights.
        metrics.set_model_loaded(&info, false);
        info.quantization = crate::bert::Quantization::Int8;
        info.int8_kernel = Some("avx2");
        metrics.set_model_loaded(&info, true);
        let text = metrics.encode();
        assert!(
            text.contains(r#"embedder_model_info{model="m",quantization="int8",kernel="avx2"} 1"#)
        );
        assert!(!text.contains(r#"quantization="none""#), "{text}");
    }
}
