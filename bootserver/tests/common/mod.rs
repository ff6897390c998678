//! Shared test harness: network namespaces with a veth pair, the server as a
//! child process inside one of them, and helpers to run code or commands in
//! the other. Everything stays inside namespaces the test creates, with
//! addresses from 10.213.0.0/16 and fd00:213::/64.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fails a test that needs root when not running as root (it never passes
/// silently: scripts/test runs as root).
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            common::is_root(),
            "this test needs root (it creates network namespaces): run it as root, as scripts/test does"
        );
    };
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Two namespaces joined by a veth pair: `srv` (interface `vs`, 10.213.0.1/16)
/// and `cli` (interface `vc`, no address unless a test adds one).
/// Both namespaces are deleted on drop.
pub struct NetPair {
    pub srv: String,
    pub cli: String,
}

impl NetPair {
    pub fn new() -> Self {
        let id = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let pair = NetPair {
            srv: format!("aula-s-{id}"),
            cli: format!("aula-c-{id}"),
        };
        ip(&["netns", "add", &pair.srv]);
        ip(&["netns", "add", &pair.cli]);
        for ns in [&pair.srv, &pair.cli] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            // No duplicate address detection: link-local addresses are usable at once.
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.accept_dad=0",
            ]));
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
            ]));
        }
        ip(&[
            "-n", &pair.srv, "link", "add", "vs", "type", "veth", "peer", "name", "vc", "netns",
            &pair.cli,
        ]);
        ip(&["-n", &pair.srv, "addr", "add", "10.213.0.1/16", "dev", "vs"]);
        ip(&["-n", &pair.srv, "link", "set", "vs", "up"]);
        ip(&["-n", &pair.cli, "link", "set", "vc", "up"]);
        pair
    }

    /// A command run inside the client namespace.
    pub fn cli_cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.cli, prog]);
        c
    }

    /// A command run inside the server namespace.
    pub fn srv_cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.srv, prog]);
        c
    }

    /// Adds an address to the client's interface.
    pub fn cli_addr(&self, cidr: &str) {
        ip(&["-n", &self.cli, "addr", "add", cidr, "dev", "vc"]);
    }

    /// Runs `f` on a thread that has entered the client namespace; sockets it
    /// creates live there.
    pub fn in_cli<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.cli, f)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.cli, &self.srv] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).expect("open netns handle");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns into the test namespace");
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// The server binary running inside a namespace; SIGKILLed on drop if still running.
pub struct ServerProc {
    pub child: Child,
    pub log: PathBuf,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_aula-bootserver");

impl ServerProc {
    /// Writes `config` to `dir/config.toml`, starts the server in `ns` and waits
    /// until the log shows every service in `ready` started.
    pub fn start(ns: &str, dir: &Path, config: &str, ready: &[&str]) -> Self {
        let cfg_path = dir.join("config.toml");
        std::fs::write(&cfg_path, config).expect("write config");
        let log = dir.join(format!(
            "server-{}.log",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let logf = File::create(&log).expect("create log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN, "--config"])
            .arg(&cfg_path)
            .env("RUST_LOG", "info,aula_bootserver=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn server");
        let mut s = ServerProc { child, log };
        s.wait_log(ready, Duration::from_secs(15));
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&mut self, needles: &[&str], timeout: Duration) {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if needles.iter().all(|n| text.contains(n)) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("server exited ({st}) before ready:\n{text}");
            }
            assert!(
                start.elapsed() < timeout,
                "server not ready after {timeout:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(
                    st.success(),
                    "server exit status {st}:\n{}",
                    self.log_text()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "server ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A config for tests: server 10.213.0.1 on `vs`, data in `dir`.
pub fn base_config(dir: &Path, extra: &str) -> String {
    format!(
        r#"[server]
address = "10.213.0.1"
interface = "vs"
data_dir = "{data}"
{extra}
"#,
        data = dir.join("data").display()
    )
}

pub const FULL_DHCP: &str = r#"
[dhcp]
mode = "full"
lease_time = 3600
[[dhcp.subnet]]
network = "10.213.0.0/16"
range = ["10.213.1.1", "10.213.1.250"]
router = "10.213.0.1"
dns = ["10.213.0.1"]
"#;

/// A DHCP request builder.
pub fn dhcp_msg(mac: [u8; 6], t: MessageType, xid: u32, opts: Vec<DhcpOption>) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(t));
    for o in opts {
        m.opts_mut().insert(o);
    }
    m
}

pub fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut Encoder::new(&mut out)).expect("encode");
    out
}

pub fn decode(buf: &[u8]) -> Message {
    Message::decode(&mut Decoder::new(buf)).expect("decode reply")
}

/// A client socket in the current namespace: bound to 0.0.0.0:68 on `vc`.
pub fn client_socket(port: u16) -> UdpSocket {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    s.set_reuse_address(true).expect("reuse");
    s.set_broadcast(true).expect("broadcast");
    s.bind_device(Some(b"vc")).expect("bind device");
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .expect("bind");
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s
}

/// Sends `req` and waits up to `wait` for a reply with the same xid.
pub fn exchange(
    sock: &UdpSocket,
    req: &Message,
    to: SocketAddr,
    wait: Duration,
) -> Option<(Message, usize, SocketAddr)> {
    sock.send_to(&encode(req), to).expect("send");
    recv_reply(sock, req.xid(), wait)
}

pub fn recv_reply(
    sock: &UdpSocket,
    xid: u32,
    wait: Duration,
) -> Option<(Message, usize, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                    continue;
                };
                if m.xid() == xid && m.opcode() == v4::Opcode::BootReply {
                    return Some((m, n, from));
                }
            }
            Err(_) => continue,
        }
    }
    None
}

pub fn msg_type(m: &Message) -> Option<MessageType> {
    m.opts().msg_type()
}

pub fn opt_bytes(m: &Message, code: u8) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    m.opts()
        .get(OptionCode::from(code))?
        .encode(&mut Encoder::new(&mut out))
        .ok()?;
    // Encoded as code, len, data (short options only here).
    Some(out.get(2..)?.to_vec())
}

pub fn bootfile(m: &Message) -> Option<String> {
    opt_bytes(m, 67).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// A deterministic pseudo-random generator (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// A downloaded file and the options the server acknowledged.
pub type TftpOk = (Vec<u8>, Vec<(String, String)>);
/// A TFTP error packet: code and message.
pub type TftpErr = (u16, String);

/// Raw TFTP client for tests: RRQ with options, ACKing the last block of each
/// window. Returns the file, or the TFTP error (code, message).
pub fn tftp_get(
    server: SocketAddr,
    name: &[u8],
    opts: &[(&str, &str)],
    window: usize,
) -> Result<TftpOk, TftpErr> {
    tftp_get_from(Ipv4Addr::UNSPECIFIED, server, name, opts, window)
}

/// [`tftp_get`] from the local address `src`.
pub fn tftp_get_from(
    src: Ipv4Addr,
    server: SocketAddr,
    name: &[u8],
    opts: &[(&str, &str)],
    window: usize,
) -> Result<TftpOk, TftpErr> {
    let sock = UdpSocket::bind((src, 0)).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(name);
    rrq.push(0);
    rrq.extend_from_slice(b"octet\0");
    for (k, v) in opts {
        rrq.extend_from_slice(k.as_bytes());
        rrq.push(0);
        rrq.extend_from_slice(v.as_bytes());
        rrq.push(0);
    }
    sock.send_to(&rrq, server).expect("send RRQ");
    let mut buf = vec![0u8; 70000];
    let mut data = Vec::new();
    let mut oack = Vec::new();
    let mut blksize = 512usize;
    let mut expected: u16 = 1;
    let mut in_window = 0usize;
    let mut peer: Option<SocketAddr> = None;
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| (999, format!("timeout/recv: {e}")))?;
        if let Some(p) = peer {
            if p != from {
                continue;
            }
        }
        let op = u16::from_be_bytes([buf[0], buf[1]]);
        match op {
            5 => {
                let code = u16::from_be_bytes([buf[2], buf[3]]);
                let msg = String::from_utf8_lossy(&buf[4..n])
                    .trim_end_matches('\0')
                    .to_owned();
                return Err((code, msg));
            }
            6 => {
                peer = Some(from);
                let parts: Vec<&[u8]> = buf[2..n].split(|b| *b == 0).collect();
                for kv in parts.chunks(2) {
                    if kv.len() == 2 && !kv[0].is_empty() {
                        let k = String::from_utf8_lossy(kv[0]).to_ascii_lowercase();
                        let v = String::from_utf8_lossy(kv[1]).into_owned();
                        if k == "blksize" {
                            blksize = v.parse().expect("blksize");
                        }
                        oack.push((k, v));
                    }
                }
                sock.send_to(&[0, 4, 0, 0], from).expect("ack 0");
            }
            3 => {
                peer = Some(from);
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    // Out of order: re-ACK the last good block.
                    let last = expected.wrapping_sub(1);
                    sock.send_to(&[0, 4, (last >> 8) as u8, last as u8], from)
                        .expect("re-ack");
                    in_window = 0;
                    continue;
                }
                let payload = &buf[4..n];
                data.extend_from_slice(payload);
                in_window += 1;
                let last = payload.len() < blksize;
                if last || in_window >= window {
                    sock.send_to(&[0, 4, (block >> 8) as u8, block as u8], from)
                        .expect("ack");
                    in_window = 0;
                }
                expected = expected.wrapping_add(1);
                if last {
                    return Ok((data, oack));
                }
            }
            _ => {}
        }
    }
}

pub fn read_file(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(p)
        .expect("open")
        .read_to_end(&mut v)
        .expect("read");
    v
}

pub fn write_file(p: &Path, data: &[u8]) {
    File::create(p)
        .expect("create")
        .write_all(data)
        .expect("write");
}

/// curl inside the client namespace; returns (status code, body).
pub fn curl(net: &NetPair, args: &[&str]) -> (u16, Vec<u8>) {
    let out = net
        .cli_cmd("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    let mut body = out.stdout;
    let pos = body.iter().rposition(|b| *b == b'\n').expect("status line");
    let code: u16 = String::from_utf8_lossy(&body[pos + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(pos);
    (code, body)
}

/// The API token of servers started with [`HTTP_API`].
pub const API_TOKEN: &str = "netns-api-token-0123456789";

/// `[http]` on 10.213.0.1:8080 with [`API_TOKEN`]; HTTPS (on by default)
/// on 10.213.0.1:8443 with the server's own certificate.
pub fn http_api() -> String {
    format!(
        "[http]\nbind = \"10.213.0.1:8080\"\napi_token = \"{API_TOKEN}\"\n[http.tls]\nbind = \"10.213.0.1:8443\"\n"
    )
}

/// curl's `--pinnedpubkey` value for the certificate the server made in
/// `dir/data/tls/server.crt` (curl pins public keys; the key belongs to
/// exactly that certificate).
pub fn pubkey_pin(dir: &Path) -> String {
    let cert = dir.join("data/tls/server.crt");
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    )));
    format!("sha256//{}", String::from_utf8_lossy(&out.stdout).trim())
}

/// An API call over HTTPS from the client namespace: pinned to the
/// server's own certificate, with the API token; `extra` adds curl
/// arguments (method, body, source address).
pub fn curl_api(net: &NetPair, dir: &Path, path: &str, extra: &[&str]) -> (u16, Vec<u8>) {
    let pin = pubkey_pin(dir);
    let auth = format!("Authorization: Bearer {API_TOKEN}");
    let url = format!("https://10.213.0.1:8443{path}");
    let mut args: Vec<&str> = vec!["-k", "--pinnedpubkey", &pin, "-H", &auth];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(net, &args)
}
