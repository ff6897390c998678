//! The accept loop's limits over real loopback TCP: body deadlines (idle
//! and total), disconnects mid-body, stalled responses, the per-address
//! cap, and a full table making room by closing a connection that sent no
//! request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aula_httpkit::body::read_limited;
use aula_httpkit::server::{serve, BoxFuture, Handler, Options};
use aula_httpkit::{error_response, full, json_response, Body};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// `POST /body`: reads the body (1 MiB at most) and answers its length.
/// `GET /big`: 64 MiB. Anything else: `ok`.
struct Echo;

impl Handler for Echo {
    fn handle(&self, req: Request<Incoming>, _remote: SocketAddr) -> BoxFuture<'_, Response<Body>> {
        Box::pin(async move {
            match req.uri().path() {
                "/body" => {
                    let (parts, body) = req.into_parts();
                    match read_limited(&parts.headers, body, 1 << 20).await {
                        Ok(b) => {
                            json_response(StatusCode::OK, &serde_json::json!({"len": b.len()}))
                        }
                        Err(e) => error_response(e.status(), &e.to_string()),
                    }
                }
                "/big" => Response::new(full(vec![7u8; 64 << 20])),
                _ => Response::new(full("ok")),
            }
        })
    }
}

struct Running {
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(opts: Options) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancel = CancellationToken::new();
    tokio::spawn(serve(listener, None, Arc::new(Echo), opts, cancel.clone()));
    Running { addr, cancel }
}

async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(format!("{src}:0").parse().expect("source"))
        .expect("bind source");
    s.connect(addr).await.expect("connect")
}

/// Reads what the server sends until it closes (or `within` passes: then
/// `None`).
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn opts() -> Options {
    Options {
        header_read_timeout: Duration::from_secs(2),
        body_idle_timeout: Duration::from_millis(700),
        request_timeout: Duration::from_secs(2),
        send_stall_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_body_that_stops_or_trickles_past_the_request_deadline_gets_408() {
    let srv = start(opts()).await;
    // Stops after a few bytes: the idle limit (0.7 s).
    let mut s = connect_from("127.0.0.1", srv.addr).await;
    s.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .expect("write");
    let started = Instant::now();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the server answers and closes");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("idle"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Trickles a byte every 0.3 s (never idle for 0.7 s): the request
    // deadline (2 s after the head).
    let mut s = connect_from("127.0.0.1", srv.addr).await;
    s.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if wr.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), rd.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("deadline"), "{answer}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    trickle.abort();

    // A body that arrives in time is read.
    let mut s = connect_from("127.0.0.1", srv.addr).await;
    s.write_all(
        b"POST /body HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .expect("write");
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"len\":5"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stops_sending_mid_body_gets_400_not_413() {
    let srv = start(opts()).await;
    let mut s = connect_from("127.0.0.1", srv.addr).await;
    s.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nhalf")
        .await
        .expect("write");
    // Half-close: the body ends early, the client still listens.
    s.shutdown().await.expect("shutdown");
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("could not read the request body"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_response_the_client_does_not_read_is_dropped_after_the_stall_limit() {
    let srv = start(opts()).await;
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = sock.connect(srv.addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    // Read nothing for a while: the server's writes stall.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Then read everything there is: the server must have given up, so the
    // stream ends (reset or close) long before 64 MiB.
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the connection is still open after a stalled response"),
        }
    }
    assert!(
        total < 32 << 20,
        "{total} bytes: the response was not dropped"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // A client that reads gets it all.
    let mut s = connect_from("127.0.0.1", srv.addr).await;
    s.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert!(out.len() > 64 << 20, "{} bytes", out.len());
}

#[tokio::test]
async fn a_further_connection_from_a_capped_address_is_closed_at_once() {
    let srv = start(Options {
        max_connections_per_ip: 4,
        ..opts()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = connect_from("127.0.0.3", srv.addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut fifth = connect_from("127.0.0.3", srv.addr).await;
    let _ = fifth.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let answer = read_until_closed(&mut fifth, Duration::from_secs(2))
        .await
        .expect("closed at once");
    assert!(answer.is_empty(), "served beyond the cap: {answer}");
    // Another address is not affected.
    let mut other = connect_from("127.0.0.4", srv.addr).await;
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = read_until_closed(&mut other, Duration::from_secs(2))
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Closing one of the four frees its place.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.3", srv.addr).await;
    again
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = read_until_closed(&mut again, Duration::from_secs(2))
        .await
        .expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_full_table_closes_the_oldest_connection_without_a_request_for_a_newcomer() {
    let srv = start(Options {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(60),
        ..opts()
    })
    .await;
    // Eight connections from eight addresses, each with half a head.
    let mut slow = Vec::new();
    for i in 0..8 {
        let mut s = connect_from(&format!("127.0.1.{}", i + 1), srv.addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    let mut s = connect_from("127.0.0.2", srv.addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the newcomer is served without waiting for a head timeout");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Exactly one slow connection was closed, the oldest.
    let first = read_until_closed(&mut slow[0], Duration::from_millis(300)).await;
    assert_eq!(
        first.as_deref(),
        Some(""),
        "the oldest slow head was closed"
    );
    for s in slow.iter_mut().skip(1) {
        assert!(
            read_until_closed(s, Duration::from_millis(50))
                .await
                .is_none(),
            "only one connection is closed per newcomer"
        );
    }
}

#[tokio::test]
async fn a_full_table_closes_an_idle_kept_alive_connection_but_never_one_serving_a_request() {
    let srv = start(Options {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(60),
        body_idle_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
        ..opts()
    })
    .await;
    // Four connections that sent a request, got the answer, and stay open.
    let mut idle = Vec::new();
    for i in 0..4 {
        let mut s = connect_from(&format!("127.0.2.{}", i + 1), srv.addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        idle.push(s);
    }
    // Four with a request in progress (a body that has not come yet).
    let mut busy = Vec::new();
    for i in 0..4 {
        let mut s = connect_from(&format!("127.0.3.{}", i + 1), srv.addr).await;
        s.write_all(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab")
            .await
            .expect("write");
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Newcomers that keep their connections: each needs a slot.
    let mut newcomers = Vec::new();
    for round in 0..4 {
        let mut s = connect_from("127.0.0.2", srv.addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("served in time")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "newcomer {round} waited {:?}",
            started.elapsed()
        );
        newcomers.push(s);
    }
    // The idle ones made room (the oldest first); the busy ones are intact.
    for s in idle.iter_mut() {
        assert_eq!(
            read_until_closed(s, Duration::from_millis(300))
                .await
                .as_deref(),
            Some(""),
            "an idle kept-alive connection was closed"
        );
    }
    for s in busy.iter_mut() {
        assert!(
            read_until_closed(s, Duration::from_millis(50))
                .await
                .is_none(),
            "a connection serving a request was closed"
        );
    }
}
