//! Where the repository service keeps chunks and manifests: the storage
//! backend under [`crate::repository`].
//!
//! | backend | `[repository] backend` | storage |
//! |---|---|---|
//! | [`Store::Dir`] | `"dir"` (default) | the imager's directory layout ([`LocalRepo`]) |
//! | [`Store::S3`] | `"s3"` | an S3-compatible bucket ([`S3Repo`]), shared by several boot servers, with a bounded in-memory cache of hot chunks |
//!
//! Both implement the imager's [`Repository`] (put-if-absent chunks,
//! listing, publishing a version without ever overwriting one); what
//! differs is served by the methods here (durable uploads, ranged reads,
//! garbage collection, upload leases). Agents never talk to the store: the
//! boot server serves them over its own HTTP(S), so they need no S3
//! credentials.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use aula_imager::chunk::ChunkId;
use aula_imager::manifest::Manifest;
use aula_imager::repo::{
    parse_s3_url, ImageSummary, LocalRepo, Repository, S3Config, S3Credentials, S3Repo,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// `[repository.s3]`: the bucket and how to reach it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// `s3://bucket/prefix` (the prefix may be empty).
    pub url: String,
    /// Node endpoints (`http://host:3900`, …), tried in turn; default
    /// `AWS_ENDPOINT_URL` of the credentials file.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Signing region; default `AWS_REGION` of the file, else `garage`.
    #[serde(default)]
    pub region: Option<String>,
    /// File of `AWS_ACCESS_KEY_ID=…`, `AWS_SECRET_ACCESS_KEY=…` (and
    /// optionally `AWS_ENDPOINT_URL`, `AWS_REGION`) lines. Keep it mode 0600.
    pub credentials_file: PathBuf,
    /// Memory for hot chunks (MiB); 0 turns the cache (and read-ahead) off.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    /// Read-ahead: when a client asks for chunk i of an image whose
    /// manifest it fetched, chunks i+1 ..= i+N of that image are fetched
    /// from the bucket into the cache (0: off). Capped so that the chunks
    /// read ahead fit in half the cache.
    #[serde(default = "default_readahead_chunks")]
    pub readahead_chunks: usize,
    /// Read-ahead GETs to the bucket at once (at least 1).
    #[serde(default = "default_readahead_parallel")]
    pub readahead_parallel: usize,
    /// Upload leases expire this long (seconds) after their last renewal.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_s: u64,
}

fn default_cache_mib() -> u64 {
    256
}
fn default_readahead_chunks() -> usize {
    16
}
fn default_readahead_parallel() -> usize {
    4
}
fn default_lease_ttl() -> u64 {
    120
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("url", &self.url)
            .field("endpoints", &self.endpoints)
            .field("credentials_file", &self.credentials_file)
            .field("cache_mib", &self.cache_mib)
            .field("readahead_chunks", &self.readahead_chunks)
            .field("readahead_parallel", &self.readahead_parallel)
            .finish()
    }
}

impl S3Settings {
    /// Read the credentials and build the client settings.
    pub fn client_config(&self) -> Result<S3Config, aula_imager::Error> {
        let (bucket, prefix) = parse_s3_url(&self.url)?;
        let creds = S3Credentials::from_file(&self.credentials_file)?;
        let endpoints = if self.endpoints.is_empty() {
            creds.endpoints.clone()
        } else {
            self.endpoints.clone()
        };
        Ok(S3Config {
            endpoints,
            bucket,
            prefix,
            region: self
                .region
                .clone()
                .or(creds.region.clone())
                .unwrap_or_else(|| "garage".into()),
            access_key: creds.access_key,
            secret_key: creds.secret_key,
            retry_for: Duration::from_secs(120),
            timeout: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(self.lease_ttl_s.max(3)),
        })
    }
}

/// A bounded cache of chunk frames, least recently used out first.
#[derive(Debug)]
pub struct ChunkCache {
    max_bytes: u64,
    inner: Mutex<CacheInner>,
    stats: CacheCounters,
}

/// This cache's own counts (`/metrics` sums them over the process).
#[derive(Debug, Default)]
struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    joined: AtomicU64,
    read_ahead: AtomicU64,
    most_bytes: AtomicU64,
}

/// A snapshot of a [`ChunkCache`]'s counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to go to the bucket (or a GET in flight).
    pub misses: u64,
    /// Misses answered by a GET of the chunk already in flight (a
    /// read-ahead's or another client's) instead of a GET of their own.
    pub joined: u64,
    /// Chunks read ahead into the cache.
    pub read_ahead: u64,
    /// The most bytes the cache ever held.
    pub most_bytes: u64,
}

#[derive(Debug, Default)]
struct CacheInner {
    /// id → (frame, last use tick).
    map: HashMap<ChunkId, (Bytes, u64)>,
    /// last use tick → id.
    order: BTreeMap<u64, ChunkId>,
    bytes: u64,
    tick: u64,
}

impl ChunkCache {
    /// A cache of at most `max_bytes`.
    pub fn new(max_bytes: u64) -> ChunkCache {
        ChunkCache {
            max_bytes,
            inner: Mutex::new(CacheInner::default()),
            stats: CacheCounters::default(),
        }
    }

    /// The cached frame of `id` (counted as a hit or a miss).
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        if self.max_bytes == 0 {
            return None;
        }
        let hit = self.inner.lock().ok().and_then(|mut c| {
            c.tick += 1;
            let tick = c.tick;
            let (frame, old) = {
                let e = c.map.get_mut(id)?;
                let old = e.1;
                e.1 = tick;
                (e.0.clone(), old)
            };
            c.order.remove(&old);
            c.order.insert(tick, *id);
            Some(frame)
        });
        crate::metrics::global().repo_cache(hit.is_some());
        let counter = if hit.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    /// The cached frame of `id`, without counting a lookup.
    pub fn peek(&self, id: &ChunkId) -> Option<Bytes> {
        if self.max_bytes == 0 {
            return None;
        }
        self.inner
            .lock()
            .ok()
            .and_then(|c| c.map.get(id).map(|e| e.0.clone()))
    }

    /// Keep `frame`, a whole object the bucket sent for chunk `id`, if it
    /// looks like a chunk frame (a zstd frame declaring at most 64 MiB);
    /// false when it does not (nothing kept).
    ///
    /// It is not decompressed and hashed here. The bucket is trusted as the
    /// directory backend trusts its disk (which serves chunk files as they
    /// are), and on one 2-core machine hashing every frame cost the
    /// S3-backed restore 15–30 % of its speed. Clients verify every chunk
    /// before they write it; one that finds a copy corrupt asks again with
    /// `Cache-Control: no-cache`, which drops the cached copy
    /// ([`ChunkCache::remove`]) and reads the bucket again.
    pub fn fill(&self, id: ChunkId, frame: Bytes) -> bool {
        if self.max_bytes == 0 || frame.len() as u64 > self.max_bytes / 4 {
            return true;
        }
        if zstd_content_size(&frame).is_none() {
            tracing::warn!(%id, "the bucket's object for a chunk is not a chunk frame; not cached");
            return false;
        }
        self.insert(id, frame);
        true
    }

    /// Drop `id`'s copy; true when there was one.
    pub fn remove(&self, id: &ChunkId) -> bool {
        let Ok(mut c) = self.inner.lock() else {
            return false;
        };
        let Some((frame, tick)) = c.map.remove(id) else {
            return false;
        };
        c.order.remove(&tick);
        c.bytes = c.bytes.saturating_sub(frame.len() as u64);
        crate::metrics::global().repo_cache_held(c.bytes, 0);
        true
    }

    /// Keep `frame` (evicting the least recently used beyond the bound).
    fn insert(&self, id: ChunkId, frame: Bytes) {
        let len = frame.len() as u64;
        if self.max_bytes == 0 || len > self.max_bytes / 4 {
            return;
        }
        if let Ok(mut c) = self.inner.lock() {
            if c.map.contains_key(&id) {
                return;
            }
            c.tick += 1;
            let tick = c.tick;
            c.map.insert(id, (frame, tick));
            c.order.insert(tick, id);
            c.bytes += len;
            while c.bytes > self.max_bytes {
                let Some((_, victim)) = c.order.pop_first() else {
                    break;
                };
                if let Some((f, _)) = c.map.remove(&victim) {
                    c.bytes -= f.len() as u64;
                }
            }
            self.stats.most_bytes.fetch_max(c.bytes, Ordering::Relaxed);
            crate::metrics::global().repo_cache_held(c.bytes, len);
        }
    }

    /// Whether `id` is held (no lookup counted, no recency change).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.max_bytes > 0 && self.inner.lock().is_ok_and(|c| c.map.contains_key(id))
    }

    /// This cache's counts so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
            joined: self.stats.joined.load(Ordering::Relaxed),
            read_ahead: self.stats.read_ahead.load(Ordering::Relaxed),
            most_bytes: self.stats.most_bytes.load(Ordering::Relaxed),
        }
    }

    /// A miss was answered by a GET of the chunk already in flight.
    pub fn note_joined(&self) {
        self.stats.joined.fetch_add(1, Ordering::Relaxed);
    }

    /// The bound (0: off).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().map(|c| c.bytes).unwrap_or(0)
    }
}

/// The decompressed size a zstd frame declares, if it is at most 64 MiB.
pub fn zstd_content_size(frame: &[u8]) -> Option<usize> {
    match zstd_frame_content_size(frame) {
        Some(n) if n <= aula_imager::manifest::MAX_CHUNK_SIZE => usize::try_from(n).ok(),
        _ => None,
    }
}

fn zstd_frame_content_size(frame: &[u8]) -> Option<u64> {
    // Frame header: magic, descriptor, [window], [dict id], [content size].
    if frame.len() < 6 || frame[0..4] != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let fhd = frame[4];
    let fcs_flag = fhd >> 6;
    let single = fhd & 0x20 != 0;
    let dict = match fhd & 3 {
        0 => 0,
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let pos = 5 + usize::from(!single) + dict;
    let size = match (fcs_flag, single) {
        (0, true) => 1,
        (0, false) => return None,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let b = frame.get(pos..pos + size)?;
    let mut v = 0u64;
    for (i, x) in b.iter().enumerate() {
        v |= u64::from(*x) << (8 * i);
    }
    if size == 2 {
        v += 256;
    }
    Some(v)
}

/// Images whose chunk order read-ahead remembers at once.
const READAHEAD_IMAGES: usize = 4;
/// Larger images are not remembered (their order alone would take tens of
/// MiB): 2^19 chunks, 2 TiB of 4 MiB windows.
const READAHEAD_MAX_CHUNKS: usize = 1 << 19;
/// Positions of an image's latest requests kept to tell a restore walking
/// the image in order from a client asking in another order (a swarm).
const READAHEAD_RECENT: usize = 32;

/// Read-ahead: the chunk order of the images clients recently fetched
/// manifests of, and which of their positions were asked for lately. A
/// request for position p that follows a request for a position shortly
/// before it (or p = 0: a restore starting) means a client walking the
/// image in order: the next chunks are worth fetching before it asks.
#[derive(Debug)]
pub struct ReadAhead {
    depth: usize,
    cache_max: u64,
    orders: Mutex<Vec<Arc<Order>>>,
    slots: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug)]
struct Order {
    image: (String, u32),
    ids: Vec<ChunkId>,
    pos: HashMap<ChunkId, usize>,
    depth: usize,
    state: Mutex<OrderState>,
}

#[derive(Debug, Default)]
struct OrderState {
    recent: std::collections::VecDeque<usize>,
    /// Positions below this were handed out for read-ahead already.
    ahead: usize,
}

impl ReadAhead {
    /// Up to `depth` chunks ahead (0: off), `parallel` GETs at once, for a
    /// cache of `cache_max` bytes.
    pub fn new(depth: usize, parallel: usize, cache_max: u64) -> ReadAhead {
        ReadAhead {
            depth: if cache_max == 0 { 0 } else { depth },
            cache_max,
            orders: Mutex::new(Vec::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(parallel.max(1))),
        }
    }

    /// Remember the chunk order of `m` (a client fetched its manifest).
    pub fn learn(&self, m: &Manifest) {
        if self.depth == 0 {
            return;
        }
        let key = (m.name.clone(), m.image_version);
        if let Ok(mut orders) = self.orders.lock() {
            if let Some(i) = orders.iter().position(|o| o.image == key) {
                let o = orders.remove(i);
                orders.insert(0, o);
                return;
            }
        }
        let chunk = m
            .partitions
            .iter()
            .map(|p| p.image.chunk_size)
            .chain([m.chunk_size])
            .max()
            .unwrap_or(1);
        let ids = m.unique_chunks().into_iter().map(|(id, _)| id).collect();
        self.learn_order(key, ids, chunk);
    }

    /// Remember that image `key` is read as `ids`, in that order, in
    /// windows of at most `chunk` bytes.
    pub fn learn_order(&self, key: (String, u32), ids: Vec<ChunkId>, chunk: u64) {
        if self.depth == 0 || ids.is_empty() || ids.len() > READAHEAD_MAX_CHUNKS {
            return;
        }
        let pos = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        // What is read ahead must fit in half the cache, or it would push
        // out chunks read ahead before the client gets to them.
        let chunk = chunk.max(1);
        let depth = self
            .depth
            .min(usize::try_from(self.cache_max / 2 / chunk).unwrap_or(usize::MAX));
        if depth == 0 {
            return;
        }
        let Ok(mut orders) = self.orders.lock() else {
            return;
        };
        orders.retain(|o| o.image != key);
        orders.insert(
            0,
            Arc::new(Order {
                image: key,
                ids,
                pos,
                depth,
                state: Mutex::new(OrderState::default()),
            }),
        );
        orders.truncate(READAHEAD_IMAGES);
    }

    /// A client asks for `id`: the chunks to fetch ahead of it (in the
    /// order the client will ask for them).
    pub fn next(&self, id: &ChunkId) -> Vec<ChunkId> {
        if self.depth == 0 {
            return Vec::new();
        }
        let order = {
            let Ok(orders) = self.orders.lock() else {
                return Vec::new();
            };
            orders.iter().find(|o| o.pos.contains_key(id)).cloned()
        };
        let Some(o) = order else {
            return Vec::new();
        };
        let p = o.pos[id];
        let Ok(mut st) = o.state.lock() else {
            return Vec::new();
        };
        let in_order = p == 0
            || st
                .recent
                .iter()
                .any(|&q| q < p && p - q <= READAHEAD_RECENT);
        st.recent.push_back(p);
        if st.recent.len() > READAHEAD_RECENT {
            st.recent.pop_front();
        }
        if !in_order {
            return Vec::new();
        }
        let end = (p + o.depth).min(o.ids.len() - 1);
        // Continue where the last read-ahead stopped, unless that is behind
        // this request or far ahead of it (another restore of the image,
        // further on).
        let start = if st.ahead > p && st.ahead <= p + 2 * o.depth + 1 {
            st.ahead
        } else {
            p + 1
        };
        if start > end {
            return Vec::new();
        }
        st.ahead = end + 1;
        o.ids[start..=end].to_vec()
    }
}

/// Single flight: callers asking for the same key at the same time share
/// one computation (the first caller runs it, the others wait for its
/// result). Blocking: used from blocking threads only.
#[derive(Debug)]
pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Arc<Flight<V>>>>,
}

#[derive(Debug)]
struct Flight<V> {
    result: Mutex<Option<V>>,
    done: Condvar,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            calls: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// Lead the call for `key`, or wait for the one in flight.
    pub fn join(self: &Arc<Self>, key: &K) -> Joined<K, V> {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let (flight, lead) = match calls.get(key) {
            Some(f) => (f.clone(), false),
            None => {
                let f = Arc::new(Flight {
                    result: Mutex::new(None),
                    done: Condvar::new(),
                });
                calls.insert(key.clone(), f.clone());
                (f, true)
            }
        };
        let call = Call {
            sf: self.clone(),
            key: key.clone(),
            flight,
        };
        if lead {
            Joined::Lead(Lead(call))
        } else {
            Joined::Wait(Waiter(call))
        }
    }

    /// `f()` for `key`, or the result of the call for `key` in flight.
    pub fn run(self: &Arc<Self>, key: &K, f: impl FnOnce() -> V) -> V {
        loop {
            match self.join(key) {
                // Whatever happens in f (even a panic), dropping the lead
                // releases the waiters and frees the key.
                Joined::Lead(lead) => {
                    let v = f();
                    lead.finish(v.clone());
                    return v;
                }
                Joined::Wait(w) => {
                    if let Some(v) = w.wait() {
                        return v;
                    }
                    // The leader is gone without a result: compute it here.
                }
            }
        }
    }
}

/// A caller's place in a [`SingleFlight`] call.
pub enum Joined<K: std::hash::Hash + Eq + Clone, V> {
    /// This caller computes the value (and must [`Lead::finish`] it).
    Lead(Lead<K, V>),
    /// Another caller computes it.
    Wait(Waiter<K, V>),
}

#[derive(Debug)]
struct Call<K: std::hash::Hash + Eq + Clone, V> {
    sf: Arc<SingleFlight<K, V>>,
    key: K,
    flight: Arc<Flight<V>>,
}

/// The caller computing a [`SingleFlight`] value. Dropped without
/// [`Lead::finish`] (failure, panic, a client gone), it releases its
/// waiters without a value and they compute it themselves.
#[derive(Debug)]
pub struct Lead<K: std::hash::Hash + Eq + Clone, V>(Call<K, V>);

impl<K: std::hash::Hash + Eq + Clone, V> Lead<K, V> {
    /// Hand `v` to every waiter.
    pub fn finish(self, v: V) {
        *self
            .0
            .flight
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(v);
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Drop for Lead<K, V> {
    fn drop(&mut self) {
        let mut calls = self.0.sf.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls
            .get(&self.0.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.0.flight))
        {
            calls.remove(&self.0.key);
        }
        drop(calls);
        self.0.flight.done.notify_all();
    }
}

/// A caller waiting for another's [`SingleFlight`] value.
#[derive(Debug)]
pub struct Waiter<K: std::hash::Hash + Eq + Clone, V>(Call<K, V>);

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Waiter<K, V> {
    /// The leader's value, or None when it ended without one (blocking).
    pub fn wait(self) -> Option<V> {
        let Call { sf, key, flight } = &self.0;
        let mut r = flight.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = r.as_ref() {
                return Some(v.clone());
            }
            let in_flight = sf
                .calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(key)
                .is_some_and(|f| Arc::ptr_eq(f, flight));
            if !in_flight {
                return None;
            }
            r = flight
                .done
                .wait_timeout(r, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// A chunk GET's shared result: the frame, None when absent, or the
/// error (shared by every caller that waited for it).
pub type FrameResult = Result<Option<Bytes>, Arc<aula_imager::Error>>;

/// An S3 store and its chunk cache.
#[derive(Debug)]
pub struct S3Store {
    /// The bucket.
    pub repo: S3Repo,
    /// Hot chunks.
    pub cache: ChunkCache,
    /// Chunk GETs in flight: agents missing the same chunk at once cause
    /// one GET.
    pub gets: Arc<SingleFlight<ChunkId, FrameResult>>,
    /// Chunks fetched before clients ask for them.
    pub readahead: ReadAhead,
}

impl S3Store {
    /// A client asks for `id`: start fetching the chunks it will ask for
    /// next into the cache (in the background, on the calling runtime).
    pub fn read_ahead(self: &Arc<Self>, id: &ChunkId) {
        let next = self.readahead.next(id);
        if next.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for id in next {
            let s = self.clone();
            rt.spawn(async move { s.fetch_ahead(id).await });
        }
    }

    /// Fetch `id` into the cache unless it is there or on its way.
    async fn fetch_ahead(self: Arc<Self>, id: ChunkId) {
        let Ok(_slot) = self.readahead.slots.clone().acquire_owned().await else {
            return;
        };
        if self.cache.contains(&id) {
            return;
        }
        let Joined::Lead(lead) = self.gets.join(&id) else {
            return; // a client's GET of it is in flight
        };
        if let Some(f) = self.cache.peek(&id) {
            return lead.finish(Ok(Some(f)));
        }
        let m = crate::metrics::global();
        let frame = match self.repo.open_chunk(&id, None).await {
            Ok(Some(mut cs)) => {
                let mut all = bytes::BytesMut::with_capacity(usize::try_from(cs.len).unwrap_or(0));
                let mut ok = true;
                while let Some(piece) = cs.body.recv().await {
                    match piece {
                        Ok(p) => all.extend_from_slice(&p),
                        Err(e) => {
                            tracing::debug!(%id, error = %e, "read-ahead broke off");
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok || all.len() as u64 != cs.len {
                    m.repo_readahead("failed", 0);
                    return; // dropping the lead lets waiters fetch it
                }
                all.freeze()
            }
            Ok(None) => return lead.finish(Ok(None)),
            Err(e) => {
                tracing::debug!(%id, error = %e, "read-ahead failed");
                m.repo_readahead("failed", 0);
                return;
            }
        };
        let len = frame.len() as u64;
        if self.cache.fill(id, frame.clone()) {
            m.repo_readahead("fetched", len);
            self.cache.stats.read_ahead.fetch_add(1, Ordering::Relaxed);
            lead.finish(Ok(Some(frame)));
        } else {
            m.repo_readahead("corrupt", len);
        }
    }
}

/// The repository's storage.
#[derive(Debug, Clone)]
pub enum Store {
    /// A directory.
    Dir(Arc<LocalRepo>),
    /// An S3 bucket.
    S3(Arc<S3Store>),
}

impl Store {
    /// Open an S3 store.
    pub fn open_s3(s: &S3Settings) -> Result<Store, aula_imager::Error> {
        let cfg = s.client_config()?;
        let repo = S3Repo::open(cfg, true)?;
        Ok(Store::S3(Arc::new(S3Store {
            repo,
            cache: ChunkCache::new(s.cache_mib << 20),
            gets: Arc::default(),
            readahead: ReadAhead::new(s.readahead_chunks, s.readahead_parallel, s.cache_mib << 20),
        })))
    }

    /// The directory repository, for the directory backend.
    pub fn local(&self) -> Option<&Arc<LocalRepo>> {
        match self {
            Store::Dir(d) => Some(d),
            Store::S3(_) => None,
        }
    }

    /// `dir` or `s3`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Dir(_) => "dir",
            Store::S3(_) => "s3",
        }
    }

    fn inner(&self) -> &dyn Repository {
        match self {
            Store::Dir(d) => d.as_ref(),
            Store::S3(s) => &s.repo,
        }
    }

    /// Version numbers of an image, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u32>, aula_imager::Error> {
        match self {
            Store::Dir(d) => d.versions(name),
            Store::S3(s) => s.repo.versions(name),
        }
    }

    /// Store an uploaded (verified) chunk and make it durable before
    /// returning; false when it was present.
    pub fn put_durable(&self, id: &ChunkId, frame: &[u8]) -> Result<bool, aula_imager::Error> {
        match self {
            Store::Dir(d) => d.put_chunk_durable(id, frame),
            Store::S3(s) => s.repo.put_chunk_if_absent(id, frame),
        }
    }

    /// A chunk's whole frame from an S3 store, through the cache; None
    /// when absent (blocking).
    pub fn s3_frame(s: &S3Store, id: &ChunkId) -> Result<Option<Bytes>, aula_imager::Error> {
        if let Some(f) = s.cache.get(id) {
            return Ok(Some(f));
        }
        let r = s.gets.run(id, || {
            // A call that finished just before this one joined may have
            // filled the cache.
            if let Some(f) = s.cache.peek(id) {
                return Ok(Some(f));
            }
            let mut out = Vec::new();
            match s.repo.get_chunk(id, &mut out) {
                Ok(()) => {
                    // Callers verify what they get (see `ChunkCache::fill`).
                    let b = Bytes::from(out);
                    s.cache.fill(*id, b.clone());
                    Ok(Some(b))
                }
                Err(aula_imager::Error::ChunkMissing(_)) => Ok(None),
                Err(e) => Err(Arc::new(e)),
            }
        });
        r.map_err(|e| match Arc::try_unwrap(e) {
            Ok(e) => e,
            Err(shared) => aula_imager::Error::Repo(shared.to_string()),
        })
    }
}

impl Repository for Store {
    fn location(&self) -> String {
        self.inner().location()
    }
    fn chunk_size_stored(&self, id: &ChunkId) -> aula_imager::Result<Option<u64>> {
        self.inner().chunk_size_stored(id)
    }
    fn missing_chunks(&self, ids: &[ChunkId]) -> aula_imager::Result<Vec<ChunkId>> {
        self.inner().missing_chunks(ids)
    }
    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> aula_imager::Result<()> {
        self.inner().put_chunk(id, frame)
    }
    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> aula_imager::Result<()> {
        match self {
            Store::S3(s) => match Store::s3_frame(s, id)? {
                Some(f) => {
                    out.clear();
                    out.extend_from_slice(&f);
                    Ok(())
                }
                None => Err(aula_imager::Error::ChunkMissing(*id)),
            },
            Store::Dir(d) => d.get_chunk(id, out),
        }
    }
    fn preferred_threads(&self) -> usize {
        self.inner().preferred_threads()
    }
    fn sync_chunks(&self) -> aula_imager::Result<()> {
        self.inner().sync_chunks()
    }
    fn publish(&self, manifest: &Manifest) -> aula_imager::Result<u32> {
        self.inner().publish(manifest)
    }
    fn manifest(&self, name: &str, version: Option<u32>) -> aula_imager::Result<Manifest> {
        self.inner().manifest(name, version)
    }
    fn list(&self) -> aula_imager::Result<Vec<ImageSummary>> {
        self.inner().list()
    }
    fn delete(&self, name: &str) -> aula_imager::Result<()> {
        self.inner().delete(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_cache_evicts_the_least_recently_used_within_its_bound() {
        let c = ChunkCache::new(40);
        let ids: Vec<ChunkId> = (0u8..4).map(|i| ChunkId::of(&[i; 3])).collect();
        for id in &ids[..3] {
            c.insert(*id, Bytes::from(vec![0u8; 10]));
        }
        assert!(c.get(&ids[0]).is_some()); // 0 is now the most recent
        c.insert(ids[3], Bytes::from(vec![0u8; 10]));
        c.insert(ChunkId::of(b"x"), Bytes::from(vec![0u8; 10])); // evicts 1
        assert!(c.bytes() <= 40);
        assert!(c.get(&ids[1]).is_none(), "least recently used evicted");
        assert!(c.get(&ids[0]).is_some(), "recently used kept");
        // Too large for the cache: not kept.
        c.insert(ChunkId::of(b"big"), Bytes::from(vec![0u8; 11]));
        assert!(c.get(&ChunkId::of(b"big")).is_none());
    }

    fn frame_of(content: &[u8]) -> (ChunkId, Bytes) {
        let frame = zstd::bulk::compress(content, 1).expect("compress");
        (ChunkId::of(content), Bytes::from(frame))
    }

    #[test]
    fn chunk_cache_keeps_chunk_frames_and_drops_a_copy_a_client_refuses() {
        let c = ChunkCache::new(1 << 20);
        let (id, frame) = frame_of(&[5u8; 5000]);
        // Bytes that are no zstd frame are never kept.
        assert!(!c.fill(id, Bytes::from_static(b"not a zstd frame")));
        assert!(!c.contains(&id) && c.bytes() == 0);
        // A frame is kept as the bucket sent it (clients verify it)…
        let (_, other) = frame_of(&[6u8; 5000]);
        assert!(c.fill(id, other.clone()));
        assert_eq!(c.get(&id), Some(other));
        // …and a client that found it corrupt (no-cache) drops it, so the
        // next read goes to the bucket and keeps the right one.
        assert!(c.remove(&id));
        assert!(!c.remove(&id), "dropped once");
        assert!(!c.contains(&id) && c.bytes() == 0);
        assert!(c.fill(id, frame.clone()));
        assert_eq!(c.get(&id), Some(frame.clone()));
        assert_eq!(c.bytes(), frame.len() as u64);
    }

    #[test]
    fn chunk_cache_never_holds_more_than_its_bound_while_filled() {
        let bound = 64 << 10;
        let c = ChunkCache::new(bound);
        for i in 0u32..200 {
            // Frames of 1–16 KiB of incompressible bytes.
            let mut x = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let content: Vec<u8> = (0..(1024 * (1 + i as usize % 16)))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let (id, frame) = frame_of(&content);
            assert!(c.fill(id, frame));
            assert!(c.bytes() <= bound, "{} > {bound}", c.bytes());
        }
        let st = c.stats();
        assert!(
            st.most_bytes <= bound && st.most_bytes > bound / 2,
            "{st:?}"
        );
    }

    fn ids(n: usize) -> Vec<ChunkId> {
        (0..n as u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect()
    }

    #[test]
    fn read_ahead_follows_a_restore_walking_the_image_in_order() {
        let ra = ReadAhead::new(4, 2, 1 << 30);
        let order = ids(20);
        ra.learn_order(("lab".into(), 1), order.clone(), 4 << 20);
        // The first chunk starts a restore: the next four.
        assert_eq!(ra.next(&order[0]), order[1..=4]);
        // Requests inside what was read ahead extend it, never repeat it.
        assert_eq!(ra.next(&order[1]), order[5..=5]);
        assert_eq!(ra.next(&order[3]), order[6..=7]);
        assert_eq!(ra.next(&order[2]), Vec::<ChunkId>::new());
        // The end of the image bounds it.
        assert_eq!(ra.next(&order[17]), order[18..=19]);
        assert_eq!(ra.next(&order[19]), Vec::<ChunkId>::new());
        // A second restore starting over reads ahead again.
        assert_eq!(ra.next(&order[0]), order[1..=4]);
        // Unknown chunks (no manifest fetched): nothing.
        assert!(ra.next(&ChunkId::of(b"elsewhere")).is_empty());
    }

    #[test]
    fn read_ahead_stays_idle_for_a_client_asking_out_of_order() {
        let ra = ReadAhead::new(4, 2, 1 << 30);
        let order = ids(1000);
        ra.learn_order(("lab".into(), 1), order.clone(), 4 << 20);
        // A swarm member asks far apart: no position follows a recent one.
        for p in [500, 900, 100, 300, 700, 50] {
            assert!(ra.next(&order[p]).is_empty(), "position {p}");
        }
    }

    #[test]
    fn read_ahead_depth_fits_half_the_cache_and_is_off_without_one() {
        let order = ids(100);
        // 32 MiB cache, 4 MiB windows: 16 MiB ahead = 4 chunks.
        let ra = ReadAhead::new(16, 2, 32 << 20);
        ra.learn_order(("lab".into(), 1), order.clone(), 4 << 20);
        assert_eq!(ra.next(&order[0]).len(), 4);
        let off = ReadAhead::new(16, 2, 0);
        off.learn_order(("lab".into(), 1), order.clone(), 4 << 20);
        assert!(off.next(&order[0]).is_empty());
        let zero = ReadAhead::new(0, 2, 1 << 30);
        zero.learn_order(("lab".into(), 1), order.clone(), 4 << 20);
        assert!(zero.next(&order[0]).is_empty());
    }

    #[test]
    fn callers_missing_the_same_chunk_at_once_share_one_fetch() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Barrier;
        let sf: Arc<SingleFlight<u32, u64>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (sf, calls, start) = (sf.clone(), calls.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    // Threads 0..6 ask for key 1, thread 7 for key 2.
                    let key = if i == 7 { 2 } else { 1 };
                    sf.run(&key, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // A slow GET: everyone arrives while it runs.
                        std::thread::sleep(Duration::from_millis(300));
                        u64::from(key) * 100
                    })
                })
            })
            .collect();
        let got: Vec<u64> = threads
            .into_iter()
            .map(|t| t.join().expect("join"))
            .collect();
        assert_eq!(&got[..7], &[100; 7]);
        assert_eq!(got[7], 200);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one call per key");
        // Finished calls are forgotten: a later miss fetches again.
        assert_eq!(sf.run(&1, || 7), 7);
    }

    #[test]
    fn a_lead_dropped_without_a_value_frees_the_key_and_its_waiters() {
        let sf: Arc<SingleFlight<u32, u64>> = Arc::default();
        let Joined::Lead(lead) = sf.join(&1) else {
            panic!("first caller leads");
        };
        let Joined::Wait(w) = sf.join(&1) else {
            panic!("second caller waits");
        };
        let waiter = std::thread::spawn(move || w.wait());
        std::thread::sleep(Duration::from_millis(50));
        // A streamed GET whose client left: no value for the waiter…
        drop(lead);
        assert_eq!(waiter.join().expect("join"), None);
        // …and the next caller leads again; a finished lead hands its value.
        let Joined::Lead(lead) = sf.join(&1) else {
            panic!("key free again");
        };
        let Joined::Wait(w) = sf.join(&1) else {
            panic!("waits");
        };
        lead.finish(9);
        assert_eq!(w.wait(), Some(9));
        assert!(
            matches!(sf.join(&1), Joined::Lead(_)),
            "finished call forgotten"
        );
    }

    #[test]
    fn a_panicking_fetch_releases_its_waiters() {
        use std::sync::Barrier;
        let sf: Arc<SingleFlight<u32, u64>> = Arc::default();
        let start = Arc::new(Barrier::new(2));
        let leader = {
            let (sf, start) = (sf.clone(), start.clone());
            std::thread::spawn(move || {
                sf.run(&1, || {
                    start.wait();
                    std::thread::sleep(Duration::from_millis(200));
                    panic!("fetch failed hard");
                })
            })
        };
        start.wait();
        // Joins the leader's flight, then computes itself after the panic.
        assert_eq!(sf.run(&1, || 5), 5);
        assert!(leader.join().is_err());
    }
}
