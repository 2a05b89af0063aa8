//! Start-up, model preloading and graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{self, AppState, Health, Limits};
use crate::bert::Quantization;
use crate::config::Config;
use crate::connections;
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Serves until `shutdown` resolves, then drains: readiness turns false at once, new
/// connections are refused after `--drain-delay-ms`, in-flight requests get
/// `--shutdown-timeout-ms` to finish.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    let (catalog, default_model) = config.model_catalog()?;
    let kernel = embedroll_int8::select(Some(&config.int8_kernel)).map_err(Error::Config)?;
    if catalog
        .values()
        .any(|m| m.quantization == Quantization::Int8)
    {
        tracing::info!(kernel = kernel.name(), "int8 matrix kernel");
    }
    if crate::OPT_LEVEL == "0" {
        tracing::warn!(
            "embedder built without optimisations (opt-level 0): its SIMD kernels run several times slower; build with --release"
        );
    }
    let metrics = Metrics::new();
    let registry = Arc::new(Registry::new(
        catalog,
        default_model,
        config.max_models,
        config.max_batch_tokens,
        metrics.clone(),
    )?);
    let faults = Faults {
        latency: Duration::from_millis(config.fault_latency_ms),
        error_rate: config.fault_error_rate,
        vector_noise: config.fault_vector_noise,
    };
    if faults.any() || config.fault_startup_delay_ms > 0 {
        tracing::warn!(
            latency_ms = config.fault_latency_ms,
            error_rate = config.fault_error_rate,
            vector_noise = config.fault_vector_noise,
            startup_delay_ms = config.fault_startup_delay_ms,
            "FAULT INJECTION IS ON: this server deliberately slows down, fails requests or returns wrong vectors"
        );
    }
    let state = AppState {
        registry: registry.clone(),
        metrics,
        admission: Arc::new(Semaphore::new(config.max_concurrent_requests)),
        queued_tokens: Arc::new(Semaphore::new(config.max_queued_tokens)),
        tokenizers: Arc::new(Semaphore::new(rayon::current_num_threads().max(1))),
        limits: Limits {
            max_client_batch: config.max_client_batch,
            max_body_bytes: config.max_body_bytes,
            max_concurrent_requests: config.max_concurrent_requests,
            max_batch_tokens: config.max_batch_tokens,
            max_queued_tokens: config.max_queued_tokens,
            header_read_timeout_ms: config.header_read_timeout_ms,
            idle_timeout_ms: config.idle_timeout_ms,
            body_read_timeout_ms: config.body_read_timeout_ms,
            write_timeout_ms: config.write_timeout_ms,
            request_timeout_ms: config.request_timeout_ms,
            auto_truncate: config.auto_truncate,
        },
        aliases: Arc::new(config.served_model_names.clone()),
        faults,
        health: Arc::new(Health::default()),
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
    tracing::info!(
        listen = %config.listen,
        default_model = registry.default_model(),
        threads = rayon::current_num_threads(),
        "embedder listening; ready once the default model is warm"
    );

    let (startup_failed_tx, startup_failed) = tokio::sync::oneshot::channel();
    tokio::spawn(preload(
        registry,
        config.preload.clone(),
        state.health.clone(),
        Duration::from_millis(config.fault_startup_delay_ms),
        startup_failed_tx,
    ));

    let health = state.health.clone();
    let closing = state.health.clone();
    let drain_delay = Duration::from_millis(config.drain_delay_ms);
    let app = api::router(state);
    let timeouts = connections::Timeouts {
        header_read: Duration::from_millis(config.header_read_timeout_ms),
        idle: Duration::from_millis(config.idle_timeout_ms),
        write: Duration::from_millis(config.write_timeout_ms),
        drain: Duration::from_millis(config.shutdown_timeout_ms),
    };
    let server = connections::serve(
        listener,
        app,
        timeouts,
        async move {
            shutdown.await;
            health.start_draining();
            tracing::info!(
                drain_delay_ms = drain_delay.as_millis() as u64,
                "shutting down: readiness off, draining"
            );
            tokio::time::sleep(drain_delay).await;
        },
        move || closing.start_closing(),
    );
    tokio::select! {
        () = server => {
            tracing::info!("exiting");
            Ok(())
        }
        Ok(error) = startup_failed => Err(error),
    }
}

/// Loads and warms the default model (readiness waits for it; failure ends the server, so a
/// broken model crash-loops visibly instead of idling unready), then any `--preload` models.
async fn preload(
    registry: Arc<Registry>,
    extra: Vec<String>,
    health: Arc<Health>,
    startup_delay: Duration,
    failed: tokio::sync::oneshot::Sender<Error>,
) {
    if !startup_delay.is_zero() {
        tokio::time::sleep(startup_delay).await;
    }
    let default = registry.default_model().to_string();
    if let Err(error) = registry.get(&default).await {
        tracing::error!(model = %default, %error, "default model failed to load");
        let _ = failed.send(Error::Config(error.to_string()));
        return;
    }
    health.set_model_ready();
    tracing::info!(model = %default, "ready");
    for name in extra.iter().filter(|name| **name != default) {
        if let Err(error) = registry.get(name).await {
            tracing::error!(model = %name, %error, "preloading failed; will retry on first request");
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received Ctrl-C"),
        _ = term => tracing::info!("received SIGTERM"),
    }
}
