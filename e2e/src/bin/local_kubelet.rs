//! A kubelet for the local e2e cluster: registers a Node, keeps it Ready, and runs the pods
//! bound to it as local processes (container images map to workspace binaries).

use std::path::PathBuf;

use clap::Parser;
use embedroll_e2e::images::ImageMap;
use embedroll_e2e::node::{NodeConfig, run_heartbeat};
use embedroll_e2e::pods::Kubelet;

#[derive(Debug, Parser)]
#[command(
    name = "local-kubelet",
    about = "Registers a Node and keeps it Ready (embedroll e2e cluster)."
)]
struct Args {
    /// Node name.
    #[arg(long, env = "EMBEDROLL_NODE_NAME", default_value = "embedroll-local")]
    node_name: String,
    /// CPU capacity reported. Pods are processes sharing the host and requests are not
    /// enforced, so this is scheduler bookkeeping only: large enough for the samples' requests
    /// (both colors of several rollouts), as kwok's fake nodes do.
    #[arg(long, default_value = "16")]
    cpu: String,
    /// Memory capacity reported.
    #[arg(long, default_value = "16Gi")]
    memory: String,
    /// Pods the node accepts.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// Directory holding the workspace binaries that images map to (embedder,
    /// embedroll-operator).
    #[arg(long, env = "EMBEDROLL_BIN_DIR")]
    bin_dir: PathBuf,
    /// Extra image mapping NAME=PATH: images whose repository's last segment is NAME run PATH.
    #[arg(long = "image", value_name = "NAME=PATH")]
    images: Vec<String>,
    /// Where container logs go, one file per container.
    #[arg(long, default_value = "/tmp/embedroll-kubelet-logs")]
    log_dir: PathBuf,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    embedroll_e2e::init_tracing("KUBELET_LOG");
    let args = Args::parse();
    // KUBECONFIG from the environment, as kubectl does.
    let client = kube::Client::try_default().await?;
    let config = NodeConfig {
        name: args.node_name,
        cpu: args.cpu,
        memory: args.memory,
        max_pods: args.max_pods,
        address: embedroll_e2e::pod_network::HOST_ADDRESS.to_string(),
    };
    let mut images = ImageMap::workspace(&args.bin_dir);
    for spec in &args.images {
        images.insert_spec(spec)?;
    }
    embedroll_e2e::pod_network::prepare_host().map_err(|e| format!("pod network: {e}"))?;
    let kubelet = Kubelet::new(client.clone(), config.name.clone(), images, args.log_dir);
    let heartbeat = tokio::spawn(run_heartbeat(client, config));
    let pods = tokio::spawn(kubelet.run());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        _ = heartbeat => {}
        _ = pods => {}
    }
    Ok(())
}
