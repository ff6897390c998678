//! The HTTP server: a hyper 1 accept loop with a connection limit and
//! graceful shutdown, dispatching each request to the first [`RouteGroup`]
//! that claims its path. The boot files and the API are two groups; later
//! services (the image repository) add their own without touching this file.

pub mod api;
pub mod boot;
pub mod files;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Response body type shared by all route groups.
pub type Body = BoxBody<Bytes, io::Error>;
/// A request as handlers receive it.
pub type HttpRequest = Request<Incoming>;
/// A response as handlers return it.
pub type HttpResponse = Response<Body>;
/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Per-request facts that are not in the request itself.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext {
    /// The peer.
    pub remote: SocketAddr,
}

/// A set of routes under a common path prefix, served by the same process.
pub trait RouteGroup: Send + Sync + 'static {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Whether this group handles `path`.
    fn matches(&self, path: &str) -> bool;
    /// Handles a request whose path this group claimed.
    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse>;
}

/// Errors starting the HTTP service.
#[derive(Debug, thiserror::Error)]
#[error("binding HTTP listener {addr}")]
pub struct HttpError {
    /// Address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// A complete body.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A response with a body and content type.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The bearer token of a request's `Authorization` header, trimmed.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(mut v) => {
            v.push(b'\n');
            response(status, "application/json", v)
        }
        Err(e) => {
            tracing::error!(error = %e, "encoding JSON response");
            response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "internal error\n",
            )
        }
    }
}

/// A JSON error `{"error": message}`.
pub fn error_json(status: StatusCode, message: &str) -> HttpResponse {
    json(status, &serde_json::json!({ "error": message }))
}

/// Binds the listener and spawns the accept loop on `tracker`. With `tls`,
/// every connection is a TLS connection (same route groups).
pub async fn start(
    bind: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    groups: Vec<Arc<dyn RouteGroup>>,
    max_connections: usize,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| HttpError { addr: bind, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError { addr: bind, source })?;
    let groups: Arc<[Arc<dyn RouteGroup>]> = groups.into();
    tracing::info!(%local, tls = tls.is_some(), groups = ?groups.iter().map(|g| g.name()).collect::<Vec<_>>(), "HTTP service started");
    tracker.spawn(accept_loop(listener, tls, groups, max_connections, cancel));
    Ok(local)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    groups: Arc<[Arc<dyn RouteGroup>]>,
    max_connections: usize,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
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
        let groups = groups.clone();
        // Subscribed before the task starts, so a shutdown signalled from here
        // on reaches this connection too (handshaking ones drop out on cancel).
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve(TokioIo::new(stream), remote, groups, watcher).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    let tls_stream = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = handshake => match r {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                return;
                            }
                        },
                    };
                    serve(TokioIo::new(tls_stream), remote, groups, watcher).await
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after 5 s; closing them");
    }
    tracing::debug!("HTTP service stopped");
}

async fn serve<I>(
    io: TokioIo<I>,
    remote: SocketAddr,
    groups: Arc<[Arc<dyn RouteGroup>]>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: HttpRequest| {
        let groups = groups.clone();
        async move { Ok::<_, Infallible>(dispatch(&groups, req, RequestContext { remote }).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(30))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
    }
}

async fn dispatch(
    groups: &[Arc<dyn RouteGroup>],
    req: HttpRequest,
    ctx: RequestContext,
) -> HttpResponse {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let group = groups.iter().find(|g| g.matches(&path));
    let resp = match group {
        Some(g) => g.handle(req, ctx).await,
        None => error_json(StatusCode::NOT_FOUND, "no such route"),
    };
    tracing::info!(
        remote = %ctx.remote, %method, %path, group = group.map(|g| g.name()).unwrap_or("-"),
        response_code = resp.status().as_u16(), latency_us = started.elapsed().as_micros() as u64,
        "request completed"
    );
    resp
}
