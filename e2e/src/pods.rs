//! Runs the pods bound to the local node as local processes: one process per container, its
//! own network namespace and address per pod (see `pod_network`), the real readiness probe,
//! restarts, and SIGTERM → grace → SIGKILL on deletion, with the pod status a real kubelet
//! would report.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::container_env::{PodFacts, arguments, environment};
use crate::images::ImageMap;
use crate::pod_network;
use crate::service_account::{self, ApiAccess};

/// Pod addresses: 10.88.0.2 … 10.88.254.254 on the pod bridge (10.88.0.1 is the host).
#[derive(Default)]
struct AddressPool {
    used: std::collections::BTreeSet<u32>,
}

impl AddressPool {
    fn take(&mut self) -> Option<Ipv4Addr> {
        let first = u32::from(Ipv4Addr::new(10, 88, 0, 2));
        let last = u32::from(Ipv4Addr::new(10, 88, 254, 254));
        let free =
            (first..=last).find(|a| !self.used.contains(a) && a & 0xff != 0 && a & 0xff != 255)?;
        self.used.insert(free);
        Some(Ipv4Addr::from(free))
    }

    fn give_back(&mut self, address: Ipv4Addr) {
        self.used.remove(&u32::from(address));
    }
}

#[derive(Default, Clone)]
struct ContainerState {
    pid: Option<u32>,
    ready: bool,
    restarts: i32,
    started_at: Option<Timestamp>,
    last_exit: Option<i32>,
}

struct RunningPod {
    name: String,
    namespace: String,
    ip: Ipv4Addr,
    /// The pod's service-account kubeconfig, passed as `KUBECONFIG`.
    kubeconfig: Option<PathBuf>,
    containers: Mutex<HashMap<String, ContainerState>>,
    terminating: std::sync::atomic::AtomicBool,
}

pub struct Kubelet {
    client: Client,
    node: String,
    images: ImageMap,
    log_dir: PathBuf,
    /// Service-account credentials for pods; `None` gives pods no token.
    api_access: Option<ApiAccess>,
    pods: Mutex<HashMap<String, Arc<RunningPod>>>,
    addresses: Mutex<AddressPool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Kubelet {
    pub fn new(
        client: Client,
        node: String,
        images: ImageMap,
        log_dir: PathBuf,
        api_access: Option<ApiAccess>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            images,
            log_dir,
            api_access,
            pods: Mutex::new(HashMap::new()),
            addresses: Mutex::new(AddressPool::default()),
        })
    }

    /// Watches the pods bound to this node until the stream ends.
    pub async fn run(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut events = watcher(api, config).boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    self.clone().on_pod(pod).await
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        self.clone().stop_pod(uid, 0).await;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "pod watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn on_pod(self: Arc<Self>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let known = lock(&self.pods).contains_key(&uid);
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .max(0) as u64;
            tokio::spawn(async move {
                self.clone().stop_pod(&uid, grace).await;
                let api: Api<Pod> = Api::namespaced(
                    self.client.clone(),
                    pod.metadata.namespace.as_deref().unwrap_or("default"),
                );
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                if let Err(error) = api
                    .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
                    .await
                {
                    tracing::debug!(%error, "final pod delete");
                }
            });
            return;
        }
        let finished = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if known || finished {
            return;
        }
        self.start_pod(uid, pod).await;
    }

    async fn start_pod(self: Arc<Self>, uid: String, pod: Pod) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(ip) = lock(&self.addresses).take() else {
            self.fail_pod(
                &pod,
                "NoAddress",
                "the local kubelet ran out of pod addresses",
            )
            .await;
            return;
        };
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        for container in &containers {
            if let Err(message) = self
                .images
                .resolve(container.image.as_deref().unwrap_or_default())
            {
                lock(&self.addresses).give_back(ip);
                self.fail_pod(&pod, "ImageNotMapped", &message).await;
                return;
            }
        }
        let kubeconfig = match &self.api_access {
            Some(access) => match service_account::provision(&self.client, access, &pod).await {
                Ok(path) => path,
                Err(message) => {
                    lock(&self.addresses).give_back(ip);
                    self.fail_pod(&pod, "ServiceAccountTokenFailed", &message)
                        .await;
                    return;
                }
            },
            None => None,
        };
        let network = tokio::task::spawn_blocking(move || pod_network::setup(ip)).await;
        if let Err(message) = network.unwrap_or_else(|e| Err(e.to_string())) {
            lock(&self.addresses).give_back(ip);
            self.fail_pod(&pod, "NetworkSetupFailed", &message).await;
            return;
        }
        let running = Arc::new(RunningPod {
            name: name.clone(),
            namespace: namespace.clone(),
            ip,
            kubeconfig,
            containers: Mutex::new(
                containers
                    .iter()
                    .map(|c| (c.name.clone(), ContainerState::default()))
                    .collect(),
            ),
            terminating: Default::default(),
        });
        lock(&self.pods).insert(uid.clone(), running.clone());
        tracing::info!(pod = %name, %namespace, %ip, "starting pod");
        let facts = PodFacts::of(
            &pod,
            &ip.to_string(),
            &pod_network::HOST_ADDRESS.to_string(),
        );
        for container in containers {
            tokio::spawn(self.clone().supervise(
                running.clone(),
                pod.clone(),
                facts.clone(),
                container.clone(),
            ));
            if container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .is_some()
            {
                tokio::spawn(self.clone().probe(running.clone(), pod.clone(), container));
            }
        }
    }

    /// Keeps one container's process running (restartPolicy Always/OnFailure) until the pod
    /// terminates.
    async fn supervise(
        self: Arc<Self>,
        running: Arc<RunningPod>,
        pod: Pod,
        facts: PodFacts,
        container: Container,
    ) {
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let mut backoff = Duration::from_millis(500);
        loop {
            if running
                .terminating
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return;
            }
            let exit = match self.spawn(&running, &pod, &facts, &container) {
                Ok(mut child) => {
                    let pid = child.id();
                    {
                        let mut states = lock(&running.containers);
                        let state = states.entry(container.name.clone()).or_default();
                        state.pid = pid;
                        state.started_at = Some(Timestamp::now());
                        // Without a probe a running container is ready.
                        state.ready = container.readiness_probe.is_none();
                    }
                    self.report(&running, &pod).await;
                    child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1)
                }
                Err(message) => {
                    tracing::error!(pod = %running.name, container = %container.name, %message, "cannot start container");
                    self.fail_pod(&pod, "StartError", &message).await;
                    return;
                }
            };
            {
                let mut states = lock(&running.containers);
                let state = states.entry(container.name.clone()).or_default();
                state.pid = None;
                state.ready = false;
                state.last_exit = Some(exit);
            }
            if running
                .terminating
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return;
            }
            tracing::warn!(pod = %running.name, container = %container.name, exit, "container exited");
            if policy == "Never" || (policy == "OnFailure" && exit == 0) {
                self.report(&running, &pod).await;
                return;
            }
            lock(&running.containers)
                .entry(container.name.clone())
                .or_default()
                .restarts += 1;
            self.report(&running, &pod).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn spawn(
        &self,
        running: &RunningPod,
        pod: &Pod,
        facts: &PodFacts,
        container: &Container,
    ) -> Result<tokio::process::Child, String> {
        let binary = self
            .images
            .resolve(container.image.as_deref().unwrap_or_default())?;
        let mut env = environment(container, pod, facts)?;
        if let Some(path) = &running.kubeconfig
            && !env.iter().any(|(k, _)| k == "KUBECONFIG")
        {
            env.push(("KUBECONFIG".into(), path.display().to_string()));
        }
        let args = arguments(container, &env);
        std::fs::create_dir_all(&self.log_dir).map_err(|e| e.to_string())?;
        let log_path = crate::container_logs::log_path(
            &self.log_dir,
            &running.namespace,
            &running.name,
            &container.name,
        );
        // A restart keeps the last instance's output apart, for `kubectl logs --previous`.
        let restarted = lock(&running.containers)
            .get(&container.name)
            .is_some_and(|s| s.restarts > 0);
        if restarted && log_path.exists() {
            std::fs::rename(&log_path, crate::container_logs::previous(&log_path))
                .map_err(|e| e.to_string())?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| e.to_string())?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        // `ip netns exec` enters the pod's namespace and execs the binary (same pid).
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &pod_network::namespace_for(running.ip)])
            .arg(binary);
        // A container sees its own environment, not the kubelet's, plus what any image has.
        command.env_clear();
        for key in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command
            .envs(env)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))
    }

    /// The container's httpGet readiness probe, run against the pod's address.
    async fn probe(self: Arc<Self>, running: Arc<RunningPod>, pod: Pod, container: Container) {
        let Some(probe) = container.readiness_probe.clone() else {
            return;
        };
        let Some(http) = probe.http_get.clone() else {
            return;
        };
        let port = match &http.port {
            IntOrString::Int(port) => *port,
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map_or(0, |p| p.container_port),
        };
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let thresholds = (
            probe.failure_threshold.unwrap_or(3).max(1) as u32,
            probe.success_threshold.unwrap_or(1).max(1) as u32,
        );
        let mut readiness = Readiness::new(thresholds);
        let mut process = None;
        tokio::time::sleep(Duration::from_secs(
            probe.initial_delay_seconds.unwrap_or(0).max(0) as u64,
        ))
        .await;
        loop {
            if running
                .terminating
                .load(std::sync::atomic::Ordering::SeqCst)
                || !lock(&self.pods).values().any(|p| Arc::ptr_eq(p, &running))
            {
                return;
            }
            let ok = tokio::time::timeout(timeout, http_ok(running.ip, port as u16, &path))
                .await
                .unwrap_or(false);
            let changed = {
                let mut states = lock(&running.containers);
                let state = states.entry(container.name.clone()).or_default();
                // A restarted process starts unready, whatever the last one's probes said.
                if state.pid != process {
                    process = state.pid;
                    readiness = Readiness::new(thresholds);
                }
                let ready = state.pid.is_some() && readiness.observe(ok);
                let changed = state.ready != ready;
                state.ready = ready;
                changed
            };
            if changed {
                self.report(&running, &pod).await;
            }
            tokio::time::sleep(period).await;
        }
    }

    /// SIGTERM to every container's process group, SIGKILL after `grace` seconds.
    async fn stop_pod(self: Arc<Self>, uid: &str, grace: u64) {
        let Some(running) = lock(&self.pods).get(uid).cloned() else {
            return;
        };
        if running
            .terminating
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let pids: Vec<u32> = lock(&running.containers)
            .values()
            .filter_map(|c| c.pid)
            .collect();
        tracing::info!(pod = %running.name, grace, "stopping pod");
        for pid in &pids {
            signal(*pid, "TERM");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(grace);
        while tokio::time::Instant::now() < deadline && pids.iter().any(|pid| alive(*pid)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for pid in pids.iter().filter(|pid| alive(**pid)) {
            signal(*pid, "KILL");
        }
        lock(&self.pods).remove(uid);
        if let Some(access) = &self.api_access {
            service_account::remove(access, uid);
        }
        let address = running.ip;
        let _ = tokio::task::spawn_blocking(move || pod_network::teardown(address)).await;
        lock(&self.addresses).give_back(address);
    }

    async fn report(&self, running: &RunningPod, pod: &Pod) {
        let states = lock(&running.containers).clone();
        // A container that exited and will be started again keeps the pod Running (waiting
        // in CrashLoopBackOff), as a real kubelet reports it; the ReplicaSet replaces only
        // Failed pods.
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always");
        let restarts_after = |exit: i32| policy == "Always" || (policy == "OnFailure" && exit != 0);
        let all_ready = !states.is_empty() && states.values().all(|s| s.ready);
        let now = Time(Timestamp::now());
        let condition = |type_: &str, ok: bool| json!({"type": type_, "status": if ok { "True" } else { "False" }, "lastTransitionTime": now});
        let statuses: Vec<_> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                let s = states.get(&c.name).cloned().unwrap_or_default();
                let terminated = |code: i32| json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}});
                let state = match (s.pid, s.started_at) {
                    (Some(_), Some(at)) => json!({"running": {"startedAt": Time(at)}}),
                    _ => match s.last_exit {
                        Some(code) if restarts_after(code) => json!({"waiting": {
                            "reason": "CrashLoopBackOff",
                            "message": format!("back-off restarting failed container {} (exit code {code})", c.name),
                        }}),
                        Some(code) => terminated(code),
                        None => json!({"waiting": {"reason": "ContainerCreating"}}),
                    },
                };
                json!({
                    "name": c.name, "image": c.image, "imageID": "",
                    "containerID": s.pid.map(|p| format!("process://{p}")),
                    "ready": s.ready, "started": s.pid.is_some(), "restartCount": s.restarts, "state": state,
                    "lastState": s.last_exit.map(terminated).unwrap_or_else(|| json!({})),
                })
            })
            .collect();
        let any_running = states.values().any(|s| s.pid.is_some());
        let phase = if any_running
            || states
                .values()
                .any(|s| s.last_exit.is_none_or(restarts_after))
        {
            "Running"
        } else if states.values().all(|s| s.last_exit == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        };
        let status = json!({
            "status": {
                "phase": phase,
                "podIP": running.ip.to_string(), "podIPs": [{"ip": running.ip.to_string()}],
                "hostIP": pod_network::HOST_ADDRESS.to_string(),
                "hostIPs": [{"ip": pod_network::HOST_ADDRESS.to_string()}],
                "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).unwrap_or_else(|| now.clone()),
                "conditions": [condition("PodScheduled", true), condition("Initialized", true), condition("ContainersReady", all_ready), condition("Ready", all_ready)],
                "containerStatuses": statuses,
            }
        });
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &running.namespace);
        if let Err(error) = api
            .patch_status(
                &running.name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            tracing::warn!(pod = %running.name, %error, "cannot update pod status");
        }
    }

    async fn fail_pod(&self, pod: &Pod, reason: &str, message: &str) {
        tracing::error!(pod = ?pod.metadata.name, reason, message, "pod failed");
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let status = json!({"status": {"phase": "Failed", "reason": reason, "message": message}});
        if let Err(error) = api
            .patch_status(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            tracing::warn!(%error, "cannot mark pod failed");
        }
    }
}

/// A container's readiness from its probe results, as a kubelet keeps it: a ready container
/// turns unready only after `failureThreshold` failures in a row (Kubernetes' default 3), an
/// unready one ready after `successThreshold` successes in a row (default 1). Flipping on one
/// failure, as this kubelet first did, drops a pod from its Service on a single slow answer
/// under load, which no real cluster does with these settings.
#[derive(Debug)]
struct Readiness {
    failure_threshold: u32,
    success_threshold: u32,
    ready: bool,
    /// Results in a row that disagree with `ready`.
    against: u32,
}

impl Readiness {
    fn new((failure_threshold, success_threshold): (u32, u32)) -> Self {
        Self {
            failure_threshold,
            success_threshold,
            ready: false,
            against: 0,
        }
    }

    /// Records one probe result; whether the container is ready now.
    fn observe(&mut self, ok: bool) -> bool {
        if ok == self.ready {
            self.against = 0;
            return self.ready;
        }
        self.against += 1;
        let needed = if ok {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.against >= needed {
            self.ready = ok;
            self.against = 0;
        }
        self.ready
    }
}

/// A plain HTTP/1.0 GET; 2xx and 3xx count as success, as for a kubelet's httpGet probe.
async fn http_ok(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect((ip, port)).await else {
        return false;
    };
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/local\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // The status line, however the bytes arrive: one read may return only part of it.
    let mut head = Vec::new();
    let mut chunk = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .is_some_and(|code| (200..400).contains(&code))
}

fn signal(pid: u32, name: &str) {
    // The container runs in its own process group; signal the whole group.
    let _ = std::process::Command::new("kill")
        .args([&format!("-{name}"), "--", &format!("-{pid}")])
        .status();
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    #[test]
    fn readiness_follows_the_probe_thresholds() {
        // Kubernetes' defaults: failureThreshold 3, successThreshold 1.
        let mut r = Readiness::new((3, 1));
        assert!(!r.observe(false), "starts unready");
        assert!(r.observe(true), "one success makes it ready");
        assert!(r.observe(false), "one slow answer does not drop it");
        assert!(r.observe(false));
        assert!(r.observe(true), "a success in between resets the count");
        assert!(r.observe(false) && r.observe(false));
        assert!(!r.observe(false), "the third failure in a row does");
        assert!(!r.observe(false));
        assert!(r.observe(true));

        let mut strict = Readiness::new((1, 2));
        assert!(!strict.observe(true), "needs two successes");
        assert!(strict.observe(true));
        assert!(
            !strict.observe(false),
            "one failure is enough at threshold 1"
        );
    }
}
