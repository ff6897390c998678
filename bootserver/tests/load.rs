//! A load test of the whole boot server on loopback: 100 machines, each
//! from its own address (127.10.0.x), power on within ten seconds (a room
//! switched on at once) and for the rest of the minute do what a live
//! boot and a restore do: the iPXE script from their own address (it opens
//! the registration window), the kernel and initrd (plain HTTP), the
//! registration with the script's nonce (HTTPS, pinned), the image list
//! and manifest, every chunk of the image (four at a time), and a signed
//! progress event every second until the minute is over.
//!
//! Every request must succeed; the latency of each is recorded and the
//! test ends with `RESULT … p99_ms=…` (run with `--nocapture`). Client and
//! server share this machine's cores, so the figures are an upper bound.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aula_imager::create::{create_partition, CreateOptions, SourceInfo};
use aula_imager::device::{Device, Region};
use aula_imager::progress::Progress;
use aula_imager::repo::LocalRepo;
use support::{http, https, Running};

const MACHINES: u32 = 100;
const POWER_ON_SPREAD: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(60);
const KERNEL: usize = 8 << 20;
const INITRD: usize = 12 << 20;

#[derive(Default)]
struct Stats {
    /// Latencies in microseconds, by kind of request.
    by_kind: BTreeMap<&'static str, Vec<u64>>,
    errors: Vec<String>,
    bytes: u64,
}

impl Stats {
    fn record(&mut self, kind: &'static str, started: Instant, bytes: usize) {
        self.by_kind
            .entry(kind)
            .or_default()
            .push(started.elapsed().as_micros() as u64);
        self.bytes += bytes as u64;
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// One machine's minute; errors are recorded, not raised.
async fn machine(
    srv: Arc<Running>,
    n: u32,
    ids: Arc<Vec<String>>,
    stats: Arc<Mutex<Stats>>,
    end: Instant,
) {
    let r = run_machine(&srv, n, &ids, &stats, end).await;
    if let Err(e) = r {
        stats
            .lock()
            .expect("stats")
            .errors
            .push(format!("machine {n}: {e}"));
    }
}

async fn run_machine(
    srv: &Running,
    n: u32,
    ids: &[String],
    stats: &Mutex<Stats>,
    end: Instant,
) -> Result<(), String> {
    let ip = IpAddr::V4(support::machine_ip(n));
    let mac = support::machine_mac(n);
    let ok = |kind: &str, r: &support::Resp| -> Result<(), String> {
        if (200..300).contains(&r.status) {
            Ok(())
        } else {
            Err(format!("{kind}: {} {}", r.status, r.text()))
        }
    };
    // The iPXE script, from the machine's own address.
    let t = Instant::now();
    let r = http(
        ip,
        srv.http,
        "GET",
        &support::script_path(ip, &mac),
        &[],
        None,
    )
    .await
    .map_err(|e| format!("script: {e}"))?;
    ok("script", &r)?;
    stats
        .lock()
        .expect("stats")
        .record("script", t, r.body.len());
    let nonce = support::nonce_of(&r.text()).ok_or("no nonce on the kernel line")?;
    // Kernel and initrd.
    for (kind, path, len) in [
        ("kernel", "/boot/live/vmlinuz", KERNEL),
        ("initrd", "/boot/live/initrd.gz", INITRD),
    ] {
        let t = Instant::now();
        let r = http(ip, srv.http, "GET", path, &[], None)
            .await
            .map_err(|e| format!("{kind}: {e}"))?;
        ok(kind, &r)?;
        if r.body.len() != len {
            return Err(format!("{kind}: {} bytes, not {len}", r.body.len()));
        }
        stats.lock().expect("stats").record(kind, t, len);
    }
    // The agent registers from the same address with the boot's nonce.
    let token = format!("load-agent-token-{n:06}-0123456789");
    let body = support::registration(&mac, ip, &token, &nonce);
    let t = Instant::now();
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
    .map_err(|e| format!("register: {e}"))?;
    ok("register", &r)?;
    stats
        .lock()
        .expect("stats")
        .record("register", t, r.body.len());
    // The restore: list, manifest, every chunk (four at a time).
    for (kind, path) in [("images", "/v1/images"), ("manifest", "/v1/images/lab")] {
        let t = Instant::now();
        let r = https(ip, srv.https, &srv.fingerprint, "GET", path, &[], None)
            .await
            .map_err(|e| format!("{kind}: {e}"))?;
        ok(kind, &r)?;
        stats.lock().expect("stats").record(kind, t, r.body.len());
    }
    let mut next = 0usize;
    let mut seq = 0u64;
    while Instant::now() < end {
        let batch: Vec<&String> = (0..4).map(|k| &ids[(next + k) % ids.len()]).collect();
        next += 4;
        let fetches = batch.into_iter().map(|id| async move {
            let t = Instant::now();
            let r = https(
                ip,
                srv.https,
                &srv.fingerprint,
                "GET",
                &format!("/v1/chunks/{id}"),
                &[],
                None,
            )
            .await
            .map_err(|e| format!("chunk: {e}"))?;
            ok("chunk", &r)?;
            stats
                .lock()
                .expect("stats")
                .record("chunk", t, r.body.len());
            Ok::<_, String>(())
        });
        for r in futures_util::future::join_all(fetches).await {
            r?;
        }
        // Progress, about once a second.
        if next.is_multiple_of(16) {
            seq += 1;
            let ev = serde_json::to_vec(&serde_json::json!({
                "agent": {"mac": mac}, "job": "restore", "seq": seq, "phase": "restore",
            }))
            .map_err(|e| e.to_string())?;
            let sig = support::signature(&token, &ev);
            let t = Instant::now();
            let r = https(
                ip,
                srv.https,
                &srv.fingerprint,
                "POST",
                "/v1/agents/events",
                &[
                    ("X-Aula-Signature", &sig),
                    ("Content-Type", "application/json"),
                ],
                Some(&ev),
            )
            .await
            .map_err(|e| format!("event: {e}"))?;
            ok("event", &r)?;
            stats.lock().expect("stats").record("event", t, ev.len());
        }
        // A restore writes what it fetched: pace like a disk would.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_machines_boot_register_and_restore_for_a_minute_without_an_error() {
    support::raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(dir.path(), KERNEL, INITRD, "", "");
    // The image the room restores: 32 MiB in 1 MiB chunks.
    let repo_root = cfg.server.data_dir.join("repo");
    let ids = {
        std::fs::create_dir_all(&cfg.server.data_dir).expect("data dir");
        let repo = LocalRepo::open(&repo_root, true).expect("repo");
        let data: Vec<u8> = support::pattern(32 << 20, 7)
            .chunks(4096)
            .enumerate()
            .flat_map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_vec()
                } else {
                    vec![b'a' + (i % 26) as u8; c.len()]
                }
            })
            .collect();
        let src = dir.path().join("lab.raw");
        std::fs::write(&src, &data).expect("source");
        let region = Region::whole(Arc::new(Device::open_read(&src).expect("open")));
        let m = create_partition(
            "lab",
            &region,
            &SourceInfo::default(),
            &repo,
            &CreateOptions {
                chunk_size: 1 << 20,
                raw: true,
                threads: 2,
                ..Default::default()
            },
            &Progress::new(),
        )
        .expect("image");
        m.unique_chunks()
            .into_iter()
            .map(|(id, _)| id.hex())
            .collect::<Vec<_>>()
    };
    let srv = Arc::new(Running::start(cfg, 2));
    let ids = Arc::new(ids);
    let stats = Arc::new(Mutex::new(Stats::default()));
    let started = Instant::now();
    let end = started + RUN;
    let tasks: Vec<_> = (0..MACHINES)
        .map(|n| {
            let (srv, ids, stats) = (srv.clone(), ids.clone(), stats.clone());
            tokio::spawn(async move {
                tokio::time::sleep(POWER_ON_SPREAD * n / MACHINES).await;
                machine(srv, n, ids, stats, end).await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("machine task");
    }
    let elapsed = started.elapsed();
    let stats = stats.lock().expect("stats");
    let mut all: Vec<u64> = Vec::new();
    let mut small: Vec<u64> = Vec::new();
    let mut line = String::new();
    for (kind, v) in &stats.by_kind {
        let mut s = v.clone();
        s.sort_unstable();
        println!(
            "{kind:>9}: {:>6} requests  p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            s.len(),
            pct(&s, 0.50),
            pct(&s, 0.99),
            pct(&s, 1.0)
        );
        line.push_str(&format!(" {kind}_p99_ms={:.1}", pct(&s, 0.99)));
        all.extend_from_slice(&s);
        if !matches!(*kind, "kernel" | "initrd") {
            small.extend_from_slice(&s);
        }
    }
    all.sort_unstable();
    small.sort_unstable();
    let registered = stats.by_kind.get("register").map_or(0, Vec::len);
    for e in stats.errors.iter().take(10) {
        eprintln!("error: {e}");
    }
    println!(
        "RESULT machines={MACHINES} seconds={:.0} requests={} errors={} registered={registered} mib={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} api_p99_ms={:.1}{line}",
        elapsed.as_secs_f64(),
        all.len(),
        stats.errors.len(),
        stats.bytes >> 20,
        pct(&all, 0.50),
        pct(&all, 0.99),
        pct(&all, 1.0),
        pct(&small, 0.99),
    );
    assert!(
        stats.errors.is_empty(),
        "{} errors, first: {:?}",
        stats.errors.len(),
        stats.errors.first()
    );
    assert_eq!(registered, MACHINES as usize, "every machine registered");
}
