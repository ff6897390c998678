//! MBR reading, including the chain of extended boot records.

use super::{Partition, PartitionTable, TableError, TableKind};
use crate::device::ReadAt;

fn invalid(why: impl Into<String>) -> TableError {
    TableError::Invalid {
        kind: "MBR",
        why: why.into(),
    }
}

struct Entry {
    boot: u8,
    ptype: u8,
    lba: u64,
    count: u64,
}

fn entries(sector: &[u8]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + i * 16..446 + (i + 1) * 16];
        Entry {
            boot: e[0],
            ptype: e[4],
            lba: u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64,
            count: u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as u64,
        }
    })
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// True when the sector is a filesystem boot sector (FAT/NTFS/exFAT) rather
/// than a partition table: those also end in 55 AA.
fn looks_like_vbr(s: &[u8]) -> bool {
    &s[3..11] == b"NTFS    "
        || &s[3..11] == b"EXFAT   "
        || &s[54..59] == b"FAT12"
        || &s[54..59] == b"FAT16"
        || &s[82..87] == b"FAT32"
}

pub(super) fn read(src: &dyn ReadAt, ss: u32) -> Result<Option<PartitionTable>, TableError> {
    let ssu = ss as u64;
    if src.size() < 512 {
        return Ok(None);
    }
    let mut s = vec![0u8; 512];
    src.read_exact_at(&mut s, 0)?;
    if s[510] != 0x55 || s[511] != 0xaa || looks_like_vbr(&s) {
        return Ok(None);
    }
    let ents = entries(&s);
    if ents.iter().any(|e| e.boot != 0 && e.boot != 0x80) || ents.iter().all(|e| e.ptype == 0) {
        return Ok(None);
    }
    if ents.iter().any(|e| e.ptype == 0xee) {
        // Protective MBR without a readable GPT.
        return Err(invalid("protective MBR (type EE) but no valid GPT header"));
    }
    let disk_sectors = src.size() / ssu;
    let mut parts = Vec::new();
    let mut ext_base = None;
    for (i, e) in ents.iter().enumerate() {
        if e.ptype == 0 || e.count == 0 {
            continue;
        }
        if e.lba == 0 || e.lba + e.count > disk_sectors {
            return Err(invalid(format!(
                "partition {} ({}+{} sectors) does not fit the disk ({disk_sectors} sectors)",
                i + 1,
                e.lba,
                e.count
            )));
        }
        let ext = is_extended(e.ptype);
        if ext {
            if ext_base.is_some() {
                return Err(invalid("more than one extended partition"));
            }
            ext_base = Some((e.lba, e.count));
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start: e.lba * ssu,
            size: e.count * ssu,
            ptype: format!("0x{:02x}", e.ptype),
            guid: None,
            name: None,
            attributes: 0,
            bootable: e.boot == 0x80,
            extended: ext,
        });
    }
    if let Some((base, count)) = ext_base {
        let mut ebr_rel = 0u64;
        let mut number = 5;
        let mut seen = 0;
        loop {
            seen += 1;
            if seen > 256 {
                return Err(invalid("extended partition chain is too long or loops"));
            }
            let at = base + ebr_rel;
            if ebr_rel >= count {
                return Err(invalid(format!(
                    "extended boot record at sector {at} is outside the extended partition"
                )));
            }
            let mut ebr = vec![0u8; 512];
            src.read_exact_at(&mut ebr, at * ssu)?;
            if ebr[510] != 0x55 || ebr[511] != 0xaa {
                // An empty extended partition has no valid EBR.
                if ebr_rel == 0 {
                    break;
                }
                return Err(invalid(format!(
                    "extended boot record at sector {at} has no signature"
                )));
            }
            let e = entries(&ebr);
            if e[0].ptype != 0 && e[0].count > 0 {
                let start = at + e[0].lba;
                if start + e[0].count > base + count {
                    return Err(invalid(format!(
                        "logical partition {number} overruns the extended partition"
                    )));
                }
                parts.push(Partition {
                    number,
                    start: start * ssu,
                    size: e[0].count * ssu,
                    ptype: format!("0x{:02x}", e[0].ptype),
                    guid: None,
                    name: None,
                    attributes: 0,
                    bootable: e[0].boot == 0x80,
                    extended: false,
                });
                number += 1;
            }
            if e[1].ptype == 0 || e[1].lba == 0 {
                break;
            }
            ebr_rel = e[1].lba;
        }
    }
    parts.sort_by_key(|p| p.number);
    let sig = u32::from_le_bytes([s[440], s[441], s[442], s[443]]);
    Ok(Some(PartitionTable {
        kind: TableKind::Mbr,
        sector_size: ss,
        disk_id: format!("0x{sig:08x}"),
        partitions: parts,
        first_usable_lba: None,
        last_usable_lba: None,
    }))
}
