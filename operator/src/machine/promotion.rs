//! Promotion: the canary becomes stable; the old stable color stays up for
//! `scaleDownDelaySeconds` so traffic can go back to it at once.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Planner, plus};
use crate::conditions::{self, Status};
use crate::crd::{CanaryScale, Phase, ScaleDown};

impl Planner<'_, '_> {
    /// A promote that moves 100% at once (`promote --full`, a re-index cut-over) first brings
    /// a `Proportional` canary to a whole fleet: it may run one pod at 1%, or while the index
    /// is rebuilt, and would otherwise take all the traffic on it. While it scales
    /// ([`super::scale::replicas_for`] sizes it for the promote asked for), the promote waits.
    pub(super) fn canary_fleet_ready(&mut self) -> bool {
        let spec = self.input.spec;
        let Some(canary) = self.st.canary_color else {
            return true;
        };
        if spec.strategy.canary_scale == CanaryScale::Full {
            return true;
        }
        let revision = self.st.canary_revision.clone().unwrap_or_default();
        let state = self.input.color(canary);
        if state.ready_at(&revision) && state.desired_replicas >= spec.replicas {
            return true;
        }
        self.st.message = Some(format!(
            "promoting in full: canary {canary} scales to {} pods first ({} Ready)",
            spec.replicas, state.ready_replicas
        ));
        self.defer_promotes();
        false
    }

    pub(super) fn promote(&mut self, why: &str) {
        let Some(canary) = self.st.canary_color else {
            return;
        };
        let revision = self.st.canary_revision.clone().unwrap_or_default();
        let old = self.st.stable_color.unwrap_or(canary.other());
        self.forget_rollout_in_flight();
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
}
