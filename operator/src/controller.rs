//! The reconciler: reads the rollout and its two colors, asks the step machine what comes
//! next, and makes it so: status first (the rollout's memory), then traffic (Ingresses), then
//! pods (Deployments). Every write is server-side apply with one field manager.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::analysis::{self, AnalysisOutcome, Vars};
use crate::crd::{
    CheckResult, Color, EmbeddingRollout, EmbeddingRolloutStatus, Phase, parse_duration,
};
use crate::error::{Error, Result};
use crate::machine::{self, Commands, Input, Plan};
use crate::metrics::{MetricLabels, Metrics, ReasonLabels, ResultLabels, RolloutLabels};
use crate::prometheus;
use crate::resources::{self, ColorState, FIELD_MANAGER};
use crate::revision::revision;

pub const ANNOTATION_PROMOTE: &str = "embedroll.dev/promote";
pub const ANNOTATION_PROMOTE_FULL: &str = "embedroll.dev/promote-full";
pub const ANNOTATION_ABORT: &str = "embedroll.dev/abort";
pub const ANNOTATION_RETRY: &str = "embedroll.dev/retry";
pub const ANNOTATION_PAUSED: &str = "embedroll.dev/paused";
/// One-shot commands: the controller removes them once read.
pub const ONE_SHOT: [&str; 4] = [
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_ABORT,
    ANNOTATION_RETRY,
];

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub prometheus: prometheus::Clients,
    /// Used when a rollout names no Prometheus.
    pub default_prometheus: Option<String>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    namespace: Option<String>,
    default_prometheus: Option<String>,
    instance: String,
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
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        metrics,
        prometheus: prometheus::Clients::default(),
        default_prometheus,
    });
    // Children are labelled; watching only those keeps memory flat in busy clusters.
    let children = watcher::Config::default().labels("app.kubernetes.io/managed-by=embedroll");
    Controller::new(rollouts, watcher::Config::default().any_semantic())
        .owns(deployments, children.clone())
        .owns(services, children.clone())
        .owns(ingresses, children)
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

async fn reconcile(rollout: Arc<EmbeddingRollout>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = rollout.reconcile(&ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

fn error_policy(rollout: Arc<EmbeddingRollout>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_namespace_terminating() {
        debug!(rollout = %rollout.name_any(), namespace = ?rollout.namespace(), "namespace is being deleted; not retrying");
        return Action::await_change();
    }
    warn!(rollout = %rollout.name_any(), namespace = ?rollout.namespace(), %error, "reconcile failed; retrying in 2s");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label().to_owned(),
        })
        .inc();
    Action::requeue(Duration::from_secs(2))
}

pub fn commands(annotations: &BTreeMap<String, String>) -> Commands {
    let set = |key: &str| annotations.get(key).is_some_and(|v| v != "false");
    Commands {
        promote: set(ANNOTATION_PROMOTE),
        promote_full: set(ANNOTATION_PROMOTE_FULL),
        abort: set(ANNOTATION_ABORT),
        retry: set(ANNOTATION_RETRY),
        paused: annotations
            .get(ANNOTATION_PAUSED)
            .is_some_and(|v| v == "true"),
    }
}

impl EmbeddingRollout {
    async fn reconcile(&self, ctx: &Context) -> Result<Action> {
        if self.metadata.deletion_timestamp.is_some() {
            // Being deleted (e.g. `--cascade=foreground`): the garbage collector is removing
            // what it owns; applying them now would recreate them.
            debug!(rollout = %self.name_any(), namespace = ?self.namespace(), "being deleted; nothing to reconcile");
            return Ok(Action::await_change());
        }
        let namespace = self.namespace().ok_or(Error::NoNamespace)?;
        let name = self.name_any();
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
        let blue = ColorState::from_deployment(
            deployments
                .get_opt(&resources::color_name(self, Color::Blue))
                .await?
                .as_ref(),
        );
        let green = ColorState::from_deployment(
            deployments
                .get_opt(&resources::color_name(self, Color::Green))
                .await?
                .as_ref(),
        );
        let desired = revision(&self.spec);
        let commands = commands(self.annotations());
        let status = self.status.clone().unwrap_or_default();
        let input = Input {
            name: &name,
            spec: &self.spec,
            generation: self.metadata.generation,
            status: &status,
            desired_revision: &desired,
            blue: &blue,
            green: &green,
            commands,
            now: Timestamp::now(),
        };
        let outcome = if machine::analysis_due(&input) {
            Some(self.analyse(ctx, &status).await)
        } else {
            None
        };
        let plan = machine::plan(&input, outcome.as_ref());

        self.consume_commands(ctx).await?;
        if plan.rollback.is_some() {
            // Say what is happening before traffic moves, in case this process dies mid-way.
            let mut rolling_back = plan.status.clone();
            rolling_back.phase = Some(Phase::RollingBack);
            self.patch_status(ctx, &rolling_back).await?;
            self.apply_traffic(ctx, &plan).await?;
            self.patch_status(ctx, &plan.status).await?;
        } else {
            if plan.status != status {
                self.patch_status(ctx, &plan.status).await?;
            }
            self.apply_traffic(ctx, &plan).await?;
        }
        self.apply_pods(ctx, &plan, &desired, &deployments).await?;
        self.publish(ctx, &plan).await;
        self.record_metrics(ctx, &namespace, &name, &plan, outcome.as_ref());
        if status.phase != plan.status.phase || status.canary_weight != plan.status.canary_weight {
            info!(
                rollout = %name, namespace = %namespace,
                phase = ?plan.status.phase, weight = plan.status.canary_weight,
                step = ?plan.status.current_step_index, message = ?plan.status.message,
                "rollout moved"
            );
        }
        Ok(match plan.requeue {
            Some(after) => Action::requeue(after),
            None => Action::await_change(),
        })
    }

    async fn analyse(&self, ctx: &Context, status: &EmbeddingRolloutStatus) -> AnalysisOutcome {
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

    /// Removes one-shot command annotations, guarded by resourceVersion so a command is
    /// consumed exactly by the reconcile that read it.
    async fn consume_commands(&self, ctx: &Context) -> Result<()> {
        let present: Vec<&str> = ONE_SHOT
            .into_iter()
            .filter(|k| self.annotations().contains_key(*k))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let removals: serde_json::Map<String, serde_json::Value> = present
            .iter()
            .map(|k| ((*k).to_owned(), serde_json::Value::Null))
            .collect();
        let patch = json!({"metadata": {"resourceVersion": self.resource_version(), "annotations": removals}});
        let api: Api<EmbeddingRollout> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        api.patch(
            &self.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        info!(rollout = %self.name_any(), commands = ?present, "commands consumed");
        Ok(())
    }

    async fn patch_status(&self, ctx: &Context, status: &EmbeddingRolloutStatus) -> Result<()> {
        let api: Api<EmbeddingRollout> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": "embedroll.dev/v1alpha1",
            "kind": "EmbeddingRollout",
            "status": status,
        });
        api.patch_status(
            &self.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    async fn apply<K>(&self, ctx: &Context, object: &K) -> Result<()>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        let name = object.meta().name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?;
        Ok(())
    }

    /// Services, then the primary Ingress, then the canary Ingress. The primary goes first so
    /// a promotion never passes through "everything on the old color".
    async fn apply_traffic(&self, ctx: &Context, plan: &Plan) -> Result<()> {
        let stable = plan.status.stable_color.unwrap_or(Color::Blue);
        for color in [Color::Blue, Color::Green] {
            self.apply(ctx, &resources::color_service(self, color))
                .await?;
        }
        self.apply(ctx, &resources::stable_service(self, stable))
            .await?;
        self.apply(ctx, &resources::primary_ingress(self, stable))
            .await?;
        let canary = plan.status.canary_color.unwrap_or(stable.other());
        self.apply(
            ctx,
            &resources::canary_ingress(self, canary, plan.status.canary_weight),
        )
        .await?;
        Ok(())
    }

    async fn apply_pods(
        &self,
        ctx: &Context,
        plan: &Plan,
        desired: &str,
        deployments: &Api<Deployment>,
    ) -> Result<()> {
        for (color, replicas) in [
            (Color::Blue, plan.blue_replicas),
            (Color::Green, plan.green_replicas),
        ] {
            if plan.deploy == Some(color) {
                self.apply(ctx, &resources::deployment(self, color, desired, replicas))
                    .await?;
                continue;
            }
            // Another revision's template lives in this Deployment: only its size changes.
            let name = resources::color_name(self, color);
            let Some(existing) = deployments.get_opt(&name).await? else {
                continue;
            };
            if existing.spec.as_ref().and_then(|s| s.replicas) != Some(replicas) {
                let patch = json!({"spec": {"replicas": replicas}});
                deployments
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
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
