//! The accept loop: HTTP/1.1 over plain TCP or TLS, one task per
//! connection holding one permit of a semaphore.
//!
//! | limit | default | what happens |
//! |---|---|---|
//! | `max_connections` | 512 | more connections wait in the kernel's backlog, except that a full table first closes the oldest connection that has been waiting for a request head for over a second (see below) |
//! | `max_connections_per_ip` | 32 | a further connection from that address is closed at once |
//! | `handshake_timeout` | 10 s | the TLS handshake is abandoned |
//! | `header_read_timeout` | 20 s | a request head (the first, or the next on a kept-alive connection) not complete in time closes the connection |
//! | `body_idle_timeout` | 10 s | a body read ([`crate::body::read_limited`]) fails with 408 after a gap this long |
//! | `request_timeout` | 60 s | a body not complete this long after its head fails with 408: with the head's limit, a request takes at most 80 s to arrive |
//! | `send_stall_timeout` | 30 s | a response the client does not read (no byte accepted for this long) is dropped with its connection ([`crate::stall`]) |
//!
//! Slow request heads are the cheapest way to hold a slot (Slowloris).
//! When every slot is taken, a new connection therefore closes the oldest
//! connection that has been waiting for a request head (its first, or the
//! next one on a kept-alive connection whose last response is sent) or for
//! its TLS handshake for over [`EVICT_AFTER`]; a connection with a request
//! in progress is never closed that way, and an idle kept-alive one only
//! when the table is full (HTTP clients reopen such connections). Transient accept errors (EMFILE …)
//! are logged and retried after 100 ms.
//!
//! Shutdown: when `cancel` fires the listener closes, handshakes in progress
//! are dropped, and connections already serving get hyper's graceful close
//! (finish the request in flight, then close); after `drain` whatever is
//! left is cut.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// How long a connection may wait for its first request head before a
/// full connection table may close it for a newcomer.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// Limits of a listener (see the module table).
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one client address.
    pub max_connections_per_ip: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest wait for a request head on an open connection.
    pub header_read_timeout: Duration,
    /// Longest gap between two pieces of a request body.
    pub body_idle_timeout: Duration,
    /// Longest time from a request's head to the end of its body.
    pub request_timeout: Duration,
    /// Longest time a response may wait for the client to accept a byte.
    pub send_stall_timeout: Duration,
    /// How long open connections may finish after shutdown.
    pub drain: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_connections: 512,
            max_connections_per_ip: 32,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(20),
            body_idle_timeout: crate::body::DEFAULT_BODY_IDLE,
            request_timeout: crate::body::DEFAULT_REQUEST_TIMEOUT,
            send_stall_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(5),
        }
    }
}

/// Open connections per client address.
struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerIp`], given back on drop.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn enter(table: &Arc<PerIp>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = table.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= table.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Connections waiting for a request head (their first, or the next one
/// after a complete response): the ones a full table may close (see the
/// module doc).
#[derive(Default)]
struct Waiting {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (Instant, CancellationToken)>>,
}

impl Waiting {
    fn add(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.wait(id, &token);
        (id, token)
    }

    /// Connection `id` waits (again) for a head from now on.
    fn wait(&self, id: u64, token: &CancellationToken) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (Instant::now(), token.clone()));
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Closes the oldest waiting connection older than [`EVICT_AFTER`];
    /// false when there is none.
    fn evict_oldest(&self) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = conns
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= EVICT_AFTER)
            .min_by_key(|(_, (since, _))| *since)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| conns.remove(&id)) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// Normalises an IPv4-mapped IPv6 address, so both forms count as one client.
fn client_ip(remote: SocketAddr) -> IpAddr {
    match remote.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(remote.ip()),
        v4 => v4,
    }
}

/// Logs a warning at most every 10 s per kind, so a flood cannot flood the log.
fn warn_throttled(last: &AtomicU64, message: &str, remote: SocketAddr) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // Seconds since the first call, plus one: 0 in `last` means "never".
    let now = START.get_or_init(Instant::now).elapsed().as_secs() + 1;
    let prev = last.load(Ordering::Relaxed);
    if (prev == 0 || now >= prev + 10)
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(%remote, "{message} (repeats within 10 s are not logged)");
    } else {
        tracing::debug!(%remote, "{message}");
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
    let per_ip = Arc::new(PerIp {
        max: opts.max_connections_per_ip.max(1),
        open: Mutex::new(HashMap::new()),
    });
    let waiting = Arc::new(Waiting::default());
    let (warned_ip, warned_full) = (AtomicU64::new(0), AtomicU64::new(0));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
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
        let Some(ip_slot) = PerIp::enter(&per_ip, client_ip(remote)) else {
            warn_throttled(
                &warned_ip,
                "connection refused: this address holds max_connections_per_ip connections",
                remote,
            );
            continue;
        };
        // A free slot, or one made by closing a connection that sent no
        // request (checked again as such connections age), or else wait
        // for a connection to end.
        let permit = loop {
            if let Ok(p) = slots.clone().try_acquire_owned() {
                break Some(p);
            }
            if waiting.evict_oldest() {
                warn_throttled(
                    &warned_full,
                    "all connection slots taken: closed the connection waiting longest for a request",
                    remote,
                );
            }
            tokio::select! {
                _ = cancel.cancelled() => break None,
                p = slots.clone().acquire_owned() => break p.ok(),
                _ = tokio::time::sleep(EVICT_AFTER / 4) => {}
            }
        };
        let Some(permit) = permit else { break };
        let _ = stream.set_nodelay(true);
        let stream = crate::stall::StallGuard::new(stream, opts.send_stall_timeout);
        // Subscribed before the task starts, so a shutdown signalled from
        // here on reaches this connection too.
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let cancel = cancel.clone();
        let handler = handler.clone();
        let opts = opts.clone();
        let waiting = waiting.clone();
        let (wait_id, evicted) = waiting.add();
        tokio::spawn(
            async move {
                let _permit = permit;
                let _ip_slot = ip_slot;
                let conn = Conn {
                    remote,
                    handler,
                    opts: &opts,
                    waiting: &waiting,
                    wait_id,
                    evict: evicted.clone(),
                };
                let serve = async {
                    match tls {
                        None => conn.serve(TokioIo::new(stream), watcher).await,
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(
                                opts.handshake_timeout,
                                acceptor.accept(stream),
                            );
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
                            conn.serve(TokioIo::new(tls_stream), watcher).await
                        }
                    }
                };
                tokio::select! {
                    _ = evicted.cancelled() => {
                        tracing::debug!("closed: waiting for a request while every slot was taken");
                    }
                    _ = serve => {}
                }
                waiting.remove(wait_id);
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

/// What one connection's task needs.
struct Conn<'a> {
    remote: SocketAddr,
    handler: Arc<dyn Handler>,
    opts: &'a Options,
    waiting: &'a Arc<Waiting>,
    wait_id: u64,
    evict: CancellationToken,
}

/// A response body that, once sent (or abandoned), puts its connection
/// back among those waiting for a head.
struct Tracked {
    inner: Body,
    waiting: Arc<Waiting>,
    id: u64,
    evict: CancellationToken,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Hyper drops a response body when it is written out (or the
        // connection failed; then the connection task ends right after and
        // removes this entry itself).
        if !self.evict.is_cancelled() {
            self.waiting.wait(self.id, &self.evict);
        }
    }
}

impl Conn<'_> {
    async fn serve<I>(self, io: TokioIo<I>, watcher: hyper_util::server::graceful::Watcher)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            remote,
            handler,
            opts,
            waiting,
            wait_id,
            evict,
        } = self;
        let (idle, request_timeout) = (opts.body_idle_timeout, opts.request_timeout);
        let waiting = waiting.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            // A head arrived: this connection is no longer one a full
            // table may close.
            waiting.remove(wait_id);
            let handler = handler.clone();
            let deadlines = crate::body::Deadlines {
                idle,
                until: tokio::time::Instant::now() + request_timeout,
            };
            let (waiting, evict) = (waiting.clone(), evict.clone());
            async move {
                let resp =
                    crate::body::with_deadlines(deadlines, handler.handle(req, remote)).await;
                Ok::<_, Infallible>(resp.map(|inner| {
                    http_body_util::BodyExt::boxed(Tracked {
                        inner,
                        waiting,
                        id: wait_id,
                        evict,
                    })
                }))
            }
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
}
