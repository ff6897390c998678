//! Deployments with real agents: the `aula-bootserver` binary (killed with
//! SIGKILL and started again mid-deployment), four in-process agents on
//! loopback with file-backed disks, a real ext4 image in the repository.

mod deploy_support;

use std::time::{Duration, Instant};

use deploy_support::*;
use hyper::Method;
use serde_json::json;

const MACS: [&str; 4] = [
    "52:54:00:d0:00:01",
    "52:54:00:d0:00:02",
    "52:54:00:d0:00:03",
    "52:54:00:d0:00:04",
];

fn layout() -> serde_json::Value {
    json!({"table": "mbr", "partitions": [
        {"number": 1, "type": "linux", "size": "16MiB", "filesystem": "ext4"},
        {"number": 2, "type": "linux", "size": "48MiB", "format": false},
        {"number": 4, "type": "cache", "size": "64MiB"}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_of_four_restores_three_fails_one_with_its_reason_survives_a_server_kill_and_retry_finishes_it(
) {
    if !in_netns("a_room_of_four_restores_three_fails_one_with_its_reason_survives_a_server_kill_and_retry_finishes_it") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProc::start(
        &dir.path().join("server"),
        "[console]\nlive_boot_timeout_s = 60\nstall_timeout_s = 120\npower_timeout_s = 60\nagent_gone_s = 30\n",
    );
    let c = server.client();

    // The image: a 48 MiB ext4 filesystem with 20 MiB of data, in 1 MiB chunks.
    let files = vec![
        ("data/blob.bin", pseudo_random(11, 20 << 20)),
        ("etc/os-release", b"NAME=\"Lab\"\nID=lab\n".to_vec()),
    ];
    let src = ext4_image(dir.path(), 48, &files);
    upload(&server, &src, "lab", 1 << 20).await;

    // The room: four machines; the last one's disk is too small for the layout.
    let room = c
        .ok(Method::POST, "/v1/rooms", Some(json!({"name": "Aula 1"})))
        .await;
    let mut disks = Vec::new();
    let mut agents = Vec::new();
    // Images reach the agents at 16 MB/s in all, so the server can be
    // killed while they restore (webhooks make the rest quick).
    let throttle = Throttle::start(server.https, 16_000_000).await;
    for (i, mac) in MACS.iter().enumerate() {
        let disk = dir.path().join(format!("disk{i}.img"));
        let f = std::fs::File::create(&disk).expect("disk");
        f.set_len(if i == 3 { 100 * MIB } else { 160 * MIB })
            .expect("size");
        drop(f);
        c.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": mac, "name": format!("pc{:02}", i + 1), "room_id": room["id"], "seat": i + 1})),
        )
        .await;
        agents.push(
            start_agent_via(
                &server,
                throttle.port,
                &dir.path().join(format!("agent{i}")),
                mac,
                &disk,
            )
            .await,
        );
        disks.push(disk);
    }
    wait_agents(&c, 4).await;

    // Bad requests change nothing.
    let (s, v) = c
        .call(
            Method::POST,
            "/v1/deployments",
            Some(json!({"room": "Aula 1", "image": "lab", "partition": 2, "method": "multicast"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = c
        .call(
            Method::POST,
            "/v1/deployments",
            Some(json!({"room": "Aula 1", "image": "nope", "partition": 2})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("not in the repository"),
        "{v}"
    );
    let (s, _) = c.call(Method::GET, "/v1/deployments", None).await;
    assert_eq!(s, 200);

    let dep = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(
                json!({"room": "Aula 1", "image": "lab", "disk": 1, "partition": 2,
                        "method": "unicast", "layout": layout(), "after": "reboot-local",
                        "max_concurrent": 2}),
            ),
        )
        .await;
    let id = dep["id"].as_i64().expect("id");

    // Kill the server (SIGKILL) as soon as a machine restores, start it again.
    wait_restoring(&c, id).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    let resumed = Instant::now();

    let end = wait_deployment(&c, id, Duration::from_secs(240)).await;
    let st = states(&end);
    eprintln!(
        "deployment {id} ended {}s after the restart: {st:?}",
        resumed.elapsed().as_secs()
    );
    let logs = server.logs();
    assert!(
        logs.contains("resuming deployment"),
        "the restarted server did not resume:\n{logs}"
    );
    assert_eq!(end["done"], 3, "{end:#}");
    assert_eq!(end["failed"], 1, "{end:#}");
    assert_eq!(
        st[3],
        (
            "pc04".to_owned(),
            "failed".to_owned(),
            Some("disk 1 is 100 MiB, the layout needs 129 MiB".to_owned())
        ),
        "{end:#}"
    );
    for i in 0..3 {
        assert_eq!(st[i].1, "done", "{st:?}");
        let (bytes, diff) = partition_equals_image(&server.repo_dir(), "lab", &disks[i], 2);
        assert!(
            diff.is_empty(),
            "pc{:02}: windows {diff:?} differ from the image",
            i + 1
        );
        assert!(bytes > 20 << 20, "{bytes}");
        let power = std::fs::read_to_string(dir.path().join(format!("agent{i}/power.log")))
            .unwrap_or_default();
        assert_eq!(power.trim(), "reboot", "pc{:02} was rebooted once", i + 1);
    }
    // The machines boot locally now and remember their image.
    let clients = c.ok(Method::GET, "/v1/clients", None).await;
    for mac in &MACS[..3] {
        let cl = clients
            .as_array()
            .and_then(|a| a.iter().find(|x| x["mac"] == *mac))
            .expect("client");
        assert_eq!(cl["boot_mode"], "local", "{cl}");
    }
    let ms = c.ok(Method::GET, "/v1/machines?room=1", None).await;
    let images: Vec<_> = ms["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| m["image"].clone())
        .collect();
    assert_eq!(
        images,
        vec![json!("lab"), json!("lab"), json!("lab"), json!(null)]
    );

    // Retry the failed one after giving it a larger disk.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disks[3])
        .expect("open");
    f.set_len(160 * MIB).expect("grow");
    drop(f);
    let retry = c
        .ok(Method::POST, &format!("/v1/deployments/{id}/retry"), None)
        .await;
    let rid = retry["id"].as_i64().expect("id");
    assert_eq!(retry["retry_of"], id);
    assert_eq!(retry["total"], 1);
    let end = wait_deployment(&c, rid, Duration::from_secs(120)).await;
    assert_eq!(
        states(&end),
        vec![("pc04".to_owned(), "done".to_owned(), None)],
        "{end:#}"
    );
    let (_, diff) = partition_equals_image(&server.repo_dir(), "lab", &disks[3], 2);
    assert!(diff.is_empty(), "pc04 differs after the retry: {diff:?}");
    let (s, v) = c
        .call(Method::POST, &format!("/v1/deployments/{rid}/retry"), None)
        .await;
    assert_eq!(s, 400, "nothing to retry: {v}");

    // Every command is in the log with its author.
    let log = c.ok(Method::GET, "/v1/log", None).await;
    let actions: Vec<String> = log
        .as_array()
        .expect("log")
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["who"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(
        actions.iter().any(|a| a == "api-token deploy lab ok"),
        "{actions:#?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("api-token deploy lab refused")),
        "{actions:#?}"
    );
    assert!(
        actions.iter().any(|a| a == "api-token deployment.retry ok"),
        "{actions:#?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("system deployment.end finished: 3 done, 1 failed")),
        "{actions:#?}"
    );

    for a in agents {
        a.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_machine_and_a_scheduled_deployment() {
    if !in_netns("cancelling_a_machine_and_a_scheduled_deployment") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(&dir.path().join("server"), "");
    let c = server.client();
    let src = ext4_image(dir.path(), 16, &[("a.txt", b"a".to_vec())]);
    upload(&server, &src, "small", 1 << 20).await;
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "B"})))
        .await;
    for (i, mac) in ["52:54:00:d1:00:01", "52:54:00:d1:00:02"]
        .iter()
        .enumerate()
    {
        c.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": mac, "name": format!("b{i}"), "room": "B"})),
        )
        .await;
    }
    // Far in the future: scheduled, nothing happens until then; cancel it.
    let dep = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(json!({"room": "B", "image": "small", "partition": 1, "start_at": "2099-01-01T02:00:00+01:00"})),
        )
        .await;
    assert_eq!(dep["state"], "scheduled");
    let id = dep["id"].as_i64().expect("id");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v = c
        .ok(Method::GET, &format!("/v1/deployments/{id}"), None)
        .await;
    assert!(states(&v).iter().all(|(_, s, _)| s == "pending"), "{v:#}");
    c.ok(Method::POST, &format!("/v1/deployments/{id}/cancel"), None)
        .await;
    let v = wait_deployment(&c, id, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["cancelled"], 2);
    let (s, _) = c
        .call(Method::POST, &format!("/v1/deployments/{id}/cancel"), None)
        .await;
    assert_eq!(s, 400, "already cancelled");

    // Now: machines without agents start waking; cancel one of them.
    let dep = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(json!({"room": "B", "image": "small", "partition": 1})),
        )
        .await;
    let id = dep["id"].as_i64().expect("id");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c
            .ok(Method::GET, &format!("/v1/deployments/{id}"), None)
            .await;
        if states(&v).iter().all(|(_, s, _)| s == "waking") {
            break;
        }
        assert!(Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Waking set a one-shot live boot.
    let clients = c.ok(Method::GET, "/v1/clients", None).await;
    let b0 = clients
        .as_array()
        .and_then(|a| a.iter().find(|x| x["mac"] == "52:54:00:d1:00:01"))
        .expect("client");
    assert_eq!(b0["boot_mode"], "live", "{b0}");
    c.ok(
        Method::POST,
        &format!("/v1/deployments/{id}/machines/52:54:00:d1:00:01/cancel"),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v = c
        .ok(Method::GET, &format!("/v1/deployments/{id}"), None)
        .await;
    let st = states(&v);
    assert_eq!(st[0].1, "cancelled", "{st:?}");
    assert_eq!(st[1].1, "waking", "{st:?}");
    // Cancelling dropped the unused one-shot live boot.
    let clients = c.ok(Method::GET, "/v1/clients", None).await;
    let b0 = clients
        .as_array()
        .and_then(|a| a.iter().find(|x| x["mac"] == "52:54:00:d1:00:01"))
        .expect("client");
    assert_eq!(b0["boot_mode"], "local", "{b0}");
    c.ok(Method::POST, &format!("/v1/deployments/{id}/cancel"), None)
        .await;
    let v = wait_deployment(&c, id, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swarm_deployment_restores_a_room_whose_agents_take_chunks_from_each_other() {
    if !in_netns("a_swarm_deployment_restores_a_room_whose_agents_take_chunks_from_each_other") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(&dir.path().join("server"), "");
    let c = server.client();
    let files = vec![("data/blob.bin", pseudo_random(23, 24 << 20))];
    let src = ext4_image(dir.path(), 48, &files);
    upload(&server, &src, "lab", 1 << 20).await;
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "S"})))
        .await;
    // The agents fetch from their boot server directly: it is their
    // repository, so they join its swarm with their own registered tokens.
    let macs = [
        "52:54:00:d2:00:01",
        "52:54:00:d2:00:02",
        "52:54:00:d2:00:03",
    ];
    let mut disks = Vec::new();
    let mut agents = Vec::new();
    for (i, mac) in macs.iter().enumerate() {
        let disk = dir.path().join(format!("disk{i}.img"));
        let f = std::fs::File::create(&disk).expect("disk");
        f.set_len(160 * MIB).expect("size");
        drop(f);
        c.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": mac, "name": format!("s{i}"), "room": "S"})),
        )
        .await;
        agents.push(start_agent(&server, &dir.path().join(format!("agent{i}")), mac, &disk).await);
        disks.push(disk);
    }
    wait_agents(&c, 3).await;
    let dep = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(
                json!({"room": "S", "image": "lab", "disk": 1, "partition": 2,
                        "method": "swarm", "layout": layout(), "after": "stay"}),
            ),
        )
        .await;
    assert_eq!(dep["method"], "swarm", "{dep:#}");
    let id = dep["id"].as_i64().expect("id");
    let end = wait_deployment(&c, id, Duration::from_secs(240)).await;
    // The members' session stays listed a while after they leave.
    let swarm = c.ok(Method::GET, "/v1/swarm", None).await;
    assert_eq!(end["done"], 3, "{end:#}");
    for (i, disk) in disks.iter().enumerate() {
        let (bytes, diff) = partition_equals_image(&server.repo_dir(), "lab", disk, 2);
        assert!(
            diff.is_empty(),
            "s{i}: windows {diff:?} differ from the image"
        );
        assert!(bytes > 24 << 20, "{bytes}");
    }
    let logs = server.logs();
    assert_eq!(
        logs.matches("swarm member joined").count(),
        3,
        "every agent joined the image's swarm:\n{logs}"
    );
    let s = swarm["sessions"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["session"] == "lab@1"))
        .unwrap_or_else(|| panic!("no session lab@1: {swarm:#}"));
    let (image, server_b, peers) = (
        s["image_bytes"].as_u64().expect("image_bytes"),
        s["bytes_from_server"].as_u64().expect("bytes_from_server"),
        s["bytes_from_peers"].as_u64().expect("bytes_from_peers"),
    );
    eprintln!("image {image} B: {server_b} B from the server, {peers} B from peers");
    assert!(peers > 0, "no chunk came from a peer: {s:#}");
    assert!(
        server_b < 2 * image,
        "the server sent {server_b} B of a {image} B image to 3 machines: {s:#}"
    );
    for a in agents {
        a.shutdown().await;
    }
}
