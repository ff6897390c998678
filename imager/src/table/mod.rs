//! Partition tables: GPT and MBR (with extended/logical partitions).
//!
//! Partitions are addressed by byte range computed from the table; nothing
//! here depends on the kernel having created partition device nodes.
//!
//! Reading: [`read`]. Writing: [`write()`] (after [`validate`]), which keeps
//! partition numbers as given (GPT slot = number − 1, so a table with
//! partitions 1, 2 and 4 stays 1, 2, 4), fills in random version-4 GUIDs
//! (GPT) or a random disk signature (MBR) where none is given, and never
//! touches bytes 0..440 of LBA 0 (the MBR boot code). [`wipe`] removes every
//! table signature so a disk stops looking partitioned, and
//! [`relocate_gpt_backup`] moves the GPT backup to the end of a disk that
//! grew (whole-disk restore onto a larger disk).
//!
//! Write order, so that an interrupted write never leaves a table that
//! looks valid with stale contents: first the old signatures are wiped
//! (MBR `55 AA` and every GPT header), then the entry arrays / extended
//! boot records, then LBA 0, then the backup and primary GPT headers, then
//! `fsync`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::{Device, ReadAt};

mod gpt;
mod mbr;
pub mod types;

pub use gpt::{format_guid, parse_guid};

/// Table type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// GUID Partition Table.
    Gpt,
    /// DOS / MBR partition table (`"mbr"`; `"msdos"` and `"dos"` are
    /// accepted on input).
    #[serde(alias = "msdos", alias = "dos")]
    Mbr,
}

/// One partition as the table describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Partition number as the OS numbers it (GPT slot + 1; MBR 1–4
    /// primary, 5+ logical).
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT type GUID (upper-case, dashed) or MBR type code (`0x83`).
    #[serde(rename = "type")]
    pub ptype: String,
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
    /// MBR: this is the extended container partition itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A parsed partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    /// GPT or MBR.
    pub kind: TableKind,
    /// Logical sector size the table was read with.
    pub sector_size: u32,
    /// GPT disk GUID or MBR disk signature (`0x1234abcd`).
    pub disk_id: String,
    /// Partitions, sorted by number.
    pub partitions: Vec<Partition>,
    /// GPT: first usable LBA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_usable_lba: Option<u64>,
    /// GPT: last usable LBA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_usable_lba: Option<u64>,
}

impl PartitionTable {
    /// The partition with this number.
    pub fn partition(&self, number: u32) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.number == number)
    }
}

/// Errors reading or writing a table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// I/O failure while reading.
    #[error("reading the partition table")]
    Io(#[from] std::io::Error),
    /// Structurally invalid table on disk.
    #[error("invalid {kind} partition table: {why}")]
    Invalid {
        /// `GPT` or `MBR`.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A table that cannot be written as given (checked before any write).
    #[error("cannot write this {kind} partition table: {why}")]
    Unwritable {
        /// `GPT` or `MBR`.
        kind: &'static str,
        /// What is wrong, naming the partition.
        why: String,
    },
    /// Writing or syncing the device failed; the table may be half written.
    #[error("writing the partition table to {}", path.display())]
    Write {
        /// The device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl PartitionTable {
    /// An empty table of this kind (random identifiers are chosen when it
    /// is written).
    pub fn new(kind: TableKind, sector_size: u32) -> PartitionTable {
        PartitionTable {
            kind,
            sector_size,
            disk_id: String::new(),
            partitions: Vec::new(),
            first_usable_lba: None,
            last_usable_lba: None,
        }
    }
}

/// Check that `table` can be written to a disk of `disk_size` bytes with
/// the table's sector size: sector-aligned ranges inside the usable area,
/// no overlaps, no duplicate numbers, valid types/GUIDs/names, MBR numbering
/// (1–4 primary or extended, at most one extended, logicals 5, 6, … in disk
/// order inside it, nothing past 2^32 sectors). Nothing is written.
pub fn validate(table: &PartitionTable, disk_size: u64) -> Result<(), TableError> {
    let kind = match table.kind {
        TableKind::Gpt => "GPT",
        TableKind::Mbr => "MBR",
    };
    let bad = |why: String| TableError::Unwritable { kind, why };
    let ss = u64::from(table.sector_size);
    if !table.sector_size.is_power_of_two() || !(512..=65536).contains(&table.sector_size) {
        return Err(bad(format!(
            "unsupported sector size {}",
            table.sector_size
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &table.partitions {
        let n = p.number;
        if n == 0 {
            return Err(bad("partition numbers start at 1".into()));
        }
        if !seen.insert(n) {
            return Err(bad(format!("partition {n} is listed twice")));
        }
        if p.size == 0 || p.start % ss != 0 || p.size % ss != 0 {
            return Err(bad(format!(
                "partition {n}: start {} and size {} must be non-zero multiples of the {ss}-byte sector",
                p.start, p.size
            )));
        }
        if p.start.checked_add(p.size).is_none_or(|e| e > disk_size) {
            return Err(bad(format!(
                "partition {n}: bytes {}..{} do not fit the disk ({disk_size} bytes)",
                p.start,
                p.start.saturating_add(p.size)
            )));
        }
    }
    // Overlaps: among the top-level partitions (the extended container
    // included) and among the logical ones.
    let logical = |p: &Partition| table.kind == TableKind::Mbr && p.number > 4;
    for (i, a) in table.partitions.iter().enumerate() {
        for b in &table.partitions[i + 1..] {
            if logical(a) != logical(b) {
                continue;
            }
            if a.start < b.start + b.size && b.start < a.start + a.size {
                let (x, y) = if a.number < b.number { (a, b) } else { (b, a) };
                return Err(bad(format!(
                    "partitions {} (bytes {}..{}) and {} (bytes {}..{}) overlap",
                    x.number,
                    x.start,
                    x.start + x.size,
                    y.number,
                    y.start,
                    y.start + y.size
                )));
            }
        }
    }
    match table.kind {
        TableKind::Gpt => gpt::validate(table, disk_size).map(|_| ()),
        TableKind::Mbr => mbr::validate(table, disk_size),
    }
}

/// Write `table` to `dev` (opened for writing, with the table's sector
/// size) and return the table as written: generated GUIDs / disk signature
/// filled in, GPT usable range set for this disk. The table is validated
/// first ([`validate`]); an invalid table writes nothing.
///
/// The GPT last usable LBA always follows the device size; the first usable
/// LBA is kept when the table has one. MBR bytes 0..440 (boot code) are
/// kept; for MBR the disk signature comes from `disk_id`, for GPT the
/// protective MBR keeps the existing signature bytes.
pub fn write(dev: &Device, table: &PartitionTable) -> Result<PartitionTable, TableError> {
    let kind = match table.kind {
        TableKind::Gpt => "GPT",
        TableKind::Mbr => "MBR",
    };
    if !dev.writable() {
        return Err(TableError::Unwritable {
            kind,
            why: format!("{} is not open for writing", dev.path().display()),
        });
    }
    if table.sector_size != dev.sector_size() {
        return Err(TableError::Unwritable {
            kind,
            why: format!(
                "the table uses {}-byte sectors but {} has {}-byte sectors",
                table.sector_size,
                dev.path().display(),
                dev.sector_size()
            ),
        });
    }
    validate(table, dev.size())?;
    match table.kind {
        TableKind::Gpt => gpt::write(dev, table),
        TableKind::Mbr => mbr::write(dev, table),
    }
}

/// Make the disk look unpartitioned: zero the MBR partition records and
/// `55 AA` signature (bytes 446..512; the boot code stays) and every GPT
/// header found at LBA 1 or the last LBA, for 512- and 4096-byte sectors.
/// Partition contents are not touched. Synced before returning.
pub fn wipe(dev: &Device) -> Result<(), TableError> {
    if dev.size() >= 512 {
        put(dev, &[0u8; 66], 446)?;
    }
    wipe_signatures(dev)?;
    sync(dev)
}

/// Move the GPT backup header and entry array to the end of `dev` (which
/// grew, e.g. a whole-disk image restored onto a larger disk), updating
/// both headers and the protective MBR. The primary entry array is kept
/// byte for byte. Fails without writing when the primary header is damaged
/// or a partition would end past the new last usable LBA.
pub fn relocate_gpt_backup(dev: &Device) -> Result<(), TableError> {
    gpt::relocate_backup(dev)
}

/// Zero the MBR signature and any GPT header signature (both sector sizes).
fn wipe_signatures(dev: &Device) -> Result<(), TableError> {
    let size = dev.size();
    if size >= 512 {
        put(dev, &[0u8; 2], 510)?;
    }
    for ss in [512u64, 4096] {
        if size < 3 * ss {
            continue;
        }
        for at in [ss, size / ss * ss - ss] {
            let mut sig = [0u8; 8];
            dev.read_exact_at(&mut sig, at)?;
            if &sig == gpt::SIGNATURE {
                put(dev, &[0u8; 512], at)?;
            }
        }
    }
    Ok(())
}

fn put(dev: &Device, buf: &[u8], at: u64) -> Result<(), TableError> {
    dev.write_all_at(buf, at)
        .map_err(|source| TableError::Write {
            path: dev.path().to_path_buf(),
            source,
        })
}

fn sync(dev: &Device) -> Result<(), TableError> {
    dev.sync().map_err(|source| TableError::Write {
        path: dev.path().to_path_buf(),
        source,
    })
}

/// Entry points for the fuzz targets.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    fn check(src: &dyn ReadAt, t: &PartitionTable) {
        for p in &t.partitions {
            assert!(
                p.start.checked_add(p.size).is_some_and(|e| e <= src.size()),
                "partition {} ({}+{}) leaves a disk of {} bytes",
                p.number,
                p.start,
                p.size,
                src.size()
            );
        }
    }

    /// GPT parsing at both sector sizes.
    pub fn gpt(src: &dyn ReadAt) {
        for ss in [512, 4096] {
            if let Ok(Some(t)) = gpt::read(src, ss) {
                check(src, &t);
                let _ = validate(&t, src.size());
            }
        }
    }

    /// MBR parsing (primary records and the chain of extended boot records).
    pub fn mbr(src: &dyn ReadAt) {
        if let Ok(Some(t)) = mbr::read(src, 512) {
            check(src, &t);
            let _ = validate(&t, src.size());
        }
        let _ = read(src, None);
    }
}

/// Read the partition table of a disk. `sector_size` is the logical sector
/// size when known (block devices); `None` probes 512 then 4096 for GPT.
/// `Ok(None)` when the disk has no table.
pub fn read(
    src: &dyn ReadAt,
    sector_size: Option<u32>,
) -> Result<Option<PartitionTable>, TableError> {
    let sizes: &[u32] = match sector_size {
        Some(512) | None => &[512, 4096],
        Some(4096) => &[4096],
        Some(_) => &[512],
    };
    for &ss in sizes {
        if let Some(t) = gpt::read(src, ss)? {
            return Ok(Some(t));
        }
    }
    mbr::read(src, sector_size.unwrap_or(512))
}
