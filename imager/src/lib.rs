//! `aula-imager`: the imaging engine of Aula.
//!
//! An image is a JSON manifest plus content-addressed chunks (see
//! `FORMAT.md`). This crate reads sources and writes targets (files, block
//! devices, partitions addressed by byte range), builds used-extent maps from
//! filesystems, and runs the create / restore / verify pipelines against a
//! repository (a local directory or an HTTP service).

#![deny(missing_docs)]

pub mod chunk;
pub mod crashsafe;
pub mod create;
pub mod device;
pub mod disk;
pub mod disk_image;
pub mod error;
pub mod extent;
pub mod fs;
pub mod image;
pub mod import;
mod ioctl;
/// Inode flags of open files (what `lsattr` / `chattr` read and set),
/// through the crate's one ioctl module.
pub mod inode_flags {
    pub use crate::ioctl::{file_flags, set_file_flags, FS_IMMUTABLE_FL};
}
pub mod legacy;
pub mod manifest;
pub mod pool;
pub mod progress;
pub mod record;
pub mod repo;
pub mod restore;
pub mod sha256x2;
pub mod swarm;
pub mod table;
pub mod tls;
pub mod verify;

pub use error::{Error, Result};

/// Entry points of the fuzz targets (`imager/fuzz`), also replayed on the
/// committed corpora by `tests/fuzz_corpus.rs`. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::device::ReadAt;

    /// A region made of the input followed by zeros: the first byte says
    /// how large (4 KiB << (b % 15), at least the input), so a small input
    /// can describe a filesystem of up to 64 MiB whose tail is empty.
    pub struct Sparse<'a> {
        data: &'a [u8],
        size: u64,
    }

    impl<'a> Sparse<'a> {
        /// Split the input into its size byte and contents.
        pub fn new(input: &'a [u8]) -> Sparse<'a> {
            let (code, data) = match input.split_first() {
                Some((c, d)) => (*c, d),
                None => (0, input),
            };
            let size = (4096u64 << (code % 15)).max(data.len() as u64);
            Sparse { data, size }
        }
    }

    impl ReadAt for Sparse<'_> {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let end = offset
                .checked_add(buf.len() as u64)
                .filter(|&e| e <= self.size)
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")
                })?;
            buf.fill(0);
            let len = self.data.len() as u64;
            if offset < len {
                let n = (end.min(len) - offset) as usize;
                buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
            }
            Ok(())
        }
        fn size(&self) -> u64 {
            self.size
        }
    }

    /// The hostile volumes of issue 15, made from real ones: tests of the
    /// CLI and the agent feed them to the inventory and to create.
    pub mod craft {
        fn le16(b: &[u8], o: usize) -> usize {
            usize::from(u16::from_le_bytes([b[o], b[o + 1]]))
        }
        fn le32(b: &[u8], o: usize) -> usize {
            u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize
        }

        /// Turn the `$DATA` of `$MFT` (record 0) of an NTFS volume made by
        /// `mkntfs` into an `$ATTRIBUTE_LIST` of 2^44 bytes: the volume that
        /// made `aula-imager disks` abort with a 16 TiB allocation.
        pub fn ntfs_huge_attribute_list(vol: &mut [u8]) {
            let cluster = le16(vol, 0x0B) * usize::from(vol[0x0D]);
            let mft = u64::from_le_bytes(vol[0x30..0x38].try_into().expect("8 bytes")) as usize;
            let rec = mft * cluster;
            assert_eq!(&vol[rec..rec + 4], b"FILE", "an mkntfs volume");
            let mut pos = rec + le16(vol, rec + 0x14);
            loop {
                let (ty, len) = (le32(vol, pos), le32(vol, pos + 4));
                assert!(ty != 0xFFFF_FFFF && len != 0, "no $DATA in record 0");
                if ty == 0x80 {
                    vol[pos..pos + 4].copy_from_slice(&0x20u32.to_le_bytes());
                    vol[pos + 0x30..pos + 0x38].copy_from_slice(&(1u64 << 44).to_le_bytes());
                    return;
                }
                pos += len;
            }
        }

        /// Give an ext2/3/4 volume `blocks_per_group` blocks per group (below
        /// 256 the descriptor table of a large volume grows to GiBs).
        pub fn ext_blocks_per_group(vol: &mut [u8], blocks_per_group: u32) {
            assert_eq!(
                &vol[1024 + 0x38..1024 + 0x3A],
                &[0x53, 0xEF],
                "an ext volume"
            );
            vol[1024 + 0x20..1024 + 0x24].copy_from_slice(&blocks_per_group.to_le_bytes());
        }
    }

    /// ext2/3/4 walker.
    pub fn fs_ext(input: &[u8]) {
        crate::fs::fuzzing::ext(&Sparse::new(input));
    }
    /// FAT walker.
    pub fn fs_fat(input: &[u8]) {
        crate::fs::fuzzing::fat(&Sparse::new(input));
    }
    /// NTFS walker.
    pub fn fs_ntfs(input: &[u8]) {
        crate::fs::fuzzing::ntfs(&Sparse::new(input));
    }
    /// GPT.
    pub fn table_gpt(input: &[u8]) {
        crate::table::fuzzing::gpt(&Sparse::new(input));
    }
    /// MBR and extended boot records.
    pub fn table_mbr(input: &[u8]) {
        crate::table::fuzzing::mbr(&Sparse::new(input));
    }
    /// partclone header, bitmap and stream (any compression).
    pub fn partclone(input: &[u8]) {
        crate::legacy::fuzzing::partclone(input);
    }
    /// lzop container and LZO1X.
    pub fn lzop(input: &[u8]) {
        crate::legacy::fuzzing::lzop(input);
    }
    /// Manifest parse and validation, and what restore derives from it.
    pub fn manifest(input: &[u8]) {
        let Ok(m) = crate::manifest::Manifest::from_json(input, "fuzz") else {
            return;
        };
        let _ = m.unique_chunks();
        let _ = m.total_used_bytes();
        for c in &m.chunks {
            let (start, len) = m.window(c.index);
            assert!(start + len <= m.source_size);
            let _ = m.used.window(start, len);
        }
        let plan = crate::crashsafe::Plan::new(&m, m.source_size);
        assert_eq!(plan.held.len() + plan.rest.len(), m.chunks.len());
        let _ = m.to_json();
    }
}
