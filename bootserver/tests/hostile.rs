//! Hostile requests against the boot server started in-process, on
//! loopback (issue 15): a manifest claiming 2^64 − 1 bytes is refused by
//! the publish route in milliseconds and nothing is published; the two
//! `Range` readers (boot files and repository chunks) give the same
//! answers, 416 with `Content-Range: bytes */LEN` for an unsatisfiable
//! range in both.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use aula_bootserver::config::Config;
use aula_bootserver::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-write-token-0123456789";

fn config(dir: &Path) -> Config {
    let live = dir.join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    let kernel: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(live.join("vmlinuz"), &kernel).expect("kernel");
    std::fs::write(live.join("initrd.gz"), b"initrd-bytes").expect("initrd");
    let text = format!(
        r#"[server]
address = "10.213.0.1"
data_dir = "{data}"
[http]
bind = "127.0.0.1:0"
public_url = "http://10.213.0.1:8080"
[http.tls]
# Plain HTTP for every route: these tests speak raw HTTP/1.1.
enabled = false
[tftp]
enabled = false
[boot]
kernel = "{live}/vmlinuz"
initrd = "{live}/initrd.gz"
[repository]
write_token = "{TOKEN}"
"#,
        data = dir.join("data").display(),
        live = live.display(),
    );
    Config::parse(&text).expect("test config")
}

/// One HTTP/1.1 request on its own connection: (status, head, body).
async fn req(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(r.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head, raw[split + 4..].to_vec())
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

#[tokio::test]
async fn a_manifest_of_two_to_the_64_bytes_is_refused_by_the_publish_route_in_milliseconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(dir.path()), Vec::new())
        .await
        .expect("server starts");
    let addr = server.http_addr.expect("http");
    let manifest = serde_json::json!({
        "format": "aula-image", "version": 1, "name": "evil", "image_version": 0,
        "created": "2026-01-01T00:00:00Z", "tool": "test", "kind": "partition",
        "source_size": u64::MAX, "sector_size": 512, "map": "raw", "used": [],
        "used_bytes": 0, "chunk_size": 65536,
        "compression": {"algorithm": "zstd", "level": 3}, "hash": "sha256", "chunks": []
    });
    let body = serde_json::to_vec(&manifest).expect("json");
    let auth = format!("Bearer {TOKEN}");
    let t0 = Instant::now();
    let (status, _, text) = req(
        addr,
        "PUT",
        "/v1/images/evil",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&text));
    assert!(
        String::from_utf8_lossy(&text).contains("larger than"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    assert!(took < Duration::from_millis(500), "publish took {took:?}");
    let (status, _, _) = req(addr, "GET", "/v1/images/evil", &[], b"").await;
    assert_eq!(status, 404, "nothing was published");
    // The server still serves.
    let (status, _, _) = req(addr, "GET", "/boot/live/initrd.gz", &[], b"").await;
    assert_eq!(status, 200);
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn boot_files_and_repository_chunks_answer_a_range_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(config(dir.path()), Vec::new())
        .await
        .expect("server starts");
    let addr = server.http_addr.expect("http");
    // One chunk in the repository.
    let content = b"a chunk of content for the range test ".repeat(500);
    let frame = zstd::bulk::compress(&content, 3).expect("compress");
    let id = aula_imager::chunk::ChunkId::of(&content);
    let auth = format!("Bearer {TOKEN}");
    let (status, _, text) = req(
        addr,
        "PUT",
        &format!("/v1/chunks/{id}"),
        &[("Authorization", &auth)],
        &frame,
    )
    .await;
    assert!(
        (200..300).contains(&status),
        "{status} {}",
        String::from_utf8_lossy(&text)
    );
    let files = ("/boot/live/vmlinuz".to_string(), 200_000u64);
    let chunk = (format!("/v1/chunks/{id}"), frame.len() as u64);
    // (Range header for a resource of LEN bytes, expected status).
    let cases = |len: u64| -> Vec<(String, u16)> {
        vec![
            ("bytes=0-9".into(), 206),
            ("bytes=-10".into(), 206),
            (format!("bytes={}-", len - 1), 206),
            (format!("bytes=0-{}", len + 100), 206),
            (format!("bytes={len}-"), 416),
            (format!("bytes={}-{}", len + 5, len + 10), 416),
            ("bytes=-0".into(), 416),
            ("bytes=5-1".into(), 200),
            ("bytes=0-1,5-6".into(), 200),
            ("items=0-1".into(), 200),
            ("bytes=abc".into(), 200),
        ]
    };
    for (path, len) in [files, chunk] {
        for (range, want) in cases(len) {
            let (status, head, body) = req(addr, "GET", &path, &[("Range", &range)], b"").await;
            assert_eq!(status, want, "{path} with {range}: {head}");
            match status {
                416 => assert_eq!(
                    header(&head, "content-range").as_deref(),
                    Some(format!("bytes */{len}").as_str()),
                    "{path} with {range}"
                ),
                206 => {
                    let cr = header(&head, "content-range").expect("content-range");
                    assert!(cr.ends_with(&format!("/{len}")), "{path} {range}: {cr}");
                }
                _ => assert_eq!(body.len() as u64, len, "{path} {range}"),
            }
        }
    }
    server.shutdown();
    server.wait().await;
}
