//! Restore: fetch, decompress and verify chunks in parallel and write each
//! at its offset. Nothing is written before its SHA-256 has been checked.
//!
//! Delta restore (on by default): before fetching a chunk, the target's
//! window is read, masked with the used map and hashed; equal means the
//! chunk is skipped. A window that reads as zeros (or is a hole of a regular
//! file) cannot equal a non-zero chunk, so a blank target costs no hashing.
//! Re-running an interrupted restore therefore only fetches what is left.
//!
//! Memory: each worker owns a window buffer, a target-read buffer and a
//! compressed-frame buffer: about `threads × 3 × chunk_size`.

use std::path::PathBuf;

use crate::chunk::{is_zero, ChunkId, Decoder, Fingerprint};
use crate::device::{ReadAt, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::manifest::{ChunkRef, ImageKind, Manifest};
use crate::pool;
use crate::progress::Progress;
use crate::record::{self, Known};
use crate::repo::Repository;

/// Options for `restore`.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Worker threads (fetch + decompress + verify + write).
    pub threads: usize,
    /// Skip chunks the target already holds.
    pub delta: bool,
    /// Keep restore records here (see `record`): a partition restore
    /// writes one when it finishes, and a later delta restore in the same
    /// boot trusts it instead of reading the target, if nothing has written
    /// to the target since. None: no records.
    pub records: Option<PathBuf>,
    /// Read and hash the target even when a valid record says what it
    /// holds (the record is still written afterwards).
    pub scan: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            threads: pool::default_threads(),
            delta: true,
            records: None,
            scan: false,
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreStats {
    /// Chunk windows in the image.
    pub chunks: u64,
    /// Chunks fetched from the repository.
    pub chunks_fetched: u64,
    /// Chunks skipped because the target already held them.
    pub chunks_skipped: u64,
    /// Used bytes in the image.
    pub bytes_used: u64,
    /// Compressed bytes fetched.
    pub bytes_fetched: u64,
    /// Used bytes skipped by the delta check.
    pub bytes_skipped: u64,
    /// Of the skipped chunks, those known to be in place from a restore
    /// record, without reading the target.
    #[serde(default)]
    pub chunks_unread: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
}

impl RestoreStats {
    /// Add another restore's counts (a disk restore sums its parts).
    pub fn add(&mut self, o: &RestoreStats) {
        self.chunks += o.chunks;
        self.chunks_fetched += o.chunks_fetched;
        self.chunks_skipped += o.chunks_skipped;
        self.bytes_used += o.bytes_used;
        self.bytes_fetched += o.bytes_fetched;
        self.bytes_skipped += o.bytes_skipped;
        self.chunks_unread += o.chunks_unread;
        self.bytes_written += o.bytes_written;
    }
}

struct Worker {
    buf: Vec<u8>,
    tbuf: Vec<u8>,
    frame: Vec<u8>,
    dec: Decoder,
    stats: RestoreStats,
}

/// Gaps between used ranges smaller than this are written too (they are
/// zeros of unused space), so fragmented windows take few large writes.
const COALESCE_GAP: usize = 64 << 10;

pub(crate) fn coalesced(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges {
        match out.last_mut() {
            Some(last) if s - last.1 < COALESCE_GAP => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// True when the target's window, masked by the used map, equals a chunk
/// (`id` None = all zeros).
pub(crate) fn target_matches(
    target: &Region,
    used: &ExtentMap,
    start: u64,
    len: usize,
    c: &ChunkRef,
    tbuf: &mut [u8],
) -> Result<bool> {
    let id = c.id.as_ref();
    if target.is_hole(start, len as u64) {
        return Ok(id.is_none());
    }
    let ranges = used.window(start, len as u64);
    let (Some(&(first, _)), Some(&(_, last))) = (ranges.first(), ranges.last()) else {
        return Ok(true);
    };
    let tbuf = &mut tbuf[..len];
    target
        .read_exact_at(&mut tbuf[first..last], start + first as u64)
        .ctx(|| format!("reading the target at byte {}", start + first as u64))?;
    tbuf[..first].fill(0);
    tbuf[last..].fill(0);
    used.mask(start, tbuf);
    let zero = is_zero(tbuf);
    Ok(match id {
        None => zero,
        Some(_) if zero => false,
        Some(id) => match &c.b3 {
            Some(fp) => Fingerprint::of(tbuf) == *fp,
            None => ChunkId::of(tbuf) == *id,
        },
    })
}

/// Restore the chunks of one used map onto `target` (a partition-sized
/// region). With `known` (a valid restore record of the target) the
/// target is not read: a window the record shows in place is skipped, any
/// other is fetched.
#[allow(clippy::too_many_arguments)]
pub fn restore_chunks(
    used: &ExtentMap,
    chunk_size: u64,
    source_size: u64,
    chunks: &[ChunkRef],
    target: &Region,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    known: Option<&Known>,
    progress: &Progress,
) -> Result<RestoreStats> {
    if target.len() < source_size {
        return Err(Error::TargetTooSmall {
            target: target.device().path().to_path_buf(),
            need: source_size,
            have: target.len(),
        });
    }
    let totals = std::sync::Mutex::new(RestoreStats::default());
    let attempts = repo.fetch_attempts().max(1);
    // Read the target to find what it holds, unless a record already says.
    let scan = opts.delta && known.is_none();
    pool::for_each(
        opts.threads,
        chunks.len(),
        progress,
        || {
            Ok(Worker {
                buf: Vec::with_capacity(chunk_size as usize),
                tbuf: vec![0u8; chunk_size as usize],
                frame: Vec::new(),
                dec: Decoder::new()?,
                stats: RestoreStats::default(),
            })
        },
        |w, k| {
            let c = &chunks[k];
            let start = c.index * chunk_size;
            if scan {
                // Start reading the window a few chunks ahead so the disk
                // works while this one is hashed.
                if let Some(ahead) = chunks.get(k + 2 * opts.threads.max(1)) {
                    let s = ahead.index * chunk_size;
                    target.will_need(s, chunk_size.min(source_size - s));
                }
            }
            let len = chunk_size.min(source_size - start) as usize;
            let ranges = used.window(start, len as u64);
            let used_here: u64 = ranges.iter().map(|&(s, e)| (e - s) as u64).sum();
            w.stats.chunks += 1;
            w.stats.bytes_used += used_here;
            let in_place = match known {
                Some(k) => k.holds(used, c, start, len as u64),
                None => scan && target_matches(target, used, start, len, c, &mut w.tbuf)?,
            };
            if in_place {
                w.stats.chunks_unread += u64::from(known.is_some());
                w.stats.chunks_skipped += 1;
                w.stats.bytes_skipped += used_here;
                progress.add_skipped(used_here);
                progress.add_done(used_here);
                return flush(w, &totals);
            }
            match &c.id {
                None => {
                    for &(s, e) in &coalesced(&ranges) {
                        target
                            .zero_range(start + s as u64, (e - s) as u64)
                            .ctx(|| format!("zeroing the target at byte {}", start + s as u64))?;
                        w.stats.bytes_written += (e - s) as u64;
                        progress.add_written((e - s) as u64);
                    }
                }
                Some(id) => {
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        repo.get_chunk(id, &mut w.frame)?;
                        w.stats.bytes_fetched += w.frame.len() as u64;
                        progress.add_fetched(w.frame.len() as u64);
                        match w.dec.decode_verified(id, &w.frame, len, &mut w.buf) {
                            Ok(()) => {
                                repo.verified(id, &w.frame);
                                break;
                            }
                            Err(e @ Error::ChunkCorrupt { .. }) if tries < attempts => {
                                repo.invalid(id);
                                tracing::warn!("{e}; fetching it again ({tries}/{attempts})");
                            }
                            Err(e) => {
                                repo.invalid(id);
                                return Err(e);
                            }
                        }
                    }
                    if c.b3.is_some_and(|fp| Fingerprint::of(&w.buf) != fp) {
                        return Err(Error::BadManifest {
                            source_name: None,
                            why: format!(
                                "the fingerprint of chunk {id} does not match its content"
                            ),
                        });
                    }
                    w.stats.chunks_fetched += 1;
                    for &(s, e) in &coalesced(&ranges) {
                        target
                            .write_all_at(&w.buf[s..e], start + s as u64)
                            .ctx(|| format!("writing the target at byte {}", start + s as u64))?;
                        w.stats.bytes_written += (e - s) as u64;
                        progress.add_written((e - s) as u64);
                    }
                }
            }
            progress.add_done(used_here);
            flush(w, &totals)
        },
    )?;
    totals
        .into_inner()
        .map_err(|_| Error::Invalid("restore bookkeeping lock poisoned".into()))
}

fn flush(w: &mut Worker, totals: &std::sync::Mutex<RestoreStats>) -> Result<()> {
    let s = std::mem::take(&mut w.stats);
    totals
        .lock()
        .map_err(|_| Error::Invalid("restore bookkeeping lock poisoned".into()))?
        .add(&s);
    Ok(())
}

/// Refuse before writing anything when a chunk the image needs is absent.
pub fn preflight(m: &Manifest, repo: &dyn Repository) -> Result<()> {
    let ids: Vec<ChunkId> = m.unique_chunks().into_iter().map(|(id, _)| id).collect();
    let missing = repo.missing_chunks(&ids)?;
    match missing.first() {
        None => Ok(()),
        Some(id) if missing.len() == 1 => Err(Error::ChunkMissing(*id)),
        Some(id) => Err(Error::Repo(format!(
            "{} of the {} chunks of {} are missing (first {id}); nothing was written",
            missing.len(),
            ids.len(),
            m.name
        ))),
    }
}

/// Restore a partition image onto `target`, flush it to stable storage,
/// and leave a restore record when `opts.records` is set.
pub fn restore_partition(
    m: &Manifest,
    target: &Region,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreStats> {
    let (stats, start) = restore_partition_unrecorded(m, target, repo, opts, progress)?;
    save_record(opts, target, m, start.as_ref());
    progress.set_phase("done");
    Ok(stats)
}

/// Write the restore record of `target` holding `m` (after the job's last
/// write and flush; `start`: the mark taken before its first write). A
/// failure only costs the next delta restore its shortcut, so it is
/// logged, not returned.
pub(crate) fn save_record(
    opts: &RestoreOptions,
    target: &Region,
    m: &Manifest,
    start: Option<&record::Start>,
) {
    if let Some(dir) = &opts.records {
        if let Err(e) = record::save(dir, target, m, start) {
            tracing::warn!("could not write the restore record: {e}");
        }
    }
}

/// `restore_partition` without the record (for callers that write more to
/// the device afterwards and record at the end), in the crash-safe order of
/// [`crate::crashsafe`]. Also returns the target's mark taken before the
/// first write, for the record.
pub(crate) fn restore_partition_unrecorded(
    m: &Manifest,
    target: &Region,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<(RestoreStats, Option<record::Start>)> {
    if m.kind != ImageKind::Partition {
        return Err(Error::Invalid(format!(
            "{} is a whole-disk image; restore it onto a disk, or pick one of its partitions",
            m.name
        )));
    }
    if target.len() < m.source_size {
        return Err(Error::TargetTooSmall {
            target: target.device().path().to_path_buf(),
            need: m.source_size,
            have: target.len(),
        });
    }
    preflight(m, repo)?;
    let known = match &opts.records {
        Some(dir) if opts.delta && !opts.scan => {
            record::load(dir, target, m.chunk_size, m.source_size)
        }
        _ => None,
    };
    if let Some(k) = &known {
        tracing::info!(
            "{} holds {} as restored earlier in this boot and unwritten since; comparing manifests instead of reading it",
            target.device().path().display(),
            k.image()
        );
    }
    progress.start_phase("restore", m.used_bytes);
    // The disk's write counters before the first write (see `record`).
    let start = opts
        .records
        .as_ref()
        .and_then(|_| record::start(target.device()));
    let stats = crate::crashsafe::restore(m, target, repo, opts, known.as_ref(), progress)?;
    progress.set_phase("sync");
    target.device().sync().ctx(|| {
        format!(
            "flushing {} to stable storage",
            target.device().path().display()
        )
    })?;
    Ok((stats, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_gaps_coalesce_and_large_ones_do_not() {
        let r = [
            (0, 10),
            (100, 200),
            (200 + COALESCE_GAP, 300 + COALESCE_GAP),
        ];
        assert_eq!(
            coalesced(&r),
            vec![(0, 200), (200 + COALESCE_GAP, 300 + COALESCE_GAP)]
        );
    }
}
