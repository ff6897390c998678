//! A deployment follows its machine's job by the agent's signed webhooks as
//! they arrive, and by polling only as the fallback.
//!
//! The machine is a scripted agent on loopback (HTTPS with its own
//! certificate, registered in the window its live boot opened, with the
//! nonce) whose job API answers stale: every `GET /v1/jobs/{id}` says
//! "running, nothing done, no event yet". What the console shows can then
//! only have come from the webhooks the test signs and posts to the real
//! `aula-bootserver` binary; the last step sends no webhook at all and the
//! poll alone finishes the machine.

mod deploy_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aula_bootserver::http::{
    self as bhttp, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use bytes::Bytes;
use deploy_support::*;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

const MAC: &str = "52:54:00:e1:00:01";
const TOKEN: &str = "scripted-agent-token-0123456789";
const MIB: u64 = 1 << 20;

/// What the scripted agent answers and what it was asked.
#[derive(Default)]
struct AgentState {
    /// Jobs posted, by id, with the view `GET /v1/jobs/{id}` answers.
    jobs: BTreeMap<String, Value>,
    polls: usize,
}

struct ScriptedAgent(Arc<Mutex<AgentState>>);

impl ScriptedAgent {
    async fn route(&self, req: HttpRequest) -> (StatusCode, Value) {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let path = req.uri().path().to_owned();
        if path != "/v1/status" && auth != format!("Bearer {TOKEN}") {
            return (StatusCode::UNAUTHORIZED, json!({"error": "token"}));
        }
        let method = req.method().clone();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut st = self.0.lock().expect("state");
        match (method, path.as_str()) {
            (Method::GET, "/v1/status") => (StatusCode::OK, json!({"service": "aula-agent"})),
            (Method::POST, "/v1/jobs") => {
                let spec: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let id = spec["id"].as_str().unwrap_or("").to_owned();
                let view = st.jobs.entry(id.clone()).or_insert_with(|| {
                    // Stale forever unless the test changes it.
                    json!({"id": id, "op": spec["op"], "state": "running", "seq": 0,
                           "progress": {"bytes_done": 0, "bytes_total": 40 * MIB, "rate_bps": 0.0}})
                });
                (StatusCode::ACCEPTED, view.clone())
            }
            (Method::GET, p) if p.starts_with("/v1/jobs/") => {
                st.polls += 1;
                match st.jobs.get(&p["/v1/jobs/".len()..]) {
                    Some(v) => (StatusCode::OK, v.clone()),
                    None => (StatusCode::NOT_FOUND, json!({"error": "no such job"})),
                }
            }
            (Method::DELETE, _) => (StatusCode::OK, json!({})),
            _ => (StatusCode::NOT_FOUND, json!({"error": "no route"})),
        }
    }
}

impl RouteGroup for ScriptedAgent {
    fn name(&self) -> &'static str {
        "scripted-agent"
    }
    fn matches(&self, _: &str) -> bool {
        true
    }
    fn handle(&self, req: HttpRequest, _: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            let (s, v) = self.route(req).await;
            bhttp::json(s, &v)
        })
    }
}

/// A signed webhook of `job` to the server, as the agent sends it.
async fn webhook(server: &ServerProc, job: &str, seq: u64, state: &str, progress: Option<Value>) {
    let mut ev = json!({
        "agent": {"mac": MAC, "ip": "127.0.0.1", "hostname": "w1"},
        "job_id": job, "op": job.rsplit('-').next().unwrap_or(""),
        "event": if progress.is_some() && state == "running" { "progress" } else { "state" },
        "state": state, "seq": seq, "timestamp": "2026-03-02T10:15:04.512Z",
    });
    if let Some(p) = progress {
        ev["progress"] = p;
    }
    let body = ev.to_string().into_bytes();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, TOKEN.as_bytes());
    let sig = format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, &body).as_ref())
    );
    let (s, _, v) = server
        .client()
        .raw(
            Method::POST,
            "/v1/agents/events",
            &[("x-aula-signature", &sig)],
            Some(("application/json", body)),
        )
        .await;
    assert_eq!(s, 200, "webhook refused: {v}");
}

fn progress(done: u64) -> Value {
    json!({"phase": "restore", "bytes_done": done, "bytes_total": 40 * MIB, "rate_bps": 8.0e6})
}

/// `event: deployment` documents of `GET /v1/deployments/{id}/events`, each
/// with the time it arrived.
fn follow(server: &ServerProc, id: i64) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pin = aula_imager::tls::parse_fingerprint(&server.fingerprint).expect("fp");
    let tls =
        aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin)).expect("tls");
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(conn);
    let req = hyper::Request::get(format!(
        "{}/v1/deployments/{id}/events",
        server.https_base()
    ))
    .header("authorization", format!("Bearer {API_TOKEN}"))
    .body(Full::new(Bytes::new()))
    .expect("request");
    tokio::spawn(async move {
        let resp = client.request(req).await.expect("event stream");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut buf = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = buf.find("\n\n") {
                let msg: String = buf.drain(..end + 2).collect();
                if let Some(d) = msg
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str::<Value>(d).ok())
                {
                    if tx.send((Instant::now(), d)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The machine's `[phase, bytes_done]` in a deployment document.
fn machine(doc: &Value) -> (String, u64) {
    let m = &doc["machines"][0];
    (
        m[2].as_str().unwrap_or("").to_owned(),
        m[3].as_u64().unwrap_or(0),
    )
}

/// Waits for the first document satisfying `want`; returns when it came.
async fn until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>,
    what: &str,
    want: impl Fn(&(String, u64)) -> bool,
) -> Instant {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (at, doc) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no document with {what}"))
            .expect("stream open");
        if want(&machine(&doc)) {
            return at;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_reaches_the_console_within_a_second_and_polling_is_the_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(
        &dir.path().join("server"),
        "[console]\nagent_gone_s = 30\nstall_timeout_s = 120\n[metrics]\nallow = [\"127.0.0.1/32\"]\n",
    );
    let c = server.client();
    let src = ext4_image(dir.path(), 8, &[("a.txt", b"a".to_vec())]);
    upload(&server, &src, "lab", 1 << 20).await;
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "W"})))
        .await;
    c.ok(
        Method::POST,
        "/v1/machines",
        Some(json!({"mac": MAC, "name": "w1", "room": "W"})),
    )
    .await;

    // The scripted agent: HTTPS, its own certificate, registered in the
    // window of a live boot, from the address the script went to.
    let pair = aula_bootserver::tls::self_signed(&["127.0.0.1".into()]).expect("cert");
    let tls = aula_bootserver::tls::from_pem(&pair, "agent").expect("tls");
    let state = Arc::new(Mutex::new(AgentState::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let addr = bhttp::start(
        "127.0.0.1:0".parse().expect("addr"),
        Some(tls.acceptor.clone()),
        vec![Arc::new(ScriptedAgent(state.clone()))],
        16,
        stop.clone(),
        &tracker,
    )
    .await
    .expect("agent listens");
    let nonce = server.live_boot(MAC).await;
    let reg = json!({"mac": MAC, "ips": ["127.0.0.1"], "agent_version": "scripted",
                     "token": TOKEN, "cert_fingerprint": tls.fingerprint,
                     "port": addr.port(), "boot_nonce": nonce});
    let (s, _, v) = c
        .raw(
            Method::POST,
            "/v1/agents/register",
            &[],
            Some(("application/json", reg.to_string().into_bytes())),
        )
        .await;
    assert_eq!(s, 200, "registration: {v}");

    let dep = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(json!({"room": "W", "image": "lab", "partition": 1, "after": "reboot-local"})),
        )
        .await;
    let id = dep["id"].as_i64().expect("id");
    let restore = format!("aula-d{id}-{}-restore", MAC.replace(':', ""));
    let reboot = format!("aula-d{id}-{}-reboot", MAC.replace(':', ""));
    let mut docs = follow(&server, id);
    until(&mut docs, "restoring", |(p, _)| p == "restoring").await;
    assert!(state.lock().expect("state").jobs.contains_key(&restore));
    // The runner's phases are in /metrics too.
    let (s, _, body) = c.raw(Method::GET, "/metrics", &[], None).await;
    assert_eq!(s, 200, "metrics: {body}");
    let text = body.as_str().unwrap_or_default();
    assert!(
        text.contains("aula_deployment_machines{state=\"restoring\"} 1"),
        "no restoring machine in /metrics:\n{text}"
    );

    // Progress by webhook: in the console within about a second, although
    // every poll says nothing is done.
    let mut worst = Duration::ZERO;
    for (seq, mib) in [(1u64, 10u64), (2, 20), (3, 30)] {
        let sent = Instant::now();
        webhook(&server, &restore, seq, "running", Some(progress(mib * MIB))).await;
        let seen = until(&mut docs, &format!("{mib} MiB done"), |(_, b)| {
            *b == mib * MIB
        })
        .await;
        let took = seen.duration_since(sent);
        eprintln!("webhook seq {seq} ({mib} MiB) in the console after {took:?}");
        worst = worst.max(took);
    }
    assert!(
        worst <= Duration::from_millis(1500),
        "a webhook took {worst:?} to reach the console"
    );
    // A late, older webhook (a retry delivered out of order) and the stale
    // polls change nothing.
    webhook(&server, &restore, 2, "running", Some(progress(20 * MIB))).await;
    let polls_before = state.lock().expect("state").polls;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let polls = state.lock().expect("state").polls - polls_before;
    let (_, doc) = {
        let mut last = None;
        while let Ok(d) = docs.try_recv() {
            last = Some(d);
        }
        last.unwrap_or((
            Instant::now(),
            json!({"machines": [["", "", "restoring", 30 * MIB]]}),
        ))
    };
    assert_eq!(machine(&doc), ("restoring".to_owned(), 30 * MIB), "{doc}");
    assert!(
        polls <= 1,
        "{polls} polls in 1.5 s while webhooks flow (the fallback is every 5 s)"
    );

    // The end by webhook: the machine moves on at once (set local boot,
    // reboot job posted) although the poll still says "running".
    let sent = Instant::now();
    webhook(&server, &restore, 4, "succeeded", Some(progress(40 * MIB))).await;
    let seen = until(&mut docs, "rebooting", |(p, _)| p == "rebooting").await;
    eprintln!(
        "restore end by webhook: rebooting after {:?}",
        seen.duration_since(sent)
    );
    assert!(seen.duration_since(sent) <= Duration::from_millis(1500));
    let clients = c.ok(Method::GET, &format!("/v1/clients/{MAC}"), None).await;
    assert_eq!(clients["boot_mode"], "local", "{clients}");

    // A missed webhook: the reboot job's first event arrives, its end never
    // does; the agent's job API says it succeeded, and the fallback poll
    // finishes the machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.lock().expect("state").jobs.contains_key(&reboot) {
        assert!(Instant::now() < deadline, "no reboot job posted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    webhook(&server, &reboot, 1, "running", None).await;
    state.lock().expect("state").jobs.insert(
        reboot.clone(),
        json!({"id": reboot, "op": "reboot", "state": "succeeded", "seq": 3}),
    );
    let from = Instant::now();
    let end = wait_deployment(&c, id, Duration::from_secs(20)).await;
    eprintln!("done by the fallback poll after {:?}", from.elapsed());
    assert_eq!(end["done"], 1, "{end:#}");
    assert_eq!(end["failed"], 0, "{end:#}");

    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
