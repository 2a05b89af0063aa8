//! The local ingress: a stand-in for ingress-nginx in e2e tests only. It watches Ingresses
//! (class nginx), Services and EndpointSlices, renders a real nginx configuration with
//! ingress-nginx canary semantics (`embedroll_e2e::ingress_render`), and reloads nginx when
//! the configuration changes (after `nginx -t` accepts it).
//!
//! ingress-nginx applies endpoint and canary-weight changes without a reload (Lua); this
//! stand-in reloads, and for a moment after a reload the old worker may still accept a
//! connection with the old configuration. So each reload waits until the old workers have
//! exited and only then copies the configuration to `applied.conf`: when `applied.conf`
//! equals `nginx.conf`, every new connection gets the current configuration.

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
                    let started = std::time::Instant::now();
                    let old_workers = children(pid);
                    let _ = std::process::Command::new("kill")
                        .args(["-HUP", &pid.to_string()])
                        .status();
                    let drained = wait_until(Duration::from_secs(10), || {
                        let now = children(pid);
                        !now.is_empty() && old_workers.iter().all(|w| !now.contains(w))
                    })
                    .await;
                    if !drained {
                        tracing::warn!("old nginx workers still running 10s after the reload");
                    }
                    mark_applied(&args.runtime_dir, &current)?;
                    tracing::info!(
                        upstreams = %upstream_summary(&current),
                        took_ms = started.elapsed().as_millis() as u64,
                        "configuration changed; nginx reloaded"
                    );
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
                if let Some(pid) = child.id() {
                    wait_until(Duration::from_secs(10), || !children(pid).is_empty()).await;
                }
                mark_applied(&args.runtime_dir, &current)?;
                tracing::info!(listen = %args.listen, upstreams = %upstream_summary(&current), "nginx started");
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

/// `name=servers` per upstream of a rendered config, so the log shows what each reload routes to.
fn upstream_summary(conf: &str) -> String {
    let mut summary = Vec::new();
    let mut current: Option<(&str, usize)> = None;
    for line in conf.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("upstream ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            current = Some((name, 0));
        } else if let Some((_, servers)) = current.as_mut()
            && line.starts_with("server ")
            && !line.ends_with(" down;")
        {
            *servers += 1;
        } else if line == "}"
            && let Some((name, servers)) = current.take()
        {
            summary.push(format!("{name}={servers}"));
        }
    }
    summary.join(" ")
}

/// The pids whose parent is `pid` (nginx's workers, when `pid` is its master).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name, in parentheses, may hold spaces: fields start after the last ')'.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Records `conf` as live in every nginx worker (see the module comment).
fn mark_applied(runtime_dir: &std::path::Path, conf: &str) -> std::io::Result<()> {
    let next = runtime_dir.join("applied.conf.next");
    std::fs::write(&next, conf)?;
    std::fs::rename(next, runtime_dir.join("applied.conf"))
}
