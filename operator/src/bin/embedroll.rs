//! `embedroll`: drive and inspect EmbeddingRollouts from a terminal.
//!
//!   embedroll status NAME [-n NS]       step, weight, vector check, analysis and conditions
//!   embedroll promote NAME [--full]     finish the current step (or the whole rollout)
//!   embedroll abort NAME                roll back now
//!   embedroll retry NAME                try a rolled-back revision again
//!   embedroll pause NAME / resume NAME  hold / release the current step
//!
//! Commands are annotations on the EmbeddingRollout (`kubectl annotate` does the same), so
//! they need only `patch` on embeddingrollouts and survive an operator restart.
//!
//! Exit status: 0 done; 1 an error (no such rollout, no access); 2 the command was set but
//! has nothing to act on (a promote with no revision in flight, say), so the operator drops it.

use clap::{Parser, Subcommand};
use embedroll_operator::conditions;
use embedroll_operator::controller::{
    ANNOTATION_ABORT, ANNOTATION_PAUSED, ANNOTATION_PROMOTE, ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RETRY,
};
use embedroll_operator::crd::EmbeddingRollout;
use embedroll_operator::machine;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "embedroll",
    version,
    about = "Drive and inspect EmbeddingRollouts."
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show step, weight, last analysis and conditions.
    Status { name: String },
    /// Finish the current step now (a pause, or a weight's analysis hold).
    Promote {
        name: String,
        /// Skip the remaining steps and make the new revision stable at once.
        #[arg(long)]
        full: bool,
    },
    /// Roll back the in-flight revision now.
    Abort { name: String },
    /// Try the rolled-back revision again.
    Retry { name: String },
    /// Hold the rollout at its current step.
    Pause { name: String },
    /// Release a pause set with `embedroll pause`.
    Resume { name: String },
}

/// What a command left undone, for its exit status.
enum Outcome {
    Done,
    NothingToActOn,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(Outcome::Done) => {}
        Ok(Outcome::NothingToActOn) => std::process::exit(2),
        Err(e) => {
            eprintln!("embedroll: {e}");
            std::process::exit(1);
        }
    }
}

/// An error in words: a missing rollout names the namespace it was looked for in, which
/// comes silently from the kubeconfig when `-n` is not given.
fn explain(error: kube::Error, name: &str, namespace: &str, from_flag: bool) -> String {
    match error {
        kube::Error::Api(status) if status.code == 404 => {
            let hint = if from_flag {
                ""
            } else {
                " (the kubeconfig context's namespace; another one with -n)"
            };
            format!("embeddingrollout {name} not found in namespace {namespace}{hint}")
        }
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

async fn run(cli: Cli) -> Result<Outcome, Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await?;
    let from_flag = cli.namespace.is_some();
    let namespace = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<EmbeddingRollout> = Api::namespaced(client, &namespace);
    let (name, annotation, value): (String, &str, Option<String>) = match cli.command {
        Command::Status { name } => {
            let rollout = api
                .get(&name)
                .await
                .map_err(|e| explain(e, &name, &namespace, from_flag))?;
            print!("{}", render_status(&rollout));
            return Ok(Outcome::Done);
        }
        Command::Promote { name, full } => (
            name,
            if full {
                ANNOTATION_PROMOTE_FULL
            } else {
                ANNOTATION_PROMOTE
            },
            Some(now()),
        ),
        Command::Abort { name } => (name, ANNOTATION_ABORT, Some(now())),
        Command::Retry { name } => (name, ANNOTATION_RETRY, Some(now())),
        Command::Pause { name } => (name, ANNOTATION_PAUSED, Some("true".to_owned())),
        Command::Resume { name } => (name, ANNOTATION_PAUSED, None),
    };
    let patch = json!({"metadata": {"annotations": {annotation: value}}});
    let rollout = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| explain(e, &name, &namespace, from_flag))?;
    match value {
        Some(_) => println!("embeddingrollout/{name}: {annotation} set"),
        None => println!("embeddingrollout/{name}: {annotation} removed"),
    }
    // The patch answers with the rollout as it is now: enough to tell a command that has
    // nothing to act on, without asking for more than `patch`.
    match not_applicable(annotation, value.is_some(), &rollout) {
        Some(why) => {
            eprintln!("embedroll: {why}");
            Ok(Outcome::NothingToActOn)
        }
        None => Ok(Outcome::Done),
    }
}

/// Why a command just set has nothing to act on, if it has not. A spec the operator has not
/// seen yet may start a revision the command is meant for (a promote given with a new
/// revision is kept), so only a rollout whose status has caught up with its spec is judged.
fn not_applicable(annotation: &str, set: bool, rollout: &EmbeddingRollout) -> Option<String> {
    let Some(status) = &rollout.status else {
        return Some(
            "the rollout has no status: is the operator running? The command waits for it"
                .to_owned(),
        );
    };
    if status.observed_generation != rollout.metadata.generation {
        return None;
    }
    let phase = status
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "-".to_owned());
    let in_flight = status.canary_revision.is_some();
    match annotation {
        ANNOTATION_PROMOTE | ANNOTATION_PROMOTE_FULL | ANNOTATION_ABORT if !in_flight => Some(
            format!("no revision is in flight (phase {phase}): the operator drops this command"),
        ),
        ANNOTATION_RETRY if status.failed_revision.is_none() => Some(format!(
            "no revision was rolled back (phase {phase}): the operator drops this command"
        )),
        ANNOTATION_PAUSED if !set => {
            let steps = machine::steps(&rollout.spec);
            let at_pause = status
                .current_step_index
                .and_then(|i| steps.get(i as usize))
                .is_some_and(|step| matches!(step, machine::StepKind::Pause(_)));
            at_pause.then(|| {
                format!(
                    "the rollout is held by a pause step, not by `embedroll pause`: `embedroll promote {} -n {}` ends it",
                    rollout.name_any(),
                    rollout.namespace().unwrap_or_default()
                )
            })
        }
        _ => None,
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn render_status(rollout: &EmbeddingRollout) -> String {
    use std::fmt::Write;
    let status = rollout.status.clone().unwrap_or_default();
    let steps = machine::steps(&rollout.spec);
    let dash = || "-".to_owned();
    let mut out = String::new();
    let row = |out: &mut String, key: &str, value: String| {
        let _ = writeln!(out, "{key:<16}{value}");
    };
    row(
        &mut out,
        "Name:",
        format!(
            "{}/{}",
            rollout.namespace().unwrap_or_default(),
            rollout.name_any()
        ),
    );
    row(
        &mut out,
        "Phase:",
        status.phase.map(|p| format!("{p:?}")).unwrap_or_else(dash),
    );
    row(
        &mut out,
        "Message:",
        status.message.clone().unwrap_or_else(dash),
    );
    if status.observed_generation != rollout.metadata.generation {
        row(
            &mut out,
            "Spec:",
            format!(
                "generation {} not yet seen by the operator (status is of {})",
                rollout.metadata.generation.unwrap_or_default(),
                status
                    .observed_generation
                    .map(|g| g.to_string())
                    .unwrap_or_else(dash)
            ),
        );
    }
    // Commands set and not yet acted on; a pause set by hand also holds the next revision.
    let pending: Vec<String> = [
        ANNOTATION_PAUSED,
        ANNOTATION_PROMOTE,
        ANNOTATION_PROMOTE_FULL,
        ANNOTATION_ABORT,
        ANNOTATION_RETRY,
    ]
    .into_iter()
    .filter(|key| {
        rollout.annotations().get(*key).is_some_and(|value| {
            value != "false" && status.consumed_commands.get(*key) != Some(value)
        })
    })
    .map(|key| key.trim_start_matches("embedroll.dev/").to_owned())
    .collect();
    if !pending.is_empty() {
        row(&mut out, "Commands:", pending.join(", "));
    }
    row(
        &mut out,
        "Stable:",
        format!(
            "{} on {}",
            status.stable_revision.clone().unwrap_or_else(dash),
            status
                .stable_color
                .map(|c| c.to_string())
                .unwrap_or_else(dash)
        ),
    );
    row(
        &mut out,
        "Canary:",
        match (&status.canary_revision, status.canary_color) {
            (Some(revision), Some(color)) => format!("{revision} on {color}"),
            _ => dash(),
        },
    );
    let step = status
        .current_step_index
        .map(|i| format!("{}/{}", i + 1, steps.len()))
        .unwrap_or_else(dash);
    row(&mut out, "Step:", step);
    row(&mut out, "Weight:", format!("{}%", status.canary_weight));
    if let Some(check) = &status.weight_check {
        row(
            &mut out,
            "Observed share:",
            format!(
                "{}% of {} requests ({:?})",
                check.observed_percent.clone().unwrap_or_else(dash),
                check.requests,
                check.result
            ),
        );
    }
    if let Some(failed) = &status.failed_revision {
        row(
            &mut out,
            "Rolled back:",
            format!(
                "{failed} (embedroll retry {} -n {} to try again)",
                rollout.name_any(),
                rollout.namespace().unwrap_or_default()
            ),
        );
    }
    if let Some(check) = &status.compatibility {
        let when = check
            .checked_at
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_else(dash);
        row(
            &mut out,
            "Vectors:",
            format!(
                "{:?} for {} ({:?}, {when}): {}",
                check.result, check.revision, check.stage, check.message
            ),
        );
    }
    if let Some(analysis) = &status.analysis {
        let when = analysis
            .last_run_at
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_else(dash);
        row(
            &mut out,
            "Analysis:",
            format!(
                "{} at {when} (failed {}, inconclusive {} in a row)",
                analysis
                    .result
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(dash),
                analysis.failed_checks,
                analysis.inconclusive_checks
            ),
        );
        let _ = writeln!(
            out,
            "\n  {:<20}{:<12}{:<14}{:<14}MESSAGE",
            "METRIC", "VALUE", "THRESHOLD", "RESULT"
        );
        for metric in &analysis.metrics {
            let _ = writeln!(
                out,
                "  {:<20}{:<12}{:<14}{:<14}{}",
                metric.name,
                metric.value.clone().unwrap_or_else(dash),
                metric.threshold,
                format!("{:?}", metric.result),
                metric.message.clone().unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        out,
        "\n  {:<19}{:<9}{:<26}MESSAGE",
        "CONDITION", "STATUS", "REASON"
    );
    for type_ in [
        conditions::AVAILABLE,
        conditions::PROGRESSING,
        conditions::ANALYSIS,
        conditions::WEIGHT_VERIFIED,
        conditions::VECTORS_COMPATIBLE,
        conditions::TRAFFIC_ROUTED,
        conditions::ROLLED_BACK,
    ] {
        if let Some(c) = conditions::get(&status.conditions, type_) {
            let _ = writeln!(
                out,
                "  {:<19}{:<9}{:<26}{}",
                c.type_, c.status, c.reason, c.message
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(status: serde_json::Value, annotations: serde_json::Value) -> EmbeddingRollout {
        serde_json::from_value(json!({
            "apiVersion": "embedroll.dev/v1alpha1", "kind": "EmbeddingRollout",
            "metadata": {"name": "search", "namespace": "ml", "generation": 3,
                         "annotations": annotations},
            "spec": {
                "template": {"spec": {"containers": [{"name": "embedder", "image": "e:1"}]}},
                "traffic": {"nginx": {}},
                "strategy": {"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}]}
            },
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn a_command_with_nothing_to_act_on_says_so() {
        let healthy = rollout(
            json!({"observedGeneration": 3, "phase": "Healthy", "stableRevision": "r1"}),
            json!({}),
        );
        for annotation in [
            ANNOTATION_PROMOTE,
            ANNOTATION_PROMOTE_FULL,
            ANNOTATION_ABORT,
        ] {
            let why = not_applicable(annotation, true, &healthy).unwrap();
            assert!(why.contains("no revision is in flight"), "{why}");
        }
        let why = not_applicable(ANNOTATION_RETRY, true, &healthy).unwrap();
        assert!(why.contains("no revision was rolled back"), "{why}");
        assert_eq!(not_applicable(ANNOTATION_PAUSED, true, &healthy), None);

        // A spec the operator has not seen may start the revision the promote is for.
        let edited = rollout(
            json!({"observedGeneration": 2, "phase": "Healthy", "stableRevision": "r1"}),
            json!({}),
        );
        assert_eq!(not_applicable(ANNOTATION_PROMOTE, true, &edited), None);

        let no_status = rollout(serde_json::Value::Null, json!({}));
        let why = not_applicable(ANNOTATION_PROMOTE, true, &no_status).unwrap();
        assert!(why.contains("operator running"), "{why}");

        // Held by a pause step: resume does not end it, promote does.
        let at_pause = rollout(
            json!({"observedGeneration": 3, "phase": "Paused", "canaryRevision": "r2",
                   "canaryColor": "green", "currentStepIndex": 1, "canaryWeight": 10}),
            json!({}),
        );
        let why = not_applicable(ANNOTATION_PAUSED, false, &at_pause).unwrap();
        assert!(why.contains("embedroll promote search -n ml"), "{why}");
        for annotation in [ANNOTATION_PROMOTE, ANNOTATION_ABORT] {
            assert_eq!(not_applicable(annotation, true, &at_pause), None);
        }
        let failed = rollout(
            json!({"observedGeneration": 3, "phase": "Failed", "failedRevision": "r2"}),
            json!({}),
        );
        assert_eq!(not_applicable(ANNOTATION_RETRY, true, &failed), None);
    }

    #[test]
    fn status_shows_pending_commands_an_unseen_spec_and_a_retry_that_keeps_the_namespace() {
        let failed = rollout(
            json!({"observedGeneration": 2, "phase": "Failed", "failedRevision": "r2",
                   "consumedCommands": {"embedroll.dev/abort": "2026-11-29T10:00:00Z"}}),
            json!({"embedroll.dev/paused": "true",
                   "embedroll.dev/abort": "2026-11-29T10:00:00Z",
                   "embedroll.dev/promote": "false"}),
        );
        let text = render_status(&failed);
        assert!(text.contains("embedroll retry search -n ml"), "{text}");
        assert!(
            text.contains("generation 3 not yet seen by the operator (status is of 2)"),
            "{text}"
        );
        let commands = text.lines().find(|l| l.starts_with("Commands:")).unwrap();
        assert_eq!(
            commands.split_whitespace().collect::<Vec<_>>(),
            ["Commands:", "paused"],
            "an acted-on abort and a promote set to false are not pending: {text}"
        );
        let quiet = rollout(
            json!({"observedGeneration": 3, "phase": "Healthy"}),
            json!({}),
        );
        let text = render_status(&quiet);
        assert!(
            !text.contains("Commands:") && !text.contains("not yet seen"),
            "{text}"
        );
    }
}
