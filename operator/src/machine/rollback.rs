//! Rolling back: traffic to stable at once, the revision marked failed until a retry or a
//! new spec, and the canary kept up for `abortScaleDownDelaySeconds` for a look at its pods.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Planner, plus};
use crate::conditions::{self, Status};
use crate::crd::{Color, Phase, ScaleDown};

impl Planner<'_, '_> {
    pub(super) fn scale_down_delay(&self) -> Duration {
        Duration::from_secs(self.input.spec.strategy.scale_down_delay_seconds.max(0) as u64)
    }

    pub(super) fn abort_scale_down_delay(&self) -> Duration {
        Duration::from_secs(
            self.input
                .spec
                .strategy
                .abort_scale_down_delay_seconds
                .max(0) as u64,
        )
    }

    /// Ends the canary; its color scales to 0 after `delay`.
    pub(super) fn clear_canary(&mut self, delay: Duration) {
        if let Some(canary) = self.st.canary_color.take() {
            self.st.scale_down = Some(ScaleDown {
                color: canary,
                at: Time(plus(self.input.now, delay)),
            });
        }
        self.forget_rollout_in_flight();
    }

    /// Nothing in flight any more: no canary revision, weight, step or deadline.
    pub(super) fn forget_rollout_in_flight(&mut self) {
        self.st.canary_color = None;
        self.st.canary_revision = None;
        self.st.canary_weight = 0;
        self.st.current_step_index = None;
        self.st.step_started_at = None;
        self.st.rollout_started_at = None;
        self.st.canary_ready_at = None;
        self.st.canary_unavailable_since = None;
        self.st.steps_hash = None;
    }

    /// The spec names a revision that failed: it waits for a retry. A canary of another
    /// revision still in flight (the spec went back to the failed one, say by a revert in
    /// Git) is cancelled: nothing would analyse it any more.
    pub(super) fn hold_failed(&mut self, stable: Color, desired: &str) {
        self.st.phase = Some(Phase::Failed);
        let Some(canary) = self.st.canary_revision.clone() else {
            return;
        };
        self.clear_canary(self.scale_down_delay());
        let text = format!(
            "spec is back at revision {desired}, which failed: canary {canary} cancelled; traffic on stable {stable}; annotate embedroll.dev/retry to try {desired} again"
        );
        self.warn("Cancelled", text.clone());
        self.st.message = Some(text.clone());
        self.condition(conditions::PROGRESSING, Status::False, "Cancelled", text);
    }

    pub(super) fn roll_back(&mut self, reason: &'static str, message: String) {
        let revision = self.st.canary_revision.clone().unwrap_or_default();
        let stable = self
            .st
            .stable_color
            .map(|c| c.to_string())
            .unwrap_or_default();
        self.clear_canary(self.abort_scale_down_delay());
        self.st.failed_revision = Some(revision.clone());
        self.st.phase = Some(Phase::Failed);
        let text = format!("rolled back {revision}: {message}; traffic on stable {stable}");
        self.st.message = Some(text.clone());
        self.warn("RolledBack", format!("{reason}: {text}"));
        self.condition(conditions::ROLLED_BACK, Status::True, reason, text.clone());
        self.condition(conditions::PROGRESSING, Status::False, reason, text);
        self.rollback = Some(reason);
    }
}
