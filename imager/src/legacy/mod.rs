//! Legacy images: partclone streams (as stored by Clonezilla, FOG and
//! OpenGnsys), restored onto a partition.
//!
//! A partclone image in format `0002` (partclone 0.3.x) is one sequential
//! stream, usually compressed as a whole by an external tool:
//!
//! ```text
//! header    110 bytes, little-endian:
//!           magic "partclone-image\0" (16) | partclone version (14) |
//!           "0002" (4) | 0xC0DE (2) | filesystem (16) | device size (8) |
//!           total blocks (8) | used blocks, superblock (8) |
//!           used blocks, bitmap (8) | block size (4) | feature size (4) |
//!           image version (2) | CPU bits (2) | checksum mode (2) |
//!           checksum size (2) | blocks per checksum (4) | reseed (1) |
//!           bitmap mode (1) | CRC32 of the preceding 106 bytes (4)
//! bitmap    ceil(total blocks / 8) bytes, bit i (LSB first) = block i used,
//!           then its CRC32 (4)
//! blocks    the used blocks in ascending order; with checksums, a checksum
//!           follows every `blocks per checksum` blocks and the final
//!           partial group ("strip")
//! ```
//!
//! partclone's CRC32 is the usual reflected CRC-32 (polynomial 0xEDB88320)
//! started from `0xFFFFFFFF` but *without* the final inversion, i.e. the
//! bitwise NOT of the standard CRC-32. With the reseed flag every strip's
//! checksum starts afresh; otherwise it runs on from the previous strip.
//! The stored checksum mode is `0` (none, `-a0`) or `0x20` (CRC32, `-a1`,
//! the default); later partclone versions add xxHash modes, refused here.
//!
//! Compression is recognised by magic: gzip (also multi-member, as pigz
//! writes), zstd (any number of frames), lzop, xz (any number of streams,
//! as pixz/pxz write), lz4 frames, bzip2 (multi-stream, as pbzip2 writes),
//! or none: every compression Clonezilla offers for its part files. [`open`] decodes the
//! header and bitmap; [`PartcloneStream::restore_to`] then streams the
//! blocks to a target region, verifying each strip before writing it.
//! Nothing holds more than a few MiB of the image in memory.
//!
//! # Bounds
//!
//! | value | bound |
//! |---|---|
//! | block size | 1 ..= 64 MiB |
//! | total blocks × block size | no overflow, ≤ the device size the header states; the device size ≤ the target (checked before any write) |
//! | bitmap | ≤ 1 GiB ([`MAX_BITMAP_BYTES`]: 2^33 blocks, 32 TiB at 4 KiB), read in 1 MiB pieces so memory follows the bytes actually present |
//! | strip (blocks per checksum × block size) | ≤ [`MAX_STRIP_BYTES`] (64 MiB), and never more than the used blocks |
//! | bitmap runs | walked one at a time, never collected |
//! | lzop blocks | ≤ 64 MiB (lzop's own limit), read as they arrive |
//! | zstd window | ≤ 2^27 bytes |

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::device::Region;
use crate::extent::ExtentMap;
use crate::fs::bits::{count_set, for_each_set_run, next_set_run};

mod lzop;

/// Length of the format-0002 header.
pub const HEADER_LEN: usize = 110;
const MAGIC: &[u8; 15] = b"partclone-image";
const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
const XZ_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0];
const BZIP2_MAGIC: [u8; 3] = *b"BZh";
/// lz4 frame format (what `lz4` writes by default).
const LZ4_MAGIC: [u8; 4] = [0x04, 0x22, 0x4D, 0x18];
/// lz4's legacy format (`lz4 -l`): not read, refused by name.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4C, 0x18];
/// Largest xz dictionary memory accepted: bounds the decoder on untrusted
/// input (xz -9 needs 65 MiB).
const XZ_MEMLIMIT: u64 = 256 << 20;

/// Checksum mode values stored in the header.
const CSM_NONE: u16 = 0x00;
const CSM_CRC32: u16 = 0x20;
/// Bitmap mode: one bit per block.
const BM_BIT: u8 = 1;

/// Largest zstd window accepted (2^27 = 128 MiB, zstd's `--long` default):
/// bounds the decoder's memory on untrusted input.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Verified data is gathered into writes of up to this size.
const WRITE_BATCH: usize = 4 << 20;
/// Without checksums, blocks are read in strips of about this size.
const NOSUM_STRIP_BYTES: u64 = 1 << 20;
/// Largest checksummed strip held in memory (partclone's default is 1024
/// blocks: 4 MiB at 4 KiB blocks).
pub const MAX_STRIP_BYTES: u64 = 64 << 20;
/// Largest bitmap read.
pub const MAX_BITMAP_BYTES: u64 = 1 << 30;
/// The bitmap is read in pieces of this size.
const BITMAP_PIECE: usize = 1 << 20;

/// Errors from reading or restoring a legacy image.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    /// Reading the image or writing the target failed.
    #[error("i/o")]
    Io(#[from] io::Error),
    /// The stream is not a partclone image (after any decompression).
    #[error("not a partclone image")]
    NotPartclone,
    /// A compression or image variant this reader does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The header or bitmap is malformed or fails its CRC.
    #[error("bad partclone header: {0}")]
    BadHeader(String),
    /// The stream ended early.
    #[error("image truncated: {0}")]
    Truncated(String),
    /// The decompressor rejected the data.
    #[error("decompressing ({compression})")]
    Decompress {
        /// Which decompressor.
        compression: Compression,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// A strip of blocks failed its checksum; it was not written.
    #[error(
        "checksum mismatch in strip {strip} (blocks from {first_block}); the strip was not written"
    )]
    Checksum {
        /// Strip index (0-based).
        strip: u64,
        /// First block number of the strip.
        first_block: u64,
    },
    /// The target cannot hold the image's device.
    #[error("target region of {have} bytes is smaller than the image's device ({need} bytes)")]
    TargetTooSmall {
        /// Device size recorded in the image.
        need: u64,
        /// Size of the target region.
        have: u64,
    },
    /// Cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

/// How the stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain partclone stream.
    None,
    /// gzip / pigz.
    Gzip,
    /// zstd.
    Zstd,
    /// lzop.
    Lzop,
    /// xz (also several streams in a row).
    Xz,
    /// lz4 frames.
    Lz4,
    /// bzip2 (also several streams in a row).
    Bzip2,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Lzop => "lzop",
            Compression::Xz => "xz",
            Compression::Lz4 => "lz4",
            Compression::Bzip2 => "bzip2",
        })
    }
}

/// Recognises the container of a legacy image from its first bytes.
/// `Some` for a plain partclone header or a gzip, zstd or lzop stream (what
/// is inside a compressed stream is only known once decompressed: see
/// [`looks_like_partclone`]).
pub fn sniff_compression(first: &[u8]) -> Option<Compression> {
    if first.starts_with(MAGIC) {
        Some(Compression::None)
    } else if first.starts_with(&GZIP_MAGIC) {
        Some(Compression::Gzip)
    } else if first.starts_with(&ZSTD_MAGIC) {
        Some(Compression::Zstd)
    } else if first.starts_with(&lzop::MAGIC) {
        Some(Compression::Lzop)
    } else if first.starts_with(&XZ_MAGIC) {
        Some(Compression::Xz)
    } else if first.starts_with(&LZ4_MAGIC) {
        Some(Compression::Lz4)
    } else if first.len() >= 4
        && first.starts_with(&BZIP2_MAGIC)
        && (b'1'..=b'9').contains(&first[3])
    {
        Some(Compression::Bzip2)
    } else {
        None
    }
}

/// True when `first` (the first bytes of a file; 256 KiB is plenty) is a
/// partclone image, plain or compressed with gzip, zstd or lzop: the prefix
/// is decompressed far enough to see partclone's magic.
pub fn looks_like_partclone(first: &[u8]) -> bool {
    let Some(c) = sniff_compression(first) else {
        return false;
    };
    let Ok(mut r) = decoder(c, Box::new(io::Cursor::new(first.to_vec()))) else {
        return false;
    };
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(MAGIC)
}

fn decoder(c: Compression, r: Box<dyn Read + Send>) -> io::Result<Box<dyn Read + Send>> {
    Ok(match c {
        Compression::None => r,
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(1 << 20, r),
        )),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(r)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        Compression::Lzop => Box::new(lzop::LzopReader::new(io::BufReader::with_capacity(
            1 << 20,
            r,
        ))?),
        Compression::Xz => {
            let stream =
                xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, xz2::stream::CONCATENATED)
                    .map_err(io::Error::other)?;
            Box::new(xz2::read::XzDecoder::new_stream(
                io::BufReader::with_capacity(1 << 20, r),
                stream,
            ))
        }
        Compression::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(
            io::BufReader::with_capacity(1 << 20, r),
        )),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(
            io::BufReader::with_capacity(1 << 20, r),
        )),
    })
}

/// What a partclone image header says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartcloneInfo {
    /// Filesystem as partclone names it (`EXTFS`, `FAT16`, `NTFS`, …).
    pub fs: String,
    /// partclone version that wrote the image.
    pub partclone_version: String,
    /// Size of the source device in bytes.
    pub device_size: u64,
    /// Blocks in the filesystem (bits in the bitmap).
    pub total_blocks: u64,
    /// Used blocks (set bits in the bitmap).
    pub used_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Checksum mode as stored (0 = none, 0x20 = CRC32).
    pub checksum_mode: u16,
    /// Blocks covered by each checksum (0 without checksums).
    pub blocks_per_checksum: u32,
    /// Compression of the stream.
    pub compression: Compression,
}

impl PartcloneInfo {
    /// Bytes of block data the stream carries.
    pub fn used_bytes(&self) -> u64 {
        self.used_blocks * u64::from(self.block_size)
    }
}

/// Counts of a finished restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LegacyStats {
    /// Blocks written.
    pub blocks_written: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Strips whose checksum was verified (0 without checksums).
    pub strips_verified: u64,
}

/// An opened partclone stream: header and bitmap decoded, blocks not yet
/// read.
pub struct PartcloneStream {
    info: PartcloneInfo,
    checksum_size: usize,
    reseed: bool,
    bitmap: Vec<u8>,
    reader: Box<dyn Read + Send>,
    compression: Compression,
}

impl std::fmt::Debug for PartcloneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartcloneStream")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// partclone's CRC32 state update (standard CRC-32 without the final NOT).
fn pc_crc(state: u32, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!state);
    h.update(data);
    !h.finalize()
}

/// Reads exactly `buf.len()` bytes, mapping a short stream to `Truncated`
/// and decompressor failures to `Decompress`.
fn fill(r: &mut dyn Read, buf: &mut [u8], what: &str, c: Compression) -> Result<(), LegacyError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(LegacyError::Truncated(format!(
                    "stream ended {} bytes into the {} bytes of {what}",
                    got,
                    buf.len()
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(LegacyError::Truncated(format!("{what}: {e}")))
            }
            Err(e) if c != Compression::None => {
                return Err(LegacyError::Decompress {
                    compression: c,
                    source: e,
                })
            }
            Err(e) => return Err(LegacyError::Io(e)),
        }
    }
    Ok(())
}

/// Opens a legacy image: sniffs and starts the decompressor, then reads
/// and checks the header and the bitmap.
pub fn open(mut reader: Box<dyn Read + Send>) -> Result<PartcloneStream, LegacyError> {
    // Peek the first bytes, then put them back in front of the stream.
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        let n = reader.read(&mut head[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = head[..got].to_vec();
    let compression = match sniff_compression(&head) {
        Some(c) => c,
        None if head.starts_with(&LZ4_LEGACY_MAGIC) => {
            return Err(LegacyError::Unsupported(
                "lz4 legacy format (lz4 -l); recompress with lz4's default frame format".into(),
            ))
        }
        None => return Err(LegacyError::NotPartclone),
    };
    let chained: Box<dyn Read + Send> = Box::new(io::Cursor::new(head).chain(reader));
    let mut r = decoder(compression, chained).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => LegacyError::Truncated("compressed stream header".into()),
        _ => LegacyError::Decompress {
            compression,
            source: e,
        },
    })?;

    let mut h = [0u8; HEADER_LEN];
    fill(&mut *r, &mut h, "header", compression)?;
    if !h.starts_with(MAGIC) || h[15] != 0 {
        return Err(LegacyError::NotPartclone);
    }
    let version = &h[30..34];
    if version != b"0002" {
        return Err(LegacyError::Unsupported(format!(
            "image format {:?} (only 0002, partclone 0.3 and later)",
            String::from_utf8_lossy(version)
        )));
    }
    let u16at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u32at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64at = |o: usize| u64::from(u32at(o)) | (u64::from(u32at(o + 4)) << 32);
    if u16at(34) != 0xC0DE {
        return Err(LegacyError::Unsupported("big-endian image".into()));
    }
    let want = u32at(106);
    if pc_crc(!0, &h[..106]) != want {
        return Err(LegacyError::BadHeader("header CRC mismatch".into()));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(crate::fs::until_nul(b)).into_owned();
    let fs = text(&h[36..52]);
    let device_size = u64at(52);
    let total_blocks = u64at(60);
    let used_bitmap = u64at(76);
    let block_size = u32at(84);
    let checksum_mode = u16at(96);
    let checksum_size = usize::from(u16at(98));
    let blocks_per_checksum = u32at(100);
    let reseed = h[104] != 0;
    let bitmap_mode = h[105];
    if bitmap_mode != BM_BIT {
        return Err(LegacyError::Unsupported(format!(
            "bitmap mode {bitmap_mode}"
        )));
    }
    match checksum_mode {
        CSM_NONE => {}
        CSM_CRC32 if checksum_size == 4 && blocks_per_checksum > 0 => {}
        CSM_CRC32 => {
            return Err(LegacyError::BadHeader(format!(
                "CRC32 with checksum size {checksum_size} every {blocks_per_checksum} blocks"
            )))
        }
        m => {
            return Err(LegacyError::Unsupported(format!(
                "checksum mode {m:#x} (only none and CRC32)"
            )))
        }
    }
    if block_size == 0 || block_size > (64 << 20) {
        return Err(LegacyError::BadHeader(format!("block size {block_size}")));
    }
    if total_blocks
        .checked_mul(u64::from(block_size))
        .is_none_or(|b| b > device_size)
    {
        return Err(LegacyError::BadHeader(format!(
            "{total_blocks} blocks of {block_size} bytes exceed the device size {device_size}"
        )));
    }
    if checksum_mode == CSM_CRC32
        && u64::from(blocks_per_checksum).saturating_mul(u64::from(block_size)) > MAX_STRIP_BYTES
    {
        return Err(LegacyError::Unsupported(format!(
            "a checksum every {blocks_per_checksum} blocks of {block_size} bytes: strips of more than {MAX_STRIP_BYTES} bytes"
        )));
    }
    let bm_len = usize::try_from(total_blocks.div_ceil(8))
        .ok()
        .filter(|&n| n as u64 <= MAX_BITMAP_BYTES)
        .ok_or_else(|| {
            LegacyError::Unsupported(format!(
                "{total_blocks} blocks (a bitmap of more than {MAX_BITMAP_BYTES} bytes)"
            ))
        })?;
    // Grown as it is read: a header alone cannot make us allocate it.
    let mut bitmap = Vec::new();
    while bitmap.len() < bm_len {
        let at = bitmap.len();
        bitmap.resize(at + BITMAP_PIECE.min(bm_len - at), 0);
        fill(&mut *r, &mut bitmap[at..], "bitmap", compression)?;
    }
    let mut c = [0u8; 4];
    fill(&mut *r, &mut c, "bitmap CRC", compression)?;
    if pc_crc(!0, &bitmap) != u32::from_le_bytes(c) {
        return Err(LegacyError::BadHeader("bitmap CRC mismatch".into()));
    }
    let used_blocks = count_set(&bitmap, total_blocks);
    if used_blocks != used_bitmap {
        return Err(LegacyError::BadHeader(format!(
            "bitmap has {used_blocks} used blocks, header says {used_bitmap}"
        )));
    }
    let info = PartcloneInfo {
        fs,
        partclone_version: text(&h[16..30]),
        device_size,
        total_blocks,
        used_blocks,
        block_size,
        checksum_mode,
        blocks_per_checksum: if checksum_mode == CSM_NONE {
            0
        } else {
            blocks_per_checksum
        },
        compression,
    };
    Ok(PartcloneStream {
        info,
        checksum_size,
        reseed,
        bitmap,
        reader: r,
        compression,
    })
}

/// Gathers verified runs of blocks into large writes.
struct Writer<'a> {
    target: &'a mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    /// Byte offset of `buf[0]` on the target.
    at: u64,
    buf: Vec<u8>,
    written: u64,
    /// Gather into large writes (a device); off, every run is handed on
    /// as it is (a consumer that copies anyway).
    batch: bool,
}

impl Writer<'_> {
    fn put(&mut self, offset: u64, data: &[u8], progress: &mut dyn FnMut(u64)) -> io::Result<()> {
        if !self.batch {
            (self.target)(offset, data)?;
            self.written += data.len() as u64;
            progress(self.written);
            return Ok(());
        }
        if !self.buf.is_empty() && self.at + self.buf.len() as u64 != offset {
            self.flush(progress)?;
        }
        if self.buf.is_empty() && data.len() >= WRITE_BATCH {
            (self.target)(offset, data)?;
            self.written += data.len() as u64;
            progress(self.written);
            return Ok(());
        }
        if self.buf.is_empty() {
            self.at = offset;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_BATCH {
            self.flush(progress)?;
        }
        Ok(())
    }

    fn flush(&mut self, progress: &mut dyn FnMut(u64)) -> io::Result<()> {
        if !self.buf.is_empty() {
            (self.target)(self.at, &self.buf)?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
            progress(self.written);
        }
        Ok(())
    }
}

impl PartcloneStream {
    /// The header's facts.
    pub fn info(&self) -> &PartcloneInfo {
        &self.info
    }

    /// The used byte ranges of the device, from the bitmap.
    pub fn used_map(&self) -> ExtentMap {
        let bs = u64::from(self.info.block_size);
        let mut m = ExtentMap::new();
        for_each_set_run(&self.bitmap, self.info.total_blocks, |s, n| {
            m.add(s * bs, n * bs)
        });
        m
    }

    /// Writes the image's used blocks to `target` at their offsets and syncs
    /// it, in the crash-safe order of [`crate::crashsafe`] (the first write
    /// wipes the partition's signature areas; the image's first and last
    /// 4 KiB are written last). Refuses, before writing anything, a target
    /// smaller than the image's device. Each strip is read whole and its checksum verified
    /// before any of its blocks is written; a strip that fails is not
    /// written and the restore stops with [`LegacyError::Checksum`].
    /// Blocks not in use are left as they are on the target. `on_progress`
    /// receives the bytes written so far; `cancel` is checked between strips.
    pub fn restore_to(
        self,
        target: &Region,
        on_progress: &mut dyn FnMut(u64),
        cancel: &AtomicBool,
    ) -> Result<LegacyStats, LegacyError> {
        // In the crash-safe order of `crashsafe`: the partition's signature
        // areas are wiped before the first write, and the image's own are
        // written last.
        let mut held = crate::crashsafe::Held::new(target, self.info.device_size);
        let mut write = |at: u64, data: &[u8]| held.write(at, data);
        let stats = self.restore_with(target.len(), &mut write, on_progress, cancel)?;
        held.finish()?;
        target.device().sync()?;
        Ok(stats)
    }

    /// [`PartcloneStream::restore_to`] onto any writer of `target_len`
    /// bytes (`write(offset, bytes)`), without the final sync.
    pub fn restore_with(
        self,
        target_len: u64,
        write: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
        on_progress: &mut dyn FnMut(u64),
        cancel: &AtomicBool,
    ) -> Result<LegacyStats, LegacyError> {
        self.blocks(target_len, write, on_progress, cancel, true)
    }

    /// Every verified run of used blocks, in ascending order, handed to
    /// `block(offset, bytes)` straight from the stream's buffer (pieces of
    /// at most one strip). Same checks and errors as
    /// [`PartcloneStream::restore_with`].
    pub fn for_each_block_run(
        self,
        block: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
        on_progress: &mut dyn FnMut(u64),
        cancel: &AtomicBool,
    ) -> Result<LegacyStats, LegacyError> {
        let len = self.info.device_size;
        self.blocks(len, block, on_progress, cancel, false)
    }

    fn blocks(
        mut self,
        target_len: u64,
        write: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
        on_progress: &mut dyn FnMut(u64),
        cancel: &AtomicBool,
        batch: bool,
    ) -> Result<LegacyStats, LegacyError> {
        let need = self.info.device_size;
        if target_len < need {
            return Err(LegacyError::TargetTooSmall {
                need,
                have: target_len,
            });
        }
        let bs = u64::from(self.info.block_size);
        let with_sum = self.info.checksum_mode == CSM_CRC32;
        let per_strip = if with_sum {
            u64::from(self.info.blocks_per_checksum)
        } else {
            (NOSUM_STRIP_BYTES / bs).max(1)
        };
        let total = self.info.total_blocks;
        // The run of used blocks being written, walked one at a time.
        let mut run = next_set_run(&self.bitmap, total, 0);

        let mut writer = Writer {
            target: write,
            at: 0,
            buf: if batch {
                Vec::with_capacity(WRITE_BATCH)
            } else {
                Vec::new()
            },
            written: 0,
            batch,
        };
        // `open` bounds per_strip × bs; a strip never holds more than the
        // used blocks either.
        let mut strip = vec![
            0u8;
            usize::try_from(per_strip.min(self.info.used_blocks) * bs)
                .map_err(|_| LegacyError::Unsupported("strip size".into()))?
        ];
        let mut stats = LegacyStats::default();
        let mut crc_state: u32 = !0;
        let mut in_run = 0u64; // blocks of `run` already consumed
        let mut remaining = self.info.used_blocks;
        let mut strip_no = 0u64;
        let mut sum = vec![0u8; self.checksum_size];
        while remaining > 0 {
            if cancel.load(Ordering::Relaxed) {
                return Err(LegacyError::Cancelled);
            }
            let n = per_strip.min(remaining);
            let data = &mut strip[..(n * bs) as usize];
            let first_block = run.map_or(0, |r| r.0 + in_run);
            fill(
                &mut *self.reader,
                data,
                &format!("strip {strip_no}"),
                self.compression,
            )?;
            if with_sum {
                fill(
                    &mut *self.reader,
                    &mut sum,
                    &format!("checksum of strip {strip_no}"),
                    self.compression,
                )?;
                if self.reseed {
                    crc_state = !0;
                }
                crc_state = pc_crc(crc_state, data);
                if crc_state.to_le_bytes()[..] != sum[..] {
                    return Err(LegacyError::Checksum {
                        strip: strip_no,
                        first_block,
                    });
                }
                stats.strips_verified += 1;
            }
            // Hand the strip's blocks to the writer, run by run.
            let mut off = 0u64;
            let mut left = n;
            while left > 0 {
                let (start, len) =
                    run.ok_or_else(|| LegacyError::BadHeader("bitmap runs exhausted".into()))?;
                let take = (len - in_run).min(left);
                let bytes = &data[(off * bs) as usize..((off + take) * bs) as usize];
                writer.put((start + in_run) * bs, bytes, on_progress)?;
                in_run += take;
                off += take;
                left -= take;
                if in_run == len {
                    run = next_set_run(&self.bitmap, total, start + len);
                    in_run = 0;
                }
            }
            stats.blocks_written += n;
            remaining -= n;
            strip_no += 1;
        }
        writer.flush(on_progress)?;
        stats.bytes_written = writer.written;
        // Let the decompressor check its own trailer (gzip CRC, zstd
        // checksum, lzop end marker).
        let mut tail = [0u8; 4096];
        let mut extra = 0u64;
        loop {
            match self.reader.read(&mut tail) {
                Ok(0) => break,
                Ok(k) => {
                    extra += k as u64;
                    if extra > 1 << 20 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(LegacyError::Truncated(format!(
                        "compressed stream trailer: {e}"
                    )))
                }
                Err(e) => {
                    return Err(LegacyError::Decompress {
                        compression: self.compression,
                        source: e,
                    })
                }
            }
        }
        if extra > 0 {
            tracing::warn!(
                bytes = extra,
                "trailing data after the last partclone block ignored"
            );
        }
        Ok(stats)
    }
}

/// Entry points for the fuzz targets.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Open a partclone image and restore it into memory accounting: every
    /// write must land inside the device the header states.
    pub fn partclone(data: &[u8]) {
        let Ok(s) = open(Box::new(io::Cursor::new(data.to_vec()))) else {
            return;
        };
        let info = s.info().clone();
        let used = s.used_map();
        assert!(used.end() <= info.device_size, "used map past the device");
        let mut written = 0u64;
        let mut write = |at: u64, b: &[u8]| -> io::Result<()> {
            assert!(
                at.checked_add(b.len() as u64)
                    .is_some_and(|e| e <= info.device_size),
                "a write at {at} of {} bytes past the device ({})",
                b.len(),
                info.device_size
            );
            written += b.len() as u64;
            Ok(())
        };
        let cancel = AtomicBool::new(false);
        if let Ok(st) = s.restore_with(info.device_size, &mut write, &mut |_| {}, &cancel) {
            assert_eq!(st.bytes_written, info.used_bytes());
        }
    }

    /// Decode an lzop stream to its end (at most 256 MiB of output).
    pub fn lzop(data: &[u8]) {
        let Ok(mut r) = lzop::LzopReader::new(io::Cursor::new(data)) else {
            return;
        };
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || total > 256 << 20 {
                break;
            }
            total += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partclone_crc_is_the_inverted_standard_crc32() {
        // Standard CRC-32 of "123456789" is 0xCBF43926.
        assert_eq!(pc_crc(!0, b"123456789"), !0xCBF4_3926);
        // Chaining equals one pass.
        let a = pc_crc(!0, b"12345");
        assert_eq!(pc_crc(a, b"6789"), pc_crc(!0, b"123456789"));
    }

    #[test]
    fn sniffing_tells_containers_apart() {
        assert_eq!(
            sniff_compression(b"partclone-image\0..."),
            Some(Compression::None)
        );
        assert_eq!(
            sniff_compression(&[0x1F, 0x8B, 8, 0]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            sniff_compression(&[0x28, 0xB5, 0x2F, 0xFD, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(sniff_compression(&lzop::MAGIC), Some(Compression::Lzop));
        assert_eq!(sniff_compression(b"{\"format\": \"aula-image\"}"), None);
        assert!(!looks_like_partclone(b"{\"format\": \"aula-image\"}"));
        let z = zstd::encode_all(&b"partclone-image\0rest"[..], 1).expect("zstd");
        assert!(looks_like_partclone(&z));
        let z = zstd::encode_all(&b"something else entirely"[..], 1).expect("zstd");
        assert!(!looks_like_partclone(&z));
    }

    #[test]
    fn garbage_is_not_partclone_and_lz4_legacy_is_unsupported() {
        assert!(matches!(
            open(Box::new(&b"hello world, not an image"[..])),
            Err(LegacyError::NotPartclone)
        ));
        let lz4_legacy = [0x02, 0x21, 0x4C, 0x18, 0, 0, 0, 0];
        assert!(matches!(
            open(Box::new(io::Cursor::new(lz4_legacy))),
            Err(LegacyError::Unsupported(m)) if m.contains("lz4 legacy")
        ));
    }

    #[test]
    fn xz_lz4_and_bzip2_wrapped_streams_are_recognised_and_unwrapped() {
        let mut plain = MAGIC.to_vec();
        plain.extend_from_slice(&[0u8; 64]);
        let xz = {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            io::Write::write_all(&mut e, &plain).expect("xz");
            e.finish().expect("xz")
        };
        let lz4 = {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            io::Write::write_all(&mut e, &plain).expect("lz4");
            e.finish().expect("lz4")
        };
        let bz = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            io::Write::write_all(&mut e, &plain).expect("bz2");
            e.finish().expect("bz2")
        };
        for (data, want) in [
            (&xz, Compression::Xz),
            (&lz4, Compression::Lz4),
            (&bz, Compression::Bzip2),
        ] {
            assert_eq!(sniff_compression(data), Some(want));
            assert!(looks_like_partclone(data), "{want}");
        }
        // The same wrappers around something else are not partclone.
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        io::Write::write_all(&mut e, b"not an image at all, just text").expect("xz");
        assert!(!looks_like_partclone(&e.finish().expect("xz")));
    }
}
