//! UEFI boot entries after a restore, on a real GPT disk image (sfdisk)
//! whose ESP is a real FAT file system (mkfs.fat, mtools), against a fake
//! efivarfs directory: the entry of the restored OS is written in the
//! efivarfs format, stale entries of the old disk go, entries of other
//! disks and non-disk entries stay, network boot stays first in BootOrder,
//! and a second run changes nothing. Immutable variables (as efivarfs
//! makes them) are replaced and removed (needs root for `chattr +i`).

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use aula_agent::bootentry::{self, Report};
use aula_agent::nvram::{self, GptPartition, EFI_GLOBAL_GUID};

const ESP_GUID: &str = "41756c61-0000-4000-8000-0000000000e1";
const OLD_GUID: &str = "0ddc0ffe-0000-4000-8000-000000000001";
const OTHER_DISK_GUID: &str = "07e7d15c-0000-4000-8000-000000000002";
const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    let mut c = Command::new(cmd);
    c.args(args).env("MTOOLS_SKIP_CHECK", "1");
    if stdin.is_some() {
        c.stdin(std::process::Stdio::piped());
    }
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 64 MiB GPT disk: partition 1 an ESP (FAT32, 40 MiB at 1 MiB) holding
/// `loaders`, partition 2 Linux.
fn disk(dir: &Path, loaders: &[&str]) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img).expect("create");
    f.set_len(64 * MIB).expect("size");
    drop(f);
    run(
        "sfdisk",
        &["--quiet", img.to_str().expect("utf8")],
        Some(&format!(
            "label: gpt\nstart=2048, size=81920, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={ESP_GUID}\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        )),
    );
    let esp = dir.join("esp.img");
    let f = std::fs::File::create(&esp).expect("create");
    f.set_len(40 * MIB).expect("size");
    drop(f);
    run(
        "mkfs.fat",
        &["-F", "32", "-s", "1", esp.to_str().expect("utf8")],
        None,
    );
    let target = format!("{}", esp.display());
    let payload = dir.join("loader.efi");
    std::fs::write(&payload, b"MZ a loader").expect("write");
    for l in loaders {
        let parts: Vec<&str> = l.trim_start_matches('\\').split('\\').collect();
        let mut d = String::from("::");
        for p in &parts[..parts.len() - 1] {
            d.push('/');
            d.push_str(p);
            let _ = Command::new("mmd")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i", &target, &d])
                .output();
        }
        run(
            "mcopy",
            &[
                "-i",
                &target,
                payload.to_str().expect("utf8"),
                &format!("::/{}", parts.join("/")),
            ],
            None,
        );
    }
    run(
        "dd",
        &[
            &format!("if={}", esp.display()),
            &format!("of={}", img.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc",
            "status=none",
        ],
        None,
    );
    img
}

fn var_path(vars: &Path, name: &str) -> std::path::PathBuf {
    vars.join(format!("{name}-{EFI_GLOBAL_GUID}"))
}

fn put(vars: &Path, name: &str, data: &[u8]) {
    std::fs::write(var_path(vars, name), nvram::efivarfs_file(data)).expect("write var");
}

fn get(vars: &Path, name: &str) -> Option<Vec<u8>> {
    let v = std::fs::read(var_path(vars, name)).ok()?;
    assert_eq!(&v[..4], &[7, 0, 0, 0], "{name}: attributes NV+BS+RT");
    Some(v[4..].to_vec())
}

/// A PXE entry as OVMF writes it: PciRoot/Pci/MAC/IPv4.
fn pxe_entry() -> Vec<u8> {
    let mut dp = vec![2, 1, 12, 0, 0xd0, 0x41, 0x03, 0x0a, 0, 0, 0, 0];
    dp.extend_from_slice(&[1, 1, 6, 0, 0, 3]);
    let mut mac = vec![3, 11, 37, 0, 0x52, 0x54, 0, 0xa0, 0x1a, 0x02];
    mac.resize(36, 0);
    mac.push(1);
    dp.extend_from_slice(&mac);
    let mut ip = vec![3, 12, 27, 0];
    ip.resize(27, 0);
    dp.extend_from_slice(&ip);
    dp.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    raw_entry("UEFI PXEv4 (MAC:525400A01A02)", &dp)
}

/// An entry with a firmware-volume file node (OVMF's UiApp).
fn fv_entry() -> Vec<u8> {
    let mut dp = vec![4, 6, 20, 0];
    dp.extend_from_slice(&[0x21; 16]);
    dp.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    raw_entry("UiApp", &dp)
}

fn raw_entry(desc: &str, dp: &[u8]) -> Vec<u8> {
    let mut v = 1u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(dp.len() as u16).to_le_bytes());
    v.extend(desc.encode_utf16().chain([0]).flat_map(u16::to_le_bytes));
    v.extend_from_slice(dp);
    v
}

fn hd(guid: &str) -> GptPartition {
    GptPartition {
        number: 1,
        start_lba: 2048,
        size_lba: 81920,
        guid: guid.into(),
    }
}

fn names(r: &Report, action: &str) -> Vec<String> {
    r.changes
        .iter()
        .filter(|c| c.action == action)
        .map(|c| c.entry.clone())
        .collect()
}

fn chattr_immutable(p: &Path) {
    let st = Command::new("chattr")
        .arg("+i")
        .arg(p)
        .status()
        .expect("chattr");
    assert!(
        st.success(),
        "chattr +i {} failed: this test needs root (CAP_LINUX_IMMUTABLE) and a file system with inode flags",
        p.display()
    );
}

#[test]
fn restore_writes_the_os_entry_after_network_boot_and_removes_the_old_disks_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = disk(
        dir.path(),
        &["\\EFI\\debian\\shimx64.efi", "\\EFI\\BOOT\\BOOTX64.EFI"],
    );
    let vars = dir.path().join("efivars");
    std::fs::create_dir(&vars).expect("mkdir");
    put(&vars, "Boot0000", &pxe_entry());
    // The old disk's entries: the same loader, and the same slot.
    put(
        &vars,
        "Boot0001",
        &nvram::load_option("debian", &hd(OLD_GUID), "\\EFI\\debian\\shimx64.efi").expect("enc"),
    );
    put(
        &vars,
        "Boot0002",
        &nvram::load_option("old OS", &hd(OLD_GUID), "\\EFI\\old\\loader.efi").expect("enc"),
    );
    // Another disk's OS, and a firmware application: kept.
    put(
        &vars,
        "Boot0003",
        &nvram::load_option(
            "other disk",
            &hd(OTHER_DISK_GUID),
            "\\EFI\\debian\\shimx64.efi",
        )
        .expect("enc"),
    );
    put(&vars, "Boot0004", &fv_entry());
    put(
        &vars,
        "BootOrder",
        &nvram::boot_order_bytes(&[0, 1, 4, 2, 3]),
    );
    // efivarfs makes Boot#### immutable: replacing and removing must cope.
    chattr_immutable(&var_path(&vars, "Boot0001"));
    chattr_immutable(&var_path(&vars, "Boot0002"));
    chattr_immutable(&var_path(&vars, "BootOrder"));

    let present: HashSet<String> = [OTHER_DISK_GUID.to_owned()].into();
    let r = bootentry::update(&vars, &img, &present).expect("update");
    assert_eq!(r.status, "updated", "{r:?}");
    assert_eq!(r.esp, Some(1));
    assert_eq!(
        r.entry.as_deref(),
        Some("Boot0001"),
        "reuses the replaced entry's number"
    );
    assert_eq!(names(&r, "written"), vec!["Boot0001"]);
    assert_eq!(names(&r, "removed"), vec!["Boot0002"]);
    let o = nvram::parse_load_option(&get(&vars, "Boot0001").expect("Boot0001")).expect("parse");
    assert_eq!(o.description, "debian");
    assert_eq!(o.partition, Some(hd(ESP_GUID)), "the restored ESP");
    assert_eq!(
        o.file.as_deref(),
        Some("\\EFI\\debian\\shimx64.efi"),
        "shim before the removable path"
    );
    assert_eq!(o.attributes & nvram::LOAD_OPTION_ACTIVE, 1);
    assert!(get(&vars, "Boot0002").is_none(), "the stale entry is gone");
    assert!(
        get(&vars, "Boot0003").is_some(),
        "another disk's entry stays"
    );
    assert!(get(&vars, "Boot0004").is_some(), "UiApp stays");
    assert_eq!(
        nvram::parse_boot_order(&get(&vars, "BootOrder").expect("BootOrder")),
        vec![0, 1, 4, 3],
        "network first, then the restored OS, the removed entry dropped"
    );
    assert_eq!(
        r.boot_order_before,
        ["Boot0000", "Boot0001", "Boot0004", "Boot0002", "Boot0003"]
    );

    // Again: nothing to do, nothing written.
    let before = std::fs::metadata(var_path(&vars, "Boot0001"))
        .expect("stat")
        .modified()
        .expect("mtime");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = bootentry::update(&vars, &img, &present).expect("update");
    assert_eq!(again.status, "unchanged", "{again:?}");
    assert_eq!(names(&again, "unchanged"), vec!["Boot0001"]);
    assert_eq!(
        std::fs::metadata(var_path(&vars, "Boot0001"))
            .expect("stat")
            .modified()
            .expect("mtime"),
        before
    );
}

#[test]
fn windows_boot_manager_wins_and_a_new_entry_takes_the_lowest_free_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = disk(
        dir.path(),
        &[
            "\\EFI\\BOOT\\BOOTX64.EFI",
            "\\EFI\\Microsoft\\Boot\\bootmgfw.efi",
        ],
    );
    let vars = dir.path().join("efivars");
    std::fs::create_dir(&vars).expect("mkdir");
    put(&vars, "Boot0000", &pxe_entry());
    put(&vars, "Boot0002", &fv_entry());
    put(&vars, "BootOrder", &nvram::boot_order_bytes(&[0, 2]));
    let r = bootentry::update(&vars, &img, &HashSet::new()).expect("update");
    assert_eq!(r.entry.as_deref(), Some("Boot0001"));
    let o = nvram::parse_load_option(&get(&vars, "Boot0001").expect("Boot0001")).expect("parse");
    assert_eq!(o.description, "Windows Boot Manager");
    assert_eq!(
        o.file.as_deref(),
        Some("\\EFI\\Microsoft\\Boot\\bootmgfw.efi")
    );
    assert_eq!(
        nvram::parse_boot_order(&get(&vars, "BootOrder").expect("BootOrder")),
        vec![0, 1, 2]
    );
}

#[test]
fn removable_path_only_and_no_efivars_and_no_loader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = disk(dir.path(), &["\\EFI\\BOOT\\BOOTX64.EFI"]);
    // BIOS machine: no efivarfs, nothing done.
    let r = bootentry::update(&dir.path().join("none"), &img, &HashSet::new()).expect("update");
    assert_eq!(r.status, "skipped");
    // No BootOrder yet: the entry becomes the only one.
    let vars = dir.path().join("efivars");
    std::fs::create_dir(&vars).expect("mkdir");
    let r = bootentry::update(&vars, &img, &HashSet::new()).expect("update");
    assert_eq!(r.entry.as_deref(), Some("Boot0000"));
    let o = nvram::parse_load_option(&get(&vars, "Boot0000").expect("Boot0000")).expect("parse");
    assert_eq!(o.file.as_deref(), Some("\\EFI\\BOOT\\BOOTX64.EFI"));
    assert_eq!(
        nvram::parse_boot_order(&get(&vars, "BootOrder").expect("BootOrder")),
        vec![0]
    );
    // An ESP without any known loader: skipped, nothing written.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let img2 = disk(dir2.path(), &["\\EFI\\other\\thing.efi"]);
    let vars2 = dir2.path().join("efivars");
    std::fs::create_dir(&vars2).expect("mkdir");
    let r = bootentry::update(&vars2, &img2, &HashSet::new()).expect("update");
    assert_eq!(r.status, "skipped", "{r:?}");
    assert_eq!(std::fs::read_dir(&vars2).expect("ls").count(), 0);
}
