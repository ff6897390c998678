//! Import: converting the images of other tools (OpenGnsys, Clonezilla,
//! FOG, or a bare partclone stream) into Aula images.
//!
//! The conversion streams. The partclone stream is read once: its bitmap
//! gives the used map, and the blocks, as they go by in ascending order,
//! are laid into chunk windows; a window is handed to a worker as soon as
//! the stream passes its end, and the worker hashes and compresses it
//! exactly as `create` does, then hands the frame to a writer thread that
//! stores it (so no compressing core sits idle while a chunk file is
//! fsynced). No temporary disk is written; memory is a few windows and
//! frames per worker. partclone's CRC32 strips, the decompressor's own
//! checks (gzip CRC, zstd checksum, lzop) and OpenGnsys' MD5 sums are
//! verified as the stream is read; the manifest is published only when all
//! of them passed, so a corrupt source publishes nothing.
//!
//! Layouts: see [`source`]. A Clonezilla `savedisk` directory and a FOG
//! directory with `d1.mbr` become one disk image (table and boot areas
//! from the saved files, one partition image per partclone stream); a
//! `saveparts` directory becomes one partition image per partition
//! (`NAME` for one, `NAME-<dev>` for several).

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;

use crate::chunk::ChunkId;
use crate::chunk::Encoder;
use crate::create::{chunk_window_with, fill_stored, frame_queue, StoredSizes, FRAMES_PER_WORKER};
use crate::device::ReadAt;
use crate::legacy::{LegacyError, PartcloneStream};
use crate::manifest::{ChunkRef, DiskPartition, ImageKind, Manifest, Origin};
use crate::progress::Progress;
use crate::repo::Repository;

pub mod disk;
pub mod files;
pub mod source;
pub mod store;

pub use source::{detect, Source, Tool};

/// Errors of an import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading or checking a partclone stream failed; `file` is the file
    /// being read at the time.
    #[error("{file}")]
    Stream {
        /// The part file (or URL) being read.
        file: String,
        /// What failed.
        #[source]
        source: LegacyError,
    },
    /// A file could not be read.
    #[error("{path}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An OpenGnsys sum does not match.
    #[error("{file}: MD5 {found} does not match {sum_file} ({expected}): the image is corrupt")]
    SumMismatch {
        /// The image file.
        file: String,
        /// The sum file.
        sum_file: String,
        /// What the sum file says.
        expected: String,
        /// What the file hashes to.
        found: String,
    },
    /// The source is not something import understands.
    #[error("{0}")]
    Invalid(String),
    /// The repository or chunk pipeline failed.
    #[error(transparent)]
    Image(#[from] crate::Error),
    /// Stopped by the caller.
    #[error("cancelled")]
    Cancelled,
}

impl ImportError {
    pub(crate) fn io(p: &Path, e: io::Error) -> ImportError {
        ImportError::Io {
            path: p.display().to_string(),
            source: e,
        }
    }
}

/// Options for an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Window size (power of two, 64 KiB – 64 MiB).
    pub chunk_size: u64,
    /// zstd level.
    pub level: i32,
    /// Hash/compress workers.
    pub threads: usize,
    /// Stored in the manifest.
    pub description: Option<String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunk_size: crate::manifest::DEFAULT_CHUNK_SIZE,
            level: crate::create::DEFAULT_LEVEL,
            threads: crate::pool::default_threads(),
            description: None,
        }
    }
}

/// Windows waiting for a worker, per worker (bounds memory).
const QUEUE_PER_WORKER: usize = 4;

struct Job {
    index: u64,
    len: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` set so far (blocks arrive in ascending order; the
    /// gaps between them are zeroed as they are passed).
    filled: usize,
}

/// Converts one opened partclone stream into a (not yet published)
/// partition manifest, storing its chunks in `repo`. `where_` names the
/// stream's current file in errors.
pub fn convert(
    stream: PartcloneStream,
    name: &str,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
    where_: &dyn Fn() -> String,
) -> Result<Manifest, ImportError> {
    let info = stream.info().clone();
    let used = stream.used_map();
    let size = info.device_size;
    let cs = opts.chunk_size;
    if !cs.is_power_of_two()
        || !(crate::manifest::MIN_CHUNK_SIZE..=crate::manifest::MAX_CHUNK_SIZE).contains(&cs)
    {
        return Err(ImportError::Invalid(format!(
            "chunk size {cs} must be a power of two between 64 KiB and 64 MiB"
        )));
    }
    let threads = opts.threads.max(1);
    let sizes: StoredSizes = Mutex::new(HashMap::new());
    let results: Mutex<Vec<ChunkRef>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<crate::Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let (work_tx, work_rx) = sync_channel::<Job>(threads * QUEUE_PER_WORKER);
    let work_rx = Mutex::new(work_rx);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    // The first window's content, to recognise the filesystem.
    let mut head: Option<Vec<u8>> = None;

    // Finished frames go to writer threads: storing a chunk (write, fsync,
    // rename) waits on the disk, and a compressing worker that waited
    // there would leave its core idle.
    let (frames, writers) = frame_queue(threads * FRAMES_PER_WORKER);

    let fail = |e: crate::Error| {
        stop.store(true, Ordering::SeqCst);
        if let Ok(mut f) = failed.lock() {
            f.get_or_insert(e);
        }
    };

    let outcome = std::thread::scope(|s| {
        writers.spawn(s, repo, &stop, &fail);
        for _ in 0..threads {
            let free_tx = free_tx.clone();
            let frames = frames.clone();
            let (work_rx, sizes, results, stop, fail) = (&work_rx, &sizes, &results, &stop, &fail);
            s.spawn(move || {
                // A worker that cannot start still drains the queue (and
                // hands buffers back), so the reader never waits forever.
                let mut enc = match Encoder::new(opts.level) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        fail(e);
                        None
                    }
                };
                let mut out = Vec::new();
                let mut put = |id: &ChunkId, frame: &mut Vec<u8>| frames.put(id, frame);
                loop {
                    let job = match work_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    if let (Some(enc), false) = (enc.as_mut(), stop.load(Ordering::Relaxed)) {
                        match chunk_window_with(
                            enc,
                            &mut out,
                            job.index,
                            &job.buf[..job.len],
                            repo,
                            sizes,
                            progress,
                            &mut put,
                        ) {
                            Ok(c) => {
                                if let Ok(mut r) = results.lock() {
                                    r.push(c);
                                }
                            }
                            Err(e) => fail(e),
                        }
                    }
                    let _ = free_tx.send(job.buf);
                }
            });
        }
        drop(frames);
        drop(free_tx);
        let mut asm = Assembler {
            cs,
            size,
            cur: None,
            tx: Some(work_tx),
            free: free_rx,
            made: 0,
            max_bufs: threads * (QUEUE_PER_WORKER + 1) + 1,
            head: &mut head,
        };
        let mut last = 0u64;
        let mut on_progress = |done: u64| {
            progress.add_done(done.saturating_sub(last));
            last = done;
        };
        let cancel = progress.cancel_flag();
        let res = {
            let stop = &stop;
            let mut write = |at: u64, data: &[u8]| -> io::Result<()> {
                if stop.load(Ordering::Relaxed) {
                    return Err(io::Error::other("a chunk worker failed"));
                }
                asm.put(at, data)
            };
            stream.for_each_block_run(&mut write, &mut on_progress, &cancel)
        };
        let res = res.and_then(|_| asm.finish().map_err(LegacyError::Io));
        // Closing the queue ends the workers.
        asm.tx = None;
        res
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e.into());
    }
    match outcome {
        Ok(_) => {}
        Err(LegacyError::Cancelled) => return Err(ImportError::Cancelled),
        Err(e) => {
            return Err(ImportError::Stream {
                file: where_(),
                source: e,
            })
        }
    }
    let mut chunks = results
        .into_inner()
        .map_err(|_| ImportError::Invalid("chunk list lock poisoned".into()))?;
    // Windows the used map touches but no block landed in (a coarsened
    // map's gaps) hold zeros.
    let have: std::collections::HashSet<u64> = chunks.iter().map(|c| c.index).collect();
    let mut extra = Vec::new();
    for e in used.extents() {
        if e.len == 0 {
            continue;
        }
        for w in e.start / cs..=(e.end() - 1) / cs {
            if !have.contains(&w) && !extra.contains(&w) {
                extra.push(w);
            }
        }
    }
    chunks.extend(extra.into_iter().map(|index| ChunkRef {
        index,
        id: None,
        stored: 0,
        b3: None,
    }));
    chunks.sort_by_key(|c| c.index);
    fill_stored(&mut chunks, sizes)?;
    let mut m = Manifest::new(
        name,
        ImageKind::Partition,
        size,
        512,
        format!("partclone-{}", info.fs.to_ascii_lowercase()),
        used,
        cs,
        opts.level,
        chunks,
    );
    m.filesystem = head.and_then(|h| {
        let d = disk::VirtualDisk::from_head(h, size);
        crate::fs::detect(&d).ok().flatten()
    });
    m.description = opts.description.clone();
    Ok(m)
}

/// Lays blocks into windows and hands full windows to the workers.
struct Assembler<'a> {
    cs: u64,
    size: u64,
    cur: Option<Job>,
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    free: Receiver<Vec<u8>>,
    made: usize,
    max_bufs: usize,
    head: &'a mut Option<Vec<u8>>,
}

impl Assembler<'_> {
    fn buffer(&mut self) -> io::Result<Vec<u8>> {
        if let Ok(b) = self.free.try_recv() {
            return Ok(b);
        }
        if self.made < self.max_bufs {
            self.made += 1;
            return Ok(vec![0u8; self.cs as usize]);
        }
        self.free
            .recv()
            .map_err(|_| io::Error::other("chunk workers stopped"))
    }

    fn send(&mut self) -> io::Result<()> {
        if let Some(mut job) = self.cur.take() {
            let (from, to) = (job.filled, job.len);
            job.buf[from..to].fill(0);
            if job.index == 0 {
                *self.head = Some(job.buf[..job.len].to_vec());
            }
            let tx = self
                .tx
                .as_ref()
                .ok_or_else(|| io::Error::other("chunk queue closed"))?;
            tx.send(job)
                .map_err(|_| io::Error::other("chunk workers stopped"))?;
        }
        Ok(())
    }

    fn put(&mut self, mut at: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let index = at / self.cs;
            if self.cur.as_ref().is_some_and(|j| j.index != index) {
                self.send()?;
            }
            if self.cur.is_none() {
                let buf = self.buffer()?;
                let start = index * self.cs;
                let len = self.cs.min(self.size.saturating_sub(start)) as usize;
                self.cur = Some(Job {
                    index,
                    len,
                    buf,
                    filled: 0,
                });
            }
            let Some(job) = self.cur.as_mut() else {
                continue;
            };
            let off = (at - index * self.cs) as usize;
            let n = data.len().min(job.len.saturating_sub(off));
            if n == 0 {
                return Err(io::Error::other("a block past the device's end"));
            }
            if off < job.filled {
                return Err(io::Error::other("blocks out of order"));
            }
            job.buf[job.filled..off].fill(0);
            job.buf[off..off + n].copy_from_slice(&data[..n]);
            job.filled = off + n;
            data = &data[n..];
            at += n as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// What an import made.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The published manifests (one, or one per partition of a
    /// `saveparts` directory).
    pub manifests: Vec<Manifest>,
    /// What was noticed and left out.
    pub notes: Vec<String>,
}

fn stream_label(p: &source::PartStream) -> String {
    match p.files.as_slice() {
        [one] => one.display().to_string(),
        many => format!(
            "{} … {} ({} parts)",
            many.first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            many.last()
                .and_then(|f| f.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            many.len()
        ),
    }
}

/// Opens the partclone stream of `part`; `md5` hashes the raw bytes read.
pub fn open_part(
    part: &source::PartStream,
    md5: Option<files::Md5Tap>,
) -> Result<(PartcloneStream, files::Position), ImportError> {
    let (r, pos) = files::PartsReader::new(part.files.clone());
    let r = files::Tapped::new(Box::new(io::BufReader::with_capacity(1 << 20, r)), md5);
    let s = crate::legacy::open(Box::new(r)).map_err(|e| ImportError::Stream {
        file: pos.current().1,
        source: e,
    })?;
    Ok((s, pos))
}

fn truncation_hint(e: ImportError, part: &source::PartStream) -> ImportError {
    match e {
        ImportError::Stream {
            file,
            source: source @ LegacyError::Truncated(_),
        } => {
            let next = part.files.last().and_then(|l| files::next_part_name(l));
            match next {
                Some(n) if part.files.last().is_some_and(|l| l.display().to_string() == file) => {
                    ImportError::Stream {
                        file: format!(
                            "{file} (the stream ends with this file: is the next split part {} missing?)",
                            n.display()
                        ),
                        source,
                    }
                }
                _ => ImportError::Stream { file, source },
            }
        }
        e => e,
    }
}

fn origin(
    src: &Source,
    part: Option<&source::PartStream>,
    info: &crate::legacy::PartcloneInfo,
    verified: Vec<String>,
) -> Origin {
    let mut files: Vec<String> = match part {
        Some(p) => p.files.iter().map(|f| f.display().to_string()).collect(),
        None => vec![],
    };
    if let (None, Some(d)) = (part, &src.disk) {
        files.extend(d.files.iter().map(|f| f.display().to_string()));
    }
    Origin {
        tool: src.tool.name().into(),
        source: src.path.display().to_string(),
        format: format!(
            "partclone {} {}, {}",
            info.partclone_version, info.fs, info.compression
        ),
        files,
        verified,
        imported: crate::manifest::now_rfc3339(),
    }
}

fn checks_of(info: &crate::legacy::PartcloneInfo) -> Vec<String> {
    let mut v = Vec::new();
    if info.checksum_mode != 0 {
        v.push("partclone CRC32".to_string());
    }
    v.push("partclone header and bitmap CRC32".into());
    match info.compression {
        crate::legacy::Compression::Gzip => v.push("gzip CRC32".into()),
        crate::legacy::Compression::Zstd => v.push("zstd frame checksums (when written)".into()),
        crate::legacy::Compression::Lzop => v.push("lzop block checksums (when written)".into()),
        crate::legacy::Compression::Xz => v.push("xz block checks".into()),
        crate::legacy::Compression::Lz4 => {
            v.push("lz4 content/block checksums (when written)".into())
        }
        crate::legacy::Compression::Bzip2 => v.push("bzip2 block CRCs".into()),
        crate::legacy::Compression::None => {}
    }
    v
}

/// MD5 of the last MiB of `p` (OpenGnsys `.img.sum`).
fn md5_tail(p: &Path) -> Result<String, ImportError> {
    use md5::Digest;
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(p).map_err(|e| ImportError::io(p, e))?;
    let len = f.metadata().map_err(|e| ImportError::io(p, e))?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(1 << 20)))
        .map_err(|e| ImportError::io(p, e))?;
    let mut h = md5::Md5::new();
    io::copy(&mut f, &mut h).map_err(|e| ImportError::io(p, e))?;
    Ok(hex::encode(h.finalize()))
}

/// Import one partition stream of `src` as image `name` (not published).
fn import_part(
    src: &Source,
    part: &source::PartStream,
    name: &str,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Manifest, ImportError> {
    let mut verified = Vec::new();
    let img = &part.files[0];
    if let Some(want) = &src.sums.tail {
        let got = md5_tail(img)?;
        if &got != want {
            return Err(ImportError::SumMismatch {
                file: img.display().to_string(),
                sum_file: format!("{}.sum", img.display()),
                expected: want.clone(),
                found: got,
            });
        }
        verified.push("opengnsys .img.sum (MD5 of the last MiB)".into());
    }
    let tap = src.sums.full.as_ref().map(|_| files::Md5Tap::default());
    let (stream, pos) = open_part(part, tap.clone()).map_err(|e| truncation_hint(e, part))?;
    let info = stream.info().clone();
    progress.start_phase("import", info.used_bytes());
    let mut m = convert(stream, name, repo, opts, progress, &|| pos.current().1)
        .map_err(|e| truncation_hint(e, part))?;
    if let (Some(want), Some(tap)) = (&src.sums.full, tap) {
        // The converter read the stream to its end (and the decompressor's
        // trailer); hash whatever the buffer left unread too.
        let got = tap.hex_of_whole(img)?;
        if &got != want {
            return Err(ImportError::SumMismatch {
                file: img.display().to_string(),
                sum_file: format!("{}.full.sum", img.display()),
                expected: want.clone(),
                found: got,
            });
        }
        verified.push("opengnsys .img.full.sum (MD5 of the whole file)".into());
    }
    verified.extend(checks_of(&info));
    m.origin = Some(origin(src, Some(part), &info, verified));
    Ok(m)
}

/// Imports `path` (file, split first part, Clonezilla or FOG directory)
/// as image `name` and publishes it. Nothing is published unless every
/// stream converted and every check passed.
pub fn import_path(
    path: &Path,
    name: &str,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Imported, ImportError> {
    crate::manifest::validate_name(name)?;
    let src = detect(path)?;
    import_source(&src, name, repo, opts, progress)
}

/// Imports a detected source (see [`import_path`]).
pub fn import_source(
    src: &Source,
    name: &str,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Imported, ImportError> {
    crate::manifest::validate_name(name)?;
    repo.begin_upload(name);
    let mut out = Vec::new();
    if let Some(d) = &src.disk {
        let m = import_disk(src, d, name, repo, opts, progress)?;
        out.push(m);
    } else {
        let several = src.parts.len() > 1;
        let mut ms = Vec::new();
        for p in &src.parts {
            let n = if several {
                format!("{name}-{}", p.dev)
            } else {
                name.to_string()
            };
            crate::manifest::validate_name(&n)?;
            ms.push(import_part(src, p, &n, repo, opts, progress)?);
        }
        out = ms;
    }
    progress.set_phase("publish");
    for m in &mut out {
        m.image_version = repo.publish(m)?;
    }
    progress.set_phase("done");
    Ok(Imported {
        manifests: out,
        notes: src.notes.clone(),
    })
}

fn import_disk(
    src: &Source,
    d: &source::DiskFiles,
    name: &str,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Manifest, ImportError> {
    let saved = disk::saved_disk(
        d.head.clone(),
        d.tail.clone(),
        &src.path.display().to_string(),
    )?;
    let table = saved.table.clone();
    let mut parts = Vec::new();
    let mut first_info = None;
    for p in &src.parts {
        let n = p.number.ok_or_else(|| {
            ImportError::Invalid(format!(
                "{}: no partition number in {:?}",
                src.path.display(),
                p.dev
            ))
        })?;
        let tp = table.partition(n).ok_or_else(|| {
            ImportError::Invalid(format!(
                "{}: {} has no partition {n} in the saved partition table",
                src.path.display(),
                p.dev
            ))
        })?;
        let mut m = import_part(src, p, name, repo, opts, progress)?;
        if m.source_size > tp.size {
            return Err(ImportError::Invalid(format!(
                "{}: the image of {} spans {} bytes but partition {n} has {}",
                stream_label(p),
                p.dev,
                m.source_size,
                tp.size
            )));
        }
        m.partition_type = Some(tp.ptype.clone());
        if first_info.is_none() {
            first_info = m.origin.as_ref().map(|o| o.format.clone());
        }
        parts.push(DiskPartition {
            number: n,
            start: tp.start,
            size: tp.size,
            image: Box::new(m),
        });
    }
    let boot = crate::disk_image::boot_areas(&table, saved.disk.size());
    let chunks = crate::create::store_chunks(
        &saved.disk,
        &boot,
        opts.chunk_size,
        opts.level,
        opts.threads,
        repo,
        progress,
    )?;
    let mut m = Manifest::new(
        name,
        ImageKind::Disk,
        saved.disk.size(),
        table.sector_size,
        "disk".into(),
        boot,
        opts.chunk_size,
        opts.level,
        chunks,
    );
    m.table = Some(table);
    m.partitions = parts;
    m.description = opts.description.clone();
    let mut files: Vec<String> = d.files.iter().map(|f| f.display().to_string()).collect();
    for p in &src.parts {
        files.extend(p.files.iter().map(|f| f.display().to_string()));
    }
    m.origin = Some(Origin {
        tool: src.tool.name().into(),
        source: src.path.display().to_string(),
        format: format!(
            "{} whole disk: partition table and boot areas from {}; partitions {}",
            src.tool.name(),
            d.files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
            first_info.unwrap_or_default()
        ),
        files,
        verified: vec![
            "partclone CRCs and compressor checks of every partition (see each partition's origin)"
                .into(),
        ],
        imported: crate::manifest::now_rfc3339(),
    });
    Ok(m)
}

/// Imports a partclone stream read from `reader` (a URL or standard
/// input), named `display` in errors and in the origin.
pub fn import_reader(
    reader: Box<dyn Read + Send>,
    display: &str,
    name: &str,
    repo: &dyn Repository,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Imported, ImportError> {
    crate::manifest::validate_name(name)?;
    let stream = crate::legacy::open(reader).map_err(|e| ImportError::Stream {
        file: display.to_string(),
        source: e,
    })?;
    let info = stream.info().clone();
    repo.begin_upload(name);
    progress.start_phase("import", info.used_bytes());
    let mut m = convert(stream, name, repo, opts, progress, &|| display.to_string())?;
    let src = Source {
        tool: Tool::Partclone,
        path: PathBuf::from(display),
        parts: vec![],
        disk: None,
        sums: source::Sums::default(),
        notes: vec![],
    };
    let mut o = origin(&src, None, &info, checks_of(&info));
    o.files = vec![display.to_string()];
    m.origin = Some(o);
    progress.set_phase("publish");
    m.image_version = repo.publish(&m)?;
    progress.set_phase("done");
    Ok(Imported {
        manifests: vec![m],
        notes: vec![],
    })
}

/// The legacy-image kind of a file or directory that `create` should not
/// image raw: `Some(description)` for a partclone image (plain or
/// compressed) or a Clonezilla/FOG directory.
pub fn legacy_kind(path: &Path) -> Option<String> {
    if path.is_dir() {
        if source::is_clonezilla(path) {
            return Some("a Clonezilla image directory".into());
        }
        if source::is_fog(path) {
            return Some("a FOG image directory".into());
        }
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = vec![0u8; 256 << 10];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head.truncate(got);
    crate::legacy::looks_like_partclone(&head)
        .then(|| "a partclone image (as OpenGnsys, Clonezilla and FOG store them)".into())
}

impl disk::VirtualDisk {
    /// A disk of `size` bytes holding `head` at its start.
    pub fn from_head(mut head: Vec<u8>, size: u64) -> disk::VirtualDisk {
        head.truncate(size as usize);
        disk::VirtualDisk::new(head, Vec::new(), size)
    }
}
