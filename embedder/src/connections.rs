//! Accepting connections: hyper with a header read timeout, so a client that never finishes
//! its headers holds a connection for seconds, not forever, and a drain bounded in time, so
//! slow clients cannot stall shutdown. (`axum::serve` sets no timer, so hyper's header
//! timeout never fires there, and it drains without a bound.)

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

pub struct Timeouts {
    pub header_read: Duration,
    /// After `shutdown` resolves, how long open connections get to finish.
    pub drain: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, calls
/// `closing`, lets open connections finish their requests for at most `timeouts.drain`, and
/// returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
    closing: impl FnOnce(),
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header_read);
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Requests still sending their body are cut off; those fully received finish.
    closing();
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("in-flight requests finished"),
        () = tokio::time::sleep(timeouts.drain) => tracing::warn!(
            drain_ms = timeouts.drain.as_millis() as u64,
            "connections still open after the shutdown timeout; closing them"
        ),
    }
}
