//! Recording an analysis run into status, and when to run the next one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Planner, at, plus};
use crate::analysis::AnalysisOutcome;
use crate::conditions::{self, Status};
use crate::crd::{AnalysisStatus, CheckResult, OnInconclusive, WeightCheckResult};

impl Planner<'_, '_> {
    pub(super) fn record_analysis(&mut self, outcome: &AnalysisOutcome) {
        let spec = &self.input.spec.analysis;
        let previous = self.st.analysis.clone().unwrap_or_default();
        let mut analysis = AnalysisStatus {
            failed_checks: previous.failed_checks,
            inconclusive_checks: previous.inconclusive_checks,
            last_run_at: Some(Time(self.input.now)),
            result: Some(outcome.result),
            latency_p95: outcome.latency_p95.map(|v| format!("{:.1}ms", v * 1000.0)),
            error_rate: outcome.error_rate.map(|v| format!("{:.2}%", v * 100.0)),
            metrics: outcome
                .metrics
                .iter()
                .map(|m| crate::crd::MetricStatus {
                    name: m.name.clone(),
                    value: m.display.clone(),
                    threshold: m.threshold.clone(),
                    result: m.result,
                    message: m.message.clone(),
                })
                .collect(),
        };
        if let Some(check) = &outcome.weight_check {
            let was = self.st.weight_check.as_ref().map(|w| w.result);
            match check.result {
                WeightCheckResult::Mismatched => {
                    let message = format!(
                        "canary weight {}% but {}% of {} requests reached the canary",
                        check.weight,
                        check.observed_percent.as_deref().unwrap_or("?"),
                        check.requests
                    );
                    if was != Some(WeightCheckResult::Mismatched) {
                        self.warn("WeightMismatch", message.clone());
                    }
                    self.condition(
                        conditions::WEIGHT_VERIFIED,
                        Status::False,
                        "Mismatched",
                        message,
                    );
                }
                WeightCheckResult::Matched => {
                    let message = format!(
                        "weight {}%: observed {}% of {} requests",
                        check.weight,
                        check.observed_percent.as_deref().unwrap_or("?"),
                        check.requests
                    );
                    self.condition(
                        conditions::WEIGHT_VERIFIED,
                        Status::True,
                        "Matched",
                        message,
                    );
                }
                WeightCheckResult::InsufficientTraffic | WeightCheckResult::Unknown => {
                    let message = format!(
                        "weight {}%: {} requests are too few to verify",
                        check.weight, check.requests
                    );
                    self.condition(
                        conditions::WEIGHT_VERIFIED,
                        Status::Unknown,
                        "InsufficientTraffic",
                        message,
                    );
                }
            }
            self.st.weight_check = Some(check.clone());
        }
        let mut failed_now = false;
        let mut inconclusive_limit = None;
        match outcome.result {
            CheckResult::Passed => {
                analysis.inconclusive_checks = 0;
                self.condition(
                    conditions::ANALYSIS,
                    Status::True,
                    "Passed",
                    outcome.summary.clone(),
                );
            }
            CheckResult::Failed => {
                analysis.inconclusive_checks = 0;
                analysis.failed_checks += 1;
                failed_now = true;
                self.condition(
                    conditions::ANALYSIS,
                    Status::False,
                    "Failed",
                    outcome.summary.clone(),
                );
                self.warn(
                    "AnalysisFailed",
                    format!(
                        "failed check {} of failureLimit {}: {}",
                        analysis.failed_checks, spec.failure_limit, outcome.summary
                    ),
                );
            }
            CheckResult::Inconclusive => {
                analysis.inconclusive_checks += 1;
                let streak = analysis.inconclusive_checks;
                self.condition(
                    conditions::ANALYSIS,
                    Status::Unknown,
                    "Inconclusive",
                    outcome.summary.clone(),
                );
                if previous.result != Some(CheckResult::Inconclusive) {
                    self.warn("AnalysisInconclusive", outcome.summary.clone());
                }
                match (spec.max_inconclusive, spec.on_inconclusive) {
                    // Without a limit, Fail counts every inconclusive check as a failure.
                    (None, OnInconclusive::Fail) => {
                        analysis.failed_checks += 1;
                        failed_now = true;
                    }
                    (None, OnInconclusive::Pause) => {}
                    (Some(max), _) if streak < max => {}
                    (Some(max), OnInconclusive::Fail) => {
                        inconclusive_limit = Some(format!(
                            "{streak} inconclusive checks in a row reached maxInconclusive {max}: {}",
                            outcome.summary
                        ));
                    }
                    (Some(max), OnInconclusive::Pause) => {
                        if streak == max {
                            self.warn(
                                "InconclusiveLimit",
                                format!(
                                    "{streak} inconclusive checks in a row reached maxInconclusive {max}; onInconclusive Pause holds the weight until a check passes, or promote or abort: {}",
                                    outcome.summary
                                ),
                            );
                        }
                    }
                }
            }
        }
        let failed_checks = analysis.failed_checks;
        self.st.analysis = Some(analysis);
        if let Some(why) = inconclusive_limit {
            self.roll_back("AnalysisInconclusive", why);
            return;
        }
        if failed_now && failed_checks >= spec.failure_limit {
            let reason = if outcome.result == CheckResult::Failed {
                "AnalysisFailed"
            } else {
                "AnalysisInconclusive"
            };
            self.roll_back(reason, outcome.summary.clone());
        }
    }

    /// The next analysis time. A time already past (the canary was short of Ready for longer
    /// than an interval) is not a reason to wake: the canary's next status change is.
    pub(super) fn wake_for_analysis(&mut self) {
        let started = at(&self.st.step_started_at).unwrap_or(self.input.now);
        let last = self.st.analysis.as_ref().and_then(|a| at(&a.last_run_at));
        let next = match last {
            Some(last) if last > started => plus(last, self.interval),
            _ => plus(started, self.interval),
        };
        self.wake_at(next);
    }

    /// Why the weight is held on inconclusive checks, and how long it may last.
    pub(super) fn inconclusive_summary(&self, analysis: &AnalysisStatus) -> String {
        let parts: Vec<String> = analysis
            .metrics
            .iter()
            .filter(|m| m.result == CheckResult::Inconclusive)
            .map(|m| format!("{}: {}", m.name, m.message.as_deref().unwrap_or("no data")))
            .collect();
        let spec = &self.input.spec.analysis;
        let limit = match spec.max_inconclusive {
            Some(max) if analysis.inconclusive_checks >= max => format!(
                "; maxInconclusive {max} reached: held until a check passes, or promote or abort"
            ),
            Some(max) => format!(
                "; {}/{max} before onInconclusive {:?} decides",
                analysis.inconclusive_checks, spec.on_inconclusive
            ),
            None => String::new(),
        };
        format!("inconclusive ({}){limit}", parts.join("; "))
    }
}
