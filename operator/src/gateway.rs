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

use crate::crd::{CanaryHeader, Color, EmbeddingRollout, GatewayApiTraffic, ParentReference};
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
    /// Read from a team's route only, to compare its matches whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<serde_json::Value>,
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

/// A backend (group "" and kind Service, in the route's namespace, are the API's defaults).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
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

/// A Gateway, as far as the operator reads it: to say why no Gateway reports on a route.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    plural = "gateways",
    namespaced,
    status = "GatewayStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// What the operator knows of a route's parent Gateway.
pub enum ParentGateway {
    /// Not in what the operator can read (another kind of parent, a namespace it does not
    /// watch, or no permission to read Gateways).
    Unknown,
    Missing,
    Found(Box<Gateway>),
}

/// Why no Gateway controller reports on a route for `parent`, as precisely as the parent
/// Gateway's own state says.
fn unreported(name: &str, parent: ParentGateway) -> String {
    match parent {
        ParentGateway::Missing => format!("parent Gateway {name} does not exist"),
        ParentGateway::Found(gateway) => {
            let class = &gateway.spec.gateway_class_name;
            let accepted = gateway
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"));
            match accepted {
                Some(c) if c.status == "True" => format!(
                    "no Gateway controller reports on the HTTPRoute for parent {name}, though that Gateway is accepted (do its listeners allow routes from this namespace and hostname?)"
                ),
                Some(c) if c.status == "False" => format!(
                    "parent Gateway {name} is not accepted ({}): {}",
                    c.reason, c.message
                ),
                _ => format!(
                    "parent Gateway {name} has not been accepted by any controller (is its GatewayClass {class} served?)"
                ),
            }
        }
        ParentGateway::Unknown => format!(
            "no Gateway controller reports on the HTTPRoute for parent {name} (does that Gateway exist, and is its GatewayClass served?)"
        ),
    }
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
        ..HttpBackendRef::default()
    }];
    if weight > 0 && canary != stable {
        backend_refs.push(HttpBackendRef {
            name: color_name(er, canary),
            port,
            weight: Some(weight),
            ..HttpBackendRef::default()
        });
    }
    let path = |path: &String| {
        Some(HttpPathMatch {
            type_: Some("PathPrefix".to_owned()),
            value: Some(path.clone()),
        })
    };
    let paths = gateway.paths();
    let mut rules: Vec<HttpRouteRule> = paths
        .iter()
        .map(|p| HttpRouteRule {
            matches: vec![HttpRouteMatch {
                path: path(p),
                ..HttpRouteMatch::default()
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
            matches: paths
                .iter()
                .map(|p| HttpRouteMatch {
                    path: path(p),
                    headers: vec![HttpHeaderMatch {
                        type_: Some("Exact".to_owned()),
                        name: header.name.clone(),
                        value: header.value.clone(),
                    }],
                    ..HttpRouteMatch::default()
                })
                .collect(),
            backend_refs: vec![HttpBackendRef {
                name: color_name(er, canary),
                port,
                weight: Some(1),
                ..HttpBackendRef::default()
            }],
        });
    }
    let mut metadata = crate::resources::child_meta(er, er.name_any());
    metadata.annotations = Some(recorded(live));
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
    parent_refs: &[ParentReference],
    namespace: &str,
    gateway: impl Fn(&str, &str) -> ParentGateway,
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
    for wanted in parent_refs {
        let name = parent_name(wanted, namespace);
        let Some(parent) = parents
            .iter()
            .find(|p| same_parent(&p.parent_ref, wanted, namespace))
        else {
            let is_gateway = wanted
                .group
                .as_deref()
                .is_none_or(|g| g == "gateway.networking.k8s.io")
                && wanted.kind.as_deref().is_none_or(|k| k == "Gateway");
            let known = if is_gateway {
                gateway(
                    wanted.namespace.as_deref().unwrap_or(namespace),
                    &wanted.name,
                )
            } else {
                ParentGateway::Unknown
            };
            return RouteState::Unreported(unreported(&name, known));
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

/// What the operator records on a route it steers (either mode): the colors and weight it
/// wrote, and the rollout's state, so a lost status can be rebuilt from the route.
fn recorded(live: &LiveTraffic) -> BTreeMap<String, String> {
    let stable = live.stable_color.unwrap_or(Color::Blue);
    let canary = live.canary_color.unwrap_or(stable.other());
    let mut annotations = BTreeMap::from([
        (ANNOTATION_STABLE_COLOR.to_owned(), stable.to_string()),
        (ANNOTATION_CANARY_COLOR.to_owned(), canary.to_string()),
        (
            ANNOTATION_CANARY_WEIGHT.to_owned(),
            live.canary_weight.clamp(0, 100).to_string(),
        ),
    ]);
    record_rollout(&mut annotations, live);
    annotations
}

/// Every annotation key [`recorded`] may write.
const RECORDED_KEYS: [&str; 6] = [
    ANNOTATION_STABLE_COLOR,
    ANNOTATION_CANARY_COLOR,
    ANNOTATION_CANARY_WEIGHT,
    crate::resources::ANNOTATION_CANARY_REVISION,
    crate::resources::ANNOTATION_FAILED_REVISION,
    crate::resources::ANNOTATION_STEP,
];

/// Referenced mode: the color a backendRef points at, if it is one of the rollout's color
/// Services (kind Service, core group, the route's own namespace).
fn backend_color(
    er: &EmbeddingRollout,
    route: &HTTPRoute,
    backend: &HttpBackendRef,
) -> Option<Color> {
    let core = backend.group.as_deref().is_none_or(str::is_empty);
    let service = backend.kind.as_deref().is_none_or(|k| k == "Service");
    let here = backend.namespace.is_none() || backend.namespace == route.metadata.namespace;
    if !(core && service && here) {
        return None;
    }
    [Color::Blue, Color::Green]
        .into_iter()
        .find(|c| backend.name == color_name(er, *c))
}

/// Referenced mode: whether a match requires the canary header's exact value. Header names
/// compare without case, as HTTP's do, and only a name's first entry counts (as the API says).
fn requires_header(m: &HttpRouteMatch, header: &CanaryHeader) -> bool {
    m.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(&header.name))
        .is_some_and(|h| h.type_.as_deref().is_none_or(|t| t == "Exact") && h.value == header.value)
}

/// Referenced mode: whether `rule` is the team's canary-header rule (every match requires the
/// header), which goes wholly to a deployed canary instead of being split by weight.
fn is_header_rule(er: &EmbeddingRollout, rule: &HttpRouteRule) -> bool {
    er.spec
        .traffic
        .canary_header
        .as_ref()
        .is_some_and(|header| {
            !rule.matches.is_empty() && rule.matches.iter().all(|m| requires_header(m, header))
        })
}

/// A rule's matches as the API reads them: none means every request; an unset path is a
/// prefix `/`, an unset path or header type is the API's default.
fn effective_matches(rule: &HttpRouteRule) -> Vec<HttpRouteMatch> {
    let mut matches = if rule.matches.is_empty() {
        vec![HttpRouteMatch::default()]
    } else {
        rule.matches.clone()
    };
    for m in &mut matches {
        let path = m.path.get_or_insert_with(HttpPathMatch::default);
        path.type_.get_or_insert_with(|| "PathPrefix".to_owned());
        path.value.get_or_insert_with(|| "/".to_owned());
        for h in &mut m.headers {
            h.type_.get_or_insert_with(|| "Exact".to_owned());
            h.name.make_ascii_lowercase();
        }
        m.headers.sort_by(|a, b| a.name.cmp(&b.name));
    }
    matches
}

/// A match in words, for status: its path, method and headers.
fn describe(m: &HttpRouteMatch) -> String {
    let path = m.path.clone().unwrap_or_default();
    let mut text = format!(
        "{} {}",
        path.type_.unwrap_or_default(),
        path.value.unwrap_or_default()
    );
    if let Some(method) = &m.method {
        text.push_str(&format!(", method {method}"));
    }
    for h in &m.headers {
        text.push_str(&format!(", header {}: {}", h.name, h.value));
    }
    text
}

/// The color rules of a route: the indices of those whose backendRefs include the rollout's
/// color Services.
fn color_rules<'r>(
    er: &'r EmbeddingRollout,
    route: &'r HTTPRoute,
) -> impl Iterator<Item = (usize, &'r HttpRouteRule)> + 'r {
    route.spec.rules.iter().enumerate().filter(|(_, rule)| {
        rule.backend_refs
            .iter()
            .any(|b| backend_color(er, route, b).is_some())
    })
}

/// Referenced mode: why the route cannot carry the rollout's weights, if it cannot (the
/// operator then leaves it alone). Each rule that names one color must name both, or a weight
/// could not move between them.
pub fn referenced_route_problem(
    er: &EmbeddingRollout,
    route: Option<&HTTPRoute>,
    name: &str,
) -> Option<String> {
    let Some(route) = route else {
        return Some(format!(
            "HTTPRoute {name} (traffic.gatewayAPI.httpRouteRef) does not exist"
        ));
    };
    if route.spec.parent_refs.is_empty() {
        return Some(format!(
            "HTTPRoute {name} has no parentRefs: no Gateway serves it"
        ));
    }
    let (blue, green) = (color_name(er, Color::Blue), color_name(er, Color::Green));
    let mut steered = false;
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let colors: Vec<Color> = rule
            .backend_refs
            .iter()
            .filter_map(|b| backend_color(er, route, b))
            .collect();
        let (has_blue, has_green) = (
            colors.contains(&Color::Blue),
            colors.contains(&Color::Green),
        );
        if has_blue != has_green {
            let missing = if has_blue { &green } else { &blue };
            return Some(format!(
                "HTTPRoute {name} rule {i} has no backendRef to Service {missing}: each rule that sends to one color must list both ({blue} and {green})"
            ));
        }
        steered |= has_blue;
    }
    (!steered).then(|| {
        format!("HTTPRoute {name} has no backendRefs to the rollout's Services {blue} and {green}")
    })
}

/// Referenced mode with `traffic.canaryHeader`: why the header would not reach the canary, if
/// it would not. The route needs a color rule whose every match requires the header, and
/// that rule must win wherever the others match: the API picks a rule by exact path, then the
/// longest prefix, then method, then the most headers, so for each match of the other color
/// rules it needs the same match with the header added. The weights are still set meanwhile
/// (a rollback must still reach the route); the rollout holds until the route is fixed.
pub fn referenced_header_problem(
    er: &EmbeddingRollout,
    route: &HTTPRoute,
    name: &str,
) -> Option<String> {
    let header = er.spec.traffic.canary_header.as_ref()?;
    let wanted = format!("{}: {}", header.name, header.value);
    let mut covered = Vec::new();
    let mut others = Vec::new();
    for (i, rule) in color_rules(er, route) {
        let with = rule
            .matches
            .iter()
            .filter(|m| requires_header(m, header))
            .count();
        if is_header_rule(er, rule) {
            covered.extend(effective_matches(rule).into_iter().map(|mut m| {
                m.headers
                    .retain(|h| !h.name.eq_ignore_ascii_case(&header.name));
                m
            }));
        } else if with > 0 {
            return Some(format!(
                "HTTPRoute {name} rule {i} requires header {wanted} in some of its matches only: the canary gets a rule whole, so give the header a rule of its own"
            ));
        } else {
            others.extend(effective_matches(rule).into_iter().map(|m| (i, m)));
        }
    }
    if covered.is_empty() {
        return Some(format!(
            "HTTPRoute {name} has no rule for traffic.canaryHeader: add one whose every match requires header {wanted} (type Exact), listing {} and {}",
            color_name(er, Color::Blue),
            color_name(er, Color::Green)
        ));
    }
    others
        .into_iter()
        .find(|(_, m)| !covered.contains(m))
        .map(|(i, m)| {
            format!(
                "HTTPRoute {name} rule {i} matches {} without the canary header, and no match of the header rule is that one plus header {wanted}: such requests with the header would win by that rule and reach stable; add it to the header rule",
                describe(&m)
            )
        })
}

/// Referenced mode: the JSON patch that gives the route's color backendRefs the weights
/// `live` describes (`100 - w` to stable, `w` to the canary, 0 to an idle color; on the
/// canary-header rule 100 to a deployed canary, as the managed route's header rule) and records
/// the rollout on it, touching nothing else. Each change is preceded by a `test` of the
/// backendRef's name, so a route edited since it was cached is not patched at the wrong
/// place (the apiserver refuses the whole patch). Empty when the route already says all that.
pub fn referenced_route_patch(
    er: &EmbeddingRollout,
    route: &HTTPRoute,
    live: &LiveTraffic,
) -> Vec<serde_json::Value> {
    use serde_json::json;
    let stable = live.stable_color.unwrap_or(Color::Blue);
    let canary = live.canary_color.unwrap_or(stable.other());
    let canary_weight = if canary == stable {
        0
    } else {
        live.canary_weight.clamp(0, 100)
    };
    let canary_deployed = live.canary_revision.is_some() && canary != stable;
    let weight_of = |color: Color, header_rule: bool| {
        let canary_share = match header_rule {
            true if canary_deployed => 100,
            true => 0,
            false => canary_weight,
        };
        if color == stable {
            100 - canary_share
        } else {
            canary_share
        }
    };
    let mut ops = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        let header_rule = is_header_rule(er, rule);
        for (j, backend) in rule.backend_refs.iter().enumerate() {
            let Some(color) = backend_color(er, route, backend) else {
                continue;
            };
            let weight = weight_of(color, header_rule);
            // An unset weight is 1 (the API's default).
            if backend.weight.unwrap_or(1) == weight {
                continue;
            }
            let at = format!("/spec/rules/{i}/backendRefs/{j}");
            ops.push(json!({"op": "test", "path": format!("{at}/name"), "value": backend.name}));
            ops.push(json!({"op": "add", "path": format!("{at}/weight"), "value": weight}));
        }
    }
    let wanted = recorded(live);
    match &route.metadata.annotations {
        None => ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": wanted})),
        Some(have) => {
            for key in RECORDED_KEYS {
                let path = format!(
                    "/metadata/annotations/{}",
                    key.replace('~', "~0").replace('/', "~1")
                );
                match (have.get(key), wanted.get(key)) {
                    (Some(a), Some(b)) if a == b => {}
                    (_, Some(value)) => {
                        ops.push(json!({"op": "add", "path": path, "value": value}))
                    }
                    (Some(_), None) => ops.push(json!({"op": "remove", "path": path})),
                    (None, None) => {}
                }
            }
        }
    }
    ops
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
            route_state(None, &gw.parent_refs, "ml", |_, _| ParentGateway::Unknown),
            RouteState::Pending(_)
        ));
        let RouteState::Unreported(why) =
            route_state(Some(&route), &gw.parent_refs, "ml", |_, _| {
                ParentGateway::Unknown
            })
        else {
            panic!("no parent status is unreported");
        };
        assert!(why.contains("infra/web"), "{why}");

        // Where the operator can read the parent Gateway, it says what is wrong with it.
        let unreported_with = |parent: fn() -> ParentGateway| {
            let RouteState::Unreported(why) =
                route_state(Some(&route), &gw.parent_refs, "ml", |ns, name| {
                    assert_eq!((ns, name), ("infra", "web"));
                    parent()
                })
            else {
                panic!("no parent status is unreported");
            };
            why
        };
        let missing = unreported_with(|| ParentGateway::Missing);
        assert_eq!(missing, "parent Gateway infra/web does not exist");
        let unserved = unreported_with(|| {
            ParentGateway::Found(Box::new(Gateway::new(
                "web",
                GatewaySpec {
                    gateway_class_name: "nobody".to_owned(),
                },
            )))
        });
        assert!(
            unserved.contains("GatewayClass nobody served"),
            "{unserved}"
        );

        let ok = with_status(
            route.clone(),
            &[("Accepted", "True", 2), ("ResolvedRefs", "True", 2)],
        );
        assert_eq!(
            route_state(Some(&ok), &gw.parent_refs, "ml", |_, _| {
                ParentGateway::Unknown
            }),
            RouteState::Routed
        );

        let refused = with_status(
            route.clone(),
            &[("Accepted", "False", 2), ("ResolvedRefs", "True", 2)],
        );
        let RouteState::Refused(why) =
            route_state(Some(&refused), &gw.parent_refs, "ml", |_, _| {
                ParentGateway::Unknown
            })
        else {
            panic!("a False condition is a refusal");
        };
        assert!(why.contains("Accepted is False (NoSuchGateway)"), "{why}");

        // Reported on an older generation: the new weights are not in effect yet.
        let stale = with_status(
            route,
            &[("Accepted", "False", 1), ("ResolvedRefs", "True", 1)],
        );
        let RouteState::Pending(why) = route_state(Some(&stale), &gw.parent_refs, "ml", |_, _| {
            ParentGateway::Unknown
        }) else {
            panic!("a stale report is pending");
        };
        assert!(why.contains("generation 2"), "{why}");
    }

    /// A route as a team keeps it in Git: two rules, one with a filter and a third backend the
    /// operator must leave alone, and the colors listed in the other order.
    fn referenced() -> HTTPRoute {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "ml", "resourceVersion": "7"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "rules": [
                    {"backendRefs": [{"name": "demo-green", "port": 8080, "weight": 0},
                                     {"name": "demo-blue", "port": 8080}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                     "backendRefs": [{"name": "legacy", "port": 80, "weight": 5}]}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_referenced_route_gets_only_its_color_weights_and_the_record() {
        let er = rollout();
        let route = referenced();
        assert_eq!(referenced_route_problem(&er, Some(&route), "web"), None);
        let ops = referenced_route_patch(&er, &route, &live(10));
        let weights: Vec<(&str, &serde_json::Value)> = ops
            .iter()
            .filter(|op| op["path"].as_str().unwrap().ends_with("/weight"))
            .map(|op| (op["path"].as_str().unwrap(), &op["value"]))
            .collect();
        assert_eq!(
            weights,
            [
                ("/spec/rules/0/backendRefs/0/weight", &json!(10)),
                ("/spec/rules/0/backendRefs/1/weight", &json!(90)),
            ],
            "{ops:?}"
        );
        // Each weight is guarded by a test of the name it belongs to.
        assert_eq!(
            ops[0],
            json!({"op": "test", "path": "/spec/rules/0/backendRefs/0/name", "value": "demo-green"})
        );
        let annotations = ops.last().unwrap();
        assert_eq!(annotations["path"], "/metadata/annotations");
        assert_eq!(annotations["value"][ANNOTATION_CANARY_WEIGHT], "10");

        // Applied, the route reads back the same and needs nothing more.
        let mut doc = serde_json::to_value(&route).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(json!(ops)).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        let patched: HTTPRoute = serde_json::from_value(doc).unwrap();
        assert_eq!(
            patched.spec.rules[1], route.spec.rules[1],
            "other backends untouched"
        );
        assert_eq!(live_traffic(Some(&patched)), live(10));
        assert_eq!(
            referenced_route_patch(&er, &patched, &live(10)),
            Vec::<serde_json::Value>::new()
        );

        // Promoted: green is stable, blue idle at 0; a revision no longer recorded is removed.
        let promoted = LiveTraffic {
            stable_color: Some(Color::Green),
            canary_color: Some(Color::Blue),
            canary_weight: 0,
            canary_revision: None,
            failed_revision: None,
            step_index: None,
        };
        let ops = referenced_route_patch(&er, &patched, &promoted);
        let mut doc = serde_json::to_value(&patched).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(json!(ops)).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        let done: HTTPRoute = serde_json::from_value(doc).unwrap();
        let refs: Vec<(&str, Option<i32>)> = done.spec.rules[0]
            .backend_refs
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect();
        assert_eq!(refs, [("demo-green", Some(100)), ("demo-blue", Some(0))]);
        assert_eq!(live_traffic(Some(&done)), promoted);
    }

    #[test]
    fn a_referenced_route_that_cannot_carry_the_weights_says_why() {
        let er = rollout();
        let missing = referenced_route_problem(&er, None, "web").unwrap();
        assert!(missing.contains("does not exist"), "{missing}");

        let mut one_color = referenced();
        one_color.spec.rules[0].backend_refs.remove(0);
        let why = referenced_route_problem(&er, Some(&one_color), "web").unwrap();
        assert!(
            why.contains("rule 0") && why.contains("demo-green"),
            "{why}"
        );

        let mut elsewhere = referenced();
        for b in &mut elsewhere.spec.rules[0].backend_refs {
            b.namespace = Some("other".to_owned());
        }
        let why = referenced_route_problem(&er, Some(&elsewhere), "web").unwrap();
        assert!(why.contains("no backendRefs"), "{why}");

        let mut unattached = referenced();
        unattached.spec.parent_refs.clear();
        let why = referenced_route_problem(&er, Some(&unattached), "web").unwrap();
        assert!(why.contains("no parentRefs"), "{why}");
    }

    /// The team's route with a rule of its own for the canary header (its name in lower case:
    /// HTTP header names have no case), both colors listed, weights left to the API's default.
    fn with_header_rule() -> (EmbeddingRollout, HTTPRoute) {
        let mut er = rollout();
        er.spec.traffic.canary_header = Some(CanaryHeader {
            name: "X-Reindex".to_owned(),
            value: "1".to_owned(),
        });
        let mut route = referenced();
        route.spec.rules.push(
            serde_json::from_value(json!({
                "matches": [{"path": {"type": "PathPrefix", "value": "/"},
                             "headers": [{"name": "x-reindex", "value": "1"}]}],
                "backendRefs": [{"name": "demo-blue", "port": 8080},
                                {"name": "demo-green", "port": 8080}]
            }))
            .unwrap(),
        );
        (er, route)
    }

    fn patched(er: &EmbeddingRollout, route: &HTTPRoute, live: &LiveTraffic) -> HTTPRoute {
        let ops = referenced_route_patch(er, route, live);
        let mut doc = serde_json::to_value(route).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(json!(ops)).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    fn weights(route: &HTTPRoute, rule: usize) -> Vec<(&str, Option<i32>)> {
        route.spec.rules[rule]
            .backend_refs
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect()
    }

    #[test]
    fn a_referenced_routes_header_rule_goes_wholly_to_a_deployed_canary() {
        let (er, route) = with_header_rule();
        assert_eq!(referenced_route_problem(&er, Some(&route), "web"), None);
        assert_eq!(referenced_header_problem(&er, &route, "web"), None);

        // At 0% (held for a re-index) and at 10%: the header rule is the canary's alone.
        for weight in [0, 10] {
            let live = live(weight);
            let route = patched(&er, &route, &live);
            assert_eq!(
                weights(&route, 0),
                [
                    ("demo-green", Some(weight)),
                    ("demo-blue", Some(100 - weight))
                ]
            );
            assert_eq!(
                weights(&route, 2),
                [("demo-blue", Some(0)), ("demo-green", Some(100))]
            );
            assert_eq!(
                referenced_route_patch(&er, &route, &live),
                Vec::<serde_json::Value>::new()
            );
        }

        // No canary deployed (between rollouts, or rolled back): the header reaches stable,
        // never an idle color without pods.
        let between = LiveTraffic {
            canary_revision: None,
            canary_weight: 0,
            step_index: None,
            ..live(0)
        };
        let route = patched(&er, &patched(&er, &route, &live(10)), &between);
        assert_eq!(
            weights(&route, 2),
            [("demo-blue", Some(100)), ("demo-green", Some(0))]
        );

        // Without traffic.canaryHeader the same rule is split by weight like any other.
        let mut plain = er.clone();
        plain.spec.traffic.canary_header = None;
        let route = patched(&plain, &with_header_rule().1, &live(10));
        assert_eq!(
            weights(&route, 2),
            [("demo-blue", Some(90)), ("demo-green", Some(10))]
        );
    }

    #[test]
    fn a_canary_header_without_a_winning_rule_in_the_referenced_route_says_why() {
        let (er, route) = with_header_rule();
        let problem = |route: &HTTPRoute| {
            assert_eq!(
                referenced_route_problem(&er, Some(route), "web"),
                None,
                "the weights can still be set"
            );
            referenced_header_problem(&er, route, "web").expect("a header problem")
        };

        let mut none = route.clone();
        none.spec.rules.pop();
        let why = problem(&none);
        assert!(
            why.contains("no rule for traffic.canaryHeader") && why.contains("X-Reindex: 1"),
            "{why}"
        );

        // Another value, a regular expression, or the header's name given twice with the
        // value only in its second entry (only the first counts) is not the header routed.
        for headers in [
            json!([{"name": "X-Reindex", "value": "2"}]),
            json!([{"type": "RegularExpression", "name": "X-Reindex", "value": "1"}]),
            json!([{"name": "X-Reindex", "value": "2"}, {"name": "x-reindex", "value": "1"}]),
        ] {
            let mut other = route.clone();
            other.spec.rules[2].matches[0].headers = serde_json::from_value(headers).unwrap();
            let why = problem(&other);
            assert!(why.contains("no rule for traffic.canaryHeader"), "{why}");
        }

        // A rule that takes the header in one match and plain requests in another could not
        // be the canary's without taking users with it.
        let mut mixed = route.clone();
        mixed.spec.rules[2].matches.push(HttpRouteMatch::default());
        let why = problem(&mixed);
        assert!(
            why.contains("rule 2") && why.contains("some of its matches only"),
            "{why}"
        );

        // The users' rule matches a longer prefix (or a method) than the header rule: that
        // rule wins for requests with the header too, so they would reach stable.
        for users in [
            json!([{"path": {"type": "PathPrefix", "value": "/api"}}]),
            json!([{"path": {"value": "/"}, "method": "POST"}]),
            json!([{"headers": [{"name": "X-Tenant", "value": "a"}]}]),
        ] {
            let mut shadowed = route.clone();
            shadowed.spec.rules[0].matches = serde_json::from_value(users.clone()).unwrap();
            let why = problem(&shadowed);
            assert!(
                why.contains("rule 0") && why.contains("add it to the header rule"),
                "{users}: {why}"
            );
            // The same match plus the header, in the header rule, wins there: fixed.
            let mut fixed = shadowed.clone();
            let mut with_header: Vec<HttpRouteMatch> = serde_json::from_value(users).unwrap();
            with_header[0].headers.push(HttpHeaderMatch {
                type_: Some("Exact".to_owned()),
                name: "X-REINDEX".to_owned(),
                value: "1".to_owned(),
            });
            fixed.spec.rules[2].matches.extend(with_header);
            assert_eq!(referenced_header_problem(&er, &fixed, "web"), None);
        }

        // Without traffic.canaryHeader none of this is asked for.
        let mut plain = er.clone();
        plain.spec.traffic.canary_header = None;
        assert_eq!(referenced_header_problem(&plain, &none, "web"), None);
    }
}
