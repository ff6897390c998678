//! End to end over loopback HTTPS: the real boot server (registry +
//! repository), a test core recording webhooks, the agent, file-backed
//! disks with real ext4 filesystems.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

fn states(hooks: &[Value]) -> Vec<String> {
    hooks
        .iter()
        .filter(|h| h["event"] == "state")
        .map(|h| h["state"].as_str().unwrap_or("").to_string())
        .collect()
}

fn assert_seq_increasing(hooks: &[Value]) {
    let seqs: Vec<u64> = hooks
        .iter()
        .map(|h| h["seq"].as_u64().unwrap_or(0))
        .collect();
    for w in seqs.windows(2) {
        assert!(w[0] < w[1], "seq not increasing: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restaurar_imagen_with_the_documented_body_restores_partition_2_and_the_core_sees_running_progress_succeeded(
) {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let core = TestCore::start().await;
    let (src, files) = source_disk(dir.path(), 12);
    let m = upload(&server, &src, Some(1), "image-test").await;
    let target = target_disk(dir.path());
    // ~6 MiB/s between agent and server: the restore takes a few seconds.
    // The agent knows the server by the proxy's address (aula.server=), and
    // the documented body's ipr names that host: the repository is the
    // server's, over HTTPS with its pin.
    let proxy = Proxy::start(server.https, 6 << 20).await;
    let agent = start_agent(AgentOpts {
        server: Some((
            format!("https://{}", proxy.addr),
            server.fingerprint.clone(),
        )),
        core: Some((core.url(), core.fingerprint.clone())),
        boot: Some(server.live_boot(MAC).await),
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())])
    })
    .await;
    let api = Api::new(&agent);

    // The agent registered itself: token, fingerprint and port are what it uses.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let reg = loop {
        let a = server.agents().await;
        if let Some(r) = a
            .as_array()
            .and_then(|l| l.iter().find(|r| r["macs"][0] == MAC))
        {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never registered: {a}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reg["token"], agent.token());
    assert_eq!(reg["cert_fingerprint"], agent.fingerprint());
    assert_eq!(reg["port"], agent.addr.port());

    let body = json!({"dsk":"1","par":"2","cpt":"83","ifs":"1","idi":"3f2a7c1e-0d4b-4e55-9c1a-6b2f0e9d8a71",
        "nci":"image-test","ipr":"127.0.0.1","nfn":"RestaurarImagen","method":"unicast","ids":"0"});
    let (s, r) = api
        .call(Method::POST, "/CloningEngine/RestaurarImagen", Some(body))
        .await;
    assert_eq!(s, 200, "{r}");
    let job = r["job_id"].as_str().expect("job_id").to_string();
    let hexpart = job.strip_prefix("RestaurarImagen-").expect("prefix");
    assert!(
        hexpart.len() == 8 && hexpart.bytes().all(|b| b.is_ascii_hexdigit()),
        "{job}"
    );

    let hooks = core
        .wait_state(&job, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(
        states(&hooks),
        ["queued", "running", "succeeded"],
        "{hooks:#?}"
    );
    assert_seq_increasing(&hooks);
    assert_eq!(hooks[0]["seq"], 1);
    let progress: Vec<&Value> = hooks.iter().filter(|h| h["event"] == "progress").collect();
    assert!(!progress.is_empty(), "no progress reported: {hooks:#?}");
    // Throttled: at most one progress report per second.
    let times: Vec<time::OffsetDateTime> = progress
        .iter()
        .map(|h| {
            time::OffsetDateTime::parse(
                h["timestamp"].as_str().expect("timestamp"),
                &time::format_description::well_known::Rfc3339,
            )
            .expect("rfc3339")
        })
        .collect();
    for w in times.windows(2) {
        assert!(
            (w[1] - w[0]).as_seconds_f64() >= 0.9,
            "progress too often: {times:?}"
        );
    }
    for p in &progress {
        assert_eq!(p["state"], "running");
        assert_eq!(p["progress"]["bytes_total"], m.used_bytes);
        assert!(p["progress"]["rate_bps"].is_number());
    }
    let done = hooks.last().expect("last");
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["op"], "RestaurarImagen");
    assert_eq!(done["ids"], "0");
    assert_eq!(done["idi"], "3f2a7c1e-0d4b-4e55-9c1a-6b2f0e9d8a71");
    assert_eq!(done["opengnsys"]["nci"], "image-test");
    assert_eq!(done["agent"]["mac"], MAC);
    assert_eq!(done["progress"]["bytes_done"], m.used_bytes);
    assert_eq!(done["progress"]["bytes_total"], m.used_bytes);
    assert!(done["progress"]["bytes_fetched"].as_u64().expect("fetched") > 0);
    assert_eq!(done["result"]["stats"]["bytes_used"], m.used_bytes);
    assert_eq!(done["result"]["image"], "image-test");
    assert_eq!(done["result"]["partition"], 2);
    // Every webhook is signed with the agent's token.
    for h in core.hooks() {
        assert!(
            signed_right(&h, agent.token()),
            "bad signature on {}",
            h.json
        );
    }

    // The bytes are right: the files read back from partition 2.
    agent.shutdown().await;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&target, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n} differs after the restore");
    }
    // Partition 1 was not touched.
    let info = aula_imager::disk::inspect_file(&target).expect("inspect");
    assert_eq!(
        info.partition(1)
            .and_then(|p| p.filesystem.clone())
            .as_deref(),
        Some("ext4")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crear_imagen_then_restore_round_trips_through_the_repository() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let core = TestCore::start().await;
    let target = target_disk(dir.path());
    let files = vec![
        ("a/b/c.bin", pseudo_random(11, 3 << 20)),
        ("note.txt", b"captured by CrearImagen\n".to_vec()),
    ];
    fill(&target, 1, &files);
    let agent = start_agent(AgentOpts {
        core: Some((core.url(), core.fingerprint.clone())),
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, server.https.port())
    })
    .await;
    let api = Api::new(&agent);
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/CrearImagen",
            Some(json!({"dsk":"1","par":"1","cpt":"83","idi":"42","nci":"roundtrip","ipr":"127.0.0.1","nfn":"CrearImagen","ids":"5"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let create_id = r["job_id"].as_str().expect("id").to_string();
    let v = api.wait_job(&create_id, Duration::from_secs(60)).await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["result"]["image"], "roundtrip");
    assert_eq!(v["result"]["version"], 1);
    assert_eq!(v["result"]["filesystem"], "ext4");
    let hooks = core
        .wait_state(&create_id, "succeeded", Duration::from_secs(10))
        .await;
    assert_eq!(hooks.last().expect("hook")["ids"], "5");

    // Restore it onto partition 2 with the native API (client-supplied id).
    let spec = json!({"id": "rt-restore-1", "op": "restore", "disk": 1, "partition": 2,
        "image": "roundtrip", "repository": server.repo_url()});
    let (s, v) = api.call(Method::POST, "/v1/jobs", Some(spec.clone())).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["id"], "rt-restore-1");
    // Idempotent: the same id and spec return the same job.
    let (s, again) = api.call(Method::POST, "/v1/jobs", Some(spec)).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["id"], "rt-restore-1");
    let v = api.wait_job("rt-restore-1", Duration::from_secs(60)).await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["result"]["version"], 1);
    agent.shutdown().await;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&target, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n} differs after the round trip");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurar_lays_out_the_disk_and_unicast_cache_restores_through_the_cache_partition() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let (src, files) = source_disk(dir.path(), 4);
    let m = upload(&server, &src, Some(1), "cached").await;
    let disk = dir.path().join("blank.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(192 * MIB))
        .expect("blank disk");
    let agent = start_agent(AgentOpts {
        ..AgentOpts::new(dir.path(), vec![(1, disk.clone())]).repo(&server, server.https.port())
    })
    .await;
    let api = Api::new(&agent);
    // A layout that cannot fit is refused before anything is written.
    let (s, e) = api
        .call(
            Method::POST,
            "/CloningEngine/Configurar",
            Some(json!({"nfn":"Configurar","type":"MSDOS","disk":"1","cache":"0","cache_size":"0",
                "partition_setup":[{"partition":"1","code":"LINUX","filesystem":"EXT4","size":"9000000","format":"1"}]})),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["field"], "partition_setup", "{e}");

    let setup = json!({"nfn":"Configurar","ids":"12","type":"MSDOS","disk":"1","cache":"1","cache_size":"65536",
        "partition_setup":[
            {"partition":"1","code":"LINUX","filesystem":"EXT4","size":"32768","format":"1"},
            {"partition":"2","code":"LINUX","filesystem":"EXT4","size":"65536","format":"0"},
            {"partition":"3","code":"EMPTY","filesystem":"EMPTY","size":"0","format":"0"}]});
    let (s, r) = api
        .call(Method::POST, "/CloningEngine/Configurar", Some(setup))
        .await;
    assert_eq!(s, 200, "{r}");
    let v = api
        .wait_job(r["job_id"].as_str().expect("id"), Duration::from_secs(60))
        .await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let info = aula_imager::disk::inspect_file(&disk).expect("inspect");
    let nums: Vec<u32> = info.partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, [1, 2, 4]);
    let p1 = info.partition(1).expect("p1");
    assert_eq!(p1.size, 32 * MIB);
    assert_eq!(p1.filesystem.as_deref(), Some("ext4"));
    let p4 = info.partition(4).expect("cache");
    assert!(p4.cache, "{p4:?}");
    assert_eq!(p4.size, 64 * MIB);
    assert_eq!(
        p4.start + p4.size,
        192 * MIB,
        "CACHE at the end of the disk"
    );

    // Restore through the CACHE partition.
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/RestaurarImagen",
            Some(json!({"dsk":"1","par":"2","nci":"cached","ipr":"127.0.0.1","method":"unicast-cache"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let v = api
        .wait_job(r["job_id"].as_str().expect("id"), Duration::from_secs(60))
        .await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["result"]["method"], "unicast-cache");
    agent.shutdown().await;
    // Every chunk of the image is now in the cache, and the CACHE mount is gone.
    let chunk_ids: Vec<String> = m
        .unique_chunks()
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    assert!(!chunk_ids.is_empty());
    let missing = with_mounted(&disk, 4, true, |d| {
        chunk_ids
            .iter()
            .filter(|id| {
                !d.join("aula/chunks")
                    .join(&id[..2])
                    .join(format!("{id}.zst"))
                    .exists()
            })
            .count()
    });
    assert_eq!(missing, 0, "chunks missing from the cache");
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    assert!(
        !mounts.contains("cache-mnt"),
        "the CACHE partition is still mounted"
    );
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&disk, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n} differs");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_restore_stops_midway_and_leaves_partition_2_unrecognisable_and_the_rest_untouched(
) {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let core = TestCore::start().await;
    let (src, _) = source_disk(dir.path(), 16);
    // Small chunks: a cancel stops at the next chunk boundary, and chunks
    // already being fetched (one per fetch thread) finish first.
    upload_chunked(&server, &src, Some(1), "slow", 256 << 10).await;
    let target = target_disk(dir.path());
    // An old filesystem on partition 2 that the restore starts to overwrite.
    sh(std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg("-F")
        .arg("-E")
        .arg(format!("offset={}", part_range(&target, 2).0))
        .arg(&target)
        .arg(format!("{}k", part_range(&target, 2).1 / 1024)));
    let proxy = Proxy::start(server.https, 2 << 20).await;
    let agent = start_agent(AgentOpts {
        core: Some((core.url(), core.fingerprint.clone())),
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, proxy.addr.port())
    })
    .await;
    let api = Api::new(&agent);
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/RestaurarImagen",
            Some(json!({"dsk":"1","par":"2","nci":"slow","ipr":"127.0.0.1","method":"unicast","ids":"9"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let job = r["job_id"].as_str().expect("id").to_string();
    // Wait until data is flowing, then cancel.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = api
            .call(Method::GET, &format!("/v1/jobs/{job}"), None)
            .await;
        if v["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = api
        .call(Method::DELETE, &format!("/v1/jobs/{job}"), None)
        .await;
    assert_eq!(s, 202, "{v}");
    let v = api.wait_job(&job, Duration::from_secs(20)).await;
    assert_eq!(v["state"], "cancelled", "{v:#}");
    assert_eq!(v["error"]["kind"], "cancelled");
    let done = v["progress"]["bytes_done"].as_u64().expect("done");
    let total = v["progress"]["bytes_total"].as_u64().expect("total");
    assert!(done < total, "the restore ran to the end ({done}/{total})");
    let state = v["error"]["disk_state"].as_str().expect("disk_state");
    assert!(state.contains("first MiB zeroed"), "{state}");
    // Cancelling again is a conflict; the core saw the cancel.
    let (s, _) = api
        .call(Method::DELETE, &format!("/v1/jobs/{job}"), None)
        .await;
    assert_eq!(s, 409);
    let hooks = core
        .wait_state(&job, "cancelled", Duration::from_secs(10))
        .await;
    assert_eq!(states(&hooks), ["queued", "running", "cancelled"]);
    assert_eq!(hooks.last().expect("hook")["error"]["disk_state"], state);
    agent.shutdown().await;
    // The disk is in the stated state: partition 2 has no filesystem left,
    // partition 1 and the CACHE are as they were.
    let info = aula_imager::disk::inspect_file(&target).expect("inspect");
    assert_eq!(info.partition(2).expect("p2").filesystem, None, "{info:#?}");
    assert_eq!(
        info.partition(1).expect("p1").filesystem.as_deref(),
        Some("ext4")
    );
    assert!(info.partition(4).expect("p4").cache);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_restore_in_the_same_boot_reads_nothing_unless_the_partition_was_written_since() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let (src, files) = source_disk(dir.path(), 12);
    upload(&server, &src, Some(1), "again").await;
    let target = target_disk(dir.path());
    let agent = start_agent(AgentOpts {
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, server.https.port())
    })
    .await;
    let api = Api::new(&agent);
    let restore = || async {
        let (s, r) = api
            .call(
                Method::POST,
                "/CloningEngine/RestaurarImagen",
                Some(json!({"dsk":"1","par":"2","nci":"again","ipr":"127.0.0.1","method":"unicast","ids":"1"})),
            )
            .await;
        assert_eq!(s, 200, "{r}");
        let job = r["job_id"].as_str().expect("id").to_string();
        let v = api.wait_job(&job, Duration::from_secs(60)).await;
        assert_eq!(v["state"], "succeeded", "{v:#}");
        v["result"]["stats"].clone()
    };
    let first = restore().await;
    assert_eq!(first["chunks_unread"], 0, "{first}");
    assert!(first["chunks_fetched"].as_u64().expect("n") > 0, "{first}");
    // Nothing wrote to the disk since: the record says what it holds.
    let second = restore().await;
    assert_eq!(second["chunks_fetched"], 0, "{second}");
    assert_eq!(second["chunks_unread"], first["chunks"], "{second}");
    // Someone writes into partition 2 (its superblock): the record no longer
    // holds, the disk is read, and the damaged window is fetched again.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open target");
        f.write_all_at(&[0x5a; 512], part_range(&target, 2).0 + 1024)
            .expect("write");
    }
    let third = restore().await;
    assert_eq!(third["chunks_unread"], 0, "{third}");
    assert_eq!(third["chunks_fetched"], 1, "{third}");
    agent.shutdown().await;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&target, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n} differs after the restores");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_one_disk_run_in_order_while_read_only_jobs_run_at_once() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let (src, _) = source_disk(dir.path(), 8);
    upload(&server, &src, Some(1), "ordered").await;
    let target = target_disk(dir.path());
    let proxy = Proxy::start(server.https, 4 << 20).await;
    let agent = start_agent(AgentOpts {
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, proxy.addr.port())
    })
    .await;
    let api = Api::new(&agent);
    let post = |path: &'static str, body: Value| {
        let api = &api;
        async move {
            let (s, r) = api.call(Method::POST, path, Some(body)).await;
            assert_eq!(s, 200, "{r}");
            r["job_id"].as_str().expect("id").to_string()
        }
    };
    let restore = post(
        "/CloningEngine/RestaurarImagen",
        json!({"dsk":"1","par":"2","nci":"ordered","ipr":"127.0.0.1"}),
    )
    .await;
    let software = post(
        "/CloningEngine/InventarioSoftware",
        json!({"dsk":"1","par":"2"}),
    )
    .await;
    let hardware = post(
        "/CloningEngine/InventarioHardware",
        json!({"nfn":"InventarioHardware"}),
    )
    .await;
    // The hardware inventory finishes while the restore still runs, and the
    // software inventory of the same disk waits for it.
    let hw = api.wait_job(&hardware, Duration::from_secs(30)).await;
    assert_eq!(hw["state"], "succeeded", "{hw:#}");
    let (_, r) = api
        .call(Method::GET, &format!("/v1/jobs/{restore}"), None)
        .await;
    assert_eq!(r["state"], "running", "{r:#}");
    let (_, sw) = api
        .call(Method::GET, &format!("/v1/jobs/{software}"), None)
        .await;
    assert_eq!(sw["state"], "queued", "{sw:#}");
    let (s, st) = api.call(Method::GET, "/CloningEngine/status", None).await;
    assert_eq!(s, 200);
    assert_eq!(st["status"], "BSY");
    let r = api.wait_job(&restore, Duration::from_secs(60)).await;
    assert_eq!(r["state"], "succeeded", "{r:#}");
    // The software inventory then sees the restored system.
    let sw = api.wait_job(&software, Duration::from_secs(30)).await;
    assert_eq!(sw["state"], "succeeded", "{sw:#}");
    assert!(
        sw["started"].as_str() >= r["finished"].as_str(),
        "{sw:#} {r:#}"
    );
    assert_eq!(sw["result"]["os"]["family"], "linux");
    assert_eq!(sw["result"]["os"]["name"], "Aula Test Linux");
    assert_eq!(sw["result"]["os"]["version"], "1.2");
    let (_, list) = api.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(3));
    agent.shutdown().await;
    server.stop().await;
}
