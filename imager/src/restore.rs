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
//!
//! Order and sources: by default the workers walk the chunk list in order
//! and fetch every frame from the repository. With a [`Feed`] (the swarm,
//! `crate::swarm`) the restore first runs the delta check over every window,
//! tells the feed which chunks it needs, then asks the feed for the next
//! chunk again and again: the feed decides the order and where each frame
//! comes from (a peer or the repository). Either way a frame is decompressed
//! and its SHA-256 checked before any byte of it is written, and a frame
//! that fails is fetched again from the repository.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::chunk::{check_id, is_zero, ChunkId, Decoder, Fingerprint};
use crate::device::{AlignedBuf, ReadAt, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::manifest::{ChunkRef, ImageKind, Manifest};
use crate::pool;
use crate::progress::Progress;
use crate::record::{self, Known};
use crate::repo::Repository;

/// A window of the target that holds a verified chunk: written by this
/// restore after its frame was verified, or found in place by the delta
/// check. A swarm peer may serve the chunk from here (reading it back,
/// masking it and checking its SHA-256 again before it serves a byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The chunk.
    pub id: ChunkId,
    /// The device or file the target lives on.
    pub device: PathBuf,
    /// Byte offset of the window on that device.
    pub offset: u64,
    /// Window length in bytes (the chunk's content length).
    pub len: usize,
    /// Used byte ranges inside the window; the chunk holds zeros elsewhere.
    pub ranges: Vec<(usize, usize)>,
}

/// A chunk a [`Feed`] handed to a restore worker, and where its frame came
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The chunk.
    pub id: ChunkId,
    /// The peer that served the frame (its swarm member id); None: the
    /// repository.
    pub peer: Option<String>,
    /// The frame came from this machine itself (a chunk it already restored
    /// elsewhere on the disk): nothing was fetched.
    pub local: bool,
}

/// Chooses the order in which a restore fetches its chunks and where each
/// frame comes from (the swarm client implements it). The restore verifies
/// every frame it gets; the feed never has to be trusted.
pub trait Feed: Send + Sync + std::fmt::Debug {
    /// A restore of one used map needs `need` (distinct chunk ids, in window
    /// order); `placed` are the windows the target already holds. Called
    /// once per used map, before `next`.
    fn begin(&self, need: &[ChunkId], placed: Vec<Placed>) -> Result<()>;
    /// The next chunk to fetch, with its frame in `out`; None once every
    /// needed chunk has been handed out. May block until one is available.
    fn next(&self, out: &mut Vec<u8>) -> Result<Option<Ticket>>;
    /// The frame in `out` failed verification (`why`): fetch it again from
    /// the repository into `out` (and stop using the peer that served it).
    fn refetch(&self, t: &mut Ticket, why: &str, out: &mut Vec<u8>) -> Result<()>;
    /// The frame in `frame` was verified and written to `placed`. The feed
    /// may keep the buffer (e.g. to serve it to peers).
    fn done(&self, t: Ticket, frame: &mut Vec<u8>, placed: Vec<Placed>);
}

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
    /// Where chunks come from and in which order (None: the repository, in
    /// window order).
    pub feed: Option<Arc<dyn Feed>>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            threads: pool::default_threads(),
            delta: true,
            records: None,
            scan: false,
            feed: None,
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
    /// Compressed bytes fetched (from the repository and from peers).
    pub bytes_fetched: u64,
    /// Of `bytes_fetched`, those that came from the repository server.
    #[serde(default)]
    pub bytes_from_server: u64,
    /// Of `bytes_fetched`, those that came from peers (swarm restore).
    #[serde(default)]
    pub bytes_from_peers: u64,
    /// Chunks that came from peers.
    #[serde(default)]
    pub chunks_from_peers: u64,
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
        self.bytes_from_server += o.bytes_from_server;
        self.bytes_from_peers += o.bytes_from_peers;
        self.chunks_from_peers += o.chunks_from_peers;
        self.bytes_skipped += o.bytes_skipped;
        self.chunks_unread += o.chunks_unread;
        self.bytes_written += o.bytes_written;
    }
}

struct Worker {
    /// The fetched windows' content (two: a worker hashes two chunks
    /// together, see [`ChunkId::of_pair`]): page-aligned, so their aligned
    /// ranges are written with `O_DIRECT` straight from them.
    bufs: [AlignedBuf; 2],
    /// The frames of the chunks in `bufs`.
    frames: [Vec<u8>; 2],
    tbuf: Vec<u8>,
    dec: Decoder,
    stats: RestoreStats,
}

/// Chunks a restore asks its repository to start reading ahead of the
/// workers, per worker (see [`Repository::will_need`]).
const CHUNKS_AHEAD_PER_WORKER: usize = 2;

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
/// other is fetched. With `opts.feed` the feed picks the order and the
/// sources (see the module documentation).
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
    let job = Job {
        used,
        chunk_size,
        source_size,
        chunks,
        target,
        repo,
        opts,
        known,
        progress,
        attempts: repo.fetch_attempts().max(1),
        // Read the target to find what it holds, unless a record already says.
        scan: opts.delta && known.is_none(),
        totals: std::sync::Mutex::new(RestoreStats::default()),
    };
    match &opts.feed {
        None => job.in_order()?,
        Some(feed) => job.fed(feed.as_ref())?,
    }
    job.totals
        .into_inner()
        .map_err(|_| Error::Invalid("restore bookkeeping lock poisoned".into()))
}

/// One `restore_chunks` call.
struct Job<'a> {
    used: &'a ExtentMap,
    chunk_size: u64,
    source_size: u64,
    chunks: &'a [ChunkRef],
    target: &'a Region,
    repo: &'a dyn Repository,
    opts: &'a RestoreOptions,
    known: Option<&'a Known>,
    progress: &'a Progress,
    attempts: u32,
    scan: bool,
    totals: std::sync::Mutex<RestoreStats>,
}

/// What the delta check found for a window.
enum Window {
    /// The target already holds it (or it is all zeros and was zeroed).
    Settled,
    /// Its chunk must be fetched.
    Fetch,
}

impl Job<'_> {
    fn worker(&self) -> Result<Worker> {
        Ok(Worker {
            bufs: [
                AlignedBuf::new(self.chunk_size as usize),
                AlignedBuf::new(self.chunk_size as usize),
            ],
            tbuf: vec![0u8; self.chunk_size as usize],
            frames: [Vec::new(), Vec::new()],
            dec: Decoder::new()?,
            stats: RestoreStats::default(),
        })
    }

    /// Start of window `c` and its length.
    fn span(&self, c: &ChunkRef) -> (u64, usize) {
        let start = c.index * self.chunk_size;
        (
            start,
            self.chunk_size.min(self.source_size - start) as usize,
        )
    }

    /// The target's copy of window `c`, for a swarm peer to serve.
    fn placed(&self, id: ChunkId, c: &ChunkRef) -> Placed {
        let (start, len) = self.span(c);
        Placed {
            id,
            device: self.target.device().path().to_path_buf(),
            offset: self.target.offset() + start,
            len,
            ranges: self.used.window(start, len as u64),
        }
    }

    /// Account for window `k`, skip it when the target holds it, zero it
    /// when it is all zeros; else say it must be fetched.
    fn settle(&self, w: &mut Worker, k: usize) -> Result<Window> {
        let c = &self.chunks[k];
        let (start, len) = self.span(c);
        if self.scan {
            // Start reading the window a few chunks ahead so the disk
            // works while this one is hashed.
            // Not for a hole of a file: reading it ahead would fill the
            // page cache with zeros, and a cached hole no longer looks like
            // one (the check below would then read and compare it).
            if let Some(ahead) = self.chunks.get(k + 2 * self.opts.threads.max(1)) {
                let s = ahead.index * self.chunk_size;
                let l = self.chunk_size.min(self.source_size - s);
                if !self.target.is_hole(s, l) {
                    self.target.will_need(s, l);
                }
            }
        }
        let ranges = self.used.window(start, len as u64);
        let used_here: u64 = ranges.iter().map(|&(s, e)| (e - s) as u64).sum();
        w.stats.chunks += 1;
        w.stats.bytes_used += used_here;
        let in_place = match self.known {
            Some(k) => k.holds(self.used, c, start, len as u64),
            None => {
                self.scan && target_matches(self.target, self.used, start, len, c, &mut w.tbuf)?
            }
        };
        if in_place {
            w.stats.chunks_unread += u64::from(self.known.is_some());
            w.stats.chunks_skipped += 1;
            w.stats.bytes_skipped += used_here;
            self.progress.add_skipped(used_here);
            self.progress.add_done(used_here);
            return Ok(Window::Settled);
        }
        if c.id.is_some() {
            return Ok(Window::Fetch);
        }
        for &(s, e) in &coalesced(&ranges) {
            self.target
                .zero_range(start + s as u64, (e - s) as u64)
                .ctx(|| format!("zeroing the target at byte {}", start + s as u64))?;
            w.stats.bytes_written += (e - s) as u64;
            self.progress.add_written((e - s) as u64);
        }
        self.progress.add_done(used_here);
        Ok(Window::Settled)
    }

    /// Write the verified content in `buf` to window `c`.
    fn write(&self, buf: &[u8], stats: &mut RestoreStats, c: &ChunkRef) -> Result<()> {
        let (start, len) = self.span(c);
        let ranges = self.used.window(start, len as u64);
        for &(s, e) in &coalesced(&ranges) {
            self.target
                .write_all_at(&buf[s..e], start + s as u64)
                .ctx(|| format!("writing the target at byte {}", start + s as u64))?;
            stats.bytes_written += (e - s) as u64;
            self.progress.add_written((e - s) as u64);
        }
        self.progress
            .add_done(ranges.iter().map(|&(s, e)| (e - s) as u64).sum());
        Ok(())
    }

    /// Default order: every window in turn, each chunk from the
    /// repository. A worker takes two windows at a time, so that it can
    /// hash the two chunks it fetches together.
    fn in_order(&self) -> Result<()> {
        let ahead = CHUNKS_AHEAD_PER_WORKER * self.opts.threads.max(1);
        for c in self.chunks.iter().take(ahead) {
            if let Some(id) = &c.id {
                self.repo.will_need(id);
            }
        }
        pool::for_each(
            self.opts.threads,
            self.chunks.len().div_ceil(2),
            self.progress,
            || self.worker(),
            |w, pair| {
                let mut todo: Vec<(usize, ChunkId)> = Vec::with_capacity(2);
                for k in (2 * pair..2 * pair + 2).filter(|&k| k < self.chunks.len()) {
                    // Pairs are handed out in order: ask for a chunk a few
                    // windows ahead, so it is read while these are worked on.
                    if let Some(id) = self.chunks.get(k + ahead).and_then(|c| c.id.as_ref()) {
                        self.repo.will_need(id);
                    }
                    if let (Window::Fetch, Some(id)) = (self.settle(w, k)?, self.chunks[k].id) {
                        todo.push((k, id));
                    }
                }
                self.fetch_verified(w, &todo)?;
                for (i, &(k, _)) in todo.iter().enumerate() {
                    w.stats.chunks_fetched += 1;
                    self.write(&w.bufs[i], &mut w.stats, &self.chunks[k])?;
                }
                flush(w, &self.totals)
            },
        )
    }

    /// Fetch the chunks of `todo` (at most two: window, id) from the
    /// repository into `w.bufs[i]`, decompressed and verified, the two
    /// hashed together. A chunk that fails is fetched again alone, up to
    /// the repository's attempts.
    fn fetch_verified(&self, w: &mut Worker, todo: &[(usize, ChunkId)]) -> Result<()> {
        let mut errs: [Option<Error>; 2] = [None, None];
        let mut lens = [0usize; 2];
        for (i, &(k, id)) in todo.iter().enumerate().take(2) {
            lens[i] = self.span(&self.chunks[k]).1;
            self.repo.get_chunk(&id, &mut w.frames[i])?;
            self.count_fetched(w, i);
            if let Err(e) = w
                .dec
                .decode_into(&id, &w.frames[i], &mut w.bufs[i][..lens[i]])
            {
                errs[i] = Some(e);
            }
        }
        match todo {
            [(_, a), (_, b)] if errs.iter().all(Option::is_none) => {
                let (ha, hb) = ChunkId::of_pair(&w.bufs[0][..lens[0]], &w.bufs[1][..lens[1]]);
                errs = [check_id(a, &ha).err(), check_id(b, &hb).err()];
            }
            _ => {
                for (i, (_, id)) in todo.iter().enumerate().take(2) {
                    if errs[i].is_none() {
                        errs[i] = check_id(id, &ChunkId::of(&w.bufs[i][..lens[i]])).err();
                    }
                }
            }
        }
        for (i, &(_, id)) in todo.iter().enumerate().take(2) {
            match errs[i].take() {
                None => self.repo.verified(&id, &w.frames[i]),
                Some(e) => self.fetch_again(w, i, &id, lens[i], e)?,
            }
        }
        Ok(())
    }

    /// Chunk `id` fetched into slot `i` failed with `first`: fetch it
    /// again (see [`refetch_verified`]).
    fn fetch_again(
        &self,
        w: &mut Worker,
        i: usize,
        id: &ChunkId,
        len: usize,
        first: Error,
    ) -> Result<()> {
        let Worker {
            bufs,
            frames,
            dec,
            stats,
            ..
        } = w;
        refetch_verified(
            self.repo,
            dec,
            id,
            first,
            &mut frames[i],
            &mut bufs[i][..len],
            &mut |n| {
                stats.bytes_fetched += n;
                stats.bytes_from_server += n;
                self.progress.add_fetched(n);
            },
        )
    }

    /// Count the frame just fetched into slot `i` from the repository.
    fn count_fetched(&self, w: &mut Worker, i: usize) {
        let n = w.frames[i].len() as u64;
        w.stats.bytes_fetched += n;
        w.stats.bytes_from_server += n;
        self.progress.add_fetched(n);
    }

    /// Fed order: the delta check over every window first, then the feed
    /// hands out the chunks still needed, one at a time, each with its
    /// frame; each verified chunk is written to every window that holds it.
    fn fed(&self, feed: &dyn Feed) -> Result<()> {
        let fetch: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
        let placed: std::sync::Mutex<Vec<Placed>> = std::sync::Mutex::new(Vec::new());
        let poisoned = || Error::Invalid("restore bookkeeping lock poisoned".into());
        pool::for_each(
            self.opts.threads,
            self.chunks.len(),
            self.progress,
            || self.worker(),
            |w, k| {
                let c = &self.chunks[k];
                match (self.settle(w, k)?, c.id) {
                    (Window::Fetch, _) => fetch.lock().map_err(|_| poisoned())?.push(k),
                    (Window::Settled, Some(id)) => placed
                        .lock()
                        .map_err(|_| poisoned())?
                        .push(self.placed(id, c)),
                    (Window::Settled, None) => {}
                }
                flush(w, &self.totals)
            },
        )?;
        let mut fetch = fetch.into_inner().map_err(|_| poisoned())?;
        fetch.sort_unstable();
        // Each distinct chunk is fetched once and written to all its windows.
        let mut windows: HashMap<ChunkId, Vec<usize>> = HashMap::new();
        let mut need = Vec::new();
        for &k in &fetch {
            let c = &self.chunks[k];
            let Some(id) = c.id else { continue };
            let entry = windows.entry(id).or_default();
            if entry.is_empty() {
                need.push(id);
            } else if self.span(&self.chunks[entry[0]]).1 != self.span(c).1 {
                return Err(Error::BadManifest {
                    source_name: None,
                    why: format!("chunk {id} is listed for windows of different lengths"),
                });
            }
            entry.push(k);
        }
        feed.begin(&need, placed.into_inner().map_err(|_| poisoned())?)?;
        if need.is_empty() {
            return Ok(());
        }
        pool::run(
            self.opts.threads,
            self.progress,
            || self.worker(),
            |w| {
                let Some(mut t) = feed.next(&mut w.frames[0])? else {
                    return Ok(false);
                };
                let Some(ks) = windows.get(&t.id) else {
                    return Err(Error::Invalid(format!(
                        "the swarm handed out chunk {}, which this restore does not need",
                        t.id
                    )));
                };
                let first = &self.chunks[ks[0]];
                let (_, len) = self.span(first);
                let mut tries = 0;
                loop {
                    tries += 1;
                    let n = w.frames[0].len() as u64;
                    if !t.local {
                        w.stats.bytes_fetched += n;
                        self.progress.add_fetched(n);
                        if t.peer.is_some() {
                            w.stats.bytes_from_peers += n;
                            self.progress.add_from_peers(n);
                        } else {
                            w.stats.bytes_from_server += n;
                        }
                    }
                    match w
                        .dec
                        .decode_verified_into(&t.id, &w.frames[0], &mut w.bufs[0][..len])
                    {
                        Ok(()) => break,
                        Err(e @ Error::ChunkCorrupt { .. }) if tries < self.attempts.max(2) => {
                            tracing::warn!(
                                "{e} (from {}); fetching it again from the repository",
                                t.peer.as_deref().unwrap_or("the repository")
                            );
                            feed.refetch(&mut t, &e.to_string(), &mut w.frames[0])?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                w.stats.chunks_fetched += u64::from(!t.local);
                w.stats.chunks_from_peers += u64::from(t.peer.is_some() && !t.local);
                let mut done = Vec::with_capacity(ks.len());
                for &k in ks {
                    let c = &self.chunks[k];
                    self.write(&w.bufs[0], &mut w.stats, c)?;
                    done.push(self.placed(t.id, c));
                }
                feed.done(t, &mut w.frames[0], done);
                flush(w, &self.totals)?;
                Ok(true)
            },
        )
    }
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

/// Chunk `id` failed with `first` (fetched once already, its frame given
/// back to `repo` as invalid here): while the error is a corrupt copy and
/// the repository allows more attempts ([`Repository::fetch_attempts`]: a
/// network may corrupt, a local disk will not heal), fetch it again into
/// `frame` and decode it verified into all of `out`. `fetched(n)` counts
/// each frame fetched; a verified one is reported to `repo`.
pub(crate) fn refetch_verified(
    repo: &dyn Repository,
    dec: &mut Decoder,
    id: &ChunkId,
    first: Error,
    frame: &mut Vec<u8>,
    out: &mut [u8],
    fetched: &mut dyn FnMut(u64),
) -> Result<()> {
    let attempts = repo.fetch_attempts().max(1);
    let mut err = first;
    let mut tries = 1;
    loop {
        repo.invalid(id);
        match err {
            Error::ChunkCorrupt { .. } if tries < attempts => {
                tracing::warn!("{err}; fetching it again ({tries}/{attempts})");
            }
            _ => return Err(err),
        }
        tries += 1;
        repo.get_chunk(id, frame)?;
        fetched(frame.len() as u64);
        match dec.decode_verified_into(id, frame, out) {
            Ok(()) => {
                repo.verified(id, frame);
                return Ok(());
            }
            Err(e) => err = e,
        }
    }
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
