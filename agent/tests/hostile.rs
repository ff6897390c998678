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
    let agent = start_agent(AgentOpts::new(dir.path(), vec![(1, disk)])).await;
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

/// Whether this process is root (the software inventory mounts).
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (the agent mounts the partition): run it as root, as scripts/test does"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_node_and_a_20_gb_file_in_a_partition_do_not_hurt_the_software_inventory() {
    require_root();
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = dir.path().join("disk.img");
    make_disk(
        &disk,
        64,
        json!({"table": "mbr", "partitions": [
            {"number": 1, "type": "linux", "size": "48MiB", "filesystem": "ext4"}
        ]}),
    );
    // etc/os-release: a device node reading zeros forever; the fallback
    // usr/lib/os-release: a 20 GB sparse file; the Windows hive: another
    // device node.
    with_mounted(&disk, 1, false, |root| {
        for d in ["etc", "usr/lib", "Windows/System32/config"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for node in ["etc/os-release", "Windows/System32/config/SOFTWARE"] {
            sh(Command::new("mknod")
                .arg(root.join(node))
                .args(["c", "1", "5"]));
        }
        let f = std::fs::File::create(root.join("usr/lib/os-release")).expect("file");
        f.set_len(20_000_000_000).expect("20 GB");
    });
    let agent = start_agent(AgentOpts::new(dir.path(), vec![(1, disk.clone())])).await;
    let api = Api::new(&agent);
    let t0 = std::time::Instant::now();
    let (s, v) = api
        .call(
            Method::POST,
            "/CloningEngine/InventarioSoftware",
            Some(json!({"dsk": "1", "par": "1"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["job_id"].as_str().expect("job id").to_string();
    let job = api.wait_job(&id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["os"], Value::Null, "{job:#}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let (s, _) = api.call(Method::GET, "/v1/status", None).await;
    assert_eq!(s, 200, "the agent is up");
    agent.shutdown().await;
}

#[test]
fn the_agent_mounts_untrusted_partitions_nodev_nosuid_noexec() {
    require_root();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = dir.path().join("disk.img");
    make_disk(
        &disk,
        32,
        json!({"table": "mbr", "partitions": [
            {"number": 1, "type": "linux", "size": "16MiB", "filesystem": "ext4"}
        ]}),
    );
    let info = aula_agent::disks::inspect(&disk).expect("inspect");
    let p = aula_agent::disks::partition(&info, 1).expect("partition 1");
    let at = dir.path().join("mnt");
    for read_only in [true, false] {
        let m = aula_agent::disks::mount(&disk, &p, &at, read_only, false).expect("mount");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let line = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(at.to_str().expect("utf8")))
            .unwrap_or_else(|| panic!("{} not mounted: {mountinfo}", at.display()));
        let opts = line.split_whitespace().nth(5).expect("options");
        for o in ["nodev", "nosuid", "noexec"] {
            assert!(opts.split(',').any(|x| x == o), "{o} missing: {line}");
        }
        assert_eq!(opts.split(',').any(|x| x == "ro"), read_only, "{line}");
        drop(m);
    }
    assert_eq!(
        aula_agent::disks::mount_options("ntfs", true),
        ["nodev", "nosuid", "noexec", "ro"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_links_program_runs_after_a_restore_and_after_a_layout() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = target_disk(dir.path());
    let marker = dir.path().join("links-ran");
    let prog = dir.path().join("disklinks.sh");
    std::fs::write(
        &prog,
        format!("#!/bin/sh\necho ran >> {}\n", marker.display()),
    )
    .expect("program");
    sh(Command::new("chmod").arg("+x").arg(&prog));
    let extra = format!("[jobs]\nafter_disk_change = \"{}\"\n", prog.display());
    // A repository that answers (404 for the image restored below).
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let agent = start_agent(AgentOpts {
        extra: &extra,
        ..AgentOpts::new(dir.path(), vec![(1, disk)]).repo(&server, server.https.port())
    })
    .await;
    let api = Api::new(&agent);
    let runs = || {
        std::fs::read_to_string(&marker)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    // A layout (Configurar) that changes the table.
    let (s, v) = api
        .call(
            Method::POST,
            "/CloningEngine/Configurar",
            Some(json!({"type": "MSDOS", "disk": "1", "partition_setup": [
                {"partition": "1", "code": "LINUX", "filesystem": "EMPTY", "size": "32768", "format": "0"}
            ]})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let job = api
        .wait_job(v["job_id"].as_str().expect("id"), Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(runs(), 1, "after the layout");
    // A restore, even one that fails (the image does not exist).
    let (s, v) = api
        .call(
            Method::POST,
            "/CloningEngine/RestaurarImagen",
            Some(json!({"dsk": "1", "par": "1", "nci": "none", "ipr": "127.0.0.1"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let job = api
        .wait_job(v["job_id"].as_str().expect("id"), Duration::from_secs(120))
        .await;
    assert_ne!(job["state"], "succeeded", "{job:#}");
    assert_eq!(runs(), 2, "after the restore");
    // A hardware inventory changes nothing and runs nothing.
    let (_, v) = api
        .call(
            Method::POST,
            "/v1/jobs",
            Some(json!({"op": "hardware_inventory"})),
        )
        .await;
    api.wait_job(v["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(runs(), 2);
    agent.shutdown().await;
    server.stop().await;
}
