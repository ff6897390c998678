//! The Secure Boot chain (shim → signed GRUB → signed kernel) served by the
//! running server inside network namespaces: the DHCP answer, the TFTP
//! files, the per-MAC GRUB configuration by TFTP (Debian 12's signed GRUB
//! has no `http`) with the same boot modes and kernel line as the iPXE
//! script, and the TFTP names refused around it. They need root; CI runs
//! as root.

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
    let kernel = b"SIGNED-KERNEL".repeat(400); // several TFTP blocks
    write_file(&live.join("vmlinuz"), &kernel);
    write_file(&live.join("initrd.img"), b"AULA-INITRD");
    let cfg = base_config(
        dir.path(),
        &format!(
            "{FULL_DHCP}\n{}\n[tftp]\nroot = \"{}\"\n[boot]\nkernel = \"{l}/vmlinuz\"\ninitrd = \"{l}/initrd.img\"\n[boot.secure_boot]\nmachines = [\"{SB_MAC_STR}\"]\ndir = \"{l}\"\n",
            http_api(),
            root.display(),
            l = live.display()
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
        stage1.contains("source \"($root)/grub/mac/${net_default_mac}.cfg\""),
        "{stage1}"
    );
    assert!(!stage1.contains("(http"), "{stage1}");

    for (mode, once) in [("local", false), ("live", true)] {
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
                &format!(r#"{{"mode":"{mode}","once":{once}}}"#),
            ],
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&out));
    }
    let client = |src: &str| {
        let (code, c) = curl_api(&net, dir.path(), &format!("/v1/clients/{src}"), &[]);
        assert_eq!(code, 200);
        serde_json::from_slice::<serde_json::Value>(&c).expect("json")
    };
    // GRUB asks for its configuration by TFTP as $prefix/mac/<mac>.cfg,
    // with a leading slash, from the address it got by DHCP.
    let sb_cfg = format!("/grub/mac/{SB_MAC_STR}.cfg");
    let get_from = |src: &str, name: &str| {
        let src: std::net::Ipv4Addr = src.parse().expect("ip");
        let name = name.to_owned();
        net.in_cli(move || {
            tftp_get_from(
                src,
                tftp,
                name.as_bytes(),
                &[("blksize", "1024"), ("tsize", "0")],
                1,
            )
            .map(|(d, _)| d)
        })
    };
    let text = |r: Result<Vec<u8>, (u16, String)>| {
        String::from_utf8(r.expect("TFTP file")).expect("utf-8")
    };
    // From another address: the permanent mode (local), nothing consumed.
    let s = text(get_from(y, &sb_cfg));
    assert!(s.contains("chainloader") && !s.contains("linux "), "{s}");
    let c = client(SB_MAC_STR);
    assert_eq!(c["boot"]["once"], "live", "consumed by another host: {c}");
    assert!(c["session"].is_null(), "{c}");

    // From its lease: the one-shot live boot, with the iPXE script's kernel
    // line, kernel and initrd by TFTP from the same server.
    let s = text(get_from(&x, &sb_cfg));
    assert!(
        s.contains("linux ($root)/live/vmlinuz 'BOOTIF=01-02-00-00-00-5b-01' "),
        "{s}"
    );
    assert!(s.contains("initrd ($root)/live/initrd.img; then"), "{s}");
    assert!(s.contains("'aula.server=https://10.213.0.1:8443'"), "{s}");
    assert!(s.contains("'aula.server_fp=sha256:"), "{s}");
    assert!(!s.contains("initrd=initrd.img"), "{s}");
    assert!(!s.contains("(http"), "{s}");
    let nonce = s
        .split('\'')
        .find_map(|w| w.strip_prefix("aula.boot="))
        .expect("nonce")
        .to_owned();
    assert!(nonce.len() >= 16, "{nonce}");
    let c = client(SB_MAC_STR);
    assert!(
        c["boot"]["once"].is_null(),
        "one-shot mode not consumed: {c}"
    );
    assert!(!c["session"].is_null(), "no boot session opened: {c}");
    // A retransmitted request gets the same bytes (same nonce), not the
    // next boot's mode.
    assert_eq!(
        text(get_from(&x, &sb_cfg)),
        s,
        "a repeated RRQ changed the configuration"
    );

    // The same registry state as the iPXE script: the one-shot mode is
    // spent, so the machine's iPXE script is its permanent mode, local.
    let (code, body) = curl(
        &net,
        &[
            "--interface",
            &x,
            &format!("http://10.213.0.1:8080/boot/ipxe/{SB_MAC_STR}?ip={x}&mac={SB_MAC_STR}"),
        ],
    );
    assert_eq!(code, 200);
    let ipxe = String::from_utf8_lossy(&body);
    assert!(
        ipxe.contains("booting the local disk") && !ipxe.contains("kernel "),
        "{ipxe}"
    );

    // The kernel and initrd the configuration names.
    assert_eq!(get_from(&x, "/live/vmlinuz").expect("kernel"), kernel);
    assert_eq!(
        get_from(&x, "live/initrd.img").expect("initrd"),
        b"AULA-INITRD"
    );

    // Everything else under grub/ and live/ is refused, with a log line.
    let other_cfg = "/grub/mac/02:00:00:00:5b:02.cfg";
    for (name, why) in [
        (other_cfg, "does not get the signed chain"),
        ("/grub/mac/02-00-00-00-5B-01.cfg", "only grub.cfg and mac/"),
        ("/grub/mac/02:00:00:00:5b:01", "only grub.cfg and mac/"),
        ("/grub/x86_64-efi/http.mod", "module files are not served"),
        (
            "/grub/x86_64-efi/command.lst",
            "module files are not served",
        ),
        ("/live/shimx64.efi", "only the live kernel and initrd"),
        ("live/../grub/grub.cfg", "path not allowed"),
    ] {
        match get_from(&x, name) {
            Ok(d) => panic!("{name} was served ({} bytes)", d.len()),
            Err((code, msg)) => {
                assert!(code == 2 || code == 1, "{name}: code {code} {msg}");
                assert!(msg.contains(why), "{name}: {msg}");
            }
        }
    }
    let log = server.log_text();
    for name in [other_cfg, "/grub/x86_64-efi/http.mod", "/live/shimx64.efi"] {
        assert!(
            log.lines()
                .any(|l| l.contains("TFTP request refused") && l.contains(&format!("file={name}"))),
            "no refusal logged for {name}"
        );
    }
    // The refused machine's state is untouched.
    let c = client("02:00:00:00:5b:02");
    assert!(c["session"].is_null(), "{c}");

    // UEFI HTTP boot: shim and the GRUB beside it under /boot/live/.
    for (name, want) in [
        ("shimx64.efi", &b"SHIM-SIGNED"[..]),
        ("grubx64.efi", b"GRUB-NET-SIGNED"),
    ] {
        let (code, body) = curl(&net, &[&format!("http://10.213.0.1:8080/boot/live/{name}")]);
        assert_eq!((code, body.as_slice()), (200, want), "{name}");
    }
    // The HTTP route of the configuration (a GRUB with `http`) gives the
    // same state: the permanent mode again, local.
    let (code, body) = curl(
        &net,
        &[
            "--interface",
            &x,
            &format!("http://10.213.0.1:8080/boot/grub/{SB_MAC_STR}?ip={x}&mac={SB_MAC_STR}"),
        ],
    );
    assert_eq!(code, 200);
    let s = String::from_utf8_lossy(&body);
    assert!(s.contains("exit 1") && !s.contains("linux "), "{s}");
    server.stop();
}
