//! High-level create and restore against a disk: one partition (addressed
//! by its number in the disk's table) or the whole disk. This is what the
//! agent and the CLI call.
//!
//! | image kind | `partition` | what happens |
//! |---|---|---|
//! | partition | `Some(n)` | the image goes onto partition `n` of the disk's current table |
//! | partition | `None` | the image goes onto the whole device (raw / filesystem image file) |
//! | disk | `None` | whole-disk restore: partitions first, the first MiB (boot code, table) last |
//! | disk | `Some(n)` | partition `n` of the image onto partition `n` of the current table, plus the image's BIOS boot code when both disks use MBR |

use std::sync::Arc;

use crate::create::{CreateOptions, SourceInfo};
use crate::device::{Device, DeviceKind, Region};
use crate::error::{Error, Result};
use crate::manifest::{ImageKind, Manifest};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::{RestoreOptions, RestoreStats};
use crate::table::{Partition, PartitionTable};

fn sector_hint(dev: &Device) -> Option<u32> {
    (dev.kind() == DeviceKind::Block).then(|| dev.sector_size())
}

/// The partition table of a device, if it has one.
pub fn read_table(dev: &Device) -> Result<Option<PartitionTable>> {
    Ok(crate::table::read(dev, sector_hint(dev))?)
}

/// Partition `n` of the device's table, refusing extended containers.
pub fn find_partition(dev: &Device, n: u32) -> Result<Partition> {
    let path = dev.path().display().to_string();
    let t = read_table(dev)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{path} has no partition table, so it has no partition {n}"
        ))
    })?;
    let p = t.partition(n).cloned().ok_or_else(|| {
        let have: Vec<String> = t.partitions.iter().map(|p| p.number.to_string()).collect();
        Error::Invalid(format!(
            "{path} has no partition {n} (it has: {})",
            have.join(", ")
        ))
    })?;
    if p.extended {
        return Err(Error::Invalid(format!(
            "partition {n} of {path} is an extended container; pick a logical partition"
        )));
    }
    Ok(p)
}

/// The byte range of partition `n` (or the whole device).
pub fn region_of(dev: &Arc<Device>, partition: Option<u32>) -> Result<(Region, Option<Partition>)> {
    match partition {
        None => Ok((Region::whole(dev.clone()), None)),
        Some(n) => {
            let p = find_partition(dev, n)?;
            let r = Region::new(dev.clone(), p.start, p.size).map_err(|e| Error::Io {
                what: format!("partition {n} of {}", dev.path().display()),
                source: e,
            })?;
            Ok((r, Some(p)))
        }
    }
}

/// Create an image of partition `partition` of `dev`, or of the whole
/// device: a disk image when it holds a partition table (unless `opts.raw`),
/// else a partition image of the whole device.
pub fn create_image(
    name: &str,
    dev: Arc<Device>,
    partition: Option<u32>,
    repo: &dyn Repository,
    opts: &CreateOptions,
    progress: &Progress,
) -> Result<Manifest> {
    crate::manifest::validate_name(name)?;
    let (region, part) = region_of(&dev, partition)?;
    if partition.is_none() && !opts.raw && read_table(&dev)?.is_some() {
        return crate::disk_image::create_disk(name, dev, repo, opts, progress);
    }
    let info = SourceInfo {
        sector_size: dev.sector_size(),
        partition_type: part.map(|p| p.ptype),
    };
    crate::create::create_partition(name, &region, &info, repo, opts, progress)
}

/// Restore image `m` onto `dev` (opened for writing): see the module table.
pub fn restore_image(
    m: &Manifest,
    dev: Arc<Device>,
    partition: Option<u32>,
    repo: &dyn Repository,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreStats> {
    match (m.kind, partition) {
        (ImageKind::Partition, _) => {
            let (region, _) = region_of(&dev, partition)?;
            crate::restore::restore_partition(m, &region, repo, opts, progress)
        }
        (ImageKind::Disk, None) => crate::disk_image::restore_disk(m, dev, repo, opts, progress),
        (ImageKind::Disk, Some(n)) => {
            crate::disk_image::restore_disk_partition(m, n, dev, repo, opts, progress)
        }
    }
}
