//! Partition tables: GPT and MBR (with extended/logical partitions).
//!
//! Partitions are addressed by byte range computed from the table; nothing
//! here depends on the kernel having created partition device nodes.

use serde::{Deserialize, Serialize};

use crate::device::ReadAt;

mod gpt;
mod mbr;

pub use gpt::{format_guid, parse_guid};

/// Table type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// GUID Partition Table.
    Gpt,
    /// DOS / MBR partition table.
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

/// Errors reading a table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// I/O failure.
    #[error("reading the partition table")]
    Io(#[from] std::io::Error),
    /// Structurally invalid table.
    #[error("invalid {kind} partition table: {why}")]
    Invalid {
        /// `GPT` or `MBR`.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
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
