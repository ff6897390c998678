//! The swarm coordinator: which member holds which chunk of an image, and
//! who fetches what from whom (protocol: `aula_imager::swarm::wire`).
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `POST /v1/swarm/join` | member | join the session of `image@version` (created on first join); the member's chunk server is the request's source address and the port it names |
//! | `POST /v1/swarm/sync` | the joining principal + member key | reports (done, failed, have, dropped, want) and up to `ask` assignments; waits up to `wait_ms` (≤ 5 s) when there is no work yet |
//! | `POST /v1/swarm/leave` | the joining principal + member key | forget the member |
//! | `GET /v1/swarm` | admin, viewer | sessions, members (with their addresses), bytes from the server and from peers |
//!
//! "member" ([`crate::auth`]): a machine's agent with its own registered
//! token ([`Principal::Agent`]; the member is that machine, and a second
//! join of the same machine replaces its earlier membership, e.g. after a
//! restart), or an operator's tool (`aula-imager restore --swarm`) with the
//! API token, the repository's write token, or its read token. A viewer or
//! a capture grant cannot join; an anonymous caller cannot join even where
//! reads are open, since a member announces chunks and learns its peers.
//! Every sync and leave must come from the principal that joined, with the
//! member's secret key: nobody announces, reports or learns peers for a
//! machine it is not.
//!
//! Scheduling, each time a member asks for work (for one of its fetch
//! slots):
//! 1. while the server has a free upload slot (`server_slots`, shared
//!    among the members still restoring, so new chunks enter the swarm at
//!    different members: the pipeline), the next chunk from the member's
//!    own starting point that nobody holds or is fetching goes from the
//!    server: the server sends each chunk once, and stays busy;
//! 2. else the rarest chunk the member needs (chunks are kept in buckets by
//!    holder count) that a live, unbanned, not avoided holder with a free
//!    upload slot holds, from the least busy such holder, at most one fetch
//!    per (member, source) pair at a time so each source feeds several
//!    members;
//! 3. else any chunk it needs from such a holder;
//! 4. else, with a free server slot, a chunk it needs that no member can
//!    send it any more (every holder left, was banned, or failed it) and
//!    that the server is not already sending anyone: the only second
//!    copies the server sends (besides a member's own fallback after a
//!    peer failed it);
//! 5. else it waits (long poll) until something changes: a chunk in flight
//!    from the server to one member is taken from that member once it
//!    holds it, never fetched from the server a second time.
//!
//! Each pick looks at a bounded number of chunks and holders, whatever the
//! image and room size; a change wakes every waiting request in a small
//! room and the 32 longest waiting in a large one.
//!
//! Members start at different random points of the image and look at the
//! rarity buckets from different places, so they fetch different chunks.
//! There is no barrier: a member joining late gets what it misses from
//! whoever holds it. A member that stops syncing for `expire` is forgotten
//! (its holdings and leases released); a source reported failing by
//! `ban_reporters` different members is no longer handed out (a member that
//! reports a source stops getting it at once).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aula_imager::chunk::ChunkId;
use aula_imager::repo::Repository;
use aula_imager::swarm::wire::{
    Assignment, JoinRequest, JoinResponse, LeaveRequest, MemberStatus, SessionStatus, Status,
    SyncRequest, SyncResponse, COORDINATOR, MAX_IDS, SERVER,
};
use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::auth::{Auth, Principal};
use crate::http::{error_json, json, BoxFuture, HttpRequest, HttpResponse, RequestContext};
use crate::repository::RepoService;

/// Largest request body (a want list of a million chunk ids).
const MAX_BODY: usize = 80 << 20;
/// Chunks of its walk a member's pick looks at.
const SCAN: usize = 512;
/// Holders of a chunk a pick looks at.
const SOURCES: usize = 16;
/// Waiting requests woken by one change, at most.
const WAKE: usize = 32;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Chunks the server sends at once per session. A slot is held from
    /// the assignment until the member reports the chunk verified and
    /// written, longer than the transfer itself: 8 keeps the server's port
    /// busy while members verify what they received.
    pub server_slots: u32,
    /// A member must sync at least this often.
    pub heartbeat: Duration,
    /// A member silent for this long is forgotten.
    pub expire: Duration,
    /// Longest long poll.
    pub max_wait: Duration,
    /// An assignment not reported within this is released.
    pub lease: Duration,
    /// Distinct members whose reports ban a source.
    pub ban_reporters: usize,
    /// Sessions at once.
    pub max_sessions: usize,
    /// Members per session.
    pub max_members: usize,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            server_slots: 8,
            heartbeat: Duration::from_secs(6),
            expire: Duration::from_secs(20),
            max_wait: Duration::from_secs(5),
            lease: Duration::from_secs(180),
            ban_reporters: 2,
            max_sessions: 64,
            max_members: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Server,
    Peer(usize),
    /// The bytes arrived (from either); the member verifies and writes the
    /// chunk: no upload slot is held any more.
    Arrived,
}

struct Member {
    /// Who joined: only this principal may sync or leave as the member.
    principal: Principal,
    public: String,
    key: String,
    addr: Option<SocketAddr>,
    slots: u32,
    uploads: u32,
    /// Chunks it wants and does not hold, in its walking order (entries it
    /// got since are skipped lazily).
    order: Vec<u32>,
    need: Vec<bool>,
    serves: Vec<bool>,
    leases: HashMap<u32, (Source, Instant)>,
    avoid: HashSet<usize>,
    reporters: HashSet<usize>,
    reports: u32,
    banned: bool,
    start: u32,
    finished: bool,
    joined: Instant,
    last_seen: Instant,
    bytes_from_server: u64,
    bytes_from_peers: u64,
    bytes_served: u64,
}

impl Member {
    fn missing(&self) -> u64 {
        self.need.iter().filter(|&&b| b).count() as u64
    }
}

struct Session {
    name: String,
    ids: Vec<ChunkId>,
    sizes: Vec<u64>,
    index: HashMap<ChunkId, u32>,
    token: String,
    members: Vec<Option<Member>>,
    holders: Vec<Vec<usize>>,
    /// Chunks by how many members hold them (`rarity[k]`: held by k).
    rarity: Vec<BTreeSet<u32>>,
    inflight: Vec<u32>,
    /// Transfers of each chunk in flight from the server.
    server_inflight: Vec<u32>,
    server_uploads: u32,
    bytes_server: u64,
    bytes_peers: u64,
    last_activity: Instant,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Session>,
    /// Member key → (session, member index).
    keys: HashMap<String, (String, usize)>,
}

/// The coordinator.
pub struct Coordinator {
    repo: Arc<RepoService>,
    auth: Arc<Auth>,
    cfg: SwarmConfig,
    inner: Mutex<Inner>,
    changed: Notify,
    waiting: std::sync::atomic::AtomicUsize,
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Never on Linux (getrandom); a clock-derived value is still unique.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let d = ring::digest::digest(&ring::digest::SHA256, &t.to_le_bytes());
        b.iter_mut()
            .zip(d.as_ref().iter().cycle())
            .for_each(|(x, y)| *x = *y);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Session {
    fn member(&self, i: usize) -> Option<&Member> {
        self.members.get(i).and_then(|m| m.as_ref())
    }

    fn member_mut(&mut self, i: usize) -> Option<&mut Member> {
        self.members.get_mut(i).and_then(|m| m.as_mut())
    }

    fn find_public(&self, public: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.public == public))
    }

    /// End member `m`'s lease on chunk `c`, if any.
    fn release(&mut self, m: usize, c: u32) {
        let Some(lease) = self.member_mut(m).and_then(|mm| mm.leases.remove(&c)) else {
            return;
        };
        self.inflight[c as usize] = self.inflight[c as usize].saturating_sub(1);
        self.free_source(lease.0, c);
    }

    /// Member `m` received all the bytes of chunk `c`: free its source's
    /// upload slot now (verifying and writing take a while), keeping the
    /// chunk in flight to `m` until it reports it done or failed.
    fn arrived(&mut self, m: usize, c: u32) {
        let Some(src) = self
            .member_mut(m)
            .and_then(|mm| mm.leases.get_mut(&c))
            .map(|l| std::mem::replace(&mut l.0, Source::Arrived))
        else {
            return;
        };
        self.free_source(src, c);
    }

    /// Give back the upload slot that sending chunk `c` took at `src`
    /// (the server's or a peer's; nothing once the bytes arrived).
    fn free_source(&mut self, src: Source, c: u32) {
        match src {
            Source::Server => {
                self.server_uploads = self.server_uploads.saturating_sub(1);
                self.server_inflight[c as usize] =
                    self.server_inflight[c as usize].saturating_sub(1);
            }
            Source::Peer(p) => {
                if let Some(pm) = self.member_mut(p) {
                    pm.uploads = pm.uploads.saturating_sub(1);
                }
            }
            Source::Arrived => {}
        }
    }

    /// Member `m` holds chunk `c` (or no longer does). Holder lists name
    /// only members that can be handed out: serving and not banned.
    fn set_serves(&mut self, m: usize, c: u32, on: bool) {
        let Some(mm) = self.member_mut(m) else { return };
        let ci = c as usize;
        if mm.serves[ci] == on {
            return;
        }
        mm.serves[ci] = on;
        let listed = mm.addr.is_some() && !mm.banned;
        if on {
            mm.need[ci] = false;
            if listed {
                self.list_holder(ci, m, true);
            }
        } else if listed {
            self.list_holder(ci, m, false);
        }
    }

    /// Add or remove `m` in chunk `c`'s holder list, keeping the rarity
    /// buckets right.
    fn list_holder(&mut self, c: usize, m: usize, on: bool) {
        let before = self.holders[c].len();
        if on {
            self.holders[c].push(m);
        } else {
            self.holders[c].retain(|&h| h != m);
        }
        let after = self.holders[c].len();
        if before != after {
            if let Some(b) = self.rarity.get_mut(before) {
                b.remove(&(c as u32));
            }
            if self.rarity.len() <= after {
                self.rarity.resize_with(after + 1, BTreeSet::new);
            }
            self.rarity[after].insert(c as u32);
        }
    }

    /// Stop handing member `m` out as a source.
    fn ban(&mut self, m: usize) {
        let Some(mm) = self.member_mut(m) else { return };
        if mm.banned {
            return;
        }
        mm.banned = true;
        let held: Vec<usize> = mm
            .serves
            .iter()
            .enumerate()
            .filter(|(_, &s)| s)
            .map(|(c, _)| c)
            .collect();
        for c in held {
            self.list_holder(c, m, false);
        }
    }

    fn remove_member(&mut self, m: usize) {
        let leases: Vec<u32> = self
            .member(m)
            .map(|mm| mm.leases.keys().copied().collect())
            .unwrap_or_default();
        for c in leases {
            self.release(m, c);
        }
        let served: Vec<u32> = self
            .member(m)
            .map(|mm| {
                mm.serves
                    .iter()
                    .enumerate()
                    .filter(|(_, &s)| s)
                    .map(|(c, _)| c as u32)
                    .collect()
            })
            .unwrap_or_default();
        for c in served {
            self.set_serves(m, c, false);
        }
        self.members[m] = None;
    }

    /// A holder of chunk `c` member `m` may fetch from now: the least busy
    /// with a free upload slot among a few, not avoided by `m`, not already
    /// sending to `m`.
    fn source(&self, m: usize, c: usize) -> Option<usize> {
        let me = self.member(m)?;
        let holders = &self.holders[c];
        let n = holders.len();
        if n == 0 {
            return None;
        }
        let from = (c + m) % n;
        (0..n.min(SOURCES))
            .map(|k| holders[(from + k) % n])
            .filter(|&h| h != m && !me.avoid.contains(&h))
            // One fetch at a time from each source: a source's slots feed
            // several members, so chunks spread wider.
            .filter(|&h| !me.leases.values().any(|(src, _)| *src == Source::Peer(h)))
            .filter_map(|h| self.member(h).map(|hm| (h, hm.uploads, hm.slots)))
            .filter(|&(_, up, slots)| up < slots)
            .min_by_key(|&(_, up, _)| up)
            .map(|(h, _, _)| h)
    }

    /// Pick work for member `m`, or None. Bounded: it looks at no more than
    /// [`SCAN`] chunks in each step and [`SOURCES`] holders of each.
    fn pick(&mut self, m: usize, server_slots: u32) -> Option<(u32, Source)> {
        let me = self.member(m)?;
        let n = self.ids.len() as u32;
        if n == 0 {
            return None;
        }
        let wants = |c: u32| me.need[c as usize] && !me.leases.contains_key(&c);
        // The server's slots are shared among the members still restoring,
        // so new chunks enter the swarm at different members (one member
        // alone gets them all).
        let restoring = self
            .members
            .iter()
            .flatten()
            .filter(|x| !x.finished)
            .count()
            .max(1) as u32;
        let share = (server_slots / restoring).max(1);
        let mine = me
            .leases
            .values()
            .filter(|(src, _)| *src == Source::Server)
            .count() as u32;
        let server_free = self.server_uploads < server_slots && mine < share;
        // 1. While the server can send: the next chunk from the member's
        //    own starting point that nobody holds or is fetching.
        if server_free {
            let new = &self.rarity[0];
            let next = new
                .range(me.start..)
                .chain(new.range(..me.start))
                .take(SCAN)
                .copied()
                .find(|&c| self.inflight[c as usize] == 0 && wants(c));
            if let Some(c) = next {
                return Some((c, Source::Server));
            }
        }
        // 2. The rarest chunk it needs that a peer can send now (from a
        //    place in each bucket that differs per member).
        let spread = (m as u32).wrapping_mul(2_654_435_761) % n;
        let mut looked = 0;
        for bucket in self.rarity.iter().skip(1) {
            for &c in bucket.range(spread..).chain(bucket.range(..spread)) {
                looked += 1;
                if looked > SCAN {
                    break;
                }
                if wants(c) {
                    if let Some(h) = self.source(m, c as usize) {
                        return Some((c, Source::Peer(h)));
                    }
                }
            }
            if looked > SCAN {
                break;
            }
        }
        // 3. Any chunk it needs from a free peer, walking its own list (short
        //    for a member near the end).
        let mut orphan = None;
        for &c in me.order.iter().filter(|&&c| wants(c)).take(SCAN) {
            if let Some(h) = self.source(m, c as usize) {
                return Some((c, Source::Peer(h)));
            }
            // 4. A chunk no member can send it (every holder left, was
            //    banned or is avoided by it) and nobody is fetching: not
            //    from the server, and not arrived at a member that is
            //    still verifying and writing it (its server slot is free
            //    then, but that member becomes a holder within moments;
            //    a second copy from the server there was what made a
            //    small room's server send 1.6 images).
            let ci = c as usize;
            if orphan.is_none()
                && self.inflight[ci] == 0
                && self.holders[ci].iter().all(|h| me.avoid.contains(h))
            {
                orphan = Some(c);
            }
        }
        if self.server_uploads < server_slots && mine < share.max(2) {
            if let Some(c) = orphan {
                return Some((c, Source::Server));
            }
        }
        // 5. Nothing now: the member waits (a chunk in flight from the
        //    server is taken from its first holder).
        None
    }

    fn lease(&mut self, m: usize, c: u32, src: Source) -> Assignment {
        self.inflight[c as usize] += 1;
        let (from, addr) = match src {
            Source::Server => {
                self.server_uploads += 1;
                self.server_inflight[c as usize] += 1;
                (SERVER.to_string(), None)
            }
            Source::Peer(p) => match self.member_mut(p) {
                Some(pm) => {
                    pm.uploads += 1;
                    (pm.public.clone(), pm.addr)
                }
                None => (SERVER.to_string(), None),
            },
            Source::Arrived => (SERVER.to_string(), None),
        };
        if let Some(mm) = self.member_mut(m) {
            mm.leases.insert(c, (src, Instant::now()));
        }
        Assignment {
            id: self.ids[c as usize],
            from,
            addr,
        }
    }

    fn restoring(&self) -> u32 {
        self.members
            .iter()
            .flatten()
            .filter(|m| !m.finished)
            .count() as u32
    }

    fn status(&self) -> SessionStatus {
        SessionStatus {
            session: self.name.clone(),
            chunks: self.ids.len() as u64,
            image_bytes: self.sizes.iter().sum(),
            bytes_from_server: self.bytes_server,
            bytes_from_peers: self.bytes_peers,
            server_uploads: self.server_uploads,
            members: self
                .members
                .iter()
                .flatten()
                .map(|m| MemberStatus {
                    member: m.public.clone(),
                    addr: m.addr,
                    missing: m.missing(),
                    holds: m.serves.iter().filter(|&&b| b).count() as u64,
                    downloads: m.leases.len() as u32,
                    uploads: m.uploads,
                    bytes_from_server: m.bytes_from_server,
                    bytes_from_peers: m.bytes_from_peers,
                    bytes_served: m.bytes_served,
                    reports: m.reports,
                    banned: m.banned,
                    age_s: m.joined.elapsed().as_secs(),
                })
                .collect(),
        }
    }
}

/// What went wrong with a request.
struct Refusal(StatusCode, String);

impl Coordinator {
    /// A coordinator for the images of `repo`.
    pub fn new(repo: Arc<RepoService>, auth: Arc<Auth>, cfg: SwarmConfig) -> Coordinator {
        Coordinator {
            repo,
            auth,
            cfg,
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something changed: waiting requests look for work again (all of
    /// them in a small room, the [`WAKE`] longest waiting in a large one).
    fn wake(&self) {
        if self.waiting.load(std::sync::atomic::Ordering::Relaxed) <= WAKE {
            self.changed.notify_waiters();
        } else {
            for _ in 0..WAKE {
                self.changed.notify_one();
            }
        }
    }

    /// Forget silent members, stale leases and empty sessions.
    fn sweep(&self, inner: &mut Inner) {
        let now = Instant::now();
        let mut gone_keys = Vec::new();
        for s in inner.sessions.values_mut() {
            for m in 0..s.members.len() {
                let Some(mm) = s.member(m) else { continue };
                if now.duration_since(mm.last_seen) > self.cfg.expire {
                    tracing::info!(session = %s.name, member = %mm.public, "swarm member silent; forgotten");
                    gone_keys.push(mm.key.clone());
                    s.remove_member(m);
                    continue;
                }
                let stale: Vec<u32> = mm
                    .leases
                    .iter()
                    .filter(|(_, (_, at))| now.duration_since(*at) > self.cfg.lease)
                    .map(|(c, _)| *c)
                    .collect();
                for c in stale {
                    s.release(m, c);
                }
            }
        }
        for k in gone_keys {
            inner.keys.remove(&k);
        }
        inner.sessions.retain(|_, s| {
            s.members.iter().any(Option::is_some)
                || now.duration_since(s.last_activity) < self.cfg.expire
        });
    }

    async fn join(
        &self,
        req: JoinRequest,
        who: Principal,
        remote: SocketAddr,
    ) -> Result<JoinResponse, Refusal> {
        aula_imager::manifest::validate_name(&req.image)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
        let name = format!("{}@{}", req.image, req.version);
        // Sweep first: a session that expired since its last member left
        // is made again here, not found now and swept away below.
        let exists = {
            let mut inner = self.lock();
            self.sweep(&mut inner);
            inner.sessions.contains_key(&name)
        };
        if !exists {
            let repo = self.repo.repo().clone();
            let (image, version) = (req.image.clone(), req.version);
            let m = tokio::task::spawn_blocking(move || repo.manifest(&image, Some(version)))
                .await
                .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            let m = match m {
                Ok(m) => m,
                Err(aula_imager::Error::ImageNotFound(w)) => {
                    return Err(Refusal(
                        StatusCode::NOT_FOUND,
                        format!("image {w} not found"),
                    ))
                }
                Err(e) => return Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            };
            let chunks = m.unique_chunks();
            let mut inner = self.lock();
            self.sweep(&mut inner);
            if !inner.sessions.contains_key(&name) {
                if inner.sessions.len() >= self.cfg.max_sessions {
                    return Err(Refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many swarm sessions at once".into(),
                    ));
                }
                let n = chunks.len();
                inner.sessions.insert(
                    name.clone(),
                    Session {
                        name: name.clone(),
                        index: chunks
                            .iter()
                            .enumerate()
                            .map(|(i, (id, _))| (*id, i as u32))
                            .collect(),
                        ids: chunks.iter().map(|(id, _)| *id).collect(),
                        sizes: chunks.iter().map(|(_, s)| *s).collect(),
                        token: random_hex(32),
                        members: Vec::new(),
                        holders: vec![Vec::new(); n],
                        rarity: vec![(0..n as u32).collect()],
                        inflight: vec![0; n],
                        server_inflight: vec![0; n],
                        server_uploads: 0,
                        bytes_server: 0,
                        bytes_peers: 0,
                        last_activity: Instant::now(),
                    },
                );
                tracing::info!(session = %name, chunks = n, "swarm session started");
            }
        }
        let mut inner = self.lock();
        self.sweep(&mut inner);
        let mut inner_keys_remove = Vec::new();
        let Some(s) = inner.sessions.get_mut(&name) else {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session ended while joining; join again".into(),
            ));
        };
        // A machine joins once: its earlier membership (a restart, a
        // restore begun again) is replaced.
        if matches!(who, Principal::Agent { .. }) {
            let old: Vec<usize> = (0..s.members.len())
                .filter(|&i| s.member(i).is_some_and(|mm| mm.principal == who))
                .collect();
            for i in old {
                if let Some(mm) = s.member(i) {
                    tracing::info!(session = %name, member = %mm.public, caller = %who.name(), "swarm member replaced by the same machine's new join");
                    let k = mm.key.clone();
                    s.remove_member(i);
                    inner_keys_remove.push(k);
                }
            }
        }
        if s.members.iter().flatten().count() >= self.cfg.max_members {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many members in this swarm session".into(),
            ));
        }
        let n = s.ids.len();
        let key = random_hex(32);
        let public = format!("m{}", random_hex(6));
        let start = if n == 0 {
            0
        } else {
            u32::from_str_radix(&random_hex(4), 16).unwrap_or(0) % n as u32
        };
        let addr = req
            .port
            .filter(|&p| p != 0)
            .map(|p| SocketAddr::new(remote.ip().to_canonical(), p));
        s.members.push(Some(Member {
            principal: who.clone(),
            public: public.clone(),
            key: key.clone(),
            addr,
            slots: req.slots.clamp(1, 64),
            uploads: 0,
            order: Vec::new(),
            need: vec![false; n],
            serves: vec![false; n],
            leases: HashMap::new(),
            avoid: HashSet::new(),
            reporters: HashSet::new(),
            reports: 0,
            banned: false,
            start,
            finished: false,
            joined: Instant::now(),
            last_seen: Instant::now(),
            bytes_from_server: 0,
            bytes_from_peers: 0,
            bytes_served: 0,
        }));
        s.last_activity = Instant::now();
        let idx = s.members.len() - 1;
        let token = s.token.clone();
        tracing::info!(session = %name, member = %public, caller = %who.name(), addr = ?addr, "swarm member joined");
        for k in inner_keys_remove {
            inner.keys.remove(&k);
        }
        inner.keys.insert(key.clone(), (name.clone(), idx));
        Ok(JoinResponse {
            session: name,
            member: public,
            key,
            token,
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
        })
    }

    /// Apply a sync's reports; the member's (session, index).
    fn apply(
        &self,
        inner: &mut Inner,
        req: &SyncRequest,
        who: &Principal,
    ) -> Result<(String, usize), Refusal> {
        let Some((name, m)) = inner.keys.get(&req.key).cloned() else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "no such swarm member (expired or never joined): join again".into(),
            ));
        };
        let Some(s) = inner.sessions.get_mut(&name) else {
            return Err(Refusal(StatusCode::NOT_FOUND, "the session ended".into()));
        };
        check_owner(s, m, who)?;
        let index = &s.index;
        let idx = |id: &ChunkId| index.get(id).copied();
        let want: Vec<u32> = req.want.iter().filter_map(idx).collect();
        let have: Vec<u32> = req.have.iter().filter_map(idx).collect();
        let dropped: Vec<u32> = req.dropped.iter().filter_map(idx).collect();
        let released: Vec<u32> = req.released.iter().filter_map(idx).collect();
        let received: Vec<u32> = req.received.iter().filter_map(idx).collect();
        let done: Vec<(Option<u32>, &aula_imager::swarm::wire::Done)> =
            req.done.iter().map(|d| (idx(&d.id), d)).collect();
        let failed: Vec<(Option<u32>, &aula_imager::swarm::wire::Failed)> =
            req.failed.iter().map(|f| (idx(&f.id), f)).collect();
        s.last_activity = Instant::now();
        {
            let Some(mm) = s.member_mut(m) else {
                return Err(Refusal(
                    StatusCode::NOT_FOUND,
                    "no such swarm member".into(),
                ));
            };
            mm.last_seen = Instant::now();
            mm.finished = req.finished;
        }
        // What it now holds (placed, or fetched and verified), then what
        // it no longer serves (a chunk verified but not kept is reported
        // done and dropped at once), then what it wants (a chunk it
        // dropped may be wanted again).
        for c in have {
            s.set_serves(m, c, true);
        }
        for (c, d) in done {
            let Some(c) = c else { continue };
            s.release(m, c);
            s.set_serves(m, c, true);
            if d.from == SERVER {
                s.bytes_server += d.bytes;
                if let Some(mm) = s.member_mut(m) {
                    mm.bytes_from_server += d.bytes;
                }
            } else {
                s.bytes_peers += d.bytes;
                if let Some(mm) = s.member_mut(m) {
                    mm.bytes_from_peers += d.bytes;
                }
                if let Some(p) = s.find_public(&d.from) {
                    if let Some(pm) = s.member_mut(p) {
                        pm.bytes_served += d.bytes;
                    }
                }
            }
        }
        for c in dropped {
            s.set_serves(m, c, false);
        }
        // A chunk it wants it does not hold (any more), whatever it said
        // before: otherwise the want would be ignored and the member would
        // wait for work that never comes.
        for &c in &want {
            if s.member(m).is_some_and(|mm| mm.serves[c as usize]) {
                s.set_serves(m, c, false);
            }
        }
        if let Some(mm) = s.member_mut(m) {
            let mut added = false;
            for &c in &want {
                let ci = c as usize;
                if !mm.need[ci] {
                    mm.need[ci] = true;
                    added = true;
                }
            }
            if added {
                let n = mm.need.len() as u32;
                let start = mm.start;
                let mut order: Vec<u32> = (0..n)
                    .map(|i| (start + i) % n)
                    .filter(|&c| mm.need[c as usize])
                    .collect();
                order.shrink_to_fit();
                mm.order = order;
            }
        }
        for c in released {
            s.release(m, c);
        }
        for c in received {
            s.arrived(m, c);
        }
        for (c, f) in failed {
            if let Some(c) = c {
                s.release(m, c);
            }
            let Some(p) = s.find_public(&f.from) else {
                continue;
            };
            // A busy source only had its slots full (e.g. asked by others
            // outside the coordinator's accounting): not held against it.
            if p == m || f.why == "busy" {
                continue;
            }
            if let Some(mm) = s.member_mut(m) {
                mm.avoid.insert(p);
            }
            let ban = self.cfg.ban_reporters.max(1);
            let mut banned = false;
            if let Some(pm) = s.member_mut(p) {
                pm.reports += 1;
                pm.reporters.insert(m);
                if pm.reporters.len() >= ban && !pm.banned {
                    banned = true;
                    tracing::warn!(session = %name, member = %pm.public, addr = ?pm.addr, why = %f.why, "swarm member reported failing by {ban} members: no longer a source");
                }
            }
            if banned {
                s.ban(p);
            }
            tracing::info!(session = %name, source = %f.from, chunk = %f.id, why = %f.why, "swarm fetch from a peer failed");
        }
        // Prune the walking order of what it no longer needs.
        if let Some(mm) = s.member_mut(m) {
            if mm.order.len() > 64 {
                let need = &mm.need;
                let live = mm.order.iter().filter(|&&c| need[c as usize]).count();
                if live * 2 < mm.order.len() {
                    let need = mm.need.clone();
                    mm.order.retain(|&c| need[c as usize]);
                }
            }
        }
        Ok((name, m))
    }

    async fn sync(&self, req: SyncRequest, who: Principal) -> Result<SyncResponse, Refusal> {
        let started = Instant::now();
        let wait = Duration::from_millis(req.wait_ms).min(self.cfg.max_wait);
        let (name, m) = {
            let mut inner = self.lock();
            self.sweep(&mut inner);
            self.apply(&mut inner, &req, &who)?
        };
        self.wake();
        let mut assign = Vec::new();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                let Some(s) = inner.sessions.get_mut(&name) else {
                    return Err(Refusal(StatusCode::NOT_FOUND, "the session ended".into()));
                };
                if s.member(m).is_none() {
                    return Err(Refusal(
                        StatusCode::NOT_FOUND,
                        "no such swarm member".into(),
                    ));
                }
                while (assign.len() as u32) < req.ask.min(16) {
                    match s.pick(m, self.cfg.server_slots) {
                        Some((c, src)) => assign.push(s.lease(m, c, src)),
                        None => break,
                    }
                }
                if let Some(mm) = s.member_mut(m) {
                    mm.last_seen = Instant::now();
                }
                let left = started.elapsed();
                let pending = s.member(m).map_or(0, |mm| {
                    mm.need
                        .iter()
                        .enumerate()
                        .filter(|&(c, &n)| n && !mm.leases.contains_key(&(c as u32)))
                        .count() as u64
                });
                // Nothing it needs is left unassigned (its other fetch
                // slots have the rest): no change can bring it work, so it
                // is answered at once instead of holding a restore worker
                // for the whole wait at the end of a restore.
                if !assign.is_empty() || req.ask == 0 || left >= wait || pending == 0 {
                    let members = s.members.iter().flatten().count() as u32;
                    return Ok(SyncResponse {
                        assign,
                        pending,
                        members,
                        restoring: s.restoring(),
                    });
                }
            }
            // Wake on any change, or at the end.
            let nap = wait.saturating_sub(started.elapsed());
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = tokio::time::timeout(nap.max(Duration::from_millis(10)), notified).await;
            self.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn leave(&self, req: &LeaveRequest, who: &Principal) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let Some((name, m)) = inner.keys.get(&req.key).cloned() else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "no such swarm member".into(),
            ));
        };
        if let Some(s) = inner.sessions.get(&name) {
            check_owner(s, m, who)?;
        }
        inner.keys.remove(&req.key);
        if let Some(s) = inner.sessions.get_mut(&name) {
            if let Some(mm) = s.member(m) {
                tracing::info!(session = %name, member = %mm.public, "swarm member left");
            }
            s.remove_member(m);
            s.last_activity = Instant::now();
        }
        drop(inner);
        self.wake();
        Ok(())
    }

    /// Every session.
    pub fn status(&self) -> Status {
        let mut inner = self.lock();
        self.sweep(&mut inner);
        let mut sessions: Vec<SessionStatus> =
            inner.sessions.values().map(Session::status).collect();
        sessions.sort_by(|a, b| a.session.cmp(&b.session));
        Status { sessions }
    }

    async fn body<T: DeserializeOwned>(req: HttpRequest) -> Result<T, Refusal> {
        let bytes = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                Refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("reading the body: {e}"),
                )
            })?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))
    }

    /// Answer one request under `/v1/swarm`.
    pub async fn handle(&self, req: HttpRequest, ctx: RequestContext) -> HttpResponse {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let who = self.auth.principal(req.headers());
        let res: Result<HttpResponse, Refusal> = async {
            match (method, path.as_str()) {
                (Method::GET, p) if p == COORDINATOR => {
                    match &who {
                        Some(w) if w.can_read_lab() => {}
                        Some(w) => {
                            return Err(Refusal(
                                StatusCode::FORBIDDEN,
                                format!("{} may not list swarm members", w.name()),
                            ))
                        }
                        None => {
                            return Err(Refusal(
                                StatusCode::UNAUTHORIZED,
                                "the swarm's status needs the API or viewer token".into(),
                            ))
                        }
                    }
                    Ok(json(StatusCode::OK, &self.status()))
                }
                (Method::POST, p) if p == format!("{COORDINATOR}/join") => {
                    let who = may_join(who.as_ref())?;
                    let j: JoinRequest = Self::body(req).await?;
                    let r = self.join(j, who, ctx.remote).await?;
                    Ok(json(StatusCode::OK, &r))
                }
                (Method::POST, p) if p == format!("{COORDINATOR}/sync") => {
                    let s: SyncRequest = Self::body(req).await?;
                    let lists = [&s.want, &s.have, &s.dropped, &s.released];
                    if lists.iter().any(|l| l.len() > MAX_IDS)
                        || s.done.len() > MAX_IDS
                        || s.failed.len() > MAX_IDS
                    {
                        return Err(Refusal(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too many ids".into(),
                        ));
                    }
                    let who = may_join(who.as_ref())?;
                    Ok(json(StatusCode::OK, &self.sync(s, who).await?))
                }
                (Method::POST, p) if p == format!("{COORDINATOR}/leave") => {
                    let who = may_join(who.as_ref())?;
                    let l: LeaveRequest = Self::body(req).await?;
                    self.leave(&l, &who)?;
                    Ok(json(StatusCode::OK, &serde_json::json!({})))
                }
                (_, p) if p == COORDINATOR || p.starts_with(&format!("{COORDINATOR}/")) => {
                    Err(Refusal(StatusCode::NOT_FOUND, format!("no route {p}")))
                }
                _ => Err(Refusal(StatusCode::NOT_FOUND, format!("no route {path}"))),
            }
        }
        .await;
        match res {
            Ok(r) => r,
            Err(Refusal(status, msg)) => error_json(status, &msg),
        }
    }
}

/// Whether `who` may be a swarm member (see the module's table).
fn may_join(who: Option<&Principal>) -> Result<Principal, Refusal> {
    match who {
        Some(
            p @ (Principal::Agent { .. }
            | Principal::Admin
            | Principal::RepoWriter
            | Principal::RepoReader),
        ) => Ok(p.clone()),
        Some(p) => Err(Refusal(
            StatusCode::FORBIDDEN,
            format!("{} may not take part in a swarm", p.name()),
        )),
        None => Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "a swarm member needs its agent token, or the repository's read or write token".into(),
        )),
    }
}

/// The member `m` of `s` belongs to `who`.
fn check_owner(s: &Session, m: usize, who: &Principal) -> Result<(), Refusal> {
    match s.member(m) {
        Some(mm) if mm.principal == *who => Ok(()),
        Some(mm) => {
            tracing::warn!(session = %s.name, member = %mm.public, caller = %who.name(), "swarm request with another principal's member key refused");
            Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "this member belongs to {}, not to {}",
                    mm.principal.name(),
                    who.name()
                ),
            ))
        }
        None => Err(Refusal(
            StatusCode::NOT_FOUND,
            "no such swarm member".into(),
        )),
    }
}

/// The coordinator's routes as a route group of the HTTP service.
pub struct SwarmRoutes(pub Arc<Coordinator>);

impl crate::http::RouteGroup for SwarmRoutes {
    fn name(&self) -> &'static str {
        "swarm"
    }
    fn matches(&self, path: &str) -> bool {
        path == COORDINATOR || path.starts_with(&format!("{COORDINATOR}/"))
    }
    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move { self.0.handle(req, ctx).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(n: usize) -> Session {
        Session {
            name: "img@1".into(),
            ids: (0..n).map(|i| ChunkId([i as u8; 32])).collect(),
            sizes: vec![100; n],
            index: (0..n).map(|i| (ChunkId([i as u8; 32]), i as u32)).collect(),
            token: "t".into(),
            members: Vec::new(),
            holders: vec![Vec::new(); n],
            rarity: vec![(0..n as u32).collect()],
            inflight: vec![0; n],
            server_inflight: vec![0; n],
            server_uploads: 0,
            bytes_server: 0,
            bytes_peers: 0,
            last_activity: Instant::now(),
        }
    }

    fn add(s: &mut Session, start: u32, serving: bool) -> usize {
        let n = s.ids.len();
        s.members.push(Some(Member {
            principal: Principal::Admin,
            public: format!("m{}", s.members.len()),
            key: format!("k{}", s.members.len()),
            addr: serving.then(|| SocketAddr::from(([10, 0, 0, s.members.len() as u8], 9))),
            slots: 2,
            uploads: 0,
            order: (0..n as u32).map(|i| (start + i) % n as u32).collect(),
            need: vec![true; n],
            serves: vec![false; n],
            leases: HashMap::new(),
            avoid: HashSet::new(),
            reporters: HashSet::new(),
            reports: 0,
            banned: false,
            start,
            finished: false,
            joined: Instant::now(),
            last_seen: Instant::now(),
            bytes_from_server: 0,
            bytes_from_peers: 0,
            bytes_served: 0,
        }));
        s.members.len() - 1
    }

    #[test]
    fn new_chunks_go_from_the_server_once_and_then_from_the_peer_that_holds_them() {
        let mut s = session(4);
        let a = add(&mut s, 0, true);
        let b = add(&mut s, 2, true);
        // a gets chunk 0 from the server, b chunk 2 (its own starting point).
        let (c, src) = s.pick(a, 2).expect("work for a");
        assert_eq!((c, src), (0, Source::Server));
        s.lease(a, c, src);
        let (c, src) = s.pick(b, 2).expect("work for b");
        assert_eq!((c, src), (2, Source::Server));
        s.lease(b, c, src);
        // Both server slots busy, nothing held yet: b waits.
        assert_eq!(s.pick(b, 2), None);
        // a finishes chunk 0: b (its server share in use) fetches it from a.
        s.release(a, 0);
        s.set_serves(a, 0, true);
        assert_eq!(s.pick(b, 2), Some((0, Source::Peer(a))));
        // a's free server share goes to a new chunk, the next in its walk.
        assert_eq!(s.pick(a, 2), Some((1, Source::Server)));
        s.lease(a, 1, Source::Server);
        // A member alone gets every server slot.
        let mut solo = session(4);
        let x = add(&mut solo, 0, true);
        for want in 0..4 {
            let (c, src) = solo.pick(x, 4).expect("work");
            assert_eq!((c, src), (want, Source::Server));
            solo.lease(x, c, src);
        }
        // A chunk in flight from the server is never sent twice: a waits,
        // however long, and takes it from b once b holds it.
        s.release(b, 2);
        s.set_serves(b, 2, true);
        assert_eq!(s.pick(b, 4), Some((3, Source::Server)));
        s.lease(b, 3, Source::Server);
        s.lease(a, 2, Source::Peer(b));
        assert_eq!(s.pick(a, 4), None, "1 and 3 are in flight, 0 held");
        assert_eq!(s.pick(a, 4), None, "asking again changes nothing");
        s.release(b, 3);
        s.set_serves(b, 3, true);
        s.release(a, 2);
        s.set_serves(a, 2, true);
        assert_eq!(s.pick(a, 4), Some((3, Source::Peer(b))));
        // b leaves before a took it: nobody holds 3 any more, so the server
        // sends it a second time.
        s.remove_member(b);
        assert_eq!(s.pick(a, 4), Some((3, Source::Server)));
    }

    #[test]
    fn an_arrived_transfer_frees_its_source_slot_but_the_chunk_stays_in_flight() {
        let mut s = session(3);
        let a = add(&mut s, 0, true);
        let b = add(&mut s, 1, true);
        // One server slot: a takes it for chunk 0; b gets nothing.
        assert_eq!(s.pick(a, 1), Some((0, Source::Server)));
        s.lease(a, 0, Source::Server);
        assert_eq!(s.pick(b, 1), None);
        // a has all of chunk 0's bytes (verifying): the slot serves b, with
        // a chunk nobody holds or fetches, never chunk 0 a second time.
        s.arrived(a, 0);
        assert_eq!(s.server_uploads, 0);
        assert_eq!(s.pick(b, 1), Some((1, Source::Server)));
        s.lease(b, 1, Source::Server);
        // Reported twice, or then done: nothing is freed twice.
        s.arrived(a, 0);
        s.release(a, 0);
        assert_eq!(s.server_uploads, 1, "b's transfer still holds the slot");
        assert_eq!(s.inflight[0], 0);
        // A peer's slot too: b fetches 0 from a, and a's upload count drops
        // on arrival.
        s.set_serves(a, 0, true);
        s.lease(b, 0, Source::Peer(a));
        assert_eq!(s.member(a).map(|m| m.uploads), Some(1));
        s.arrived(b, 0);
        assert_eq!(s.member(a).map(|m| m.uploads), Some(0));
        assert_eq!(s.inflight[0], 1, "still in flight to b until done");
    }

    #[test]
    fn a_small_room_asking_for_the_same_few_chunks_at_once_gets_each_from_the_server_once() {
        // The held windows at the end of a restore: 4 members, 2 chunks,
        // all asking at once. A transfer that arrived (the member verifies
        // and writes it) has freed its server slot but is still in flight:
        // the others wait for it and take it from that member.
        let mut s = session(2);
        let ms: Vec<usize> = (0..4).map(|i| add(&mut s, i % 2, true)).collect();
        let mut server_sends = 0;
        let mut in_flight: Vec<(usize, u32, bool)> = Vec::new();
        for round in 0..20 {
            for &m in &ms {
                while let Some((c, src)) = s.pick(m, 8) {
                    server_sends += usize::from(src == Source::Server);
                    s.lease(m, c, src);
                    in_flight.push((m, c, false));
                }
            }
            // Each round every transfer moves one step: arrived, then done.
            for (m, c, arrived) in std::mem::take(&mut in_flight) {
                if arrived {
                    s.release(m, c);
                    s.set_serves(m, c, true);
                } else {
                    s.arrived(m, c);
                    in_flight.push((m, c, true));
                }
            }
            if ms
                .iter()
                .all(|&m| s.member(m).is_some_and(|x| x.missing() == 0))
            {
                assert!(round < 8, "took {round} rounds");
                break;
            }
        }
        assert!(ms
            .iter()
            .all(|&m| s.member(m).is_some_and(|x| x.missing() == 0)));
        assert_eq!(server_sends, 2, "the server sent a chunk twice");
    }

    #[test]
    fn rarest_chunks_go_first_from_the_least_busy_holder_within_its_slots() {
        let mut s = session(3);
        let a = add(&mut s, 0, true);
        let b = add(&mut s, 0, true);
        let c = add(&mut s, 0, true);
        let d = add(&mut s, 0, true);
        // Chunk 0 held by a and b, chunk 1 only by a, chunk 2 by c.
        for (m, ch) in [(a, 0), (b, 0), (a, 1), (c, 2)] {
            s.set_serves(m, ch, true);
        }
        // No server slots: d takes the rarest chunk held by a free peer.
        let (ch, src) = s.pick(d, 0).expect("work");
        assert!(ch == 1 || ch == 2, "a rare chunk first, got {ch}");
        s.lease(d, ch, src);
        let (ch2, src2) = s.pick(d, 0).expect("work");
        s.lease(d, ch2, src2);
        let (ch3, src3) = s.pick(d, 0).expect("work");
        assert_eq!(ch3, 0);
        assert_eq!(src3, Source::Peer(b), "a is busier than b");
        s.lease(d, ch3, src3);
        // Slots are a cap: a member with 2 uploads is not handed out.
        let e = add(&mut s, 0, true);
        s.member_mut(b).expect("b").uploads = 2;
        s.member_mut(a).expect("a").uploads = 2;
        assert_eq!(s.pick(e, 0).map(|x| x.0), Some(2));
    }

    #[test]
    fn avoided_and_banned_sources_are_not_handed_out_and_leaving_releases_everything() {
        let mut s = session(2);
        let a = add(&mut s, 0, true);
        let b = add(&mut s, 0, true);
        let c = add(&mut s, 0, true);
        s.set_serves(a, 0, true);
        s.set_serves(a, 1, true);
        s.member_mut(b).expect("b").avoid.insert(a);
        assert_eq!(s.pick(b, 0), None);
        // For b, a chunk only an avoided member holds comes from the server.
        assert_eq!(s.pick(b, 1), Some((0, Source::Server)));
        // For c, whose holder is only busy, nothing: it waits for a, and
        // the server sends no second copy.
        s.member_mut(a).expect("a").uploads = 2;
        assert_eq!(s.pick(c, 4), None);
        s.member_mut(a).expect("a").uploads = 0;
        let (ch, src) = s.pick(c, 0).expect("work");
        assert_eq!(src, Source::Peer(a));
        s.lease(c, ch, src);
        assert_eq!(s.member(a).expect("a").uploads, 1);
        s.remove_member(c);
        assert_eq!(s.member(a).expect("a").uploads, 0);
        assert_eq!(s.inflight, vec![0, 0]);
        // Banned: never a source again, for anyone.
        let e = add(&mut s, 0, true);
        s.ban(a);
        assert_eq!(s.pick(e, 0), None);
        assert_eq!(s.pick(e, 1), Some((0, Source::Server)));
        s.remove_member(a);
        assert!(s.holders.iter().all(Vec::is_empty));
        // Non-serving members are never sources.
        let d = add(&mut s, 0, false);
        s.set_serves(d, 0, true);
        assert_eq!(s.pick(b, 0), None);
    }

    #[test]
    fn a_simulated_room_gets_every_chunk_from_a_server_that_sends_each_once_near_the_server_bound()
    {
        // Rounds of one chunk time: each member fetches up to 4 chunks at
        // once, each member and the server upload up to 4 at once.
        let (chunks, members) = (240usize, 48usize);
        let mut s = session(chunks);
        let ms: Vec<usize> = (0..members)
            .map(|i| add(&mut s, (i * 37 % chunks) as u32, true))
            .collect();
        for &m in &ms {
            s.member_mut(m).expect("m").slots = 4;
        }
        let (mut rounds, mut server_sends, mut picks) = (0, 0, 0u64);
        let t0 = Instant::now();
        while ms
            .iter()
            .any(|&m| s.member(m).expect("m").need.iter().any(|&x| x))
        {
            rounds += 1;
            assert!(rounds < 10 * chunks, "the room never finished");
            // Members ask in a different order each round (in the real
            // service whoever's request comes first).
            let mut order = ms.clone();
            order.rotate_left((rounds * 7) % members);
            for &m in &order {
                while s.member(m).expect("m").leases.len() < 4 {
                    picks += 1;
                    let Some((c, src)) = s.pick(m, 4) else {
                        break;
                    };
                    server_sends += usize::from(src == Source::Server);
                    s.lease(m, c, src);
                }
            }
            for &m in &ms {
                let done: Vec<u32> = s.member(m).expect("m").leases.keys().copied().collect();
                for c in done {
                    s.release(m, c);
                    s.set_serves(m, c, true);
                }
            }
        }
        let per_pick = t0.elapsed().as_secs_f64() / picks as f64;
        eprintln!("{members} members, {chunks} chunks: {rounds} rounds (server bound {}), {picks} picks, {:.1} µs a pick", chunks / 4, per_pick * 1e6);
        assert_eq!(server_sends, chunks, "the server sent some chunk twice");
        // The server can emit 4 chunks a round: the room finishes within a
        // few rounds of that bound, whatever the number of members.
        assert!(rounds <= chunks / 4 + 12, "{rounds} rounds");
    }
}
