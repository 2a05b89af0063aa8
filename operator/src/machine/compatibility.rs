//! The vector-compatibility gate: before a revision takes its first weight, and again before
//! it is promoted, its vectors must agree with stable's. A model change is incompatible by
//! definition and becomes a re-index cut-over (or is held, by default).
//!
//! The check itself is I/O ([`crate::compatibility::run`]): when the gate has no result for
//! the revision and stage at hand, the plan asks for one ([`super::Plan::check`]) and holds;
//! the controller runs it and plans again with its outcome.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{Planner, at, plus};
use crate::analysis::AnalysisOutcome;
use crate::compatibility::{Comparison, Outcome};
use crate::conditions::{self, Status};
use crate::crd::{
    Color, CompatibilityResult, CompatibilityStage, CompatibilityStatus, OnIncompatible, Phase,
};

/// A check the plan needs before it can go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    pub stage: CompatibilityStage,
    pub revision: String,
    pub canary: Color,
    /// The color to compare with and the revision its pods run; `None` for a model change
    /// (nothing comparable: only the canary's contract with `spec.model` is checked).
    pub stable: Option<(Color, String)>,
}

/// What the gate lets the rollout do now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gate {
    /// Go on (to the first weight, or to promotion).
    Open,
    /// Held (a check in flight, inconclusive, a model change under Block, a broken
    /// contract), re-index in progress, or rolled back: the plan is complete as it is.
    Closed,
}

fn stage_words(stage: CompatibilityStage) -> &'static str {
    match stage {
        CompatibilityStage::BeforeTraffic => "before traffic",
        CompatibilityStage::BeforePromotion => "before promotion",
    }
}

fn format_cosine(value: f64) -> String {
    format!("{value:.5}")
}

/// `min cosine 0.91234 (text 17), mean 0.95, top-10 agreement 0.64 over 50 texts`.
fn describe(c: &Comparison) -> String {
    format!(
        "min cosine {} (text {}), mean {}, top-{} agreement {:.2} over {} texts",
        format_cosine(c.min_cosine),
        c.worst_text,
        format_cosine(c.mean_cosine),
        c.k,
        c.top_k_agreement,
        c.texts
    )
}

impl Planner<'_, '_> {
    /// The stable color's model when the desired spec names another one (by name, or by
    /// dimensions where both are known), as `name (dims)` for messages.
    pub(super) fn model_change(&self) -> Option<(String, String)> {
        let stable = self.st.stable_color?;
        let serving = self.input.color(stable);
        let was = serving.model.as_deref()?;
        let wanted = self.input.spec.model.as_ref();
        let name = wanted.map_or("", |m| m.name.as_str());
        let dimensions = wanted.and_then(|m| m.dimensions);
        let changed =
            was != name || matches!((serving.dimensions, dimensions), (Some(a), Some(b)) if a != b);
        let show = |name: &str, dims: Option<i32>| match dims {
            Some(d) => format!("{name} ({d} dimensions)"),
            None => name.to_owned(),
        };
        changed.then(|| (show(was, serving.dimensions), show(name, dimensions)))
    }

    /// Whether the gate before traffic waits on a check: one asked for by this plan, or an
    /// inconclusive one to be tried again.
    pub(super) fn vectors_check_pending(&self) -> bool {
        self.check.is_some()
            || self.st.compatibility.as_ref().is_some_and(|c| {
                Some(c.revision.as_str()) == self.st.canary_revision.as_deref()
                    && c.stage == CompatibilityStage::BeforeTraffic
                    && c.result == CompatibilityResult::Inconclusive
            })
    }

    /// The recorded result for `stage` of the revision in flight, unless it is an
    /// inconclusive one due for another try.
    fn recorded(&mut self, stage: CompatibilityStage) -> Option<CompatibilityStatus> {
        let revision = self.st.canary_revision.as_deref()?;
        let recorded = self
            .st
            .compatibility
            .as_ref()
            .filter(|c| c.revision == revision && c.stage == stage)?
            .clone();
        if recorded.result == CompatibilityResult::Inconclusive {
            let retry = plus(
                at(&recorded.checked_at).unwrap_or(self.input.now),
                self.interval,
            );
            if self.input.now >= retry {
                return None;
            }
            self.wake_at(retry);
        }
        Some(recorded)
    }

    /// The gate at `stage`: acts on the outcome of a check run for this plan, or on the
    /// result recorded for the revision, or asks for a check.
    pub(super) fn vectors_gate(
        &mut self,
        stage: CompatibilityStage,
        checked: &[(CheckRequest, Outcome)],
        analysis: Option<&AnalysisOutcome>,
    ) -> Gate {
        let spec = &self.input.spec.compatibility;
        if !spec.enabled {
            return Gate::Open;
        }
        let (Some(canary), Some(revision)) =
            (self.st.canary_color, self.st.canary_revision.clone())
        else {
            return Gate::Open;
        };
        let model_change = self.model_change();
        if stage == CompatibilityStage::BeforePromotion && model_change.is_some() {
            // A model change was checked against its contract before it got any traffic;
            // there is nothing to compare it with.
            return Gate::Open;
        }
        let request = CheckRequest {
            stage,
            revision: revision.clone(),
            canary,
            stable: if model_change.is_some() {
                None
            } else {
                self.st.stable_color.zip(self.st.stable_revision.clone())
            },
        };
        let result = match checked.iter().find(|(asked, _)| *asked == request) {
            Some((_, outcome)) => self.record_check(&request, outcome, model_change.as_ref()),
            None => match self.recorded(stage) {
                Some(recorded) => recorded,
                None => {
                    self.check = Some(request);
                    self.st.message = Some(format!(
                        "holding {}%: checking the canary's vectors against stable's",
                        self.st.canary_weight
                    ));
                    return Gate::Closed;
                }
            },
        };
        match result.result {
            CompatibilityResult::Compatible => Gate::Open,
            CompatibilityResult::Inconclusive => {
                // Holding at 0% is safe, but not forever: a canary that cannot be checked
                // within the progress deadline (its pods failing the check's requests, say)
                // is rolled back like one that never got Ready. Counted from when it got
                // Ready: one Ready just before the rollout's deadline gets as long again for
                // its check, not what is left.
                let ready_at = at(&self.st.canary_ready_at).unwrap_or(self.input.now);
                let deadline = plus(
                    ready_at,
                    Duration::from_secs(
                        self.input.spec.strategy.progress_deadline_seconds.max(0) as u64
                    ),
                );
                if stage == CompatibilityStage::BeforeTraffic && self.input.now > deadline {
                    self.roll_back(
                        "VectorCheckInconclusive",
                        format!(
                            "no conclusive vector check within progressDeadlineSeconds {}: {}",
                            self.input.spec.strategy.progress_deadline_seconds, result.message
                        ),
                    );
                    return Gate::Closed;
                }
                self.wake_at(deadline);
                self.st.message = Some(format!(
                    "holding {}%: vector check inconclusive, retried every {}s: {}",
                    self.st.canary_weight,
                    self.interval.as_secs(),
                    result.message
                ));
                Gate::Closed
            }
            CompatibilityResult::ContractBroken => {
                self.st.phase = Some(Phase::Paused);
                self.st.message = Some(format!(
                    "holding {}%: {} (fix the template or spec.model; a new revision is checked again)",
                    self.st.canary_weight, result.message
                ));
                Gate::Closed
            }
            CompatibilityResult::Incompatible
                if spec.on_incompatible == OnIncompatible::Block
                    || stage == CompatibilityStage::BeforePromotion =>
            {
                self.roll_back(
                    "VectorMismatch",
                    format!("vectors differ from stable: {}", result.message),
                );
                Gate::Closed
            }
            CompatibilityResult::ModelChanged if spec.on_incompatible == OnIncompatible::Block => {
                let (was, wanted) = model_change.unwrap_or_default();
                self.st.phase = Some(Phase::Paused);
                self.st.message = Some(format!(
                    "holding 0%: the model changes from {was} to {wanted}; set spec.compatibility.onIncompatible: Reindex to re-index and cut over"
                ));
                Gate::Closed
            }
            CompatibilityResult::Incompatible | CompatibilityResult::ModelChanged => {
                self.await_reindex(analysis);
                Gate::Closed
            }
        }
    }

    /// Records a check's outcome in status, the `VectorsCompatible` condition, an Event and
    /// the result it amounts to.
    fn record_check(
        &mut self,
        request: &CheckRequest,
        outcome: &Outcome,
        model_change: Option<&(String, String)>,
    ) -> CompatibilityStatus {
        let spec = &self.input.spec.compatibility;
        let mut status = CompatibilityStatus {
            revision: request.revision.clone(),
            stage: request.stage,
            result: CompatibilityResult::Inconclusive,
            min_cosine: None,
            mean_cosine: None,
            worst_text: None,
            top_k_agreement: None,
            top_k: None,
            texts: None,
            dimensions: None,
            checked_at: Some(Time(self.input.now)),
            message: String::new(),
        };
        let previous = self.st.compatibility.clone();
        match outcome {
            Outcome::Compared {
                comparison: c,
                dimensions,
            } => {
                status.min_cosine = Some(format_cosine(c.min_cosine));
                status.mean_cosine = Some(format_cosine(c.mean_cosine));
                status.worst_text = Some(c.worst_text as i32);
                status.top_k_agreement = Some(format!("{:.3}", c.top_k_agreement));
                status.top_k = Some(c.k as i32);
                status.texts = Some(c.texts as i32);
                status.dimensions = Some(*dimensions as i32);
                let compatible = c.min_cosine >= spec.min_cosine
                    && c.top_k_agreement >= spec.min_top_k_agreement;
                status.message = describe(c);
                if compatible {
                    status.result = CompatibilityResult::Compatible;
                    self.event(
                        "VectorsCompatible",
                        format!(
                            "revision {} ({}): {}",
                            request.revision,
                            stage_words(request.stage),
                            status.message
                        ),
                    );
                    self.condition(
                        conditions::VECTORS_COMPATIBLE,
                        Status::True,
                        "VectorsCompatible",
                        status.message.clone(),
                    );
                } else {
                    status.result = CompatibilityResult::Incompatible;
                    status.message = format!(
                        "{} (limits: min cosine {}, top-{} agreement {})",
                        status.message, spec.min_cosine, c.k, spec.min_top_k_agreement
                    );
                    self.warn(
                        "VectorMismatch",
                        format!(
                            "revision {}: vectors differ from stable: {}",
                            request.revision, status.message
                        ),
                    );
                    self.condition(
                        conditions::VECTORS_COMPATIBLE,
                        Status::False,
                        "VectorMismatch",
                        format!("vectors differ from stable: {}", status.message),
                    );
                }
            }
            Outcome::ContractKept { dimensions } => {
                status.dimensions = Some(*dimensions as i32);
                let (was, wanted) = model_change.cloned().unwrap_or_default();
                status.result = CompatibilityResult::ModelChanged;
                status.message = format!(
                    "the model changes from {was} to {wanted}: its vectors cannot share an index with stable's"
                );
                let what = match spec.on_incompatible {
                    OnIncompatible::Block => {
                        "held; set spec.compatibility.onIncompatible: Reindex to re-index and cut over"
                    }
                    OnIncompatible::Reindex => "served on the re-index route until promoted",
                };
                self.warn(
                    "ModelChanged",
                    format!("revision {}: {}; {what}", request.revision, status.message),
                );
                self.condition(
                    conditions::VECTORS_COMPATIBLE,
                    Status::False,
                    "ModelChanged",
                    format!("{}; {what}", status.message),
                );
            }
            Outcome::ContractBroken { reason, message } => {
                status.result = CompatibilityResult::ContractBroken;
                status.message = message.clone();
                self.warn(reason, format!("revision {}: {message}", request.revision));
                self.condition(
                    conditions::VECTORS_COMPATIBLE,
                    Status::False,
                    reason,
                    message.clone(),
                );
            }
            Outcome::Inconclusive(why) => {
                status.message = why.clone();
                let again = previous.as_ref().is_some_and(|p| {
                    p.revision == request.revision
                        && p.result == CompatibilityResult::Inconclusive
                        && p.message == *why
                });
                if !again {
                    self.warn(
                        "VectorCheckInconclusive",
                        format!("revision {}: {why}", request.revision),
                    );
                }
                self.condition(
                    conditions::VECTORS_COMPATIBLE,
                    Status::Unknown,
                    "CheckInconclusive",
                    why.clone(),
                );
                self.wake_at(plus(self.input.now, self.interval));
            }
        }
        self.st.compatibility = Some(status.clone());
        status
    }

    /// The incompatible revision (another model, or vectors a team chose to re-index for) is
    /// served at 0% on the re-index route (the canary header) while the corpus is
    /// re-embedded through it. Its analysis runs on that traffic; a promote switches 100% at
    /// once, never through a weight.
    fn await_reindex(&mut self, analysis: Option<&AnalysisOutcome>) {
        if let Some(outcome) = analysis {
            self.record_analysis(outcome);
            if self.rollback.is_some() {
                return;
            }
        }
        if self.st.step_started_at.is_none() {
            // Analysis windows start here: the traffic the indexer sends from now on.
            self.st.step_started_at = Some(Time(self.input.now));
        }
        // A cut-over is promoted only once the rollout is seen awaiting it: a promote kept
        // from before (given to pass a step while the check was pending) would otherwise
        // switch 100% to vectors the index does not hold yet. It is dropped instead.
        let awaiting = self.input.status.phase == Some(Phase::AwaitingReindex);
        let mut scaling = None;
        if awaiting && (self.input.commands.promote || self.input.commands.promote_full) {
            if self.canary_fleet_ready() {
                self.promote("re-index cut-over: 100% at once");
                return;
            }
            scaling = self.st.message.clone();
        }
        let canary = self
            .st
            .canary_color
            .map(|c| c.to_string())
            .unwrap_or_default();
        let route = match &self.input.spec.traffic.canary_header {
            Some(header) => format!("requests with header {}: {}", header.name, header.value),
            None => "no route (set traffic.canaryHeader)".to_owned(),
        };
        self.st.phase = Some(Phase::AwaitingReindex);
        self.st.message = Some(format!(
            "awaiting re-index: the new model serves only {route} (in the cluster, Service {}-{canary}); promote when the index is rebuilt",
            self.input.name
        ));
        self.condition(
            conditions::PROGRESSING,
            Status::True,
            "AwaitingReindex",
            "the new model is served at 0% on the re-index route until promoted",
        );
        if scaling.is_some() {
            self.st.message = scaling;
        }
        self.wake_for_analysis();
    }
}
