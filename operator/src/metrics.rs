//! The operator's own metrics (`/metrics`, OpenMetrics text): reconciles, errors, durations,
//! and per-rollout phase, weight, analysis values and rollbacks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use crate::analysis::AnalysisOutcome;
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

pub const PHASES: [Phase; 7] = [
    Phase::Healthy,
    Phase::Progressing,
    Phase::Paused,
    Phase::RollingBack,
    Phase::Degraded,
    Phase::Failed,
    Phase::AwaitingReindex,
];

/// One compatibility check's result (`Compatible`, `Incompatible`, `ModelChanged`,
/// `ContractBroken`, `Inconclusive`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompatibilityLabels {
    pub result: String,
}

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
    pub compatibility_checks: Family<CompatibilityLabels, Counter>,
    /// The last check's lowest per-text cosine between the canary's and stable's vectors.
    pub compatibility_min_cosine: Family<RolloutLabels, Gauge<f64, AtomicU64>>,
    pub leader: Gauge,
    /// The label values each rollout's series were created with, so they can all be removed
    /// when the rollout is deleted.
    series: Mutex<HashMap<(String, String), RolloutSeries>>,
}

#[derive(Default)]
struct RolloutSeries {
    metrics: BTreeSet<String>,
    results: BTreeSet<String>,
    reasons: BTreeSet<String>,
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
        let compatibility_checks = Family::<CompatibilityLabels, Counter>::default();
        let compatibility_min_cosine = Family::<RolloutLabels, Gauge<f64, AtomicU64>>::default();
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
            "compatibility_checks",
            "Vector-compatibility checks run, by result",
            compatibility_checks.clone(),
        );
        registry.register(
            "compatibility_min_cosine",
            "Lowest per-text cosine between the canary's and stable's vectors in the last check",
            compatibility_min_cosine.clone(),
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
            compatibility_checks,
            compatibility_min_cosine,
            leader,
            series: Mutex::default(),
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

    /// Notes the label values this reconcile's series use (see `forget`).
    pub fn track(
        &self,
        namespace: &str,
        rollout: &str,
        outcome: Option<&AnalysisOutcome>,
        rollback: Option<&str>,
    ) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let entry = series
            .entry((namespace.to_owned(), rollout.to_owned()))
            .or_default();
        if let Some(outcome) = outcome {
            entry.results.insert(format!("{:?}", outcome.result));
            entry
                .metrics
                .extend(outcome.metrics.iter().map(|m| m.name.clone()));
        }
        if let Some(reason) = rollback {
            entry.reasons.insert(reason.to_owned());
        }
    }

    /// Forgets every rollout with series but not in `alive` (a relist's rollouts: those
    /// deleted while the watch was down never came as a delete); returns them.
    pub fn forget_all_but(&self, alive: &BTreeSet<(String, String)>) -> Vec<(String, String)> {
        let gone: Vec<(String, String)> = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|key| !alive.contains(*key))
            .cloned()
            .collect();
        for (namespace, rollout) in &gone {
            self.forget(namespace, rollout);
        }
        gone
    }

    /// Removes every series of a deleted rollout, so its alerts (RolledBack, Degraded) stop.
    pub fn forget(&self, namespace: &str, rollout: &str) {
        let known = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(namespace.to_owned(), rollout.to_owned()))
            .unwrap_or_default();
        let (ns, name) = (namespace.to_owned(), rollout.to_owned());
        for phase in PHASES {
            self.phase.remove(&PhaseLabels {
                namespace: ns.clone(),
                rollout: name.clone(),
                phase: format!("{phase:?}"),
            });
        }
        let labels = RolloutLabels {
            namespace: ns.clone(),
            rollout: name.clone(),
        };
        self.canary_weight.remove(&labels);
        self.inconclusive_checks.remove(&labels);
        self.compatibility_min_cosine.remove(&labels);
        for metric in known.metrics {
            self.analysis_value.remove(&MetricLabels {
                namespace: ns.clone(),
                rollout: name.clone(),
                metric,
            });
        }
        for result in known.results {
            self.analysis_runs.remove(&ResultLabels {
                namespace: ns.clone(),
                rollout: name.clone(),
                result,
            });
        }
        for reason in known.reasons {
            self.rollbacks.remove(&ReasonLabels {
                namespace: ns.clone(),
                rollout: name.clone(),
                reason,
            });
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_rollouts_series_are_all_removed() {
        let metrics = Metrics::default();
        let labels = |rollout: &str| RolloutLabels {
            namespace: "ml".into(),
            rollout: rollout.into(),
        };
        for rollout in ["gone", "kept"] {
            metrics.set_phase("ml", rollout, Some(Phase::Failed));
            metrics.canary_weight.get_or_create(&labels(rollout)).set(0);
            metrics
                .rollbacks
                .get_or_create(&ReasonLabels {
                    namespace: "ml".into(),
                    rollout: rollout.into(),
                    reason: "AnalysisFailed".into(),
                })
                .inc();
            metrics
                .analysis_value
                .get_or_create(&MetricLabels {
                    namespace: "ml".into(),
                    rollout: rollout.into(),
                    metric: "p95".into(),
                })
                .set(0.05);
            metrics.track("ml", rollout, None, Some("AnalysisFailed"));
            let mut series = metrics.series.lock().unwrap();
            series
                .get_mut(&("ml".into(), rollout.into()))
                .unwrap()
                .metrics
                .insert("p95".into());
        }
        metrics.forget("ml", "gone");
        let text = metrics.encode();
        assert!(!text.contains("rollout=\"gone\""), "{text}");
        assert!(text.contains("rollout=\"kept\""));
        assert!(text.contains("embedroll_operator_rollbacks_total{namespace=\"ml\",rollout=\"kept\",reason=\"AnalysisFailed\"} 1"));
    }
}
