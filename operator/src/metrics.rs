//! The operator's own metrics (`/metrics`, OpenMetrics text): reconciles, errors, durations,
//! and per-rollout phase, weight, analysis values and rollbacks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::crd::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub namespace: String,
    pub rollout: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub rollout: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetricLabels {
    pub namespace: String,
    pub rollout: String,
    pub metric: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub namespace: String,
    pub rollout: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub namespace: String,
    pub rollout: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

pub const PHASES: [Phase; 6] = [
    Phase::Healthy,
    Phase::Progressing,
    Phase::Paused,
    Phase::RollingBack,
    Phase::Degraded,
    Phase::Failed,
];

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub phase: Family<PhaseLabels, Gauge>,
    pub canary_weight: Family<RolloutLabels, Gauge>,
    pub analysis_value: Family<MetricLabels, Gauge<f64, AtomicU64>>,
    pub analysis_runs: Family<ResultLabels, Counter>,
    pub rollbacks: Family<ReasonLabels, Counter>,
    pub inconclusive_checks: Family<RolloutLabels, Gauge>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("embedroll_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let phase = Family::<PhaseLabels, Gauge>::default();
        let canary_weight = Family::<RolloutLabels, Gauge>::default();
        let analysis_value = Family::<MetricLabels, Gauge<f64, AtomicU64>>::default();
        let analysis_runs = Family::<ResultLabels, Counter>::default();
        let rollbacks = Family::<ReasonLabels, Counter>::default();
        let inconclusive_checks = Family::<RolloutLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_duration.clone(),
        );
        registry.register(
            "rollout_phase",
            "1 for the rollout's current phase",
            phase.clone(),
        );
        registry.register(
            "rollout_canary_weight",
            "Percent of traffic on the canary",
            canary_weight.clone(),
        );
        registry.register(
            "analysis_value",
            "Last value of each analysis metric",
            analysis_value.clone(),
        );
        registry.register(
            "analysis_runs",
            "Analysis runs by result",
            analysis_runs.clone(),
        );
        registry.register(
            "rollbacks",
            "Automatic and manual rollbacks, by reason",
            rollbacks.clone(),
        );
        registry.register(
            "analysis_inconclusive_checks",
            "Inconclusive checks in a row (no data, too little traffic, Prometheus down)",
            inconclusive_checks.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            phase,
            canary_weight,
            analysis_value,
            analysis_runs,
            rollbacks,
            inconclusive_checks,
            leader,
        }
    }
}

impl Metrics {
    pub fn set_phase(&self, namespace: &str, rollout: &str, current: Option<Phase>) {
        for phase in PHASES {
            let labels = PhaseLabels {
                namespace: namespace.to_owned(),
                rollout: rollout.to_owned(),
                phase: format!("{phase:?}"),
            };
            self.phase
                .get_or_create(&labels)
                .set(i64::from(current == Some(phase)));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
