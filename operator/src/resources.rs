//! The objects an EmbeddingRollout owns, built as plain values (applied with server-side
//! apply by the controller):
//! - Deployments `<name>-blue` / `<name>-green`, one per color;
//! - Services `<name>-blue` / `<name>-green` (what the Ingresses route to: switching colors
//!   is an Ingress backend change, never a selector change waiting on EndpointSlices) and
//!   `<name>` (the stable color, for clients inside the cluster);
//! - Ingresses `<name>` (primary, stable color) and `<name>-canary` (ingress-nginx canary
//!   annotations, weight to the canary color, or 0 to the idle color between rollouts).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as CoreServiceSpec};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{Color, EmbeddingRollout, NginxTraffic};
use crate::machine::LiveTraffic;

pub const FIELD_MANAGER: &str = "embedroll-operator";
pub const LABEL_ROLLOUT: &str = "embedroll.dev/rollout";
pub const LABEL_COLOR: &str = "embedroll.dev/color";
pub const LABEL_REVISION: &str = "embedroll.dev/revision";
pub const ANNOTATION_CANARY: &str = "nginx.ingress.kubernetes.io/canary";
pub const ANNOTATION_CANARY_WEIGHT: &str = "nginx.ingress.kubernetes.io/canary-weight";
pub const ANNOTATION_CANARY_BY_HEADER: &str = "nginx.ingress.kubernetes.io/canary-by-header";
pub const ANNOTATION_CANARY_BY_HEADER_VALUE: &str =
    "nginx.ingress.kubernetes.io/canary-by-header-value";
/// What the operator records on the canary route so a lost status can be rebuilt from it.
pub const ANNOTATION_CANARY_REVISION: &str = "embedroll.dev/canary-revision";
pub const ANNOTATION_FAILED_REVISION: &str = "embedroll.dev/failed-revision";
pub const ANNOTATION_STEP: &str = "embedroll.dev/step";
/// On a color's Deployment: the model (and dimensions) its revision declared.
pub const ANNOTATION_MODEL: &str = "embedroll.dev/model";
pub const ANNOTATION_MODEL_DIMENSIONS: &str = "embedroll.dev/model-dimensions";

pub fn color_name(er: &EmbeddingRollout, color: Color) -> String {
    format!("{}-{color}", er.name_any())
}

pub fn canary_ingress_name(er: &EmbeddingRollout) -> String {
    format!("{}-canary", er.name_any())
}

fn selector(er: &EmbeddingRollout, color: Color) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_ROLLOUT.to_owned(), er.name_any()),
        (LABEL_COLOR.to_owned(), color.as_str().to_owned()),
    ])
}

/// `rollout=<name>,color=<color>` as a label-selector string (scale subresource, HPA).
pub fn selector_string(er: &EmbeddingRollout, color: Color) -> String {
    selector(er, color)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(er: &EmbeddingRollout, name: String, extra: BTreeMap<String, String>) -> ObjectMeta {
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "embedroll".to_owned(),
        ),
        (LABEL_ROLLOUT.to_owned(), er.name_any()),
    ]);
    labels.extend(extra);
    ObjectMeta {
        name: Some(name),
        namespace: er.namespace(),
        labels: Some(labels),
        // blockOwnerDeletion: `kubectl delete --cascade=foreground` waits for the children.
        owner_references: er.controller_owner_ref(&()).map(|r| {
            vec![OwnerReference {
                block_owner_deletion: Some(true),
                ..r
            }]
        }),
        ..ObjectMeta::default()
    }
}

/// Name, namespace, the managed-by and rollout labels, and the owner reference every child
/// carries.
pub fn child_meta(er: &EmbeddingRollout, name: String) -> ObjectMeta {
    meta(er, name, BTreeMap::new())
}

/// The full Deployment of `color` running `revision` of the current spec.
pub fn deployment(
    er: &EmbeddingRollout,
    color: Color,
    revision: &str,
    replicas: i32,
) -> Deployment {
    let mut template = er.spec.template.clone();
    let pod_meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let labels = pod_meta.labels.get_or_insert_with(BTreeMap::new);
    labels.extend(selector(er, color));
    labels.insert(LABEL_REVISION.to_owned(), revision.to_owned());
    if let Some(model) = &er.spec.model {
        pod_meta
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert("embedroll.dev/model".to_owned(), model.name.clone());
    }
    let mut labels = selector(er, color);
    labels.insert(LABEL_REVISION.to_owned(), revision.to_owned());
    let mut metadata = meta(er, color_name(er, color), labels);
    // The model this revision declared, on the Deployment (not its pod template, which would
    // restart pods): a later revision's model change is seen from here, even with status lost.
    if let Some(model) = &er.spec.model {
        let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(ANNOTATION_MODEL.to_owned(), model.name.clone());
        if let Some(dimensions) = model.dimensions {
            annotations.insert(
                ANNOTATION_MODEL_DIMENSIONS.to_owned(),
                dimensions.to_string(),
            );
        }
    }
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector(er, color)),
                ..LabelSelector::default()
            },
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn service(er: &EmbeddingRollout, name: String, color: Color) -> Service {
    let port = er.spec.service.port;
    Service {
        metadata: meta(er, name, BTreeMap::new()),
        spec: Some(CoreServiceSpec {
            selector: Some(selector(er, color)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..CoreServiceSpec::default()
        }),
        status: None,
    }
}

/// `<name>-<color>`: the backend of the Ingresses.
pub fn color_service(er: &EmbeddingRollout, color: Color) -> Service {
    service(er, color_name(er, color), color)
}

/// `<name>`: the stable color, for in-cluster clients.
pub fn stable_service(er: &EmbeddingRollout, stable: Color) -> Service {
    service(er, er.name_any(), stable)
}

fn ingress(
    er: &EmbeddingRollout,
    nginx: &NginxTraffic,
    name: String,
    color: Color,
    annotations: BTreeMap<String, String>,
) -> Ingress {
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: color_name(er, color),
            port: Some(ServiceBackendPort {
                number: Some(er.spec.service.port),
                name: None,
            }),
        }),
        resource: None,
    };
    let paths = nginx
        .paths
        .iter()
        .map(|path| HTTPIngressPath {
            path: Some(path.clone()),
            path_type: "Prefix".to_owned(),
            backend: backend.clone(),
        })
        .collect();
    let mut all_annotations = nginx.annotations.clone();
    all_annotations.extend(annotations);
    let mut metadata = meta(er, name, BTreeMap::new());
    metadata.annotations = Some(all_annotations);
    Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: Some(nginx.ingress_class_name.clone()),
            rules: Some(vec![IngressRule {
                host: nginx.host.clone(),
                http: Some(HTTPIngressRuleValue { paths }),
            }]),
            tls: (!nginx.tls.is_empty()).then(|| nginx.tls.clone()),
            ..IngressSpec::default()
        }),
        status: None,
    }
}

pub fn primary_ingress(er: &EmbeddingRollout, nginx: &NginxTraffic, stable: Color) -> Ingress {
    ingress(er, nginx, er.name_any(), stable, BTreeMap::new())
}

/// The canary Ingress for the routes `live` describes: the weight for nginx, and the canary
/// revision, failed revision and step for the operator itself (status recovery).
pub fn canary_ingress(er: &EmbeddingRollout, nginx: &NginxTraffic, live: &LiveTraffic) -> Ingress {
    let canary = live.canary_color.unwrap_or(Color::Green);
    let mut annotations = BTreeMap::from([
        (ANNOTATION_CANARY.to_owned(), "true".to_owned()),
        (
            ANNOTATION_CANARY_WEIGHT.to_owned(),
            live.canary_weight.to_string(),
        ),
    ]);
    record_rollout(&mut annotations, live);
    // The header reaches the canary while one is deployed, at any weight.
    if let Some(header) = &er.spec.traffic.canary_header
        && live.canary_revision.is_some()
    {
        annotations.insert(ANNOTATION_CANARY_BY_HEADER.to_owned(), header.name.clone());
        annotations.insert(
            ANNOTATION_CANARY_BY_HEADER_VALUE.to_owned(),
            header.value.clone(),
        );
    }
    ingress(er, nginx, canary_ingress_name(er), canary, annotations)
}

/// The color an Ingress of this rollout sends to, from its first backend `<name>-<color>`.
fn backend_color(er: &EmbeddingRollout, ingress: &Ingress) -> Option<Color> {
    let service = ingress
        .spec
        .as_ref()?
        .rules
        .as_ref()?
        .first()?
        .http
        .as_ref()?
        .paths
        .first()?
        .backend
        .service
        .as_ref()?;
    [Color::Blue, Color::Green]
        .into_iter()
        .find(|c| service.name == color_name(er, *c))
}

/// Records on a canary route what the operator needs to rebuild a lost status from it: the
/// canary revision, the failed revision and the step.
pub fn record_rollout(annotations: &mut BTreeMap<String, String>, live: &LiveTraffic) {
    let recorded = [
        (ANNOTATION_CANARY_REVISION, live.canary_revision.clone()),
        (ANNOTATION_FAILED_REVISION, live.failed_revision.clone()),
        (ANNOTATION_STEP, live.step_index.map(|i| i.to_string())),
    ];
    for (key, value) in recorded {
        if let Some(value) = value {
            annotations.insert(key.to_owned(), value);
        }
    }
}

/// What [`record_rollout`] wrote, read back into `live`.
pub fn read_rollout(annotations: &BTreeMap<String, String>, live: &mut LiveTraffic) {
    let get = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();
    live.canary_revision = get(ANNOTATION_CANARY_REVISION);
    live.failed_revision = get(ANNOTATION_FAILED_REVISION);
    live.step_index = get(ANNOTATION_STEP).and_then(|s| s.parse().ok());
}

/// Reads the live routes back (status recovery).
pub fn live_traffic(
    er: &EmbeddingRollout,
    primary: Option<&Ingress>,
    canary: Option<&Ingress>,
) -> LiveTraffic {
    let annotations = canary.map(|c| c.annotations().clone()).unwrap_or_default();
    let mut live = LiveTraffic {
        stable_color: primary.and_then(|p| backend_color(er, p)),
        canary_color: canary.and_then(|c| backend_color(er, c)),
        canary_weight: annotations
            .get(ANNOTATION_CANARY_WEIGHT)
            .and_then(|w| w.parse().ok())
            .unwrap_or(0),
        ..LiveTraffic::default()
    };
    read_rollout(&annotations, &mut live);
    live
}

/// What a color's Deployment says about its pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColorState {
    pub exists: bool,
    /// The revision label of its pod template.
    pub revision: Option<String>,
    pub desired_replicas: i32,
    pub ready_replicas: i32,
    /// Every desired pod runs the current template and is Ready, and no old pod is left.
    pub ready: bool,
    /// The model its revision declared (`spec.model`), from the Deployment's annotations;
    /// `None` when it declared none or was written by an older operator.
    pub model: Option<String>,
    pub dimensions: Option<i32>,
}

impl ColorState {
    pub fn from_deployment(deployment: Option<&Deployment>) -> Self {
        let Some(deployment) = deployment else {
            return Self::default();
        };
        let spec = deployment.spec.as_ref();
        let status = deployment.status.clone().unwrap_or_default();
        let desired = spec.and_then(|s| s.replicas).unwrap_or(1);
        let revision = spec
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(LABEL_REVISION))
            .cloned();
        let observed =
            status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
        // While the Deployment rolls over, its Ready count includes the old template's pods;
        // taking them off (as if all Ready) gives a lower bound for the current template.
        let old_pods = (status.replicas.unwrap_or(0) - status.updated_replicas.unwrap_or(0)).max(0);
        let ready_replicas = (status.ready_replicas.unwrap_or(0) - old_pods).max(0);
        let ready = observed
            && desired > 0
            && status.updated_replicas.unwrap_or(0) >= desired
            && ready_replicas >= desired
            && status.replicas.unwrap_or(0) == desired;
        let annotation = |key: &str| deployment.annotations().get(key).cloned();
        Self {
            exists: true,
            revision,
            desired_replicas: desired,
            ready_replicas,
            ready,
            model: annotation(ANNOTATION_MODEL),
            dimensions: annotation(ANNOTATION_MODEL_DIMENSIONS).and_then(|d| d.parse().ok()),
        }
    }

    /// Ready and running `revision`.
    pub fn ready_at(&self, revision: &str) -> bool {
        self.ready && self.revision.as_deref() == Some(revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    fn rollout() -> EmbeddingRollout {
        let mut er: EmbeddingRollout = serde_json::from_value(serde_json::json!({
            "apiVersion": "embedroll.dev/v1alpha1",
            "kind": "EmbeddingRollout",
            "metadata": {"name": "search", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "template": {"metadata": {"labels": {"team": "a"}},
                             "spec": {"containers": [{"name": "embedder", "image": "embedder:1"}]}},
                "model": {"name": "all-MiniLM-L6-v2"},
                "traffic": {"nginx": {"host": "api.example.com", "paths": ["/api/v1/embed", "/v1/embeddings"],
                                      "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "2m"}}}
            }
        }))
        .unwrap();
        er.metadata.uid = Some("u-1".into());
        er
    }

    #[test]
    fn deployment_labels_pods_and_selects_by_color_only() {
        let er = rollout();
        let d = deployment(&er, Color::Green, "abc", 3);
        assert_eq!(d.metadata.name.as_deref(), Some("search-green"));
        assert_eq!(
            d.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let selector = spec.selector.match_labels.unwrap();
        assert_eq!(
            selector.len(),
            2,
            "the revision is not in the immutable selector"
        );
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[LABEL_COLOR], "green");
        assert_eq!(labels[LABEL_REVISION], "abc");
        assert_eq!(labels[LABEL_ROLLOUT], "search");
    }

    #[test]
    fn ingresses_route_all_paths_and_carry_canary_weight() {
        let er = rollout();
        let nginx = er.spec.traffic.nginx.clone().unwrap();
        let primary = primary_ingress(&er, &nginx, Color::Blue);
        let live = LiveTraffic {
            stable_color: Some(Color::Blue),
            canary_color: Some(Color::Green),
            canary_weight: 10,
            canary_revision: Some("r2".into()),
            failed_revision: None,
            step_index: Some(1),
        };
        let canary = canary_ingress(&er, &nginx, &live);
        assert_eq!(
            live_traffic(&er, Some(&primary), Some(&canary)),
            live,
            "what the routes record reads back the same"
        );
        let annotations = canary.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[ANNOTATION_CANARY_WEIGHT], "10");
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-body-size"],
            "2m"
        );
        assert!(
            !primary
                .metadata
                .annotations
                .unwrap()
                .contains_key(ANNOTATION_CANARY)
        );
        let rule = &canary.spec.as_ref().unwrap().rules.as_ref().unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("api.example.com"));
        let paths = &rule.http.as_ref().unwrap().paths;
        assert_eq!(paths.len(), 2);
        assert_eq!(
            paths[0].backend.service.as_ref().unwrap().name,
            "search-green"
        );
    }

    #[test]
    fn the_canary_header_is_set_while_a_canary_is_deployed() {
        let mut er = rollout();
        er.spec.traffic.canary_header = Some(crate::crd::CanaryHeader {
            name: "X-Canary".into(),
            value: "always".into(),
        });
        let nginx = er.spec.traffic.nginx.clone().unwrap();
        let mut live = LiveTraffic {
            stable_color: Some(Color::Blue),
            canary_color: Some(Color::Green),
            canary_revision: Some("r2".into()),
            ..LiveTraffic::default()
        };
        let annotations = canary_ingress(&er, &nginx, &live)
            .metadata
            .annotations
            .unwrap();
        assert_eq!(annotations[ANNOTATION_CANARY_BY_HEADER], "X-Canary");
        assert_eq!(annotations[ANNOTATION_CANARY_BY_HEADER_VALUE], "always");
        assert_eq!(annotations[ANNOTATION_CANARY_WEIGHT], "0");
        live.canary_revision = None;
        let annotations = canary_ingress(&er, &nginx, &live)
            .metadata
            .annotations
            .unwrap();
        assert!(!annotations.contains_key(ANNOTATION_CANARY_BY_HEADER));
    }

    #[test]
    fn color_state_needs_every_pod_updated_and_ready() {
        let er = rollout();
        let mut d = deployment(&er, Color::Blue, "r1", 2);
        d.metadata.generation = Some(2);
        let status = |observed, updated, ready, replicas| DeploymentStatus {
            observed_generation: Some(observed),
            updated_replicas: Some(updated),
            ready_replicas: Some(ready),
            replicas: Some(replicas),
            ..DeploymentStatus::default()
        };
        d.status = Some(status(2, 2, 2, 2));
        assert!(ColorState::from_deployment(Some(&d)).ready_at("r1"));
        assert!(!ColorState::from_deployment(Some(&d)).ready_at("r2"));
        d.status = Some(status(1, 2, 2, 2));
        assert!(
            !ColorState::from_deployment(Some(&d)).ready,
            "stale observedGeneration"
        );
        d.status = Some(status(2, 2, 2, 3));
        assert!(
            !ColorState::from_deployment(Some(&d)).ready,
            "an old pod is still there"
        );
        // Rolling over to a template whose pods crash: the 2 Ready pods are the old ones.
        d.status = Some(status(2, 2, 2, 4));
        assert_eq!(ColorState::from_deployment(Some(&d)).ready_replicas, 0);
        d.status = Some(status(2, 2, 1, 2));
        assert!(!ColorState::from_deployment(Some(&d)).ready);
        assert!(!ColorState::from_deployment(None).exists);
    }
}
