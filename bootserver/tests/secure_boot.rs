//! The Secure Boot chain (shim → signed GRUB → signed kernel) served by the
//! running server inside network namespaces: the DHCP answer, the TFTP
//! files and the per-MAC GRUB configuration. They need root; CI runs as root.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use dhcproto::v4::{Architecture, DhcpOption, MessageType};

fn pxe_opts(arch: u16, vc: &[u8], ipxe: bool) -> Vec<DhcpOption> {
    let mut v = vec![
        DhcpOption::ClassIdentifier(vc.to_vec()),
        DhcpOption::ClientSystemArchitecture(Architecture::from(arch)),
    ];
    if ipxe {
        v.push(DhcpOption::UserClass(b"iPXE".to_vec()));
    }
    v
}

fn broadcast67() -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::BROADCAST, 67))
}

const SB_MAC: [u8; 6] = [2, 0, 0, 0, 0x5b, 1];
const SB_MAC_STR: &str = "02:00:00:00:5b:01";
const OTHER_MAC: [u8; 6] = [2, 0, 0, 0, 0x5b, 2];

#[test]
fn secure_boot_machines_get_shim_grub_and_a_per_mac_grub_cfg_others_ipxe() {
    require_root!();
    let net = NetPair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("tftp");
    std::fs::create_dir_all(&root).expect("mkdir");
    write_file(&root.join("ipxe.efi"), b"IPXE-EFI");
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    write_file(&live.join("shimx64.efi"), b"SHIM-SIGNED");
    write_file(&live.join("grubx64.efi"), b"GRUB-NET-SIGNED");
    let cfg = base_config(
        dir.path(),
        &format!(
            "{FULL_DHCP}\n{}\n[tftp]\nroot = \"{}\"\n[boot.secure_boot]\nmachines = [\"{SB_MAC_STR}\"]\ndir = \"{}\"\n",
            http_api(),
            root.display(),
            live.display()
        ),
    );
    let server = ServerProc::start(
        &net.srv,
        dir.path(),
        &cfg,
        &[
            "DHCP service started",
            "HTTP service started",
            "TFTP service started",
        ],
    );

    // DHCP: the boot file per machine and firmware.
    let leased = net.in_cli(|| {
        let s = client_socket(68);
        // (mac, arch, vendor class, iPXE?, expected boot file)
        let uefi: &[u8] = b"PXEClient:Arch:00007:UNDI:003000";
        type Case<'a> = ([u8; 6], u16, &'a [u8], bool, &'a str);
        let cases: Vec<Case> = vec![
            (SB_MAC, 7, uefi, false, "shimx64.efi"),
            (
                SB_MAC,
                9,
                b"PXEClient:Arch:00009:UNDI:003000",
                false,
                "shimx64.efi",
            ),
            (
                SB_MAC,
                16,
                b"HTTPClient:Arch:00016:UNDI:003000",
                false,
                "http://10.213.0.1:8080/boot/live/shimx64.efi",
            ),
            // BIOS has no Secure Boot: iPXE as before.
            (
                SB_MAC,
                0,
                b"PXEClient:Arch:00000:UNDI:002001",
                false,
                "undionly.kpxe",
            ),
            // iPXE that got running (Secure Boot off after all) keeps its script.
            (
                SB_MAC,
                7,
                b"PXEClient:Arch:00007:UNDI:003010",
                true,
                "http://10.213.0.1:8080/boot/ipxe/02-00-00-00-5b-01",
            ),
            (OTHER_MAC, 7, uefi, false, "ipxe.efi"),
        ];
        for (i, (mac, arch, vc, ipxe, file)) in cases.into_iter().enumerate() {
            let d = dhcp_msg(
                mac,
                MessageType::Discover,
                0x5b00 + i as u32,
                pxe_opts(arch, vc, ipxe),
            );
            let (offer, _, _) = exchange(&s, &d, broadcast67(), Duration::from_secs(3))
                .unwrap_or_else(|| panic!("no OFFER for case {i}"));
            assert_eq!(
                bootfile(&offer).as_deref(),
                Some(file),
                "case {i} arch {arch}"
            );
        }
        // The Secure Boot machine takes its lease (as OVMF's PXE does).
        let d = dhcp_msg(
            SB_MAC,
            MessageType::Discover,
            0x5b80,
            pxe_opts(7, uefi, false),
        );
        let (offer, _, _) = exchange(&s, &d, broadcast67(), Duration::from_secs(3)).expect("OFFER");
        let mut opts = pxe_opts(7, uefi, false);
        opts.push(DhcpOption::ServerIdentifier(SERVER_IP));
        opts.push(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        let r = dhcp_msg(SB_MAC, MessageType::Request, 0x5b81, opts);
        let (ack, _, _) = exchange(&s, &r, broadcast67(), Duration::from_secs(3)).expect("ACK");
        assert_eq!(msg_type(&ack), Some(MessageType::Ack));
        assert_eq!(bootfile(&ack).as_deref(), Some("shimx64.efi"));
        ack.yiaddr()
    });

    // The per-MAC GRUB configuration: from another address it is the
    // permanent mode's and opens nothing; from the lease it is the live
    // boot with the kernel line and opens the boot session.
    let x = leased.to_string();
    let y = "10.213.0.61";
    net.cli_addr(&format!("{x}/16"));
    net.cli_addr(&format!("{y}/16"));

    // TFTP: shim, GRUB beside it, and GRUB's generated first configuration
    // under the name GRUB asks for ($prefix/grub.cfg, with a leading slash).
    let tftp = SocketAddr::from((SERVER_IP, 69));
    let (shim, grub, stage1, stage1_rel) = net.in_cli(move || {
        let get = |n: &[u8]| tftp_get(tftp, n, &[("blksize", "1468")], 1).map(|(d, _)| d);
        (
            get(b"shimx64.efi"),
            get(b"grubx64.efi"),
            get(b"/grub/grub.cfg"),
            get(b"grub/grub.cfg"),
        )
    });
    assert_eq!(shim.expect("shim over TFTP"), b"SHIM-SIGNED");
    assert_eq!(grub.expect("grub over TFTP"), b"GRUB-NET-SIGNED");
    let stage1 = String::from_utf8(stage1.expect("grub.cfg over TFTP")).expect("utf-8");
    assert_eq!(
        stage1_rel.expect("grub/grub.cfg").as_slice(),
        stage1.as_bytes()
    );
    assert!(
        stage1.contains("configfile \"(http,10.213.0.1:8080)/boot/grub/${net_default_mac}?ip=${net_default_ip}&mac=${net_default_mac}\""),
        "{stage1}"
    );

    let (code, out) = curl_api(
        &net,
        dir.path(),
        &format!("/v1/clients/{SB_MAC_STR}/boot"),
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"mode":"local"}"#,
        ],
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    let (code, out) = curl_api(
        &net,
        dir.path(),
        &format!("/v1/clients/{SB_MAC_STR}/boot"),
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"mode":"live","once":true}"#,
        ],
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    // GRUB names the MAC with colons and puts ip= and mac= in the query.
    let cfg_from = |src: &str, ip: &str| {
        let (code, body) = curl(
            &net,
            &[
                "--interface",
                src,
                &format!("http://10.213.0.1:8080/boot/grub/{SB_MAC_STR}?ip={ip}&mac={SB_MAC_STR}"),
            ],
        );
        assert_eq!(code, 200);
        String::from_utf8_lossy(&body).into_owned()
    };
    let s = cfg_from(y, y);
    assert!(s.contains("chainloader") && !s.contains("linux "), "{s}");
    let (_, c) = curl_api(&net, dir.path(), &format!("/v1/clients/{SB_MAC_STR}"), &[]);
    let c: serde_json::Value = serde_json::from_slice(&c).expect("json");
    assert_eq!(c["boot"]["once"], "live", "consumed by another host: {c}");
    assert!(c["session"].is_null(), "{c}");

    let s = cfg_from(&x, &x);
    assert!(
        s.contains("linux (http,10.213.0.1:8080)/boot/live/vmlinuz "),
        "{s}"
    );
    assert!(
        s.contains("initrd (http,10.213.0.1:8080)/boot/live/initrd.img"),
        "{s}"
    );
    assert!(s.contains("'BOOTIF=01-02-00-00-00-5b-01'"), "{s}");
    assert!(s.contains("'aula.server=https://10.213.0.1:8443'"), "{s}");
    assert!(s.contains("'aula.server_fp=sha256:"), "{s}");
    assert!(!s.contains("initrd=initrd.img"), "{s}");
    let nonce = s
        .split('\'')
        .find_map(|w| w.strip_prefix("aula.boot="))
        .expect("nonce")
        .to_owned();
    let (_, c) = curl_api(&net, dir.path(), &format!("/v1/clients/{SB_MAC_STR}"), &[]);
    let c: serde_json::Value = serde_json::from_slice(&c).expect("json");
    assert!(
        c["boot"]["once"].is_null(),
        "one-shot mode not consumed: {c}"
    );
    assert!(!c["session"].is_null(), "no boot session opened: {c}");
    assert!(nonce.len() >= 16, "{nonce}");
    // UEFI HTTP boot: shim and the GRUB beside it under /boot/live/.
    for (name, want) in [
        ("shimx64.efi", &b"SHIM-SIGNED"[..]),
        ("grubx64.efi", b"GRUB-NET-SIGNED"),
    ] {
        let (code, body) = curl(&net, &[&format!("http://10.213.0.1:8080/boot/live/{name}")]);
        assert_eq!((code, body.as_slice()), (200, want), "{name}");
    }
    // The next boot is the permanent mode again: local.
    let s = cfg_from(&x, &x);
    assert!(s.contains("exit 1") && !s.contains("linux "), "{s}");
    server.stop();
}
