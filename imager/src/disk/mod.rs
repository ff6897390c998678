//! Disks: inventory (sysfs + ioctls + partition tables + filesystem
//! probes), OpenGnsys disk numbering, and partition layouts
//! ([`layout`]: declarative spec, OpenGnsys `Configurar`/`setup` form,
//! applying a layout with table writing and formatting).
//!
//! # Which disks are listed
//!
//! Every whole block device under `/sys/block` with a medium (size > 0),
//! except, unless [`InventoryOptions`] asks for them:
//! * virtual devices: `loop*`, `ram*`, `zram*`, `nbd*`, device-mapper
//!   (`dm-*`) and software RAID (`md*`) volumes, anything else under
//!   `/sys/devices/virtual`;
//! * read-only media: `ro` set in sysfs, and optical drives (`sr*`).
//!
//! Hidden devices (sysfs `hidden`, e.g. NVMe multipath paths) are never
//! listed.
//!
//! # Disk numbers (`dsk`)
//!
//! OpenGnsys addresses disks by a 1-based number (`dsk` in the wire
//! protocol, `disk` in ogClient's JSON). Its engine derives the number from
//! the position in `lsblk` output (`ogDiskToDev` in `client/engine/Disk.lib`),
//! which follows the kernel's enumeration order and can change when a USB
//! stick is plugged in or an NVMe controller probes late. Aula makes the
//! order explicit and stable instead: disks are sorted by
//!
//! 1. whether the default filter lists them (so the numbers of ordinary
//!    disks never change when virtual or read-only devices are included),
//! 2. transport class: NVMe, SATA/ATA, SCSI/SAS, virtio, MMC/eMMC, USB,
//!    other/unknown, then virtual devices — internal fixed disks first,
//!    removable USB disks after them,
//! 3. kernel name in natural order (`sda` < `sdb` < `sdz` < `sdaa`,
//!    `nvme0n1` < `nvme1n1` < `nvme10n1`),
//!
//! and numbered 1, 2, … in that order ([`DiskInfo::dsk`]). On the usual lab
//! machine (one internal disk, or several of one kind) this is the number
//! OpenGnsys gives; it differs only where OpenGnsys' own order depends on
//! probe timing. [`resolve_dsk`] turns a number into a device path.
//!
//! # Disk image files
//!
//! [`inspect`] / [`inspect_file`] describe any path — a disk image file
//! (table + partitions + filesystems, sector size 512 unless given; GPT is
//! also probed at 4096) or a block device (with its sysfs facts).

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceKind, Region};
use crate::table::{self, PartitionTable, TableKind};

mod apply;
pub mod busy;
mod format;
pub mod layout;

/// How a disk is attached, as far as sysfs tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// NVMe.
    Nvme,
    /// SATA / PATA through libata.
    Sata,
    /// SCSI, SAS, iSCSI, Fibre Channel, …
    Scsi,
    /// virtio-blk.
    Virtio,
    /// MMC / SD / eMMC.
    Mmc,
    /// USB mass storage.
    Usb,
    /// Anything else attached to hardware.
    Unknown,
    /// Loop device.
    Loop,
    /// RAM disk (`ram*`, `zram*`).
    Ram,
    /// Network block device.
    Nbd,
    /// Device-mapper or MD RAID volume.
    Virtual,
    /// A regular file (disk image), for [`inspect`].
    File,
}

impl Transport {
    /// True for the classes skipped unless virtual devices are asked for.
    pub fn is_virtual(self) -> bool {
        matches!(
            self,
            Transport::Loop | Transport::Ram | Transport::Nbd | Transport::Virtual
        )
    }
}

/// The partition table of a disk, in short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    /// GPT or MBR.
    pub kind: TableKind,
    /// GPT disk GUID or MBR disk signature (`0x1234abcd`).
    pub disk_id: String,
    /// Sector size the table was read with.
    pub sector_size: u32,
}

/// One partition of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// Partition number (GPT slot + 1; MBR 1–4 primary, 5+ logical).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT type GUID or MBR type (`0x83`).
    #[serde(rename = "type")]
    pub ptype: String,
    /// OpenGnsys-style type code: `83`, `7`, `ca` on MBR, `8300`, `EF00`
    /// on GPT; `ca` / `CA00` for the CACHE partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Human-readable type name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_name: Option<String>,
    /// GPT partition GUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT attribute bits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attributes: u64,
    /// MBR active flag.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
    /// MBR extended container.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
    /// Filesystem type (`ext4`, `ntfs`, `fat32`, `swap`, …) when recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// Filesystem label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Filesystem UUID or serial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Bytes in use, when asked for and the filesystem walker knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// This is the OpenGnsys CACHE partition (label or GPT name `CACHE`,
    /// or MBR type `ca`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache: bool,
    /// Kernel device node of the partition, when the kernel has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<PathBuf>,
    /// Why the filesystem could not be probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One disk (or disk image file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// OpenGnsys disk number (1-based, see the module doc); `None` for
    /// files and devices looked at with [`inspect`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsk: Option<u32>,
    /// Kernel name (`sda`, `nvme0n1`) or file name.
    pub name: String,
    /// Device node or file path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Model string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Vendor string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// Serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// How it is attached.
    pub transport: Transport,
    /// Spinning disk.
    pub rotational: bool,
    /// Removable medium.
    pub removable: bool,
    /// Read-only.
    pub read_only: bool,
    /// Partition table, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<TableInfo>,
    /// Partitions, by number.
    pub partitions: Vec<PartitionInfo>,
    /// Problems met while looking (unreadable device, damaged table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl DiskInfo {
    /// The partition with this number.
    pub fn partition(&self, number: u32) -> Option<&PartitionInfo> {
        self.partitions.iter().find(|p| p.number == number)
    }
    /// The OpenGnsys CACHE partition, if any.
    pub fn cache_partition(&self) -> Option<&PartitionInfo> {
        self.partitions.iter().find(|p| p.cache)
    }
}

/// What [`inventory`] lists and how deep it looks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InventoryOptions {
    /// Also list loop, RAM, zram, nbd, device-mapper and MD devices.
    pub include_virtual: bool,
    /// Also list read-only media (write-protected devices, optical drives).
    pub include_read_only: bool,
    /// Read partition tables.
    pub tables: bool,
    /// Probe filesystems (type, label, UUID) on each partition.
    pub filesystems: bool,
    /// Compute used bytes with the filesystem walkers (reads allocation
    /// bitmaps; slower).
    pub usage: bool,
    /// Where sysfs is mounted (tests point this at a fake tree).
    pub sysfs: PathBuf,
    /// Where device nodes live.
    pub dev: PathBuf,
}

impl Default for InventoryOptions {
    fn default() -> Self {
        InventoryOptions {
            include_virtual: false,
            include_read_only: false,
            tables: true,
            filesystems: true,
            usage: false,
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// Errors of the inventory and disk numbering.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// sysfs could not be listed.
    #[error("listing block devices in {}", path.display())]
    Sysfs {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `dsk` out of range.
    #[error("there is no disk {dsk} (this machine has {count})")]
    NoSuchDisk {
        /// Requested number.
        dsk: u32,
        /// Disks found.
        count: usize,
    },
    /// A path could not be opened.
    #[error("opening {}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The partition table is unreadable.
    #[error("reading the partition table of {}", path.display())]
    Table {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: table::TableError,
    },
}

/// A block device as sysfs shows it, before opening it.
#[derive(Debug, Clone)]
struct SysDisk {
    name: String,
    transport: Transport,
    size: u64,
    logical: u32,
    physical: u32,
    model: Option<String>,
    vendor: Option<String>,
    serial: Option<String>,
    rotational: bool,
    removable: bool,
    read_only: bool,
    optical: bool,
    hidden: bool,
}

impl SysDisk {
    fn listed_by_default(&self) -> bool {
        !self.transport.is_virtual() && !self.read_only && !self.optical
    }
}

fn read_trim(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let t = s.trim().trim_matches(char::from(0)).trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}

fn transport_of(name: &str, sys_path: &str) -> Transport {
    let starts = |p: &str| name.starts_with(p);
    if starts("loop") {
        Transport::Loop
    } else if starts("zram") || starts("ram") {
        Transport::Ram
    } else if starts("nbd") {
        Transport::Nbd
    } else if starts("dm-") || starts("md") || sys_path.contains("/devices/virtual/") {
        Transport::Virtual
    } else if sys_path.contains("/usb") {
        Transport::Usb
    } else if sys_path.contains("/nvme") || starts("nvme") {
        Transport::Nvme
    } else if sys_path.contains("/ata") {
        Transport::Sata
    } else if sys_path.contains("/virtio") || starts("vd") {
        Transport::Virtio
    } else if sys_path.contains("/mmc") || starts("mmcblk") {
        Transport::Mmc
    } else if sys_path.contains("/host") || sys_path.contains("/target") || starts("sd") {
        Transport::Scsi
    } else {
        Transport::Unknown
    }
}

/// The serial number: `device/serial` (NVMe, some SCSI), `serial` (virtio),
/// or the SCSI unit serial number VPD page 0x80.
fn serial_of(dir: &Path) -> Option<String> {
    if let Some(s) =
        read_trim(&dir.join("device/serial")).or_else(|| read_trim(&dir.join("serial")))
    {
        return Some(s);
    }
    let page = fs::read(dir.join("device/vpd_pg80")).ok()?;
    let body = page.get(4..)?;
    let s = String::from_utf8_lossy(body)
        .trim()
        .trim_matches(char::from(0))
        .trim()
        .to_string();
    (!s.is_empty()).then_some(s)
}

fn sys_disk(sysfs: &Path, name: &str) -> SysDisk {
    let dir = sysfs.join("block").join(name);
    let real = fs::canonicalize(&dir)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let q = dir.join("queue");
    let logical = read_u64(&q.join("logical_block_size")).unwrap_or(512) as u32;
    SysDisk {
        name: name.to_string(),
        transport: transport_of(name, &real),
        // sysfs `size` counts 512-byte units whatever the sector size.
        size: read_u64(&dir.join("size")).unwrap_or(0) * 512,
        logical,
        physical: read_u64(&q.join("physical_block_size"))
            .map(|v| v as u32)
            .unwrap_or(logical),
        model: read_trim(&dir.join("device/model")),
        // virtio and NVMe put a PCI id (`0x1af4`) there, not a name.
        vendor: read_trim(&dir.join("device/vendor")).filter(|v| !v.starts_with("0x")),
        serial: serial_of(&dir),
        rotational: read_u64(&q.join("rotational")) == Some(1),
        removable: read_u64(&dir.join("removable")) == Some(1),
        read_only: read_u64(&dir.join("ro")) == Some(1),
        optical: name.starts_with("sr"),
        hidden: read_u64(&dir.join("hidden")) == Some(1),
    }
}

/// Compare kernel names naturally: digit runs by value, letter runs
/// alphabetically except that after a common prefix the shorter suffix
/// comes first (`sdz` < `sdaa`, as the kernel assigns them).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for ((da, xa), (db, xb)) in ra.iter().zip(rb.iter()) {
        let ord = match (da, db) {
            (true, true) => {
                let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
                ta.len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| xa.len().cmp(&xb.len()))
            }
            (false, false) => {
                // After a common prefix (`sd`), shorter suffixes first: the
                // kernel names sdz before sdaa.
                let common = xa
                    .bytes()
                    .zip(xb.bytes())
                    .take_while(|(x, y)| x == y)
                    .count();
                if common > 0 {
                    let (sa, sb) = (&xa[common..], &xb[common..]);
                    sa.len().cmp(&sb.len()).then_with(|| sa.cmp(sb))
                } else {
                    xa.cmp(xb)
                }
            }
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ra.len().cmp(&rb.len())
}

fn class_rank(t: Transport) -> u8 {
    match t {
        Transport::Nvme => 0,
        Transport::Sata => 1,
        Transport::Scsi => 2,
        Transport::Virtio => 3,
        Transport::Mmc => 4,
        Transport::Usb => 5,
        Transport::Unknown | Transport::File => 6,
        Transport::Loop => 7,
        Transport::Nbd => 8,
        Transport::Ram => 9,
        Transport::Virtual => 10,
    }
}

/// Listed disks from sysfs, filtered and in `dsk` order.
fn list(opts: &InventoryOptions) -> Result<Vec<SysDisk>, DiskError> {
    let block = opts.sysfs.join("block");
    let rd = fs::read_dir(&block).map_err(|source| DiskError::Sysfs {
        path: block.clone(),
        source,
    })?;
    let mut disks: Vec<SysDisk> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .map(|name| sys_disk(&opts.sysfs, &name))
        .filter(|d| d.size > 0 && !d.hidden)
        .filter(|d| opts.include_virtual || !d.transport.is_virtual())
        .filter(|d| opts.include_read_only || !(d.read_only || d.optical))
        .collect();
    disks.sort_by(|a, b| {
        (!a.listed_by_default())
            .cmp(&!b.listed_by_default())
            .then_with(|| class_rank(a.transport).cmp(&class_rank(b.transport)))
            .then_with(|| natural_cmp(&a.name, &b.name))
    });
    Ok(disks)
}

/// The device node of OpenGnsys disk number `dsk` (1-based), in the order
/// the module doc describes (default filter: real, writable disks). Cheap:
/// reads sysfs only.
pub fn resolve_dsk(dsk: u32) -> Result<PathBuf, DiskError> {
    resolve_dsk_with(dsk, &InventoryOptions::default())
}

/// [`resolve_dsk`] with explicit options (sysfs root, filters).
pub fn resolve_dsk_with(dsk: u32, opts: &InventoryOptions) -> Result<PathBuf, DiskError> {
    let disks = list(opts)?;
    let idx = (dsk as usize).checked_sub(1).filter(|&i| i < disks.len());
    match idx {
        Some(i) => Ok(opts.dev.join(&disks[i].name)),
        None => Err(DiskError::NoSuchDisk {
            dsk,
            count: disks.len(),
        }),
    }
}

/// Every disk of this machine, in `dsk` order, with tables, partitions and
/// filesystems as the options ask. A disk that cannot be opened or whose
/// table is damaged is still listed, with a warning.
pub fn inventory(opts: &InventoryOptions) -> Result<Vec<DiskInfo>, DiskError> {
    let disks = list(opts)?;
    let mut out = Vec::with_capacity(disks.len());
    for (i, d) in disks.into_iter().enumerate() {
        let path = opts.dev.join(&d.name);
        let mut info = DiskInfo {
            dsk: Some(i as u32 + 1),
            name: d.name.clone(),
            path: path.clone(),
            size: d.size,
            logical_sector_size: d.logical,
            physical_sector_size: d.physical,
            model: d.model,
            vendor: d.vendor,
            serial: d.serial,
            transport: d.transport,
            rotational: d.rotational,
            removable: d.removable,
            read_only: d.read_only,
            table: None,
            partitions: Vec::new(),
            warnings: Vec::new(),
        };
        if opts.tables {
            match Device::open_read(&path) {
                Ok(dev) => {
                    info.size = dev.size();
                    info.logical_sector_size = dev.sector_size();
                    info.physical_sector_size = dev.physical_sector_size();
                    describe_table(
                        Arc::new(dev),
                        Some(info.logical_sector_size),
                        opts,
                        &mut info,
                    );
                }
                Err(e) => info
                    .warnings
                    .push(format!("cannot open {}: {e}", path.display())),
            }
            add_nodes(&opts.sysfs, &opts.dev, &d.name, &mut info);
        }
        out.push(info);
    }
    Ok(out)
}

/// Kernel partition nodes (`/dev/sda1`) of a disk, by partition number,
/// from sysfs.
pub(crate) fn partition_nodes(sysfs: &Path, dev: &Path, disk: &str) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(sysfs.join("block").join(disk)) else {
        return out;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(n) = read_u64(&e.path().join("partition")) {
            out.push((n as u32, dev.join(name)));
        }
    }
    out.sort();
    out
}

fn add_nodes(sysfs: &Path, dev: &Path, disk: &str, info: &mut DiskInfo) {
    for (n, node) in partition_nodes(sysfs, dev, disk) {
        if let Some(p) = info.partitions.iter_mut().find(|p| p.number == n) {
            p.node = Some(node);
        }
    }
}

fn describe_table(
    dev: Arc<Device>,
    sector_size: Option<u32>,
    opts: &InventoryOptions,
    info: &mut DiskInfo,
) {
    let t = match table::read(dev.as_ref(), sector_size) {
        Ok(Some(t)) => t,
        Ok(None) => return,
        Err(e) => {
            info.warnings.push(format!("partition table: {e}"));
            return;
        }
    };
    info.table = Some(TableInfo {
        kind: t.kind,
        disk_id: t.disk_id.clone(),
        sector_size: t.sector_size,
    });
    info.partitions = partitions_of(&dev, &t, opts);
}

fn partitions_of(
    dev: &Arc<Device>,
    t: &PartitionTable,
    opts: &InventoryOptions,
) -> Vec<PartitionInfo> {
    let mut out = Vec::new();
    for p in &t.partitions {
        let mut pi = PartitionInfo {
            number: p.number,
            start: p.start,
            size: p.size,
            ptype: p.ptype.clone(),
            code: table::types::og_code(&p.ptype),
            type_name: table::types::type_name(&p.ptype).map(str::to_string),
            guid: p.guid.clone(),
            name: p.name.clone(),
            attributes: p.attributes,
            bootable: p.bootable,
            extended: p.extended,
            filesystem: None,
            label: None,
            uuid: None,
            used: None,
            cache: false,
            node: None,
            error: None,
        };
        if opts.filesystems && !p.extended {
            probe(dev, p.start, p.size, opts.usage, &mut pi);
        }
        pi.cache = pi.ptype == "0xca"
            || pi.label.as_deref() == Some("CACHE")
            || (t.kind == TableKind::Gpt && pi.name.as_deref() == Some("CACHE"));
        if pi.cache {
            pi.code = Some(if t.kind == TableKind::Gpt {
                "CA00".into()
            } else {
                "ca".into()
            });
        }
        out.push(pi);
    }
    out
}

fn probe(dev: &Arc<Device>, start: u64, size: u64, usage: bool, pi: &mut PartitionInfo) {
    let region = match Region::new(dev.clone(), start, size) {
        Ok(r) => r,
        Err(e) => {
            pi.error = Some(e.to_string());
            return;
        }
    };
    match crate::fs::detect(&region) {
        Ok(Some(meta)) => {
            pi.filesystem = Some(meta.fstype);
            pi.label = meta.label;
            pi.uuid = meta.uuid;
        }
        Ok(None) => {}
        Err(e) => pi.error = Some(e.to_string()),
    }
    if usage && pi.filesystem.is_some() {
        match crate::fs::used_map(&region, crate::fs::MapOptions { force: true }) {
            Ok(Some(map)) => pi.used = Some(map.used.used_bytes()),
            Ok(None) => {}
            Err(e) => pi.error = Some(e.to_string()),
        }
    }
}

/// Options for [`inspect`].
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// Logical sector size of a disk image file (default 512; GPT is also
    /// probed at 4096). Ignored for block devices.
    pub sector_size: Option<u32>,
    /// Compute used bytes per filesystem.
    pub usage: bool,
}

/// Describe one disk image file or block device: size, table, partitions,
/// filesystems (and, for block devices, the sysfs facts). Unlike
/// [`inventory`], a damaged table is an error here.
pub fn inspect(path: &Path, opts: &InspectOptions) -> Result<DiskInfo, DiskError> {
    let mut dev = Device::open_read(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(ss) = opts.sector_size {
        dev.set_sector_size(ss);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut info = DiskInfo {
        dsk: None,
        name: name.clone(),
        path: path.to_path_buf(),
        size: dev.size(),
        logical_sector_size: dev.sector_size(),
        physical_sector_size: dev.physical_sector_size(),
        model: None,
        vendor: None,
        serial: None,
        transport: Transport::File,
        rotational: false,
        removable: false,
        read_only: false,
        table: None,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let sysfs = Path::new("/sys");
    if dev.kind() == DeviceKind::Block {
        if let Some(kname) = busy::kernel_name(path) {
            let d = sys_disk(sysfs, &kname);
            info.name = kname;
            info.transport = d.transport;
            info.model = d.model;
            info.vendor = d.vendor;
            info.serial = d.serial;
            info.rotational = d.rotational;
            info.removable = d.removable;
            info.read_only = d.read_only;
        }
    }
    let ss = match (dev.kind(), opts.sector_size) {
        (DeviceKind::Block, _) => Some(dev.sector_size()),
        (DeviceKind::File, s) => s,
    };
    let dev = Arc::new(dev);
    let t = table::read(dev.as_ref(), ss).map_err(|source| DiskError::Table {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(t) = t {
        info.logical_sector_size = t.sector_size;
        if dev.kind() == DeviceKind::File {
            info.physical_sector_size = t.sector_size;
        }
        info.table = Some(TableInfo {
            kind: t.kind,
            disk_id: t.disk_id.clone(),
            sector_size: t.sector_size,
        });
        let iopts = InventoryOptions {
            usage: opts.usage,
            ..InventoryOptions::default()
        };
        info.partitions = partitions_of(&dev, &t, &iopts);
        if dev.kind() == DeviceKind::Block {
            let kname = info.name.clone();
            add_nodes(sysfs, Path::new("/dev"), &kname, &mut info);
        }
    }
    Ok(info)
}

/// [`inspect`] with default options: a disk image file with 512-byte
/// sectors (GPT also probed at 4096).
pub fn inspect_file(path: &Path) -> Result<DiskInfo, DiskError> {
    inspect(path, &InspectOptions::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_of_kernel_names() {
        let mut v = vec![
            "sdaa", "sdb", "sda", "sdz", "nvme10n1", "nvme1n1", "nvme0n1", "nvme0n2", "mmcblk0",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["mmcblk0", "nvme0n1", "nvme0n2", "nvme1n1", "nvme10n1", "sda", "sdb", "sdz", "sdaa"]
        );
    }

    fn fake_disk(root: &Path, name: &str, target: &str, size_512: u64, ro: bool, removable: bool) {
        let real = root.join("devices").join(target).join("block").join(name);
        fs::create_dir_all(real.join("queue")).expect("mkdir");
        fs::create_dir_all(real.join("device")).expect("mkdir device");
        fs::write(real.join("size"), format!("{size_512}\n")).expect("size");
        fs::write(real.join("ro"), if ro { "1\n" } else { "0\n" }).expect("ro");
        fs::write(
            real.join("removable"),
            if removable { "1\n" } else { "0\n" },
        )
        .expect("rm");
        fs::write(real.join("queue/logical_block_size"), "512\n").expect("lbs");
        fs::write(real.join("queue/physical_block_size"), "4096\n").expect("pbs");
        fs::write(real.join("queue/rotational"), "0\n").expect("rot");
        fs::write(real.join("device/model"), format!("Model {name}   \n")).expect("model");
        fs::create_dir_all(root.join("block")).expect("block");
        std::os::unix::fs::symlink(&real, root.join("block").join(name)).expect("symlink");
    }

    #[test]
    fn dsk_order_is_stable_and_filters_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fake_disk(
            root,
            "sdb",
            "pci0000:00/0000:00:17.0/ata2/host1/target1:0:0/1:0:0:0",
            1000,
            false,
            false,
        );
        fake_disk(
            root,
            "sda",
            "pci0000:00/0000:00:14.0/usb2/2-1/host6/target6:0:0/6:0:0:0",
            1000,
            false,
            true,
        );
        fake_disk(
            root,
            "nvme0n1",
            "pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0",
            1000,
            false,
            false,
        );
        fake_disk(
            root,
            "sdc",
            "pci0000:00/0000:00:17.0/ata3/host2/target2:0:0/2:0:0:0",
            1000,
            false,
            false,
        );
        fake_disk(root, "loop0", "virtual", 1000, false, false);
        fake_disk(root, "zram0", "virtual", 1000, false, false);
        fake_disk(
            root,
            "sr0",
            "pci0000:00/0000:00:17.0/ata4/host3/target3:0:0/3:0:0:0",
            1000,
            true,
            true,
        );
        fake_disk(root, "loop1", "virtual", 0, false, false);
        let opts = InventoryOptions {
            sysfs: root.to_path_buf(),
            dev: PathBuf::from("/dev"),
            ..Default::default()
        };
        let names: Vec<String> = list(&opts)
            .expect("list")
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["nvme0n1", "sdb", "sdc", "sda"]);
        let all = InventoryOptions {
            include_virtual: true,
            include_read_only: true,
            ..opts.clone()
        };
        let listed = list(&all).expect("list all");
        let names: Vec<&str> = listed.iter().map(|d| d.name.as_str()).collect();
        // The default disks keep their numbers; the others follow.
        assert_eq!(
            names,
            ["nvme0n1", "sdb", "sdc", "sda", "sr0", "loop0", "zram0"]
        );
        assert_eq!(listed[0].transport, Transport::Nvme);
        assert_eq!(listed[1].transport, Transport::Sata);
        assert_eq!(listed[3].transport, Transport::Usb);
        assert_eq!(listed[1].model.as_deref(), Some("Model sdb"));
        assert!(listed[3].removable);
        assert_eq!(
            resolve_dsk_with(2, &opts).expect("dsk 2"),
            PathBuf::from("/dev/sdb")
        );
        assert!(matches!(
            resolve_dsk_with(5, &opts),
            Err(DiskError::NoSuchDisk { dsk: 5, count: 4 })
        ));
        assert!(resolve_dsk_with(0, &opts).is_err());
    }
}
