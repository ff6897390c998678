//! Hostile disks against a real agent (issue 15): a disk whose partitions
//! hold a crafted NTFS (an `$ATTRIBUTE_LIST` of 2^44 bytes, which aborted
//! the process) and a crafted ext4 (8 blocks per group). The inventory
//! (`GET /v1/inventory` and OpenGnsys `InventarioHardware`) names both
//! problems, the job succeeds, and the agent keeps answering.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

const NTFS_ERROR: &str = "ntfs: corrupt: attribute list of record 0 holds 17592186044416 bytes";
const EXT_ERROR: &str = "ext4: corrupt: 8 blocks per group";

fn crafted_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("hostile.img");
    let d = disk.display();
    sh(Command::new("sh").arg("-c").arg(format!(
        "truncate -s 8M {d} && printf 'start=2048, size=4096, type=7\\nstart=6144, size=4096, type=83\\n' | sfdisk -q {d}"
    )));
    let ntfs = dir.join("ntfs.img");
    sh(Command::new("sh").arg("-c").arg(format!(
        "truncate -s 2M {n} && mkntfs -q -F -f {n} >/dev/null 2>&1",
        n = ntfs.display()
    )));
    let mut n = std::fs::read(&ntfs).expect("ntfs");
    aula_imager::fuzzing::craft::ntfs_huge_attribute_list(&mut n);
    let ext = dir.join("ext.img");
    sh(Command::new("sh").arg("-c").arg(format!(
        "truncate -s 2M {e} && mkfs.ext4 -q -F {e}",
        e = ext.display()
    )));
    let mut e = std::fs::read(&ext).expect("ext4");
    aula_imager::fuzzing::craft::ext_blocks_per_group(&mut e, 8);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("disk");
    f.write_all_at(&n, MIB).expect("ntfs in");
    f.write_all_at(&e, 3 * MIB).expect("ext4 in");
    disk
}

fn partition_errors(inventory: &Value) -> Vec<String> {
    inventory["disks"][0]["partitions"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["error"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_ntfs_and_ext4_partitions_are_reported_and_the_agent_stays_up() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = crafted_disk(dir.path());
    let agent = start_agent(AgentOpts {
        dir: dir.path(),
        disks: vec![(1, disk)],
        server: None,
        core: None,
        repo_port: 9,
        extra: "",
    })
    .await;
    let api = Api::new(&agent);
    let (s, v) = api.call(Method::GET, "/v1/inventory", None).await;
    assert_eq!(s, 200, "{v}");
    let errors = partition_errors(&v);
    assert_eq!(errors.len(), 2, "{v:#}");
    assert!(errors[0].contains(NTFS_ERROR), "{errors:?}");
    assert!(errors[1].contains(EXT_ERROR), "{errors:?}");

    // The OpenGnsys inventory job says the same and succeeds.
    let (s, v) = api
        .call(
            Method::POST,
            "/CloningEngine/InventarioHardware",
            Some(json!({"nfn": "InventarioHardware", "ids": "1"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["job_id"].as_str().expect("job id").to_string();
    let job = api.wait_job(&id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let errors = partition_errors(&job["result"]);
    assert!(errors.iter().any(|e| e.contains(NTFS_ERROR)), "{job:#}");

    // Still answering, and again.
    let (s, _) = api.call(Method::GET, "/v1/status", None).await;
    assert_eq!(s, 200);
    let (s, _) = api.call(Method::GET, "/v1/inventory", None).await;
    assert_eq!(s, 200);
    agent.shutdown().await;
}
