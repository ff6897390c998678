//! Used-extent maps: which byte ranges of a source hold data.
//!
//! Every image records one of these. Raw mode uses a single extent covering
//! the whole source; the filesystem walkers (`crate::fs`) produce the map from
//! the filesystem's own allocation structures. Offsets are bytes relative to
//! the start of the imaged region (a partition or a whole disk).

use serde::{Deserialize, Serialize};

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
            .filter(|&(_, l)| l > 0)
            .map(|(start, len)| Extent { start, len })
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
        ExtentMap { extents: out }
    }

    /// Append a range. Ranges added in ascending order are merged in O(1);
    /// out-of-order additions fall back to a full re-normalisation.
    pub fn add(&mut self, start: u64, len: u64) {
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
