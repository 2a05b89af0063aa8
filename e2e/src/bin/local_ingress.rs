//! The local ingress: a stand-in for ingress-nginx in e2e tests only. It watches Ingresses
//! (class nginx), Services and EndpointSlices, renders a real nginx configuration with
//! ingress-nginx canary semantics (`embedroll_e2e::ingress_render`), and reloads nginx when
//! the configuration changes (after `nginx -t` accepts it).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use embedroll_e2e::ingress_render::{Snapshot, render};
use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

#[derive(Debug, Parser)]
#[command(
    name = "local-ingress",
    about = "ingress-nginx stand-in for embedroll's e2e cluster (tests only)."
)]
struct Args {
    /// Address nginx listens on.
    #[arg(
        long,
        env = "EMBEDROLL_INGRESS_LISTEN",
        default_value = "127.0.0.1:8088"
    )]
    listen: String,
    /// Directory for nginx.conf, pid, logs and temp files.
    #[arg(long, default_value = "/tmp/embedroll-ingress")]
    runtime_dir: PathBuf,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
}

/// A local copy of every object of kind `K`, and a stream that yields once per change to it.
fn mirror<K>(client: &Client) -> (reflector::Store<K>, BoxStream<'static, ()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let changes = reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ())
    .boxed();
    (store, changes)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    embedroll_e2e::init_tracing("INGRESS_LOG");
    let args = Args::parse();
    std::fs::create_dir_all(&args.runtime_dir)?;
    let client = Client::try_default().await?;

    let (ingresses, ingress_changes) = mirror::<Ingress>(&client);
    let (services, service_changes) = mirror::<Service>(&client);
    let (slices, slice_changes) = mirror::<EndpointSlice>(&client);
    let changes = stream::select_all([ingress_changes, service_changes, slice_changes]);
    // Bursts of events (a rollout touches many objects) coalesce into one render.
    let mut changes = changes.ready_chunks(256);

    let runtime = args.runtime_dir.to_string_lossy().to_string();
    let conf_path = args.runtime_dir.join("nginx.conf");
    let mut nginx: Option<tokio::process::Child> = None;
    let mut current = String::new();
    loop {
        tokio::select! {
            batch = changes.next() => {
                if batch.is_none() {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let snapshot = Snapshot {
            ingresses: ingresses.state().iter().map(|i| (**i).clone()).collect(),
            services: services.state().iter().map(|s| (**s).clone()).collect(),
            endpoint_slices: slices.state().iter().map(|e| (**e).clone()).collect(),
        };
        let conf = render(&snapshot, &args.listen, &runtime);
        if conf == current {
            continue;
        }
        let candidate = args.runtime_dir.join("nginx.conf.next");
        std::fs::write(&candidate, &conf)?;
        let check = std::process::Command::new(&args.nginx)
            .args(["-t", "-q", "-p"])
            .arg(&args.runtime_dir)
            .arg("-c")
            .arg(&candidate)
            .output()?;
        if !check.status.success() {
            tracing::error!(error = %String::from_utf8_lossy(&check.stderr), "nginx rejected the rendered config; keeping the old one");
            continue;
        }
        std::fs::rename(&candidate, &conf_path)?;
        current = conf;
        match &nginx {
            Some(child) => {
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-HUP", &pid.to_string()])
                        .status();
                    tracing::info!("configuration changed; nginx reloaded");
                }
            }
            None => {
                let child = tokio::process::Command::new(&args.nginx)
                    .args(["-p"])
                    .arg(&args.runtime_dir)
                    .arg("-c")
                    .arg(&conf_path)
                    .args(["-g", "daemon off;"])
                    .kill_on_drop(true)
                    .spawn()?;
                tracing::info!(listen = %args.listen, "nginx started");
                nginx = Some(child);
            }
        }
    }
    if let Some(mut child) = nginx {
        if let Some(pid) = child.id() {
            // QUIT: graceful stop, finishing requests in flight.
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    Ok(())
}
