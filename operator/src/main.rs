//! `embedroll-operator`: runs the EmbeddingRollout controller (`run`, the default) or prints
//! the CRD (`crdgen`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use embedroll_operator::{controller, metrics::Metrics, server};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "embedroll-operator",
    version,
    about = "Progressive delivery of embedding services on Kubernetes."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the EmbeddingRollout CRD as YAML (what crds/ holds).
    Crdgen,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "EMBEDROLL_METRICS_LISTEN", default_value = "0.0.0.0:8081")]
    metrics_listen: SocketAddr,
    /// Watch one namespace only (default: all).
    #[arg(long, env = "EMBEDROLL_NAMESPACE")]
    namespace: Option<String>,
    /// Prometheus for rollouts that name none in spec.analysis.prometheus.
    #[arg(long, env = "EMBEDROLL_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// Hold a Lease before reconciling, so several replicas can run safely.
    #[arg(long, env = "EMBEDROLL_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (defaults to the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(
        long,
        env = "EMBEDROLL_LEASE_NAME",
        default_value = "embedroll-operator"
    )]
    lease_name: String,
    /// Rollouts reconciled at once.
    #[arg(long, env = "EMBEDROLL_MAX_CONCURRENT_RECONCILES", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_reconciles: u16,
    /// Sustained requests per second to the Kubernetes API (client side, like client-go's QPS).
    #[arg(long, env = "EMBEDROLL_KUBE_API_QPS", default_value_t = 20.0)]
    kube_api_qps: f64,
    /// Requests allowed in a burst above the QPS.
    #[arg(long, env = "EMBEDROLL_KUBE_API_BURST", default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    kube_api_burst: u64,
    /// JSON logs (one object per line) instead of text.
    #[arg(long, env = "EMBEDROLL_LOG_JSON")]
    log_json: bool,
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_lease_manager=warn"));
    // Colours only on a terminal: in a pod, escape codes would litter `kubectl logs`.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Some(Command::Crdgen) = cli.command {
        print!("{}", embedroll_operator::crd_yaml());
        return;
    }
    init_tracing(cli.run.log_json);
    if let Err(e) = run(cli.run).await {
        error!(error = %e, "operator stopped");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    // kube and reqwest share rustls; ring is the provider both are built with.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_listen).await?;
    info!(listen = %args.metrics_listen, "serving /metrics, /healthz, /readyz");
    let app = server::router(server::Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "metrics server stopped");
        }
    });

    if !(args.kube_api_qps.is_finite() && args.kube_api_qps > 0.0) {
        return Err(format!(
            "--kube-api-qps must be a positive number, not {}",
            args.kube_api_qps
        )
        .into());
    }
    // `burst` requests per `burst / qps` seconds: a burst may go at once, and the sustained
    // rate is `qps`.
    let window = Duration::from_secs_f64(args.kube_api_burst as f64 / args.kube_api_qps);
    let client = kube::client::ClientBuilder::try_from(kube::Config::infer().await?)?
        .with_layer(&tower::limit::RateLimitLayer::new(
            args.kube_api_burst,
            window,
        ))
        .build();
    let settings = controller::Settings {
        concurrency: args.max_concurrent_reconciles,
        ..controller::Settings::default()
    };
    let version = client.apiserver_version().await?;
    info!(apiserver = %version.git_version, namespace = ?args.namespace, "connected");
    ready.store(true, Ordering::Relaxed);
    let instance = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("embedroll-operator-{}", std::process::id()));

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = shutdown_tx.send(true);
    });
    let stopped = {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    if !args.leader_election {
        // The one replica reconciles without a Lease: it is the leader the alert looks for.
        metrics.leader.set(1);
        controller::run(
            client,
            metrics,
            args.namespace,
            args.prometheus_url,
            instance,
            settings,
            stopped,
        )
        .await;
        return Ok(());
    }

    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&instance)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    info!(lease = %args.lease_name, namespace = %args.lease_namespace, identity = %instance, "waiting for leadership");
    let mut shutdown = shutdown_rx.clone();
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => changed?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        }
    }
    info!(identity = %instance, "became leader; reconciling");
    metrics.leader.set(1);
    // Losing the Lease stops the controller: another replica is reconciling now.
    let lost = async move {
        let _ = leader.wait_for(|is_leader| !*is_leader).await;
        warn!("lost the leader Lease");
    };
    let stop = async move {
        tokio::select! {
            _ = stopped => {}
            _ = lost => {}
        }
    };
    controller::run(
        client,
        metrics.clone(),
        args.namespace,
        args.prometheus_url,
        instance,
        settings,
        stop,
    )
    .await;
    metrics.leader.set(0);
    // Dropping the channel makes the lease task release the Lease, so a standby takes over
    // at once instead of after the Lease expires.
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(manager))) => {
            let _ = manager.release().await;
        }
        other => warn!(?other, "lease task did not stop cleanly"),
    }
    if !*shutdown_rx.borrow() {
        return Err("lost leadership".into());
    }
    Ok(())
}
