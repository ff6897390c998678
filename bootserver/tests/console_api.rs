//! The console API against the real binary (HTTPS on loopback, in a
//! network namespace of its own): operators' sessions listed and ended,
//! bulk boot modes from the machine list, every deployment field kept and
//! bad ones refused with nothing stored (swarm until it exists), and
//! paging through thousands of machines.

mod deploy_support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use deploy_support::*;
use hyper::Method;
use serde_json::{json, Value};

fn add_user(users: &std::path::Path, name: &str, password: &str, rooms: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aula-bootserver"));
    cmd.args(["user", "add", name, "--users-file"]).arg(users);
    if let Some(r) = rooms {
        cmd.args(["--rooms", r]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("user add");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("password");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A signed-in browser: its cookie and CSRF token.
struct Browser {
    cookie: String,
    csrf: String,
}

async fn sign_in(c: &Client, user: &str, password: &str) -> Browser {
    let body = json!({"user": user, "password": password})
        .to_string()
        .into_bytes();
    let (s, h, v) = c
        .raw(
            Method::POST,
            "/v1/session",
            &[],
            Some(("application/json", body)),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let cookie = h
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("cookie")
        .to_owned();
    Browser {
        cookie,
        csrf: v["csrf"].as_str().expect("csrf").to_owned(),
    }
}

impl Browser {
    async fn call(
        &self,
        c: &Client,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (s, _, v) = c
            .raw(
                method,
                path,
                &[("cookie", &self.cookie), ("x-csrf-token", &self.csrf)],
                body.map(|b| ("application/json", b.to_string().into_bytes())),
            )
            .await;
        (s, v)
    }
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("list")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_per_scope_and_an_ended_one_is_refused_at_once() {
    if !in_netns("sessions_are_listed_per_scope_and_an_ended_one_is_refused_at_once") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    add_user(&users, "ana", "ana-password-1", Some("A"));
    add_user(&users, "luis", "luis-password-1", Some("B"));
    add_user(&users, "jefa", "jefa-password-1", None);
    let server = ServerProc::start(
        &dir.path().join("server"),
        &format!("[console]\nusers_file = \"{}\"\n", users.display()),
    );
    let c = server.client();
    let ana_laptop = sign_in(&c, "ana", "ana-password-1").await;
    let ana_lab = sign_in(&c, "ana", "ana-password-1").await;
    let luis = sign_in(&c, "luis", "luis-password-1").await;
    let jefa = sign_in(&c, "jefa", "jefa-password-1").await;

    // Ana (limited to a room) sees her two sessions, the current one marked.
    let (s, mine) = ana_laptop.call(&c, Method::GET, "/v1/sessions", None).await;
    assert_eq!(s, 200, "{mine}");
    let list = mine.as_array().expect("list");
    assert_eq!(list.len(), 2, "{mine}");
    assert!(list.iter().all(|x| x["user"] == "ana"), "{mine}");
    assert_eq!(
        list.iter().filter(|x| x["current"] == true).count(),
        1,
        "{mine}"
    );
    assert!(
        !mine.to_string().contains(&ana_laptop.csrf)
            && !mine
                .to_string()
                .contains(ana_laptop.cookie.split('=').nth(1).expect("secret")),
        "a listing shows no secret: {mine}"
    );
    // An operator with every room, and the API token, see everybody's.
    let (_, all) = jefa.call(&c, Method::GET, "/v1/sessions", None).await;
    assert_eq!(all.as_array().expect("list").len(), 4, "{all}");
    let (_, all) = c.call(Method::GET, "/v1/sessions", None).await;
    assert_eq!(all.as_array().expect("list").len(), 4, "{all}");
    let luis_id = all
        .as_array()
        .expect("list")
        .iter()
        .find(|x| x["user"] == "luis")
        .and_then(|x| x["id"].as_str())
        .expect("luis's session")
        .to_owned();

    // Ana may not end Luis's session; nothing changes.
    let (s, v) = ana_laptop
        .call(&c, Method::DELETE, &format!("/v1/sessions/{luis_id}"), None)
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, _) = luis.call(&c, Method::GET, "/v1/rooms", None).await;
    assert_eq!(s, 200);
    // Ana ends her other session (the lab PC she forgot to sign out of):
    // its next request is refused at once.
    let other = ids_of(&mine)
        .into_iter()
        .zip(mine.as_array().expect("list"))
        .find(|(_, x)| x["current"] == false)
        .map(|(id, _)| id)
        .expect("the other session");
    let (s, v) = ana_laptop
        .call(&c, Method::DELETE, &format!("/v1/sessions/{other}"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = ana_lab.call(&c, Method::GET, "/v1/rooms", None).await;
    assert_eq!(s, 401, "an ended session still worked");
    let (s, _) = ana_laptop.call(&c, Method::GET, "/v1/rooms", None).await;
    assert_eq!(s, 200, "the session that ended the other still works");
    // The head of the lab ends Luis's.
    let (s, v) = jefa
        .call(&c, Method::DELETE, &format!("/v1/sessions/{luis_id}"), None)
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = luis.call(&c, Method::GET, "/v1/rooms", None).await;
    assert_eq!(s, 401);
    let (s, _) = jefa
        .call(&c, Method::DELETE, &format!("/v1/sessions/{luis_id}"), None)
        .await;
    assert_eq!(s, 404, "an ended session is gone");
    // The viewer token reads the list but ends nothing.
    let viewer = format!("Bearer {VIEWER_TOKEN}");
    let (s, _, v) = c
        .raw(
            Method::GET,
            "/v1/sessions",
            &[("authorization", &viewer)],
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v.as_array().expect("list").len(), 2, "{v}");
    let (s, _, _) = c
        .raw(
            Method::DELETE,
            &format!("/v1/sessions/{}", ids_of(&v)[0]),
            &[("authorization", &viewer)],
            None,
        )
        .await;
    assert_eq!(s, 403);
    // Every end is in the command log, with who did it.
    let (_, log) = c.call(Method::GET, "/v1/log?limit=50", None).await;
    let ends: Vec<(String, String)> = log
        .as_array()
        .expect("log")
        .iter()
        .filter(|e| e["action"] == "session.revoke")
        .map(|e| {
            (
                e["who"].as_str().unwrap_or("").to_owned(),
                e["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(ends.contains(&("jefa".into(), "ok".into())), "{ends:?}");
    assert!(ends.contains(&("ana".into(), "ok".into())), "{ends:?}");
    assert!(
        ends.iter()
            .any(|(w, o)| w == "ana" && o.starts_with("refused")),
        "{ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_boot_modes_set_every_selected_machine_or_none_outside_the_callers_rooms() {
    if !in_netns("bulk_boot_modes_set_every_selected_machine_or_none_outside_the_callers_rooms") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    add_user(&users, "ana", "ana-password-1", Some("A"));
    let server = ServerProc::start(
        &dir.path().join("server"),
        &format!("[console]\nusers_file = \"{}\"\n", users.display()),
    );
    let c = server.client();
    let mut csv = String::from("room,name,mac\n");
    for i in 0..60 {
        csv.push_str(&format!("A,a-pc{i:02},52:54:00:f1:00:{i:02x}\n"));
    }
    csv.push_str("B,b-pc01,52:54:00:f1:01:01\n");
    let (s, _, v) = c
        .raw(
            Method::POST,
            "/v1/machines/import",
            &[("authorization", &format!("Bearer {API_TOKEN}"))],
            Some(("text/csv", csv.into_bytes())),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let ms = c.ok(Method::GET, "/v1/machines?limit=100", None).await;
    let ids = |room: &str| -> Vec<i64> {
        ms["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .filter(|m| m["room"] == room)
            .map(|m| m["id"].as_i64().expect("id"))
            .collect()
    };
    let (a, b) = (ids("A"), ids("B"));
    assert_eq!((a.len(), b.len()), (60, 1));
    let boot_of = |clients: &Value, mac: &str| -> Value {
        clients
            .as_array()
            .expect("clients")
            .iter()
            .find(|x| x["mac"] == mac)
            .map(|x| x["boot"].clone())
            .unwrap_or(Value::Null)
    };

    let ana = sign_in(&c, "ana", "ana-password-1").await;
    // One machine of B among the selection: refused, none changed.
    let mut sel = a.clone();
    sel.push(b[0]);
    let (s, v) = ana
        .call(
            &c,
            Method::POST,
            "/v1/machines/boot",
            Some(json!({"ids": sel, "mode": "live", "once": true})),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let clients = c.ok(Method::GET, "/v1/clients", None).await;
    assert!(
        boot_of(&clients, "52:54:00:f1:00:00")
            .get("once")
            .is_none_or(Value::is_null),
        "a refused bulk action changed a machine: {clients}"
    );
    // An unknown id: 404, none changed.
    let (s, _) = ana
        .call(
            &c,
            Method::POST,
            "/v1/machines/boot",
            Some(json!({"ids": [a[0], 999_999], "mode": "local"})),
        )
        .await;
    assert_eq!(s, 404);
    // Her 60 machines at once.
    let t = Instant::now();
    let (s, v) = ana
        .call(
            &c,
            Method::POST,
            "/v1/machines/boot",
            Some(json!({"ids": a, "mode": "live", "once": true})),
        )
        .await;
    let ms_taken = t.elapsed().as_millis();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["set"], 60, "{v}");
    assert_eq!(v["failed"], json!([]), "{v}");
    let clients = c.ok(Method::GET, "/v1/clients", None).await;
    for i in 0..60 {
        let mac = format!("52:54:00:f1:00:{i:02x}");
        assert_eq!(boot_of(&clients, &mac)["once"], "live", "{mac}: {clients}");
    }
    assert!(
        boot_of(&clients, "52:54:00:f1:01:01").is_null(),
        "room B untouched"
    );
    // Back to the default, in one call.
    let (s, v) = ana
        .call(
            &c,
            Method::POST,
            "/v1/machines/boot",
            Some(json!({"ids": a, "mode": null})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let clients = c.ok(Method::GET, "/v1/clients", None).await;
    assert!(
        boot_of(&clients, "52:54:00:f1:00:00")["once"].is_null(),
        "{clients}"
    );
    println!("RESULT bulk_boot_machines=60 bulk_boot_ms={ms_taken}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_keeps_every_field_and_bad_fields_are_refused_storing_nothing() {
    if !in_netns("a_deployment_keeps_every_field_and_bad_fields_are_refused_storing_nothing") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(&dir.path().join("server"), "");
    let c = server.client();
    let src = ext4_image(dir.path(), 8, &[("a.txt", b"one".to_vec())]);
    upload(&server, &src, "lab", 1 << 20).await;
    let src = ext4_image(dir.path(), 8, &[("a.txt", b"two".to_vec())]);
    upload(&server, &src, "lab", 1 << 20).await;
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "A"})))
        .await;
    for i in 1..=3 {
        c.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": format!("52:54:00:f2:00:{i:02x}"), "name": format!("pc{i}"), "room": "A"})),
        )
        .await;
    }
    let count = |v: &Value| v.as_array().map(Vec::len).expect("a list of deployments");
    let before = count(&c.ok(Method::GET, "/v1/deployments", None).await);

    // Refused, each with a reason that names the field; nothing stored.
    let base = json!({"machines": ["pc1", "52:54:00:f2:00:02"], "image": "lab", "disk": 1, "partition": 2});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, says) in [
        (
            with("method", json!("multicast")),
            "not one of unicast, unicast-cache, swarm",
        ),
        (
            with("after", json!("explode")),
            "expected one of `reboot-local`, `poweroff`, `stay`",
        ),
        (with("start_at", json!("tonight")), "start_at"),
        (with("disk", json!(0)), "disk"),
        (with("image", json!("lab@9")), "9"),
        (with("image", json!("nope")), "nope"),
        (with("machines", json!(["pc1", "pc99"])), "pc99"),
    ] {
        let (s, v) = c
            .call(Method::POST, "/v1/deployments", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body} → {s} {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(says),
            "{body}: the error does not say {says:?}: {v}"
        );
    }
    assert_eq!(
        count(&c.ok(Method::GET, "/v1/deployments", None).await),
        before,
        "a refused deployment was stored"
    );

    // Every field: a list of machines, image and version, disk and
    // partition, unicast-cache, a layout, power off after, tomorrow at
    // 02:00, two at a time. It waits for its start time.
    // 02:00 tomorrow (UTC): always in the future, whatever the hour the test runs.
    let start = (time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .replace_time(time::Time::from_hms(2, 0, 0).expect("02:00"));
    let start_s = start
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let layout = json!({"table": "mbr", "partitions": [
        {"number": 1, "type": "linux", "size": "4MiB", "filesystem": "ext4"},
        {"number": 2, "type": "linux", "size": "16MiB", "format": false}
    ]});
    let d = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(json!({"machines": ["pc1", "52:54:00:f2:00:02"], "image": "lab@1", "disk": 1, "partition": 2,
                        "method": "unicast-cache", "layout": layout, "after": "poweroff",
                        "start_at": start_s, "max_concurrent": 2})),
        )
        .await;
    let id = d["id"].as_i64().expect("id");
    let got = c
        .ok(Method::GET, &format!("/v1/deployments/{id}"), None)
        .await;
    let dep = if got.get("deployment").is_some() {
        &got["deployment"]
    } else {
        &got
    };
    assert_eq!(dep["image"], "lab", "{got}");
    assert_eq!(dep["version"], 1, "{got}");
    assert_eq!(dep["disk"], 1, "{got}");
    assert_eq!(dep["partition"], 2, "{got}");
    assert_eq!(dep["method"], "unicast-cache", "{got}");
    assert_eq!(dep["after"], "poweroff", "{got}");
    assert_eq!(dep["max_concurrent"], 2, "{got}");
    assert_eq!(dep["state"], "scheduled", "{got}");
    let at = time::OffsetDateTime::parse(
        dep["start_at"].as_str().expect("start_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("start_at parses");
    assert_eq!(at, start, "{got}");
    assert!(
        got.to_string().contains("16MiB") || got.to_string().contains("16777216"),
        "the layout is kept: {got}"
    );
    let macs: Vec<&str> = got["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .filter_map(|m| m["mac"].as_str())
        .collect();
    assert_eq!(macs.len(), 2, "{got}");
    assert!(
        macs.contains(&"52:54:00:f2:00:01") && macs.contains(&"52:54:00:f2:00:02"),
        "{got}"
    );
    assert!(
        got["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .all(|m| m["state"] == "pending"),
        "scheduled: nothing woken yet: {got}"
    );
    // A room instead of a list: every machine of it.
    let d = c
        .ok(
            Method::POST,
            "/v1/deployments",
            Some(
                json!({"room": "A", "image": "lab", "disk": 1, "partition": 2,
                        "start_at": start_s}),
            ),
        )
        .await;
    let room_dep = c
        .ok(Method::GET, &format!("/v1/deployments/{}", d["id"]), None)
        .await;
    assert_eq!(
        room_dep["machines"].as_array().map(Vec::len),
        Some(3),
        "{room_dep}"
    );
    let rd = if room_dep.get("deployment").is_some() {
        &room_dep["deployment"]
    } else {
        &room_dep
    };
    assert_eq!(
        rd["version"], 2,
        "the newest version by default: {room_dep}"
    );
    assert_eq!(rd["method"], "unicast", "{room_dep}");
    assert_eq!(rd["after"], "reboot-local", "{room_dep}");
    for i in [id, d["id"].as_i64().expect("id")] {
        c.ok(Method::POST, &format!("/v1/deployments/{i}/cancel"), None)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_machines_page_by_fifty_and_filter_by_room_and_search() {
    if !in_netns("thousands_of_machines_page_by_fifty_and_filter_by_room_and_search") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(&dir.path().join("server"), "");
    let c = server.client();
    const N: usize = 3000;
    let mut csv = String::from("room,name,mac\n");
    for i in 0..N {
        csv.push_str(&format!(
            "aula-{:02},pc{i:04},52:54:00:f3:{:02x}:{:02x}\n",
            i / 100,
            i >> 8,
            i & 0xff
        ));
    }
    let (s, _, v) = c
        .raw(
            Method::POST,
            "/v1/machines/import",
            &[("authorization", &format!("Bearer {API_TOKEN}"))],
            Some(("text/csv", csv.into_bytes())),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["machines_created"], N, "{v}");
    let mut seen = std::collections::HashSet::new();
    let mut worst = 0u128;
    let mut offset = 0;
    loop {
        let t = Instant::now();
        let page = c
            .ok(
                Method::GET,
                &format!("/v1/machines?limit=50&offset={offset}"),
                None,
            )
            .await;
        worst = worst.max(t.elapsed().as_millis());
        assert_eq!(page["total"], N, "{page}");
        let ms = page["machines"].as_array().expect("machines");
        if ms.is_empty() {
            break;
        }
        assert!(ms.len() <= 50);
        for m in ms {
            assert!(
                seen.insert(m["mac"].as_str().expect("mac").to_owned()),
                "{m} twice"
            );
        }
        offset += ms.len();
    }
    assert_eq!(seen.len(), N, "every machine on exactly one page");
    let rooms = c.ok(Method::GET, "/v1/rooms", None).await;
    let r7 = rooms
        .as_array()
        .expect("rooms")
        .iter()
        .find(|r| r["name"] == "aula-07")
        .and_then(|r| r["id"].as_i64())
        .expect("aula-07");
    let page = c
        .ok(
            Method::GET,
            &format!("/v1/machines?room={r7}&limit=50&offset=50"),
            None,
        )
        .await;
    assert_eq!(page["total"], 100, "{page}");
    assert_eq!(page["machines"].as_array().map(Vec::len), Some(50));
    assert!(page["machines"]
        .as_array()
        .expect("ms")
        .iter()
        .all(|m| m["room"] == "aula-07"));
    let page = c.ok(Method::GET, "/v1/machines?q=pc2999", None).await;
    assert_eq!(page["total"], 1, "{page}");
    println!(
        "RESULT machines={N} pages={} worst_page_ms={worst}",
        N.div_ceil(50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_whose_agent_stops_answering_shows_offline_not_live() {
    if !in_netns("a_machine_whose_agent_stops_answering_shows_offline_not_live") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(
        &dir.path().join("server"),
        "[console]\npresence_probe_s = 1\n",
    );
    let c = server.client();
    let mac = "52:54:00:f4:00:01";
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "A"})))
        .await;
    c.ok(
        Method::POST,
        "/v1/machines",
        Some(json!({"mac": mac, "name": "a-pc01", "room": "A"})),
    )
    .await;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .expect("disk")
        .set_len(64 * MIB)
        .expect("size");
    let agent = start_agent(&server, &dir.path().join("agent"), mac, &disk).await;
    wait_agents(&c, 1).await;
    let (_, answered) = until(&c, "live").await;
    // Within a probe or two the server has heard it answer.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let mut answered = answered;
    while answered.is_null() {
        assert!(Instant::now() < deadline, "never asked the agent");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        answered = machine_state(&c).await.1;
    }
    // Powered off (the agent gone): offline, not live, within seconds.
    let gone = Instant::now();
    agent.shutdown().await;
    let (t, last) = until(&c, "offline").await;
    assert!(!last.is_null(), "the last answer is still shown");
    println!(
        "RESULT offline_after_ms={} probe_s=1",
        t.duration_since(gone).as_millis()
    );
    // Its tile says so too (the rooms view's stream document).
    let tiles = c.ok(Method::GET, "/v1/machines?limit=10", None).await;
    assert_eq!(tiles["machines"][0]["state"], "offline", "{tiles}");
}

/// The first machine's state and when its agent last answered.
async fn machine_state(c: &Client) -> (String, Value) {
    let v = c.ok(Method::GET, "/v1/machines?limit=10", None).await;
    (
        v["machines"][0]["state"].as_str().unwrap_or("").to_owned(),
        v["machines"][0]["agent_answered_at"].clone(),
    )
}

/// Waits (10 s at most) until the first machine is in state `want`.
async fn until(c: &Client, want: &str) -> (Instant, Value) {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (s, at) = machine_state(c).await;
        if s == want {
            return (Instant::now(), at);
        }
        assert!(
            Instant::now() < deadline,
            "the machine stayed {s}, not {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_takes_a_machines_partition_as_a_new_image_through_the_same_steps() {
    if !in_netns("a_capture_takes_a_machines_partition_as_a_new_image_through_the_same_steps") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProc::start(&dir.path().join("server"), "");
    let c = server.client();
    let mac = "52:54:00:f5:00:01";
    c.ok(Method::POST, "/v1/rooms", Some(json!({"name": "A"})))
        .await;
    c.ok(
        Method::POST,
        "/v1/machines",
        Some(json!({"mac": mac, "name": "teacher-pc", "room": "A"})),
    )
    .await;
    // The teacher's machine: an MBR disk whose partition 1 holds ext4 with files.
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .expect("disk")
        .set_len(64 * MIB)
        .expect("size");
    let mut sf = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk");
    sf.stdin
        .take()
        .expect("stdin")
        .write_all(b"label: dos\nstart=2048, size=65536, type=83\n")
        .expect("table");
    assert!(sf.wait().expect("sfdisk").success());
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("etc")).expect("content");
    std::fs::write(content.join("etc/os-release"), b"NAME=Teacher\n").expect("file");
    std::fs::write(content.join("data.bin"), pseudo_random(9, 3 << 20)).expect("file");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "offset=1048576", "-d"])
        .arg(&content)
        .arg(&disk)
        .arg("32M"));
    let agent = start_agent(&server, &dir.path().join("agent"), mac, &disk).await;
    wait_agents(&c, 1).await;

    let d = c
        .ok(
            Method::POST,
            "/v1/captures",
            Some(json!({"machine": "teacher-pc", "disk": 1, "partition": 1,
                        "image": "teacher-2026", "after": "stay"})),
        )
        .await;
    let id = d["id"].as_i64().expect("id");
    let end = wait_deployment(&c, id, std::time::Duration::from_secs(120)).await;
    assert_eq!(
        states(&end),
        vec![("teacher-pc".to_owned(), "done".to_owned(), None)],
        "{end}"
    );
    // Published under that name, and equal to the partition it came from.
    let (checked, differing) = partition_equals_image(&server.repo_dir(), "teacher-2026", &disk, 1);
    assert!(checked >= 3 << 20, "{checked}");
    assert!(differing.is_empty(), "windows differ: {differing:?}");
    // The capture grant ended with the capture: the agent's upload token
    // uploads nothing more.
    let agents = c.ok(Method::GET, "/v1/agents", None).await;
    let token = agents[0]["token"].as_str().expect("agent token").to_owned();
    let upload = aula_imager::tls::upload_token(&token);
    let (s, _, v) = c
        .raw(
            Method::PUT,
            &format!("/v1/chunks/{}", "0".repeat(64)),
            &[("authorization", &format!("Bearer {upload}"))],
            Some(("application/octet-stream", b"x".to_vec())),
        )
        .await;
    assert!(
        s == 401 || s == 403,
        "the capture grant outlived the capture: {s} {v}"
    );
    agent.shutdown().await;
}
