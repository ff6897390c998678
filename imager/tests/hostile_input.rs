//! Hostile disks and manifests through the CLI (issue 15): a crafted NTFS
//! partition (an `$ATTRIBUTE_LIST` of 2^44 bytes, which made `disks` abort
//! with a 16 TiB allocation) and a crafted ext4 partition (8 blocks per
//! group) get a clear error from `disks`, `disks --usage` and `create`;
//! a manifest claiming 2^64 − 1 bytes is refused in milliseconds by `info`
//! and `restore`, and the restore changes nothing.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::*;

const MIB: u64 = 1 << 20;

/// An 8 MiB MBR disk: partition 1 (1 MiB + 2 MiB) a crafted NTFS,
/// partition 2 (3 MiB + 2 MiB) a crafted ext4, both made by the real mkfs.
fn crafted_disk(t: &Tmp) -> PathBuf {
    let disk = t.p("hostile.img");
    sh(&format!(
        "truncate -s 8M {d} && printf 'start=2048, size=4096, type=7\\nstart=6144, size=4096, type=83\\n' | sfdisk -q {d}",
        d = disk.display()
    ));
    let ntfs = t.p("ntfs.img");
    sh(&format!(
        "truncate -s 2M {n} && mkntfs -q -F -f -L crafted {n} >/dev/null 2>&1",
        n = ntfs.display()
    ));
    let mut v = std::fs::read(&ntfs).expect("ntfs");
    aula_imager::fuzzing::craft::ntfs_huge_attribute_list(&mut v);
    std::fs::write(&ntfs, &v).expect("write");
    let ext = t.p("ext.img");
    sh(&format!(
        "truncate -s 2M {e} && mkfs.ext4 -q -F {e}",
        e = ext.display()
    ));
    let mut v = std::fs::read(&ext).expect("ext4");
    aula_imager::fuzzing::craft::ext_blocks_per_group(&mut v, 8);
    std::fs::write(&ext, &v).expect("write");
    for (f, at) in [(&ntfs, 1), (&ext, 3)] {
        sh(&format!(
            "dd if={} of={} bs=1M seek={at} conv=notrunc status=none",
            f.display(),
            disk.display()
        ));
    }
    disk
}

const NTFS_ERROR: &str =
    "ntfs: corrupt: attribute list of record 0 holds 17592186044416 bytes (at most 262144)";
const EXT_ERROR: &str = "ext4: corrupt: 8 blocks per group";

fn timed(args: &[&str]) -> (std::process::Output, Duration) {
    let t0 = Instant::now();
    let o = imager(args);
    (o, t0.elapsed())
}

#[test]
fn crafted_ntfs_and_ext4_partitions_get_a_clear_error_from_disks_not_an_abort() {
    let t = Tmp::new();
    let disk = crafted_disk(&t);
    let d = disk.display().to_string();
    for args in [
        vec!["disks", "--file", &d],
        vec!["disks", "--file", &d, "--usage"],
        vec!["disks", "--file", &d, "--json"],
    ] {
        let (o, took) = timed(&args);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{args:?}: {:?}\n{out}\n{}",
            o.status,
            stderr(&o)
        );
        assert!(out.contains(NTFS_ERROR), "{args:?}: {out}");
        assert!(out.contains(EXT_ERROR), "{args:?}: {out}");
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
}

#[test]
fn creating_an_image_of_a_crafted_partition_fails_cleanly() {
    let t = Tmp::new();
    let disk = crafted_disk(&t);
    for (n, want) in [("1", NTFS_ERROR), ("2", EXT_ERROR)] {
        let o = imager(&[
            "create",
            &disk.display().to_string(),
            "--partition",
            n,
            "--repo",
            &t.s("repo"),
            "--name",
            "evil",
            "-q",
        ]);
        assert_eq!(o.status.code(), Some(1), "partition {n}: {:?}", o.status);
        assert!(stderr(&o).contains(want), "partition {n}: {}", stderr(&o));
    }
}

/// A local repository holding `images/evil/1.json` = `manifest`.
fn repo_with(t: &Tmp, manifest: &serde_json::Value) -> String {
    aula_imager::repo::LocalRepo::open(&t.p("repo"), true).expect("a new repository");
    let dir = t.p("repo/images/evil");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("1.json"),
        serde_json::to_vec(manifest).expect("json"),
    )
    .expect("write");
    t.s("repo")
}

/// The tiny manifest of issue 15: 2^64 − 1 bytes, nothing used.
pub fn huge_manifest() -> serde_json::Value {
    serde_json::json!({
        "format": "aula-image", "version": 1, "name": "evil", "image_version": 1,
        "created": "2026-01-01T00:00:00Z", "tool": "test", "kind": "partition",
        "source_size": u64::MAX, "sector_size": 512, "map": "raw", "used": [],
        "used_bytes": 0, "chunk_size": 65536,
        "compression": {"algorithm": "zstd", "level": 3}, "hash": "sha256", "chunks": []
    })
}

#[test]
fn a_manifest_of_two_to_the_64_bytes_is_refused_in_milliseconds_and_changes_nothing() {
    let t = Tmp::new();
    let repo = repo_with(&t, &huge_manifest());
    let (o, took) = timed(&["info", "evil", "--repo", &repo]);
    assert_eq!(o.status.code(), Some(1), "{:?} {}", o.status, stderr(&o));
    assert!(stderr(&o).contains("larger than"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(2), "info took {took:?}");
    let target = t.p("target.img");
    fill(&target, 0xA5, 4 * MIB);
    let before = sha256_file(&target);
    let (o, took) = timed(&["restore", "evil", "--repo", &repo, &t.s("target.img"), "-q"]);
    assert_eq!(o.status.code(), Some(1), "{:?} {}", o.status, stderr(&o));
    assert!(took < Duration::from_secs(2), "restore took {took:?}");
    assert_eq!(sha256_file(&target), before, "the target changed");
    assert!(Path::new(&t.p("target.img")).exists());
}
