//! Pieces of the local real cluster used by e2e tests and the demo: a kubelet that runs pods as
//! local processes (the data plane is Traefik, built from its Go module). The rollout
//! scenarios are in `tests/rollouts.rs`, run by `e2e/scenarios.sh`.

pub mod container_env;
pub mod container_logs;
pub mod images;
pub mod node;
pub mod pod_network;
pub mod pods;
pub mod service_account;

/// Human-readable logs on stdout, filtered by the environment variable `var` (default info).
pub fn init_tracing(var: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
}
