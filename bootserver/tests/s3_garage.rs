//! The S3 repository backend against a real Garage: a 3-node cluster on
//! loopback with replication factor 3, started by each test (layout
//! assign/apply, key import, bucket allow). No mock stands in for it.
//!
//! They need the `garage` binary, which `scripts/test` builds once per
//! machine (`scripts/lib/garage.sh`) and passes as `AULA_GARAGE`; so they
//! are `#[ignore]`d here and `scripts/test` runs them with
//! `--include-ignored`. Run that way without `AULA_GARAGE`, they fail and
//! say so.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aula_bootserver::repo_store::S3Settings;
use aula_bootserver::repository::{RepoConfig, RepoRoutes, RepoService};
use aula_imager::chunk::ChunkId;
use aula_imager::create::{create_partition, CreateOptions, SourceInfo};
use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::manifest::Manifest;
use aula_imager::progress::Progress;
use aula_imager::repo::{HttpOptions, HttpRepo, LocalRepo, Repository, S3Config, S3Repo};
use aula_imager::restore::{restore_partition, RestoreOptions};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-write-token-0123456789";
const KEY_ID: &str = "GK0123456789abcdef01234567";
const SECRET: &str = "5ec2e7c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123";
const BUCKET: &str = "aula";

fn garage_bin() -> PathBuf {
    let p = std::env::var_os("AULA_GARAGE").map(PathBuf::from).expect(
        "AULA_GARAGE is not set: these tests need a Garage binary; scripts/test builds one \
         (scripts/lib/garage.sh, ensure_garage) and sets it",
    );
    assert!(
        p.is_file(),
        "AULA_GARAGE={} is not a file: build Garage with scripts/lib/garage.sh",
        p.display()
    );
    p
}

/// A port no other call in this process got, below the kernel's ephemeral
/// range (32768 and up), so that no client socket takes it between this
/// check and Garage binding it. (Ports the kernel picked collided: a node's
/// RPC port was taken by another test's node, which then refused the
/// cluster's handshake.)
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test processes running at once start at different places.
    let start = (std::process::id() % 97) * 120;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (start + n) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

struct Node {
    config: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    child: Option<Child>,
}

/// A Garage cluster of three nodes on loopback.
struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Garage {
    fn start() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = "a9c0ffee00112233445566778899aabbccddeeff00112233445566778899aabb";
        let mut nodes = Vec::new();
        for i in 0..3 {
            let d = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&d).expect("node dir");
            let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
            let config = d.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "admin-token-for-tests"
"#,
                    d = d.display()
                ),
            )
            .expect("config");
            nodes.push(Node {
                config,
                s3_port,
                rpc_port,
                child: None,
            });
        }
        let mut g = Garage { bin, dir, nodes };
        for i in 0..3 {
            g.spawn(i);
        }
        let ids: Vec<String> = (0..3)
            .map(|i| {
                let out = g.retry(i, &["node", "id", "-q"], Duration::from_secs(30));
                out.trim().split('@').next().expect("node id").to_string()
            })
            .collect();
        for (id, node) in ids.iter().zip(&g.nodes).skip(1) {
            let peer = format!("{id}@127.0.0.1:{}", node.rpc_port);
            g.retry(0, &["node", "connect", &peer], Duration::from_secs(30));
        }
        for (i, id) in ids.iter().enumerate() {
            let zone = format!("dc{}", i + 1);
            g.retry(
                0,
                &["layout", "assign", "-z", &zone, "-c", "1G", &id[..16]],
                Duration::from_secs(30),
            );
        }
        g.retry(
            0,
            &["layout", "apply", "--version", "1"],
            Duration::from_secs(30),
        );
        g.retry(0, &["bucket", "create", BUCKET], Duration::from_secs(60));
        g.retry(
            0,
            &["key", "import", "-n", "aula-tests", KEY_ID, SECRET, "--yes"],
            Duration::from_secs(30),
        );
        g.retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", KEY_ID,
            ],
            Duration::from_secs(30),
        );
        // Every node answers S3 requests for the bucket.
        for i in 0..3 {
            let cfg = g.s3_config(&[i], "ready", SECRET);
            let t0 = Instant::now();
            loop {
                match S3Repo::open(cfg.clone(), true) {
                    Ok(_) => break,
                    Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                        eprintln!("waiting for node {i}: {e}");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => panic!("garage node {i} never served the bucket: {e}"),
                }
            }
        }
        g
    }

    fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::File::create(n.config.with_file_name("garage.log")).expect("log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&n.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start garage");
        n.child = Some(child);
    }

    /// Run a CLI command against node `i` until it succeeds.
    fn retry(&self, i: usize, args: &[&str], within: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[i].config)
                .args(args)
                .output()
                .expect("run garage");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if t0.elapsed() > within {
                panic!(
                    "garage {args:?} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    fn s3_config(&self, nodes: &[usize], prefix: &str, secret: &str) -> S3Config {
        S3Config {
            endpoints: nodes.iter().map(|i| self.endpoint(*i)).collect(),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            region: "garage".into(),
            access_key: KEY_ID.into(),
            secret_key: secret.into(),
            retry_for: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(30),
        }
    }

    fn repo(&self, prefix: &str) -> S3Repo {
        S3Repo::open(self.s3_config(&[0, 1, 2], prefix, SECRET), true).expect("open S3 repo")
    }

    /// A credentials file naming `nodes`.
    fn credentials(&self, nodes: &[usize]) -> PathBuf {
        let p = self.dir.path().join(format!("s3-{}.env", nodes.len()));
        let eps: Vec<String> = nodes.iter().map(|i| self.endpoint(*i)).collect();
        std::fs::write(
            &p,
            format!(
                "AWS_ACCESS_KEY_ID={KEY_ID}\nAWS_SECRET_ACCESS_KEY={SECRET}\nAWS_ENDPOINT_URL={}\nAWS_REGION=garage\n",
                eps.join(",")
            ),
        )
        .expect("credentials");
        p
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A boot server's repository service backed by the bucket.
struct Server {
    addr: SocketAddr,
    svc: Arc<RepoService>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(state_dir: &Path, settings: S3Settings) -> Server {
        let mut cfg = RepoConfig::new(state_dir.to_path_buf());
        cfg.write_token = Some(TOKEN.into());
        cfg.gc_grace_s = 0;
        cfg.s3 = Some(settings);
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
                let svc = Arc::new(RepoService::open(cfg).expect("open repo service"));
                let handle = svc.clone();
                let tracker = tokio_util::task::TaskTracker::new();
                let groups: Vec<Arc<dyn aula_bootserver::http::RouteGroup>> =
                    vec![Arc::new(RepoRoutes(svc))];
                let bind = "127.0.0.1:0".parse().expect("addr");
                let local =
                    aula_bootserver::http::start(bind, None, groups, 256, stop2.clone(), &tracker)
                        .await
                        .expect("start HTTP");
                tx.send((local, handle)).expect("send addr");
                stop2.cancelled().await;
                tracker.close();
                tracker.wait().await;
            });
        });
        let (addr, svc) = rx.recv().expect("server address");
        Server {
            addr,
            svc,
            stop,
            thread: Some(thread),
        }
    }

    fn client(&self, token: bool) -> HttpRepo {
        HttpRepo::new(
            &format!("http://{}", self.addr),
            HttpOptions {
                token: token.then(|| TOKEN.to_string()),
                retry_for: Duration::from_secs(60),
                timeout: Duration::from_secs(20),
                parallel: 4,
                ..Default::default()
            },
        )
        .expect("client")
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

fn settings(g: &Garage, nodes: &[usize], prefix: &str, cache_mib: u64) -> S3Settings {
    S3Settings {
        url: format!("s3://{BUCKET}/{prefix}"),
        endpoints: vec![],
        region: None,
        credentials_file: g.credentials(nodes),
        cache_mib,
        readahead_chunks: 16,
        readahead_parallel: 4,
        lease_ttl_s: 30,
    }
}

fn source_data(seed: u64, mib: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    let mut v = Vec::with_capacity((mib << 20) + 8);
    while v.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(mib << 20);
    // Half text: compresses, every window differs.
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 4096) % 2 == 0 {
            *b = b'a' + (i % 26) as u8;
        }
    }
    v
}

fn region_of(path: &Path, data: &[u8]) -> Region {
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

fn upload(repo: &dyn Repository, name: &str, src: &Region, chunk_kib: u64) -> Manifest {
    create_partition(
        name,
        src,
        &SourceInfo::default(),
        repo,
        &CreateOptions {
            chunk_size: chunk_kib << 10,
            raw: true,
            threads: 2,
            ..Default::default()
        },
        &Progress::new(),
    )
    .expect("create")
}

fn restore_into(repo: &dyn Repository, name: &str, path: &Path, size: u64) -> Vec<u8> {
    let m = repo.manifest(name, None).expect("manifest");
    let t = target(path, size);
    restore_partition(
        &m,
        &t,
        repo,
        &RestoreOptions {
            threads: 4,
            ..Default::default()
        },
        &Progress::new(),
    )
    .expect("restore");
    drop(t);
    std::fs::read(path).expect("read target")
}

/// The value of a counter series in the server's metrics text.
fn metric(series: &str) -> f64 {
    let text = aula_bootserver::metrics::global().encode().expect("encode");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn s3_round_trip_put_if_absent_ranged_get_listing_and_migration() {
    let g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    let repo = g.repo("roundtrip");
    let data = source_data(1, 6);
    let src = region_of(&d.path().join("src"), &data);
    let m = upload(&repo, "lab", &src, 256);
    assert_eq!(m.image_version, 1);
    let back = restore_into(&repo, "lab", &d.path().join("t"), data.len() as u64);
    assert!(back == data, "restored bytes differ");

    // Put-if-absent and ranged reads.
    let (id, _) = m.unique_chunks().into_iter().next().expect("a chunk");
    let mut frame = Vec::new();
    repo.get_chunk(&id, &mut frame).expect("get");
    assert!(
        !repo.put_chunk_if_absent(&id, &frame).expect("put"),
        "present: not stored again"
    );
    let part = repo
        .get_chunk_range(&id, 3, 10)
        .expect("range")
        .expect("present");
    assert_eq!(part, frame[3..=10]);
    let listed = repo.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].version), ("lab", 1));

    // A directory repository migrated into another prefix, then again:
    // the second run copies nothing and the images restore from S3.
    let dir = LocalRepo::open(&d.path().join("dirrepo"), true).expect("dir repo");
    upload(&dir, "room1", &src, 128);
    let data2 = source_data(2, 2);
    let src2 = region_of(&d.path().join("src2"), &data2);
    upload(&dir, "room1", &src2, 128);
    let dst = g.repo("migrated");
    let r1 = aula_imager::repo::migrate_dir_to_s3(&dir, &dst, 4, &|_, _| {}).expect("migrate");
    assert!(
        r1.chunks_copied > 0 && r1.chunks_copied == r1.chunks,
        "{r1:?}"
    );
    assert_eq!((r1.manifests, r1.manifests_copied), (2, 2));
    let r2 = aula_imager::repo::migrate_dir_to_s3(&dir, &dst, 4, &|_, _| {}).expect("again");
    assert_eq!((r2.chunks_copied, r2.manifests_copied), (0, 0), "{r2:?}");
    assert_eq!(dst.versions("room1").expect("versions"), vec![1, 2]);
    let back2 = restore_into(&dst, "room1", &d.path().join("t2"), data2.len() as u64);
    assert!(back2 == data2, "migrated image restores");
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn two_boot_servers_share_one_bucket_one_captures_the_other_restores() {
    let g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    let a = Server::start(&d.path().join("a"), settings(&g, &[0], "site", 64));
    let b = Server::start(&d.path().join("b"), settings(&g, &[1, 2], "site", 64));
    let data = source_data(3, 8);
    let src = region_of(&d.path().join("src"), &data);
    upload(&a.client(true), "classroom", &src, 512);
    // B lists and restores what A captured; agents talk HTTP to B only.
    let cb = b.client(false);
    let list = cb.list().expect("list from B");
    assert!(
        list.iter().any(|i| i.name == "classroom" && i.version == 1),
        "{list:?}"
    );
    let hit = "aula_repo_cache_lookups_total{result=\"hit\"}";
    let miss = "aula_repo_cache_lookups_total{result=\"miss\"}";
    let (h0, m0) = (metric(hit), metric(miss));
    let back = restore_into(&cb, "classroom", &d.path().join("t1"), data.len() as u64);
    assert!(back == data, "restored bytes differ");
    let m1 = metric(miss);
    assert!(m1 > m0, "first restore reads the bucket");
    let back = restore_into(&cb, "classroom", &d.path().join("t2"), data.len() as u64);
    assert!(back == data, "second restore differs");
    assert!(
        metric(hit) - h0 >= m1 - m0,
        "second restore served from B's cache"
    );
    // B publishes a second version; A sees it.
    upload(&b.client(true), "classroom", &src, 512);
    assert_eq!(
        a.client(false)
            .manifest("classroom", None)
            .expect("m")
            .image_version,
        2
    );
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn concurrent_publishes_of_one_name_get_distinct_versions_or_a_clear_conflict() {
    let g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    let repos: Vec<Arc<S3Repo>> = (0..3)
        .map(|i| Arc::new(S3Repo::open(g.s3_config(&[i], "race", SECRET), true).expect("open")))
        .collect();
    let data = source_data(4, 1);
    let src = region_of(&d.path().join("src"), &data);
    let m = upload(repos[0].as_ref(), "base", &src, 128);
    let mut m = m.clone();
    m.name = "contested".into();
    let barrier = Arc::new(std::sync::Barrier::new(9));
    let handles: Vec<_> = (0..9)
        .map(|i| {
            let r = repos[i % 3].clone();
            let m = m.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                r.publish(&m)
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut conflicts = 0;
    for h in handles {
        match h.join().expect("thread") {
            Ok(v) => won.push(v),
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains("conflict"), "a failed publish says why: {s}");
                conflicts += 1;
            }
        }
    }
    let mut distinct = won.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        won.len(),
        "two publishers got one version: {won:?}"
    );
    assert!(!won.is_empty(), "someone published");
    let stored = repos[0].versions("contested").expect("versions");
    assert_eq!(
        stored, distinct,
        "stored versions are exactly those reported ({conflicts} conflicts)"
    );
    for v in stored {
        assert_eq!(
            repos[1]
                .manifest("contested", Some(v))
                .expect("m")
                .image_version,
            v
        );
    }
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn gc_during_an_upload_removes_nothing_the_upload_relies_on() {
    let g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    let collector = g.repo("gc");
    let uploader = S3Repo::open(g.s3_config(&[1], "gc", SECRET), true).expect("open");
    let data = source_data(5, 2);
    let src = region_of(&d.path().join("src"), &data);
    let old = upload(&collector, "old", &src, 128);
    let garbage = source_data(6, 1);
    let gsrc = region_of(&d.path().join("g"), &garbage);
    let doomed = upload(&collector, "doomed", &gsrc, 128);
    collector.delete("old").expect("delete old");
    collector.delete("doomed").expect("delete doomed");
    // An upload starts: it will reuse old's chunks (present, unreferenced).
    uploader.start_upload("new").expect("lease");
    let ids: Vec<_> = old.unique_chunks().into_iter().map(|(id, _)| id).collect();
    assert!(uploader.missing_chunks(&ids).expect("missing").is_empty());
    let r = collector.gc(Duration::ZERO).expect("gc");
    assert_eq!(r.removed_chunks, 0, "{r:?}");
    assert_eq!(r.deferred_for, vec!["new".to_string()]);
    let mut m = old.clone();
    m.name = "new".into();
    assert_eq!(uploader.publish(&m).expect("publish"), 1);
    // The lease ended with the publish: gc now removes the garbage only.
    let r = collector.gc(Duration::ZERO).expect("gc");
    assert!(r.deferred_for.is_empty(), "{r:?}");
    let doomed_only: std::collections::HashSet<_> = doomed
        .unique_chunks()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !ids.contains(id))
        .collect();
    assert_eq!(r.removed_chunks, doomed_only.len() as u64, "{r:?}");
    let back = restore_into(&collector, "new", &d.path().join("t"), data.len() as u64);
    assert!(back == data, "the upload's image is whole");
    // A grace period keeps young garbage.
    upload(&collector, "young", &gsrc, 128);
    collector.delete("young").expect("delete");
    let r = collector.gc(Duration::from_secs(3600)).expect("gc");
    assert_eq!(r.removed_chunks, 0);
    assert!(r.kept_recent > 0, "{r:?}");
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn a_garage_node_killed_mid_restore_the_restore_finishes() {
    let mut g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    let data = source_data(7, 24);
    let src = region_of(&d.path().join("src"), &data);
    upload(&g.repo("kill"), "big", &src, 256);
    // The boot server talks to node 0 first; no cache, so every chunk
    // the agent fetches is read from the cluster.
    let srv = Server::start(&d.path().join("s"), settings(&g, &[0, 1, 2], "kill", 0));
    let client = srv.client(false);
    let served = "aula_repo_chunks_served_total";
    let before = metric(served);
    let t = d.path().join("t");
    let size = data.len() as u64;
    let restore = std::thread::spawn(move || restore_into(&client, "big", &t, size));
    let t0 = Instant::now();
    while metric(served) < before + 5.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "restore never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    g.kill(0);
    let at_kill = metric(served);
    let back = restore.join().expect("restore thread");
    assert!(back == data, "restored bytes differ");
    assert!(
        metric(served) > at_kill,
        "chunks were served after the node died"
    );
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn read_ahead_serves_a_restore_from_the_cache_within_its_bound() {
    let g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    // 128 windows of 64 KiB, every one different: ~4.5 MiB of frames, more
    // than the 2 MiB cache holds, so the cache must evict as it goes
    // (read-ahead: 16 chunks, half the cache).
    let data = source_data(8, 8);
    let src = region_of(&d.path().join("src"), &data);
    let m = upload(&g.repo("ahead"), "lab", &src, 64);
    let chunks = m.unique_chunks().len() as u64;
    assert_eq!(chunks, 128);
    let srv = Server::start(&d.path().join("s"), settings(&g, &[0, 1, 2], "ahead", 2));
    let aula_bootserver::repo_store::Store::S3(store) = srv.svc.repo().clone() else {
        panic!("an S3 store");
    };
    assert_eq!(store.cache.max_bytes(), 2 << 20);
    let back = restore_into(
        &srv.client(false),
        "lab",
        &d.path().join("t"),
        data.len() as u64,
    );
    assert!(back == data, "restored bytes differ");
    let st = store.cache.stats();
    eprintln!("{st:?} of {chunks} chunks");
    // Every chunk is read once and the cache starts empty: without
    // read-ahead there would be no hit at all.
    assert!(
        st.read_ahead >= chunks / 2,
        "most chunks read ahead: {st:?}"
    );
    // A chunk the restore asks for is in the cache, or its read-ahead GET
    // is in flight and the request waits for it (a fast client on
    // loopback catches up with the read-ahead).
    assert!(
        st.hits + st.joined >= chunks / 2,
        "the restore is served by the read-ahead: {st:?}"
    );
    assert!(st.hits + st.misses >= chunks, "a lookup per chunk: {st:?}");
    assert!(
        st.most_bytes <= 2 << 20 && store.cache.bytes() <= 2 << 20,
        "within its bound: {st:?}"
    );
    // The process-wide series are in /metrics.
    let text = aula_bootserver::metrics::global().encode().expect("encode");
    for series in [
        "aula_repo_cache_bytes ",
        "aula_repo_cache_filled_bytes_total ",
        "aula_repo_readahead_total{result=\"fetched\"}",
        "aula_repo_readahead_bytes_total ",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
    // Read-ahead off (and the cache on): a fresh server serves the same
    // restore with no hit.
    let mut plain = settings(&g, &[0, 1, 2], "ahead", 2);
    plain.readahead_chunks = 0;
    let srv2 = Server::start(&d.path().join("s2"), plain);
    let aula_bootserver::repo_store::Store::S3(store2) = srv2.svc.repo().clone() else {
        panic!("an S3 store");
    };
    let back = restore_into(
        &srv2.client(false),
        "lab",
        &d.path().join("t2"),
        data.len() as u64,
    );
    assert!(back == data, "restored bytes differ");
    let st2 = store2.cache.stats();
    assert_eq!((st2.hits, st2.joined, st2.read_ahead), (0, 0, 0), "{st2:?}");
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn a_corrupt_copy_in_the_cache_is_dropped_when_a_client_finds_it_and_the_restore_heals() {
    let g = Garage::start();
    let d = tempfile::tempdir().expect("tempdir");
    let repo = g.repo("heal");
    let data = source_data(9, 2);
    let src = region_of(&d.path().join("src"), &data);
    let m = upload(&repo, "lab", &src, 256);
    let ids: Vec<ChunkId> = m.unique_chunks().into_iter().map(|(id, _)| id).collect();
    assert!(ids.len() >= 2);
    let (a, b) = (ids[0], ids[1]);
    let (mut right, mut wrong) = (Vec::new(), Vec::new());
    repo.get_chunk(&a, &mut right).expect("a");
    repo.get_chunk(&b, &mut wrong).expect("b");
    let key = S3Repo::chunk_key(&a);
    let replace = |frame: &[u8]| {
        repo.delete_object(&key).expect("delete");
        assert!(repo.put_chunk_if_absent(&a, frame).expect("put"));
    };
    // The bucket holds another chunk's frame under a's key while the
    // server reads it into its cache; then the bucket is repaired.
    replace(&wrong);
    let srv = Server::start(&d.path().join("s"), settings(&g, &[0, 1, 2], "heal", 64));
    let aula_bootserver::repo_store::Store::S3(store) = srv.svc.repo().clone() else {
        panic!("an S3 store");
    };
    let client = srv.client(false);
    let mut got = Vec::new();
    client
        .get_chunk(&a, &mut got)
        .expect("get through the server");
    assert!(got == wrong && store.cache.contains(&a));
    replace(&right);
    client.get_chunk(&a, &mut got).expect("again");
    assert!(got == wrong, "a plain read is served from the cache");
    // A restore gets the cached copy, finds it corrupt, asks past the
    // cache (no-cache): the server drops its copy and reads the bucket.
    let back = restore_into(
        &srv.client(false),
        "lab",
        &d.path().join("t"),
        data.len() as u64,
    );
    assert!(back == data, "restored bytes differ");
    assert_eq!(
        store.cache.peek(&a).as_deref(),
        Some(&right[..]),
        "the right copy is cached now"
    );
    client.get_chunk(&a, &mut got).expect("after");
    assert!(got == right);
}

#[test]
#[ignore = "needs Garage (AULA_GARAGE): scripts/test builds it and runs this with --include-ignored"]
fn wrong_credentials_give_a_clear_error_without_the_secret() {
    let g = Garage::start();
    let wrong_secret = "0000000000000000000000000000000000000000000000000000000000000000";
    let e = S3Repo::open(g.s3_config(&[0], "creds", wrong_secret), true)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("wrong secret key"), "{e}");
    assert!(!e.contains(wrong_secret), "the secret is not shown: {e}");
    let mut cfg = g.s3_config(&[0], "creds", SECRET);
    cfg.access_key = "GK00000000000000000000dead".into();
    let e = S3Repo::open(cfg, true).expect_err("refused").to_string();
    assert!(
        e.contains("GK00000000000000000000dead")
            && (e.contains("does not know") || e.contains("wrong")),
        "{e}"
    );
    assert!(!e.contains(SECRET), "{e}");
    // A boot server with wrong credentials refuses to start, saying why.
    let d = tempfile::tempdir().expect("tempdir");
    let bad = d.path().join("bad.env");
    std::fs::write(
        &bad,
        format!(
            "AWS_ACCESS_KEY_ID={KEY_ID}\nAWS_SECRET_ACCESS_KEY={wrong_secret}\nAWS_ENDPOINT_URL={}\n",
            g.endpoint(0)
        ),
    )
    .expect("write");
    let mut cfg = RepoConfig::new(d.path().join("state"));
    cfg.s3 = Some(S3Settings {
        credentials_file: bad,
        ..settings(&g, &[0], "creds", 0)
    });
    let e = RepoService::open(cfg).err().expect("refused").to_string();
    assert!(
        e.contains("wrong secret key") && !e.contains(wrong_secret),
        "{e}"
    );
}
