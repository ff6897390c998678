//! A remote repository with a local chunk cache (`--cache DIR`; the
//! OpenGnsys CACHE partition).
//!
//! Chunks are served from the cache when present and stored into it after
//! the restore has verified them (never before), so a corrupt download never
//! enters the cache. A cached chunk that fails verification is evicted and
//! fetched from the remote. Manifests are copied into the cache under their
//! own version numbers, so a restore can later run from the cache alone
//! when the server is unreachable.

use std::collections::HashSet;
use std::sync::Mutex;

use super::{ImageSummary, LocalRepo, Repository};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// Remote repository + local cache.
pub struct CachedRepo {
    remote: Box<dyn Repository>,
    cache: LocalRepo,
    /// Chunks handed out from the cache and not yet confirmed good.
    from_cache: Mutex<HashSet<ChunkId>>,
}

impl CachedRepo {
    /// Wrap `remote` with the cache repository `cache`.
    pub fn new(remote: Box<dyn Repository>, cache: LocalRepo) -> CachedRepo {
        CachedRepo {
            remote,
            cache,
            from_cache: Mutex::new(HashSet::new()),
        }
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
        match self.remote.manifest(name, version) {
            Ok(m) => {
                if let Err(e) = self.cache.store_version(&m) {
                    tracing::warn!("could not copy the manifest of {name} into the cache: {e}");
                }
                Ok(m)
            }
            Err(
                e @ (Error::ImageNotFound(_)
                | Error::BadManifest { .. }
                | Error::UnsupportedVersion { .. }),
            ) => Err(e),
            Err(e) => {
                tracing::warn!("repository unreachable ({e}); using the cached manifest of {name}");
                self.cache.manifest(name, version)
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
