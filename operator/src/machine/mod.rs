//! The rollout step machine: a pure function from (spec, status, live colors and routes,
//! commands, clock, this reconcile's analysis) to the next status, the Events to emit, and the
//! replicas each color should run. Status is the rollout's memory, so a restarted operator
//! resumes at the same step and weight; the controller writes status before it touches
//! traffic. When status is lost, the live routes rebuild it before anything moves.
//!
//! One file per phase: `install` (first install, settled stable, status recovery), `steps`
//! (weights, pauses, edited steps), `analysis` (recording checks, waking for the next),
//! `compatibility` (the vector gate and the re-index cut-over), `rollback`, `promotion`,
//! `scale` (replicas, HPA semantics).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::analysis::AnalysisOutcome;
use crate::compatibility::Outcome;
use crate::conditions::{self, Status};
use crate::crd::{
    Color, CompatibilityStage, EmbeddingRolloutSpec, EmbeddingRolloutStatus, parse_duration,
};
use crate::resources::ColorState;

mod analysis;
mod compatibility;
mod install;
mod promotion;
mod rollback;
mod scale;
mod steps;
#[cfg(test)]
mod tests;

pub use compatibility::CheckRequest;
pub use scale::{canary_replicas, replicas_for};
pub use steps::{StepKind, steps, steps_hash};

/// One-shot commands (annotations the controller removes once read) and the pause flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Commands {
    pub promote: bool,
    pub promote_full: bool,
    pub abort: bool,
    pub retry: bool,
    pub paused: bool,
}

/// What the live traffic objects say: the primary route's color, and what the operator wrote
/// on the canary route. Only read when status is empty (lost, restored, re-created), so a
/// rollout resumes where its traffic is instead of starting over as a first install.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveTraffic {
    /// The color the primary route sends to; `None` when there is no primary route.
    pub stable_color: Option<Color>,
    /// The color the canary route sends to, and its weight.
    pub canary_color: Option<Color>,
    pub canary_weight: i32,
    pub canary_revision: Option<String>,
    pub failed_revision: Option<String>,
    pub step_index: Option<i32>,
}

impl LiveTraffic {
    /// What the routes carry once `status` is applied: the controller writes exactly this.
    pub fn written_by(status: &EmbeddingRolloutStatus) -> Self {
        let stable = status.stable_color.unwrap_or(Color::Blue);
        LiveTraffic {
            stable_color: Some(stable),
            canary_color: Some(status.canary_color.unwrap_or(stable.other())),
            canary_weight: status.canary_weight,
            canary_revision: status.canary_revision.clone(),
            failed_revision: status.failed_revision.clone(),
            step_index: status.current_step_index,
        }
    }
}

/// Whether the Gateway serves the HTTPRoute as the operator last wrote it (Gateway API; nginx
/// Ingresses have no such status and are always `Routed`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RouteState {
    #[default]
    Routed,
    /// Just written (not created yet, or not reported on for its current generation): a
    /// moment's wait, not news.
    Pending(String),
    /// No Gateway controller reports on it at all (a parent that does not exist, a class
    /// nobody serves).
    Unreported(String),
    /// A parent said no (`Accepted` or `ResolvedRefs` False).
    Refused(String),
}

impl RouteState {
    /// Why traffic cannot move, if it cannot.
    pub fn held(&self) -> Option<&str> {
        match self {
            RouteState::Routed => None,
            RouteState::Pending(why) | RouteState::Unreported(why) | RouteState::Refused(why) => {
                Some(why)
            }
        }
    }
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
    pub live: &'a LiveTraffic,
    pub route: &'a RouteState,
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
    /// Commands that could not act yet and stay pending (their annotation is kept).
    pub deferred: Commands,
    /// A vector-compatibility check the rollout waits for: run it and plan again with its
    /// outcome.
    pub check: Option<CheckRequest>,
}

pub fn interval(spec: &EmbeddingRolloutSpec) -> Duration {
    parse_duration(&spec.analysis.interval).unwrap_or(Duration::from_secs(30))
}

/// The range analysis queries look back over: everything since the current step began (so a
/// quiet service accumulates evidence instead of judging each interval alone), at least one
/// interval, in whole seconds rounded down. Rounding up reached back before the step: into
/// the vector check's batches to the canary, just before its first weight, which at 1% could
/// be most of the canary's requests in the window and failed it on their latency.
pub fn evidence_window(
    status: &EmbeddingRolloutStatus,
    interval: Duration,
    now: Timestamp,
) -> Duration {
    let since_step = at(&status.step_started_at)
        .and_then(|started| Duration::try_from(now.duration_since(started)).ok())
        .unwrap_or(Duration::ZERO);
    // Whole seconds: a range of `37.25s` is valid PromQL but reads badly in status.
    Duration::from_secs(since_step.as_secs()).max(interval)
}

pub(crate) fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

pub(crate) fn at(time: &Option<Time>) -> Option<Timestamp> {
    time.as_ref().map(|t| t.0)
}

/// Whether this reconcile should run an analysis: a canary of the desired revision is Ready,
/// its step began at least one interval ago, and the last run is an interval old. A step at
/// 0% (a pause before the first weight) has no canary requests to judge: a run could only
/// be inconclusive, which would hold the pause past its duration or, with `onInconclusive:
/// Fail`, roll back a revision nobody has used. A re-index hold is not a step: its analysis
/// judges the indexer's requests.
pub fn analysis_due(input: &Input<'_>) -> bool {
    let st = input.status;
    if st.canary_weight == 0 && st.current_step_index.is_some() {
        return false;
    }
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

/// The next plan. `checked` is the outcome of the check a previous plan for this same input
/// asked for ([`Plan::check`]).
pub fn plan(
    input: &Input<'_>,
    analysis: Option<&AnalysisOutcome>,
    checked: &[(CheckRequest, Outcome)],
) -> Plan {
    let mut planner = Planner {
        input,
        st: input.status.clone(),
        events: Vec::new(),
        wake: Vec::new(),
        rollback: None,
        deferred: Commands::default(),
        check: None,
        steps: steps(input.spec),
        interval: interval(input.spec),
    };
    planner.run(analysis, checked);
    planner.finish()
}

struct Planner<'a, 'b> {
    input: &'a Input<'b>,
    st: EmbeddingRolloutStatus,
    events: Vec<Transition>,
    /// Future times to look again; a time already past is never a reason to wake.
    wake: Vec<Timestamp>,
    rollback: Option<&'static str>,
    deferred: Commands,
    check: Option<CheckRequest>,
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

    /// Looks again at `time` if it is still ahead; a past time would only spin the loop.
    fn wake_at(&mut self, time: Timestamp) {
        if time > self.input.now {
            self.wake.push(time);
        }
    }

    fn run(&mut self, analysis: Option<&AnalysisOutcome>, checked: &[(CheckRequest, Outcome)]) {
        let now = self.input.now;
        let desired = self.input.desired_revision.to_owned();
        self.st.observed_generation = self.input.generation;
        self.report_route();

        if let Some(scale_down) = &self.st.scale_down {
            if now >= scale_down.at.0 {
                let color = scale_down.color;
                self.st.scale_down = None;
                self.event("ScaledDown", format!("idle color {color} scaled to 0"));
            } else {
                let at = scale_down.at.0;
                self.wake_at(at);
            }
        }

        if self.st.stable_color.is_none() && !self.recover_from_live() {
            self.first_install(&desired);
        }
        let stable = self.st.stable_color.unwrap_or(Color::Blue);
        let stable_revision = self.st.stable_revision.clone().unwrap_or_default();

        if desired == stable_revision {
            self.settle_on_stable(stable, &stable_revision);
            return;
        }

        if self.st.failed_revision.as_deref() == Some(desired.as_str()) {
            if !self.input.commands.retry {
                self.hold_failed(stable, &desired);
                return;
            }
            self.st.failed_revision = None;
            // A retry checks the vectors again, under the limits the spec has now (a team
            // accepting int8's accuracy lowers minCosine, then retries).
            if self
                .st
                .compatibility
                .as_ref()
                .is_some_and(|c| c.revision == desired)
            {
                self.st.compatibility = None;
            }
            self.event("Retried", format!("retrying revision {desired}"));
        }

        // A promote or a promote --full annotated for the canary a new revision supersedes
        // was meant for that one: it is dropped, not carried over to skip the new one's
        // first analysis. One given with a new revision while none was in flight is kept.
        let superseding = self.st.canary_revision.is_some()
            && self.st.canary_revision.as_deref() != Some(desired.as_str());
        if self.st.canary_revision.as_deref() != Some(desired.as_str()) {
            self.start_rollout(stable, &stable_revision, &desired);
        }
        self.check_steps_unchanged();
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
            // A promote cannot act on a canary short of Ready (a pod restarting, a scale-up):
            // it waits for it instead of being dropped.
            if !superseding {
                self.defer_promotes();
            }
            self.wait_for_canary(canary, &canary_state);
            return;
        }
        if self.st.canary_ready_at.is_none() {
            self.st.canary_ready_at = Some(Time(self.input.now));
        }
        self.st.canary_unavailable_since = None;

        if self.st.current_step_index.is_none()
            && self.vectors_gate(CompatibilityStage::BeforeTraffic, checked, analysis)
                == compatibility::Gate::Closed
        {
            // A check asked for or inconclusive is a wait, like a canary short of Ready; a
            // model change held (Block) or a broken contract drops the promote instead, so
            // that a later `onIncompatible: Reindex` does not cut over at once on a stale one.
            if self.rollback.is_none() && self.vectors_check_pending() && !superseding {
                self.defer_promotes();
            }
            return;
        }
        if self.input.commands.promote_full {
            if self.vectors_gate(CompatibilityStage::BeforePromotion, checked, None)
                == compatibility::Gate::Closed
            {
                self.deferred.promote_full = self.rollback.is_none();
                return;
            }
            if self.canary_fleet_ready() {
                self.promote("promoted in full by the embedroll.dev/promote-full annotation");
            }
            return;
        }
        if self.st.current_step_index.is_none() {
            if let Some(why) = self.input.route.held() {
                // No traffic moves onto a route the Gateway has not accepted; a promote waits.
                self.st.message = Some(format!("holding 0%: {why}"));
                self.defer_promotes();
                return;
            }
            self.enter_step(0);
        }
        if let Some(outcome) = analysis {
            self.record_analysis(outcome);
            if self.rollback.is_some() {
                return;
            }
        }
        if let Some(why) = self.input.route.held() {
            // The weights the route carries are not what the Gateway serves: nothing here
            // counts as traffic moved. Its status change wakes this rollout.
            let weight = self.st.canary_weight;
            self.st.message = Some(format!("holding {weight}%: {why}"));
            self.defer_promotes();
            return;
        }
        self.advance(checked);
    }

    /// Keeps this reconcile's promote commands for the next: they could not act yet.
    fn defer_promotes(&mut self) {
        self.deferred.promote |= self.input.commands.promote;
        self.deferred.promote_full |= self.input.commands.promote_full;
    }

    /// Condition `TrafficRouted` (Gateway API): True once accepted, Unknown while no Gateway
    /// reports on the route, False with the Gateway's reason when one refuses it; an Event
    /// when a refusal starts or ends. A route just rewritten keeps the condition it had.
    fn report_route(&mut self) {
        if self.input.spec.traffic.gateway_api.is_none() {
            // Switched to nginx: the route it described is gone.
            self.st
                .conditions
                .retain(|c| c.type_ != conditions::TRAFFIC_ROUTED);
            return;
        }
        let previous = conditions::get(&self.st.conditions, "TrafficRouted")
            .map(|c| (c.status.clone(), c.message.clone()));
        let was = |status: &str| previous.as_ref().is_some_and(|(s, _)| s == status);
        match self.input.route {
            RouteState::Routed => {
                if was("False") {
                    self.event("RouteAccepted", "the Gateway accepted the HTTPRoute");
                }
                self.condition(
                    "TrafficRouted",
                    Status::True,
                    "RouteAccepted",
                    "every parent Gateway accepted the HTTPRoute and resolved its backends",
                );
            }
            RouteState::Pending(_) => {}
            RouteState::Unreported(why) => {
                self.condition(
                    "TrafficRouted",
                    Status::Unknown,
                    "RouteNotReported",
                    why.clone(),
                );
            }
            RouteState::Refused(why) => {
                if previous.as_ref().map(|(s, m)| (s.as_str(), m.as_str()))
                    != Some(("False", why.as_str()))
                {
                    self.warn("RouteNotAccepted", why.clone());
                }
                self.condition(
                    "TrafficRouted",
                    Status::False,
                    "RouteNotAccepted",
                    why.clone(),
                );
            }
        }
    }

    fn deadline(&self) -> Timestamp {
        let started = at(&self.st.rollout_started_at).unwrap_or(self.input.now);
        plus(
            started,
            Duration::from_secs(self.input.spec.strategy.progress_deadline_seconds.max(0) as u64),
        )
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
        scale::publish_scale(&mut self.st, input);
        if let Some(scale_down) = &self.st.scale_down {
            let at = scale_down.at.0;
            self.wake_at(at);
        }

        let deploy = if Some(input.desired_revision) == self.st.stable_revision.as_deref() {
            self.st.stable_color
        } else if Some(input.desired_revision) == self.st.canary_revision.as_deref() {
            self.st.canary_color
        } else {
            None
        };
        let now = input.now;
        let requeue = self
            .wake
            .iter()
            .filter(|t| **t > now)
            .min()
            .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO))
            .map(|d| d.clamp(Duration::from_millis(200), Duration::from_secs(300)));
        let (blue_replicas, green_replicas) = (
            replicas_for(Color::Blue, &self.st, input),
            replicas_for(Color::Green, &self.st, input),
        );
        Plan {
            blue_replicas,
            green_replicas,
            status: self.st,
            events: self.events,
            requeue,
            deploy,
            rollback: self.rollback,
            deferred: self.deferred,
            check: self.check,
        }
    }
}
