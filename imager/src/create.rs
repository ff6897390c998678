//! Create: read a source, build its used map, hash and compress every
//! window that holds data, store the chunks and publish the manifest.
//!
//! Parallelism and memory: two reader threads read the windows' used
//! ranges, two windows at a time, into page-aligned buffers a few pairs
//! ahead of `threads` workers (directly from a device opened read-only,
//! past the page cache); each worker hashes a pair together
//! ([`ChunkId::of_pair`]: one SHA-256 stream waits on its own latency, two
//! keep the SHA unit busy) and compresses each window only when the
//! repository does not already hold it (re-capturing a disk costs a read
//! and a hash per window). Memory is about `(threads + 2) × 2 ×
//! chunk_size` of windows plus the frames in flight (about 40 MiB for two
//! workers at 4 MiB).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use crate::chunk::{id_and_fingerprint, is_zero, ChunkId, Encoder, Fingerprint};
use crate::device::{AlignedBuf, ReadAt, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::fs::{FsMeta, MapOptions};
use crate::manifest::{ChunkRef, ImageKind, Manifest, DEFAULT_CHUNK_SIZE};
use crate::pool;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::coalesced;

/// Default zstd level. On the used data of the bench filesystems
/// (`scripts/bench-imaging`, 4 MiB chunks, one core) level 2 compresses
/// about 1.4× as fast as level 3 for frames about 2.5 % larger (level 1:
/// about 1.5×, 6 % larger, which would put NTFS images past 1.05× the size
/// of `partclone | zstd -3`). Compression is most of create's CPU.
pub const DEFAULT_LEVEL: i32 = 2;

/// Options for `create`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Window size (power of two, 64 KiB – 64 MiB).
    pub chunk_size: u64,
    /// zstd level.
    pub level: i32,
    /// Worker threads.
    pub threads: usize,
    /// Image every byte (no filesystem map).
    pub raw: bool,
    /// Image a filesystem even when unclean.
    pub force: bool,
    /// Free-form description stored in the manifest.
    pub description: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: DEFAULT_LEVEL,
            threads: pool::default_threads(),
            raw: false,
            force: false,
            description: None,
        }
    }
}

/// The used map of a source and how it was found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// Byte ranges to image.
    pub used: ExtentMap,
    /// Filesystem, when recognised.
    pub filesystem: Option<FsMeta>,
    /// `raw` or the walker that made the map.
    pub map: String,
    /// Set when falling back to raw mode.
    pub warning: Option<String>,
}

/// Decide what to image: the filesystem's used blocks, or every byte.
pub fn scan(src: &dyn ReadAt, raw: bool, force: bool) -> Result<Scan> {
    let size = src.size();
    if raw {
        // Still record what the filesystem is, if anything.
        let filesystem = crate::fs::detect(src).ok().flatten();
        return Ok(Scan {
            used: ExtentMap::full(size),
            filesystem,
            map: "raw".into(),
            warning: None,
        });
    }
    match crate::fs::used_map(src, MapOptions { force })? {
        Some(m) => {
            let mut used = m.used;
            used.clip(size);
            let map = m.meta.fstype.clone();
            Ok(Scan {
                used,
                filesystem: Some(m.meta),
                map,
                warning: None,
            })
        }
        None => Ok(Scan {
            used: ExtentMap::full(size),
            filesystem: None,
            map: "raw".into(),
            warning: Some(
                "no supported filesystem recognised: imaging every byte (raw mode)".into(),
            ),
        }),
    }
}

struct Worker {
    out: Vec<u8>,
    enc: Encoder,
    /// Hands the windows' buffers back to the reader.
    spare: Sender<Pair>,
}

/// Two windows read for a worker (it hashes two at a time, see
/// [`ChunkId::of_pair`]): `n` (1 or 2) of them, window `first` and the
/// next, holding `lens` bytes each, `used` of them in use.
struct Pair {
    first: usize,
    n: usize,
    bufs: [AlignedBuf; 2],
    lens: [usize; 2],
    used: u64,
}

/// Compressed frames waiting for a writer, per worker (bounds memory).
pub(crate) const FRAMES_PER_WORKER: usize = 2;
/// Threads storing frames in the repository: storing a chunk (write,
/// fsync, rename, or an upload) waits on the disk or the network, and a
/// compressing worker that waited there would leave its core idle.
const WRITERS: usize = 2;

/// The compressing workers' end of the frame queue (see [`frame_queue`]);
/// each worker may hold a clone, and the writers stop once every clone is
/// dropped and the queue is drained.
#[derive(Clone)]
pub(crate) struct FrameSender {
    tx: SyncSender<(ChunkId, Vec<u8>)>,
    spare: Arc<Mutex<Receiver<Vec<u8>>>>,
}

impl FrameSender {
    /// Hands `frame` to a writer, leaving a spare buffer (or a new one:
    /// the queue bounds how many exist) in its place.
    pub(crate) fn put(&self, id: &ChunkId, frame: &mut Vec<u8>) -> Result<()> {
        let spare = self
            .spare
            .lock()
            .ok()
            .and_then(|rx| rx.try_recv().ok())
            .unwrap_or_default();
        let full = std::mem::replace(frame, spare);
        self.tx
            .send((*id, full))
            .map_err(|_| Error::Invalid("chunk writers stopped".into()))
    }
}

/// The writers' end of the frame queue (see [`frame_queue`]).
pub(crate) struct FrameWriters {
    rx: Mutex<Receiver<(ChunkId, Vec<u8>)>>,
    spare: Sender<Vec<u8>>,
}

impl FrameWriters {
    /// Starts [`WRITERS`] threads in `s` that store each queued frame in
    /// `repo` and hand its buffer back. The first error goes to `fail`
    /// (which must set `stopped`); after that they only drain the queue,
    /// since nothing will be published.
    pub(crate) fn spawn<'scope, 'env>(
        &'env self,
        s: &'scope std::thread::Scope<'scope, 'env>,
        repo: &'env dyn Repository,
        stopped: &'env AtomicBool,
        fail: &'env (dyn Fn(Error) + Sync),
    ) -> Vec<std::thread::ScopedJoinHandle<'scope, ()>> {
        (0..WRITERS)
            .map(|_| {
                let spare = self.spare.clone();
                let rx = &self.rx;
                s.spawn(move || loop {
                    let next = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((id, frame)) = next else { return };
                    if !stopped.load(Ordering::Relaxed) {
                        if let Err(e) = repo.put_chunk(&id, &frame) {
                            fail(e);
                        }
                    }
                    let _ = spare.send(frame);
                })
            })
            .collect()
    }
}

/// A bounded queue (`bound` frames) from compressing workers to writer
/// threads, with the frames' buffers coming back for reuse: storing a
/// chunk waits on the disk or the network, and the cores should not.
pub(crate) fn frame_queue(bound: usize) -> (FrameSender, FrameWriters) {
    let (tx, rx) = sync_channel(bound);
    let (spare_tx, spare_rx) = channel();
    (
        FrameSender {
            tx,
            spare: Arc::new(Mutex::new(spare_rx)),
        },
        FrameWriters {
            rx: Mutex::new(rx),
            spare: spare_tx,
        },
    )
}
/// Window pairs the reader may have read ahead of the workers: with one
/// pair per worker in hand, memory is `(threads + READ_AHEAD_PAIRS) × 2 ×
/// chunk_size`.
const READ_AHEAD_PAIRS: usize = 2;

/// Hash, compress and store every window of `src` that holds used data.
/// Returns the chunk list in window order.
///
/// Layout: a reader thread reads the windows' used ranges, two windows at
/// a time, into page-aligned buffers (so a [`crate::device::Device`]
/// opened read-only reads them with `O_DIRECT`, not through the page
/// cache) a few pairs ahead of the `threads` workers, which hash and
/// compress; [`WRITERS`] threads store the frames the workers hand over
/// through a bounded queue. Memory: `(threads + READ_AHEAD_PAIRS) × 2 ×
/// chunk_size` of windows plus at most `threads × FRAMES_PER_WORKER +
/// WRITERS + threads` frames in flight.
pub fn store_chunks(
    src: &dyn ReadAt,
    used: &ExtentMap,
    chunk_size: u64,
    level: i32,
    threads: usize,
    repo: &dyn Repository,
    progress: &Progress,
) -> Result<Vec<ChunkRef>> {
    let size = src.size();
    let windows: Vec<u64> = (0..size.div_ceil(chunk_size))
        .filter(|&i| used.touches(i * chunk_size, chunk_size.min(size - i * chunk_size)))
        .collect();
    let results: Mutex<Vec<Option<ChunkRef>>> = Mutex::new(vec![None; windows.len()]);
    // Stored size per id: known at once for chunks already in the
    // repository, filled in when this run stores one.
    let sizes: StoredSizes = Mutex::new(HashMap::new());
    let threads = threads.max(1);
    let pairs = windows.len().div_ceil(2);

    let (frames, writers) = frame_queue(threads * FRAMES_PER_WORKER);
    let write_failed = AtomicBool::new(false);
    let write_err: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        write_failed.store(true, Ordering::SeqCst);
        if let Ok(mut slot) = write_err.lock() {
            slot.get_or_insert(e);
        }
    };
    // Read pairs go to the workers; their buffers come back to the reader.
    let (read_tx, read_rx) = channel::<Result<Pair>>();
    let read_rx = Mutex::new(read_rx);
    let (spare_tx, spare_rx) = channel::<Pair>();
    let spare_rx = Mutex::new(spare_rx);
    // The readers' next pair, and how many buffer pairs they have made.
    let next_pair = AtomicUsize::new(0);
    let made = AtomicUsize::new(0);

    let worked = std::thread::scope(|s| {
        let writers = writers.spawn(s, repo, &write_failed, &fail);
        let windows_ref = &windows;
        let (next_pair, made, spare_rx) = (&next_pair, &made, &spare_rx);
        // Each reader owns a sending end: the workers see the channel
        // close when all are done.
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let read_tx = read_tx.clone();
                s.spawn(move || {
                    read_pairs(
                        src,
                        used,
                        windows_ref,
                        chunk_size,
                        (next_pair, made, threads + READ_AHEAD_PAIRS),
                        &read_tx,
                        spare_rx,
                        progress,
                    )
                })
            })
            .collect();
        drop(read_tx);
        let r = pool::run(
            threads.min(pairs.max(1)),
            progress,
            || {
                Ok(Worker {
                    out: Vec::new(),
                    enc: Encoder::new(level)?,
                    spare: spare_tx.clone(),
                })
            },
            |w| {
                let next = match read_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return Err(lock_err()),
                };
                // The reader is done (or stopped): so is this worker.
                let Ok(pair) = next else {
                    return match progress.is_cancelled() {
                        true => Err(Error::Cancelled),
                        false => Ok(false),
                    };
                };
                let pair = pair?;
                let [b0, b1] = &pair.bufs;
                let hashes = hash_windows([&b0[..pair.lens[0]], &b1[..pair.lens[1]]], pair.n);
                let mut put = |id: &ChunkId, frame: &mut Vec<u8>| -> Result<()> {
                    if write_failed.load(Ordering::Relaxed) {
                        return Err(Error::Invalid("storing a chunk failed".into()));
                    }
                    frames.put(id, frame)
                };
                for (i, hashed) in hashes.into_iter().enumerate().take(pair.n) {
                    let k = pair.first + i;
                    let entry = chunk_window_hashed(
                        &mut w.enc,
                        &mut w.out,
                        windows[k],
                        &pair.bufs[i][..pair.lens[i]],
                        hashed,
                        repo,
                        &sizes,
                        progress,
                        &mut put,
                    )?;
                    results.lock().map_err(|_| lock_err())?[k] = Some(entry);
                }
                progress.add_done(pair.used);
                // The reader may have stopped: then the buffers are freed.
                let _ = w.spare.send(pair);
                Ok(true)
            },
        );
        // The workers are done: the reader, if still waiting for a buffer,
        // sees the channel close and stops.
        drop(spare_tx);
        let read = readers.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| Error::Invalid("a source reader panicked".into()))
        });
        // Closing the queue ends the writers once it is drained.
        drop(frames);
        for h in writers {
            if h.join().is_err() {
                return Err(Error::Invalid("a chunk writer panicked".into()));
            }
        }
        read?;
        r
    });
    // A writer's error is the cause of any worker's "storing failed".
    if let Some(e) = write_err.into_inner().map_err(|_| lock_err())? {
        return Err(e);
    }
    worked?;

    let mut out = Vec::with_capacity(windows.len());
    for r in results.into_inner().map_err(|_| lock_err())? {
        out.push(r.ok_or_else(|| Error::Invalid("a chunk window was not processed".into()))?);
    }
    fill_stored(&mut out, sizes)?;
    Ok(out)
}

/// Threads reading the source for [`store_chunks`]: a read waits for the
/// disk (directly read, nothing reads ahead for it), and a window of
/// scattered small files is many reads, so two keep the workers fed.
const READERS: usize = 2;

/// A reader of [`store_chunks`]: takes the next pair of `windows` from
/// `next`, reads it into a buffer pair (a new one while fewer than `max`
/// exist, counted in `made`, else one the workers hand back on `spare`) and
/// sends it on `out`. Only used ranges are read (small gaps bridged, see
/// `restore::coalesced`); the rest of a window is zeroed. A read error is
/// sent on and ends the reading, as do the workers going away.
#[allow(clippy::too_many_arguments)]
fn read_pairs(
    src: &dyn ReadAt,
    used: &ExtentMap,
    windows: &[u64],
    chunk_size: u64,
    (next, made, max): (&AtomicUsize, &AtomicUsize, usize),
    out: &Sender<Result<Pair>>,
    spare: &Mutex<Receiver<Pair>>,
    progress: &Progress,
) {
    let size = src.size();
    // Window k's start, length and used ranges.
    let span = |k: usize| -> (u64, usize, Vec<(usize, usize)>) {
        let start = windows[k] * chunk_size;
        let len = chunk_size.min(size - start);
        (start, len as usize, used.window(start, len))
    };
    // Hints for sources read through the page cache (a device read
    // directly ignores them): the kernel reads while the workers work.
    // Each reader hints its own pairs' successors.
    let ahead = 2 * max;
    let hint = |k: usize| {
        if k < windows.len() {
            let (start, _, ranges) = span(k);
            for (a, b) in coalesced(&ranges) {
                src.will_need(start + a as u64, (b - a) as u64);
            }
        }
    };
    loop {
        if progress.is_cancelled() {
            return;
        }
        let first = 2 * next.fetch_add(1, Ordering::Relaxed);
        if first >= windows.len() {
            return;
        }
        if first == 0 {
            for k in 0..ahead {
                hint(k);
            }
        }
        let fresh = made
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                (m < max).then_some(m + 1)
            })
            .is_ok();
        let mut pair = if fresh {
            let b = || AlignedBuf::new(chunk_size as usize);
            Pair {
                first,
                n: 0,
                bufs: [b(), b()],
                lens: [0; 2],
                used: 0,
            }
        } else {
            let back = match spare.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            match back {
                Ok(p) => p,
                Err(_) => return,
            }
        };
        pair.first = first;
        pair.n = (windows.len() - first).min(2);
        pair.used = 0;
        let mut read = || -> Result<()> {
            for i in 0..pair.n {
                let k = first + i;
                hint(k + ahead);
                let (start, len, ranges) = span(k);
                let buf = &mut pair.bufs[i][..len];
                for &(a, b) in &coalesced(&ranges) {
                    src.read_exact_at(&mut buf[a..b], start + a as u64)
                        .ctx(|| format!("reading the source at byte {}", start + a as u64))?;
                }
                used.mask(start, buf);
                pair.used += ranges.iter().map(|&(s, e)| (e - s) as u64).sum::<u64>();
                pair.lens[i] = len;
            }
            Ok(())
        };
        let r = read();
        let failed = r.is_err();
        if out.send(r.map(|()| pair)).is_err() || failed {
            return;
        }
    }
}

/// Stored size per chunk id, shared by the workers of one run: known at
/// once for chunks already in the repository, filled in when this run
/// stores one (`None` while a worker is compressing it).
pub(crate) type StoredSizes = Mutex<HashMap<ChunkId, Option<u64>>>;

fn lock_err() -> Error {
    Error::Invalid("chunk bookkeeping lock poisoned".into())
}

/// The chunk entry of window `index` whose content is `content`: zero
/// windows get an entry without id; others are hashed and, unless the
/// repository (or another worker of this run) already holds them,
/// compressed and handed to `put(id, frame)`, which may take the frame
/// away (leaving another buffer in `frame`) and store it later, as long as
/// it is stored before the manifest is published. `stored` is left 0:
/// [`fill_stored`] sets it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_window_with(
    enc: &mut Encoder,
    out: &mut Vec<u8>,
    index: u64,
    content: &[u8],
    repo: &dyn Repository,
    sizes: &StoredSizes,
    progress: &Progress,
    put: &mut dyn FnMut(&ChunkId, &mut Vec<u8>) -> Result<()>,
) -> Result<ChunkRef> {
    let hashed = (!is_zero(content)).then(|| id_and_fingerprint(content));
    chunk_window_hashed(enc, out, index, content, hashed, repo, sizes, progress, put)
}

/// The id and fingerprint of the first `n` (1 or 2) of `windows`, `None`
/// for an all-zero one; two non-zero windows are hashed together.
fn hash_windows(windows: [&[u8]; 2], n: usize) -> [Option<(ChunkId, Fingerprint)>; 2] {
    let zero = windows.map(is_zero);
    if n == 2 && !zero[0] && !zero[1] {
        let (a, b) = ChunkId::of_pair(windows[0], windows[1]);
        return [
            Some((a, Fingerprint::of(windows[0]))),
            Some((b, Fingerprint::of(windows[1]))),
        ];
    }
    std::array::from_fn(|i| (i < n && !zero[i]).then(|| id_and_fingerprint(windows[i])))
}

/// [`chunk_window_with`] for a window already hashed: `hashed` is its id
/// and fingerprint, `None` when it is all zeros.
#[allow(clippy::too_many_arguments)]
fn chunk_window_hashed(
    enc: &mut Encoder,
    out: &mut Vec<u8>,
    index: u64,
    content: &[u8],
    hashed: Option<(ChunkId, Fingerprint)>,
    repo: &dyn Repository,
    sizes: &StoredSizes,
    progress: &Progress,
    put: &mut dyn FnMut(&ChunkId, &mut Vec<u8>) -> Result<()>,
) -> Result<ChunkRef> {
    let Some((id, b3)) = hashed else {
        return Ok(ChunkRef {
            index,
            id: None,
            stored: 0,
            b3: None,
        });
    };
    // Claim the id: only the first worker to see it compresses.
    let claim = match sizes.lock().map_err(|_| lock_err())?.entry(id) {
        std::collections::hash_map::Entry::Occupied(_) => false,
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(None);
            true
        }
    };
    if claim {
        let stored = match repo.chunk_size_stored(&id)? {
            Some(n) => n,
            None => {
                enc.encode(content, out)?;
                let n = out.len() as u64;
                put(&id, out)?;
                progress.add_written(n);
                n
            }
        };
        sizes
            .lock()
            .map_err(|_| lock_err())?
            .insert(id, Some(stored));
    }
    Ok(ChunkRef {
        index,
        id: Some(id),
        stored: 0,
        b3: Some(b3),
    })
}

/// Sets every entry's `stored` from the sizes the run recorded.
pub(crate) fn fill_stored(chunks: &mut [ChunkRef], sizes: StoredSizes) -> Result<()> {
    let sizes = sizes.into_inner().map_err(|_| lock_err())?;
    for c in chunks {
        if let Some(id) = c.id {
            c.stored = sizes.get(&id).copied().flatten().unwrap_or(0);
        }
    }
    Ok(())
}

/// Describes where a partition image came from.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    /// Logical sector size of the source device.
    pub sector_size: u32,
    /// GPT type GUID or MBR code when the source is a partition of a table.
    pub partition_type: Option<String>,
}

/// Build a partition manifest (not yet published) from a source region.
pub fn build_partition_manifest(
    name: &str,
    src: &dyn ReadAt,
    scan: Scan,
    info: &SourceInfo,
    repo: &dyn Repository,
    opts: &CreateOptions,
    progress: &Progress,
) -> Result<Manifest> {
    if !opts.chunk_size.is_power_of_two()
        || !(crate::manifest::MIN_CHUNK_SIZE..=crate::manifest::MAX_CHUNK_SIZE)
            .contains(&opts.chunk_size)
    {
        return Err(Error::Invalid(format!(
            "chunk size {} must be a power of two between 64 KiB and 64 MiB",
            opts.chunk_size
        )));
    }
    let chunks = store_chunks(
        src,
        &scan.used,
        opts.chunk_size,
        opts.level,
        opts.threads,
        repo,
        progress,
    )?;
    let mut m = Manifest::new(
        name,
        ImageKind::Partition,
        src.size(),
        info.sector_size,
        scan.map,
        scan.used,
        opts.chunk_size,
        opts.level,
        chunks,
    );
    m.filesystem = scan.filesystem;
    m.partition_type = info.partition_type.clone();
    m.description = opts.description.clone();
    Ok(m)
}

/// Create and publish a partition image of `src`. Returns the published
/// manifest (with its version number).
pub fn create_partition(
    name: &str,
    src: &Region,
    info: &SourceInfo,
    repo: &dyn Repository,
    opts: &CreateOptions,
    progress: &Progress,
) -> Result<Manifest> {
    crate::manifest::validate_name(name)?;
    progress.start_phase("scan", 0);
    let scan = scan(src, opts.raw, opts.force)?;
    repo.begin_upload(name);
    if let Some(w) = &scan.warning {
        tracing::warn!("{w}");
    }
    progress.start_phase("create", scan.used.used_bytes());
    let mut m = build_partition_manifest(name, src, scan, info, repo, opts, progress)?;
    progress.set_phase("publish");
    m.image_version = repo.publish(&m)?;
    progress.set_phase("done");
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::LocalRepo;

    /// `e` and its sources, joined.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s += &format!(": {c}");
            cur = c.source();
        }
        s
    }

    /// A source whose byte `bad` cannot be read (a bad sector).
    struct BadSector {
        data: Vec<u8>,
        bad: u64,
    }

    impl ReadAt for BadSector {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            if (offset..offset + buf.len() as u64).contains(&self.bad) {
                return Err(std::io::Error::other("simulated bad sector"));
            }
            self.data.read_exact_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
    }

    #[test]
    fn a_source_read_error_stops_create_and_says_where_and_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = LocalRepo::open(dir.path(), true).expect("repo");
        let chunk = 64u64 << 10;
        let data: Vec<u8> = (0..40 * chunk).map(|i| (i * 7 % 251) as u8).collect();
        // In window 29 (of 40), read by either reader, with most pairs
        // already handed out: the readers, workers and writers all stop.
        for bad in [29 * chunk + 100, 0, 40 * chunk - 1] {
            let src = BadSector {
                data: data.clone(),
                bad,
            };
            let used = ExtentMap::full(src.size());
            let r = store_chunks(&src, &used, chunk, 1, 2, &repo, &Progress::new());
            let e = r.expect_err("a bad sector fails the create");
            let msg = chain(&e);
            let at = bad / chunk * chunk;
            assert!(
                msg.contains(&format!("reading the source at byte {at}"))
                    && msg.contains("simulated bad sector"),
                "{msg}"
            );
        }
    }
}
