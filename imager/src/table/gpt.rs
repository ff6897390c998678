//! GPT reading: header and entry-array CRCs checked; the backup header is
//! used when the primary is damaged.

use super::{Partition, PartitionTable, TableError, TableKind};
use crate::device::ReadAt;

const SIGNATURE: &[u8; 8] = b"EFI PART";

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
    if hdr.entry_size < 128 || hdr.entry_size % 8 != 0 || hdr.num_entries > 16384 {
        return Err(invalid(format!(
            "{which} header: unusable entry array ({} entries of {} bytes)",
            hdr.num_entries, hdr.entry_size
        )));
    }
    let arr_len = hdr.num_entries as u64 * hdr.entry_size as u64;
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
        if last < first || last.checked_mul(ssu).is_none_or(|v| v >= size) {
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

#[cfg(test)]
mod tests {
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
