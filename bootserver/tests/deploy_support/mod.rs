//! Test harness for deployments: the real `aula-bootserver` binary as a
//! child process (so it can be killed with SIGKILL and started again on the
//! same ports and data), real agents in-process on loopback with
//! file-backed disks, images made from real ext4 filesystems, and a small
//! HTTP client for the API. Only loopback traffic.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aula_agent::config::{FileConfig, KernelParams, Settings};
use aula_agent::Agent;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use serde_json::Value;

pub const API_TOKEN: &str = "deploy-test-api-token-0123456789";
pub const VIEWER_TOKEN: &str = "deploy-test-viewer-token-0123456789";
pub const REPO_TOKEN: &str = "deploy-test-repo-token-0123456789";
pub const MIB: u64 = 1 << 20;

static NS_COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs the calling test again inside a fresh network namespace holding
/// only `lo` (in-process agents otherwise all register the host's NIC
/// MACs beside their own). Returns `true` in the inner run, which does the
/// work; the outer run returns `false` after asserting the inner run passed.
/// Needs root (it fails, not skips, without).
pub fn in_netns(test_name: &str) -> bool {
    if std::env::var_os("AULA_TEST_NETNS").is_some() {
        return true;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test_name} needs root: it runs in a network namespace it creates"
    );
    let ns = format!(
        "aula-dep-{}-{}",
        std::process::id(),
        NS_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    sh(Command::new("ip").args(["netns", "add", &ns]));
    let run = || -> std::process::ExitStatus {
        sh(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().expect("test binary"))
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env("AULA_TEST_NETNS", &ns)
            .status()
            .expect("running the test in its namespace")
    };
    let status = run();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(
        status.success(),
        "{test_name} failed inside namespace {ns} ({status}); its output is above"
    );
    false
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
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

/// The boot server as a child process.
pub struct ServerProc {
    pub dir: PathBuf,
    pub http: u16,
    pub https: u16,
    pub fingerprint: String,
    pub config: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ServerProc {
    /// Writes a configuration (extra TOML appended) and starts the server.
    pub fn start(dir: &Path, extra: &str) -> ServerProc {
        Self::start_at(dir, "127.0.0.1", extra)
    }

    /// With another `server.address` (HTTP stays on loopback).
    pub fn start_at(dir: &Path, address: &str, extra: &str) -> ServerProc {
        std::fs::create_dir_all(dir.join("live")).expect("live dir");
        std::fs::write(dir.join("live/vmlinuz"), b"kernel").expect("kernel");
        std::fs::write(dir.join("live/initrd.gz"), b"initrd").expect("initrd");
        let pair = aula_bootserver::tls::self_signed(&["localhost".into(), "127.0.0.1".into()])
            .expect("cert");
        let fingerprint = aula_bootserver::tls::from_pem(&pair, "server")
            .expect("tls")
            .fingerprint;
        std::fs::write(dir.join("server.crt"), &pair.cert_pem).expect("cert");
        std::fs::write(dir.join("server.key"), &pair.key_pem).expect("key");
        let (http, https) = (free_port(), free_port());
        let config = dir.join("server.toml");
        let text = format!(
            r#"[server]
address = "{address}"
data_dir = "{data}"
[dhcp]
enabled = false
[ra]
enabled = false
[tftp]
enabled = false
[http]
bind = "127.0.0.1:{http}"
api_token = "{API_TOKEN}"
viewer_token = "{VIEWER_TOKEN}"
[http.tls]
bind = "127.0.0.1:{https}"
cert = "{dir}/server.crt"
key = "{dir}/server.key"
[boot]
default_mode = "local"
kernel = "{dir}/live/vmlinuz"
initrd = "{dir}/live/initrd.gz"
[repository]
enabled = true
write_token = "{REPO_TOKEN}"
gc_grace_s = 0
{extra}
"#,
            data = dir.join("data").display(),
            dir = dir.display(),
        );
        std::fs::write(&config, text).expect("config");
        let mut s = ServerProc {
            dir: dir.to_owned(),
            http,
            https,
            fingerprint,
            config,
            child: None,
            starts: 0,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("server-{}.log", self.starts)))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_aula-bootserver"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,aula_bootserver=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start aula-bootserver");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.http)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not listen: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same configuration, ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for i in 1..=self.starts {
            s.push_str(
                &std::fs::read_to_string(self.dir.join(format!("server-{i}.log")))
                    .unwrap_or_default(),
            );
        }
        s
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    pub fn https_base(&self) -> String {
        format!("https://127.0.0.1:{}", self.https)
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.dir.join("data/repo")
    }

    /// A client of the API over HTTPS, pinned to the server's certificate
    /// (the console and the API are served there only).
    pub fn client(&self) -> Client {
        Client::pinned(&self.https_base(), Some(&self.fingerprint))
    }

    /// A live boot of `mac` as the machine starts it: a one-shot live mode
    /// set through the API, then the machine's own iPXE script fetch over
    /// plain HTTP from its address (loopback, with the `ip=`/`mac=` iPXE
    /// puts in the URL). Returns the boot's nonce (`aula.boot=`) its agent
    /// registers with in the window this opened.
    pub async fn live_boot(&self, mac: &str) -> String {
        self.client()
            .ok(
                Method::PUT,
                &format!("/v1/clients/{mac}/boot"),
                Some(serde_json::json!({"mode": "live", "once": true})),
            )
            .await;
        let plain = Client::new(&self.base());
        let (s, _, v) = plain
            .raw(
                Method::GET,
                &format!(
                    "/boot/ipxe/{}?ip=127.0.0.1&mac={mac}",
                    mac.replace(':', "-")
                ),
                &[],
                None,
            )
            .await;
        let text = v.as_str().unwrap_or_default().to_owned();
        assert_eq!(s, 200, "live script of {mac}: {text}");
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("aula.boot="))
            .unwrap_or_else(|| panic!("no live boot for {mac}: {text}"))
            .to_owned()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

type Conn = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// An HTTP(S) client for the API (HTTPS pinned to the server's certificate).
pub struct Client {
    inner: hyper_util::client::legacy::Client<Conn, Full<Bytes>>,
    pub base: String,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Self::pinned(base, None)
    }

    pub fn pinned(base: &str, fingerprint: Option<&str>) -> Client {
        // Plain HTTP needs no trust; a pin that matches nothing is fine there.
        let pin = fingerprint
            .map(|f| aula_imager::tls::parse_fingerprint(f).expect("fingerprint"))
            .unwrap_or([0; 32]);
        let tls = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin))
            .expect("tls config");
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Client {
            inner:
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(conn),
            base: base.to_owned(),
        }
    }

    /// A call with the given headers; `(status, headers, JSON or text)`.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> (u16, hyper::HeaderMap, Value) {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = match body {
            Some((ct, bytes)) => {
                b = b.header("content-type", ct);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = b.body(Full::new(body)).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(30), self.inner.request(req))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer in 30 s"))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, v)
    }

    /// With the API token.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let auth = format!("Bearer {API_TOKEN}");
        let (s, _, v) = self
            .raw(
                method,
                path,
                &[("authorization", &auth)],
                body.map(|b| ("application/json", b.to_string().into_bytes())),
            )
            .await;
        (s, v)
    }

    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method.clone(), path, body).await;
        assert!((200..300).contains(&s), "{method} {path}: {s} {v:#}");
        v
    }
}

/// A bare ext4 filesystem image file holding `files`, made without mounting.
pub fn ext4_image(dir: &Path, size_mib: u64, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let src = dir.join("src-tree");
    for (name, data) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }
    let img = dir.join("src.ext4");
    let f = std::fs::File::create(&img).expect("create");
    f.set_len(size_mib * MIB).expect("size");
    drop(f);
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "LAB", "-d"])
        .arg(&src)
        .arg(&img));
    img
}

/// Uploads a partition image of `source` to the server's repository.
pub async fn upload(server: &ServerProc, source: &Path, name: &str, chunk: u64) {
    let url = server.https_base();
    let pin = aula_imager::tls::parse_fingerprint(&server.fingerprint).expect("fingerprint");
    let source = source.to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let repo = aula_imager::repo::HttpRepo::new(
            &url,
            aula_imager::repo::HttpOptions {
                trust: aula_imager::tls::ServerTrust::Pin(pin),
                token: Some(REPO_TOKEN.into()),
                ..Default::default()
            },
        )
        .expect("repo client");
        let dev = aula_imager::device::Device::open_read(&source).expect("open source");
        aula_imager::image::create_image(
            &name,
            Arc::new(dev),
            None,
            &repo,
            &aula_imager::create::CreateOptions {
                chunk_size: chunk,
                ..Default::default()
            },
            &aula_imager::progress::Progress::new(),
        )
        .expect("upload image");
    })
    .await
    .expect("upload thread");
}

/// A TCP proxy passing server-to-client bytes at `rate` bytes/s in total
/// (to make restores last long enough to be watched). Runs until dropped.
pub struct Throttle {
    pub port: u16,
    stop: tokio_util::sync::CancellationToken,
}

impl Throttle {
    pub async fn start(upstream: u16, rate: u64) -> Throttle {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let stop = tokio_util::sync::CancellationToken::new();
        let s2 = stop.clone();
        let pace = Arc::new(tokio::sync::Mutex::new(()));
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    _ = s2.cancelled() => return,
                    r = l.accept() => match r { Ok(v) => v, Err(_) => return },
                };
                let (s3, pace) = (s2.clone(), pace.clone());
                tokio::spawn(async move {
                    let Ok(mut u) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = c.split();
                    let (mut ur, mut uw) = u.split();
                    let up = tokio::io::copy(&mut cr, &mut uw);
                    let down = async {
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
        Throttle { port, stop }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts an agent for `mac` with disk 1 = `disk`, after a live boot of
/// `mac` (the agent registers in the window it opened, with its nonce).
/// The repository is the server's (HTTPS, pinned, with the read token the
/// registration hands out; uploads with the agent's upload token).
pub async fn start_agent(server: &ServerProc, dir: &Path, mac: &str, disk: &Path) -> Agent {
    start_agent_via(server, server.https, dir, mac, disk).await
}

/// [`start_agent`], fetching images through `repo_port` (a proxy in front
/// of the server's HTTPS port; the pin stays the server's).
pub async fn start_agent_via(
    server: &ServerProc,
    repo_port: u16,
    dir: &Path,
    mac: &str,
    disk: &Path,
) -> Agent {
    let nonce = server.live_boot(mac).await;
    start_agent_in_boot(server, repo_port, dir, mac, disk, &nonce).await
}

/// An agent started in the live boot whose nonce is `nonce`.
pub async fn start_agent_in_boot(
    server: &ServerProc,
    repo_port: u16,
    dir: &Path,
    mac: &str,
    disk: &Path,
    nonce: &str,
) -> Agent {
    std::fs::create_dir_all(dir).expect("agent dir");
    let repo = if repo_port == server.https {
        String::new()
    } else {
        format!(
            "url = \"https://127.0.0.1:{repo_port}\"\nfingerprint = \"{}\"",
            server.fingerprint
        )
    };
    let text = format!(
        r#"restore_records = ""
state_dir = "{dir}/agent-state"
[listen]
address = "127.0.0.1"
port = 0
[repository]
retry_s = 60
{repo}
[cache]
mount_dir = "{dir}/cache-mnt"
[power]
mode = "command"
poweroff_command = ["/bin/sh", "-c", "echo poweroff >> {dir}/power.log"]
reboot_command = ["/bin/sh", "-c", "echo reboot >> {dir}/power.log"]
[identity]
mac = "{mac}"
hostname = "pc-{tag}"
ips = ["127.0.0.1"]
[disks]
1 = "{disk}"
"#,
        dir = dir.display(),
        disk = disk.display(),
        tag = mac.replace(':', ""),
    );
    let file = FileConfig::parse(&text, "test").expect("agent config");
    let cmdline = format!(
        "quiet aula.server={} aula.server_fp={} aula.boot={nonce}",
        server.https_base(),
        server.fingerprint
    );
    let s = Settings::new(file, &KernelParams::parse(&cmdline)).expect("settings");
    Agent::start(s).await.expect("agent starts")
}

/// Waits until GET /v1/agents lists `n` agents.
pub async fn wait_agents(c: &Client, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = c.call(Method::GET, "/v1/agents", None).await;
        if v.as_array().is_some_and(|a| a.len() >= n) {
            return;
        }
        assert!(Instant::now() < deadline, "agents did not register: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until deployment `id` is no longer running; returns it.
pub async fn wait_deployment(c: &Client, id: i64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (s, v) = c
            .call(Method::GET, &format!("/v1/deployments/{id}"), None)
            .await;
        if s == 200 && matches!(v["state"].as_str(), Some("finished" | "cancelled")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "deployment {id} did not finish: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a machine of deployment `id` (read through `c`) restores.
pub async fn wait_restoring(c: &Client, id: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = c
            .call(Method::GET, &format!("/v1/deployments/{id}"), None)
            .await;
        if states(&v).iter().any(|(_, s, _)| s == "restoring") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no machine of deployment {id} reached restoring: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The state of each machine of a deployment, by name.
pub fn states(dep: &Value) -> Vec<(String, String, Option<String>)> {
    let mut v: Vec<_> = dep["machines"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("").to_owned(),
                        m["state"].as_str().unwrap_or("").to_owned(),
                        m["reason"].as_str().map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Compares partition `n` of `disk` with image `name` in the repository
/// directory: every used byte must equal the image.
pub fn partition_equals_image(repo_dir: &Path, name: &str, disk: &Path, n: u32) -> (u64, Vec<u64>) {
    use aula_imager::repo::Repository;
    let repo = aula_imager::repo::LocalRepo::open(repo_dir, false).expect("open repo");
    let m = repo.manifest(name, None).expect("manifest");
    let dev = aula_imager::device::Device::open_read(disk).expect("open disk");
    let r = aula_imager::verify::compare_image(
        &m,
        Arc::new(dev),
        Some(n),
        &repo,
        2,
        &aula_imager::progress::Progress::new(),
    )
    .expect("compare");
    assert_eq!(
        r.bytes_checked,
        m.total_used_bytes(),
        "every used byte compared"
    );
    (r.bytes_checked, r.windows_differing)
}

pub fn sock(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
