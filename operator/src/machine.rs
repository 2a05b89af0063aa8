//! The rollout step machine: a pure function from (spec, status, live colors, commands, clock,
//! this reconcile's analysis) to the next status, the Events to emit, and the replicas each
//! color should run. Status is the rollout's memory, so a restarted operator resumes at the
//! same step and weight; the controller writes status before it touches traffic.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::analysis::AnalysisOutcome;
use crate::conditions::{self, Status};
use crate::crd::{
    AnalysisStatus, CheckResult, Color, EmbeddingRolloutSpec, EmbeddingRolloutStatus,
    OnInconclusive, Phase, ScaleDown, WeightCheckResult, parse_duration,
};
use crate::resources::ColorState;

/// One-shot commands (annotations the controller removes once read) and the pause flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Commands {
    pub promote: bool,
    pub promote_full: bool,
    pub abort: bool,
    pub retry: bool,
    pub paused: bool,
}

pub struct Input<'a> {
    /// The rollout's name (for the scale subresource's selector).
    pub name: &'a str,
    pub spec: &'a EmbeddingRolloutSpec,
    pub generation: Option<i64>,
    pub status: &'a EmbeddingRolloutStatus,
    pub desired_revision: &'a str,
    pub blue: &'a ColorState,
    pub green: &'a ColorState,
    pub commands: Commands,
    pub now: Timestamp,
}

impl Input<'_> {
    fn color(&self, color: Color) -> &ColorState {
        match color {
            Color::Blue => self.blue,
            Color::Green => self.green,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Stable, CamelCase: what alerting and `kubectl get events --field-selector reason=` use.
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: EmbeddingRolloutStatus,
    pub events: Vec<Transition>,
    /// When to look again without any watch event; `None` when nothing is pending.
    pub requeue: Option<Duration>,
    /// The color whose Deployment gets the current spec's template.
    pub deploy: Option<Color>,
    pub blue_replicas: i32,
    pub green_replicas: i32,
    /// Set when this plan rolls back (the reason), so traffic is moved first.
    pub rollback: Option<&'static str>,
}

/// A step with defaults applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepKind {
    Weight(i32),
    Pause(Option<Duration>),
}

pub fn steps(spec: &EmbeddingRolloutSpec) -> Vec<StepKind> {
    if spec.strategy.steps.is_empty() {
        return [1, 10, 50, 100].into_iter().map(StepKind::Weight).collect();
    }
    spec.strategy
        .steps
        .iter()
        .map(|step| match (step.set_weight, &step.pause) {
            (Some(weight), _) => StepKind::Weight(weight),
            (None, pause) => StepKind::Pause(
                pause
                    .as_ref()
                    .and_then(|p| p.duration.as_deref())
                    .and_then(|d| parse_duration(d).ok()),
            ),
        })
        .collect()
}

pub fn interval(spec: &EmbeddingRolloutSpec) -> Duration {
    parse_duration(&spec.analysis.interval).unwrap_or(Duration::from_secs(30))
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn at(time: &Option<Time>) -> Option<Timestamp> {
    time.as_ref().map(|t| t.0)
}

/// Whether this reconcile should run an analysis: a canary of the desired revision is Ready,
/// its step began at least one interval ago, and the last run is an interval old.
pub fn analysis_due(input: &Input<'_>) -> bool {
    let st = input.status;
    let (Some(canary), Some(revision), Some(started)) = (
        st.canary_color,
        st.canary_revision.as_deref(),
        at(&st.step_started_at),
    ) else {
        return false;
    };
    if revision != input.desired_revision
        || !input.color(canary).ready_at(revision)
        || input.commands.abort
    {
        return false;
    }
    let every = interval(input.spec);
    let last = st.analysis.as_ref().and_then(|a| at(&a.last_run_at));
    input.now >= plus(started, every) && last.is_none_or(|last| input.now >= plus(last, every))
}

pub fn plan(input: &Input<'_>, analysis: Option<&AnalysisOutcome>) -> Plan {
    let mut planner = Planner {
        input,
        st: input.status.clone(),
        events: Vec::new(),
        wake: Vec::new(),
        rollback: None,
        steps: steps(input.spec),
        interval: interval(input.spec),
    };
    planner.run(analysis);
    planner.finish()
}

struct Planner<'a, 'b> {
    input: &'a Input<'b>,
    st: EmbeddingRolloutStatus,
    events: Vec<Transition>,
    wake: Vec<Timestamp>,
    rollback: Option<&'static str>,
    steps: Vec<StepKind>,
    interval: Duration,
}

impl Planner<'_, '_> {
    fn event(&mut self, reason: &'static str, message: impl Into<String>) {
        self.events.push(Transition {
            reason,
            message: message.into(),
            warning: false,
        });
    }

    fn warn(&mut self, reason: &'static str, message: impl Into<String>) {
        self.events.push(Transition {
            reason,
            message: message.into(),
            warning: true,
        });
    }

    fn condition(&mut self, type_: &str, status: Status, reason: &str, message: impl Into<String>) {
        let (generation, now) = (self.input.generation, self.input.now);
        conditions::set(
            &mut self.st.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    }

    fn scale_down_delay(&self) -> Duration {
        Duration::from_secs(self.input.spec.strategy.scale_down_delay_seconds.max(0) as u64)
    }

    fn run(&mut self, analysis: Option<&AnalysisOutcome>) {
        let now = self.input.now;
        let desired = self.input.desired_revision.to_owned();
        self.st.observed_generation = self.input.generation;

        if let Some(scale_down) = &self.st.scale_down {
            if now >= scale_down.at.0 {
                let color = scale_down.color;
                self.st.scale_down = None;
                self.event("ScaledDown", format!("idle color {color} scaled to 0"));
            } else {
                self.wake.push(scale_down.at.0);
            }
        }

        if self.st.stable_color.is_none() {
            self.st.stable_color = Some(Color::Blue);
            self.st.stable_revision = Some(desired.clone());
            self.st.rollout_started_at = Some(Time(now));
            self.event(
                "Deploying",
                format!("first install: revision {desired} on blue"),
            );
        }
        let stable = self.st.stable_color.unwrap_or(Color::Blue);
        let stable_revision = self.st.stable_revision.clone().unwrap_or_default();

        if desired == stable_revision {
            self.settle_on_stable(stable, &stable_revision);
            return;
        }

        if self.st.failed_revision.as_deref() == Some(desired.as_str()) {
            if !self.input.commands.retry {
                self.st.phase = Some(Phase::Failed);
                return;
            }
            self.st.failed_revision = None;
            self.event("Retried", format!("retrying revision {desired}"));
        }

        if self.st.canary_revision.as_deref() != Some(desired.as_str()) {
            self.start_rollout(stable, &stable_revision, &desired);
        }
        let canary = self.st.canary_color.unwrap_or(stable.other());
        let canary_state = self.input.color(canary).clone();

        if self.input.commands.abort {
            self.roll_back(
                "Aborted",
                "aborted by the embedroll.dev/abort annotation".to_owned(),
            );
            return;
        }

        if !canary_state.ready_at(&desired) {
            self.wait_for_canary(canary, &canary_state);
            return;
        }

        if self.input.commands.promote_full {
            self.promote("promoted in full by the embedroll.dev/promote-full annotation");
            return;
        }
        if self.st.current_step_index.is_none() {
            self.enter_step(0);
        }
        if let Some(outcome) = analysis {
            self.record_analysis(outcome);
            if self.rollback.is_some() {
                return;
            }
        }
        self.advance();
    }

    /// The spec is the stable revision: nothing in flight (a canary, if any, is cancelled).
    fn settle_on_stable(&mut self, stable: Color, stable_revision: &str) {
        let now = self.input.now;
        if self.st.canary_revision.is_some() {
            let canary = self.st.canary_revision.clone().unwrap_or_default();
            self.clear_canary();
            self.warn(
                "Cancelled",
                format!(
                    "spec is back at stable revision {stable_revision}; canary {canary} cancelled"
                ),
            );
            self.condition(
                conditions::PROGRESSING,
                Status::False,
                "Cancelled",
                "the spec went back to the stable revision",
            );
        }
        self.st.failed_revision = None;
        let state = self.input.color(stable).clone();
        let first_install = self.st.rollout_started_at.is_some();
        if state.ready_at(stable_revision) {
            if first_install {
                self.st.rollout_started_at = None;
                self.event(
                    "Available",
                    format!("revision {stable_revision} Ready on {stable}; serving 100%"),
                );
            }
            self.st.phase = Some(Phase::Healthy);
            self.st.message = Some(format!("serving revision {stable_revision} on {stable}"));
            self.condition(
                conditions::PROGRESSING,
                Status::False,
                "RolloutComplete",
                format!("revision {stable_revision} serves all traffic"),
            );
        } else if first_install {
            let deadline = self.deadline();
            let pods = format!(
                "{}/{} pods Ready",
                state.ready_replicas, self.input.spec.replicas
            );
            if now > deadline {
                if self.st.phase != Some(Phase::Degraded) {
                    self.warn(
                        "ProgressDeadlineExceeded",
                        format!(
                            "first install not Ready within {}s ({pods})",
                            self.input.spec.strategy.progress_deadline_seconds
                        ),
                    );
                }
                self.st.phase = Some(Phase::Degraded);
                self.st.message = Some(format!(
                    "first install of {stable_revision} not Ready in time ({pods})"
                ));
                self.condition(
                    conditions::PROGRESSING,
                    Status::False,
                    "ProgressDeadlineExceeded",
                    format!("not Ready within the progress deadline ({pods})"),
                );
            } else {
                self.st.phase = Some(Phase::Progressing);
                self.st.message = Some(format!("first install of {stable_revision}: {pods}"));
                self.condition(
                    conditions::PROGRESSING,
                    Status::True,
                    "Deploying",
                    format!("waiting for pods ({pods})"),
                );
                self.wake.push(deadline);
            }
        } else if state.ready_replicas == 0 {
            if self.st.phase != Some(Phase::Degraded) {
                self.warn(
                    "StableUnavailable",
                    format!("stable color {stable} has no Ready pods"),
                );
            }
            self.st.phase = Some(Phase::Degraded);
            self.st.message = Some(format!("stable color {stable} has no Ready pods"));
        } else {
            self.st.phase = Some(Phase::Healthy);
            self.st.message = Some(format!("serving revision {stable_revision} on {stable}"));
        }
    }

    fn deadline(&self) -> Timestamp {
        let started = at(&self.st.rollout_started_at).unwrap_or(self.input.now);
        plus(
            started,
            Duration::from_secs(self.input.spec.strategy.progress_deadline_seconds.max(0) as u64),
        )
    }

    fn start_rollout(&mut self, stable: Color, stable_revision: &str, desired: &str) {
        let canary = stable.other();
        let superseded = self.st.canary_revision.take();
        self.st.canary_color = Some(canary);
        self.st.canary_revision = Some(desired.to_owned());
        self.st.canary_weight = 0;
        self.st.current_step_index = None;
        self.st.step_started_at = None;
        self.st.rollout_started_at = Some(Time(self.input.now));
        self.st.analysis = None;
        self.st.weight_check = None;
        if self
            .st
            .scale_down
            .as_ref()
            .is_some_and(|s| s.color == canary)
        {
            self.st.scale_down = None;
        }
        self.st.phase = Some(Phase::Progressing);
        match superseded {
            Some(old) => self.event(
                "Superseded",
                format!("revision {desired} supersedes canary {old} on {canary}; its weight is 0 until it is Ready"),
            ),
            None => self.event(
                "RolloutStarted",
                format!("revision {desired} goes to {canary}; stable {stable_revision} stays on {stable}"),
            ),
        }
        self.condition(
            conditions::PROGRESSING,
            Status::True,
            "RolloutStarted",
            format!("revision {desired} deploying on {canary}"),
        );
        self.condition(
            conditions::ROLLED_BACK,
            Status::False,
            "RolloutStarted",
            format!("revision {desired} in progress"),
        );
    }

    fn wait_for_canary(&mut self, canary: Color, state: &ColorState) {
        let pods = format!(
            "{}/{} pods Ready",
            state.ready_replicas, self.input.spec.replicas
        );
        if self.st.current_step_index.is_some() {
            // Mid-rollout: a restarting pod is fine while others serve; none left is not.
            if state.ready_replicas == 0 {
                self.roll_back(
                    "CanaryUnavailable",
                    format!("canary {canary} has no Ready pods"),
                );
            } else {
                self.st.message = Some(format!("canary {canary}: {pods}"));
                self.wake_for_analysis();
            }
            return;
        }
        let deadline = self.deadline();
        if self.input.now > deadline {
            self.roll_back(
                "ProgressDeadlineExceeded",
                format!(
                    "canary not Ready within progressDeadlineSeconds {} ({pods})",
                    self.input.spec.strategy.progress_deadline_seconds
                ),
            );
            return;
        }
        self.st.phase = Some(Phase::Progressing);
        self.st.message = Some(format!("deploying canary on {canary}: {pods}"));
        self.wake.push(deadline);
    }

    fn enter_step(&mut self, index: usize) {
        let total = self.steps.len();
        self.st.current_step_index = Some(index as i32);
        self.st.step_started_at = Some(Time(self.input.now));
        match self.steps[index] {
            StepKind::Weight(weight) => {
                let old = self.st.canary_weight;
                self.st.canary_weight = weight;
                self.st.weight_check = None;
                self.event(
                    "WeightUpdated",
                    format!(
                        "canary weight {old}% -> {weight}% (step {}/{total})",
                        index + 1
                    ),
                );
            }
            StepKind::Pause(Some(d)) => self.event(
                "StepPaused",
                format!(
                    "holding {}% for {}s (step {}/{total})",
                    self.st.canary_weight,
                    d.as_secs(),
                    index + 1
                ),
            ),
            StepKind::Pause(None) => self.event(
                "StepPaused",
                format!(
                    "holding {}% until promoted (step {}/{total})",
                    self.st.canary_weight,
                    index + 1
                ),
            ),
        }
    }

    fn record_analysis(&mut self, outcome: &AnalysisOutcome) {
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
                self.condition(
                    conditions::ANALYSIS,
                    Status::Unknown,
                    "Inconclusive",
                    outcome.summary.clone(),
                );
                if previous.result != Some(CheckResult::Inconclusive) {
                    self.warn("AnalysisInconclusive", outcome.summary.clone());
                }
                if spec.on_inconclusive == OnInconclusive::Fail {
                    analysis.failed_checks += 1;
                    failed_now = true;
                }
            }
        }
        let failed_checks = analysis.failed_checks;
        self.st.analysis = Some(analysis);
        if failed_now && failed_checks >= spec.failure_limit {
            let reason = if outcome.result == CheckResult::Failed {
                "AnalysisFailed"
            } else {
                "AnalysisInconclusive"
            };
            self.roll_back(reason, outcome.summary.clone());
        }
    }

    fn wake_for_analysis(&mut self) {
        let started = at(&self.st.step_started_at).unwrap_or(self.input.now);
        let last = self.st.analysis.as_ref().and_then(|a| at(&a.last_run_at));
        let next = match last {
            Some(last) if last > started => plus(last, self.interval),
            _ => plus(started, self.interval),
        };
        self.wake.push(next);
    }

    fn advance(&mut self) {
        let now = self.input.now;
        let index = self.st.current_step_index.unwrap_or(0).max(0) as usize;
        let Some(step) = self.steps.get(index).copied() else {
            // Steps were shortened under a running rollout: finish it.
            self.promote("all steps done");
            return;
        };
        let started = at(&self.st.step_started_at).unwrap_or(now);
        let last = self.st.analysis.clone().unwrap_or_default();
        let passed_this_step = last.result == Some(CheckResult::Passed)
            && at(&last.last_run_at).is_some_and(|t| t >= plus(started, self.interval));
        let inconclusive_hold = last.result == Some(CheckResult::Inconclusive)
            && self.input.spec.analysis.on_inconclusive == OnInconclusive::Pause;
        let promote = self.input.commands.promote;
        let weight = self.st.canary_weight;
        let total = self.steps.len();

        if self.input.commands.paused && !promote {
            self.st.phase = Some(Phase::Paused);
            self.st.message = Some(format!(
                "paused by annotation at {weight}% (step {}/{total})",
                index + 1
            ));
            self.condition(
                conditions::PROGRESSING,
                Status::True,
                "Paused",
                "paused by the embedroll.dev/paused annotation",
            );
            self.wake_for_analysis();
            return;
        }
        let advance = match step {
            StepKind::Weight(_) => promote || passed_this_step,
            StepKind::Pause(Some(d)) => promote || (now >= plus(started, d) && !inconclusive_hold),
            StepKind::Pause(None) => promote,
        };
        if promote {
            self.event(
                "PromotedStep",
                format!("step {}/{total} promoted by annotation", index + 1),
            );
        }
        if !advance {
            if inconclusive_hold {
                self.st.phase = Some(Phase::Paused);
                self.st.message = Some(format!(
                    "holding {weight}%: analysis {}",
                    self.st
                        .analysis
                        .as_ref()
                        .map(|_| last_summary(&last))
                        .unwrap_or_default()
                ));
            } else if let StepKind::Pause(duration) = step {
                self.st.phase = Some(Phase::Paused);
                self.st.message = Some(match duration {
                    Some(d) => format!(
                        "step {}/{total}: holding {weight}% for {}s",
                        index + 1,
                        d.as_secs()
                    ),
                    None => format!(
                        "step {}/{total}: holding {weight}% until promoted",
                        index + 1
                    ),
                });
                if let Some(d) = duration {
                    self.wake.push(plus(started, d));
                }
            } else {
                self.st.phase = Some(Phase::Progressing);
                self.st.message = Some(format!(
                    "step {}/{total}: canary at {weight}%, analysing",
                    index + 1
                ));
            }
            self.condition(
                conditions::PROGRESSING,
                Status::True,
                "RolloutInProgress",
                format!("step {}/{total} at {weight}%", index + 1),
            );
            self.wake_for_analysis();
            return;
        }
        if index + 1 >= total {
            self.promote("every step passed");
        } else {
            self.enter_step(index + 1);
            self.st.phase = Some(Phase::Progressing);
            let weight = self.st.canary_weight;
            self.st.message = Some(format!("step {}/{total}: canary at {weight}%", index + 2));
            self.condition(
                conditions::PROGRESSING,
                Status::True,
                "RolloutInProgress",
                format!("step {}/{total} at {weight}%", index + 2),
            );
            self.wake_for_analysis();
        }
    }

    fn clear_canary(&mut self) {
        if let Some(canary) = self.st.canary_color.take() {
            self.st.scale_down = Some(ScaleDown {
                color: canary,
                at: Time(plus(self.input.now, self.scale_down_delay())),
            });
        }
        self.st.canary_revision = None;
        self.st.canary_weight = 0;
        self.st.current_step_index = None;
        self.st.step_started_at = None;
        self.st.rollout_started_at = None;
    }

    fn promote(&mut self, why: &str) {
        let Some(canary) = self.st.canary_color else {
            return;
        };
        let revision = self.st.canary_revision.clone().unwrap_or_default();
        let old = self.st.stable_color.unwrap_or(canary.other());
        self.st.canary_color = None;
        self.st.canary_revision = None;
        self.st.canary_weight = 0;
        self.st.current_step_index = None;
        self.st.step_started_at = None;
        self.st.rollout_started_at = None;
        self.st.failed_revision = None;
        self.st.stable_color = Some(canary);
        self.st.stable_revision = Some(revision.clone());
        self.st.scale_down = Some(ScaleDown {
            color: old,
            at: Time(plus(self.input.now, self.scale_down_delay())),
        });
        self.st.phase = Some(Phase::Healthy);
        self.st.message = Some(format!("revision {revision} promoted on {canary} ({why})"));
        self.event(
            "Promoted",
            format!(
                "revision {revision} is stable on {canary} ({why}); {old} scales down in {}s",
                self.scale_down_delay().as_secs()
            ),
        );
        self.condition(
            conditions::PROGRESSING,
            Status::False,
            "Promoted",
            format!("revision {revision} promoted ({why})"),
        );
        self.condition(
            conditions::ROLLED_BACK,
            Status::False,
            "Promoted",
            format!("revision {revision} promoted"),
        );
    }

    fn roll_back(&mut self, reason: &'static str, message: String) {
        let revision = self.st.canary_revision.clone().unwrap_or_default();
        let stable = self
            .st
            .stable_color
            .map(|c| c.to_string())
            .unwrap_or_default();
        self.clear_canary();
        self.st.failed_revision = Some(revision.clone());
        self.st.phase = Some(Phase::Failed);
        let text = format!("rolled back {revision}: {message}; traffic on stable {stable}");
        self.st.message = Some(text.clone());
        self.warn("RolledBack", format!("{reason}: {text}"));
        self.condition(conditions::ROLLED_BACK, Status::True, reason, text.clone());
        self.condition(conditions::PROGRESSING, Status::False, reason, text);
        self.rollback = Some(reason);
    }

    fn finish(mut self) -> Plan {
        let input = self.input;
        let stable = self.st.stable_color.unwrap_or(Color::Blue);
        let state = input.color(stable);
        let stable_revision = self.st.stable_revision.clone().unwrap_or_default();
        if state.ready_replicas > 0 {
            let message = format!(
                "{} pods of revision {stable_revision} Ready on {stable}",
                state.ready_replicas
            );
            self.condition(conditions::AVAILABLE, Status::True, "StableReady", message);
        } else {
            self.condition(
                conditions::AVAILABLE,
                Status::False,
                "NoReadyPods",
                format!("no Ready pods on stable {stable}"),
            );
        }
        self.st.replicas = state.ready_replicas;
        self.st.selector = Some(format!(
            "embedroll.dev/color={stable},embedroll.dev/rollout={}",
            input.name
        ));

        let replicas_for = |color: Color, st: &EmbeddingRolloutStatus| {
            let active = st.stable_color == Some(color)
                || st.canary_color == Some(color)
                || st
                    .scale_down
                    .as_ref()
                    .is_some_and(|s| s.color == color && input.now < s.at.0);
            if active { input.spec.replicas } else { 0 }
        };
        let deploy = if Some(input.desired_revision) == self.st.stable_revision.as_deref() {
            self.st.stable_color
        } else if Some(input.desired_revision) == self.st.canary_revision.as_deref() {
            self.st.canary_color
        } else {
            None
        };
        let requeue = self
            .wake
            .iter()
            .min()
            .map(|t| Duration::try_from(t.duration_since(input.now)).unwrap_or(Duration::ZERO))
            .map(|d| d.clamp(Duration::from_millis(200), Duration::from_secs(300)));
        Plan {
            blue_replicas: replicas_for(Color::Blue, &self.st),
            green_replicas: replicas_for(Color::Green, &self.st),
            status: self.st,
            events: self.events,
            requeue,
            deploy,
            rollback: self.rollback,
        }
    }
}

fn last_summary(analysis: &AnalysisStatus) -> String {
    let parts: Vec<String> = analysis
        .metrics
        .iter()
        .filter(|m| m.result == CheckResult::Inconclusive)
        .map(|m| format!("{}: {}", m.name, m.message.as_deref().unwrap_or("no data")))
        .collect();
    format!("inconclusive ({})", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::MetricOutcome;
    use crate::crd::{CheckResult, EmbeddingRolloutSpec};

    fn spec() -> EmbeddingRolloutSpec {
        serde_json::from_value(serde_json::json!({
            "replicas": 2,
            "template": {"spec": {"containers": [{"name": "embedder", "image": "embedder:1"}]}},
            "traffic": {"nginx": {}},
            "strategy": {"scaleDownDelaySeconds": 60, "progressDeadlineSeconds": 120},
            "analysis": {"interval": "10s", "failureLimit": 2,
                         "metrics": [{"name": "p95", "preset": "LatencyP95", "max": "35ms"}]}
        }))
        .unwrap()
    }

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn ready(revision: &str) -> ColorState {
        ColorState {
            exists: true,
            revision: Some(revision.into()),
            desired_replicas: 2,
            ready_replicas: 2,
            ready: true,
        }
    }

    fn outcome(result: CheckResult) -> AnalysisOutcome {
        AnalysisOutcome {
            result,
            metrics: vec![MetricOutcome {
                name: "p95".into(),
                value: Some(0.05),
                display: Some("50.0ms".into()),
                threshold: "<= 35ms".into(),
                result,
                message: None,
            }],
            latency_p95: Some(0.05),
            error_rate: None,
            weight_check: None,
            summary: format!("{result:?}"),
        }
    }

    /// A small world: spec, status, colors and a clock, stepped one reconcile at a time.
    struct World {
        spec: EmbeddingRolloutSpec,
        status: EmbeddingRolloutStatus,
        blue: ColorState,
        green: ColorState,
        commands: Commands,
        now: Timestamp,
        events: Vec<&'static str>,
    }

    impl World {
        fn new() -> Self {
            World {
                spec: spec(),
                status: EmbeddingRolloutStatus::default(),
                blue: ColorState::default(),
                green: ColorState::default(),
                commands: Commands::default(),
                now: t(0),
                events: Vec::new(),
            }
        }

        fn reconcile(&mut self, revision: &str, analysis: Option<CheckResult>) -> Plan {
            let input = Input {
                name: "search",
                spec: &self.spec,
                generation: Some(1),
                status: &self.status,
                desired_revision: revision,
                blue: &self.blue,
                green: &self.green,
                commands: self.commands,
                now: self.now,
            };
            let due = analysis_due(&input);
            let analysis = analysis.filter(|_| due).map(outcome);
            let plan = plan(&input, analysis.as_ref());
            self.status = plan.status.clone();
            self.events.extend(plan.events.iter().map(|e| e.reason));
            self.commands = Commands::default();
            plan
        }

        /// Installs r1 on blue and makes it Healthy.
        fn installed() -> Self {
            let mut w = World::new();
            w.reconcile("r1", None);
            w.blue = ready("r1");
            w.reconcile("r1", None);
            assert_eq!(w.status.phase, Some(Phase::Healthy));
            w
        }

        fn tick(&mut self, seconds: i64) {
            self.now = self
                .now
                .checked_add(SignedDuration::from_secs(seconds))
                .unwrap();
        }
    }

    #[test]
    fn first_install_goes_healthy_once_ready_without_steps() {
        let mut w = World::new();
        let plan = w.reconcile("r1", None);
        assert_eq!(plan.status.phase, Some(Phase::Progressing));
        assert_eq!(plan.deploy, Some(Color::Blue));
        assert_eq!((plan.blue_replicas, plan.green_replicas), (2, 0));
        assert_eq!(plan.status.canary_weight, 0);
        w.blue = ready("r1");
        let plan = w.reconcile("r1", None);
        assert_eq!(plan.status.phase, Some(Phase::Healthy));
        assert_eq!(plan.requeue, None, "idle rollouts are not polled");
        assert_eq!(w.events, ["Deploying", "Available"]);
        // Nothing changes on a further reconcile: status is not rewritten.
        let again = w.reconcile("r1", None);
        assert_eq!(again.status, plan.status);
        assert!(again.events.is_empty());
    }

    #[test]
    fn first_install_past_its_deadline_is_degraded() {
        let mut w = World::new();
        w.reconcile("r1", None);
        w.tick(121);
        let plan = w.reconcile("r1", None);
        assert_eq!(plan.status.phase, Some(Phase::Degraded));
        assert_eq!(w.events, ["Deploying", "ProgressDeadlineExceeded"]);
    }

    #[test]
    fn upgrade_walks_every_step_after_passing_analysis_then_promotes() {
        let mut w = World::installed();
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.canary_color, Some(Color::Green));
        assert_eq!(
            plan.status.canary_weight, 0,
            "no traffic before the canary is Ready"
        );
        assert_eq!(plan.deploy, Some(Color::Green));
        assert_eq!((plan.blue_replicas, plan.green_replicas), (2, 2));
        w.green = ready("r2");
        let mut weights = Vec::new();
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        weights.push(plan.status.canary_weight);
        for _ in 0..4 {
            // Analysis is not due before one interval at the new weight...
            w.tick(5);
            let held = w.reconcile("r2", Some(CheckResult::Passed));
            assert_eq!(held.status.canary_weight, *weights.last().unwrap());
            // ...and after a passing run the next step starts.
            w.tick(5);
            let plan = w.reconcile("r2", Some(CheckResult::Passed));
            weights.push(plan.status.canary_weight);
        }
        assert_eq!(weights, [1, 10, 50, 100, 0]);
        assert_eq!(w.status.phase, Some(Phase::Healthy));
        assert_eq!(w.status.stable_color, Some(Color::Green));
        assert_eq!(w.status.stable_revision.as_deref(), Some("r2"));
        assert_eq!(w.status.scale_down.as_ref().unwrap().color, Color::Blue);
        assert!(w.events.contains(&"Promoted"));
        // The old color stays up for scaleDownDelaySeconds, then goes to zero.
        let plan = w.reconcile("r2", None);
        assert_eq!((plan.blue_replicas, plan.green_replicas), (2, 2));
        assert!(plan.requeue.unwrap() <= Duration::from_secs(60));
        w.tick(61);
        let plan = w.reconcile("r2", None);
        assert_eq!((plan.blue_replicas, plan.green_replicas), (0, 2));
        assert!(w.events.contains(&"ScaledDown"));
    }

    #[test]
    fn failed_checks_roll_back_at_the_failure_limit_and_stay_rolled_back() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Failed));
        assert_eq!(plan.rollback, None, "one failure of failureLimit 2");
        assert_eq!(plan.status.canary_weight, 1);
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Failed));
        assert_eq!(plan.rollback, Some("AnalysisFailed"));
        assert_eq!(plan.status.canary_weight, 0);
        assert_eq!(plan.status.phase, Some(Phase::Failed));
        assert_eq!(
            plan.status.stable_revision.as_deref(),
            Some("r1"),
            "stable untouched"
        );
        assert_eq!(plan.status.failed_revision.as_deref(), Some("r2"));
        let rolled_back =
            conditions::get(&plan.status.conditions, conditions::ROLLED_BACK).unwrap();
        assert_eq!(
            (rolled_back.status.as_str(), rolled_back.reason.as_str()),
            ("True", "AnalysisFailed")
        );
        // Nothing is retried while the spec stays at r2...
        w.tick(30);
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.canary_revision, None);
        assert_eq!(plan.status.phase, Some(Phase::Failed));
        assert_eq!(
            plan.deploy, None,
            "the failed revision's Deployment is left alone"
        );
        // ...until a retry is asked for.
        w.commands.retry = true;
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.canary_revision.as_deref(), Some("r2"));
        assert_eq!(plan.status.phase, Some(Phase::Progressing));
        assert!(w.events.contains(&"Retried"));
    }

    #[test]
    fn inconclusive_pauses_by_default_and_resumes_when_data_returns() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        for _ in 0..5 {
            w.tick(10);
            let plan = w.reconcile("r2", Some(CheckResult::Inconclusive));
            assert_eq!(
                plan.status.canary_weight, 1,
                "never promoted on missing data"
            );
            assert_eq!(plan.status.phase, Some(Phase::Paused));
            assert_eq!(plan.rollback, None);
        }
        assert_eq!(
            w.events
                .iter()
                .filter(|e| **e == "AnalysisInconclusive")
                .count(),
            1,
            "one Event per transition"
        );
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        assert_eq!(plan.status.canary_weight, 10);
        assert_eq!(plan.status.phase, Some(Phase::Progressing));
    }

    #[test]
    fn inconclusive_counts_as_failure_when_configured() {
        let mut w = World::installed();
        w.spec.analysis.on_inconclusive = OnInconclusive::Fail;
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        w.tick(10);
        w.reconcile("r2", Some(CheckResult::Inconclusive));
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Inconclusive));
        assert_eq!(plan.rollback, Some("AnalysisInconclusive"));
    }

    #[test]
    fn canary_not_ready_by_the_deadline_rolls_back() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.tick(60);
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.phase, Some(Phase::Progressing));
        assert!(plan.requeue.unwrap() <= Duration::from_secs(61));
        w.tick(61);
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.rollback, Some("ProgressDeadlineExceeded"));
    }

    #[test]
    fn a_newer_revision_supersedes_the_canary_at_weight_zero() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        w.tick(10);
        w.reconcile("r2", Some(CheckResult::Passed));
        assert_eq!(w.status.canary_weight, 10);
        let plan = w.reconcile("r3", None);
        assert_eq!(plan.status.canary_revision.as_deref(), Some("r3"));
        assert_eq!(plan.status.canary_color, Some(Color::Green));
        assert_eq!(
            plan.status.canary_weight, 0,
            "the old canary gets no traffic while r3 starts"
        );
        assert_eq!(plan.deploy, Some(Color::Green));
        assert_eq!(plan.status.stable_revision.as_deref(), Some("r1"));
        assert!(w.events.contains(&"Superseded"));
        // r2's pods are still there: the canary is not Ready at r3.
        assert!(!analysis_due(&Input {
            name: "search",
            spec: &w.spec,
            generation: Some(1),
            status: &w.status,
            desired_revision: "r3",
            blue: &w.blue,
            green: &w.green,
            commands: Commands::default(),
            now: w.now,
        }));
    }

    #[test]
    fn manual_commands_promote_pause_abort() {
        let mut w = World::installed();
        w.spec.strategy.steps = serde_json::from_value(serde_json::json!([
            {"setWeight": 10}, {"pause": {}}, {"setWeight": 100}
        ]))
        .unwrap();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        w.commands.promote = true;
        let plan = w.reconcile("r2", None);
        assert_eq!(
            plan.status.current_step_index,
            Some(1),
            "promote skips the analysis hold"
        );
        w.tick(600);
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        assert_eq!(
            plan.status.current_step_index,
            Some(1),
            "pause: {{}} waits for a promote"
        );
        assert_eq!(plan.status.phase, Some(Phase::Paused));
        w.commands.promote = true;
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.canary_weight, 100);
        // Paused by annotation: no step advances even after passing analysis.
        w.commands.paused = true;
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        assert_eq!(
            (plan.status.phase, plan.status.canary_weight),
            (Some(Phase::Paused), 100)
        );
        w.commands.abort = true;
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.rollback, Some("Aborted"));
        assert_eq!(plan.status.canary_weight, 0);
        // A new spec starts a new rollout even after an abort.
        let plan = w.reconcile("r3", None);
        assert_eq!(plan.status.canary_revision.as_deref(), Some("r3"));
    }

    #[test]
    fn promote_full_makes_the_canary_stable_at_once() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        w.commands.promote_full = true;
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.stable_color, Some(Color::Green));
        assert_eq!(plan.status.canary_weight, 0);
        assert_eq!(plan.status.phase, Some(Phase::Healthy));
    }

    #[test]
    fn reverting_the_spec_cancels_the_canary() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        let plan = w.reconcile("r1", None);
        assert_eq!(plan.status.canary_revision, None);
        assert_eq!(plan.status.canary_weight, 0);
        assert_eq!(plan.status.phase, Some(Phase::Healthy));
        assert_eq!(plan.status.scale_down.as_ref().unwrap().color, Color::Green);
        assert!(w.events.contains(&"Cancelled"));
    }

    #[test]
    fn a_restart_resumes_from_status_alone() {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
        w.tick(10);
        w.reconcile("r2", Some(CheckResult::Passed));
        assert_eq!(w.status.canary_weight, 10);
        // A fresh process knows only the persisted status (round-tripped through JSON).
        let persisted: EmbeddingRolloutStatus =
            serde_json::from_value(serde_json::to_value(&w.status).unwrap()).unwrap();
        w.status = persisted;
        w.tick(3);
        let plan = w.reconcile("r2", None);
        assert_eq!(
            plan.status.canary_weight, 10,
            "no traffic regression after a restart"
        );
        assert_eq!(plan.status.current_step_index, Some(1));
        assert!(plan.events.is_empty());
    }
}
