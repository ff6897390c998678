//! The image repository service over loopback HTTP(S): upload then restore,
//! resume across a server restart, corruption and truncation injected by a
//! proxy, authentication, path validation, garbage collection, integrity
//! checks, the chunk cache.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aula_bootserver::repository::{RepoConfig, RepoRoutes, RepoService};
use aula_imager::create::{create_partition, CreateOptions, SourceInfo};
use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::progress::Progress;
use aula_imager::repo::{
    CachedRepo, ConfirmedManifests, HttpOptions, HttpRepo, LocalRepo, Repository,
};
use aula_imager::restore::{restore_partition, RestoreOptions, RestoreStats};
use aula_imager::tls::ServerTrust;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-write-token-0123456789";

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
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

/// Half random, half text: compresses, and every window differs.
fn source_data(seed: u64, mib: usize) -> Vec<u8> {
    let mut v = pseudo_random(seed, mib << 20);
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 4096) % 2 == 0 {
            *b = b'a' + (i % 26) as u8;
        }
    }
    v
}

/// A repository server on its own runtime thread.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(
        root: &Path,
        addr: Option<SocketAddr>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Server {
        Self::start_read_token(root, addr, tls, None)
    }

    fn start_read_token(
        root: &Path,
        addr: Option<SocketAddr>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        read_token: Option<&str>,
    ) -> Server {
        let mut cfg = RepoConfig::new(root.to_path_buf());
        cfg.write_token = Some(TOKEN.into());
        cfg.read_token = read_token.map(str::to_string);
        cfg.gc_grace_s = 0;
        let svc = Arc::new(RepoService::open(cfg).expect("open repo service"));
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
                // The server's own HTTP service with only the repository
                // routes, as `[repository]` mounts them.
                let tracker = tokio_util::task::TaskTracker::new();
                let bind = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
                let groups: Vec<Arc<dyn aula_bootserver::http::RouteGroup>> =
                    vec![Arc::new(RepoRoutes(svc))];
                let local =
                    aula_bootserver::http::start(bind, tls, groups, 256, stop2.clone(), &tracker)
                        .await
                        .expect("start HTTP");
                tx.send(local).expect("send addr");
                stop2.cancelled().await;
                tracker.close();
                tracker.wait().await;
            });
        });
        let addr = rx.recv().expect("server address");
        Server {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn client(url: &str, token: Option<&str>) -> HttpRepo {
    let opts = HttpOptions {
        token: token.map(str::to_string),
        retry_for: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
        parallel: 4,
        ..Default::default()
    };
    HttpRepo::new(url, opts).expect("client")
}

fn write_file(path: &Path, data: &[u8]) -> Region {
    std::fs::write(path, data).expect("write");
    Region::whole(Arc::new(Device::open_read(path).expect("open")))
}

fn target(path: &Path, size: u64) -> Region {
    let mut d = Device::open(
        path,
        OpenMode {
            write: true,
            create: true,
            exclusive: false,
        },
    )
    .expect("open target");
    d.grow_to(size).expect("grow");
    Region::whole(Arc::new(d))
}

fn upload(
    repo: &dyn Repository,
    name: &str,
    src: &Region,
    chunk_kib: u64,
) -> aula_imager::manifest::Manifest {
    let opts = CreateOptions {
        chunk_size: chunk_kib << 10,
        raw: true,
        threads: 2,
        ..Default::default()
    };
    create_partition(
        name,
        src,
        &SourceInfo::default(),
        repo,
        &opts,
        &Progress::new(),
    )
    .expect("create over HTTP")
}

fn restore(
    repo: &dyn Repository,
    name: &str,
    t: &Region,
    threads: usize,
) -> aula_imager::Result<RestoreStats> {
    let m = repo.manifest(name, None)?;
    restore_partition(
        &m,
        t,
        repo,
        &RestoreOptions {
            threads,
            delta: true,
            ..Default::default()
        },
        &Progress::new(),
    )
}

#[test]
fn upload_then_restore_over_http_is_byte_identical_and_delta_fetches_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let data = source_data(1, 24);
    let src = write_file(&dir.path().join("src.raw"), &data);
    let up = client(&srv.url(), Some(TOKEN));
    let m = upload(&up, "net1", &src, 1024);
    assert_eq!(m.image_version, 1);
    let listed = up.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, "ready");

    let reader = client(&srv.url(), None);
    let t = target(&dir.path().join("out.raw"), data.len() as u64);
    let s = restore(&reader, "net1", &t, 4).expect("restore");
    assert_eq!(s.chunks_fetched, 24);
    assert_eq!(
        std::fs::read(dir.path().join("out.raw")).expect("read"),
        data
    );
    let s = restore(&reader, "net1", &t, 4).expect("restore again");
    assert_eq!(s.chunks_fetched, 0);
    assert_eq!(s.bytes_fetched, 0);
    // The repository on disk is an ordinary local repository too.
    let local = LocalRepo::open(&dir.path().join("repo"), false).expect("local");
    assert_eq!(
        local.manifest("net1", None).expect("manifest"),
        reader.manifest("net1", None).expect("manifest")
    );
}

#[test]
fn writes_without_the_token_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let src = write_file(&dir.path().join("src.raw"), &source_data(2, 2));
    for token in [None, Some("wrong-token")] {
        let c = client(&srv.url(), token);
        let opts = CreateOptions {
            chunk_size: 1 << 20,
            raw: true,
            ..Default::default()
        };
        let e = create_partition(
            "nope",
            &src,
            &SourceInfo::default(),
            &c,
            &opts,
            &Progress::new(),
        )
        .expect_err("must be refused");
        assert!(e.to_string().contains("401"), "{e}");
    }
    let n = walk_files(&dir.path().join("repo/chunks"));
    assert_eq!(n, 0, "an unauthenticated upload stored chunks");
    // Delete too.
    let c = client(&srv.url(), None);
    assert!(c.delete("nope").is_err());
}

fn walk_files(p: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                n += walk_files(&e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// Send a raw HTTP request; returns (status, body).
fn raw(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(req.as_bytes()).expect("send");
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let out = String::from_utf8_lossy(&bytes).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[test]
fn path_traversal_and_odd_names_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("secret"), b"do not serve").expect("secret");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    for path in [
        "/v1/images/..%2F..%2Fsecret",
        "/v1/images/../../secret",
        "/v1/images/.hidden",
        "/v1/chunks/..%2F..%2F..%2Fsecret",
        "/v1/chunks/ZZZZ",
        "/v1/chunks/0000000000000000000000000000000000000000000000000000000000000000/../../../secret",
    ] {
        let (st, body) = raw(srv.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
        assert!(matches!(st, 400 | 404), "{path}: {st} {body}");
        assert!(!body.contains("do not serve"), "{path} leaked a file");
        let (st, _) = raw(
            srv.addr,
            &format!("PUT {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nConnection: close\r\n\r\nabcd"),
        );
        assert!(matches!(st, 400 | 404 | 405), "PUT {path}: {st}");
    }
    assert_eq!(walk_files(&dir.path().join("repo/chunks")), 0);
    assert_eq!(
        std::fs::read(dir.path().join("secret")).expect("secret"),
        b"do not serve"
    );
}

#[test]
fn an_oversized_body_is_413_and_a_broken_body_is_400_not_413() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let id = "00".repeat(32);
    // Declared larger than any chunk frame: refused before it is read.
    let (st, body) = raw(
        srv.addr,
        &format!("PUT /v1/chunks/{id} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 999999999\r\nConnection: close\r\n\r\nabcd"),
    );
    assert_eq!(st, 413, "{body}");
    // Chunked framing the client botches: a read error, 400.
    let (st, body) = raw(
        srv.addr,
        &format!("PUT /v1/chunks/{id} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\nzz\r\n"),
    );
    assert_eq!(st, 400, "{body}");
    let (st, body) = raw(
        srv.addr,
        &format!("PUT /v1/images/x HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nnot-hex\r\n"),
    );
    assert_eq!(st, 400, "{body}");
    assert_eq!(walk_files(&dir.path().join("repo/chunks")), 0);
}

#[test]
fn a_chunk_that_does_not_match_its_id_is_refused_on_upload() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let c = client(&srv.url(), Some(TOKEN));
    let content = b"hello world, this is a chunk".repeat(100);
    let frame = zstd::bulk::compress(&content, 3).expect("compress");
    let wrong = aula_imager::chunk::ChunkId::of(b"something else");
    let e = c
        .put_chunk(&wrong, &frame)
        .expect_err("mismatch must be refused");
    assert!(e.to_string().contains("400"), "{e}");
    let e = c
        .put_chunk(&wrong, b"garbage that is not zstd")
        .expect_err("garbage must be refused");
    assert!(e.to_string().contains("400"), "{e}");
    assert_eq!(walk_files(&dir.path().join("repo/chunks")), 0);
    let right = aula_imager::chunk::ChunkId::of(&content);
    c.put_chunk(&right, &frame)
        .expect("a matching chunk is stored");
    assert_eq!(
        c.chunk_size_stored(&right).expect("head"),
        Some(frame.len() as u64)
    );
    assert_eq!(
        c.missing_chunks(&[right, wrong]).expect("missing"),
        vec![wrong]
    );
}

#[test]
fn publishing_a_manifest_with_missing_chunks_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let local_dir = dir.path().join("local");
    let local = LocalRepo::open(&local_dir, true).expect("local");
    let src = write_file(&dir.path().join("src.raw"), &source_data(3, 3));
    let m = upload(&local, "only-local", &src, 1024);
    let c = client(&srv.url(), Some(TOKEN));
    let e = c.publish(&m).expect_err("must be refused");
    assert!(
        e.to_string().contains("409") && e.to_string().contains("missing"),
        "{e}"
    );
    assert!(c.manifest("only-local", None).is_err());
}

#[test]
fn chunks_are_served_with_ranges() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let c = client(&srv.url(), Some(TOKEN));
    let content = pseudo_random(4, 100_000);
    let frame = zstd::bulk::compress(&content, 1).expect("compress");
    let id = aula_imager::chunk::ChunkId::of(&content);
    c.put_chunk(&id, &frame).expect("put");
    let (st, resp) = raw(srv.addr, &format!("GET /v1/chunks/{id} HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\nConnection: close\r\n\r\n"));
    assert_eq!(st, 206, "{resp}");
    assert!(
        resp.contains(&format!("content-range: bytes 10-19/{}", frame.len())),
        "{resp}"
    );
    let (st, _) = raw(srv.addr, &format!("GET /v1/chunks/{id} HTTP/1.1\r\nHost: x\r\nRange: bytes={}-\r\nConnection: close\r\n\r\n", frame.len()));
    assert_eq!(st, 416);
}

/// A TCP proxy that corrupts or cuts response bodies while it has a fault
/// budget (alternating: even faults flip a byte, odd ones cut the
/// connection half-way through a read), and can delay every response.
struct FaultProxy {
    addr: SocketAddr,
    budget: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
}

impl FaultProxy {
    fn start(upstream: SocketAddr) -> FaultProxy {
        let budget = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (b, f, d) = (budget.clone(), faults.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (b, f, d) = (b.clone(), f.clone(), d.clone());
                std::thread::spawn(move || proxy_conn(client, upstream, b, f, d));
            }
        });
        FaultProxy {
            addr,
            budget,
            faults,
            delay_ms,
        }
    }
}

/// Take one unit of fault budget, if any is left.
fn take(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
        .is_ok()
}

fn proxy_conn(
    client: TcpStream,
    upstream: SocketAddr,
    budget: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    delay: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let (mut c_read, mut s_write) = match (client.try_clone(), server.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return,
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(std::net::Shutdown::Write);
    });
    let mut server = server;
    let mut client = client;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if chunk.starts_with(b"HTTP/1.1 ") {
            let d = delay.load(Ordering::Relaxed);
            if d > 0 {
                std::thread::sleep(Duration::from_millis(d));
            }
        }
        if n > 300 && take(&budget) {
            let k = faults.fetch_add(1, Ordering::SeqCst);
            if k.is_multiple_of(2) {
                chunk[n - 100] ^= 0xff;
            } else {
                let _ = client.write_all(&chunk[..n / 2]);
                let _ = client.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        if client.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
}

#[test]
fn corrupted_and_cut_downloads_are_detected_refetched_and_never_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let data = source_data(5, 16);
    let src = write_file(&dir.path().join("src.raw"), &data);
    upload(&client(&srv.url(), Some(TOKEN)), "faulty", &src, 1024);
    let proxy = FaultProxy::start(srv.addr);
    let c = client(&format!("http://{}", proxy.addr), None);
    let m = c.manifest("faulty", None).expect("manifest");
    let t = target(&dir.path().join("out.raw"), data.len() as u64);
    // Six faults while the restore runs: three corrupted bodies, three cuts.
    proxy.budget.store(6, Ordering::SeqCst);
    let s = restore_partition(
        &m,
        &t,
        &c,
        &RestoreOptions {
            threads: 2,
            delta: true,
            ..Default::default()
        },
        &Progress::new(),
    )
    .expect("restore");
    assert_eq!(
        proxy.faults.load(Ordering::SeqCst),
        6,
        "every armed fault must have hit a response"
    );
    assert_eq!(s.chunks_fetched, 16);
    assert!(
        s.bytes_fetched > m.stored_bytes(),
        "refetches must show in the fetched bytes: {s:?}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("out.raw")).expect("read"),
        data
    );
}

#[test]
fn killing_and_restarting_the_server_mid_restore_completes_the_restore() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("repo");
    let mut srv = Server::start(&root, None, None);
    let data = source_data(6, 32);
    let src = write_file(&dir.path().join("src.raw"), &data);
    upload(&client(&srv.url(), Some(TOKEN)), "big", &src, 256);
    let addr = srv.addr;
    // Slow the transfer through the proxy so the kill lands mid-restore.
    let proxy = FaultProxy::start(addr);
    proxy.delay_ms.store(15, Ordering::Relaxed);
    let c = client(&format!("http://{}", proxy.addr), None);
    let m = c.manifest("big", None).expect("manifest");
    let t = target(&dir.path().join("out.raw"), data.len() as u64);
    let progress = Arc::new(Progress::new());
    let p2 = progress.clone();
    let worker = std::thread::spawn(move || {
        restore_partition(
            &m,
            &t,
            &c,
            &RestoreOptions {
                threads: 2,
                delta: true,
                ..Default::default()
            },
            &p2,
        )
    });
    // Wait until part of the image is in, then kill the server.
    let total = 32u64 << 20;
    while progress.snapshot().bytes_done < total / 5 {
        std::thread::sleep(Duration::from_millis(10));
    }
    srv.kill();
    let at_kill = progress.snapshot().bytes_done;
    assert!(at_kill < total, "the restore finished before the kill");
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = progress.snapshot().bytes_done;
    assert!(stalled < total, "the restore went on without a server");
    let _srv2 = Server::start(&root, Some(addr), None);
    let s = worker
        .join()
        .expect("worker")
        .expect("restore completes after the restart");
    assert_eq!(
        std::fs::read(dir.path().join("out.raw")).expect("read"),
        data
    );
    // Only chunks in flight at the kill were fetched twice: at most one per
    // worker thread.
    assert!(s.chunks_fetched <= 128, "{s:?}");
}

#[test]
fn https_with_a_pinned_fingerprint_works_and_a_wrong_pin_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let pair =
        aula_bootserver::tls::self_signed(&["127.0.0.1".into(), "localhost".into()]).expect("cert");
    let tls = aula_bootserver::tls::from_pem(&pair, "test").expect("tls config");
    let pin = aula_imager::tls::parse_fingerprint(&tls.fingerprint).expect("pin");
    let srv = Server::start(&dir.path().join("repo"), None, Some(tls.acceptor));
    let url = format!("https://{}", srv.addr);
    let data = source_data(7, 4);
    let src = write_file(&dir.path().join("src.raw"), &data);
    let mk = |trust: ServerTrust, token: Option<&str>| {
        HttpRepo::new(
            &url,
            HttpOptions {
                trust,
                token: token.map(str::to_string),
                retry_for: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .expect("client")
    };
    upload(&mk(ServerTrust::Pin(pin), Some(TOKEN)), "tls", &src, 1024);
    let t = target(&dir.path().join("out.raw"), data.len() as u64);
    restore(&mk(ServerTrust::Pin(pin), None), "tls", &t, 2).expect("restore over https");
    assert_eq!(
        std::fs::read(dir.path().join("out.raw")).expect("read"),
        data
    );
    let mut bad = pin;
    bad[0] ^= 1;
    let e = mk(ServerTrust::Pin(bad), None)
        .manifest("tls", None)
        .expect_err("wrong pin");
    assert!(e.to_string().contains("fingerprint"), "{e}");
    // A CA bundle holding the self-signed certificate works too.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pair.cert_pem).expect("ca");
    mk(ServerTrust::CaFile(ca), None)
        .manifest("tls", None)
        .expect("CA-verified");
}

#[test]
fn gc_removes_only_unreferenced_chunks_and_check_marks_corrupt_images() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("repo");
    let srv = Server::start(&root, None, None);
    let c = client(&srv.url(), Some(TOKEN));
    let a = source_data(8, 4);
    let b = source_data(9, 4);
    upload(&c, "keep", &write_file(&dir.path().join("a.raw"), &a), 1024);
    upload(&c, "drop", &write_file(&dir.path().join("b.raw"), &b), 1024);
    c.delete("drop").expect("delete");
    let before = walk_files(&root.join("chunks"));
    let gc = post(&srv, "/v1/repo/gc?purge_trash=1");
    assert_eq!(gc["removed_chunks"], 4, "{gc}");
    assert_eq!(walk_files(&root.join("chunks")), before - 4);
    // The kept image still restores.
    let t = target(&dir.path().join("out.raw"), a.len() as u64);
    restore(&c, "keep", &t, 2).expect("restore after gc");
    // Damage a chunk: the check reports it and marks the image corrupt.
    let m = c.manifest("keep", None).expect("manifest");
    let id = m.chunks[1].id.expect("id");
    let p = LocalRepo::open(&root, false)
        .expect("local")
        .chunk_path(&id);
    let mut f = std::fs::read(&p).expect("chunk");
    let mid = f.len() / 2;
    f[mid] ^= 0x10;
    std::fs::write(&p, f).expect("damage");
    let rep = post(&srv, "/v1/repo/check?image=keep");
    assert_eq!(rep[0]["state"], "corrupt", "{rep}");
    assert_eq!(rep[0]["bad"][0][0], id.hex(), "{rep}");
    let list = c.list().expect("list");
    assert_eq!(
        list.iter().find(|i| i.name == "keep").expect("keep").state,
        "corrupt"
    );
    // Unauthenticated maintenance is refused.
    let (st, _) = raw(
        srv.addr,
        "POST /v1/repo/gc HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 401);
}

fn post(srv: &Server, path: &str) -> serde_json::Value {
    let (st, resp) = raw(
        srv.addr,
        &format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(st, 200, "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("json body")
}

#[test]
fn a_cache_directory_serves_a_later_restore_with_the_server_down_only_for_confirmed_manifests() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut srv = Server::start(&dir.path().join("repo"), None, None);
    let data = source_data(10, 8);
    let src = write_file(&dir.path().join("src.raw"), &data);
    upload(&client(&srv.url(), Some(TOKEN)), "cached", &src, 1024);
    let cache_dir = dir.path().join("cache");
    // One boot's record of manifests the repository confirmed.
    let confirmed = ConfirmedManifests::at(&dir.path().join("run/confirmed")).expect("record");
    let mk = |url: &str, confirmed: Arc<ConfirmedManifests>| {
        let remote = HttpRepo::new(
            url,
            HttpOptions {
                retry_for: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .expect("client");
        CachedRepo::new(
            Box::new(remote),
            LocalRepo::open(&cache_dir, true).expect("cache"),
        )
        .with_confirmed(confirmed)
    };
    let c = mk(&srv.url(), confirmed.clone());
    let t = target(&dir.path().join("one.raw"), data.len() as u64);
    restore(&c, "cached", &t, 2).expect("first restore fills the cache");
    assert_eq!(walk_files(&cache_dir.join("chunks")), 8);
    let url = srv.url();
    srv.kill();
    // Another boot (no confirmation): the cached manifest is not trusted.
    let c = mk(&url, ConfirmedManifests::in_memory());
    let t = target(&dir.path().join("other.raw"), data.len() as u64);
    let e = restore(&c, "cached", &t, 2).expect_err("an unconfirmed cached manifest was used");
    assert!(e.to_string().contains("never confirmed"), "{e}");
    // The same boot, reading its record back: confirmed, so used.
    let again = ConfirmedManifests::at(&dir.path().join("run/confirmed")).expect("record");
    let c = mk(&url, again);
    let t = target(&dir.path().join("two.raw"), data.len() as u64);
    restore(&c, "cached", &t, 2).expect("restore from the cache alone");
    assert_eq!(
        std::fs::read(dir.path().join("two.raw")).expect("read"),
        data
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("run/confirmed"))
            .expect("record file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Offline mode, asked for, uses the cache without asking anyone.
    let c = mk(&url, ConfirmedManifests::in_memory()).offline(true);
    let t = target(&dir.path().join("three.raw"), data.len() as u64);
    restore(&c, "cached", &t, 2).expect("offline restore");
    assert_eq!(
        std::fs::read(dir.path().join("three.raw")).expect("read"),
        data
    );
}

/// Issue 12, point 9: with a read token set, clients that send it restore,
/// verify and capture; clients that do not get 401, not a hang.
#[test]
fn a_repository_with_a_read_token_serves_clients_that_send_it() {
    const READ: &str = "test-read-token-0123456789";
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start_read_token(&dir.path().join("repo"), None, None, Some(READ));
    let data = source_data(12, 4);
    let src = write_file(&dir.path().join("src.raw"), &data);
    // A capture (write token; its reads carry the write token).
    upload(&client(&srv.url(), Some(TOKEN)), "secret", &src, 1024);
    let reader = |read: Option<&str>| {
        HttpRepo::new(
            &srv.url(),
            HttpOptions {
                read_token: read.map(str::to_string),
                retry_for: Duration::from_secs(2),
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .expect("client")
    };
    let e = reader(None)
        .manifest("secret", None)
        .expect_err("read without a token");
    assert!(e.to_string().contains("401"), "{e}");
    let e = reader(Some("wrong-token-0123456789"))
        .list()
        .expect_err("read with a wrong token");
    assert!(e.to_string().contains("401"), "{e}");
    let c = reader(Some(READ));
    let t = target(&dir.path().join("out.raw"), data.len() as u64);
    restore(&c, "secret", &t, 2).expect("restore with the read token");
    assert_eq!(
        std::fs::read(dir.path().join("out.raw")).expect("read"),
        data
    );
    let m = c.manifest("secret", None).expect("manifest");
    let v = aula_imager::verify::verify_repo(&m, &c, 2, &Progress::new()).expect("verify");
    assert!(v.bad.is_empty(), "{:?}", v.bad);
    // The read token does not write.
    let w = HttpRepo::new(
        &srv.url(),
        HttpOptions {
            token: Some(READ.into()),
            retry_for: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .expect("client");
    assert!(w.delete("secret").is_err());
    assert!(c.manifest("secret", None).is_ok());
}

#[test]
fn eight_concurrent_restores_all_succeed() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = Server::start(&dir.path().join("repo"), None, None);
    let data = source_data(11, 16);
    let src = write_file(&dir.path().join("src.raw"), &data);
    upload(&client(&srv.url(), Some(TOKEN)), "many", &src, 512);
    let url = srv.url();
    let outs: Vec<PathBuf> = (0..8)
        .map(|i| dir.path().join(format!("out{i}.raw")))
        .collect();
    let handles: Vec<_> = outs
        .iter()
        .cloned()
        .map(|p| {
            let url = url.clone();
            let len = data.len() as u64;
            std::thread::spawn(move || {
                let c = client(&url, None);
                let t = target(&p, len);
                restore(&c, "many", &t, 2)
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread").expect("restore");
    }
    for p in outs {
        assert_eq!(std::fs::read(p).expect("read"), data);
    }
}
