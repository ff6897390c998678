//! Swarm restores with real agents, each a separate `aula-agent` process in
//! its own network namespace on a file-backed disk, all on one bridge with
//! every port shaped by `tc` (like a switched lab LAN); the boot server
//! (repository + swarm coordinator) and the test core run in this test's
//! thread, which enters the server's namespace. Only addresses inside the
//! namespaces made here are used. Needs root (namespaces, loop mounts).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aula_bootserver::http::{self as bhttp, BoxFuture, HttpRequest, HttpResponse, RequestContext};
use aula_imager::chunk::ChunkId;
use aula_imager::swarm::wire;
use common::*;
use hyper::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_aula-agent");
/// Every port of the lab LAN, both directions.
const RATE_MBIT: u32 = 80;
/// Random data in the 48 MiB source filesystem (incompressible).
const DATA_MIB: usize = 36;
const CHUNK: u64 = 1 << 20;

static LABS: AtomicUsize = AtomicUsize::new(0);

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it creates network namespaces and loop-mounts filesystems"
    );
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge (namespace `hub`), the server's namespace and one per agent,
/// each joined to the bridge by a veth pair shaped to `RATE_MBIT` both ways.
struct Lab {
    hub: String,
    srv: String,
    agents: Vec<String>,
    net: u8,
}

impl Lab {
    fn new(n: usize) -> Lab {
        let k = LABS.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{k}", std::process::id());
        let net = 100 + ((std::process::id() as usize * 7 + k) % 100) as u8;
        let lab = Lab {
            hub: format!("aula-sw-{id}-hub"),
            srv: format!("aula-sw-{id}-srv"),
            agents: (0..n).map(|i| format!("aula-sw-{id}-a{i}")).collect(),
            net,
        };
        run(&["ip", "netns", "add", &lab.hub]);
        run(&["ip", "-n", &lab.hub, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &lab.hub, "link", "set", "br0", "up"]);
        run(&["ip", "-n", &lab.hub, "link", "set", "lo", "up"]);
        let mut nodes = vec![(lab.srv.clone(), "s0".to_string(), lab.server_ip())];
        for (i, ns) in lab.agents.iter().enumerate() {
            nodes.push((ns.clone(), format!("a{i}"), lab.agent_ip(i)));
        }
        let rate = format!("{RATE_MBIT}mbit");
        for (ns, port, ip) in &nodes {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip", "-n", &lab.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            run(&[
                "ip", "-n", &lab.hub, "link", "set", port, "master", "br0", "up",
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
            // Egress of each end: the machine's upload, and (on the bridge
            // side) its download.
            for (n, dev) in [(ns.as_str(), "eth0"), (lab.hub.as_str(), port.as_str())] {
                run(&[
                    "ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", &rate, "burst", "64kb", "latency", "100ms",
                ]);
            }
        }
        lab
    }

    fn server_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, self.net, 1))
    }

    fn agent_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, self.net, 10 + i as u8))
    }

    /// Move the calling thread (and the threads it starts) into the
    /// server's namespace.
    fn enter_server(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.srv)).expect("netns handle");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.agents.iter().chain([&self.srv, &self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// One `aula-agent` process in its namespace.
struct AgentProc {
    child: Option<Child>,
    log: PathBuf,
    disk: PathBuf,
    ip: IpAddr,
    mac: String,
}

impl AgentProc {
    fn start(
        lab: &Lab,
        i: usize,
        dir: &Path,
        server: &BootServer,
        core: &TestCore,
        kind: Kind,
    ) -> AgentProc {
        std::fs::create_dir_all(dir).expect("agent dir");
        let disk = match kind {
            Kind::Partition => target_disk(dir),
            Kind::TwinDisk => {
                let d = dir.join("blank.img");
                std::fs::File::create(&d)
                    .and_then(|f| f.set_len(64 * MIB))
                    .expect("blank disk");
                d
            }
        };
        let ip = lab.agent_ip(i);
        let mac = format!("52:54:00:77:{:02x}:{:02x}", lab.net, i);
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"restore_records = "{records}"
[listen]
address = "{ip}"
port = 0
[repository]
retry_s = 30
[power]
mode = "dry-run"
[identity]
mac = "{mac}"
ips = ["{ip}"]
[disks]
1 = "{disk}"
[swarm]
linger_s = 60
"#,
                records = dir.join("records").display(),
                disk = disk.display(),
            ),
        )
        .expect("agent config");
        let cmdline = dir.join("cmdline");
        // The machine's live boot, as its iPXE does it: the script fetched
        // from its own address gives the boot nonce it registers with.
        let script = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.agents[i],
                "curl",
                "-sf",
                "--max-time",
                "10",
            ])
            .arg(format!(
                "http://{}/boot/ipxe/{}?ip={ip}&mac={mac}",
                server.http,
                mac.replace(':', "-")
            ))
            .output()
            .expect("curl");
        let script = String::from_utf8_lossy(&script.stdout).to_string();
        let nonce = script
            .split_whitespace()
            .find_map(|w| w.strip_prefix("aula.boot="))
            .unwrap_or_else(|| panic!("no live script for {mac}: {script}"))
            .to_string();
        std::fs::write(
            &cmdline,
            format!(
                "quiet aula.server={server_url} aula.server_fp={server_fp} aula.boot={nonce} aula.core=https://{core_addr}/hooks aula.core_fp={core_fp}",
                server_url = server.url(),
                server_fp = server.fingerprint,
                core_addr = core.addr,
                core_fp = core.fingerprint
            ),
        )
        .expect("cmdline");
        let log = dir.join("agent.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.agents[i], AGENT, "--config"])
            .arg(&cfg)
            .arg("--cmdline")
            .arg(&cmdline)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start aula-agent");
        AgentProc {
            child: Some(child),
            log,
            disk,
            ip,
            mac,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (graceful: lingering members leave).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the room restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Partition 1 (ext4, random data) of the standard source disk onto
    /// partition 2 of each machine's standard target disk.
    Partition,
    /// A whole MBR disk whose two partitions hold the same raw data, onto a
    /// blank disk: the second partition's chunks are the first one's.
    TwinDisk,
}

/// The server side of a lab and its agents.
struct Room {
    kind: Kind,
    dir: tempfile::TempDir,
    server: BootServer,
    core: TestCore,
    source: PathBuf,
    image: aula_imager::manifest::Manifest,
    /// What a plain restore of the image onto a blank target writes.
    reference: aula_imager::restore::RestoreStats,
    agents: Vec<AgentProc>,
    apis: Vec<Api>,
}

impl Room {
    async fn start(lab: &Lab) -> Room {
        Self::start_with(lab, Kind::Partition).await
    }

    async fn start_with(lab: &Lab, kind: Kind) -> Room {
        init_logs();
        let dir = tempfile::tempdir().expect("tmp");
        let server =
            BootServer::start_on(&dir.path().join("srv"), API_TOKEN, lab.server_ip()).await;
        let core = TestCore::start_on(lab.server_ip()).await;
        let (source, image) = match kind {
            Kind::Partition => {
                let (source, _) = source_disk(dir.path(), DATA_MIB);
                let m = upload_chunked(&server, &source, Some(1), "lab", CHUNK).await;
                (source, m)
            }
            Kind::TwinDisk => {
                let source = dir.path().join("twin.img");
                make_disk(
                    &source,
                    64,
                    json!({"table": "mbr", "partitions": [
                        {"number": 1, "type": "linux", "size": "24MiB", "format": false},
                        {"number": 2, "type": "linux", "size": "24MiB", "format": false}
                    ]}),
                );
                let data = pseudo_random(9, 24 << 20);
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&source)
                    .expect("open");
                for n in [1, 2] {
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&data, part_range(&source, n).0)
                        .expect("fill");
                }
                drop(f);
                let m = upload_chunked(&server, &source, None, "lab", CHUNK).await;
                (source, m)
            }
        };
        let reference =
            reference_restore(&server.repo_url(), &server.fingerprint, &image, dir.path()).await;
        let mut agents = Vec::new();
        for i in 0..lab.agents.len() {
            agents.push(AgentProc::start(
                lab,
                i,
                &dir.path().join(format!("a{i}")),
                &server,
                &core,
                kind,
            ));
        }
        let mut apis = Vec::new();
        for a in &agents {
            let reg = wait_registration(&server, &a.mac, a).await;
            let port = reg["port"].as_u64().expect("port") as u16;
            apis.push(Api::with(
                SocketAddr::new(a.ip, port),
                reg["cert_fingerprint"].as_str().expect("fp"),
                reg["token"].as_str().expect("token"),
                Duration::from_secs(30),
            ));
        }
        Room {
            kind,
            dir,
            server,
            core,
            source,
            image,
            reference,
            agents,
            apis,
        }
    }

    fn repo_url(&self) -> String {
        self.server.repo_url()
    }

    async fn restore(&self, i: usize) -> String {
        let mut spec = json!({"op": "restore", "disk": 1, "image": "lab",
            "repository": self.repo_url(), "method": "swarm"});
        if self.kind == Kind::Partition {
            spec["partition"] = json!(2);
        }
        let (s, v) = self.apis[i]
            .call(Method::POST, "/v1/jobs", Some(spec))
            .await;
        assert_eq!(s, 202, "{v}");
        v["id"].as_str().expect("job id").to_string()
    }

    async fn wait(&self, i: usize, job: &str) -> Value {
        let v = self.apis[i].wait_job(job, Duration::from_secs(180)).await;
        assert_eq!(
            v["state"],
            "succeeded",
            "agent {i}: {v:#}\n--- agent log ---\n{}",
            self.agents[i].log_text()
        );
        v
    }

    /// The coordinator's status, with the API token (members' addresses
    /// are for the operator's eyes).
    async fn swarm_status(&self) -> wire::Status {
        let (code, v) = self.server.api(Method::GET, "/v1/swarm", None).await;
        assert_eq!(code, 200, "{v}");
        serde_json::from_value(v).expect("swarm status")
    }

    /// Partition 2 of agent `i`'s disk equals the source partition, byte
    /// for byte, over the image's size; and the restore wrote exactly what
    /// a plain restore writes (no window was written twice: nothing was
    /// written and then corrected).
    fn check_identical(&self, i: usize, result: &Value) {
        let size = self.image.source_size;
        let ((ss, _), (ts, tl)) = match self.kind {
            Kind::Partition => (
                part_range(&self.source, 1),
                part_range(&self.agents[i].disk, 2),
            ),
            Kind::TwinDisk => ((0, size), (0, size)),
        };
        assert!(tl >= size);
        let read = |p: &Path, at: u64| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(p).expect("open");
            let mut b = vec![0u8; size as usize];
            f.read_exact_at(&mut b, at).expect("read");
            b
        };
        assert!(
            read(&self.source, ss) == read(&self.agents[i].disk, ts),
            "agent {i}: the restored partition differs from the source"
        );
        let st = &result["stats"];
        assert_eq!(
            (
                st["bytes_written"].as_u64().expect("written"),
                st["bytes_skipped"].as_u64().expect("skipped")
            ),
            (self.reference.bytes_written, self.reference.bytes_skipped),
            "agent {i}: the restore wrote more than a plain restore: {st}"
        );
        assert_eq!(
            st["bytes_from_server"].as_u64().expect("server")
                + st["bytes_from_peers"].as_u64().expect("peers"),
            st["bytes_fetched"].as_u64().expect("fetched"),
            "{st}"
        );
    }

    async fn finish(mut self) {
        for a in &mut self.agents {
            a.stop();
        }
        self.server.stop().await;
        self.core.stop().await;
        drop(self.dir);
    }
}

/// A plain restore of `m` onto a blank sparse file, for its counts.
async fn reference_restore(
    url: &str,
    fp: &str,
    m: &aula_imager::manifest::Manifest,
    dir: &Path,
) -> aula_imager::restore::RestoreStats {
    let (url, m, path) = (url.to_string(), m.clone(), dir.join("reference.img"));
    let fp = fp.to_string();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::create(&path).expect("reference target");
        f.set_len(
            m.source_size
                .max(aula_imager::disk_image::min_disk_size(&m)),
        )
        .expect("size");
        drop(f);
        let repo = aula_imager::repo::HttpRepo::new(
            &url,
            aula_imager::repo::HttpOptions {
                trust: aula_imager::tls::ServerTrust::Pin(
                    aula_imager::tls::parse_fingerprint(&fp).expect("fp"),
                ),
                ..Default::default()
            },
        )
        .expect("repo");
        let dev = aula_imager::device::Device::open(
            &path,
            aula_imager::device::OpenMode {
                write: true,
                ..Default::default()
            },
        )
        .expect("open");
        let s = aula_imager::image::restore_image(
            &m,
            Arc::new(dev),
            None,
            &repo,
            &Default::default(),
            &aula_imager::progress::Progress::new(),
        )
        .expect("reference restore");
        let _ = std::fs::remove_file(&path);
        s
    })
    .await
    .expect("reference thread")
}

async fn wait_registration(server: &BootServer, mac: &str, a: &AgentProc) -> Value {
    let t0 = Instant::now();
    loop {
        let list = server.agents().await;
        if let Some(r) = list
            .as_array()
            .and_then(|l| l.iter().find(|r| r["macs"][0] == mac))
        {
            return r.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "agent {mac} did not register with the boot server\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `f` in the server's namespace on this thread's own runtime.
fn in_lab<F: std::future::Future<Output = ()>>(lab: &Lab, f: impl FnOnce() -> F) {
    lab.enter_server();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(f());
}

#[test]
fn four_machines_restore_one_image_together_byte_identical_with_the_server_sending_it_about_once() {
    require_root();
    let lab = Lab::new(4);
    in_lab(&lab, || async {
        let room = Room::start(&lab).await;
        let t0 = Instant::now();
        let mut jobs = Vec::new();
        for i in 0..4 {
            jobs.push(room.restore(i).await);
        }
        let mut results = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            results.push(room.wait(i, j).await["result"].clone());
        }
        let secs = t0.elapsed().as_secs_f64();
        let image_bytes = room.image.stored_bytes();
        let (mut from_server, mut from_peers) = (0, 0);
        for (i, r) in results.iter().enumerate() {
            room.check_identical(i, r);
            assert_eq!(r["method"], "swarm");
            from_server += r["stats"]["bytes_from_server"].as_u64().expect("n");
            from_peers += r["stats"]["bytes_from_peers"].as_u64().expect("n");
            assert!(r["swarm"]["member"].is_string(), "{r}");
        }
        eprintln!(
            "4 machines in {secs:.1} s; image {image_bytes} bytes; from the server {from_server}, from peers {from_peers}"
        );
        assert!(from_peers > 0, "no chunk came from a peer");
        assert!(
            from_server <= 2 * image_bytes,
            "the server sent {from_server} bytes for a {image_bytes}-byte image to 4 machines"
        );
        // The coordinator saw the same.
        let st = room.swarm_status().await;
        let s = st
            .sessions
            .iter()
            .find(|s| s.session == "lab@1")
            .expect("session");
        // (Besides what the coordinator handed out, each machine fetched
        // its crash-safe held windows, the partition's head and tail
        // chunks written last, from the repository directly: at most two
        // chunks each.)
        assert_eq!(s.bytes_from_peers, from_peers);
        let held_max = 4 * 2 * (CHUNK + CHUNK / 8);
        assert!(
            s.bytes_from_server <= from_server && from_server - s.bytes_from_server <= held_max,
            "coordinator saw {} bytes from the server, the machines {from_server}",
            s.bytes_from_server
        );
        // Progress events (webhooks) carry the split too.
        let hooks = room.core.hooks();
        assert!(
            hooks.iter().any(|h| h.json["event"] == "progress"
                && h.json["progress"]["bytes_from_peers"].as_u64().unwrap_or(0) > 0),
            "no progress webhook reported bytes from peers"
        );
        room.finish().await;
    });
}

/// A hostile member: it joins, claims to hold every chunk, and serves each
/// chunk's real frame with one byte flipped.
struct CorruptPeer {
    repo: PathBuf,
    served: AtomicUsize,
}

impl bhttp::RouteGroup for CorruptPeer {
    fn name(&self) -> &'static str {
        "corrupt-peer"
    }
    fn matches(&self, _path: &str) -> bool {
        true
    }
    fn handle(&self, req: HttpRequest, _ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            let id: Option<ChunkId> = req
                .uri()
                .path()
                .strip_prefix(wire::PEER_CHUNKS)
                .and_then(|s| s.parse().ok());
            let Some(id) = id else {
                return bhttp::error_json(hyper::StatusCode::NOT_FOUND, "no");
            };
            let repo = aula_imager::repo::LocalRepo::open(&self.repo, false).expect("repo");
            let mut frame = std::fs::read(repo.chunk_path(&id)).expect("chunk");
            let mid = frame.len() / 2;
            frame[mid] ^= 0x5a;
            self.served.fetch_add(1, Ordering::SeqCst);
            bhttp::response(hyper::StatusCode::OK, "application/zstd", frame)
        })
    }
}

/// A call to the coordinator as the hostile member: a member credential
/// (the repository's write token, as a machine that stole it would have).
async fn coordinator(url: &str, path: &str, body: Value) -> Value {
    let url = format!("{url}{path}");
    let body = body.to_string();
    tokio::task::spawn_blocking(move || {
        let auth = format!("Authorization: Bearer {REPO_TOKEN}");
        let out = Command::new("curl")
            .args([
                "-sfk",
                "--max-time",
                "10",
                "-H",
                &auth,
                "-X",
                "POST",
                "-d",
                &body,
                &url,
            ])
            .output()
            .expect("curl");
        assert!(out.status.success(), "POST {url}: {out:?}");
        serde_json::from_slice(&out.stdout).expect("json")
    })
    .await
    .expect("curl thread")
}

#[test]
fn a_peer_serving_corrupt_chunks_is_detected_avoided_banned_and_nothing_corrupt_is_written() {
    require_root();
    let lab = Lab::new(3);
    in_lab(&lab, || async {
        let room = Room::start(&lab).await;
        // The hostile member, on the server's address.
        let fake = Arc::new(CorruptPeer {
            repo: room.dir.path().join("srv/data/repo"),
            served: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let addr = bhttp::start(
            SocketAddr::new(lab.server_ip(), 0),
            None,
            vec![fake.clone()],
            64,
            stop.clone(),
            &tracker,
        )
        .await
        .expect("fake peer");
        let joined = coordinator(
            &room.repo_url(),
            "/v1/swarm/join",
            json!({"image": "lab", "version": 1, "port": addr.port(), "slots": 8}),
        )
        .await;
        let key = joined["key"].as_str().expect("key").to_string();
        let ids: Vec<String> = room
            .image
            .unique_chunks()
            .iter()
            .map(|(id, _)| id.to_string())
            .collect();
        coordinator(
            &room.repo_url(),
            "/v1/swarm/sync",
            json!({"key": key, "have": ids, "finished": true}),
        )
        .await;
        let hb_url = room.repo_url();
        let hb_key = key.clone();
        let hb_stop = stop.clone();
        let hb = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hb_stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                coordinator(
                    &hb_url,
                    "/v1/swarm/sync",
                    json!({"key": hb_key, "finished": true}),
                )
                .await;
            }
        });

        let mut jobs = Vec::new();
        for i in 0..3 {
            jobs.push(room.restore(i).await);
        }
        let mut corrupt = 0;
        for (i, j) in jobs.iter().enumerate() {
            let r = room.wait(i, j).await["result"].clone();
            room.check_identical(i, &r);
            corrupt += r["swarm"]["peer_corrupt"].as_u64().expect("n");
            let avoided = r["swarm"]["avoided"].as_array().expect("avoided");
            if r["swarm"]["peer_corrupt"].as_u64() > Some(0) {
                assert!(avoided.contains(&joined["member"]), "{r}");
            }
        }
        assert!(
            fake.served.load(Ordering::SeqCst) > 0,
            "the hostile peer was never asked"
        );
        assert!(corrupt >= 2, "corrupt chunks detected: {corrupt}");
        let st = room.swarm_status().await;
        let s = st
            .sessions
            .iter()
            .find(|s| s.session == "lab@1")
            .expect("session");
        let bad = s
            .members
            .iter()
            .find(|m| m.member == joined["member"])
            .expect("fake member");
        assert!(bad.banned, "the corrupt peer was not banned: {bad:?}");
        assert!(bad.reports >= 2);
        assert_eq!(
            bad.bytes_served, 0,
            "a corrupt frame was counted as served: {bad:?}"
        );
        stop.cancel();
        let _ = hb.await;
        tracker.close();
        tracker.wait().await;
        room.finish().await;
    });
}

#[test]
fn a_peer_killed_mid_transfer_does_not_stop_the_others() {
    require_root();
    let lab = Lab::new(4);
    in_lab(&lab, || async {
        let mut room = Room::start(&lab).await;
        let mut jobs = Vec::new();
        for i in 0..4 {
            jobs.push(room.restore(i).await);
        }
        // Kill agent 0 once others got chunks from it and while more are
        // being fetched from it.
        let victim = room.agents[0].ip;
        let t0 = Instant::now();
        loop {
            let st = room.swarm_status().await;
            let uploading = st.sessions.iter().flat_map(|s| &s.members).any(|m| {
                m.addr.is_some_and(|a| a.ip() == victim) && m.uploads > 0 && m.bytes_served > 0
            });
            if uploading {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "agent 0 never served anyone: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        room.agents[0].kill();
        eprintln!("killed agent 0 after {:.1} s", t0.elapsed().as_secs_f64());
        let mut failures = 0;
        for (i, j) in jobs.iter().enumerate().skip(1) {
            let r = room.wait(i, j).await["result"].clone();
            room.check_identical(i, &r);
            failures += r["swarm"]["peer_failures"].as_u64().expect("n");
        }
        eprintln!("peer fetches that failed after the kill: {failures}");
        room.finish().await;
    });
}

#[test]
fn a_machine_joining_when_the_others_are_half_done_finishes_with_chunks_from_peers() {
    require_root();
    let lab = Lab::new(4);
    in_lab(&lab, || async {
        let room = Room::start(&lab).await;
        let mut jobs = Vec::new();
        for i in 0..3 {
            jobs.push(room.restore(i).await);
        }
        let t0 = Instant::now();
        'wait: loop {
            let mut all_half = true;
            for (i, j) in jobs.iter().enumerate() {
                let (_, v) = room.apis[i]
                    .call(Method::GET, &format!("/v1/jobs/{j}"), None)
                    .await;
                let p = &v["progress"];
                let done = p["bytes_done"].as_f64().unwrap_or(0.0);
                let total = p["bytes_total"].as_f64().unwrap_or(f64::MAX);
                let finished = v["state"] == "succeeded";
                if !(finished || (p["phase"] == "restore" && done >= total / 2.0)) {
                    all_half = false;
                }
            }
            if all_half {
                break 'wait;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "the first three never got half way"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let late = room.restore(3).await;
        for (i, j) in jobs.iter().enumerate() {
            let r = room.wait(i, j).await["result"].clone();
            room.check_identical(i, &r);
        }
        let r = room.wait(3, &late).await["result"].clone();
        room.check_identical(3, &r);
        let peers = r["stats"]["bytes_from_peers"].as_u64().expect("n");
        assert!(
            peers > 0,
            "the late machine got nothing from its peers: {r}"
        );
        eprintln!(
            "late machine: {peers} bytes from peers, {} from the server",
            r["stats"]["bytes_from_server"]
        );
        room.finish().await;
    });
}

#[test]
fn a_whole_disk_whose_partitions_repeat_fetches_the_repeat_once_and_takes_it_from_its_own_store() {
    require_root();
    let lab = Lab::new(2);
    in_lab(&lab, || async {
        let room = Room::start_with(&lab, Kind::TwinDisk).await;
        let jobs = [room.restore(0).await, room.restore(1).await];
        for (i, j) in jobs.iter().enumerate() {
            let r = room.wait(i, j).await["result"].clone();
            room.check_identical(i, &r);
            let fetched = r["stats"]["bytes_fetched"].as_u64().expect("n");
            // The plain restore fetched both partitions; the swarm member
            // fetched the first and took the second from its own store.
            assert!(
                fetched * 10 < room.reference.bytes_fetched * 6,
                "agent {i} fetched {fetched} bytes; a plain restore fetches {}",
                room.reference.bytes_fetched
            );
        }
        room.finish().await;
    });
}
