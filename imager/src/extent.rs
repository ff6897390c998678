//! Used-extent maps: which byte ranges of a source hold data.
//!
//! Every image records one of these. Raw mode uses a single extent covering
//! the whole source; the filesystem walkers (`crate::fs`) produce the map from
//! the filesystem's own allocation structures. Offsets are bytes relative to
//! the start of the imaged region (a partition or a whole disk).
//!
//! # Bound
//!
//! A map holds at most [`MAX_EXTENTS`] extents. Walkers build maps from
//! allocation bitmaps a student can write, and a bitmap of alternating bits
//! would otherwise make one extent per two blocks (a 1 TiB volume of 4 KiB
//! clusters: 2^27 extents, 2 GiB of memory and a manifest of gigabytes). When
//! a map passes the bound, the smallest gaps are merged
//! ([`ExtentMap::coarsen`]) until it holds half of it: the map then covers
//! a few unused bytes too, which only costs image size (unused bytes are
//! imaged as they are; nothing used is ever dropped). A manifest with more
//! extents is refused when it is read.

use serde::{Deserialize, Serialize};

/// Most extents a map holds (1 Mi: 16 MiB in memory, about 25 MB of
/// manifest JSON). Real filesystems stay far below: a fragmented ext4 map
/// holds tens of thousands.
pub const MAX_EXTENTS: usize = 1 << 20;

/// One used byte range `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// First byte of the range.
    pub start: u64,
    /// Length of the range in bytes (never zero inside a map).
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A sorted list of non-overlapping, non-adjacent extents.
///
/// Serialised as a JSON array of `[start, len]` pairs to keep manifests
/// compact (a fragmented ext4 map can hold tens of thousands of extents).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    extents: Vec<Extent>,
}

impl Serialize for ExtentMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.extents.len()))?;
        for e in &self.extents {
            seq.serialize_element(&[e.start, e.len])?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for ExtentMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs: Vec<[u64; 2]> = Vec::deserialize(d)?;
        if pairs.len() > MAX_EXTENTS {
            return Err(serde::de::Error::custom(format!(
                "{} extents, more than the {MAX_EXTENTS} a map may hold",
                pairs.len()
            )));
        }
        let mut prev_end = 0u64;
        let mut extents = Vec::with_capacity(pairs.len());
        for (i, [start, len]) in pairs.into_iter().enumerate() {
            if len == 0 {
                return Err(serde::de::Error::custom(format!(
                    "extent {i} has zero length"
                )));
            }
            let end = start
                .checked_add(len)
                .ok_or_else(|| serde::de::Error::custom(format!("extent {i} overflows")))?;
            if i > 0 && start <= prev_end {
                return Err(serde::de::Error::custom(format!(
                    "extent {i} is not sorted or overlaps the previous one"
                )));
            }
            prev_end = end;
            extents.push(Extent { start, len });
        }
        Ok(ExtentMap { extents })
    }
}

impl ExtentMap {
    /// An empty map (nothing used).
    pub fn new() -> Self {
        Self::default()
    }

    /// A map covering `[0, len)` entirely (raw mode).
    pub fn full(len: u64) -> Self {
        let mut m = Self::new();
        m.add(0, len);
        m
    }

    /// Build from arbitrary (unsorted, overlapping) ranges.
    pub fn from_ranges<I: IntoIterator<Item = (u64, u64)>>(ranges: I) -> Self {
        let mut v: Vec<Extent> = ranges
            .into_iter()
            .map(|(start, len)| Extent {
                start,
                len: len.min(u64::MAX - start),
            })
            .filter(|e| e.len > 0)
            .collect();
        v.sort_unstable();
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if e.start <= last.end() => {
                    let end = last.end().max(e.end());
                    last.len = end - last.start;
                }
                _ => out.push(e),
            }
        }
        let mut m = ExtentMap { extents: out };
        if m.len() > MAX_EXTENTS {
            m.coarsen(MAX_EXTENTS / 2);
        }
        m
    }

    /// Append a range. Ranges added in ascending order are merged in O(1);
    /// out-of-order additions fall back to a full re-normalisation. A range
    /// running past `u64::MAX` is clipped there. Past `MAX_EXTENTS`
    /// extents the map is coarsened to half of that (see the module doc).
    pub fn add(&mut self, start: u64, len: u64) {
        let len = len.min(u64::MAX - start);
        if len == 0 {
            return;
        }
        match self.extents.last_mut() {
            None => self.extents.push(Extent { start, len }),
            Some(last) if start >= last.start => {
                if start <= last.end() {
                    let end = last.end().max(start + len);
                    last.len = end - last.start;
                } else {
                    self.extents.push(Extent { start, len });
                    if self.extents.len() > MAX_EXTENTS {
                        self.coarsen(MAX_EXTENTS / 2);
                    }
                }
            }
            Some(_) => {
                let mut all: Vec<(u64, u64)> =
                    self.extents.iter().map(|e| (e.start, e.len)).collect();
                all.push((start, len));
                *self = Self::from_ranges(all);
            }
        }
    }

    /// Merge neighbouring extents across the smallest gaps until the map
    /// holds at most `max` extents (at least 1). The result covers every
    /// byte the map covered, plus the bytes of the merged gaps.
    pub fn coarsen(&mut self, max: usize) {
        let max = max.max(1);
        let n = self.extents.len();
        if n <= max {
            return;
        }
        // Keep the `max - 1` largest gaps; merge across every other one.
        let mut gaps: Vec<u64> = self
            .extents
            .windows(2)
            .map(|w| w[1].start - w[0].end())
            .collect();
        let keep = max - 1;
        // The smallest gap that is kept: every larger gap stays, and as many
        // gaps equal to it as the budget allows (first ones first).
        let cut = if keep == 0 {
            u64::MAX
        } else {
            let i = gaps.len() - keep;
            *gaps.select_nth_unstable(i).1
        };
        let mut ties = keep - gaps.iter().filter(|&&g| g > cut).count();
        let mut out: Vec<Extent> = Vec::with_capacity(max);
        for e in self.extents.drain(..) {
            match out.last_mut() {
                Some(last) => {
                    let gap = e.start - last.end();
                    let stays = gap > cut || (gap == cut && ties > 0 && keep > 0);
                    if gap == cut && stays {
                        ties -= 1;
                    }
                    if stays {
                        out.push(e);
                    } else {
                        last.len = e.end() - last.start;
                    }
                }
                None => out.push(e),
            }
        }
        self.extents = out;
    }

    /// The extents, sorted.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// True when nothing is used.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Total used bytes.
    pub fn used_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// One past the last used byte (0 when empty).
    pub fn end(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.end())
    }

    /// Clip the map to `[0, limit)`.
    pub fn clip(&mut self, limit: u64) {
        self.extents.retain(|e| e.start < limit);
        if let Some(last) = self.extents.last_mut() {
            if last.end() > limit {
                last.len = limit - last.start;
            }
        }
    }

    /// Shift every extent by `delta` bytes (used to place a partition's map
    /// inside a disk).
    pub fn shifted(&self, delta: u64) -> ExtentMap {
        ExtentMap {
            extents: self
                .extents
                .iter()
                .map(|e| Extent {
                    start: e.start + delta,
                    len: e.len,
                })
                .collect(),
        }
    }

    /// Union of two maps.
    pub fn union(&self, other: &ExtentMap) -> ExtentMap {
        Self::from_ranges(
            self.extents
                .iter()
                .chain(other.extents.iter())
                .map(|e| (e.start, e.len)),
        )
    }

    /// Index of the first extent that ends after `pos`.
    fn first_ending_after(&self, pos: u64) -> usize {
        self.extents.partition_point(|e| e.end() <= pos)
    }

    /// The used ranges inside the window `[start, start + len)`, clipped to
    /// it, as offsets relative to `start`.
    pub fn window(&self, start: u64, len: u64) -> Vec<(usize, usize)> {
        let end = start + len;
        let mut out = Vec::new();
        for e in &self.extents[self.first_ending_after(start)..] {
            if e.start >= end {
                break;
            }
            let s = e.start.max(start);
            let t = e.end().min(end);
            out.push(((s - start) as usize, (t - start) as usize));
        }
        out
    }

    /// Used bytes inside a window.
    pub fn used_in(&self, start: u64, len: u64) -> u64 {
        self.window(start, len)
            .iter()
            .map(|&(s, e)| (e - s) as u64)
            .sum()
    }

    /// True when any byte of the window is used.
    pub fn touches(&self, start: u64, len: u64) -> bool {
        match self.extents.get(self.first_ending_after(start)) {
            Some(e) => e.start < start + len,
            None => false,
        }
    }

    /// Zero every byte of `buf` (which holds the window starting at
    /// `start`) that is not covered by the map.
    pub fn mask(&self, start: u64, buf: &mut [u8]) {
        let mut pos = 0usize;
        for (s, e) in self.window(start, buf.len() as u64) {
            buf[pos..s].fill(0);
            pos = e;
        }
        buf[pos..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_ranges_merges_overlapping_and_adjacent() {
        let m = ExtentMap::from_ranges([(10, 5), (0, 4), (4, 2), (12, 10), (100, 0)]);
        assert_eq!(
            m.extents(),
            &[Extent { start: 0, len: 6 }, Extent { start: 10, len: 12 }]
        );
        assert_eq!(m.used_bytes(), 18);
        assert_eq!(m.end(), 22);
    }

    #[test]
    fn add_in_order_merges_and_out_of_order_normalises() {
        let mut m = ExtentMap::new();
        m.add(0, 4);
        m.add(4, 4);
        m.add(20, 4);
        m.add(10, 2);
        assert_eq!(m.len(), 3);
        assert_eq!(m.extents()[1], Extent { start: 10, len: 2 });
    }

    #[test]
    fn window_clips_and_mask_zeroes_the_gaps() {
        let m = ExtentMap::from_ranges([(2, 3), (8, 10)]);
        assert_eq!(m.window(0, 10), vec![(2, 5), (8, 10)]);
        assert_eq!(m.window(10, 10), vec![(0, 8)]);
        assert!(!m.touches(18, 100));
        assert!(m.touches(17, 1));
        let mut buf = vec![0xffu8; 10];
        m.mask(0, &mut buf);
        assert_eq!(buf, vec![0, 0, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0xff]);
    }

    #[test]
    fn json_round_trip_and_rejects_overlap() {
        let m = ExtentMap::from_ranges([(0, 4096), (8192, 4096)]);
        let s = serde_json::to_string(&m).expect("serialise");
        assert_eq!(s, "[[0,4096],[8192,4096]]");
        let back: ExtentMap = serde_json::from_str(&s).expect("parse");
        assert_eq!(back, m);
        assert!(serde_json::from_str::<ExtentMap>("[[0,10],[5,10]]").is_err());
        assert!(serde_json::from_str::<ExtentMap>("[[0,0]]").is_err());
        assert!(serde_json::from_str::<ExtentMap>("[[18446744073709551615,2]]").is_err());
    }

    #[test]
    fn coarsening_keeps_every_used_byte_and_the_largest_gaps() {
        // Extents of 1 byte at 0, 10, 12, 100, 103, 1000.
        let mut m =
            ExtentMap::from_ranges([(0, 1), (10, 1), (12, 1), (100, 1), (103, 1), (1000, 1)]);
        let before = m.clone();
        m.coarsen(3);
        assert_eq!(m.len(), 3);
        // The two largest gaps (13..100 and 104..1000) stay.
        assert_eq!(
            m.extents(),
            &[
                Extent { start: 0, len: 13 },
                Extent { start: 100, len: 4 },
                Extent {
                    start: 1000,
                    len: 1
                }
            ]
        );
        for e in before.extents() {
            assert_eq!(m.used_in(e.start, e.len), e.len, "{e:?} still covered");
        }
        m.coarsen(1);
        assert_eq!(
            m.extents(),
            &[Extent {
                start: 0,
                len: 1001
            }]
        );
    }

    #[test]
    fn an_alternating_bitmap_cannot_grow_a_map_past_its_bound() {
        let mut m = ExtentMap::new();
        for i in 0..(2 * MAX_EXTENTS as u64 + 10) {
            m.add(2 * i, 1);
        }
        assert!(m.len() <= MAX_EXTENTS, "{} extents", m.len());
        assert_eq!(m.extents()[0].start, 0);
        assert_eq!(m.end(), 2 * (2 * MAX_EXTENTS as u64 + 9) + 1);
        // A manifest may not carry more.
        let pairs: Vec<String> = (0..=MAX_EXTENTS as u64)
            .map(|i| format!("[{},1]", 2 * i))
            .collect();
        let e = serde_json::from_str::<ExtentMap>(&format!("[{}]", pairs.join(",")))
            .expect_err("too many extents");
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn clip_and_shift() {
        let mut m = ExtentMap::from_ranges([(0, 10), (20, 10)]);
        m.clip(25);
        assert_eq!(m.extents()[1], Extent { start: 20, len: 5 });
        let s = m.shifted(100);
        assert_eq!(s.extents()[0].start, 100);
        let u = m.union(&ExtentMap::from_ranges([(5, 20)]));
        assert_eq!(u.extents(), &[Extent { start: 0, len: 25 }]);
    }
}
