//! Legacy partclone images through the CLI: `info` and `restore` from a
//! file and from an HTTP URL whose first download is cut half-way (the
//! restore resumes with a Range request).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;

/// Serve one file over HTTP/1.1 with Range support; the first response is
/// cut after `cut` bytes of body. Counts requests.
fn serve(data: Vec<u8>, cut: usize) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let n = h2.fetch_add(1, Ordering::SeqCst);
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut range_from = 0usize;
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_from = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                }
            }
            let body = &data[range_from..];
            let head = if range_from > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len(),
                    range_from,
                    data.len() - 1,
                    data.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            let _ = s.write_all(head.as_bytes());
            if n == 0 && cut < body.len() {
                let _ = s.write_all(&body[..cut]);
                let _ = s.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let _ = s.write_all(body);
            let mut sink = [0u8; 1];
            let _ = s.read(&mut sink);
        }
    });
    (format!("http://{addr}/img.pcl.zst"), hits)
}

#[test]
fn partclone_zstd_image_restores_from_a_file_and_from_a_url_that_is_cut_once() {
    let t = Tmp::new();
    let src = t.p("src.img");
    let tree = t.p("tree");
    make_tree(&tree, 77, 4);
    mkfs_ext4(&src, 0, 48 << 20, Some(&tree));
    let img = t.p("img.pcl.zst");
    sh(&format!(
        "partclone.ext4 -c -s {} -o - -L {} -q 2>/dev/null | zstd -q -T0 -3 > {}",
        src.display(),
        t.s("pc.log"),
        img.display()
    ));
    // info on the file.
    let o = imager_ok(&["info", &img.display().to_string(), "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(info["device_size"], 48u64 << 20);
    // mke2fs makes 1 KiB blocks on filesystems this small.
    assert_eq!(info["block_size"], 1024);
    assert!(info["used_blocks"].as_u64().expect("used") > 4000);
    // restore from the file.
    imager_ok(&["restore", &img.display().to_string(), &t.s("a.img")]);
    sh(&format!("e2fsck -fn {} >/dev/null", t.s("a.img")));
    let used_hash = |p: &str| {
        sh_out(&format!(
            "partclone.ext4 -c -s {p} -o - -L {} -q 2>/dev/null | sha256sum",
            t.s("h.log")
        ))
    };
    let want = used_hash(&src.display().to_string());
    assert_eq!(used_hash(&t.s("a.img")), want);
    // restore from a URL whose first response is cut half-way.
    let data = std::fs::read(&img).expect("img");
    let (url, hits) = serve(data.clone(), data.len() / 2);
    let o = imager_ok(&["restore", &url, &t.s("b.img"), "--json"]);
    assert!(
        hits.load(Ordering::SeqCst) >= 2,
        "the cut download was not resumed"
    );
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    assert_eq!(used_hash(&t.s("b.img")), want);
    // A target smaller than the image's device is refused before writing.
    fill(&t.p("small.img"), 0x11, 40 << 20);
    let before = sha256_file(&t.p("small.img"));
    let o = imager(&["restore", &img.display().to_string(), &t.s("small.img")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(sha256_file(&t.p("small.img")), before);
}
