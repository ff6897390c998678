//! The HTTP(S) listeners: `aula_httpkit`'s accept loop (connection limit,
//! bounded handshakes, graceful shutdown), dispatching each request to the
//! first [`RouteGroup`] that claims its path. The boot files, the API and
//! the repository are groups; embedders add their own.
//!
//! With HTTPS on (the default), the plain HTTP listener serves only the
//! groups whose [`RouteGroup::plain_http`] is true (the boot files firmware
//! fetches); every other route answers 403 there, naming the HTTPS URL, so
//! no token or secret answer ever travels in clear.

pub mod api;
pub mod boot;
pub mod files;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use aula_httpkit::{empty, full, Body};

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
    /// The request came over TLS.
    pub secure: bool,
}

/// A set of routes under a common path prefix, served by the same process.
pub trait RouteGroup: Send + Sync + 'static {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Whether this group handles `path`.
    fn matches(&self, path: &str) -> bool;
    /// Handles a request whose path this group claimed.
    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse>;
    /// Served over plain HTTP even when HTTPS is on: only what firmware
    /// fetches (no secrets either way). Default: HTTPS only.
    fn plain_http(&self) -> bool {
        false
    }
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

/// The credential of a request's `Authorization` header (`Bearer <key>`
/// or a bare `<key>`).
pub fn credential(req: &HttpRequest) -> Option<&str> {
    aula_httpkit::auth::credential(req.headers())
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

/// Which route groups a listener serves.
#[derive(Debug, Clone)]
pub enum Serves {
    /// Every group.
    All,
    /// Only [`RouteGroup::plain_http`] groups; the others answer 403
    /// pointing at `https_url`.
    PlainOnly {
        /// Base URL of the HTTPS listener.
        https_url: String,
    },
}

struct Dispatcher {
    groups: Arc<[Arc<dyn RouteGroup>]>,
    serves: Serves,
    secure: bool,
}

impl aula_httpkit::server::Handler for Dispatcher {
    fn handle(
        &self,
        req: HttpRequest,
        remote: SocketAddr,
    ) -> aula_httpkit::server::BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            let ctx = RequestContext {
                remote,
                secure: self.secure,
            };
            dispatch(&self.groups, &self.serves, req, ctx).await
        })
    }
}

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })
}

/// Spawns the accept loop of `listener` on `tracker`, with the limits of
/// `opts`. With `tls`, every connection is a TLS connection.
pub fn spawn(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    groups: Vec<Arc<dyn RouteGroup>>,
    serves: Serves,
    opts: aula_httpkit::server::Options,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    let groups: Arc<[Arc<dyn RouteGroup>]> = groups.into();
    tracing::info!(
        local = ?listener.local_addr().ok(), tls = tls.is_some(), ?serves,
        groups = ?groups.iter().map(|g| g.name()).collect::<Vec<_>>(), "HTTP service started"
    );
    let handler = Arc::new(Dispatcher {
        groups,
        serves,
        secure: tls.is_some(),
    });
    tracker.spawn(async move {
        aula_httpkit::server::serve(listener, tls, handler, opts, cancel).await;
        tracing::debug!("HTTP service stopped");
    });
}

/// Binds `bind` and serves every group on it (see [`spawn`]), with the
/// default limits and `max_connections`.
pub async fn start(
    bind_addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    groups: Vec<Arc<dyn RouteGroup>>,
    max_connections: usize,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, HttpError> {
    let listener = bind(bind_addr).await?;
    let local = listener.local_addr().map_err(|source| HttpError {
        addr: bind_addr,
        source,
    })?;
    spawn(
        listener,
        tls,
        groups,
        Serves::All,
        aula_httpkit::server::Options {
            max_connections,
            ..Default::default()
        },
        cancel,
        tracker,
    );
    Ok(local)
}

async fn dispatch(
    groups: &[Arc<dyn RouteGroup>],
    serves: &Serves,
    req: HttpRequest,
    ctx: RequestContext,
) -> HttpResponse {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let group = groups.iter().find(|g| g.matches(&path));
    let resp = match (group, serves) {
        (Some(g), Serves::PlainOnly { https_url }) if !g.plain_http() => error_json(
            StatusCode::FORBIDDEN,
            &format!("{path} is served over HTTPS only: {https_url}{path}"),
        ),
        (Some(g), _) => g.handle(req, ctx).await,
        (None, _) => error_json(StatusCode::NOT_FOUND, "no such route"),
    };
    tracing::info!(
        remote = %ctx.remote, secure = ctx.secure, %method, %path, group = group.map(|g| g.name()).unwrap_or("-"),
        response_code = resp.status().as_u16(), latency_us = started.elapsed().as_micros() as u64,
        "request completed"
    );
    resp
}
