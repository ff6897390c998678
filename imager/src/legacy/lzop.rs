//! The `.lzo` container written by `lzop`, and an LZO1X decompressor.
//!
//! Container layout (all integers big-endian), from lzop's file format:
//!
//! ```text
//! magic 89 4C 5A 4F 00 0D 0A 1A 0A
//! u16 version, u16 library version, [u16 version needed  if version >= 0x0940]
//! u8 method (1..=3: LZO1X variants), [u8 level  if version >= 0x0940]
//! u32 flags, [u32 filter  if F_H_FILTER]
//! u32 mode, u32 mtime low, [u32 mtime high  if version >= 0x0940]
//! u8 name length, name
//! u32 header checksum (Adler-32, or CRC-32 with F_H_CRC32, of everything
//!     from the version field up to here)
//! blocks: u32 uncompressed length (0 ends the stream), u32 compressed
//!     length, [u32 Adler-32 / CRC-32 of the uncompressed data per flags],
//!     [u32 Adler-32 / CRC-32 of the compressed data, only when compressed
//!     length < uncompressed length], data (stored as is when the lengths are
//!     equal, LZO1X otherwise)
//! ```
//!
//! The LZO1X decompressor below is written from the format's description
//! (instruction encoding M1-M4 and literal runs); every read and copy is
//! bounds checked, so corrupt input is an error, never a panic.
//!
//! Bounds: a block's lengths are at most 64 MiB (lzop's own limit) with the
//! compressed length at most the uncompressed one; compressed bytes are
//! read as they arrive and the decompressor never produces more than the
//! stated length; the file name is at most 255 bytes.

use std::io::{self, Read};

pub(super) const MAGIC: [u8; 9] = [0x89, 0x4C, 0x5A, 0x4F, 0x00, 0x0D, 0x0A, 0x1A, 0x0A];

const F_ADLER32_D: u32 = 0x1;
const F_ADLER32_C: u32 = 0x2;
const F_H_EXTRA_FIELD: u32 = 0x40;
const F_CRC32_D: u32 = 0x100;
const F_CRC32_C: u32 = 0x200;
const F_MULTIPART: u32 = 0x400;
const F_H_FILTER: u32 = 0x800;
const F_H_CRC32: u32 = 0x1000;

/// lzop never writes blocks larger than this; refuse larger ones.
const MAX_BLOCK: usize = 64 << 20;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("lzop: {}", msg.into()))
}

/// Adler-32 (RFC 1950).
pub(crate) fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 is the largest n with 255 n (n + 1) / 2 + (n + 1) (MOD - 1) < 2^32.
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Reads a `.lzo` stream and yields the decompressed bytes, verifying the
/// header and block checksums.
pub(super) struct LzopReader<R: Read> {
    inner: R,
    flags: u32,
    /// Decompressed block being handed out.
    out: Vec<u8>,
    pos: usize,
    /// Compressed input scratch.
    cbuf: Vec<u8>,
    done: bool,
}

fn read_u8<R: Read>(r: &mut R, hdr: &mut Vec<u8>) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    hdr.extend_from_slice(&b);
    Ok(b[0])
}

fn read_be16<R: Read>(r: &mut R, hdr: &mut Vec<u8>) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    hdr.extend_from_slice(&b);
    Ok(u16::from_be_bytes(b))
}

fn read_be32<R: Read>(r: &mut R, hdr: &mut Vec<u8>) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    hdr.extend_from_slice(&b);
    Ok(u32::from_be_bytes(b))
}

impl<R: Read> LzopReader<R> {
    /// Parses the header (the magic included) and checks its checksum.
    pub(super) fn new(mut inner: R) -> io::Result<Self> {
        let mut magic = [0u8; 9];
        inner.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(bad("bad magic"));
        }
        let mut h = Vec::with_capacity(64);
        let version = read_be16(&mut inner, &mut h)?;
        let _lib = read_be16(&mut inner, &mut h)?;
        if version >= 0x0940 {
            let needed = read_be16(&mut inner, &mut h)?;
            if needed > 0x1040 {
                return Err(bad(format!("needs lzop version {needed:#x}")));
            }
        }
        let method = read_u8(&mut inner, &mut h)?;
        if !(1..=3).contains(&method) {
            return Err(bad(format!("unsupported method {method}")));
        }
        if version >= 0x0940 {
            read_u8(&mut inner, &mut h)?;
        }
        let flags = read_be32(&mut inner, &mut h)?;
        if flags & (F_H_FILTER | F_MULTIPART | F_H_EXTRA_FIELD) != 0 {
            return Err(bad(format!("unsupported header flags {flags:#x}")));
        }
        let _mode = read_be32(&mut inner, &mut h)?;
        let _mtime = read_be32(&mut inner, &mut h)?;
        if version >= 0x0940 {
            read_be32(&mut inner, &mut h)?;
        }
        let name_len = read_u8(&mut inner, &mut h)?;
        let mut name = vec![0u8; usize::from(name_len)];
        inner.read_exact(&mut name)?;
        h.extend_from_slice(&name);
        let mut c = [0u8; 4];
        inner.read_exact(&mut c)?;
        let want = u32::from_be_bytes(c);
        let got = if flags & F_H_CRC32 != 0 {
            crc32fast::hash(&h)
        } else {
            adler32(&h)
        };
        if want != got {
            return Err(bad("header checksum mismatch"));
        }
        Ok(LzopReader {
            inner,
            flags,
            out: Vec::new(),
            pos: 0,
            cbuf: Vec::new(),
            done: false,
        })
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.inner.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Decodes the next block into `self.out`; false at the end marker.
    fn next_block(&mut self) -> io::Result<bool> {
        let ulen = self.read_u32()? as usize;
        if ulen == 0 {
            return Ok(false);
        }
        let clen = self.read_u32()? as usize;
        if ulen > MAX_BLOCK || clen > ulen {
            return Err(bad(format!("block of {clen} -> {ulen} bytes")));
        }
        let d_adler = if self.flags & F_ADLER32_D != 0 {
            Some(self.read_u32()?)
        } else {
            None
        };
        let d_crc = if self.flags & F_CRC32_D != 0 {
            Some(self.read_u32()?)
        } else {
            None
        };
        let compressed = clen < ulen;
        let (mut c_adler, mut c_crc) = (None, None);
        if compressed {
            if self.flags & F_ADLER32_C != 0 {
                c_adler = Some(self.read_u32()?);
            }
            if self.flags & F_CRC32_C != 0 {
                c_crc = Some(self.read_u32()?);
            }
        }
        // Read as it arrives: a block header alone cannot make us allocate
        // its 64 MiB.
        self.cbuf.clear();
        (&mut self.inner)
            .take(clen as u64)
            .read_to_end(&mut self.cbuf)?;
        if self.cbuf.len() != clen {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("lzop: block of {clen} bytes cut after {}", self.cbuf.len()),
            ));
        }
        if c_adler.is_some_and(|v| v != adler32(&self.cbuf))
            || c_crc.is_some_and(|v| v != crc32fast::hash(&self.cbuf))
        {
            return Err(bad("compressed block checksum mismatch"));
        }
        self.out.clear();
        if compressed {
            lzo1x_decompress(&self.cbuf, &mut self.out, ulen).map_err(|e| bad(e.to_string()))?;
            if self.out.len() != ulen {
                return Err(bad(format!(
                    "block decompressed to {} bytes, {ulen} expected",
                    self.out.len()
                )));
            }
        } else {
            self.out.extend_from_slice(&self.cbuf);
        }
        if d_adler.is_some_and(|v| v != adler32(&self.out))
            || d_crc.is_some_and(|v| v != crc32fast::hash(&self.out))
        {
            return Err(bad("block checksum mismatch"));
        }
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for LzopReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if !self.next_block()? {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Why LZO1X data could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum LzoError {
    /// The input ended inside an instruction.
    #[error("lzo1x: input overrun")]
    InputOverrun,
    /// The output would exceed the expected size.
    #[error("lzo1x: output overrun")]
    OutputOverrun,
    /// A match refers to bytes before the start of the output.
    #[error("lzo1x: match distance {0} beyond the output")]
    LookBehind(usize),
}

/// Bounds-checked input cursor.
struct Input<'a> {
    src: &'a [u8],
    ip: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Result<u8, LzoError> {
        let b = *self.src.get(self.ip).ok_or(LzoError::InputOverrun)?;
        self.ip += 1;
        Ok(b)
    }
    fn le16(&mut self) -> Result<usize, LzoError> {
        let lo = self.byte()?;
        let hi = self.byte()?;
        Ok(usize::from(u16::from_le_bytes([lo, hi])))
    }
    /// An extended length: zero bytes count 255 each, then a non-zero byte.
    fn ext_len(&mut self) -> Result<usize, LzoError> {
        let mut n = 0usize;
        loop {
            let b = self.byte()?;
            if b != 0 {
                return Ok(n + usize::from(b));
            }
            n = n.checked_add(255).ok_or(LzoError::InputOverrun)?;
        }
    }
    fn literals(&mut self, n: usize, out: &mut Vec<u8>, max: usize) -> Result<(), LzoError> {
        let s = self
            .src
            .get(self.ip..self.ip + n)
            .ok_or(LzoError::InputOverrun)?;
        if out.len() + n > max {
            return Err(LzoError::OutputOverrun);
        }
        out.extend_from_slice(s);
        self.ip += n;
        Ok(())
    }
}

fn copy_match(out: &mut Vec<u8>, dist: usize, len: usize, max: usize) -> Result<(), LzoError> {
    if dist == 0 || dist > out.len() {
        return Err(LzoError::LookBehind(dist));
    }
    if out.len() + len > max {
        return Err(LzoError::OutputOverrun);
    }
    let start = out.len() - dist;
    if dist >= len {
        out.extend_from_within(start..start + len);
    } else {
        // Overlapping copy: byte by byte repeats the pattern.
        for i in 0..len {
            let b = out[start + i];
            out.push(b);
        }
    }
    Ok(())
}

/// Decompresses one LZO1X block into `out` (appending), producing at most
/// `max` bytes in total.
pub(crate) fn lzo1x_decompress(src: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), LzoError> {
    let mut inp = Input { src, ip: 0 };
    // `state`: literals copied by the previous instruction (0-3), or 4 after
    // a literal run of 4 or more; it changes how codes 0-15 read.
    let mut state: usize = 0;
    if let Some(&first) = src.first() {
        if first > 17 {
            inp.ip = 1;
            let n = usize::from(first - 17);
            inp.literals(n, out, max)?;
            state = if n < 4 { n } else { 4 };
        }
    }
    loop {
        let t = usize::from(inp.byte()?);
        let (dist, len);
        if t >= 64 {
            // M2: 3-8 bytes within 2 KiB.
            len = (t >> 5) + 1;
            dist = (usize::from(inp.byte()?) << 3) + ((t >> 2) & 7) + 1;
            state = t & 3;
        } else if t >= 32 {
            // M3: within 16 KiB.
            len = if t & 31 == 0 {
                31 + inp.ext_len()? + 2
            } else {
                (t & 31) + 2
            };
            let d = inp.le16()?;
            dist = (d >> 2) + 1;
            state = d & 3;
        } else if t >= 16 {
            // M4: 16-48 KiB, or the end marker.
            len = if t & 7 == 0 {
                7 + inp.ext_len()? + 2
            } else {
                (t & 7) + 2
            };
            let d = inp.le16()?;
            let far = ((t & 8) << 11) + (d >> 2);
            if far == 0 {
                return Ok(());
            }
            dist = 16384 + far;
            state = d & 3;
        } else if state == 0 {
            // Literal run of 4 or more.
            let n = if t == 0 {
                15 + inp.ext_len()? + 3
            } else {
                t + 3
            };
            inp.literals(n, out, max)?;
            state = 4;
            continue;
        } else if state < 4 {
            // M1: 2 bytes within 1 KiB.
            len = 2;
            dist = (t >> 2) + (usize::from(inp.byte()?) << 2) + 1;
            state = t & 3;
        } else {
            // M1 after a long literal run: 3 bytes at 2-3 KiB.
            len = 3;
            dist = (t >> 2) + (usize::from(inp.byte()?) << 2) + 2049;
            state = t & 3;
        }
        copy_match(out, dist, len, max)?;
        inp.literals(state, out, max)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_matches_known_values() {
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        let big = vec![0xffu8; 100_000];
        // Reference computed the slow way.
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(adler32(&big), ((b << 16) | a) as u32);
    }

    #[test]
    fn lzo1x_decodes_literals_matches_and_overlapping_copies() {
        // Initial literal run "abcd" (21 = 17 + 4), then M2 copying 4 bytes
        // from distance 4 with 0 trailing literals: t = 0b011_000_00 (len 4,
        // D = 0), H = 0 -> dist 1? Use D so that dist = 4: D = 3, H = 0.
        let m2 = 0b0110_0000 | (3 << 2);
        // Then an M2 with distance 1 and length 5 (overlap): t = 0b100_000_00.
        let m2b = 0b1000_0000;
        let src = [21, b'a', b'b', b'c', b'd', m2, 0, m2b, 0, 0x11, 0, 0];
        let mut out = Vec::new();
        lzo1x_decompress(&src, &mut out, 100).expect("valid stream");
        assert_eq!(out, b"abcdabcdddddd");
    }

    #[test]
    fn lzo1x_rejects_bad_distances_overruns_and_missing_end() {
        let mut out = Vec::new();
        // One literal, then a match reaching two bytes back.
        assert_eq!(
            lzo1x_decompress(&[18, b'x', 0x44, 0x00], &mut out, 100),
            Err(LzoError::LookBehind(2))
        );
        // Literals past the input.
        out.clear();
        assert_eq!(
            lzo1x_decompress(&[30, b'a'], &mut out, 100),
            Err(LzoError::InputOverrun)
        );
        // Output limit.
        out.clear();
        assert_eq!(
            lzo1x_decompress(&[22, 1, 2, 3, 4, 5], &mut out, 3),
            Err(LzoError::OutputOverrun)
        );
        // No end marker.
        out.clear();
        assert_eq!(
            lzo1x_decompress(&[18, b'a'], &mut out, 100),
            Err(LzoError::InputOverrun)
        );
    }
}
