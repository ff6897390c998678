//! A layout change that fails half-way (here: the ext4 formatter fails
//! after the table was written) leaves a disk that does not look
//! partitioned, and the error says so. One test in its own binary, because
//! it puts a failing `mkfs.ext4` first in `PATH` for the whole process.

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use aula_imager::device::Device;
use aula_imager::disk::layout::{self, ApplyOptions, DiskState, LayoutError, LayoutSpec};
use aula_imager::table;

const MIB: u64 = 1 << 20;

#[test]
fn a_failed_format_wipes_the_table_and_says_so() {
    assert!(
        Path::new("/usr/sbin/mkfs.fat").exists() || Path::new("/sbin/mkfs.fat").exists(),
        "mkfs.fat is not installed (scripts/test installs it)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let fake = bin.join("mkfs.ext4");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'mkfs.ext4: simulated failure' >&2\nexit 1\n",
    )
    .expect("fake");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // This binary runs this one test only, so changing the environment
    // cannot race with another test.
    std::env::set_var("PATH", path);

    let img = dir.path().join("half.img");
    let f = File::create(&img).expect("create");
    f.set_len(256 * MIB).expect("size");
    let code: Vec<u8> = (0..440u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&code, 0).expect("boot code");
    drop(f);

    for kind in ["gpt", "mbr"] {
        // Partition 1 formats fine; partition 2's mkfs.ext4 fails.
        let spec: LayoutSpec = serde_json::from_str(&format!(
            r#"{{"table":"{kind}","partitions":[
            {{"number":1,"type":"efi","size":"64MiB","filesystem":"fat32","label":"ESP"}},
            {{"number":2,"type":"linux","size":"rest","filesystem":"ext4","label":"root"}}]}}"#
        ))
        .expect("spec");
        let e = layout::apply(&img, &spec, &ApplyOptions::default()).expect_err("must fail");
        let msg = format!("{e}");
        match &e {
            LayoutError::Failed { step, state, .. } => {
                assert_eq!(step, "formatting partition 2 as ext4");
                assert_eq!(*state, DiskState::Wiped);
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(
            msg.contains("wiped") && msg.contains("unpartitioned"),
            "{msg}"
        );
        let chain = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(chain.contains("simulated failure"), "{chain}");
        // No table is readable, by us or by the tools.
        let dev = Device::open_read(&img).expect("open");
        assert!(table::read(&dev, Some(512)).expect("read").is_none());
        assert!(table::read(&dev, None).expect("read").is_none());
        let out = Command::new("sfdisk")
            .arg("--json")
            .arg(&img)
            .output()
            .expect("sfdisk");
        assert!(
            !out.status.success() || out.stdout.is_empty(),
            "sfdisk still sees a table"
        );
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&img)
            .output()
            .expect("blkid");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("PTTYPE"), "blkid still sees a table: {text}");
        // The boot code is untouched.
        let mut b = vec![0u8; 440];
        File::open(&img)
            .expect("open")
            .read_exact_at(&mut b, 0)
            .expect("read");
        assert_eq!(b, code);
    }
}
