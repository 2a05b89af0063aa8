//! A rollout with nothing in flight: the first install, a lost status rebuilt from the live
//! routes, and the settled state where the spec is the stable revision.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Planner, StepKind, plus, steps_hash};
use crate::conditions::{self, Status};
use crate::crd::{Color, Phase, ScaleDown};

impl Planner<'_, '_> {
    pub(super) fn first_install(&mut self, desired: &str) {
        self.st.stable_color = Some(Color::Blue);
        self.st.stable_revision = Some(desired.to_owned());
        self.st.rollout_started_at = Some(Time(self.input.now));
        self.event(
            "Deploying",
            format!("first install: revision {desired} on blue"),
        );
    }

    /// Status is empty but the routes exist: the rollout was re-created (`kubectl delete
    /// --cascade=orphan` and apply, a backup restore, a GitOps replace). Rebuilds stable,
    /// canary, weight, step and the failed revision from what the operator wrote on the live
    /// objects, so nothing moves: the serving color keeps serving, a canary resumes at its
    /// weight, an aborted revision stays failed. Returns false when there is nothing live.
    pub(super) fn recover_from_live(&mut self) -> bool {
        let live = self.input.live;
        let Some(stable) = live.stable_color else {
            return false;
        };
        let stable_revision = self
            .input
            .color(stable)
            .revision
            .clone()
            // The Deployment is gone but its route is not: keep the color, redeploy the spec.
            .unwrap_or_else(|| self.input.desired_revision.to_owned());
        self.st.stable_color = Some(stable);
        self.st.stable_revision = Some(stable_revision.clone());
        self.st.failed_revision = live
            .failed_revision
            .clone()
            .filter(|failed| *failed != stable_revision);
        let mut found = format!("stable {stable} at {stable_revision}");

        let canary = stable.other();
        let canary_revision = live
            .canary_revision
            .clone()
            .filter(|r| live.canary_color == Some(canary) && *r != stable_revision)
            .filter(|r| self.st.failed_revision.as_ref() != Some(r))
            .filter(|r| self.input.color(canary).revision.as_ref() == Some(r));
        if let Some(revision) = canary_revision {
            let now = self.input.now;
            self.st.canary_color = Some(canary);
            self.st.canary_revision = Some(revision.clone());
            self.st.canary_weight = live.canary_weight.clamp(0, 100);
            self.st.rollout_started_at = Some(Time(now));
            self.st.steps_hash = Some(steps_hash(self.input.spec));
            self.st.current_step_index = self.recovered_step(live.step_index, live.canary_weight);
            if self.st.current_step_index.is_some() {
                self.st.step_started_at = Some(Time(now));
            }
            found.push_str(&format!(
                ", canary {canary} at {revision} with {}%",
                self.st.canary_weight
            ));
            if let Some(index) = self.st.current_step_index {
                found.push_str(&format!(" (step {})", index + 1));
            }
        } else if self.input.color(canary).desired_replicas > 0 {
            // The idle color still runs: give it the usual grace before scaling it down (the
            // shorter one when it runs the failed revision).
            let failed = self.st.failed_revision.is_some()
                && self.input.color(canary).revision == self.st.failed_revision;
            let delay = if failed {
                self.abort_scale_down_delay()
            } else {
                self.scale_down_delay()
            };
            self.st.scale_down = Some(ScaleDown {
                color: canary,
                at: Time(plus(self.input.now, delay)),
            });
        }
        if let Some(failed) = &self.st.failed_revision {
            found.push_str(&format!(", failed revision {failed} not retried"));
        }
        self.warn(
            "StatusRecovered",
            format!("status was empty; rebuilt from the live objects: {found}"),
        );
        true
    }

    /// The step a recovered canary is at: the one recorded on the route if it still holds that
    /// weight, else the last weight step not above the live weight. `None` at weight 0 (the
    /// canary had not taken traffic yet).
    fn recovered_step(&self, recorded: Option<i32>, weight: i32) -> Option<i32> {
        if weight <= 0 {
            return None;
        }
        if let Some(index) = recorded.filter(|i| *i >= 0)
            && let Some(step) = self.steps.get(index as usize)
        {
            let weight_at = self.steps[..=index as usize]
                .iter()
                .rev()
                .find_map(|s| match s {
                    StepKind::Weight(w) => Some(*w),
                    StepKind::Pause(_) => None,
                });
            if matches!(step, StepKind::Weight(w) if *w == weight) || weight_at == Some(weight) {
                return Some(index);
            }
        }
        self.steps
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| matches!(s, StepKind::Weight(w) if *w <= weight))
            .map(|(i, _)| i as i32)
            .or(Some(0))
    }

    /// The spec is the stable revision: nothing in flight (a canary, if any, is cancelled).
    pub(super) fn settle_on_stable(&mut self, stable: Color, stable_revision: &str) {
        let now = self.input.now;
        if self.st.canary_revision.is_some() {
            let canary = self.st.canary_revision.clone().unwrap_or_default();
            self.clear_canary(self.scale_down_delay());
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
                self.wake_at(deadline);
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
}
