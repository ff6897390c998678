//! Layouts applied to disk image files and loop devices: tables that the
//! standard tools read back, valid filesystems with the right labels made
//! by offset, the OpenGnsys form giving the same disk as the native form,
//! and bad layouts / busy targets refused without writing a byte.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use aula_imager::device::Device;
use aula_imager::disk::layout::{self, ApplyOptions, FormatVia, LayoutError, LayoutSpec};
use aula_imager::table::{self, TableKind};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// Require every tool: a test that needs a missing one fails
/// (scripts/test installs them), it never passes silently.
fn need_all(tools: &[&str]) {
    let missing: Vec<&&str> = tools.iter().filter(|t| !have(t)).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}: install them (scripts/test does)"
    );
}

fn run(prog: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(prog)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("run tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    /// A loop device over `file`; the test fails when none can be made
    /// (it needs root: scripts/test runs as root).
    fn attach(file: &Path, sector_size: u32, read_only: bool) -> Loop {
        let ss = sector_size.to_string();
        let mut args = vec!["-f", "--show", "--sector-size", &ss];
        if read_only {
            args.push("-r");
        }
        args.push(s(file));
        let (ok, out, err) = run("losetup", &args);
        assert!(ok, "cannot create a loop device (needs root): {err}");
        Loop(PathBuf::from(out.trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p)
        .expect("create")
        .set_len(size)
        .expect("size");
    p
}

/// Copy a byte range of `src` into a new sparse file.
fn extract(src: &Path, start: u64, len: u64, dst: &Path) {
    let f = File::open(src).expect("open source");
    let out = File::create(dst).expect("create extract");
    out.set_len(len).expect("size extract");
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        f.read_exact_at(&mut buf[..n], start + at)
            .expect("read range");
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], at).expect("write extract");
        }
        at += n as u64;
    }
}

fn blkid(p: &Path) -> (String, Option<String>) {
    let (_, out, _) = run("blkid", &["-p", "-o", "export", s(p)]);
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    (get("TYPE").unwrap_or_default(), get("LABEL"))
}

/// Extract partition `number` of `img` and check its filesystem.
fn check_fs(img: &Path, t: &table::PartitionTable, number: u32, fstype: &str, label: &str) {
    let p = t.partition(number).expect("partition");
    let dir = tempfile::tempdir().expect("tempdir");
    let x = dir.path().join(format!("p{number}"));
    extract(img, p.start, p.size, &x);
    let (ty, lbl) = blkid(&x);
    assert_eq!(ty, fstype, "partition {number}: blkid type");
    assert_eq!(lbl.as_deref(), Some(label), "partition {number}: label");
    let (ok, out, err) = match fstype {
        "ext4" => run("e2fsck", &["-fn", s(&x)]),
        "vfat" => run("fsck.fat", &["-n", s(&x)]),
        "ntfs" => run("ntfsfix", &["-n", s(&x)]),
        _ => (true, String::new(), String::new()),
    };
    assert!(
        ok,
        "partition {number} ({fstype}) does not check clean: {out} {err}"
    );
}

fn sha256(p: &Path) -> Vec<u8> {
    let data = std::fs::read(p).expect("read");
    ring::digest::digest(&ring::digest::SHA256, &data)
        .as_ref()
        .to_vec()
}

fn spec(json: &str) -> LayoutSpec {
    serde_json::from_str(json).expect("layout json")
}

fn read_table(p: &Path, ss: u32) -> table::PartitionTable {
    let mut d = Device::open_read(p).expect("open");
    d.set_sector_size(ss);
    table::read(&d, Some(ss)).expect("read").expect("a table")
}

#[test]
fn gpt_layout_on_a_file_formats_by_offset() {
    need_all(&[
        "mkfs.ext4",
        "mkfs.fat",
        "mkntfs",
        "mkswap",
        "e2fsck",
        "fsck.fat",
        "ntfsfix",
        "blkid",
        "sgdisk",
        "sfdisk",
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sparse_file(dir.path(), "gpt.img", 512 * MIB);
    // Stale bytes everywhere a filesystem will go: formatting must not care.
    let f = File::options().write(true).open(&img).expect("open");
    for at in (MIB..512 * MIB).step_by((16 * MIB) as usize) {
        f.write_all_at(&[0xa5u8; 4096], at).expect("stale");
    }
    drop(f);
    let s_ = spec(
        r#"{"table":"gpt","partitions":[
        {"number":1,"type":"efi","size":"64MiB","filesystem":"fat32","label":"ESP"},
        {"number":2,"type":"ntfs","size":"64MiB","filesystem":"ntfs","label":"Windows"},
        {"number":3,"type":"linux-swap","size":"16MiB","filesystem":"swap","label":"SW"},
        {"number":5,"type":"linux","size":"rest","filesystem":"ext4","label":"ROOT"},
        {"number":6,"type":"cache","size":"64MiB"}]}"#,
    );
    let applied = layout::apply(&img, &s_, &ApplyOptions::default()).expect("apply");
    assert_eq!(applied.formatted.len(), 5);
    assert!(applied.formatted.iter().all(|f| f.via == FormatVia::Offset));
    let t = read_table(&img, 512);
    assert_eq!(t, applied.table);
    assert_eq!(
        t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 2, 3, 5, 6]
    );
    let cache = t.partition(6).expect("cache");
    assert_eq!(cache.name.as_deref(), Some("CACHE"));
    assert_eq!(
        cache.start + cache.size,
        (512 * MIB / 512 - 34) * 512 / MIB * MIB,
        "CACHE is at the end"
    );
    assert_eq!(
        t.partition(5).expect("5").start + t.partition(5).expect("5").size,
        cache.start
    );
    let (ok, out, _) = run("sgdisk", &["-v", s(&img)]);
    assert!(ok && out.contains("No problems found"), "{out}");
    let j: Value = serde_json::from_str(&run("sfdisk", &["--json", s(&img)]).1).expect("json");
    let nodes: Vec<String> = j["partitiontable"]["partitions"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| {
            p["node"]
                .as_str()
                .expect("node")
                .chars()
                .last()
                .expect("digit")
                .to_string()
        })
        .collect();
    assert_eq!(nodes, ["1", "2", "3", "5", "6"]);
    check_fs(&img, &t, 1, "vfat", "ESP");
    check_fs(&img, &t, 2, "ntfs", "Windows");
    check_fs(&img, &t, 3, "swap", "SW");
    check_fs(&img, &t, 5, "ext4", "ROOT");
    check_fs(&img, &t, 6, "ext4", "CACHE");
    // The FAT boot sector records the partition start as hidden sectors.
    let mut bs = [0u8; 512];
    File::open(&img)
        .expect("open")
        .read_exact_at(&mut bs, t.partition(1).expect("1").start)
        .expect("bs");
    assert_eq!(
        u32::from_le_bytes([bs[28], bs[29], bs[30], bs[31]]) as u64,
        MIB / 512
    );
    // The inventory of the file shows the same partitions.
    let info = aula_imager::disk::inspect_file(&img).expect("inspect");
    assert_eq!(info.partitions.len(), 5);
    assert!(info.partition(6).expect("cache").cache);
    assert_eq!(
        info.partition(6).expect("cache").code.as_deref(),
        Some("CA00")
    );
    // Filesystem type, label and used space as the inventory reports them.
    let opts = aula_imager::disk::InspectOptions {
        sector_size: None,
        usage: true,
    };
    let info = aula_imager::disk::inspect(&img, &opts).expect("inspect with usage");
    let want = [
        (1, "fat32", "ESP"),
        (2, "ntfs", "Windows"),
        (3, "swap", "SW"),
        (5, "ext4", "ROOT"),
        (6, "ext4", "CACHE"),
    ];
    for (n, fstype, label) in want {
        let p = info.partition(n).expect("partition");
        assert_eq!(
            p.filesystem.as_deref(),
            Some(fstype),
            "partition {n}: {p:?}"
        );
        assert_eq!(p.label.as_deref(), Some(label), "partition {n}");
        assert!(p.uuid.is_some(), "partition {n} has no UUID");
        if fstype != "swap" {
            let used = p
                .used
                .unwrap_or_else(|| panic!("partition {n}: no used size: {p:?}"));
            assert!(used > 0 && used < p.size, "partition {n}: used {used}");
        }
    }
}

#[test]
fn mbr_layout_with_logicals_on_a_4k_file() {
    need_all(&[
        "mkfs.ext4",
        "mkntfs",
        "mkswap",
        "e2fsck",
        "ntfsfix",
        "blkid",
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sparse_file(dir.path(), "mbr4k.img", 512 * MIB);
    let s_ = spec(
        r#"{"table":"mbr","disk_id":"0x0badcafe","partitions":[
        {"number":1,"type":"ntfs","size":"64MiB","filesystem":"ntfs","label":"NT4K","bootable":true},
        {"number":2,"type":"extended","size":"rest"},
        {"number":5,"type":"linux","size":"64MiB","filesystem":"ext4","label":"DATA"},
        {"number":6,"type":"swap","size":"rest","filesystem":"swap"},
        {"number":4,"type":"CACHE","size":"64MiB"}]}"#,
    );
    let opts = ApplyOptions {
        sector_size: Some(4096),
        ..Default::default()
    };
    let applied = layout::apply(&img, &s_, &opts).expect("apply");
    assert_eq!(applied.table.disk_id, "0x0badcafe");
    let t = read_table(&img, 4096);
    assert_eq!(t, applied.table);
    let get = |n: u32| t.partition(n).expect("partition").clone();
    assert_eq!(get(4).start + get(4).size, 512 * MIB);
    assert_eq!(get(4).ptype, "0xca");
    assert_eq!(get(5).start, get(2).start + MIB);
    assert_eq!(get(6).start + get(6).size, get(2).start + get(2).size);
    check_fs(&img, &t, 1, "ntfs", "NT4K");
    check_fs(&img, &t, 5, "ext4", "DATA");
    check_fs(&img, &t, 4, "ext4", "CACHE");
    // The inventory of the 4K image file finds the filesystems.
    let opts = aula_imager::disk::InspectOptions {
        sector_size: Some(4096),
        usage: false,
    };
    let info = aula_imager::disk::inspect(&img, &opts).expect("inspect 4k");
    assert_eq!(info.logical_sector_size, 4096);
    let p4 = info.partition(4).expect("cache");
    assert!(p4.cache);
    assert_eq!(p4.code.as_deref(), Some("ca"));
    for (n, fstype, label) in [
        (1, "ntfs", "NT4K"),
        (5, "ext4", "DATA"),
        (4, "ext4", "CACHE"),
    ] {
        let p = info.partition(n).expect("partition");
        assert_eq!(p.filesystem.as_deref(), Some(fstype), "partition {n}");
        assert_eq!(p.label.as_deref(), Some(label), "partition {n}");
    }
    assert_eq!(
        info.partition(6).expect("swap").filesystem.as_deref(),
        Some("swap")
    );
    assert!(info.partition(2).expect("extended").extended);
    // NTFS made for 4 KiB sectors.
    let mut bs = [0u8; 512];
    File::open(&img)
        .expect("open")
        .read_exact_at(&mut bs, get(1).start)
        .expect("bs");
    assert_eq!(u16::from_le_bytes([bs[11], bs[12]]), 4096);
    // sfdisk on a 4K loop device reads the same table.
    if have("sfdisk") && have("losetup") {
        {
            let lo = Loop::attach(&img, 4096, true);
            let j: Value =
                serde_json::from_str(&run("sfdisk", &["--json", s(&lo.0)]).1).expect("json");
            let pt = &j["partitiontable"];
            assert_eq!(pt["sectorsize"].as_u64(), Some(4096));
            assert_eq!(pt["id"].as_str(), Some("0x0badcafe"));
            let parts = pt["partitions"].as_array().expect("parts");
            assert_eq!(parts.len(), t.partitions.len());
            for (p, w) in parts.iter().zip(&t.partitions) {
                assert_eq!(p["start"].as_u64(), Some(w.start / 4096));
                assert_eq!(p["size"].as_u64(), Some(w.size / 4096));
            }
        }
    }
}

fn table_key(t: &table::PartitionTable) -> Vec<(u32, u64, u64, String, Option<String>)> {
    t.partitions
        .iter()
        .map(|p| (p.number, p.start, p.size, p.ptype.clone(), p.name.clone()))
        .collect()
}

#[test]
fn opengnsys_form_gives_the_same_disk_as_the_native_form() {
    need_all(&["mkfs.ext4", "mkfs.fat", "mkswap"]);
    let cases = [
        (
            r#"{"type":"MSDOS","disk":"1","cache":"1","cache_size":"102400","partition_setup":[
              {"partition":"1","code":"NTFS","filesystem":"NTFS","size":"102400","format":"0"},
              {"partition":"2","code":"LINUX","filesystem":"EXT4","size":"204800","format":"1"},
              {"partition":"3","code":"EMPTY","filesystem":"EMPTY","size":"0","format":"0"},
              {"partition":"4","code":"CACHE","filesystem":"CACHE","size":"102400","format":"1"}]}"#,
            r#"{"table":"mbr","partitions":[
              {"number":1,"type":"7","size":"100MiB"},
              {"number":2,"type":"linux","size":"200MiB","filesystem":"ext4"},
              {"number":4,"type":"cache","size":"100MiB"}]}"#,
            TableKind::Mbr,
        ),
        (
            r#"{"type":"GPT","disk":1,"cache":"0","cache_size":"0","partition_setup":[
              {"partition":1,"code":"EFI","filesystem":"FAT32","size":51200,"format":1},
              {"partition":"2","code":"ef00","filesystem":"EMPTY","size":"10000","format":"0"},
              {"partition":"3","code":"LINUX-SWAP","filesystem":"LINUX-SWAP","size":"65536","format":"1"},
              {"partition":"4","code":"CACHE","filesystem":"CACHE","size":"153600","format":"1"},
              {"partition":"5","code":"8300","filesystem":"EXT4","size":"1000","format":"0"}]}"#,
            r#"{"table":"gpt","partitions":[
              {"number":1,"type":"efi","size":"50MiB","filesystem":"fat32"},
              {"number":2,"type":"EF00","size":"10000KiB"},
              {"number":3,"type":"swap","size":"64MiB","filesystem":"swap"},
              {"number":4,"type":"CACHE","size":"150MiB","filesystem":"ext4","label":"CACHE"},
              {"number":5,"type":"0FC63DAF-8483-4772-8E79-3D69D8477DE4","size":"1MiB"}]}"#,
            TableKind::Gpt,
        ),
    ];
    for (og, native, kind) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = sparse_file(dir.path(), "og.img", 1024 * MIB);
        let b = sparse_file(dir.path(), "native.img", 1024 * MIB);
        let setup = layout::OpenGnsysSetup::parse(og).expect("parse og");
        assert_eq!(setup.disk().expect("disk"), 1);
        let from_og = setup.to_spec().expect("convert");
        assert_eq!(from_og.table, kind);
        let ra = layout::apply(&a, &from_og, &ApplyOptions::default()).expect("apply og");
        let rb = layout::apply(&b, &spec(native), &ApplyOptions::default()).expect("apply native");
        let (ta, tb) = (read_table(&a, 512), read_table(&b, 512));
        assert_eq!(table_key(&ta), table_key(&tb), "tables differ");
        let fa: Vec<_> = ra
            .formatted
            .iter()
            .map(|f| (f.number, f.filesystem, f.label.clone()))
            .collect();
        let fb: Vec<_> = rb
            .formatted
            .iter()
            .map(|f| (f.number, f.filesystem, f.label.clone()))
            .collect();
        assert_eq!(fa, fb, "formatting differs");
        if kind == TableKind::Mbr {
            assert_eq!(
                ta.partition(4).expect("cache").start + ta.partition(4).expect("cache").size,
                1024 * MIB
            );
        }
    }
}

#[test]
fn bad_layouts_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sparse_file(dir.path(), "keep.img", 64 * MIB);
    // A disk with something on it: a valid table and data.
    let good = spec(r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"rest"}]}"#);
    let plan = layout::plan(&good, 64 * MIB, 512).expect("plan");
    let dev = Device::open(
        &img,
        aula_imager::device::OpenMode {
            write: true,
            ..Default::default()
        },
    )
    .expect("open");
    table::write(&dev, &plan.table).expect("write");
    dev.write_all_at(b"precious data", 2 * MIB).expect("data");
    drop(dev);
    let before = sha256(&img);
    let cases: &[(&str, &str)] = &[
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"20M","start":"1M"},{"number":2,"type":"linux","size":"20M","start":"10M"}]}"#,
            "partitions 1 (bytes",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"10M"},{"number":2,"type":"linux","size":"1G"}]}"#,
            "partition 2: 1024 MiB",
        ),
        (
            r#"{"table":"mbr","partitions":[{"number":1,"type":"linux","size":"100M"}]}"#,
            "partition 1",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"bogus","size":"1M"}]}"#,
            "partition 1: unknown partition type",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"9999","size":"1M"}]}"#,
            "partition 1: unknown GPT type code",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"cache","size":"8M"},{"number":3,"type":"ca","size":"8M"}]}"#,
            "partition 3: a second CACHE partition",
        ),
        (
            r#"{"table":"mbr","partitions":[{"number":1,"type":"83","size":"4M"},{"number":2,"type":"83","size":"4M"},{"number":3,"type":"83","size":"4M"},{"number":4,"type":"83","size":"4M"},{"number":5,"type":"83","size":"4M"}]}"#,
            "partition 5: partitions above 4 are logical and need an extended partition",
        ),
        (
            r#"{"table":"mbr","partitions":[{"number":1,"type":"83","size":"4M"},{"number":1,"type":"83","size":"4M"}]}"#,
            "partition 1: listed twice",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"efi","size":"8M","filesystem":"fat32"}]}"#,
            "partition 1: fat32 needs at least 34 MiB",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":2,"type":"efi","size":"40M","filesystem":"fat32","label":"lowercase_too_long"}]}"#,
            "partition 2: label",
        ),
        (
            r#"{"table":"mbr","partitions":[{"number":1,"type":"extended","size":"10M","filesystem":"ext4"}]}"#,
            "partition 1: an extended partition holds no filesystem",
        ),
        (
            r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"rest"},{"number":2,"type":"linux","size":"rest"}]}"#,
            "rest",
        ),
    ];
    for (json, needle) in cases {
        let e = layout::apply(&img, &spec(json), &ApplyOptions::default()).expect_err(json);
        let msg = e.to_string();
        assert!(
            msg.contains(needle),
            "{json}\n  error: {msg}\n  wanted: {needle}"
        );
        assert!(!matches!(e, LayoutError::Failed { .. }), "{msg}");
        assert_eq!(sha256(&img), before, "{json} changed the disk");
    }
    // Unknown fields are refused when parsing.
    assert!(serde_json::from_str::<LayoutSpec>(
        r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"1M","colour":"red"}]}"#
    )
    .is_err());
    // OpenGnsys forms are checked the same way.
    let og = r#"{"type":"MSDOS","partition_setup":[{"partition":"1","code":"NOPE","filesystem":"EXT4","size":"1024","format":"0"}]}"#;
    let e = layout::apply(
        &img,
        &layout::from_opengnsys(og).expect("converts"),
        &ApplyOptions::default(),
    )
    .expect_err("bad code");
    assert!(e.to_string().contains("partition 1"), "{e}");
    let og = r#"{"type":"GPT","partition_setup":[{"partition":"1","code":"LINUX","filesystem":"XFS","size":"1024","format":"1"}]}"#;
    let e = layout::from_opengnsys(og).expect_err("xfs cannot be made");
    assert!(e.to_string().contains("partition 1"), "{e}");
    assert_eq!(sha256(&img), before);
}

#[test]
fn busy_targets_are_refused() {
    need_all(&["losetup", "mkfs.ext4", "mount", "umount"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let img = sparse_file(dir.path(), "busy.img", 64 * MIB);
    let s_ = spec(r#"{"table":"gpt","partitions":[{"number":1,"type":"linux","size":"rest"}]}"#);
    let before = sha256(&img);
    {
        // An image file a loop device reads.
        let lo = Loop::attach(&img, 512, false);
        let e = layout::apply(&img, &s_, &ApplyOptions::default()).expect_err("busy file");
        assert!(matches!(e, LayoutError::Busy { .. }), "{e}");
        assert!(e.to_string().contains(s(&lo.0)), "{e}");
        assert_eq!(sha256(&img), before);

        // A block device with a mounted filesystem.
        let (ok, _, err) = run("mkfs.ext4", &["-q", "-F", s(&lo.0)]);
        assert!(ok, "{err}");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let (ok, _, err) = run("mount", &[s(&lo.0), s(&mnt)]);
        assert!(ok, "mounting {}: {err}", s(&lo.0));
        {
            let _m = Mounted(mnt.clone());
            let before = sha256(&img);
            let e = layout::apply(&lo.0, &s_, &ApplyOptions::default()).expect_err("mounted");
            assert!(matches!(e, LayoutError::Busy { .. }), "{e}");
            assert!(e.to_string().contains("mounted on"), "{e}");
            assert_eq!(sha256(&img), before);
        }
    }
    // A block device someone holds open exclusively.
    let lo = Loop::attach(&img, 512, false);
    use std::os::unix::fs::OpenOptionsExt;
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&lo.0)
        .expect("hold");
    let before = sha256(&img);
    let e = layout::apply(&lo.0, &s_, &ApplyOptions::default()).expect_err("held");
    assert!(matches!(e, LayoutError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("EBUSY"), "{e}");
    drop(holder);
    assert_eq!(sha256(&img), before);
}

#[test]
fn layouts_on_loop_block_devices_without_partition_nodes() {
    need_all(&[
        "losetup",
        "mkfs.ext4",
        "mkfs.fat",
        "mkswap",
        "mkntfs",
        "e2fsck",
        "fsck.fat",
        "ntfsfix",
        "blkid",
        "sfdisk",
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    // 512-byte sectors, GPT.
    let img = sparse_file(dir.path(), "lo512.img", 256 * MIB);
    {
        let lo = Loop::attach(&img, 512, false);
        let s_ = spec(
            r#"{"table":"gpt","partitions":[
            {"number":1,"type":"efi","size":"40MiB","filesystem":"fat32","label":"EFI"},
            {"number":2,"type":"ntfs","size":"40MiB","filesystem":"ntfs","label":"WIN"},
            {"number":3,"type":"linux","size":"rest","filesystem":"ext4","label":"root"}]}"#,
        );
        let applied = layout::apply(&lo.0, &s_, &ApplyOptions::default()).expect("apply on loop");
        // This kernel does not partition loop devices: formatted by offset.
        if applied.formatted.iter().all(|f| f.via == FormatVia::Offset) {
            assert!(applied.note.is_some());
        }
        let j: Value = serde_json::from_str(&run("sfdisk", &["--json", s(&lo.0)]).1).expect("json");
        assert_eq!(
            j["partitiontable"]["partitions"]
                .as_array()
                .expect("parts")
                .len(),
            3
        );
        let info = aula_imager::disk::inspect(&lo.0, &Default::default()).expect("inspect loop");
        assert_eq!(info.transport, aula_imager::disk::Transport::Loop);
        assert_eq!(info.partitions.len(), 3);
    }
    let t = read_table(&img, 512);
    check_fs(&img, &t, 1, "vfat", "EFI");
    check_fs(&img, &t, 2, "ntfs", "WIN");
    check_fs(&img, &t, 3, "ext4", "root");

    // 4096-byte sectors, MBR with logical partitions.
    let img = sparse_file(dir.path(), "lo4k.img", 256 * MIB);
    {
        let lo = Loop::attach(&img, 4096, false);
        let s_ = spec(
            r#"{"table":"mbr","partitions":[
            {"number":1,"type":"linux","size":"32MiB","filesystem":"ext4","label":"boot"},
            {"number":2,"type":"extended","size":"rest"},
            {"number":5,"type":"linux","size":"64MiB","filesystem":"ext4","label":"five"},
            {"number":6,"type":"swap","size":"32MiB","filesystem":"swap","label":"six"},
            {"number":7,"type":"ntfs","size":"rest","filesystem":"ntfs","label":"seven"}]}"#,
        );
        let applied =
            layout::apply(&lo.0, &s_, &ApplyOptions::default()).expect("apply on 4K loop");
        assert_eq!(applied.table.sector_size, 4096);
        let j: Value = serde_json::from_str(&run("sfdisk", &["--json", s(&lo.0)]).1).expect("json");
        let pt = &j["partitiontable"];
        assert_eq!(pt["sectorsize"].as_u64(), Some(4096));
        let parts = pt["partitions"].as_array().expect("parts");
        assert_eq!(parts.len(), 5);
        for (p, w) in parts.iter().zip(&applied.table.partitions) {
            assert_eq!(p["start"].as_u64(), Some(w.start / 4096));
            assert_eq!(p["size"].as_u64(), Some(w.size / 4096));
        }
    }
    let t = read_table(&img, 4096);
    check_fs(&img, &t, 1, "ext4", "boot");
    check_fs(&img, &t, 5, "ext4", "five");
    check_fs(&img, &t, 6, "swap", "six");
    check_fs(&img, &t, 7, "ntfs", "seven");
}
