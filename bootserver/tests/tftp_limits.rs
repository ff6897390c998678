//! TFTP under forged and slow clients, over loopback: requests from
//! addresses that never acknowledge hold no transfer slot (a real client,
//! tftp-hpa, still gets its program while they hang), the client's
//! `timeout` option is capped, a whole transfer is capped in time, and a
//! flood of unacknowledged requests only pushes out other unacknowledged ones.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aula_bootserver::config::TftpConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A TFTP server on 127.0.0.1 on its own runtime, stopped on drop.
struct Tftp {
    addr: SocketAddr,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tftp {
    fn start(root: &Path, tweak: impl FnOnce(&mut TftpConfig)) -> Tftp {
        let mut cfg = TftpConfig {
            enabled: true,
            root: root.to_path_buf(),
            ..Default::default()
        };
        tweak(&mut cfg);
        let cancel = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let c2 = cancel.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let tracker = TaskTracker::new();
                let svc = aula_bootserver::tftp::start(
                    &cfg,
                    std::iter::empty(),
                    "127.0.0.1:0".parse().expect("addr"),
                    None,
                    c2.clone(),
                    &tracker,
                )
                .expect("start TFTP");
                tx.send(svc.local_addr).expect("send addr");
                c2.cancelled().await;
                tracker.close();
                tracker.wait().await;
            });
        });
        let addr = rx.recv().expect("TFTP address");
        Tftp {
            addr,
            cancel,
            thread: Some(thread),
        }
    }
}

impl Drop for Tftp {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn program(dir: &Path) -> Vec<u8> {
    let data = common::Rng(0x7f7f_0001).bytes(300_000);
    std::fs::write(dir.join("undionly.kpxe"), &data).expect("write program");
    data
}

fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(name.as_bytes());
    p.push(0);
    p.extend_from_slice(b"octet\0");
    for (k, v) in opts {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// `n` requests from `n` loopback addresses that never acknowledge
/// (their sockets stay open and silent, so nothing tells the server they
/// are gone), each asking for the longest timeout.
fn forged_requests(server: SocketAddr, n: usize, first: u8) -> Vec<UdpSocket> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, 0, 1 + (i / 200) as u8, first + (i % 200) as u8);
            let s = UdpSocket::bind((ip, 0)).expect("bind forged source");
            s.send_to(
                &rrq("undionly.kpxe", &[("timeout", "255"), ("blksize", "1468")]),
                server,
            )
            .expect("send forged RRQ");
            s
        })
        .collect()
}

/// tftp-hpa fetching the program; returns the file and how long it took.
fn tftp_hpa(server: SocketAddr, out: &Path) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let o = Command::new("timeout")
        .arg("20")
        .arg("tftp")
        .args(["-4", "-m", "binary"])
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .arg("-c")
        .arg("get")
        .arg("undionly.kpxe")
        .arg(out)
        .output()
        .expect("run tftp (apt install tftp-hpa)");
    let took = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && !text.contains("Error"),
        "tftp-hpa failed after {took:?}: {text}"
    );
    (std::fs::read(out).expect("downloaded file"), took)
}

#[test]
fn sixty_four_forged_requests_do_not_block_a_real_boot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = program(dir.path());
    let srv = Tftp::start(dir.path(), |_| {});
    // As many forged requests as there are transfer slots (64).
    let forged = forged_requests(srv.addr, 64, 10);
    // Let the server take them all in and send its first packets.
    std::thread::sleep(Duration::from_millis(500));
    let (got, took) = tftp_hpa(srv.addr, &dir.path().join("out-hpa"));
    assert_eq!(got, data, "tftp-hpa got another file");
    // The test harness's own client too, with options as iPXE sends them.
    let started = Instant::now();
    let (got2, _) = common::tftp_get(
        srv.addr,
        b"undionly.kpxe",
        &[("blksize", "1468"), ("tsize", "0")],
        1,
    )
    .expect("real client refused while forged requests hang");
    let took2 = started.elapsed();
    assert_eq!(got2, data);
    // The forged requests are still being retried by the server: they hang.
    let mut buf = [0u8; 2048];
    forged[63]
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    assert!(
        forged[63].recv_from(&mut buf).is_ok(),
        "the forged request is still pending (the server retransmits to it)"
    );
    assert!(took < Duration::from_secs(5), "tftp-hpa took {took:?}");
    println!(
        "RESULT forged_requests=64 tftp_hpa_ms={} own_client_ms={} bytes={}",
        took.as_millis(),
        took2.as_millis(),
        data.len()
    );
}

#[test]
fn a_flood_of_unacknowledged_requests_only_pushes_out_other_unacknowledged_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = program(dir.path());
    let srv = Tftp::start(dir.path(), |c| c.max_pending = 16);
    let _first = forged_requests(srv.addr, 300, 10);
    std::thread::sleep(Duration::from_millis(300));
    let (got, took) = tftp_hpa(srv.addr, &dir.path().join("out"));
    assert_eq!(got, data);
    assert!(took < Duration::from_secs(5), "tftp-hpa took {took:?}");
}

#[test]
fn the_client_timeout_option_is_acknowledged_only_up_to_the_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = program(dir.path());
    let srv = Tftp::start(dir.path(), |_| {});
    let (got, oack) = common::tftp_get(
        srv.addr,
        b"undionly.kpxe",
        &[("timeout", "3"), ("blksize", "1468")],
        1,
    )
    .expect("transfer");
    assert_eq!(got, data);
    assert!(
        oack.contains(&("timeout".to_string(), "3".to_string())),
        "{oack:?}"
    );
    let (got, oack) = common::tftp_get(
        srv.addr,
        b"undionly.kpxe",
        &[("timeout", "255"), ("blksize", "1468")],
        1,
    )
    .expect("transfer");
    assert_eq!(got, data);
    assert!(
        !oack.iter().any(|(k, _)| k == "timeout"),
        "a timeout over the cap must not be acknowledged: {oack:?}"
    );

    // A client that asked for 255 s and then falls silent is given up
    // after (retries + 1) × the server's own timeout, not 255 s × 6.
    let s = UdpSocket::bind("127.0.0.5:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s.send_to(&rrq("undionly.kpxe", &[("timeout", "255")]), srv.addr)
        .expect("send");
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    let mut last = started;
    while started.elapsed() < Duration::from_secs(10) {
        if s.recv_from(&mut buf).is_ok() {
            last = Instant::now();
        }
    }
    let active = last - started;
    assert!(
        active < Duration::from_secs(8),
        "the server kept retransmitting for {active:?}"
    );
}

#[test]
fn a_transfer_is_cut_at_the_total_time_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    program(dir.path());
    let srv = Tftp::start(dir.path(), |c| c.max_transfer_s = 2);
    // ACK each 512-byte block after 0.4 s (within the 1 s timeout): 586
    // blocks would take four minutes.
    let s = UdpSocket::bind("127.0.0.6:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    s.send_to(&rrq("undionly.kpxe", &[]), srv.addr)
        .expect("send");
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    let error = loop {
        let (n, from) = s
            .recv_from(&mut buf)
            .expect("the server talks until it gives up");
        match u16::from_be_bytes([buf[0], buf[1]]) {
            3 => {
                std::thread::sleep(Duration::from_millis(400));
                s.send_to(&[0, 4, buf[2], buf[3]], from).expect("ack");
            }
            5 => break String::from_utf8_lossy(&buf[4..n]).into_owned(),
            op => panic!("unexpected opcode {op}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not cut");
    };
    let took = started.elapsed();
    assert!(error.contains("longer"), "{error}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}
