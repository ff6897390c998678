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

/// Recognise the filesystem at the start of `src` (type, label, UUID only).
/// `Ok(None)` when nothing is recognised.
pub fn detect(src: &dyn ReadAt) -> Result<Option<FsMeta>, FsError> {
    let _ = src;
    Ok(None)
}

/// Recognise the filesystem and build its used-byte map. `Ok(None)` when
/// nothing is recognised (the caller falls back to raw mode with a warning).
pub fn used_map(src: &dyn ReadAt, opts: MapOptions) -> Result<Option<FsMap>, FsError> {
    let _ = (src, opts);
    Ok(None)
}
