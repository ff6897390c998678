//! HTTP tests against the server started in-process through the library, on
//! loopback (no DHCP/TFTP): iPXE scripts and boot modes, the API and its
//! authorization, agent registration, live files with Range, extra route groups.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use aula_bootserver::config::Config;
use aula_bootserver::http::{
    self, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use aula_bootserver::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789abcdef";

fn config(dir: &Path, token: Option<&str>) -> Config {
    let live = dir.join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    let kernel: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(live.join("vmlinuz"), &kernel).expect("kernel");
    std::fs::write(live.join("initrd.gz"), b"initrd-bytes").expect("initrd");
    let token_line = token
        .map(|t| format!("api_token = \"{t}\""))
        .unwrap_or_default();
    let text = format!(
        r#"[server]
address = "10.213.0.1"
data_dir = "{data}"
[http]
bind = "127.0.0.1:0"
public_url = "http://10.213.0.1:8080"
{token_line}
[tftp]
enabled = false
[boot]
kernel = "{live}/vmlinuz"
initrd = "{live}/initrd.gz"
cmdline = "console=ttyS0"
core_url = "https://core.example.test:8443"
"#,
        data = dir.join("data").display(),
        live = live.display(),
    );
    Config::parse(&text).expect("test config")
}

struct Resp {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// A minimal HTTP/1.1 client (one request per connection).
async fn req(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    r.push_str("\r\n");
    if let Some(b) = body {
        r.push_str(b);
    }
    s.write_all(r.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .expect("status")
        .parse()
        .expect("status code");
    let mut body = raw[split + 4..].to_vec();
    let resp = Resp {
        status,
        headers: head,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp { body, ..resp }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..line_end]).expect("utf8").trim(),
            16,
        )
        .expect("hex");
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

async fn start(dir: &Path, token: Option<&str>) -> (Server, SocketAddr) {
    let server = Server::start(config(dir, token), Vec::new())
        .await
        .expect("server starts");
    let addr = server.http_addr.expect("http enabled");
    (server, addr)
}

const MAC: &str = "52:54:00:e2:e0:01";
const MAC_PATH: &str = "52-54-00-e2-e0-01";

#[tokio::test]
async fn ipxe_script_follows_the_boot_mode_and_a_one_shot_mode_reverts_after_one_boot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start(dir.path(), Some(TOKEN)).await;
    let auth = format!("Bearer {TOKEN}");
    let script =
        |a| async move { req(a, "GET", &format!("/boot/ipxe/{MAC_PATH}"), &[], None).await };

    // Default mode: live, with the kernel line a UEFI EFI stub needs.
    let s = script(addr).await;
    assert_eq!(s.status, 200);
    let t = s.text();
    assert!(t.starts_with("#!ipxe\n"), "{t}");
    assert!(
        t.contains("kernel http://10.213.0.1:8080/boot/live/vmlinuz initrd=initrd.gz BOOTIF=01-52-54-00-e2-e0-01 aula.server=http://10.213.0.1:8080 aula.core=https://core.example.test:8443 console=ttyS0"),
        "{t}"
    );
    assert!(
        t.contains("initrd http://10.213.0.1:8080/boot/live/initrd.gz"),
        "{t}"
    );

    // Permanent local.
    let r = req(
        addr,
        "PUT",
        &format!("/v1/clients/{MAC}/boot"),
        &[("Authorization", &auth)],
        Some(r#"{"mode":"local"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..2 {
        let t = script(addr).await.text();
        assert!(t.contains("sanboot --no-describe --drive 0x80"), "{t}");
        assert!(t.contains("iseq ${platform} efi && goto uefi"), "{t}");
        assert!(!t.contains("kernel "), "{t}");
    }

    // One-shot live: exactly one live script, then local again.
    let r = req(
        addr,
        "PUT",
        &format!("/v1/clients/{MAC}/boot"),
        &[("Authorization", &auth)],
        Some(r#"{"mode":"live","once":true}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["boot_mode"], "live");
    let clients = req(addr, "GET", "/v1/clients", &[], None).await.json();
    let c = clients
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["mac"] == MAC)
        .expect("client listed")
        .clone();
    assert_eq!(c["boot_mode"], "live");
    assert_eq!(c["boot"]["mode"], "local");
    assert_eq!(c["boot"]["once"], "live");

    // The one-shot mode survives a restart until it is used.
    server.shutdown();
    server.wait().await;
    let (server, addr) = start(dir.path(), Some(TOKEN)).await;
    assert!(
        script(addr).await.text().contains("kernel "),
        "one-shot live not served"
    );
    assert!(
        script(addr).await.text().contains("sanboot"),
        "one-shot mode did not revert"
    );
    let c = req(addr, "GET", &format!("/v1/clients/{MAC}"), &[], None)
        .await
        .json();
    assert_eq!(c["boot_mode"], "local");
    assert_eq!(c["last_boot"]["mode"], "local");
    assert!(c["boot"].get("once").is_none(), "{c}");

    // Back to the default.
    let r = req(
        addr,
        "DELETE",
        &format!("/v1/clients/{MAC}/boot"),
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(script(addr).await.text().contains("kernel "));
    assert_eq!(
        req(addr, "GET", "/boot/ipxe/not-a-mac", &[], None)
            .await
            .status,
        400
    );
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn uefi_local_boot_can_exit_to_the_firmware_or_sanboot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), Some(TOKEN));
    cfg.boot.default_mode = aula_bootserver::config::BootMode::Local;
    let server = Server::start(cfg, Vec::new()).await.expect("start");
    let addr = server.http_addr.expect("http");
    let t = req(addr, "GET", &format!("/boot/ipxe/{MAC_PATH}"), &[], None)
        .await
        .text();
    let uefi_part = t.split(":uefi\n").nth(1).expect("uefi label");
    assert!(
        uefi_part.starts_with("exit 1\n"),
        "a failing exit status, so the firmware tries the disk next: {t}"
    );
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn api_writes_without_the_bearer_token_get_401_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start(dir.path(), Some(TOKEN)).await;
    let path = format!("/v1/clients/{MAC}/boot");
    let body = Some(r#"{"mode":"local"}"#);
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token-0123456789")],
        vec![("Authorization", TOKEN)],
    ] {
        let r = req(addr, "PUT", &path, &headers, body).await;
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert!(r.header("www-authenticate").is_some());
        let r = req(addr, "DELETE", &path, &headers, None).await;
        assert_eq!(r.status, 401);
    }
    assert!(
        req(addr, "GET", &format!("/boot/ipxe/{MAC_PATH}"), &[], None)
            .await
            .text()
            .contains("kernel "),
        "mode changed without auth"
    );
    // Bad bodies are 400 even with the token.
    let auth = format!("Bearer {TOKEN}");
    for bad in [
        r#"{"mode":"disk"}"#,
        r#"{"mode":"local","extra":1}"#,
        "not json",
    ] {
        let r = req(addr, "PUT", &path, &[("Authorization", &auth)], Some(bad)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        req(
            addr,
            "PUT",
            "/v1/clients/zz/boot",
            &[("Authorization", &auth)],
            body
        )
        .await
        .status,
        400
    );
    server.shutdown();
    server.wait().await;

    // Without a configured token, writes are refused outright.
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start(dir.path(), None).await;
    let r = req(
        addr,
        "PUT",
        &path,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        body,
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("no api_token"), "{}", r.text());
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn agent_registration_is_stored_and_tokens_are_shown_only_with_authorization() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start(dir.path(), Some(TOKEN)).await;
    let fp = format!("sha256:{}", "ab".repeat(32));
    let reg = serde_json::json!({
        "macs": [MAC, "52:54:00:e2:e0:02"],
        "ips": ["10.213.0.100"],
        "hostname": "pc01",
        "firmware": "uefi",
        "agent_version": "0.1.0",
        "token": "agent-secret-token-1234567890",
        "cert_fingerprint": fp,
        "port": 8443
    })
    .to_string();
    let r = req(addr, "POST", "/v1/agents/register", &[], Some(&reg)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let open = req(addr, "GET", "/v1/agents", &[], None).await;
    assert!(
        !open.text().contains("agent-secret-token"),
        "token leaked: {}",
        open.text()
    );
    let a = &open.json()[0];
    assert_eq!(a["hostname"], "pc01");
    assert_eq!(a["port"], 8443);
    assert_eq!(a["cert_fingerprint"], fp);
    assert!(a["token"].is_null());
    let authed = req(
        addr,
        "GET",
        "/v1/agents",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        None,
    )
    .await;
    assert_eq!(authed.json()[0]["token"], "agent-secret-token-1234567890");

    let clients = req(addr, "GET", "/v1/clients", &[], None).await.json();
    let c = clients
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["mac"] == MAC)
        .expect("client")
        .clone();
    assert_eq!(c["agent_registered"], true);
    assert_eq!(c["ip"], "10.213.0.100");
    assert_eq!(c["hostname"], "pc01");
    assert!(
        c["last_seen"].as_str().is_some_and(|s| s.contains('T')),
        "{c}"
    );

    // Malformed registrations are refused and store nothing.
    for bad in [
        serde_json::json!({"mac": MAC, "agent_version": "1", "token": "short", "cert_fingerprint": fp, "port": 1}),
        serde_json::json!({"mac": MAC, "agent_version": "1", "token": "agent-secret-token-1234567890", "cert_fingerprint": "md5:00", "port": 1}),
        serde_json::json!({"agent_version": "1", "token": "agent-secret-token-1234567890", "cert_fingerprint": fp, "port": 1}),
        serde_json::json!({"mac": MAC, "agent_version": "1", "token": "agent-secret-token-1234567890", "cert_fingerprint": fp, "port": 1, "admin": true}),
    ] {
        let r = req(
            addr,
            "POST",
            "/v1/agents/register",
            &[],
            Some(&bad.to_string()),
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let big = format!(
        "{{\"mac\":\"{MAC}\",\"hostname\":\"{}\"}}",
        "x".repeat(70_000)
    );
    assert_eq!(
        req(addr, "POST", "/v1/agents/register", &[], Some(&big))
            .await
            .status,
        413
    );
    assert_eq!(
        req(addr, "GET", "/v1/agents", &[], None)
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Registrations persist.
    server.shutdown();
    server.wait().await;
    let (server, addr) = start(dir.path(), Some(TOKEN)).await;
    assert_eq!(
        req(addr, "GET", "/v1/agents", &[], None).await.json()[0]["hostname"],
        "pc01"
    );
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn live_kernel_and_initrd_are_served_with_range_support() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start(dir.path(), None).await;
    let kernel = std::fs::read(dir.path().join("live/vmlinuz")).expect("kernel");
    let full = req(addr, "GET", "/boot/live/vmlinuz", &[], None).await;
    assert_eq!(full.status, 200);
    assert!(full.body == kernel, "full download differs");
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));

    let part = req(
        addr,
        "GET",
        "/boot/live/vmlinuz",
        &[("Range", "bytes=1000-1999")],
        None,
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range").as_deref(),
        Some("bytes 1000-1999/200000")
    );
    assert!(part.body == kernel[1000..2000]);
    let tail = req(
        addr,
        "GET",
        "/boot/live/vmlinuz",
        &[("Range", "bytes=-10")],
        None,
    )
    .await;
    assert!(tail.body == kernel[kernel.len() - 10..]);
    let open = req(
        addr,
        "GET",
        "/boot/live/vmlinuz",
        &[("Range", "bytes=199990-")],
        None,
    )
    .await;
    assert!(open.body == kernel[199_990..]);
    let bad = req(
        addr,
        "GET",
        "/boot/live/vmlinuz",
        &[("Range", "bytes=300000-")],
        None,
    )
    .await;
    assert_eq!(bad.status, 416);
    assert_eq!(
        bad.header("content-range").as_deref(),
        Some("bytes */200000")
    );
    let head = req(addr, "HEAD", "/boot/live/vmlinuz", &[], None).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length").as_deref(), Some("200000"));
    assert!(head.body.is_empty());
    assert_eq!(
        req(addr, "GET", "/boot/live/initrd.gz", &[], None)
            .await
            .body,
        b"initrd-bytes"
    );
    assert_eq!(
        req(addr, "GET", "/boot/live/passwd", &[], None)
            .await
            .status,
        404
    );
    assert_eq!(
        req(addr, "POST", "/boot/live/vmlinuz", &[], Some("{}"))
            .await
            .status,
        405
    );
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn boot_programs_over_http_stay_inside_the_tftp_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), None);
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("ipxe.efi"), b"EFI program").expect("write");
    std::fs::write(dir.path().join("secret"), b"secret").expect("write");
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).expect("symlink");
    cfg.tftp.root = root;
    let server = Server::start(cfg, Vec::new()).await.expect("start");
    let addr = server.http_addr.expect("http");
    assert_eq!(
        req(addr, "GET", "/boot/programs/ipxe.efi", &[], None)
            .await
            .body,
        b"EFI program"
    );
    for bad in [
        "/boot/programs/../secret",
        "/boot/programs/link",
        "/boot/programs//etc/passwd",
    ] {
        let r = req(addr, "GET", bad, &[], None).await;
        assert!(r.status == 403 || r.status == 404, "{bad}: {}", r.status);
        assert!(!r.text().contains("secret"), "{bad} leaked");
    }
    server.shutdown();
    server.wait().await;
}

struct Images;

impl RouteGroup for Images {
    fn name(&self) -> &'static str {
        "repository"
    }
    fn matches(&self, path: &str) -> bool {
        path.starts_with("/v1/images")
    }
    fn handle(&self, _req: HttpRequest, _ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async { http::json(hyper::StatusCode::OK, &serde_json::json!(["win11-lab"])) })
    }
}

#[tokio::test]
async fn embedders_can_add_route_groups_beside_the_built_in_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(dir.path(), None), vec![Arc::new(Images)])
        .await
        .expect("start");
    let addr = server.http_addr.expect("http");
    assert_eq!(
        req(addr, "GET", "/v1/images", &[], None).await.json()[0],
        "win11-lab"
    );
    assert_eq!(
        req(addr, "GET", "/v1/status", &[], None).await.json()["service"],
        "aula-bootserver"
    );
    assert_eq!(req(addr, "GET", "/v1/nothing", &[], None).await.status, 404);
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn https_listener_serves_the_same_routes_and_the_kernel_line_pins_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=aula-test",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let fp_out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .expect("openssl fingerprint");
    let fp_text = String::from_utf8_lossy(&fp_out.stdout);
    let expected_fp = format!(
        "sha256:{}",
        fp_text
            .trim()
            .split('=')
            .nth(1)
            .expect("fingerprint")
            .replace(':', "")
            .to_ascii_lowercase()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("probe port")
        .local_addr()
        .expect("addr")
        .port();
    let mut cfg = config(dir.path(), Some(TOKEN));
    cfg.http.tls = Some(aula_bootserver::config::TlsConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], port)),
        cert: cert.clone(),
        key,
    });
    let server = Server::start(cfg, Vec::new())
        .await
        .expect("start with TLS");
    assert_eq!(
        server.tls_fingerprint.as_deref(),
        Some(expected_fp.as_str())
    );
    let addr = server.http_addr.expect("http");
    let t = req(addr, "GET", &format!("/boot/ipxe/{MAC_PATH}"), &[], None)
        .await
        .text();
    assert!(
        t.contains(&format!("aula.server=https://10.213.0.1:{port} ")),
        "{t}"
    );
    assert!(t.contains(&format!("aula.server_fp={expected_fp}")), "{t}");
    // A client that trusts only this certificate reaches the API over TLS.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "--cacert"])
        .arg(&cert)
        .arg(format!("https://127.0.0.1:{port}/v1/status"))
        .output()
        .await
        .expect("curl");
    let body: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status JSON over HTTPS");
    assert_eq!(body["service"], "aula-bootserver");
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn an_agent_may_set_only_its_own_machines_boot_mode_and_post_signed_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start(dir.path(), Some(TOKEN)).await;
    let agent_token = "agent-own-token-abcdef0123456789";
    let reg = serde_json::json!({
        "mac": MAC, "ips": ["10.213.0.100"], "agent_version": "0.1.0",
        "token": agent_token, "cert_fingerprint": format!("sha256:{}", "cd".repeat(32)), "port": 8000
    })
    .to_string();
    assert_eq!(
        req(addr, "POST", "/v1/agents/register", &[], Some(&reg))
            .await
            .status,
        200
    );
    let auth = format!("Bearer {agent_token}");
    let body = r#"{"mode":"local","once":true}"#;
    // Its own machine: allowed.
    let r = req(
        addr,
        "PUT",
        &format!("/v1/clients/{MAC}/boot"),
        &[("Authorization", &auth)],
        Some(body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Another machine: refused.
    let r = req(
        addr,
        "PUT",
        "/v1/clients/52:54:00:99:99:99/boot",
        &[("Authorization", &auth)],
        Some(body),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());

    // Webhook events: accepted only with a valid HMAC of the body.
    let event = serde_json::json!({"agent": {"mac": MAC, "ip": "10.213.0.100"}, "job_id": "RestaurarImagen-0011aabb", "state": "running", "seq": 1}).to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, agent_token.as_bytes());
    let sig: String = ring::hmac::sign(&key, event.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let good = format!("sha256={sig}");
    let r = req(
        addr,
        "POST",
        "/v1/agents/events",
        &[("X-Aula-Signature", &good)],
        Some(&event),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bad = format!("sha256={}", "00".repeat(32));
    let r = req(
        addr,
        "POST",
        "/v1/agents/events",
        &[("X-Aula-Signature", &bad)],
        Some(&event),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = req(addr, "POST", "/v1/agents/events", &[], Some(&event)).await;
    assert_eq!(r.status, 401);
    let events = req(addr, "GET", &format!("/v1/agents/{MAC}/events"), &[], None)
        .await
        .json();
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(events[0]["job_id"], "RestaurarImagen-0011aabb");
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn an_agent_uploads_with_its_own_token_only_while_its_machine_has_a_capture_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), Some(TOKEN));
    cfg.repository.enabled = true;
    cfg.repository.root = Some(dir.path().join("repo"));
    let server = Server::start(cfg, Vec::new()).await.expect("start");
    let addr = server.http_addr.expect("http");
    let agent_token = "agent-capture-token-0123456789";
    let reg = serde_json::json!({
        "mac": MAC, "agent_version": "0.1.0", "token": agent_token,
        "cert_fingerprint": format!("sha256:{}", "ef".repeat(32)), "port": 8000
    })
    .to_string();
    assert_eq!(
        req(addr, "POST", "/v1/agents/register", &[], Some(&reg))
            .await
            .status,
        200
    );
    // A chunk upload: zstd frame of 1000 'a' bytes, sent raw.
    let content = vec![b'a'; 1000];
    let frame = zstd::bulk::compress(&content, 3).expect("zstd");
    let id: String = ring::digest::digest(&ring::digest::SHA256, &content)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let put = |auth: String| {
        let frame = frame.clone();
        let id = id.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let head = format!(
                "PUT /v1/chunks/{id} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                frame.len()
            );
            s.write_all(head.as_bytes()).await.expect("write");
            s.write_all(&frame).await.expect("write");
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.expect("read");
            String::from_utf8_lossy(&out)
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0)
        }
    };
    assert_eq!(put(agent_token.into()).await, 401, "no grant yet");
    let r = req(
        addr,
        "PUT",
        &format!("/v1/clients/{MAC}/capture"),
        &[("Authorization", &format!("Bearer {agent_token}"))],
        Some(r#"{"minutes":5}"#),
    )
    .await;
    assert_eq!(r.status, 401, "an agent cannot grant itself capture rights");
    let r = req(
        addr,
        "PUT",
        &format!("/v1/clients/{MAC}/capture"),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        Some(r#"{"minutes":5}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(put(agent_token.into()).await, 201, "granted");
    assert_eq!(put("some-other-token-0123456789".into()).await, 401);
    let r = req(
        addr,
        "DELETE",
        &format!("/v1/clients/{MAC}/capture"),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(put(agent_token.into()).await, 401, "revoked");
    server.shutdown();
    server.wait().await;
}
