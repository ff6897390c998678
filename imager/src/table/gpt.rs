//! GPT reading: header and entry-array CRCs checked; the backup header is
//! used when the primary is damaged.
//!
//! Bounds on what a header says, checked before the entry array is read:
//!
//! | value | bound |
//! |---|---|
//! | header size | 92 ..= sector size |
//! | entry size | 128 × 2^n, at most 1024 |
//! | entries | at most [`MAX_ENTRIES`] (16384) |
//! | entry array | at most [`MAX_ARRAY_BYTES`] (4 MiB), inside the disk |
//! | partition ranges | first ≤ last, the last sector whole inside the disk |

use super::{Partition, PartitionTable, TableError, TableKind};
use crate::device::{Device, ReadAt};

pub(super) const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Size of one entry of the partition entry array we write.
const ENTRY_SIZE: u32 = 128;
/// Entries in the array we write unless a partition number needs more.
const DEFAULT_ENTRIES: u32 = 128;
/// Header revision 1.0.
const REVISION: u32 = 0x0001_0000;
/// Header size we write.
const HEADER_SIZE: u32 = 92;
/// Most entries a table may have (what we read and write).
pub const MAX_ENTRIES: u32 = 16384;
/// Largest entry array read (real tables: 128 × 128 bytes = 16 KiB).
pub const MAX_ARRAY_BYTES: u64 = 4 << 20;

fn invalid(why: impl Into<String>) -> TableError {
    TableError::Invalid {
        kind: "GPT",
        why: why.into(),
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Format a GPT mixed-endian GUID as text (upper case).
pub fn format_guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Parse a textual GUID into its 16-byte GPT (mixed-endian) form.
pub fn parse_guid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let raw = hex::decode(hex).ok()?;
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    out[8..16].copy_from_slice(&raw[8..16]);
    Some(out)
}

struct Header {
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
}

fn parse_header(buf: &[u8], ss: u32) -> Option<Header> {
    if &buf[0..8] != SIGNATURE {
        return None;
    }
    let hsize = le32(buf, 12) as usize;
    if !(92..=ss as usize).contains(&hsize) {
        return None;
    }
    let mut h = buf[..hsize].to_vec();
    h[16..20].fill(0);
    if crc32fast::hash(&h) != le32(buf, 16) {
        return None;
    }
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&buf[56..72]);
    Some(Header {
        first_usable: le64(buf, 40),
        last_usable: le64(buf, 48),
        disk_guid,
        entries_lba: le64(buf, 72),
        num_entries: le32(buf, 80),
        entry_size: le32(buf, 84),
        entries_crc: le32(buf, 88),
    })
}

pub(super) fn read(src: &dyn ReadAt, ss: u32) -> Result<Option<PartitionTable>, TableError> {
    let size = src.size();
    let ssu = ss as u64;
    if size < ssu * 3 {
        return Ok(None);
    }
    let mut buf = vec![0u8; ss as usize];
    src.read_exact_at(&mut buf, ssu)?;
    let primary = parse_header(&buf, ss);
    let primary_sig = &buf[0..8] == SIGNATURE;
    let (hdr, which) = match primary {
        Some(h) => (h, "primary"),
        None => {
            let last = size / ssu - 1;
            src.read_exact_at(&mut buf, last * ssu)?;
            match parse_header(&buf, ss) {
                Some(h) => (h, "backup"),
                None if primary_sig => {
                    return Err(invalid(
                        "primary and backup headers are both damaged (bad CRC)",
                    ))
                }
                None => return Ok(None),
            }
        }
    };
    let arr_len = u64::from(hdr.num_entries) * u64::from(hdr.entry_size);
    if !(128..=1024).contains(&hdr.entry_size)
        || !hdr.entry_size.is_power_of_two()
        || hdr.num_entries > MAX_ENTRIES
        || arr_len > MAX_ARRAY_BYTES
    {
        return Err(invalid(format!(
            "{which} header: unusable entry array ({} entries of {} bytes; at most {MAX_ENTRIES} entries of 128 × 2^n ≤ 1024 bytes, {MAX_ARRAY_BYTES} bytes in all)",
            hdr.num_entries, hdr.entry_size
        )));
    }
    if hdr
        .entries_lba
        .checked_mul(ssu)
        .and_then(|o| o.checked_add(arr_len))
        .is_none_or(|e| e > size)
    {
        return Err(invalid(format!(
            "{which} header: entry array outside the disk"
        )));
    }
    let mut arr = vec![0u8; arr_len as usize];
    src.read_exact_at(&mut arr, hdr.entries_lba * ssu)?;
    if crc32fast::hash(&arr) != hdr.entries_crc {
        return Err(invalid(format!("{which} entry array CRC mismatch")));
    }
    let mut parts = Vec::new();
    for (i, e) in arr.chunks_exact(hdr.entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        // The last sector must lie whole on the disk (a disk image file
        // need not be a whole number of sectors).
        if last < first
            || last
                .checked_add(1)
                .and_then(|e| e.checked_mul(ssu))
                .is_none_or(|e| e > size)
        {
            return Err(invalid(format!(
                "partition {} has an invalid range {first}..{last}",
                i + 1
            )));
        }
        let name_u16: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name_u16);
        parts.push(Partition {
            number: i as u32 + 1,
            start: first * ssu,
            size: (last - first + 1) * ssu,
            ptype: format_guid(&e[0..16]),
            guid: Some(format_guid(&e[16..32])),
            name: if name.is_empty() { None } else { Some(name) },
            attributes: le64(e, 48),
            bootable: false,
            extended: false,
        });
    }
    Ok(Some(PartitionTable {
        kind: TableKind::Gpt,
        sector_size: ss,
        disk_id: format_guid(&hdr.disk_guid),
        partitions: parts,
        first_usable_lba: Some(hdr.first_usable),
        last_usable_lba: Some(hdr.last_usable),
    }))
}

/// Where a GPT sits on a disk of a given size and sector size.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    /// Logical sector size.
    pub ss: u64,
    /// Last LBA of the disk (where the backup header goes).
    pub last_lba: u64,
    /// Entries in the array.
    pub entries: u32,
    /// Sectors one entry array takes.
    pub entry_sectors: u64,
    /// Smallest first-usable LBA: after the MBR, the header and the array.
    pub min_first_usable: u64,
    /// Last usable LBA: before the backup array.
    pub last_usable: u64,
}

/// Geometry for a disk of `disk_size` bytes holding partition numbers up
/// to `max_number`.
pub(super) fn geometry(ss: u32, disk_size: u64, max_number: u32) -> Result<Geometry, String> {
    let ssu = u64::from(ss);
    let per_sector = ss / ENTRY_SIZE;
    let entries = DEFAULT_ENTRIES.max(max_number.div_ceil(per_sector) * per_sector);
    let entry_sectors = (u64::from(entries) * u64::from(ENTRY_SIZE)).div_ceil(ssu);
    let sectors = disk_size / ssu;
    // MBR + 2 headers + 2 arrays + at least one usable sector.
    if sectors < 2 * entry_sectors + 4 {
        return Err(format!(
            "the disk ({disk_size} bytes) is too small for a GPT"
        ));
    }
    let last_lba = sectors - 1;
    Ok(Geometry {
        ss: ssu,
        last_lba,
        entries,
        entry_sectors,
        min_first_usable: 2 + entry_sectors,
        last_usable: last_lba - entry_sectors - 1,
    })
}

fn unwritable(why: impl Into<String>) -> TableError {
    TableError::Unwritable {
        kind: "GPT",
        why: why.into(),
    }
}

/// Check a GPT for writing to a disk of `disk_size` bytes; returns where
/// it will sit.
pub(super) fn validate(t: &PartitionTable, disk_size: u64) -> Result<Geometry, TableError> {
    let max_number = t.partitions.iter().map(|p| p.number).max().unwrap_or(0);
    if max_number > MAX_ENTRIES {
        return Err(unwritable(format!(
            "partition number {max_number} is too large"
        )));
    }
    let g = geometry(t.sector_size, disk_size, max_number).map_err(unwritable)?;
    let first_usable = t.first_usable_lba.unwrap_or(g.min_first_usable);
    if first_usable < g.min_first_usable || first_usable > g.last_usable {
        return Err(unwritable(format!(
            "first usable LBA {first_usable} must lie in {}..={}",
            g.min_first_usable, g.last_usable
        )));
    }
    if !t.disk_id.is_empty() && parse_guid(&t.disk_id).is_none() {
        return Err(unwritable(format!(
            "disk GUID {:?} is not a GUID",
            t.disk_id
        )));
    }
    for p in &t.partitions {
        let n = p.number;
        let bad = |why: String| unwritable(format!("partition {n}: {why}"));
        if p.extended {
            return Err(bad("extended partitions exist only on MBR disks".into()));
        }
        if p.bootable {
            return Err(bad(
                "the MBR active flag does not exist on GPT (use attribute bit 2)".into(),
            ));
        }
        match parse_guid(&p.ptype) {
            Some(g) if g.iter().all(|&b| b == 0) => {
                return Err(bad("the all-zero type GUID marks an unused entry".into()))
            }
            Some(_) => {}
            None => return Err(bad(format!("type {:?} is not a GUID", p.ptype))),
        }
        if let Some(guid) = &p.guid {
            if !guid.is_empty() && parse_guid(guid).is_none() {
                return Err(bad(format!("partition GUID {guid:?} is not a GUID")));
            }
        }
        if let Some(name) = &p.name {
            if name.encode_utf16().count() > 36 {
                return Err(bad(format!(
                    "name {name:?} is longer than 36 UTF-16 code units"
                )));
            }
        }
        let first = p.start / g.ss;
        let last = (p.start + p.size) / g.ss - 1;
        if first < first_usable || last > g.last_usable {
            return Err(bad(format!(
                "sectors {first}..={last} lie outside the usable area {first_usable}..={} of this disk",
                g.last_usable
            )));
        }
    }
    Ok(g)
}

/// 16 random bytes as a version-4 GUID in GPT (mixed-endian) byte order.
pub(super) fn random_guid() -> Result<[u8; 16], std::io::Error> {
    use ring::rand::SecureRandom;
    let mut text = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut text)
        .map_err(|_| std::io::Error::other("the system random number generator failed"))?;
    // RFC 4122 version 4, variant 10xx, on the textual byte order.
    text[6] = (text[6] & 0x0f) | 0x40;
    text[8] = (text[8] & 0x3f) | 0x80;
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&[text[3], text[2], text[1], text[0]]);
    out[4..6].copy_from_slice(&[text[5], text[4]]);
    out[6..8].copy_from_slice(&[text[7], text[6]]);
    out[8..16].copy_from_slice(&text[8..16]);
    Ok(out)
}

fn guid_or_random(s: Option<&str>) -> Result<[u8; 16], TableError> {
    match s {
        Some(s) if !s.is_empty() => {
            parse_guid(s).ok_or_else(|| unwritable(format!("{s:?} is not a GUID")))
        }
        _ => Ok(random_guid()?),
    }
}

struct HeaderFields {
    my_lba: u64,
    alt_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
    entries_lba: u64,
    entries: u32,
    entries_crc: u32,
}

fn build_header(ss: usize, h: &HeaderFields) -> Vec<u8> {
    let mut b = vec![0u8; ss];
    b[0..8].copy_from_slice(SIGNATURE);
    b[8..12].copy_from_slice(&REVISION.to_le_bytes());
    b[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    b[24..32].copy_from_slice(&h.my_lba.to_le_bytes());
    b[32..40].copy_from_slice(&h.alt_lba.to_le_bytes());
    b[40..48].copy_from_slice(&h.first_usable.to_le_bytes());
    b[48..56].copy_from_slice(&h.last_usable.to_le_bytes());
    b[56..72].copy_from_slice(&h.disk_guid);
    b[72..80].copy_from_slice(&h.entries_lba.to_le_bytes());
    b[80..84].copy_from_slice(&h.entries.to_le_bytes());
    b[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    b[88..92].copy_from_slice(&h.entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&b[..HEADER_SIZE as usize]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Recompute the CRC of a header held in `b` (its size read from the header).
fn reseal_header(b: &mut [u8]) {
    let hsize = (le32(b, 12) as usize).clamp(92, b.len());
    b[16..20].fill(0);
    let crc = crc32fast::hash(&b[..hsize]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// The protective MBR record (bytes 446..512 of LBA 0) for a disk whose
/// last LBA is `last_lba`.
fn protective_record(last_lba: u64) -> [u8; 66] {
    let mut r = [0u8; 66];
    let count = last_lba.min(u64::from(u32::MAX));
    r[0] = 0;
    r[1..4].copy_from_slice(&super::mbr::chs(1));
    r[4] = 0xee;
    r[5..8].copy_from_slice(&super::mbr::chs(count));
    r[8..12].copy_from_slice(&1u32.to_le_bytes());
    r[12..16].copy_from_slice(&(count as u32).to_le_bytes());
    r[64] = 0x55;
    r[65] = 0xaa;
    r
}

pub(super) fn write(dev: &Device, t: &PartitionTable) -> Result<PartitionTable, TableError> {
    let g = validate(t, dev.size())?;
    let ss = g.ss as usize;
    let first_usable = t.first_usable_lba.unwrap_or(g.min_first_usable);
    let disk_guid = guid_or_random(Some(&t.disk_id))?;
    let mut written = t.clone();
    let mut arr = vec![0u8; g.entries as usize * ENTRY_SIZE as usize];
    for (p, out) in t.partitions.iter().zip(written.partitions.iter_mut()) {
        let e = &mut arr[(p.number as usize - 1) * ENTRY_SIZE as usize..][..ENTRY_SIZE as usize];
        let ty = parse_guid(&p.ptype)
            .ok_or_else(|| unwritable(format!("partition {}: bad type", p.number)))?;
        let id = guid_or_random(p.guid.as_deref())?;
        e[0..16].copy_from_slice(&ty);
        e[16..32].copy_from_slice(&id);
        e[32..40].copy_from_slice(&(p.start / g.ss).to_le_bytes());
        e[40..48].copy_from_slice(&((p.start + p.size) / g.ss - 1).to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        for (i, unit) in p.name.as_deref().unwrap_or("").encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
        out.ptype = format_guid(&ty);
        out.guid = Some(format_guid(&id));
        out.name = p.name.clone().filter(|n| !n.is_empty());
    }
    written.partitions.sort_by_key(|p| p.number);
    let arr_crc = crc32fast::hash(&arr);
    let backup_arr_lba = g.last_lba - g.entry_sectors;
    let mut fields = HeaderFields {
        my_lba: 1,
        alt_lba: g.last_lba,
        first_usable,
        last_usable: g.last_usable,
        disk_guid,
        entries_lba: 2,
        entries: g.entries,
        entries_crc: arr_crc,
    };
    let primary = build_header(ss, &fields);
    fields.my_lba = g.last_lba;
    fields.alt_lba = 1;
    fields.entries_lba = backup_arr_lba;
    let backup = build_header(ss, &fields);

    let mut lba0 = vec![0u8; ss];
    dev.read_exact_at(&mut lba0[..512], 0)?;
    // Keep the boot code (0..440) and the MBR disk signature (440..446);
    // the rest of LBA 0 is the protective record and zeros.
    lba0[446..512].copy_from_slice(&protective_record(g.last_lba));

    super::wipe_signatures(dev)?;
    let put = |buf: &[u8], at: u64| super::put(dev, buf, at);
    put(&arr, backup_arr_lba * g.ss)?;
    put(&arr, 2 * g.ss)?;
    put(&lba0, 0)?;
    put(&backup, g.last_lba * g.ss)?;
    put(&primary, g.ss)?;
    super::sync(dev)?;
    written.kind = TableKind::Gpt;
    written.disk_id = format_guid(&disk_guid);
    written.first_usable_lba = Some(first_usable);
    written.last_usable_lba = Some(g.last_usable);
    Ok(written)
}

/// Move the backup header and entry array to the end of the device (after
/// the disk grew or the table came from a smaller disk), keeping the
/// primary entry array byte for byte and updating both headers and the
/// protective MBR.
pub(super) fn relocate_backup(dev: &Device) -> Result<(), TableError> {
    let ss = dev.sector_size();
    let ssu = u64::from(ss);
    let bad = |why: String| TableError::Invalid { kind: "GPT", why };
    let mut hdr = vec![0u8; ss as usize];
    dev.read_exact_at(&mut hdr, ssu)?;
    let h = parse_header(&hdr, ss).ok_or_else(|| {
        bad("primary header is missing or damaged; cannot relocate the backup".into())
    })?;
    if h.entries_lba < 2 {
        return Err(bad(format!(
            "primary entry array at LBA {} is inside the header area",
            h.entries_lba
        )));
    }
    let arr_len = u64::from(h.num_entries) * u64::from(h.entry_size);
    if h.entry_size < 128 || arr_len == 0 || arr_len > 16384 * 1024 {
        return Err(bad(format!(
            "unusable entry array ({} entries of {} bytes)",
            h.num_entries, h.entry_size
        )));
    }
    let mut arr = vec![0u8; arr_len as usize];
    dev.read_exact_at(&mut arr, h.entries_lba * ssu)?;
    if crc32fast::hash(&arr) != h.entries_crc {
        return Err(bad("primary entry array CRC mismatch".into()));
    }
    let entry_sectors = arr_len.div_ceil(ssu);
    let sectors = dev.size() / ssu;
    if sectors < 2 * entry_sectors + 4 {
        return Err(bad("the disk is too small for this GPT".into()));
    }
    let new_last = sectors - 1;
    let new_last_usable = new_last - entry_sectors - 1;
    if h.first_usable > new_last_usable {
        return Err(bad("the disk is too small for this GPT".into()));
    }
    for (i, e) in arr.chunks_exact(h.entry_size as usize).enumerate() {
        if e[0..16].iter().any(|&b| b != 0) && le64(e, 40) > new_last_usable {
            return Err(bad(format!(
                "partition {} ends at LBA {} past the last usable LBA {new_last_usable} of this disk",
                i + 1,
                le64(e, 40)
            )));
        }
    }
    let old_alt = le64(&hdr, 32);
    let mut primary = hdr.clone();
    primary[32..40].copy_from_slice(&new_last.to_le_bytes());
    primary[48..56].copy_from_slice(&new_last_usable.to_le_bytes());
    reseal_header(&mut primary);
    let mut backup = primary.clone();
    backup[24..32].copy_from_slice(&new_last.to_le_bytes());
    backup[32..40].copy_from_slice(&1u64.to_le_bytes());
    backup[72..80].copy_from_slice(&(new_last - entry_sectors).to_le_bytes());
    reseal_header(&mut backup);

    let mut arr_padded = arr;
    arr_padded.resize((entry_sectors * ssu) as usize, 0);
    let put = |buf: &[u8], at: u64| super::put(dev, buf, at);
    put(&arr_padded, (new_last - entry_sectors) * ssu)?;
    put(&backup, new_last * ssu)?;
    put(&primary, ssu)?;
    // A stale backup header left inside the disk would confuse tools.
    if old_alt > h.last_usable && old_alt < new_last - entry_sectors {
        let mut sig = [0u8; 8];
        dev.read_exact_at(&mut sig, old_alt * ssu)?;
        if &sig == SIGNATURE {
            put(&vec![0u8; ss as usize], old_alt * ssu)?;
        }
    }
    let mut mbr = [0u8; 512];
    dev.read_exact_at(&mut mbr, 0)?;
    if mbr[510] == 0x55 && mbr[511] == 0xaa && mbr[446 + 4] == 0xee {
        let rec = protective_record(new_last);
        mbr[446..462].copy_from_slice(&rec[..16]);
        put(&mbr, 0)?;
    }
    super::sync(dev)
}

#[cfg(test)]
mod tests {
    /// Found by the `table_gpt` fuzz target (regression input
    /// `imager/fuzz/regressions/table_gpt/partial-last-sector`): on a disk
    /// of 48626 bytes (not a whole number of sectors) a partition whose
    /// last sector starts inside the disk but ends past it was accepted.
    #[test]
    fn a_partition_whose_last_sector_runs_past_the_disk_is_refused() {
        let input = include_bytes!("../../fuzz/regressions/table_gpt/partial-last-sector");
        let disk = input[1..].to_vec();
        assert_eq!(disk.len(), 48626);
        let e = super::read(&disk, 512).expect_err("partition 2 runs past the disk");
        assert!(e.to_string().contains("partition 2"), "{e}");
        crate::fuzzing::table_gpt(input);
    }

    use super::*;

    #[test]
    fn guid_text_round_trips_in_mixed_endian() {
        let s = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
        let b = parse_guid(s).expect("parse");
        assert_eq!(b[0], 0x28);
        assert_eq!(format_guid(&b), s);
        assert!(parse_guid("nope").is_none());
    }
}
