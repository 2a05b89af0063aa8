//! metav1.Condition bookkeeping: a transition time changes only when the status does, so an
//! unchanged condition never rewrites status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const ANALYSIS: &str = "Analysis";
pub const ROLLED_BACK: &str = "RolledBack";
pub const WEIGHT_VERIFIED: &str = "WeightVerified";
pub const VECTORS_COMPATIBLE: &str = "VectorsCompatible";
pub const TRAFFIC_ROUTED: &str = "TrafficRouted";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let message = message.into();
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != status.as_str() {
            existing.last_transition_time = Time(now);
        }
        existing.status = status.as_str().to_owned();
        existing.reason = reason.to_owned();
        existing.message = message;
        existing.observed_generation = generation;
        return;
    }
    conditions.push(Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    });
}

pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            ANALYSIS,
            Status::True,
            "Passed",
            "ok",
            Some(1),
            t0,
        );
        set(
            &mut conditions,
            ANALYSIS,
            Status::True,
            "Passed",
            "still ok",
            Some(2),
            t1,
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(t0));
        assert_eq!(conditions[0].message, "still ok");
        set(
            &mut conditions,
            ANALYSIS,
            Status::False,
            "Failed",
            "bad",
            Some(2),
            t1,
        );
        assert_eq!(conditions[0].last_transition_time, Time(t1));
    }
}
