//! Inventory of this machine's disks: runs without error, skips loop
//! devices by default, and with virtual devices included lists a loop
//! device made by the test with its size, sector size and table.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use aula_imager::device::{Device, OpenMode};
use aula_imager::disk::{self, layout, InventoryOptions, Transport};
use aula_imager::table::{self, TableKind};

const MIB: u64 = 1 << 20;

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path, sector_size: u32) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector_size.to_string()])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping: cannot create a loop device: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Loop(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
    fn name(&self) -> String {
        self.0
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn image_with_gpt(dir: &Path, name: &str, size: u64, ss: u32) -> PathBuf {
    let p = dir.join(name);
    File::create(&p)
        .expect("create")
        .set_len(size)
        .expect("size");
    let spec: layout::LayoutSpec = serde_json::from_str(
        r#"{"table":"gpt","partitions":[
        {"number":1,"type":"efi","size":"8MiB"},
        {"number":3,"type":"linux","size":"rest","name":"data"}]}"#,
    )
    .expect("spec");
    let plan = layout::plan(&spec, size, ss).expect("plan");
    let mut dev = Device::open(
        &p,
        OpenMode {
            write: true,
            ..Default::default()
        },
    )
    .expect("open");
    dev.set_sector_size(ss);
    table::write(&dev, &plan.table).expect("write");
    p
}

#[test]
fn inventory_of_this_machine() {
    let disks = disk::inventory(&InventoryOptions::default()).expect("inventory");
    for (i, d) in disks.iter().enumerate() {
        assert_eq!(d.dsk, Some(i as u32 + 1));
        assert!(
            !d.transport.is_virtual(),
            "{} should be skipped by default",
            d.name
        );
        assert!(!d.read_only, "{} is read-only", d.name);
        assert!(d.size > 0);
        assert!(d.logical_sector_size >= 512 && d.physical_sector_size >= d.logical_sector_size);
        assert_eq!(disk::resolve_dsk(i as u32 + 1).expect("resolve"), d.path);
    }
    let json = serde_json::to_string_pretty(&disks).expect("json");
    let back: Vec<disk::DiskInfo> = serde_json::from_str(&json).expect("parse back");
    assert_eq!(back, disks);
    assert!(matches!(
        disk::resolve_dsk(disks.len() as u32 + 1),
        Err(disk::DiskError::NoSuchDisk { .. })
    ));
    eprintln!("{json}");
}

#[test]
fn inventory_lists_a_loop_device_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img512 = image_with_gpt(dir.path(), "inv512.img", 96 * MIB, 512);
    let img4k = image_with_gpt(dir.path(), "inv4k.img", 80 * MIB, 4096);
    let Some(l512) = Loop::attach(&img512, 512) else {
        return;
    };
    let Some(l4k) = Loop::attach(&img4k, 4096) else {
        return;
    };
    let default = disk::inventory(&InventoryOptions::default()).expect("inventory");
    assert!(
        !default
            .iter()
            .any(|d| d.name == l512.name() || d.name == l4k.name()),
        "loop devices listed by default"
    );
    let all = disk::inventory(&InventoryOptions {
        include_virtual: true,
        ..Default::default()
    })
    .expect("inventory");
    // The ordinary disks keep their numbers.
    for (a, b) in default.iter().zip(&all) {
        assert_eq!((a.dsk, &a.name), (b.dsk, &b.name));
    }
    for (lo, size, ss) in [(&l512, 96 * MIB, 512u32), (&l4k, 80 * MIB, 4096)] {
        let d = all
            .iter()
            .find(|d| d.name == lo.name())
            .expect("loop device listed");
        assert_eq!(d.transport, Transport::Loop);
        assert_eq!(d.size, size);
        assert_eq!(d.logical_sector_size, ss);
        assert_eq!(d.path, lo.0);
        let t = d.table.as_ref().expect("table");
        assert_eq!(t.kind, TableKind::Gpt);
        assert_eq!(t.sector_size, ss);
        assert_eq!(
            d.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(d.partitions[0].start, MIB);
        assert_eq!(d.partitions[0].code.as_deref(), Some("EF00"));
        assert_eq!(d.partitions[1].name.as_deref(), Some("data"));
        assert!(d.dsk.expect("numbered") as usize > default.len());
    }
}

#[test]
fn inspect_disk_image_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image_with_gpt(dir.path(), "i512.img", 64 * MIB, 512);
    let info = disk::inspect_file(&img).expect("inspect");
    assert_eq!(info.transport, Transport::File);
    assert_eq!(info.size, 64 * MIB);
    assert_eq!(info.table.as_ref().expect("table").kind, TableKind::Gpt);
    assert_eq!(info.partitions.len(), 2);
    // A 4K image is found without being told (GPT probed at 4096).
    let img = image_with_gpt(dir.path(), "i4k.img", 64 * MIB, 4096);
    let info = disk::inspect_file(&img).expect("inspect 4k");
    assert_eq!(info.logical_sector_size, 4096);
    assert_eq!(info.table.as_ref().expect("table").sector_size, 4096);
    assert_eq!(info.partitions[1].start, 9 * MIB);
    // No table: empty list, not an error.
    let blank = dir.path().join("blank.img");
    File::create(&blank)
        .expect("create")
        .set_len(MIB)
        .expect("size");
    let info = disk::inspect_file(&blank).expect("inspect blank");
    assert!(info.table.is_none() && info.partitions.is_empty());
    // A damaged table is an error naming the file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xffu8; 64], 2 * 4096)
        .expect("corrupt primary array");
    f.write_all_at(&[0xffu8; 64], 64 * MIB - 4096 * 5)
        .expect("corrupt backup array");
    drop(f);
    let e = disk::inspect_file(&img).expect_err("damaged");
    assert!(e.to_string().contains("i4k.img"), "{e}");
}
