//! Filesystem detection and used-block maps.
//!
//! `probe` recognises a filesystem by its superblock or boot sector and, when
//! asked, walks the filesystem's own allocation structures to produce the
//! byte ranges in use (an [`ExtentMap`] relative to the start of the region).
//! Anything the walker does not understand is an error, never a silent guess:
//! the caller decides whether to fall back to raw mode.

use serde::{Deserialize, Serialize};

use crate::device::ReadAt;
use crate::extent::ExtentMap;

pub(crate) mod bits;
mod ext;
mod fat;
mod ntfs;
mod other;

/// What was recognised, as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsMeta {
    /// `ext2`, `ext3`, `ext4`, `fat12`, `fat16`, `fat32`, `ntfs`, `xfs`, `swap`, …
    #[serde(rename = "type")]
    pub fstype: String,
    /// Volume label, when the filesystem has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Volume UUID or serial, in the form blkid prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Allocation unit in bytes (block or cluster size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Size the filesystem says it spans, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_size: Option<u64>,
}

/// A recognised filesystem with its used-byte map.
#[derive(Debug, Clone)]
pub struct FsMap {
    /// Type, label, UUID.
    pub meta: FsMeta,
    /// Byte ranges in use, relative to the start of the region.
    pub used: ExtentMap,
}

/// Options for [`used_map`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MapOptions {
    /// Image a filesystem even when it is marked unclean or fails a sanity
    /// check.
    pub force: bool,
}

/// Errors from detection and map building.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Reading the source failed.
    #[error("reading the filesystem")]
    Io(#[from] std::io::Error),
    /// A feature the walker does not implement (e.g. ext4 bigalloc).
    #[error("{fs}: unsupported feature: {feature}")]
    Unsupported {
        /// Filesystem type.
        fs: &'static str,
        /// What is not supported.
        feature: String,
    },
    /// The filesystem was not cleanly unmounted (or has errors recorded).
    #[error("{fs}: filesystem is not clean ({why}); run its checker or force")]
    Unclean {
        /// Filesystem type.
        fs: &'static str,
        /// Why it is considered unclean.
        why: String,
    },
    /// On-disk structures are inconsistent.
    #[error("{fs}: corrupt: {why}")]
    Corrupt {
        /// Filesystem type.
        fs: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The walkers and detectors known to [`detect`] / [`used_map`].
enum Found {
    Ext(ext::Super),
    Fat(fat::Fat),
    Ntfs(ntfs::Ntfs),
    /// Recognised, but there is no walker for it.
    DetectOnly(FsMeta),
    /// Linux swap: only the header page matters.
    Swap(FsMeta, u64),
}

fn probe(src: &dyn ReadAt) -> Result<Option<Found>, FsError> {
    if let Some(s) = ext::probe(src)? {
        return Ok(Some(Found::Ext(s)));
    }
    let mut boot = [0u8; 512];
    if src.size() >= 512 {
        src.read_exact_at(&mut boot, 0)?;
        if let Some(n) = ntfs::probe(src, &boot)? {
            return Ok(Some(Found::Ntfs(n)));
        }
        if let Some(mut m) = other::exfat(&boot) {
            m.label = other::exfat_label(src, &boot);
            return Ok(Some(Found::DetectOnly(m)));
        }
        if let Some(f) = fat::probe(src, &boot)? {
            return Ok(Some(Found::Fat(f)));
        }
    }
    if let Some(m) = other::xfs(src)? {
        return Ok(Some(Found::DetectOnly(m)));
    }
    if let Some(m) = other::btrfs(src)? {
        return Ok(Some(Found::DetectOnly(m)));
    }
    if let Some((m, header)) = other::swap(src)? {
        return Ok(Some(Found::Swap(m, header)));
    }
    Ok(None)
}

/// Recognise the filesystem at the start of `src` (type, label, UUID only).
/// `Ok(None)` when nothing is recognised.
///
/// Recognised: ext2/ext3/ext4 (and `jbd`, an external ext journal), FAT12,
/// FAT16, FAT32 (by cluster count, as the Microsoft specification defines
/// it), NTFS, exFAT, XFS, btrfs and Linux swap.
pub fn detect(src: &dyn ReadAt) -> Result<Option<FsMeta>, FsError> {
    Ok(match probe(src)? {
        None => None,
        Some(Found::Ext(s)) => Some(s.meta()),
        Some(Found::Fat(f)) => Some(f.meta()),
        Some(Found::Ntfs(n)) => Some(n.meta(src)?),
        Some(Found::DetectOnly(m)) | Some(Found::Swap(m, _)) => Some(m),
    })
}

/// Recognise the filesystem and build its used-byte map. `Ok(None)` when
/// nothing is recognised (the caller falls back to raw mode with a warning).
///
/// Walkers exist for ext2/3/4, FAT12/16/32 and NTFS. Linux swap maps to its
/// header page only (the rest of a swap area is never needed after a
/// reboot). Other recognised filesystems (XFS, btrfs, exFAT) return
/// [`FsError::Unsupported`] so the caller chooses raw mode on purpose.
pub fn used_map(src: &dyn ReadAt, opts: MapOptions) -> Result<Option<FsMap>, FsError> {
    let Some(found) = probe(src)? else {
        return Ok(None);
    };
    let (meta, used) = match found {
        Found::Ext(s) => (s.meta(), s.used_map(src, opts)?),
        Found::Fat(f) => (f.meta(), f.used_map(src, opts)?),
        Found::Ntfs(n) => n.used_map(src, opts)?,
        Found::Swap(m, header) => (m, ExtentMap::full(header.min(src.size()))),
        Found::DetectOnly(m) => {
            return Err(FsError::Unsupported {
                fs: other::static_name(&m.fstype),
                feature: "no used-block walker for this filesystem".into(),
            })
        }
    };
    Ok(Some(FsMap { meta, used }))
}

/// Whether `path` (from the root, `\\` or `/` separated, any case, long
/// or 8.3 names) is a regular file on the FAT volume at the start of `src`
/// (e.g. a boot loader on an EFI system partition). `Ok(None)` when `src`
/// holds no FAT filesystem.
pub fn fat_has_file(src: &dyn ReadAt, path: &str) -> Result<Option<bool>, FsError> {
    fat::has_file(src, path)
}

/// Entry points for the fuzz targets: one walker each, whatever the other
/// probes would say. Each returns the used map it built, if any.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    fn check(src: &dyn ReadAt, used: &ExtentMap) {
        assert!(
            used.end() <= src.size(),
            "a used map ending at {} past a region of {} bytes",
            used.end(),
            src.size()
        );
    }

    /// The ext2/3/4 walker.
    pub fn ext(src: &dyn ReadAt) {
        if let Ok(Some(s)) = ext::probe(src) {
            let _ = s.meta();
            for force in [false, true] {
                if let Ok(m) = s.used_map(src, MapOptions { force }) {
                    check(src, &m);
                }
            }
        }
    }

    fn boot(src: &dyn ReadAt) -> Option<[u8; 512]> {
        let mut b = [0u8; 512];
        src.read_exact_at(&mut b, 0).ok().map(|()| b)
    }

    /// The FAT walker.
    pub fn fat(src: &dyn ReadAt) {
        let Some(b) = boot(src) else { return };
        if let Ok(Some(f)) = fat::probe(src, &b) {
            let _ = f.meta();
            for force in [false, true] {
                if let Ok(m) = f.used_map(src, MapOptions { force }) {
                    check(src, &m);
                }
            }
        }
    }

    /// The NTFS walker.
    pub fn ntfs(src: &dyn ReadAt) {
        let Some(b) = boot(src) else { return };
        if let Ok(Some(n)) = ntfs::probe(src, &b) {
            let _ = n.meta(src);
            for force in [false, true] {
                if let Ok((_, m)) = n.used_map(src, MapOptions { force }) {
                    check(src, &m);
                }
            }
        }
        // And whatever the probes in order make of it.
        let _ = detect(src);
    }
}

/// Little-endian `u16` at `o`; 0 when out of range (callers check sizes).
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |x| u16::from_le_bytes([x[0], x[1]]))
}

/// Little-endian `u32` at `o`; 0 when out of range.
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// Little-endian `u64` at `o`; 0 when out of range.
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).map_or(0, |x| {
        let mut a = [0u8; 8];
        a.copy_from_slice(x);
        u64::from_le_bytes(a)
    })
}

/// The bytes before the first NUL.
pub(crate) fn until_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// Labels as blkid shows them: surrounding blanks removed.
pub(crate) fn trim_label(s: &str) -> String {
    s.trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_string()
}
