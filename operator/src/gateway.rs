//! Gateway API traffic: the HTTPRoute `<name>` a rollout with `traffic.gatewayAPI` owns, and
//! what its status says about it.
//!
//! Only the fields the operator writes and reads are typed here (the `gateway-api` crate
//! follows another kube release); the apiserver keeps the rest, and server-side apply leaves
//! fields it does not name alone.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::crd::{Color, EmbeddingRollout, GatewayApiTraffic, ParentReference};
use crate::machine::{LiveTraffic, RouteState};
use crate::resources::{color_name, read_rollout, record_rollout};

/// The color the route sends `100 - weight` to, so a lost status can be rebuilt.
pub const ANNOTATION_STABLE_COLOR: &str = "embedroll.dev/stable-color";
/// The canary's color and weight as the operator wrote them.
pub const ANNOTATION_CANARY_COLOR: &str = "embedroll.dev/canary-color";
pub const ANNOTATION_CANARY_WEIGHT: &str = "embedroll.dev/canary-weight";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "HttpRouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeaderMatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathMatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A Service backend (group "" and kind Service are the API's defaults).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentReference,
    #[serde(default)]
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// The HTTPRoute for the routes `live` describes. The canary's backend is listed only while
/// it has weight: a weight-0 reference to a Service without endpoints makes some Gateways
/// mark the whole route unresolved.
pub fn http_route(
    er: &EmbeddingRollout,
    gateway: &GatewayApiTraffic,
    live: &LiveTraffic,
) -> HTTPRoute {
    let stable = live.stable_color.unwrap_or(Color::Blue);
    let canary = live.canary_color.unwrap_or(stable.other());
    let weight = live.canary_weight.clamp(0, 100);
    let port = Some(er.spec.service.port);
    let mut backend_refs = vec![HttpBackendRef {
        name: color_name(er, stable),
        port,
        weight: Some(100 - weight),
    }];
    if weight > 0 && canary != stable {
        backend_refs.push(HttpBackendRef {
            name: color_name(er, canary),
            port,
            weight: Some(weight),
        });
    }
    let path = |path: &String| {
        Some(HttpPathMatch {
            type_: Some("PathPrefix".to_owned()),
            value: Some(path.clone()),
        })
    };
    let mut rules: Vec<HttpRouteRule> = gateway
        .paths
        .iter()
        .map(|p| HttpRouteRule {
            matches: vec![HttpRouteMatch {
                path: path(p),
                headers: Vec::new(),
            }],
            backend_refs: backend_refs.clone(),
        })
        .collect();
    // The header reaches the canary while one is deployed (a rule matching more wins); between
    // rollouts the idle color has no pods, and a backend without endpoints would leave the
    // whole route unresolved.
    if let Some(header) = &er.spec.traffic.canary_header
        && live.canary_revision.is_some()
        && canary != stable
    {
        rules.push(HttpRouteRule {
            matches: gateway
                .paths
                .iter()
                .map(|p| HttpRouteMatch {
                    path: path(p),
                    headers: vec![HttpHeaderMatch {
                        type_: Some("Exact".to_owned()),
                        name: header.name.clone(),
                        value: header.value.clone(),
                    }],
                })
                .collect(),
            backend_refs: vec![HttpBackendRef {
                name: color_name(er, canary),
                port,
                weight: Some(1),
            }],
        });
    }
    let mut annotations = BTreeMap::from([
        (ANNOTATION_STABLE_COLOR.to_owned(), stable.to_string()),
        (ANNOTATION_CANARY_COLOR.to_owned(), canary.to_string()),
        (ANNOTATION_CANARY_WEIGHT.to_owned(), weight.to_string()),
    ]);
    record_rollout(&mut annotations, live);
    let mut metadata = crate::resources::child_meta(er, er.name_any());
    metadata.annotations = Some(annotations);
    HTTPRoute {
        metadata,
        spec: HttpRouteSpec {
            parent_refs: gateway.parent_refs.clone(),
            hostnames: gateway.hostnames.clone(),
            rules,
        },
        status: None,
    }
}

/// Reads the route back (status recovery), from what the operator recorded on it.
pub fn live_traffic(route: Option<&HTTPRoute>) -> LiveTraffic {
    let Some(route) = route else {
        return LiveTraffic::default();
    };
    let annotations = route.annotations();
    let get = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();
    let color = |key: &str| get(key).and_then(|c| c.parse::<Color>().ok());
    let mut live = LiveTraffic {
        stable_color: color(ANNOTATION_STABLE_COLOR),
        canary_color: color(ANNOTATION_CANARY_COLOR),
        canary_weight: get(ANNOTATION_CANARY_WEIGHT)
            .and_then(|w| w.parse().ok())
            .unwrap_or(0),
        ..LiveTraffic::default()
    };
    read_rollout(annotations, &mut live);
    live
}

/// Whether every parent the rollout names has accepted the route as it is now (its
/// `Accepted` and `ResolvedRefs` conditions True for the current generation); otherwise why
/// not, in words for status and Events.
pub fn route_state(
    route: Option<&HTTPRoute>,
    gateway: &GatewayApiTraffic,
    namespace: &str,
) -> RouteState {
    let Some(route) = route else {
        return RouteState::Pending("HTTPRoute not created yet".to_owned());
    };
    let generation = route.metadata.generation;
    let parents = route
        .status
        .as_ref()
        .map(|s| s.parents.as_slice())
        .unwrap_or_default();
    for wanted in &gateway.parent_refs {
        let name = parent_name(wanted, namespace);
        let Some(parent) = parents
            .iter()
            .find(|p| same_parent(&p.parent_ref, wanted, namespace))
        else {
            return RouteState::Unreported(format!(
                "no Gateway controller reports on the HTTPRoute for parent {name} (does that Gateway exist, and is its GatewayClass served?)"
            ));
        };
        for type_ in ["Accepted", "ResolvedRefs"] {
            let Some(condition) = parent.conditions.iter().find(|c| c.type_ == type_) else {
                return RouteState::Pending(format!("parent {name} has not reported {type_} yet"));
            };
            if condition.observed_generation.is_some() && condition.observed_generation < generation
            {
                return RouteState::Pending(format!(
                    "parent {name} has not reported on the route's generation {} yet",
                    generation.unwrap_or_default()
                ));
            }
            if condition.status != "True" {
                return RouteState::Refused(format!(
                    "parent {name}: {type_} is {} ({}): {}",
                    condition.status, condition.reason, condition.message
                ));
            }
        }
    }
    RouteState::Routed
}

fn parent_name(parent: &ParentReference, namespace: &str) -> String {
    let mut name = format!(
        "{}/{}",
        parent.namespace.as_deref().unwrap_or(namespace),
        parent.name
    );
    if let Some(section) = &parent.section_name {
        name.push_str(&format!(" ({section})"));
    }
    name
}

fn same_parent(reported: &ParentReference, wanted: &ParentReference, namespace: &str) -> bool {
    let group = |p: &ParentReference| {
        p.group
            .clone()
            .unwrap_or_else(|| "gateway.networking.k8s.io".to_owned())
    };
    let kind = |p: &ParentReference| p.kind.clone().unwrap_or_else(|| "Gateway".to_owned());
    let ns = |p: &ParentReference| p.namespace.clone().unwrap_or_else(|| namespace.to_owned());
    group(reported) == group(wanted)
        && kind(reported) == kind(wanted)
        && ns(reported) == ns(wanted)
        && reported.name == wanted.name
        && reported.section_name == wanted.section_name
        && reported.port == wanted.port
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    fn rollout() -> EmbeddingRollout {
        serde_json::from_value(json!({
            "apiVersion": "embedroll.dev/v1alpha1", "kind": "EmbeddingRollout",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u1"},
            "spec": {
                "template": {"spec": {"containers": [{"name": "embedder", "image": "e:1"}]}},
                "traffic": {"gatewayAPI": {"parentRefs": [{"name": "web", "namespace": "infra"}],
                            "hostnames": ["embed.example.com"], "paths": ["/api", "/v1"]}}
            }
        }))
        .unwrap()
    }

    fn gateway(er: &EmbeddingRollout) -> GatewayApiTraffic {
        er.spec.traffic.gateway_api.clone().unwrap()
    }

    fn live(weight: i32) -> LiveTraffic {
        LiveTraffic {
            stable_color: Some(Color::Blue),
            canary_color: Some(Color::Green),
            canary_weight: weight,
            canary_revision: Some("r2".to_owned()),
            failed_revision: None,
            step_index: Some(1),
        }
    }

    #[test]
    fn the_route_splits_every_path_by_weight_and_records_what_it_wrote() {
        let er = rollout();
        let route = http_route(&er, &gateway(&er), &live(10));
        assert_eq!(route.metadata.name.as_deref(), Some("demo"));
        assert_eq!(route.spec.rules.len(), 2);
        for rule in &route.spec.rules {
            let refs: Vec<(&str, Option<i32>)> = rule
                .backend_refs
                .iter()
                .map(|b| (b.name.as_str(), b.weight))
                .collect();
            assert_eq!(refs, [("demo-blue", Some(90)), ("demo-green", Some(10))]);
        }
        assert_eq!(route.spec.hostnames, ["embed.example.com"]);
        assert_eq!(live_traffic(Some(&route)), live(10));

        // At 0 the canary's backend is left out, and the route still reads back the same.
        let idle = http_route(&er, &gateway(&er), &live(0));
        assert_eq!(idle.spec.rules[0].backend_refs.len(), 1);
        assert_eq!(idle.spec.rules[0].backend_refs[0].weight, Some(100));
        assert_eq!(live_traffic(Some(&idle)), live(0));
    }

    #[test]
    fn the_canary_header_reaches_a_deployed_canary_at_any_weight() {
        let mut er = rollout();
        er.spec.traffic.canary_header = Some(crate::crd::CanaryHeader {
            name: "X-Canary".to_owned(),
            value: "always".to_owned(),
        });
        let route = http_route(&er, &gateway(&er), &live(0));
        assert_eq!(
            route.spec.rules.len(),
            3,
            "one rule per path, then the header's"
        );
        let header_rule = &route.spec.rules[2];
        assert_eq!(header_rule.matches.len(), 2, "every path, with the header");
        assert_eq!(header_rule.matches[0].headers[0].name, "X-Canary");
        assert_eq!(header_rule.matches[0].headers[0].value, "always");
        let refs: Vec<&str> = header_rule
            .backend_refs
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(refs, ["demo-green"]);

        // Between rollouts the idle color has no pods: no header rule.
        let idle = LiveTraffic {
            canary_revision: None,
            ..live(0)
        };
        assert_eq!(http_route(&er, &gateway(&er), &idle).spec.rules.len(), 2);
    }

    fn with_status(mut route: HTTPRoute, conditions: &[(&str, &str, i64)]) -> HTTPRoute {
        route.metadata.generation = Some(2);
        route.status = Some(HttpRouteStatus {
            parents: vec![RouteParentStatus {
                parent_ref: ParentReference {
                    group: Some("gateway.networking.k8s.io".to_owned()),
                    kind: Some("Gateway".to_owned()),
                    namespace: Some("infra".to_owned()),
                    name: "web".to_owned(),
                    ..ParentReference::default()
                },
                controller_name: "traefik.io/gateway-controller".to_owned(),
                conditions: conditions
                    .iter()
                    .map(|(type_, status, generation)| Condition {
                        type_: (*type_).to_owned(),
                        status: (*status).to_owned(),
                        reason: if *status == "True" {
                            type_
                        } else {
                            "NoSuchGateway"
                        }
                        .to_string(),
                        message: "m".to_owned(),
                        observed_generation: Some(*generation),
                        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                    })
                    .collect(),
            }],
        });
        route
    }

    #[test]
    fn only_an_accepted_resolved_current_route_counts_as_routed() {
        let er = rollout();
        let gw = gateway(&er);
        let route = http_route(&er, &gw, &live(10));
        assert!(matches!(
            route_state(None, &gw, "ml"),
            RouteState::Pending(_)
        ));
        let RouteState::Unreported(why) = route_state(Some(&route), &gw, "ml") else {
            panic!("no parent status is unreported");
        };
        assert!(why.contains("infra/web"), "{why}");

        let ok = with_status(
            route.clone(),
            &[("Accepted", "True", 2), ("ResolvedRefs", "True", 2)],
        );
        assert_eq!(route_state(Some(&ok), &gw, "ml"), RouteState::Routed);

        let refused = with_status(
            route.clone(),
            &[("Accepted", "False", 2), ("ResolvedRefs", "True", 2)],
        );
        let RouteState::Refused(why) = route_state(Some(&refused), &gw, "ml") else {
            panic!("a False condition is a refusal");
        };
        assert!(why.contains("Accepted is False (NoSuchGateway)"), "{why}");

        // Reported on an older generation: the new weights are not in effect yet.
        let stale = with_status(
            route,
            &[("Accepted", "False", 1), ("ResolvedRefs", "True", 1)],
        );
        let RouteState::Pending(why) = route_state(Some(&stale), &gw, "ml") else {
            panic!("a stale report is pending");
        };
        assert!(why.contains("generation 2"), "{why}");
    }
}
