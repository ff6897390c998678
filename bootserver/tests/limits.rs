//! The whole server under hostile load on loopback: slow clients of every
//! kind, a flood of machines, agents' events, oversized queries. Each
//! attacker speaks from its own 127.x.y.z address where the attack needs
//! many.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use support::{connect, connect_tls, http, https, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAC: &str = "52:54:00:aa:00:01";

fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// A client that sets its receive buffer small and never reads.
async fn slow_reader(src: IpAddr, dst: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.set_recv_buffer_size(4096).expect("rcvbuf");
    s.bind(std::net::SocketAddr::new(src, 0)).expect("bind");
    let mut c = s.connect(dst).await.expect("connect");
    c.write_all(b"GET /boot/live/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_slow_connections_do_not_delay_a_machines_script_and_kernel() {
    support::raise_fd_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(dir.path(), 32 << 20, 1 << 20, "", "");
    let srv = Running::start(cfg, 2);
    let kernel = std::fs::read(dir.path().join("live/vmlinuz")).expect("kernel");

    let mut held_plain = Vec::new();
    let mut held_tls = Vec::new();
    // 450 slow request heads, each from its own address: half a head, then
    // nothing (the classic Slowloris).
    for i in 0..450u32 {
        let mut s = connect(ip(1, (i / 200) as u8, 1 + (i % 200) as u8), srv.http)
            .await
            .expect("connect");
        s.write_all(b"GET /boot/ipxe/52:54:00:aa:00:01 HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        held_plain.push(s);
    }
    // 100 slow readers of the 32 MiB kernel, 10 from each of 10 addresses.
    for i in 0..100u32 {
        held_plain.push(slow_reader(ip(2, 0, 1 + (i / 10) as u8), srv.http).await);
    }
    // 50 slow bodies on the open routes (registration, events), over
    // HTTPS where they are served, 10 from each of 5 addresses.
    for i in 0..50u32 {
        let src = ip(3, 0, 1 + (i / 10) as u8);
        let mut s = connect_tls(src, srv.https, &srv.fingerprint)
            .await
            .expect("TLS");
        let head = if i % 2 == 0 {
            "POST /v1/agents/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{\"mac\":"
        } else {
            "POST /v1/agents/events HTTP/1.1\r\nHost: x\r\nX-Aula-Signature: sha256=00\r\nContent-Length: 60000\r\n\r\n{\"agent\":"
        };
        s.write_all(head.as_bytes()).await.expect("write");
        s.flush().await.expect("flush");
        held_tls.push(s);
    }
    // And 40 from one address: the per-address cap (32) closes 8 at once.
    let mut capped = Vec::new();
    for _ in 0..40 {
        let mut s = connect(ip(4, 0, 1), srv.http).await.expect("connect");
        s.write_all(b"GET /boot/ipxe/52:54:00:aa:00:01 HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        capped.push(s);
    }
    // Let the server take them all in (aged slow heads get closed to make
    // room once the 512 slots of the plain listener are full).
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A machine boots: its script, then its kernel.
    let me = ip(0, 0, 77);
    let started = Instant::now();
    let r = http(
        me,
        srv.http,
        "GET",
        &support::script_path(me, MAC),
        &[],
        None,
    )
    .await
    .expect("script");
    let script_ms = started.elapsed().as_millis();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("#!ipxe"), "{}", r.text());
    let started = Instant::now();
    let r = http(me, srv.http, "GET", "/boot/live/vmlinuz", &[], None)
        .await
        .expect("kernel");
    let kernel_ms = started.elapsed().as_millis();
    assert_eq!(r.status, 200);
    assert!(r.body == kernel, "kernel differs ({} bytes)", r.body.len());
    // And the API over HTTPS.
    let started = Instant::now();
    let r = https(
        me,
        srv.https,
        &srv.fingerprint,
        "GET",
        "/v1/status",
        &[],
        None,
    )
    .await
    .expect("status");
    let status_ms = started.elapsed().as_millis();
    assert_eq!(r.status, 200);
    assert!(
        script_ms < 3000 && kernel_ms < 5000 && status_ms < 3000,
        "script {script_ms} ms, kernel {kernel_ms} ms, status {status_ms} ms"
    );

    // The address over its cap had 8 connections closed at once.
    let mut closed = 0;
    for s in capped.iter_mut() {
        let mut b = [0u8; 64];
        // Closed (FIN), or reset (closed with our half head unread).
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 8, "connections beyond the per-address cap");
    println!(
        "RESULT slow_connections=600 script_ms={script_ms} kernel_ms={kernel_ms} kernel_mib=32 https_status_ms={status_ms} over_cap_closed={closed}"
    );
    drop(held_plain);
    drop(held_tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_and_slow_readers_are_cut_at_the_configured_deadlines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(
        dir.path(),
        32 << 20,
        1 << 10,
        "body_idle_timeout_s = 1\nrequest_timeout_s = 3\nsend_stall_timeout_s = 2\nheader_timeout_s = 2",
        "",
    );
    let srv = Running::start(cfg, 2);
    let src = ip(5, 0, 1);

    // A registration body that stops: 408 after the idle limit.
    let mut s = connect_tls(src, srv.https, &srv.fingerprint)
        .await
        .expect("TLS");
    s.write_all(b"POST /v1/agents/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mac\":")
        .await
        .expect("write");
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // An events body that trickles (a byte every 0.5 s): 408 at the request
    // deadline, 3 s after its head.
    let s = connect_tls(src, srv.https, &srv.fingerprint)
        .await
        .expect("TLS");
    let (mut rd, mut wr) = tokio::io::split(s);
    wr.write_all(b"POST /v1/agents/events HTTP/1.1\r\nHost: x\r\nX-Aula-Signature: sha256=00\r\nContent-Length: 1000\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
    let took = started.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        took >= Duration::from_millis(2800) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A slow reader of the kernel is dropped after the stall limit.
    let mut c = slow_reader(src, srv.http).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the stalled kernel download is still open"),
        }
    }
    assert!(total < 16 << 20, "{total} bytes: not dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_events_are_kept_within_the_per_machine_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(
        dir.path(),
        1 << 10,
        1 << 10,
        "",
        "[limits]\nevents_per_machine_kib = 64\n",
    );
    let srv = Running::start(cfg, 2);
    let m = support::boot_and_register(&srv, 1).await;
    let pad = "p".repeat(4000);
    for i in 0..100 {
        let body = serde_json::to_vec(&serde_json::json!({
            "agent": {"mac": m.mac}, "seq": i, "pad": pad,
        }))
        .expect("json");
        let sig = support::signature(&m.token, &body);
        let r = https(
            m.ip,
            srv.https,
            &srv.fingerprint,
            "POST",
            "/v1/agents/events",
            &[("X-Aula-Signature", &sig)],
            Some(&body),
        )
        .await
        .expect("event");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let auth = format!("Bearer {}", support::API_TOKEN);
    let r = https(
        m.ip,
        srv.https,
        &srv.fingerprint,
        "GET",
        &format!("/v1/agents/{}/events", m.mac),
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("events");
    assert_eq!(r.status, 200);
    let list = r.json();
    let list = list.as_array().expect("array");
    assert!(r.body.len() <= 64 << 10, "{} bytes kept", r.body.len());
    assert!(list.len() < 100 && list.len() >= 10, "{} kept", list.len());
    assert_eq!(list.last().expect("newest")["seq"], 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_machine_table_refuses_a_new_boot_mode_with_507_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(
        dir.path(),
        1 << 10,
        1 << 10,
        "",
        "[limits]\nmax_machines = 5\n",
    );
    let srv = Running::start(cfg, 2);
    let auth = format!("Bearer {}", support::API_TOKEN);
    let src = ip(6, 0, 1);
    let set = |n: u32| {
        let auth = auth.clone();
        let srv_https = srv.https;
        let fp = srv.fingerprint.clone();
        async move {
            https(
                src,
                srv_https,
                &fp,
                "PUT",
                &format!("/v1/clients/{}/boot", support::machine_mac(n)),
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                Some(br#"{"mode":"local"}"#),
            )
            .await
            .expect("set boot")
        }
    };
    // A flood of script requests for made-up machines, then five operator
    // settings: the flood's records make room.
    for n in 100..130 {
        let a = IpAddr::V4(support::machine_ip(n));
        let r = http(
            a,
            srv.http,
            "GET",
            &support::script_path(a, &support::machine_mac(n)),
            &[],
            None,
        )
        .await
        .expect("script");
        assert_eq!(r.status, 200);
    }
    for n in 0..5 {
        let r = set(n).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = set(5).await;
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(r.text().contains("max_machines"), "{}", r.text());
    // Known machines can still be changed, and scripts are still served.
    assert_eq!(set(0).await.status, 200);
    let a = IpAddr::V4(support::machine_ip(200));
    let r = http(
        a,
        srv.http,
        "GET",
        &support::script_path(a, &support::machine_mac(200)),
        &[],
        None,
    )
    .await
    .expect("script");
    assert_eq!(r.status, 200);
    let r = https(
        src,
        srv.https,
        &srv.fingerprint,
        "GET",
        "/v1/clients",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .expect("clients");
    assert_eq!(r.json().as_array().expect("list").len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chunk_query_over_the_bound_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = support::config(dir.path(), 1 << 10, 1 << 10, "", "");
    let srv = Running::start(cfg, 2);
    let src = ip(7, 0, 1);
    let id = "ab".repeat(32);
    let ids = |n: usize| -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "ids": vec![id.clone(); n] })).expect("json")
    };
    let body = ids(aula_bootserver::repository::MAX_MISSING_IDS);
    let r = https(
        src,
        srv.https,
        &srv.fingerprint,
        "POST",
        "/v1/chunks/missing",
        &[],
        Some(&body),
    )
    .await
    .expect("query");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = ids(aula_bootserver::repository::MAX_MISSING_IDS + 1);
    let r = https(
        src,
        srv.https,
        &srv.fingerprint,
        "POST",
        "/v1/chunks/missing",
        &[],
        Some(&body),
    )
    .await
    .expect("query");
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("batches"), "{}", r.text());
}
