//! Two real `aula-bootserver` processes on one real PostgreSQL
//! (`[console] database`), each with its own agents (in-process, on
//! loopback, file-backed disks) and its own repository holding the same
//! ext4 image, inside a network namespace the test creates.
//!
//! What it proves, through the HTTP API only:
//! * a deployment started through either console is carried out by the
//!   boot server that serves its room (the other server never picks it
//!   up; both consoles show it);
//! * a cancel asked through the other console reaches the server that
//!   carries the deployment out;
//! * one boot server killed (SIGKILL) mid-deployment leaves the other's
//!   deployment running to the end;
//! * restarted, the killed one resumes its deployment where it was and
//!   finishes it: every restored partition equals the image.
//!
//! Needs root (namespace, PostgreSQL as `nobody`) and PostgreSQL's server
//! binaries; fails, not skips, without.

mod deploy_support;
mod pg_support;

use std::time::{Duration, Instant};

use deploy_support::*;
use hyper::Method;
use pg_support::Postgres;
use serde_json::{json, Value};

const NORTH_MACS: [&str; 2] = ["52:54:00:e0:00:01", "52:54:00:e0:00:02"];
const SOUTH_MACS: [&str; 2] = ["52:54:00:e1:00:01", "52:54:00:e1:00:02"];

fn layout() -> Value {
    json!({"table": "mbr", "partitions": [
        {"number": 1, "type": "linux", "size": "16MiB", "filesystem": "ext4"},
        {"number": 2, "type": "linux", "size": "48MiB", "format": false}
    ]})
}

/// The `[console]` section of boot server `id` on the shared database.
fn console_section(pg: &Postgres, id: &str) -> String {
    let pw = pg
        .settings(id, Duration::from_secs(5))
        .password_file
        .expect("password file");
    format!(
        "[console]\ndatabase = \"{}\"\ndatabase_password_file = \"{}\"\nserver_id = \"{id}\"\n\
         claim_lease_s = 5\nlive_boot_timeout_s = 60\nstall_timeout_s = 120\npower_timeout_s = 60\nagent_gone_s = 30\n",
        pg.url(),
        pw.display()
    )
}

fn picked_up(logs: &str, id: i64) -> bool {
    logs.lines().any(|l| {
        (l.contains("picking up deployment") || l.contains("resuming deployment"))
            && l.contains(&format!("deployment={id}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_boot_servers_on_one_postgres_run_each_rooms_deployments_and_a_killed_one_resumes() {
    if !in_netns(
        "two_boot_servers_on_one_postgres_run_each_rooms_deployments_and_a_killed_one_resumes",
    ) {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let t0 = Instant::now();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut north = ServerProc::start(&dir.path().join("north"), &console_section(&pg, "north"));
    let south = ServerProc::start(&dir.path().join("south"), &console_section(&pg, "south"));
    let (cn, cs) = (north.client(), south.client());

    // The same image in both servers' repositories (each serves its agents).
    let files = vec![
        ("data/blob.bin", pseudo_random(19, 20 << 20)),
        ("etc/os-release", b"NAME=\"Lab\"\nID=lab\n".to_vec()),
    ];
    let src = ext4_image(dir.path(), 48, &files);
    upload(&north, &src, "lab", 1 << 20).await;
    upload(&south, &src, "lab", 1 << 20).await;

    // Each room is created through the *other* console, naming its server.
    let rn = cs
        .ok(
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "North lab", "server": "north"})),
        )
        .await;
    let rs = cn
        .ok(
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "South lab", "server": "south"})),
        )
        .await;
    assert_eq!(rn["server"], "north", "{rn}");
    assert_eq!(rs["server"], "south", "{rs}");
    // Both consoles see both rooms (one shared state).
    for c in [&cn, &cs] {
        let rooms = c.ok(Method::GET, "/v1/rooms", None).await;
        assert_eq!(rooms.as_array().map(Vec::len), Some(2), "{rooms}");
    }
    // A room served by a malformed server id is refused and changes nothing.
    let (s, v) = cn
        .call(
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "Bad", "server": "no such/server"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");

    // Machines and agents: each machine's agent registers with the server
    // that serves its room (and only there).
    let throttle_n = Throttle::start(north.https, 6_000_000).await;
    let throttle_s = Throttle::start(south.https, 6_000_000).await;
    let mut agents = Vec::new();
    let mut disks = Vec::new();
    for (server, throttle, room, macs, tag) in [
        (&north, &throttle_n, &rn, NORTH_MACS, "n"),
        (&south, &throttle_s, &rs, SOUTH_MACS, "s"),
    ] {
        for (i, mac) in macs.iter().enumerate() {
            let disk = dir.path().join(format!("disk-{tag}{i}.img"));
            std::fs::File::create(&disk)
                .expect("disk")
                .set_len(96 * MIB)
                .expect("size");
            // Added through the north console whatever the room.
            cn.ok(
                Method::POST,
                "/v1/machines",
                Some(json!({"mac": mac, "name": format!("{tag}pc{}", i + 1),
                            "room_id": room["id"], "seat": i + 1})),
            )
            .await;
            agents.push(
                start_agent_via(
                    server,
                    throttle.port,
                    &dir.path().join(format!("agent-{tag}{i}")),
                    mac,
                    &disk,
                )
                .await,
            );
            disks.push((server.repo_dir(), disk));
        }
    }
    wait_agents(&cn, 2).await;
    wait_agents(&cs, 2).await;

    let request = |room: &str| {
        json!({"room": room, "image": "lab", "disk": 1, "partition": 2,
               "layout": layout(), "after": "reboot-local"})
    };
    // North's room through the south console, south's through the north one.
    let dn = cs
        .ok(Method::POST, "/v1/deployments", Some(request("North lab")))
        .await;
    let ds = cn
        .ok(Method::POST, "/v1/deployments", Some(request("South lab")))
        .await;
    let (idn, ids) = (
        dn["id"].as_i64().expect("id"),
        ds["id"].as_i64().expect("id"),
    );
    assert_eq!(dn["server"], "north", "{dn:#}");
    assert_eq!(ds["server"], "south", "{ds:#}");

    // Kill north as soon as one of its machines restores.
    wait_restoring(&cs, idn).await;
    wait_restoring(&cn, ids).await;
    north.kill();
    let killed = Instant::now();
    // South's deployment runs to its end while north is down; its console
    // still shows north's deployment, stopped where it was.
    let end_s = wait_deployment(&cs, ids, Duration::from_secs(180)).await;
    assert_eq!(end_s["done"], 2, "{end_s:#}");
    let (_, mid) = cs
        .call(Method::GET, &format!("/v1/deployments/{idn}"), None)
        .await;
    assert_eq!(mid["state"], "running", "{mid:#}");
    let before: Vec<(String, String, Option<String>)> = states(&mid);
    assert!(
        before.iter().all(|(_, s, _)| s != "pending"),
        "north's machines had started before the kill: {before:?}"
    );
    eprintln!(
        "south finished {:.1}s after north was killed; north's machines then: {before:?}",
        killed.elapsed().as_secs_f64()
    );

    // North restarts and resumes its deployment where it was.
    north.restart();
    let resumed = Instant::now();
    let end_n = wait_deployment(&cs, idn, Duration::from_secs(240)).await;
    eprintln!(
        "north's deployment {idn} ended {:.1}s after the restart: {:?}",
        resumed.elapsed().as_secs_f64(),
        states(&end_n)
    );
    assert_eq!(end_n["done"], 2, "{end_n:#}");
    assert_eq!(end_n["state"], "finished", "{end_n:#}");

    let (ln, ls) = (north.logs(), south.logs());
    assert!(
        ln.lines()
            .any(|l| l.contains("resuming deployment") && l.contains(&format!("deployment={idn}"))),
        "the restarted north did not resume deployment {idn}:\n{ln}"
    );
    // Each deployment was carried out by its room's server only.
    assert!(picked_up(&ln, idn), "north never ran {idn}:\n{ln}");
    assert!(picked_up(&ls, ids), "south never ran {ids}:\n{ls}");
    assert!(!picked_up(&ls, idn), "south ran north's deployment:\n{ls}");
    assert!(!picked_up(&ln, ids), "north ran south's deployment:\n{ln}");
    // Both consoles agree on the outcome.
    let seen = cn
        .ok(Method::GET, &format!("/v1/deployments/{ids}"), None)
        .await;
    assert_eq!(seen["done"], 2, "{seen:#}");
    // A cancel through the other console reaches the server carrying the
    // deployment out: a scheduled deployment of south's room, made and
    // cancelled through north's console, ends cancelled.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let at = later
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    let mut req = request("South lab");
    req["start_at"] = json!(at);
    let d3 = cn.ok(Method::POST, "/v1/deployments", Some(req)).await;
    let id3 = d3["id"].as_i64().expect("id");
    assert_eq!(
        (d3["state"].as_str(), d3["server"].as_str()),
        (Some("scheduled"), Some("south"))
    );
    cn.ok(Method::POST, &format!("/v1/deployments/{id3}/cancel"), None)
        .await;
    let asked = Instant::now();
    let end3 = wait_deployment(&cn, id3, Duration::from_secs(30)).await;
    assert_eq!(end3["state"], "cancelled", "{end3:#}");
    eprintln!(
        "cancel through the other console took effect in {:.1}s",
        asked.elapsed().as_secs_f64()
    );
    let ls = south.logs();
    assert!(
        ls.lines()
            .any(|l| l.contains("cancel asked on another console")
                && l.contains(&format!("deployment={id3}"))),
        "south did not take the cancel:\n{ls}"
    );

    // Every restored partition equals the image.
    for (repo, disk) in &disks {
        let (bytes, diff) = partition_equals_image(repo, "lab", disk, 2);
        assert!(bytes > 0);
        assert!(
            diff.is_empty(),
            "{} differs in windows {diff:?}",
            disk.display()
        );
    }
    // The password never reached a log.
    for l in [&ln, &ls] {
        assert!(!l.contains(pg_support::PASSWORD), "password in a log");
    }
    drop(agents);
    eprintln!("whole test: {:.1}s", t0.elapsed().as_secs_f64());
}
