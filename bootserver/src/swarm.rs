//! The swarm coordinator: which member holds which chunk of an image, and
//! who fetches what from whom (protocol: `aula_imager::swarm::wire`).
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `POST /v1/swarm/join` | read | join the session of `image@version` (created on first join); the member's chunk server is the request's source address and the port it names |
//! | `POST /v1/swarm/sync` | member key | reports (done, failed, have, dropped, want) and up to `ask` assignments; waits up to `wait_ms` (≤ 5 s) when there is no work yet |
//! | `POST /v1/swarm/leave` | member key | forget the member |
//! | `GET /v1/swarm` | read | sessions, members, bytes from the server and from peers |
//!
//! "read" is the repository's read policy ([`RepoService::can_read`]): a
//! member can join a session only if it could fetch the image anyway.
//!
//! Scheduling, each time a member asks for work (for one of its fetch
//! slots):
//! 1. while the server has a free upload slot (`server_slots`), a chunk the
//!    member needs that nobody holds or is fetching goes from the server:
//!    the server sends each chunk about once, and stays busy;
//! 2. else the rarest chunk the member needs that a live, unbanned, not
//!    avoided holder with a free upload slot holds, from the least busy such
//!    holder;
//! 3. else, once the member has waited `starve` with nothing, any chunk it
//!    needs from a free server slot (the last chunks, or peers all busy);
//! 4. else it waits (long poll) until something changes.
//!
//! Each member walks its needed chunks from its own random starting point,
//! so members fetch different chunks at first and disks are written in long
//! runs. There is no barrier: a member joining late gets what it misses from
//! whoever holds it. A member that stops syncing for `expire` is forgotten
//! (its holdings and leases released); a source reported failing by
//! `ban_reporters` different members is no longer handed out (a member that
//! reports a source stops getting it at once).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aula_imager::chunk::ChunkId;
use aula_imager::repo::{LocalRepo, Repository};
use aula_imager::swarm::wire::{
    Assignment, JoinRequest, JoinResponse, LeaveRequest, MemberStatus, SessionStatus, Status,
    SyncRequest, SyncResponse, COORDINATOR, MAX_IDS, SERVER,
};
use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::http::{error_json, json, BoxFuture, HttpRequest, HttpResponse, RequestContext};
use crate::repository::RepoService;

/// Largest request body (a want list of a million chunk ids).
const MAX_BODY: usize = 80 << 20;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Chunks the server sends at once per session.
    pub server_slots: u32,
    /// A member must sync at least this often.
    pub heartbeat: Duration,
    /// A member silent for this long is forgotten.
    pub expire: Duration,
    /// A member that waited this long with nothing gets a server slot even
    /// for a chunk peers hold.
    pub starve: Duration,
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
            server_slots: 4,
            heartbeat: Duration::from_secs(6),
            expire: Duration::from_secs(20),
            starve: Duration::from_millis(1500),
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
}

struct Member {
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
    inflight: Vec<u32>,
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
    cfg: SwarmConfig,
    inner: Mutex<Inner>,
    changed: Notify,
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
        match lease.0 {
            Source::Server => self.server_uploads = self.server_uploads.saturating_sub(1),
            Source::Peer(p) => {
                if let Some(pm) = self.member_mut(p) {
                    pm.uploads = pm.uploads.saturating_sub(1);
                }
            }
        }
    }

    fn set_serves(&mut self, m: usize, c: u32, on: bool) {
        let Some(mm) = self.member_mut(m) else { return };
        let ci = c as usize;
        if mm.serves[ci] == on {
            return;
        }
        mm.serves[ci] = on;
        if on {
            mm.need[ci] = false;
            self.holders[ci].push(m);
        } else {
            self.holders[ci].retain(|&h| h != m);
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

    /// Whether member `h` can be handed out as a source at all.
    fn usable(&self, h: usize) -> bool {
        self.member(h)
            .is_some_and(|hm| hm.addr.is_some() && !hm.banned)
    }

    /// Pick work for member `m`, or None.
    fn pick(&mut self, m: usize, server_slots: u32, allow_dup: bool) -> Option<(u32, Source)> {
        let me = self.member(m)?;
        let server_free = self.server_uploads < server_slots;
        let mut best_new: Option<u32> = None;
        let mut best_peer: Option<(usize, u32, usize)> = None;
        let mut best_dup: Option<(usize, u32)> = None;
        for &c in &me.order {
            let ci = c as usize;
            if !me.need[ci] || me.leases.contains_key(&c) {
                continue;
            }
            // Holders this member may fetch from (an avoided or banned one
            // does not count: for this member the chunk is new).
            let usable = self.holders[ci]
                .iter()
                .filter(|&&h| h != m && !me.avoid.contains(&h) && self.usable(h))
                .count();
            let rarity = usable + self.inflight[ci] as usize;
            if rarity == 0 {
                if best_new.is_none() {
                    best_new = Some(c);
                    if server_free {
                        break;
                    }
                }
                continue;
            }
            if best_peer.is_none_or(|(r, _, _)| rarity < r) {
                let src = self.holders[ci]
                    .iter()
                    .filter(|&&h| h != m && !me.avoid.contains(&h) && self.usable(h))
                    .filter_map(|&h| self.member(h).map(|hm| (h, hm)))
                    .filter(|(_, hm)| hm.uploads < hm.slots)
                    .min_by_key(|(_, hm)| hm.uploads)
                    .map(|(h, _)| h);
                if let Some(h) = src {
                    best_peer = Some((rarity, c, h));
                    continue;
                }
            }
            if best_dup.is_none_or(|(r, _)| rarity < r) {
                best_dup = Some((rarity, c));
            }
        }
        if server_free {
            if let Some(c) = best_new {
                return Some((c, Source::Server));
            }
        }
        if let Some((_, c, h)) = best_peer {
            return Some((c, Source::Peer(h)));
        }
        if server_free && allow_dup {
            if let Some((_, c)) = best_dup {
                return Some((c, Source::Server));
            }
        }
        None
    }

    fn lease(&mut self, m: usize, c: u32, src: Source) -> Assignment {
        self.inflight[c as usize] += 1;
        let (from, addr) = match src {
            Source::Server => {
                self.server_uploads += 1;
                (SERVER.to_string(), None)
            }
            Source::Peer(p) => match self.member_mut(p) {
                Some(pm) => {
                    pm.uploads += 1;
                    (pm.public.clone(), pm.addr)
                }
                None => (SERVER.to_string(), None),
            },
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
    pub fn new(repo: Arc<RepoService>, cfg: SwarmConfig) -> Coordinator {
        Coordinator {
            repo,
            cfg,
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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

    async fn join(&self, req: JoinRequest, remote: SocketAddr) -> Result<JoinResponse, Refusal> {
        aula_imager::manifest::validate_name(&req.image)
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))?;
        let name = format!("{}@{}", req.image, req.version);
        let exists = self.lock().sessions.contains_key(&name);
        if !exists {
            let repo: Arc<LocalRepo> = self.repo.repo().clone();
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
                        inflight: vec![0; n],
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
        let Some(s) = inner.sessions.get_mut(&name) else {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session ended while joining; join again".into(),
            ));
        };
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
        tracing::info!(session = %name, member = %public, addr = ?addr, "swarm member joined");
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
    fn apply(&self, inner: &mut Inner, req: &SyncRequest) -> Result<(String, usize), Refusal> {
        let Some((name, m)) = inner.keys.get(&req.key).cloned() else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "no such swarm member (expired or never joined): join again".into(),
            ));
        };
        let Some(s) = inner.sessions.get_mut(&name) else {
            return Err(Refusal(StatusCode::NOT_FOUND, "the session ended".into()));
        };
        let index = &s.index;
        let idx = |id: &ChunkId| index.get(id).copied();
        let want: Vec<u32> = req.want.iter().filter_map(idx).collect();
        let have: Vec<u32> = req.have.iter().filter_map(idx).collect();
        let dropped: Vec<u32> = req.dropped.iter().filter_map(idx).collect();
        let released: Vec<u32> = req.released.iter().filter_map(idx).collect();
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
            let mut added = false;
            for &c in &want {
                let ci = c as usize;
                if !mm.serves[ci] && !mm.need[ci] {
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
        for c in have {
            s.set_serves(m, c, true);
        }
        for c in dropped {
            s.set_serves(m, c, false);
        }
        for c in released {
            s.release(m, c);
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
            if let Some(pm) = s.member_mut(p) {
                pm.reports += 1;
                pm.reporters.insert(m);
                if pm.reporters.len() >= ban && !pm.banned {
                    pm.banned = true;
                    tracing::warn!(session = %name, member = %pm.public, addr = ?pm.addr, why = %f.why, "swarm member reported failing by {ban} members: no longer a source");
                }
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

    async fn sync(&self, req: SyncRequest) -> Result<SyncResponse, Refusal> {
        let started = Instant::now();
        let wait = Duration::from_millis(req.wait_ms).min(self.cfg.max_wait);
        let (name, m) = {
            let mut inner = self.lock();
            self.sweep(&mut inner);
            self.apply(&mut inner, &req)?
        };
        self.changed.notify_waiters();
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
                let starved = started.elapsed() >= self.cfg.starve;
                while (assign.len() as u32) < req.ask.min(16) {
                    match s.pick(m, self.cfg.server_slots, starved) {
                        Some((c, src)) => assign.push(s.lease(m, c, src)),
                        None => break,
                    }
                }
                if let Some(mm) = s.member_mut(m) {
                    mm.last_seen = Instant::now();
                }
                let left = started.elapsed();
                if !assign.is_empty() || req.ask == 0 || left >= wait {
                    let pending = s.member(m).map_or(0, |mm| {
                        mm.need
                            .iter()
                            .enumerate()
                            .filter(|&(c, &n)| n && !mm.leases.contains_key(&(c as u32)))
                            .count() as u64
                    });
                    let members = s.members.iter().flatten().count() as u32;
                    return Ok(SyncResponse {
                        assign,
                        pending,
                        members,
                        restoring: s.restoring(),
                    });
                }
            }
            // Wake on any change, or when starving begins, or at the end.
            let until_starve = self.cfg.starve.saturating_sub(started.elapsed());
            let nap = if until_starve.is_zero() {
                wait.saturating_sub(started.elapsed())
            } else {
                until_starve.min(wait.saturating_sub(started.elapsed()))
            };
            let _ = tokio::time::timeout(nap.max(Duration::from_millis(10)), notified).await;
        }
    }

    fn leave(&self, req: &LeaveRequest) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let Some((name, m)) = inner.keys.remove(&req.key) else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                "no such swarm member".into(),
            ));
        };
        if let Some(s) = inner.sessions.get_mut(&name) {
            if let Some(mm) = s.member(m) {
                tracing::info!(session = %name, member = %mm.public, "swarm member left");
            }
            s.remove_member(m);
            s.last_activity = Instant::now();
        }
        drop(inner);
        self.changed.notify_waiters();
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
        let res: Result<HttpResponse, Refusal> = async {
            match (method, path.as_str()) {
                (Method::GET, p) if p == COORDINATOR => {
                    self.read_allowed(&req)?;
                    Ok(json(StatusCode::OK, &self.status()))
                }
                (Method::POST, p) if p == format!("{COORDINATOR}/join") => {
                    self.read_allowed(&req)?;
                    let j: JoinRequest = Self::body(req).await?;
                    let r = self.join(j, ctx.remote).await?;
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
                    Ok(json(StatusCode::OK, &self.sync(s).await?))
                }
                (Method::POST, p) if p == format!("{COORDINATOR}/leave") => {
                    let l: LeaveRequest = Self::body(req).await?;
                    self.leave(&l)?;
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

    fn read_allowed(&self, req: &HttpRequest) -> Result<(), Refusal> {
        if self.repo.can_read(req) {
            Ok(())
        } else {
            Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "this repository needs a token to read".into(),
            ))
        }
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
            inflight: vec![0; n],
            server_uploads: 0,
            bytes_server: 0,
            bytes_peers: 0,
            last_activity: Instant::now(),
        }
    }

    fn add(s: &mut Session, start: u32, serving: bool) -> usize {
        let n = s.ids.len();
        s.members.push(Some(Member {
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
        let (c, src) = s.pick(a, 2, false).expect("work for a");
        assert_eq!((c, src), (0, Source::Server));
        s.lease(a, c, src);
        let (c, src) = s.pick(b, 2, false).expect("work for b");
        assert_eq!((c, src), (2, Source::Server));
        s.lease(b, c, src);
        // Both server slots busy, nothing held yet: b waits.
        assert_eq!(s.pick(b, 2, false), None);
        // a finishes chunk 0: a free server slot goes to a new chunk first
        // (the server stays busy)…
        s.release(a, 0);
        s.set_serves(a, 0, true);
        assert_eq!(s.pick(b, 2, false), Some((3, Source::Server)));
        // …and with the server busy, b fetches chunk 0 from a.
        assert_eq!(s.pick(b, 1, false), Some((0, Source::Peer(a))));
        // A chunk in flight is not sent by the server twice unless starving.
        assert_eq!(s.pick(a, 3, false), Some((1, Source::Server)));
        s.lease(a, 1, Source::Server);
        assert_eq!(s.pick(b, 4, false), Some((3, Source::Server)));
        s.lease(b, 3, Source::Server);
        assert_eq!(s.pick(a, 4, false), None, "2 and 3 are in flight");
        assert_eq!(s.pick(a, 4, true).map(|x| x.1), Some(Source::Server));
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
        let (ch, src) = s.pick(d, 0, false).expect("work");
        assert!(ch == 1 || ch == 2, "a rare chunk first, got {ch}");
        s.lease(d, ch, src);
        let (ch2, src2) = s.pick(d, 0, false).expect("work");
        s.lease(d, ch2, src2);
        let (ch3, src3) = s.pick(d, 0, false).expect("work");
        assert_eq!(ch3, 0);
        assert_eq!(src3, Source::Peer(b), "a is busier than b");
        s.lease(d, ch3, src3);
        // Slots are a cap: a member with 2 uploads is not handed out.
        let e = add(&mut s, 0, true);
        s.member_mut(b).expect("b").uploads = 2;
        s.member_mut(a).expect("a").uploads = 2;
        assert_eq!(s.pick(e, 0, false).map(|x| x.0), Some(2));
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
        assert_eq!(s.pick(b, 0, false), None);
        assert_eq!(s.pick(c, 0, false).map(|x| x.1), Some(Source::Peer(a)));
        s.member_mut(a).expect("a").banned = true;
        assert_eq!(s.pick(c, 0, false), None);
        // A chunk only a banned member holds is new again: the server sends it.
        assert_eq!(s.pick(c, 1, false), Some((0, Source::Server)));
        s.member_mut(a).expect("a").banned = false;
        let (ch, src) = s.pick(c, 0, false).expect("work");
        s.lease(c, ch, src);
        assert_eq!(s.member(a).expect("a").uploads, 1);
        s.remove_member(c);
        assert_eq!(s.member(a).expect("a").uploads, 0);
        assert_eq!(s.inflight, vec![0, 0]);
        s.remove_member(a);
        assert!(s.holders.iter().all(Vec::is_empty));
        // Non-serving members are never sources.
        let d = add(&mut s, 0, false);
        s.set_serves(d, 0, true);
        assert_eq!(s.pick(b, 0, false), None);
    }
}
