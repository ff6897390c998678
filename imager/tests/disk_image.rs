//! Whole-disk images: tables, boot areas and partitions captured together;
//! restored onto equal, larger and smaller disks; failure leaves no table;
//! one partition of a disk image restored with its BIOS boot code.

mod support;

use support::*;

const MIB: u64 = 1 << 20;

/// A GPT disk: 1 = ext4 with files, 2 = FAT32, 4 = raw random bytes (slot 3 empty).
fn gpt_disk(t: &Tmp) -> std::path::PathBuf {
    let disk = t.p("gpt.img");
    sh(&format!(
        "truncate -s 128M {d} && sgdisk -o -n 1:2048:+40M -t 1:8300 -c 1:root -n 2:0:+40M -t 2:ef00 -n 4:0:+10M {d} >/dev/null",
        d = disk.display()
    ));
    let tree = t.p("tree");
    make_tree(&tree, 31, 4);
    mkfs_ext4(&disk, MIB, 40 * MIB, Some(&tree));
    sh(&format!(
        "mkfs.fat -F 32 -n ESP --offset {} {} {} >/dev/null",
        (41 * MIB) / 512,
        disk.display(),
        40 * 1024
    ));
    sh(&format!(
        "echo fat-file-content > {t}/hello.txt && mcopy -i {d}@@{o} {t}/hello.txt ::/hello.txt",
        t = t.dir.path().display(),
        d = disk.display(),
        o = 41 * MIB
    ));
    let noise = pseudo_random(5, (10 * MIB) as usize);
    std::fs::write(t.p("noise"), noise).expect("noise");
    sh(&format!(
        "dd if={} of={} bs=1M seek=81 conv=notrunc status=none",
        t.s("noise"),
        disk.display()
    ));
    disk
}

fn sfdisk_json(p: &std::path::Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&sh_out(&format!("sfdisk --json {}", p.display()))).expect("json");
    // The device name differs between the files.
    for part in v["partitiontable"]["partitions"]
        .as_array_mut()
        .expect("partitions")
    {
        part["node"] = serde_json::Value::Null;
    }
    v["partitiontable"]["device"] = serde_json::Value::Null;
    v["partitiontable"]["lastlba"] = serde_json::Value::Null;
    v
}

fn range_equal(a: &std::path::Path, b: &std::path::Path, start: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).expect("a");
    let fb = std::fs::File::open(b).expect("b");
    let mut x = vec![0u8; len as usize];
    let mut y = vec![0u8; len as usize];
    fa.read_exact_at(&mut x, start).expect("read a");
    fb.read_exact_at(&mut y, start).expect("read b");
    assert!(x == y, "bytes differ in [{start}, {})", start + len);
}

#[test]
fn gpt_disk_image_restores_onto_a_larger_disk_with_the_backup_moved_and_slots_kept() {
    let t = Tmp::new();
    let disk = gpt_disk(&t);
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "gptdisk",
    ]);
    let m = manifest(&t.p("repo"), "gptdisk");
    assert_eq!(m.kind, aula_imager::manifest::ImageKind::Disk);
    let nums: Vec<u32> = m.partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, vec![1, 2, 4]);
    assert_eq!(m.partitions[0].image.map, "ext4");
    assert_eq!(m.partitions[1].image.map, "fat32");
    assert_eq!(m.partitions[2].image.map, "raw");
    // Onto a larger blank disk.
    let big = t.p("big.img");
    sh(&format!("truncate -s 200M {}", big.display()));
    imager_ok(&[
        "restore",
        "gptdisk",
        "--repo",
        &t.s("repo"),
        &big.display().to_string(),
    ]);
    let v = sh_out(&format!("sgdisk -v {} 2>&1", big.display()));
    assert!(v.contains("No problems found"), "{v}");
    let src = sfdisk_json(&disk);
    let dst = sfdisk_json(&big);
    assert_eq!(
        src["partitiontable"]["partitions"], dst["partitiontable"]["partitions"],
        "partitions differ"
    );
    assert_eq!(src["partitiontable"]["id"], dst["partitiontable"]["id"]);
    // Partition contents.
    for p in &m.partitions {
        assert_used_equal(&p.image, &disk, p.start, &big, p.start);
    }
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=40 status=none && e2fsck -fn {} >/dev/null",
        big.display(),
        t.s("p1"),
        t.s("p1")
    ));
    sh(&format!(
        "dd if={} of={} bs=1M skip=41 count=40 status=none && fsck.fat -n {} >/dev/null",
        big.display(),
        t.s("p2"),
        t.s("p2")
    ));
    let hello = sh_out(&format!(
        "mtype -i {}@@{} ::/hello.txt",
        big.display(),
        41 * MIB
    ));
    assert_eq!(hello.trim(), "fat-file-content");
    // The image compares equal with the restored disk, and a second restore
    // fetches nothing for the partitions.
    imager_ok(&[
        "verify",
        "gptdisk",
        "--repo",
        &t.s("repo"),
        &big.display().to_string(),
    ]);
    let o = imager_ok(&[
        "restore",
        "gptdisk",
        "--repo",
        &t.s("repo"),
        &big.display().to_string(),
        "--json",
    ]);
    let s = json_result(&o)["stats"].clone();
    let partition_chunks: u64 = m
        .partitions
        .iter()
        .map(|p| p.image.chunks.len() as u64)
        .sum();
    assert!(
        s["chunks_skipped"].as_u64().expect("n") >= partition_chunks,
        "{s}"
    );
}

#[test]
fn disk_image_onto_a_smaller_disk_is_refused_before_writing() {
    let t = Tmp::new();
    let disk = gpt_disk(&t);
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "d",
    ]);
    let small = t.p("small.img");
    fill(&small, 0x5a, 80 * MIB);
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
fn a_failed_disk_restore_leaves_no_partition_table() {
    let t = Tmp::new();
    let disk = gpt_disk(&t);
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "d",
    ]);
    // A previously good copy of the disk as the target.
    let target = t.p("target.img");
    std::fs::copy(&disk, &target).expect("copy");
    // Corrupt a chunk of partition 2.
    let m = manifest(&t.p("repo"), "d");
    let id = m.partitions[1]
        .image
        .chunks
        .iter()
        .find_map(|c| c.id)
        .expect("chunk");
    let repo = aula_imager::repo::LocalRepo::open(&t.p("repo"), false).expect("repo");
    let path = repo.chunk_path(&id);
    let mut frame = std::fs::read(&path).expect("chunk");
    let mid = frame.len() / 2;
    frame[mid] ^= 0xff;
    std::fs::write(&path, frame).expect("corrupt");
    // Make the target differ so partition 2's chunk must be fetched.
    sh(&format!(
        "dd if=/dev/zero of={} bs=1M seek=41 count=40 conv=notrunc status=none",
        target.display()
    ));
    let o = imager(&[
        "restore",
        "d",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("corrupt") && err.contains("without a partition table"),
        "{err}"
    );
    let p = std::process::Command::new("sfdisk")
        .arg("--json")
        .arg(&target)
        .output()
        .expect("sfdisk");
    assert!(
        !p.status.success() || String::from_utf8_lossy(&p.stdout).trim().is_empty(),
        "a table is still there"
    );
    assert!(
        aula_imager::table::read(&std::fs::read(&target).expect("read"), None)
            .expect("read table")
            .is_none()
    );
}

#[test]
fn mbr_disk_with_logical_partitions_and_boot_code_round_trips() {
    let t = Tmp::new();
    let disk = t.p("mbr.img");
    sh(&format!(
        "truncate -s 96M {d} && printf 'label: dos\\nstart=2048,size=20M,type=83,bootable\\nstart=43008,size=60M,type=5\\nstart=45056,size=24M,type=83\\nstart=96256,size=20M,type=83\\n' | sfdisk -q {d}",
        d = disk.display()
    ));
    // Boot code and something in the post-MBR gap (where GRUB's core.img lives).
    let code = pseudo_random(9, 440);
    let gap = pseudo_random(10, 100_000);
    std::fs::write(t.p("code"), &code).expect("code");
    std::fs::write(t.p("gap"), &gap).expect("gap");
    sh(&format!(
        "dd if={} of={} conv=notrunc status=none",
        t.s("code"),
        disk.display()
    ));
    sh(&format!(
        "dd if={} of={} bs=512 seek=1 conv=notrunc status=none",
        t.s("gap"),
        disk.display()
    ));
    let tree = t.p("tree");
    make_tree(&tree, 12, 3);
    mkfs_ext4(&disk, 2048 * 512, 20 * MIB, Some(&tree));
    mkfs_ext4(&disk, 45056 * 512, 24 * MIB, None);
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "mbr",
    ]);
    let m = manifest(&t.p("repo"), "mbr");
    let nums: Vec<u32> = m.partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, vec![1, 5, 6]);
    let out = t.p("out.img");
    imager_ok(&[
        "restore",
        "mbr",
        "--repo",
        &t.s("repo"),
        &out.display().to_string(),
    ]);
    assert_eq!(sfdisk_json(&disk), sfdisk_json(&out));
    range_equal(&disk, &out, 0, 1 << 20);
    for p in &m.partitions {
        assert_used_equal(&p.image, &disk, p.start, &out, p.start);
    }
    // The extended boot records came along: sfdisk sees the logicals.
    assert!(
        sh_out(&format!("sfdisk -d {}", out.display())).contains("type=83"),
        "logicals missing"
    );
}

#[test]
fn one_partition_of_a_disk_image_restores_with_its_bios_boot_code_and_active_flag() {
    let t = Tmp::new();
    let disk = t.p("mbr.img");
    sh(&format!(
        "truncate -s 64M {d} && printf 'label: dos\\nstart=2048,size=30M,type=83,bootable\\n' | sfdisk -q {d}",
        d = disk.display()
    ));
    let code = pseudo_random(19, 440);
    std::fs::write(t.p("code"), &code).expect("code");
    sh(&format!(
        "dd if={} of={} conv=notrunc status=none",
        t.s("code"),
        disk.display()
    ));
    let tree = t.p("tree");
    make_tree(&tree, 13, 2);
    mkfs_ext4(&disk, MIB, 30 * MIB, Some(&tree));
    imager_ok(&[
        "create",
        &disk.display().to_string(),
        "--repo",
        &t.s("repo"),
        "--name",
        "os",
    ]);
    // A machine laid out differently (Configurar): partition 1 bigger, a
    // second partition, no boot code, nothing active.
    let target = t.p("machine.img");
    sh(&format!(
        "truncate -s 128M {d} && printf 'label: dos\\nstart=2048,size=40M,type=83\\nstart=83968,size=40M,type=83\\n' | sfdisk -q {d}",
        d = target.display()
    ));
    imager_ok(&[
        "restore",
        "os",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
        "--partition",
        "1",
    ]);
    let m = manifest(&t.p("repo"), "os");
    assert_used_equal(&m.partitions[0].image, &disk, MIB, &target, MIB);
    let head = std::fs::read(&target).expect("read");
    assert_eq!(&head[..440], &code[..], "boot code not installed");
    assert_eq!(head[446], 0x80, "partition 1 not active");
    assert_eq!(head[446 + 16], 0x00);
    // The target's own table is kept.
    let d = sh_out(&format!("sfdisk -d {}", target.display()));
    assert!(d.contains("size=       81920"), "{d}");
    // Restoring it again knows the partition's content from the restore
    // record, which was made after the boot code was written.
    let o = imager_ok(&[
        "restore",
        "os",
        "--repo",
        &t.s("repo"),
        &target.display().to_string(),
        "--partition",
        "1",
        "--json",
    ]);
    let s = json_result(&o)["stats"].clone();
    assert_eq!(s["chunks_fetched"], 0, "{s}");
    assert_eq!(s["chunks_unread"], s["chunks"], "{s}");
    assert_eq!(&std::fs::read(&target).expect("read")[..440], &code[..]);
}
