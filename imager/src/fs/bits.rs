//! Bitmap scanning shared by the walkers (and by legacy partclone images).
//!
//! ext2/3/4 block bitmaps, the NTFS `$Bitmap` and partclone's stored bitmap
//! all number bits least-significant first inside each byte, so bit `i` is
//! `bytes[i / 8] >> (i % 8) & 1`. Reading eight bytes as a little-endian
//! `u64` keeps that numbering, which lets the scanner skip all-zero and
//! all-one words at once and find run boundaries with `trailing_zeros` /
//! `trailing_ones` instead of testing bit by bit.

/// Calls `run(first_bit, count)` for every maximal run of set bits among
/// the first `nbits` bits of `bitmap`, in ascending order. Bits at or past
/// `nbits` (and past the end of `bitmap`) are treated as clear.
pub fn for_each_set_run(bitmap: &[u8], nbits: u64, mut run: impl FnMut(u64, u64)) {
    let nbits = nbits.min(bitmap.len() as u64 * 8);
    let mut start: Option<u64> = None;
    let mut pos: u64 = 0;
    while pos < nbits {
        // Load the next (up to) 64 bits at `pos` (always byte aligned).
        let byte = (pos / 8) as usize;
        let avail = (nbits - pos).min(64);
        let mut word_bytes = [0u8; 8];
        let take = bitmap.len().saturating_sub(byte).min(8);
        word_bytes[..take].copy_from_slice(&bitmap[byte..byte + take]);
        let mut word = u64::from_le_bytes(word_bytes);
        if avail < 64 {
            word &= (1u64 << avail) - 1;
        }
        if start.is_none() && word == 0 {
            pos += avail;
            continue;
        }
        if start.is_some() && avail == 64 && word == u64::MAX {
            pos += 64;
            continue;
        }
        // Walk the boundaries inside this word.
        let mut bit: u32 = 0;
        let avail32 = avail as u32;
        while bit < avail32 {
            let rest = word >> bit;
            match start {
                None => {
                    if rest == 0 {
                        break;
                    }
                    let z = rest.trailing_zeros();
                    bit += z;
                    start = Some(pos + u64::from(bit));
                }
                Some(s) => {
                    let ones = rest.trailing_ones().min(avail32 - bit);
                    bit += ones;
                    if bit < avail32 {
                        run(s, pos + u64::from(bit) - s);
                        start = None;
                    }
                }
            }
        }
        pos += avail;
    }
    if let Some(s) = start {
        run(s, nbits - s);
    }
}

/// The first maximal run of set bits starting at or after bit `from`
/// among the first `nbits` bits, as `(first_bit, count)`; `None` when no
/// bit from `from` on is set. Lets a caller walk the runs of a large bitmap
/// one at a time, without collecting them.
pub fn next_set_run(bitmap: &[u8], nbits: u64, from: u64) -> Option<(u64, u64)> {
    let nbits = nbits.min(bitmap.len() as u64 * 8);
    let start = find_bit(bitmap, nbits, from, true)?;
    let end = find_bit(bitmap, nbits, start, false).unwrap_or(nbits);
    Some((start, end - start))
}

/// The first bit at or after `from` and below `nbits` whose value is
/// `set`. Whole aligned 64-bit words are skipped at once.
fn find_bit(bitmap: &[u8], nbits: u64, from: u64, set: bool) -> Option<u64> {
    let mut i = from;
    while i < nbits {
        if i.is_multiple_of(64) && i + 64 <= nbits {
            let byte = (i / 8) as usize;
            let mut w = [0u8; 8];
            w.copy_from_slice(&bitmap[byte..byte + 8]);
            let w = u64::from_le_bytes(w);
            let w = if set { w } else { !w };
            if w == 0 {
                i += 64;
                continue;
            }
            return Some(i + u64::from(w.trailing_zeros()));
        }
        if (bitmap[(i / 8) as usize] >> (i % 8)) & 1 == u8::from(set) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Number of set bits among the first `nbits` bits.
pub fn count_set(bitmap: &[u8], nbits: u64) -> u64 {
    let mut n = 0;
    for_each_set_run(bitmap, nbits, |_, c| n += c);
    n
}

/// Sets bit `i` (LSB-first numbering); out-of-range bits are ignored.
pub fn set_bit(bitmap: &mut [u8], i: u64) {
    if let Some(b) = usize::try_from(i / 8).ok().and_then(|j| bitmap.get_mut(j)) {
        *b |= 1 << (i % 8);
    }
}

/// Tests bit `i` (LSB-first numbering); out-of-range bits read as clear.
#[cfg(test)]
pub fn test_bit(bitmap: &[u8], i: u64) -> bool {
    usize::try_from(i / 8)
        .ok()
        .and_then(|j| bitmap.get(j))
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Sets bits `[first, first + count)`.
pub fn set_range(bitmap: &mut [u8], first: u64, count: u64) {
    for i in first..first.saturating_add(count).min(bitmap.len() as u64 * 8) {
        set_bit(bitmap, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(bm: &[u8], n: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for_each_set_run(bm, n, |s, c| v.push((s, c)));
        v
    }

    /// Reference: bit by bit.
    fn slow_runs(bm: &[u8], n: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for i in 0..n.min(bm.len() as u64 * 8) {
            if test_bit(bm, i) {
                match v.last_mut() {
                    Some((s, c)) if *s + *c == i => *c += 1,
                    _ => v.push((i, 1)),
                }
            }
        }
        v
    }

    #[test]
    fn lsb_first_numbering_and_runs_within_a_byte() {
        // 0b0110_0101: bits 0, 2, 5, 6.
        assert_eq!(runs(&[0b0110_0101], 8), vec![(0, 1), (2, 1), (5, 2)]);
    }

    #[test]
    fn runs_cross_word_boundaries_and_full_words_are_merged() {
        let mut bm = vec![0u8; 40];
        set_range(&mut bm, 60, 200); // spans several full words
        set_range(&mut bm, 300, 1);
        assert_eq!(runs(&bm, 320), vec![(60, 200), (300, 1)]);
    }

    #[test]
    fn nbits_limit_clips_the_last_run_and_ignores_padding() {
        let bm = vec![0xffu8; 4];
        assert_eq!(runs(&bm, 13), vec![(0, 13)]);
        assert_eq!(runs(&bm, 1000), vec![(0, 32)]);
        assert_eq!(count_set(&bm, 13), 13);
    }

    #[test]
    fn word_scanner_matches_bit_by_bit_reference_on_pseudo_random_maps() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [1usize, 7, 8, 9, 63, 64, 65, 200, 1031] {
            let mut bm = vec![0u8; len];
            for b in bm.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mix sparse, dense and runs of full bytes.
                *b = match x % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => (x >> 8) as u8,
                };
            }
            for n in [len as u64 * 8, (len as u64 * 8).saturating_sub(3), 5] {
                assert_eq!(runs(&bm, n), slow_runs(&bm, n), "len {len} nbits {n}");
                // Walking run by run finds the same runs.
                let mut walked = Vec::new();
                let mut at = 0;
                while let Some((s, c)) = next_set_run(&bm, n, at) {
                    walked.push((s, c));
                    at = s + c;
                }
                assert_eq!(walked, slow_runs(&bm, n), "walk: len {len} nbits {n}");
            }
        }
    }
}
