//! Copying a directory repository into an S3 bucket.
//!
//! Chunks first (those the bucket lacks, several at once), then every
//! manifest version under its own number, oldest first: a manifest never
//! appears before its chunks. Running it again after an interruption
//! skips what is present (chunks by id, manifests with identical bytes),
//! so it resumes where it stopped. A version present in the bucket with
//! different content is an error: versions are never overwritten.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use super::{LocalRepo, Repository, S3Repo};
use crate::chunk::ChunkId;
use crate::error::{Error, IoContext, Result};

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrateReport {
    /// Chunks in the directory.
    pub chunks: u64,
    /// Chunks uploaded by this run.
    pub chunks_copied: u64,
    /// Their bytes.
    pub bytes_copied: u64,
    /// Manifest versions in the directory.
    pub manifests: u64,
    /// Manifest versions written by this run.
    pub manifests_copied: u64,
}

/// Every chunk id stored in a directory repository.
pub fn dir_chunk_ids(src: &LocalRepo) -> Result<Vec<ChunkId>> {
    let dir = src.root().join("chunks");
    let mut out = Vec::new();
    for sub in std::fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
        let sub = sub.ctx(|| format!("listing {}", dir.display()))?;
        if !sub.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let p = sub.path();
        for f in std::fs::read_dir(&p).ctx(|| format!("listing {}", p.display()))? {
            let f = f.ctx(|| format!("listing {}", p.display()))?;
            if let Some(id) = f
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".zst"))
                .and_then(|h| h.parse::<ChunkId>().ok())
            {
                out.push(id);
            }
        }
    }
    out.sort_unstable_by_key(|id| id.hex());
    Ok(out)
}

/// Copy `src` into `dst` with `threads` uploads at once; `progress` is
/// called with (chunks done, chunks to copy) now and then.
pub fn migrate_dir_to_s3(
    src: &LocalRepo,
    dst: &S3Repo,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<MigrateReport> {
    let ids = dir_chunk_ids(src)?;
    let mut report = MigrateReport {
        chunks: ids.len() as u64,
        ..Default::default()
    };
    let mut todo = Vec::new();
    for batch in ids.chunks(4096) {
        todo.extend(dst.missing_chunks(batch)?);
    }
    let total = todo.len() as u64;
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let copied = AtomicU64::new(0);
    progress(0, total);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut frame = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = todo.get(i) else {
                            return Ok(());
                        };
                        src.get_chunk(id, &mut frame)?;
                        if dst.put_chunk_if_absent(id, &frame)? {
                            copied.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
                        }
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if d.is_multiple_of(256) || d == total {
                            progress(d, total);
                        }
                    }
                })
            })
            .collect();
        let mut first_err = None;
        for w in workers {
            let r = w
                .join()
                .map_err(|_| Error::Repo("a migration worker panicked".into()))
                .and_then(|r| r);
            if let Err(e) = r {
                // Stop the others at their next chunk.
                next.store(usize::MAX / 2, Ordering::Relaxed);
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    report.chunks_copied = copied.into_inner();
    report.bytes_copied = bytes.into_inner();
    for img in src.list()? {
        for v in &img.versions {
            let m = src.manifest(&img.name, Some(*v))?;
            report.manifests += 1;
            if dst.store_version(&m)? {
                report.manifests_copied += 1;
            }
        }
    }
    Ok(report)
}
