//! Test harness: file-backed disks with real filesystems, the real boot
//! server (agent registry + image repository, HTTPS), a test core that
//! records webhooks over HTTPS, a throttling TCP proxy, and the agent
//! in-process on loopback. Only loopback traffic.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aula_agent::config::{FileConfig, KernelParams, Settings};
use aula_agent::tls::HttpClient;
use aula_agent::Agent;
use aula_bootserver::http::{
    self as bhttp, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use aula_imager::tls::ServerTrust;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const REPO_TOKEN: &str = "repo-write-token-0123456789";
pub const API_TOKEN: &str = "server-api-token-0123456789";
pub const MAC: &str = "52:54:00:aa:bb:01";
pub const MIB: u64 = 1 << 20;

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A disk image file laid out with the imager's layout code.
pub fn make_disk(
    path: &Path,
    size_mib: u64,
    layout: Value,
) -> aula_imager::disk::layout::AppliedLayout {
    let f = std::fs::File::create(path).expect("create disk");
    f.set_len(size_mib * MIB).expect("size disk");
    drop(f);
    let spec: aula_imager::disk::layout::LayoutSpec =
        serde_json::from_value(layout).expect("layout spec");
    aula_imager::disk::layout::apply(path, &spec, &Default::default()).expect("apply layout")
}

/// Byte range of partition `n` of a disk file.
pub fn part_range(disk: &Path, n: u32) -> (u64, u64) {
    let info = aula_imager::disk::inspect_file(disk).expect("inspect");
    let p = info.partition(n).expect("partition");
    (p.start, p.size)
}

/// Mount partition `n` of a disk file, run `f` on the mount point, unmount.
pub fn with_mounted<T>(disk: &Path, n: u32, read_only: bool, f: impl FnOnce(&Path) -> T) -> T {
    let (start, size) = part_range(disk, n);
    let dir = tempfile::tempdir().expect("mount dir");
    let mut opts = format!("loop,offset={start},sizelimit={size}");
    if read_only {
        opts.push_str(",ro");
    }
    sh(Command::new("mount")
        .arg("-o")
        .arg(&opts)
        .arg(disk)
        .arg(dir.path()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dir.path())));
    sh(Command::new("umount").arg(dir.path()));
    match r {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Write files into an ext4 partition.
pub fn fill(disk: &Path, n: u32, files: &[(&str, Vec<u8>)]) {
    with_mounted(disk, n, false, |d| {
        for (name, data) in files {
            let p = d.join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(p, data).expect("write file");
        }
    });
}

/// Read files back from a partition.
pub fn read_files(disk: &Path, n: u32, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    with_mounted(disk, n, true, |d| {
        names
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    std::fs::read(d.join(name)).unwrap_or_default(),
                )
            })
            .collect()
    })
}

fn write_pem(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let pair = aula_bootserver::tls::self_signed(&["localhost".into(), "127.0.0.1".into()])
        .expect("self-signed");
    let tls = aula_bootserver::tls::from_pem(&pair, name).expect("tls");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.cert_pem).expect("cert");
    std::fs::write(&key, &pair.key_pem).expect("key");
    (cert, key, tls.fingerprint)
}

/// The real boot server: agent registry + image repository, HTTP + HTTPS.
pub struct BootServer {
    pub server: Option<aula_bootserver::Server>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub fingerprint: String,
}

impl BootServer {
    pub async fn start(dir: &Path, api_token: &str) -> BootServer {
        Self::start_full(dir, api_token, "", true, "127.0.0.1".parse().expect("ip")).await
    }

    /// [`BootServer::start`] listening on `ip` (e.g. inside a namespace).
    pub async fn start_on(dir: &Path, api_token: &str, ip: std::net::IpAddr) -> BootServer {
        Self::start_full(dir, api_token, "", true, ip).await
    }

    /// With extra lines in `[repository]` (e.g. a read token), and HTTPS
    /// on (the default) or turned off.
    pub async fn start_with(
        dir: &Path,
        api_token: &str,
        repo_extra: &str,
        tls: bool,
    ) -> BootServer {
        Self::start_full(
            dir,
            api_token,
            repo_extra,
            tls,
            "127.0.0.1".parse().expect("ip"),
        )
        .await
    }

    /// Everything chosen: `[repository]` extras, HTTPS on or off, the
    /// address.
    pub async fn start_full(
        dir: &Path,
        api_token: &str,
        repo_extra: &str,
        tls: bool,
        ip: std::net::IpAddr,
    ) -> BootServer {
        std::fs::create_dir_all(dir).expect("server dir");
        let live = dir.join("live");
        std::fs::create_dir_all(&live).expect("live");
        std::fs::write(live.join("vmlinuz"), b"kernel").expect("kernel");
        std::fs::write(live.join("initrd.gz"), b"initrd").expect("initrd");
        // HTTPS on the default path: the server makes its own certificate.
        let text = format!(
            r#"[server]
address = "{ip}"
data_dir = "{data}"
[dhcp]
enabled = false
[ra]
enabled = false
[tftp]
enabled = false
[http]
bind = "{ip}:0"
api_token = "{api_token}"
[http.tls]
enabled = {tls}
bind = "{ip}:0"
[boot]
kernel = "{live}/vmlinuz"
initrd = "{live}/initrd.gz"
cmdline = "console=ttyS0"
[repository]
enabled = true
write_token = "{REPO_TOKEN}"
gc_grace_s = 0
{repo_extra}
"#,
            data = dir.join("data").display(),
            live = live.display(),
        );
        let cfg = aula_bootserver::config::Config::parse(&text).expect("server config");
        let server = aula_bootserver::Server::start(cfg, Vec::new())
            .await
            .expect("boot server starts");
        BootServer {
            http: server.http_addr.expect("http"),
            https: server.https_addr.unwrap_or(server.http_addr.expect("http")),
            fingerprint: server.tls_fingerprint.clone().unwrap_or_default(),
            server: Some(server),
        }
    }

    /// The server's own certificate and key (made on first start).
    pub fn pem_pair(dir: &Path) -> aula_bootserver::tls::PemPair {
        aula_bootserver::tls::PemPair {
            cert_pem: std::fs::read_to_string(dir.join("data/tls/server.crt")).expect("cert"),
            key_pem: std::fs::read_to_string(dir.join("data/tls/server.key")).expect("key"),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.https)
    }

    /// The repository (the same HTTPS listener).
    pub fn repo_url(&self) -> String {
        self.url()
    }

    /// A live boot of machine `mac` as the machine itself starts it: its
    /// iPXE script fetched over plain HTTP from its own address (loopback),
    /// with the `ip=`/`mac=` iPXE puts in the URL. Returns the boot nonce
    /// (`aula.boot=`) the agent registers with.
    pub async fn live_boot(&self, mac: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("connect");
        let req = format!(
            "GET /boot/ipxe/{}?ip=127.0.0.1&mac={mac} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            mac.replace(':', "-")
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("aula.boot="))
            .unwrap_or_else(|| panic!("no live script for {mac}: {text}"))
            .to_string()
    }

    /// A call over HTTPS pinned to the server, with `token` if any:
    /// (status, JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let c = HttpClient::new(
            &ServerTrust::Pin(aula_imager::tls::parse_fingerprint(&self.fingerprint).expect("fp")),
            Duration::from_secs(10),
        )
        .expect("client");
        let headers: Vec<(&'static str, String)> = token
            .map(|t| vec![("authorization", format!("Bearer {t}"))])
            .unwrap_or_default();
        let r = c
            .call(
                method,
                &format!("{}{path}", self.url()),
                &headers,
                body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
            )
            .await
            .expect("call");
        (
            r.status.as_u16(),
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    /// A GET over HTTPS without any credential: (status, JSON).
    pub async fn anonymous(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None, None).await
    }

    /// The API over HTTPS with the API token: (status, JSON).
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, path, Some(API_TOKEN), body).await
    }

    /// Registered agents, with tokens (API token).
    pub async fn agents(&self) -> Value {
        self.api(Method::GET, "/v1/agents", None).await.1
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.wait().await;
        }
    }
}

/// One webhook as the core received it.
#[derive(Debug, Clone)]
pub struct Hook {
    pub body: Vec<u8>,
    pub json: Value,
    pub signature: String,
    pub at: Instant,
}

#[derive(Default)]
pub struct CoreState {
    /// Every request: method, path, Authorization header (empty if none).
    pub requests: Mutex<Vec<(String, String, String)>>,
    pub hooks: Mutex<Vec<Hook>>,
    pub registrations: Mutex<Vec<Value>>,
    pub boots: Mutex<Vec<(String, String, Value)>>,
    /// Answer this many webhooks with 503 first.
    pub fail_next: std::sync::atomic::AtomicUsize,
}

struct CoreRoutes(Arc<CoreState>);

impl RouteGroup for CoreRoutes {
    fn name(&self) -> &'static str {
        "test-core"
    }
    fn matches(&self, _path: &str) -> bool {
        true
    }
    fn handle(&self, req: HttpRequest, _ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let method = req.method().clone();
            let sig = req
                .headers()
                .get("x-aula-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            self.0.requests.lock().expect("requests").push((
                method.to_string(),
                path.clone(),
                auth.clone(),
            ));
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if path == "/hooks" && method == Method::POST {
                if self
                    .0
                    .fail_next
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
                {
                    return bhttp::error_json(hyper::StatusCode::SERVICE_UNAVAILABLE, "busy");
                }
                self.0.hooks.lock().expect("hooks").push(Hook {
                    body,
                    json,
                    signature: sig,
                    at: Instant::now(),
                });
                return bhttp::json(hyper::StatusCode::OK, &serde_json::json!({"ok": true}));
            }
            if path == "/v1/agents/register" {
                self.0.registrations.lock().expect("regs").push(json);
                return bhttp::json(
                    hyper::StatusCode::OK,
                    &serde_json::json!({"registered": true}),
                );
            }
            if method == Method::PUT && path.starts_with("/v1/clients/") && path.ends_with("/boot")
            {
                let token = self
                    .0
                    .registrations
                    .lock()
                    .expect("regs")
                    .last()
                    .and_then(|r| r["token"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if auth != format!("Bearer {token}") {
                    return bhttp::error_json(hyper::StatusCode::UNAUTHORIZED, "bad token");
                }
                self.0
                    .boots
                    .lock()
                    .expect("boots")
                    .push((path, auth, json.clone()));
                return bhttp::json(
                    hyper::StatusCode::OK,
                    &serde_json::json!({"boot_mode": "local"}),
                );
            }
            bhttp::error_json(hyper::StatusCode::NOT_FOUND, "no route")
        })
    }
}

/// A test core over HTTPS that records webhooks (and can play the boot
/// server's registration and boot-mode routes).
pub struct TestCore {
    pub state: Arc<CoreState>,
    pub addr: SocketAddr,
    pub fingerprint: String,
    tls_pair: aula_bootserver::tls::PemPair,
    stop: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
}

impl TestCore {
    pub async fn start() -> TestCore {
        Self::start_on("127.0.0.1".parse().expect("ip")).await
    }

    /// [`TestCore::start`] listening on `ip` (e.g. inside a namespace).
    pub async fn start_on(ip: std::net::IpAddr) -> TestCore {
        let pair =
            aula_bootserver::tls::self_signed(&["localhost".into(), ip.to_string()]).expect("cert");
        let state = Arc::new(CoreState::default());
        Self::start_with(pair, state, SocketAddr::new(ip, 0)).await
    }

    /// A recorder on `bind` presenting the certificate `pair` (e.g. a
    /// copy of the boot server's, as a second server of the lab might).
    pub async fn start_as(pair: aula_bootserver::tls::PemPair, bind: SocketAddr) -> TestCore {
        Self::start_with(pair, Arc::new(CoreState::default()), bind).await
    }

    async fn start_with(
        pair: aula_bootserver::tls::PemPair,
        state: Arc<CoreState>,
        bind: SocketAddr,
    ) -> TestCore {
        let tls = aula_bootserver::tls::from_pem(&pair, "core").expect("tls");
        let stop = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let mut tries = 0;
        let addr = loop {
            match bhttp::start(
                bind,
                Some(tls.acceptor.clone()),
                vec![Arc::new(CoreRoutes(state.clone()))],
                64,
                stop.clone(),
                &tracker,
            )
            .await
            {
                Ok(a) => break a,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "core bind retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("core bind: {e}"),
            }
        };
        TestCore {
            state,
            addr,
            fingerprint: tls.fingerprint,
            tls_pair: pair,
            stop,
            tracker,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/hooks", self.addr)
    }

    /// Stop listening (the port stays reserved for `restart`).
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Listen again on the same address with the same certificate.
    pub async fn restart(&self) -> TestCore {
        Self::start_with(self.tls_pair.clone(), self.state.clone(), self.addr).await
    }

    pub fn hooks(&self) -> Vec<Hook> {
        self.state.hooks.lock().expect("hooks").clone()
    }

    /// Webhooks of one job.
    pub fn job_hooks(&self, job: &str) -> Vec<Value> {
        self.hooks()
            .into_iter()
            .filter(|h| h.json["job_id"] == job)
            .map(|h| h.json)
            .collect()
    }

    /// Wait until the core has seen `state` for `job`.
    pub async fn wait_state(&self, job: &str, state: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.job_hooks(job);
            if h.iter()
                .any(|e| e["event"] == "state" && e["state"] == state)
            {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "the core never saw {job} {state}; it saw: {:#?}",
                h
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A TCP proxy that passes server → client bytes at `rate` bytes/s in
/// total over all its connections.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr, rate: u64) -> Proxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let addr = l.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let pace = Arc::new(tokio::sync::Mutex::new(()));
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    _ = s2.cancelled() => return,
                    r = l.accept() => match r { Ok(v) => v, Err(_) => return },
                };
                let s3 = s2.clone();
                let pace = pace.clone();
                tokio::spawn(async move {
                    let Ok(mut u) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = c.split();
                    let (mut ur, mut uw) = u.split();
                    let up = tokio::io::copy(&mut cr, &mut uw);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = ur.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            let turn = pace.lock().await;
                            cw.write_all(&buf[..n]).await?;
                            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64))
                                .await;
                            drop(turn);
                        }
                    };
                    tokio::select! {
                        _ = s3.cancelled() => {}
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Proxy { addr, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Agent options for a test.
pub struct AgentOpts<'a> {
    pub dir: &'a Path,
    pub disks: Vec<(u32, PathBuf)>,
    /// `aula.server=` and `aula.server_fp=`.
    pub server: Option<(String, String)>,
    pub core: Option<(String, String)>,
    /// The configured repository: `https://127.0.0.1:<port>`, pinned to
    /// `repo_fp` (the boot server's certificate) when given.
    pub repo_port: u16,
    pub repo_fp: Option<String>,
    /// `aula.boot=`: the nonce of the live boot the agent runs in.
    pub boot: Option<String>,
    /// Extra lines for `[repository]`.
    pub repo_extra: &'a str,
    /// `repository.write_token` (default the repository's).
    pub write_token: Option<&'a str>,
    pub extra: &'a str,
}

impl<'a> AgentOpts<'a> {
    /// An agent on `dir` with these disks, nothing else configured.
    pub fn new(dir: &'a Path, disks: Vec<(u32, PathBuf)>) -> AgentOpts<'a> {
        AgentOpts {
            dir,
            disks,
            server: None,
            core: None,
            repo_port: 9,
            repo_fp: None,
            boot: None,
            repo_extra: "",
            write_token: Some(REPO_TOKEN),
            extra: "",
        }
    }

    /// The configured repository is `server`'s, reached at `port` (its
    /// HTTPS port, or a proxy in front of it), pinned.
    pub fn repo(mut self, server: &BootServer, port: u16) -> Self {
        self.repo_port = port;
        self.repo_fp = Some(server.fingerprint.clone());
        self
    }
}

pub async fn start_agent(o: AgentOpts<'_>) -> Agent {
    let mut disks = String::new();
    for (n, p) in &o.disks {
        disks.push_str(&format!("{n} = \"{}\"\n", p.display()));
    }
    let power_log = o.dir.join("power.log");
    let repo_pin = o
        .repo_fp
        .as_ref()
        .map(|fp| {
            format!(
                "fingerprint = \"{fp}\"\nurl = \"https://127.0.0.1:{}\"",
                o.repo_port
            )
        })
        .unwrap_or_default();
    let text = format!(
        r#"restore_records = "{records}"
state_dir = "{state}"
[listen]
address = "127.0.0.1"
port = 0
[repository]
port = {port}
{write_token}
{retry}
{repo_pin}
{repo_extra}
[cache]
mount_dir = "{cache}"
[power]
mode = "command"
poweroff_command = ["/bin/sh", "-c", "echo poweroff >> {log}"]
reboot_command = ["/bin/sh", "-c", "echo reboot >> {log}"]
[identity]
mac = "{MAC}"
[disks]
{disks}
{extra}
"#,
        port = o.repo_port,
        cache = o.dir.join("cache-mnt").display(),
        records = o.dir.join("records").display(),
        state = o.dir.join("agent-state").display(),
        log = power_log.display(),
        extra = o.extra,
        repo_extra = o.repo_extra,
        retry = if o.repo_extra.contains("retry_s") {
            ""
        } else {
            "retry_s = 30"
        },
        write_token = o
            .write_token
            .map(|t| format!("write_token = \"{t}\""))
            .unwrap_or_default(),
    );
    let file = FileConfig::parse(&text, "test").expect("agent config");
    let mut cmdline = String::from("quiet");
    if let Some((url, fp)) = &o.server {
        cmdline.push_str(&format!(" aula.server={url} aula.server_fp={fp}"));
    }
    if let Some((url, fp)) = &o.core {
        cmdline.push_str(&format!(" aula.core={url} aula.core_fp={fp}"));
    }
    if let Some(n) = &o.boot {
        cmdline.push_str(&format!(" aula.boot={n}"));
    }
    let s = Settings::new(file, &KernelParams::parse(&cmdline)).expect("settings");
    Agent::start(s).await.expect("agent starts")
}

/// A client of the agent's API (pinned to its certificate).
pub struct Api {
    pub base: String,
    pub token: String,
    pub client: HttpClient,
}

impl Api {
    pub fn new(agent: &Agent) -> Api {
        Self::with(
            agent.addr,
            agent.fingerprint(),
            agent.token(),
            Duration::from_secs(30),
        )
    }

    pub fn with(addr: SocketAddr, fp: &str, token: &str, timeout: Duration) -> Api {
        let pin = aula_imager::tls::parse_fingerprint(fp).expect("fp");
        Api {
            base: format!("https://{addr}"),
            token: token.to_string(),
            client: HttpClient::new(&ServerTrust::Pin(pin), timeout).expect("client"),
        }
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut headers = Vec::new();
        if let Some(t) = token {
            headers.push(("authorization", format!("Bearer {t}")));
        }
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let r = self
            .client
            .call(method, &format!("{}{path}", self.base), &headers, body)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
        (r.status.as_u16(), v)
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let t = self.token.clone();
        self.call_with(method, path, Some(&t), body).await
    }

    /// Raw body (event streams).
    pub async fn raw(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .call(
                Method::GET,
                &format!("{}{path}", self.base),
                &[("authorization", format!("Bearer {}", self.token))],
                Vec::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        (
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).into_owned(),
        )
    }

    pub async fn wait_job(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (s, v) = self
                .call(Method::GET, &format!("/v1/jobs/{id}"), None)
                .await;
            assert_eq!(s, 200, "{v}");
            let st = v["state"].as_str().unwrap_or("");
            if matches!(st, "succeeded" | "failed" | "cancelled") {
                return v;
            }
            assert!(Instant::now() < deadline, "job {id} still {st}: {v:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Upload partition `n` of `disk` as image `name` to `server`'s repository
/// with the imager library (write token, pinned).
pub async fn upload(
    server: &BootServer,
    disk: &Path,
    n: Option<u32>,
    name: &str,
) -> aula_imager::manifest::Manifest {
    upload_chunked(
        server,
        disk,
        n,
        name,
        aula_imager::manifest::DEFAULT_CHUNK_SIZE,
    )
    .await
}

/// [`upload`] with a chunk size.
pub async fn upload_chunked(
    server: &BootServer,
    disk: &Path,
    n: Option<u32>,
    name: &str,
    chunk_size: u64,
) -> aula_imager::manifest::Manifest {
    let url = server.repo_url();
    let pin = aula_imager::tls::parse_fingerprint(&server.fingerprint).expect("fp");
    let disk = disk.to_path_buf();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let repo = aula_imager::repo::HttpRepo::new(
            &url,
            aula_imager::repo::HttpOptions {
                token: Some(REPO_TOKEN.into()),
                trust: ServerTrust::Pin(pin),
                ..Default::default()
            },
        )
        .expect("repo client");
        let dev = aula_imager::device::Device::open_read(&disk).expect("open source");
        aula_imager::image::create_image(
            &name,
            Arc::new(dev),
            n,
            &repo,
            &aula_imager::create::CreateOptions {
                chunk_size,
                ..Default::default()
            },
            &aula_imager::progress::Progress::new(),
        )
        .expect("upload image")
    })
    .await
    .expect("upload thread")
}

/// Check a webhook's signature.
pub fn signed_right(h: &Hook, token: &str) -> bool {
    h.signature == aula_agent::tls::sign(token, &h.body)
}

/// The standard test source: a disk with one ext4 partition full of files.
pub fn source_disk(dir: &Path, data_mib: usize) -> (PathBuf, Vec<(&'static str, Vec<u8>)>) {
    let src = dir.join("src.img");
    make_disk(
        &src,
        64,
        serde_json::json!({"table": "mbr", "partitions": [
            {"number": 1, "type": "linux", "size": "48MiB", "filesystem": "ext4", "label": "SRC"}
        ]}),
    );
    let files = vec![
        ("data/blob.bin", pseudo_random(7, data_mib << 20)),
        ("etc/os-release", b"NAME=\"Aula Test Linux\"\nVERSION_ID=\"1.2\"\nID=aula\nPRETTY_NAME=\"Aula Test Linux 1.2\"\n".to_vec()),
        ("hello.txt", b"hello from the source partition\n".to_vec()),
    ];
    fill(&src, 1, &files);
    (src, files)
}

/// The standard target: MBR, p1 16 MiB ext4, p2 48 MiB unformatted, rest CACHE.
pub fn target_disk(dir: &Path) -> PathBuf {
    let t = dir.join("target.img");
    make_disk(
        &t,
        160,
        serde_json::json!({"table": "mbr", "partitions": [
            {"number": 1, "type": "linux", "size": "16MiB", "filesystem": "ext4"},
            {"number": 2, "type": "linux", "size": "48MiB", "format": false},
            {"number": 4, "type": "cache", "size": "64MiB"}
        ]}),
    );
    t
}
