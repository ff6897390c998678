//! NTFS: the used map from the cluster bitmap (`$Bitmap`, MFT record 6).
//!
//! Facts used (NTFS on-disk documentation, e.g. the Linux-NTFS project's
//! "NTFS Documentation"):
//!
//! * The boot sector holds `NTFS    ` at offset 3, bytes per sector (0x0B),
//!   sectors per cluster (0x0D; values above 0x80 mean `2^(256 - v)`), the
//!   volume's sector count (0x28), the MFT's first cluster (0x30), the MFT
//!   record size (0x40: clusters, or `2^-v` bytes when negative) and the
//!   64-bit serial number (0x48). The backup boot sector is the sector right
//!   after the volume (the partition's last sector).
//! * MFT records start with `FILE` and are protected by an update sequence
//!   array: the last two bytes of every 512-byte stride hold the sequence
//!   number and the real bytes are kept in the array ("fixups").
//! * Attributes follow at the record's attribute offset: type, length,
//!   resident flag, name; resident ones carry their value, non-resident ones
//!   a runlist. A runlist entry is a header byte (low nibble = size of the
//!   length field, high nibble = size of the offset field), the run length,
//!   and the run's start as a signed delta from the previous run's start; an
//!   offset field of size 0 is a sparse run. A zero byte ends the list.
//! * A file too fragmented for one record has an `$ATTRIBUTE_LIST` naming
//!   the records holding each piece (by starting VCN).
//! * Record 0 is `$MFT` (its `$DATA` maps the MFT itself), record 3
//!   `$Volume` (label and `$VOLUME_INFORMATION` flags, 0x0001 = dirty),
//!   record 6 `$Bitmap` (one bit per cluster, least-significant first).
//!
//! # Bounds
//!
//! Everything here comes from a disk a student may have written. Before a
//! value sizes an allocation or a loop it is held to:
//!
//! | value | bound | why |
//! |---|---|---|
//! | bytes per sector | 256 ..= 4096, a power of two | what NTFS defines |
//! | cluster size | ≤ 2 MiB ([`MAX_CLUSTER`]) | Windows' largest |
//! | MFT record size | 512 ..= 64 KiB, a power of two | one record buffer |
//! | volume size | sectors × bytes per sector without overflow, ≤ the region | every offset computed from it fits `u64` |
//! | run offsets and lengths | cluster × size without overflow, inside the volume (+ its backup boot sector) | reads stay in the region |
//! | `$ATTRIBUTE_LIST` | ≤ 256 KiB ([`MAX_ATTR_LIST`]) | the 16 TiB allocation a crafted volume asked for; Windows keeps lists far smaller |
//! | runlist, attributes | inside their record | loops end with the record |
//! | `$Bitmap` | read in 1 MiB pieces, `clusters / 8` bytes | proportional to the volume |
//! | used map | [`crate::extent::MAX_EXTENTS`] extents | see `extent` |

use crate::device::ReadAt;
use crate::extent::ExtentMap;

use super::bits::for_each_set_run;
use super::{le16, le32, le64, trim_label, FsError, FsMeta, MapOptions};

const FS: &str = "ntfs";

const AT_VOLUME_NAME: u32 = 0x60;
const AT_VOLUME_INFORMATION: u32 = 0x70;
const AT_ATTRIBUTE_LIST: u32 = 0x20;
const AT_DATA: u32 = 0x80;
const AT_END: u32 = 0xFFFF_FFFF;

const MFT_RECORD_MFT: u64 = 0;
const MFT_RECORD_VOLUME: u64 = 3;
const MFT_RECORD_BITMAP: u64 = 6;

const VOLUME_IS_DIRTY: u16 = 0x0001;

/// Fixup stride: NTFS protects records in 512-byte units on every sector size.
const FIXUP_STRIDE: usize = 512;

/// Read `$Bitmap` in pieces of this size.
const BITMAP_CHUNK: u64 = 1 << 20;

/// Largest cluster accepted (Windows formats up to 2 MiB clusters).
pub const MAX_CLUSTER: u64 = 2 << 20;

/// Largest `$ATTRIBUTE_LIST` read (a crafted volume asked for 16 TiB).
pub const MAX_ATTR_LIST: u64 = 256 << 10;

fn corrupt(why: impl Into<String>) -> FsError {
    FsError::Corrupt {
        fs: FS,
        why: why.into(),
    }
}

/// One run of a non-resident attribute: `len` clusters starting at virtual
/// cluster `vcn`, stored at logical cluster `lcn` (`None` = sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// First virtual cluster of the run.
    pub vcn: u64,
    /// Length in clusters.
    pub len: u64,
    /// First logical cluster, `None` for a sparse (unallocated) run.
    pub lcn: Option<u64>,
}

/// Decodes a runlist starting at `lowest_vcn`.
pub(crate) fn decode_runlist(bytes: &[u8], lowest_vcn: u64) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    let mut pos = 0usize;
    let mut vcn = lowest_vcn;
    let mut lcn: i64 = 0;
    loop {
        let Some(&h) = bytes.get(pos) else {
            return Err("runlist is not terminated".into());
        };
        if h == 0 {
            break;
        }
        let len_size = usize::from(h & 0x0F);
        let off_size = usize::from(h >> 4);
        if len_size == 0 || len_size > 8 || off_size > 8 {
            return Err(format!("bad runlist header byte {h:#04x}"));
        }
        let field = bytes
            .get(pos + 1..pos + 1 + len_size + off_size)
            .ok_or("runlist runs past its attribute")?;
        let mut len: u64 = 0;
        for (i, &b) in field[..len_size].iter().enumerate() {
            len |= u64::from(b) << (8 * i);
        }
        if len == 0 || len > i64::MAX as u64 {
            return Err(format!("run of {len} clusters"));
        }
        let run_lcn = if off_size == 0 {
            None
        } else {
            let mut delta: i64 = 0;
            for (i, &b) in field[len_size..].iter().enumerate() {
                delta |= i64::from(b) << (8 * i);
            }
            // Sign-extend from the field's top bit.
            let shift = 64 - 8 * off_size as u32;
            if shift > 0 {
                delta = (delta << shift) >> shift;
            }
            lcn = lcn.checked_add(delta).ok_or("run offset overflows")?;
            if lcn < 0 {
                return Err(format!("run starts at negative cluster {lcn}"));
            }
            Some(lcn as u64)
        };
        runs.push(Run {
            vcn,
            len,
            lcn: run_lcn,
        });
        vcn = vcn.checked_add(len).ok_or("runlist overflows")?;
        pos += 1 + len_size + off_size;
    }
    Ok(runs)
}

/// Applies the update sequence array of a multi-sector-protected record in
/// place; an error when a stride's check value does not match (a torn or
/// corrupt record).
pub(crate) fn apply_fixups(rec: &mut [u8]) -> Result<(), String> {
    let usa_ofs = usize::from(le16(rec, 4));
    let usa_count = usize::from(le16(rec, 6));
    if usa_count < 2 || (usa_count - 1) * FIXUP_STRIDE != rec.len() {
        return Err(format!(
            "update sequence array of {usa_count} entries for a {}-byte record",
            rec.len()
        ));
    }
    if usa_ofs % 2 != 0 || usa_ofs + 2 * usa_count > FIXUP_STRIDE - 2 {
        return Err(format!("update sequence array at offset {usa_ofs}"));
    }
    let usn = [rec[usa_ofs], rec[usa_ofs + 1]];
    for i in 1..usa_count {
        let end = i * FIXUP_STRIDE;
        if rec[end - 2..end] != usn {
            return Err(format!("fixup mismatch in stride {}", i - 1));
        }
        let fix = [rec[usa_ofs + 2 * i], rec[usa_ofs + 2 * i + 1]];
        rec[end - 2..end].copy_from_slice(&fix);
    }
    Ok(())
}

/// One attribute of a record (the parts the walker needs).
#[derive(Debug, Clone)]
struct Attr {
    ty: u32,
    named: bool,
    flags: u16,
    body: AttrBody,
}

#[derive(Debug, Clone)]
enum AttrBody {
    Resident(Vec<u8>),
    NonResident {
        lowest_vcn: u64,
        data_size: u64,
        runs: Vec<Run>,
    },
}

/// Parses the attributes of a record whose fixups were applied.
fn parse_attrs(rec: &[u8]) -> Result<Vec<Attr>, FsError> {
    let used = (le32(rec, 0x18) as usize).min(rec.len());
    let mut pos = usize::from(le16(rec, 0x14));
    let mut out = Vec::new();
    while pos + 8 <= used {
        let ty = le32(rec, pos);
        if ty == AT_END {
            return Ok(out);
        }
        let len = le32(rec, pos + 4) as usize;
        if len < 0x18 || !len.is_multiple_of(8) || pos + len > used {
            return Err(corrupt(format!(
                "attribute {ty:#x} of length {len} at {pos} overruns its record"
            )));
        }
        let a = &rec[pos..pos + len];
        let non_resident = a[8] != 0;
        let named = a[9] != 0;
        let flags = le16(a, 0x0C);
        let body = if non_resident {
            if len < 0x40 {
                return Err(corrupt(format!(
                    "non-resident attribute {ty:#x} is too short"
                )));
            }
            let lowest_vcn = le64(a, 0x10);
            let mp = usize::from(le16(a, 0x20));
            let runs = a
                .get(mp..)
                .ok_or_else(|| {
                    corrupt(format!(
                        "attribute {ty:#x}: runlist offset {mp} out of range"
                    ))
                })
                .and_then(|r| {
                    decode_runlist(r, lowest_vcn)
                        .map_err(|e| corrupt(format!("attribute {ty:#x}: {e}")))
                })?;
            AttrBody::NonResident {
                lowest_vcn,
                data_size: le64(a, 0x30),
                runs,
            }
        } else {
            let vlen = le32(a, 0x10) as usize;
            let voff = usize::from(le16(a, 0x14));
            let v = a.get(voff..voff.saturating_add(vlen)).ok_or_else(|| {
                corrupt(format!("resident attribute {ty:#x} overruns its record"))
            })?;
            AttrBody::Resident(v.to_vec())
        };
        out.push(Attr {
            ty,
            named,
            flags,
            body,
        });
        pos += len;
    }
    Err(corrupt("attribute list of a record is not terminated"))
}

/// A parsed NTFS boot sector.
#[derive(Debug, Clone)]
pub(super) struct Ntfs {
    bps: u64,
    cluster: u64,
    /// Sectors × bytes per sector (checked in `probe`).
    vol_bytes: u64,
    mft_lcn: u64,
    record_size: u64,
    serial: u64,
}

/// Recognises an NTFS boot sector.
pub(super) fn probe(_src: &dyn ReadAt, b: &[u8; 512]) -> Result<Option<Ntfs>, FsError> {
    if &b[3..11] != b"NTFS    " || b[510] != 0x55 || b[511] != 0xAA {
        return Ok(None);
    }
    let bps = u64::from(le16(b, 0x0B));
    if !(256..=4096).contains(&bps) || !bps.is_power_of_two() {
        return Ok(None);
    }
    let spc_raw = b[0x0D];
    let spc = if spc_raw <= 0x80 {
        u64::from(spc_raw)
    } else {
        1u64.checked_shl(256 - u32::from(spc_raw)).unwrap_or(0)
    };
    if spc == 0 || !spc.is_power_of_two() {
        return Ok(None);
    }
    let cluster = match bps.checked_mul(spc) {
        Some(c) if c <= MAX_CLUSTER => c,
        _ => {
            return Err(corrupt(format!(
                "{spc} sectors of {bps} bytes per cluster: clusters are at most {MAX_CLUSTER} bytes"
            )))
        }
    };
    let cpr = b[0x40] as i8;
    let record_size = if cpr > 0 {
        cluster * cpr as u64
    } else {
        1u64.checked_shl(u32::from(cpr.unsigned_abs())).unwrap_or(0)
    };
    if !(512..=65536).contains(&record_size) || !record_size.is_power_of_two() {
        return Ok(None);
    }
    let total_sectors = le64(b, 0x28);
    if total_sectors == 0 {
        return Ok(None);
    }
    // Every byte offset of the volume (and of its backup boot sector) must
    // fit a u64: the walker then computes offsets without overflow checks
    // only where they are below the volume size.
    let Some(vol_bytes) = total_sectors
        .checked_mul(bps)
        .filter(|v| v.checked_add(cluster).is_some())
    else {
        return Err(corrupt(format!(
            "{total_sectors} sectors of {bps} bytes overflow"
        )));
    };
    Ok(Some(Ntfs {
        bps,
        cluster,
        vol_bytes,
        mft_lcn: le64(b, 0x30),
        record_size,
        serial: le64(b, 0x48),
    }))
}

/// What `$Volume` says.
struct VolumeInfo {
    label: Option<String>,
    flags: u16,
}

impl Ntfs {
    fn total_clusters(&self) -> u64 {
        self.vol_bytes / self.cluster
    }

    fn base_meta(&self) -> FsMeta {
        FsMeta {
            fstype: FS.into(),
            label: None,
            uuid: Some(format!("{:016X}", self.serial)),
            block_size: u32::try_from(self.cluster).ok(),
            fs_size: Some(self.vol_bytes),
        }
    }

    /// Manifest metadata with the label from `$Volume`. A `$MFT` or
    /// `$Volume` that cannot be read is an error: the volume is damaged (or
    /// crafted), and saying so beats listing it as a healthy NTFS.
    pub(super) fn meta(&self, src: &dyn ReadAt) -> Result<FsMeta, FsError> {
        let mut m = self.base_meta();
        let mft = self.mft_runs(src)?;
        m.label = self.volume_info(src, &mft)?.label;
        Ok(m)
    }

    /// Reads `len` bytes at byte `offset` of a non-resident attribute's data.
    fn read_runs(
        &self,
        src: &dyn ReadAt,
        runs: &[Run],
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FsError> {
        let mut done = 0usize;
        // The volume plus its backup boot sector: every read stays inside.
        let limit = self.vol_bytes + self.bps;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .filter(|&p| p < limit)
                .ok_or_else(|| {
                    corrupt(format!("attribute offset {offset} lies beyond the volume"))
                })?;
            let vcn = pos / self.cluster;
            let run = runs
                .iter()
                .find(|r| vcn >= r.vcn && vcn - r.vcn < r.len)
                .ok_or_else(|| corrupt(format!("virtual cluster {vcn} is not mapped")))?;
            // Bytes of this run from `pos` on (the run may be longer than
            // any volume: only the part up to the buffer's end is used).
            let left_in_run = (run.vcn + run.len - vcn)
                .saturating_mul(self.cluster)
                .saturating_sub(pos % self.cluster);
            let n = usize::try_from(left_in_run)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match run.lcn {
                None => piece.fill(0),
                Some(lcn) => {
                    let at = lcn
                        .checked_mul(self.cluster)
                        .and_then(|a| a.checked_add((vcn - run.vcn) * self.cluster))
                        .and_then(|a| a.checked_add(pos % self.cluster))
                        .filter(|&a| a.checked_add(n as u64).is_some_and(|e| e <= limit))
                        .ok_or_else(|| {
                            corrupt(format!("run at cluster {lcn} lies beyond the volume"))
                        })?;
                    src.read_exact_at(piece, at)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads MFT record `n` through the MFT's runlist (or, for bootstrapping,
    /// straight from the MFT's first cluster) and applies its fixups.
    fn read_record(
        &self,
        src: &dyn ReadAt,
        mft: Option<&[Run]>,
        n: u64,
    ) -> Result<Vec<u8>, FsError> {
        let mut rec = vec![0u8; self.record_size as usize];
        let beyond = || corrupt(format!("MFT record {n} lies beyond the volume"));
        let rel = n.checked_mul(self.record_size).ok_or_else(beyond)?;
        match mft {
            Some(runs) => self.read_runs(src, runs, rel, &mut rec)?,
            None => {
                let at = self
                    .mft_lcn
                    .checked_mul(self.cluster)
                    .and_then(|a| a.checked_add(rel))
                    .filter(|&a| {
                        a.checked_add(self.record_size)
                            .is_some_and(|e| e <= self.vol_bytes)
                    })
                    .ok_or_else(beyond)?;
                src.read_exact_at(&mut rec, at)?
            }
        }
        if &rec[0..4] != b"FILE" {
            return Err(corrupt(format!("MFT record {n} has no FILE signature")));
        }
        apply_fixups(&mut rec).map_err(|e| corrupt(format!("MFT record {n}: {e}")))?;
        if le16(&rec, 0x16) & 1 == 0 {
            return Err(corrupt(format!("MFT record {n} is not in use")));
        }
        Ok(rec)
    }

    /// The complete runlist and data size of the unnamed `$DATA` of record
    /// `n`, following an `$ATTRIBUTE_LIST` when there is one. `mft` is the
    /// MFT's runlist, `None` while reading `$MFT` itself (its extension
    /// records are then read through the pieces found so far).
    fn data_runs(
        &self,
        src: &dyn ReadAt,
        mft: Option<&[Run]>,
        n: u64,
    ) -> Result<(Vec<Run>, u64), FsError> {
        let base = parse_attrs(&self.read_record(src, mft, n)?)?;
        let mut pieces: Vec<(u64, u64, Vec<Run>)> = Vec::new(); // (lowest vcn, data size, runs)
        let take = |a: &Attr, pieces: &mut Vec<(u64, u64, Vec<Run>)>| -> Result<(), FsError> {
            if a.flags & 0x4001 != 0 {
                return Err(FsError::Unsupported {
                    fs: FS,
                    feature: format!("compressed or encrypted $DATA in record {n}"),
                });
            }
            match &a.body {
                AttrBody::NonResident {
                    lowest_vcn,
                    data_size,
                    runs,
                } => {
                    pieces.push((*lowest_vcn, *data_size, runs.clone()));
                    Ok(())
                }
                AttrBody::Resident(_) => Err(corrupt(format!("$DATA of record {n} is resident"))),
            }
        };
        let list = base.iter().find(|a| a.ty == AT_ATTRIBUTE_LIST);
        match list {
            None => {
                for a in base.iter().filter(|a| a.ty == AT_DATA && !a.named) {
                    take(a, &mut pieces)?;
                }
            }
            Some(l) => {
                let content = match &l.body {
                    AttrBody::Resident(v) => v.clone(),
                    AttrBody::NonResident {
                        data_size, runs, ..
                    } => {
                        if *data_size > MAX_ATTR_LIST {
                            return Err(corrupt(format!(
                                "attribute list of record {n} holds {data_size} bytes (at most {MAX_ATTR_LIST})"
                            )));
                        }
                        let mut v = vec![0u8; *data_size as usize];
                        self.read_runs(src, runs, 0, &mut v)?;
                        v
                    }
                };
                let mut entries = parse_attr_list(&content)?;
                entries.retain(|e| e.ty == AT_DATA && !e.named);
                entries.sort_by_key(|e| e.lowest_vcn);
                for e in entries {
                    let attrs = if e.record == n {
                        base.clone()
                    } else {
                        // While reading $MFT, map through the pieces so far.
                        let so_far: Vec<Run>;
                        let map = match mft {
                            Some(m) => Some(m),
                            None if pieces.is_empty() => None,
                            None => {
                                so_far = pieces.iter().flat_map(|p| p.2.iter().copied()).collect();
                                Some(so_far.as_slice())
                            }
                        };
                        parse_attrs(&self.read_record(src, map, e.record)?)?
                    };
                    let a = attrs
                        .iter()
                        .find(|a| {
                            a.ty == AT_DATA
                                && !a.named
                                && matches!(a.body, AttrBody::NonResident { lowest_vcn, .. } if lowest_vcn == e.lowest_vcn)
                        })
                        .ok_or_else(|| corrupt(format!("attribute list of record {n} names a missing $DATA piece")))?;
                    take(a, &mut pieces)?;
                }
            }
        }
        pieces.sort_by_key(|p| p.0);
        let Some(first) = pieces.first() else {
            return Err(corrupt(format!("record {n} has no $DATA")));
        };
        if first.0 != 0 {
            return Err(corrupt(format!(
                "$DATA of record {n} does not start at VCN 0"
            )));
        }
        let size = first.1;
        let runs: Vec<Run> = pieces.into_iter().flat_map(|p| p.2).collect();
        Ok((runs, size))
    }

    fn mft_runs(&self, src: &dyn ReadAt) -> Result<Vec<Run>, FsError> {
        Ok(self.data_runs(src, None, MFT_RECORD_MFT)?.0)
    }

    fn volume_info(&self, src: &dyn ReadAt, mft: &[Run]) -> Result<VolumeInfo, FsError> {
        let attrs = parse_attrs(&self.read_record(src, Some(mft), MFT_RECORD_VOLUME)?)?;
        let mut info = VolumeInfo {
            label: None,
            flags: 0,
        };
        let mut seen_info = false;
        for a in attrs {
            if let AttrBody::Resident(v) = &a.body {
                match a.ty {
                    AT_VOLUME_NAME => {
                        let units: Vec<u16> = v
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect();
                        let s = trim_label(&String::from_utf16_lossy(&units));
                        info.label = (!s.is_empty()).then_some(s);
                    }
                    AT_VOLUME_INFORMATION if v.len() >= 12 => {
                        info.flags = le16(v, 10);
                        seen_info = true;
                    }
                    _ => {}
                }
            }
        }
        if !seen_info {
            return Err(corrupt("$Volume has no $VOLUME_INFORMATION"));
        }
        Ok(info)
    }

    /// Builds the used map (and the metadata with the label).
    pub(super) fn used_map(
        &self,
        src: &dyn ReadAt,
        opts: MapOptions,
    ) -> Result<(FsMeta, ExtentMap), FsError> {
        let vol_bytes = self.vol_bytes;
        if vol_bytes > src.size() {
            return Err(corrupt(format!(
                "volume spans {vol_bytes} bytes but the region holds only {}",
                src.size()
            )));
        }
        let mft = self.mft_runs(src)?;
        let vol = self.volume_info(src, &mft)?;
        if !opts.force && vol.flags & VOLUME_IS_DIRTY != 0 {
            return Err(FsError::Unclean {
                fs: FS,
                why: "volume dirty flag is set".into(),
            });
        }
        let (bm_runs, bm_size) = self.data_runs(src, Some(&mft), MFT_RECORD_BITMAP)?;
        let clusters = self.total_clusters();
        let need = clusters.div_ceil(8);
        if bm_size < need {
            return Err(corrupt(format!(
                "$Bitmap holds {bm_size} bytes, {need} needed"
            )));
        }
        let mut map = ExtentMap::new();
        let mut buf = Vec::new();
        let mut off = 0u64;
        while off < need {
            let n = BITMAP_CHUNK.min(need - off);
            buf.resize(n as usize, 0);
            self.read_runs(src, &bm_runs, off, &mut buf)?;
            let first = off * 8;
            let nbits = (clusters - first).min(n * 8);
            for_each_set_run(&buf, nbits, |s, c| {
                map.add((first + s) * self.cluster, c * self.cluster)
            });
            off += n;
        }
        // The backup boot sector follows the volume.
        if vol_bytes + self.bps <= src.size() {
            map.add(vol_bytes, self.bps);
        }
        let mut meta = self.base_meta();
        meta.label = vol.label;
        Ok((meta, map))
    }
}

/// One `$ATTRIBUTE_LIST` entry.
struct ListEntry {
    ty: u32,
    named: bool,
    lowest_vcn: u64,
    record: u64,
}

fn parse_attr_list(v: &[u8]) -> Result<Vec<ListEntry>, FsError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 0x1A <= v.len() {
        let len = usize::from(le16(v, pos + 4));
        if len < 0x1A || pos + len > v.len() {
            return Err(corrupt(format!(
                "attribute list entry of length {len} at {pos}"
            )));
        }
        out.push(ListEntry {
            ty: le32(v, pos),
            named: v[pos + 6] != 0,
            lowest_vcn: le64(v, pos + 8),
            record: le64(v, pos + 0x10) & 0x0000_FFFF_FFFF_FFFF,
        });
        pos += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runlist_decodes_signed_deltas_and_sparse_runs() {
        // 0x21: 1-byte length, 2-byte offset: 0x18 clusters at 0x5634.
        // 0x11: 0x10 clusters at delta -0x10 (0xF0).
        // 0x01: 0x08 sparse clusters.
        // 0x31: 3-byte offset 0x010000: 0x20 clusters at prev + 0x10000.
        let rl = [
            0x21, 0x18, 0x34, 0x56, 0x11, 0x10, 0xF0, 0x01, 0x08, 0x31, 0x20, 0x00, 0x00, 0x01,
            0x00,
        ];
        let runs = decode_runlist(&rl, 0).expect("valid");
        assert_eq!(
            runs,
            vec![
                Run {
                    vcn: 0,
                    len: 0x18,
                    lcn: Some(0x5634)
                },
                Run {
                    vcn: 0x18,
                    len: 0x10,
                    lcn: Some(0x5624)
                },
                Run {
                    vcn: 0x28,
                    len: 0x08,
                    lcn: None
                },
                Run {
                    vcn: 0x30,
                    len: 0x20,
                    lcn: Some(0x15624)
                },
            ]
        );
    }

    #[test]
    fn runlist_rejects_negative_clusters_and_missing_terminator() {
        assert!(
            decode_runlist(&[0x11, 0x04, 0xFF, 0x00], 0).is_err(),
            "lcn -1"
        );
        assert!(
            decode_runlist(&[0x11, 0x04, 0x10], 0).is_err(),
            "no terminator"
        );
        assert!(
            decode_runlist(&[0x09, 0x00], 0).is_err(),
            "length field of 9 bytes"
        );
        assert_eq!(decode_runlist(&[0x00], 7).expect("empty"), vec![]);
    }

    #[test]
    fn fixups_restore_stride_tails_and_detect_torn_records() {
        let mut rec = vec![0u8; 1024];
        rec[0..4].copy_from_slice(b"FILE");
        rec[4..6].copy_from_slice(&0x30u16.to_le_bytes()); // usa offset
        rec[6..8].copy_from_slice(&3u16.to_le_bytes()); // usn + 2 entries
        rec[0x30..0x32].copy_from_slice(&[0x07, 0x00]); // usn
        rec[0x32..0x34].copy_from_slice(&[0xAA, 0xBB]); // real tail of stride 0
        rec[0x34..0x36].copy_from_slice(&[0xCC, 0xDD]); // real tail of stride 1
        rec[510..512].copy_from_slice(&[0x07, 0x00]);
        rec[1022..1024].copy_from_slice(&[0x07, 0x00]);
        let mut ok = rec.clone();
        apply_fixups(&mut ok).expect("valid fixups");
        assert_eq!(&ok[510..512], &[0xAA, 0xBB]);
        assert_eq!(&ok[1022..1024], &[0xCC, 0xDD]);
        let mut torn = rec;
        torn[1022] = 0x08;
        assert!(apply_fixups(&mut torn).is_err());
    }
}
