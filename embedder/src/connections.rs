//! Accepting connections: hyper with a header read timeout, so a client that never finishes
//! its headers holds a connection for seconds, not forever; an idle timeout longer than
//! proxies keep idle upstream connections; and a drain bounded in time, so slow clients
//! cannot stall shutdown. (`axum::serve` sets no timer, so hyper's header timeout never
//! fires there, and it drains without a bound.)
//!
//! hyper starts its header timer whenever it waits for a request, idle keep-alive included,
//! so alone it would close a proxy's idle connection after the header timeout and race the
//! proxy's next request into a 502. Each connection therefore gets its own [`HeadTimer`]:
//! the idle timeout until the request's first byte arrives, the header timeout from then on.
//!
//! A client that stops reading its answers stalls the connection's writes; hyper has no
//! write timeout, so such a connection would hold its socket and unsent answer forever.
//! `tokio-io-timeout` closes it once a write has waited `write` on a full buffer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

pub struct Timeouts {
    pub header_read: Duration,
    /// How long a connection may wait, idle, for its next request.
    pub idle: Duration,
    /// How long a write may wait for the client to read.
    pub write: Duration,
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
        let stream = CountingStream {
            inner: stream,
            read: Arc::default(),
        };
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(HeadTimer {
                read: stream.read.clone(),
                header_read: timeouts.header_read,
                idle: timeouts.idle,
            })
            // hyper's deadline is ignored: HeadTimer picks idle or header timeout itself.
            .header_read_timeout(timeouts.header_read);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(timeouts.write));
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(Box::pin(stream)),
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

/// A connection's stream, counting the bytes read so its timer knows when a request began.
struct CountingStream {
    inner: tokio::net::TcpStream,
    read: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The one timer hyper's HTTP/1 server uses: waiting for a request's headers. hyper arms it
/// each time it starts waiting for a request.
struct HeadTimer {
    read: Arc<AtomicU64>,
    header_read: Duration,
    idle: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, _: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.wait_for_head()
    }

    fn sleep_until(&self, _: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.wait_for_head()
    }
}

impl HeadTimer {
    fn wait_for_head(&self) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            sleep: Box::pin(tokio::time::sleep(self.idle)),
            read: self.read.clone(),
            read_when_armed: self.read.load(Ordering::Relaxed),
            header_read: self.header_read,
            receiving: false,
        })
    }
}

/// Resolves after the idle timeout if no byte arrives, or after the header timeout counted
/// from when the first byte was seen. hyper polls it whenever the connection is woken, as it
/// is by arriving bytes, so "seen" is when they arrived.
struct HeadSleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
    read: Arc<AtomicU64>,
    read_when_armed: u64,
    header_read: Duration,
    receiving: bool,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.receiving && self.read.load(Ordering::Relaxed) != self.read_when_armed {
            self.receiving = true;
            let deadline = tokio::time::Instant::now() + self.header_read;
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}
