//! The accept loop: HTTP/1.1 over plain TCP or TLS, one task per
//! connection holding one permit of a semaphore (so at most
//! `max_connections` are served at once; more wait in the kernel's backlog),
//! transient accept errors (EMFILE …) logged and retried after 100 ms, TLS
//! handshakes and request heads bounded in time.
//!
//! Shutdown: when `cancel` fires the listener closes, handshakes in progress
//! are dropped, and connections already serving get hyper's graceful close
//! (finish the request in flight, then close); after `drain` whatever is
//! left is cut.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Body;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What answers the requests of a listener.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from `remote`. Never fails: errors are responses.
    fn handle(&self, req: Request<Incoming>, remote: SocketAddr) -> BoxFuture<'_, Response<Body>>;
}

/// Limits of a listener.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for a request head on an open connection.
    pub header_read_timeout: Duration,
    /// How long open connections may finish after shutdown.
    pub drain: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_connections: 512,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(5),
        }
    }
}

/// Serves `listener` until `cancel`, then drains (see the module doc).
/// With `tls`, every connection is a TLS connection.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<dyn Handler>,
    opts: Options,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Subscribed before the task starts, so a shutdown signalled from
        // here on reaches this connection too.
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let cancel = cancel.clone();
        let handler = handler.clone();
        let opts = opts.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                match tls {
                    None => connection(TokioIo::new(stream), remote, handler, &opts, watcher).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(opts.handshake_timeout, acceptor.accept(stream));
                        let tls_stream = tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = handshake => match r {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            },
                        };
                        connection(TokioIo::new(tls_stream), remote, handler, &opts, watcher).await
                    }
                }
            }
            .instrument(tracing::debug_span!("conn", %remote)),
        );
    }
    drop(listener);
    if tokio::time::timeout(opts.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {:?} after shutdown; closing them",
            opts.drain
        );
    }
}

async fn connection<I>(
    io: TokioIo<I>,
    remote: SocketAddr,
    handler: Arc<dyn Handler>,
    opts: &Options,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(req, remote).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(opts.header_read_timeout)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
