//! Partition tables written by `aula_imager::table` read back exactly by
//! sgdisk, sfdisk and fdisk, and tables written by sgdisk/sfdisk read
//! exactly by our reader (both ways), at 512- and 4096-byte sectors.
//! 4 KiB-sector cases use a loop device created with `--sector-size 4096`
//! (root); they are skipped with a message when loop devices are not
//! available.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use aula_imager::device::{Device, OpenMode};
use aula_imager::table::{self, Partition, PartitionTable, TableError, TableKind};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Require `tool`: a test that needs a missing one fails (scripts/test
/// installs them), it never passes silently.
fn need(tool: &str) {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    assert!(found, "{tool} is not installed (scripts/test installs it)");
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

fn sfdisk_json(path: &Path) -> Value {
    let (ok, out, err) = run("sfdisk", &["--json", path.to_str().expect("utf8 path")]);
    assert!(ok, "sfdisk --json failed: {err}");
    serde_json::from_str::<Value>(&out).expect("sfdisk json")["partitiontable"].clone()
}

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    /// A loop device over `file`; the test fails when none can be made
    /// (it needs root: scripts/test runs as root).
    fn attach(file: &Path, sector_size: u32) -> Loop {
        let ss = sector_size.to_string();
        let (ok, out, err) = run(
            "losetup",
            &[
                "-f",
                "--show",
                "--sector-size",
                &ss,
                file.to_str().expect("utf8 path"),
            ],
        );
        assert!(ok, "cannot create a loop device (needs root): {err}");
        Loop(PathBuf::from(out.trim()))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn make_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).expect("create image");
    f.set_len(size).expect("size image");
    // Recognisable boot code that no table write may touch.
    let code: Vec<u8> = (0..440u32).map(|i| (i * 7 + 3) as u8).collect();
    f.write_all_at(&code, 0).expect("boot code");
    p
}

fn boot_code(p: &Path) -> Vec<u8> {
    let mut b = vec![0u8; 440];
    File::open(p)
        .expect("open")
        .read_exact_at(&mut b, 0)
        .expect("read boot code");
    b
}

fn open_rw(p: &Path, ss: u32) -> Device {
    let mut d = Device::open(
        p,
        OpenMode {
            write: true,
            ..Default::default()
        },
    )
    .expect("open rw");
    d.set_sector_size(ss);
    d
}

fn part(number: u32, start: u64, size: u64, ptype: &str) -> Partition {
    Partition {
        number,
        start,
        size,
        ptype: ptype.to_string(),
        guid: None,
        name: None,
        attributes: 0,
        bootable: false,
        extended: false,
    }
}

const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const BASIC: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";

fn gpt_table(ss: u32) -> PartitionTable {
    let mut t = PartitionTable::new(TableKind::Gpt, ss);
    t.disk_id = "11223344-5566-4778-8899-AABBCCDDEEFF".into();
    let mut p1 = part(1, MIB, 10 * MIB, ESP);
    p1.name = Some("EFI system".into());
    p1.guid = Some("01020304-0506-4708-890A-0B0C0D0E0F10".into());
    p1.attributes = 1;
    let mut p2 = part(2, 11 * MIB, 20 * MIB, LINUX);
    p2.name = Some("root ünïcode".into());
    p2.attributes = (1u64 << 60) | (1u64 << 63);
    let p4 = part(4, 40 * MIB, 8 * MIB, BASIC);
    t.partitions = vec![p1, p2, p4];
    t
}

/// Check a written GPT against sfdisk --json and sgdisk -i.
fn check_gpt_with_tools(target: &Path, written: &PartitionTable) {
    let ss = u64::from(written.sector_size);
    let (ok, out, _) = run("sgdisk", &["-v", target.to_str().expect("utf8")]);
    assert!(ok && out.contains("No problems found"), "sgdisk -v: {out}");
    let j = sfdisk_json(target);
    assert_eq!(j["label"], "gpt");
    assert_eq!(j["sectorsize"].as_u64(), Some(ss));
    assert_eq!(j["id"].as_str(), Some(written.disk_id.as_str()));
    let parts = j["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), written.partitions.len());
    for (p, w) in parts.iter().zip(&written.partitions) {
        let node = p["node"].as_str().expect("node");
        assert!(
            node.ends_with(&w.number.to_string()),
            "{node} is not partition {}",
            w.number
        );
        assert_eq!(p["start"].as_u64(), Some(w.start / ss));
        assert_eq!(p["size"].as_u64(), Some(w.size / ss));
        assert_eq!(p["type"].as_str(), Some(w.ptype.as_str()));
        assert_eq!(p["uuid"].as_str(), w.guid.as_deref());
        assert_eq!(p["name"].as_str(), w.name.as_deref());
        let (ok, info, err) = run(
            "sgdisk",
            &["-i", &w.number.to_string(), target.to_str().expect("utf8")],
        );
        assert!(ok, "sgdisk -i: {err}");
        assert!(
            info.contains(&format!("Partition GUID code: {}", w.ptype)),
            "{info}"
        );
        assert!(
            info.contains(&format!(
                "Partition unique GUID: {}",
                w.guid.as_deref().expect("guid")
            )),
            "{info}"
        );
        assert!(
            info.contains(&format!("First sector: {} ", w.start / ss)),
            "{info}"
        );
        assert!(
            info.contains(&format!("Last sector: {} ", (w.start + w.size) / ss - 1)),
            "{info}"
        );
        assert!(
            info.contains(&format!("Attribute flags: {:016X}", w.attributes)),
            "{info}"
        );
        let name = w.name.clone().unwrap_or_default();
        assert!(
            info.contains(&format!("Partition name: '{name}'")),
            "{info}"
        );
    }
    check_fdisk_lines(target, written);
    // Slot 3 stays empty: sgdisk knows nothing of a partition 3.
    let (_, info3, _) = run("sgdisk", &["-i", "3", target.to_str().expect("utf8")]);
    assert!(
        !info3.contains("Partition GUID code"),
        "slot 3 should be empty: {info3}"
    );
}

#[test]
fn gpt_512_written_reads_back_in_sgdisk_and_sfdisk() {
    need("sgdisk");
    need("sfdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "gpt.img", 64 * MIB);
    let before = boot_code(&img);
    let dev = open_rw(&img, 512);
    let written = table::write(&dev, &gpt_table(512)).expect("write gpt");
    drop(dev);
    assert_eq!(
        written
            .partitions
            .iter()
            .map(|p| p.number)
            .collect::<Vec<_>>(),
        [1, 2, 4]
    );
    assert_eq!(
        written.partitions[0].guid.as_deref(),
        Some("01020304-0506-4708-890A-0B0C0D0E0F10")
    );
    // Generated partition GUIDs are version 4.
    let g2 = written.partitions[1].guid.clone().expect("generated guid");
    assert_eq!(g2.as_bytes()[14], b'4', "{g2} is not a v4 GUID");
    assert_eq!(boot_code(&img), before, "boot code bytes 0..440 changed");
    check_gpt_with_tools(&img, &written);
    // fdisk agrees too.
    let (ok, out, _) = run("fdisk", &["-l", img.to_str().expect("utf8")]);
    assert!(ok && out.contains("Disklabel type: gpt"), "{out}");
    // Our reader reads exactly what was written.
    let back = table::read(&Device::open_read(&img).expect("open"), Some(512))
        .expect("read")
        .expect("a table");
    assert_eq!(back, written);
}

#[test]
fn gpt_4k_written_reads_back_on_a_4k_loop_device() {
    need("sgdisk");
    need("losetup");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "gpt4k.img", 64 * MIB);
    let before = boot_code(&img);
    let dev = open_rw(&img, 4096);
    let written = table::write(&dev, &gpt_table(4096)).expect("write gpt 4k");
    drop(dev);
    assert_eq!(written.first_usable_lba, Some(6));
    assert_eq!(boot_code(&img), before);
    // The file alone: our reader probes 4096 when told nothing.
    let back = table::read(&Device::open_read(&img).expect("open"), None)
        .expect("read")
        .expect("a table");
    assert_eq!(back, written);
    let lo = Loop::attach(&img, 4096);
    check_gpt_with_tools(lo.path(), &written);
    let dev = Device::open_read(lo.path()).expect("open loop");
    assert_eq!(dev.sector_size(), 4096);
    let back = table::read(&dev, Some(4096))
        .expect("read")
        .expect("a table");
    assert_eq!(back, written);
}

fn mbr_table(ss: u32) -> PartitionTable {
    let s = u64::from(ss);
    let mut t = PartitionTable::new(TableKind::Mbr, ss);
    t.disk_id = "0x12345678".into();
    let mut p1 = part(1, MIB, 8 * MIB, "0x07");
    p1.bootable = true;
    let mut ext = part(2, 9 * MIB, 40 * MIB, "0x0f");
    ext.extended = true;
    let p3 = part(3, 50 * MIB, 6 * MIB, "0x83");
    // Logical partitions: 1 MiB gaps, one with a single free sector for its EBR.
    let p5 = part(5, 10 * MIB, 5 * MIB, "0x83");
    let p6 = part(6, 16 * MIB, 7 * MIB, "0x82");
    let p7 = part(7, 23 * MIB + s, 10 * MIB, "0x0c");
    t.partitions = vec![p1, ext, p3, p5, p6, p7];
    t
}

fn check_mbr_with_tools(target: &Path, written: &PartitionTable) {
    let ss = u64::from(written.sector_size);
    let j = sfdisk_json(target);
    assert_eq!(j["label"], "dos");
    assert_eq!(j["id"].as_str(), Some(written.disk_id.as_str()));
    assert_eq!(j["sectorsize"].as_u64(), Some(ss));
    let parts = j["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), written.partitions.len(), "{j}");
    for (p, w) in parts.iter().zip(&written.partitions) {
        let node = p["node"].as_str().expect("node");
        assert!(
            node.ends_with(&w.number.to_string()),
            "{node} is not partition {}",
            w.number
        );
        assert_eq!(p["start"].as_u64(), Some(w.start / ss), "{p}");
        assert_eq!(p["size"].as_u64(), Some(w.size / ss), "{p}");
        let code = u8::from_str_radix(w.ptype.trim_start_matches("0x"), 16).expect("code");
        assert_eq!(
            p["type"].as_str(),
            Some(format!("{code:x}").as_str()),
            "{p}"
        );
        assert_eq!(p["bootable"].as_bool().unwrap_or(false), w.bootable, "{p}");
    }
    check_fdisk_lines(target, written);
}

/// `fdisk -l` lists every partition with the right first and last sector.
fn check_fdisk_lines(target: &Path, written: &PartitionTable) {
    let ss = u64::from(written.sector_size);
    let (ok, out, err) = run(
        "fdisk",
        &["-l", "-b", &ss.to_string(), target.to_str().expect("utf8")],
    );
    assert!(ok, "fdisk -l: {err}");
    let label = if written.kind == TableKind::Gpt {
        "gpt"
    } else {
        "dos"
    };
    assert!(out.contains(&format!("Disklabel type: {label}")), "{out}");
    assert!(
        out.contains(&format!("Disk identifier: {}", written.disk_id)),
        "{out}"
    );
    for w in &written.partitions {
        let line = out
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|n| n.ends_with(&w.number.to_string()))
                    && l.contains('/')
            })
            .unwrap_or_else(|| panic!("fdisk does not list partition {}: {out}", w.number));
        let nums: Vec<u64> = line
            .split_whitespace()
            .filter(|f| *f != "*")
            .skip(1)
            .take(2)
            .map(|f| f.parse().expect("sector"))
            .collect();
        assert_eq!(nums, [w.start / ss, (w.start + w.size) / ss - 1], "{line}");
    }
}

#[test]
fn mbr_512_with_logicals_reads_back_in_sfdisk_and_fdisk() {
    need("sfdisk");
    need("fdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "mbr.img", 64 * MIB);
    let before = boot_code(&img);
    let dev = open_rw(&img, 512);
    let written = table::write(&dev, &mbr_table(512)).expect("write mbr");
    drop(dev);
    assert_eq!(boot_code(&img), before, "boot code bytes 0..440 changed");
    check_mbr_with_tools(&img, &written);
    let back = table::read(&Device::open_read(&img).expect("open"), Some(512))
        .expect("read")
        .expect("a table");
    assert_eq!(back, written);
}

#[test]
fn mbr_4k_with_logicals_reads_back_on_a_4k_loop_device() {
    need("sfdisk");
    need("losetup");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "mbr4k.img", 64 * MIB);
    let before = boot_code(&img);
    let dev = open_rw(&img, 4096);
    let written = table::write(&dev, &mbr_table(4096)).expect("write mbr 4k");
    drop(dev);
    assert_eq!(boot_code(&img), before);
    // fdisk -b 4096 on the file, and sfdisk on a 4K loop device.
    let lo = Loop::attach(&img, 4096);
    check_mbr_with_tools(lo.path(), &written);
    let back = table::read(&Device::open_read(lo.path()).expect("open"), Some(4096))
        .expect("read")
        .expect("table");
    assert_eq!(back, written);
}

/// Tables made by sgdisk are read exactly, and written back unchanged.
#[test]
fn gpt_made_by_sgdisk_reads_exactly_and_round_trips() {
    need("sgdisk");
    need("sfdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "sg.img", 64 * MIB);
    let p = img.to_str().expect("utf8");
    let (ok, _, err) = run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+10M",
            "-t",
            "1:ef00",
            "-c",
            "1:ESP",
            "-A",
            "1:set:0",
            "-n",
            "2:0:+20M",
            "-t",
            "2:8300",
            "-c",
            "2:data",
            "-n",
            "4:0:+5M",
            "-t",
            "4:0700",
            "-A",
            "4:set:63",
            p,
        ],
    );
    assert!(ok, "sgdisk: {err}");
    let j = sfdisk_json(&img);
    let read = table::read(&Device::open_read(&img).expect("open"), Some(512))
        .expect("read")
        .expect("table");
    assert_eq!(read.disk_id, j["id"].as_str().expect("id"));
    let parts = j["partitions"].as_array().expect("parts");
    assert_eq!(
        read.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    for (w, p) in read.partitions.iter().zip(parts) {
        assert_eq!(Some(w.start / 512), p["start"].as_u64());
        assert_eq!(Some(w.size / 512), p["size"].as_u64());
        assert_eq!(Some(w.ptype.as_str()), p["type"].as_str());
        assert_eq!(w.guid.as_deref(), p["uuid"].as_str());
        assert_eq!(w.name.as_deref(), p["name"].as_str());
    }
    assert_eq!(read.partitions[0].attributes, 1);
    assert_eq!(read.partitions[2].attributes, 1 << 63);
    // Write what we read onto a fresh disk: sgdisk sees the same table.
    let copy = make_file(dir.path(), "copy.img", 64 * MIB);
    let dev = open_rw(&copy, 512);
    let written = table::write(&dev, &read).expect("write copy");
    drop(dev);
    assert_eq!(written, read);
    check_gpt_with_tools(&copy, &written);
    let mut a = sfdisk_json(&img);
    let mut b = sfdisk_json(&copy);
    a["device"] = Value::Null;
    b["device"] = Value::Null;
    for v in [&mut a, &mut b] {
        for p in v["partitions"].as_array_mut().expect("parts") {
            let node = p["node"].as_str().expect("node").to_string();
            p["node"] = Value::String(node.chars().last().expect("digit").to_string());
        }
    }
    assert_eq!(a, b, "sfdisk sees a different table after our round trip");
}

/// Tables made by sfdisk (with logical partitions) are read exactly, and
/// rewriting them with our writer gives sfdisk the same table.
#[test]
fn mbr_made_by_sfdisk_reads_exactly_and_round_trips() {
    need("sfdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "sf.img", 64 * MIB);
    let script = "label: dos\nlabel-id: 0xdeadbeef\n\
        start=2048, size=10240, type=7, bootable\n\
        start=12288, size=81920, type=5\n\
        start=96256, size=8192, type=83\n\
        start=14336, size=10240, type=83\n\
        start=26624, size=20480, type=82\n\
        start=49152, size=40960, type=c\n";
    let mut child = Command::new("sfdisk")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("script");
    }
    assert!(child.wait().expect("wait").success());
    let j = sfdisk_json(&img);
    let read = table::read(&Device::open_read(&img).expect("open"), Some(512))
        .expect("read")
        .expect("table");
    assert_eq!(read.disk_id, "0xdeadbeef");
    let parts = j["partitions"].as_array().expect("parts");
    assert_eq!(read.partitions.len(), parts.len());
    for (w, p) in read.partitions.iter().zip(parts) {
        assert!(p["node"]
            .as_str()
            .expect("node")
            .ends_with(&w.number.to_string()));
        assert_eq!(Some(w.start / 512), p["start"].as_u64());
        assert_eq!(Some(w.size / 512), p["size"].as_u64());
        let code = u8::from_str_radix(w.ptype.trim_start_matches("0x"), 16).expect("code");
        assert_eq!(Some(format!("{code:x}").as_str()), p["type"].as_str());
        assert_eq!(w.bootable, p["bootable"].as_bool().unwrap_or(false));
    }
    let copy = make_file(dir.path(), "copy.img", 64 * MIB);
    let dev = open_rw(&copy, 512);
    let written = table::write(&dev, &read).expect("write copy");
    drop(dev);
    assert_eq!(written, read);
    check_mbr_with_tools_relaxed(&img, &copy);
}

fn check_mbr_with_tools_relaxed(a: &Path, b: &Path) {
    let mut ja = sfdisk_json(a);
    let mut jb = sfdisk_json(b);
    for v in [&mut ja, &mut jb] {
        v["device"] = Value::Null;
        for p in v["partitions"].as_array_mut().expect("parts") {
            let node = p["node"].as_str().expect("node").to_string();
            p["node"] = Value::String(node.chars().last().expect("digit").to_string());
        }
    }
    assert_eq!(ja, jb);
}

#[test]
fn gpt_backup_relocates_to_the_end_of_a_grown_disk() {
    need("sgdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    for ss in [512u32, 4096] {
        let img = make_file(dir.path(), &format!("grow{ss}.img"), 64 * MIB);
        let dev = open_rw(&img, ss);
        let written = table::write(&dev, &gpt_table(ss)).expect("write");
        drop(dev);
        OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open")
            .set_len(100 * MIB)
            .expect("grow");
        if ss == 512 {
            let (_, out, _) = run("sgdisk", &["-v", img.to_str().expect("utf8")]);
            assert!(
                !out.contains("No problems found"),
                "sgdisk should see the misplaced backup: {out}"
            );
        }
        let dev = open_rw(&img, ss);
        table::relocate_gpt_backup(&dev).expect("relocate");
        let back = table::read(&dev, Some(ss)).expect("read").expect("table");
        drop(dev);
        assert_eq!(back.partitions, written.partitions);
        let last = 100 * MIB / u64::from(ss) - 1;
        let entry_sectors = 128 * 128 / u64::from(ss);
        assert_eq!(back.last_usable_lba, Some(last - entry_sectors - 1));
        if ss == 512 {
            let (ok, out, _) = run("sgdisk", &["-v", img.to_str().expect("utf8")]);
            assert!(
                ok && out.contains("No problems found"),
                "sgdisk -v after relocation: {out}"
            );
            // The protective MBR covers the grown disk.
            let j = sfdisk_json(&img);
            assert_eq!(j["lastlba"].as_u64(), Some(last - entry_sectors - 1));
        } else {
            let lo = Loop::attach(&img, 4096);
            let (ok, out, _) = run("sgdisk", &["-v", lo.path().to_str().expect("utf8")]);
            assert!(
                ok && out.contains("No problems found"),
                "sgdisk -v (4K) after relocation: {out}"
            );
        }
        // The backup alone is valid: destroy the primary header and read.
        let f = OpenOptions::new().write(true).open(&img).expect("open");
        f.write_all_at(&vec![0u8; ss as usize], u64::from(ss))
            .expect("kill primary");
        drop(f);
        let back = table::read(&Device::open_read(&img).expect("open"), Some(ss))
            .expect("read backup")
            .expect("table");
        assert_eq!(back.partitions, written.partitions);
    }
}

#[test]
fn invalid_tables_are_refused_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "bad.img", 64 * MIB);
    let before = std::fs::read(&img).expect("read");
    let dev = open_rw(&img, 512);
    let cases: Vec<(PartitionTable, &str)> = vec![
        {
            let mut t = gpt_table(512);
            t.partitions[1].start = 5 * MIB;
            (t, "overlap")
        },
        {
            let mut t = gpt_table(512);
            t.partitions[2].size = 100 * MIB;
            (t, "partition 4")
        },
        {
            let mut t = gpt_table(512);
            t.partitions[2].number = 2;
            (t, "twice")
        },
        {
            let mut t = mbr_table(512);
            t.partitions.retain(|p| p.number != 2);
            (t, "no extended partition")
        },
        {
            let mut t = mbr_table(512);
            t.partitions.retain(|p| p.number != 6);
            (t, "without gaps")
        },
        {
            let mut t = mbr_table(512);
            t.partitions[3].start = 9 * MIB;
            (t, "partition 5")
        },
    ];
    for (t, needle) in cases {
        let e = table::write(&dev, &t).expect_err(needle);
        assert!(matches!(e, TableError::Unwritable { .. }), "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} does not mention {needle}"
        );
    }
    drop(dev);
    assert!(
        std::fs::read(&img).expect("read") == before,
        "a refused table changed the file"
    );
}

#[test]
fn wipe_removes_every_table_signature_and_keeps_boot_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, t) in [gpt_table(512), mbr_table(512)].into_iter().enumerate() {
        let img = make_file(dir.path(), &format!("wipe{i}.img"), 64 * MIB);
        let before = boot_code(&img);
        let dev = open_rw(&img, 512);
        table::write(&dev, &t).expect("write");
        table::wipe(&dev).expect("wipe");
        assert!(
            table::read(&dev, Some(512)).expect("read").is_none(),
            "table still readable after wipe"
        );
        drop(dev);
        assert_eq!(boot_code(&img), before);
        {
            need("sfdisk");
            let (ok, out, _) = run("sfdisk", &["--json", img.to_str().expect("utf8")]);
            assert!(
                !ok || out.trim().is_empty(),
                "sfdisk still sees a table: {out}"
            );
        }
    }
}

/// Writing MBR over GPT (and GPT over MBR) leaves no trace of the old table.
#[test]
fn switching_table_kinds_leaves_no_stale_table() {
    need("sfdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "switch.img", 64 * MIB);
    let dev = open_rw(&img, 512);
    table::write(&dev, &gpt_table(512)).expect("gpt");
    let m = table::write(&dev, &mbr_table(512)).expect("mbr over gpt");
    assert_eq!(
        table::read(&dev, Some(512)).expect("read").expect("table"),
        m
    );
    drop(dev);
    assert_eq!(sfdisk_json(&img)["label"], "dos");
    let (_, out, _) = run("sgdisk", &["-v", img.to_str().expect("utf8")]);
    assert!(!out.contains("GPT: present"), "{out}");
    let dev = open_rw(&img, 512);
    let g = table::write(&dev, &gpt_table(512)).expect("gpt over mbr");
    assert_eq!(
        table::read(&dev, Some(512)).expect("read").expect("table"),
        g
    );
    drop(dev);
    assert_eq!(sfdisk_json(&img)["label"], "gpt");
}

/// The gdisk codes of our type dictionary name the GUIDs sgdisk uses.
#[test]
fn gdisk_codes_match_sgdisk() {
    need("sgdisk");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "codes.img", 64 * MIB);
    let p = img.to_str().expect("utf8");
    let mut args: Vec<String> = Vec::new();
    let types = table::types::GPT_TYPES;
    for (i, t) in types.iter().enumerate() {
        let n = i + 1;
        args.extend([format!("-n{n}:0:+1M"), format!("-t{n}:{:04x}", t.code)]);
    }
    args.push(p.to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = run("sgdisk", &argv);
    assert!(ok, "sgdisk: {err}");
    let read = table::read(&Device::open_read(&img).expect("open"), Some(512))
        .expect("read")
        .expect("table");
    for (t, p) in types.iter().zip(&read.partitions) {
        assert_eq!(p.ptype, t.guid, "gdisk code {:04X}", t.code);
    }
}

/// Tables made by sgdisk and sfdisk on a 4 KiB-sector device are read
/// exactly.
#[test]
fn tables_made_by_tools_on_a_4k_loop_device_read_exactly() {
    need("sgdisk");
    need("sfdisk");
    need("losetup");
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_file(dir.path(), "tools4k.img", 64 * MIB);
    let lo = Loop::attach(&img, 4096);
    let dev = lo.path().to_str().expect("utf8").to_string();
    let (ok, _, err) = run(
        "sgdisk",
        &[
            "-n",
            "1:256:+8M",
            "-t",
            "1:ef00",
            "-c",
            "1:ESP",
            "-n",
            "3:0:+16M",
            "-t",
            "3:8300",
            &dev,
        ],
    );
    assert!(ok, "sgdisk: {err}");
    let compare = |label: &str| {
        let j = sfdisk_json(lo.path());
        assert_eq!(j["label"], label);
        let read = table::read(&Device::open_read(lo.path()).expect("open"), Some(4096))
            .expect("read")
            .expect("table");
        assert_eq!(read.sector_size, 4096);
        assert_eq!(
            read.disk_id.to_ascii_lowercase(),
            j["id"].as_str().expect("id").to_ascii_lowercase()
        );
        let parts = j["partitions"].as_array().expect("parts");
        assert_eq!(read.partitions.len(), parts.len());
        for (w, p) in read.partitions.iter().zip(parts) {
            assert!(p["node"]
                .as_str()
                .expect("node")
                .ends_with(&w.number.to_string()));
            assert_eq!(Some(w.start / 4096), p["start"].as_u64());
            assert_eq!(Some(w.size / 4096), p["size"].as_u64());
            if label == "gpt" {
                assert_eq!(Some(w.ptype.as_str()), p["type"].as_str());
                assert_eq!(w.guid.as_deref(), p["uuid"].as_str());
            }
        }
        read
    };
    let g = compare("gpt");
    assert_eq!(
        g.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 3]
    );
    let (ok, _, err) = run("sgdisk", &["-Z", &dev]);
    assert!(ok, "sgdisk -Z: {err}");
    let script = "label: dos\nstart=256, size=2048, type=83\nstart=2560, size=10240, type=5\n\
        start=2816, size=2048, type=83\nstart=5120, size=4096, type=7\n";
    let mut child = Command::new("sfdisk")
        .arg(lo.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("script");
    }
    assert!(child.wait().expect("wait").success());
    let m = compare("dos");
    assert_eq!(
        m.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 2, 5, 6]
    );
}
