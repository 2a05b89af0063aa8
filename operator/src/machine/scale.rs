//! Replicas per color, and what the scale subresource publishes for `kubectl scale` and HPAs.
//!
//! `spec.replicas` is the size of one serving fleet: the pods that carry all of the traffic
//! when one color takes 100%. The stable color always runs that many, since a rollback sends
//! everything back to it at once. The canary runs as many with `canaryScale: Full` (the
//! default: promotion and rollback are pure traffic switches), or, with `Proportional`, pods in
//! proportion to the weight it is about to take (at least 1), which saves accelerators while
//! it carries a few percent.
//!
//! `status.selector` selects the pods of both colors and `status.replicas` counts the Ready
//! ones. An HPA averages its metric over every pod that serves the rollout's traffic, so its
//! recommendation (total load / target per pod) is again the size of one fleet: it does not
//! shrink the color taking most of the traffic because stable alone looks idle at a high
//! canary weight, and it does not double the fleet because two colors run.

use super::{Input, StepKind, steps};
use crate::crd::{CanaryScale, Color, EmbeddingRolloutSpec, EmbeddingRolloutStatus, Phase};
use crate::resources::LABEL_ROLLOUT;

/// Pods of the canary color.
pub fn canary_replicas(spec: &EmbeddingRolloutSpec, st: &EmbeddingRolloutStatus) -> i32 {
    match spec.strategy.canary_scale {
        CanaryScale::Full => spec.replicas,
        CanaryScale::Proportional => {
            let weight = upcoming_weight(spec, st).clamp(0, 100) as u64;
            let pods = (spec.replicas.max(1) as u64 * weight).div_ceil(100);
            pods.clamp(1, spec.replicas.max(1) as u64) as i32
        }
    }
}

/// The weight the canary holds or takes next: pods are added one step ahead, so the weight
/// moves only once they are Ready (the step machine waits for a whole canary).
fn upcoming_weight(spec: &EmbeddingRolloutSpec, st: &EmbeddingRolloutStatus) -> i32 {
    let steps = steps(spec);
    let next = st.current_step_index.map_or(0, |i| i.max(0) as usize + 1);
    steps
        .get(next.min(steps.len())..)
        .unwrap_or_default()
        .iter()
        .find_map(|s| match s {
            StepKind::Weight(w) => Some(*w),
            StepKind::Pause(_) => None,
        })
        .unwrap_or(100)
        .max(st.canary_weight)
}

/// A promote is asked for that moves 100% at once: the canary needs a whole fleet first.
fn full_promotion_asked(input: &Input<'_>) -> bool {
    input.commands.promote_full
        || (input.commands.promote && input.status.phase == Some(Phase::AwaitingReindex))
}

/// Pods `color` should run under the planned status.
pub fn replicas_for(color: Color, st: &EmbeddingRolloutStatus, input: &Input<'_>) -> i32 {
    let spec = input.spec;
    if st.stable_color == Some(color) {
        return spec.replicas;
    }
    if st.canary_color == Some(color) {
        if full_promotion_asked(input) {
            return spec.replicas;
        }
        return canary_replicas(spec, st);
    }
    let winding_down = st
        .scale_down
        .as_ref()
        .is_some_and(|s| s.color == color && input.now < s.at.0);
    if winding_down {
        // Keep what it runs (a rolled-back proportional canary is not scaled up), never
        // more than a fleet.
        return input.color(color).desired_replicas.clamp(0, spec.replicas);
    }
    0
}

/// The scale subresource: every pod of the rollout, and how many are Ready.
pub(super) fn publish_scale(st: &mut EmbeddingRolloutStatus, input: &Input<'_>) {
    st.replicas = input.blue.ready_replicas + input.green.ready_replicas;
    st.selector = Some(format!("{LABEL_ROLLOUT}={}", input.name));
}
