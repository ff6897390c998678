//! Swarm restores (`"method": "swarm"`; OpenGnsys `torrent`, `tiptorrent`):
//! the agent joins the image's swarm at the repository's coordinator,
//! fetches chunks from peers and serves its own (the imager's
//! `aula_imager::swarm`), and keeps serving for a while after its restore
//! ends (linger), until no member restores any more, the time is up, a new
//! job takes the disk, or the agent stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aula_imager::manifest::Manifest;
use aula_imager::repo::HttpRepo;
use aula_imager::swarm::{Swarm, SwarmOptions};
use serde::{Deserialize, Serialize};

/// `[swarm]` of the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmSection {
    /// TCP port of the chunk server (on `listen.address`); 0 = any free
    /// port (the coordinator is told which).
    #[serde(default)]
    pub port: u16,
    /// Serve peers at all (false: fetch from them only).
    #[serde(default = "yes")]
    pub serve: bool,
    /// Uploads served at once.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// Chunks fetched at once.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// RAM kept for verified chunks to serve, MiB.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: usize,
    /// Also serve chunks by reading them back from the restored disk.
    #[serde(default = "yes")]
    pub serve_from_disk: bool,
    /// After a restore, keep serving at most this long (s) while other
    /// members still restore.
    #[serde(default = "default_linger")]
    pub linger_s: u64,
}

fn yes() -> bool {
    true
}
fn default_slots() -> usize {
    4
}
fn default_parallel() -> usize {
    4
}
fn default_cache_mib() -> usize {
    256
}
fn default_linger() -> u64 {
    120
}

impl Default for SwarmSection {
    fn default() -> Self {
        SwarmSection {
            port: 0,
            serve: true,
            slots: default_slots(),
            parallel: default_parallel(),
            cache_mib: default_cache_mib(),
            serve_from_disk: true,
            linger_s: default_linger(),
        }
    }
}

/// Join the swarm of `m` for a restore job. None (with a warning) when the
/// coordinator cannot be joined: the job then restores from the repository
/// alone.
pub fn join(
    cfg: &SwarmSection,
    listen: std::net::IpAddr,
    repo: &Arc<HttpRepo>,
    m: &Manifest,
    cancel: Arc<AtomicBool>,
) -> Option<Arc<Swarm>> {
    let opts = SwarmOptions {
        listen: cfg.serve.then(|| SocketAddr::new(listen, cfg.port)),
        slots: cfg.slots.max(1),
        cache_bytes: cfg.cache_mib << 20,
        serve_from_target: cfg.serve_from_disk,
        cancel: Some(cancel),
        ..SwarmOptions::default()
    };
    match Swarm::join(repo.clone(), m, opts) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot join the swarm; restoring from the repository alone");
            None
        }
    }
}

/// A finished member still serving.
struct Entry {
    disk: PathBuf,
    swarm: Arc<Swarm>,
    stop: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    until: Instant,
}

/// One lingering session as `GET /v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LingerStatus {
    /// `image@version`.
    pub session: String,
    /// This member's id.
    pub member: String,
    /// The chunk server.
    pub serving: Option<SocketAddr>,
    /// Seconds left at most.
    pub left_s: u64,
    /// Chunks served so far.
    pub chunks_served: u64,
    /// Compressed bytes served so far.
    pub bytes_served: u64,
}

/// The agent's lingering swarm members.
#[derive(Default)]
pub struct Lingering(Mutex<Vec<Entry>>);

impl Lingering {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep serving `swarm` (restored onto `disk`) for up to `max`, on a
    /// thread of its own; the member leaves the session when done.
    pub fn start(&self, disk: &Path, swarm: Arc<Swarm>, max: Duration) {
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let (s2, st2, e2) = (swarm.clone(), stop.clone(), ended.clone());
        let spawned = std::thread::Builder::new()
            .name("aula-swarm-linger".into())
            .spawn(move || {
                s2.linger(max, || st2.load(Ordering::Relaxed));
                s2.leave();
                e2.store(true, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot keep serving the swarm");
            swarm.leave();
            return;
        }
        let mut g = self.lock();
        g.retain(|e| !e.ended.load(Ordering::SeqCst));
        g.push(Entry {
            disk: disk.to_path_buf(),
            swarm,
            stop,
            ended,
            until: Instant::now() + max,
        });
    }

    /// Stop serving what was restored onto `disk` (a new job takes it).
    pub fn stop_disk(&self, disk: &Path) {
        for e in self.lock().iter().filter(|e| e.disk == disk) {
            e.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Stop serving everything and wait (bounded) for the members to leave.
    pub fn stop_all(&self, wait: Duration) {
        let ended: Vec<Arc<AtomicBool>> = self
            .lock()
            .iter()
            .map(|e| {
                e.stop.store(true, Ordering::SeqCst);
                e.ended.clone()
            })
            .collect();
        let t0 = Instant::now();
        while t0.elapsed() < wait && ended.iter().any(|e| !e.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The members still serving.
    pub fn status(&self) -> Vec<LingerStatus> {
        let mut g = self.lock();
        g.retain(|e| !e.ended.load(Ordering::SeqCst));
        g.iter()
            .map(|e| {
                let st = e.swarm.stats();
                LingerStatus {
                    session: st.session,
                    member: st.member,
                    serving: st.serving,
                    left_s: e.until.saturating_duration_since(Instant::now()).as_secs(),
                    chunks_served: st.served.chunks_served,
                    bytes_served: st.served.bytes_served,
                }
            })
            .collect()
    }
}
