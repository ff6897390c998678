//! Applying a layout to a disk or disk image file.
//!
//! Steps, and what a failure at each leaves behind:
//!
//! 1. Refuse a busy target: mounted partitions, active swap, sysfs holders,
//!    a loop device over an image file; then open a block device with
//!    `O_EXCL`. Nothing written.
//! 2. Plan the layout for this disk's size and sector size
//!    ([`super::layout::plan`]) and check that every formatting tool is
//!    installed. Nothing written.
//! 3. Write the table ([`crate::table::write`]: old signatures wiped first,
//!    headers last, `fsync`).
//! 4. Block devices: BLKRRPART, retried a bounded number of times on EBUSY,
//!    then wait (bounded) for the partition nodes. When the kernel does not
//!    partition the device (EINVAL, or no partitions appear in sysfs) the
//!    partitions are formatted by offset through the whole disk instead.
//! 5. Format (`mkfs.ext4`, `mkfs.fat`, `mkntfs`, `mkswap`), then read the
//!    table back and compare it with the plan.
//!
//! A failure in steps 3–5 wipes the table signatures (MBR `55 AA` and both
//! GPT headers; [`crate::table::wipe`]) so a half-made layout never looks
//! valid, asks the kernel to re-read, and returns
//! [`LayoutError::Failed`] whose [`DiskState`] says whether the wipe worked.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::busy;
use super::format::{self, Target};
use super::layout::{plan, Filesystem, LayoutError, LayoutSpec};
use crate::device::{Device, OpenMode};
use crate::ioctl;
use crate::table::{self, PartitionTable, TableError};

/// Options for [`apply`].
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Logical sector size of a disk image file (default 512). Ignored for
    /// block devices, whose sector size comes from the kernel.
    pub sector_size: Option<u32>,
    /// How long to wait for partition nodes after BLKRRPART.
    pub node_timeout: Duration,
    /// BLKRRPART attempts while the kernel answers EBUSY.
    pub reread_attempts: u32,
    /// Format through kernel partition nodes when they exist (default);
    /// `false` always formats by offset through the whole disk.
    pub use_partition_nodes: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            sector_size: None,
            node_timeout: Duration::from_secs(10),
            reread_attempts: 5,
            use_partition_nodes: true,
        }
    }
}

/// How a partition was formatted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatVia {
    /// Through this kernel partition node.
    Node(PathBuf),
    /// At its byte offset through the whole disk or file.
    Offset,
}

/// One filesystem made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formatted {
    /// Partition number.
    pub number: u32,
    /// Filesystem.
    pub filesystem: Filesystem,
    /// Label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// How.
    pub via: FormatVia,
}

/// The result of [`apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLayout {
    /// The target.
    pub device: PathBuf,
    /// The table as written (generated GUIDs / signature included).
    pub table: PartitionTable,
    /// Filesystems made.
    pub formatted: Vec<Formatted>,
    /// Why partitions were formatted by offset on a block device, if they
    /// were (the kernel does not partition it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The state a failed layout change left the disk in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskState {
    /// The table signatures were wiped: the disk looks unpartitioned.
    Wiped,
    /// Wiping failed too: the disk may carry a partial layout.
    WipeFailed(String),
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskState::Wiped => f.write_str(
                "the partition table was wiped (MBR signature and both GPT headers): the disk now looks unpartitioned and will not boot",
            ),
            DiskState::WipeFailed(e) => write!(
                f,
                "wiping the partition table failed too ({e}): the disk may hold a partial layout; wipe it before use"
            ),
        }
    }
}

fn open_error(path: &Path, source: io::Error) -> LayoutError {
    if source.raw_os_error() == Some(libc::EBUSY) {
        return LayoutError::Busy {
            path: path.to_path_buf(),
            why: "the kernel refuses exclusive access (EBUSY): a partition is mounted or the disk is held".into(),
        };
    }
    LayoutError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Wipe after a failure and build the error.
fn failed(
    dev: &Device,
    step: String,
    source: Box<dyn std::error::Error + Send + Sync>,
) -> LayoutError {
    tracing::error!(device = %dev.path().display(), %step, error = %source, "layout failed; wiping the partition table");
    let state = match table::wipe(dev) {
        Ok(()) => {
            if dev.kind() == crate::device::DeviceKind::Block {
                // Best effort: the kernel may keep the old view if busy.
                let _ = ioctl::reread_partition_table(dev.file().as_fd());
            }
            DiskState::Wiped
        }
        Err(e) => DiskState::WipeFailed(e.to_string()),
    };
    LayoutError::Failed {
        step,
        state,
        source,
    }
}

/// Outcome of asking the kernel to re-read the table.
enum Reread {
    /// Partition nodes by number.
    Nodes(BTreeMap<u32, PathBuf>),
    /// Format by offset, for this reason.
    NoNodes(String),
}

#[derive(Debug, thiserror::Error)]
enum RereadError {
    #[error("the kernel could not re-read the partition table: a partition is still in use (EBUSY after {0} attempts)")]
    Busy(u32),
    #[error("the kernel could not re-read the partition table")]
    Other(#[source] io::Error),
}

fn reread(dev: &Device, wanted: &[u32], opts: &ApplyOptions) -> Result<Reread, RereadError> {
    let attempts = opts.reread_attempts.max(1);
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=attempts {
        match ioctl::reread_partition_table(dev.file().as_fd()) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(Reread::NoNodes(
                    "the kernel does not partition this device (BLKRRPART: EINVAL)".into(),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if attempt == attempts {
                    return Err(RereadError::Busy(attempts));
                }
                tracing::warn!(attempt, "BLKRRPART busy; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(RereadError::Other(e)),
        }
    }
    if !opts.use_partition_nodes {
        return Ok(Reread::NoNodes(
            "partition nodes not used (by request)".into(),
        ));
    }
    let Some(name) = busy::kernel_name(dev.path()) else {
        return Ok(Reread::NoNodes("the device has no sysfs entry".into()));
    };
    // BLKRRPART updates sysfs synchronously; only the /dev nodes (udev or
    // devtmpfs) may lag.
    let nodes: BTreeMap<u32, PathBuf> =
        super::partition_nodes(Path::new("/sys"), Path::new("/dev"), &name)
            .into_iter()
            .filter(|(n, _)| wanted.contains(n))
            .collect();
    if wanted.iter().any(|n| !nodes.contains_key(n)) {
        return Ok(Reread::NoNodes(
            "the kernel shows no partitions for this device (no partition-table support)".into(),
        ));
    }
    let deadline = Instant::now() + opts.node_timeout;
    loop {
        let ready = nodes.values().all(|p| {
            fs::metadata(p)
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false)
        });
        if ready {
            return Ok(Reread::Nodes(nodes));
        }
        if Instant::now() >= deadline {
            return Ok(Reread::NoNodes(format!(
                "partition nodes did not appear within {} s",
                opts.node_timeout.as_secs_f32()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Partition `dev_path` (a block device or a disk image file) as `spec`
/// says and make the filesystems it asks for. See the module doc for the
/// steps and the failure guarantees: bad specs, busy disks and missing
/// tools are refused before anything is written; a failure later wipes the
/// table signatures and says so.
pub fn apply(
    dev_path: &Path,
    spec: &LayoutSpec,
    opts: &ApplyOptions,
) -> Result<AppliedLayout, LayoutError> {
    let meta = fs::metadata(dev_path).map_err(|e| open_error(dev_path, e))?;
    let is_block = meta.file_type().is_block_device();
    if is_block && busy::is_partition(dev_path) {
        return Err(LayoutError::Invalid(format!(
            "{} is a partition; a layout applies to a whole disk",
            dev_path.display()
        )));
    }
    let busy_why = if is_block {
        busy::block_device_busy(dev_path)
    } else {
        busy::file_busy(dev_path)
    };
    if let Some(why) = busy_why {
        return Err(LayoutError::Busy {
            path: dev_path.to_path_buf(),
            why,
        });
    }
    let mode = OpenMode {
        write: true,
        create: false,
        exclusive: is_block,
    };
    let mut dev = Device::open(dev_path, mode).map_err(|e| open_error(dev_path, e))?;
    if !is_block {
        if let Some(ss) = opts.sector_size {
            dev.set_sector_size(ss);
        }
    }
    let ss = dev.sector_size();
    let plan = plan(spec, dev.size(), ss)?;
    for job in &plan.formats {
        let tool = job.filesystem.tool();
        if format::find_tool(tool).is_none() {
            return Err(LayoutError::MissingTool {
                tool,
                number: job.number,
                filesystem: job.filesystem,
            });
        }
    }

    tracing::info!(device = %dev_path.display(), kind = ?plan.table.kind, partitions = plan.table.partitions.len(), "writing partition table");
    let written = match table::write(&dev, &plan.table) {
        Ok(t) => t,
        // Refused before writing.
        Err(e @ TableError::Unwritable { .. }) => return Err(e.into()),
        Err(e) => {
            return Err(failed(
                &dev,
                "writing the partition table".into(),
                Box::new(e),
            ))
        }
    };

    let wanted: Vec<u32> = plan.formats.iter().map(|j| j.number).collect();
    let mut nodes = BTreeMap::new();
    let mut note = None;
    if is_block {
        match reread(&dev, &wanted, opts) {
            Ok(Reread::Nodes(n)) => nodes = n,
            Ok(Reread::NoNodes(why)) => {
                if !wanted.is_empty() {
                    tracing::warn!(device = %dev_path.display(), %why, "formatting by offset");
                    note = Some(why);
                }
            }
            Err(e) => {
                return Err(failed(
                    &dev,
                    "re-reading the partition table".into(),
                    Box::new(e),
                ))
            }
        }
    }
    // mkfs tools open the disk or its partitions exclusively themselves:
    // give up our exclusive handle (the busy checks above stand).
    if is_block {
        drop(dev);
        dev = Device::open(
            dev_path,
            OpenMode {
                write: true,
                create: false,
                exclusive: false,
            },
        )
        .map_err(|e| open_error(dev_path, e))?;
    }

    let mut formatted = Vec::new();
    for job in &plan.formats {
        let (target, via) = match nodes.get(&job.number) {
            Some(node) => (Target::Node(node), FormatVia::Node(node.clone())),
            None => (Target::Offset(&dev), FormatVia::Offset),
        };
        tracing::info!(partition = job.number, filesystem = %job.filesystem, ?via, "formatting");
        if let Err(e) = format::format(job, target, ss) {
            return Err(failed(
                &dev,
                format!("formatting partition {} as {}", job.number, job.filesystem),
                Box::new(e),
            ));
        }
        formatted.push(Formatted {
            number: job.number,
            filesystem: job.filesystem,
            label: job.label.clone(),
            via,
        });
    }
    if is_block && !nodes.is_empty() {
        if let Err(e) = ioctl::flush_buffers(dev.file().as_fd()) {
            tracing::warn!(error = %e, "BLKFLSBUF failed");
        }
    }
    if let Err(e) = dev.sync() {
        return Err(failed(&dev, "syncing the disk".into(), Box::new(e)));
    }
    // Read back: what the disk says must be what was planned.
    let back = match table::read(&dev, Some(ss)) {
        Ok(Some(t)) => t,
        Ok(None) => {
            let e = io::Error::other("no partition table found after writing one");
            return Err(failed(
                &dev,
                "checking the written table".into(),
                Box::new(e),
            ));
        }
        Err(e) => {
            return Err(failed(
                &dev,
                "checking the written table".into(),
                Box::new(e),
            ))
        }
    };
    let key = |t: &PartitionTable| -> Vec<(u32, u64, u64, String)> {
        t.partitions
            .iter()
            .map(|p| (p.number, p.start, p.size, p.ptype.to_ascii_uppercase()))
            .collect()
    };
    if back.kind != written.kind || key(&back) != key(&written) {
        let e = io::Error::other("the table read back differs from the one written");
        return Err(failed(
            &dev,
            "checking the written table".into(),
            Box::new(e),
        ));
    }
    Ok(AppliedLayout {
        device: dev_path.to_path_buf(),
        table: written,
        formatted,
        note,
    })
}
