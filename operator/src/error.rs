use thiserror::Error;

/// Everything a reconcile can fail with. Analysis problems are not errors: Prometheus being
/// down is an inconclusive check, recorded in status.
#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("EmbeddingRollout has no namespace")]
    NoNamespace,
}

impl Error {
    /// The rollout's namespace is being deleted: nothing can be created there any more, and
    /// the rollout goes with it, so this is not worth a retry or a warning.
    pub fn is_namespace_terminating(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(status))
        if status.details.as_ref().is_some_and(|d| {
            d.causes.iter().any(|c| c.reason == "NamespaceTerminating")
        }))
    }

    /// 409 Conflict: the object changed since it was read (a resourceVersion precondition).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(status)) if status.code == 409)
    }

    /// Short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::NoNamespace => "no_namespace",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(status: serde_json::Value) -> Error {
        Error::Kube(kube::Error::Api(
            serde_json::from_value::<kube::core::Status>(status)
                .unwrap()
                .boxed(),
        ))
    }

    #[test]
    fn namespace_terminating_is_recognised_by_its_cause() {
        let terminating = api_error(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "services \"x\" is forbidden: unable to create new content in namespace b because it is being terminated",
            "details": {"name": "x", "kind": "services",
                        "causes": [{"reason": "NamespaceTerminating", "message": "namespace b is being terminated", "field": "metadata.namespace"}]}
        }));
        assert!(terminating.is_namespace_terminating());
        let rbac = api_error(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden", "message": "forbidden by RBAC"
        }));
        assert!(!rbac.is_namespace_terminating());
        assert!(!Error::NoNamespace.is_namespace_terminating());
    }
}
