//! Unit tests of the step machine: a small world stepped one reconcile at a time.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;
use crate::analysis::MetricOutcome;
use crate::compatibility::Comparison;
use crate::crd::{
    CheckResult, CompatibilityResult, EmbeddingRolloutSpec, OnIncompatible, OnInconclusive, Phase,
};

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
        model: None,
        dimensions: None,
    }
}

/// A vector comparison with every text's cosine at `min_cosine` and neighbourhoods kept.
fn compared(min_cosine: f64, top_k_agreement: f64) -> Outcome {
    Outcome::Compared {
        comparison: Comparison {
            min_cosine,
            mean_cosine: min_cosine,
            worst_text: 17,
            top_k_agreement,
            k: 10,
            texts: 50,
        },
        dimensions: 384,
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
    /// What the routes say: rewritten from each plan, as the controller applies it.
    live: LiveTraffic,
    commands: Commands,
    /// What the Gateway says about the route.
    route: RouteState,
    now: Timestamp,
    events: Vec<&'static str>,
    /// What a vector check finds (same model), and what a model change's contract check
    /// finds.
    vectors: Outcome,
    contract: Outcome,
    /// The checks the plans asked for.
    checks: Vec<CheckRequest>,
}

impl World {
    fn new() -> Self {
        World {
            spec: spec(),
            status: EmbeddingRolloutStatus::default(),
            blue: ColorState::default(),
            green: ColorState::default(),
            live: LiveTraffic::default(),
            commands: Commands::default(),
            route: RouteState::Routed,
            now: t(0),
            events: Vec::new(),
            vectors: compared(1.0, 1.0),
            contract: Outcome::ContractKept { dimensions: 384 },
            checks: Vec::new(),
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
            live: &self.live,
            route: &self.route,
            commands: self.commands,
            now: self.now,
        };
        let due = analysis_due(&input);
        let analysis = analysis.filter(|_| due).map(outcome);
        let mut next = plan(&input, analysis.as_ref(), &[]);
        let mut checked = Vec::new();
        while let Some(request) = next.check.clone() {
            assert!(checked.len() < 2, "at most two checks per reconcile");
            self.checks.push(request.clone());
            let found = match request.stable {
                Some(_) => self.vectors.clone(),
                None => self.contract.clone(),
            };
            checked.push((request, found));
            next = plan(&input, analysis.as_ref(), &checked);
        }
        let plan = next;
        // Through JSON, as the apiserver keeps it (times in whole seconds).
        self.status = serde_json::from_value(serde_json::to_value(&plan.status).unwrap()).unwrap();
        self.live = LiveTraffic::written_by(&plan.status);
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

    /// r1 stable on blue, r2 Ready on green at the first step.
    fn canary_at_first_step() -> Self {
        let mut w = World::installed();
        w.reconcile("r2", None);
        w.green = ready("r2");
        w.reconcile("r2", None);
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
    let mut w = World::canary_at_first_step();
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
    let rolled_back = conditions::get(&plan.status.conditions, conditions::ROLLED_BACK).unwrap();
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
    let mut w = World::canary_at_first_step();
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
    let mut w = World::canary_at_first_step();
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
        live: &w.live,
        route: &RouteState::Routed,
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
    let mut w = World::canary_at_first_step();
    w.commands.promote_full = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Green));
    assert_eq!(plan.status.canary_weight, 0);
    assert_eq!(plan.status.phase, Some(Phase::Healthy));
}

#[test]
fn reverting_the_spec_cancels_the_canary() {
    let mut w = World::canary_at_first_step();
    let plan = w.reconcile("r1", None);
    assert_eq!(plan.status.canary_revision, None);
    assert_eq!(plan.status.canary_weight, 0);
    assert_eq!(plan.status.phase, Some(Phase::Healthy));
    assert_eq!(plan.status.scale_down.as_ref().unwrap().color, Color::Green);
    assert!(w.events.contains(&"Cancelled"));
}

#[test]
fn a_restart_resumes_from_status_alone() {
    let mut w = World::canary_at_first_step();
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

/// A canary at 10% whose second pod went unready (a slow model load, an HPA scale-up).
fn held_partly_ready() -> World {
    let mut w = World::canary_at_first_step();
    w.tick(10);
    w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(w.status.canary_weight, 10);
    w.green.ready_replicas = 1;
    w.green.ready = false;
    w
}

#[test]
fn a_partly_ready_canary_waits_for_its_pods_instead_of_polling() {
    let mut w = held_partly_ready();
    // Long after the next analysis time was due, the canary is still short of Ready.
    for _ in 0..5 {
        w.tick(15);
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.canary_weight, 10, "held at its weight");
        assert_eq!(
            plan.requeue, None,
            "the next analysis time is past: the Deployment's next change wakes it, not a 200ms poll"
        );
        assert!(
            plan.status
                .message
                .as_deref()
                .unwrap()
                .contains("1/2 pods Ready")
        );
    }
    // Whole again: analysis resumes at once.
    w.green = ready("r2");
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.canary_weight, 50);
    assert!(plan.requeue.unwrap() >= Duration::from_secs(9));
}

#[test]
fn every_wake_is_in_the_future() {
    // Whatever state a rollout is in, a requeue is never sooner than the clamp because of a
    // time already past.
    let mut w = held_partly_ready();
    w.spec.strategy.steps = serde_json::from_value(serde_json::json!([
        {"setWeight": 10}, {"pause": {"duration": "5s"}}, {"setWeight": 100}
    ]))
    .unwrap();
    for _ in 0..10 {
        w.tick(7);
        let plan = w.reconcile("r2", None);
        if let Some(after) = plan.requeue {
            assert!(
                after >= Duration::from_secs(1),
                "{after:?} in {:?}",
                plan.status.message
            );
        }
    }
}

#[test]
fn lost_status_of_a_healthy_rollout_keeps_the_serving_color() {
    // r1 on blue, r2 promoted to green: green serves.
    let mut w = World::installed();
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.commands.promote_full = true;
    w.reconcile("r2", None);
    assert_eq!(w.status.stable_color, Some(Color::Green));
    // `kubectl delete --cascade=orphan` and apply: the same spec, an empty status.
    w.status = EmbeddingRolloutStatus::default();
    w.events.clear();
    let plan = w.reconcile("r2", None);
    assert_eq!(
        plan.status.stable_color,
        Some(Color::Green),
        "no flip to blue"
    );
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r2"));
    assert_eq!(plan.status.phase, Some(Phase::Healthy));
    assert_eq!(plan.deploy, Some(Color::Green));
    assert_eq!(
        plan.green_replicas, 2,
        "the serving color is not scaled down"
    );
    assert_eq!(w.events, ["StatusRecovered"]);
    assert_eq!(w.live.stable_color, Some(Color::Green));
}

#[test]
fn lost_status_mid_rollout_resumes_at_its_weight() {
    let mut w = World::canary_at_first_step();
    w.tick(10);
    w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(w.status.canary_weight, 10);
    w.status = EmbeddingRolloutStatus::default();
    w.events.clear();
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Blue));
    assert_eq!(plan.status.canary_color, Some(Color::Green));
    assert_eq!(
        plan.status.canary_weight, 10,
        "resumes at 10%, not 0 and not 100"
    );
    assert_eq!(plan.status.current_step_index, Some(1));
    assert_eq!((plan.blue_replicas, plan.green_replicas), (2, 2));
    // It goes on with analysis from there.
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.canary_weight, 50);
}

#[test]
fn lost_status_after_an_abort_keeps_the_revision_failed() {
    // Stable green at r2; r3 aborted on blue.
    let mut w = World::installed();
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.commands.promote_full = true;
    w.reconcile("r2", None);
    w.reconcile("r3", None);
    w.blue = ready("r3");
    w.reconcile("r3", None);
    w.commands.abort = true;
    w.reconcile("r3", None);
    assert_eq!(w.status.failed_revision.as_deref(), Some("r3"));
    w.status = EmbeddingRolloutStatus::default();
    let plan = w.reconcile("r3", None);
    assert_eq!(plan.status.stable_color, Some(Color::Green));
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r2"));
    assert_eq!(plan.status.failed_revision.as_deref(), Some("r3"));
    assert_eq!(plan.status.phase, Some(Phase::Failed));
    assert_eq!(
        plan.status.canary_weight, 0,
        "the aborted revision gets no traffic"
    );
    assert_eq!(plan.green_replicas, 2, "the good revision keeps running");
    assert_eq!(
        plan.deploy, None,
        "the aborted revision is not redeployed anywhere"
    );
}

#[test]
fn editing_the_steps_mid_rollout_starts_them_over_and_never_skips_analysis() {
    let mut w = World::installed();
    w.spec.strategy.steps = serde_json::from_value(serde_json::json!([
        {"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"setWeight": 100}
    ]))
    .unwrap();
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    w.tick(10);
    w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(w.status.current_step_index, Some(1), "at the pause");
    // Shortened to [5, 100] at the pause (index 1 is now the 100% step).
    w.spec.strategy.steps =
        serde_json::from_value(serde_json::json!([{"setWeight": 5}, {"setWeight": 100}])).unwrap();
    let plan = w.reconcile("r2", None);
    assert_eq!(
        plan.status.canary_revision.as_deref(),
        Some("r2"),
        "not promoted"
    );
    assert_eq!(plan.status.current_step_index, Some(0));
    assert_eq!(plan.status.canary_weight, 5);
    assert!(w.events.contains(&"StepsChanged"));
    // 100% comes only after a passing analysis at 5%, and promotion only after one at 100%.
    let mut weights = vec![5];
    for _ in 0..2 {
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        weights.push(plan.status.canary_weight);
    }
    assert_eq!(weights, [5, 100, 0]);
    assert_eq!(w.status.stable_revision.as_deref(), Some("r2"));
}

#[test]
fn an_aborted_canary_scales_down_after_its_own_delay() {
    let mut w = World::installed();
    w.spec.strategy.abort_scale_down_delay_seconds = 30;
    w.spec.strategy.scale_down_delay_seconds = 300;
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    w.commands.abort = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, Some("Aborted"));
    assert!(plan.requeue.unwrap() <= Duration::from_secs(30));
    w.tick(31);
    let plan = w.reconcile("r2", None);
    assert_eq!(
        plan.green_replicas, 0,
        "30s, not the 300s a promotion keeps the old color"
    );
}

#[test]
fn inconclusive_limit_hands_over_to_on_inconclusive() {
    let mut w = World::installed();
    w.spec.analysis.max_inconclusive = Some(3);
    w.spec.analysis.on_inconclusive = OnInconclusive::Fail;
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    for streak in 1..3 {
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Inconclusive));
        assert_eq!(plan.rollback, None, "held, not failed, below the limit");
        assert_eq!(plan.status.phase, Some(Phase::Paused));
        assert!(
            plan.status
                .message
                .as_deref()
                .unwrap()
                .contains(&format!("{streak}/3")),
            "{:?}",
            plan.status.message
        );
    }
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Inconclusive));
    assert_eq!(plan.rollback, Some("AnalysisInconclusive"));
    assert!(plan.status.message.unwrap().contains("maxInconclusive 3"));

    // With Pause, the limit is said once and the weight held, also past a timed pause.
    let mut w = World::installed();
    w.spec.analysis.max_inconclusive = Some(2);
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    for _ in 0..4 {
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Inconclusive));
        assert_eq!((plan.rollback, plan.status.canary_weight), (None, 1));
    }
    assert_eq!(
        w.events
            .iter()
            .filter(|e| **e == "InconclusiveLimit")
            .count(),
        1
    );
}

#[test]
fn replicas_follow_canary_scale() {
    let mut w = World::installed();
    w.spec.replicas = 10;
    w.blue.desired_replicas = 10;
    w.spec.strategy.canary_scale = crate::crd::CanaryScale::Proportional;
    let plan = w.reconcile("r2", None);
    // Before its first weight, the canary runs what 1% needs: at least one pod.
    assert_eq!((plan.blue_replicas, plan.green_replicas), (10, 1));
    w.green = ready("r2");
    w.green.desired_replicas = 1;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.canary_weight, 1);
    assert_eq!(
        plan.green_replicas, 1,
        "pods for the next step (10%) come ahead of its weight"
    );
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    // At 10% it provisions 50% ahead; the weight does not move to 50 before those are Ready.
    assert_eq!((plan.status.canary_weight, plan.green_replicas), (10, 5));
    w.green = ColorState {
        desired_replicas: 5,
        ready_replicas: 1,
        ready: false,
        ..w.green.clone()
    };
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.canary_weight, 10, "waits for the added pods");
    w.green = ColorState {
        ready_replicas: 5,
        ready: true,
        ..w.green.clone()
    };
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!((plan.status.canary_weight, plan.green_replicas), (50, 10));
    // Full (the default) runs a whole fleet on each color throughout.
    w.spec.strategy.canary_scale = crate::crd::CanaryScale::Full;
    let plan = w.reconcile("r2", None);
    assert_eq!((plan.blue_replicas, plan.green_replicas), (10, 10));
}

#[test]
fn a_full_promote_of_a_proportional_canary_waits_for_a_whole_fleet() {
    let mut w = World::installed();
    w.spec.replicas = 10;
    w.blue.desired_replicas = 10;
    w.spec.strategy.canary_scale = crate::crd::CanaryScale::Proportional;
    w.reconcile("r2", None);
    w.green = ColorState {
        desired_replicas: 1,
        ready_replicas: 1,
        ..ready("r2")
    };
    let plan = w.reconcile("r2", None);
    assert_eq!((plan.status.canary_weight, plan.green_replicas), (1, 1));
    // promote --full with one canary pod: it scales first, stable keeps the traffic.
    w.commands.promote_full = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Blue));
    assert_eq!(plan.green_replicas, 10, "a whole fleet before 100%");
    assert!(plan.deferred.promote_full, "the promote waits, not dropped");
    assert!(plan.status.message.unwrap().contains("scales to 10 pods"));
    w.green = ColorState {
        desired_replicas: 10,
        ready_replicas: 4,
        ready: false,
        ..w.green.clone()
    };
    w.commands.promote_full = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Blue));
    assert_eq!(plan.green_replicas, 10);
    assert!(plan.deferred.promote_full);
    w.green = ColorState {
        ready_replicas: 10,
        ready: true,
        ..w.green.clone()
    };
    w.commands.promote_full = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Green));
    assert_eq!(plan.green_replicas, 10);
}

#[test]
fn an_hpa_on_the_scale_subresource_sizes_one_fleet_through_a_rollout() {
    // The HPA's resource-metric rule: desired = ceil(sum of usage over the Ready pods the
    // selector matches / target per pod). With the selector on both colors, that is the
    // total load however the weight splits it, so spec.replicas stays one fleet.
    fn hpa(total_load: f64, target_per_pod: f64) -> i32 {
        (total_load / target_per_pod).ceil() as i32
    }
    let mut w = World::installed();
    w.spec.replicas = 4;
    w.reconcile("r2", None);
    w.green = ColorState {
        desired_replicas: 4,
        ready_replicas: 4,
        ..ready("r2")
    };
    w.blue = ColorState {
        desired_replicas: 4,
        ready_replicas: 4,
        ..ready("r1")
    };
    let plan = w.reconcile("r2", None);
    assert_eq!(
        plan.status.selector.as_deref(),
        Some("embedroll.dev/rollout=search")
    );
    assert_eq!(plan.status.replicas, 8, "Ready pods of both colors");
    // 400 units of load at 100 per pod is 4 pods, whether stable or canary takes it: an HPA
    // on the stable color alone would see 400 * (1 - w) and shrink the fleet at 90%.
    for weight in [1, 10, 50, 90] {
        let canary_load = 400.0 * f64::from(weight) / 100.0;
        let stable_load = 400.0 - canary_load;
        assert_eq!(hpa(stable_load + canary_load, 100.0), 4, "at {weight}%");
        if weight >= 50 {
            assert!(
                hpa(stable_load, 100.0) < 4,
                "a stable-only selector shrinks at {weight}%"
            );
        }
    }
    // `kubectl scale er --replicas 6` (or the HPA) resizes both colors under Full.
    w.spec.replicas = 6;
    let plan = w.reconcile("r2", None);
    assert_eq!((plan.blue_replicas, plan.green_replicas), (6, 6));
}

#[test]
fn evidence_accumulates_over_the_step() {
    let mut st = EmbeddingRolloutStatus::default();
    let interval = Duration::from_secs(3);
    assert_eq!(
        evidence_window(&st, interval, t(0)),
        interval,
        "no step: one interval"
    );
    st.step_started_at = Some(Time(t(0)));
    assert_eq!(evidence_window(&st, interval, t(2)), interval);
    assert_eq!(
        evidence_window(&st, interval, t(95)),
        Duration::from_secs(95)
    );
    // Never back past the step's start: the vector check's requests to the canary come just
    // before its first weight, and are not the canary's traffic.
    let half = t(95).checked_add(SignedDuration::from_millis(500)).unwrap();
    assert_eq!(
        evidence_window(&st, interval, half),
        Duration::from_secs(95)
    );
    let just_after = t(3).checked_add(SignedDuration::from_millis(120)).unwrap();
    assert_eq!(evidence_window(&st, interval, just_after), interval);
}

#[test]
fn a_promote_while_the_canary_is_short_of_ready_waits_for_it() {
    let mut w = World::installed();
    w.spec.strategy.steps = serde_json::from_value(serde_json::json!([
        {"setWeight": 10}, {"pause": {}}, {"setWeight": 100}
    ]))
    .unwrap();
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    w.tick(10);
    w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(w.status.current_step_index, Some(1), "at the pause");
    // `kubectl scale` is rolling the canary over when the promote comes.
    w.green.ready = false;
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.current_step_index, Some(1));
    assert!(plan.deferred.promote, "kept for when the canary is whole");
    w.green = ready("r2");
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert!(!plan.deferred.promote);
    assert_eq!(plan.status.canary_weight, 100);
}

#[test]
fn a_route_the_gateway_has_not_accepted_holds_the_weight_and_says_why() {
    let mut w = World::installed();
    w.spec.traffic = serde_json::from_value(serde_json::json!({
        "gatewayAPI": {"parentRefs": [{"name": "web"}]}
    }))
    .unwrap();
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.canary_weight, 1);

    // The Gateway refuses the route: passing analysis moves nothing.
    let why = "parent ml/web: Accepted is False (NoMatchingParent): no listener";
    w.route = RouteState::Refused(why.to_owned());
    for _ in 0..3 {
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        assert_eq!(plan.status.canary_weight, 1, "held while not accepted");
        assert!(plan.status.message.as_deref().unwrap().contains(why));
    }
    let routed = conditions::get(&w.status.conditions, "TrafficRouted").unwrap();
    assert_eq!(
        (routed.status.as_str(), routed.reason.as_str()),
        ("False", "RouteNotAccepted")
    );
    assert_eq!(
        w.events
            .iter()
            .filter(|e| **e == "RouteNotAccepted")
            .count(),
        1,
        "one Event when it happens, not one per reconcile"
    );

    // Rewritten and not yet reported on: held, the condition unchanged, no Event.
    w.route = RouteState::Pending("not reported on generation 3 yet".to_owned());
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.canary_weight, 1);
    assert_eq!(
        conditions::get(&w.status.conditions, "TrafficRouted")
            .unwrap()
            .status,
        "False"
    );

    // Accepted again: the steps go on.
    w.route = RouteState::Routed;
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.canary_weight, 10);
    let routed = conditions::get(&w.status.conditions, "TrafficRouted").unwrap();
    assert_eq!(routed.status, "True");
    assert!(w.events.contains(&"RouteAccepted"));

    // Switched to nginx: no route left to report on.
    w.spec.traffic = serde_json::from_value(serde_json::json!({
        "nginx": {"host": "search.example.com"}
    }))
    .unwrap();
    w.reconcile("r2", Some(CheckResult::Passed));
    assert!(conditions::get(&w.status.conditions, "TrafficRouted").is_none());
}

// ------------------------------------------------------------------ vector-compatibility gate

/// The model a color's Deployment declares.
fn serving(revision: &str, model: &str, dimensions: i32) -> ColorState {
    ColorState {
        model: Some(model.to_owned()),
        dimensions: Some(dimensions),
        ..ready(revision)
    }
}

fn with_model(w: &mut World, name: &str, dimensions: i32) {
    w.spec.model = Some(crate::crd::ModelSpec {
        name: name.to_owned(),
        dimensions: Some(dimensions),
    });
}

#[test]
fn a_compatible_revision_is_checked_before_traffic_and_before_promotion() {
    let mut w = World::installed();
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", None);
    assert_eq!(
        plan.status.canary_weight, 1,
        "the first weight after the check"
    );
    assert_eq!(w.checks.len(), 1);
    assert_eq!(w.checks[0].stage, CompatibilityStage::BeforeTraffic);
    assert_eq!(w.checks[0].stable, Some((Color::Blue, "r1".to_owned())));
    let recorded = plan.status.compatibility.clone().unwrap();
    assert_eq!(recorded.result, CompatibilityResult::Compatible);
    assert_eq!(recorded.min_cosine.as_deref(), Some("1.00000"));
    assert!(w.events.contains(&"VectorsCompatible"));
    // No second check for the same stage.
    w.reconcile("r2", None);
    assert_eq!(w.checks.len(), 1);
    for _ in 0..4 {
        w.tick(10);
        w.reconcile("r2", Some(CheckResult::Passed));
    }
    assert_eq!(w.status.phase, Some(Phase::Healthy));
    assert_eq!(
        w.checks.iter().map(|c| c.stage).collect::<Vec<_>>(),
        [
            CompatibilityStage::BeforeTraffic,
            CompatibilityStage::BeforePromotion
        ]
    );
}

#[test]
fn differing_vectors_are_rolled_back_at_weight_0_and_say_where() {
    let mut w = World::installed();
    w.vectors = compared(0.912, 0.64);
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, Some("VectorMismatch"));
    assert_eq!(plan.status.canary_weight, 0, "never above 0");
    assert_eq!(plan.status.phase, Some(Phase::Failed));
    let message = plan.status.message.clone().unwrap();
    assert!(
        message.contains("vectors differ from stable: min cosine 0.91200 (text 17)")
            && message.contains("top-10 agreement 0.64"),
        "{message}"
    );
    let condition = conditions::get(&plan.status.conditions, "VectorsCompatible").unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "VectorMismatch")
    );
    assert!(w.events.contains(&"VectorMismatch") && w.events.contains(&"RolledBack"));
}

/// A revision rolled back for its vectors (int8 at 0.985 against the default 0.999), then
/// accepted with a lower `minCosine` and retried: the retry checks it again under the new
/// limit instead of rolling it back on the verdict recorded under the old one.
#[test]
fn a_retry_after_lowering_min_cosine_checks_again_and_passes() {
    let mut w = World::installed();
    w.vectors = compared(0.985, 0.96);
    w.reconcile("r2", None);
    w.green = ready("r2");
    assert_eq!(w.reconcile("r2", None).rollback, Some("VectorMismatch"));
    assert_eq!(w.checks.len(), 1);
    w.spec.compatibility.min_cosine = 0.98;
    w.tick(5);
    let plan = w.reconcile("r2", None);
    assert_eq!(
        plan.status.phase,
        Some(Phase::Failed),
        "not without a retry"
    );
    w.commands.retry = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, None, "{:?}", plan.status.message);
    assert_eq!(w.checks.len(), 2, "checked again on retry");
    assert_eq!(plan.status.canary_weight, 1, "{:?}", plan.status.message);
    assert_eq!(
        plan.status.compatibility.as_ref().map(|c| c.result),
        Some(CompatibilityResult::Compatible)
    );
    assert!(w.events.contains(&"Retried"));
}

#[test]
fn top_k_agreement_below_the_limit_is_a_mismatch_too() {
    let mut w = World::installed();
    w.vectors = compared(0.9995, 0.8);
    w.reconcile("r2", None);
    w.green = ready("r2");
    assert_eq!(w.reconcile("r2", None).rollback, Some("VectorMismatch"));
}

#[test]
fn a_mismatch_found_before_promotion_rolls_back_from_its_weight() {
    let mut w = World::canary_at_first_step();
    w.vectors = compared(0.95, 1.0);
    for _ in 0..4 {
        w.tick(10);
        if w.reconcile("r2", Some(CheckResult::Passed))
            .rollback
            .is_some()
        {
            break;
        }
    }
    assert_eq!(w.status.phase, Some(Phase::Failed));
    assert_eq!(w.status.stable_revision.as_deref(), Some("r1"));
    assert_eq!(w.status.canary_weight, 0);
}

#[test]
fn an_inconclusive_check_holds_at_0_and_is_retried_every_interval() {
    let mut w = World::installed();
    w.vectors = Outcome::Inconclusive("canary: no Ready pod behind Service search-green".into());
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", None);
    assert_eq!((plan.rollback, plan.status.canary_weight), (None, 0));
    assert!(plan.status.message.unwrap().contains("inconclusive"));
    assert_eq!(plan.requeue, Some(Duration::from_secs(10)));
    w.reconcile("r2", None);
    assert_eq!(w.checks.len(), 1, "not retried before the interval");
    w.tick(10);
    w.reconcile("r2", None);
    assert_eq!(w.checks.len(), 2);
    assert_eq!(
        w.events
            .iter()
            .filter(|e| **e == "VectorCheckInconclusive")
            .count(),
        1,
        "the same reason once"
    );
    w.vectors = compared(1.0, 1.0);
    w.tick(10);
    assert_eq!(w.reconcile("r2", None).status.canary_weight, 1);
}

#[test]
fn a_canary_that_cannot_be_checked_is_rolled_back_at_the_progress_deadline() {
    let mut w = World::installed();
    w.vectors = Outcome::Inconclusive("canary: answered 500 Internal Server Error".into());
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", None);
    assert_eq!((plan.rollback, plan.status.canary_weight), (None, 0));
    // progressDeadlineSeconds is 120 in this world.
    for _ in 0..12 {
        w.tick(10);
        assert_eq!(w.reconcile("r2", None).rollback, None);
    }
    w.tick(10);
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, Some("VectorCheckInconclusive"));
    assert_eq!(plan.status.canary_weight, 0);
    assert!(
        plan.status
            .message
            .unwrap()
            .contains("no conclusive vector check within progressDeadlineSeconds 120")
    );
}

#[test]
fn a_canary_ready_near_the_deadline_gets_the_whole_deadline_for_its_check() {
    let mut w = World::installed();
    w.vectors = Outcome::Inconclusive("canary: model still warming up".into());
    w.reconcile("r2", None);
    // Ready 115 s into a 120 s progress deadline; its first checks are inconclusive.
    w.tick(115);
    w.green = ready("r2");
    assert_eq!(w.reconcile("r2", None).rollback, None);
    for _ in 0..3 {
        w.tick(10);
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.rollback, None, "{:?}", plan.status.message);
    }
    assert!(w.checks.len() >= 3, "retried: {}", w.checks.len());
    w.vectors = compared(1.0, 1.0);
    w.tick(10);
    assert_eq!(w.reconcile("r2", None).status.canary_weight, 1);
}

#[test]
fn a_broken_dimension_contract_holds_the_revision() {
    let mut w = World::installed();
    w.vectors = Outcome::ContractBroken {
        reason: "DimensionMismatch",
        message: "the canary's vectors have 384 dimensions; spec.model.dimensions says 768".into(),
    };
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", None);
    assert_eq!((plan.rollback, plan.status.canary_weight), (None, 0));
    assert_eq!(plan.status.phase, Some(Phase::Paused));
    let condition = conditions::get(&plan.status.conditions, "VectorsCompatible").unwrap();
    assert_eq!(condition.reason, "DimensionMismatch");
    assert!(w.events.contains(&"DimensionMismatch"));
}

#[test]
fn the_gate_can_be_turned_off() {
    let mut w = World::installed();
    w.spec.compatibility.enabled = false;
    w.vectors = compared(0.1, 0.0);
    w.reconcile("r2", None);
    w.green = ready("r2");
    assert_eq!(w.reconcile("r2", None).status.canary_weight, 1);
    assert!(w.checks.is_empty());
}

/// r1 serves all-MiniLM-L6-v2 on blue; r2 declares sre-embedding-model and is Ready on green.
fn model_change(on_incompatible: OnIncompatible) -> World {
    let mut w = World::new();
    with_model(&mut w, "all-MiniLM-L6-v2", 384);
    w.spec.compatibility.on_incompatible = on_incompatible;
    w.reconcile("r1", None);
    w.blue = serving("r1", "all-MiniLM-L6-v2", 384);
    w.reconcile("r1", None);
    assert_eq!(w.status.phase, Some(Phase::Healthy));
    with_model(&mut w, "sre-embedding-model", 384);
    w.reconcile("r2", None);
    w.green = serving("r2", "sre-embedding-model", 384);
    w
}

#[test]
fn a_model_change_is_held_by_default_with_what_to_set() {
    let mut w = model_change(OnIncompatible::Block);
    let plan = w.reconcile("r2", None);
    assert_eq!(
        w.checks[0].stable, None,
        "nothing to compare a new model with"
    );
    assert_eq!((plan.rollback, plan.status.canary_weight), (None, 0));
    assert_eq!(plan.status.phase, Some(Phase::Paused));
    let message = plan.status.message.unwrap();
    assert!(
        message.contains("all-MiniLM-L6-v2 (384 dimensions) to sre-embedding-model")
            && message.contains("onIncompatible: Reindex"),
        "{message}"
    );
    let condition = conditions::get(&plan.status.conditions, "VectorsCompatible").unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "ModelChanged")
    );
    // A promote does not push a model change through a weighted canary.
    w.commands.promote = true;
    w.commands.promote_full = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r1"));
    assert_eq!(plan.status.canary_weight, 0);
}

#[test]
fn reindex_serves_a_new_model_at_0_then_cuts_over_at_once() {
    let mut w = model_change(OnIncompatible::Reindex);
    w.spec.traffic.canary_header = Some(crate::crd::CanaryHeader {
        name: "X-Reindex".into(),
        value: "1".into(),
    });
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    assert_eq!(plan.status.canary_weight, 0);
    let message = plan.status.message.clone().unwrap();
    assert!(
        message.contains("X-Reindex: 1") && message.contains("search-green"),
        "{message}"
    );
    // Its analysis runs on the re-index traffic; passing it moves no weight.
    let mut weights = vec![plan.status.canary_weight];
    for _ in 0..5 {
        w.tick(10);
        let plan = w.reconcile("r2", Some(CheckResult::Passed));
        weights.push(plan.status.canary_weight);
        assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    }
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    weights.push(plan.status.canary_weight);
    assert_eq!(plan.status.phase, Some(Phase::Healthy));
    assert_eq!(plan.status.stable_color, Some(Color::Green));
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r2"));
    assert!(
        weights.iter().all(|w| *w == 0),
        "no weight ever: {weights:?}"
    );
}

#[test]
fn a_reindex_cut_over_of_a_proportional_canary_waits_for_a_whole_fleet() {
    let mut w = model_change(OnIncompatible::Reindex);
    w.spec.replicas = 6;
    w.blue.desired_replicas = 6;
    w.spec.strategy.canary_scale = crate::crd::CanaryScale::Proportional;
    w.spec.traffic.canary_header = Some(crate::crd::CanaryHeader {
        name: "X-Reindex".into(),
        value: "1".into(),
    });
    w.green.desired_replicas = 1;
    w.green.ready_replicas = 1;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    assert_eq!(plan.green_replicas, 1, "one pod serves the re-index");
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Blue));
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    assert_eq!(plan.green_replicas, 6);
    assert!(plan.deferred.promote);
    assert!(plan.status.message.unwrap().contains("scales to 6 pods"));
    w.green.desired_replicas = 6;
    w.green.ready_replicas = 6;
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_color, Some(Color::Green));
}

#[test]
fn a_failing_analysis_while_awaiting_reindex_rolls_back() {
    let mut w = model_change(OnIncompatible::Reindex);
    w.reconcile("r2", None);
    let mut rolled_back = false;
    for _ in 0..3 {
        w.tick(10);
        rolled_back |= w
            .reconcile("r2", Some(CheckResult::Failed))
            .rollback
            .is_some();
    }
    assert!(rolled_back);
    assert_eq!(w.status.stable_revision.as_deref(), Some("r1"));
}

#[test]
fn same_model_vectors_that_differ_can_be_reindexed_on_purpose() {
    let mut w = World::installed();
    w.spec.compatibility.on_incompatible = OnIncompatible::Reindex;
    w.vectors = compared(0.97, 0.95);
    w.reconcile("r2", None);
    w.green = ready("r2");
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, None);
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
}

#[test]
fn going_back_to_a_failed_revision_cancels_the_canary_in_flight() {
    let mut w = World::installed();
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    w.commands.abort = true;
    assert_eq!(w.reconcile("r2", None).rollback, Some("Aborted"));
    // r3 goes out on green and takes traffic.
    w.reconcile("r3", None);
    w.green = ready("r3");
    assert_eq!(w.reconcile("r3", None).status.canary_weight, 1);
    // A revert in Git lands on r2, which failed: r3 must not keep its traffic unwatched.
    w.events.clear();
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.phase, Some(Phase::Failed));
    assert_eq!(plan.status.canary_revision, None);
    assert_eq!(plan.status.canary_weight, 0);
    assert_eq!(plan.status.scale_down.as_ref().unwrap().color, Color::Green);
    assert_eq!(
        plan.deploy, None,
        "r3 is not replaced by r2 without a retry"
    );
    assert_eq!(w.events, ["Cancelled"]);
    let message = plan.status.message.clone().unwrap();
    assert!(
        message.contains("r2") && message.contains("r3") && message.contains("retry"),
        "{message}"
    );
    // Held, with nothing more written, until a retry or a new revision.
    let again = w.reconcile("r2", None);
    assert_eq!(again.status, plan.status);
    assert!(again.events.is_empty());
    w.commands.retry = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.canary_revision.as_deref(), Some("r2"));
    assert_eq!(plan.deploy, Some(Color::Green));
}

#[test]
fn a_canary_ready_once_is_not_held_to_the_progress_deadline_again() {
    // A re-index takes hours at 0%, far past progressDeadlineSeconds (120 s here).
    let mut w = model_change(OnIncompatible::Reindex);
    w.reconcile("r2", None);
    assert_eq!(w.status.phase, Some(Phase::AwaitingReindex));
    for _ in 0..360 {
        w.tick(10);
        w.reconcile("r2", Some(CheckResult::Passed));
    }
    // An HPA scales the canary up under the indexer's load: 2 of 3 pods Ready for a while.
    w.green.desired_replicas = 3;
    w.green.ready = false;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, None, "{:?}", plan.status.message);
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    w.tick(30);
    assert_eq!(w.reconcile("r2", None).rollback, None);
    w.green.ready_replicas = 3;
    w.green.ready = true;
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
}

#[test]
fn a_canary_at_0_percent_without_ready_pods_gets_the_progress_deadline_to_recover() {
    // A re-index at 0%; the canary's one pod is evicted (a node drain) hours in.
    let mut w = model_change(OnIncompatible::Reindex);
    w.reconcile("r2", None);
    w.tick(7200);
    w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(w.status.phase, Some(Phase::AwaitingReindex));
    w.events.clear();
    // Mid-second, as a real clock is: the status keeps whole seconds.
    w.now = w.now.checked_add(SignedDuration::from_millis(500)).unwrap();
    w.green.ready_replicas = 0;
    w.green.ready = false;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, None, "{:?}", plan.status.message);
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    assert_eq!(w.events, ["CanaryUnavailable"]);
    assert!(plan.events[0].warning);
    let message = plan.status.message.clone().unwrap();
    assert!(
        message.contains("no Ready pods") && message.contains("progressDeadlineSeconds"),
        "{message}"
    );
    assert_eq!(
        plan.requeue,
        Some(Duration::from_millis(119_500)),
        "woken at the deadline"
    );
    // Waiting writes nothing new.
    w.tick(60);
    let again = w.reconcile("r2", None);
    assert_eq!((again.rollback, &again.status), (None, &plan.status));
    assert!(again.events.is_empty());

    // Rescheduled in time: the re-index goes on, and a later loss gets a deadline of its own.
    w.green = serving("r2", "sre-embedding-model", 384);
    w.tick(10);
    let plan = w.reconcile("r2", Some(CheckResult::Passed));
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    assert_eq!(plan.status.canary_unavailable_since, None);
    w.green.ready_replicas = 0;
    w.green.ready = false;
    w.tick(10);
    assert_eq!(w.reconcile("r2", None).rollback, None);
    w.tick(119);
    assert_eq!(
        w.reconcile("r2", None).rollback,
        None,
        "before the deadline"
    );
    w.tick(1);
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, Some("CanaryUnavailable"));
    let message = plan.status.message.unwrap();
    assert!(message.contains("120"), "{message}");
}

#[test]
fn a_canary_without_ready_pods_while_it_takes_traffic_is_rolled_back_at_once() {
    let mut w = World::canary_at_first_step();
    assert_eq!(w.status.canary_weight, 1);
    w.green.ready_replicas = 0;
    w.green.ready = false;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.rollback, Some("CanaryUnavailable"));
    assert_eq!(plan.status.canary_weight, 0);
    let message = plan.status.message.unwrap();
    assert!(message.contains("1%"), "{message}");
}

#[test]
fn a_leading_pause_at_0_percent_ends_on_time_without_traffic_to_judge() {
    for on_inconclusive in [OnInconclusive::Pause, OnInconclusive::Fail] {
        let mut w = World::installed();
        w.spec.analysis.on_inconclusive = on_inconclusive;
        w.spec.strategy.steps = serde_json::from_value(serde_json::json!([
            {"pause": {"duration": "30s"}}, {"setWeight": 10}, {"setWeight": 100}
        ]))
        .unwrap();
        w.reconcile("r2", None);
        w.green = ready("r2");
        let plan = w.reconcile("r2", None);
        assert_eq!(plan.status.current_step_index, Some(0));
        assert_eq!(plan.status.canary_weight, 0);
        // At 0% the canary gets no requests: an analysis could only be inconclusive.
        for _ in 0..3 {
            w.tick(10);
            let plan = w.reconcile("r2", Some(CheckResult::Inconclusive));
            assert_eq!(plan.rollback, None, "{on_inconclusive:?}");
        }
        assert_eq!(
            (w.status.current_step_index, w.status.canary_weight),
            (Some(1), 10),
            "{on_inconclusive:?}: {:?}",
            w.status.message
        );
    }
}

#[test]
fn a_promote_waiting_on_the_vector_check_is_announced_once_it_acts() {
    let mut w = World::installed();
    w.spec.strategy.steps =
        serde_json::from_value(serde_json::json!([{"pause": {}}, {"setWeight": 100}])).unwrap();
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    w.commands.promote = true;
    assert_eq!(w.reconcile("r2", None).status.canary_weight, 100);
    // The last step's promote waits for the vector check before promotion.
    w.vectors = Outcome::Inconclusive("canary: connection refused".into());
    w.events.clear();
    for _ in 0..3 {
        w.commands.promote = true;
        let plan = w.reconcile("r2", None);
        assert!(plan.deferred.promote, "the annotation is kept");
        w.tick(10);
    }
    assert!(
        !w.events.contains(&"PromotedStep"),
        "nothing was promoted yet: {:?}",
        w.events
    );
    w.vectors = compared(1.0, 1.0);
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r2"));
    assert_eq!(
        w.events.iter().filter(|e| **e == "PromotedStep").count(),
        1,
        "{:?}",
        w.events
    );
}

#[test]
fn a_promote_waits_for_a_check_or_a_route_and_is_dropped_with_its_canary() {
    // The vector check before traffic is inconclusive: the promote waits for it.
    let mut w = World::installed();
    w.vectors = Outcome::Inconclusive("canary: connection refused".into());
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.canary_weight, 0);
    assert!(plan.deferred.promote, "kept while the check is retried");

    // A route the Gateway has not reported on yet (after every weight it writes): waits.
    let mut w = World::installed();
    w.spec.traffic = serde_json::from_value(serde_json::json!({
        "gatewayAPI": {"parentRefs": [{"name": "web"}]}
    }))
    .unwrap();
    w.reconcile("r2", None);
    w.green = ready("r2");
    assert_eq!(w.reconcile("r2", None).status.canary_weight, 1);
    w.route = RouteState::Pending("not reported on generation 2 yet".to_owned());
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.canary_weight, 1);
    assert!(plan.deferred.promote, "kept while the route is pending");
    w.route = RouteState::Routed;
    w.commands.promote = true;
    assert_eq!(w.reconcile("r2", None).status.canary_weight, 10);

    // A promote kept for a canary short of Ready is not carried over to a newer revision.
    let mut w = World::installed();
    w.reconcile("r2", None);
    w.commands.promote = true;
    assert!(w.reconcile("r2", None).deferred.promote);
    w.commands.promote = true;
    let plan = w.reconcile("r3", None);
    assert!(!plan.deferred.promote, "meant for r2, dropped with it");
    w.green = ready("r3");
    let plan = w.reconcile("r3", None);
    assert_eq!(
        (plan.status.current_step_index, plan.status.canary_weight),
        (Some(0), 1),
        "r3's first step is analysed, not skipped"
    );
}

#[test]
fn a_promote_kept_through_a_pending_check_never_becomes_a_reindex_cut_over() {
    let mut w = World::installed();
    w.spec.compatibility.on_incompatible = OnIncompatible::Reindex;
    w.vectors = Outcome::Inconclusive("canary: connection refused".into());
    w.reconcile("r2", None);
    w.green = ready("r2");
    w.reconcile("r2", None);
    // A promote to get past the first step, kept while the check is retried...
    w.commands.promote = true;
    assert!(w.reconcile("r2", None).deferred.promote);
    // ...until the check finds vectors that differ: a re-index, not a cut-over now.
    w.vectors = compared(0.97, 0.95);
    w.tick(10);
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.phase, Some(Phase::AwaitingReindex));
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r1"));
    assert!(!plan.deferred.promote, "dropped, not kept for later");
    // A promote given while it awaits the re-index cuts over.
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert_eq!(plan.status.stable_revision.as_deref(), Some("r2"));
}

#[test]
fn a_promote_given_with_a_new_revision_waits_for_its_canary() {
    let mut w = World::installed();
    w.commands.promote = true;
    let plan = w.reconcile("r2", None);
    assert!(
        plan.deferred.promote,
        "no canary was in flight: it is meant for r2"
    );
}
