//! Walking the steps: starting a rollout, waiting for the canary, setting weights, pauses,
//! and what happens when the steps are edited under a running rollout.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::compatibility::{CheckRequest, Gate};
use super::{Planner, at, plus};
use crate::compatibility::Outcome;
use crate::conditions::{self, Status};
use crate::crd::{
    CheckResult, Color, CompatibilityStage, EmbeddingRolloutSpec, OnInconclusive, Phase,
    parse_duration,
};
use crate::resources::ColorState;

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

/// A short hash of the effective steps (as Argo Rollouts keeps `currentStepHash`): when it
/// changes under a running rollout, the steps start over instead of being skipped.
pub fn steps_hash(spec: &EmbeddingRolloutSpec) -> String {
    let text = format!("{:?}", steps(spec));
    format!(
        "{:08x}",
        crate::revision::fnv1a64(text.as_bytes()) & 0xffff_ffff
    )
}

impl Planner<'_, '_> {
    pub(super) fn start_rollout(&mut self, stable: Color, stable_revision: &str, desired: &str) {
        let canary = stable.other();
        let superseded = self.st.canary_revision.take();
        self.st.canary_color = Some(canary);
        self.st.canary_revision = Some(desired.to_owned());
        self.st.canary_weight = 0;
        self.st.current_step_index = None;
        self.st.step_started_at = None;
        self.st.rollout_started_at = Some(Time(self.input.now));
        self.st.canary_ready_at = None;
        self.st.canary_unavailable_since = None;
        self.st.steps_hash = Some(steps_hash(self.input.spec));
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

    /// The steps were edited under a running rollout: start them over from the first, at its
    /// weight, so no step and no analysis is skipped (shortening [10, pause, 50, 100] to
    /// [5, 100] at the pause must not promote).
    pub(super) fn check_steps_unchanged(&mut self) {
        let hash = steps_hash(self.input.spec);
        let changed = self.st.steps_hash.as_ref().is_some_and(|h| *h != hash);
        self.st.steps_hash = Some(hash);
        if changed && self.st.current_step_index.is_some() {
            let total = self.steps.len();
            self.st.current_step_index = None;
            self.st.step_started_at = None;
            self.warn(
                "StepsChanged",
                format!(
                    "strategy.steps changed under the running rollout; starting its {total} steps over from the first"
                ),
            );
        }
    }

    pub(super) fn wait_for_canary(&mut self, canary: Color, state: &ColorState) {
        let pods = format!(
            "{}/{} pods Ready",
            state.ready_replicas,
            state.desired_replicas.max(1)
        );
        if self.st.current_step_index.is_some() || self.st.canary_ready_at.is_some() {
            // Once Ready (mid-rollout, or held at 0% for a check or a re-index): a restarting
            // pod or an HPA's scale-up is fine while others serve. Analysis waits for the
            // canary to be whole again: its Deployment's next status change wakes this
            // rollout, so there is nothing to poll.
            if state.ready_replicas > 0 {
                self.st.canary_unavailable_since = None;
                self.st.message = Some(format!(
                    "canary {canary}: {pods}; analysis resumes when all are Ready"
                ));
                self.wake_for_analysis();
            } else {
                self.canary_unavailable(canary);
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
        self.wake_at(deadline);
    }

    /// A canary that was Ready has no Ready pod. Taking traffic, its share of requests is
    /// failing: rolled back at once. At 0% nobody is served by it, and under `Proportional` a
    /// single eviction takes its one pod: it gets progressDeadlineSeconds to have one again,
    /// so that hours of re-index or an awaited check are not thrown away for a rescheduling.
    fn canary_unavailable(&mut self, canary: Color) {
        let weight = self.st.canary_weight;
        if weight > 0 {
            self.st.canary_unavailable_since = None;
            self.roll_back(
                "CanaryUnavailable",
                format!("canary {canary} has no Ready pods while it takes {weight}% of requests"),
            );
            return;
        }
        let seconds = self.input.spec.strategy.progress_deadline_seconds.max(0);
        let since = match at(&self.st.canary_unavailable_since) {
            Some(since) => since,
            None => {
                // Whole seconds, as the status keeps it: the message must read the same on
                // the next reconcile, or each would write it again.
                let now =
                    Timestamp::from_second(self.input.now.as_second()).unwrap_or(self.input.now);
                self.warn(
                    "CanaryUnavailable",
                    format!(
                        "canary {canary} has no Ready pods; rolled back unless one is Ready within progressDeadlineSeconds ({seconds} s)"
                    ),
                );
                self.st.canary_unavailable_since = Some(Time(now));
                now
            }
        };
        let deadline = plus(since, Duration::from_secs(seconds as u64));
        if self.input.now > deadline {
            self.st.canary_unavailable_since = None;
            self.roll_back(
                "CanaryUnavailable",
                format!(
                    "canary {canary} had no Ready pods for progressDeadlineSeconds ({seconds} s)"
                ),
            );
            return;
        }
        self.st.message = Some(format!(
            "canary {canary} has had no Ready pods since {since}; rolled back at {deadline} (progressDeadlineSeconds) unless one is Ready again"
        ));
        self.wake_at(deadline);
    }

    pub(super) fn enter_step(&mut self, index: usize) {
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

    pub(super) fn advance(&mut self, checked: &[(CheckRequest, Outcome)]) {
        let now = self.input.now;
        let index = self.st.current_step_index.unwrap_or(0).max(0) as usize;
        let Some(step) = self.steps.get(index).copied() else {
            // Only a status from before steps hashes were kept can point past the steps:
            // start over rather than promote without analysis.
            self.enter_step(0);
            self.wake_for_analysis();
            return;
        };
        let started = at(&self.st.step_started_at).unwrap_or(now);
        let last = self.st.analysis.clone().unwrap_or_default();
        let passed_this_step = last.result == Some(CheckResult::Passed)
            && at(&last.last_run_at).is_some_and(|t| t >= plus(started, self.interval));
        let spec = &self.input.spec.analysis;
        let inconclusive_hold = last.result == Some(CheckResult::Inconclusive)
            && (spec.on_inconclusive == OnInconclusive::Pause || spec.max_inconclusive.is_some());
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
        if !advance {
            if inconclusive_hold {
                self.st.phase = Some(Phase::Paused);
                self.st.message = Some(format!(
                    "holding {weight}%: analysis {}",
                    self.inconclusive_summary(&last)
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
                    self.wake_at(plus(started, d));
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
        // Announced when the promote acts: one deferred for the vector check would otherwise
        // say so again on every reconcile it waits through.
        let promoted_step = |planner: &mut Self| {
            if promote {
                planner.event(
                    "PromotedStep",
                    format!("step {}/{total} promoted by annotation", index + 1),
                );
            }
        };
        if index + 1 >= total {
            if self.vectors_gate(CompatibilityStage::BeforePromotion, checked, None) == Gate::Open {
                promoted_step(self);
                self.promote("every step passed");
            } else if self.rollback.is_none() {
                // A promote waits for the vector check (asked for, or inconclusive and
                // retried) instead of being dropped.
                self.deferred.promote = promote;
            }
        } else {
            promoted_step(self);
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
}
