//! HTTP(S) tests against the server started in-process through the library,
//! on loopback (no DHCP/TFTP): iPXE scripts and boot modes, the API and its
//! authorization, agent registration bound to the boot, live files with
//! Range, extra route groups, HTTPS by default, file modes.
//!
//! Without DHCP, a script request counts as the machine's own when the URL
//! carries the `ip=`/`mac=` iPXE would put there and the request comes from
//! that address: these tests fetch scripts that way from 127.0.0.1, as the
//! machine would.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use aula_bootserver::config::Config;
use aula_bootserver::http::{
    self, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use aula_bootserver::Server;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789abcdef";
const VIEWER: &str = "viewer-token-0123456789abcdef";

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
viewer_token = "{VIEWER}"
[http.tls]
bind = "127.0.0.1:0"
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

/// A minimal HTTP/1.1 client over plain TCP (one request per connection).
async fn req(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    exchange(s, method, path, headers, body).await
}

/// The same over TLS, trusting only the certificate with `fingerprint`.
async fn sreq(
    addr: SocketAddr,
    fingerprint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    let pin = aula_imager::tls::parse_fingerprint(fingerprint).expect("fingerprint");
    let cfg = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin))
        .expect("client config");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("aula-bootserver").expect("name");
    let s = connector.connect(name, tcp).await.expect("TLS handshake");
    exchange(s, method, path, headers, body).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
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
    // A TLS peer may close without close_notify after a complete answer.
    let _ = s.read_to_end(&mut raw).await;
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

/// A running server: plain HTTP for firmware, HTTPS (its own certificate,
/// pinned) for everything else.
struct T {
    server: Server,
    http: SocketAddr,
    https: SocketAddr,
    fp: String,
}

impl T {
    /// Over plain HTTP (what firmware fetches).
    async fn plain(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        req(self.http, method, path, headers, body).await
    }
    /// Over HTTPS, pinned.
    async fn api(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        sreq(self.https, &self.fp, method, path, headers, body).await
    }
    /// The script of `MAC` as the machine itself asks for it (iPXE puts its
    /// address and MAC in the URL; the request comes from that address).
    async fn own_script(&self) -> Resp {
        self.plain(
            "GET",
            &format!("/boot/ipxe/{MAC_PATH}?ip=127.0.0.1&mac={MAC}"),
            &[],
            None,
        )
        .await
    }
    async fn stop(self) {
        self.server.shutdown();
        self.server.wait().await;
    }
}

async fn start_cfg(cfg: Config) -> T {
    let server = Server::start(cfg, Vec::new()).await.expect("server starts");
    T {
        http: server.http_addr.expect("http enabled"),
        https: server.https_addr.expect("https on by default"),
        fp: server.tls_fingerprint.clone().expect("fingerprint"),
        server,
    }
}

async fn start(dir: &Path, token: Option<&str>) -> T {
    start_cfg(config(dir, token)).await
}

/// The `aula.boot=` nonce on a live script's kernel line.
fn nonce_of(script: &str) -> String {
    script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("aula.boot="))
        .expect("aula.boot= on the kernel line")
        .to_string()
}

fn registration(mac: &str, token: &str, fp: &str, nonce: &str) -> String {
    serde_json::json!({
        "mac": mac, "ips": ["127.0.0.1"], "hostname": "pc01", "firmware": "uefi",
        "agent_version": "0.1.0", "token": token, "cert_fingerprint": fp, "port": 8000,
        "boot_nonce": nonce,
    })
    .to_string()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

const MAC: &str = "52:54:00:e2:e0:01";
const MAC_PATH: &str = "52-54-00-e2-e0-01";

#[tokio::test]
async fn ipxe_script_follows_the_boot_mode_and_a_one_shot_mode_reverts_after_one_boot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let auth = bearer(TOKEN);

    // Default mode: live, with the kernel line a UEFI EFI stub needs, the
    // HTTPS server URL, its pin and this boot's nonce.
    let s = t.own_script().await;
    assert_eq!(s.status, 200);
    let text = s.text();
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    let expected = format!(
        "kernel http://10.213.0.1:8080/boot/live/vmlinuz initrd=initrd.gz BOOTIF=01-52-54-00-e2-e0-01 aula.server=https://10.213.0.1:{} aula.core=https://core.example.test:8443 aula.server_fp={} aula.boot=",
        t.https.port(),
        t.fp
    );
    assert!(text.contains(&expected), "{text}\nwanted: {expected}");
    assert!(text.contains(" console=ttyS0"), "{text}");
    assert!(
        text.contains("initrd http://10.213.0.1:8080/boot/live/initrd.gz"),
        "{text}"
    );
    assert_eq!(nonce_of(&text).len(), 32);

    // Permanent local.
    let r = t
        .api(
            "PUT",
            &format!("/v1/clients/{MAC}/boot"),
            &[("Authorization", &auth)],
            Some(r#"{"mode":"local"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..2 {
        let text = t.own_script().await.text();
        assert!(
            text.contains("sanboot --no-describe --drive 0x80"),
            "{text}"
        );
        assert!(text.contains("iseq ${platform} efi && goto uefi"), "{text}");
        assert!(!text.contains("kernel "), "{text}");
    }

    // One-shot live: exactly one live script, then local again.
    let r = t
        .api(
            "PUT",
            &format!("/v1/clients/{MAC}/boot"),
            &[("Authorization", &auth)],
            Some(r#"{"mode":"live","once":true}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["boot_mode"], "live");
    let clients = t
        .api("GET", "/v1/clients", &[("Authorization", &auth)], None)
        .await
        .json();
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
    t.stop().await;
    let t = start(dir.path(), Some(TOKEN)).await;
    assert!(
        t.own_script().await.text().contains("kernel "),
        "one-shot live not served"
    );
    assert!(
        t.own_script().await.text().contains("sanboot"),
        "one-shot mode did not revert"
    );
    let c = t
        .api(
            "GET",
            &format!("/v1/clients/{MAC}"),
            &[("Authorization", &auth)],
            None,
        )
        .await
        .json();
    assert_eq!(c["boot_mode"], "local");
    assert_eq!(c["last_boot"]["mode"], "local");
    assert!(c["boot"].get("once").is_none(), "{c}");

    // Back to the default.
    let r = t
        .api(
            "DELETE",
            &format!("/v1/clients/{MAC}/boot"),
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(t.own_script().await.text().contains("kernel "));
    assert_eq!(
        t.plain("GET", "/boot/ipxe/not-a-mac", &[], None)
            .await
            .status,
        400
    );
    t.stop().await;
}

/// Issue 12, point 8: fetching a machine's script from anywhere but the
/// machine must not consume its one-shot mode (nor open a registration
/// window).
#[tokio::test]
async fn a_script_request_from_another_address_consumes_no_one_shot_mode_and_opens_no_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let auth = bearer(TOKEN);
    for body in [r#"{"mode":"local"}"#, r#"{"mode":"live","once":true}"#] {
        let r = t
            .api(
                "PUT",
                &format!("/v1/clients/{MAC}/boot"),
                &[("Authorization", &auth)],
                Some(body),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Someone else asks for the machine's script: no ip=/mac=, another
    // address in the URL, another machine's MAC in the URL.
    for q in [
        String::new(),
        format!("?ip=10.213.0.77&mac={MAC}"),
        "?ip=127.0.0.1&mac=52:54:00:99:99:99".to_string(),
    ] {
        let text = t
            .plain("GET", &format!("/boot/ipxe/{MAC_PATH}{q}"), &[], None)
            .await
            .text();
        assert!(
            text.contains("sanboot") && !text.contains("kernel "),
            "{q:?}: a stranger got the one-shot live script: {text}"
        );
    }
    let c = t
        .api(
            "GET",
            &format!("/v1/clients/{MAC}"),
            &[("Authorization", &auth)],
            None,
        )
        .await
        .json();
    assert_eq!(
        c["boot"]["once"], "live",
        "one-shot consumed by a stranger: {c}"
    );
    assert!(c["session"].is_null(), "a stranger opened a window: {c}");
    // The machine itself still gets its one live boot, and a window.
    let text = t.own_script().await.text();
    assert!(text.contains("kernel "), "{text}");
    let c = t
        .api(
            "GET",
            &format!("/v1/clients/{MAC}"),
            &[("Authorization", &auth)],
            None,
        )
        .await
        .json();
    assert!(c["boot"].get("once").is_none(), "{c}");
    assert_eq!(c["session"]["bound"], false, "{c}");
    t.stop().await;
}

#[tokio::test]
async fn uefi_local_boot_can_exit_to_the_firmware_or_sanboot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), Some(TOKEN));
    cfg.boot.default_mode = aula_bootserver::config::BootMode::Local;
    let t = start_cfg(cfg).await;
    let text = t.own_script().await.text();
    let uefi_part = text.split(":uefi\n").nth(1).expect("uefi label");
    assert!(
        uefi_part.starts_with("exit 1\n"),
        "a failing exit status, so the firmware tries the disk next: {text}"
    );
    t.stop().await;
}

#[tokio::test]
async fn api_writes_without_the_right_token_get_401_or_403_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let path = format!("/v1/clients/{MAC}/boot");
    let body = Some(r#"{"mode":"local"}"#);
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token-0123456789")],
        vec![("Authorization", "Basic dGVzdDp0ZXN0")],
    ] {
        let r = t.api("PUT", &path, &headers, body).await;
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert!(r.header("www-authenticate").is_some());
        let r = t.api("DELETE", &path, &headers, None).await;
        assert_eq!(r.status, 401);
    }
    // The viewer reads but changes nothing.
    let r = t
        .api("PUT", &path, &[("Authorization", &bearer(VIEWER))], body)
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        t.own_script().await.text().contains("kernel "),
        "mode changed without auth"
    );
    // Over plain HTTP the API is not served at all while HTTPS is on.
    let r = t
        .plain("PUT", &path, &[("Authorization", &bearer(TOKEN))], body)
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("HTTPS"), "{}", r.text());
    // The token as OpenGnsys sends it, without a scheme, is accepted.
    let r = t.api("PUT", &path, &[("Authorization", TOKEN)], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Bad bodies are 400 even with the token.
    let auth = bearer(TOKEN);
    for bad in [
        r#"{"mode":"disk"}"#,
        r#"{"mode":"local","extra":1}"#,
        "not json",
    ] {
        let r = t
            .api("PUT", &path, &[("Authorization", &auth)], Some(bad))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        t.api(
            "PUT",
            "/v1/clients/zz/boot",
            &[("Authorization", &auth)],
            body
        )
        .await
        .status,
        400
    );
    t.stop().await;

    // Without a configured token, writes are refused outright.
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), None).await;
    let r = t
        .api("PUT", &path, &[("Authorization", &bearer(TOKEN))], body)
        .await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("no api_token"), "{}", r.text());
    t.stop().await;
}

/// Issue 12, point 5: the lab's lists and the agents' events are not open.
#[tokio::test]
async fn clients_leases_agents_and_events_need_the_api_or_viewer_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let reads = [
        "/v1/clients".to_string(),
        format!("/v1/clients/{MAC}"),
        "/v1/leases".to_string(),
        "/v1/agents".to_string(),
        format!("/v1/agents/{MAC}/events"),
    ];
    // Make the machine known so /v1/clients/{mac} exists.
    t.own_script().await;
    for path in &reads {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer not-a-token-0123456789")],
        ] {
            let r = t.api("GET", path, &headers, None).await;
            assert_eq!(r.status, 401, "{path} {headers:?}: {}", r.text());
        }
        for who in [TOKEN, VIEWER] {
            let r = t
                .api("GET", path, &[("Authorization", &bearer(who))], None)
                .await;
            assert_eq!(r.status, 200, "{path} as {who}: {}", r.text());
        }
        let r = t
            .plain("GET", path, &[("Authorization", &bearer(TOKEN))], None)
            .await;
        assert_eq!(r.status, 403, "{path} over plain HTTP: {}", r.text());
    }
    assert_eq!(t.api("GET", "/v1/status", &[], None).await.status, 200);
    t.stop().await;
}

#[tokio::test]
async fn agent_registration_is_stored_and_tokens_are_shown_only_to_the_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let fp = format!("sha256:{}", "ab".repeat(32));
    let nonce = nonce_of(&t.own_script().await.text());
    let reg = serde_json::json!({
        "macs": [MAC, "52:54:00:e2:e0:02"],
        "ips": ["10.213.0.100"],
        "hostname": "pc01",
        "firmware": "uefi",
        "agent_version": "0.1.0",
        "token": "agent-secret-token-1234567890",
        "cert_fingerprint": fp,
        "port": 8443,
        "boot_nonce": nonce,
    })
    .to_string();
    let r = t.api("POST", "/v1/agents/register", &[], Some(&reg)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["registered"], true);
    assert!(
        r.json()["repository"].is_null(),
        "no repository in this config: {}",
        r.text()
    );

    assert_eq!(t.api("GET", "/v1/agents", &[], None).await.status, 401);
    let viewer = t
        .api(
            "GET",
            "/v1/agents",
            &[("Authorization", &bearer(VIEWER))],
            None,
        )
        .await;
    assert!(
        !viewer.text().contains("agent-secret-token"),
        "token leaked to the viewer: {}",
        viewer.text()
    );
    let a = &viewer.json()[0];
    assert_eq!(a["hostname"], "pc01");
    assert_eq!(a["port"], 8443);
    assert_eq!(a["cert_fingerprint"], fp);
    assert!(a["token"].is_null());
    let admin = t
        .api(
            "GET",
            "/v1/agents",
            &[("Authorization", &bearer(TOKEN))],
            None,
        )
        .await;
    assert_eq!(admin.json()[0]["token"], "agent-secret-token-1234567890");

    let clients = t
        .api(
            "GET",
            "/v1/clients",
            &[("Authorization", &bearer(VIEWER))],
            None,
        )
        .await
        .json();
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
    assert_eq!(c["session"]["bound"], true);
    assert!(
        c["last_seen"].as_str().is_some_and(|s| s.contains('T')),
        "{c}"
    );
    // An extra MAC an agent lists confers nothing: that machine has no agent.
    assert!(clients
        .as_array()
        .expect("array")
        .iter()
        .all(|c| c["mac"] != "52:54:00:e2:e0:02" || c["agent_registered"] == false));

    // Malformed registrations are refused and store nothing.
    for bad in [
        serde_json::json!({"mac": MAC, "agent_version": "1", "token": "short", "cert_fingerprint": fp, "port": 1, "boot_nonce": nonce}),
        serde_json::json!({"mac": MAC, "agent_version": "1", "token": "agent-secret-token-1234567890", "cert_fingerprint": "md5:00", "port": 1}),
        serde_json::json!({"agent_version": "1", "token": "agent-secret-token-1234567890", "cert_fingerprint": fp, "port": 1}),
        serde_json::json!({"mac": MAC, "agent_version": "1", "token": "agent-secret-token-1234567890", "cert_fingerprint": fp, "port": 1, "admin": true}),
    ] {
        let r = t
            .api("POST", "/v1/agents/register", &[], Some(&bad.to_string()))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let big = format!(
        "{{\"mac\":\"{MAC}\",\"hostname\":\"{}\"}}",
        "x".repeat(70_000)
    );
    assert_eq!(
        t.api("POST", "/v1/agents/register", &[], Some(&big))
            .await
            .status,
        413
    );
    assert_eq!(
        t.api(
            "GET",
            "/v1/agents",
            &[("Authorization", &bearer(TOKEN))],
            None
        )
        .await
        .json()
        .as_array()
        .map(Vec::len),
        Some(1)
    );

    // Registrations persist.
    t.stop().await;
    let t = start(dir.path(), Some(TOKEN)).await;
    assert_eq!(
        t.api(
            "GET",
            "/v1/agents",
            &[("Authorization", &bearer(TOKEN))],
            None
        )
        .await
        .json()[0]["hostname"],
        "pc01"
    );
    t.stop().await;
}

/// Issue 12, point 1: an anonymous registration cannot take a machine over.
#[tokio::test]
async fn a_takeover_of_a_registered_machine_is_refused_and_an_exact_repeat_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let fp = format!("sha256:{}", "ab".repeat(32));
    let evil_fp = format!("sha256:{}", "ee".repeat(32));
    // Without a live boot of the machine there is no window at all.
    let r = t
        .api(
            "POST",
            "/v1/agents/register",
            &[],
            Some(&registration(
                MAC,
                "agent-early-token-0123456789",
                &fp,
                "00",
            )),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("PXE-boot"), "{}", r.text());

    let nonce = nonce_of(&t.own_script().await.text());
    // A wrong nonce is refused even inside the window.
    let r = t
        .api(
            "POST",
            "/v1/agents/register",
            &[],
            Some(&registration(
                MAC,
                "agent-evil-token-0123456789",
                &evil_fp,
                "0123",
            )),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let good = registration(MAC, "agent-real-token-0123456789", &fp, &nonce);
    let r = t.api("POST", "/v1/agents/register", &[], Some(&good)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The takeover: same MAC, another token and certificate, even with the
    // boot's nonce (the script is served in clear).
    let evil = registration(MAC, "agent-evil-token-0123456789", &evil_fp, &nonce);
    let r = t.api("POST", "/v1/agents/register", &[], Some(&evil)).await;
    assert_eq!(r.status, 403, "takeover accepted: {}", r.text());
    assert!(r.text().contains("bound"), "{}", r.text());
    let agents = t
        .api(
            "GET",
            "/v1/agents",
            &[("Authorization", &bearer(TOKEN))],
            None,
        )
        .await
        .json();
    assert_eq!(agents.as_array().map(Vec::len), Some(1), "{agents}");
    assert_eq!(agents[0]["token"], "agent-real-token-0123456789");
    assert_eq!(agents[0]["cert_fingerprint"], fp);
    // The refused registration cannot act for the machine either.
    let r = t
        .api(
            "PUT",
            &format!("/v1/clients/{MAC}/boot"),
            &[("Authorization", &bearer("agent-evil-token-0123456789"))],
            Some(r#"{"mode":"local","once":true}"#),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    // The real agent restarted in the same boot registers again.
    let r = t.api("POST", "/v1/agents/register", &[], Some(&good)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["repeat"], true);
    t.stop().await;
}

/// Issue 12, point 3: HTTPS with the server's own certificate on the
/// default path (no `[http.tls]` section), pinned on the kernel line.
#[tokio::test]
async fn https_is_on_by_default_with_a_kept_certificate_pinned_on_the_kernel_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), Some(TOKEN));
    // The default path: no certificate configured; only the port is a test's.
    cfg.http.tls = aula_bootserver::config::TlsConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    };
    let t = start_cfg(cfg.clone()).await;
    let cert = dir.path().join("data/tls/server.crt");
    let pem = std::fs::read_to_string(&cert).expect("the server kept its certificate");
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    let fp = aula_imager::tls::fingerprint(der.as_ref());
    assert_eq!(t.fp, fp);
    let text = t.own_script().await.text();
    assert!(
        text.contains(&format!(
            "aula.server=https://10.213.0.1:{} ",
            t.https.port()
        )),
        "{text}"
    );
    assert!(text.contains(&format!("aula.server_fp={fp} ")), "{text}");
    assert!(!text.contains("aula.tls=off"), "{text}");
    // A client trusting only that pin gets the API; a wrong pin gets nothing.
    assert_eq!(
        t.api("GET", "/v1/status", &[], None).await.json()["tls"],
        true
    );
    let wrong = format!("sha256:{}", "00".repeat(32));
    let pin = aula_imager::tls::parse_fingerprint(&wrong).expect("pin");
    let c = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin)).expect("cfg");
    let tcp = tokio::net::TcpStream::connect(t.https)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("x").expect("name");
    assert!(
        tokio_rustls::TlsConnector::from(Arc::new(c))
            .connect(name, tcp)
            .await
            .is_err(),
        "a wrong pin was accepted"
    );
    // The certificate survives a restart: machines booted before keep
    // their pin.
    t.stop().await;
    let t = start_cfg(cfg).await;
    assert_eq!(t.fp, fp);
    t.stop().await;

    // HTTPS off, on purpose: the kernel line says so plainly.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), Some(TOKEN));
    cfg.http.tls.enabled = false;
    let server = Server::start(cfg, Vec::new()).await.expect("start");
    assert!(server.https_addr.is_none());
    let text = req(
        server.http_addr.expect("http"),
        "GET",
        &format!("/boot/ipxe/{MAC_PATH}?ip=127.0.0.1&mac={MAC}"),
        &[],
        None,
    )
    .await
    .text();
    assert!(
        text.contains("aula.server=http://10.213.0.1:8080 ") && text.contains(" aula.tls=off "),
        "{text}"
    );
    server.shutdown();
    server.wait().await;
}

/// Issue 12, point 7: what the server writes is private.
#[tokio::test]
async fn the_data_directory_is_0700_and_state_keys_and_leases_are_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An existing data directory readable by all is narrowed.
    std::fs::create_dir_all(dir.path().join("data")).expect("mkdir");
    std::fs::set_permissions(
        dir.path().join("data"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let t = start(dir.path(), Some(TOKEN)).await;
    let nonce = nonce_of(&t.own_script().await.text());
    let fp = format!("sha256:{}", "ab".repeat(32));
    let r = t
        .api(
            "POST",
            "/v1/agents/register",
            &[],
            Some(&registration(
                MAC,
                "agent-secret-token-0123456789",
                &fp,
                &nonce,
            )),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("data"), 0o700);
    assert_eq!(mode("data/tls"), 0o700);
    let state = std::fs::read_to_string(dir.path().join("data/state.json")).expect("state");
    assert!(
        state.contains("agent-secret-token"),
        "the state holds tokens"
    );
    assert_eq!(
        mode("data/state.json"),
        0o600,
        "state.json holds agents' tokens"
    );
    assert_eq!(mode("data/tls/server.key"), 0o600);
    assert_eq!(mode("data/tls/server.crt"), 0o600);
    t.stop().await;
}

#[tokio::test]
async fn live_kernel_and_initrd_are_served_with_range_support() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), None).await;
    let addr = t.http;
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
    t.stop().await;
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
    let t = start_cfg(cfg).await;
    let addr = t.http;
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
    t.stop().await;
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
async fn embedders_can_add_route_groups_beside_the_built_in_ones_served_over_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(dir.path(), None), vec![Arc::new(Images)])
        .await
        .expect("start");
    let t = T {
        http: server.http_addr.expect("http"),
        https: server.https_addr.expect("https"),
        fp: server.tls_fingerprint.clone().expect("fp"),
        server,
    };
    assert_eq!(
        t.api("GET", "/v1/images", &[], None).await.json()[0],
        "win11-lab"
    );
    assert_eq!(
        t.api("GET", "/v1/status", &[], None).await.json()["service"],
        "aula-bootserver"
    );
    assert_eq!(t.api("GET", "/v1/nothing", &[], None).await.status, 404);
    // Not a firmware route: not on plain HTTP.
    assert_eq!(t.plain("GET", "/v1/images", &[], None).await.status, 403);
    t.stop().await;
}

#[tokio::test]
async fn a_configured_certificate_is_served_and_pinned_on_the_kernel_line() {
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
    cfg.http.tls = aula_bootserver::config::TlsConfig {
        enabled: true,
        bind: SocketAddr::from(([127, 0, 0, 1], port)),
        cert: Some(cert.clone()),
        key: Some(key),
    };
    let t = start_cfg(cfg).await;
    assert_eq!(t.fp, expected_fp);
    let text = t.own_script().await.text();
    assert!(
        text.contains(&format!("aula.server=https://10.213.0.1:{port} ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("aula.server_fp={expected_fp}")),
        "{text}"
    );
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
    assert!(
        !dir.path().join("data/tls").exists(),
        "no certificate made when one is configured"
    );
    t.stop().await;
}

#[tokio::test]
async fn an_agent_may_set_only_its_own_machines_boot_mode_and_post_signed_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(dir.path(), Some(TOKEN)).await;
    let agent_token = "agent-own-token-abcdef0123456789";
    let nonce = nonce_of(&t.own_script().await.text());
    let reg = registration(
        MAC,
        agent_token,
        &format!("sha256:{}", "cd".repeat(32)),
        &nonce,
    );
    assert_eq!(
        t.api("POST", "/v1/agents/register", &[], Some(&reg))
            .await
            .status,
        200
    );
    let auth = bearer(agent_token);
    let body = r#"{"mode":"local","once":true}"#;
    // Its own machine: allowed.
    let r = t
        .api(
            "PUT",
            &format!("/v1/clients/{MAC}/boot"),
            &[("Authorization", &auth)],
            Some(body),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Another machine: refused.
    let r = t
        .api(
            "PUT",
            "/v1/clients/52:54:00:99:99:99/boot",
            &[("Authorization", &auth)],
            Some(body),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());

    // Webhook events: accepted only with a valid HMAC of the body.
    let event = serde_json::json!({"agent": {"mac": MAC, "ip": "10.213.0.100"}, "job_id": "RestaurarImagen-0011aabb", "state": "running", "seq": 1}).to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, agent_token.as_bytes());
    let sig: String = ring::hmac::sign(&key, event.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let good = format!("sha256={sig}");
    let r = t
        .api(
            "POST",
            "/v1/agents/events",
            &[("X-Aula-Signature", &good)],
            Some(&event),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bad = format!("sha256={}", "00".repeat(32));
    let r = t
        .api(
            "POST",
            "/v1/agents/events",
            &[("X-Aula-Signature", &bad)],
            Some(&event),
        )
        .await;
    assert_eq!(r.status, 401);
    let r = t.api("POST", "/v1/agents/events", &[], Some(&event)).await;
    assert_eq!(r.status, 401);
    // The agent's own token does not read the lab.
    let r = t
        .api(
            "GET",
            &format!("/v1/agents/{MAC}/events"),
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let events = t
        .api(
            "GET",
            &format!("/v1/agents/{MAC}/events"),
            &[("Authorization", &bearer(VIEWER))],
            None,
        )
        .await
        .json();
    assert_eq!(events.as_array().map(Vec::len), Some(1), "{events}");
    assert_eq!(events[0]["job_id"], "RestaurarImagen-0011aabb");
    t.stop().await;
}

/// Issue 12, point 2: a capture grant uploads chunks and publishes the one
/// image it names, with the upload token; nothing else.
#[tokio::test]
async fn a_capture_grant_uploads_and_publishes_one_image_name_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), Some(TOKEN));
    cfg.repository.enabled = true;
    cfg.repository.root = Some(dir.path().join("repo"));
    let t = start_cfg(cfg).await;
    let agent_token = "agent-capture-token-0123456789";
    let upload = aula_imager::tls::upload_token(agent_token);
    let nonce = nonce_of(&t.own_script().await.text());
    let reg = registration(
        MAC,
        agent_token,
        &format!("sha256:{}", "ef".repeat(32)),
        &nonce,
    );
    assert_eq!(
        t.api("POST", "/v1/agents/register", &[], Some(&reg))
            .await
            .status,
        200
    );
    // A real image made locally, to upload chunk by chunk.
    let local = aula_imager::repo::LocalRepo::open(&dir.path().join("local"), true).expect("local");
    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    std::fs::write(&src, &data).expect("src");
    let dev = Arc::new(aula_imager::device::Device::open_read(&src).expect("open"));
    let m = aula_imager::image::create_image(
        "lab-os",
        dev,
        None,
        &local,
        &aula_imager::create::CreateOptions {
            raw: true,
            chunk_size: 1 << 20,
            ..Default::default()
        },
        &aula_imager::progress::Progress::new(),
    )
    .expect("local image");
    let (id, _) = m.unique_chunks()[0];
    let mut frame = Vec::new();
    aula_imager::repo::Repository::get_chunk(&local, &id, &mut frame).expect("frame");
    let addr = t.https;
    let fp = t.fp.clone();
    let put = |path: String, auth: String, body: Vec<u8>, image: Option<&'static str>| {
        let fp = fp.clone();
        async move {
            let pin = aula_imager::tls::parse_fingerprint(&fp).expect("fp");
            let cfg = aula_imager::tls::client_config(&aula_imager::tls::ServerTrust::Pin(pin))
                .expect("cfg");
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("aula-bootserver").expect("name");
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .expect("tls");
            let extra = image
                .map(|i| format!("X-Aula-Image: {i}\r\n"))
                .unwrap_or_default();
            let head = format!(
                "PUT {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {auth}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.expect("write");
            s.write_all(&body).await.expect("write");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out)
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or(0)
        }
    };
    let chunk_path = format!("/v1/chunks/{id}");
    assert_eq!(
        put(chunk_path.clone(), upload.clone(), frame.clone(), None).await,
        401,
        "no grant yet"
    );
    let r = t
        .api(
            "PUT",
            &format!("/v1/clients/{MAC}/capture"),
            &[("Authorization", &bearer(agent_token))],
            Some(r#"{"image":"lab-os","minutes":5}"#),
        )
        .await;
    assert_eq!(r.status, 403, "an agent cannot grant itself capture rights");
    let r = t
        .api(
            "PUT",
            &format!("/v1/clients/{MAC}/capture"),
            &[("Authorization", &bearer(TOKEN))],
            Some(r#"{"image":"lab-os","minutes":5}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["image"], "lab-os");
    // The agent's own token opens its API, not the repository.
    assert_eq!(
        put(chunk_path.clone(), agent_token.into(), frame.clone(), None).await,
        403
    );
    assert_eq!(
        put(
            chunk_path.clone(),
            upload.clone(),
            frame.clone(),
            Some("other-image")
        )
        .await,
        403,
        "chunks announced for another image"
    );
    // Every chunk with the upload token, then publish the granted name.
    for (cid, _) in m.unique_chunks() {
        let mut f = Vec::new();
        aula_imager::repo::Repository::get_chunk(&local, &cid, &mut f).expect("frame");
        let code = put(
            format!("/v1/chunks/{cid}"),
            upload.clone(),
            f,
            Some("lab-os"),
        )
        .await;
        assert!(code == 201 || code == 200, "chunk upload: {code}");
    }
    assert_eq!(
        put(
            "/v1/images/lab-os".into(),
            upload.clone(),
            m.to_json(),
            None
        )
        .await,
        201,
        "publishing the granted image"
    );
    // Another name, even with the same content: refused.
    let mut other = m.clone();
    other.name = "win11-lab".into();
    assert_eq!(
        put(
            "/v1/images/win11-lab".into(),
            upload.clone(),
            other.to_json(),
            None
        )
        .await,
        403,
        "the grant published another image name"
    );
    // No delete, gc or check with the grant.
    let a = bearer(&upload);
    let r = t
        .api(
            "DELETE",
            "/v1/images/lab-os",
            &[("Authorization", &a)],
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    for p in ["/v1/repo/gc?purge_trash=1", "/v1/repo/check"] {
        let r = t.api("POST", p, &[("Authorization", &a)], None).await;
        assert_eq!(r.status, 403, "{p}: {}", r.text());
    }
    let list = t.api("GET", "/v1/images", &[], None).await.json();
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["lab-os"], "{list}");
    // Withdrawn: the upload token opens nothing any more.
    let r = t
        .api(
            "DELETE",
            &format!("/v1/clients/{MAC}/capture"),
            &[("Authorization", &bearer(TOKEN))],
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(put(chunk_path, upload, frame, None).await, 401, "revoked");
    t.stop().await;
}
