//! Chunk ids and the per-chunk codec: SHA-256 of the content, one
//! independent zstd frame per chunk.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// SHA-256 of a chunk's uncompressed content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hash some content.
    pub fn of(content: &[u8]) -> ChunkId {
        ChunkId(crate::sha256x2::one(content))
    }

    /// Hash two contents at once: where the CPU has the SHA extensions,
    /// about twice as fast as one after the other (see [`crate::sha256x2`]).
    pub fn of_pair(a: &[u8], b: &[u8]) -> (ChunkId, ChunkId) {
        let (x, y) = crate::sha256x2::pair(a, b);
        (ChunkId(x), ChunkId(y))
    }

    /// Lower-case hex form.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.hex())
    }
}

impl FromStr for ChunkId {
    type Err = Error;
    fn from_str(s: &str) -> Result<ChunkId> {
        let bad = || {
            Error::Invalid(format!(
                "invalid chunk id {s:?}: expected 64 lower-case hex digits"
            ))
        };
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).map_err(|_| bad())?;
        Ok(ChunkId(id))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// BLAKE3 of a chunk's uncompressed content: a second, much faster digest
/// used only to decide whether a target already holds a chunk (the delta
/// check hashes the whole target, so its speed matters most there). Fetched
/// data is always verified against the SHA-256 id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint some content.
    pub fn of(content: &[u8]) -> Fingerprint {
        Fingerprint(*blake3::hash(content).as_bytes())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(self.0))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<ChunkId>()
            .map(|c| Fingerprint(c.0))
            .map_err(serde::de::Error::custom)
    }
}

/// The SHA-256 id and the BLAKE3 fingerprint of `content`, hashed together
/// a piece at a time so that each piece is read from memory once and found
/// in the core's cache by the second hash (a window is larger than the
/// cache; hashing it twice in a row read it from memory twice).
pub fn id_and_fingerprint(content: &[u8]) -> (ChunkId, Fingerprint) {
    const PIECE: usize = 256 << 10;
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut b3 = blake3::Hasher::new();
    for piece in content.chunks(PIECE) {
        sha.update(piece);
        b3.update(piece);
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(sha.finish().as_ref());
    (ChunkId(id), Fingerprint(*b3.finalize().as_bytes()))
}

/// True when every byte is zero (vectorises well).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u8 → u64 has no invalid bit patterns; align_to only yields
        // properly aligned u64s inside the slice.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body
            .chunks(64)
            .all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}

/// Compresses chunks; one per worker thread (keeps its zstd context).
pub struct Encoder {
    cx: zstd::bulk::Compressor<'static>,
}

impl Encoder {
    /// A compressor at `level`.
    pub fn new(level: i32) -> Result<Encoder> {
        let mut cx = zstd::bulk::Compressor::new(level).map_err(|e| Error::Io {
            what: "creating the zstd compressor".into(),
            source: e,
        })?;
        // The SHA-256 of the content is checked on restore; zstd's own
        // XXH64 would only cost time.
        let _ = cx.include_checksum(false);
        let _ = cx.include_contentsize(true);
        Ok(Encoder { cx })
    }

    /// Compress `content` into `out` (cleared first).
    pub fn encode(&mut self, content: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(content.len()));
        self.cx
            .compress_to_buffer(content, out)
            .map_err(|e| Error::Io {
                what: "compressing a chunk".into(),
                source: e,
            })?;
        Ok(())
    }
}

/// Decompresses and verifies chunks; one per worker thread.
pub struct Decoder {
    dx: zstd::bulk::Decompressor<'static>,
}

/// Largest zstd window a chunk may ask for (chunks are at most 64 MiB, and
/// compressors never need a window larger than the content).
const MAX_WINDOW_LOG: u32 = 27;

impl Decoder {
    /// A decompressor with a bounded window.
    pub fn new() -> Result<Decoder> {
        let mut dx = zstd::bulk::Decompressor::new().map_err(|e| Error::Io {
            what: "creating the zstd decompressor".into(),
            source: e,
        })?;
        dx.window_log_max(MAX_WINDOW_LOG).map_err(|e| Error::Io {
            what: "limiting the zstd window".into(),
            source: e,
        })?;
        Ok(Decoder { dx })
    }

    /// Decompress `frame` into `out`, which must come out exactly
    /// `expected_len` bytes long and hash to `id`. Nothing is trusted until
    /// this returns Ok.
    pub fn decode_verified(
        &mut self,
        id: &ChunkId,
        frame: &[u8],
        expected_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        out.reserve(expected_len);
        // Capacity bounds the output: a frame claiming more fails here.
        let n = self
            .dx
            .decompress_to_buffer(frame, &mut Spare(out, expected_len))
            .map_err(|e| Error::ChunkCorrupt {
                id: *id,
                why: format!("does not decompress: {e}"),
            })?;
        check_len(id, n, expected_len)?;
        check_id(id, &ChunkId::of(out))
    }

    /// Decompress `frame` into all of `out` (the window's exact length),
    /// which must be filled exactly and hash to `id`: the same checks as
    /// [`Decoder::decode_verified`], into a buffer the caller owns (a
    /// page-aligned one goes to the disk with `O_DIRECT` without a copy).
    pub fn decode_verified_into(
        &mut self,
        id: &ChunkId,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        self.decode_into(id, frame, out)?;
        check_id(id, &ChunkId::of(out))
    }

    /// Decompress `frame` into all of `out`, which it must fill exactly,
    /// **without** hashing it: the caller must check the content against
    /// `id` (with [`check_id`]) before trusting it. For callers that hash
    /// two chunks together ([`ChunkId::of_pair`]).
    pub fn decode_into(&mut self, id: &ChunkId, frame: &[u8], out: &mut [u8]) -> Result<()> {
        // The slice's length bounds the output: a frame claiming more fails.
        let n = self
            .dx
            .decompress_to_buffer(frame, out)
            .map_err(|e| Error::ChunkCorrupt {
                id: *id,
                why: format!("does not decompress: {e}"),
            })?;
        check_len(id, n, out.len())
    }
}

/// Chunk `id` decompressed to `n` bytes: an error unless that is the
/// window's `expected` length.
fn check_len(id: &ChunkId, n: usize, expected: usize) -> Result<()> {
    if n != expected {
        return Err(Error::ChunkCorrupt {
            id: *id,
            why: format!("decompressed to {n} bytes, expected {expected}"),
        });
    }
    Ok(())
}

/// Content that should be chunk `id` hashed to `got`: an error unless
/// they are equal.
pub fn check_id(id: &ChunkId, got: &ChunkId) -> Result<()> {
    if got != id {
        return Err(Error::ChunkCorrupt {
            id: *id,
            why: format!("content hashes to {got}"),
        });
    }
    Ok(())
}

/// A `WriteBuf` over a Vec limited to `limit` bytes of capacity.
struct Spare<'a>(&'a mut Vec<u8>, usize);

// SAFETY: the buffer pointer and capacity describe memory owned by the Vec
// (at least `limit` bytes reserved by the caller), and `filled_until` only
// sets the length to a value the decompressor reports as initialised.
unsafe impl zstd::zstd_safe::WriteBuf for Spare<'_> {
    fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }
    fn capacity(&self) -> usize {
        self.1.min(self.0.capacity())
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller (zstd) guarantees the first n bytes are initialised
        // and n <= capacity().
        unsafe { self.0.set_len(n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_parses_and_prints_hex() {
        let id = ChunkId::of(b"hello");
        assert_eq!(
            id.hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(id.hex().parse::<ChunkId>().expect("parse"), id);
        assert!(
            "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824"
                .parse::<ChunkId>()
                .is_err()
        );
        assert!("../etc/passwd".parse::<ChunkId>().is_err());
    }

    #[test]
    fn zero_detection_handles_unaligned_edges() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v[1..]));
    }

    #[test]
    fn codec_round_trips_and_rejects_wrong_length_or_hash() {
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id = ChunkId::of(&content);
        let mut enc = Encoder::new(3).expect("enc");
        let mut frame = Vec::new();
        enc.encode(&content, &mut frame).expect("encode");
        assert!(frame.len() < content.len());
        let mut dec = Decoder::new().expect("dec");
        let mut out = Vec::new();
        dec.decode_verified(&id, &frame, content.len(), &mut out)
            .expect("decode");
        assert_eq!(out, content);
        // Claiming a shorter length: the output does not fit.
        assert!(matches!(
            dec.decode_verified(&id, &frame, 1000, &mut out),
            Err(Error::ChunkCorrupt { .. })
        ));
        // Wrong id.
        let other = ChunkId::of(b"other");
        assert!(matches!(
            dec.decode_verified(&other, &frame, content.len(), &mut out),
            Err(Error::ChunkCorrupt { .. })
        ));
        // Flipped byte in the frame.
        let mut bad = frame.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        assert!(dec
            .decode_verified(&id, &bad, content.len(), &mut out)
            .is_err());
        // Truncated frame.
        assert!(dec
            .decode_verified(&id, &frame[..frame.len() / 2], content.len(), &mut out)
            .is_err());
    }

    #[test]
    fn hashing_in_pieces_gives_the_whole_content_digests() {
        // Longer than a piece and not a multiple of one.
        let content: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 253) as u8).collect();
        let (id, fp) = id_and_fingerprint(&content);
        assert_eq!(id, ChunkId::of(&content));
        assert_eq!(fp, Fingerprint::of(&content));
        assert_eq!(id_and_fingerprint(b"").0, ChunkId::of(b""));
    }

    #[test]
    fn decoding_into_a_slice_needs_exactly_its_length_and_the_right_hash() {
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id = ChunkId::of(&content);
        let mut frame = Vec::new();
        Encoder::new(2)
            .expect("enc")
            .encode(&content, &mut frame)
            .expect("encode");
        let mut dec = Decoder::new().expect("dec");
        let mut out = vec![0u8; content.len()];
        dec.decode_verified_into(&id, &frame, &mut out)
            .expect("decode");
        assert_eq!(out, content);
        // A window shorter than the content: the frame does not fit.
        let mut short = vec![0u8; content.len() - 1];
        assert!(matches!(
            dec.decode_verified_into(&id, &frame, &mut short),
            Err(Error::ChunkCorrupt { .. })
        ));
        // A longer window: the frame does not fill it.
        let mut long = vec![0u8; content.len() + 1];
        let err = dec
            .decode_verified_into(&id, &frame, &mut long)
            .expect_err("short content");
        assert!(err.to_string().contains("expected 100001"), "{err}");
        // The right length, another id.
        assert!(matches!(
            dec.decode_verified_into(&ChunkId::of(b"other"), &frame, &mut out),
            Err(Error::ChunkCorrupt { .. })
        ));
    }
}
