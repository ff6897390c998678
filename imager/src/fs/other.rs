//! Detection only (no used-block walker): exFAT, XFS, btrfs, Linux swap.

use crate::device::ReadAt;

use super::{le16, le32, le64, trim_label, until_nul, FsError, FsMeta};

/// The static name used in errors for a detected type.
pub(super) fn static_name(fstype: &str) -> &'static str {
    match fstype {
        "exfat" => "exfat",
        "xfs" => "xfs",
        "btrfs" => "btrfs",
        "swap" => "swap",
        _ => "unknown",
    }
}

/// `XXXX-XXXX`, upper-case hex, as blkid prints FAT and exFAT serials.
pub(super) fn format_serial(v: u32) -> String {
    format!("{:04X}-{:04X}", v >> 16, v & 0xffff)
}

/// exFAT: `EXFAT   ` in the boot sector; the label comes from the root
/// directory's volume-label entry (type 0x83), the UUID from the serial.
pub(super) fn exfat(boot: &[u8; 512]) -> Option<FsMeta> {
    if &boot[3..11] != b"EXFAT   " {
        return None;
    }
    let bps_shift = u32::from(boot[0x6C]);
    let spc_shift = u32::from(boot[0x6D]);
    let block_size = 1u64
        .checked_shl(bps_shift + spc_shift)
        .and_then(|b| u32::try_from(b).ok());
    let fs_size = le64(boot, 0x48).checked_mul(1u64.checked_shl(bps_shift).unwrap_or(0));
    Some(FsMeta {
        fstype: "exfat".into(),
        label: None,
        uuid: Some(format_serial(le32(boot, 0x64))),
        block_size,
        fs_size,
    })
}

/// Fills in the exFAT label from the first cluster of the root directory.
pub(super) fn exfat_label(src: &dyn ReadAt, boot: &[u8; 512]) -> Option<String> {
    let bps_shift = u32::from(boot[0x6C]);
    let spc_shift = u32::from(boot[0x6D]);
    if !(9..=12).contains(&bps_shift) || spc_shift > 25 - bps_shift {
        return None;
    }
    let sector = 1u64 << bps_shift;
    let cluster = sector << spc_shift;
    let heap = u64::from(le32(boot, 0x58)) * sector;
    let root = u64::from(le32(boot, 0x60));
    if root < 2 {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(cluster.min(1 << 20)).ok()?];
    src.read_exact_at(&mut buf, heap + (root - 2) * cluster)
        .ok()?;
    for e in buf.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0x83 => {
                let n = usize::from(e[1]).min(11);
                let units: Vec<u16> = (0..n).map(|i| le16(e, 2 + 2 * i)).collect();
                return Some(trim_label(&String::from_utf16_lossy(&units)));
            }
            _ => {}
        }
    }
    None
}

/// XFS: big-endian superblock at 0 with magic `XFSB`.
pub(super) fn xfs(src: &dyn ReadAt) -> Result<Option<FsMeta>, FsError> {
    if src.size() < 512 {
        return Ok(None);
    }
    let mut sb = [0u8; 512];
    src.read_exact_at(&mut sb, 0)?;
    if &sb[0..4] != b"XFSB" {
        return Ok(None);
    }
    let be32 = |o: usize| u32::from_be_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
    let bs = be32(4);
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[32..48]);
    let label = trim_label(&String::from_utf8_lossy(until_nul(&sb[108..120])));
    Ok(Some(FsMeta {
        fstype: "xfs".into(),
        label: (!label.is_empty()).then_some(label),
        uuid: Some(super::ext::format_uuid(&uuid)),
        block_size: Some(bs),
        fs_size: be64(8).checked_mul(u64::from(bs)),
    }))
}

/// btrfs: superblock at 64 KiB with magic `_BHRfS_M`.
pub(super) fn btrfs(src: &dyn ReadAt) -> Result<Option<FsMeta>, FsError> {
    const AT: u64 = 0x10000;
    if src.size() < AT + 4096 {
        return Ok(None);
    }
    let mut sb = vec![0u8; 4096];
    src.read_exact_at(&mut sb, AT)?;
    if &sb[0x40..0x48] != b"_BHRfS_M" {
        return Ok(None);
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x20..0x30]);
    let label = trim_label(&String::from_utf8_lossy(until_nul(&sb[0x12B..0x12B + 256])));
    Ok(Some(FsMeta {
        fstype: "btrfs".into(),
        label: (!label.is_empty()).then_some(label),
        uuid: Some(super::ext::format_uuid(&uuid)),
        block_size: Some(le32(&sb, 0x90)),
        fs_size: Some(le64(&sb, 0x70)),
    }))
}

/// Linux swap: `SWAPSPACE2` (or the old `SWAP-SPACE`) in the last ten bytes
/// of the first page, for page sizes 4 KiB to 64 KiB. Returns the metadata
/// and the page size (the header's extent).
pub(super) fn swap(src: &dyn ReadAt) -> Result<Option<(FsMeta, u64)>, FsError> {
    for page in [4096u64, 8192, 16384, 32768, 65536] {
        if src.size() < page {
            break;
        }
        let mut sig = [0u8; 10];
        src.read_exact_at(&mut sig, page - 10)?;
        if &sig != b"SWAPSPACE2" && &sig != b"SWAP-SPACE" {
            continue;
        }
        let mut meta = FsMeta {
            fstype: "swap".into(),
            label: None,
            uuid: None,
            block_size: u32::try_from(page).ok(),
            fs_size: None,
        };
        if &sig == b"SWAPSPACE2" {
            let mut h = [0u8; 128];
            src.read_exact_at(&mut h, 1024)?;
            let last_page = u64::from(le32(&h, 4));
            meta.fs_size = (last_page + 1).checked_mul(page);
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&h[12..28]);
            if uuid != [0u8; 16] {
                meta.uuid = Some(super::ext::format_uuid(&uuid));
            }
            let label = trim_label(&String::from_utf8_lossy(until_nul(&h[28..44])));
            meta.label = (!label.is_empty()).then_some(label);
        }
        return Ok(Some((meta, page)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_xfs_superblock_is_recognised_with_uuid_label_and_size() {
        let mut img = vec![0u8; 4096];
        img[0..4].copy_from_slice(b"XFSB");
        img[4..8].copy_from_slice(&4096u32.to_be_bytes());
        img[8..16].copy_from_slice(&1000u64.to_be_bytes());
        for (i, b) in img[32..48].iter_mut().enumerate() {
            *b = i as u8;
        }
        img[108..112].copy_from_slice(b"data");
        let m = xfs(&img).expect("read").expect("xfs");
        assert_eq!(m.fstype, "xfs");
        assert_eq!(m.label.as_deref(), Some("data"));
        assert_eq!(
            m.uuid.as_deref(),
            Some("00010203-0405-0607-0809-0a0b0c0d0e0f")
        );
        assert_eq!(m.fs_size, Some(4096 * 1000));
        img[0] = b'Y';
        assert!(xfs(&img).expect("read").is_none());
    }

    #[test]
    fn crafted_btrfs_superblock_is_recognised() {
        let mut img = vec![0u8; 0x10000 + 4096];
        let sb = 0x10000;
        img[sb + 0x40..sb + 0x48].copy_from_slice(b"_BHRfS_M");
        img[sb + 0x20] = 0xab;
        img[sb + 0x70..sb + 0x78].copy_from_slice(&(1u64 << 30).to_le_bytes());
        img[sb + 0x90..sb + 0x94].copy_from_slice(&4096u32.to_le_bytes());
        img[sb + 0x12B..sb + 0x12B + 4].copy_from_slice(b"root");
        let m = btrfs(&img).expect("read").expect("btrfs");
        assert_eq!(m.label.as_deref(), Some("root"));
        assert_eq!(
            m.uuid.as_deref(),
            Some("ab000000-0000-0000-0000-000000000000")
        );
        assert_eq!(m.fs_size, Some(1 << 30));
    }

    #[test]
    fn crafted_exfat_boot_sector_gives_serial_and_label() {
        let mut img = vec![0u8; 64 * 1024];
        img[3..11].copy_from_slice(b"EXFAT   ");
        img[0x48..0x50].copy_from_slice(&128u64.to_le_bytes()); // sectors
        img[0x58..0x5C].copy_from_slice(&32u32.to_le_bytes()); // heap at sector 32
        img[0x60..0x64].copy_from_slice(&4u32.to_le_bytes()); // root cluster 4
        img[0x64..0x68].copy_from_slice(&0x1234_ABCDu32.to_le_bytes());
        img[0x6C] = 9; // 512-byte sectors
        img[0x6D] = 3; // 8 sectors per cluster
        let root = 32 * 512 + 2 * 4096;
        img[root] = 0x83;
        img[root + 1] = 3;
        for (i, c) in "USB".encode_utf16().enumerate() {
            img[root + 2 + 2 * i..root + 4 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let mut boot = [0u8; 512];
        boot.copy_from_slice(&img[..512]);
        let m = exfat(&boot).expect("exfat");
        assert_eq!(m.uuid.as_deref(), Some("1234-ABCD"));
        assert_eq!(m.block_size, Some(4096));
        assert_eq!(m.fs_size, Some(128 * 512));
        assert_eq!(exfat_label(&img, &boot).as_deref(), Some("USB"));
    }
}
