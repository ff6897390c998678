//! FAT12/16/32 used maps, proved on real filesystems made by `mkfs.fat` and
//! filled with mtools: the used-ranges copy passes `fsck.fat -n` and every
//! file extracted from it equals the source's; the used byte count equals
//! partclone.fat's used sectors x 512.

mod common;

use std::path::Path;

use aula_imager::fs::{detect, fat_has_file, used_map, FsError, MapOptions};
use common::*;

const MIB: u64 = 1 << 20;

/// `mcopy`/`mdel` against `img` at byte `offset`.
fn mtools(tool: &str, img: &Path, offset: u64, args: &[&str]) {
    let target = format!("{}@@{offset}", s(img));
    let mut a = vec!["-i", target.as_str()];
    a.extend_from_slice(args);
    let out = std::process::Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(&a)
        .output()
        .expect("spawn mtools");
    assert!(
        out.status.success(),
        "{tool} {a:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything in the filesystem, extracted into `out`.
fn extract_all(img: &Path, offset: u64, out: &Path) {
    std::fs::create_dir_all(out).expect("mkdir");
    mtools("mcopy", img, offset, &["-s", "-n", "::/", s(out)]);
}

struct Proved {
    fstype: String,
}

/// Used bytes according to `fsck.fat -v` ("N files, used/total clusters")
/// plus the metadata area before the first cluster.
fn fsck_used_bytes(part: &Path) -> u64 {
    let out = run("fsck.fat", &["-n", "-v", s(part)]);
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains(" clusters"))
        .expect("summary line");
    let frac = line.split_whitespace().rev().nth(1).expect("used/total");
    let used_clusters: u64 = frac
        .split('/')
        .next()
        .expect("used")
        .parse()
        .expect("number");
    let b = peek(part, 0, 512);
    let u16at = |o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
    let u32at = |o: usize| u64::from(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]));
    let bps = u16at(0x0B);
    let fat_size = if u16at(0x16) != 0 {
        u16at(0x16)
    } else {
        u32at(0x24)
    };
    let meta_sectors =
        u16at(0x0E) + u64::from(b[0x10]) * fat_size + (u16at(0x11) * 32).div_ceil(bps);
    meta_sectors * bps + used_clusters * u64::from(b[0x0D]) * bps
}

/// How partclone.fat's count is checked.
#[derive(PartialEq)]
enum Partclone {
    /// Must be equal.
    Equal,
    /// partclone 0.3.23 mis-decodes FAT12 entries (it marks sector runs that
    /// do not follow the FAT), so its figure is only reported; the map is
    /// checked against fsck.fat's cluster count instead.
    ReportOnly,
}

fn prove(
    tag: &str,
    fat_bits: &str,
    extra: &[&str],
    size: u64,
    offset: u64,
    pc: Partclone,
) -> Proved {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("fat.img");
    let total = offset + size + MIB;
    sparse_file(&img, total);
    fill_garbage(&img, 0, total, 0xfa7 ^ size);
    let sectors = (size / 1024).to_string(); // mkfs.fat counts 1 KiB blocks
    let off_sectors = (offset / 512).to_string();
    let mut a = vec![
        "-F",
        fat_bits,
        "-n",
        "AULA TEST",
        "--offset",
        off_sectors.as_str(),
    ];
    a.extend_from_slice(extra);
    a.extend([s(&img), sectors.as_str()]);
    run("mkfs.fat", &a);

    let tree = dir.path().join("tree");
    make_tree(&tree, 40, 120_000, 17);
    let dirs: Vec<String> = (0..5)
        .map(|i| s(&tree.join(format!("d{i}"))).to_string())
        .collect();
    let mut a: Vec<&str> = vec!["-s"];
    a.extend(dirs.iter().map(|x| x.as_str()));
    a.push("::/");
    mtools("mcopy", &img, offset, &a);
    // Delete some files: their clusters keep stale data.
    for i in (0..40).step_by(4) {
        let p = format!("::/d{}/sub{}/f{i}.bin", i % 5, i % 3);
        mtools("mdel", &img, offset, &[p.as_str()]);
    }

    let src = region(&img, offset, Some(size));
    let map = used_map(&src, MapOptions::default())
        .expect("map")
        .expect("recognised");
    let used = map.used.used_bytes();
    assert!(used > 0 && used < size);

    let copy = dir.path().join("copy.img");
    copy_used(&img, offset, &map.used, &copy);
    let part = dir.path().join("part.img");
    extract(&copy, offset, size, &part);
    let (ok, out) = run_status("fsck.fat", &["-n", s(&part)]);
    assert!(ok, "{tag}: fsck.fat on the used-ranges copy failed:\n{out}");
    extract_all(&img, offset, &dir.path().join("a"));
    extract_all(&copy, offset, &dir.path().join("b"));
    assert_trees_equal(&dir.path().join("a"), &dir.path().join("b"));

    assert_eq!(
        used,
        fsck_used_bytes(&part),
        "{tag}: differs from fsck.fat's count"
    );
    {
        let want_equal = pc == Partclone::Equal;
        let pc = partclone_header("partclone.fat", &part, dir.path());
        note(&format!(
            "{tag}: {} used {used} bytes ({} extents); partclone {} blocks x {} = {}",
            map.meta.fstype,
            map.used.len(),
            pc.used_blocks,
            pc.block_size,
            pc.used_blocks * pc.block_size
        ));
        if want_equal {
            assert_eq!(
                used,
                pc.used_blocks * pc.block_size,
                "{tag}: differs from partclone"
            );
        }
    }
    Proved {
        fstype: map.meta.fstype,
    }
}

#[test]
fn fat12_map_is_fsck_clean_complete_and_equals_fsck_fat_count() {
    let p = prove("fat12", "12", &[], 4 * MIB, 0, Partclone::ReportOnly);
    assert_eq!(p.fstype, "fat12");
}

#[test]
fn fat16_map_is_fsck_clean_complete_and_equals_partclone() {
    let p = prove("fat16", "16", &[], 64 * MIB, 0, Partclone::Equal);
    assert_eq!(p.fstype, "fat16");
}

#[test]
fn fat32_map_is_fsck_clean_complete_and_equals_partclone() {
    let p = prove("fat32", "32", &["-s", "1"], 48 * MIB, 0, Partclone::Equal);
    assert_eq!(p.fstype, "fat32");
}

#[test]
fn fat32_inside_a_partition_offset_is_mapped_through_a_region() {
    let p = prove(
        "fat32@2MiB",
        "32",
        &["-s", "1"],
        48 * MIB,
        2 * MIB,
        Partclone::Equal,
    );
    assert_eq!(p.fstype, "fat32");
}

#[test]
fn fat_type_follows_the_cluster_count_not_the_type_string() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("x.img");
    sparse_file(&img, 8 * MIB);
    run("mkfs.fat", &["-F", "12", s(&img)]);
    assert_eq!(&peek(&img, 0x36, 8), b"FAT12   ");
    // A lying type string changes nothing: < 4085 clusters is FAT12.
    poke(&img, 0x36, b"FAT16   ");
    let m = detect(&region(&img, 0, None))
        .expect("detect")
        .expect("fat");
    assert_eq!(m.fstype, "fat12");
    let img = dir.path().join("y.img");
    sparse_file(&img, 8 * MIB);
    run("mkfs.fat", &["-F", "16", "-s", "1", s(&img)]);
    poke(&img, 0x36, b"FAT12   ");
    let m = detect(&region(&img, 0, None))
        .expect("detect")
        .expect("fat");
    assert_eq!(m.fstype, "fat16");
}

#[test]
fn fat_detection_matches_blkid_label_and_volume_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (bits, size) in [("12", 2 * MIB), ("16", 32 * MIB), ("32", 40 * MIB)] {
        let img = dir.path().join(format!("f{bits}.img"));
        sparse_file(&img, size);
        run(
            "mkfs.fat",
            &[
                "-F",
                bits,
                "-s",
                "1",
                "-n",
                "MY DISK",
                "-i",
                "1a2b3c4d",
                s(&img),
            ],
        );
        let m = detect(&region(&img, 0, None))
            .expect("detect")
            .expect("fat");
        assert_eq!(m.fstype, format!("fat{bits}"));
        assert_eq!(m.uuid.as_deref(), Some("1A2B-3C4D"));
        let blkid_uuid = run("blkid", &["-p", "-o", "value", "-s", "UUID", s(&img)]);
        let blkid_label = run("blkid", &["-p", "-o", "value", "-s", "LABEL", s(&img)]);
        assert_eq!(m.uuid.as_deref(), Some(blkid_uuid.trim()));
        assert_eq!(m.label.as_deref(), Some(blkid_label.trim()));
        assert_eq!(m.label.as_deref(), Some("MY DISK"));
        assert_eq!(m.fs_size, Some(size));
    }
}

#[test]
fn fat16_and_fat32_dirty_bit_in_fat1_is_unclean_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (bits, size, width, clean_bit) in [
        ("16", 32 * MIB, 2usize, 0x8000u32),
        ("32", 40 * MIB, 4, 0x0800_0000),
    ] {
        let img = dir.path().join(format!("d{bits}.img"));
        sparse_file(&img, size);
        run("mkfs.fat", &["-F", bits, "-s", "1", s(&img)]);
        let reserved = u16::from_le_bytes(peek(&img, 0x0E, 2).try_into().expect("2 bytes"));
        let at = u64::from(reserved) * 512 + width as u64; // FAT[1]
        let mut e = [0u8; 4];
        e[..width].copy_from_slice(&peek(&img, at, width));
        let v = u32::from_le_bytes(e);
        assert!(
            used_map(&region(&img, 0, None), MapOptions::default()).is_ok(),
            "clean first"
        );
        poke(&img, at, &(v & !clean_bit).to_le_bytes()[..width]);
        match used_map(&region(&img, 0, None), MapOptions::default()) {
            Err(FsError::Unclean { why, .. }) => assert!(why.contains("dirty"), "{why}"),
            other => panic!("FAT{bits}: expected Unclean, got {other:?}"),
        }
        assert!(used_map(&region(&img, 0, None), MapOptions { force: true }).is_ok());
    }
}

#[test]
fn fat_has_file_finds_boot_loaders_by_long_and_short_names_in_any_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loader = dir.path().join("loader.efi");
    std::fs::write(&loader, b"MZ not really a loader").expect("write");
    for (bits, size) in [("12", 2 * MIB), ("16", 32 * MIB), ("32", 40 * MIB)] {
        let img = dir.path().join(format!("esp{bits}.img"));
        // The filesystem sits 1 MiB into the file, as a partition would.
        sparse_file(&img, MIB + size);
        let part = dir.path().join(format!("part{bits}.img"));
        sparse_file(&part, size);
        run("mkfs.fat", &["-F", bits, "-s", "1", s(&part)]);
        // Enough entries in \EFI that its directory spans several clusters.
        mtools(
            "mmd",
            &part,
            0,
            &[
                "::/EFI",
                "::/EFI/Microsoft",
                "::/EFI/Microsoft/Boot",
                "::/EFI/debian",
            ],
        );
        for i in 0..40 {
            mtools(
                "mmd",
                &part,
                0,
                &[&format!("::/EFI/vendor-with-a-long-name-{i}")],
            );
        }
        mtools(
            "mcopy",
            &part,
            0,
            &[s(&loader), "::/EFI/Microsoft/Boot/bootmgfw.efi"],
        );
        mtools(
            "mcopy",
            &part,
            0,
            &[s(&loader), "::/EFI/debian/shimx64.efi"],
        );
        // Found only by following \EFI's cluster chain past its first cluster.
        mtools(
            "mcopy",
            &part,
            0,
            &[s(&loader), "::/EFI/vendor-with-a-long-name-39/grubx64.efi"],
        );
        run(
            "dd",
            &[
                &format!("if={}", s(&part)),
                &format!("of={}", s(&img)),
                "bs=1M",
                "seek=1",
                "conv=notrunc,sparse",
                "status=none",
            ],
        );
        let r = region(&img, MIB, Some(size));
        let has = |p: &str| fat_has_file(&r, p).expect("read").expect("a FAT volume");
        assert!(has("\\EFI\\Microsoft\\Boot\\bootmgfw.efi"), "FAT{bits}");
        assert!(has("/efi/MICROSOFT/boot/BOOTMGFW.EFI"), "FAT{bits}: case");
        assert!(has("\\EFI\\debian\\shimx64.efi"), "FAT{bits}");
        assert!(
            has("\\EFI\\MICROS~1\\Boot\\bootmgfw.efi"),
            "FAT{bits}: 8.3 alias"
        );
        assert!(!has("\\EFI\\BOOT\\BOOTX64.EFI"), "FAT{bits}: absent");
        assert!(!has("\\EFI\\debian"), "FAT{bits}: a directory is no file");
        assert!(
            !has("\\EFI\\debian\\shimx64.efi\\x"),
            "FAT{bits}: a file is no directory"
        );
        assert!(
            has("\\EFI\\vendor-with-a-long-name-39\\grubx64.efi"),
            "FAT{bits}: far in the chain"
        );
        assert!(
            !has("\\EFI\\vendor-with-a-long-name-39\\x.efi"),
            "FAT{bits}"
        );
        assert!(
            !has("\\EFI\\..\\EFI\\debian\\shimx64.efi"),
            "FAT{bits}: no .."
        );
    }
    // Not FAT: None, not an error.
    let img = dir.path().join("zero.img");
    sparse_file(&img, MIB);
    assert_eq!(
        fat_has_file(&region(&img, 0, None), "\\x").expect("read"),
        None
    );
}
