//! Wake-on-LAN in network namespaces: the server (real binary) runs in a
//! namespace of its own joined by a veth pair to a "room" namespace with
//! two subnets; listeners bound to each subnet's broadcast address in the
//! room namespace must see one well-formed magic packet per machine the
//! deployment wakes, on the broadcast address of that machine's subnet.

mod deploy_support;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deploy_support::*;
use hyper::Method;
use serde_json::json;

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_woken_machine_gets_a_magic_packet_on_its_subnets_broadcast_address() {
    if !in_netns("each_woken_machine_gets_a_magic_packet_on_its_subnets_broadcast_address") {
        return;
    }
    // We are in a fresh namespace; make the room's and join them.
    let room_ns = format!("aula-wol-{}", std::process::id());
    ip(&["netns", "add", &room_ns]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _del = Del(room_ns.clone());
    ip(&[
        "link", "add", "vs", "type", "veth", "peer", "name", "vr", "netns", &room_ns,
    ]);
    ip(&["addr", "add", "10.213.1.1/24", "dev", "vs"]);
    ip(&["addr", "add", "10.213.2.1/24", "dev", "vs"]);
    ip(&["link", "set", "vs", "up"]);
    ip(&["-n", &room_ns, "addr", "add", "10.213.1.2/24", "dev", "vr"]);
    ip(&["-n", &room_ns, "addr", "add", "10.213.2.2/24", "dev", "vr"]);
    ip(&["-n", &room_ns, "link", "set", "vr", "up"]);
    ip(&["-n", &room_ns, "link", "set", "lo", "up"]);

    // Listeners in the room namespace, one per broadcast address.
    type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let seen: Seen = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for bcast in ["10.213.1.255", "10.213.2.255"] {
        let (seen, stop, ns) = (seen.clone(), stop.clone(), room_ns.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let s = UdpSocket::bind((bcast, 9)).expect("bind broadcast listener");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    seen.lock()
                        .expect("seen")
                        .push((bcast.to_owned(), buf[..n].to_vec()));
                }
            }
        }));
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("listener ready");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start_at(
        &dir.path().join("server"),
        "10.213.1.1",
        "[console]\nwol_networks = [\"10.213.1.0/24\", \"10.213.2.0/24\"]\nwol_resend_s = 600\n",
    );
    let c = server.client();
    let src = ext4_image(dir.path(), 8, &[("a.txt", b"a".to_vec())]);
    upload(&server, &src, "img", 1 << 20).await;
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "Lab"})))
        .await;
    let machines = [
        ("52:54:00:f0:00:01", Some("10.213.1.50"), "10.213.1.255"),
        ("52:54:00:f0:00:02", Some("10.213.2.60"), "10.213.2.255"),
        // No address known: the server's own subnet.
        ("52:54:00:f0:00:03", None, "10.213.1.255"),
    ];
    for (i, (mac, ipaddr, _)) in machines.iter().enumerate() {
        c.ok(
            Method::POST,
            "/v1/machines",
            Some(
                json!({"mac": mac, "name": format!("w{i}"), "room": "Lab", "expected_ip": ipaddr}),
            ),
        )
        .await;
    }
    let dep = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(json!({"room": "Lab", "image": "img", "partition": 1})),
        )
        .await;
    let id = dep["id"].as_i64().expect("id");

    let want: BTreeMap<String, String> = machines
        .iter()
        .map(|(m, _, b)| (m.replace(':', ""), b.to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got: BTreeMap<String, String> = seen
            .lock()
            .expect("seen")
            .iter()
            .filter_map(|(b, p)| {
                // Well-formed: 6 x ff, then one MAC 16 times.
                if p.len() != 102 || p[..6] != [0xff; 6] {
                    return None;
                }
                let mac = &p[6..12];
                p[6..]
                    .chunks(6)
                    .all(|c| c == mac)
                    .then(|| (hex::encode(mac), b.clone()))
            })
            .collect();
        if got.len() == want.len() || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    assert_eq!(
        got,
        want,
        "packets seen: {:?}\n{}",
        seen.lock().expect("seen"),
        server.logs()
    );
    let all = seen.lock().expect("seen").len();
    assert_eq!(all, 3, "one packet per machine (no resend within 600 s)");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = c
            .ok(Method::GET, &format!("/v1/deployments/{id}"), None)
            .await;
        if states(&v).iter().all(|(_, s, _)| s == "waking") {
            break;
        }
        assert!(Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.ok(Method::POST, &format!("/v1/deployments/{id}/cancel"), None)
        .await;
}
