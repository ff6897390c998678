//! Partition layouts: a declarative spec ([`LayoutSpec`]), the OpenGnsys
//! `Configurar` / `setup` form converted into it ([`from_opengnsys`]), the
//! plan that turns a spec into an exact table for one disk ([`plan`]), and
//! applying it ([`apply`]: table, kernel re-read, formatting).
//!
//! # Native spec (JSON)
//!
//! ```json
//! {
//!   "table": "gpt",
//!   "partitions": [
//!     {"number": 1, "type": "efi",   "size": "512MiB", "filesystem": "fat32", "label": "ESP"},
//!     {"number": 2, "type": "ntfs",  "size": "60GiB",  "filesystem": "ntfs",  "label": "Windows"},
//!     {"number": 3, "type": "linux", "size": "rest",   "filesystem": "ext4",  "label": "root"},
//!     {"number": 4, "type": "cache", "size": "20GiB"}
//!   ]
//! }
//! ```
//!
//! * `table`: `gpt` or `mbr` (`msdos`, `dos` accepted).
//! * `type`: a mnemonic (`linux`, `ntfs`, `efi`, `swap`/`linux-swap`,
//!   `cache`, `data`, `extended`, `fat32`, `win-reserv`, `bios-boot`, …, the
//!   OpenGnsys set), an MBR byte in hex (`83`, `7`), a gdisk code (`8300`,
//!   `ef00`) or, on GPT, a type GUID. See [`crate::table::types::resolve`].
//! * `size`: bytes as a number, or a string with a binary unit (`K`/`KiB`,
//!   `M`/`MiB`, `G`/`GiB`, `T`/`TiB`; `KB`, `MB`, … mean the same), or
//!   `"rest"` (what is left; at most one per level). Sizes are rounded **up**
//!   to a whole MiB.
//! * `start` (optional): where the partition starts, a multiple of 1 MiB.
//!   Without it partitions follow each other in number order from 1 MiB,
//!   each starting on a 1 MiB boundary.
//! * `filesystem` (optional): `ext4`, `fat32` (`vfat`), `ntfs`, `swap`;
//!   `label`; `format` (default `true`): make the filesystem.
//! * `name`, `guid` (GPT only), `bootable` (MBR only), `attributes` (GPT).
//! * `disk_id` (optional): GPT disk GUID or MBR signature (`0x1234abcd`);
//!   random when absent. Partition GUIDs are random v4 unless given.
//!
//! MBR: partitions 1–4 are primary (or the one `extended` container),
//! 5, 6, … are logical and live inside the extended partition, in number
//! order, each preceded by 1 MiB holding its extended boot record.
//!
//! The **CACHE** partition (`type: "cache"`, OpenGnsys' local image cache)
//! is ext4 labelled `CACHE` (MBR type `ca`; on GPT type 8300 named `CACHE`,
//! as OpenGnsys does) and is placed at the **end** of the disk (of the
//! extended partition when it is logical) unless it has a `start`. There is
//! at most one.
//!
//! # What is checked before anything is written
//!
//! Duplicate or zero numbers, unknown or table-incompatible types, two
//! CACHE partitions, two `rest` sizes at one level, MBR numbering (an
//! extended partition outside 1–4 or twice, logical partitions without an
//! extended one or with gaps in their numbers — i.e. more than four
//! primaries), partitions that do not fit the disk (naming the partition
//! and the space left), overlaps (explicit starts), the 2^32-sector MBR
//! limit, filesystems on an extended partition, filesystem minimum sizes
//! (see below), label lengths and characters, GPT names
//! longer than 36 characters, malformed GUIDs.
//!
//! Minimum sizes: FAT32 34 MiB with 512-byte sectors and 258 MiB with
//! 4096-byte ones (65525 clusters), NTFS 2 MiB. Every error names the
//! partition; nothing is written.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::table::{self, types, Partition, PartitionTable, TableError, TableKind};

pub use super::apply::{apply, AppliedLayout, ApplyOptions, DiskState, FormatVia, Formatted};

/// One mebibyte: the alignment of every start and size.
pub const MIB: u64 = 1 << 20;

/// The fewest clusters a FAT32 volume may have.
const FAT32_MIN_CLUSTERS: u64 = 65525;

/// FAT32 cluster size for a volume of `size` bytes with `ss`-byte sectors,
/// after Microsoft's FAT32 table (512 B up to 260 MiB, 4 KiB up to 8 GiB,
/// 8 KiB up to 16 GiB, 16 KiB up to 32 GiB, 32 KiB above), never smaller
/// than a sector and always leaving at least 65525 clusters.
pub fn fat32_cluster_size(size: u64, ss: u32) -> u32 {
    let table: u32 = match size {
        s if s <= 260 * MIB => 512,
        s if s <= 8 << 30 => 4096,
        s if s <= 16 << 30 => 8192,
        s if s <= 32 << 30 => 16384,
        _ => 32768,
    };
    let mut c = table.max(ss);
    while c > ss && size / u64::from(c) < FAT32_MIN_CLUSTERS + 1024 {
        c /= 2;
    }
    c
}

/// A partition size: bytes or "the rest".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Exactly this many bytes (rounded up to a MiB when planned).
    Bytes(u64),
    /// Whatever is left at this level of the disk.
    Rest,
}

/// Parse `512MiB`, `10G`, `4096`, `1T` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G, T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Size::Bytes(b) => s.serialize_u64(*b),
            Size::Rest => s.serialize_str("rest"),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size::Bytes(n)),
            Raw::S(s) if s.trim().eq_ignore_ascii_case("rest") => Ok(Size::Rest),
            Raw::S(s) => parse_size(&s)
                .map(Size::Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Filesystems a layout can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// ext4 (`mkfs.ext4`).
    Ext4,
    /// FAT32 (`mkfs.fat -F 32`).
    #[serde(alias = "vfat", alias = "fat")]
    Fat32,
    /// NTFS (`mkntfs`).
    Ntfs,
    /// Linux swap (`mkswap`).
    #[serde(alias = "linux-swap")]
    Swap,
}

impl Filesystem {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Fat32 => "fat32",
            Filesystem::Ntfs => "ntfs",
            Filesystem::Swap => "swap",
        }
    }
    /// The tool that makes it.
    pub fn tool(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "mkfs.ext4",
            Filesystem::Fat32 => "mkfs.fat",
            Filesystem::Ntfs => "mkntfs",
            Filesystem::Swap => "mkswap",
        }
    }
    /// Smallest partition this filesystem can be made on with `ss`-byte
    /// sectors. FAT32 needs 65525 clusters (fewer and it is FAT16 by the
    /// specification's own rule, whatever the boot sector says), of at
    /// least one sector each, plus two FATs and the reserved sectors.
    pub fn min_size(self, ss: u32) -> u64 {
        match self {
            Filesystem::Fat32 => {
                let ss = u64::from(ss.max(512));
                let bytes = FAT32_MIN_CLUSTERS * ss + 2 * FAT32_MIN_CLUSTERS * 4 + 32 * ss;
                (bytes.div_ceil(MIB) + 1) * MIB
            }
            Filesystem::Ntfs => 2 * MIB,
            Filesystem::Ext4 | Filesystem::Swap => MIB,
        }
    }
    fn check_label(self, label: &str) -> Result<(), String> {
        let max = match self {
            Filesystem::Ext4 | Filesystem::Swap => 16,
            Filesystem::Fat32 => 11,
            Filesystem::Ntfs => 128,
        };
        let len = if self == Filesystem::Ntfs {
            label.encode_utf16().count()
        } else {
            label.len()
        };
        if len > max {
            return Err(format!(
                "label {label:?} is longer than the {max} characters {} allows",
                self.as_str()
            ));
        }
        if self == Filesystem::Fat32
            && label
                .chars()
                .any(|c| !c.is_ascii() || c.is_ascii_control() || "*?.,;:/\\|+=<>[]\"".contains(c))
        {
            return Err(format!("label {label:?} has characters FAT does not allow"));
        }
        if label.chars().any(|c| c.is_control()) {
            return Err(format!("label {label:?} has control characters"));
        }
        Ok(())
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One partition of a [`LayoutSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// Partition number (kept as given: 1, 2, 4 stays 1, 2, 4).
    pub number: u32,
    /// Type: mnemonic, MBR hex byte, gdisk code or GPT GUID.
    #[serde(rename = "type")]
    pub ptype: String,
    /// Size, or `"rest"`.
    pub size: Size,
    /// Explicit start in bytes (a multiple of 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Size>,
    /// Filesystem to make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<Filesystem>,
    /// Filesystem label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Make the filesystem (default yes).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub format: bool,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT partition GUID (random v4 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// GPT attribute bits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attributes: u64,
    /// MBR active flag.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl PartitionSpec {
    /// A partition with just number, type and size (format on, nothing else).
    pub fn new(number: u32, ptype: &str, size: Size) -> PartitionSpec {
        PartitionSpec {
            number,
            ptype: ptype.to_string(),
            size,
            start: None,
            filesystem: None,
            label: None,
            format: true,
            name: None,
            guid: None,
            attributes: 0,
            bootable: false,
        }
    }
}

/// A whole-disk partition layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    /// GPT or MBR.
    pub table: TableKind,
    /// GPT disk GUID or MBR signature; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_id: Option<String>,
    /// The partitions.
    pub partitions: Vec<PartitionSpec>,
}

/// A filesystem to make once the table is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatJob {
    /// Partition number.
    pub number: u32,
    /// Filesystem.
    pub filesystem: Filesystem,
    /// Label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// First byte on the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A spec laid out on one disk: the exact table and what to format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The table to write (identifiers not yet generated stay empty).
    pub table: PartitionTable,
    /// Filesystems to make, by partition number.
    pub formats: Vec<FormatJob>,
}

/// Errors of layouts: validation, conversion and application.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A partition of the spec is wrong (nothing written).
    #[error("partition {number}: {why}")]
    Partition {
        /// Partition number.
        number: u32,
        /// What is wrong.
        why: String,
    },
    /// The spec as a whole is wrong (nothing written).
    #[error("invalid layout: {0}")]
    Invalid(String),
    /// The OpenGnsys setup cannot be converted (nothing written).
    #[error("OpenGnsys setup: {0}")]
    OpenGnsys(String),
    /// The OpenGnsys setup is not valid JSON of the expected shape.
    #[error("parsing the OpenGnsys setup")]
    OpenGnsysJson(#[source] serde_json::Error),
    /// The planned table is invalid, or reading/writing it failed.
    #[error(transparent)]
    Table(#[from] TableError),
    /// The target cannot be opened.
    #[error("opening {}", path.display())]
    Open {
        /// The target.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The target is in use (nothing written).
    #[error("{} is in use: {why}; nothing was written", path.display())]
    Busy {
        /// The target.
        path: PathBuf,
        /// What uses it.
        why: String,
    },
    /// A formatting tool is missing (checked before writing; nothing written).
    #[error("{tool} is not installed (needed to make {filesystem} on partition {number}); nothing was written")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// Partition number.
        number: u32,
        /// Filesystem.
        filesystem: Filesystem,
    },
    /// A step after the table was written failed; the disk was wiped (or
    /// wiping failed too — see the state).
    #[error("{step} failed; {state}")]
    Failed {
        /// What was being done.
        step: String,
        /// The state the disk was left in.
        state: DiskState,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn perr(number: u32, why: impl Into<String>) -> LayoutError {
    LayoutError::Partition {
        number,
        why: why.into(),
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

struct Item {
    idx: usize,
    number: u32,
    start: Option<u64>,
    size: Option<u64>,
    /// Space reserved before the partition (the EBR slot of a logical one).
    overhead: u64,
}

/// Lay out `items` in `[begin, end)`; returns `(idx, start, size)`.
fn place(
    items: &[Item],
    begin: u64,
    end: u64,
    what: &str,
) -> Result<Vec<(usize, u64, u64)>, LayoutError> {
    let mut out = Vec::new();
    let mut cursor = begin;
    for (i, it) in items.iter().enumerate() {
        let start = it.start.unwrap_or(cursor + it.overhead);
        let size = match it.size {
            Some(s) => s,
            None => {
                let mut limit = end;
                let mut after = 0u64;
                for next in &items[i + 1..] {
                    if let Some(s) = next.start {
                        limit = s.saturating_sub(next.overhead);
                        break;
                    }
                    after += next.overhead + next.size.unwrap_or(0);
                }
                let avail = limit.saturating_sub(start).saturating_sub(after);
                let avail = avail / MIB * MIB;
                if avail == 0 {
                    return Err(perr(
                        it.number,
                        format!("no space is left for \"rest\" in {what} (the other partitions take it all)"),
                    ));
                }
                avail
            }
        };
        if start.checked_add(size).is_none_or(|e| e > end) {
            let free = end.saturating_sub(start.min(end));
            return Err(perr(
                it.number,
                format!(
                    "{} MiB at {} MiB does not fit {what}, which ends at {} MiB ({} MiB left)",
                    size / MIB,
                    start / MIB,
                    end / MIB,
                    free / MIB
                ),
            ));
        }
        out.push((it.idx, start, size));
        cursor = start + size;
    }
    Ok(out)
}

/// Lay `spec` out on a disk of `disk_size` bytes with `sector_size`-byte
/// sectors: every check of the module doc, then the exact table and the
/// filesystems to make. Nothing is written.
pub fn plan(spec: &LayoutSpec, disk_size: u64, sector_size: u32) -> Result<Plan, LayoutError> {
    let kind = spec.table;
    if spec.partitions.is_empty() {
        return Err(LayoutError::Invalid("no partitions".into()));
    }
    let ss = u64::from(sector_size);
    if !sector_size.is_power_of_two() || !(512..=65536).contains(&sector_size) {
        return Err(LayoutError::Invalid(format!(
            "unsupported sector size {sector_size}"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut resolved = Vec::new();
    let mut cache: Option<u32> = None;
    let mut extended: Option<u32> = None;
    for p in &spec.partitions {
        let n = p.number;
        if n == 0 {
            return Err(LayoutError::Invalid("partition numbers start at 1".into()));
        }
        if !seen.insert(n) {
            return Err(perr(n, "listed twice"));
        }
        let r = types::resolve(&p.ptype, kind).map_err(|why| perr(n, why))?;
        if r.cache {
            if let Some(c) = cache {
                return Err(perr(
                    n,
                    format!("a second CACHE partition (partition {c} is already the cache)"),
                ));
            }
            cache = Some(n);
            if p.filesystem.is_some_and(|f| f != Filesystem::Ext4) {
                return Err(perr(n, "the CACHE partition is ext4"));
            }
            if p.label.as_deref().is_some_and(|l| l != "CACHE") {
                return Err(perr(n, "the CACHE partition is labelled CACHE"));
            }
        }
        match kind {
            TableKind::Gpt => {
                if n > 128 {
                    return Err(perr(n, "GPT partition numbers go up to 128"));
                }
                if p.bootable {
                    return Err(perr(
                        n,
                        "\"bootable\" is the MBR active flag; on GPT use attributes (bit 2)",
                    ));
                }
            }
            TableKind::Mbr => {
                if r.extended {
                    if n > 4 {
                        return Err(perr(n, "an extended partition must be numbered 1 to 4"));
                    }
                    if let Some(e) = extended {
                        return Err(perr(
                            n,
                            format!("a second extended partition (partition {e} is one)"),
                        ));
                    }
                    extended = Some(n);
                }
                if p.name.is_some() || p.guid.is_some() || p.attributes != 0 {
                    return Err(perr(n, "names, GUIDs and attributes exist only on GPT"));
                }
            }
        }
        if r.extended && p.filesystem.is_some() {
            return Err(perr(n, "an extended partition holds no filesystem"));
        }
        if let Some(name) = &p.name {
            if name.encode_utf16().count() > 36 {
                return Err(perr(
                    n,
                    format!("name {name:?} is longer than 36 characters"),
                ));
            }
        }
        if let Some(g) = &p.guid {
            if table::parse_guid(g).is_none() {
                return Err(perr(n, format!("{g:?} is not a GUID")));
            }
        }
        if let Some(l) = &p.label {
            let fs = if r.cache {
                Some(Filesystem::Ext4)
            } else {
                p.filesystem
            };
            match fs {
                Some(f) => f.check_label(l).map_err(|why| perr(n, why))?,
                None => return Err(perr(n, "a label needs a filesystem")),
            }
        }
        if let Size::Bytes(0) = p.size {
            return Err(perr(n, "size 0"));
        }
        match p.start {
            Some(Size::Rest) => return Err(perr(n, "\"rest\" is not a start")),
            Some(Size::Bytes(s)) if s % MIB != 0 || s == 0 => {
                return Err(perr(
                    n,
                    format!("start {s} is not a non-zero multiple of 1 MiB"),
                ))
            }
            _ => {}
        }
        resolved.push(r);
    }
    let logicals: Vec<u32> = match kind {
        TableKind::Mbr => {
            let mut l: Vec<u32> = spec
                .partitions
                .iter()
                .map(|p| p.number)
                .filter(|&n| n > 4)
                .collect();
            l.sort_unstable();
            l
        }
        TableKind::Gpt => Vec::new(),
    };
    if let Some(&first) = logicals.first() {
        if extended.is_none() {
            return Err(perr(
                first,
                "partitions above 4 are logical and need an extended partition (MBR has at most 4 primary partitions)",
            ));
        }
        for (i, &n) in logicals.iter().enumerate() {
            if n != 5 + i as u32 {
                return Err(perr(
                    n,
                    format!(
                        "logical partitions are numbered 5, 6, … without gaps (expected {})",
                        5 + i
                    ),
                ));
            }
        }
    }

    // The usable area, 1 MiB aligned.
    let (begin, end) = match kind {
        TableKind::Gpt => {
            let per_sector = sector_size / 128;
            let entry_sectors = u64::from(128 / per_sector.max(1));
            let total = disk_size / ss;
            if total < 2 * entry_sectors + 4 {
                return Err(LayoutError::Invalid(format!(
                    "the disk ({disk_size} bytes) is too small for a GPT"
                )));
            }
            let last_usable = total - 1 - entry_sectors - 1;
            (
                align_up((2 + entry_sectors) * ss, MIB),
                (last_usable + 1) * ss / MIB * MIB,
            )
        }
        TableKind::Mbr => (MIB, disk_size.min((1u64 << 32) * ss) / MIB * MIB),
    };
    if end <= begin {
        return Err(LayoutError::Invalid(format!(
            "the disk ({disk_size} bytes) is too small for a partition table"
        )));
    }

    let size_of = |p: &PartitionSpec| match p.size {
        Size::Bytes(b) => Some(align_up(b, MIB)),
        Size::Rest => None,
    };
    let start_of = |p: &PartitionSpec| match p.start {
        Some(Size::Bytes(s)) => Some(s),
        _ => None,
    };
    let is_logical = |p: &PartitionSpec| kind == TableKind::Mbr && p.number > 4;
    let mut order: Vec<usize> = (0..spec.partitions.len()).collect();
    // Number order, the CACHE partition last.
    order.sort_by_key(|&i| (resolved[i].cache, spec.partitions[i].number));
    let items = |logical: bool, end: u64| -> Result<Vec<Item>, LayoutError> {
        let mut v = Vec::new();
        let mut rests = Vec::new();
        for &i in &order {
            let p = &spec.partitions[i];
            if is_logical(p) != logical {
                continue;
            }
            let size = size_of(p);
            let mut start = start_of(p);
            if size.is_none() {
                rests.push(p.number);
            }
            if resolved[i].cache && start.is_none() {
                if let Some(sz) = size {
                    start = Some(end.checked_sub(sz).filter(|s| *s > 0).ok_or_else(|| {
                        perr(
                            p.number,
                            format!(
                                "{} MiB does not fit the disk ({} MiB usable)",
                                sz / MIB,
                                end / MIB
                            ),
                        )
                    })?);
                }
            }
            v.push(Item {
                idx: i,
                number: p.number,
                start,
                size,
                overhead: if logical { MIB } else { 0 },
            });
        }
        if rests.len() > 1 {
            return Err(LayoutError::Invalid(format!(
                "partitions {} all ask for \"rest\"; only one per level can",
                rests
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(v)
    };
    let mut placed = place(&items(false, end)?, begin, end, "the disk")?;
    if let Some(en) = extended {
        if let Some(&(_, es, esz)) = placed
            .iter()
            .find(|(i, _, _)| spec.partitions[*i].number == en)
        {
            let inner = place(
                &items(true, es + esz)?,
                es,
                es + esz,
                "the extended partition",
            )?;
            placed.extend(inner);
        }
    }
    placed.sort_by_key(|&(i, _, _)| spec.partitions[i].number);

    let mut t = PartitionTable::new(kind, sector_size);
    t.disk_id = spec.disk_id.clone().unwrap_or_default();
    let mut formats = Vec::new();
    for &(i, start, size) in &placed {
        let p = &spec.partitions[i];
        let r = &resolved[i];
        let name = match (&p.name, r.cache, kind) {
            (Some(n), _, _) => Some(n.clone()),
            (None, true, TableKind::Gpt) => Some("CACHE".to_string()),
            _ => None,
        };
        t.partitions.push(Partition {
            number: p.number,
            start,
            size,
            ptype: r.ptype.clone(),
            guid: p.guid.clone(),
            name,
            attributes: p.attributes,
            bootable: p.bootable,
            extended: r.extended,
        });
        let fs = if r.cache {
            Some(Filesystem::Ext4)
        } else {
            p.filesystem
        };
        if let (Some(f), true) = (fs, p.format) {
            if size < f.min_size(sector_size) {
                return Err(perr(
                    p.number,
                    format!(
                        "{f} needs at least {} MiB with {sector_size}-byte sectors",
                        f.min_size(sector_size) / MIB
                    ),
                ));
            }
            let label = if r.cache {
                Some("CACHE".to_string())
            } else {
                p.label.clone()
            };
            formats.push(FormatJob {
                number: p.number,
                filesystem: f,
                label,
                start,
                size,
            });
        }
    }
    table::validate(&t, disk_size)?;
    Ok(Plan { table: t, formats })
}

// ---------------------------------------------------------------------------
// OpenGnsys form

/// A JSON value OpenGnsys sends as a string or a number (`"1"` or `1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Loose {
    /// A string.
    Str(String),
    /// A number.
    Num(u64),
    /// A boolean.
    Bool(bool),
}

impl Loose {
    fn as_u64(&self, what: &str) -> Result<u64, String> {
        match self {
            Loose::Num(n) => Ok(*n),
            Loose::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("{what} {s:?} is not a number")),
            Loose::Bool(b) => Err(format!("{what} {b} is not a number")),
        }
    }
    fn as_bool(&self, what: &str) -> Result<bool, String> {
        match self {
            Loose::Bool(b) => Ok(*b),
            Loose::Num(n) => Ok(*n != 0),
            Loose::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" | "" => Ok(false),
                _ => Err(format!("{what} {s:?} is not 0 or 1")),
            },
        }
    }
    fn as_string(&self) -> String {
        match self {
            Loose::Str(s) => s.clone(),
            Loose::Num(n) => n.to_string(),
            Loose::Bool(b) => b.to_string(),
        }
    }
}

/// One `partition_setup` entry of an OpenGnsys `setup` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenGnsysPartition {
    /// Partition number.
    pub partition: Loose,
    /// Type code: mnemonic (`LINUX`, `NTFS`, `CACHE`, `EMPTY`, …) or hex.
    pub code: Loose,
    /// Filesystem (`EXT4`, `NTFS`, `FAT32`, `CACHE`, `LINUX-SWAP`, `EMPTY`).
    #[serde(default)]
    pub filesystem: Option<String>,
    /// Size in KiB.
    pub size: Loose,
    /// `"1"` to format.
    #[serde(default)]
    pub format: Option<Loose>,
}

/// An OpenGnsys 1.2 `setup` body (lineage-A `Configurar` carries the same
/// fields in its `cfg` string). Unknown top-level fields are ignored, as
/// OpenGnsys bodies carry routing fields (`clients`, `nfn`, `ids`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenGnsysSetup {
    /// `MSDOS` or `GPT`.
    #[serde(rename = "type")]
    pub table_type: String,
    /// Disk number (`dsk`), 1-based; see [`super::resolve_dsk`].
    #[serde(default)]
    pub disk: Option<Loose>,
    /// `"1"` when a cache partition is wanted.
    #[serde(default)]
    pub cache: Option<Loose>,
    /// Cache size in KiB (used when no `CACHE` entry is given).
    #[serde(default)]
    pub cache_size: Option<Loose>,
    /// The partitions.
    pub partition_setup: Vec<OpenGnsysPartition>,
}

impl OpenGnsysSetup {
    /// Parse a `setup` JSON body.
    pub fn parse(json: &str) -> Result<OpenGnsysSetup, LayoutError> {
        serde_json::from_str(json).map_err(LayoutError::OpenGnsysJson)
    }

    /// The disk number (1 when absent).
    pub fn disk(&self) -> Result<u32, LayoutError> {
        match &self.disk {
            None => Ok(1),
            Some(d) => {
                let n = d.as_u64("disk").map_err(LayoutError::OpenGnsys)?;
                u32::try_from(n)
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| LayoutError::OpenGnsys(format!("disk {n} is out of range")))
            }
        }
    }

    /// Convert into the native spec:
    /// * `type` `MSDOS` → MBR, `GPT` → GPT;
    /// * entries with code `EMPTY` (or 0) are left out;
    /// * `code` goes through [`crate::table::types::resolve`] (mnemonics and
    ///   hex codes); filesystem `CACHE` or code `CACHE` make the CACHE
    ///   partition (ext4 labelled CACHE, at the end of the disk);
    /// * `size` is KiB (rounded up to a MiB when planned);
    /// * `format` 1 with filesystem `EXT4`/`NTFS`/`FAT32`/`LINUX-SWAP`/
    ///   `CACHE` makes that filesystem; any other filesystem with format 1
    ///   is an error; with format 0 the filesystem is left alone;
    /// * `cache` 1 with `cache_size` > 0 and no CACHE entry adds the CACHE
    ///   partition as number 4 (OpenGnsys' default place).
    pub fn to_spec(&self) -> Result<LayoutSpec, LayoutError> {
        let og = |s: String| LayoutError::OpenGnsys(s);
        let table = match self.table_type.trim().to_ascii_uppercase().as_str() {
            "MSDOS" | "MBR" | "DOS" => TableKind::Mbr,
            "GPT" => TableKind::Gpt,
            other => return Err(og(format!("table type {other:?} (expected MSDOS or GPT)"))),
        };
        let mut parts = Vec::new();
        for e in &self.partition_setup {
            let number = e.partition.as_u64("partition").map_err(og)?;
            let number = u32::try_from(number)
                .map_err(|_| og(format!("partition {number} is out of range")))?;
            let code = e.code.as_string();
            let code_t = code.trim();
            let is_empty_code = code_t.eq_ignore_ascii_case("EMPTY")
                || (!code_t.is_empty()
                    && code_t.trim_start_matches("0x").chars().all(|c| c == '0'));
            if is_empty_code {
                continue;
            }
            let fs_name = e
                .filesystem
                .as_deref()
                .unwrap_or("")
                .trim()
                .to_ascii_uppercase();
            let format = match &e.format {
                Some(f) => f.as_bool("format").map_err(|w| perr(number, w))?,
                None => false,
            };
            let is_cache = code_t.eq_ignore_ascii_case("CACHE") || fs_name == "CACHE";
            let size_kib = e.size.as_u64("size").map_err(|w| perr(number, w))?;
            if size_kib == 0 {
                return Err(perr(number, "size 0"));
            }
            let filesystem = match fs_name.as_str() {
                _ if is_cache => Some(Filesystem::Ext4),
                "EXT4" => Some(Filesystem::Ext4),
                "NTFS" => Some(Filesystem::Ntfs),
                "FAT32" | "VFAT" => Some(Filesystem::Fat32),
                "LINUX-SWAP" | "SWAP" => Some(Filesystem::Swap),
                "" | "EMPTY" | "NONE" => None,
                other if format => return Err(perr(number, format!("filesystem {other} cannot be made (EXT4, NTFS, FAT32, LINUX-SWAP, CACHE can)"))),
                _ => None,
            };
            let bytes = size_kib
                .checked_mul(1024)
                .ok_or_else(|| perr(number, format!("size {size_kib} KiB is too large")))?;
            let mut p = PartitionSpec::new(
                number,
                if is_cache { "CACHE" } else { code_t },
                Size::Bytes(bytes),
            );
            p.filesystem = filesystem;
            p.format = format && filesystem.is_some();
            parts.push(p);
        }
        let cache_wanted = match &self.cache {
            Some(c) => c.as_bool("cache").map_err(og)?,
            None => false,
        };
        let cache_kib = match &self.cache_size {
            Some(c) => c.as_u64("cache_size").map_err(og)?,
            None => 0,
        };
        let has_cache = parts.iter().any(|p| p.ptype == "CACHE");
        if cache_wanted && cache_kib > 0 && !has_cache {
            if parts.iter().any(|p| p.number == 4) {
                return Err(og(
                    "cache requested but partition 4, where it goes, is taken".into(),
                ));
            }
            let bytes = cache_kib
                .checked_mul(1024)
                .ok_or_else(|| og(format!("cache_size {cache_kib} KiB is too large")))?;
            parts.push(PartitionSpec::new(4, "CACHE", Size::Bytes(bytes)));
        }
        if parts.is_empty() {
            return Err(og("no partitions (all EMPTY)".into()));
        }
        parts.sort_by_key(|p| p.number);
        Ok(LayoutSpec {
            table,
            disk_id: None,
            partitions: parts,
        })
    }
}

/// Convert an OpenGnsys `setup` / `Configurar` JSON body into the native
/// spec (see [`OpenGnsysSetup::to_spec`]). The disk it names is
/// [`OpenGnsysSetup::disk`].
pub fn from_opengnsys(json: &str) -> Result<LayoutSpec, LayoutError> {
    OpenGnsysSetup::parse(json)?.to_spec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn spec(json: &str) -> LayoutSpec {
        serde_json::from_str(json).expect("spec json")
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("10G"), Ok(10 * GIB));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("7 KB"), Ok(7 * 1024));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5Q").is_err());
        let s: Size = serde_json::from_str("\"rest\"").expect("rest");
        assert_eq!(s, Size::Rest);
    }

    #[test]
    fn fat32_sizes_keep_enough_clusters() {
        assert_eq!(Filesystem::Fat32.min_size(512), 34 * MIB);
        assert_eq!(Filesystem::Fat32.min_size(4096), 258 * MIB);
        assert_eq!(fat32_cluster_size(64 * MIB, 512), 512);
        assert_eq!(fat32_cluster_size(300 * MIB, 512), 4096);
        assert_eq!(fat32_cluster_size(258 * MIB, 4096), 4096);
        assert_eq!(fat32_cluster_size(100 << 30, 512), 32768);
        for (size, ss) in [
            (34 * MIB, 512),
            (261 * MIB, 512),
            (258 * MIB, 4096),
            (9 << 30, 4096),
        ] {
            assert!(
                size / u64::from(fat32_cluster_size(size, ss)) >= 65525,
                "{size} {ss}"
            );
        }
    }

    #[test]
    fn gpt_plan_places_in_order_with_cache_at_end() {
        let s = spec(
            r#"{"table":"gpt","partitions":[
            {"number":1,"type":"efi","size":"100MiB","filesystem":"fat32","label":"ESP"},
            {"number":2,"type":"linux","size":"rest","filesystem":"ext4"},
            {"number":4,"type":"cache","size":"1GiB"}]}"#,
        );
        let p = plan(&s, 8 * GIB, 512).expect("plan");
        let t = &p.table;
        assert_eq!(t.partitions.len(), 3);
        assert_eq!(
            (t.partitions[0].start, t.partitions[0].size),
            (MIB, 100 * MIB)
        );
        let end = (8 * GIB / 512 - 34) * 512 / MIB * MIB;
        assert_eq!(t.partitions[2].number, 4);
        assert_eq!(t.partitions[2].start + t.partitions[2].size, end);
        assert_eq!(t.partitions[2].name.as_deref(), Some("CACHE"));
        assert_eq!(t.partitions[1].start, 101 * MIB);
        assert_eq!(
            t.partitions[1].start + t.partitions[1].size,
            t.partitions[2].start
        );
        assert_eq!(p.formats.len(), 3);
        assert_eq!(p.formats[2].label.as_deref(), Some("CACHE"));
    }

    #[test]
    fn mbr_plan_with_logicals() {
        let s = spec(
            r#"{"table":"mbr","partitions":[
            {"number":1,"type":"ntfs","size":"1GiB","filesystem":"ntfs","bootable":true},
            {"number":2,"type":"extended","size":"rest"},
            {"number":5,"type":"linux","size":"500M"},
            {"number":6,"type":"swap","size":"rest","filesystem":"swap"},
            {"number":4,"type":"cache","size":"1G"}]}"#,
        );
        let p = plan(&s, 4 * GIB, 512).expect("plan");
        let t = &p.table;
        let get = |n| t.partition(n).expect("partition");
        assert_eq!(get(1).start, MIB);
        assert_eq!(get(2).start, GIB + MIB);
        assert_eq!(get(4).start + get(4).size, 4 * GIB);
        assert_eq!(get(2).start + get(2).size, get(4).start);
        assert_eq!(get(5).start, get(2).start + MIB);
        assert_eq!(get(6).start, get(5).start + get(5).size + MIB);
        assert_eq!(get(6).start + get(6).size, get(2).start + get(2).size);
        assert_eq!(get(4).ptype, "0xca");
    }

    #[test]
    fn bad_layouts_are_refused_naming_the_partition() {
        let cases = [
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"9G"}]}"#,
                "partition 1",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"bogus","size":"1G"}]}"#,
                "partition 1",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"cache","size":"1G"},{"number":2,"type":"cache","size":"1G"}]}"#,
                "second CACHE",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"1G"},{"number":1,"type":"linux","size":"1G"}]}"#,
                "twice",
            ),
            (
                r#"{"table":"mbr","partitions":[{"number":1,"type":"linux","size":"1G"},{"number":5,"type":"linux","size":"1G"}]}"#,
                "partition 5",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"2G","start":"1M"},{"number":2,"type":"linux","size":"1G","start":"1G"}]}"#,
                "overlap",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"rest"},{"number":2,"type":"linux","size":"rest"}]}"#,
                "rest",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"extended","size":"1G"}]}"#,
                "partition 1",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"efi","size":"10M","filesystem":"fat32"}]}"#,
                "34 MiB",
            ),
            (
                r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"1G","filesystem":"ext4","label":"this label is far too long"}]}"#,
                "label",
            ),
        ];
        for (json, needle) in cases {
            let e = plan(&spec(json), 8 * GIB, 512).expect_err(json).to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
        assert!(
            serde_json::from_str::<LayoutSpec>(r#"{"table":"gpt","partitions":[],"bogus":1}"#)
                .is_err()
        );
    }

    /// Found by the `opengnsys` fuzz target (regression input
    /// `imager/fuzz/regressions/opengnsys/cache-size-overflow`): a size in
    /// KiB that overflows in bytes was multiplied unchecked (a panic, or a
    /// wrapped size in a release build).
    #[test]
    fn sizes_too_large_in_bytes_are_refused_not_wrapped() {
        let cache = r#"{"type":"MSDOS","cache":"1","cache_size":"15095766158410893409","partition_setup":[
            {"partition":"1","code":"LINUX","filesystem":"EXT4","size":"32768","format":"1"}]}"#;
        let e = from_opengnsys(cache).expect_err("cache size");
        assert!(e.to_string().contains("too large"), "{e}");
        let part = r#"{"type":"MSDOS","partition_setup":[
            {"partition":"1","code":"LINUX","filesystem":"EXT4","size":"18014398509481985","format":"1"}]}"#;
        let e = from_opengnsys(part).expect_err("partition size");
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn opengnsys_setup_converts() {
        let json = r#"{"type":"MSDOS","disk":"1","cache":"1","cache_size":"0","partition_setup":[
            {"partition":"1","code":"NTFS","filesystem":"NTFS","size":"2000000","format":"1"},
            {"partition":"2","code":"LINUX","filesystem":"EXT4","size":"1000000","format":"0"},
            {"partition":"3","code":"EMPTY","filesystem":"EMPTY","size":"0","format":"0"},
            {"partition":"4","code":"CACHE","filesystem":"CACHE","size":"1000000","format":"1"}]}"#;
        let setup = OpenGnsysSetup::parse(json).expect("parse");
        assert_eq!(setup.disk().expect("disk"), 1);
        let s = setup.to_spec().expect("spec");
        assert_eq!(s.table, TableKind::Mbr);
        assert_eq!(s.partitions.len(), 3);
        assert_eq!(s.partitions[0].filesystem, Some(Filesystem::Ntfs));
        assert!(s.partitions[0].format);
        assert!(!s.partitions[1].format);
        assert_eq!(s.partitions[2].ptype, "CACHE");
        let bad = r#"{"type":"GPT","partition_setup":[{"partition":"1","code":"NOPE","size":"1000","format":"0"}]}"#;
        let e =
            plan(&from_opengnsys(bad).expect("converts"), 8 * GIB, 512).expect_err("unknown code");
        assert!(e.to_string().contains("partition 1"), "{e}");
        let bad = r#"{"type":"ZFS","partition_setup":[]}"#;
        assert!(from_opengnsys(bad).is_err());
        let extra = r#"{"type":"GPT","cache":"1","cache_size":"500000","partition_setup":[{"partition":"1","code":"EFI","filesystem":"FAT32","size":"512000","format":"1"}]}"#;
        let s = from_opengnsys(extra).expect("cache added");
        assert_eq!(s.partitions[1].number, 4);
        assert_eq!(s.partitions[1].ptype, "CACHE");
    }
}
