//! The swarm member: joins the coordinator, asks it for work, fetches each
//! chunk from the peer or the server it names, falls back to the
//! repository when a peer fails, reports, and serves what it holds.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::peer::PeerServer;
use super::store::{ServeStats, Store};
use super::wire::{
    Assignment, Done, Failed, JoinRequest, JoinResponse, LeaveRequest, SyncRequest, SyncResponse,
    COORDINATOR, PEER_CHUNKS, SERVER,
};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::repo::{HttpRepo, Repository};
use crate::restore::{Feed, Placed, Ticket};

/// Largest frame accepted from a peer (zstd bound of the largest chunk).
const MAX_FRAME: usize = (64 << 20) + (64 << 20) / 255 + 1024;
/// After the coordinator fails, fetch from the repository alone this long
/// before asking it again.
const COORDINATOR_PAUSE: Duration = Duration::from_secs(10);
/// A worker that got no work for this long fetches its next chunk from the
/// repository on its own (the coordinator normally hands out the server
/// well before).
const STARVED: Duration = Duration::from_secs(20);

/// After a peer answered busy, wait this long before asking again.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

/// How a member takes part.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// Serve peers from this address (port 0: any free port); None: fetch
    /// only, serve nothing.
    pub listen: Option<SocketAddr>,
    /// Uploads served at once.
    pub slots: usize,
    /// Connections the chunk server accepts at once.
    pub max_connections: usize,
    /// RAM kept for verified frames to serve (bytes).
    pub cache_bytes: usize,
    /// Also serve chunks by reading them back from the target.
    pub serve_from_target: bool,
    /// A peer that sends nothing for this long is given up (and avoided).
    pub peer_stall: Duration,
    /// A peer must deliver a whole chunk within this.
    pub peer_deadline: Duration,
    /// Longest wait of one request for work (long poll).
    pub wait: Duration,
    /// Cancelled: stop waiting and fetching.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for SwarmOptions {
    fn default() -> Self {
        SwarmOptions {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 0))),
            slots: super::wire::default_slots() as usize,
            max_connections: 128,
            cache_bytes: 256 << 20,
            serve_from_target: true,
            peer_stall: Duration::from_secs(5),
            peer_deadline: Duration::from_secs(60),
            wait: Duration::from_secs(2),
            cancel: None,
        }
    }
}

/// What the member did, besides the restore's own counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwarmStats {
    /// Session (`image@version`).
    pub session: String,
    /// This member's id.
    pub member: String,
    /// Where its chunk server listened.
    pub serving: Option<SocketAddr>,
    /// Chunks handed out by the coordinator.
    pub assigned: u64,
    /// Of those, from peers.
    pub assigned_peers: u64,
    /// Peer fetches that failed (the chunk then came from the server).
    pub peer_failures: u64,
    /// Of those, frames that failed verification.
    pub peer_corrupt: u64,
    /// Peers this member stopped asking.
    pub avoided: Vec<String>,
    /// Chunks fetched from the repository without the coordinator (it did
    /// not answer, or had nothing for a long time).
    pub on_own: u64,
    /// What it served.
    pub served: ServeStats,
}

#[derive(Default)]
struct Outbox {
    want: Vec<ChunkId>,
    have: Vec<ChunkId>,
    dropped: Vec<ChunkId>,
    done: Vec<Done>,
    failed: Vec<Failed>,
    released: Vec<ChunkId>,
    received: Vec<ChunkId>,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.want.is_empty()
            && self.have.is_empty()
            && self.dropped.is_empty()
            && self.done.is_empty()
            && self.failed.is_empty()
            && self.released.is_empty()
            && self.received.is_empty()
    }
    fn merge(&mut self, o: Outbox) {
        self.want.extend(o.want);
        self.have.extend(o.have);
        self.dropped.extend(o.dropped);
        self.done.extend(o.done);
        self.failed.extend(o.failed);
        self.released.extend(o.released);
        self.received.extend(o.received);
    }
}

#[derive(Default)]
struct Local {
    /// Wanted again, and held by this member's own store (a chunk restored
    /// elsewhere on the disk before): taken from there.
    local: VecDeque<ChunkId>,
    /// Wanted, not done, not being fetched (in want order; entries no
    /// longer in `pending_set` are stale).
    pending: VecDeque<ChunkId>,
    pending_set: HashSet<ChunkId>,
    inflight: HashSet<ChunkId>,
    done: HashSet<ChunkId>,
    outbox: Outbox,
    avoid: HashSet<String>,
    coordinator_down_until: Option<Instant>,
    last_sync: Option<Instant>,
    restoring: Option<u32>,
    finished: bool,
}

impl Local {
    fn want(&mut self, id: ChunkId) {
        if self.pending_set.insert(id) {
            self.pending.push_back(id);
            self.outbox.want.push(id);
        }
    }

    fn pop_pending(&mut self) -> Option<ChunkId> {
        while let Some(id) = self.pending.pop_front() {
            if self.pending_set.remove(&id) {
                return Some(id);
            }
        }
        None
    }
}

type PeerClient = Client<HttpConnector, Empty<Bytes>>;

/// A member of an image's swarm. Give it to a restore as its
/// [`Feed`]; after the restore call [`Swarm::finish`], optionally
/// [`Swarm::linger`], then [`Swarm::leave`].
pub struct Swarm {
    repo: Arc<HttpRepo>,
    handle: tokio::runtime::Handle,
    store: Arc<Store>,
    server: Option<PeerServer>,
    join: JoinResponse,
    peers: PeerClient,
    opts: SwarmOptions,
    local: Mutex<Local>,
    assigned: AtomicU64,
    assigned_peers: AtomicU64,
    peer_failures: AtomicU64,
    peer_corrupt: AtomicU64,
    on_own: AtomicU64,
    stop: Arc<AtomicBool>,
    wake: Arc<(Mutex<()>, Condvar)>,
    /// A transfer finished: the heartbeat tells the coordinator at once, so
    /// the source's upload slot is handed out again while this member
    /// verifies and writes the chunk.
    urgent: Arc<AtomicBool>,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("session", &self.join.session)
            .field("member", &self.join.member)
            .finish()
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Repo(format!("encoding a swarm request: {e}")))
}

impl Swarm {
    /// Join the swarm of `m` at the repository service `repo` serves (its
    /// coordinator), and start serving peers when `opts.listen` is set.
    pub fn join(repo: Arc<HttpRepo>, m: &Manifest, opts: SwarmOptions) -> Result<Arc<Swarm>> {
        let handle = repo.runtime();
        let store = Arc::new(Store::new(opts.cache_bytes, opts.serve_from_target));
        let server = match opts.listen {
            Some(bind) => Some(PeerServer::start(
                &handle,
                bind,
                store.clone(),
                opts.slots,
                opts.max_connections,
            )?),
            None => None,
        };
        let req = JoinRequest {
            image: m.name.clone(),
            version: m.image_version,
            port: server.as_ref().map(|s| s.addr().port()),
            slots: opts.slots as u32,
        };
        let (status, body) = repo.call_once(
            Method::POST,
            &format!("{COORDINATOR}/join"),
            json(&req)?,
            Duration::from_secs(15),
        )?;
        if !status.is_success() {
            return Err(Error::Repo(format!(
                "joining the swarm of {}@{}: {status}: {}",
                m.name,
                m.image_version,
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            )));
        }
        let join: JoinResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Repo(format!("the swarm coordinator's join answer: {e}")))?;
        if let Some(s) = &server {
            s.set_token(&join.token);
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        // Few idle connections, soon closed: in a large room a member talks
        // to many peers, and each peer serves a bounded number of
        // connections.
        let peers = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(2)
            .build(http);
        tracing::info!(
            session = %join.session,
            member = %join.member,
            serving = ?server.as_ref().map(|s| s.addr()),
            "joined the swarm"
        );
        let swarm = Arc::new(Swarm {
            repo,
            handle,
            store,
            server,
            join,
            peers,
            opts,
            local: Mutex::new(Local::default()),
            assigned: AtomicU64::new(0),
            assigned_peers: AtomicU64::new(0),
            peer_failures: AtomicU64::new(0),
            peer_corrupt: AtomicU64::new(0),
            on_own: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            wake: Arc::new((Mutex::new(()), Condvar::new())),
            urgent: Arc::new(AtomicBool::new(false)),
        });
        let weak = Arc::downgrade(&swarm);
        let stop = swarm.stop.clone();
        let wake = swarm.wake.clone();
        let urgent = swarm.urgent.clone();
        let every = Duration::from_millis((swarm.join.heartbeat_ms / 3).clamp(200, 2000));
        std::thread::Builder::new()
            .name("aula-swarm-hb".into())
            .spawn(move || heartbeat(weak, stop, wake, urgent, every))
            .map_err(|e| Error::Io {
                what: "starting the swarm heartbeat".into(),
                source: e,
            })?;
        Ok(swarm)
    }

    /// Session name.
    pub fn session(&self) -> &str {
        &self.join.session
    }

    /// This member's public id.
    pub fn member(&self) -> &str {
        &self.join.member
    }

    /// Where the chunk server listens.
    pub fn serving(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.addr())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Counters so far.
    pub fn stats(&self) -> SwarmStats {
        let mut avoided: Vec<String> = self.lock().avoid.iter().cloned().collect();
        avoided.sort();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SwarmStats {
            session: self.join.session.clone(),
            member: self.join.member.clone(),
            serving: self.serving(),
            assigned: l(&self.assigned),
            assigned_peers: l(&self.assigned_peers),
            peer_failures: l(&self.peer_failures),
            peer_corrupt: l(&self.peer_corrupt),
            avoided,
            on_own: l(&self.on_own),
            served: self.store.stats(),
        }
    }

    /// Take the outbox as a request.
    fn request(&self, ask: u32, wait: Duration) -> SyncRequest {
        let dropped = self.store.take_dropped();
        let mut g = self.lock();
        g.outbox.dropped.extend(dropped);
        let o = std::mem::take(&mut g.outbox);
        SyncRequest {
            key: self.join.key.clone(),
            want: o.want,
            have: o.have,
            dropped: o.dropped,
            done: o.done,
            failed: o.failed,
            released: o.released,
            received: o.received,
            ask,
            wait_ms: wait.as_millis() as u64,
            finished: g.finished,
        }
    }

    fn coordinator_up(&self) -> bool {
        self.lock()
            .coordinator_down_until
            .is_none_or(|t| Instant::now() >= t)
    }

    /// Send a sync. On failure its reports go back to the outbox and the
    /// coordinator is left alone for a while.
    fn sync(&self, req: SyncRequest) -> Result<SyncResponse> {
        let wait = Duration::from_millis(req.wait_ms);
        let body = json(&req)?;
        let res = self
            .repo
            .call_once(
                Method::POST,
                &format!("{COORDINATOR}/sync"),
                body,
                wait + Duration::from_secs(15),
            )
            .and_then(|(status, body)| {
                if status.is_success() {
                    serde_json::from_slice::<SyncResponse>(&body)
                        .map_err(|e| Error::Repo(format!("the swarm coordinator's answer: {e}")))
                } else {
                    Err(Error::Repo(format!(
                        "swarm sync: {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
                    )))
                }
            });
        let mut g = self.lock();
        g.last_sync = Some(Instant::now());
        match res {
            Ok(r) => {
                g.coordinator_down_until = None;
                g.restoring = Some(r.restoring);
                Ok(r)
            }
            Err(e) => {
                tracing::warn!(
                    "the swarm coordinator failed ({e}); fetching from the repository alone for {} s",
                    COORDINATOR_PAUSE.as_secs()
                );
                g.coordinator_down_until = Some(Instant::now() + COORDINATOR_PAUSE);
                g.outbox.merge(Outbox {
                    want: req.want,
                    have: req.have,
                    dropped: req.dropped,
                    done: req.done,
                    failed: req.failed,
                    released: req.released,
                    received: req.received,
                });
                Err(e)
            }
        }
    }

    /// Fetch from a peer: the whole frame within the deadline, no stall
    /// longer than `peer_stall`.
    fn fetch_peer(
        &self,
        addr: SocketAddr,
        id: &ChunkId,
        out: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        out.clear();
        let uri = format!("http://{addr}{PEER_CHUNKS}{id}");
        let req = Request::builder()
            .method(Method::GET)
            .uri(&uri)
            .header(AUTHORIZATION, format!("Bearer {}", self.join.token))
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("error: {e}"))?;
        let stall = self.opts.peer_stall;
        let cancel = self.opts.cancel.clone();
        let fut = async {
            let resp = match tokio::time::timeout(stall, self.peers.request(req)).await {
                Err(_) => return Err("timeout: no answer".to_string()),
                Ok(Err(e)) => return Err(format!("refused: {e}")),
                Ok(Ok(r)) => r,
            };
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => return Err("busy".into()),
                s => return Err(format!("refused: {s}")),
            }
            let mut body = resp.into_body();
            loop {
                if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err("cancelled".into());
                }
                match tokio::time::timeout(stall, body.frame()).await {
                    Err(_) => return Err(format!("timeout: stalled for {stall:?}")),
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => return Err(format!("error: {e}")),
                    Ok(Some(Ok(f))) => {
                        if let Ok(d) = f.into_data() {
                            if out.len() + d.len() > MAX_FRAME {
                                return Err("corrupt: frame too large".into());
                            }
                            out.extend_from_slice(&d);
                        }
                    }
                }
            }
        };
        match self
            .handle
            .block_on(async { tokio::time::timeout(self.opts.peer_deadline, fut).await })
        {
            Err(_) => Err(format!(
                "timeout: slower than {:?}",
                self.opts.peer_deadline
            )),
            Ok(r) => r,
        }
    }

    /// Tell the coordinator a peer failed; stop using it (unless it was
    /// only busy).
    fn peer_failed(&self, id: &ChunkId, peer: &str, why: &str) {
        self.peer_failures.fetch_add(1, Ordering::Relaxed);
        let reason = why.split(':').next().unwrap_or("error").to_string();
        if reason == "corrupt" {
            self.peer_corrupt.fetch_add(1, Ordering::Relaxed);
        }
        let mut g = self.lock();
        if reason == "busy" {
            tracing::info!("swarm peer {peer} was busy for chunk {id}; using the repository");
        } else {
            tracing::warn!("swarm peer {peer} failed chunk {id} ({why}); using the repository and avoiding that peer from now on");
            g.avoid.insert(peer.to_string());
        }
        g.outbox.failed.push(Failed {
            id: *id,
            from: peer.to_string(),
            why: reason,
        });
    }

    /// Fetch an assigned chunk: from its peer, or the repository when the
    /// peer failed it. None: the peer was only busy (all its upload slots
    /// taken); the chunk is wanted again and the coordinator asked anew,
    /// so the server sends no second copy for a busy peer.
    fn fetch(&self, a: &Assignment, out: &mut Vec<u8>) -> Result<Option<Ticket>> {
        self.assigned.fetch_add(1, Ordering::Relaxed);
        if a.from != SERVER {
            self.assigned_peers.fetch_add(1, Ordering::Relaxed);
            let avoided = self.lock().avoid.contains(&a.from);
            match a.addr {
                Some(addr) if !avoided => match self.fetch_peer(addr, &a.id, out) {
                    Ok(()) => {
                        self.received(a.id);
                        return Ok(Some(Ticket {
                            id: a.id,
                            peer: Some(a.from.clone()),
                            local: false,
                        }));
                    }
                    Err(why) if why == "cancelled" => return Err(Error::Cancelled),
                    Err(why) => {
                        self.peer_failed(&a.id, &a.from, &why);
                        if why == "busy" {
                            {
                                let mut g = self.lock();
                                g.inflight.remove(&a.id);
                                if g.pending_set.insert(a.id) {
                                    g.pending.push_front(a.id);
                                }
                            }
                            // Its slots free within a chunk's time; do
                            // not hammer it (or the coordinator) meanwhile.
                            std::thread::sleep(BUSY_PAUSE);
                            return Ok(None);
                        }
                    }
                },
                _ => {}
            }
        }
        self.repo.get_chunk(&a.id, out)?;
        self.received(a.id);
        Ok(Some(Ticket {
            id: a.id,
            peer: None,
            local: false,
        }))
    }

    /// All the bytes of assigned chunk `id` are here: tell the coordinator
    /// now (through the heartbeat) so the source's slot serves someone
    /// else while this member verifies and writes it.
    fn received(&self, id: ChunkId) {
        self.lock().outbox.received.push(id);
        let _g = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        self.urgent.store(true, Ordering::SeqCst);
        self.wake.1.notify_all();
    }

    /// A chunk from this member's own store, or None (then it is wanted
    /// from the swarm).
    fn take_own(&self, id: ChunkId, out: &mut Vec<u8>) -> Option<Ticket> {
        let frame = match self.store.frame(&id) {
            Some(f) => Some(f),
            None => self.store.rebuild(&id).ok().flatten(),
        };
        match frame {
            Some(f) => {
                out.clear();
                out.extend_from_slice(&f);
                self.lock().inflight.insert(id);
                Some(Ticket {
                    id,
                    peer: Some(self.join.member.clone()),
                    local: true,
                })
            }
            None => {
                self.lock().want(id);
                None
            }
        }
    }

    /// The restore is complete: say so (lingering members still serve).
    pub fn finish(&self) {
        self.lock().finished = true;
        let req = self.request(0, Duration::ZERO);
        let _ = self.sync(req);
    }

    /// Keep serving peers for at most `max`, or until the coordinator says
    /// no member is restoring any more, or `stop()` says so.
    pub fn linger(&self, max: Duration, stop: impl Fn() -> bool) {
        if self.server.is_none() || max.is_zero() {
            return;
        }
        let t0 = Instant::now();
        tracing::info!(
            "serving peers for up to {:.0} s while members still restore",
            max.as_secs_f64()
        );
        loop {
            if t0.elapsed() >= max || stop() || self.cancelled() {
                break;
            }
            let req = self.request(0, Duration::ZERO);
            if let Ok(r) = self.sync(req) {
                if r.restoring == 0 {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500).min(max.saturating_sub(t0.elapsed())));
        }
    }

    /// Leave the session and stop serving.
    pub fn leave(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.1.notify_all();
        if let Some(s) = &self.server {
            s.stop();
        }
        if let Ok(body) = json(&LeaveRequest {
            key: self.join.key.clone(),
        }) {
            let _ = self.repo.call_once(
                Method::POST,
                &format!("{COORDINATOR}/leave"),
                body,
                Duration::from_secs(5),
            );
        }
        tracing::info!(session = %self.join.session, "left the swarm");
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.1.notify_all();
    }
}

/// Keep the membership alive and the announcements flowing when no worker
/// is talking to the coordinator.
fn heartbeat(
    swarm: Weak<Swarm>,
    stop: Arc<AtomicBool>,
    wake: Arc<(Mutex<()>, Condvar)>,
    urgent: Arc<AtomicBool>,
    every: Duration,
) {
    loop {
        let woke = {
            let g = wake.0.lock().unwrap_or_else(|p| p.into_inner());
            let _ = wake
                .1
                .wait_timeout_while(g, every, |_| {
                    !urgent.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|p| p.into_inner());
            urgent.swap(false, Ordering::SeqCst)
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(s) = swarm.upgrade() else { return };
        let due = {
            let g = s.lock();
            woke || g.last_sync.is_none_or(|t| t.elapsed() >= every) || !g.outbox.is_empty()
        };
        if due && s.coordinator_up() {
            let req = s.request(0, Duration::ZERO);
            let _ = s.sync(req);
        }
    }
}

impl Feed for Swarm {
    fn begin(&self, need: &[ChunkId], placed: Vec<Placed>) -> Result<()> {
        let serving = self.server.is_some();
        let mut have = Vec::new();
        if serving {
            for p in placed {
                have.push(p.id);
                self.store.add_placed(p);
            }
        }
        let mut g = self.lock();
        g.finished = false;
        for id in need {
            // A chunk this restore needs again (another window of the disk
            // holds it too) comes from the store when it still holds it.
            g.done.remove(id);
            if serving && self.store.holds(id) {
                g.local.push_back(*id);
            } else if !g.inflight.contains(id) {
                g.want(*id);
            }
        }
        g.outbox.have.extend(have);
        Ok(())
    }

    fn next(&self, out: &mut Vec<u8>) -> Result<Option<Ticket>> {
        let since = Instant::now();
        loop {
            if self.cancelled() || self.stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let local = {
                let mut g = self.lock();
                if g.pending_set.is_empty() && g.local.is_empty() {
                    return Ok(None);
                }
                g.local.pop_front()
            };
            if let Some(id) = local {
                match self.take_own(id, out) {
                    Some(t) => return Ok(Some(t)),
                    None => continue,
                }
            }
            if self.coordinator_up() && since.elapsed() < STARVED {
                let req = self.request(1, self.opts.wait);
                if let Ok(resp) = self.sync(req) {
                    let nothing_left = resp.assign.is_empty() && resp.pending == 0;
                    let mut pick = None;
                    {
                        let mut g = self.lock();
                        for a in resp.assign {
                            if pick.is_none() && g.pending_set.remove(&a.id) {
                                g.inflight.insert(a.id);
                                pick = Some(a);
                            } else {
                                g.outbox.released.push(a.id);
                            }
                        }
                    }
                    if let Some(a) = pick {
                        if let Some(t) = self.fetch(&a, out)? {
                            return Ok(Some(t));
                        }
                    } else if nothing_left && !self.lock().pending_set.is_empty() {
                        // The coordinator answers at once when it has
                        // nothing unassigned for this member; if this
                        // member still waits for something, do not ask in
                        // a tight loop.
                        std::thread::sleep(BUSY_PAUSE);
                    }
                    continue;
                }
            }
            // No coordinator, or nothing from it for long: the next chunk
            // from the repository.
            let id = {
                let mut g = self.lock();
                let id = g.pop_pending();
                if let Some(id) = id {
                    g.inflight.insert(id);
                }
                id
            };
            let Some(id) = id else { return Ok(None) };
            self.on_own.fetch_add(1, Ordering::Relaxed);
            self.repo.get_chunk(&id, out)?;
            return Ok(Some(Ticket {
                id,
                peer: None,
                local: false,
            }));
        }
    }

    fn refetch(&self, t: &mut Ticket, why: &str, out: &mut Vec<u8>) -> Result<()> {
        match t.peer.take() {
            Some(_) if t.local => {
                tracing::warn!(
                    "chunk {} from this machine's own store is corrupt ({why})",
                    t.id
                )
            }
            Some(p) => self.peer_failed(&t.id, &p, &format!("corrupt: {why}")),
            None => self.repo.invalid(&t.id),
        }
        t.local = false;
        self.repo.get_chunk(&t.id, out)
    }

    fn done(&self, t: Ticket, frame: &mut Vec<u8>, placed: Vec<Placed>) {
        let bytes = frame.len() as u64;
        if self.server.is_some() {
            let mut f = std::mem::take(frame);
            f.shrink_to_fit();
            self.store.insert_frame(t.id, Bytes::from(f));
            for p in placed {
                self.store.add_placed(p);
            }
            // Kept neither in RAM (no room) nor on the target (a held
            // window, written later): the coordinator must not send peers
            // here for it.
            self.store.forget_unless_held(&t.id);
        }
        let mut g = self.lock();
        g.inflight.remove(&t.id);
        g.done.insert(t.id);
        if t.local {
            return;
        }
        g.outbox.done.push(Done {
            id: t.id,
            from: t.peer.unwrap_or_else(|| SERVER.to_string()),
            bytes,
        });
    }
}
