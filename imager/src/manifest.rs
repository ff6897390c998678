//! The image manifest (format v1). See `FORMAT.md` for the full description.
//!
//! # Bounds
//!
//! A manifest arrives from a repository, possibly a hostile one, so reading
//! one costs time and memory in proportion to its bytes, never to the sizes
//! it states:
//!
//! | value | bound |
//! |---|---|
//! | document | at most [`MAX_MANIFEST_BYTES`] (256 MiB: a 2 TiB disk of 4 MiB chunks needs about 130 MB) |
//! | `used` | at most [`crate::extent::MAX_EXTENTS`] extents, sorted, disjoint, no overflow, inside `source_size` |
//! | `chunk_size` | a power of two in 64 KiB ..= 64 MiB |
//! | `source_size` | at most [`MAX_SOURCE_SIZE`] (1 EiB); validation walks the used extents and the chunk list, never the windows, so even 1 EiB with `used: []` is checked in microseconds, and `2^64 − 1` is refused as quickly |
//! | `chunks` | exactly one per window touched by `used`, in order: no more entries than the map touches |
//! | `partitions` | inside the disk, not overlapping, each a valid partition image (nesting stops there) |

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, Fingerprint};
use crate::error::{Error, Result};
use crate::extent::ExtentMap;
use crate::fs::FsMeta;
use crate::table::PartitionTable;

/// The `format` value of every manifest.
pub const FORMAT_NAME: &str = "aula-image";
/// The only manifest version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest chunk size accepted (bounds restore memory per worker).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Largest manifest document read.
pub const MAX_MANIFEST_BYTES: usize = 256 << 20;
/// Largest source an image may describe: 1 EiB, more than any disk, and
/// every byte offset stays below 2^63 (the kernel's `off_t`).
pub const MAX_SOURCE_SIZE: u64 = 1 << 60;

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// One partition (or a bare filesystem image file).
    Partition,
    /// A whole disk: partition table, boot areas and every partition.
    Disk,
}

/// How chunks are compressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Always `zstd` in v1.
    pub algorithm: String,
    /// The level used at creation (informative).
    pub level: i32,
}

/// One chunk window that holds used data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// Window index: the chunk covers bytes `[index*chunk_size,
    /// min((index+1)*chunk_size, source_size))`.
    pub index: u64,
    /// SHA-256 of the window's content (unused bytes zeroed); absent when the
    /// content is all zeros (such chunks are not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ChunkId>,
    /// Stored (compressed) size in bytes; 0 for zero chunks.
    #[serde(default)]
    pub stored: u64,
    /// BLAKE3 of the content, for fast delta checks (absent for zero
    /// chunks; optional: readers fall back to the SHA-256 id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b3: Option<Fingerprint>,
}

/// A partition inside a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPartition {
    /// Partition number (kept on restore: 1, 2, 4 stay 1, 2, 4).
    pub number: u32,
    /// First byte on the source disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The partition's own image (kind `partition`).
    pub image: Box<Manifest>,
}

/// An image manifest.
///
/// For a partition image, `used` and `chunks` describe the partition. For a
/// disk image they describe the areas outside partitions (boot code, the gap
/// after the MBR, GPT headers and arrays) relative to the start of the disk,
/// `table` holds the partition table and `partitions` one partition image
/// each, with chunk windows aligned to the partition start (so the same
/// partition captured alone or inside a disk yields the same chunks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always `aula-image`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// Image name.
    pub name: String,
    /// Version number of this image in its repository (assigned on publish;
    /// 0 before).
    #[serde(default)]
    pub image_version: u32,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Program and version that wrote it.
    pub tool: String,
    /// Partition or disk.
    pub kind: ImageKind,
    /// Size of the imaged source in bytes.
    pub source_size: u64,
    /// Logical sector size of the source.
    pub sector_size: u32,
    /// Filesystem found on the source, when recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsMeta>,
    /// Partition type (GPT type GUID or MBR code) when the source was a
    /// partition of a table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_type: Option<String>,
    /// How the used map was made: `raw`, or the filesystem walker (`ext4`…).
    pub map: String,
    /// Byte ranges holding data.
    pub used: ExtentMap,
    /// Sum of `used` (redundant, checked on load).
    pub used_bytes: u64,
    /// Window size in bytes (power of two).
    pub chunk_size: u64,
    /// Chunk compression.
    pub compression: Compression,
    /// Chunk hash: always `sha256` in v1.
    pub hash: String,
    /// Every window that holds used data, in index order.
    pub chunks: Vec<ChunkRef>,
    /// Disk images: the partition table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<PartitionTable>,
    /// Disk images: one image per partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<DiskPartition>,
    /// Free-form notes (source description, creator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Manifest {
    /// A new (unpublished) manifest with the fields every image has; the
    /// optional ones (filesystem, partition type, table, partitions,
    /// description) start empty.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        kind: ImageKind,
        source_size: u64,
        sector_size: u32,
        map: String,
        used: ExtentMap,
        chunk_size: u64,
        level: i32,
        chunks: Vec<ChunkRef>,
    ) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            name: name.to_string(),
            image_version: 0,
            created: now_rfc3339(),
            tool: concat!("aula-imager ", env!("CARGO_PKG_VERSION")).into(),
            kind,
            source_size,
            sector_size: if sector_size == 0 { 512 } else { sector_size },
            filesystem: None,
            partition_type: None,
            map,
            used_bytes: used.used_bytes(),
            used,
            chunk_size,
            compression: Compression {
                algorithm: "zstd".into(),
                level,
            },
            hash: "sha256".into(),
            chunks,
            table: None,
            partitions: vec![],
            description: None,
        }
    }

    /// Parse and validate a manifest. `origin` names it in errors.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<Manifest> {
        let bad = |why: String| Error::BadManifest {
            source_name: Some(origin.to_string()),
            why,
        };
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have",
                bytes.len()
            )));
        }
        // Check the header first so that a future version gets the right
        // error even when its body does not parse as v1.
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<u32>,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|e| {
            if e.is_eof() {
                bad(format!("truncated ({e})"))
            } else {
                bad(e.to_string())
            }
        })?;
        if head.format.as_deref() != Some(FORMAT_NAME) {
            return Err(bad(format!(
                "not an Aula image manifest (format is {:?})",
                head.format
            )));
        }
        match head.version {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::UnsupportedVersion {
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            None => return Err(bad("no version field".into())),
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        m.validate().map_err(bad)?;
        Ok(m)
    }

    /// Serialise (pretty, stable field order).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Number of chunk windows the source spans.
    pub fn window_count(&self) -> u64 {
        self.source_size.div_ceil(self.chunk_size)
    }

    /// The byte range `(start, len)` of window `index`.
    pub fn window(&self, index: u64) -> (u64, u64) {
        let start = index * self.chunk_size;
        (start, self.chunk_size.min(self.source_size - start))
    }

    /// Every distinct stored chunk id, with its stored size, across the image
    /// and its partitions.
    pub fn unique_chunks(&self) -> Vec<(ChunkId, u64)> {
        let mut seen = std::collections::HashMap::new();
        let mut order = Vec::new();
        let mut visit = |m: &Manifest| {
            for c in &m.chunks {
                if let Some(id) = c.id {
                    if seen.insert(id, c.stored).is_none() {
                        order.push(id);
                    }
                }
            }
        };
        visit(self);
        for p in &self.partitions {
            visit(&p.image);
        }
        order.into_iter().map(|id| (id, seen[&id])).collect()
    }

    /// Total used bytes, including partitions of a disk image.
    pub fn total_used_bytes(&self) -> u64 {
        self.used_bytes
            + self
                .partitions
                .iter()
                .map(|p| p.image.used_bytes)
                .sum::<u64>()
    }

    /// Total stored bytes of distinct chunks.
    pub fn stored_bytes(&self) -> u64 {
        self.unique_chunks().iter().map(|(_, s)| s).sum()
    }

    /// Internal consistency checks.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "version {} inside a v{FORMAT_VERSION} image",
                self.version
            ));
        }
        if self.compression.algorithm != "zstd" {
            return Err(format!(
                "unknown compression {:?}",
                self.compression.algorithm
            ));
        }
        if self.hash != "sha256" {
            return Err(format!("unknown hash {:?}", self.hash));
        }
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(format!(
                "chunk size {} is not a power of two in 64 KiB..64 MiB",
                self.chunk_size
            ));
        }
        if self.source_size > MAX_SOURCE_SIZE {
            return Err(format!(
                "source size {} is larger than {MAX_SOURCE_SIZE} bytes (1 EiB)",
                self.source_size
            ));
        }
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(format!(
                "sector size {} is not 512, 1024, 2048 or 4096",
                self.sector_size
            ));
        }
        if self.used.end() > self.source_size {
            return Err(format!(
                "used map ends at {} beyond the source size {}",
                self.used.end(),
                self.source_size
            ));
        }
        if self.used.used_bytes() != self.used_bytes {
            return Err(format!(
                "used_bytes {} does not match the map ({})",
                self.used_bytes,
                self.used.used_bytes()
            ));
        }
        // Every window that holds used data has exactly one chunk entry, in
        // order, and nothing else does. The windows are found from the used
        // extents (never by walking all windows: `source_size` may be 2^64).
        let windows = self.window_count();
        let mut expect = UsedWindows::new(&self.used, self.chunk_size);
        for (n, c) in self.chunks.iter().enumerate() {
            if c.index >= windows {
                return Err(format!(
                    "chunk entry {n} has window index {} beyond the source",
                    c.index
                ));
            }
            match expect.next() {
                Some(i) if i == c.index => {}
                Some(i) => {
                    return Err(format!(
                        "chunk entry {n} is for window {} but window {i} holds used data and has no entry",
                        c.index
                    ))
                }
                None => return Err(format!("chunk entry {n} (window {}) holds no used data", c.index)),
            }
            if c.id.is_none() && c.stored != 0 {
                return Err(format!(
                    "zero chunk entry {n} claims {} stored bytes",
                    c.stored
                ));
            }
        }
        if let Some(i) = expect.next() {
            return Err(format!("window {i} holds used data but has no chunk entry"));
        }
        match self.kind {
            ImageKind::Partition => {
                if self.table.is_some() || !self.partitions.is_empty() {
                    return Err("a partition image carries a partition table".into());
                }
            }
            ImageKind::Disk => {
                if self.table.is_none() {
                    return Err("a disk image without a partition table".into());
                }
                let mut prev_end = 0;
                let mut sorted: Vec<&DiskPartition> = self.partitions.iter().collect();
                sorted.sort_by_key(|p| p.start);
                for p in sorted {
                    if p.start < prev_end
                        || p.start
                            .checked_add(p.size)
                            .is_none_or(|e| e > self.source_size)
                    {
                        return Err(format!(
                            "partition {} overlaps another or leaves the disk",
                            p.number
                        ));
                    }
                    prev_end = p.start + p.size;
                    if p.image.kind != ImageKind::Partition || p.image.source_size != p.size {
                        return Err(format!(
                            "partition {} image does not match its size",
                            p.number
                        ));
                    }
                    p.image
                        .validate()
                        .map_err(|e| format!("partition {}: {e}", p.number))?;
                }
            }
        }
        Ok(())
    }
}

/// The indices of the windows of `chunk_size` bytes that hold used data,
/// ascending, found from the used extents: the work is proportional to the
/// extents and the windows they touch, not to the source size.
pub(crate) struct UsedWindows<'a> {
    extents: std::slice::Iter<'a, crate::extent::Extent>,
    chunk_size: u64,
    /// Next window index to yield (if it is at most `last`).
    next: u64,
    /// Last window of the current extent.
    last: Option<u64>,
}

impl<'a> UsedWindows<'a> {
    pub(crate) fn new(used: &'a ExtentMap, chunk_size: u64) -> Self {
        UsedWindows {
            extents: used.extents().iter(),
            chunk_size,
            next: 0,
            last: None,
        }
    }
}

impl Iterator for UsedWindows<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            if let Some(last) = self.last {
                if self.next <= last {
                    let w = self.next;
                    self.next += 1;
                    return Some(w);
                }
            }
            let e = self.extents.next()?;
            self.next = self.next.max(e.start / self.chunk_size);
            self.last = Some((e.end() - 1) / self.chunk_size);
        }
    }
}

/// Check an image name: 1–128 of `A-Z a-z 0-9 . _ -`, not starting with
/// `.` or `-`. Names become directory names in a repository, so this is also
/// what keeps them inside it.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

/// The current time in RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let used = ExtentMap::from_ranges([(0, 4096), (9 << 20, 4096)]);
        Manifest {
            format: FORMAT_NAME.into(),
            version: 1,
            name: "t".into(),
            image_version: 0,
            created: now_rfc3339(),
            tool: "test".into(),
            kind: ImageKind::Partition,
            source_size: 10 << 20,
            sector_size: 512,
            filesystem: None,
            partition_type: None,
            map: "raw".into(),
            used_bytes: used.used_bytes(),
            used,
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            hash: "sha256".into(),
            chunks: vec![
                ChunkRef {
                    index: 0,
                    id: Some(ChunkId::of(b"a")),
                    stored: 10,
                    b3: Some(Fingerprint::of(b"a")),
                },
                ChunkRef {
                    index: 2,
                    id: None,
                    stored: 0,
                    b3: None,
                },
            ],
            table: None,
            partitions: vec![],
            description: None,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let m = sample();
        let j = m.to_json();
        let back = Manifest::from_json(&j, "t").expect("parse");
        assert_eq!(back, m);
        assert_eq!(m.window(2), (8 << 20, 2 << 20));
    }

    #[test]
    fn unknown_version_is_refused_with_its_number() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).expect("json");
        v["version"] = 2.into();
        v["something_new"] = "x".into();
        let e =
            Manifest::from_json(&serde_json::to_vec(&v).expect("ser"), "t").expect_err("must fail");
        assert!(
            matches!(e, Error::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn truncated_manifest_says_truncated() {
        let j = sample().to_json();
        let e = Manifest::from_json(&j[..j.len() / 2], "m.json").expect_err("must fail");
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn missing_or_extra_chunk_entries_are_refused() {
        let mut m = sample();
        m.chunks.pop();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.chunks.push(ChunkRef {
            index: 1,
            id: None,
            stored: 0,
            b3: None,
        });
        assert!(m.validate().is_err());
        let mut m = sample();
        m.used_bytes += 1;
        assert!(m.validate().is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).expect("json");
        v["unexpected"] = 1.into();
        assert!(Manifest::from_json(&serde_json::to_vec(&v).expect("ser"), "t").is_err());
    }

    #[test]
    fn used_windows_follow_the_extents() {
        let used = ExtentMap::from_ranges([(0, 10), (20, 5), (4096, 1), (9000, 10000)]);
        let w: Vec<u64> = UsedWindows::new(&used, 4096).collect();
        assert_eq!(w, vec![0, 1, 2, 3, 4]);
        let brute: Vec<u64> = (0..5).filter(|&i| used.touches(i * 4096, 4096)).collect();
        assert_eq!(w, brute);
    }

    #[test]
    fn a_manifest_of_two_to_the_64_bytes_is_refused_in_milliseconds() {
        let mut m = sample();
        m.source_size = u64::MAX;
        m.used = ExtentMap::new();
        m.used_bytes = 0;
        m.chunks.clear();
        let t = std::time::Instant::now();
        let e = Manifest::from_json(&m.to_json(), "evil").expect_err("2^64 - 1 bytes");
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(
            t.elapsed() < std::time::Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn an_exabyte_manifest_is_validated_by_its_extents_not_its_windows() {
        let mut m = sample();
        m.source_size = MAX_SOURCE_SIZE;
        m.used = ExtentMap::new();
        m.used_bytes = 0;
        m.chunks.clear();
        let t = std::time::Instant::now();
        m.validate().expect("an empty image of any size is valid");
        // One chunk entry for a window without data: refused.
        m.chunks.push(ChunkRef {
            index: (MAX_SOURCE_SIZE / m.chunk_size) - 1,
            id: None,
            stored: 0,
            b3: None,
        });
        assert!(m.validate().is_err());
        // Data at the very end: one entry expected, and only there.
        m.chunks.clear();
        m.used = ExtentMap::from_ranges([(MAX_SOURCE_SIZE - 10, 10)]);
        m.used_bytes = 10;
        let e = m.validate().expect_err("missing entry");
        assert!(e.contains("no chunk entry"), "{e}");
        m.chunks.push(ChunkRef {
            index: (MAX_SOURCE_SIZE - 1) / m.chunk_size,
            id: None,
            stored: 0,
            b3: None,
        });
        m.validate().expect("one entry at the end");
        // 2^44 windows, walked in microseconds.
        assert!(
            t.elapsed() < std::time::Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn names_are_restricted() {
        for ok in ["win11-lab", "a", "ubuntu_24.04"] {
            validate_name(ok).expect(ok);
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
