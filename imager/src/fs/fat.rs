//! FAT12 / FAT16 / FAT32: boot-sector parsing and the used map from the
//! allocation table.
//!
//! Facts from Microsoft's FAT specification ("FAT: General Overview of
//! On-Disk Format"):
//!
//! * The type is decided by the number of data clusters only: fewer than
//!   4085 is FAT12, fewer than 65525 is FAT16, otherwise FAT32. The
//!   `BS_FilSysType` string is informational and ignored here.
//! * Layout: reserved sectors (boot sector; for FAT32 also FSInfo and the
//!   backup boot sector), then `BPB_NumFATs` copies of the FAT, then (FAT12/16
//!   only) the fixed root directory, then the data clusters numbered from 2.
//! * A FAT entry of 0 is a free cluster; the bad-cluster marker (`0xFF7`,
//!   `0xFFF7`, `0x0FFFFFF7`) is not data; anything else belongs to a file or
//!   directory. FAT32 entries use their low 28 bits.
//! * `FAT[1]` carries the volume state on FAT16/32: the "clean shutdown" bit
//!   (`0x8000` / `0x08000000`) is cleared while the volume is in use, and the
//!   "no hard error" bit (`0x4000` / `0x04000000`) is cleared after an I/O
//!   error. Linux additionally keeps a dirty flag in bit 0 of the boot
//!   sector's `BS_Reserved1` byte.
//!
//! # Bounds
//!
//! Every size comes from 8-, 16- and 32-bit fields, so no product
//! overflows a `u64`; before use they are held to: bytes per sector 512,
//! 1024, 2048 or 4096; sectors per cluster a power of two (≤ 128, so
//! clusters ≤ 512 KiB); metadata smaller than the volume; a FAT large
//! enough for every cluster; the volume inside the region. The FAT is read
//! in pieces of at most 4 MiB and walked once (a loop proportional to the
//! region); the label search reads at most 16 clusters of at most 1 MiB.

use crate::device::ReadAt;
use crate::extent::ExtentMap;

use super::{le16, le32, trim_label, FsError, FsMeta, MapOptions};

/// Read the FAT in pieces of at most this many bytes.
const FAT_CHUNK: u64 = 4 << 20;
/// A directory longer than this is refused (FAT allows 65536 entries of
/// 32 bytes).
const MAX_DIR_BYTES: u64 = 2 << 20;

/// FAT width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Fat12 => "fat12",
            Kind::Fat16 => "fat16",
            Kind::Fat32 => "fat32",
        }
    }

    /// The bad-cluster marker.
    fn bad(self) -> u32 {
        match self {
            Kind::Fat12 => 0xFF7,
            Kind::Fat16 => 0xFFF7,
            Kind::Fat32 => 0x0FFF_FFF7,
        }
    }

    /// Entry `n` of a FAT held in `fat` (which starts at entry 0).
    /// `None` when `fat` is too short.
    fn entry(self, fat: &[u8], n: u64) -> Option<u32> {
        let n = usize::try_from(n).ok()?;
        match self {
            Kind::Fat12 => {
                let o = n + n / 2;
                let b = fat.get(o..o + 2)?;
                let v = u16::from_le_bytes([b[0], b[1]]);
                Some(u32::from(if n % 2 == 0 { v & 0x0FFF } else { v >> 4 }))
            }
            Kind::Fat16 => fat
                .get(2 * n..2 * n + 2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
            Kind::Fat32 => fat
                .get(4 * n..4 * n + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x0FFF_FFFF),
        }
    }

    /// Whether a FAT entry value marks its cluster as holding data.
    fn in_use(self, v: u32) -> bool {
        v != 0 && v != self.bad()
    }
}

/// A parsed FAT boot sector.
#[derive(Debug, Clone)]
pub(super) struct Fat {
    kind: Kind,
    bps: u64,
    spc: u64,
    reserved: u64,
    nfats: u64,
    root_dir_sectors: u64,
    fat_sectors: u64,
    total_sectors: u64,
    clusters: u64,
    active_fat: u64,
    root_cluster: u32,
    state_byte: u8,
    serial: Option<u32>,
    label: Option<String>,
}

/// Recognises a FAT boot sector; `Ok(None)` when it is not one.
pub(super) fn probe(src: &dyn ReadAt, boot: &[u8; 512]) -> Result<Option<Fat>, FsError> {
    let Some(mut f) = parse_boot(boot) else {
        return Ok(None);
    };
    f.label = f.read_label(src, boot);
    Ok(Some(f))
}

fn parse_boot(b: &[u8; 512]) -> Option<Fat> {
    if !(b[0] == 0xEB || b[0] == 0xE9) || b[510] != 0x55 || b[511] != 0xAA {
        return None;
    }
    let bps = u64::from(le16(b, 0x0B));
    let spc = u64::from(b[0x0D]);
    let reserved = u64::from(le16(b, 0x0E));
    let nfats = u64::from(b[0x10]);
    let root_entries = u64::from(le16(b, 0x11));
    let media = b[0x15];
    if ![512, 1024, 2048, 4096].contains(&bps)
        || spc == 0
        || !spc.is_power_of_two()
        || reserved == 0
        || nfats == 0
        || !(media == 0xF0 || media >= 0xF8)
    {
        return None;
    }
    let tot16 = u64::from(le16(b, 0x13));
    let total_sectors = if tot16 != 0 {
        tot16
    } else {
        u64::from(le32(b, 0x20))
    };
    let fat16_size = u64::from(le16(b, 0x16));
    let fat_sectors = if fat16_size != 0 {
        fat16_size
    } else {
        u64::from(le32(b, 0x24))
    };
    if total_sectors == 0 || fat_sectors == 0 {
        return None;
    }
    let root_dir_sectors = (root_entries * 32).div_ceil(bps);
    let meta_sectors = reserved + nfats * fat_sectors + root_dir_sectors;
    if meta_sectors >= total_sectors {
        return None;
    }
    let clusters = (total_sectors - meta_sectors) / spc;
    let kind = if clusters < 4085 {
        Kind::Fat12
    } else if clusters < 65525 {
        Kind::Fat16
    } else {
        Kind::Fat32
    };
    let is32 = kind == Kind::Fat32;
    if is32 && (fat16_size != 0 || root_entries != 0) {
        return None;
    }
    // The table must be able to describe every cluster.
    let entries_fit = match kind {
        Kind::Fat12 => fat_sectors * bps * 2 / 3,
        Kind::Fat16 => fat_sectors * bps / 2,
        Kind::Fat32 => fat_sectors * bps / 4,
    };
    if entries_fit < clusters + 2 {
        return None;
    }
    let ext = if is32 { 0x40 } else { 0x24 };
    let ext_sig = b[ext + 2];
    let has_ext = ext_sig == 0x29 || ext_sig == 0x28;
    let ext_flags = le16(b, 0x28);
    // FAT32: with mirroring disabled (bit 7), bits 0-3 name the active FAT.
    let active_fat = if is32 && ext_flags & 0x80 != 0 {
        u64::from(ext_flags & 0x0F)
    } else {
        0
    };
    if active_fat >= nfats {
        return None;
    }
    Some(Fat {
        kind,
        bps,
        spc,
        reserved,
        nfats,
        root_dir_sectors,
        fat_sectors,
        total_sectors,
        clusters,
        active_fat,
        root_cluster: if is32 { le32(b, 0x2C) } else { 0 },
        state_byte: b[ext + 1],
        serial: has_ext.then(|| le32(b, ext + 3)),
        label: has_ext
            .then(|| label_from_bytes(&b[ext + 7..ext + 18]))
            .flatten(),
    })
}

/// An 11-byte FAT label, or `None` for blank / `NO NAME`.
fn label_from_bytes(raw: &[u8]) -> Option<String> {
    let mut raw = raw.to_vec();
    if raw.first() == Some(&0x05) {
        raw[0] = 0xE5;
    }
    // Latin-1 is as good a guess as any for an OEM code page.
    let s: String = raw.iter().map(|&c| char::from(c)).collect();
    let s = trim_label(&s);
    (!s.is_empty() && s != "NO NAME").then_some(s)
}

impl Fat {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn cluster_bytes(&self) -> u64 {
        self.spc * self.bps
    }

    fn fat_offset(&self, copy: u64) -> u64 {
        (self.reserved + copy * self.fat_sectors) * self.bps
    }

    fn data_offset(&self) -> u64 {
        (self.reserved + self.nfats * self.fat_sectors + self.root_dir_sectors) * self.bps
    }

    /// Manifest metadata.
    pub(super) fn meta(&self) -> FsMeta {
        FsMeta {
            fstype: self.name().to_string(),
            label: self.label.clone(),
            uuid: self.serial.map(super::other::format_serial),
            block_size: u32::try_from(self.cluster_bytes()).ok(),
            fs_size: Some(self.total_sectors * self.bps),
        }
    }

    /// The volume label as blkid reports it: the root directory's
    /// volume-label entry, else the boot sector's.
    fn read_label(&self, src: &dyn ReadAt, boot: &[u8; 512]) -> Option<String> {
        let from_boot = parse_boot(boot).and_then(|f| f.label);
        self.root_dir_label(src).unwrap_or(from_boot)
    }

    /// `Some(label or None)` when the root directory could be read.
    fn root_dir_label(&self, src: &dyn ReadAt) -> Option<Option<String>> {
        let cb = self.cluster_bytes();
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        if self.kind == Kind::Fat32 {
            // Follow the root directory's chain for a few clusters.
            let mut c = u64::from(self.root_cluster);
            for _ in 0..16 {
                if c < 2 || c >= self.clusters + 2 {
                    break;
                }
                pieces.push((self.data_offset() + (c - 2) * cb, cb));
                let mut e = [0u8; 4];
                src.read_exact_at(&mut e, self.fat_offset(self.active_fat) + 4 * c)
                    .ok()?;
                c = u64::from(u32::from_le_bytes(e) & 0x0FFF_FFFF);
            }
        } else {
            let at = (self.reserved + self.nfats * self.fat_sectors) * self.bps;
            pieces.push((at, self.root_dir_sectors * self.bps));
        }
        for (at, len) in pieces {
            let mut buf = vec![0u8; usize::try_from(len.min(1 << 20)).ok()?];
            src.read_exact_at(&mut buf, at).ok()?;
            for e in buf.chunks_exact(32) {
                if e[0] == 0 {
                    return Some(None);
                }
                let attr = e[11];
                if e[0] != 0xE5 && attr != 0x0F && attr & 0x08 != 0 && attr & 0x10 == 0 {
                    return Some(label_from_bytes(&e[..11]));
                }
            }
        }
        Some(None)
    }

    /// The bytes of the directory whose first cluster is `cluster` (0: the
    /// root directory), at most [`MAX_DIR_BYTES`].
    fn read_dir(&self, src: &dyn ReadAt, cluster: u32) -> Result<Vec<u8>, FsError> {
        if cluster == 0 && self.kind != Kind::Fat32 {
            let at = (self.reserved + self.nfats * self.fat_sectors) * self.bps;
            let mut out = vec![0u8; usize::try_from(self.root_dir_sectors * self.bps).unwrap_or(0)];
            src.read_exact_at(&mut out, at)?;
            return Ok(out);
        }
        let cb = self.cluster_bytes();
        let mut c = if cluster == 0 {
            u64::from(self.root_cluster)
        } else {
            u64::from(cluster)
        };
        let mut out = Vec::new();
        while c >= 2 && c < self.clusters + 2 {
            if out.len() as u64 + cb > MAX_DIR_BYTES {
                return Err(FsError::Corrupt {
                    fs: self.name(),
                    why: format!("a directory chain longer than {MAX_DIR_BYTES} bytes (a loop?)"),
                });
            }
            let start = out.len();
            out.resize(start + cb as usize, 0);
            src.read_exact_at(&mut out[start..], self.data_offset() + (c - 2) * cb)?;
            c = self.next_cluster(src, c)?;
        }
        Ok(out)
    }

    /// The FAT entry of cluster `c` (the next cluster of its chain).
    fn next_cluster(&self, src: &dyn ReadAt, c: u64) -> Result<u64, FsError> {
        let base = self.fat_offset(self.active_fat);
        let mut b = [0u8; 4];
        let v = match self.kind {
            Kind::Fat12 => {
                src.read_exact_at(&mut b[..2], base + c + c / 2)?;
                let v = u16::from_le_bytes([b[0], b[1]]);
                u32::from(if c.is_multiple_of(2) {
                    v & 0x0FFF
                } else {
                    v >> 4
                })
            }
            Kind::Fat16 => {
                src.read_exact_at(&mut b[..2], base + 2 * c)?;
                u32::from(u16::from_le_bytes([b[0], b[1]]))
            }
            Kind::Fat32 => {
                src.read_exact_at(&mut b, base + 4 * c)?;
                u32::from_le_bytes(b) & 0x0FFF_FFFF
            }
        };
        Ok(u64::from(v))
    }

    /// Whether `path` (`\` or `/` separated, from the root, compared
    /// without regard to case, long or 8.3 names) is a regular file.
    fn has_file(&self, src: &dyn ReadAt, path: &str) -> Result<bool, FsError> {
        let parts: Vec<&str> = path.split(['\\', '/']).filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
            return Ok(false);
        }
        let mut dir = 0u32;
        for (i, part) in parts.iter().enumerate() {
            let entries = self.read_dir(src, dir)?;
            let Some((cluster, is_dir)) = lookup(&entries, part) else {
                return Ok(false);
            };
            let last = i + 1 == parts.len();
            if last {
                return Ok(!is_dir);
            }
            if !is_dir || cluster == 0 {
                return Ok(false);
            }
            dir = if self.kind == Kind::Fat32 {
                cluster
            } else {
                cluster & 0xFFFF
            };
        }
        Ok(false)
    }

    /// Builds the used-byte map.
    pub(super) fn used_map(
        &self,
        src: &dyn ReadAt,
        opts: MapOptions,
    ) -> Result<ExtentMap, FsError> {
        let fs = self.name();
        let size = self.total_sectors * self.bps;
        if size > src.size() {
            return Err(FsError::Corrupt {
                fs,
                why: format!(
                    "filesystem spans {size} bytes but the region holds only {}",
                    src.size()
                ),
            });
        }
        let fat_base = self.fat_offset(self.active_fat);
        let entries = self.clusters + 2;
        let entry_bits: u64 = match self.kind {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        };
        if !opts.force && self.kind != Kind::Fat12 {
            let mut why = Vec::new();
            let mut head = [0u8; 8];
            src.read_exact_at(&mut head, fat_base)?;
            let e1 = self.kind.entry(&head, 1).unwrap_or(0);
            let (clean, no_err) = if self.kind == Kind::Fat16 {
                (0x8000, 0x4000)
            } else {
                (0x0800_0000, 0x0400_0000)
            };
            if e1 & clean == 0 {
                why.push("dirty bit set in FAT[1]");
            }
            if e1 & no_err == 0 {
                why.push("hard-error bit set in FAT[1]");
            }
            if self.state_byte & 1 != 0 {
                why.push("dirty flag set in the boot sector");
            }
            if !why.is_empty() {
                return Err(FsError::Unclean {
                    fs,
                    why: why.join(", "),
                });
            }
        }

        let mut map = ExtentMap::new();
        // Reserved sectors, every FAT copy, and the FAT12/16 root directory.
        map.add(0, self.data_offset());
        let data = self.data_offset();
        let cb = self.cluster_bytes();
        let mut run_start: Option<u64> = None;
        let flush = |map: &mut ExtentMap, from: u64, to: u64| {
            map.add(data + (from - 2) * cb, (to - from) * cb);
        };
        // Entries per piece: a multiple of 2 so FAT12 pieces start on a byte.
        let per_piece = (FAT_CHUNK * 8 / entry_bits) & !1;
        let mut buf = Vec::new();
        let mut first = 0u64;
        while first < entries {
            let n = per_piece.min(entries - first);
            let byte_off = first * entry_bits / 8;
            // FAT12: an odd count needs the half byte after it.
            let nbytes = (n * entry_bits).div_ceil(8) + u64::from(self.kind == Kind::Fat12);
            let nbytes = nbytes.min(self.fat_sectors * self.bps - byte_off);
            buf.resize(nbytes as usize, 0);
            src.read_exact_at(&mut buf, fat_base + byte_off)?;
            for i in 0..n {
                let c = first + i;
                if c < 2 {
                    continue;
                }
                let v = self.kind.entry(&buf, i).ok_or_else(|| FsError::Corrupt {
                    fs,
                    why: format!("FAT entry {c} lies outside the table"),
                })?;
                match (self.kind.in_use(v), run_start) {
                    (true, None) => run_start = Some(c),
                    (false, Some(s)) => {
                        flush(&mut map, s, c);
                        run_start = None;
                    }
                    _ => {}
                }
            }
            first += n;
        }
        if let Some(s) = run_start {
            flush(&mut map, s, entries);
        }
        Ok(map)
    }
}

/// Whether `path` names a regular file on the FAT volume at the start of
/// `src`; `Ok(None)` when `src` holds no FAT filesystem.
pub(super) fn has_file(src: &dyn ReadAt, path: &str) -> Result<Option<bool>, FsError> {
    let mut boot = [0u8; 512];
    if src.size() < 512 {
        return Ok(None);
    }
    src.read_exact_at(&mut boot, 0)?;
    match parse_boot(&boot) {
        None => Ok(None),
        Some(f) => f.has_file(src, path).map(Some),
    }
}

/// The 8.3 name of a directory entry as `NAME.EXT` (or `NAME`).
fn short_name(e: &[u8]) -> String {
    let mut raw = e[..11].to_vec();
    if raw[0] == 0x05 {
        raw[0] = 0xE5;
    }
    let text = |b: &[u8]| -> String {
        b.iter()
            .map(|&c| char::from(c))
            .collect::<String>()
            .trim_end()
            .to_owned()
    };
    let (base, ext) = (text(&raw[..8]), text(&raw[8..11]));
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// The checksum of an 8.3 name that its long-name entries carry.
fn short_checksum(name: &[u8]) -> u8 {
    name[..11].iter().fold(0u8, |sum, &b| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b)
    })
}

/// Offsets of the 13 UCS-2 characters in a long-name entry.
const LFN_CHARS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

/// Finds `name` (long or 8.3, any case) among directory entries: its
/// first cluster and whether it is a directory.
fn lookup(entries: &[u8], name: &str) -> Option<(u32, bool)> {
    let want = name.to_lowercase();
    let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
    let mut lfn_sum = None;
    for e in entries.chunks_exact(32) {
        if e[0] == 0 {
            break;
        }
        if e[0] == 0xE5 {
            lfn.clear();
            continue;
        }
        let attr = e[11];
        if attr & 0x3F == 0x0F {
            if e[0] & 0x40 != 0 {
                lfn.clear();
            }
            lfn_sum = Some(e[13]);
            let mut units = [0u16; 13];
            for (u, &o) in units.iter_mut().zip(LFN_CHARS.iter()) {
                *u = le16(e, o);
            }
            lfn.push((e[0] & 0x1F, units));
            continue;
        }
        let long = if !lfn.is_empty() && lfn_sum == Some(short_checksum(e)) {
            lfn.sort_by_key(|(ord, _)| *ord);
            let units: Vec<u16> = lfn
                .iter()
                .flat_map(|(_, u)| u.iter().copied())
                .take_while(|&u| u != 0 && u != 0xFFFF)
                .collect();
            Some(String::from_utf16_lossy(&units))
        } else {
            None
        };
        lfn.clear();
        if attr & 0x08 != 0 {
            continue;
        }
        let hit =
            short_name(e).to_lowercase() == want || long.is_some_and(|l| l.to_lowercase() == want);
        if hit {
            let cluster = (u32::from(le16(e, 20)) << 16) | u32::from(le16(e, 26));
            return Some((cluster, attr & 0x10 != 0));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat12_entries_are_packed_three_bytes_per_pair() {
        // Entries 0..4 = 0xFF8, 0xFFF, 0x003, 0xFF7 (bad).
        // Pair (0,1): 0xF8 0xFF 0xFF; pair (2,3): 0x03 0x70 0xFF.
        let fat = [0xF8, 0xFF, 0xFF, 0x03, 0x70, 0xFF];
        let k = Kind::Fat12;
        assert_eq!(k.entry(&fat, 0), Some(0xFF8));
        assert_eq!(k.entry(&fat, 1), Some(0xFFF));
        assert_eq!(k.entry(&fat, 2), Some(0x003));
        assert_eq!(k.entry(&fat, 3), Some(0xFF7));
        assert!(k.in_use(0x003));
        assert!(!k.in_use(0xFF7), "bad cluster marker is not data");
        assert!(!k.in_use(0));
        assert_eq!(k.entry(&fat, 4), None);
    }

    #[test]
    fn fat32_entries_ignore_the_top_four_bits() {
        let mut fat = vec![0u8; 16];
        fat[8..12].copy_from_slice(&0xF000_0000u32.to_le_bytes()); // free, high bits set
        fat[12..16].copy_from_slice(&0xFFFF_FFF7u32.to_le_bytes()); // bad
        let k = Kind::Fat32;
        assert_eq!(k.entry(&fat, 2), Some(0));
        assert!(!k.in_use(k.entry(&fat, 2).expect("entry")));
        assert!(!k.in_use(k.entry(&fat, 3).expect("entry")));
        assert!(Kind::Fat16.in_use(0xFFFF));
        assert!(!Kind::Fat16.in_use(0xFFF7));
    }

    fn boot(total: u16, spc: u8, fat_size: u16, root_entries: u16) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0] = 0xEB;
        b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
        b[0x0D] = spc;
        b[0x0E..0x10].copy_from_slice(&1u16.to_le_bytes());
        b[0x10] = 2;
        b[0x11..0x13].copy_from_slice(&root_entries.to_le_bytes());
        b[0x13..0x15].copy_from_slice(&total.to_le_bytes());
        b[0x15] = 0xF8;
        b[0x16..0x18].copy_from_slice(&fat_size.to_le_bytes());
        b[0x26] = 0x29;
        b[0x27..0x2B].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
        b[0x2B..0x36].copy_from_slice(b"LABEL      ");
        b[0x36..0x3E].copy_from_slice(b"FAT16   "); // lies: ignored
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    #[test]
    fn type_follows_cluster_count_not_the_type_string() {
        // 4084 clusters of 1 sector: FAT12 even though the string says FAT16.
        let meta = 1 + 2 * 12 + 32;
        let f = parse_boot(&boot(meta + 4084, 1, 12, 512)).expect("fat");
        assert_eq!(f.clusters, 4084);
        assert_eq!(f.kind, Kind::Fat12);
        let meta = 1 + 2 * 16 + 32;
        let f = parse_boot(&boot(meta + 4085, 1, 16, 512)).expect("fat");
        assert_eq!(f.kind, Kind::Fat16);
        assert_eq!(f.meta().uuid.as_deref(), Some("DEAD-BEEF"));
        assert_eq!(f.meta().label.as_deref(), Some("LABEL"));
        // A table too small for the cluster count is not FAT.
        assert!(parse_boot(&boot(meta + 8000, 1, 2, 512)).is_none());
    }
}
