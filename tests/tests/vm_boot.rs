//! Whole-system tests in QEMU (TCG): the scripts that boot real firmware.
//!
//! * `scripts/test-disk-boot`: disk images of the BIOS (MBR + extlinux) and
//!   UEFI (GPT + ESP) reference disks, restored onto larger files, boot to
//!   their marker; a restore onto a smaller file is refused.
//! * `scripts/e2e`: PXE boot (BIOS and UEFI) from `aula-bootserver` to
//!   "agent ready", compared with dnsmasq + iPXE.
//!
//! They need root (loop mounts, network namespaces), QEMU, OVMF and the
//! Debian mirror (the live kernel is downloaded), and take minutes, so they
//! run only when `AULA_VM_TESTS=1`; otherwise each says why it skips. The
//! scripts print their own progress; their exit status is the verdict.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One QEMU at a time: the machines have two cores.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Why the VM tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    if std::env::var("AULA_VM_TESTS").as_deref() != Ok("1") {
        return Some("set AULA_VM_TESTS=1 to run the QEMU tests");
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("the QEMU tests need root");
    }
    None
}

fn run_script(name: &str) {
    if let Some(why) = skip_reason() {
        eprintln!("skipping {name}: {why}");
        return;
    }
    let _one = ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let script = repo_root().join("scripts").join(name);
    let status = Command::new(&script)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "{name} failed ({status}); see its output above"
    );
}

#[test]
fn whole_disk_images_boot_after_restore_onto_a_larger_disk() {
    run_script("test-disk-boot");
}

#[test]
fn pxe_booted_machines_are_partitioned_restored_and_boot_their_restored_os() {
    run_script("e2e");
}
