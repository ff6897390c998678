//! The repository's storage under pressure, over loopback HTTP with the
//! imager's own client: a capture that reuses old chunks while garbage
//! collection runs in a loop loses no chunk; a repository on a small full
//! filesystem (a loop-mounted ext4) answers 507, publishes nothing
//! half-done and is clean after a restart; the image listing is cached.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aula_bootserver::repository::{RepoConfig, RepoRoutes, RepoService};
use aula_imager::create::{create_partition, CreateOptions, SourceInfo};
use aula_imager::device::{Device, OpenMode, Region};
use aula_imager::progress::Progress;
use aula_imager::repo::{HttpOptions, HttpRepo, LocalRepo, Repository};
use aula_imager::restore::{restore_partition, RestoreOptions};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "safety-write-token-0123456789";

/// A repository service on its own runtime thread; stopped on drop.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(root: &Path, grace_s: u64) -> Server {
        let mut cfg = RepoConfig::new(root.to_path_buf());
        cfg.write_token = Some(TOKEN.into());
        cfg.gc_grace_s = grace_s;
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
                let tracker = tokio_util::task::TaskTracker::new();
                let groups: Vec<Arc<dyn aula_bootserver::http::RouteGroup>> =
                    vec![Arc::new(RepoRoutes(svc))];
                let local = aula_bootserver::http::start(
                    "127.0.0.1:0".parse().expect("addr"),
                    None,
                    groups,
                    256,
                    stop2.clone(),
                    &tracker,
                )
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

    fn client(&self) -> HttpRepo {
        HttpRepo::new(
            &format!("http://{}", self.addr),
            HttpOptions {
                token: Some(TOKEN.into()),
                retry_for: Duration::from_secs(5),
                timeout: Duration::from_secs(10),
                parallel: 4,
                ..Default::default()
            },
        )
        .expect("client")
    }

    /// A write-token request; returns (status, body).
    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(self.addr).expect("connect");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body).expect("write body");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        (status, body.to_string())
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

fn random(seed: u64, len: usize) -> Vec<u8> {
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

fn region(path: &Path, data: &[u8]) -> Region {
    std::fs::write(path, data).expect("write source");
    Region::whole(Arc::new(Device::open_read(path).expect("open")))
}

fn capture(
    repo: &dyn Repository,
    name: &str,
    src: &Region,
    chunk: u64,
) -> aula_imager::Result<aula_imager::manifest::Manifest> {
    let opts = CreateOptions {
        chunk_size: chunk,
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
}

fn chunk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(root.join("chunks")).expect("chunks") {
        let sub = sub.expect("entry").path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).expect("sub") {
                out.push(f.expect("entry").path());
            }
        }
    }
    out
}

/// Every chunk file decompresses to content whose SHA-256 is its name.
fn assert_chunks_whole(root: &Path) -> usize {
    let files = chunk_files(root);
    for p in &files {
        let frame = std::fs::read(p).expect("chunk");
        let data = zstd::decode_all(&frame[..])
            .unwrap_or_else(|e| panic!("{} is not a whole zstd frame: {e}", p.display()));
        let digest = ring::digest::digest(&ring::digest::SHA256, &data);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let name = p.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(
            name,
            format!("{hex}.zst"),
            "{} holds other content",
            p.display()
        );
    }
    files.len()
}

fn age(path: &Path, secs: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs);
    std::fs::File::open(path)
        .expect("open")
        .set_modified(t)
        .expect("set mtime");
}

fn restore_equals(repo: &dyn Repository, name: &str, dir: &Path, want: &[u8]) {
    let m = repo.manifest(name, None).expect("manifest");
    let out = dir.join(format!("{name}.out"));
    let mut d = Device::open(
        &out,
        OpenMode {
            write: true,
            create: true,
            exclusive: false,
        },
    )
    .expect("target");
    d.grow_to(want.len() as u64).expect("grow");
    let t = Region::whole(Arc::new(d));
    restore_partition(
        &m,
        &t,
        repo,
        &RestoreOptions {
            threads: 2,
            ..Default::default()
        },
        &Progress::new(),
    )
    .expect("restore");
    assert!(
        std::fs::read(&out).expect("read back") == want,
        "{name} restores other bytes"
    );
}

#[test]
fn a_capture_and_gc_running_together_lose_no_chunk() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("repo");
    let srv = Server::start(&root, 3600);
    let c = srv.client();
    // An old image, deleted: its chunks are unreferenced and, aged past
    // the grace period, what gc removes.
    let old = random(1, 8 << 20);
    capture(
        &c,
        "old",
        &region(&dir.path().join("old.raw"), &old),
        64 << 10,
    )
    .expect("old");
    c.delete("old").expect("delete old");
    for p in chunk_files(&root) {
        age(&p, 7200);
    }
    // A capture asks whether the old chunks are there (a HEAD naming its
    // image, as the imager sends, for half; a missing-check for the other
    // half): they are, so it will not upload them. gc runs before it
    // publishes: it must keep them.
    let old_ids: Vec<_> = chunk_files(&root)
        .iter()
        .map(|p| {
            p.file_stem()
                .and_then(|n| n.to_str())
                .and_then(|h| h.parse::<aula_imager::chunk::ChunkId>().ok())
                .expect("chunk id")
        })
        .collect();
    assert_eq!(old_ids.len(), 128);
    let probe = srv.client();
    probe.begin_upload("new");
    let (heads, queried) = old_ids.split_at(64);
    for id in heads {
        assert!(probe.chunk_size_stored(id).expect("HEAD").is_some());
    }
    assert!(probe.missing_chunks(queried).expect("missing").is_empty());
    let (st, body) = srv.call("POST", "/v1/repo/gc?purge_trash=1", b"");
    assert_eq!(st, 200, "{body}");
    let lost = probe.missing_chunks(&old_ids).expect("missing");
    assert!(
        lost.is_empty(),
        "gc removed {} chunk(s) a capture had found present: {body}",
        lost.len()
    );

    // A new capture reusing all of the old data, plus 8 MiB of its own
    // (256 chunks of 64 KiB), while gc runs again and again.
    let mut new = old.clone();
    new.extend_from_slice(&random(2, 8 << 20));
    let src = region(&dir.path().join("new.raw"), &new);
    let done = Arc::new(AtomicBool::new(false));
    let collector = {
        let done = done.clone();
        let addr = srv.addr;
        std::thread::spawn(move || {
            let srv = Server {
                addr,
                stop: CancellationToken::new(),
                thread: None,
            };
            let mut runs = 0u32;
            let mut removed = 0u64;
            while !done.load(Ordering::Relaxed) {
                let (st, body) = srv.call("POST", "/v1/repo/gc?purge_trash=1", b"");
                assert_eq!(st, 200, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("gc report");
                removed += v["removed_chunks"].as_u64().unwrap_or(0);
                runs += 1;
            }
            (runs, removed)
        })
    };
    let result = capture(&c, "new", &src, 64 << 10);
    done.store(true, Ordering::Relaxed);
    let (runs, removed) = collector.join().expect("gc thread");
    let m = result.expect("the capture publishes although gc ran throughout");
    assert!(runs >= 3, "gc ran only {runs} times during the capture");
    // Nothing the new image names was removed.
    let ids: Vec<_> = m.unique_chunks().into_iter().map(|(id, _)| id).collect();
    let missing = c.missing_chunks(&ids).expect("missing check");
    assert!(missing.is_empty(), "{} chunk(s) lost to gc", missing.len());
    let (st, body) = srv.call("POST", "/v1/repo/check?image=new", b"");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"state\":\"ready\""), "{body}");
    restore_equals(&c, "new", dir.path(), &new);
    println!(
        "RESULT gc_runs_during_capture={runs} chunks_removed={removed} chunks_in_image={} lost=0",
        ids.len()
    );
}

/// A small ext4 filesystem in a file, loop-mounted; unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
}

impl SmallFs {
    fn new(dir: &Path, mib: u64) -> SmallFs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it loop-mounts a small ext4 filesystem (run it with sudo)"
        );
        let img = dir.join("fs.img");
        let f = std::fs::File::create(&img).expect("image");
        f.set_len(mib << 20).expect("size");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mnt");
        let ok = |c: &mut Command| {
            let o = c.output().expect("run");
            assert!(
                o.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img));
        ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        SmallFs { mnt }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// Fills what is left of the filesystem holding `dir` with one file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).expect("filler");
    let block = vec![0xa5u8; 64 << 10];
    loop {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    let mut small = vec![0u8; 512];
    while f.write_all(&small).is_ok() {}
    small.truncate(1);
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    p
}

fn tmp_entries(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("tmp"))
        .expect("tmp")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_full_filesystem_gives_507_publishes_nothing_and_is_clean_after_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let fs = SmallFs::new(dir.path(), 24);
    let root = fs.mnt.join("repo");
    let srv = Server::start(&root, 3600);
    let c = srv.client();
    // A small image fits.
    let small = random(3, 1 << 20);
    let tiny = capture(
        &c,
        "tiny",
        &region(&dir.path().join("tiny.raw"), &small),
        256 << 10,
    )
    .expect("a small image fits");
    // A capture of 64 MiB of incompressible data does not.
    let big = random(4, 64 << 20);
    let e = capture(
        &c,
        "big",
        &region(&dir.path().join("big.raw"), &big),
        1 << 20,
    )
    .expect_err("64 MiB cannot fit in 24");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("507") && msg.contains("no space left"),
        "unclear error: {msg}"
    );
    assert!(
        tmp_entries(&root).is_empty(),
        "leftovers: {:?}",
        tmp_entries(&root)
    );
    // Publishing when not a byte is left: 507, and no trace of the image.
    let filler = fill(&fs.mnt);
    let mut m2 = tiny.clone();
    m2.name = "tiny2".into();
    let (st, body) = srv.call("PUT", "/v1/images/tiny2", &m2.to_json());
    assert_eq!(st, 507, "{body}");
    assert!(body.contains("no space left"), "{body}");
    assert!(
        !root.join("images/tiny2").exists(),
        "a half-published image directory"
    );
    assert!(
        tmp_entries(&root).is_empty(),
        "leftovers: {:?}",
        tmp_entries(&root)
    );
    // A chunk upload when full: 507 too, nothing stored.
    let frame = zstd::bulk::compress(&random(5, 300_000), 1).expect("zstd");
    let digest = ring::digest::digest(&ring::digest::SHA256, &random(5, 300_000));
    let id: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let (st, body) = srv.call("PUT", &format!("/v1/chunks/{id}"), &frame);
    assert_eq!(st, 507, "{body}");
    // Published: only what was published whole ("big" shows as a capture
    // still uploading, with no version).
    let list = c.list().expect("list");
    let published: Vec<&str> = list
        .iter()
        .filter(|i| i.version > 0)
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(published, vec!["tiny"]);
    assert!(
        list.iter()
            .all(|i| i.name != "big" || (i.state == "uploading" && i.version == 0)),
        "{:?}",
        list.iter()
            .map(|i| (&i.name, &i.state, i.version))
            .collect::<Vec<_>>()
    );

    // A crash leaves a temporary file of a process that is gone; restart.
    drop(srv);
    std::fs::remove_file(&filler).expect("free space");
    std::fs::write(root.join("tmp/4194000-9.partial"), b"torn").expect("leftover");
    let srv = Server::start(&root, 3600);
    let c = srv.client();
    assert!(
        tmp_entries(&root).is_empty(),
        "not swept: {:?}",
        tmp_entries(&root)
    );
    let chunks = assert_chunks_whole(&root);
    let names: Vec<String> = c
        .list()
        .expect("list")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, vec!["tiny".to_string()]);
    let (st, body) = srv.call("POST", "/v1/repo/check", b"");
    assert_eq!(st, 200, "{body}");
    assert!(!body.contains("corrupt"), "{body}");
    restore_equals(&c, "tiny", dir.path(), &small);
    // With space again, the publish that failed succeeds.
    let (st, body) = srv.call("PUT", "/v1/images/tiny2", &m2.to_json());
    assert_eq!(st, 201, "{body}");
    println!("RESULT fs_mib=24 whole_chunks_after_restart={chunks} tmp_leftovers=0");
}

#[test]
fn the_image_list_is_served_from_a_cache_that_follows_every_change() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("repo");
    let srv = Server::start(&root, 3600);
    let c = srv.client();
    let a = random(6, 1 << 20);
    capture(&c, "one", &region(&dir.path().join("a.raw"), &a), 256 << 10).expect("one");
    let names = |c: &HttpRepo| -> Vec<(String, u32)> {
        c.list()
            .expect("list")
            .into_iter()
            .map(|i| (i.name, i.version))
            .collect()
    };
    assert_eq!(names(&c), vec![("one".to_string(), 1)]);
    // A manifest rewritten in place (its directory unchanged) is not read
    // again: the listing comes from the cache, not from every manifest.
    let f = root.join("images/one/1.json");
    let orig = std::fs::read(&f).expect("manifest");
    let dir_mtime = std::fs::metadata(root.join("images/one"))
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(&f, b"{ not a manifest").expect("damage in place");
    assert_eq!(
        std::fs::metadata(root.join("images/one"))
            .and_then(|m| m.modified())
            .expect("mtime"),
        dir_mtime
    );
    assert_eq!(
        names(&c),
        vec![("one".to_string(), 1)],
        "listing re-read the manifests"
    );
    std::fs::write(&f, &orig).expect("restore");
    // Publish, delete, and a local writer in the same directory all show.
    capture(&c, "one", &region(&dir.path().join("a.raw"), &a), 256 << 10).expect("v2");
    capture(&c, "two", &region(&dir.path().join("a.raw"), &a), 256 << 10).expect("two");
    assert_eq!(
        names(&c),
        vec![("one".to_string(), 2), ("two".to_string(), 1)]
    );
    c.delete("one").expect("delete");
    assert_eq!(names(&c), vec![("two".to_string(), 1)]);
    let local = LocalRepo::open(&root, false).expect("local");
    capture(
        &local,
        "three",
        &region(&dir.path().join("a.raw"), &a),
        256 << 10,
    )
    .expect("local capture");
    assert_eq!(
        names(&c),
        vec![("three".to_string(), 1), ("two".to_string(), 1)]
    );
}

#[test]
fn a_capture_running_longer_than_the_grace_period_keeps_its_chunks() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("repo");
    let srv = Server::start(&root, 2);
    let c = srv.client();
    c.begin_upload("long");
    let content = random(8, 256 << 10);
    let id = aula_imager::chunk::ChunkId::of(&content);
    let frame = zstd::bulk::compress(&content, 1).expect("zstd");
    c.put_chunk(&id, &frame).expect("upload");
    // The capture goes on (its next request) past the 2 s grace period.
    std::thread::sleep(Duration::from_secs(3));
    let other = random(9, 256 << 10);
    let other_id = aula_imager::chunk::ChunkId::of(&other);
    c.put_chunk(&other_id, &zstd::bulk::compress(&other, 1).expect("zstd"))
        .expect("upload");
    let (st, body) = srv.call("POST", "/v1/repo/gc", b"");
    assert_eq!(st, 200, "{body}");
    assert!(
        c.missing_chunks(&[id, other_id])
            .expect("missing")
            .is_empty(),
        "gc removed a chunk of a capture in progress: {body}"
    );
}
