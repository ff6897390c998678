//! Trust on every hop, from the agent's side (issue 12): where credentials
//! go, plain HTTP refused when the server is pinned, the read token handed
//! over at registration, capture grants, the CACHE partition as an
//! untrusted source, and OpenGnsys' core as it really calls.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until the agent says it registered (it then holds what the
/// registration answered).
async fn wait_agent_registered(agent: &aula_agent::Agent) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !agent.ctx.registration.get().registered {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `server` lists the agent of `MAC`.
async fn wait_registered(server: &BootServer) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = server.agents().await;
        if let Some(r) = a
            .as_array()
            .and_then(|l| l.iter().find(|r| r["macs"][0] == MAC))
        {
            return r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never registered: {a}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_job(api: &Api, path: &str, body: Value) -> Value {
    let (s, r) = api.call(Method::POST, path, Some(body)).await;
    assert!(s == 200 || s == 202, "{path}: {s} {r}");
    let id = r["job_id"]
        .as_str()
        .or(r["id"].as_str())
        .expect("job id")
        .to_string();
    api.wait_job(&id, Duration::from_secs(60)).await
}

/// Issue 12, point 4: the repository write token (and the agent's own
/// token) never go to a host a job names; only to the configured
/// repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_goes_to_a_repository_host_a_job_names() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let sdir = dir.path().join("server");
    let server = BootServer::start(&sdir, API_TOKEN).await;
    // Another host of the lab presenting a certificate the agent trusts
    // (here the very same one): it records every request.
    let foreign = TestCore::start_as(
        BootServer::pem_pair(&sdir),
        "127.0.0.2:0".parse().expect("addr"),
    )
    .await;
    let target = target_disk(dir.path());
    fill(&target, 1, &[("f.txt", b"data".to_vec())]);
    let agent = start_agent(AgentOpts {
        server: Some((server.url(), server.fingerprint.clone())),
        boot: Some(server.live_boot(MAC).await),
        // Repositories named by ipr: https://<ipr>:<the foreign port>.
        repo_port: foreign.addr.port(),
        repo_extra: &format!("fingerprint = \"{}\"", server.fingerprint),
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())])
    })
    .await;
    wait_registered(&server).await;
    let api = Api::new(&agent);
    let v = run_job(
        &api,
        "/CloningEngine/CrearImagen",
        json!({"dsk":"1","par":"1","nci":"stolen","ipr":"127.0.0.2"}),
    )
    .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    let v = run_job(
        &api,
        "/CloningEngine/RestaurarImagen",
        json!({"dsk":"1","par":"2","nci":"stolen","ipr":"127.0.0.2"}),
    )
    .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    let v = run_job(
        &api,
        "/v1/jobs",
        json!({"op":"create","disk":1,"partition":1,"image":"stolen",
            "repository": format!("https://127.0.0.2:{}", foreign.addr.port())}),
    )
    .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    let seen = foreign.state.requests.lock().expect("requests").clone();
    assert!(!seen.is_empty(), "the jobs never reached the foreign host");
    for (method, path, auth) in &seen {
        assert!(
            auth.is_empty(),
            "{method} {path} carried Authorization: {auth:?} to a host a job named"
        );
    }
    // The configured repository (the server) still gets its token: the
    // same capture to ipr = the server's host succeeds.
    let v = run_job(
        &api,
        "/CloningEngine/CrearImagen",
        json!({"dsk":"1","par":"1","nci":"kept","ipr":"127.0.0.1"}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(
        v["result"]["repository"],
        server.url(),
        "ipr = the server's host takes its scheme and port"
    );
    agent.shutdown().await;
    foreign.stop().await;
    server.stop().await;
}

/// Issue 12, point 3: an agent that pins the server refuses plain-HTTP
/// repositories unless the job asks for one, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_agent_refuses_a_plain_http_repository_unless_the_job_allows_it() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    // A repository served over plain HTTP (HTTPS turned off there).
    let plain = BootServer::start_with(&dir.path().join("plain"), API_TOKEN, "", false).await;
    let (src, files) = source_disk(dir.path(), 2);
    let url = format!("http://{}", plain.http);
    {
        let url = url.clone();
        let src = src.clone();
        tokio::task::spawn_blocking(move || {
            let repo = aula_imager::repo::HttpRepo::new(
                &url,
                aula_imager::repo::HttpOptions {
                    token: Some(REPO_TOKEN.into()),
                    ..Default::default()
                },
            )
            .expect("client");
            let dev = aula_imager::device::Device::open_read(&src).expect("open");
            aula_imager::image::create_image(
                "plain",
                Arc::new(dev),
                Some(1),
                &repo,
                &Default::default(),
                &aula_imager::progress::Progress::new(),
            )
            .expect("upload over http")
        })
        .await
        .expect("thread");
    }
    let target = target_disk(dir.path());
    let agent = start_agent(AgentOpts {
        server: Some((server.url(), server.fingerprint.clone())),
        boot: Some(server.live_boot(MAC).await),
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())])
    })
    .await;
    let api = Api::new(&agent);
    let v = run_job(
        &api,
        "/v1/jobs",
        json!({"op":"restore","disk":1,"partition":2,"image":"plain","repository": url}),
    )
    .await;
    assert_eq!(v["state"], "failed", "{v:#}");
    assert_eq!(v["error"]["kind"], "insecure_repository", "{v:#}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("allow_http"), "the error says how: {msg}");
    assert!(
        v["error"]["disk_state"]
            .as_str()
            .is_some_and(|s| s.starts_with("unchanged")),
        "{v:#}"
    );
    let v = run_job(
        &api,
        "/v1/jobs",
        json!({"op":"restore","disk":1,"partition":2,"image":"plain","repository": url, "allow_http": true}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    agent.shutdown().await;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&target, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n} differs");
    }
    plain.stop().await;
    server.stop().await;
}

/// Issue 12, point 9 and point 2 end to end: a repository with a read
/// token; the agent gets the token at registration (over the pinned TLS)
/// and restores with it; with a capture grant it uploads and publishes
/// the granted image with its upload token, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_comes_with_the_registration_and_a_capture_grant_publishes_one_image() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start_with(
        &dir.path().join("server"),
        API_TOKEN,
        "read_token = \"repo-read-token-0123456789\"",
        true,
    )
    .await;
    let (src, files) = source_disk(dir.path(), 2);
    upload(&server, &src, Some(1), "lab").await;
    let target = target_disk(dir.path());
    fill(
        &target,
        1,
        &[("captured.txt", b"from the lab machine\n".to_vec())],
    );
    let agent = start_agent(AgentOpts {
        server: Some((server.url(), server.fingerprint.clone())),
        boot: Some(server.live_boot(MAC).await),
        // No repository secret on the machine at all.
        write_token: None,
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())])
    })
    .await;
    wait_registered(&server).await;
    wait_agent_registered(&agent).await;
    let api = Api::new(&agent);
    let v = run_job(
        &api,
        "/CloningEngine/RestaurarImagen",
        json!({"dsk":"1","par":"2","nci":"lab","ipr":"127.0.0.1"}),
    )
    .await;
    assert_eq!(
        v["state"], "succeeded",
        "restore with the read token: {v:#}"
    );

    // Capture: refused without a grant, allowed for the granted name only.
    let capture = |nci: &str| json!({"dsk":"1","par":"1","nci": nci,"ipr":"127.0.0.1"});
    let v = run_job(&api, "/CloningEngine/CrearImagen", capture("pc-image")).await;
    assert_eq!(v["state"], "failed", "{v:#}");
    let (s, r) = server
        .api(
            Method::PUT,
            &format!("/v1/clients/{MAC}/capture"),
            Some(json!({"image": "pc-image", "minutes": 10})),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let v = run_job(&api, "/CloningEngine/CrearImagen", capture("lab")).await;
    assert_eq!(
        v["state"], "failed",
        "the grant overwrote another image: {v:#}"
    );
    let v = run_job(&api, "/CloningEngine/CrearImagen", capture("pc-image")).await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    // Reads need a token; the grant published exactly one new image.
    let (s, list) = server.anonymous("/v1/images").await;
    assert_eq!(s, 401, "reads need the read token: {list}");
    let (s, list) = server.api(Method::GET, "/v1/images", None).await;
    assert_eq!(s, 200, "{list}");
    let mut names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["lab", "pc-image"], "{list}");
    let v = run_job(
        &api,
        "/v1/jobs",
        json!({"op":"restore","disk":1,"partition":2,"image":"pc-image"}),
    )
    .await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    agent.shutdown().await;
    let got = read_files(&target, 2, &["captured.txt"]);
    assert_eq!(got["captured.txt"], b"from the lab machine\n");
    let _ = files;
    server.stop().await;
}

/// Issue 12, point 6: a manifest planted in the CACHE partition (whatever
/// else boots on the machine can write it) is not used when the repository
/// cannot be reached, unless it was confirmed by the repository in this
/// boot or the job asks for offline mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_planted_in_the_cache_partition_is_ignored() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    // The lab's image on the server.
    let (src, files) = source_disk(dir.path(), 2);
    upload(&server, &src, Some(1), "lab").await;
    // The student's system, as an image of the same name, planted in the
    // CACHE partition with its chunks.
    let evil_src = dir.path().join("evil.img");
    make_disk(
        &evil_src,
        64,
        json!({"table": "mbr", "partitions": [
            {"number": 1, "type": "linux", "size": "48MiB", "filesystem": "ext4"}]}),
    );
    fill(
        &evil_src,
        1,
        &[("hello.txt", b"the student's system\n".to_vec())],
    );
    let target = target_disk(dir.path());
    with_mounted(&target, 4, false, |cache| {
        let local =
            aula_imager::repo::LocalRepo::open(&cache.join("aula"), true).expect("cache repo");
        let dev = aula_imager::device::Device::open_read(&evil_src).expect("open");
        aula_imager::image::create_image(
            "lab",
            Arc::new(dev),
            Some(1),
            &local,
            &Default::default(),
            &aula_imager::progress::Progress::new(),
        )
        .expect("plant");
    });
    // The repository cannot be reached: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let agent = start_agent(AgentOpts {
        repo_extra: "retry_s = 1",
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, dead_port)
    })
    .await;
    let api = Api::new(&agent);
    let restore = |extra: Value| {
        let mut b =
            json!({"op":"restore","disk":1,"partition":2,"image":"lab","method":"unicast-cache"});
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b
    };
    let v = run_job(&api, "/v1/jobs", restore(json!({}))).await;
    assert_eq!(v["state"], "failed", "the planted manifest was used: {v:#}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("never confirmed")),
        "{v:#}"
    );
    assert!(
        v["error"]["disk_state"]
            .as_str()
            .is_some_and(|s| s.starts_with("unchanged")),
        "{v:#}"
    );
    // With the repository up, the same boot confirms the lab's manifest
    // (and the cache is filled with the lab's chunks)...
    let up = start_agent(AgentOpts {
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, server.https.port())
    })
    .await;
    agent.shutdown().await;
    let api_up = Api::new(&up);
    let v = run_job(&api_up, "/v1/jobs", restore(json!({}))).await;
    assert_eq!(v["state"], "succeeded", "{v:#}");
    up.shutdown().await;
    // ...so with the repository gone again, the cached copy of the
    // confirmed manifest serves a restore.
    let agent = start_agent(AgentOpts {
        repo_extra: "retry_s = 1",
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())]).repo(&server, dead_port)
    })
    .await;
    let api = Api::new(&agent);
    let v = run_job(&api, "/v1/jobs", restore(json!({}))).await;
    assert_eq!(v["state"], "succeeded", "confirmed in this boot: {v:#}");
    agent.shutdown().await;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&target, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n}: not the lab's image");
    }
    // Offline mode, asked for explicitly, is the operator's choice.
    let (s, r) = api_up_offline_check(&dir, &target, &server, dead_port).await;
    assert_eq!(s, "succeeded", "{r:#}");
    server.stop().await;
}

/// An agent in a fresh boot (no confirmations) asked for offline mode
/// restores from the cache: (state, job).
async fn api_up_offline_check(
    dir: &tempfile::TempDir,
    target: &std::path::Path,
    server: &BootServer,
    dead_port: u16,
) -> (String, Value) {
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).expect("dir");
    let agent = start_agent(AgentOpts {
        repo_extra: "retry_s = 1",
        ..AgentOpts::new(&fresh, vec![(1, target.to_path_buf())]).repo(server, dead_port)
    })
    .await;
    let api = Api::new(&agent);
    let v = run_job(
        &api,
        "/v1/jobs",
        json!({"op":"restore","disk":1,"partition":2,"image":"lab","method":"unicast-cache","offline":true}),
    )
    .await;
    agent.shutdown().await;
    (v["state"].as_str().unwrap_or("").to_string(), v)
}

/// ogCore's documented call (research notes, shared/research/opengnsys.md
/// §1.1; JSON as documented), sent the way its curl line sends it: the key
/// without a scheme in `Authorization`, no `Content-Type` (and, as
/// `curl -d` really does, form-urlencoded): the restore starts and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ogcores_documented_restaurar_imagen_call_starts_a_restore_that_succeeds() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let (src, files) = source_disk(dir.path(), 2);
    upload(&server, &src, Some(1), "image-test").await;
    let target = target_disk(dir.path());
    let agent = start_agent(AgentOpts {
        server: Some((server.url(), server.fingerprint.clone())),
        boot: Some(server.live_boot(MAC).await),
        ..AgentOpts::new(dir.path(), vec![(1, target.clone())])
    })
    .await;
    wait_registered(&server).await;
    let body = r#"{"dsk":"1","par":"2","cpt":"83","ifs":"1","idi":"9d1c0e6a-5cf2-4c2f-a3b0-6a5e9b0f1c2d","nci":"image-test","ipr":"127.0.0.1","nfn":"RestaurarImagen","method":"unicast","ids":"0"}"#;
    let raw = |content_type: Option<&'static str>, path: &'static str, body: &'static str| {
        let token = agent.token().to_string();
        let fp = agent.fingerprint().to_string();
        let addr = agent.addr;
        async move {
            let pin = aula_imager::tls::parse_fingerprint(&fp).expect("fp");
            let cfg = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin))
                .expect("cfg");
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("aula-agent").expect("name");
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .expect("tls");
            let ct = content_type
                .map(|c| format!("Content-Type: {c}\r\n"))
                .unwrap_or_default();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: client\r\nAuthorization: {token}\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(head.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            let text = String::from_utf8_lossy(&out).into_owned();
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let json = text
                .split("\r\n\r\n")
                .nth(1)
                .and_then(|b| serde_json::from_str::<Value>(b.trim()).ok())
                .unwrap_or(Value::Null);
            (status, json)
        }
    };
    let api = Api::new(&agent);
    for ct in [None, Some("application/x-www-form-urlencoded")] {
        let (status, r) = raw(ct, "/CloningEngine/RestaurarImagen", body).await;
        assert_eq!(status, 200, "{ct:?}: {r}");
        let job = r["job_id"].as_str().expect("job_id").to_string();
        assert!(job.starts_with("RestaurarImagen-"), "{job}");
        let v = api.wait_job(&job, Duration::from_secs(60)).await;
        assert_eq!(v["state"], "succeeded", "{ct:?}: {v:#}");
        assert_eq!(v["result"]["repository"], server.url());
    }
    // Anything that is not JSON is refused, whatever the content type says.
    let (status, r) = raw(None, "/CloningEngine/RestaurarImagen", "dsk=1&par=2").await;
    assert_eq!(status, 400, "{r}");
    let (status, r) = raw(
        Some("application/xml"),
        "/CloningEngine/RestaurarImagen",
        body,
    )
    .await;
    assert_eq!(status, 415, "{r}");
    agent.shutdown().await;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let got = read_files(&target, 2, &names);
    for (n, data) in &files {
        assert!(got[*n] == *data, "{n} differs");
    }
    server.stop().await;
}
