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

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("embedroll: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default().await?;
    let namespace = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<EmbeddingRollout> = Api::namespaced(client, &namespace);
    let (name, annotation, value): (String, &str, Option<String>) = match cli.command {
        Command::Status { name } => {
            let rollout = api.get(&name).await?;
            print!("{}", render_status(&rollout));
            return Ok(());
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
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    match value {
        Some(_) => println!("embeddingrollout/{name}: {annotation} set"),
        None => println!("embeddingrollout/{name}: {annotation} removed"),
    }
    Ok(())
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
                "{failed} (embedroll retry {} to try again)",
                rollout.name_any()
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
