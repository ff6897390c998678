//! The API's contract over loopback HTTPS: authentication, body checks,
//! webhook delivery through a core outage, scripts, power, booting the
//! installed OS, inventory, the OpenAPI document, the binary itself.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

async fn simple_agent(dir: &std::path::Path, core: Option<&TestCore>) -> aula_agent::Agent {
    let disk = target_disk(dir);
    start_agent(AgentOpts {
        core: core.map(|c| (c.url(), c.fingerprint.clone())),
        ..AgentOpts::new(dir, vec![(1, disk)])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_gets_401_everywhere_but_status_and_nothing_runs() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let agent = simple_agent(dir.path(), None).await;
    let api = Api::new(&agent);
    let (s, v) = api.call_with(Method::GET, "/v1/status", None, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["service"], "aula-agent");
    assert_eq!(v["state"], "idle");
    let calls: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/v1/inventory", None),
        (Method::GET, "/v1/openapi.json", None),
        (Method::GET, "/v1/jobs", None),
        (Method::POST, "/v1/jobs", Some(json!({"op": "reboot"}))),
        (
            Method::POST,
            "/v1/jobs",
            Some(json!({"op": "script", "script": "touch /tmp/should-not-exist"})),
        ),
        (Method::GET, "/v1/jobs/x", None),
        (Method::DELETE, "/v1/jobs/x", None),
        (Method::GET, "/v1/jobs/x/events", None),
        (Method::GET, "/CloningEngine/status", None),
        (
            Method::POST,
            "/CloningEngine/Apagar",
            Some(json!({"nfn": "Apagar"})),
        ),
        (
            Method::POST,
            "/CloningEngine/RestaurarImagen",
            Some(json!({"dsk":"1","par":"2","nci":"x","ipr":"127.0.0.1"})),
        ),
        (Method::POST, "/CloningEngine/Nope", None),
        (Method::GET, "/elsewhere", None),
    ];
    for (m, path, body) in calls {
        for token in [None, Some("wrong-token"), Some("")] {
            let (s, v) = api.call_with(m.clone(), path, token, body.clone()).await;
            assert_eq!(s, 401, "{m} {path} with {token:?}: {v}");
        }
    }
    let (s, jobs) = api.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(s, 200);
    assert_eq!(jobs, json!([]), "a refused request created a job");
    assert!(!dir.path().join("power.log").exists());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_400_naming_the_field_and_ids_are_idempotent() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let agent = simple_agent(dir.path(), None).await;
    let api = Api::new(&agent);
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "/v1/jobs",
            json!({"op": "restore", "disk": "one", "image": "x"}),
            Some("disk"),
        ),
        (
            "/v1/jobs",
            json!({"op": "restore", "disk": 1}),
            Some("image"),
        ),
        (
            "/v1/jobs",
            json!({"op": "restore", "disk": 1, "image": "x", "colour": "red"}),
            Some("colour"),
        ),
        (
            "/v1/jobs",
            json!({"op": "restore", "disk": 7, "image": "x"}),
            Some("disk"),
        ),
        (
            "/v1/jobs",
            json!({"op": "restore", "disk": 1, "image": "x", "method": "multicast"}),
            Some("method"),
        ),
        ("/v1/jobs", json!({"op": "fly"}), Some("op")),
        ("/v1/jobs", json!({"disk": 1}), Some("op")),
        (
            "/v1/jobs",
            json!({"id": "bad id!", "op": "reboot"}),
            Some("id"),
        ),
        (
            "/v1/jobs",
            json!({"op": "script", "script": ""}),
            Some("script"),
        ),
        (
            "/v1/jobs",
            json!({"op": "layout", "disk": 1, "layout": {"table": "gpt", "partitions": [{"number": 1, "type": "linux", "size": "1TiB"}]}}),
            Some("layout"),
        ),
        ("/v1/jobs", json!([1, 2]), None),
        (
            "/CloningEngine/RestaurarImagen",
            json!({"dsk":"1","par":"2","nci":"x","ipr":"127.0.0.1","method":"multicast"}),
            Some("method"),
        ),
        (
            "/CloningEngine/RestaurarImagen",
            json!({"dsk":"1","par":"2","nci":"x"}),
            Some("ipr"),
        ),
        (
            "/CloningEngine/RestaurarImagen",
            json!({"dsk":"3","par":"2","nci":"x","ipr":"127.0.0.1"}),
            Some("dsk"),
        ),
        (
            "/CloningEngine/RestaurarImagen",
            json!({"dsk":"1","par":"2","nci":"x","ipr":"127.0.0.1","ptc":"UNICAST"}),
            Some("ptc"),
        ),
        (
            "/CloningEngine/CrearImagen",
            json!({"dsk":"1","par":"x","nci":"x","ipr":"127.0.0.1"}),
            Some("par"),
        ),
        (
            "/CloningEngine/Configurar",
            json!({"type":"MSDOS","partition_setup":[{"partition":"1","code":"LINUX","size":"99999999999","format":"1","filesystem":"EXT4"}]}),
            Some("partition_setup"),
        ),
        (
            "/CloningEngine/InventarioSoftware",
            json!({"dsk":"1"}),
            Some("par"),
        ),
        (
            "/CloningEngine/EjecutarScript",
            json!({"script":"ls"}),
            Some("script"),
        ),
        (
            "/CloningEngine/Apagar",
            json!({"nfn":"Reiniciar"}),
            Some("nfn"),
        ),
    ];
    for (path, body, field) in cases {
        let (s, v) = api.call(Method::POST, path, Some(body.clone())).await;
        assert_eq!(s, 400, "{path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
        assert_eq!(v["field"].as_str(), field, "{path} {body}: {v}");
    }
    // Not JSON at all.
    let r = api
        .client
        .call(
            Method::POST,
            &format!("{}/v1/jobs", api.base),
            &[("authorization", format!("Bearer {}", api.token))],
            b"{\"op\": ".to_vec(),
        )
        .await
        .expect("call");
    assert_eq!(r.status.as_u16(), 400);
    assert!(String::from_utf8_lossy(&r.body).contains("invalid JSON"));
    let r = api
        .client
        .call(
            Method::POST,
            &format!("{}/v1/jobs", api.base),
            &[
                ("authorization", format!("Bearer {}", api.token)),
                ("content-type", "text/plain".into()),
            ],
            b"{}".to_vec(),
        )
        .await
        .expect("call");
    assert_eq!(r.status.as_u16(), 415);
    // Nothing was accepted.
    let (_, jobs) = api.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(jobs, json!([]));
    // Idempotent ids: same spec → same job; other spec → 409.
    let spec = json!({"id": "inv-1", "op": "hardware_inventory"});
    let (s, a) = api.call(Method::POST, "/v1/jobs", Some(spec.clone())).await;
    assert_eq!(s, 202, "{a}");
    let (s, b) = api.call(Method::POST, "/v1/jobs", Some(spec)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(a["id"], b["id"]);
    assert_eq!(a["created"], b["created"]);
    let (s, c) = api
        .call(
            Method::POST,
            "/v1/jobs",
            Some(json!({"id": "inv-1", "op": "script", "script": "true"})),
        )
        .await;
    assert_eq!(s, 409, "{c}");
    let (s, _) = api.call(Method::GET, "/v1/jobs/nope", None).await;
    assert_eq!(s, 404);
    let (s, _) = api.call(Method::PUT, "/v1/jobs", None).await;
    assert_eq!(s, 405);
    let (_, jobs) = api.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_is_down_for_a_while_still_gets_every_state_change_in_order() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let core = TestCore::start().await;
    let agent = simple_agent(dir.path(), Some(&core)).await;
    let api = Api::new(&agent);
    core.stop().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (s, v) = api
            .call(
                Method::POST,
                "/v1/jobs",
                Some(json!({"op": "script", "script": format!("echo job {i}")})),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        ids.push(v["id"].as_str().expect("id").to_string());
    }
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/InventarioHardware",
            Some(json!({"ids": "77"})),
        )
        .await;
    assert_eq!(s, 200);
    ids.push(r["job_id"].as_str().expect("id").to_string());
    for id in &ids {
        let v = api.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(v["state"], "succeeded", "{v:#}");
    }
    // The agent keeps trying while the core is away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, st) = api.call_with(Method::GET, "/v1/status", None, None).await;
    assert!(
        st["webhooks"]["queued"].as_u64().unwrap_or(0) >= 12,
        "{st:#}"
    );
    assert!(
        st["webhooks"]["failed_attempts"].as_u64().unwrap_or(0) >= 1,
        "{st:#}"
    );
    // Back, but busy for its first two answers.
    core.state
        .fail_next
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let core2 = core.restart().await;
    for id in &ids {
        core2
            .wait_state(id, "succeeded", Duration::from_secs(60))
            .await;
    }
    for id in &ids {
        let hooks = core2.job_hooks(id);
        let states: Vec<&str> = hooks
            .iter()
            .filter(|h| h["event"] == "state")
            .filter_map(|h| h["state"].as_str())
            .collect();
        assert_eq!(
            states,
            ["queued", "running", "succeeded"],
            "{id}: {hooks:#?}"
        );
        let seqs: Vec<u64> = hooks.iter().filter_map(|h| h["seq"].as_u64()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{id}");
    }
    let last = core2.job_hooks(&ids[3]);
    assert_eq!(last[0]["ids"], "77");
    assert!(last[2]["result"]["cpu"]["threads"].as_u64().unwrap_or(0) >= 1);
    for h in core2.hooks() {
        assert!(signed_right(&h, agent.token()));
    }
    agent.shutdown().await;
    core2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_report_output_and_exit_code_and_are_killed_at_their_time_limit() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let agent = simple_agent(dir.path(), None).await;
    let api = Api::new(&agent);
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/EjecutarScript",
            Some(json!({"scp": "echo out; echo err >&2; exit 3", "nfn": "EjecutarScript"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let v = api
        .wait_job(r["job_id"].as_str().expect("id"), Duration::from_secs(20))
        .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["error"]["kind"], "exit_status");
    assert_eq!(v["result"]["exit_code"], 3);
    assert_eq!(v["result"]["stdout"], "out\n");
    assert_eq!(v["result"]["stderr"], "err\n");

    let (_, ok) = api
        .call(
            Method::POST,
            "/v1/jobs",
            Some(json!({"op": "script", "script": "printf ok"})),
        )
        .await;
    let v = api
        .wait_job(ok["id"].as_str().expect("id"), Duration::from_secs(20))
        .await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(v["result"]["stdout"], "ok");

    let started = std::time::Instant::now();
    let (_, slow) = api
        .call(
            Method::POST,
            "/v1/jobs",
            Some(json!({"op": "script", "script": "sleep 30 & sleep 30; echo never", "timeout_s": 1})),
        )
        .await;
    let v = api
        .wait_job(slow["id"].as_str().expect("id"), Duration::from_secs(20))
        .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["error"]["kind"], "timeout");
    assert_eq!(v["result"]["timed_out"], true);
    assert!(started.elapsed() < Duration::from_secs(10));

    // A running script can be cancelled.
    let (_, long) = api
        .call(
            Method::POST,
            "/v1/jobs",
            Some(json!({"op": "script", "script": "sleep 30"})),
        )
        .await;
    let id = long["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _) = api
        .call(Method::DELETE, &format!("/v1/jobs/{id}"), None)
        .await;
    assert_eq!(s, 202);
    let v = api.wait_job(&id, Duration::from_secs(10)).await;
    assert_eq!(v["state"], "cancelled", "{v:#}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apagar_powers_off_after_its_webhook_and_iniciar_sesion_sets_local_boot_with_the_agent_token_then_reboots(
) {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    // The test core plays the boot server too (registration, boot modes).
    let core = TestCore::start().await;
    let disk = target_disk(dir.path());
    let server_url = format!("https://{}", core.addr);
    let agent = start_agent(AgentOpts {
        server: Some((server_url, core.fingerprint.clone())),
        core: Some((core.url(), core.fingerprint.clone())),
        ..AgentOpts::new(dir.path(), vec![(1, disk)])
    })
    .await;
    let api = Api::new(&agent);
    let log = dir.path().join("power.log");
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/Apagar",
            Some(json!({"nfn": "Apagar", "ids": "3"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let id = r["job_id"].as_str().expect("id").to_string();
    assert!(id.starts_with("Apagar-"));
    core.wait_state(&id, "succeeded", Duration::from_secs(20))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("poweroff")
    {
        assert!(std::time::Instant::now() < deadline, "no power-off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The live system, idle: what OpenGnsys' core polls.
    let (s, st) = api.call(Method::GET, "/CloningEngine/status", None).await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["status"], "OPG", "{st}");
    assert_eq!(st["session"], "live", "{st}");
    let (s, r) = api
        .call(
            Method::POST,
            "/CloningEngine/IniciarSesion",
            Some(json!({"dsk": "1", "par": "1"})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let id = r["job_id"].as_str().expect("id").to_string();
    let v = api.wait_job(&id, Duration::from_secs(20)).await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    // Until the reboot, the status says the machine is leaving for its OS.
    let (_, st) = api.call(Method::GET, "/CloningEngine/status", None).await;
    assert_eq!(st["session"], "booting-os", "{st}");
    assert_eq!(st["status"], "BSY", "{st}");
    assert_eq!(st["os"]["disk"], 1, "{st}");
    let boots = core.state.boots.lock().expect("boots").clone();
    assert_eq!(boots.len(), 1);
    assert_eq!(boots[0].0, format!("/v1/clients/{MAC}/boot"));
    assert_eq!(boots[0].1, format!("Bearer {}", agent.token()));
    assert_eq!(boots[0].2, json!({"mode": "local", "once": true}));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reboot")
    {
        assert!(std::time::Instant::now() < deadline, "no reboot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, st) = api.call_with(Method::GET, "/v1/status", None, None).await;
    assert_eq!(
        st["power"]["actions"].as_array().map(Vec::len),
        Some(2),
        "{st:#}"
    );
    assert_eq!(st["registration"]["registered"], true, "{st:#}");
    agent.shutdown().await;
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_reports_cpu_memory_firmware_nics_and_the_mapped_disks() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let agent = simple_agent(dir.path(), None).await;
    let api = Api::new(&agent);
    let (s, v) = api.call(Method::GET, "/v1/inventory", None).await;
    assert_eq!(s, 200, "{v}");
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert_eq!(v["cpu"]["threads"].as_u64(), Some(threads as u64), "{v:#}");
    assert!(v["memory"]["total_bytes"].as_u64().unwrap_or(0) > 64 << 20);
    let fw = v["firmware"]["type"].as_str().unwrap_or("");
    assert!(fw == "bios" || fw == "uefi", "{v:#}");
    // Every NIC of the machine, with its MAC from sysfs.
    for e in std::fs::read_dir("/sys/class/net").expect("net").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let mac = std::fs::read_to_string(e.path().join("address")).expect("mac");
        let nic = v["nics"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["name"] == name.as_str()))
            .unwrap_or_else(|| panic!("{name} missing: {v:#}"));
        assert_eq!(nic["mac"], mac.trim());
    }
    let disks = v["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0]["dsk"], 1);
    assert_eq!(disks[0]["size"], 160 * MIB);
    let parts: Vec<u64> = disks[0]["partitions"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|p| p["number"].as_u64())
        .collect();
    assert_eq!(parts, [1, 2, 4]);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_and_nothing_else() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let agent = simple_agent(dir.path(), None).await;
    let api = Api::new(&agent);
    let (s, doc) = api.call(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (p, ops) in paths {
        for m in ops.as_object().expect("ops").keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&m.as_str()) {
                documented.push((m.to_uppercase(), p.clone()));
            }
        }
    }
    let mut routes: Vec<(String, String)> = aula_agent::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    routes.sort();
    assert_eq!(documented, routes);
    // Every op of the native API is in the job schema.
    let text = doc.to_string();
    for op in aula_agent::spec::OPS {
        assert!(text.contains(&format!("\"{op}\"")), "{op} undocumented");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_the_kernel_command_line_registers_stops_on_sigterm_and_registers_again_after_a_restart(
) {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let disk = target_disk(dir.path());
    let mac = "52:54:00:cc:dd:02";
    let nonce = server.live_boot(mac).await;
    let state = dir.path().join("run-aula-agent");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n[listen]\naddress = \"127.0.0.1\"\nport = 0\n[power]\nmode = \"dry-run\"\n[disks]\n1 = \"{}\"\n",
            state.display(),
            disk.display()
        ),
    )
    .expect("config");
    let cmdline = dir.path().join("cmdline");
    std::fs::write(
        &cmdline,
        format!(
            "BOOT_IMAGE=vmlinuz initrd=initrd.gz BOOTIF=01-52-54-00-cc-dd-02 aula.server={} aula.server_fp={} aula.boot={nonce} quiet\n",
            server.url(),
            server.fingerprint
        ),
    )
    .expect("cmdline");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_aula-agent"))
            .arg("--config")
            .arg(&cfg)
            .arg("--cmdline")
            .arg(&cmdline)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let stop = |mut child: std::process::Child| async move {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("kill");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status}");
    };
    let registered = |port_before: Option<u64>| {
        let server = &server;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let a = server.agents().await;
                if let Some(r) = a.as_array().and_then(|l| {
                    l.iter()
                        .find(|r| r["macs"][0] == mac && r["port"].as_u64() != port_before)
                }) {
                    break r.clone();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "never registered: {a}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let child = spawn();
    let reg = registered(None).await;
    // What the registry holds is enough to reach and trust the agent.
    let port = reg["port"].as_u64().expect("port") as u16;
    let api = Api::with(
        ([127, 0, 0, 1], port).into(),
        reg["cert_fingerprint"].as_str().expect("fp"),
        reg["token"].as_str().expect("token"),
        Duration::from_secs(10),
    );
    let (s, v) = api.call(Method::GET, "/v1/jobs", None).await;
    assert_eq!(s, 200, "{v}");
    // The server stores the registration before the agent reads its answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, st) = api.call_with(Method::GET, "/v1/status", None, None).await;
        if st["registration"]["registered"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The boot's identity is kept privately for a restart.
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions())
            & 0o777
    };
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("identity.json")), 0o600);
    stop(child).await;

    // Restarted in the same boot (the supervisor does that), it registers
    // again as the same agent: same token and certificate, from the same
    // address; the machine stays bound to it.
    let child = spawn();
    let again = registered(Some(port.into())).await;
    assert_eq!(again["token"], reg["token"]);
    assert_eq!(again["cert_fingerprint"], reg["cert_fingerprint"]);
    let api = Api::with(
        ([127, 0, 0, 1], again["port"].as_u64().expect("port") as u16).into(),
        reg["cert_fingerprint"].as_str().expect("fp"),
        reg["token"].as_str().expect("token"),
        Duration::from_secs(10),
    );
    // The server stores the registration before the agent reads its answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, st) = api.call_with(Method::GET, "/v1/status", None, None).await;
        if st["registration"]["registered"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(child).await;
    server.stop().await;
}
