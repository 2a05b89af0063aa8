//! A pod's service-account credentials. The real kubelet projects a TokenRequest token bound to
//! the pod into `/var/run/secrets/kubernetes.io/serviceaccount`; pods here are processes without
//! a mount namespace, cluster DNS or Service routing, so the local kubelet writes the same
//! token, the CA and the namespace into a directory of the pod's own and adds a kubeconfig
//! that points at the apiserver's address on the pod bridge, passed as `KUBECONFIG`. The token
//! is the pod's service account's, so what the pod can do is exactly what RBAC grants it.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};

/// Where pods reach the apiserver, and where their credentials are written.
#[derive(Clone, Debug)]
pub struct ApiAccess {
    /// The apiserver as seen from a pod, e.g. `https://10.88.0.1:6443`.
    pub server: String,
    /// CA bundle that signed the apiserver's serving certificate.
    pub ca_file: PathBuf,
    /// One subdirectory per pod UID is written here.
    pub dir: PathBuf,
}

/// Token lifetime. The real kubelet refreshes at 80% of it; pods here live for a test run.
const TOKEN_SECONDS: i64 = 24 * 3600;

/// The service account a pod runs as, or `None` when it opted out of a token.
pub fn account(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    Some(
        spec.service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    )
}

/// Requests a token for the pod's service account, bound to the pod, and writes
/// `token`, `ca.crt`, `namespace` and `kubeconfig`; returns the kubeconfig's path.
pub async fn provision(
    client: &Client,
    access: &ApiAccess,
    pod: &Pod,
) -> Result<Option<PathBuf>, String> {
    let Some(account) = account(pod) else {
        return Ok(None);
    };
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            // Empty: the apiserver's own audience, as for the kubelet's projected token.
            audiences: None,
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.clone()),
                uid: Some(uid.clone()),
            }),
        }),
        ..Default::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    // The Node authorizer learns that this pod is bound here from its own watch, a moment
    // after the kubelet does; until then the request is forbidden. The real kubelet retries too.
    let mut attempt = 0;
    let answer = loop {
        match accounts
            .create_token_request(&account, &PostParams::default(), &request)
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 403 && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            other => break other,
        }
    };
    let token = answer
        .map_err(|e| format!("token for service account {namespace}/{account}: {e}"))?
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("token for service account {namespace}/{account}: empty answer"))?;
    let dir = access.dir.join(&uid);
    write_credentials(&dir, access, &namespace, &token)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    tracing::info!(pod = %name, %namespace, service_account = %account, "service account token issued");
    Ok(Some(dir.join("kubeconfig")))
}

fn write_credentials(
    dir: &Path,
    access: &ApiAccess,
    namespace: &str,
    token: &str,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(dir.join("token"), token)?;
    std::fs::write(dir.join("namespace"), namespace)?;
    std::fs::copy(&access.ca_file, dir.join("ca.crt"))?;
    std::fs::write(
        dir.join("kubeconfig"),
        kubeconfig(&access.server, dir, namespace),
    )
}

/// A kubeconfig reading the token from its file (clients re-read it, as with projected tokens).
pub fn kubeconfig(server: &str, dir: &Path, namespace: &str) -> String {
    let dir = dir.display();
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: local
    cluster: {{server: \"{server}\", certificate-authority: \"{dir}/ca.crt\"}}
users:
  - name: pod
    user: {{tokenFile: \"{dir}/token\"}}
contexts:
  - name: pod
    context: {{cluster: local, user: pod, namespace: \"{namespace}\"}}
current-context: pod
"
    )
}

/// Removes a pod's credentials when it is gone.
pub fn remove(access: &ApiAccess, uid: &str) {
    let _ = std::fs::remove_dir_all(access.dir.join(uid));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec})).unwrap()
    }

    #[test]
    fn account_defaults_to_default_and_respects_opt_out() {
        assert_eq!(
            account(&pod(serde_json::json!({"containers": []}))).as_deref(),
            Some("default")
        );
        assert_eq!(
            account(&pod(
                serde_json::json!({"containers": [], "serviceAccountName": "op"})
            ))
            .as_deref(),
            Some("op")
        );
        assert_eq!(
            account(&pod(
                serde_json::json!({"containers": [], "serviceAccountName": "op", "automountServiceAccountToken": false})
            )),
            None
        );
    }

    #[test]
    fn kubeconfig_points_at_the_files() {
        let text = kubeconfig("https://10.88.0.1:6443", Path::new("/state/u"), "ns");
        // Read as kube-rs (the operator's client) reads it.
        let config = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.88.0.1:6443"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some("/state/u/ca.crt")
        );
        let user = config.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token_file.as_deref(), Some("/state/u/token"));
        let context = config.contexts[0].context.as_ref().unwrap();
        assert_eq!(context.namespace.as_deref(), Some("ns"));
        assert_eq!(config.current_context.as_deref(), Some("pod"));
    }
}
