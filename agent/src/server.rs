//! The HTTPS listener: `aula_httpkit`'s accept loop (one semaphore permit
//! per connection, at most half of them per client address, deadlines for
//! TLS handshakes, request heads and bodies and stalled responses, hyper
//! HTTP/1.1, graceful shutdown with connections drained for at most 5 s)
//! answering with [`crate::api::handle`].

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::Body;
use crate::Ctx;

struct Api(Arc<Ctx>);

impl aula_httpkit::server::Handler for Api {
    fn handle(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> aula_httpkit::server::BoxFuture<'_, Response<Body>> {
        Box::pin(crate::api::handle(self.0.clone(), req, remote))
    }
}

/// Serve until `stop`, then drain connections (at most 5 s).
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    ctx: Arc<Ctx>,
    stop: CancellationToken,
) {
    let max = ctx.settings.listen.max_connections.max(1);
    let opts = aula_httpkit::server::Options {
        max_connections: max,
        // The core (or console) may open many connections from one
        // address; anyone else on the LAN may take at most half the slots
        // from one address (and slow request heads make room when full).
        max_connections_per_ip: (max / 2).max(1),
        ..Default::default()
    };
    aula_httpkit::server::serve(listener, Some(tls), Arc::new(Api(ctx)), opts, stop).await;
}

/// Bind the listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
