//! The swarm coordinator over loopback HTTP: joining needs a member's
//! credential (agent, API, repository read or write token; not a viewer's,
//! not none), a member's key works only for the principal that joined,
//! the status is for the API and viewer tokens, members are listed at the address they came
//! from, bad requests get clear errors and change nothing, work goes from
//! the server first and then from the member that holds it, reports of
//! several members ban a source, leaving forgets a member.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use aula_bootserver::repository::{RepoConfig, RepoRoutes, RepoService};
use aula_bootserver::swarm::{Coordinator, SwarmRoutes};
use aula_imager::create::{create_partition, CreateOptions, SourceInfo};
use aula_imager::device::{Device, Region};
use aula_imager::progress::Progress;
use aula_imager::repo::LocalRepo;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const READ: &str = "repository-read-token-0123";
const WRITE: &str = "repository-write-token-0123";
const API: &str = "api-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";

struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    chunks: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A repository holding image `img` (8 chunks), a read token, and the
    /// coordinator in front, as `[repository]` mounts them.
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("repo");
        let src = dir.path().join("src.img");
        let mut data = vec![0u8; 8 << 16];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u64).wrapping_mul(2_654_435_761).to_le_bytes()[3];
        }
        std::fs::write(&src, &data).expect("source");
        let local = LocalRepo::open(&root, true).expect("repo");
        let dev = Arc::new(Device::open_read(&src).expect("open"));
        let m = create_partition(
            "img",
            &Region::whole(dev),
            &SourceInfo {
                sector_size: 512,
                partition_type: None,
            },
            &local,
            &CreateOptions {
                chunk_size: 64 << 10,
                raw: true,
                ..Default::default()
            },
            &Progress::new(),
        )
        .expect("create");
        let chunks: Vec<String> = m.unique_chunks().iter().map(|(id, _)| id.hex()).collect();
        assert_eq!(chunks.len(), 8);
        let mut cfg = RepoConfig::new(root);
        cfg.read_token = Some(READ.into());
        let auth = Arc::new(aula_bootserver::auth::Auth::new(
            aula_bootserver::auth::Secrets {
                api: Some(API.into()),
                viewer: Some(VIEWER.into()),
                repo_write: Some(WRITE.into()),
                repo_read: Some(READ.into()),
            },
            None,
        ));
        let svc = Arc::new(
            RepoService::open(cfg)
                .expect("service")
                .with_auth(auth.clone()),
        );
        let stop = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let tracker = tokio_util::task::TaskTracker::new();
                let groups: Vec<Arc<dyn aula_bootserver::http::RouteGroup>> = vec![
                    Arc::new(SwarmRoutes(Arc::new(Coordinator::new(
                        svc.clone(),
                        auth,
                        Default::default(),
                    )))),
                    Arc::new(RepoRoutes(svc)),
                ];
                let addr = aula_bootserver::http::start(
                    "127.0.0.1:0".parse().expect("addr"),
                    None,
                    groups,
                    64,
                    stop2.clone(),
                    &tracker,
                )
                .await
                .expect("http");
                tx.send(addr).expect("send addr");
                stop2.cancelled().await;
                tracker.close();
                tracker.wait().await;
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).expect("started");
        Server {
            addr,
            stop,
            thread: Some(thread),
            chunks,
            _dir: dir,
        }
    }

    /// One request; (status, JSON body).
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(READ), &body.to_string())
    }

    fn join(&self, port: u16) -> Value {
        let (s, v) = self.post(
            "/v1/swarm/join",
            json!({"image": "img", "version": 1, "port": port, "slots": 2}),
        );
        assert_eq!(s, 200, "{v}");
        v
    }

    fn status(&self) -> Value {
        let (s, v) = self.call("GET", "/v1/swarm", Some(VIEWER), "");
        assert_eq!(s, 200, "{v}");
        v
    }

    fn member(&self, id: &Value) -> Value {
        self.status()["sessions"][0]["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|m| m["member"] == *id)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn joining_needs_a_member_credential_keys_stay_with_their_principal_and_bad_requests_change_nothing(
) {
    let srv = Server::start();
    let body = json!({"image": "img", "version": 1, "port": 7000}).to_string();
    let (s, v) = srv.call("POST", "/v1/swarm/join", None, &body);
    assert_eq!(s, 401, "{v}");
    let (s, _) = srv.call("POST", "/v1/swarm/join", Some("wrong"), &body);
    assert_eq!(s, 401);
    // A viewer reads the lab but is no member.
    let (s, v) = srv.call("POST", "/v1/swarm/join", Some(VIEWER), &body);
    assert_eq!(s, 403, "{v}");
    // The status (members' addresses) is the operator's, not a reader's.
    let (s, _) = srv.call("GET", "/v1/swarm", None, "");
    assert_eq!(s, 401);
    let (s, _) = srv.call("GET", "/v1/swarm", Some(READ), "");
    assert_eq!(s, 403);
    let (s, _) = srv.call("GET", "/v1/swarm", Some(API), "");
    assert_eq!(s, 200);
    for (bad, want) in [
        (json!({"image": "nope", "version": 1}), 404),
        (json!({"image": "img", "version": 9}), 404),
        (json!({"image": "../etc", "version": 1}), 400),
        (json!({"image": "img", "version": 1, "colour": "red"}), 400),
        (json!({"image": "img"}), 400),
    ] {
        let (s, v) = srv.post("/v1/swarm/join", bad.clone());
        assert_eq!(s, want, "{bad}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let (s, _) = srv.call("POST", "/v1/swarm/join", Some(READ), "{not json");
    assert_eq!(s, 400);
    assert_eq!(srv.status()["sessions"].as_array().map(Vec::len), Some(0));

    let j = srv.join(7000);
    assert_eq!(j["session"], "img@1");
    assert_eq!(j["token"].as_str().map(str::len), Some(64));
    assert_ne!(j["key"], j["token"]);
    // Listed at the address the join came from, with the port it named.
    let m = srv.member(&j["member"]);
    assert_eq!(m["addr"], "127.0.0.1:7000", "{m}");
    // A sync needs the member's key (not its public id, not the token).
    for key in [j["member"].clone(), j["token"].clone(), json!("x")] {
        let (s, v) = srv.post("/v1/swarm/sync", json!({"key": key, "ask": 1}));
        assert_eq!(s, 404, "{v}");
    }
    let (s, v) = srv.post(
        "/v1/swarm/sync",
        json!({"key": j["key"], "want": ["zz"], "ask": 1}),
    );
    assert_eq!(s, 400, "{v}");
    // The key works only for the principal that joined: another
    // credential can neither announce, ask nor leave with it.
    let all: Vec<Value> = srv.chunks.iter().map(|h| json!(h)).collect();
    for other in [WRITE, API] {
        let sync = json!({"key": j["key"], "have": all, "ask": 1}).to_string();
        let (s, v) = srv.call("POST", "/v1/swarm/sync", Some(other), &sync);
        assert_eq!(s, 403, "{v}");
        let leave = json!({"key": j["key"]}).to_string();
        let (s, v) = srv.call("POST", "/v1/swarm/leave", Some(other), &leave);
        assert_eq!(s, 403, "{v}");
    }
    let (s, _) = srv.call(
        "POST",
        "/v1/swarm/sync",
        None,
        &json!({"key": j["key"]}).to_string(),
    );
    assert_eq!(s, 401);
    let m = srv.member(&j["member"]);
    assert_eq!(
        (m["holds"].as_u64(), m["downloads"].as_u64()),
        (Some(0), Some(0)),
        "{m}"
    );
    // The writer joins as a member of its own.
    let (s, w) = srv.call("POST", "/v1/swarm/join", Some(WRITE), &body);
    assert_eq!(s, 200, "{w}");
    let (s, _) = srv.call(
        "POST",
        "/v1/swarm/leave",
        Some(WRITE),
        &json!({"key": w["key"]}).to_string(),
    );
    assert_eq!(s, 200);
}

#[test]
fn work_goes_from_the_server_first_then_from_the_holder_and_reported_sources_are_banned() {
    let srv = Server::start();
    let a = srv.join(7001);
    let b = srv.join(7002);
    let c = srv.join(7003);
    let all: Vec<Value> = srv.chunks.iter().map(|h| json!(h)).collect();
    // a wants everything: its first chunks come from the server.
    let (s, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "want": all, "ask": 1}),
    );
    assert_eq!(s, 200, "{r}");
    let first = r["assign"][0].clone();
    assert_eq!(first["from"], "server", "{r}");
    // a reports it done: it now holds and serves it.
    let (s, _) = srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "done": [{"id": first["id"], "from": "server", "bytes": 1000}]}),
    );
    assert_eq!(s, 200);
    // b wants only that chunk: it gets it from a, at a's address.
    let (s, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": b["key"], "want": [first["id"]], "ask": 1, "wait_ms": 100}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["assign"][0]["from"], a["member"], "{r}");
    assert_eq!(r["assign"][0]["addr"], "127.0.0.1:7001", "{r}");
    assert_eq!(srv.member(&a["member"])["uploads"], 1);
    // b says a served garbage: b stops getting a, a is not banned yet.
    let (s, _) = srv.post(
        "/v1/swarm/sync",
        json!({"key": b["key"], "failed": [{"id": first["id"], "from": a["member"], "why": "corrupt"}]}),
    );
    assert_eq!(s, 200);
    let am = srv.member(&a["member"]);
    assert_eq!(
        (
            am["uploads"].as_u64(),
            am["reports"].as_u64(),
            am["banned"].as_bool()
        ),
        (Some(0), Some(1), Some(false)),
        "{am}"
    );
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": b["key"], "ask": 1, "wait_ms": 100}),
    );
    assert_ne!(r["assign"][0]["from"], a["member"], "{r}");
    // A second member's report bans a.
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": c["key"], "want": [first["id"]], "ask": 1, "wait_ms": 100}),
    );
    assert_eq!(r["assign"][0]["from"], a["member"], "{r}");
    srv.post(
        "/v1/swarm/sync",
        json!({"key": c["key"], "failed": [{"id": first["id"], "from": a["member"], "why": "timeout"}]}),
    );
    assert_eq!(srv.member(&a["member"])["banned"], true);
    // Busy is not held against a source.
    assert_eq!(srv.member(&b["member"])["reports"], 0);
    srv.post(
        "/v1/swarm/sync",
        json!({"key": c["key"], "failed": [{"id": first["id"], "from": b["member"], "why": "busy"}]}),
    );
    assert_eq!(srv.member(&b["member"])["reports"], 0);
    // Leaving forgets the member.
    let (s, _) = srv.post("/v1/swarm/leave", json!({"key": a["key"]}));
    assert_eq!(s, 200);
    assert_eq!(srv.member(&a["member"]), Value::Null);
    let (s, _) = srv.post("/v1/swarm/leave", json!({"key": a["key"]}));
    assert_eq!(s, 404);
    // The bytes members reported.
    assert_eq!(srv.status()["sessions"][0]["bytes_from_server"], 1000);
}

#[test]
fn a_member_with_nothing_unassigned_is_answered_at_once_and_an_arrived_chunk_is_not_sent_again() {
    let srv = Server::start();
    let a = srv.join(7001);
    let b = srv.join(7002);
    let c0 = json!(srv.chunks[0]);
    // a wants one chunk (a held window at the end of a restore): the
    // server sends it.
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "want": [c0], "ask": 1}),
    );
    assert_eq!(r["assign"][0]["from"], "server", "{r}");
    // Another of a's fetch slots asks too: everything a needs is assigned,
    // so it is answered at once, not after the whole long poll (a restore
    // waited for that worker ~2 s at its end).
    let t0 = std::time::Instant::now();
    let (s, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "ask": 1, "wait_ms": 4000}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["assign"], json!([]), "{r}");
    assert_eq!(r["pending"], 0, "{r}");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "answered after {:?}",
        t0.elapsed()
    );
    // All of it arrived at a, which verifies and writes it: the server's
    // slot is free, but b, wanting the same chunk, waits for a instead of
    // getting a second copy from the server.
    srv.post("/v1/swarm/sync", json!({"key": a["key"], "received": [c0]}));
    let t0 = std::time::Instant::now();
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": b["key"], "want": [c0], "ask": 1, "wait_ms": 300}),
    );
    assert_eq!(r["assign"], json!([]), "b got {r}");
    assert!(t0.elapsed() >= Duration::from_millis(250), "b must wait");
    // a reports it done: b takes it from a.
    srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "done": [{"id": c0, "from": "server", "bytes": 1000}]}),
    );
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": b["key"], "ask": 1, "wait_ms": 300}),
    );
    assert_eq!(r["assign"][0]["from"], a["member"], "{r}");
    assert_eq!(srv.status()["sessions"][0]["bytes_from_server"], 1000);
    // A chunk a member wants again is one it no longer holds, whatever it
    // reported before (else its want was ignored and it waited for work
    // that never came): nobody is sent to a for it any more, and once b's
    // fetch from a ended (a no longer had it), a gets it.
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "want": [c0], "ask": 1, "wait_ms": 100}),
    );
    assert_eq!(r["assign"], json!([]), "b's fetch is still in flight: {r}");
    assert_eq!(srv.member(&a["member"])["holds"], 0);
    srv.post(
        "/v1/swarm/sync",
        json!({"key": b["key"], "failed": [{"id": c0, "from": a["member"], "why": "refused"}]}),
    );
    let (_, r) = srv.post(
        "/v1/swarm/sync",
        json!({"key": a["key"], "ask": 1, "wait_ms": 300}),
    );
    assert_eq!(r["assign"][0]["id"], c0, "{r}");
}
