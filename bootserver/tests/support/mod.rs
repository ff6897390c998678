//! The whole server in-process on loopback (its own runtime thread) and a
//! small HTTP/1.1 client that can speak from any 127.x.y.z source address,
//! over plain TCP or TLS pinned to the server's certificate, so that many
//! simulated machines each come from their own address. Registrations
//! follow the window rules: a machine fetches its live script from its own
//! address first (with the `ip=`/`mac=` iPXE puts in the URL), then
//! registers from that address with the script's nonce.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aula_bootserver::config::Config;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub const API_TOKEN: &str = "support-api-token-0123456789";
pub const WRITE_TOKEN: &str = "support-write-token-0123456789";

/// Raises the open-file limit to the hard limit (many sockets per test).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit
        // up to the hard limit needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// A config: HTTP and HTTPS on 127.0.0.1 (any port), no DHCP/TFTP, the
/// repository on, live files in `dir/live` (`kernel_bytes` and
/// `initrd_bytes` long), `extra` appended (more sections).
pub fn config(
    dir: &Path,
    kernel_bytes: usize,
    initrd_bytes: usize,
    extra_http: &str,
    extra: &str,
) -> Config {
    let live = dir.join("live");
    std::fs::create_dir_all(&live).expect("mkdir live");
    std::fs::write(live.join("vmlinuz"), pattern(kernel_bytes, 1)).expect("kernel");
    std::fs::write(live.join("initrd.gz"), pattern(initrd_bytes, 2)).expect("initrd");
    let text = format!(
        r#"[server]
address = "10.213.0.1"
data_dir = "{data}"
[http]
bind = "127.0.0.1:0"
public_url = "http://10.213.0.1:8080"
api_token = "{API_TOKEN}"
{extra_http}
[http.tls]
bind = "127.0.0.1:0"
[tftp]
enabled = false
[boot]
kernel = "{live}/vmlinuz"
initrd = "{live}/initrd.gz"
[repository]
enabled = true
write_token = "{WRITE_TOKEN}"
{extra}
"#,
        data = dir.join("data").display(),
        live = live.display(),
    );
    Config::parse(&text).expect("test config")
}

/// Deterministic bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// The server on its own runtime thread; stopped on drop.
pub struct Running {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub fingerprint: String,
    pub data_dir: PathBuf,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn start(cfg: Config, workers: usize) -> Running {
        let data_dir = cfg.server.data_dir.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let server = aula_bootserver::Server::start(cfg, Vec::new())
                    .await
                    .expect("server starts");
                tx.send((
                    server.http_addr.expect("http"),
                    server.https_addr.expect("https"),
                    server.tls_fingerprint.clone().expect("fingerprint"),
                ))
                .expect("send");
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                server.shutdown();
                server.wait().await;
            });
        });
        let (http, https, fingerprint) = rx.recv().expect("server addresses");
        Running {
            http,
            https,
            fingerprint,
            data_dir,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `n`-th simulated machine's address: 127.10.x.y.
pub fn machine_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        10 + (n / 250 / 250) as u8,
        ((n / 250) % 250) as u8,
        1 + (n % 250) as u8,
    )
}

/// The `n`-th simulated machine's MAC.
pub fn machine_mac(n: u32) -> String {
    let b = n.to_be_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// A TCP connection from `src`.
pub async fn connect(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(dst).await
}

/// The same over TLS pinned to `fingerprint`.
pub async fn connect_tls(
    src: IpAddr,
    dst: SocketAddr,
    fingerprint: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let pin = aula_imager::tls::parse_fingerprint(fingerprint).expect("fingerprint");
    let cfg = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin))
        .expect("client config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = connect(src, dst).await?;
    let name = rustls::pki_types::ServerName::try_from("aula-bootserver").expect("name");
    connector.connect(name, tcp).await
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One request (`Connection: close`) on `s`; reads to the end.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    s.write_all(&out).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify after a complete answer.
    let _ = s.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no response head ({} bytes)", raw.len())))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    Ok(Resp {
        status,
        headers: head,
        body: raw[split + 4..].to_vec(),
    })
}

/// A plain HTTP request from `src`.
pub async fn http(
    src: IpAddr,
    dst: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let s = connect(src, dst).await?;
    exchange(s, method, path, headers, body).await
}

/// An HTTPS request from `src`, pinned.
pub async fn https(
    src: IpAddr,
    dst: SocketAddr,
    fingerprint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let s = connect_tls(src, dst, fingerprint).await?;
    exchange(s, method, path, headers, body).await
}

/// The `aula.boot=` nonce on a live script's kernel line.
pub fn nonce_of(script: &str) -> Option<String> {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("aula.boot="))
        .map(str::to_owned)
}

/// A registered simulated machine.
pub struct Machine {
    pub ip: IpAddr,
    pub mac: String,
    pub token: String,
    pub read_token: Option<String>,
}

/// The script request a machine's iPXE makes (from its own address).
pub fn script_path(ip: IpAddr, mac: &str) -> String {
    format!("/boot/ipxe/{mac}?ip={ip}&mac={mac}")
}

/// A registration body.
pub fn registration(mac: &str, ip: IpAddr, token: &str, nonce: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "mac": mac,
        "ips": [ip],
        "agent_version": "load-test",
        "token": token,
        "cert_fingerprint": format!("sha256:{}", "ab".repeat(32)),
        "port": 8000,
        "boot_nonce": nonce,
    }))
    .expect("json")
}

/// `X-Aula-Signature` of `body` with the agent's `token`.
pub fn signature(token: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    format!(
        "sha256={}",
        tag.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// Boots machine `n` live far enough to register: its script from its
/// own address, then the registration with the script's nonce.
pub async fn boot_and_register(srv: &Running, n: u32) -> Machine {
    let ip = IpAddr::V4(machine_ip(n));
    let mac = machine_mac(n);
    let r = http(ip, srv.http, "GET", &script_path(ip, &mac), &[], None)
        .await
        .expect("script");
    assert_eq!(r.status, 200, "{}", r.text());
    let nonce = nonce_of(&r.text()).expect("nonce on the kernel line");
    let token = format!("agent-token-{n:08}-0123456789");
    let body = registration(&mac, ip, &token, &nonce);
    let r = https(
        ip,
        srv.https,
        &srv.fingerprint,
        "POST",
        "/v1/agents/register",
        &[("Content-Type", "application/json")],
        Some(&body),
    )
    .await
    .expect("register");
    assert_eq!(r.status, 200, "registration of {mac}: {}", r.text());
    let read_token = r.json()["repository"]["read_token"]
        .as_str()
        .map(str::to_owned);
    Machine {
        ip,
        mac,
        token,
        read_token,
    }
}

/// Waits until `f` is true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}
