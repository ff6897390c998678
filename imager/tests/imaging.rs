//! Imaging engine behaviour through the CLI and the library: round trips on
//! files and partitions of GPT and MBR disks, refusal of bad input without
//! writing, delta restore, resume after cancel.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use aula_imager::chunk::ChunkId;
use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::manifest::Manifest;
use aula_imager::progress::Progress;
use aula_imager::repo::{ImageSummary, LocalRepo, Repository};
use aula_imager::restore::{restore_partition, RestoreOptions};
use support::*;

const MIB: u64 = 1 << 20;

/// An ext4 image file with real content.
fn ext4_source(t: &Tmp, name: &str, mib: u64, seed: u64) -> std::path::PathBuf {
    let tree = t.p(&format!("{name}.tree"));
    make_tree(&tree, seed, 6);
    let img = t.p(name);
    mkfs_ext4(&img, 0, mib * MIB, Some(&tree));
    img
}

#[test]
fn file_round_trip_restores_used_bytes_identically_and_fsck_is_clean() {
    let t = Tmp::new();
    let src = ext4_source(&t, "src.img", 48, 1);
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "fs1",
    ]);
    imager_ok(&["restore", "fs1", "--repo", &t.s("repo"), &t.s("out.img")]);
    let m = manifest(&t.p("repo"), "fs1");
    assert_eq!(m.source_size, 48 * MIB);
    assert_used_equal(&m, &src, 0, &t.p("out.img"), 0);
    sh(&format!("e2fsck -fn {} >/dev/null", t.s("out.img")));
    // The image verifies, and so does the restored target.
    imager_ok(&["verify", "fs1", "--repo", &t.s("repo")]);
    imager_ok(&["verify", "fs1", "--repo", &t.s("repo"), &t.s("out.img")]);
    // A target that differs fails verification.
    sh(&format!(
        "dd if=/dev/urandom of={} bs=64k count=16 seek=1 conv=notrunc status=none",
        t.s("out.img")
    ));
    let o = imager(&["verify", "fs1", "--repo", &t.s("repo"), &t.s("out.img")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn gpt_partition_round_trip_by_table_byte_range() {
    let t = Tmp::new();
    let disk = t.p("disk.img");
    sh(&format!(
        "truncate -s 96M {d} && sgdisk -o -n 1:2048:+16M -n 2:0:+40M -n 4:0:+20M {d} >/dev/null",
        d = disk.display()
    ));
    let tree = t.p("tree");
    make_tree(&tree, 7, 5);
    // Partition 2 starts after 1 MiB + 16 MiB.
    let p2_start = 2048 * 512 + 16 * MIB;
    mkfs_ext4(&disk, p2_start, 40 * MIB, Some(&tree));
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--partition",
        "2",
        "--repo",
        &t.s("repo"),
        "--name",
        "gpt2",
    ]);
    let m = manifest(&t.p("repo"), "gpt2");
    assert_eq!(m.source_size, 40 * MIB);
    assert_eq!(
        m.partition_type.as_deref(),
        Some("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
    );

    // Onto partition 4? Too small (20 MiB < 40 MiB): refused.
    let other = t.p("other.img");
    sh(&format!(
        "truncate -s 96M {d} && sgdisk -o -n 1:2048:+10M -n 2:0:+20M -n 4:0:+50M {d} >/dev/null",
        d = other.display()
    ));
    let before = sha256_file(&other);
    let o = imager(&[
        "restore",
        "gpt2",
        "--repo",
        &t.s("repo"),
        &other.display().to_string(),
        "--partition",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
    assert_eq!(
        sha256_file(&other),
        before,
        "a refused restore wrote to the target"
    );
    // Onto partition 4 (50 MiB) of a different layout: works, slot 4 kept.
    imager_ok(&[
        "restore",
        "gpt2",
        "--repo",
        &t.s("repo"),
        &other.display().to_string(),
        "--partition",
        "4",
    ]);
    let p4_start = 2048 * 512 + 30 * MIB;
    assert_used_equal(&m, &disk, p2_start, &other, p4_start);
    // The filesystem inside partition 4 checks clean.
    sh(&format!(
        "dd if={} of={} bs=1M skip={} count=40 status=none && e2fsck -fn {} >/dev/null",
        other.display(),
        t.s("p4.img"),
        p4_start / MIB,
        t.s("p4.img")
    ));
    // The table of the target was not touched.
    let table = sh_out(&format!("sgdisk -p {}", other.display()));
    assert!(table.contains("   4  "), "{table}");
}

#[test]
fn mbr_logical_partition_round_trip() {
    let t = Tmp::new();
    let disk = t.p("disk.img");
    sh(&format!(
        "truncate -s 80M {d} && printf 'label: dos\\nstart=2048,size=16M,type=83\\nstart=34816,size=60M,type=5\\nstart=36864,size=24M,type=83\\nstart=88064,size=20M,type=83\\n' | sfdisk -q {d}",
        d = disk.display()
    ));
    let parts = sh_out(&format!("sfdisk --json {}", disk.display()));
    let v: serde_json::Value = serde_json::from_str(&parts).expect("sfdisk json");
    let p6 = v["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["node"].as_str().is_some_and(|n| n.ends_with('6')))
        .expect("logical partition 6")
        .clone();
    let start = p6["start"].as_u64().expect("start") * 512;
    let size = p6["size"].as_u64().expect("size") * 512;
    let tree = t.p("tree");
    make_tree(&tree, 3, 4);
    mkfs_ext4(&disk, start, size, Some(&tree));
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "-p",
        "6",
        "--repo",
        &t.s("repo"),
        "--name",
        "logical6",
    ]);
    let m = manifest(&t.p("repo"), "logical6");
    assert_eq!(m.source_size, size);
    assert_eq!(m.partition_type.as_deref(), Some("0x83"));
    // The extended container itself is refused.
    let o = imager(&[
        "create",
        &disk.display().to_string(),
        "-p",
        "2",
        "--repo",
        &t.s("repo"),
        "--name",
        "ext",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // Restore onto a copy of the disk whose partition 6 is blank.
    let copy = t.p("copy.img");
    sh(&format!(
        "truncate -s 80M {c} && sfdisk -q -d {d} | sfdisk -q {c}",
        c = copy.display(),
        d = disk.display()
    ));
    imager_ok(&[
        "restore",
        "logical6",
        "--repo",
        &t.s("repo"),
        &copy.display().to_string(),
        "-p",
        "6",
    ]);
    assert_used_equal(&m, &disk, start, &copy, start);
}

#[test]
fn raw_image_of_a_partitioned_device_needs_force_to_overwrite_a_partitioned_target() {
    let t = Tmp::new();
    let disk = t.p("disk.img");
    sh(&format!(
        "truncate -s 16M {d} && sgdisk -o -n 1:2048:0 {d} >/dev/null",
        d = disk.display()
    ));
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--raw",
        "--repo",
        &t.s("repo"),
        "--name",
        "x",
    ]);
    assert_eq!(
        manifest(&t.p("repo"), "x").kind,
        aula_imager::manifest::ImageKind::Partition
    );
    // Restoring that raw image over a partitioned file needs --force.
    let target = t.p("t.img");
    sh(&format!(
        "truncate -s 16M {d} && sgdisk -o -n 1:2048:0 {d} >/dev/null",
        d = target.display()
    ));
    let before = sha256_file(&target);
    let o = imager(&[
        "restore",
        "x",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(sha256_file(&target), before);
    imager_ok(&[
        "restore",
        "x",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
        "--force",
    ]);
    assert_eq!(sha256_file(&disk), sha256_file(&target));
}

/// A created image with one chunk file to damage, and a pre-filled target.
fn damaged_setup(t: &Tmp) -> (Manifest, std::path::PathBuf, std::path::PathBuf) {
    let src = t.p("src.raw");
    let mut data = pseudo_random(11, (12 * MIB) as usize);
    // Make it compressible so frames are smaller than windows.
    for (i, b) in data.iter_mut().enumerate() {
        if i % 3 != 0 {
            *b = 0x41;
        }
    }
    std::fs::write(&src, &data).expect("write src");
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--raw",
        "--repo",
        &t.s("repo"),
        "--name",
        "d",
        "--chunk-kib",
        "1024",
    ]);
    let m = manifest(&t.p("repo"), "d");
    let victim = m.chunks[5].id.expect("non-zero chunk");
    let repo = LocalRepo::open(&t.p("repo"), false).expect("repo");
    let chunk = repo.chunk_path(&victim);
    let target = t.p("target.img");
    fill(&target, 0xee, 12 * MIB);
    (m, chunk, target)
}

fn window_untouched(target: &std::path::Path, m: &Manifest, index: u64) {
    let data = std::fs::read(target).expect("read target");
    let (s, l) = m.window(index);
    assert!(
        data[s as usize..(s + l) as usize]
            .iter()
            .all(|&b| b == 0xee),
        "window {index} of the target was written"
    );
}

#[test]
fn corrupt_chunk_gives_a_clear_error_and_is_never_written() {
    let t = Tmp::new();
    let (m, chunk, target) = damaged_setup(&t);
    let mut frame = std::fs::read(&chunk).expect("read chunk");
    let mid = frame.len() / 2;
    frame[mid] ^= 0x40;
    std::fs::write(&chunk, &frame).expect("corrupt");
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
        "--threads",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let id = m.chunks[5].id.expect("id");
    assert!(
        stderr(&o).contains(&format!("chunk {id} is corrupt")),
        "{}",
        stderr(&o)
    );
    window_untouched(&target, &m, 5);
    // verify of the repository names the bad chunk.
    let o = imager(&["verify", "d", "--repo", &t.s("repo")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&id.hex()), "{}", stderr(&o));
}

#[test]
fn another_chunks_frame_under_a_chunks_name_is_caught_by_its_hash_and_never_written() {
    // Window 5's file holds window 4's frame: it decompresses to the right
    // length, so only the hash catches it, and windows 4 and 5 are hashed
    // together (one worker takes both).
    let t = Tmp::new();
    let (m, chunk, target) = damaged_setup(&t);
    let repo = LocalRepo::open(&t.p("repo"), false).expect("repo");
    let other = repo.chunk_path(&m.chunks[4].id.expect("non-zero chunk"));
    std::fs::copy(&other, &chunk).expect("swap");
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
        "--threads",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let id = m.chunks[5].id.expect("id");
    let err = stderr(&o);
    assert!(err.contains(&format!("chunk {id} is corrupt")), "{err}");
    assert!(
        err.contains(&format!("hashes to {}", m.chunks[4].id.expect("id"))),
        "{err}"
    );
    window_untouched(&target, &m, 5);
}

#[test]
fn truncated_chunk_gives_a_clear_error_and_is_never_written() {
    let t = Tmp::new();
    let (m, chunk, target) = damaged_setup(&t);
    let frame = std::fs::read(&chunk).expect("read chunk");
    std::fs::write(&chunk, &frame[..frame.len() / 3]).expect("truncate");
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
        "--threads",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is corrupt"), "{}", stderr(&o));
    window_untouched(&target, &m, 5);
}

#[test]
fn missing_chunk_is_refused_before_anything_is_written() {
    let t = Tmp::new();
    let (_m, chunk, target) = damaged_setup(&t);
    std::fs::remove_file(&chunk).expect("remove chunk");
    let before = sha256_file(&target);
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
    assert_eq!(sha256_file(&target), before);
}

#[test]
fn truncated_manifest_is_refused_and_nothing_is_written_or_created() {
    let t = Tmp::new();
    let (_m, _chunk, target) = damaged_setup(&t);
    let mf = t.p("repo/images/d/1.json");
    let bytes = std::fs::read(&mf).expect("manifest");
    std::fs::write(&mf, &bytes[..bytes.len() * 2 / 3]).expect("truncate manifest");
    let before = sha256_file(&target);
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    assert_eq!(sha256_file(&target), before);
    let fresh = t.p("fresh.img");
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &fresh.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!fresh.exists(), "a failed restore created its target");
}

#[test]
fn unknown_format_version_is_refused_and_nothing_is_written() {
    let t = Tmp::new();
    let (_m, _chunk, target) = damaged_setup(&t);
    let mf = t.p("repo/images/d/1.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mf).expect("manifest")).expect("json");
    v["version"] = 7.into();
    std::fs::write(&mf, serde_json::to_vec(&v).expect("ser")).expect("write");
    let before = sha256_file(&target);
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("format version 7 is not supported"),
        "{}",
        stderr(&o)
    );
    assert_eq!(sha256_file(&target), before);
}

#[test]
fn target_smaller_than_the_source_is_refused_before_writing() {
    let t = Tmp::new();
    let (_m, _chunk, _target) = damaged_setup(&t);
    let small = t.p("small.img");
    fill(&small, 0xee, 11 * MIB);
    let before = sha256_file(&small);
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &small.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("too small"), "{}", stderr(&o));
    assert_eq!(sha256_file(&small), before);
}

#[test]
fn bad_names_are_usage_errors() {
    let t = Tmp::new();
    let src = t.p("s.raw");
    fill(&src, 1, MIB);
    for bad in ["../escape", "a/b", ".hidden", ""] {
        let o = imager(&[
            "create",
            &src.display().to_string(),
            "--repo",
            &t.s("repo"),
            "--name",
            bad,
        ]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
    }
    assert!(!t.p("escape").exists());
}

fn restore_stats(o: &std::process::Output) -> serde_json::Value {
    json_result(o)["stats"].clone()
}

#[test]
fn delta_restore_of_an_identical_target_fetches_and_writes_nothing() {
    let t = Tmp::new();
    let src = ext4_source(&t, "src.img", 32, 5);
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "a",
    ]);
    let o = imager_ok(&[
        "restore",
        "a",
        "--repo",
        &t.s("repo"),
        &t.s("out.img"),
        "--json",
    ]);
    let first = restore_stats(&o);
    assert!(first["chunks_fetched"].as_u64().expect("n") > 0);
    let o = imager_ok(&[
        "restore",
        "a",
        "--repo",
        &t.s("repo"),
        &t.s("out.img"),
        "--json",
    ]);
    let s = restore_stats(&o);
    assert_eq!(s["chunks_fetched"], 0, "{s}");
    assert_eq!(s["bytes_fetched"], 0, "{s}");
    assert_eq!(s["bytes_written"], 0, "{s}");
    assert_eq!(s["chunks_skipped"], s["chunks"], "{s}");
    // Progress events came as JSON lines too.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines().any(|l| l.contains("\"event\":\"progress\"")),
        "{out}"
    );
}

#[test]
fn delta_restore_after_changing_5_percent_of_chunks_fetches_only_those() {
    let t = Tmp::new();
    // 100 windows of 256 KiB.
    let src = t.p("src.raw");
    let mut data = pseudo_random(21, (25 * MIB) as usize);
    std::fs::write(&src, &data).expect("write");
    let args = ["--raw", "--chunk-kib", "256"];
    let mut a = vec!["create", "PLACEHOLDER", "--repo", "R", "--name", "v"];
    a.extend(args);
    let srcs = src.display().to_string();
    let repo = t.s("repo");
    a[1] = &srcs;
    a[3] = &repo;
    imager_ok(&a);
    imager_ok(&["restore", "v", "--repo", &repo, &t.s("target.img")]);
    // Change 5 windows (5 %).
    for w in [3usize, 17, 42, 66, 99] {
        let off = w * (256 << 10) + 1000;
        for b in &mut data[off..off + 100] {
            *b = !*b;
        }
    }
    std::fs::write(&src, &data).expect("rewrite");
    imager_ok(&a);
    let o = imager_ok(&[
        "restore",
        "v",
        "--repo",
        &repo,
        &t.s("target.img"),
        "--json",
    ]);
    let s = restore_stats(&o);
    assert_eq!(s["chunks"], 100, "{s}");
    assert_eq!(s["chunks_fetched"], 5, "{s}");
    assert_eq!(s["chunks_skipped"], 95, "{s}");
    assert_eq!(std::fs::read(t.p("target.img")).expect("read"), data);
    // The earlier version is still restorable by number.
    let o = imager_ok(&[
        "restore",
        "v@1",
        "--repo",
        &repo,
        &t.s("target.img"),
        "--json",
    ]);
    assert_eq!(restore_stats(&o)["chunks_fetched"], 5);
    let o = imager_ok(&["list", "--repo", &repo, "--json"]);
    let list: Vec<ImageSummary> = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].versions, vec![1, 2]);
}

/// Two versions of a raw image of 100 windows of 256 KiB, v2 differing from
/// v1 in 5 windows; returns (repo, v1 data, v2 data).
fn two_versions(t: &Tmp) -> (String, Vec<u8>, Vec<u8>) {
    let src = t.p("src.raw");
    let v1 = pseudo_random(33, (25 * MIB) as usize);
    let repo = t.s("repo");
    let create = |data: &[u8]| {
        std::fs::write(&src, data).expect("write source");
        imager_ok(&[
            "create",
            &src.display().to_string(),
            "--repo",
            &repo,
            "--name",
            "v",
            "--raw",
            "--chunk-kib",
            "256",
        ]);
    };
    create(&v1);
    let mut v2 = v1.clone();
    for w in [3usize, 17, 42, 66, 99] {
        let off = w * (256 << 10) + 5000;
        for b in &mut v2[off..off + 64] {
            *b = !*b;
        }
    }
    create(&v2);
    (repo, v1, v2)
}

fn restore_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["restore"];
    a.extend_from_slice(args);
    a.push("--json");
    restore_stats(&imager_ok(&a))
}

#[test]
fn after_our_own_restore_a_delta_restore_trusts_the_record_and_reads_no_window() {
    let t = Tmp::new();
    let (repo, v1, v2) = two_versions(&t);
    let rec = t.s("records");
    let target = t.s("target.img");
    let s = restore_json(&["v@1", "--repo", &repo, &target, "--records", &rec]);
    assert_eq!(s["chunks_fetched"], 100, "{s}");
    assert_eq!(std::fs::read(&target).expect("read"), v1);
    let s = restore_json(&["v", "--repo", &repo, &target, "--records", &rec]);
    assert_eq!(s["chunks_fetched"], 5, "{s}");
    assert_eq!(s["chunks_skipped"], 95, "{s}");
    assert_eq!(s["chunks_unread"], 95, "{s}");
    assert_eq!(std::fs::read(&target).expect("read"), v2);
    // The record now names v2: going back to v1 also needs no read.
    let s = restore_json(&["v@1", "--repo", &repo, &target, "--records", &rec]);
    assert_eq!(
        (s["chunks_fetched"].as_u64(), s["chunks_unread"].as_u64()),
        (Some(5), Some(95)),
        "{s}"
    );
    assert_eq!(std::fs::read(&target).expect("read"), v1);
    // --scan reads the target although the record is valid.
    let s = restore_json(&["v", "--repo", &repo, &target, "--records", &rec, "--scan"]);
    assert_eq!(
        (s["chunks_fetched"].as_u64(), s["chunks_unread"].as_u64()),
        (Some(5), Some(0)),
        "{s}"
    );
    assert_eq!(std::fs::read(&target).expect("read"), v2);
    // The record directory is private.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(t.p("records"))
            .expect("records dir")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

#[test]
fn a_write_to_the_target_after_a_restore_voids_its_record() {
    let t = Tmp::new();
    let (repo, _v1, v2) = two_versions(&t);
    let rec = t.s("records");
    let target = t.s("target.img");
    restore_json(&["v@1", "--repo", &repo, &target, "--records", &rec]);
    // Another writer changes window 50, which v1 and v2 share, straight
    // after the restore.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open target");
        f.write_all_at(b"not from the image", 50 * (256 << 10) + 77)
            .expect("write");
    }
    let s = restore_json(&["v", "--repo", &repo, &target, "--records", &rec]);
    assert_eq!(s["chunks_unread"], 0, "{s}");
    assert_eq!(
        s["chunks_fetched"], 6,
        "the 5 changed windows and the overwritten one: {s}"
    );
    assert_eq!(std::fs::read(&target).expect("read"), v2);
}

#[test]
fn records_of_another_boot_or_range_or_in_a_shared_directory_are_not_trusted() {
    let t = Tmp::new();
    let (repo, _v1, v2) = two_versions(&t);
    let rec = t.p("records");
    let recs = t.s("records");
    let target = t.s("target.img");
    let fresh_v1 = || {
        restore_json(&["v@1", "--repo", &repo, &target, "--records", &recs]);
    };
    let only_record = || {
        let mut files: Vec<_> = std::fs::read_dir(&rec)
            .expect("records")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.remove(0)
    };
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let p = only_record();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).expect("read record")).expect("json");
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).expect("json")).expect("write record");
    };
    let delta_is_a_scan = || {
        let s = restore_json(&["v", "--repo", &repo, &target, "--records", &recs]);
        assert_eq!(
            (s["chunks_fetched"].as_u64(), s["chunks_unread"].as_u64()),
            (Some(5), Some(0)),
            "{s}"
        );
        assert_eq!(std::fs::read(&target).expect("read"), v2);
    };
    // Another boot.
    fresh_v1();
    edit(&|v| v["mark"]["boot_id"] = "00000000-0000-0000-0000-000000000000".into());
    delta_is_a_scan();
    // Another byte range than the one restored.
    fresh_v1();
    edit(&|v| v["offset"] = 4096.into());
    delta_is_a_scan();
    // A record directory other users may write to.
    fresh_v1();
    std::fs::set_permissions(&rec, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    delta_is_a_scan();
}

/// A repository wrapper that cancels the job after `after` chunk fetches.
struct CancelAfter<'a> {
    inner: &'a LocalRepo,
    progress: Arc<Progress>,
    after: u32,
    fetched: AtomicU32,
}

impl Repository for CancelAfter<'_> {
    repository_passthrough!(inner);
    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> aula_imager::Result<()> {
        if self.fetched.fetch_add(1, Ordering::SeqCst) + 1 >= self.after {
            self.progress.cancel();
        }
        self.inner.put_chunk(id, frame)
    }
    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> aula_imager::Result<()> {
        if self.fetched.fetch_add(1, Ordering::SeqCst) + 1 >= self.after {
            self.progress.cancel();
        }
        self.inner.get_chunk(id, out)
    }
}

#[test]
fn cancelled_restore_stops_and_a_rerun_finishes_fetching_only_the_rest() {
    let t = Tmp::new();
    let src = t.p("src.raw");
    std::fs::write(&src, pseudo_random(5, (16 * MIB) as usize)).expect("write");
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--raw",
        "--repo",
        &t.s("repo"),
        "--name",
        "c",
        "--chunk-kib",
        "256",
    ]);
    let local = LocalRepo::open(&t.p("repo"), false).expect("repo");
    let m = local.manifest("c", None).expect("manifest");
    assert_eq!(m.chunks.len(), 64);
    let target = t.p("t.img");
    let dev = Arc::new(
        Device::open(
            &target,
            OpenMode {
                write: true,
                create: true,
                exclusive: false,
            },
        )
        .expect("open"),
    );
    drop(dev);
    let mut d = Device::open(
        &target,
        OpenMode {
            write: true,
            ..Default::default()
        },
    )
    .expect("open");
    d.grow_to(m.source_size).expect("grow");
    let region = Region::whole(Arc::new(d));
    let progress = Arc::new(Progress::new());
    let wrapped = CancelAfter {
        inner: &local,
        progress: progress.clone(),
        after: 20,
        fetched: AtomicU32::new(0),
    };
    let opts = RestoreOptions {
        threads: 2,
        delta: true,
        ..Default::default()
    };
    let r = restore_partition(&m, &region, &wrapped, &opts, &progress);
    assert!(matches!(r, Err(aula_imager::Error::Cancelled)), "{r:?}");
    let done_first = wrapped.fetched.load(Ordering::SeqCst) as u64;
    assert!(done_first < 64);
    // Re-run: completes, and fetches only what the first run did not write.
    let progress = Arc::new(Progress::new());
    let stats = restore_partition(&m, &region, &local, &opts, &progress).expect("second run");
    assert!(
        stats.chunks_skipped >= done_first - 2,
        "{stats:?} after {done_first}"
    );
    assert_eq!(stats.chunks_fetched + stats.chunks_skipped, 64);
    assert_eq!(
        std::fs::read(&target).expect("read"),
        std::fs::read(&src).expect("read")
    );
}

#[test]
fn cancelled_create_publishes_nothing_and_a_rerun_reuses_stored_chunks() {
    let t = Tmp::new();
    let src = t.p("src.raw");
    std::fs::write(&src, pseudo_random(9, (16 * MIB) as usize)).expect("write");
    let local = LocalRepo::open(&t.p("repo"), true).expect("repo");
    let dev = Arc::new(Device::open_read(&src).expect("open"));
    let region = Region::whole(dev);
    let progress = Arc::new(Progress::new());
    let wrapped = CancelAfter {
        inner: &local,
        progress: progress.clone(),
        after: 30,
        fetched: AtomicU32::new(0),
    };
    let opts = aula_imager::create::CreateOptions {
        chunk_size: 256 << 10,
        raw: true,
        threads: 2,
        ..Default::default()
    };
    let info = aula_imager::create::SourceInfo::default();
    let r = aula_imager::create::create_partition("cc", &region, &info, &wrapped, &opts, &progress);
    assert!(matches!(r, Err(aula_imager::Error::Cancelled)), "{r:?}");
    assert!(
        local.manifest("cc", None).is_err(),
        "a cancelled create published a manifest"
    );
    let progress = Arc::new(Progress::new());
    let m = aula_imager::create::create_partition("cc", &region, &info, &local, &opts, &progress)
        .expect("rerun");
    let stored_again = progress.snapshot().bytes_written;
    let total: u64 = m.chunks.iter().map(|c| c.stored).sum();
    assert!(
        stored_again < total,
        "rerun stored {stored_again} of {total}: nothing was reused"
    );
    imager_ok(&["restore", "cc", "--repo", &t.s("repo"), &t.s("out.raw")]);
    assert_eq!(sha256_file(&t.p("out.raw")), sha256_file(&src));
}

#[test]
fn identical_windows_are_stored_once_and_zero_windows_not_at_all() {
    let t = Tmp::new();
    let src = t.p("src.raw");
    let block = pseudo_random(3, (MIB) as usize);
    let mut data = Vec::new();
    for i in 0..8 {
        if i % 2 == 0 {
            data.extend_from_slice(&block);
        } else {
            data.extend(std::iter::repeat_n(0u8, MIB as usize));
        }
    }
    std::fs::write(&src, &data).expect("write");
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--raw",
        "--repo",
        &t.s("repo"),
        "--name",
        "dup",
        "--chunk-kib",
        "1024",
    ]);
    let m = manifest(&t.p("repo"), "dup");
    assert_eq!(m.chunks.len(), 8);
    assert_eq!(m.chunks.iter().filter(|c| c.id.is_none()).count(), 4);
    assert_eq!(m.unique_chunks().len(), 1);
    let files = sh_out(&format!(
        "find {} -name '*.zst' | wc -l",
        t.s("repo/chunks")
    ));
    assert_eq!(files.trim(), "1");
    // A second image of the same data adds no chunk files.
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--raw",
        "--repo",
        &t.s("repo"),
        "--name",
        "dup2",
        "--chunk-kib",
        "1024",
    ]);
    let files = sh_out(&format!(
        "find {} -name '*.zst' | wc -l",
        t.s("repo/chunks")
    ));
    assert_eq!(files.trim(), "1");
    // Restoring over garbage writes the zero windows as zeros.
    fill(&t.p("out.raw"), 0x99, 8 * MIB);
    imager_ok(&["restore", "dup", "--repo", &t.s("repo"), &t.s("out.raw")]);
    assert_eq!(std::fs::read(t.p("out.raw")).expect("read"), data);
}

#[test]
fn block_device_round_trip_through_loop_devices() {
    assert!(
        is_root(),
        "this test needs root (losetup): run it as root, as scripts/test does"
    );
    let t = Tmp::new();
    let src = ext4_source(&t, "src.img", 40, 8);
    let dst = t.p("dst.img");
    fill(&dst, 0, 40 * MIB);
    let lsrc = sh_out(&format!("losetup -f --show -r {}", src.display()))
        .trim()
        .to_string();
    let ldst = sh_out(&format!("losetup -f --show {}", dst.display()))
        .trim()
        .to_string();
    struct Detach(Vec<String>);
    impl Drop for Detach {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", d])
                    .status();
            }
        }
    }
    let _g = Detach(vec![lsrc.clone(), ldst.clone()]);
    imager_ok(&["create", &lsrc, "--repo", &t.s("repo"), "--name", "blk"]);
    let m = manifest(&t.p("repo"), "blk");
    assert_eq!(m.source_size, 40 * MIB, "size must come from BLKGETSIZE64");
    assert_eq!(m.sector_size, 512);
    imager_ok(&["restore", "blk", "--repo", &t.s("repo"), &ldst]);
    sh(&format!("sync; blockdev --flushbufs {ldst}"));
    assert_used_equal(&m, &src, 0, &dst, 0);
}

#[test]
fn a_manifest_with_a_wrong_fingerprint_is_caught_by_verify_and_costs_a_restore_only_its_skip() {
    // The fingerprint only decides whether a target already holds a chunk;
    // fetched content is verified against the SHA-256 id. A wrong one is
    // reported by verify, and a restore still writes the right bytes: the
    // window with the wrong fingerprint is never taken as in place.
    let t = Tmp::new();
    let src = t.p("src.raw");
    let data = pseudo_random(41, (4 * MIB) as usize);
    std::fs::write(&src, &data).expect("write");
    imager_ok(&[
        "create",
        &src.display().to_string(),
        "--raw",
        "--repo",
        &t.s("repo"),
        "--name",
        "fp",
        "--chunk-kib",
        "1024",
    ]);
    let m = manifest(&t.p("repo"), "fp");
    assert!(
        m.chunks.iter().all(|c| c.b3.is_some()),
        "create records fingerprints"
    );
    let mf = t.p("repo/images/fp/1.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mf).expect("manifest")).expect("json");
    v["chunks"][2]["b3"] = serde_json::Value::String("00".repeat(32));
    std::fs::write(&mf, serde_json::to_vec(&v).expect("ser")).expect("write");
    let o = imager(&["verify", "fp", "--repo", &t.s("repo")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("fingerprint"), "{}", stderr(&o));
    let restore = |extra: &[&str]| {
        let (repo, out, records) = (t.s("repo"), t.s("out.raw"), t.s("records"));
        let mut args = vec![
            "restore",
            "fp",
            "--repo",
            &repo,
            &out,
            "--records",
            &records,
        ];
        args.extend_from_slice(extra);
        let o = imager(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(std::fs::read(t.p("out.raw")).expect("read"), data);
        stderr(&o) + &String::from_utf8_lossy(&o.stdout)
    };
    restore(&["--threads", "1"]);
    // Again, hashing the target: three windows match their fingerprints;
    // the one with the wrong fingerprint is fetched and written again.
    let again = restore(&["--scan"]);
    assert!(again.contains("3 of 4 chunks skipped"), "{again}");
}
