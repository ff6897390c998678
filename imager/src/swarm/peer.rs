//! A member's chunk server: read-only, one route, bounded.
//!
//! `GET /v1/swarm/chunks/{id}` with the session's token answers the chunk's
//! zstd frame from the [`Store`]. Bounds (a student's machine on the LAN
//! must not be able to stall it): `max_connections` connections in all and
//! [`per_address`] from one address (a connection past either is closed at
//! once, never queued, so the accept loop never waits), request headers
//! within 10 s, `slots` responses in progress at once (more get `503` at
//! once, so the asker goes elsewhere), a response whose reader stalls for
//! 15 s or takes longer than 60 s in all is dropped, an idle connection is
//! closed after 15 s, and memory is the store's cache plus at most `slots`
//! windows being rebuilt from the target.
//!
//! This is the only HTTP server in `aula-imager`: the crate otherwise knows
//! nothing of servers; the swarm needs every restoring machine to serve
//! its peers, and `aula-imager restore --swarm` to take part on its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::store::Store;
use super::wire::PEER_CHUNKS;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};

/// Pieces a frame is sent in: the upload slot is held until the last piece
/// is handed to the connection.
const PIECE: usize = 64 << 10;
/// A response whose reader takes nothing for this long is dropped.
const STALL: Duration = Duration::from_secs(15);
/// An idle keep-alive connection is closed after this.
const IDLE: Duration = Duration::from_secs(15);
/// A response (one chunk) must be taken whole within this.
const SEND_DEADLINE: Duration = Duration::from_secs(60);

/// Connections one address may hold at once: an asker needs one per fetch
/// it runs against this member (the coordinator hands out one at a time
/// per pair) plus kept-alive ones.
pub fn per_address(max_connections: usize) -> usize {
    (max_connections / 8).clamp(4, 16)
}

struct Shared {
    store: Arc<Store>,
    token: RwLock<Option<String>>,
    slots: Arc<Semaphore>,
    epoch: Instant,
}

/// A running chunk server; stops when dropped.
pub struct PeerServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<tokio::sync::Notify>,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl PeerServer {
    /// Bind `bind` and serve `store` on `handle`'s runtime. Requests are
    /// refused until [`PeerServer::set_token`].
    pub fn start(
        handle: &tokio::runtime::Handle,
        bind: SocketAddr,
        store: Arc<Store>,
        slots: usize,
        max_connections: usize,
    ) -> Result<PeerServer> {
        let listener = {
            let _g = handle.enter();
            let std = std::net::TcpListener::bind(bind).map_err(|e| Error::Io {
                what: format!("binding the swarm chunk server on {bind}"),
                source: e,
            })?;
            std.set_nonblocking(true).map_err(|e| Error::Io {
                what: "configuring the swarm chunk server socket".into(),
                source: e,
            })?;
            tokio::net::TcpListener::from_std(std).map_err(|e| Error::Io {
                what: "registering the swarm chunk server socket".into(),
                source: e,
            })?
        };
        let addr = listener.local_addr().map_err(|e| Error::Io {
            what: "reading the swarm chunk server address".into(),
            source: e,
        })?;
        let shared = Arc::new(Shared {
            store,
            token: RwLock::new(None),
            slots: Arc::new(Semaphore::new(slots.max(1))),
            epoch: Instant::now(),
        });
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = Arc::new(AtomicBool::new(false));
        handle.spawn(accept_loop(
            listener,
            shared.clone(),
            stop.clone(),
            stopped.clone(),
            max_connections.max(1),
        ));
        tracing::debug!(%addr, "swarm chunk server started");
        Ok(PeerServer {
            addr,
            shared,
            stop,
            stopped,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve holders of this session token.
    pub fn set_token(&self, token: &str) {
        if let Ok(mut t) = self.shared.token.write() {
            *t = Some(token.to_string());
        }
    }

    /// Stop accepting and close every connection.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: Arc<tokio::sync::Notify>,
    stopped: Arc<AtomicBool>,
    max_connections: usize,
) {
    let conns = Arc::new(Semaphore::new(max_connections));
    let per_ip = per_address(max_connections);
    let by_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stopping = stop.notified();
        tokio::pin!(stopping);
        stopping.as_mut().enable();
        if stopped.load(Ordering::SeqCst) {
            break;
        }
        let (stream, remote) = tokio::select! {
            _ = &mut stopping => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(error = %e, "swarm chunk server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        // Full, in all or for this address: closed at once.
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "swarm chunk server: connection table full; closed");
            continue;
        };
        let ip = remote.ip().to_canonical();
        {
            let mut g = by_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = g.entry(ip).or_insert(0);
            if *n >= per_ip {
                tracing::debug!(%remote, "swarm chunk server: too many connections from this address; closed");
                continue;
            }
            *n += 1;
        }
        let _ = stream.set_nodelay(true);
        mark_bulk(&stream);
        let shared = shared.clone();
        let by_ip = by_ip.clone();
        tasks.spawn(async move {
            let _permit = permit;
            serve(stream, remote, shared).await;
            let mut g = by_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = g.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    g.remove(&ip);
                }
            }
        });
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::debug!("swarm chunk server stopped");
}

/// Mark a peer connection's packets as bulk traffic that yields to the
/// machine's own: DSCP CS1 ("lower effort", for switches that honour it)
/// and socket priority 2 (`TC_PRIO_BULK`), which Linux's default host queue
/// (`pfifo_fast`, and `prio`) sends after everything of priority 0. So a
/// member's uploads do not delay the acknowledgements and requests of its
/// own restore on its port. Best effort: a socket that refuses is served
/// unmarked. (The TOS first: setting it resets the priority.)
fn mark_bulk(stream: &tokio::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    /// DSCP CS1 in the TOS byte.
    const TOS_CS1: libc::c_int = 0x20;
    /// `TC_PRIO_BULK`.
    const PRIO_BULK: libc::c_int = 2;
    if stream.local_addr().is_ok_and(|a| a.is_ipv4()) {
        if let Err(e) = setsockopt(stream, sockopt::IpTos, &TOS_CS1) {
            tracing::debug!(error = %e, "swarm chunk server: setting DSCP CS1 failed");
        }
    }
    if let Err(e) = setsockopt(stream, sockopt::Priority, &PRIO_BULK) {
        tracing::debug!(error = %e, "swarm chunk server: setting the socket priority failed");
    }
}

/// Activity of one connection, for the stall and idle watchdog.
struct Activity {
    busy: AtomicBool,
    last_ms: AtomicU64,
    /// When the response in progress began (ms since `epoch`).
    busy_since_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn start_sending(&self) {
        self.busy_since_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.busy.store(true, Ordering::Relaxed);
    }
    fn sending_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.busy_since_ms.load(Ordering::Relaxed)))
    }
    fn quiet_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

async fn serve(stream: tokio::net::TcpStream, remote: SocketAddr, shared: Arc<Shared>) {
    let act = Arc::new(Activity {
        busy: AtomicBool::new(false),
        last_ms: AtomicU64::new(0),
        busy_since_ms: AtomicU64::new(0),
        epoch: shared.epoch,
    });
    act.touch();
    let a2 = act.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let act = a2.clone();
        async move {
            act.touch();
            Ok::<_, Infallible>(answer(&shared, &req, act).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(10))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    let watchdog = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let quiet = act.quiet_for();
            if act.busy.load(Ordering::Relaxed) {
                if quiet > STALL {
                    tracing::debug!(%remote, "swarm chunk server: reader stalled; closing");
                    return;
                }
                if act.sending_for() > SEND_DEADLINE {
                    tracing::debug!(%remote, "swarm chunk server: reader too slow; closing");
                    return;
                }
            } else if quiet > IDLE {
                return;
            }
        }
    };
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(%remote, error = %e, "swarm chunk server connection ended");
        },
        _ = watchdog => {}
    }
}

type Resp = Response<Reply>;

fn plain(status: StatusCode, msg: &str) -> Resp {
    let mut r = Response::new(Reply::text(msg));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn answer(shared: &Arc<Shared>, req: &Request<Incoming>, act: Arc<Activity>) -> Resp {
    let store = &shared.store;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let Some(id) = req.uri().path().strip_prefix(PEER_CHUNKS) else {
        return plain(StatusCode::NOT_FOUND, "no such route\n");
    };
    let Ok(id) = id.parse::<ChunkId>() else {
        return plain(StatusCode::BAD_REQUEST, "invalid chunk id\n");
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = match (given, shared.token.read().ok().and_then(|t| t.clone())) {
        (Some(g), Some(t)) => crate::tls::secrets_equal(g.as_bytes(), t.as_bytes()),
        _ => false,
    };
    if !ok {
        store.unauthorized.fetch_add(1, Ordering::Relaxed);
        return plain(
            StatusCode::UNAUTHORIZED,
            "this swarm session's token is needed\n",
        );
    }
    if !store.holds(&id) {
        store.not_held.fetch_add(1, Ordering::Relaxed);
        return plain(StatusCode::NOT_FOUND, "not held here\n");
    }
    let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
        store.busy.fetch_add(1, Ordering::Relaxed);
        let mut r = plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "every upload slot is busy\n",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let frame = match store.frame(&id) {
        Some(f) => {
            store.from_cache.fetch_add(1, Ordering::Relaxed);
            Some(f)
        }
        None => {
            let s2 = store.clone();
            match tokio::task::spawn_blocking(move || s2.rebuild(&id)).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    tracing::warn!("serving chunk {id} from the target: {e}");
                    None
                }
                Err(e) => {
                    tracing::warn!("serving chunk {id}: worker failed: {e}");
                    None
                }
            }
        }
    };
    let Some(frame) = frame else {
        store.not_held.fetch_add(1, Ordering::Relaxed);
        return plain(StatusCode::NOT_FOUND, "not held here\n");
    };
    store.served.fetch_add(1, Ordering::Relaxed);
    store
        .bytes_served
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    let len = frame.len();
    let body = if req.method() == Method::HEAD {
        Reply::text("")
    } else {
        act.start_sending();
        Reply::Frame {
            data: frame,
            _permit: permit,
            act,
        }
    };
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/zstd"));
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        r.headers_mut().insert(hyper::header::CONTENT_LENGTH, v);
    }
    r
}

/// A response body: a short text, or a frame sent in pieces while holding
/// an upload slot.
enum Reply {
    Text(Option<Bytes>),
    Frame {
        data: Bytes,
        _permit: OwnedSemaphorePermit,
        act: Arc<Activity>,
    },
}

impl Reply {
    fn text(s: &str) -> Reply {
        Reply::Text(Some(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Reply::Frame { act, .. } = self {
            act.busy.store(false, Ordering::Relaxed);
            act.touch();
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Text(t) => Poll::Ready(
                t.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Reply::Frame { data, act, .. } => {
                if data.is_empty() {
                    return Poll::Ready(None);
                }
                act.touch();
                let piece = data.split_to(PIECE.min(data.len()));
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Text(t) => t.as_ref().is_none_or(|b| b.is_empty()),
            Reply::Frame { data, .. } => data.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            Reply::Frame { data, .. } => SizeHint::with_exact(data.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str, token: Option<&str>, method: &str) -> (u16, Vec<u8>) {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(out.len(), |p| p + 4);
        let status = String::from_utf8_lossy(&out[..head_end])
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out[head_end..].to_vec())
    }

    #[test]
    fn chunks_are_served_only_with_the_token_only_when_held_and_only_within_the_slots() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let store = Arc::new(Store::new(64 << 20, false));
        let small = ChunkId([1; 32]);
        let big = ChunkId([2; 32]);
        store.insert_frame(small, Bytes::from_static(b"a small frame"));
        let big_frame: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        store.insert_frame(big, Bytes::from(big_frame.clone()));
        let srv = PeerServer::start(
            rt.handle(),
            "127.0.0.1:0".parse().expect("addr"),
            store.clone(),
            1,
            8,
        )
        .expect("start");
        let a = srv.addr();
        let path = |id: &ChunkId| format!("{PEER_CHUNKS}{id}");
        // No token yet: nobody is served.
        assert_eq!(get(a, &path(&small), Some("tok"), "GET").0, 401);
        srv.set_token("tok");
        assert_eq!(get(a, &path(&small), None, "GET").0, 401);
        assert_eq!(get(a, &path(&small), Some("tik"), "GET").0, 401);
        assert_eq!(get(a, &path(&ChunkId([3; 32])), Some("tok"), "GET").0, 404);
        assert_eq!(get(a, "/v1/swarm/chunks/zz", Some("tok"), "GET").0, 400);
        assert_eq!(get(a, "/v1/images", Some("tok"), "GET").0, 404);
        assert_eq!(get(a, &path(&small), Some("tok"), "DELETE").0, 405);
        let (s, body) = get(a, &path(&small), Some("tok"), "GET");
        assert_eq!((s, body.as_slice()), (200, &b"a small frame"[..]));
        // One slot: while a reader holds the big frame half read, the next
        // asker is told busy at once; then it is served.
        let mut slow = std::net::TcpStream::connect(a).expect("connect");
        slow.write_all(
            format!(
                "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n",
                path(&big)
            )
            .as_bytes(),
        )
        .expect("send");
        let mut head = [0u8; 12];
        slow.read_exact(&mut head).expect("status line");
        assert_eq!(&head[9..12], b"200");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(get(a, &path(&small), Some("tok"), "GET").0, 503);
        let mut rest = Vec::new();
        slow.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        while rest.len() < big_frame.len() {
            let mut buf = vec![0u8; 1 << 20];
            let n = slow.read(&mut buf).expect("read");
            assert!(n > 0, "the big frame ended early");
            rest.extend_from_slice(&buf[..n]);
        }
        let start = rest.len() - big_frame.len();
        assert!(rest[start..] == big_frame[..], "the big frame differs");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(get(a, &path(&small), Some("tok"), "GET").0, 200);
        let st = store.stats();
        assert_eq!(st.busy, 1);
        assert_eq!(st.unauthorized, 3);
        assert_eq!(st.chunks_served, 3);
        srv.stop();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            std::net::TcpStream::connect(a).is_err(),
            "still listening after stop"
        );
    }

    #[test]
    fn silent_connections_from_one_address_past_its_share_are_closed_at_once_and_others_are_served()
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let store = Arc::new(Store::new(1 << 20, false));
        let id = ChunkId([7; 32]);
        store.insert_frame(id, Bytes::from_static(b"frame"));
        let srv = PeerServer::start(
            rt.handle(),
            "127.0.0.1:0".parse().expect("addr"),
            store,
            2,
            8,
        )
        .expect("start");
        srv.set_token("tok");
        let a = srv.addr();
        let share = per_address(8);
        // A student's machine opens its share of connections and says nothing.
        let held: Vec<std::net::TcpStream> = (0..share)
            .map(|_| std::net::TcpStream::connect(a).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // One more from the same address is closed at once, not queued.
        let mut extra = std::net::TcpStream::connect(a).expect("connect");
        extra
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let t0 = Instant::now();
        let mut b = [0u8; 16];
        let n = extra.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0, "the connection past the share was answered");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "it was not closed at once"
        );
        // The silent ones are dropped after the header deadline (10 s); a
        // request from the address then is served.
        std::thread::sleep(Duration::from_secs(11));
        let (s, body) = get(a, &format!("{PEER_CHUNKS}{id}"), Some("tok"), "GET");
        assert_eq!((s, body.as_slice()), (200, &b"frame"[..]));
        drop(held);
    }
}
