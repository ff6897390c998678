//! NTFS used maps, proved on volumes made by `mkntfs` and filled through
//! ntfs-3g: the used-ranges copy passes `ntfsfix -n`, mounts, and every
//! file equals the source's; the count equals partclone.ntfs's used
//! clusters plus the backup boot sector (which partclone's cluster bitmap
//! cannot express: it lies after the last cluster).

mod common;

use std::fs;
use std::path::Path;

use aula_imager::fs::{detect, used_map, FsError, MapOptions};
use common::*;

const MIB: u64 = 1 << 20;

fn make_ntfs(dir: &Path, size: u64, fill: bool) -> std::path::PathBuf {
    let img = dir.join("ntfs.img");
    sparse_file(&img, size);
    fill_garbage(&img, 0, size, 0x47f5);
    run_status("mkntfs", &["-F", "-Q", "-q", "-L", "Aula Vol", s(&img)]);
    assert_eq!(&peek(&img, 3, 8), b"NTFS    ", "mkntfs made no volume");
    if fill {
        let m = FuseMount::ntfs(&img, &dir.join("mnt"), false);
        make_tree(&m.dir.join("tree"), 300, 200_000, 23);
        for i in (0..300).step_by(4) {
            fs::remove_file(m.dir.join(format!("tree/d{}/sub{}/f{i}.bin", i % 5, i % 3)))
                .expect("rm");
        }
        let mut big = vec![0u8; 9 << 20];
        Rng(5).fill(&mut big);
        fs::write(m.dir.join("big.bin"), &big).expect("big");
        m.umount();
    }
    img
}

#[test]
fn ntfs_map_copy_is_consistent_complete_and_partclone_plus_backup_boot_sector() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 96 * MIB;
    let img = make_ntfs(dir.path(), size, true);
    let map = used_map(&region(&img, 0, None), MapOptions::default())
        .expect("map")
        .expect("ntfs");
    assert_eq!(map.meta.fstype, "ntfs");
    assert_eq!(map.meta.label.as_deref(), Some("Aula Vol"));
    let used = map.used.used_bytes();
    // The backup boot sector (last sector) is kept.
    assert!(map.used.touches(size - 512, 512));

    let copy = dir.path().join("copy.img");
    copy_used(&img, 0, &map.used, &copy);
    let (ok, out) = run_status("ntfsfix", &["-n", s(&copy)]);
    assert!(ok, "ntfsfix -n on the used-ranges copy failed:\n{out}");
    {
        let a = FuseMount::ntfs(&img, &dir.path().join("a"), true);
        let b = FuseMount::ntfs(&copy, &dir.path().join("b"), true);
        assert_trees_equal(&a.dir, &b.dir);
        assert!(a.dir.join("tree/d1/sub1/f1.bin").exists());
    }

    let pc = partclone_header("partclone.ntfs", &img, dir.path());
    note(&format!(
        "ntfs: used {used} bytes ({} extents); partclone {} clusters x {} = {} (+512 backup boot sector)",
        map.used.len(),
        pc.used_blocks,
        pc.block_size,
        pc.used_blocks * pc.block_size
    ));
    assert_eq!(used, pc.used_blocks * pc.block_size + 512);
}

#[test]
fn ntfs_detection_matches_blkid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_ntfs(dir.path(), 16 * MIB, false);
    let m = detect(&region(&img, 0, None))
        .expect("detect")
        .expect("ntfs");
    let uuid = run("blkid", &["-p", "-o", "value", "-s", "UUID", s(&img)]);
    let label = run("blkid", &["-p", "-o", "value", "-s", "LABEL", s(&img)]);
    assert_eq!(m.fstype, "ntfs");
    assert_eq!(m.uuid.as_deref(), Some(uuid.trim()));
    assert_eq!(m.label.as_deref(), Some(label.trim()));
    assert_eq!(m.uuid.as_ref().map(|u| u.len()), Some(16));
}

/// Offset of `$Volume`'s `$VOLUME_INFORMATION` flags, found by walking the
/// record the way the format describes (independently of the library).
fn volume_flags_offset(img: &Path) -> u64 {
    let b = peek(img, 0, 512);
    let bps = u64::from(u16::from_le_bytes([b[0x0B], b[0x0C]]));
    let cluster = bps * u64::from(b[0x0D]);
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().expect("8")) * cluster;
    let rec_at = mft + 3 * 1024;
    let rec = peek(img, rec_at, 1024);
    assert_eq!(&rec[0..4], b"FILE");
    let mut pos = usize::from(u16::from_le_bytes([rec[0x14], rec[0x15]]));
    loop {
        let ty = u32::from_le_bytes(rec[pos..pos + 4].try_into().expect("4"));
        assert_ne!(ty, 0xFFFF_FFFF, "no $VOLUME_INFORMATION");
        let len = u32::from_le_bytes(rec[pos + 4..pos + 8].try_into().expect("4")) as usize;
        if ty == 0x70 {
            let voff = usize::from(u16::from_le_bytes([rec[pos + 0x14], rec[pos + 0x15]]));
            let at = pos + voff + 10;
            assert!(at < 510, "flags must not sit under a fixup");
            return rec_at + at as u64;
        }
        pos += len;
    }
}

#[test]
fn ntfs_dirty_volume_is_unclean_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_ntfs(dir.path(), 16 * MIB, false);
    assert!(used_map(&region(&img, 0, None), MapOptions::default()).is_ok());
    let at = volume_flags_offset(&img);
    let f = peek(&img, at, 2);
    poke(&img, at, &[f[0] | 1, f[1]]);
    let (_, out) = run_status("ntfsfix", &["-n", s(&img)]);
    note(&format!(
        "ntfsfix on the dirty volume: {}",
        out.lines().last().unwrap_or("")
    ));
    match used_map(&region(&img, 0, None), MapOptions::default()) {
        Err(FsError::Unclean { why, .. }) => assert!(why.contains("dirty"), "{why}"),
        other => panic!("expected Unclean, got {other:?}"),
    }
    assert!(used_map(&region(&img, 0, None), MapOptions { force: true }).is_ok());
}

#[test]
fn ntfs_torn_mft_record_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_ntfs(dir.path(), 16 * MIB, false);
    let b = peek(&img, 0, 512);
    let cluster = u64::from(u16::from_le_bytes([b[0x0B], b[0x0C]])) * u64::from(b[0x0D]);
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().expect("8")) * cluster;
    // Break the update sequence check value at the end of record 6's first
    // stride.
    let at = mft + 6 * 1024 + 510;
    let v = peek(&img, at, 2);
    poke(&img, at, &[v[0] ^ 0xFF, v[1]]);
    match used_map(&region(&img, 0, None), MapOptions::default()) {
        Err(FsError::Corrupt { why, .. }) => assert!(why.contains("record 6"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}
