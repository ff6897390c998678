//! The `disks` and `partition` subcommands through the CLI.

mod support;

use support::*;

const OG_SETUP: &str = r#"{"type":"MSDOS","disk":"1","cache":"1","cache_size":"40000","partition_setup":[
  {"partition":"1","code":"LINUX","filesystem":"EXT4","size":"61440","format":"1"},
  {"partition":"2","code":"NTFS","filesystem":"NTFS","size":"40960","format":"1"},
  {"partition":"3","code":"EMPTY","filesystem":"EMPTY","size":"0","format":"0"},
  {"partition":"4","code":"CACHE","filesystem":"CACHE","size":"40000","format":"1"}]}"#;

#[test]
fn partition_with_an_opengnsys_body_then_disks_describes_the_result() {
    let t = Tmp::new();
    let disk = t.p("d.img");
    sh(&format!("truncate -s 200M {}", disk.display()));
    let body = t.p("setup.json");
    std::fs::write(&body, OG_SETUP).expect("body");
    imager_ok(&[
        "partition",
        &disk.display().to_string(),
        "--opengnsys",
        &format!("@{}", body.display()),
    ]);
    let o = imager_ok(&["disks", "--file", &disk.display().to_string(), "--json"]);
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let parts = d["partitions"].as_array().expect("partitions");
    let got: Vec<(u64, String, String)> = parts
        .iter()
        .map(|p| {
            (
                p["number"].as_u64().expect("n"),
                p["filesystem"].as_str().unwrap_or("-").to_string(),
                p["label"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "ext4".into(), "-".into()),
            (2, "ntfs".into(), "-".into()),
            (4, "ext4".into(), "CACHE".into())
        ]
    );
    assert_eq!(parts[2]["cache"], true);
    // sfdisk agrees on the layout.
    let dump = sh_out(&format!("sfdisk -d {}", disk.display()));
    assert!(dump.contains("size=      122880, type=83"), "{dump}");
    assert!(dump.contains("type=7"), "{dump}");
}

#[test]
fn a_dry_run_and_a_bad_layout_write_nothing() {
    let t = Tmp::new();
    let big = t.p("big.img");
    fill(&big, 0x33, 200 << 20);
    let before = sha256_file(&big);
    let o = imager_ok(&[
        "partition",
        &big.display().to_string(),
        "--opengnsys",
        OG_SETUP,
        "--dry-run",
        "--json",
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).expect("plan json");
    assert_eq!(
        plan["table"]["partitions"].as_array().map(Vec::len),
        Some(3),
        "{plan}"
    );
    assert_eq!(sha256_file(&big), before, "a dry run wrote to the disk");
    let disk = t.p("d.img");
    fill(&disk, 0x33, 64 << 20);
    let before = sha256_file(&disk);
    // 200 MiB of partitions on a 64 MiB disk.
    let o = imager(&[
        "partition",
        &disk.display().to_string(),
        "--opengnsys",
        OG_SETUP,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("partition"), "{}", stderr(&o));
    assert_eq!(
        sha256_file(&disk),
        before,
        "a refused layout wrote to the disk"
    );
    // Unparseable bodies are usage errors.
    let o = imager(&[
        "partition",
        &disk.display().to_string(),
        "--opengnsys",
        "{not json",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(sha256_file(&disk), before);
}

#[test]
fn disks_lists_this_machine_without_error() {
    let o = imager_ok(&["disks", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v.is_array());
}
