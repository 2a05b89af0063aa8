//! The local kubelet's Node: registered by server-side apply, kept Ready by a status heartbeat
//! and a Lease in `kube-node-lease`, as a real kubelet does, so the node lifecycle controller
//! never taints it unreachable.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
    NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

pub const FIELD_MANAGER: &str = "embedroll-local-kubelet";
const LEASE_SECONDS: i32 = 40;
pub const HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
    pub address: String,
    /// Port of the kubelet API (container logs), reported in the node's daemon endpoints.
    pub kubelet_port: u16,
}

fn apply() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Creates or updates the Node object itself (labels), then its status.
pub async fn register(client: &Client, config: &NodeConfig) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), config.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        (
            "kubernetes.io/arch".to_string(),
            std::env::consts::ARCH.replace("x86_64", "amd64"),
        ),
        (
            "embedroll.dev/local-kubelet".to_string(),
            "true".to_string(),
        ),
    ]);
    let node = Node {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    nodes
        .patch(&config.name, &apply(), &Patch::Apply(&node))
        .await?;
    report_ready(client, config).await
}

/// Node status: Ready, capacity, address, versions. Sent at every heartbeat.
pub async fn report_ready(client: &Client, config: &NodeConfig) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = Time(Timestamp::now());
    let capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity(config.cpu.clone())),
        ("memory".to_string(), Quantity(config.memory.clone())),
        ("pods".to_string(), Quantity(config.max_pods.to_string())),
    ]);
    let status = NodeStatus {
        capacity: Some(capacity.clone()),
        allocatable: Some(capacity),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: config.address.clone(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: config.name.clone(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(config.kubelet_port),
            }),
        }),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("KubeletReady".into()),
            message: Some("embedroll local kubelet is posting ready status".into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64"),
            operating_system: "linux".into(),
            os_image: "embedroll local kubelet (pods are local processes)".into(),
            kubelet_version: format!("embedroll-local-kubelet/{}", env!("CARGO_PKG_VERSION")),
            container_runtime_version: "process://local".into(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            machine_id: config.name.clone(),
            system_uuid: config.name.clone(),
            boot_id: config.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let patch = Node {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            ..Default::default()
        },
        status: Some(status),
        ..Default::default()
    };
    nodes
        .patch_status(&config.name, &apply(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Renews the node's Lease: the heartbeat the node lifecycle controller watches.
pub async fn renew_lease(client: &Client, config: &NodeConfig) -> kube::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some("kube-node-lease".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    leases
        .patch(&config.name, &apply(), &Patch::Apply(&lease))
        .await?;
    Ok(())
}

/// Registers the node, then keeps the lease and status fresh until the task is dropped.
pub async fn run_heartbeat(client: Client, config: NodeConfig) {
    let mut first = true;
    loop {
        let outcome = if first {
            register(&client, &config).await
        } else {
            report_ready(&client, &config).await
        };
        let outcome = match outcome {
            Ok(()) => renew_lease(&client, &config).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                if first {
                    tracing::info!(node = %config.name, "node registered and ready");
                }
                first = false;
            }
            Err(error) => {
                tracing::warn!(node = %config.name, %error, "node heartbeat failed; retrying")
            }
        }
        tokio::time::sleep(if first {
            Duration::from_secs(1)
        } else {
            HEARTBEAT
        })
        .await;
    }
}
