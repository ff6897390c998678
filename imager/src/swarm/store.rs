//! What a swarm member serves from.
//!
//! 1. A bounded RAM cache (LRU) of the compressed frames this member
//!    fetched and verified: served as they are, without any CPU work.
//! 2. The target itself, for chunks evicted from the cache and for chunks
//!    the delta check found already in place: the window is read back from
//!    the device (opened read-only), masked with the image's used map, and
//!    its SHA-256 compared with the chunk id before anything is served; then
//!    it is compressed (zstd level 1) and kept in the cache. A window that
//!    no longer hashes to its id (a later write changed it) is never served:
//!    it is forgotten and reported as dropped.
//!
//! Nothing else is ever read: the member serves only ids the restore itself
//! verified, at the windows where it verified them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::chunk::{ChunkId, Encoder};
use crate::error::{Error, IoContext, Result};
use crate::restore::Placed;

/// zstd level of frames rebuilt from the target (fast; the receiver
/// verifies the content, not the frame).
const REBUILD_LEVEL: i32 = 1;

#[derive(Default)]
struct Inner {
    frames: HashMap<ChunkId, (Bytes, u64)>,
    order: BTreeMap<u64, ChunkId>,
    bytes: usize,
    seq: u64,
    placed: HashMap<ChunkId, Placed>,
    files: HashMap<PathBuf, Arc<File>>,
    dropped: Vec<ChunkId>,
}

/// Counters of what was served and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServeStats {
    /// Chunks served.
    pub chunks_served: u64,
    /// Compressed bytes served.
    pub bytes_served: u64,
    /// Of those chunks, served from the RAM cache.
    pub from_cache: u64,
    /// Of those chunks, rebuilt from the target (read, masked, hashed,
    /// compressed).
    pub from_target: u64,
    /// Requests refused because every upload slot was busy.
    pub busy: u64,
    /// Requests for chunks this member does not hold.
    pub not_held: u64,
    /// Requests with a wrong or missing token.
    pub unauthorized: u64,
    /// Microseconds spent rebuilding frames from the target.
    pub rebuild_us: u64,
}

/// The chunks a member can serve.
pub struct Store {
    inner: Mutex<Inner>,
    cap: usize,
    from_target: bool,
    pub(crate) served: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) from_cache: AtomicU64,
    pub(crate) rebuilt: AtomicU64,
    pub(crate) busy: AtomicU64,
    pub(crate) not_held: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) rebuild_us: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("cap", &self.cap)
            .field("from_target", &self.from_target)
            .finish()
    }
}

impl Store {
    /// A store keeping at most `cap` bytes of frames in RAM; with
    /// `from_target`, windows on the target are served too.
    pub fn new(cap: usize, from_target: bool) -> Store {
        Store {
            inner: Mutex::new(Inner::default()),
            cap,
            from_target,
            served: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            from_cache: AtomicU64::new(0),
            rebuilt: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            not_held: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            rebuild_us: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps behind.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep a verified frame (evicting the least recently used ones).
    pub fn insert_frame(&self, id: ChunkId, frame: Bytes) {
        if frame.len() > self.cap {
            return;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        inner.seq += 1;
        let seq = inner.seq;
        if let Some((old, old_seq)) = inner.frames.insert(id, (frame.clone(), seq)) {
            inner.bytes -= old.len();
            inner.order.remove(&old_seq);
        }
        inner.bytes += frame.len();
        inner.order.insert(seq, id);
        while inner.bytes > self.cap {
            let Some((_, victim)) = inner.order.pop_first() else {
                break;
            };
            if let Some((f, _)) = inner.frames.remove(&victim) {
                inner.bytes -= f.len();
            }
            if !(self.from_target && inner.placed.contains_key(&victim)) {
                inner.dropped.push(victim);
            }
        }
    }

    /// Report `id` dropped (at the next [`Store::take_dropped`]) unless it
    /// can be served: for a chunk that was just verified but could not be
    /// kept (larger than the cache, and not on the target).
    pub fn forget_unless_held(&self, id: &ChunkId) {
        let mut g = self.lock();
        if !(g.frames.contains_key(id) || (self.from_target && g.placed.contains_key(id))) {
            g.dropped.push(*id);
        }
    }

    /// Remember where the target holds a verified chunk.
    pub fn add_placed(&self, p: Placed) {
        if self.from_target {
            self.lock().placed.entry(p.id).or_insert(p);
        }
    }

    /// True when the chunk can be served.
    pub fn holds(&self, id: &ChunkId) -> bool {
        let g = self.lock();
        g.frames.contains_key(id) || (self.from_target && g.placed.contains_key(id))
    }

    /// Chunks that became unservable since the last call.
    pub fn take_dropped(&self) -> Vec<ChunkId> {
        let mut g = self.lock();
        let inner = &mut *g;
        let d = std::mem::take(&mut inner.dropped);
        // Evicted, then stored again: still held.
        d.into_iter()
            .filter(|id| {
                !(inner.frames.contains_key(id)
                    || (self.from_target && inner.placed.contains_key(id)))
            })
            .collect()
    }

    /// Bytes of frames in RAM.
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The cached frame of `id` (marked recently used).
    pub fn frame(&self, id: &ChunkId) -> Option<Bytes> {
        let mut g = self.lock();
        let inner = &mut *g;
        let (f, seq) = inner.frames.get_mut(id)?;
        let frame = f.clone();
        inner.order.remove(seq);
        inner.seq += 1;
        *seq = inner.seq;
        inner.order.insert(inner.seq, *id);
        Some(frame)
    }

    /// Rebuild the frame of `id` from the target (blocking: reads 1 window,
    /// hashes and compresses it). None when the target does not hold it
    /// (any more).
    pub fn rebuild(&self, id: &ChunkId) -> Result<Option<Bytes>> {
        if !self.from_target {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        let (p, file) = {
            let mut g = self.lock();
            let Some(p) = g.placed.get(id).cloned() else {
                return Ok(None);
            };
            let file = match g.files.get(&p.device) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(
                        File::open(&p.device)
                            .ctx(|| format!("opening {} to serve peers", p.device.display()))?,
                    );
                    g.files.insert(p.device.clone(), f.clone());
                    f
                }
            };
            (p, file)
        };
        let mut buf = vec![0u8; p.len];
        let mut pos = 0;
        for &(s, e) in &p.ranges {
            if s < pos || e > p.len || s > e {
                return Err(Error::Invalid(format!("bad used ranges for chunk {id}")));
            }
            file.read_exact_at(&mut buf[s..e], p.offset + s as u64)
                .ctx(|| format!("reading {} at byte {}", p.device.display(), p.offset))?;
            pos = e;
        }
        if ChunkId::of(&buf) != *id {
            tracing::warn!(
                "chunk {id} no longer holds at byte {} of {}; not serving it from there",
                p.offset,
                p.device.display()
            );
            let mut g = self.lock();
            g.placed.remove(id);
            if !g.frames.contains_key(id) {
                g.dropped.push(*id);
            }
            return Ok(None);
        }
        let mut frame = Vec::new();
        Encoder::new(REBUILD_LEVEL)?.encode(&buf, &mut frame)?;
        frame.shrink_to_fit();
        let frame = Bytes::from(frame);
        self.insert_frame(*id, frame.clone());
        self.rebuilt.fetch_add(1, Ordering::Relaxed);
        self.rebuild_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(Some(frame))
    }

    /// What was served so far.
    pub fn stats(&self) -> ServeStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServeStats {
            chunks_served: l(&self.served),
            bytes_served: l(&self.bytes_served),
            from_cache: l(&self.from_cache),
            from_target: l(&self.rebuilt),
            busy: l(&self.busy),
            not_held: l(&self.not_held),
            unauthorized: l(&self.unauthorized),
            rebuild_us: l(&self.rebuild_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn the_cache_evicts_least_recently_used_frames_and_reports_them_dropped() {
        let s = Store::new(250, false);
        s.insert_frame(id(1), Bytes::from(vec![1u8; 100]));
        s.insert_frame(id(2), Bytes::from(vec![2u8; 100]));
        assert!(s.frame(&id(1)).is_some(), "touch 1: 2 is now the oldest");
        s.insert_frame(id(3), Bytes::from(vec![3u8; 100]));
        assert!(s.holds(&id(1)) && s.holds(&id(3)));
        assert!(!s.holds(&id(2)));
        assert_eq!(s.take_dropped(), vec![id(2)]);
        assert_eq!(s.cached_bytes(), 200);
        assert!(s.take_dropped().is_empty());
    }

    #[test]
    fn a_window_on_the_target_is_served_only_while_it_still_hashes_to_its_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let dev = dir.path().join("disk");
        let mut data = vec![0u8; 3 * 4096];
        for (i, b) in data[4096..8192].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        std::fs::write(&dev, &data).expect("write");
        // The chunk: window 4096..12288 with used range 0..4096; the rest
        // of the window is unused and ignored even if it holds garbage.
        let mut content = data[4096..].to_vec();
        content[4096..].fill(0);
        let cid = ChunkId::of(&content);
        std::fs::write(&dev, {
            let mut d = data.clone();
            d[8192..].fill(0xee);
            d
        })
        .expect("garbage in unused space");
        let s = Store::new(1 << 20, true);
        s.add_placed(Placed {
            id: cid,
            device: dev.clone(),
            offset: 4096,
            len: 8192,
            ranges: vec![(0, 4096)],
        });
        assert!(s.holds(&cid));
        let frame = s.rebuild(&cid).expect("rebuild").expect("held");
        let mut out = Vec::new();
        crate::chunk::Decoder::new()
            .expect("decoder")
            .decode_verified(&cid, &frame, 8192, &mut out)
            .expect("a verified frame");
        assert_eq!(s.stats().from_target, 1);
        // A later write changes the used range: no longer served.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .expect("open");
        f.write_all_at(b"changed", 4096).expect("write");
        let s2 = Store::new(1 << 20, true);
        s2.add_placed(Placed {
            id: cid,
            device: dev,
            offset: 4096,
            len: 8192,
            ranges: vec![(0, 4096)],
        });
        assert_eq!(s2.rebuild(&cid).expect("rebuild"), None);
        assert!(!s2.holds(&cid));
        assert_eq!(s2.take_dropped(), vec![cid]);
    }
}
