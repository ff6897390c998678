//! MBR reading, including the chain of extended boot records.
//!
//! Bounds: the four primary records must fit the disk; the chain of
//! extended boot records is followed for at most [`MAX_EBRS`] records, each
//! inside the extended partition, and a record that points back to one
//! already read is an error ("loops"), so a crafted chain ends at once.

use super::{Partition, PartitionTable, TableError, TableKind};
use crate::device::{Device, ReadAt};

/// Most extended boot records followed (logical partitions 5 ..= 260).
pub const MAX_EBRS: usize = 256;

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
        let mut seen = std::collections::BTreeSet::new();
        loop {
            if !seen.insert(ebr_rel) {
                return Err(invalid(format!(
                    "the chain of extended boot records loops back to sector {}",
                    base + ebr_rel
                )));
            }
            if seen.len() > MAX_EBRS {
                return Err(invalid(format!(
                    "the chain of extended boot records is longer than {MAX_EBRS}"
                )));
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

/// CHS address of an LBA in the conventional 255-head, 63-sector geometry,
/// as the three bytes of a partition record; LBAs past cylinder 1023 get
/// the customary 1023/254/63 marker.
pub(super) fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let cyl = lba / (HEADS * SECTORS);
    if cyl > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    let head = (lba / SECTORS) % HEADS;
    let sector = lba % SECTORS + 1;
    [
        head as u8,
        (sector as u8) | (((cyl >> 2) & 0xc0) as u8),
        (cyl & 0xff) as u8,
    ]
}

fn unwritable(why: impl Into<String>) -> TableError {
    TableError::Unwritable {
        kind: "MBR",
        why: why.into(),
    }
}

/// Parse an MBR type as tables hold it (`0x83`, also `83`).
pub(super) fn parse_type(s: &str) -> Option<u8> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if hex.is_empty() || hex.len() > 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Parse an MBR disk signature (`0x1234abcd`).
pub(super) fn parse_signature(s: &str) -> Option<u32> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if hex.is_empty() || hex.len() > 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// A partition in sectors, checked for writing.
struct Rec<'a> {
    p: &'a Partition,
    code: u8,
    lba: u64,
    count: u64,
}

struct Checked<'a> {
    primaries: Vec<Rec<'a>>,
    extended: Option<(u64, u64)>,
    logicals: Vec<Rec<'a>>,
    /// EBR positions (absolute LBA), one per logical, in chain order.
    ebrs: Vec<u64>,
}

fn check(t: &PartitionTable, disk_size: u64) -> Result<Checked<'_>, TableError> {
    let ss = u64::from(t.sector_size);
    let sectors = disk_size / ss;
    if !t.disk_id.is_empty() && parse_signature(&t.disk_id).is_none() {
        return Err(unwritable(format!(
            "disk signature {:?} is not a 32-bit hex number",
            t.disk_id
        )));
    }
    let mut primaries = Vec::new();
    let mut logicals = Vec::new();
    let mut extended = None;
    for p in &t.partitions {
        let n = p.number;
        let bad = |why: String| unwritable(format!("partition {n}: {why}"));
        let code = parse_type(&p.ptype)
            .ok_or_else(|| bad(format!("type {:?} is not an MBR type byte", p.ptype)))?;
        if code == 0 {
            return Err(bad("type 0 marks an unused entry".into()));
        }
        if p.guid.is_some() || p.name.is_some() || p.attributes != 0 {
            return Err(bad("GUIDs, names and attributes exist only on GPT".into()));
        }
        if p.extended != is_extended(code) {
            return Err(bad(format!(
                "type 0x{code:02x} and the extended flag disagree"
            )));
        }
        let lba = p.start / ss;
        let count = p.size / ss;
        if lba == 0 {
            return Err(bad("it starts in sector 0, over the MBR".into()));
        }
        if lba + count > sectors {
            return Err(bad(format!(
                "sectors {lba}+{count} do not fit the disk ({sectors} sectors)"
            )));
        }
        if lba > u64::from(u32::MAX) || count > u64::from(u32::MAX) {
            return Err(bad(
                "it lies beyond the 2^32-sector limit of MBR (use GPT)".into()
            ));
        }
        let rec = Rec {
            p,
            code,
            lba,
            count,
        };
        match n {
            1..=4 => {
                if p.extended {
                    if extended.is_some() {
                        return Err(bad("a second extended partition".into()));
                    }
                    extended = Some((lba, count));
                }
                primaries.push(rec);
            }
            _ if p.extended => {
                return Err(bad("an extended partition must be numbered 1 to 4".into()))
            }
            _ => logicals.push(rec),
        }
    }
    logicals.sort_by_key(|r| r.p.number);
    let mut ebrs = Vec::new();
    if !logicals.is_empty() {
        let (ext_lba, ext_count) = extended.ok_or_else(|| {
            unwritable(format!(
                "partition {} is logical (numbers above 4) but there is no extended partition",
                logicals[0].p.number
            ))
        })?;
        let mut next_ebr = ext_lba;
        for (i, r) in logicals.iter().enumerate() {
            let n = r.p.number;
            if n != 5 + i as u32 {
                return Err(unwritable(format!(
                    "logical partitions must be numbered 5, 6, … without gaps (found {n} in place of {})",
                    5 + i
                )));
            }
            if r.lba <= next_ebr {
                return Err(unwritable(format!(
                    "partition {n}: it must start after sector {next_ebr}, which holds its extended boot record (logical partitions in disk order, each preceded by a free sector)"
                )));
            }
            if r.lba + r.count > ext_lba + ext_count {
                return Err(unwritable(format!(
                    "partition {n}: it does not fit inside the extended partition"
                )));
            }
            ebrs.push(next_ebr);
            next_ebr = r.lba + r.count;
        }
    }
    Ok(Checked {
        primaries,
        extended,
        logicals,
        ebrs,
    })
}

/// Check an MBR for writing to a disk of `disk_size` bytes.
pub(super) fn validate(t: &PartitionTable, disk_size: u64) -> Result<(), TableError> {
    check(t, disk_size).map(|_| ())
}

fn record(out: &mut [u8], boot: bool, code: u8, lba: u64, count: u64, rel_lba: u64) {
    out[0] = if boot { 0x80 } else { 0 };
    out[1..4].copy_from_slice(&chs(lba));
    out[4] = code;
    out[5..8].copy_from_slice(&chs(lba + count - 1));
    out[8..12].copy_from_slice(&(rel_lba as u32).to_le_bytes());
    out[12..16].copy_from_slice(&(count as u32).to_le_bytes());
}

pub(super) fn write(dev: &Device, t: &PartitionTable) -> Result<PartitionTable, TableError> {
    let c = check(t, dev.size())?;
    let ss = u64::from(t.sector_size);
    let sig = match parse_signature(&t.disk_id) {
        Some(s) if s != 0 => s,
        _ => {
            let mut s = 0u32;
            while s == 0 {
                let g = super::gpt::random_guid()?;
                s = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
            }
            s
        }
    };
    let mut sector0 = vec![0u8; ss as usize];
    dev.read_exact_at(&mut sector0[..440], 0)?;
    sector0[440..444].copy_from_slice(&sig.to_le_bytes());
    for r in &c.primaries {
        let at = 446 + (r.p.number as usize - 1) * 16;
        record(
            &mut sector0[at..at + 16],
            r.p.bootable,
            r.code,
            r.lba,
            r.count,
            r.lba,
        );
    }
    sector0[510] = 0x55;
    sector0[511] = 0xaa;

    let mut ebr_sectors = Vec::new();
    if let Some((ext_lba, _)) = c.extended {
        if c.logicals.is_empty() {
            let mut e = vec![0u8; ss as usize];
            e[510] = 0x55;
            e[511] = 0xaa;
            ebr_sectors.push((ext_lba, e));
        }
        for (i, r) in c.logicals.iter().enumerate() {
            let ebr = c.ebrs[i];
            let mut e = vec![0u8; ss as usize];
            record(
                &mut e[446..462],
                r.p.bootable,
                r.code,
                r.lba,
                r.count,
                r.lba - ebr,
            );
            if let (Some(next), Some(next_ebr)) = (c.logicals.get(i + 1), c.ebrs.get(i + 1)) {
                let span = next.lba + next.count - next_ebr;
                record(
                    &mut e[462..478],
                    false,
                    0x05,
                    *next_ebr,
                    span,
                    next_ebr - ext_lba,
                );
            }
            e[510] = 0x55;
            e[511] = 0xaa;
            ebr_sectors.push((ebr, e));
        }
    }

    super::wipe_signatures(dev)?;
    for (lba, e) in &ebr_sectors {
        super::put(dev, e, lba * ss)?;
    }
    super::put(dev, &sector0, 0)?;
    super::sync(dev)?;
    let mut written = t.clone();
    written.kind = TableKind::Mbr;
    written.disk_id = format!("0x{sig:08x}");
    written.first_usable_lba = None;
    written.last_usable_lba = None;
    for p in &mut written.partitions {
        if let Some(code) = parse_type(&p.ptype) {
            p.ptype = format!("0x{code:02x}");
        }
    }
    written.partitions.sort_by_key(|p| p.number);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_of_small_and_large_lbas() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(u64::from(u32::MAX)), [0xfe, 0xff, 0xff]);
    }
}
