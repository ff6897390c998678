//! Whole-system tests in QEMU (TCG): the scripts that boot real firmware.
//!
//! * `scripts/test-disk-boot`: disk images of the BIOS (MBR + extlinux) and
//!   UEFI (GPT + ESP) reference disks, restored onto larger files, boot to
//!   their marker; a restore onto a smaller file is refused.
//! * `scripts/e2e`: PXE boot (BIOS, UEFI, UEFI with Secure Boot through
//!   shim and signed GRUB) from `aula-bootserver` to
//!   "agent ready", compared with dnsmasq + iPXE.
//!
//! They need root (loop mounts, network namespaces), QEMU, OVMF and the
//! Debian mirror (the live kernel is downloaded), and take minutes, so they
//! are `#[ignore]`d with that reason: `scripts/test` runs them
//! (`cargo test -p aula-tests -- --include-ignored`, as root), and run
//! without root they fail rather than pass. The scripts print their own
//! progress; their exit status is the verdict.

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

fn run_script(name: &str) {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the QEMU tests need root: run them as root, as scripts/test does"
    );
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
#[ignore = "boots QEMU machines for minutes as root: scripts/test runs it with --include-ignored"]
fn whole_disk_images_boot_after_restore_onto_a_larger_disk() {
    run_script("test-disk-boot");
}

#[test]
#[ignore = "boots QEMU machines for minutes as root: scripts/test runs it with --include-ignored"]
fn pxe_booted_machines_are_partitioned_restored_and_boot_their_restored_os() {
    run_script("e2e");
}
