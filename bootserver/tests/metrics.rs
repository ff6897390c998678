//! `GET /metrics` of the running server binary in network namespaces:
//! counters rise after a real DHCP lease (busybox udhcpc), a NAK, a TFTP
//! download (curl) and HTTP requests; callers that are neither
//! allow-listed nor hold a token are refused. Needs root; CI runs as root.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dhcproto::v4::{DhcpOption, MessageType};

const METRICS_TOKEN: &str = "metrics-scrape-token-0123456789";
const SCRAPER: &str = "10.213.0.50";

/// The value of the sample whose name and labels are exactly `series`
/// (0 when the series is absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn scrape(net: &NetPair) -> String {
    let (code, body) = curl(
        net,
        &["--interface", SCRAPER, "http://10.213.0.1:8080/metrics"],
    );
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "allow-listed scrape refused: {text}");
    text
}

#[test]
fn metrics_count_dhcp_tftp_and_http_and_refuse_unknown_callers() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    net.cli_addr(&format!("{SCRAPER}/16"));
    let cfg = base_config(
        dir.path(),
        &format!(
            "{FULL_DHCP}\n{}\n[tftp]\nroot = \"/usr/lib/ipxe\"\n[metrics]\nallow = [\"{SCRAPER}/32\"]\ntoken = \"{METRICS_TOKEN}\"\n",
            http_api()
        ),
    );
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &[
            "DHCP service started",
            "TFTP service started",
            "HTTP service started",
        ],
    );
    let subnet = r#"subnet="10.213.0.0/16""#;
    let series = |t: &str| format!("aula_dhcp_messages_total{{{subnet},type=\"{t}\"}}");
    let before = scrape(&net);
    assert!(
        before.contains("# TYPE aula_dhcp_messages counter"),
        "{before}"
    );

    // A real lease.
    let events = dir.path().join("udhcpc.events");
    let script = dir.path().join("udhcpc.sh");
    write_file(
        &script,
        format!("#!/bin/sh\necho \"$1 $ip\" >> {}\n", events.display()).as_bytes(),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let st = net
        .cli_cmd("busybox")
        .args([
            "udhcpc", "-q", "-f", "-n", "-i", "vc", "-t", "10", "-T", "1", "-s",
        ])
        .arg(&script)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("udhcpc");
    assert!(st.success(), "udhcpc got no lease");
    let leased = std::fs::read_to_string(&events).expect("events");
    assert!(leased.contains("bound 10.213.1."), "{leased}");

    // A NAK: a request for an address this server does not hand out.
    let nak = net.in_cli(|| {
        let s = client_socket(68);
        let req = dhcp_msg(
            [2, 0, 0, 0, 0, 0x42],
            MessageType::Request,
            0x4242,
            vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 213, 7, 7))],
        );
        exchange(
            &s,
            &req,
            SocketAddr::from((Ipv4Addr::BROADCAST, 67)),
            Duration::from_secs(3),
        )
        .map(|(m, _, _)| msg_type(&m))
    });
    assert_eq!(nak, Some(Some(MessageType::Nak)));

    // A TFTP download.
    let out = dir.path().join("undionly.kpxe");
    let st = net
        .cli_cmd("curl")
        .args(["-s", "--max-time", "30", "-o"])
        .arg(&out)
        .arg("tftp://10.213.0.1/undionly.kpxe")
        .status()
        .expect("curl tftp");
    assert!(st.success());
    let size = read_file(&out).len() as f64;

    // HTTP: the open status route over HTTPS.
    let (code, _) = curl_api(&net, dir.path(), "/v1/status", &[]);
    assert_eq!(code, 200);

    // The TFTP counter is bumped after the last ACK: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let t = scrape(&net);
        if sample(&t, r#"aula_tftp_transfers_total{result="complete"}"#) >= 1.0
            || Instant::now() > deadline
        {
            break t;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for t in ["discover", "offer", "request", "ack", "nak"] {
        assert!(
            sample(&after, &series(t)) >= sample(&before, &series(t)) + 1.0,
            "{t} did not rise:\n{after}"
        );
    }
    assert_eq!(
        sample(&after, r#"aula_tftp_transfers_total{result="complete"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(sample(&after, "aula_tftp_bytes_total"), size, "{after}");
    assert!(
        sample(
            &after,
            r#"aula_http_requests_total{group="api",status="200"}"#
        ) >= 1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"aula_http_requests_total{group="metrics",status="200"}"#
        ) >= 1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"aula_http_request_duration_seconds_count{group="api"}"#
        ) >= 1.0,
        "{after}"
    );
    assert!(!after.contains("52:54") && !after.contains("10.213.1."));

    // Not allow-listed: the leased address without a token.
    let src = leased
        .lines()
        .find_map(|l| l.strip_prefix("bound "))
        .expect("bound line")
        .trim()
        .to_owned();
    // udhcpc's script did not configure the lease; add it to source from it.
    net.cli_addr(&format!("{src}/16"));
    let plain = "http://10.213.0.1:8080/metrics";
    let (code, _) = curl(&net, &["--interface", &src, plain]);
    assert_eq!(code, 401, "unknown caller without token");
    // A token over plain HTTP while HTTPS runs: refused.
    let bearer = format!("Authorization: Bearer {METRICS_TOKEN}");
    let (code, _) = curl(&net, &["--interface", &src, "-H", &bearer, plain]);
    assert_eq!(code, 403, "token accepted in clear");
    // Over HTTPS: the metrics token is accepted, a wrong one is not.
    let pin = pubkey_pin(dir.path());
    let secure = "https://10.213.0.1:8443/metrics";
    let (code, body) = curl(
        &net,
        &[
            "--interface",
            &src,
            "-k",
            "--pinnedpubkey",
            &pin,
            "-H",
            &bearer,
            secure,
        ],
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _) = curl(
        &net,
        &[
            "--interface",
            &src,
            "-k",
            "--pinnedpubkey",
            &pin,
            "-H",
            "Authorization: Bearer not-the-token-0123456789",
            secure,
        ],
    );
    assert_eq!(code, 403);
    server.stop();
}
