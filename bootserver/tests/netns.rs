//! Network tests of the running server binary inside network namespaces
//! (veth pair, private addresses only). They need root; CI runs as root.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dhcproto::v4::{Architecture, DhcpOption, MessageType};

const BIOS_VC: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";
const UEFI_VC: &[u8] = b"PXEClient:Arch:00007:UNDI:003000";

fn pxe_opts(arch: u16, vc: &[u8], ipxe: bool) -> Vec<DhcpOption> {
    let mut guid = vec![0u8; 17];
    guid[1..].copy_from_slice(&[7u8; 16]);
    let mut v = vec![
        DhcpOption::ClassIdentifier(vc.to_vec()),
        DhcpOption::ClientSystemArchitecture(Architecture::from(arch)),
        DhcpOption::ClientMachineIdentifier(guid),
    ];
    if ipxe {
        v.push(DhcpOption::UserClass(b"iPXE".to_vec()));
    }
    v
}

fn broadcast67() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::BROADCAST, 67))
}

#[test]
fn udhcpc_gets_a_full_mode_lease_and_keeps_it_across_a_server_restart() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = base_config(dir.path(), &format!("{FULL_DHCP}\n{}", http_api()));
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["DHCP service started", "HTTP service started"],
    );

    let events = dir.path().join("udhcpc.events");
    let script = dir.path().join("udhcpc.sh");
    write_file(
        &script,
        format!(
            "#!/bin/sh\ncase \"$1\" in bound|renew) ip addr replace \"$ip/$mask\" dev \"$interface\";; esac\necho \"$1 $ip\" >> {}\n",
            events.display()
        )
        .as_bytes(),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut udhcpc = net
        .cli_cmd("busybox")
        .args(["udhcpc", "-f", "-i", "vc", "-t", "10", "-T", "1", "-s"])
        .arg(&script)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start udhcpc");
    let wait_event = |prefix: &str| -> String {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&events).unwrap_or_default();
            if let Some(line) = text.lines().rev().find(|l| l.starts_with(prefix)) {
                return line
                    .split_whitespace()
                    .nth(1)
                    .expect("ip in event")
                    .to_owned();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {prefix} event; events: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let ip = wait_event("bound");
    let leased: Ipv4Addr = ip.parse().expect("leased ip");
    assert!(
        (Ipv4Addr::new(10, 213, 1, 1)..=Ipv4Addr::new(10, 213, 1, 250)).contains(&leased),
        "{leased} outside the pool"
    );

    // Restart the server: the lease must come back from disk.
    server.stop();
    let mut server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["DHCP service started", "HTTP service started"],
    );
    assert!(
        server.log_text().contains("bound=1"),
        "lease not reloaded:\n{}",
        server.log_text()
    );
    let (code, body) = curl_api(&net, dir.path(), "/v1/leases", &[]);
    assert_eq!(code, 200);
    let leases: serde_json::Value = serde_json::from_slice(&body).expect("leases json");
    assert_eq!(leases[0]["ip"], ip.as_str(), "{leases}");

    // Another client asking for that address must not get it.
    let other = net.in_cli(move || {
        let s = client_socket(68);
        let req = dhcp_msg(
            [2, 0, 0, 0, 0, 0x77],
            MessageType::Discover,
            0x7777,
            vec![DhcpOption::RequestedIpAddress(leased)],
        );
        exchange(&s, &req, broadcast67(), Duration::from_secs(3))
            .expect("offer for the other client")
            .0
            .yiaddr()
    });
    assert_ne!(
        other, leased,
        "a persisted lease was handed to another client"
    );

    // The original client renews (SIGUSR1) and keeps its address.
    std::fs::write(&events, b"").expect("clear events");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(udhcpc.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    let renewed = wait_event("renew");
    assert_eq!(renewed, ip, "address changed across the restart");
    assert!(server.alive());
    let _ = udhcpc.kill();
    let _ = udhcpc.wait();
    server.stop();
}

#[test]
fn full_mode_pxe_clients_get_the_boot_program_for_their_firmware() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = base_config(dir.path(), FULL_DHCP);
    let server = ServerProc::start(&net.srv, dir.path(), &cfg, &["DHCP service started"]);
    net.in_cli(|| {
        let s = client_socket(68);
        // (arch, vendor class, iPXE?, expected file, expected option 60, option 43 expected)
        type Case<'a> = (u16, &'a [u8], bool, &'a str, &'a str, bool);
        let cases: Vec<Case> = vec![
            (0, BIOS_VC, false, "undionly.kpxe", "PXEClient", true),
            (7, UEFI_VC, false, "ipxe.efi", "PXEClient", true),
            (
                9,
                b"PXEClient:Arch:00009:UNDI:003000",
                false,
                "ipxe.efi",
                "PXEClient",
                true,
            ),
            (
                11,
                b"PXEClient:Arch:00011:UNDI:003000",
                false,
                "arm64/snponly.efi",
                "PXEClient",
                true,
            ),
            (
                16,
                b"HTTPClient:Arch:00016:UNDI:003000",
                false,
                "http://10.213.0.1:8080/boot/programs/ipxe.efi",
                "HTTPClient",
                false,
            ),
            (
                0,
                BIOS_VC,
                true,
                "http://10.213.0.1:8080/boot/ipxe/02-00-00-00-10-05",
                "PXEClient",
                false,
            ),
            (
                7,
                b"PXEClient:Arch:00007:UNDI:003010",
                true,
                "http://10.213.0.1:8080/boot/ipxe/02-00-00-00-10-06",
                "PXEClient",
                false,
            ),
        ];
        for (i, (arch, vc, ipxe, file, vc_out, has43)) in cases.into_iter().enumerate() {
            let mac = [2, 0, 0, 0, 0x10, i as u8];
            let xid = 0x1000 + i as u32;
            let d = dhcp_msg(mac, MessageType::Discover, xid, pxe_opts(arch, vc, ipxe));
            let (offer, len, _) = exchange(&s, &d, broadcast67(), Duration::from_secs(3))
                .unwrap_or_else(|| panic!("no OFFER for case {i}"));
            assert_eq!(msg_type(&offer), Some(MessageType::Offer));
            assert!(len >= 300, "reply not padded to 300 bytes: {len}");
            assert_eq!(
                bootfile(&offer).as_deref(),
                Some(file),
                "case {i} arch {arch}"
            );
            assert_eq!(
                opt_bytes(&offer, 60).as_deref(),
                Some(vc_out.as_bytes()),
                "case {i}"
            );
            assert_eq!(opt_bytes(&offer, 54).as_deref(), Some(&[10, 213, 0, 1][..]));
            assert_eq!(opt_bytes(&offer, 66).as_deref(), Some(&b"10.213.0.1"[..]));
            assert_eq!(
                opt_bytes(&offer, 43).is_some(),
                has43,
                "case {i}: option 43"
            );
            if has43 {
                assert_eq!(opt_bytes(&offer, 43).as_deref(), Some(&[6, 1, 8, 255][..]));
            }
            let guid = opt_bytes(&offer, 97).expect("option 97 echoed");
            assert_eq!(guid.len(), 17);
            assert_eq!(offer.siaddr(), SERVER_IP);
            let yiaddr = offer.yiaddr();
            assert!(yiaddr.octets()[..3] == [10, 213, 1], "yiaddr {yiaddr}");
            // REQUEST -> ACK with the same boot file.
            let mut opts = pxe_opts(arch, vc, ipxe);
            opts.push(DhcpOption::ServerIdentifier(SERVER_IP));
            opts.push(DhcpOption::RequestedIpAddress(yiaddr));
            let r = dhcp_msg(mac, MessageType::Request, xid + 0x100, opts);
            let (ack, _, _) = exchange(&s, &r, broadcast67(), Duration::from_secs(3)).expect("ACK");
            assert_eq!(msg_type(&ack), Some(MessageType::Ack));
            assert_eq!(ack.yiaddr(), yiaddr);
            assert_eq!(bootfile(&ack).as_deref(), Some(file));
        }
        // A REQUEST for someone else's address is refused.
        let mut opts = pxe_opts(0, BIOS_VC, false);
        opts.push(DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 0, 2, 9)));
        let r = dhcp_msg([2, 0, 0, 0, 0x10, 0x99], MessageType::Request, 0x5555, opts);
        let (nak, _, _) = exchange(&s, &r, broadcast67(), Duration::from_secs(3)).expect("NAK");
        assert_eq!(msg_type(&nak), Some(MessageType::Nak));
    });
    server.stop();
}

#[test]
fn proxy_mode_answers_only_pxe_clients_on_67_and_4011() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = base_config(
        dir.path(),
        &format!(
            "[dhcp]\nmode = \"proxy\"\n{}\n[tftp]\nenabled = false\n",
            http_api()
        ),
    );
    net.cli_addr("10.213.0.50/16");
    net.cli_addr("10.213.0.61/16");
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["DHCP service started", "HTTP service started"],
    );
    net.in_cli(|| {
        let s = client_socket(68);
        // A plain DHCP client gets nothing from a proxy.
        let plain = dhcp_msg([2, 0, 0, 0, 0x20, 1], MessageType::Discover, 0x2001, vec![]);
        assert!(
            exchange(&s, &plain, broadcast67(), Duration::from_millis(800)).is_none(),
            "proxy answered a non-PXE client"
        );
        // BIOS PXE: OFFER without an address, boot file, discovery control.
        let d = dhcp_msg(
            [2, 0, 0, 0, 0x20, 2],
            MessageType::Discover,
            0x2002,
            pxe_opts(0, BIOS_VC, false),
        );
        let (offer, len, _) =
            exchange(&s, &d, broadcast67(), Duration::from_secs(3)).expect("proxy OFFER");
        assert!(len >= 300);
        assert_eq!(
            offer.yiaddr(),
            Ipv4Addr::UNSPECIFIED,
            "a proxy must not hand out addresses"
        );
        assert_eq!(bootfile(&offer).as_deref(), Some("undionly.kpxe"));
        assert_eq!(opt_bytes(&offer, 43).as_deref(), Some(&[6, 1, 8, 255][..]));
        assert_eq!(opt_bytes(&offer, 60).as_deref(), Some(&b"PXEClient"[..]));
        assert!(opt_bytes(&offer, 97).is_some());
        // UEFI PXE: OFFER without option 43 (the firmware then asks on 4011).
        let d = dhcp_msg(
            [2, 0, 0, 0, 0x20, 3],
            MessageType::Discover,
            0x2003,
            pxe_opts(7, UEFI_VC, false),
        );
        let (offer, _, _) =
            exchange(&s, &d, broadcast67(), Duration::from_secs(3)).expect("proxy OFFER (UEFI)");
        assert_eq!(bootfile(&offer).as_deref(), Some("ipxe.efi"));
        assert!(opt_bytes(&offer, 43).is_none());
        // A REQUEST on the site server's behalf gets no answer on 67.
        let mut ropts = pxe_opts(7, UEFI_VC, false);
        ropts.push(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 213, 0, 254)));
        ropts.push(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
            10, 213, 0, 50,
        )));
        let r = dhcp_msg([2, 0, 0, 0, 0x20, 3], MessageType::Request, 0x2004, ropts);
        assert!(exchange(&s, &r, broadcast67(), Duration::from_millis(800)).is_none());

        // Port 4011: unicast REQUEST from the client's own address and port.
        let u = std::net::UdpSocket::bind("10.213.0.50:0").expect("bind client address");
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        for (arch, vc, ipxe, file) in [
            (7u16, UEFI_VC, false, "ipxe.efi".to_owned()),
            (0, BIOS_VC, false, "undionly.kpxe".to_owned()),
            (
                7,
                UEFI_VC,
                true,
                "http://10.213.0.1:8080/boot/ipxe/02-00-00-00-20-04".to_owned(),
            ),
        ] {
            let mut r = dhcp_msg(
                [2, 0, 0, 0, 0x20, 4],
                MessageType::Request,
                0x3000 + u32::from(arch),
                pxe_opts(arch, vc, ipxe),
            );
            r.set_ciaddr(Ipv4Addr::new(10, 213, 0, 50));
            let (ack, _, from) = exchange(
                &u,
                &r,
                SocketAddr::from((SERVER_IP, 4011)),
                Duration::from_secs(3),
            )
            .expect("ACK on 4011");
            assert_eq!(from, SocketAddr::from((SERVER_IP, 4011)));
            assert_eq!(msg_type(&ack), Some(MessageType::Ack));
            assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
            assert_eq!(bootfile(&ack), Some(file));
        }
    });
    assert!(
        !std::path::Path::new(&dir.path().join("data/leases.journal")).exists(),
        "proxy mode keeps no leases"
    );
    // The address announced on 4011 is the one whose script request
    // counts: from another address nothing is consumed.
    let mac = "02:00:00:00:20:04";
    for body in [r#"{"mode":"local"}"#, r#"{"mode":"live","once":true}"#] {
        let (code, out) = curl_api(
            &net,
            dir.path(),
            &format!("/v1/clients/{mac}/boot"),
            &[
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    }
    let script_from = |src: &str| {
        let (_, body) = curl(
            &net,
            &[
                "--interface",
                src,
                "http://10.213.0.1:8080/boot/ipxe/02-00-00-00-20-04",
            ],
        );
        String::from_utf8_lossy(&body).into_owned()
    };
    let s = script_from("10.213.0.61");
    assert!(s.contains("sanboot") && !s.contains("kernel "), "{s}");
    let s = script_from("10.213.0.50");
    assert!(s.contains("kernel ") && s.contains("aula.boot="), "{s}");
    server.stop();
}

#[test]
fn relayed_discover_gets_an_address_from_the_relays_subnet_sent_back_to_the_relay() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "{FULL_DHCP}\n[[dhcp.subnet]]\nnetwork = \"10.214.0.0/24\"\nrange = [\"10.214.0.100\", \"10.214.0.110\"]\nrouter = \"10.214.0.1\"\n"
    );
    let cfg = base_config(dir.path(), &extra);
    // The "relay" lives in the client namespace: 10.213.0.2 on the boot link,
    // 10.214.0.1 as its other subnet; the server routes that subnet via it.
    net.cli_addr("10.213.0.2/16");
    net.cli_addr("10.214.0.1/24");
    run(net
        .srv_cmd("ip")
        .args(["route", "add", "10.214.0.0/24", "via", "10.213.0.2"]));
    let server = ServerProc::start(&net.srv, dir.path(), &cfg, &["DHCP service started"]);
    net.in_cli(|| {
        let s = client_socket(67);
        let mut d = dhcp_msg([2, 0, 0, 0, 0x30, 1], MessageType::Discover, 0x4001, vec![]);
        d.set_giaddr(Ipv4Addr::new(10, 214, 0, 1));
        d.set_hops(1);
        let (offer, _, _) = exchange(
            &s,
            &d,
            SocketAddr::from((SERVER_IP, 67)),
            Duration::from_secs(3),
        )
        .expect("relayed OFFER");
        let y = offer.yiaddr();
        assert!(
            (Ipv4Addr::new(10, 214, 0, 100)..=Ipv4Addr::new(10, 214, 0, 110)).contains(&y),
            "{y} not from the relay's subnet"
        );
        assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 214, 0, 1));
        assert_eq!(
            opt_bytes(&offer, 3).as_deref(),
            Some(&[10, 214, 0, 1][..]),
            "router of the relay's subnet"
        );
        let mut r = dhcp_msg(
            [2, 0, 0, 0, 0x30, 1],
            MessageType::Request,
            0x4002,
            vec![
                DhcpOption::ServerIdentifier(SERVER_IP),
                DhcpOption::RequestedIpAddress(y),
            ],
        );
        r.set_giaddr(Ipv4Addr::new(10, 214, 0, 1));
        let (ack, _, _) = exchange(
            &s,
            &r,
            SocketAddr::from((SERVER_IP, 67)),
            Duration::from_secs(3),
        )
        .expect("relayed ACK");
        assert_eq!(msg_type(&ack), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), y);
    });
    server.stop();
}

#[test]
fn release_and_decline_return_or_quarantine_addresses() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = base_config(dir.path(), &format!("{FULL_DHCP}\n{}", http_api()));
    net.cli_addr("10.213.0.50/16");
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["DHCP service started", "HTTP service started"],
    );
    let lease = |mac: [u8; 6], xid: u32| {
        net.in_cli(move || {
            let s = client_socket(68);
            let d = dhcp_msg(mac, MessageType::Discover, xid, vec![]);
            let (offer, _, _) =
                exchange(&s, &d, broadcast67(), Duration::from_secs(3)).expect("OFFER");
            let r = dhcp_msg(
                mac,
                MessageType::Request,
                xid + 1,
                vec![
                    DhcpOption::ServerIdentifier(SERVER_IP),
                    DhcpOption::RequestedIpAddress(offer.yiaddr()),
                ],
            );
            let (ack, _, _) = exchange(&s, &r, broadcast67(), Duration::from_secs(3)).expect("ACK");
            assert_eq!(msg_type(&ack), Some(MessageType::Ack));
            ack.yiaddr()
        })
    };
    let a = lease([2, 0, 0, 0, 0x40, 1], 0x6000);
    let b = lease([2, 0, 0, 0, 0x40, 2], 0x6010);
    let count = |net: &NetPair| {
        let (_, body) = curl_api(net, dir.path(), "/v1/leases", &[]);
        serde_json::from_slice::<serde_json::Value>(&body)
            .expect("json")
            .as_array()
            .expect("array")
            .len()
    };
    assert_eq!(count(&net), 2);
    net.in_cli(move || {
        let s = client_socket(68);
        let mut rel = dhcp_msg(
            [2, 0, 0, 0, 0x40, 1],
            MessageType::Release,
            0x6100,
            vec![DhcpOption::ServerIdentifier(SERVER_IP)],
        );
        rel.set_ciaddr(a);
        s.send_to(&encode(&rel), broadcast67())
            .expect("send release");
        let dec = dhcp_msg(
            [2, 0, 0, 0, 0x40, 2],
            MessageType::Decline,
            0x6101,
            vec![
                DhcpOption::ServerIdentifier(SERVER_IP),
                DhcpOption::RequestedIpAddress(b),
            ],
        );
        s.send_to(&encode(&dec), broadcast67())
            .expect("send decline");
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&net), 0, "released and declined leases are gone");
    // The declined address is not offered again.
    let c = net.in_cli(move || {
        let s = client_socket(68);
        let d = dhcp_msg(
            [2, 0, 0, 0, 0x40, 3],
            MessageType::Discover,
            0x6200,
            vec![DhcpOption::RequestedIpAddress(b)],
        );
        exchange(&s, &d, broadcast67(), Duration::from_secs(3))
            .expect("OFFER")
            .0
            .yiaddr()
    });
    assert_ne!(c, b, "declined address offered again");
    server.stop();
}

fn tftp_server(net: &NetPair, dir: &std::path::Path) -> (ServerProc, std::path::PathBuf) {
    let root = dir.join("tftproot");
    std::fs::create_dir_all(root.join("sub")).expect("mkdir");
    let mut rng = Rng(0x5eed);
    write_file(&root.join("random.bin"), &rng.bytes(3 * 1024 * 1024 + 123));
    write_file(&root.join("exact.bin"), &rng.bytes(1468 * 10));
    write_file(&root.join("rollover.bin"), &rng.bytes(600 * 1024 + 7));
    std::fs::copy("/usr/lib/ipxe/undionly.kpxe", root.join("undionly.kpxe"))
        .expect("copy undionly.kpxe from Debian's ipxe package");
    write_file(&dir.join("secret.txt"), b"outside the root");
    std::os::unix::fs::symlink(dir.join("secret.txt"), root.join("escape-file")).expect("symlink");
    std::os::unix::fs::symlink(dir, root.join("sub/escape-dir")).expect("symlink");
    let cfg = base_config(
        dir,
        &format!(
            "[tftp]\nroot = \"{}\"\nmax_windowsize = 64\n",
            root.display()
        ),
    );
    let s = ServerProc::start(&net.srv, dir, &cfg, &["TFTP service started"]);
    (s, root)
}

#[test]
fn tftp_downloads_with_real_clients_are_byte_identical() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    net.cli_addr("10.213.0.50/16");
    let (server, root) = tftp_server(&net, dir.path());
    let out = dir.path().join("out.bin");
    for (file, extra) in [
        ("undionly.kpxe", vec![]),
        ("random.bin", vec!["--tftp-blksize", "1468"]),
        ("exact.bin", vec!["--tftp-blksize", "1468"]),
        ("random.bin", vec!["--tftp-blksize", "8192"]),
    ] {
        let _ = std::fs::remove_file(&out);
        let st = net
            .cli_cmd("curl")
            .args(["-s", "--max-time", "60", "-o"])
            .arg(&out)
            .args(&extra)
            .arg(format!("tftp://10.213.0.1/{file}"))
            .status()
            .expect("curl");
        assert!(st.success(), "curl tftp {file} {extra:?} failed");
        assert!(
            read_file(&out) == read_file(&root.join(file)),
            "curl copy of {file} {extra:?} differs"
        );
    }
    // tftp-hpa, octet mode with blksize.
    let _ = std::fs::remove_file(&out);
    let st = net
        .cli_cmd("tftp")
        .args(["-m", "binary", "10.213.0.1", "-c", "get", "random.bin"])
        .arg(&out)
        .status()
        .expect("tftp-hpa");
    assert!(st.success());
    assert!(
        read_file(&out) == read_file(&root.join("random.bin")),
        "tftp-hpa copy differs"
    );
    server.stop();
}

#[test]
fn tftp_windowsize_blksize_tsize_and_block_rollover() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    net.cli_addr("10.213.0.50/16");
    let (server, root) = tftp_server(&net, dir.path());
    let server_addr = SocketAddr::from((SERVER_IP, 69));
    let (data, oack) = net.in_cli(move || {
        tftp_get(
            server_addr,
            b"random.bin",
            &[("blksize", "1468"), ("tsize", "0"), ("windowsize", "8")],
            8,
        )
        .expect("windowed transfer")
    });
    assert!(
        data == read_file(&root.join("random.bin")),
        "windowed copy differs"
    );
    assert!(
        oack.contains(&("windowsize".into(), "8".into())),
        "{oack:?}"
    );
    assert!(
        oack.contains(&("blksize".into(), "1468".into())),
        "{oack:?}"
    );
    assert!(
        oack.contains(&("tsize".into(), (3 * 1024 * 1024 + 123).to_string())),
        "{oack:?}"
    );
    // The server caps what it grants.
    let (_, oack) = net.in_cli(move || {
        tftp_get(
            server_addr,
            b"exact.bin",
            &[("blksize", "65464"), ("windowsize", "1000")],
            64,
        )
        .expect("capped transfer")
    });
    assert!(
        oack.contains(&("blksize".into(), "1468".into())),
        "blksize not capped: {oack:?}"
    );
    assert!(
        oack.contains(&("windowsize".into(), "64".into())),
        "windowsize not capped: {oack:?}"
    );
    // 8-byte blocks: more than 65535 blocks, so the block number wraps.
    let (data, _) = net.in_cli(move || {
        tftp_get(
            server_addr,
            b"rollover.bin",
            &[("blksize", "8"), ("windowsize", "64")],
            64,
        )
        .expect("rollover transfer")
    });
    assert!(
        data == read_file(&root.join("rollover.bin")),
        "rollover copy differs"
    );
    server.stop();
}

#[test]
fn tftp_refuses_parent_absolute_and_symlink_escapes() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    net.cli_addr("10.213.0.50/16");
    let (server, _root) = tftp_server(&net, dir.path());
    let server_addr = SocketAddr::from((SERVER_IP, 69));
    let secret = dir.path().join("secret.txt").display().to_string();
    let results = net.in_cli(move || {
        let names: Vec<Vec<u8>> = vec![
            b"../secret.txt".to_vec(),
            b"sub/../../secret.txt".to_vec(),
            secret.into_bytes(),
            b"/etc/passwd".to_vec(),
            b"escape-file".to_vec(),
            b"sub/escape-dir/secret.txt".to_vec(),
            b"..\\secret.txt".to_vec(),
        ];
        names
            .into_iter()
            .map(|n| {
                (
                    String::from_utf8_lossy(&n).into_owned(),
                    tftp_get(server_addr, &n, &[], 1),
                )
            })
            .collect::<Vec<_>>()
    });
    for (name, r) in results {
        match r {
            Err((code, msg)) => assert_eq!(
                code, 2,
                "{name}: expected access violation, got {code} {msg}"
            ),
            Ok((data, _)) => panic!("{name} was served ({} bytes)", data.len()),
        }
    }
    // Writes are refused too.
    let out = dir.path().join("up.bin");
    write_file(&out, b"x");
    let st = net
        .cli_cmd("tftp")
        .args(["10.213.0.1", "-c", "put"])
        .arg(&out)
        .arg("up.bin")
        .output()
        .expect("tftp put");
    assert!(
        !_root.join("up.bin").exists(),
        "a write landed in the root: {st:?}"
    );
    server.stop();
}

#[test]
fn garbage_and_truncated_packets_get_no_reply_and_do_not_stop_the_server() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    net.cli_addr("10.213.0.50/16");
    let root = dir.path().join("tftproot");
    std::fs::create_dir_all(&root).expect("mkdir");
    write_file(&root.join("f.bin"), b"hello tftp");
    let cfg = base_config(
        dir.path(),
        &format!("{FULL_DHCP}\n[tftp]\nroot = \"{}\"\n", root.display()),
    );
    let mut server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["DHCP service started", "TFTP service started"],
    );
    let replies = net.in_cli(|| {
        let c68 = client_socket(68);
        c68.set_nonblocking(true).expect("nonblocking");
        let sender = std::net::UdpSocket::bind("10.213.0.50:0").expect("bind");
        sender.set_nonblocking(true).expect("nonblocking");
        let mut rng = Rng(0xdead_beef);
        let valid = encode(&dhcp_msg(
            [2, 0, 0, 0, 0x50, 1],
            MessageType::Discover,
            0x9999,
            pxe_opts(0, BIOS_VC, true),
        ));
        let valid_rrq = b"\x00\x01f.bin\x00octet\x00blksize\x001468\x00".to_vec();
        let mut sent = 0;
        let mut got = 0;
        let mut buf = [0u8; 2048];
        let mut drain = |got: &mut usize| {
            while c68.recv_from(&mut buf).is_ok() {
                *got += 1;
            }
            while sender.recv_from(&mut buf).is_ok() {
                *got += 1;
            }
        };
        for i in 0..6000 {
            let pkt = match i % 4 {
                0 => {
                    let n = rng.below(600);
                    rng.bytes(n)
                }
                // Truncations of a valid DISCOVER: every prefix lacks the End option.
                1 => valid[..rng.below(valid.len())].to_vec(),
                // Valid header with random option bytes (no End option).
                2 => {
                    let mut p = valid[..240].to_vec();
                    let n = rng.below(200);
                    p.extend(
                        rng.bytes(n)
                            .into_iter()
                            .map(|b| if b == 255 { 254 } else { b }),
                    );
                    p
                }
                // Truncated TFTP requests (cut before the mode's NUL) and random TFTP opcodes.
                _ => {
                    if rng.below(2) == 0 {
                        // The mode's NUL is at index 13: any cut before it is malformed.
                        let cut = 2 + rng.below(11);
                        valid_rrq[..cut].to_vec()
                    } else {
                        let mut p = vec![0, 3 + rng.below(4) as u8];
                        let n = rng.below(100);
                        p.extend(rng.bytes(n));
                        p
                    }
                }
            };
            let dest: SocketAddr = match i % 4 {
                3 => SocketAddr::from((SERVER_IP, 69)),
                _ if i % 3 == 0 => SocketAddr::from((SERVER_IP, 4011)),
                _ if i % 3 == 1 => SocketAddr::from((SERVER_IP, 67)),
                _ => SocketAddr::from((Ipv4Addr::BROADCAST, 67)),
            };
            let sock = if dest.ip() == std::net::IpAddr::V4(Ipv4Addr::BROADCAST) {
                &c68
            } else {
                &sender
            };
            if sock.send_to(&pkt, dest).is_ok() {
                sent += 1;
            }
            if i % 200 == 0 {
                std::thread::sleep(Duration::from_millis(5));
                drain(&mut got);
            }
        }
        std::thread::sleep(Duration::from_millis(700));
        drain(&mut got);
        (sent, got)
    });
    assert!(replies.0 > 5000, "too few packets sent: {}", replies.0);
    assert_eq!(replies.1, 0, "the server replied to garbage");
    assert!(server.alive(), "server died:\n{}", server.log_text());
    // Still serving: a valid DISCOVER and a TFTP download work.
    let ok = net.in_cli(|| {
        let s = client_socket(68);
        let d = dhcp_msg(
            [2, 0, 0, 0, 0x50, 2],
            MessageType::Discover,
            0xabcd,
            pxe_opts(0, BIOS_VC, false),
        );
        let offer = exchange(&s, &d, broadcast67(), Duration::from_secs(3)).is_some();
        let file = tftp_get(SocketAddr::from((SERVER_IP, 69)), b"f.bin", &[], 1).map(|(d, _)| d);
        (offer, file)
    });
    assert!(ok.0, "no OFFER after the fuzzing");
    assert_eq!(ok.1.expect("TFTP after fuzzing"), b"hello tftp");
    server.stop();
}

#[test]
fn router_advertisement_gives_the_boot_network_a_ula_prefix() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = base_config(
        dir.path(),
        "[ra]\nprefix = \"fd00:213::/64\"\ninterval = 4\n",
    );
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["router advertisements started"],
    );
    let start = Instant::now();
    loop {
        let out = run(net.cli_cmd("ip").args(["-6", "addr", "show", "dev", "vc"]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("inet6 fd00:213:") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(12),
            "no SLAAC address from the RA:\n{text}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Router lifetime 0: the client must not install a default route via us.
    let out = run(net.cli_cmd("ip").args(["-6", "route", "show", "default"]));
    assert!(
        out.stdout.is_empty(),
        "RA installed a default route: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.stop();
}

/// Issue 12, points 1 and 8, where this server hands out the addresses: a
/// machine's one-shot mode is consumed, and its registration window opened,
/// only by a script request from its leased address; its agent registers
/// only from there, once.
#[test]
fn the_one_shot_mode_and_the_registration_window_belong_to_the_leased_address() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = base_config(
        dir.path(),
        &format!("{FULL_DHCP}\n{}\n[tftp]\nenabled = false\n", http_api()),
    );
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &["DHCP service started", "HTTP service started"],
    );
    const MACB: [u8; 6] = [2, 0, 0, 0, 0x51, 1];
    let mac = "02:00:00:00:51:01";
    let leased = net.in_cli(|| {
        let s = client_socket(68);
        let d = dhcp_msg(
            MACB,
            MessageType::Discover,
            0x5100,
            pxe_opts(0, b"PXEClient", true),
        );
        let (offer, _, _) = exchange(&s, &d, broadcast67(), Duration::from_secs(3)).expect("OFFER");
        let mut opts = pxe_opts(0, b"PXEClient", true);
        opts.push(DhcpOption::ServerIdentifier(SERVER_IP));
        opts.push(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        let r = dhcp_msg(MACB, MessageType::Request, 0x5101, opts);
        let (ack, _, _) = exchange(&s, &r, broadcast67(), Duration::from_secs(3)).expect("ACK");
        assert_eq!(msg_type(&ack), Some(MessageType::Ack));
        ack.yiaddr()
    });
    let x = leased.to_string();
    let y = "10.213.0.60";
    net.cli_addr(&format!("{x}/16"));
    net.cli_addr(&format!("{y}/16"));
    for body in [r#"{"mode":"local"}"#, r#"{"mode":"live","once":true}"#] {
        let (code, out) = curl_api(
            &net,
            dir.path(),
            &format!("/v1/clients/{mac}/boot"),
            &[
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
            ],
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    }
    let script_from = |src: &str| {
        let (code, body) = curl(
            &net,
            &[
                "--interface",
                src,
                &format!("http://10.213.0.1:8080/boot/ipxe/{}", mac.replace(':', "-")),
            ],
        );
        assert_eq!(code, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    // Another host on the LAN asks for the machine's script.
    let s = script_from(y);
    assert!(s.contains("sanboot") && !s.contains("kernel "), "{s}");
    let (_, c) = curl_api(&net, dir.path(), &format!("/v1/clients/{mac}"), &[]);
    let c: serde_json::Value = serde_json::from_slice(&c).expect("json");
    assert_eq!(c["boot"]["once"], "live", "consumed by another host: {c}");
    assert!(c["session"].is_null(), "{c}");
    // The machine itself, from its lease.
    let s = script_from(&x);
    assert!(s.contains("kernel "), "{s}");
    assert!(s.contains("aula.server=https://10.213.0.1:8443 "), "{s}");
    let nonce = s
        .split_whitespace()
        .find_map(|w| w.strip_prefix("aula.boot="))
        .expect("nonce")
        .to_string();
    let reg = |token: &str| {
        serde_json::json!({"mac": mac, "agent_version": "t", "token": token,
            "cert_fingerprint": format!("sha256:{}", "ab".repeat(32)), "port": 8000, "boot_nonce": nonce})
        .to_string()
    };
    let register = |src: &str, token: &str| {
        let body = reg(token);
        let (code, out) = curl_api(
            &net,
            dir.path(),
            "/v1/agents/register",
            &[
                "--interface",
                src,
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
            ],
        );
        (code, String::from_utf8_lossy(&out).into_owned())
    };
    let (code, out) = register(y, "agent-from-y-0123456789");
    assert_eq!(code, 403, "registration from another address: {out}");
    let (code, out) = register(&x, "agent-from-x-0123456789");
    assert_eq!(code, 200, "{out}");
    let (code, out) = register(&x, "agent-second-0123456789");
    assert_eq!(code, 403, "a second agent took the machine: {out}");
    let (_, agents) = curl_api(&net, dir.path(), "/v1/agents", &[]);
    let agents: serde_json::Value = serde_json::from_slice(&agents).expect("json");
    assert_eq!(agents[0]["token"], "agent-from-x-0123456789", "{agents}");
    assert_eq!(agents[0]["source"], x.as_str(), "{agents}");
    assert!(
        server.log_text().contains("agent registration refused"),
        "refusals are logged"
    );
    server.stop();
}
