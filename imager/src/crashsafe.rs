//! The write order of a partition restore, so that a restore stopped at any
//! point (an error, a cancel, SIGKILL, the OOM killer, a power cut) never
//! leaves a partition that looks like a filesystem over a mix of old and new
//! blocks.
//!
//! The idea is the whole-disk restore's (wipe first, head last), applied to
//! the places where filesystems keep what `blkid` and `mount` look for:
//! the first 4 KiB of a partition (ext2/3/4 superblock at 1024, FAT and NTFS
//! boot sectors at 0 with FAT's backup at sector 6, XFS, swap, LUKS), the
//! rest of its first MiB (btrfs at 64 KiB, ISO 9660 at 32 KiB, ZFS labels),
//! and its last MiB (the NTFS backup boot sector in the last sector, which
//! the kernel's `ntfs3` driver falls back to, md 0.90/1.0 and ZFS end
//! labels). Superblock *backups* (ext4's in groups 1, 3, 5, …, btrfs's at
//! 64 MiB) are looked at by neither `blkid` nor `mount`, only by a person
//! running `e2fsck -b` or `btrfs rescue`; they are not wiped.
//!
//! # Order
//!
//! S is the image's size, L the partition's (S ≤ L). *W* = the first MiB,
//! the last MiB of the image and the last MiB of the partition. *P* = the
//! image's first and last 4 KiB. The windows that touch W are *held*.
//!
//! 0. Checks that change nothing: the target is large enough, every chunk
//!    is present, the restore record (if any) is valid. For each held
//!    window the restore decides as usual whether the target already holds
//!    it (record or hash); if it does, its bytes inside W (at most 3 MiB in
//!    all) are kept in memory.
//! 1. The first 4 KiB of the partition are zeroed and flushed.
//! 2. The rest of W is zeroed and flushed.
//! 3. Every window that is not held, in parallel, with the delta check;
//!    flushed.
//! 4. The held windows, tail first, except the bytes in P (kept in memory,
//!    at most 8 KiB): fetched and verified, or the kept bytes put back;
//!    flushed.
//! 5. The image's last 4 KiB; flushed.
//! 6. The image's first 4 KiB; flushed. The restore record is written
//!    after this.
//!
//! # The partition after the restore stops
//!
//! | stopped in | the partition holds | `blkid`, `mount` |
//! |---|---|---|
//! | 0 | what it held | as before: nothing was written |
//! | 1 | the old content, or it without its first 4 KiB | the old filesystem unchanged, or nothing for ext2/3/4, FAT, NTFS, XFS, swap, LUKS (their signature is gone) |
//! | 2 | the old content without its first MiB or its tail | nothing |
//! | 3 | new windows over old data; W zero | nothing |
//! | 4 | the new image but for some held windows and P | nothing when the filesystem's signature lies in P (ext2/3/4, FAT, NTFS, XFS, swap); one whose signature lies deeper (btrfs at 64 KiB) appears when its window is written, over new blocks only: old data remains only in W, which is zero |
//! | 5 | the new image but for its first and, partly, last 4 KiB | nothing; a torn last 4 KiB can only hold new bytes |
//! | 6 | the new image, complete except part of its first 4 KiB | nothing, or the new filesystem complete (the first 4 KiB is one page: the kernel writes it back whole) |
//! | after 6 | the new image | the new filesystem |
//!
//! Never an old superblock over new blocks: the old filesystem's signature
//! is gone (step 1 is flushed) before the first new byte is written, and
//! the new one comes only once everything else is flushed. A power cut
//! within step 1 is the one case where the old filesystem is left as it was
//! or with its first 4 KiB partly zero (a single sector-aligned page: disks
//! write it whole or not at all, except some 512-byte-emulation drives).
//! In between, a kernel `ntfs3` driver mounting from the backup boot
//! sector (step 5) would see the new, complete filesystem but for its
//! first 4 KiB, its own boot sector and bootstrap code.
//!
//! Streamed images (partclone, `legacy`) follow the same order through
//! [`Held`]: the first write wipes W, bytes bound for W wait in memory
//! (at most 3 MiB), and the end of the stream writes them, P last.
//!
//! Running the restore again finishes it: the delta check skips what is in
//! place (held windows included: their bytes in W are kept across the
//! wipe), and the same order repeats. A delta restore that finds most
//! windows in place thus fetches at most the held windows it does not find
//! in place, and rewrites at most 3 MiB it read itself.

use std::collections::HashMap;

use crate::chunk::{ChunkId, Decoder};
use crate::device::{ReadAt, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::manifest::{ChunkRef, Manifest};
use crate::progress::Progress;
use crate::record::Known;
use crate::repo::Repository;
use crate::restore::{
    coalesced, refetch_verified, restore_chunks, target_matches, Feed, RestoreOptions, RestoreStats,
};

/// Zeroed before the first write at each end (step 2).
pub const WIPE_BYTES: u64 = 1 << 20;
/// Written last at each end of the image (steps 5 and 6).
pub const SIGNATURE_BYTES: u64 = 4096;

/// What goes where, in which order.
#[derive(Debug)]
pub struct Plan {
    /// W: zeroed first (offsets in the partition).
    pub wipe: ExtentMap,
    /// P: the image's bytes written last.
    pub last: ExtentMap,
    /// Chunks of the windows touching W, the last window first.
    pub held: Vec<ChunkRef>,
    /// The other chunks.
    pub rest: Vec<ChunkRef>,
}

impl Plan {
    /// The plan of restoring `m` onto a partition of `region_len` bytes.
    pub fn new(m: &Manifest, region_len: u64) -> Plan {
        let (s, l) = (m.source_size, region_len.max(m.source_size));
        let tail = |end: u64| (end - WIPE_BYTES.min(end), WIPE_BYTES.min(end));
        let wipe = ExtentMap::from_ranges([(0, WIPE_BYTES.min(l)), tail(s), tail(l)]);
        let p = SIGNATURE_BYTES.min(s);
        let last = ExtentMap::from_ranges([(0, p), (s - p, p)]);
        let (mut held, rest): (Vec<ChunkRef>, Vec<ChunkRef>) =
            m.chunks.iter().cloned().partition(|c| {
                let (start, len) = m.window(c.index);
                wipe.touches(start, len)
            });
        held.sort_by_key(|c| std::cmp::Reverse(c.index));
        Plan {
            wipe,
            last,
            held,
            rest,
        }
    }
}

fn flush(target: &Region) -> Result<()> {
    target.device().sync().ctx(|| {
        format!(
            "flushing {} to stable storage",
            target.device().path().display()
        )
    })
}

/// Write `bytes` at `at` except the parts inside `last`, which are kept in
/// `deferred` to be written at the end.
fn write_except(
    target: &Region,
    last: &ExtentMap,
    at: u64,
    bytes: &[u8],
    deferred: &mut Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    let mut pos = 0usize;
    let put = |from: usize, to: usize| -> Result<()> {
        if from < to {
            target
                .write_all_at(&bytes[from..to], at + from as u64)
                .ctx(|| format!("writing the target at byte {}", at + from as u64))?;
        }
        Ok(())
    };
    for (s, e) in last.window(at, bytes.len() as u64) {
        put(pos, s)?;
        deferred.push((at + s as u64, bytes[s..e].to_vec()));
        pos = e;
    }
    put(pos, bytes.len())
}

/// Fetches and verifies the held windows, one at a time.
struct Fetcher {
    dec: Decoder,
    frame: Vec<u8>,
    /// The last window fetched.
    content: Vec<u8>,
    /// Held chunks a feed (the swarm) already delivered, verified.
    fed: HashMap<ChunkId, Vec<u8>>,
}

impl Fetcher {
    /// With a feed (the swarm): fetch every held chunk in `ids` through it
    /// (so the room's coordinator accounts for them and peers can send
    /// them), verify each and keep its content for step 4. Nothing is
    /// written here; a chunk the feed cannot deliver is fetched in step 4
    /// from the repository.
    fn prefetch(
        &mut self,
        feed: &dyn Feed,
        ids: &[ChunkId],
        lens: &HashMap<ChunkId, usize>,
        stats: &mut RestoreStats,
        progress: &Progress,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        feed.begin(ids, Vec::new())?;
        while let Some(mut t) = feed.next(&mut self.frame)? {
            let Some(&len) = lens.get(&t.id) else {
                return Err(Error::Invalid(format!(
                    "the swarm handed out chunk {}, which this restore does not need",
                    t.id
                )));
            };
            let mut tries = 0;
            let mut content = Vec::new();
            loop {
                tries += 1;
                let n = self.frame.len() as u64;
                if !t.local {
                    stats.bytes_fetched += n;
                    progress.add_fetched(n);
                    if t.peer.is_some() {
                        stats.bytes_from_peers += n;
                        progress.add_from_peers(n);
                    } else {
                        stats.bytes_from_server += n;
                    }
                }
                match self
                    .dec
                    .decode_verified(&t.id, &self.frame, len, &mut content)
                {
                    Ok(()) => break,
                    Err(e @ Error::ChunkCorrupt { .. }) if tries < 3 => {
                        tracing::warn!(
                            "{e} (from {}); fetching it again from the repository",
                            t.peer.as_deref().unwrap_or("the repository")
                        );
                        feed.refetch(&mut t, &e.to_string(), &mut self.frame)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            stats.chunks_from_peers += u64::from(t.peer.is_some() && !t.local);
            self.fed.insert(t.id, content);
            // Only its frame (RAM) may be served: its windows are written
            // later.
            feed.done(t, &mut self.frame, Vec::new());
        }
        Ok(())
    }

    /// Fetch and verify chunk `c` (a window of `len` bytes) into
    /// `self.content`.
    fn fetch(
        &mut self,
        c: &ChunkRef,
        len: usize,
        repo: &dyn Repository,
        stats: &mut RestoreStats,
        progress: &Progress,
    ) -> Result<()> {
        let Some(id) = &c.id else {
            self.content.clear();
            self.content.resize(len, 0);
            return Ok(());
        };
        if let Some(content) = self.fed.get(id) {
            if content.len() == len {
                self.content.clear();
                self.content.extend_from_slice(content);
                stats.chunks_fetched += 1;
                return Ok(());
            }
        }
        // Held windows come from the repository itself, never from swarm
        // peers.
        let mut fetched = |n: u64| {
            stats.bytes_fetched += n;
            stats.bytes_from_server += n;
            progress.add_fetched(n);
        };
        repo.get_chunk(id, &mut self.frame)?;
        fetched(self.frame.len() as u64);
        self.content.resize(len, 0);
        match self
            .dec
            .decode_verified_into(id, &self.frame, &mut self.content)
        {
            Ok(()) => repo.verified(id, &self.frame),
            Err(e) => refetch_verified(
                repo,
                &mut self.dec,
                id,
                e,
                &mut self.frame,
                &mut self.content,
                &mut fetched,
            )?,
        }
        stats.chunks_fetched += 1;
        Ok(())
    }
}

/// Restore the chunks of partition image `m` onto `target` in the order of
/// the module doc. `known`: a valid restore record of the target.
pub(crate) fn restore(
    m: &Manifest,
    target: &Region,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    known: Option<&Known>,
    progress: &Progress,
) -> Result<RestoreStats> {
    let plan = Plan::new(m, target.len());
    let cancelled = || {
        if progress.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    };

    // 0. Held windows already in place keep their bytes in W.
    let scan = opts.delta && known.is_none();
    let mut kept: HashMap<u64, Vec<(u64, Vec<u8>)>> = HashMap::new();
    let mut tbuf = Vec::new();
    for c in &plan.held {
        let (start, len) = m.window(c.index);
        let in_place = match known {
            Some(k) => k.holds(&m.used, c, start, len),
            None if scan => {
                tbuf.resize(len as usize, 0);
                target_matches(target, &m.used, start, len as usize, c, &mut tbuf)?
            }
            None => false,
        };
        if in_place {
            let mut pieces = Vec::new();
            for (s, e) in plan.wipe.window(start, len) {
                let mut b = vec![0u8; e - s];
                target
                    .read_exact_at(&mut b, start + s as u64)
                    .ctx(|| format!("reading the target at byte {}", start + s as u64))?;
                pieces.push((start + s as u64, b));
            }
            kept.insert(c.index, pieces);
        }
    }
    cancelled()?;

    // 1, 2. Wipe: the first page, flushed, then the rest of W, flushed.
    let first = SIGNATURE_BYTES.min(target.len());
    target
        .zero_range(0, first)
        .ctx(|| "zeroing the start of the target".into())?;
    flush(target)?;
    for e in plan.wipe.extents() {
        let (s, end) = (e.start.max(first), e.end());
        if s < end {
            target
                .zero_range(s, end - s)
                .ctx(|| format!("zeroing the target at byte {s}"))?;
        }
    }
    flush(target)?;

    // 3. Everything else.
    let mut stats = restore_chunks(
        &m.used,
        m.chunk_size,
        m.source_size,
        &plan.rest,
        target,
        repo,
        opts,
        known,
        progress,
    )?;
    flush(target)?;

    // 4. The held windows, tail first, except P.
    let mut deferred: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut f = Fetcher {
        dec: Decoder::new()?,
        frame: Vec::new(),
        content: Vec::new(),
        fed: HashMap::new(),
    };
    if let Some(feed) = &opts.feed {
        let mut lens: HashMap<ChunkId, usize> = HashMap::new();
        let mut ids = Vec::new();
        for c in plan.held.iter().filter(|c| !kept.contains_key(&c.index)) {
            if let Some(id) = c.id {
                if lens.insert(id, m.window(c.index).1 as usize).is_none() {
                    ids.push(id);
                }
            }
        }
        let mut s = RestoreStats::default();
        f.prefetch(feed.as_ref(), &ids, &lens, &mut s, progress)?;
        stats.add(&s);
    }
    for c in &plan.held {
        cancelled()?;
        let (start, len) = m.window(c.index);
        let used_here = m.used.used_in(start, len);
        stats.chunks += 1;
        stats.bytes_used += used_here;
        if let Some(pieces) = kept.remove(&c.index) {
            for (at, b) in pieces {
                write_except(target, &plan.last, at, &b, &mut deferred)?;
            }
            stats.chunks_skipped += 1;
            stats.chunks_unread += u64::from(known.is_some());
            stats.bytes_skipped += used_here;
            progress.add_skipped(used_here);
            progress.add_done(used_here);
            continue;
        }
        let mut s = RestoreStats::default();
        f.fetch(c, len as usize, repo, &mut s, progress)?;
        stats.add(&s);
        let content = &f.content;
        for (a, b) in coalesced(&m.used.window(start, len)) {
            write_except(
                target,
                &plan.last,
                start + a as u64,
                &content[a..b],
                &mut deferred,
            )?;
            stats.bytes_written += (b - a) as u64;
            progress.add_written((b - a) as u64);
        }
        progress.add_done(used_here);
    }
    flush(target)?;

    // 5, 6. P: the image's last bytes, then its first, each flushed.
    for p in plan.last.extents().iter().rev() {
        cancelled()?;
        for (at, b) in deferred
            .iter()
            .filter(|(at, _)| p.start <= *at && *at < p.end())
        {
            target
                .write_all_at(b, *at)
                .ctx(|| format!("writing the target at byte {at}"))?;
        }
        flush(target)?;
    }
    Ok(stats)
}

/// The same order for a writer that produces its bytes as a stream (a
/// partclone image): the areas of W are wiped before the first write, bytes
/// bound for W are held in memory (at most 3 MiB) while everything else is
/// written at once, and [`Held::finish`] writes the held bytes last, the
/// image's last and then first 4 KiB at the very end, flushing between.
pub struct Held<'a> {
    target: &'a Region,
    wipe: ExtentMap,
    last: ExtentMap,
    wiped: bool,
    held: Vec<(u64, Vec<u8>)>,
}

impl<'a> Held<'a> {
    /// For an image of `source_size` bytes written to `target`.
    pub fn new(target: &'a Region, source_size: u64) -> Held<'a> {
        let (s, l) = (source_size, target.len().max(source_size));
        let tail = |end: u64| (end - WIPE_BYTES.min(end), WIPE_BYTES.min(end));
        let p = SIGNATURE_BYTES.min(s);
        Held {
            target,
            wipe: ExtentMap::from_ranges([(0, WIPE_BYTES.min(l)), tail(s), tail(l)]),
            last: ExtentMap::from_ranges([(0, p), (s - p, p)]),
            wiped: false,
            held: Vec::new(),
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        self.target.device().sync()
    }

    /// Steps 1 and 2: the first page, flushed, then the rest of W, flushed.
    fn wipe(&mut self) -> std::io::Result<()> {
        let first = SIGNATURE_BYTES.min(self.target.len());
        self.target.zero_range(0, first)?;
        self.sync()?;
        for e in self.wipe.extents() {
            let s = e.start.max(first);
            if s < e.end() {
                self.target.zero_range(s, e.end() - s)?;
            }
        }
        self.sync()?;
        self.wiped = true;
        Ok(())
    }

    /// Write `bytes` at `at`, holding back what falls in W.
    pub fn write(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        if !self.wiped {
            self.wipe()?;
        }
        let mut pos = 0usize;
        for (s, e) in self.wipe.window(at, bytes.len() as u64) {
            if pos < s {
                self.target.write_all_at(&bytes[pos..s], at + pos as u64)?;
            }
            self.held.push((at + s as u64, bytes[s..e].to_vec()));
            pos = e;
        }
        if pos < bytes.len() {
            self.target.write_all_at(&bytes[pos..], at + pos as u64)?;
        }
        Ok(())
    }

    /// Steps 3 to 6: flush, the held bytes but P, flush, P's tail, flush,
    /// P's head, flush.
    pub fn finish(self) -> std::io::Result<()> {
        if !self.wiped {
            return Ok(());
        }
        self.sync()?;
        let mut deferred = Vec::new();
        for (at, b) in &self.held {
            let mut pos = 0usize;
            for (s, e) in self.last.window(*at, b.len() as u64) {
                if pos < s {
                    self.target.write_all_at(&b[pos..s], at + pos as u64)?;
                }
                deferred.push((at + s as u64, &b[s..e]));
                pos = e;
            }
            if pos < b.len() {
                self.target.write_all_at(&b[pos..], at + pos as u64)?;
            }
        }
        self.sync()?;
        for p in self.last.extents().iter().rev() {
            for (at, b) in deferred
                .iter()
                .filter(|(at, _)| p.start <= *at && *at < p.end())
            {
                self.target.write_all_at(b, *at)?;
            }
            self.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ImageKind, Manifest};

    fn manifest(source_size: u64, used: &[(u64, u64)], chunk_size: u64) -> Manifest {
        let used = ExtentMap::from_ranges(used.iter().copied());
        let chunks = crate::manifest::UsedWindows::new(&used, chunk_size)
            .map(|index| ChunkRef {
                index,
                id: None,
                stored: 0,
                b3: None,
            })
            .collect();
        Manifest::new(
            "t",
            ImageKind::Partition,
            source_size,
            512,
            "raw".into(),
            used,
            chunk_size,
            1,
            chunks,
        )
    }

    #[test]
    fn the_plan_holds_the_windows_at_both_ends_and_the_partitions_tail() {
        let mib = 1 << 20;
        // 64 MiB image of 4 MiB chunks on a 100 MiB partition.
        let m = manifest(64 * mib, &[(0, 64 * mib)], 4 * mib);
        let p = Plan::new(&m, 100 * mib);
        let held: Vec<u64> = p.held.iter().map(|c| c.index).collect();
        assert_eq!(held, vec![15, 0], "tail window first, head window last");
        assert_eq!(p.rest.len(), 14);
        let w: Vec<(u64, u64)> = p.wipe.extents().iter().map(|e| (e.start, e.len)).collect();
        assert_eq!(w, vec![(0, mib), (63 * mib, mib), (99 * mib, mib)]);
        let l: Vec<(u64, u64)> = p.last.extents().iter().map(|e| (e.start, e.len)).collect();
        assert_eq!(l, vec![(0, 4096), (64 * mib - 4096, 4096)]);
        // 64 KiB chunks: the whole first and last MiB are held.
        let m = manifest(8 * mib, &[(0, 8 * mib)], 64 << 10);
        let p = Plan::new(&m, 8 * mib);
        assert_eq!(p.held.len(), 32);
        // A tiny image: everything is held, ranges merge.
        let m = manifest(100_000, &[(0, 100_000)], 64 << 10);
        let p = Plan::new(&m, 100_000);
        assert_eq!(p.rest.len(), 0);
        assert_eq!(p.wipe.len(), 1);
    }

    #[test]
    fn a_stream_cut_before_its_end_leaves_both_ends_zero() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.img");
        let mib = 1usize << 20;
        std::fs::write(&path, vec![0xEEu8; 4 * mib]).expect("old content");
        let dev = std::sync::Arc::new(
            crate::device::Device::open(
                &path,
                crate::device::OpenMode {
                    write: true,
                    ..Default::default()
                },
            )
            .expect("open"),
        );
        let r = Region::whole(dev);
        let data: Vec<u8> = (0..4 * mib).map(|i| (i % 251) as u8).collect();
        let mut h = Held::new(&r, 4 * mib as u64);
        // The whole stream but its end: nothing at either end yet.
        for (i, piece) in data.chunks(64 << 10).enumerate() {
            h.write((i * (64 << 10)) as u64, piece).expect("write");
        }
        let got = std::fs::read(&path).expect("read");
        assert!(got[..mib].iter().all(|&b| b == 0), "head wiped, held back");
        assert!(
            got[3 * mib..].iter().all(|&b| b == 0),
            "tail wiped, held back"
        );
        assert_eq!(&got[mib..3 * mib], &data[mib..3 * mib], "middle written");
        h.finish().expect("finish");
        assert_eq!(std::fs::read(&path).expect("read"), data);
    }

    #[test]
    fn deferred_bytes_are_exactly_the_signature_areas() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.img");
        std::fs::write(&path, vec![0u8; 64 << 10]).expect("file");
        let dev = std::sync::Arc::new(
            crate::device::Device::open(
                &path,
                crate::device::OpenMode {
                    write: true,
                    ..Default::default()
                },
            )
            .expect("open"),
        );
        let r = Region::whole(dev);
        let last = ExtentMap::from_ranges([(0, 4096), (60 << 10, 4096)]);
        let mut deferred = Vec::new();
        let data = vec![7u8; 64 << 10];
        write_except(&r, &last, 0, &data, &mut deferred).expect("write");
        let d: Vec<(u64, usize)> = deferred.iter().map(|(a, b)| (*a, b.len())).collect();
        assert_eq!(d, vec![(0, 4096), (60 << 10, 4096)]);
        let got = std::fs::read(&path).expect("read");
        assert!(got[..4096].iter().all(|&b| b == 0), "head deferred");
        assert!(got[4096..60 << 10].iter().all(|&b| b == 7));
        assert!(got[60 << 10..].iter().all(|&b| b == 0), "tail deferred");
    }
}
