//! The reconciler: reads the rollout and its children from the controller's own caches, asks
//! the step machine what comes next, and makes it so: status first (the rollout's memory,
//! written only when it changed and only over the version it was planned from), then the
//! consumed command annotations, then traffic (Ingresses), then pods (Deployments). A child is
//! written only when it differs from what is live; an unchanged rollout costs no API request.
//! Every write is server-side apply with one field manager; the one delete is of its own
//! traffic objects when `spec.traffic` switches provider.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::analysis::{self, AnalysisOutcome, Vars};
use crate::children::ChildCache;
use crate::compatibility;
use crate::crd::{
    CheckResult, Color, EmbeddingRollout, EmbeddingRolloutStatus, Phase, parse_duration,
};
use crate::diff;
use crate::error::{Error, Result};
use crate::gateway::{self, Gateway, HTTPRoute, ParentGateway};
use crate::machine::{self, CheckRequest, Commands, Input, LiveTraffic, Plan, RouteState};
use crate::metrics::{MetricLabels, Metrics, ReasonLabels, ResultLabels, RolloutLabels};
use crate::owned;
use crate::prometheus;
use crate::resources::{self, ColorState, FIELD_MANAGER};
use crate::revision::revision;

pub const ANNOTATION_PROMOTE: &str = "embedroll.dev/promote";
pub const ANNOTATION_PROMOTE_FULL: &str = "embedroll.dev/promote-full";
pub const ANNOTATION_ABORT: &str = "embedroll.dev/abort";
pub const ANNOTATION_RETRY: &str = "embedroll.dev/retry";
pub const ANNOTATION_PAUSED: &str = "embedroll.dev/paused";
/// One-shot commands: the controller removes them once their effect is saved in status.
pub const ONE_SHOT: [&str; 4] = [
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_ABORT,
    ANNOTATION_RETRY,
];

/// How the controller runs: concurrency and error backoff.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Rollouts reconciled at once.
    pub concurrency: u16,
    /// First retry after an error; doubles per failure of the same rollout.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl Settings {
    /// The wait before retry `failures` (1 = first failure): base, doubling, capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(20);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// The controller's caches of its children, filled by its own watches.
#[derive(Clone, Default)]
pub struct Stores {
    pub deployments: Arc<ChildCache<Deployment>>,
    pub services: Arc<ChildCache<Service>>,
    pub ingresses: Arc<ChildCache<Ingress>>,
    /// Empty (and ready) when the cluster has no Gateway API CRDs.
    pub routes: Arc<ChildCache<HTTPRoute>>,
    /// HTTPRoutes the operator does not own, whole (`traffic.gatewayAPI.httpRouteRef` names
    /// one of them): few, and the weights to set are wherever their authors put them.
    pub referenced_routes: Arc<ChildCache<HTTPRoute>>,
    /// Gateways, read to say why none reports on a route (empty when they cannot be read).
    pub gateways: Arc<ChildCache<Gateway>>,
    /// Whether Gateways can be read, and in which namespace only (None: all).
    pub gateways_readable: bool,
    pub gateways_namespace: Option<String>,
    /// Whether HTTPRoutes can be watched (checked at start).
    pub gateway_api: bool,
    /// Why not, when they cannot.
    pub gateway_api_missing: Option<String>,
}

impl Stores {
    /// Every cache holds a complete list: before that, a missing child may only be not
    /// listed yet.
    pub fn ready(&self) -> bool {
        self.deployments.is_ready()
            && self.services.is_ready()
            && self.ingresses.is_ready()
            && self.routes.is_ready()
            && self.referenced_routes.is_ready()
            && self.gateways.is_ready()
    }

    /// What the operator knows of the Gateway `namespace/name`.
    pub fn parent_gateway(&self, namespace: &str, name: &str) -> ParentGateway {
        let readable = self.gateways_readable
            && self
                .gateways_namespace
                .as_deref()
                .is_none_or(|ns| ns == namespace);
        if !readable {
            return ParentGateway::Unknown;
        }
        match self.gateways.get(namespace, name) {
            Some(gateway) => ParentGateway::Found(Box::new(gateway)),
            None => ParentGateway::Missing,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub prometheus: prometheus::Clients,
    /// For the vector-compatibility checks, straight to pods.
    pub http: reqwest::Client,
    /// Used when a rollout names no Prometheus.
    pub default_prometheus: Option<String>,
    pub settings: Settings,
    pub stores: Stores,
    /// Failures in a row per rollout, for the backoff.
    failures: Mutex<HashMap<ObjectRef<EmbeddingRollout>, u32>>,
    superseded: Superseded,
    /// Children this process applied, keyed `kind/ns/name`: a hash of (the resourceVersion
    /// the cache showed before, the applied stamp). The cache lags the write by a watch event; until
    /// it catches up, the same apply is not repeated.
    applied: Mutex<HashMap<String, u64>>,
}

/// Resource versions of each rollout that this process has written over: the cache still
/// showing one of them is stale, and acting on it could undo the newer status (say, re-apply
/// 50% to a canary just rolled back).
#[derive(Default)]
struct Superseded(Mutex<HashMap<ObjectRef<EmbeddingRollout>, Vec<String>>>);

impl Superseded {
    fn record(&self, key: &ObjectRef<EmbeddingRollout>, rv: Option<String>) {
        if let Some(rv) = rv {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let list = map.entry(key.clone()).or_default();
            list.push(rv);
            // A handful is enough: the cache catches up within one watch event.
            if list.len() > 8 {
                list.remove(0);
            }
        }
    }

    fn is_stale(&self, key: &ObjectRef<EmbeddingRollout>, rv: Option<&str>) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = map.get(key) else {
            return false;
        };
        if rv.is_some_and(|rv| list.iter().any(|s| s == rv)) {
            return true;
        }
        map.remove(key);
        false
    }

    fn forget(&self, key: &ObjectRef<EmbeddingRollout>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// How soon a reconcile that could not delete an old provider's object looks again.
const PRUNE_RETRY: Duration = Duration::from_secs(10);

/// A namespaced child kind the controller writes from its caches.
trait Child:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + 'static
{
}

impl<K> Child for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + 'static
{
}

/// Which rollouts a watch event says are gone: a delete, or, at the end of a relist (after
/// the watch was down), every rollout with series that the relist did not list, since one
/// deleted meanwhile never comes as a delete. A relist served from a lagging apiserver cache
/// can miss a rollout created just before: its gauges come back at its next reconcile, its
/// counters start again from zero.
#[derive(Default)]
struct Relist(Mutex<Option<BTreeSet<(String, String)>>>);

impl Relist {
    /// Removes the series of the rollouts the event says are gone and returns them.
    fn deleted(
        &self,
        event: &watcher::Event<EmbeddingRollout>,
        metrics: &Metrics,
    ) -> Vec<ObjectRef<EmbeddingRollout>> {
        let key = |rollout: &EmbeddingRollout| {
            (rollout.namespace().unwrap_or_default(), rollout.name_any())
        };
        let mut listed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let gone = match event {
            watcher::Event::Delete(rollout) => {
                let (namespace, name) = key(rollout);
                metrics.forget(&namespace, &name);
                vec![(namespace, name)]
            }
            watcher::Event::Init => {
                *listed = Some(BTreeSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(rollout) => {
                if let Some(listed) = listed.as_mut() {
                    listed.insert(key(rollout));
                }
                Vec::new()
            }
            watcher::Event::InitDone => listed
                .take()
                .map(|alive| metrics.forget_all_but(&alive))
                .unwrap_or_default(),
            watcher::Event::Apply(_) => Vec::new(),
        };
        gone.into_iter()
            .map(|(namespace, name)| ObjectRef::new(&name).within(&namespace))
            .collect()
    }
}

impl Context {
    fn forget(&self, key: &ObjectRef<EmbeddingRollout>) {
        self.superseded.forget(key);
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        let namespace = key.namespace.as_deref().unwrap_or_default();
        let children: Vec<String> = ["", "-blue", "-green", "-canary"]
            .iter()
            .map(|suffix| format!("/{namespace}/{}{suffix}", key.name))
            .collect();
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| {
                let k = k.split('#').next().unwrap_or(k);
                !children.iter().any(|c| k.ends_with(c.as_str()))
            });
    }
}

/// What `Context::applied` keeps of an apply: 8 bytes, not two strings.
fn applied_hash(seen_version: &str, stamp: &str) -> u64 {
    crate::revision::fnv1a64(format!("{seen_version}\n{stamp}").as_bytes())
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    namespace: Option<String>,
    default_prometheus: Option<String>,
    instance: String,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (rollouts, deployments, services, ingresses) = match &namespace {
        Some(ns) => (
            Api::<EmbeddingRollout>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<Ingress>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    if let Err(e) = rollouts.list(&ListParams::default().limit(1)).await {
        warn!(error = %e, "cannot list EmbeddingRollouts; is the CRD installed (kubectl apply -f crds/)?");
    }
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: Some(instance),
    };
    // Children are labelled; watching only those keeps memory flat in busy clusters.
    let children = watcher::Config::default().labels("app.kubernetes.io/managed-by=embedroll");
    let (rollout_store, rollout_writer) = reflector::store();
    let referencing = rollout_store.clone();
    let routes: Api<HTTPRoute> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let gateway_api_missing = routes
        .list(&ListParams::default().limit(1))
        .await
        .err()
        .map(|e| {
            format!(
                "HTTPRoutes cannot be listed ({e}): install the Gateway API CRDs or grant the operator httproutes, then restart it"
            )
        });
    let gateway_api = gateway_api_missing.is_none();
    let gateways: Api<Gateway> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Optional: without it a route no Gateway reports on gets a less precise message.
    let gateways_readable =
        gateway_api && gateways.list(&ListParams::default().limit(1)).await.is_ok();
    let stores = Stores {
        gateway_api,
        gateway_api_missing: gateway_api_missing.clone(),
        gateways_readable,
        gateways_namespace: namespace.clone(),
        ..Stores::default()
    };
    if !gateways_readable {
        stores.gateways.apply(&watcher::Event::InitDone);
    }
    if let Some(why) = &gateway_api_missing {
        // Nothing to watch: the cache is complete and empty.
        stores.routes.apply(&watcher::Event::InitDone);
        stores.referenced_routes.apply(&watcher::Event::InitDone);
        info!(reason = %why, "not watching HTTPRoutes: rollouts with traffic.gatewayAPI hold and say so");
    }
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        metrics,
        prometheus: prometheus::Clients::default(),
        http: crate::compatibility::http_client(),
        default_prometheus,
        settings: settings.clone(),
        stores: stores.clone(),
        failures: Mutex::default(),
        superseded: Superseded::default(),
        applied: Mutex::default(),
    });
    // A deleted rollout's per-rollout series go with it (or its RolledBack alert fires on).
    let forget = context.clone();
    let relist = Relist::default();
    let rollout_events = watcher(rollouts, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(drop_managed_fields)
        .reflect(rollout_writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                for key in relist.deleted(event, &forget.metrics) {
                    forget.forget(&key);
                }
            }
        })
        .applied_objects();
    let mut controller = Controller::for_stream(rollout_events, rollout_store)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .owns_stream(
            watcher(deployments, children.clone())
                .default_backoff()
                .modify(|child| owned::keep_owned(child, FIELD_MANAGER))
                .inspect_ok({
                    let cache = stores.deployments.clone();
                    move |event| cache.apply(event)
                })
                .touched_objects(),
        )
        .owns_stream(
            watcher(services, children.clone())
                .default_backoff()
                .modify(|child| owned::keep_owned(child, FIELD_MANAGER))
                .inspect_ok({
                    let cache = stores.services.clone();
                    move |event| cache.apply(event)
                })
                .touched_objects(),
        )
        .owns_stream(
            watcher(ingresses, children.clone())
                .default_backoff()
                .modify(|child| owned::keep_owned(child, FIELD_MANAGER))
                .inspect_ok({
                    let cache = stores.ingresses.clone();
                    move |event| cache.apply(event)
                })
                .touched_objects(),
        );
    if gateway_api {
        let others = watcher::Config::default().labels("app.kubernetes.io/managed-by!=embedroll");
        controller = controller
            .owns_stream(
                watcher(routes.clone(), children)
                    .default_backoff()
                    .modify(|child| owned::keep_owned(child, FIELD_MANAGER))
                    .inspect_ok({
                        let cache = stores.routes.clone();
                        move |event| cache.apply(event)
                    })
                    .touched_objects(),
            )
            .watches_stream(
                watcher(routes, others)
                    .default_backoff()
                    .modify(drop_managed_fields)
                    .inspect_ok({
                        let cache = stores.referenced_routes.clone();
                        move |event| cache.apply(event)
                    })
                    .touched_objects(),
                // The rollouts whose httpRouteRef names the route (a scan, but routes not
                // owned by the operator change rarely).
                move |route: HTTPRoute| {
                    let namespace = route.namespace();
                    let name = route.name_any();
                    referencing
                        .state()
                        .into_iter()
                        .filter(|er| {
                            er.namespace() == namespace
                                && er
                                    .spec
                                    .traffic
                                    .gateway_api
                                    .as_ref()
                                    .and_then(|g| g.http_route_ref.as_ref())
                                    .is_some_and(|r| r.name == name)
                        })
                        .map(|er| ObjectRef::from_obj(&*er))
                        .collect::<Vec<_>>()
                },
            );
    }
    if gateways_readable {
        // Only read for messages: a Gateway's change reaches a rollout through its route's
        // status, so this watch fills the cache and wakes nobody.
        let cache = stores.gateways.clone();
        tokio::spawn(
            watcher(gateways, watcher::Config::default())
                .default_backoff()
                .modify(drop_managed_fields)
                .for_each(move |event| {
                    if let Ok(event) = event {
                        cache.apply(&event);
                    }
                    std::future::ready(())
                }),
        );
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => {
                    debug!(rollout = %object.name, namespace = ?object.namespace, "reconciled")
                }
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// managedFields (and `kubectl apply`'s copy of the whole object) are most of a cached
/// rollout's size and nothing here reads them.
fn drop_managed_fields<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

async fn reconcile(rollout: Arc<EmbeddingRollout>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = rollout.reconcile(&ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let key = ObjectRef::from_obj(&*rollout);
    match result {
        Ok(action) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            Ok(action)
        }
        // Someone (or this process) wrote the rollout since it was read: plan again from the
        // newer version, which its watch event brings.
        Err(e) if e.is_conflict() => {
            debug!(rollout = %rollout.name_any(), namespace = ?rollout.namespace(), "conflict; re-planning from the newer version");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(e) => Err(e),
    }
}

fn error_policy(rollout: Arc<EmbeddingRollout>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_namespace_terminating() {
        debug!(rollout = %rollout.name_any(), namespace = ?rollout.namespace(), "namespace is being deleted; not retrying");
        return Action::await_change();
    }
    let failures = {
        let mut map = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ObjectRef::from_obj(&*rollout)).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let wait = ctx.settings.backoff(failures);
    warn!(rollout = %rollout.name_any(), namespace = ?rollout.namespace(), %error, failures, retry_in = ?wait, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label().to_owned(),
        })
        .inc();
    Action::requeue(wait)
}

/// The commands to act on: one-shot annotations whose value status has not consumed yet, and
/// the consumed map the next status should hold (one entry per one-shot annotation present,
/// so an annotation set again later, even to the same value, counts again once removed).
pub fn commands(
    annotations: &BTreeMap<String, String>,
    consumed: &BTreeMap<String, String>,
) -> (Commands, BTreeMap<String, String>) {
    let fresh = |key: &str| {
        annotations
            .get(key)
            .is_some_and(|v| v != "false" && consumed.get(key) != Some(v))
    };
    let commands = Commands {
        promote: fresh(ANNOTATION_PROMOTE),
        promote_full: fresh(ANNOTATION_PROMOTE_FULL),
        abort: fresh(ANNOTATION_ABORT),
        retry: fresh(ANNOTATION_RETRY),
        paused: annotations
            .get(ANNOTATION_PAUSED)
            .is_some_and(|v| v == "true"),
    };
    let now_consumed = ONE_SHOT
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), annotations.get(key)?.clone())))
        .collect();
    (commands, now_consumed)
}

impl EmbeddingRollout {
    fn child<K>(&self, store: &ChildCache<K>, name: &str) -> Option<K>
    where
        K: Resource + Serialize + serde::de::DeserializeOwned,
    {
        store.get(&self.namespace().unwrap_or_default(), name)
    }

    async fn reconcile(&self, ctx: &Context) -> Result<Action> {
        if self.metadata.deletion_timestamp.is_some() {
            // Being deleted (e.g. `--cascade=foreground`): the garbage collector is removing
            // what it owns; applying them now would recreate them.
            debug!(rollout = %self.name_any(), namespace = ?self.namespace(), "being deleted; nothing to reconcile");
            return Ok(Action::await_change());
        }
        if !ctx.stores.ready() {
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        let key = ObjectRef::from_obj(self);
        if ctx
            .superseded
            .is_stale(&key, self.metadata.resource_version.as_deref())
        {
            debug!(rollout = %self.name_any(), "cached rollout is older than this process's last write; waiting for the newer one");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let namespace = self.namespace().ok_or(Error::NoNamespace)?;
        let name = self.name_any();
        let deployment =
            |color| self.child(&ctx.stores.deployments, &resources::color_name(self, color));
        let blue = ColorState::from_deployment(deployment(Color::Blue).as_ref());
        let green = ColorState::from_deployment(deployment(Color::Green).as_ref());
        let (live, route) = match &self.spec.traffic.gateway_api {
            Some(gateway) => {
                let (route, state) = match &gateway.http_route_ref {
                    None => {
                        let route = self.child(&ctx.stores.routes, &name);
                        let state = gateway::route_state(
                            route.as_ref(),
                            &gateway.parent_refs,
                            &namespace,
                            |ns, name| ctx.stores.parent_gateway(ns, name),
                        );
                        (route, state)
                    }
                    Some(reference) => {
                        let route = self.child(&ctx.stores.referenced_routes, &reference.name);
                        let problem = gateway::referenced_route_problem(
                            self,
                            route.as_ref(),
                            &reference.name,
                        )
                        .or_else(|| {
                            route.as_ref().and_then(|r| {
                                gateway::referenced_header_problem(self, r, &reference.name)
                            })
                        });
                        let state = match problem {
                            Some(why) => RouteState::Refused(why),
                            None => route.as_ref().map_or(RouteState::default(), |r| {
                                gateway::route_state(
                                    Some(r),
                                    &r.spec.parent_refs,
                                    &namespace,
                                    |ns, name| ctx.stores.parent_gateway(ns, name),
                                )
                            }),
                        };
                        (route, state)
                    }
                };
                let state = match &ctx.stores.gateway_api_missing {
                    None => state,
                    Some(why) => RouteState::Refused(why.clone()),
                };
                (gateway::live_traffic(route.as_ref()), state)
            }
            None => (
                resources::live_traffic(
                    self,
                    self.child(&ctx.stores.ingresses, &name).as_ref(),
                    self.child(&ctx.stores.ingresses, &resources::canary_ingress_name(self))
                        .as_ref(),
                ),
                RouteState::Routed,
            ),
        };
        let desired = revision(&self.spec);
        let status = self.status.clone().unwrap_or_default();
        let (commands, consumed) = commands(self.annotations(), &status.consumed_commands);
        let now = Timestamp::now();
        let input = Input {
            name: &name,
            spec: &self.spec,
            generation: self.metadata.generation,
            status: &status,
            desired_revision: &desired,
            blue: &blue,
            green: &green,
            live: &live,
            route: &route,
            commands,
            now,
        };
        let outcome = if machine::analysis_due(&input) {
            Some(self.analyse(ctx, &status, now).await)
        } else {
            None
        };
        let mut plan = machine::plan(&input, outcome.as_ref(), &[]);
        // The vector gate asks for a check (at most one per stage: before traffic, and before
        // promotion when a promote --full comes first): run it and plan again with it.
        let mut checked = Vec::new();
        while let Some(request) = plan.check.clone() {
            if checked.len() >= 2 {
                break;
            }
            let found = self.check_vectors(ctx, &request).await;
            self.record_check_metrics(ctx, &namespace, &name, &found);
            checked.push((request, found));
            // Planned at the time the check ended: a step that starts now has its analysis
            // window start after the check's own requests.
            let after = Input {
                now: Timestamp::now(),
                ..input
            };
            plan = machine::plan(&after, outcome.as_ref(), &checked);
        }
        plan.status.consumed_commands = consumed;
        for (key, deferred) in [
            (ANNOTATION_PROMOTE, plan.deferred.promote),
            (ANNOTATION_PROMOTE_FULL, plan.deferred.promote_full),
        ] {
            if deferred {
                plan.status.consumed_commands.remove(key);
            }
        }

        // Status first: traffic moves only once the status that says so is saved over the
        // version it was planned from.
        let mut saved = false;
        // False when an old provider's object could not be deleted: looked at again soon.
        let mut pruned = true;
        // The phase status holds if a write fails part-way.
        let mut saved_phase = status.phase;
        let written = async {
            let mut version = self.metadata.resource_version.clone();
            // A rollback whose traffic write failed left `RollingBack` saved; it stays so
            // until the retried write passes.
            if plan.rollback.is_some() || status.phase == Some(Phase::RollingBack) {
                // Say what is happening before traffic moves, in case this process dies
                // mid-way.
                let mut rolling_back = plan.status.clone();
                rolling_back.phase = Some(Phase::RollingBack);
                if rolling_back != status {
                    version = self.patch_status(ctx, &rolling_back, version).await?;
                }
                (saved, saved_phase) = (true, rolling_back.phase);
                pruned &= self.apply_traffic(ctx, &plan).await?;
                version = self.patch_status(ctx, &plan.status, version).await?;
                saved_phase = plan.status.phase;
            } else {
                if plan.status != status {
                    version = self.patch_status(ctx, &plan.status, version).await?;
                    (saved, saved_phase) = (true, plan.status.phase);
                }
                pruned &= self.apply_traffic(ctx, &plan).await?;
            }
            self.remove_consumed_commands(ctx, &plan.status.consumed_commands, version)
                .await?;
            self.apply_pods(ctx, &plan, &desired).await
        }
        .await;
        // Once the status is saved, the next reconcile plans from it and finds no transition
        // left to report: a later write failing (a webhook down) must not lose the Events and
        // counters, so they go out now and the write is retried without them.
        if written.is_ok() || saved {
            self.publish(ctx, &plan).await;
            self.record_metrics(ctx, &namespace, &name, &plan, outcome.as_ref());
            // The phase gauge says what status says (RollingBack while traffic is refused).
            ctx.metrics.set_phase(&namespace, &name, saved_phase);
        }
        written?;
        if status.phase != plan.status.phase || status.canary_weight != plan.status.canary_weight {
            info!(
                rollout = %name, namespace = %namespace,
                phase = ?plan.status.phase, weight = plan.status.canary_weight,
                step = ?plan.status.current_step_index, message = ?plan.status.message,
                "rollout moved"
            );
        }
        let retry_prune = (!pruned).then_some(PRUNE_RETRY);
        Ok(match plan.requeue.into_iter().chain(retry_prune).min() {
            Some(after) => Action::requeue(after),
            None => Action::await_change(),
        })
    }

    async fn analyse(
        &self,
        ctx: &Context,
        status: &EmbeddingRolloutStatus,
        now: Timestamp,
    ) -> AnalysisOutcome {
        let spec = &self.spec.analysis;
        let stable = status.stable_color.unwrap_or(Color::Blue);
        let vars = Vars {
            namespace: self.namespace().unwrap_or_default(),
            rollout: self.name_any(),
            canary_color: status.canary_color.unwrap_or(stable.other()),
            stable_color: stable,
            canary_revision: status.canary_revision.clone().unwrap_or_default(),
            stable_revision: status.stable_revision.clone().unwrap_or_default(),
            interval: machine::interval(&self.spec),
            window: machine::evidence_window(status, machine::interval(&self.spec), now),
        };
        if spec.metrics.is_empty() && spec.prometheus.is_none() && ctx.default_prometheus.is_none()
        {
            return AnalysisOutcome {
                result: CheckResult::Passed,
                metrics: Vec::new(),
                latency_p95: None,
                error_rate: None,
                weight_check: None,
                summary: "no metrics configured".to_owned(),
            };
        }
        let (address, timeout) = match (&spec.prometheus, &ctx.default_prometheus) {
            (Some(config), _) => (
                config.address.clone(),
                parse_duration(&config.timeout).unwrap_or(Duration::from_secs(10)),
            ),
            (None, Some(address)) => (address.clone(), Duration::from_secs(10)),
            (None, None) => {
                return AnalysisOutcome {
                    result: CheckResult::Inconclusive,
                    metrics: Vec::new(),
                    latency_p95: None,
                    error_rate: None,
                    weight_check: None,
                    summary: "inconclusive: no Prometheus (set spec.analysis.prometheus.address or the operator's --prometheus-url)".to_owned(),
                };
            }
        };
        match ctx.prometheus.get(&address, timeout) {
            Ok(client) => analysis::run(&client, spec, &vars, status.canary_weight).await,
            Err(e) => AnalysisOutcome {
                result: CheckResult::Inconclusive,
                metrics: Vec::new(),
                latency_p95: None,
                error_rate: None,
                weight_check: None,
                summary: format!("inconclusive: {e}"),
            },
        }
    }

    /// Removes the one-shot annotations whose effect status now holds. Guarded by the
    /// version just written, so an annotation set again meanwhile is not lost.
    async fn remove_consumed_commands(
        &self,
        ctx: &Context,
        consumed: &BTreeMap<String, String>,
        version: Option<String>,
    ) -> Result<()> {
        if consumed.is_empty() {
            return Ok(());
        }
        let removals: serde_json::Map<String, serde_json::Value> = consumed
            .keys()
            .map(|k| (k.clone(), serde_json::Value::Null))
            .collect();
        let patch = json!({"metadata": {"resourceVersion": version, "annotations": removals}});
        let api: Api<EmbeddingRollout> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        api.patch(
            &self.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        ctx.superseded.record(&ObjectRef::from_obj(self), version);
        info!(rollout = %self.name_any(), commands = ?consumed.keys().collect::<Vec<_>>(), "commands consumed");
        Ok(())
    }

    /// Writes status over `version` (a conflict if the rollout changed since); returns the
    /// new version.
    async fn patch_status(
        &self,
        ctx: &Context,
        status: &EmbeddingRolloutStatus,
        version: Option<String>,
    ) -> Result<Option<String>> {
        let api: Api<EmbeddingRollout> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "embedroll.dev/v1alpha1",
            "kind": "EmbeddingRollout",
            "metadata": {"resourceVersion": version},
            "status": status,
        });
        let written = api
            .patch_status(
                &self.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.superseded.record(&ObjectRef::from_obj(self), version);
        Ok(written.metadata.resource_version)
    }

    /// Applies `desired` unless the cached child already holds it.
    async fn apply<K: Child>(
        &self,
        ctx: &Context,
        store: &ChildCache<K>,
        mut desired: K,
    ) -> Result<()> {
        let stamp = diff::stamp(&mut desired);
        let name = desired.meta().name.clone().unwrap_or_default();
        let live = self.child(store, &name);
        let namespace = self.namespace().unwrap_or_default();
        let key = format!("{}/{namespace}/{name}", K::kind(&()));
        if live
            .as_ref()
            .is_some_and(|live| diff::in_place(&desired, live))
        {
            // The cache holds what this process wrote: the note below has done its job. Kept,
            // a child deleted later (a stray `kubectl delete`) would match it again, absent
            // over the same empty version, and never be recreated.
            ctx.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            return Ok(());
        }
        let seen = live
            .as_ref()
            .and_then(|l| l.meta().resource_version.clone())
            .unwrap_or_default();
        if ctx
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            == Some(&applied_hash(&seen, &stamp))
        {
            // This process applied exactly this over the version still cached.
            return Ok(());
        }
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
        ctx.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, applied_hash(&seen, &stamp));
        Ok(())
    }

    /// Services, then the routes: the primary Ingress before the canary Ingress (so a
    /// promotion never passes through "everything on the old color"), or the one HTTPRoute
    /// whose weights move together.
    /// Returns false when an old provider's object could not be deleted ([`Self::prune`]).
    async fn apply_traffic(&self, ctx: &Context, plan: &Plan) -> Result<bool> {
        let live = LiveTraffic::written_by(&plan.status);
        let stable = live.stable_color.unwrap_or(Color::Blue);
        let mut pruned = true;
        let services = &ctx.stores.services;
        for color in [Color::Blue, Color::Green] {
            self.apply(ctx, services, resources::color_service(self, color))
                .await?;
        }
        self.apply(ctx, services, resources::stable_service(self, stable))
            .await?;
        if let Some(nginx) = &self.spec.traffic.nginx {
            let ingresses = &ctx.stores.ingresses;
            self.apply(
                ctx,
                ingresses,
                resources::primary_ingress(self, nginx, stable),
            )
            .await?;
            self.apply(
                ctx,
                ingresses,
                resources::canary_ingress(self, nginx, &live),
            )
            .await?;
            // Switched from the Gateway API: the route it owned would keep its last weights.
            if ctx.stores.gateway_api {
                pruned &= self.prune(ctx, &ctx.stores.routes, &self.name_any()).await;
            }
        }
        if let Some(gateway) = &self.spec.traffic.gateway_api
            && ctx.stores.gateway_api
        {
            match &gateway.http_route_ref {
                None => {
                    self.apply(
                        ctx,
                        &ctx.stores.routes,
                        gateway::http_route(self, gateway, &live),
                    )
                    .await?
                }
                Some(reference) => {
                    self.steer_route(ctx, &reference.name, &live).await?;
                    // Switched from a route it owned to the team's own (unless the team's is
                    // that very route, adopted under its name).
                    if reference.name != self.name_any() {
                        pruned &= self.prune(ctx, &ctx.stores.routes, &self.name_any()).await;
                    }
                }
            }
            // Switched from nginx: its Ingresses go once a Gateway has accepted the route,
            // so that clients keep a path meanwhile; the canary Ingress would otherwise keep
            // sending its last weight to a color that may be rolled back or scaled down.
            let routed =
                crate::conditions::get(&plan.status.conditions, crate::conditions::TRAFFIC_ROUTED)
                    .is_some_and(|c| c.status == "True");
            if routed {
                let ingresses = &ctx.stores.ingresses;
                pruned &= self
                    .prune(ctx, ingresses, &resources::canary_ingress_name(self))
                    .await;
                pruned &= self.prune(ctx, ingresses, &self.name_any()).await;
            }
        }
        Ok(pruned)
    }

    /// Deletes the child `name` if the cache holds it and this rollout owns it: a traffic
    /// object of the provider the spec no longer names. Owner references alone would keep
    /// it until the rollout is deleted. Best effort: a refusal (say, a Role without `delete`)
    /// is a Warning Event and `false`, the rest of the reconcile goes on, and it is tried
    /// again after [`PRUNE_RETRY`].
    async fn prune<K: Child>(&self, ctx: &Context, store: &ChildCache<K>, name: &str) -> bool {
        let Some(live) = self.child(store, name) else {
            return true;
        };
        let meta = live.meta();
        let owned = meta
            .owner_references
            .iter()
            .flatten()
            .any(|owner| Some(owner.uid.as_str()) == self.metadata.uid.as_deref());
        if !owned || meta.deletion_timestamp.is_some() {
            return true;
        }
        let namespace = self.namespace().unwrap_or_default();
        let kind = K::kind(&());
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
        let params = DeleteParams {
            preconditions: meta.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                info!(
                    rollout = %self.name_any(), namespace = %namespace, kind = kind.as_ref(), name,
                    "deleted a traffic object of the provider no longer in spec"
                );
                true
            }
            // Gone already, or another object by that name since.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => true,
            Err(e) => {
                let message = format!(
                    "could not delete {kind} {name} of the traffic provider no longer in spec: {e}"
                );
                warn!(rollout = %self.name_any(), namespace = %namespace, %message);
                let event = Event {
                    type_: EventType::Warning,
                    reason: "PruneFailed".to_owned(),
                    note: Some(message.chars().take(1000).collect()),
                    action: format!("PruneFailed-{kind}-{name}"),
                    secondary: None,
                };
                let _ = ctx.recorder.publish(&event, &self.object_ref(&())).await;
                false
            }
        }
    }

    /// Referenced mode: sets the weights of the route's color backendRefs (a JSON patch that
    /// touches nothing else). A route that cannot carry them is left alone; status says why.
    async fn steer_route(&self, ctx: &Context, name: &str, live: &LiveTraffic) -> Result<()> {
        let Some(route) = self.child(&ctx.stores.referenced_routes, name) else {
            return Ok(());
        };
        if gateway::referenced_route_problem(self, Some(&route), name).is_some() {
            return Ok(());
        }
        let ops = gateway::referenced_route_patch(self, &route, live);
        if ops.is_empty() {
            return Ok(());
        }
        let namespace = self.namespace().unwrap_or_default();
        let key = format!("HTTPRoute/{namespace}/{name}#weights");
        let stamp = serde_json::to_string(&ops).unwrap_or_default();
        let seen = route.metadata.resource_version.clone().unwrap_or_default();
        let hash = applied_hash(&seen, &stamp);
        if ctx
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            == Some(&hash)
        {
            return Ok(());
        }
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(|e| Error::InvalidSpec(format!("HTTPRoute {name}: weight patch: {e}")))?;
        let api: Api<HTTPRoute> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Json::<()>(patch),
        )
        .await?;
        debug!(rollout = %self.name_any(), route = name, "set the weights on the referenced HTTPRoute");
        ctx.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, hash);
        Ok(())
    }

    async fn apply_pods(&self, ctx: &Context, plan: &Plan, desired: &str) -> Result<()> {
        let store = &ctx.stores.deployments;
        for (color, replicas) in [
            (Color::Blue, plan.blue_replicas),
            (Color::Green, plan.green_replicas),
        ] {
            if plan.deploy == Some(color) {
                self.apply(
                    ctx,
                    store,
                    resources::deployment(self, color, desired, replicas),
                )
                .await?;
                continue;
            }
            // Another revision's template lives in this Deployment: only its size changes.
            let name = resources::color_name(self, color);
            let Some(existing) = self.child(store, &name) else {
                continue;
            };
            // An orphaned Deployment (the rollout was re-created after `--cascade=orphan`)
            // is adopted again, so it is garbage-collected with the rollout and its changes
            // wake it.
            let owned = existing
                .owner_references()
                .iter()
                .any(|r| Some(&r.uid) == self.metadata.uid.as_ref());
            if existing.spec.as_ref().and_then(|s| s.replicas) == Some(replicas) && owned {
                continue;
            }
            let namespace = self.namespace().unwrap_or_default();
            let key = format!("Deployment/{namespace}/{name}#replicas");
            let seen = (
                existing
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default(),
                format!("{replicas}/{owned}"),
            );
            if ctx
                .applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                == Some(&applied_hash(&seen.0, &seen.1))
            {
                continue;
            }
            let mut patch = json!({"spec": {"replicas": replicas}});
            if !owned && let Some(owner) = self.controller_owner_ref(&()) {
                let owner = OwnerReference {
                    block_owner_deletion: Some(true),
                    ..owner
                };
                patch["metadata"] = json!({"ownerReferences": [owner]});
            }
            Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
                .patch(
                    &name,
                    // Named, so the cache keeps `spec.replicas` among our fields.
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.to_owned()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await?;
            ctx.applied
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, applied_hash(&seen.0, &seen.1));
        }
        Ok(())
    }

    async fn publish(&self, ctx: &Context, plan: &Plan) {
        let reference = self.object_ref(&());
        for transition in &plan.events {
            let event = Event {
                type_: if transition.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: transition.reason.to_owned(),
                note: Some(transition.message.chars().take(1000).collect()),
                // kube-runtime's Recorder folds Events with the same type, reason and action
                // into one series that keeps its first note, so every later `WeightUpdated`
                // would read "0% -> 1%". A digest of the note in `action` folds only repeats
                // of the same message.
                action: format!(
                    "{}-{:08x}",
                    transition.reason,
                    crate::revision::fnv1a64(transition.message.as_bytes()) as u32
                ),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                let e = Error::Kube(e);
                if !e.is_namespace_terminating() {
                    warn!(error = %e, reason = transition.reason, "could not publish Event");
                }
            }
        }
    }

    /// The golden set embedded by one Ready pod of the canary color (and of stable's, to
    /// compare with), straight to the pods (their addresses from the color Services'
    /// EndpointSlices: no Service proxy needed).
    async fn check_vectors(&self, ctx: &Context, request: &CheckRequest) -> compatibility::Outcome {
        let spec = &self.spec.compatibility;
        let namespace = self.namespace().unwrap_or_default();
        let texts = match &spec.golden_set {
            None => compatibility::golden_texts(compatibility::DEFAULT_GOLDEN_SET),
            Some(golden) => {
                let reference = &golden.config_map_key_ref;
                let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
                match api.get_opt(&reference.name).await {
                    Ok(Some(map)) => match map.data.as_ref().and_then(|d| d.get(&reference.key)) {
                        Some(text) => compatibility::golden_texts(text),
                        None => {
                            return compatibility::Outcome::Inconclusive(format!(
                                "golden set: ConfigMap {} has no key {:?}",
                                reference.name, reference.key
                            ));
                        }
                    },
                    Ok(None) => {
                        return compatibility::Outcome::Inconclusive(format!(
                            "golden set: ConfigMap {} not found",
                            reference.name
                        ));
                    }
                    Err(e) => {
                        return compatibility::Outcome::Inconclusive(format!(
                            "golden set: ConfigMap {}: {e}",
                            reference.name
                        ));
                    }
                }
            }
        };
        let pod = |color, revision| self.ready_pod(ctx, color, revision);
        let canary = match pod(request.canary, &request.revision).await {
            Ok(pod) => pod,
            Err(why) => return compatibility::Outcome::Inconclusive(format!("canary: {why}")),
        };
        let stable = match &request.stable {
            None => None,
            Some((color, revision)) => match pod(*color, revision).await {
                Ok(pod) => Some(pod),
                Err(why) => {
                    return compatibility::Outcome::Inconclusive(format!("stable: {why}"));
                }
            },
        };
        let model = self.spec.model.as_ref();
        let started = Instant::now();
        let outcome = compatibility::run(
            &ctx.http,
            &canary,
            stable.as_ref(),
            &compatibility::Request {
                model: model.map(|m| m.name.as_str()),
                dimensions: model.and_then(|m| m.dimensions),
                texts: &texts,
                k: usize::try_from(spec.top_k).unwrap_or(10),
                timeout: parse_duration(&spec.timeout).unwrap_or(Duration::from_secs(60)),
            },
        )
        .await;
        info!(
            rollout = %self.name_any(), namespace = %namespace, stage = ?request.stage,
            canary = %canary.ip, stable = ?stable.as_ref().map(|p| &p.ip), texts = texts.len(),
            seconds = started.elapsed().as_secs_f64(), ?outcome, "vector-compatibility check"
        );
        outcome
    }

    /// A Ready endpoint of the color's Service whose pod runs `revision`. The EndpointSlices
    /// can still list a pod of the color's previous revision for a moment after its
    /// Deployment reports the new one available; the pods' revision label rules it out, so
    /// that the check never judges one revision by another's vectors.
    async fn ready_pod(
        &self,
        ctx: &Context,
        color: Color,
        revision: &str,
    ) -> std::result::Result<compatibility::PodAddress, String> {
        let namespace = self.namespace().unwrap_or_default();
        let service = resources::color_name(self, color);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        let selector = format!(
            "{},{}={revision}",
            resources::selector_string(self, color),
            resources::LABEL_REVISION
        );
        let pods = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("pods of {service}: {e}"))?;
        let running: BTreeSet<String> = pods
            .items
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .map(ResourceExt::name_any)
            .collect();
        let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
        let slices = api
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await
            .map_err(|e| format!("EndpointSlices of {service}: {e}"))?;
        compatibility::ready_endpoint(&slices.items, &running)
            .ok_or_else(|| format!("no Ready pod of revision {revision} behind Service {service}"))
    }

    fn record_check_metrics(
        &self,
        ctx: &Context,
        namespace: &str,
        name: &str,
        outcome: &compatibility::Outcome,
    ) {
        let result = match outcome {
            compatibility::Outcome::Compared { .. } => "Compared",
            compatibility::Outcome::ContractKept { .. } => "ModelChanged",
            compatibility::Outcome::ContractBroken { .. } => "ContractBroken",
            compatibility::Outcome::Inconclusive(_) => "Inconclusive",
        };
        ctx.metrics
            .compatibility_checks
            .get_or_create(&crate::metrics::CompatibilityLabels {
                result: result.to_owned(),
            })
            .inc();
        if let compatibility::Outcome::Compared { comparison, .. } = outcome {
            ctx.metrics
                .compatibility_min_cosine
                .get_or_create(&RolloutLabels {
                    namespace: namespace.to_owned(),
                    rollout: name.to_owned(),
                })
                .set(comparison.min_cosine);
        }
    }

    fn record_metrics(
        &self,
        ctx: &Context,
        namespace: &str,
        name: &str,
        plan: &Plan,
        outcome: Option<&AnalysisOutcome>,
    ) {
        let metrics = &ctx.metrics;
        metrics.set_phase(namespace, name, plan.status.phase);
        metrics.track(namespace, name, outcome, plan.rollback);
        let labels = RolloutLabels {
            namespace: namespace.to_owned(),
            rollout: name.to_owned(),
        };
        metrics
            .canary_weight
            .get_or_create(&labels)
            .set(i64::from(plan.status.canary_weight));
        metrics
            .inconclusive_checks
            .get_or_create(&labels)
            .set(i64::from(
                plan.status
                    .analysis
                    .as_ref()
                    .map_or(0, |a| a.inconclusive_checks),
            ));
        if let Some(outcome) = outcome {
            let result = ResultLabels {
                namespace: namespace.to_owned(),
                rollout: name.to_owned(),
                result: format!("{:?}", outcome.result),
            };
            metrics.analysis_runs.get_or_create(&result).inc();
            for metric in &outcome.metrics {
                let labels = MetricLabels {
                    namespace: namespace.to_owned(),
                    rollout: name.to_owned(),
                    metric: metric.name.clone(),
                };
                metrics
                    .analysis_value
                    .get_or_create(&labels)
                    .set(metric.value.unwrap_or(f64::NAN));
            }
        }
        if let Some(reason) = plan.rollback {
            let labels = ReasonLabels {
                namespace: namespace.to_owned(),
                rollout: name.to_owned(),
                reason: reason.to_owned(),
            };
            metrics.rollbacks.get_or_create(&labels).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_command_is_acted_on_once_and_remembered_until_removed() {
        let set = map(&[(ANNOTATION_PROMOTE, "2026-11-27T10:00:00Z"), ("other", "x")]);
        let (first, consumed) = commands(&set, &BTreeMap::new());
        assert!(first.promote);
        assert_eq!(
            consumed,
            map(&[(ANNOTATION_PROMOTE, "2026-11-27T10:00:00Z")])
        );
        // The status write saved it but the annotation's removal failed: the next reconcile
        // sees the same annotation again and must not promote a second step.
        let (again, still) = commands(&set, &consumed);
        assert_eq!(again, Commands::default());
        assert_eq!(still, consumed, "kept until the annotation is gone");
        // Once removed, the record goes, so the same value set again counts again.
        let (none, cleared) = commands(&BTreeMap::new(), &consumed);
        assert_eq!(none, Commands::default());
        assert!(cleared.is_empty());
        assert!(commands(&set, &cleared).0.promote);
        // `false` is no command, but is removed like one.
        let (off, consumed) = commands(&map(&[(ANNOTATION_ABORT, "false")]), &BTreeMap::new());
        assert!(!off.abort);
        assert_eq!(consumed.len(), 1);
    }

    #[test]
    fn a_rollout_deleted_while_the_watch_was_down_loses_its_series_at_the_relist() {
        let rollout = |name: &str| -> EmbeddingRollout {
            serde_json::from_value(json!({
                "apiVersion": "embedroll.dev/v1alpha1",
                "kind": "EmbeddingRollout",
                "metadata": {"name": name, "namespace": "ml"},
                "spec": {
                    "template": {"spec": {"containers": [{"name": "embedder", "image": "e:1"}]}},
                    "traffic": {"nginx": {"host": "api.example.com"}}
                }
            }))
            .unwrap()
        };
        let metrics = Metrics::default();
        for name in ["gone", "kept", "deleted"] {
            metrics.set_phase("ml", name, Some(Phase::Failed));
            metrics.track("ml", name, None, Some("Aborted"));
        }
        let relist = Relist::default();
        let names = |keys: Vec<ObjectRef<EmbeddingRollout>>| -> Vec<String> {
            keys.into_iter().map(|k| k.name).collect()
        };
        // While watching: an update forgets nothing, a delete its rollout.
        let apply = watcher::Event::Apply(rollout("kept"));
        assert!(relist.deleted(&apply, &metrics).is_empty());
        let delete = watcher::Event::Delete(rollout("deleted"));
        assert_eq!(names(relist.deleted(&delete, &metrics)), ["deleted"]);
        // The watch came back: the relist lists only "kept".
        assert!(relist.deleted(&watcher::Event::Init, &metrics).is_empty());
        let listed = watcher::Event::InitApply(rollout("kept"));
        assert!(relist.deleted(&listed, &metrics).is_empty());
        assert_eq!(
            names(relist.deleted(&watcher::Event::InitDone, &metrics)),
            ["gone"]
        );
        let text = metrics.encode();
        assert!(!text.contains("rollout=\"gone\""), "{text}");
        assert!(!text.contains("rollout=\"deleted\""), "{text}");
        assert!(text.contains("rollout=\"kept\""), "{text}");
    }

    #[test]
    fn errors_back_off_exponentially_to_a_cap() {
        let settings = Settings::default();
        let waits: Vec<u64> = (1..=11).map(|n| settings.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(settings.backoff(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn a_cached_rollout_this_process_wrote_over_is_stale() {
        let superseded = Superseded::default();
        let key = ObjectRef::<EmbeddingRollout>::new("search").within("ml");
        assert!(!superseded.is_stale(&key, Some("10")));
        superseded.record(&key, Some("10".into()));
        // The status at rv 10 was rolled back and written as rv 11; a reconcile woken by a
        // child's event still sees rv 10 in the cache and must not re-apply its weight.
        assert!(superseded.is_stale(&key, Some("10")));
        assert!(
            !superseded.is_stale(&key, Some("11")),
            "the cache caught up"
        );
        assert!(
            !superseded.is_stale(&key, Some("10")),
            "forgotten once caught up"
        );
    }
}
