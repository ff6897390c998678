//! Whole-disk images: the partition table, the areas outside partitions and
//! one filesystem-aware image per partition.
//!
//! Restore order, so that a half-written disk never looks valid and
//! bootable:
//!
//! 1. every check that can fail without writing (size, sector size, every
//!    chunk present);
//! 2. wipe the table signatures (MBR signature, both GPT headers): from here
//!    on an interrupted restore leaves a disk without a partition table;
//! 3. the partitions' data;
//! 4. the areas outside partitions except the beginning of the disk (GPT
//!    backup, extended boot records);
//! 5. the beginning of the disk (boot code, MBR, primary GPT) — last;
//! 6. on a disk of another size, the GPT backup moves to the new end;
//! 7. flush.
//!
//! A failure after step 2 wipes the signatures again and the error says the
//! disk was left without a partition table.

use std::sync::Arc;

use crate::chunk::Decoder;
use crate::create::{build_partition_manifest, scan, store_chunks, CreateOptions, SourceInfo};
use crate::device::{Device, ReadAt, Region};
use crate::error::{Error, IoContext, Result};
use crate::extent::ExtentMap;
use crate::image::{read_table, region_of};
use crate::manifest::{DiskPartition, ImageKind, Manifest};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::{
    preflight, restore_chunks, restore_partition_unrecorded, save_record, RestoreOptions,
    RestoreStats,
};
use crate::table::{PartitionTable, TableKind};

/// The byte ranges of a disk that lie outside its partitions and matter:
/// everything before the first partition (MBR, boot code, the gap where BIOS
/// GRUB lives, the primary GPT), the GPT backup area, and the parts of an
/// extended partition outside its logical partitions (extended boot
/// records). Unallocated gaps between partitions are not imaged.
pub fn boot_areas(table: &PartitionTable, disk_size: u64) -> ExtentMap {
    let ss = u64::from(table.sector_size);
    let first = table
        .partitions
        .iter()
        .map(|p| p.start)
        .min()
        .unwrap_or(disk_size.min(1 << 20));
    let mut m = ExtentMap::new();
    m.add(0, first.min(disk_size));
    if let Some(ext) = table.partitions.iter().find(|p| p.extended) {
        let logical = ExtentMap::from_ranges(
            table
                .partitions
                .iter()
                .filter(|p| !p.extended && p.start >= ext.start && p.start < ext.start + ext.size)
                .map(|p| (p.start, p.size)),
        );
        let mut pos = ext.start;
        for l in logical.extents() {
            if l.start > pos {
                m.add(pos, l.start - pos);
            }
            pos = pos.max(l.end());
        }
        if pos < ext.start + ext.size {
            m.add(pos, ext.start + ext.size - pos);
        }
    }
    if table.kind == TableKind::Gpt {
        if let Some(last) = table.last_usable_lba {
            let backup = (last + 1) * ss;
            if backup < disk_size {
                m.add(backup, disk_size - backup);
            }
        }
    }
    let mut m = ExtentMap::from_ranges(m.extents().iter().map(|e| (e.start, e.len)));
    m.clip(disk_size);
    m
}

/// Create and publish a whole-disk image of `dev`.
pub fn create_disk(
    name: &str,
    dev: Arc<Device>,
    repo: &dyn Repository,
    opts: &CreateOptions,
    progress: &Progress,
) -> Result<Manifest> {
    let table = read_table(&dev)?.ok_or_else(|| {
        Error::Invalid(format!("{} has no partition table", dev.path().display()))
    })?;
    let disk_size = dev.size();
    progress.start_phase("scan", 0);
    let mut parts = Vec::new();
    let mut total = 0u64;
    for p in table.partitions.iter().filter(|p| !p.extended) {
        let region =
            Region::new(dev.clone(), p.start, p.size).ctx(|| format!("partition {}", p.number))?;
        let s = scan(&region, opts.raw, opts.force)
            .map_err(|e| Error::Invalid(format!("partition {}: {e}", p.number)))?;
        if let Some(w) = &s.warning {
            tracing::warn!("partition {}: {w}", p.number);
        }
        total += s.used.used_bytes();
        parts.push((p.clone(), region, s));
    }
    let boot = boot_areas(&table, disk_size);
    total += boot.used_bytes();
    repo.begin_upload(name);
    progress.start_phase("create", total);
    let mut images = Vec::new();
    for (p, region, s) in parts {
        let info = SourceInfo {
            sector_size: table.sector_size,
            partition_type: Some(p.ptype.clone()),
        };
        let m = build_partition_manifest(name, &region, s, &info, repo, opts, progress)?;
        images.push(DiskPartition {
            number: p.number,
            start: p.start,
            size: p.size,
            image: Box::new(m),
        });
    }
    let whole = Region::whole(dev.clone());
    let chunks = store_chunks(
        &whole,
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
        disk_size,
        table.sector_size,
        "disk".into(),
        boot,
        opts.chunk_size,
        opts.level,
        chunks,
    );
    m.table = Some(table);
    m.partitions = images;
    m.description = opts.description.clone();
    progress.set_phase("publish");
    m.image_version = repo.publish(&m)?;
    progress.set_phase("done");
    Ok(m)
}

/// The smallest disk a disk image fits on: the end of the last partition,
/// plus room for the GPT backup.
pub fn min_disk_size(m: &Manifest) -> u64 {
    let Some(t) = &m.table else {
        return m.source_size;
    };
    let end = t
        .partitions
        .iter()
        .map(|p| p.start + p.size)
        .max()
        .unwrap_or(0);
    let backup = match (t.kind, t.last_usable_lba) {
        (TableKind::Gpt, Some(last)) => m
            .source_size
            .saturating_sub((last + 1) * u64::from(t.sector_size)),
        _ => 0,
    };
    end + backup
}

fn check_sector_size(m: &Manifest, dev: &Device) -> Result<()> {
    let Some(t) = &m.table else { return Ok(()) };
    if dev.kind() == crate::device::DeviceKind::Block && dev.sector_size() != t.sector_size {
        return Err(Error::Invalid(format!(
            "{} has {}-byte sectors but the image's partition table uses {}-byte sectors",
            dev.path().display(),
            dev.sector_size(),
            t.sector_size
        )));
    }
    Ok(())
}

/// Restore a whole-disk image onto `dev`.
pub fn restore_disk(
    m: &Manifest,
    dev: Arc<Device>,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreStats> {
    let table = m
        .table
        .as_ref()
        .ok_or_else(|| Error::Invalid(format!("{} is not a disk image", m.name)))?;
    let need = min_disk_size(m);
    if dev.size() < need {
        return Err(Error::TargetTooSmall {
            target: dev.path().to_path_buf(),
            need,
            have: dev.size(),
        });
    }
    check_sector_size(m, &dev)?;
    if table.kind == TableKind::Mbr
        && dev.size() / u64::from(table.sector_size) > u64::from(u32::MAX) + 1
    {
        tracing::warn!("the disk is larger than an MBR table can address; the space beyond 2^32 sectors stays unused");
    }
    preflight(m, repo)?;
    progress.start_phase("restore", m.total_used_bytes());
    crate::table::wipe(&dev)?;
    let res = restore_disk_steps(m, table, &dev, repo, opts, progress);
    match res {
        Ok(stats) => Ok(stats),
        Err(e) => {
            let state = match crate::table::wipe(&dev) {
                Ok(()) => "the disk was left without a partition table (it will not boot); run the restore again to finish it",
                Err(_) => "wiping the partial partition table failed too: do not boot this disk before restoring it again",
            };
            Err(Error::Incomplete {
                state: state.into(),
                source: Box::new(e),
            })
        }
    }
}

fn restore_disk_steps(
    m: &Manifest,
    table: &PartitionTable,
    dev: &Arc<Device>,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreStats> {
    let mut stats = RestoreStats::default();
    for p in &m.partitions {
        let region =
            Region::new(dev.clone(), p.start, p.size).ctx(|| format!("partition {}", p.number))?;
        let img = &p.image;
        let s = restore_chunks(
            &img.used,
            img.chunk_size,
            img.source_size,
            &img.chunks,
            &region,
            repo,
            opts,
            None,
            progress,
        )?;
        stats.add(&s);
    }
    // The beginning of the disk is written last.
    let head_windows = head_windows(m, table);
    let same_size = dev.size() == m.source_size;
    let gpt = table.kind == TableKind::Gpt;
    let backup_start = match (gpt, table.last_usable_lba) {
        (true, Some(last)) => (last + 1) * u64::from(table.sector_size),
        _ => u64::MAX,
    };
    let whole = Region::whole(dev.clone());
    // Restore the image's boot areas at their source offsets; on a disk of
    // another size the GPT backup is rebuilt at the new end instead.
    let (head, rest): (Vec<_>, Vec<_>) = m
        .chunks
        .iter()
        .cloned()
        .partition(|c| c.index < head_windows);
    let rest: Vec<_> = rest
        .into_iter()
        .filter(|c| {
            same_size
                || c.index.saturating_add(1).saturating_mul(m.chunk_size)
                    <= backup_start.min(dev.size())
        })
        .collect();
    let mut used = m.used.clone();
    if !same_size {
        used.clip(backup_start.min(dev.size()));
    }
    // The rest first, the head last.
    for chunks in [&rest, &head] {
        let s = restore_chunks(
            &used,
            m.chunk_size,
            m.source_size.min(dev.size()),
            chunks,
            &whole,
            repo,
            opts,
            None,
            progress,
        )?;
        stats.add(&s);
    }
    if gpt && !same_size {
        crate::table::relocate_gpt_backup(dev)?;
    }
    progress.set_phase("sync");
    dev.sync()
        .ctx(|| format!("flushing {}", dev.path().display()))?;
    if dev.kind() == crate::device::DeviceKind::Block {
        if let Err(e) = dev.reread_partition_table() {
            tracing::warn!("the kernel did not re-read the new partition table: {e}");
        }
    }
    progress.set_phase("done");
    Ok(stats)
}

/// Windows of a disk image that touch the space before its first
/// partition (boot code, MBR, primary GPT): restored last.
pub(crate) fn head_windows(m: &Manifest, table: &PartitionTable) -> u64 {
    let first = table
        .partitions
        .iter()
        .map(|p| p.start)
        .min()
        .unwrap_or(1 << 20);
    first.div_ceil(m.chunk_size).max(1)
}

/// Fetch and verify the content of window `index` of `m`'s own chunks
/// (zeros for an all-zero window).
pub(crate) fn window_content(m: &Manifest, index: u64, repo: &dyn Repository) -> Result<Vec<u8>> {
    let (_, len) = m.window(index);
    let Some(c) = m.chunks.iter().find(|c| c.index == index) else {
        return Ok(vec![0u8; len as usize]);
    };
    let Some(id) = c.id else {
        return Ok(vec![0u8; len as usize]);
    };
    let mut frame = Vec::new();
    let mut out = Vec::new();
    repo.get_chunk(&id, &mut frame)?;
    Decoder::new()?.decode_verified(&id, &frame, len as usize, &mut out)?;
    Ok(out)
}

/// Restore partition `n` of a disk image onto partition `n` of `dev`'s
/// current table. When both tables are MBR, the image's BIOS boot code
/// (MBR bytes 0–439 and the gap after the MBR up to the first partition of
/// both disks) is written too, and partition `n` is made the active one if
/// it was in the image, so the restored system boots.
pub fn restore_disk_partition(
    m: &Manifest,
    n: u32,
    dev: Arc<Device>,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreStats> {
    let part = m.partitions.iter().find(|p| p.number == n).ok_or_else(|| {
        let have: Vec<String> = m.partitions.iter().map(|p| p.number.to_string()).collect();
        Error::Invalid(format!(
            "image {} has no partition {n} (it has: {})",
            m.name,
            have.join(", ")
        ))
    })?;
    let (region, _) = region_of(&dev, Some(n))?;
    let target_table = read_table(&dev)?
        .ok_or_else(|| Error::Invalid("the target disk has no partition table".into()))?;
    let image_table = m
        .table
        .as_ref()
        .ok_or_else(|| Error::Invalid(format!("{} is not a disk image", m.name)))?;
    let mbr_boot = image_table.kind == TableKind::Mbr && target_table.kind == TableKind::Mbr;
    // Fetch the boot code before writing anything, so a missing chunk
    // changes nothing.
    let head = if mbr_boot {
        Some(window_content(m, 0, repo)?)
    } else {
        None
    };
    let (stats, start) = restore_partition_unrecorded(&part.image, &region, repo, opts, progress)?;
    if let Some(head) = head {
        let img_first = image_table
            .partitions
            .iter()
            .map(|p| p.start)
            .min()
            .unwrap_or(512);
        let tgt_first = target_table
            .partitions
            .iter()
            .map(|p| p.start)
            .min()
            .unwrap_or(512);
        let gap_end = img_first.min(tgt_first).min(head.len() as u64) as usize;
        let mut sector0 = vec![0u8; 512];
        dev.read_exact_at(&mut sector0, 0)
            .ctx(|| "reading the MBR".into())?;
        sector0[..440].copy_from_slice(&head[..440]);
        let img_active = image_table
            .partitions
            .iter()
            .any(|p| p.number == n && p.bootable);
        if img_active && n <= 4 {
            for i in 0..4 {
                sector0[446 + 16 * i] = if i as u32 + 1 == n { 0x80 } else { 0 };
            }
        }
        dev.write_all_at(&sector0, 0)
            .ctx(|| "writing the boot code".into())?;
        if gap_end > 512 {
            dev.write_all_at(&head[512..gap_end], 512)
                .ctx(|| "writing the boot loader gap".into())?;
        }
        dev.sync()
            .ctx(|| format!("flushing {}", dev.path().display()))?;
    }
    // Recorded only now: the boot code written above changes the disk's
    // write counters, and a record made before it would never hold.
    save_record(opts, &region, &part.image, start.as_ref());
    progress.set_phase("done");
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Partition;

    fn part(number: u32, start: u64, size: u64, extended: bool) -> Partition {
        Partition {
            number,
            start,
            size,
            ptype: "0x83".into(),
            guid: None,
            name: None,
            attributes: 0,
            bootable: false,
            extended,
        }
    }

    #[test]
    fn boot_areas_cover_the_head_the_gpt_backup_and_extended_boot_records() {
        let mib = 1u64 << 20;
        let t = PartitionTable {
            kind: TableKind::Mbr,
            sector_size: 512,
            disk_id: "0x1".into(),
            partitions: vec![
                part(1, mib, 10 * mib, false),
                part(2, 11 * mib, 20 * mib, true),
                part(5, 12 * mib, 5 * mib, false),
                part(6, 18 * mib, 13 * mib, false),
            ],
            first_usable_lba: None,
            last_usable_lba: None,
        };
        let m = boot_areas(&t, 64 * mib);
        let e: Vec<(u64, u64)> = m.extents().iter().map(|e| (e.start, e.len)).collect();
        assert_eq!(e, vec![(0, mib), (11 * mib, mib), (17 * mib, mib)]);
        let g = PartitionTable {
            kind: TableKind::Gpt,
            sector_size: 512,
            disk_id: "x".into(),
            partitions: vec![part(1, mib, 10 * mib, false)],
            first_usable_lba: Some(34),
            last_usable_lba: Some(64 * 2048 - 34),
        };
        let m = boot_areas(&g, 64 * mib);
        assert_eq!(
            m.extents().last().map(|e| (e.start, e.len)),
            Some(((64 * 2048 - 33) * 512, 33 * 512))
        );
    }
}
