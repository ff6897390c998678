//! Whole-disk layouts (Clonezilla savedisk, FOG): the saved boot areas
//! are laid out on a virtual disk of the original size (zeros elsewhere),
//! whose partition table is then read by the same code that reads real
//! disks.

use std::io;

use crate::device::ReadAt;
use crate::table::{PartitionTable, TableKind};

use super::ImportError;

const SECTOR: u64 = 512;
const GPT_SIG: &[u8; 8] = b"EFI PART";

/// Head bytes at 0, tail bytes at the end, zeros between.
#[derive(Debug, Clone)]
pub struct VirtualDisk {
    head: Vec<u8>,
    tail: Vec<u8>,
    size: u64,
}

impl VirtualDisk {
    /// `head` at 0 and `tail` ending at `size` (both cut to fit).
    pub fn new(mut head: Vec<u8>, mut tail: Vec<u8>, size: u64) -> VirtualDisk {
        head.truncate(size as usize);
        if tail.len() as u64 > size {
            let cut = tail.len() - size as usize;
            tail.drain(..cut);
        }
        VirtualDisk { head, tail, size }
    }
}

impl ReadAt for VirtualDisk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the disk's end"))?;
        buf.fill(0);
        let h = self.head.len() as u64;
        if offset < h {
            let n = (h.min(end) - offset) as usize;
            buf[..n].copy_from_slice(&self.head[offset as usize..offset as usize + n]);
        }
        let t0 = self.size - self.tail.len() as u64;
        if end > t0 {
            let from = offset.max(t0);
            let dst = (from - offset) as usize;
            let src = (from - t0) as usize;
            let n = (end - from) as usize;
            buf[dst..dst + n].copy_from_slice(&self.tail[src..src + n]);
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.size
    }
}

fn u32at(b: &[u8], o: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
}
fn u64at(b: &[u8], o: usize) -> u64 {
    u32at(b, o) | (u32at(b, o + 4) << 32)
}

/// A disk built from saved boot areas, with its table read back.
#[derive(Debug, Clone)]
pub struct SavedDisk {
    /// The virtual disk.
    pub disk: VirtualDisk,
    /// Its partition table.
    pub table: PartitionTable,
}

/// Lays out `head` and `tail` on a disk of the size their table implies
/// (GPT: the backup header's LBA; MBR: the end of the last partition) and
/// reads the table.
pub fn saved_disk(head: Vec<u8>, tail: Vec<u8>, what: &str) -> Result<SavedDisk, ImportError> {
    let bad = |why: String| ImportError::Invalid(format!("{what}: {why}"));
    if head.len() < 512 || head[510..512] != [0x55, 0xAA] {
        return Err(bad("no MBR (boot signature 55 AA missing)".into()));
    }
    let gpt = head.len() >= 1024 && &head[512..520] == GPT_SIG;
    let (size, tail) = if gpt {
        let alt = u64at(&head, 512 + 32);
        let size = alt
            .checked_add(1)
            .and_then(|s| s.checked_mul(SECTOR))
            .filter(|&s| s <= crate::manifest::MAX_SOURCE_SIZE)
            .ok_or_else(|| bad(format!("backup GPT header at LBA {alt}")))?;
        if tail.len() < 512 || &tail[tail.len() - 512..tail.len() - 504] != GPT_SIG {
            return Err(bad(
                "the saved end of the disk holds no backup GPT header".into()
            ));
        }
        let mut tail = tail;
        complete_backup_entries(&head, &mut tail, size).map_err(bad)?;
        (size, tail)
    } else {
        let mut end = head.len() as u64;
        for i in 0..4 {
            let e = &head[446 + 16 * i..462 + 16 * i];
            let (ptype, start, count) = (e[4], u32at(e, 8), u32at(e, 12));
            if ptype == 0 {
                continue;
            }
            if matches!(ptype, 0x05 | 0x0F | 0x85) {
                return Err(bad(
                    "an extended partition: logical partitions cannot be imported (their boot records were not saved)".into(),
                ));
            }
            end = end.max((start + count) * SECTOR);
        }
        (end, tail)
    };
    if (head.len() + tail.len()) as u64 > size {
        return Err(bad(format!(
            "saved areas of {} bytes do not fit a disk of {size} bytes",
            head.len() + tail.len()
        )));
    }
    let disk = VirtualDisk { head, tail, size };
    let table = crate::table::read(&disk, Some(512))
        .map_err(|e| bad(format!("reading the saved partition table: {e}")))?
        .ok_or_else(|| bad("no partition table in the saved boot area".into()))?;
    if gpt != (table.kind == TableKind::Gpt) {
        return Err(bad("the saved table is neither a valid GPT nor MBR".into()));
    }
    Ok(SavedDisk { disk, table })
}

/// Clonezilla 5.3's `<disk>-gpt-2nd` may hold one sector less than the
/// backup entry array plus header (it reads from one sector too far). The
/// backup array is a copy of the primary one: the missing leading bytes
/// are taken from it, and the whole array must match the backup header's
/// CRC32.
fn complete_backup_entries(head: &[u8], tail: &mut Vec<u8>, size: u64) -> Result<(), String> {
    let bh = tail[tail.len() - 512..].to_vec();
    let b_entries = u64at(&bh, 72);
    let n = u32at(&bh, 80);
    let esz = u32at(&bh, 84);
    let want_crc = u32at(&bh, 88);
    let elen = n
        .checked_mul(esz)
        .filter(|&l| l <= 1 << 20)
        .ok_or_else(|| format!("backup GPT: {n} entries of {esz} bytes"))?;
    let need = size
        .checked_sub(b_entries.saturating_mul(SECTOR))
        .filter(|&l| l <= 64 << 20 && l >= elen + 512)
        .ok_or_else(|| format!("backup GPT entries at LBA {b_entries}"))?;
    if (tail.len() as u64) < need {
        let missing = (need - tail.len() as u64) as usize;
        let p_entries = (u64at(head, 512 + 72) * SECTOR) as usize;
        let from = head
            .get(p_entries..p_entries + missing)
            .ok_or("the saved GPT areas miss part of the backup entry array")?;
        let mut t = from.to_vec();
        t.extend_from_slice(tail);
        *tail = t;
    }
    let start = tail.len() - need as usize;
    let got = u64::from(crc32fast::hash(&tail[start..start + elen as usize]));
    if got != want_crc {
        return Err("the backup GPT entry array does not match its header's CRC32".into());
    }
    Ok(())
}

/// Converts a `sgdisk -b` backup (protective MBR, main header, backup
/// header, entries) into the head and tail of the disk it came from;
/// `None` when `b` is not one (a plain MBR dump).
pub fn from_sgdisk_backup(b: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if b.len() < 1536 || &b[512..520] != GPT_SIG || &b[1024..1032] != GPT_SIG {
        return None;
    }
    let main = &b[512..1024];
    let backup = &b[1024..1536];
    let entries_lba = u64at(main, 72);
    let n = u32at(main, 80);
    let esz = u32at(main, 84);
    let alt = u64at(main, 32);
    let bentries_lba = u64at(backup, 72);
    let elen = usize::try_from(n.checked_mul(esz)?).ok()?;
    let entries = b.get(1536..1536 + elen)?;
    if entries_lba > 64 || bentries_lba >= alt || alt - bentries_lba > 64 {
        return None;
    }
    let mut head = vec![0u8; (entries_lba * SECTOR) as usize + elen];
    head[..512].copy_from_slice(&b[..512]);
    head[512..1024].copy_from_slice(main);
    head[(entries_lba * SECTOR) as usize..].copy_from_slice(entries);
    let tail_len = ((alt + 1 - bentries_lba) * SECTOR) as usize;
    let mut tail = vec![0u8; tail_len];
    tail[..elen.min(tail_len - 512)].copy_from_slice(&entries[..elen.min(tail_len - 512)]);
    tail[tail_len - 512..].copy_from_slice(backup);
    Some((head, tail))
}
