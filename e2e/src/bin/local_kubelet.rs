//! A kubelet for the local e2e cluster: registers a Node and keeps it Ready. Running pods as
//! local processes comes next (see e2e/README.md once it lands).

use clap::Parser;
use embedroll_e2e::node::{NodeConfig, run_heartbeat};

#[derive(Debug, Parser)]
#[command(
    name = "local-kubelet",
    about = "Registers a Node and keeps it Ready (embedroll e2e cluster)."
)]
struct Args {
    /// Node name.
    #[arg(long, env = "EMBEDROLL_NODE_NAME", default_value = "embedroll-local")]
    node_name: String,
    /// CPU capacity reported.
    #[arg(long, default_value = "2")]
    cpu: String,
    /// Memory capacity reported.
    #[arg(long, default_value = "16Gi")]
    memory: String,
    /// Pods the node accepts.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KUBELET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    // KUBECONFIG from the environment, as kubectl does.
    let client = kube::Client::try_default().await?;
    let config = NodeConfig {
        name: args.node_name,
        cpu: args.cpu,
        memory: args.memory,
        max_pods: args.max_pods,
        address: "127.0.0.1".into(),
    };
    let heartbeat = tokio::spawn(run_heartbeat(client, config));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        _ = heartbeat => {}
    }
    Ok(())
}
