//! A remote repository with a local chunk cache (`--cache DIR`; the
//! OpenGnsys CACHE partition).
//!
//! Chunks are served from the cache when present and stored into it after
//! the restore has verified them (never before), so a corrupt download never
//! enters the cache. A cached chunk that fails verification is evicted and
//! fetched from the remote. Manifests are copied into the cache under their
//! own version numbers.
//!
//! # What the cache is trusted with
//!
//! The CACHE partition is writable by whatever else boots on the machine (a
//! student's OS), so it is not a source of truth. Every chunk from it is
//! verified against the manifest like any other. A manifest from it is used
//! only when:
//!
//! | situation | manifest used |
//! |---|---|
//! | the repository answers | the repository's; its digest (SHA-256 of its canonical JSON, [`manifest_digest`]) is recorded as confirmed |
//! | the repository is unreachable (transport error, 5xx, 401 …) and the cached manifest's digest was confirmed earlier ([`ConfirmedManifests`], kept for one boot) | the cached one |
//! | same, digest never confirmed | none: the restore fails, saying so |
//! | offline mode ([`CachedRepo::offline`], asked for by the job) | the cached one, unconfirmed (logged) |

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{ImageSummary, LocalRepo, Repository};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// SHA-256 of a manifest's canonical JSON (what [`Manifest::to_json`]
/// writes), as confirmations record it.
pub fn manifest_digest(m: &Manifest) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, &m.to_json());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Digests of manifests the repository itself served: in memory, and
/// optionally in a file (one hex digest per line, mode 0600, in a
/// directory created 0700) so every job of one boot shares them. Put the
/// file on a RAM filesystem (`/run`): a confirmation is good for one boot.
#[derive(Debug)]
pub struct ConfirmedManifests {
    path: Option<PathBuf>,
    known: Mutex<HashSet<[u8; 32]>>,
}

impl ConfirmedManifests {
    /// A record in memory only (the process lifetime).
    pub fn in_memory() -> Arc<ConfirmedManifests> {
        Arc::new(ConfirmedManifests {
            path: None,
            known: Mutex::new(HashSet::new()),
        })
    }

    /// The record in `path` (read now; appended to on every confirmation).
    pub fn at(path: &Path) -> Result<Arc<ConfirmedManifests>> {
        let io = |what: String| move |source| Error::Io { what, source };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut known = HashSet::new();
        match std::fs::File::open(path) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).lines() {
                    let line = line.map_err(io(format!("reading {}", path.display())))?;
                    let mut d = [0u8; 32];
                    if hex::decode_to_slice(line.trim(), &mut d).is_ok() {
                        known.insert(d);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        }
        Ok(Arc::new(ConfirmedManifests {
            path: Some(path.to_path_buf()),
            known: Mutex::new(known),
        }))
    }

    /// Record that the repository served a manifest with this digest.
    pub fn confirm(&self, digest: [u8; 32]) {
        let new = self
            .known
            .lock()
            .map(|mut k| k.insert(digest))
            .unwrap_or(false);
        if let (true, Some(p)) = (new, &self.path) {
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .and_then(|mut f| writeln!(f, "{}", hex::encode(digest)));
            if let Err(e) = r {
                tracing::warn!(
                    "could not record a confirmed manifest in {}: {e}",
                    p.display()
                );
            }
        }
    }

    /// Whether a manifest with this digest was confirmed.
    pub fn is_confirmed(&self, digest: &[u8; 32]) -> bool {
        self.known
            .lock()
            .map(|k| k.contains(digest))
            .unwrap_or(false)
    }
}

/// Remote repository + local cache.
pub struct CachedRepo {
    remote: Box<dyn Repository>,
    cache: LocalRepo,
    confirmed: Arc<ConfirmedManifests>,
    offline: bool,
    /// Chunks handed out from the cache and not yet confirmed good.
    from_cache: Mutex<HashSet<ChunkId>>,
}

impl CachedRepo {
    /// Wrap `remote` with the cache repository `cache`. Confirmations are
    /// kept in memory (use [`CachedRepo::with_confirmed`] to share them).
    pub fn new(remote: Box<dyn Repository>, cache: LocalRepo) -> CachedRepo {
        CachedRepo {
            remote,
            cache,
            confirmed: ConfirmedManifests::in_memory(),
            offline: false,
            from_cache: Mutex::new(HashSet::new()),
        }
    }

    /// Record and consult confirmations in `confirmed`.
    pub fn with_confirmed(mut self, confirmed: Arc<ConfirmedManifests>) -> CachedRepo {
        self.confirmed = confirmed;
        self
    }

    /// Offline mode: manifests come from the cache without asking the
    /// repository, confirmed or not (the caller asked for it explicitly).
    pub fn offline(mut self, offline: bool) -> CachedRepo {
        self.offline = offline;
        self
    }

    /// The cache.
    pub fn cache(&self) -> &LocalRepo {
        &self.cache
    }
}

impl Repository for CachedRepo {
    fn location(&self) -> String {
        format!(
            "{} (cache {})",
            self.remote.location(),
            self.cache.location()
        )
    }

    fn chunk_size_stored(&self, id: &ChunkId) -> Result<Option<u64>> {
        self.remote.chunk_size_stored(id)
    }

    fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let not_cached = self.cache.missing_chunks(ids)?;
        if not_cached.is_empty() {
            return Ok(vec![]);
        }
        match self.remote.missing_chunks(&not_cached) {
            Ok(m) => Ok(m),
            // Offline: everything not cached is unavailable.
            Err(e) => {
                tracing::warn!("repository unreachable ({e}); only cached chunks are available");
                Ok(not_cached)
            }
        }
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<()> {
        self.remote.put_chunk(id, frame)
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        let cached = self.cache.chunk_size_stored(id)?.is_some();
        if cached && self.cache.get_chunk(id, out).is_ok() {
            if let Ok(mut s) = self.from_cache.lock() {
                s.insert(*id);
            }
            return Ok(());
        }
        self.remote.get_chunk(id, out)
    }

    fn will_need(&self, id: &ChunkId) {
        self.cache.will_need(id);
    }

    fn verified(&self, id: &ChunkId, frame: &[u8]) {
        let was_cached = self
            .from_cache
            .lock()
            .map(|mut s| s.remove(id))
            .unwrap_or(false);
        if !was_cached {
            if let Err(e) = self.cache.put_chunk(id, frame) {
                tracing::warn!("could not cache chunk {id}: {e}");
            }
        }
    }

    fn invalid(&self, id: &ChunkId) {
        let was_cached = self
            .from_cache
            .lock()
            .map(|mut s| s.remove(id))
            .unwrap_or(false);
        if was_cached {
            tracing::warn!(
                "cached chunk {id} is corrupt; evicting it and fetching from {}",
                self.remote.location()
            );
            let _ = std::fs::remove_file(self.cache.chunk_path(id));
        }
        self.remote.invalid(id);
    }

    fn preferred_threads(&self) -> usize {
        self.remote.preferred_threads()
    }

    fn begin_upload(&self, name: &str) {
        self.remote.begin_upload(name)
    }

    fn fetch_attempts(&self) -> u32 {
        self.remote.fetch_attempts().max(2)
    }

    fn sync_chunks(&self) -> Result<()> {
        self.cache.sync_chunks()?;
        self.remote.sync_chunks()
    }

    fn publish(&self, manifest: &Manifest) -> Result<u32> {
        self.remote.publish(manifest)
    }

    fn manifest(&self, name: &str, version: Option<u32>) -> Result<Manifest> {
        if self.offline {
            let m = self.cache.manifest(name, version)?;
            if !self.confirmed.is_confirmed(&manifest_digest(&m)) {
                tracing::warn!(
                    "offline mode: using the cached manifest of {name} (version {}) that the repository never confirmed",
                    m.image_version
                );
            }
            return Ok(m);
        }
        match self.remote.manifest(name, version) {
            Ok(m) => {
                self.confirmed.confirm(manifest_digest(&m));
                if let Err(e) = self.cache.store_version(&m) {
                    tracing::warn!("could not copy the manifest of {name} into the cache: {e}");
                }
                Ok(m)
            }
            Err(
                e @ (Error::ImageNotFound(_)
                | Error::BadManifest { .. }
                | Error::UnsupportedVersion { .. }
                | Error::Cancelled),
            ) => Err(e),
            Err(e) => {
                let cached = match self.cache.manifest(name, version) {
                    Ok(m) => m,
                    Err(_) => return Err(e),
                };
                if self.confirmed.is_confirmed(&manifest_digest(&cached)) {
                    tracing::warn!("repository unreachable ({e}); using the cached manifest of {name}, confirmed by the repository earlier");
                    Ok(cached)
                } else {
                    Err(Error::Repo(format!(
                        "{e}; the cache holds a manifest of {name} (version {}) that the repository never confirmed in this boot, so it is not used (a restore in offline mode would use it)",
                        cached.image_version
                    )))
                }
            }
        }
    }

    fn list(&self) -> Result<Vec<ImageSummary>> {
        self.remote.list()
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.remote.delete(name)
    }
}
