//! ext2/3/4 used maps, proved on real filesystems: copying only the mapped
//! ranges onto a zeroed file must give a filesystem that `e2fsck -fn`
//! accepts and whose every file matches the source, and the used byte count
//! must equal what partclone (libext2fs) reports for the same filesystem.

mod common;

use std::fs;
use std::time::Instant;

use aula_imager::fs::{detect, used_map, FsError, MapOptions};
use common::*;

const MIB: u64 = 1 << 20;

struct Proved {
    used: u64,
    partclone_used: u64,
    fstype: String,
}

/// Builds a filesystem with `mkfs` + `args` on a garbage-filled file, fills
/// it (via `-d`, then optionally a loop mount adding and deleting files),
/// maps it, and proves the map.
fn prove(tag: &str, mkfs: &str, args: &[&str], size: u64, modify: bool) -> Proved {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("src.img");
    sparse_file(&img, size);
    fill_garbage(&img, 0, size.min(160 * MIB), 0x5eed ^ size);
    let tree = dir.path().join("tree");
    make_tree(&tree, 60, 400_000, 7);
    let mut a: Vec<&str> = vec!["-q", "-F", "-E", "nodiscard", "-d", s(&tree)];
    a.extend_from_slice(args);
    a.push(s(&img));
    run(mkfs, &a);

    if modify {
        let m = Mount::new(&img, &dir.path().join("mnt"), None, "");
        make_tree(&m.dir.join("extra"), 40, 600_000, 99);
        // Delete a third of the original files: their blocks keep stale data.
        for i in (0..60).step_by(3) {
            let _ = fs::remove_file(m.dir.join(format!("d{}/sub{}/f{i}.bin", i % 5, i % 3)));
        }
        // A big file spanning several groups.
        let mut big = vec![0u8; 24 << 20];
        Rng(3).fill(&mut big);
        fs::write(m.dir.join("big.bin"), &big).expect("big file");
        run("sync", &[]);
        m.umount();
    }

    let src = region(&img, 0, None);
    let t = Instant::now();
    let map = used_map(&src, MapOptions::default())
        .expect("map")
        .expect("recognised");
    let took = t.elapsed();
    let used = map.used.used_bytes();
    assert!(
        used > 0 && used < size,
        "{tag}: implausible used bytes {used}"
    );
    assert!(map.used.end() <= map.meta.fs_size.expect("fs size"));

    let copy = dir.path().join("copy.img");
    copy_used(&img, 0, &map.used, &copy);
    let (ok, out) = run_status("e2fsck", &["-fn", s(&copy)]);
    assert!(ok, "{tag}: e2fsck on the used-ranges copy failed:\n{out}");

    let a = Mount::new(&img, &dir.path().join("a"), None, "ro");
    let b = Mount::new(&copy, &dir.path().join("b"), None, "ro");
    assert_trees_equal(&a.dir, &b.dir);
    drop(b);
    drop(a);

    let pc = partclone_header("partclone.extfs", &img, dir.path());
    let partclone_used = pc.used_blocks * pc.block_size;
    note(&format!(
        "{tag}: {} used {used} bytes ({} extents) in {took:?}; partclone {} blocks x {} = {partclone_used}",
        map.meta.fstype,
        map.used.len(),
        pc.used_blocks,
        pc.block_size
    ));
    Proved {
        used,
        partclone_used,
        fstype: map.meta.fstype,
    }
}

#[test]
fn ext4_default_4k_with_deleted_files_maps_exactly_partclones_blocks() {
    let p = prove("ext4-4k", "mkfs.ext4", &["-b", "4096"], 160 * MIB, true);
    assert_eq!(p.fstype, "ext4");
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext4_1k_blocks_keeps_the_boot_block_and_matches_partclone() {
    let p = prove("ext4-1k", "mkfs.ext4", &["-b", "1024"], 96 * MIB, true);
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext4_without_flex_bg_matches_partclone() {
    let p = prove(
        "ext4-noflex",
        "mkfs.ext4",
        &["-b", "4096", "-O", "^flex_bg"],
        160 * MIB,
        true,
    );
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext4_uninit_bg_without_metadata_csum_matches_partclone() {
    let p = prove(
        "ext4-uninit_bg",
        "mkfs.ext4",
        &["-b", "4096", "-O", "^metadata_csum,uninit_bg"],
        160 * MIB,
        true,
    );
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext2_matches_partclone() {
    let p = prove("ext2", "mkfs.ext2", &[], 64 * MIB, true);
    assert_eq!(p.fstype, "ext2");
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext3_matches_partclone() {
    let p = prove("ext3", "mkfs.ext4", &["-t", "ext3"], 96 * MIB, true);
    assert_eq!(p.fstype, "ext3");
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext4_64bit_meta_bg_matches_partclone() {
    let p = prove(
        "ext4-meta_bg",
        "mkfs.ext4",
        &["-b", "1024", "-O", "64bit,meta_bg,^resize_inode"],
        128 * MIB,
        true,
    );
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn ext4_sparse_super2_matches_partclone() {
    let p = prove(
        "ext4-sparse_super2",
        "mkfs.ext4",
        &["-b", "1024", "-O", "sparse_super2,^resize_inode"],
        64 * MIB,
        false,
    );
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn large_sparse_ext4_with_many_block_uninit_groups_matches_partclone() {
    // 6 GiB, no flex_bg: each BLOCK_UNINIT group holds its own bitmaps and
    // inode table, and many carry superblock + descriptor backups.
    let p = prove(
        "ext4-6g-uninit",
        "mkfs.ext4",
        &["-b", "4096", "-O", "^flex_bg", "-E", "lazy_itable_init=1"],
        6 << 30,
        false,
    );
    assert_eq!(p.used, p.partclone_used);
    let p = prove("ext4-6g-flex", "mkfs.ext4", &["-b", "4096"], 6 << 30, false);
    assert_eq!(p.used, p.partclone_used);
    let p = prove(
        "ext4-6g-uninit_bg",
        "mkfs.ext4",
        &["-b", "4096", "-O", "^flex_bg,^metadata_csum,uninit_bg"],
        6 << 30,
        false,
    );
    assert_eq!(p.used, p.partclone_used);
}

#[test]
fn map_of_a_4_gib_ext4_takes_milliseconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("big.img");
    sparse_file(&img, 4 << 30);
    run("mkfs.ext4", &["-q", "-F", s(&img)]);
    let src = region(&img, 0, None);
    // Warm the page cache, then time.
    used_map(&src, MapOptions::default())
        .expect("map")
        .expect("ext4");
    let t = Instant::now();
    let map = used_map(&src, MapOptions::default())
        .expect("map")
        .expect("ext4");
    let took = t.elapsed();
    note(&format!(
        "4 GiB ext4: {} extents, {} used bytes, {took:?}",
        map.used.len(),
        map.used.used_bytes()
    ));
    assert!(took.as_millis() < 300, "map took {took:?}");
}

#[test]
fn bigalloc_is_refused_as_unsupported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("b.img");
    sparse_file(&img, 64 * MIB);
    run(
        "mkfs.ext4",
        &["-q", "-F", "-O", "bigalloc", "-C", "16384", s(&img)],
    );
    let src = region(&img, 0, None);
    let meta = detect(&src).expect("detect").expect("recognised");
    assert_eq!(meta.fstype, "ext4");
    match used_map(&src, MapOptions { force: true }) {
        Err(FsError::Unsupported { feature, .. }) => {
            assert!(feature.contains("bigalloc"), "{feature}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn mounted_ext4_is_unclean_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("m.img");
    sparse_file(&img, 64 * MIB);
    run("mkfs.ext4", &["-q", "-F", s(&img)]);
    let m = Mount::new(&img, &dir.path().join("mnt"), None, "");
    fs::write(m.dir.join("x"), b"hello").expect("write");
    run("sync", &[]);
    // The image as it is while mounted: journal needs recovery.
    let snap = dir.path().join("snap.img");
    fs::copy(&img, &snap).expect("snapshot");
    m.umount();
    let src = region(&snap, 0, None);
    match used_map(&src, MapOptions::default()) {
        Err(FsError::Unclean { why, .. }) => assert!(why.contains("recovery"), "{why}"),
        other => panic!("expected Unclean, got {other:?}"),
    }
    let forced = used_map(&src, MapOptions { force: true })
        .expect("forced map")
        .expect("ext4");
    assert!(forced.used.used_bytes() > 0);
    // Once unmounted the same filesystem maps without force.
    assert!(used_map(&region(&img, 0, None), MapOptions::default()).is_ok());
}

#[test]
fn errors_flag_and_corrupt_superblock_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("e.img");
    sparse_file(&img, 32 * MIB);
    run("mkfs.ext4", &["-q", "-F", s(&img)]);
    let state = peek(&img, 1024 + 0x3A, 2);
    poke(&img, 1024 + 0x3A, &[state[0] | 2, state[1]]);
    match used_map(&region(&img, 0, None), MapOptions::default()) {
        Err(FsError::Unclean { why, .. }) => assert!(why.contains("errors"), "{why}"),
        other => panic!("expected Unclean, got {other:?}"),
    }
    poke(&img, 1024 + 0x3A, &state);
    // Blocks per group of zero.
    poke(&img, 1024 + 0x20, &0u32.to_le_bytes());
    assert!(matches!(
        used_map(&region(&img, 0, None), MapOptions::default()),
        Err(FsError::Corrupt { .. })
    ));
}

#[test]
fn filesystem_larger_than_its_region_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("t.img");
    sparse_file(&img, 32 * MIB);
    run("mkfs.ext4", &["-q", "-F", s(&img)]);
    let short = region(&img, 0, Some(16 * MIB));
    assert!(matches!(
        used_map(&short, MapOptions::default()),
        Err(FsError::Corrupt { .. })
    ));
}

#[test]
fn ext4_inside_a_partition_offset_is_mapped_through_a_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    let off = 3 * MIB;
    let fs_len = 80 * MIB;
    sparse_file(&img, off + fs_len + 5 * MIB);
    fill_garbage(&img, 0, off + fs_len + 5 * MIB, 11);
    let tree = dir.path().join("tree");
    make_tree(&tree, 40, 300_000, 5);
    let blocks = (fs_len / 4096).to_string();
    let eopt = format!("offset={off},nodiscard");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            &eopt,
            "-d",
            s(&tree),
            s(&img),
            &blocks,
        ],
    );
    let src = region(&img, off, Some(fs_len));
    let map = used_map(&src, MapOptions::default())
        .expect("map")
        .expect("ext4");
    assert_eq!(map.meta.fs_size, Some(fs_len));
    let copy = dir.path().join("copy.img");
    copy_used(&img, off, &map.used, &copy);
    // The bytes around the partition were not copied.
    assert_eq!(peek(&copy, 0, 4096), vec![0u8; 4096]);
    let o = format!("ro,offset={off},sizelimit={fs_len}");
    let a = Mount::new(&img, &dir.path().join("a"), None, &o);
    let b = Mount::new(&copy, &dir.path().join("b"), None, &o);
    assert_trees_equal(&a.dir, &b.dir);
    drop(b);
    drop(a);
    // Same used count as the filesystem on its own.
    let alone = dir.path().join("alone.img");
    extract(&img, off, fs_len, &alone);
    let pc = partclone_header("partclone.extfs", &alone, dir.path());
    assert_eq!(map.used.used_bytes(), pc.used_blocks * pc.block_size);
}

#[test]
fn detection_reports_type_label_and_uuid_like_blkid() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (mkfs, want) in [
        ("mkfs.ext2", "ext2"),
        ("mkfs.ext3", "ext3"),
        ("mkfs.ext4", "ext4"),
    ] {
        let img = dir.path().join(format!("{want}.img"));
        sparse_file(&img, 16 * MIB);
        run(mkfs, &["-q", "-F", "-L", "  lab el ", s(&img)]);
        let m = detect(&region(&img, 0, None))
            .expect("detect")
            .expect("recognised");
        let blkid_uuid = run("blkid", &["-p", "-o", "value", "-s", "UUID", s(&img)]);
        let blkid_type = run("blkid", &["-p", "-o", "value", "-s", "TYPE", s(&img)]);
        assert_eq!(m.fstype, want);
        assert_eq!(m.fstype, blkid_type.trim());
        assert_eq!(m.uuid.as_deref(), Some(blkid_uuid.trim()));
        assert_eq!(m.label.as_deref(), Some("lab el"));
        assert_eq!(m.fs_size, Some(16 * MIB));
    }
    // Nothing recognised on zeros.
    let z = dir.path().join("zero.img");
    sparse_file(&z, 4 * MIB);
    assert!(detect(&region(&z, 0, None)).expect("detect").is_none());
    assert!(used_map(&region(&z, 0, None), MapOptions::default())
        .expect("map")
        .is_none());
}
