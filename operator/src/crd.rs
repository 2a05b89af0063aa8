//! The `EmbeddingRollout` API (`embedroll.dev/v1alpha1`): spec, status, and the schema/CEL
//! validation the apiserver enforces, so a mistake is rejected at `kubectl apply` with the
//! field named instead of surfacing later as a stuck rollout.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::api::networking::v1::IngressTLS;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Go-style durations (`500ms`, `30s`, `5m`, `1h30m`), the format `kubectl` users know.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// CEL for a duration field of at least a second (a malformed one is the pattern's to refuse).
const AT_LEAST_1S: &str =
    "!self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || duration(self) >= duration('1s')";
/// CEL for a duration field of at most ten years (longer would overflow time arithmetic; the
/// operator refuses such a duration when it parses one, too).
const AT_MOST_10Y: &str =
    "!self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') || duration(self) <= duration('87600h')";
/// Longest rollout name: children are named `<name>-green` and the name is a label value.
pub const MAX_NAME_LEN: usize = 57;

/// A progressive rollout of an embedding service: two colors of embedder pods behind an
/// ingress-nginx primary and canary Ingress; a new revision goes to the idle color and takes an
/// increasing share of traffic, each step gated on Prometheus, and is rolled back on a breach.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "embedroll.dev",
    version = "v1alpha1",
    kind = "EmbeddingRollout",
    namespaced,
    shortname = "er",
    category = "embedroll",
    status = "EmbeddingRolloutStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Stable", type_ = "string", json_path = ".status.stableRevision"),
    printcolumn(name = "Canary", type_ = "string", json_path = ".status.canaryRevision"),
    printcolumn(name = "Weight", type_ = "integer", json_path = ".status.canaryWeight"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.currentStepIndex"),
    printcolumn(name = "P95", type_ = "string", json_path = ".status.analysis.latencyP95"),
    printcolumn(name = "Errors", type_ = "string", json_path = ".status.analysis.errorRate"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    ),
    validation = Rule::new("self.metadata.name.size() <= 57")
        .message("metadata.name: at most 57 characters (children are named <name>-green)"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name: lower-case letters, digits and '-', starting with a letter (it names the rollout's Services)"),
    // On create only (optionalOldSelf: oldSelf is empty then), so a rollout made before
    // this rule keeps working.
    validation = Rule::new("oldSelf.hasValue() || !self.metadata.name.matches('-(blue|green|canary)$')")
        .optional_old_self(true)
        .message("metadata.name must not end in -blue, -green or -canary: rollout <name> names its children so, and two rollouts would take each other's"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.compatibility) || !has(self.compatibility.onIncompatible) || self.compatibility.onIncompatible != 'Reindex' || has(self.traffic.canaryHeader)").message("onIncompatible: Reindex serves the new model on the canary header route while the index is rebuilt: set traffic.canaryHeader").field_path(".compatibility.onIncompatible"))]
pub struct EmbeddingRolloutSpec {
    /// Pods per color. The scale subresource points here, so an HPA can drive it.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// The embedder pod. `embedroll.dev/{rollout,color,revision}` labels are added to it.
    pub template: PodTemplateSpec,
    /// The model the pods serve; part of the revision, so changing it is an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    #[serde(default)]
    pub service: ServiceSpec,
    pub traffic: TrafficSpec,
    #[serde(default)]
    pub strategy: StrategySpec,
    #[serde(default)]
    pub analysis: AnalysisSpec,
    #[serde(default)]
    pub compatibility: CompatibilitySpec,
}

/// The embedding-compatibility gate: before a new revision takes any traffic (and again
/// before it is promoted), one Ready pod of each color embeds a golden set of texts and the
/// vectors are compared. A same-model revision whose vectors differ is incompatible; a model
/// change (another name or dimensions than the stable revision's) is incompatible by
/// definition, since vectors from two models cannot share one index.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompatibilitySpec {
    /// The gate is on unless this is false.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The texts to compare on: a ConfigMap key holding one text per line. Unset: a built-in
    /// set of 50 (short and long, non-ASCII, code, numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden_set: Option<GoldenSet>,
    /// Every text's cosine between stable's and the canary's vector must reach this.
    #[serde(default = "default_min_cosine")]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub min_cosine: f64,
    /// Neighbourhood size for the top-k agreement.
    #[serde(default = "default_top_k")]
    #[schemars(range(min = 1, max = 100))]
    pub top_k: i32,
    /// The mean overlap of each text's top-k nearest neighbours (within the golden set) under
    /// stable's and the canary's vectors must reach this.
    #[serde(default = "default_min_top_k_agreement")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_top_k_agreement: f64,
    /// What an incompatible revision does: `Block` (a same-model mismatch is rolled back, a
    /// model change is held until this says `Reindex`) or `Reindex` (served at 0% on the
    /// re-index route, then switched to 100% at once when promoted).
    #[serde(default)]
    pub on_incompatible: OnIncompatible,
    /// How long one check may take before it counts as inconclusive (at least 1s).
    #[serde(default = "default_check_timeout")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new(AT_LEAST_1S).message("at least 1s"))]
    pub timeout: String,
}

impl Default for CompatibilitySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            golden_set: None,
            min_cosine: default_min_cosine(),
            top_k: default_top_k(),
            min_top_k_agreement: default_min_top_k_agreement(),
            on_incompatible: OnIncompatible::default(),
            timeout: default_check_timeout(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_min_cosine() -> f64 {
    0.999
}

fn default_top_k() -> i32 {
    10
}

fn default_min_top_k_agreement() -> f64 {
    0.9
}

fn default_check_timeout() -> String {
    "60s".to_owned()
}

/// Where the golden set comes from.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GoldenSet {
    /// A key of a ConfigMap in the rollout's namespace; one text per line.
    pub config_map_key_ref: ConfigMapKey,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum OnIncompatible {
    #[default]
    Block,
    Reindex,
}

fn default_replicas() -> i32 {
    1
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub dimensions: Option<i32>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The port the embedder listens on; the Services expose the same port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            port: default_port(),
        }
    }
}

fn default_port() -> i32 {
    8080
}

/// How traffic reaches the colors: exactly one provider.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.nginx) != has(self.gatewayAPI)").message("set exactly one of nginx and gatewayAPI"))]
pub struct TrafficSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nginx: Option<NginxTraffic>,
    #[serde(
        default,
        rename = "gatewayAPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_api: Option<GatewayApiTraffic>,
    /// Requests carrying this header and value reach the canary at any weight, 0% included
    /// (nginx `canary-by-header`, an HTTPRoute rule matching the header): smoke tests and a
    /// re-index reach a canary through the real data plane before users do. With
    /// `gatewayAPI.httpRouteRef`, your route needs a rule of its own whose every match
    /// requires the header (type Exact) and that lists both color Services: the operator
    /// sends it wholly to a deployed canary, and to stable otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_header: Option<CanaryHeader>,
}

/// A request header that routes to the canary.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CanaryHeader {
    /// An HTTP header name.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    )]
    pub name: String,
    /// Its exact value.
    #[schemars(length(min = 1, max = 4096))]
    pub value: String,
}

/// Traffic through the Gateway API, in one of two modes:
/// - managed: the operator owns an HTTPRoute `<name>` attached to `parentRefs`, whose rules
///   send `100 - w` to the stable color's Service and `w` to the canary's;
/// - referenced (`httpRouteRef`): the route is yours (kept in Git, say), and the operator
///   changes only the weights of its backendRefs to the rollout's color Services
///   (`<name>-blue`, `<name>-green`); every rule that names one color must name both.
///
/// A route its Gateway has not accepted holds the rollout.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.paths) || self.paths.all(p, self.paths.filter(q, q == p).size() == 1)").message("paths must be unique").field_path(".paths"))]
#[x_kube(validation = Rule::new("has(self.httpRouteRef) != (has(self.parentRefs) && self.parentRefs.size() > 0)").message("set parentRefs (a route the operator owns) or httpRouteRef (a route you own), exactly one").field_path(".parentRefs"))]
#[x_kube(validation = Rule::new("!has(self.httpRouteRef) || (!has(self.hostnames) && !has(self.paths))").message("hostnames and paths describe a route the operator owns; with httpRouteRef your route's own rules apply").field_path(".httpRouteRef"))]
pub struct GatewayApiTraffic {
    /// Managed mode: the Gateways (or listeners of one) the route attaches to, as Gateway
    /// API's ParentReference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub parent_refs: Vec<ParentReference>,
    /// Managed mode: hostnames the route matches; empty matches the listeners' own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(
            length(min = 1, max = 253),
            regex(
                pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
            )
        )
    )]
    pub hostnames: Vec<String>,
    /// Managed mode: path prefixes routed to the embedder (default `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 1024), regex(pattern = r"^/")))]
    pub paths: Vec<String>,
    /// Referenced mode: an HTTPRoute in the rollout's namespace whose color backendRefs'
    /// weights the operator sets, leaving the rest of it as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route_ref: Option<HttpRouteRef>,
}

impl GatewayApiTraffic {
    /// The path prefixes of a managed route.
    pub fn paths(&self) -> Vec<String> {
        if self.paths.is_empty() {
            default_paths()
        } else {
            self.paths.clone()
        }
    }
}

/// An HTTPRoute in the rollout's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Gateway API's ParentReference (`gateway.networking.k8s.io/v1`).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// Defaults to `gateway.networking.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub group: Option<String>,
    /// Defaults to `Gateway`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: Option<String>,
    /// Defaults to the rollout's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Traffic through ingress-nginx: a primary Ingress to the stable color and a canary Ingress
/// (`nginx.ingress.kubernetes.io/canary-weight`) to the new one, on the same host and paths.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.paths) || self.paths.all(p, self.paths.filter(q, q == p).size() == 1)").message("paths must be unique").field_path(".paths"))]
pub struct NginxTraffic {
    /// Host the Ingresses match; empty matches every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(
            pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        )
    )]
    pub host: Option<String>,
    /// Path prefixes routed to the embedder.
    #[serde(default = "default_paths")]
    #[schemars(
        length(min = 1, max = 16),
        inner(length(max = 256), regex(pattern = r"^/"))
    )]
    pub paths: Vec<String>,
    #[serde(default = "default_ingress_class")]
    #[schemars(length(min = 1, max = 253))]
    pub ingress_class_name: String,
    /// Extra annotations for both Ingresses (timeouts, body size, ...). The canary ones are
    /// the operator's and cannot be set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('nginx.ingress.kubernetes.io/canary'))").message("canary annotations are managed by the operator"))]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tls: Vec<IngressTLS>,
}

fn default_paths() -> Vec<String> {
    vec!["/".to_owned()]
}

fn default_ingress_class() -> String {
    "nginx".to_owned()
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.steps) || self.steps.size() == 0 || (has(self.steps[self.steps.size() - 1].setWeight) && self.steps[self.steps.size() - 1].setWeight == 100)")
        .message("the last step must be setWeight: 100").field_path(".steps"),
    validation = Rule::new("!has(self.steps) || self.steps.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted() && self.steps.filter(s, has(s.setWeight)).all(s, self.steps.filter(t, has(t.setWeight) && t.setWeight == s.setWeight).size() == 1)")
        .message("setWeight values must be strictly ascending").field_path(".steps"),
)]
pub struct StrategySpec {
    /// Steps of the rollout; default `setWeight` 1, 10, 50, 100, each held for one analysis
    /// interval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub steps: Vec<Step>,
    /// Seconds the new color has to become Ready before the rollout is rolled back; also what
    /// a canary held at 0% that loses every Ready pod gets to have one again. One that loses
    /// them while it takes traffic is rolled back at once.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1, max = 86400))]
    pub progress_deadline_seconds: i32,
    /// Seconds the previous color is kept running after a promotion or rollback, so traffic
    /// can go back to it at once.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: i32,
    /// Seconds a rolled-back or aborted canary keeps running (for `kubectl logs` and a look
    /// at its pods) before it is scaled to 0. Nothing routes to it meanwhile.
    #[serde(default = "default_abort_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub abort_scale_down_delay_seconds: i32,
    /// How many pods the canary runs: `Full` (default) runs `replicas`, so promotion and
    /// rollback only move traffic; `Proportional` runs pods in proportion to the weight it is
    /// about to take (at least 1), which costs less while it takes a few percent.
    #[serde(default)]
    pub canary_scale: CanaryScale,
}

impl Default for StrategySpec {
    fn default() -> Self {
        Self {
            steps: Vec::new(),
            progress_deadline_seconds: default_progress_deadline(),
            scale_down_delay_seconds: default_scale_down_delay(),
            abort_scale_down_delay_seconds: default_abort_scale_down_delay(),
            canary_scale: CanaryScale::default(),
        }
    }
}

#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum CanaryScale {
    #[default]
    Full,
    Proportional,
}

fn default_abort_scale_down_delay() -> i32 {
    30
}

fn default_progress_deadline() -> i32 {
    600
}

fn default_scale_down_delay() -> i32 {
    300
}

/// One step: exactly one of `setWeight` or `pause`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.setWeight) != has(self.pause)").message("a step has exactly one of setWeight or pause"))]
pub struct Step {
    /// Percent of requests sent to the new color.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub set_weight: Option<i32>,
    /// Hold the current weight: for `duration`, or until promoted when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseStep>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PauseStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new(AT_MOST_10Y).message("at most 87600h"))]
    pub duration: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.metrics) || self.metrics.all(m, self.metrics.filter(n, n.name == m.name).size() == 1)")
        .message("metric names must be unique").field_path(".metrics"),
)]
pub struct AnalysisSpec {
    /// Where to query; defaults to the operator's `--prometheus-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSpec>,
    /// How often checks run. Each weight is held for at least one interval. The built-in
    /// checks look back over everything since the step began (`{{window}}`, at least one
    /// interval), so a quiet service's step lasts until it has `minRequests` canary requests.
    /// At least 1s: each check is a Prometheus query and a status write.
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new(AT_LEAST_1S).message("at least 1s"))]
    pub interval: String,
    /// Failed checks in one rollout before it is rolled back automatically.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_limit: i32,
    /// Canary requests a check needs since its step began; fewer makes it inconclusive, never
    /// failed, and the step simply lasts longer.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 0))]
    pub min_requests: i64,
    /// What an inconclusive check (no data, Prometheus unreachable) does: `Pause` holds the
    /// current weight until a check passes; `Fail` counts it as a failed check.
    #[serde(default)]
    pub on_inconclusive: OnInconclusive,
    /// Inconclusive checks in a row after which `onInconclusive` decides: `Fail` rolls back,
    /// `Pause` keeps holding and says so with an `InconclusiveLimit` Event. Until then the
    /// weight is held. Unset: `Pause` holds for as long as it lasts, `Fail` counts every
    /// inconclusive check as a failed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_inconclusive: Option<i32>,
    /// Largest accepted gap, in percentage points beyond sampling noise, between the weight set
    /// and the canary's observed share of requests.
    #[serde(default = "default_weight_tolerance")]
    #[schemars(range(min = 0, max = 100))]
    pub weight_tolerance_percent: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub metrics: Vec<MetricSpec>,
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        Self {
            prometheus: None,
            interval: default_interval(),
            failure_limit: default_failure_limit(),
            min_requests: default_min_requests(),
            on_inconclusive: OnInconclusive::default(),
            max_inconclusive: None,
            weight_tolerance_percent: default_weight_tolerance(),
            metrics: Vec::new(),
        }
    }
}

fn default_interval() -> String {
    "30s".to_owned()
}

fn default_failure_limit() -> i32 {
    2
}

fn default_min_requests() -> i64 {
    50
}

fn default_weight_tolerance() -> i32 {
    5
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSpec {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`.
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub address: String,
    /// At least 1s.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new(AT_LEAST_1S).message("at least 1s"))]
    pub timeout: String,
}

fn default_timeout() -> String {
    "10s".to_owned()
}

#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum OnInconclusive {
    #[default]
    Pause,
    Fail,
}

/// Built-in checks, PromQL over the embedder's metrics and the pod labels the scrape config maps
/// to `rollout`, `color` and `revision`.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The canary's P95 request latency (`histogram_quantile`), against `max` (a duration).
    LatencyP95,
    /// The canary's share of 5xx answers, against `max` (a fraction, e.g. `"0.01"`).
    ErrorRate,
    /// Canary P95 minus stable P95, against `maxIncrease` (a duration).
    LatencyP95VsStable,
}

/// One check. Thresholds are strings: durations (`35ms`) for latency presets, decimal numbers
/// (`"0.001"`) otherwise.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.preset) != has(self.query)")
        .message("a metric has exactly one of preset or query"),
    validation = Rule::new("has(self.preset) && self.preset == 'LatencyP95VsStable' ? has(self.maxIncrease) : (has(self.max) || has(self.min))")
        .message("a metric needs a threshold: max or min (maxIncrease for LatencyP95VsStable)"),
    validation = Rule::new("!has(self.maxIncrease) || (has(self.preset) && self.preset == 'LatencyP95VsStable')")
        .message("maxIncrease is only for LatencyP95VsStable").field_path(".maxIncrease"),
    validation = Rule::new("!has(self.maxIncrease) || (!has(self.max) && !has(self.min))")
        .message("maxIncrease is LatencyP95VsStable's only threshold: drop max and min").field_path(".maxIncrease"),
    validation = Rule::new("!(has(self.preset) && self.preset.startsWith('Latency')) || ((!has(self.max) || self.max.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$')) && (!has(self.min) || self.min.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$')))")
        .message("latency thresholds are durations, e.g. 35ms").field_path(".max"),
    validation = Rule::new("(has(self.preset) && self.preset.startsWith('Latency')) || ((!has(self.max) || self.max.matches('^-?[0-9]+(\\\\.[0-9]+)?([eE]-?[0-9]+)?$')) && (!has(self.min) || self.min.matches('^-?[0-9]+(\\\\.[0-9]+)?([eE]-?[0-9]+)?$')))")
        .message("thresholds are decimal numbers, e.g. \"0.01\"").field_path(".max"),
)]
pub struct MetricSpec {
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// PromQL returning one sample; `{{namespace}} {{rollout}} {{canaryColor}} {{stableColor}}
    /// {{canaryRevision}} {{stableRevision}} {{interval}} {{window}} {{baselineWindow}}` are
    /// substituted. `{{window}}` is the evidence window: since the step began, at least one
    /// interval (what the built-in checks use).
    /// `{{baselineWindow}}` (the evidence window plus 10 intervals, at least 1m) is for the
    /// stable side of a comparison: at 100% stable gets no requests, and `{{interval}}` would
    /// leave it without data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(AT_MOST_10Y).message("at most 87600h"))]
    pub max: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(AT_MOST_10Y).message("at most 87600h"))]
    pub min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new(AT_MOST_10Y).message("at most 87600h"))]
    pub max_increase: Option<String>,
}

// ---------------------------------------------------------------- status

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// Stable serves all traffic; nothing in flight.
    Healthy,
    /// A new revision is taking traffic step by step.
    Progressing,
    /// Held: a pause step, the pause annotation, or an inconclusive check.
    Paused,
    /// Traffic is being moved back to stable.
    RollingBack,
    /// Stable itself is not serving (no Ready pods, or the first install missed its deadline).
    Degraded,
    /// The last rollout was rolled back or aborted; waits for a spec change or a retry.
    Failed,
    /// A model change served at 0% on the re-index route: waits for the corpus to be
    /// re-embedded, then for a promote, which switches 100% at once.
    AwaitingReindex,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn other(self) -> Self {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

impl std::str::FromStr for Color {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            other => Err(format!("not a color: {other}")),
        }
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingRolloutStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_color: Option<Color>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_color: Option<Color>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    /// Index into the effective steps while a rollout is in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step_index: Option<i32>,
    /// Percent of requests the canary Ingress sends to the canary color.
    #[serde(default)]
    pub canary_weight: i32,
    /// When the current step began (weight set or pause started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// When the in-flight revision was first deployed (progress deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<Time>,
    /// When the in-flight revision's canary was first Ready: the progress deadline is met
    /// from then on, and a pod it loses later is waited for (or, with none Ready, rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_ready_at: Option<Time>,
    /// When a canary Ready before, and held at 0%, was left with no Ready pod (an eviction, a
    /// node drain): it is rolled back if none is Ready again within progressDeadlineSeconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_unavailable_since: Option<Time>,
    /// A revision that was rolled back or aborted; not retried until the spec changes or
    /// `embedroll.dev/retry` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// The idle color and when it is scaled to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScaleDown>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_check: Option<WeightCheck>,
    /// The last vector-compatibility check of the revision in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<CompatibilityStatus>,
    /// Hash of the effective steps of the rollout in flight; when the steps are edited, they
    /// start over from the first instead of being skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_hash: Option<String>,
    /// One-shot command annotations whose effect this status already holds, by annotation and
    /// value. The annotation is removed only after this is saved, so a failed write never
    /// loses a command and a repeated reconcile never applies one twice.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumed_commands: BTreeMap<String, String>,
    /// Ready pods of both colors (scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the rollout's pods, both colors (scale subresource, HPA): an HPA
    /// averages over every pod that serves traffic, and `spec.replicas` stays one fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDown {
    pub color: Color,
    pub at: Time,
}

/// When a compatibility check ran.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CompatibilityStage {
    /// Before the revision's first weight.
    BeforeTraffic,
    /// After its last step, before it is promoted.
    BeforePromotion,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CompatibilityResult {
    /// The vectors agree with stable's.
    Compatible,
    /// The vectors differ from stable's (same model).
    Incompatible,
    /// Another model than stable's: incompatible by definition.
    ModelChanged,
    /// The pods do not serve `spec.model` as declared.
    ContractBroken,
    /// The check could not run; never a pass.
    Inconclusive,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompatibilityStatus {
    pub revision: String,
    pub stage: CompatibilityStage,
    pub result: CompatibilityResult,
    /// Lowest per-text cosine, formatted (`0.99993`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_cosine: Option<String>,
    /// Index in the golden set of the text with the lowest cosine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_text: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k_agreement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CheckResult {
    Passed,
    Failed,
    Inconclusive,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisStatus {
    /// Failed checks in the current rollout (rollback at `failureLimit`).
    #[serde(default)]
    pub failed_checks: i32,
    /// Inconclusive checks in a row.
    #[serde(default)]
    pub inconclusive_checks: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CheckResult>,
    /// The canary's P95 from the last check, for `kubectl get` (e.g. `12.3ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p95: Option<String>,
    /// The canary's error rate from the last check, for `kubectl get` (e.g. `0.10%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricStatus>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricStatus {
    pub name: String,
    /// The measured value, formatted (`41.2ms`, `0.0031`); absent when there was no data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The limit it was held to, e.g. `<= 35ms`.
    pub threshold: String,
    pub result: CheckResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The canary's observed share of requests against the weight set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WeightCheck {
    pub weight: i32,
    /// Observed canary share in percent, e.g. `9.7`; absent without enough traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_percent: Option<String>,
    /// Requests to both colors in the window.
    pub requests: i64,
    pub result: WeightCheckResult,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum WeightCheckResult {
    Matched,
    Mismatched,
    InsufficientTraffic,
    Unknown,
}

/// The longest duration the operator takes (ten years, as the schema's rules say): beyond
/// it, adding it to a time overflows.
const MAX_DURATION_SECS: u64 = 87_600 * 3_600;

/// Parses a Go-style duration (`500ms`, `30s`, `1h30m`, `1.5h`). Never panics: kube's
/// parser multiplies with `Duration::mul_f64`, which panics on overflow, and one rollout's
/// `pause: {duration: 9999999999999999h}` would have crashed the operator for all of them.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration like 30s or 500ms");
    if text.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let too_long = || format!("{text:?} is longer than 87600h");
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let unit_at = rest.find(|c: char| c.is_alphabetic()).ok_or_else(bad)?;
        let (number, tail) = rest.split_at(unit_at);
        let unit_len = tail
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(tail.len());
        let (unit, after) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "\u{00b5}s" | "\u{03bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        let number_ok = digits(whole) || (whole.is_empty() && digits(fraction));
        if !number_ok {
            return Err(bad());
        }
        if !fraction.is_empty() && !digits(fraction) {
            return Err(bad());
        }
        // Whole part first: more than ~39 digits overflows u128 and is too long anyway.
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_long())?
        };
        // Nanoseconds are the finest unit: 18 fraction digits are more than enough.
        let fraction = &fraction[..fraction.len().min(18)];
        let scale = 10u128.pow(fraction.len() as u32);
        let fraction: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| bad())?
        };
        let term = whole
            .checked_mul(unit_nanos)
            .and_then(|n| n.checked_add(fraction * unit_nanos / scale))
            .ok_or_else(too_long)?;
        nanos = nanos.checked_add(term).ok_or_else(too_long)?;
        if nanos > u128::from(MAX_DURATION_SECS) * 1_000_000_000 {
            return Err(too_long());
        }
        rest = after;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    Ok(std::time::Duration::new(
        secs,
        (nanos % 1_000_000_000) as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_exactly_and_never_panic() {
        for (text, expected) in [
            ("500ms", Duration::from_millis(500)),
            ("0.1s", Duration::from_millis(100)),
            (".5s", Duration::from_millis(500)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("1.5ms", Duration::from_micros(1500)),
            ("250us", Duration::from_micros(250)),
            ("0", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
            ("87600h", Duration::from_secs(87_600 * 3_600)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for text in [
            "",
            "5",
            "-5s",
            "5x",
            "1e3s",
            "s",
            "1..5s",
            "87600h1ns",
            "9999999999999999h",
            "99999999999999999999s",
            "999999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} accepted");
        }
    }
}
