//! Verify: check that every chunk of an image is present and intact in the
//! repository, or compare a target against an image.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::chunk::{is_zero, ChunkId, Decoder};
use crate::device::{ReadAt, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::manifest::Manifest;
use crate::pool;
use crate::progress::Progress;
use crate::repo::Repository;

/// Result of checking a repository image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepoReport {
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Compressed bytes read.
    pub bytes_read: u64,
    /// Chunks that are missing or corrupt, with the reason.
    pub bad: Vec<(ChunkId, String)>,
}

/// Decompress and hash every distinct chunk of `m` (and its partitions).
pub fn verify_repo(
    m: &Manifest,
    repo: &dyn Repository,
    threads: usize,
    progress: &Progress,
) -> Result<RepoReport> {
    // Expected content length and fingerprint per id.
    let mut lens: HashMap<ChunkId, (usize, Option<crate::chunk::Fingerprint>)> = HashMap::new();
    let mut visit = |img: &Manifest| {
        for c in &img.chunks {
            if let Some(id) = c.id {
                lens.entry(id)
                    .or_insert((img.window(c.index).1 as usize, c.b3));
            }
        }
    };
    visit(m);
    for p in &m.partitions {
        visit(&p.image);
    }
    let items: Vec<(ChunkId, (usize, Option<crate::chunk::Fingerprint>))> =
        lens.into_iter().collect();
    let total: u64 = items.iter().map(|(_, (l, _))| *l as u64).sum();
    progress.start_phase("verify", total);
    let report = Mutex::new(RepoReport::default());
    let lock_err = || Error::Invalid("verify bookkeeping lock poisoned".into());
    pool::for_each(
        threads,
        items.len(),
        progress,
        || Ok((Decoder::new()?, Vec::new(), Vec::new())),
        |(dec, frame, out), k| {
            let (id, (len, fp)) = items[k];
            let res = repo
                .get_chunk(&id, frame)
                .and_then(|_| dec.decode_verified(&id, frame, len, out))
                .and_then(|_| match fp {
                    Some(fp) if crate::chunk::Fingerprint::of(out) != fp => {
                        Err(Error::ChunkCorrupt {
                            id,
                            why: "content does not match the manifest's fingerprint".into(),
                        })
                    }
                    _ => Ok(()),
                });
            let mut r = report.lock().map_err(|_| lock_err())?;
            r.chunks_checked += 1;
            r.bytes_read += frame.len() as u64;
            match res {
                Ok(()) => {}
                Err(e @ (Error::ChunkMissing(_) | Error::ChunkCorrupt { .. })) => {
                    r.bad.push((id, e.to_string()))
                }
                Err(e) => return Err(e),
            }
            progress.add_done(len as u64);
            Ok(())
        },
    )?;
    let mut r = report.into_inner().map_err(|_| lock_err())?;
    r.bad.sort_by_key(|b| b.0);
    progress.set_phase("done");
    Ok(r)
}

/// Result of comparing a target with an image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CompareReport {
    /// Windows compared.
    pub windows_checked: u64,
    /// Indices of windows whose used bytes differ.
    pub windows_differing: Vec<u64>,
    /// Used bytes in differing windows.
    pub bytes_differing: u64,
    /// Used bytes compared.
    pub bytes_checked: u64,
}

/// Compare a device with an image, as `restore_image` would have written
/// it: a partition image against partition `partition` (or the whole
/// device); a disk image against every partition and the boot areas (or
/// only partition `partition`). On a disk of another size the GPT backup
/// area is not compared (a restore rebuilds it at the new end).
pub fn compare_image(
    m: &Manifest,
    dev: std::sync::Arc<crate::device::Device>,
    partition: Option<u32>,
    repo: &dyn Repository,
    threads: usize,
    progress: &Progress,
) -> Result<CompareReport> {
    use crate::manifest::ImageKind;
    match (m.kind, partition) {
        (ImageKind::Partition, _) => {
            let (region, _) = crate::image::region_of(&dev, partition)?;
            compare_target(m, &region, threads, progress)
        }
        (ImageKind::Disk, Some(n)) => {
            let p =
                m.partitions.iter().find(|p| p.number == n).ok_or_else(|| {
                    Error::Invalid(format!("image {} has no partition {n}", m.name))
                })?;
            let (region, _) = crate::image::region_of(&dev, Some(n))?;
            compare_target(&p.image, &region, threads, progress)
        }
        (ImageKind::Disk, None) => {
            let mut total = CompareReport::default();

            for p in &m.partitions {
                let region = Region::new(dev.clone(), p.start, p.size).map_err(|e| Error::Io {
                    what: format!("partition {}", p.number),
                    source: e,
                })?;
                let r = compare_target(&p.image, &region, threads, progress)?;
                merge(&mut total, r, p.start / m.chunk_size);
            }
            let mut areas = m.clone();
            let gpt_resized = dev.size() != m.source_size
                && m.table
                    .as_ref()
                    .is_some_and(|t| t.kind == crate::table::TableKind::Gpt);
            if gpt_resized {
                // A restore onto a disk of another size rebuilds the GPT
                // backup at the new end and rewrites the primary header and
                // the protective MBR entry: compare everything else of the
                // head byte by byte, and skip the old backup area.
                let t = m
                    .table
                    .as_ref()
                    .ok_or_else(|| Error::Invalid("disk image without a table".into()))?;
                let ss = u64::from(t.sector_size);
                let head_windows = crate::disk_image::head_windows(m, t);
                let mut tbuf = Vec::new();
                for c in m.chunks.iter().filter(|c| c.index < head_windows) {
                    let (start, len) = m.window(c.index);
                    let content = crate::disk_image::window_content(m, c.index, repo)?;
                    tbuf.resize(len as usize, 0);
                    let skip = |o: u64| (446..512).contains(&o) || (ss..2 * ss).contains(&o);
                    let mut differs = false;
                    let mut checked = 0u64;
                    for (s0, e0) in m.used.window(start, len) {
                        dev.read_exact_at(&mut tbuf[s0..e0], start + s0 as u64)
                            .map_err(|e| Error::Io {
                                what: "reading the target".into(),
                                source: e,
                            })?;
                        for i in s0..e0 {
                            if !skip(start + i as u64) && tbuf[i] != content[i] {
                                differs = true;
                            }
                        }
                        checked += (e0 - s0) as u64;
                    }
                    total.windows_checked += 1;
                    total.bytes_checked += checked;
                    if differs {
                        total.windows_differing.push(c.index);
                        total.bytes_differing += checked;
                    }
                }
                let backup = t.last_usable_lba.map_or(u64::MAX, |l| (l + 1) * ss);
                let cs = m.chunk_size;
                areas
                    .chunks
                    .retain(|c| c.index >= head_windows && (c.index + 1) * cs <= backup);
                let keep = ExtentMap::from_ranges(areas.chunks.iter().map(|c| (c.index * cs, cs)));
                areas.used = ExtentMap::from_ranges(m.used.extents().iter().flat_map(|e| {
                    keep.window(e.start, e.len)
                        .into_iter()
                        .map(move |(a, b)| (e.start + a as u64, (b - a) as u64))
                }));
                areas.used_bytes = areas.used.used_bytes();
            }
            areas.source_size = areas.source_size.min(dev.size());
            if !areas.chunks.is_empty() {
                let r = compare_target(&areas, &Region::whole(dev), threads, progress)?;
                merge(&mut total, r, 0);
            }
            total.windows_differing.sort_unstable();
            Ok(total)
        }
    }
}

fn merge(total: &mut CompareReport, r: CompareReport, base: u64) {
    total.windows_checked += r.windows_checked;
    total.bytes_checked += r.bytes_checked;
    total.bytes_differing += r.bytes_differing;
    total
        .windows_differing
        .extend(r.windows_differing.iter().map(|w| base + w));
}

/// Compare the used bytes of a partition-sized `target` with image `m`.
pub fn compare_target(
    m: &Manifest,
    target: &Region,
    threads: usize,
    progress: &Progress,
) -> Result<CompareReport> {
    if target.len() < m.source_size {
        return Err(Error::TargetTooSmall {
            target: target.device().path().to_path_buf(),
            need: m.source_size,
            have: target.len(),
        });
    }
    progress.start_phase("compare", m.used_bytes);
    let report = Mutex::new(CompareReport::default());
    let lock_err = || Error::Invalid("compare bookkeeping lock poisoned".into());
    pool::for_each(
        threads,
        m.chunks.len(),
        progress,
        || Ok(vec![0u8; m.chunk_size as usize]),
        |buf, k| {
            let c = &m.chunks[k];
            let (start, len) = m.window(c.index);
            let ranges = m.used.window(start, len);
            let buf = &mut buf[..len as usize];
            buf.fill(0);
            for &(s, e) in &ranges {
                target
                    .read_exact_at(&mut buf[s..e], start + s as u64)
                    .ctx(|| format!("reading the target at byte {}", start + s as u64))?;
            }
            let equal = match (&c.id, &c.b3) {
                (None, _) => is_zero(buf),
                (Some(_), Some(fp)) => crate::chunk::Fingerprint::of(buf) == *fp,
                (Some(id), None) => ChunkId::of(buf) == *id,
            };
            let used_here: u64 = ranges.iter().map(|&(s, e)| (e - s) as u64).sum();
            let mut r = report.lock().map_err(|_| lock_err())?;
            r.windows_checked += 1;
            r.bytes_checked += used_here;
            if !equal {
                r.windows_differing.push(c.index);
                r.bytes_differing += used_here;
            }
            progress.add_done(used_here);
            Ok(())
        },
    )?;
    let mut r = report.into_inner().map_err(|_| lock_err())?;
    r.windows_differing.sort_unstable();
    progress.set_phase("done");
    Ok(r)
}
