//! Restoring real partclone images (made by the installed Debian partclone
//! 0.3.23, compressed by the real lzop / gzip / zstd): the restored blocks
//! equal the source's, the filesystem checks clean, and damaged, truncated
//! or oversized inputs fail clearly without writing what they must not.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::fs::{used_map, MapOptions};
use aula_imager::legacy::{self, Compression, LegacyError};
use common::*;

const MIB: u64 = 1 << 20;

/// A garbage-filled 64 MiB ext4 (4 KiB blocks) with files.
fn make_ext4(dir: &Path, args: &[&str]) -> PathBuf {
    let img = dir.join("src.img");
    sparse_file(&img, 64 * MIB);
    fill_garbage(&img, 0, 64 * MIB, 0x1e9);
    let tree = dir.join("tree");
    make_tree(&tree, 50, 400_000, 31);
    let mut a = vec!["-q", "-F", "-E", "nodiscard", "-d", s(&tree)];
    a.extend_from_slice(args);
    a.push(s(&img));
    run("mkfs.ext4", &a);
    img
}

/// `partclone.<tool> -c` of `src` piped through `filter` into `out`.
fn partclone_image(tool: &str, src: &Path, extra: &str, filter: &str, out: &Path) {
    let log = out.with_extension("log");
    sh(&format!(
        "{tool} -c {extra} -s {} -o - -L {} | {filter} > {}",
        s(src),
        s(&log),
        s(out)
    ));
}

fn open_file(p: &Path) -> Result<legacy::PartcloneStream, LegacyError> {
    legacy::open(Box::new(File::open(p).expect("open image")))
}

/// A fresh target file (zeros) of `len` bytes, as a writable region at
/// `offset` of a file of `offset + len + tail` bytes.
fn target(path: &Path, offset: u64, len: u64, tail: u64) -> Region {
    sparse_file(path, offset + len + tail);
    let dev = Arc::new(
        Device::open(
            path,
            OpenMode {
                write: true,
                ..Default::default()
            },
        )
        .expect("open target"),
    );
    Region::new(dev, offset, len).expect("target region")
}

/// Asserts every used range of `src` equals the same range of `dst` (at
/// `dst_off`).
fn assert_used_equal(src: &Path, dst: &Path, dst_off: u64, map: &aula_imager::extent::ExtentMap) {
    for e in map.extents() {
        let mut pos = 0;
        while pos < e.len {
            let n = (e.len - pos).min(4 * MIB) as usize;
            let a = peek(src, e.start + pos, n);
            let b = peek(dst, dst_off + e.start + pos, n);
            assert!(a == b, "restored bytes differ in {}+{}", e.start + pos, n);
            pos += n as u64;
        }
    }
}

#[test]
fn images_compressed_with_lzop_gzip_zstd_or_nothing_and_a0_restore_block_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = make_ext4(dir.path(), &["-b", "4096"]);
    let ours = used_map(&region(&src, 0, None), MapOptions::default())
        .expect("map")
        .expect("ext4");
    let cases: [(&str, &str, &str, Compression, bool); 6] = [
        ("plain", "", "cat", Compression::None, true),
        ("lzop", "", "lzop -c", Compression::Lzop, true),
        ("gzip", "", "gzip -c", Compression::Gzip, true),
        ("zstd", "", "zstd -q -c -3", Compression::Zstd, true),
        ("a0-zstd", "-a0", "zstd -q -c -1", Compression::Zstd, false),
        ("a0-plain", "-a0", "cat", Compression::None, false),
    ];
    for (name, extra, filter, comp, sums) in cases {
        let img = dir.path().join(format!("{name}.pcl"));
        partclone_image("partclone.extfs", &src, extra, filter, &img);
        let first = peek(
            &img,
            0,
            256 * 1024.min(fs::metadata(&img).expect("stat").len() as usize),
        );
        assert!(legacy::looks_like_partclone(&first), "{name}: not sniffed");
        let stream = open_file(&img).expect("open");
        let info = stream.info().clone();
        assert_eq!(info.compression, comp, "{name}");
        assert_eq!(info.fs, "EXTFS");
        assert_eq!(info.block_size, 4096);
        assert_eq!(info.device_size, 64 * MIB);
        assert_eq!(info.partclone_version, "0.3.23");
        assert_eq!(info.checksum_mode, if sums { 0x20 } else { 0 });
        // The image's bitmap is exactly our own map of the source.
        assert_eq!(
            stream.used_map(),
            ours.used,
            "{name}: bitmap differs from our ext4 map"
        );

        // Restore into a partition at 1 MiB of a bigger file.
        let out = dir.path().join(format!("{name}.out"));
        let t = target(&out, MIB, 64 * MIB, MIB);
        let mut last = 0u64;
        let mut calls = 0;
        let stats = stream
            .restore_to(
                &t,
                &mut |b| {
                    assert!(b >= last);
                    last = b;
                    calls += 1;
                },
                &AtomicBool::new(false),
            )
            .unwrap_or_else(|e| panic!("{name}: restore failed: {e:?}"));
        assert_eq!(stats.bytes_written, info.used_bytes());
        assert_eq!(stats.blocks_written, info.used_blocks);
        assert_eq!(last, info.used_bytes());
        assert!(calls >= 1);
        if sums {
            assert_eq!(
                stats.strips_verified,
                info.used_blocks
                    .div_ceil(u64::from(info.blocks_per_checksum))
            );
        }
        assert_used_equal(&src, &out, MIB, &ours.used);
        let part = dir.path().join(format!("{name}.part"));
        extract(&out, MIB, 64 * MIB, &part);
        let (ok, log) = run_status("e2fsck", &["-fn", s(&part)]);
        assert!(
            ok,
            "{name}: e2fsck on the restored filesystem failed:\n{log}"
        );
        note(&format!(
            "legacy {name}: {} used blocks, {} bytes written, {} strips verified",
            info.used_blocks, stats.bytes_written, stats.strips_verified
        ));
        fs::remove_file(&out).expect("rm");
        fs::remove_file(&part).expect("rm");
    }
}

#[test]
fn one_kib_block_ext4_and_fat16_images_restore_and_check_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = make_ext4(dir.path(), &["-b", "1024"]);
    let img = dir.path().join("e1k.pcl.zst");
    partclone_image("partclone.extfs", &src, "", "zstd -q -c", &img);
    let out = dir.path().join("e1k.out");
    let t = target(&out, 0, 64 * MIB, 0);
    let stream = open_file(&img).expect("open");
    assert_eq!(stream.info().block_size, 1024);
    let map = stream.used_map();
    stream
        .restore_to(&t, &mut |_| {}, &AtomicBool::new(false))
        .expect("restore");
    assert_used_equal(&src, &out, 0, &map);
    let (ok, log) = run_status("e2fsck", &["-fn", s(&out)]);
    assert!(ok, "{log}");

    let fat = dir.path().join("fat.img");
    sparse_file(&fat, 32 * MIB);
    run("mkfs.fat", &["-F", "16", s(&fat)]);
    let tree = dir.path().join("ftree");
    make_tree(&tree, 20, 200_000, 3);
    let d0 = tree.join("d0");
    let target_spec = format!("{}@@0", s(&fat));
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -s -i {target_spec} {} ::/",
        s(&d0)
    ));
    let img = dir.path().join("fat.pcl.gz");
    partclone_image("partclone.fat", &fat, "", "gzip -c", &img);
    let out = dir.path().join("fat.out");
    let t = target(&out, 0, 32 * MIB, 0);
    let stream = open_file(&img).expect("open");
    assert_eq!(stream.info().fs, "FAT16");
    stream
        .restore_to(&t, &mut |_| {}, &AtomicBool::new(false))
        .expect("restore");
    let (ok, log) = run_status("fsck.fat", &["-n", s(&out)]);
    assert!(ok, "{log}");
    let a = dir.path().join("fa");
    let b = dir.path().join("fb");
    fs::create_dir_all(&a).expect("mkdir");
    fs::create_dir_all(&b).expect("mkdir");
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -s -n -i {}@@0 ::/ {}",
        s(&fat),
        s(&a)
    ));
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -s -n -i {}@@0 ::/ {}",
        s(&out),
        s(&b)
    ));
    assert_trees_equal(&a, &b);
}

/// Byte offset of strip `k`'s data in an uncompressed CRC image.
fn strip_offset(info: &legacy::PartcloneInfo, k: u64) -> u64 {
    let bm = info.total_blocks.div_ceil(8);
    let strip = u64::from(info.blocks_per_checksum) * u64::from(info.block_size) + 4;
    legacy::HEADER_LEN as u64 + bm + 4 + k * strip
}

#[test]
fn corrupted_byte_in_a_strip_is_a_crc_error_and_that_strip_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = make_ext4(dir.path(), &["-b", "4096"]);
    let img = dir.path().join("c.pcl");
    partclone_image("partclone.extfs", &src, "", "cat", &img);
    let info = open_file(&img).expect("open").info().clone();
    let bpc = u64::from(info.blocks_per_checksum);
    assert!(info.used_blocks > 3 * bpc, "need at least 3 full strips");
    // Flip one byte in the middle of strip 2.
    let at = strip_offset(&info, 2) + 1000 * 4 + 77;
    let b = peek(&img, at, 1);
    poke(&img, at, &[b[0] ^ 0x5A]);

    let stream = open_file(&img).expect("open");
    // Block numbers of strip 2.
    let mut blocks = Vec::new();
    for e in stream.used_map().extents() {
        for blk in e.start / 4096..e.end() / 4096 {
            blocks.push(blk);
        }
    }
    let strip2 = &blocks[(2 * bpc) as usize..(3 * bpc) as usize];
    let out = dir.path().join("c.out");
    let t = target(&out, 0, 64 * MIB, 0);
    match stream.restore_to(&t, &mut |_| {}, &AtomicBool::new(false)) {
        Err(LegacyError::Checksum { strip, first_block }) => {
            assert_eq!(strip, 2);
            assert_eq!(first_block, strip2[0]);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    for &blk in strip2 {
        assert_eq!(
            peek(&out, blk * 4096, 4096),
            vec![0u8; 4096],
            "block {blk} of the bad strip was written"
        );
    }
}

#[test]
fn truncated_streams_fail_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = make_ext4(dir.path(), &["-b", "4096"]);
    for (name, filter) in [
        ("plain", "cat"),
        ("zstd", "zstd -q -c"),
        ("gzip", "gzip -c"),
        ("lzop", "lzop -c"),
    ] {
        let img = dir.path().join(format!("t-{name}"));
        partclone_image("partclone.extfs", &src, "", filter, &img);
        let len = fs::metadata(&img).expect("stat").len();
        let f = fs::OpenOptions::new().write(true).open(&img).expect("open");
        f.set_len(len * 2 / 3).expect("truncate");
        drop(f);
        let out = dir.path().join(format!("t-{name}.out"));
        let t = target(&out, 0, 64 * MIB, 0);
        let err = open_file(&img)
            .and_then(|st| st.restore_to(&t, &mut |_| {}, &AtomicBool::new(false)))
            .expect_err("a truncated image must fail");
        let msg = format!("{err}: {:?}", std::error::Error::source(&err));
        note(&format!("truncated {name}: {msg}"));
        assert!(
            matches!(
                err,
                LegacyError::Truncated(_) | LegacyError::Decompress { .. }
            ),
            "{name}: unexpected error {err:?}"
        );
        // Cut inside the header: still a clear truncation error.
        let f = fs::OpenOptions::new().write(true).open(&img).expect("open");
        f.set_len(if name == "plain" { 60 } else { 40 })
            .expect("truncate");
        drop(f);
        let err = open_file(&img).expect_err("header cut");
        assert!(
            matches!(
                err,
                LegacyError::Truncated(_) | LegacyError::Decompress { .. }
            ),
            "{name}: unexpected error {err:?}"
        );
    }
}

#[test]
fn target_smaller_than_the_device_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = make_ext4(dir.path(), &["-b", "4096"]);
    let img = dir.path().join("s.pcl.zst");
    partclone_image("partclone.extfs", &src, "", "zstd -q -c", &img);
    let out = dir.path().join("s.out");
    let t = target(&out, 0, 64 * MIB - 4096, 0);
    fill_garbage(&out, 0, 64 * MIB - 4096, 9);
    let before = fs::read(&out).expect("read");
    match open_file(&img).expect("open").restore_to(
        &t,
        &mut |_| panic!("nothing may be written"),
        &AtomicBool::new(false),
    ) {
        Err(LegacyError::TargetTooSmall { need, have }) => {
            assert_eq!(need, 64 * MIB);
            assert_eq!(have, 64 * MIB - 4096);
        }
        other => panic!("expected TargetTooSmall, got {other:?}"),
    }
    assert!(
        fs::read(&out).expect("read") == before,
        "target was modified"
    );
}

#[test]
fn damaged_header_or_bitmap_is_rejected_and_cancel_stops_the_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = make_ext4(dir.path(), &["-b", "4096"]);
    let img = dir.path().join("h.pcl");
    partclone_image("partclone.extfs", &src, "", "cat", &img);
    let pristine = fs::read(&img).expect("read");
    // Header byte (inside the device size field).
    poke(&img, 53, &[pristine[53] ^ 1]);
    assert!(matches!(open_file(&img), Err(LegacyError::BadHeader(m)) if m.contains("header CRC")));
    fs::write(&img, &pristine).expect("restore file");
    // Bitmap byte.
    poke(&img, 200, &[pristine[200] ^ 0x10]);
    assert!(matches!(open_file(&img), Err(LegacyError::BadHeader(m)) if m.contains("bitmap CRC")));
    fs::write(&img, &pristine).expect("restore file");
    // Cancel before the first strip.
    let out = dir.path().join("h.out");
    let t = target(&out, 0, 64 * MIB, 0);
    let r = open_file(&img)
        .expect("open")
        .restore_to(&t, &mut |_| {}, &AtomicBool::new(true));
    assert!(matches!(r, Err(LegacyError::Cancelled)));
}
