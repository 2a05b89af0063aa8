//! A kubelet for the local e2e cluster: registers a Node, keeps it Ready, and runs the pods
//! bound to it as local processes (container images map to workspace binaries).

use std::path::PathBuf;

use clap::Parser;
use embedroll_e2e::container_logs;
use embedroll_e2e::images::ImageMap;
use embedroll_e2e::node::{NodeConfig, run_heartbeat};
use embedroll_e2e::pods::Kubelet;
use embedroll_e2e::service_account::ApiAccess;

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
    /// The apiserver as pods reach it (e.g. https://10.88.0.1:6443). With --pod-ca-file and
    /// --credentials-dir, every pod gets a token of its service account and a kubeconfig for
    /// it in KUBECONFIG (see embedroll_e2e::service_account).
    #[arg(long, requires_all = ["pod_ca_file", "credentials_dir"])]
    pod_apiserver: Option<String>,
    /// CA bundle of the apiserver's serving certificate, copied into pod credentials.
    #[arg(long)]
    pod_ca_file: Option<PathBuf>,
    /// Where pod credentials are written (a directory per pod UID).
    #[arg(long)]
    credentials_dir: Option<PathBuf>,
    /// Where container logs go, one file per container.
    #[arg(long, default_value = "/tmp/embedroll-kubelet-logs")]
    log_dir: PathBuf,
    /// Serving certificate of the kubelet API (container logs for `kubectl logs`), for the
    /// node's address. Without it the API is not served.
    #[arg(long, requires_all = ["tls_private_key_file", "client_ca_file"])]
    tls_cert_file: Option<PathBuf>,
    /// Key of --tls-cert-file.
    #[arg(long)]
    tls_private_key_file: Option<PathBuf>,
    /// CA that signs the apiserver's kubelet client certificate.
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
    /// Port of the kubelet API, on the node's address.
    #[arg(long, default_value_t = embedroll_e2e::container_logs::DEFAULT_PORT)]
    port: u16,
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
        kubelet_port: args.port,
    };
    let mut images = ImageMap::workspace(&args.bin_dir);
    for spec in &args.images {
        images.insert_spec(spec)?;
    }
    embedroll_e2e::pod_network::prepare_host().map_err(|e| format!("pod network: {e}"))?;
    let api_access = match (args.pod_apiserver, args.pod_ca_file, args.credentials_dir) {
        (Some(server), Some(ca_file), Some(dir)) => Some(ApiAccess {
            server,
            ca_file,
            dir,
        }),
        _ => None,
    };
    let kubelet_api = match (
        args.tls_cert_file,
        args.tls_private_key_file,
        args.client_ca_file,
    ) {
        (Some(cert), Some(key), Some(ca)) => {
            let tls = container_logs::tls_config(&cert, &key, &ca)?;
            let address =
                std::net::SocketAddr::from((embedroll_e2e::pod_network::HOST_ADDRESS, args.port));
            let log_dir = args.log_dir.clone();
            Some(tokio::spawn(container_logs::serve(address, tls, log_dir)))
        }
        _ => None,
    };
    let kubelet = Kubelet::new(
        client.clone(),
        config.name.clone(),
        images,
        args.log_dir,
        api_access,
    );
    let heartbeat = tokio::spawn(run_heartbeat(client, config));
    let pods = tokio::spawn(kubelet.run());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
        _ = heartbeat => {}
        _ = pods => {}
        Ok(Err(error)) = async { match kubelet_api { Some(task) => task.await, None => std::future::pending().await } } => {
            return Err(format!("kubelet API: {error}").into());
        }
    }
    Ok(())
}
