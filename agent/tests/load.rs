//! Load over loopback HTTPS: 1,000 status requests over 100 concurrent
//! connections, and a restore's progress streamed to 20 event-stream
//! listeners at once. No error allowed; the figures are printed (run with
//! `--nocapture` to see them).

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_status_requests_over_100_connections_and_20_event_streams_see_no_error() {
    init_logs();
    let dir = tempfile::tempdir().expect("tmp");
    let server = BootServer::start(&dir.path().join("server"), API_TOKEN).await;
    let (src, _) = source_disk(dir.path(), 12);
    let m = upload_chunked(&server, &src, Some(1), "load", 1 << 20).await;
    let target = target_disk(dir.path());
    let proxy = Proxy::start(server.https, 8 << 20).await;
    let agent = start_agent(AgentOpts {
        ..AgentOpts::new(dir.path(), vec![(1, target)]).repo(&server, proxy.addr.port())
    })
    .await;

    // 1,000 status requests: 100 connections (one client each, keep-alive),
    // 10 requests each, all at once.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let api = Api::with(
            agent.addr,
            agent.fingerprint(),
            agent.token(),
            Duration::from_secs(30),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(10);
            let mut errors = 0;
            for _ in 0..10 {
                let t = Instant::now();
                let r = api
                    .client
                    .call(
                        Method::GET,
                        &format!("{}/v1/status", api.base),
                        &[],
                        Vec::new(),
                    )
                    .await;
                match r {
                    Ok(r) if r.status.as_u16() == 200 => {}
                    _ => errors += 1,
                }
                lat.push(t.elapsed());
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        lat.extend(l);
        errors += e;
    }
    let wall = started.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "RESULT status_requests={} connections=100 errors={errors} wall_s={:.3} req_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
    );
    assert_eq!(lat.len(), 1000);
    assert_eq!(errors, 0);

    // 20 event-stream listeners on one restore.
    let api = Api::new(&agent);
    let (s, r) = api
        .call(
            Method::POST,
            "/v1/jobs",
            Some(json!({"id": "load-restore", "op": "restore", "disk": 1, "partition": 2, "image": "load",
                "repository": format!("https://{}", proxy.addr)})),
        )
        .await;
    assert_eq!(s, 202, "{r}");
    let started = Instant::now();
    let mut listeners = Vec::new();
    for _ in 0..20 {
        let l = Api::with(
            agent.addr,
            agent.fingerprint(),
            agent.token(),
            Duration::from_secs(120),
        );
        listeners.push(tokio::spawn(async move {
            l.raw("/v1/jobs/load-restore/events").await
        }));
    }
    let mut progress_events = 0usize;
    for l in listeners {
        let (status, text) = l.await.expect("listener");
        assert_eq!(status, 200);
        let events: Vec<(String, Value)> = text
            .split("\n\n")
            .filter_map(|block| {
                let ev = block.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((
                    ev.to_string(),
                    serde_json::from_str(data).expect("event json"),
                ))
            })
            .collect();
        assert_eq!(
            events.first().map(|e| e.0.as_str()),
            Some("snapshot"),
            "{text}"
        );
        let last = &events.last().expect("events").1;
        assert_eq!(last["state"], "succeeded", "{text}");
        assert_eq!(last["progress"]["bytes_done"], m.used_bytes);
        let seqs: Vec<u64> = events.iter().filter_map(|e| e.1["seq"].as_u64()).collect();
        for w in seqs.windows(2) {
            assert!(w[0] < w[1], "out of order: {seqs:?}");
        }
        let p = events.iter().filter(|e| e.0 == "progress").count();
        assert!(p >= 1, "no progress on a stream: {text}");
        progress_events += p;
    }
    println!(
        "RESULT event_listeners=20 restore_s={:.2} progress_events_received={progress_events} used_bytes={} errors=0",
        started.elapsed().as_secs_f64(),
        m.used_bytes
    );
    agent.shutdown().await;
    server.stop().await;
}
