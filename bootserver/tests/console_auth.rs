//! Operators: users added with `aula-bootserver user add` (argon2), sign-in
//! over HTTPS with a cookie that is HttpOnly, SameSite=Strict and Secure,
//! CSRF tokens on writes, per-user room limits, sessions as principals of
//! the one rights model (the API sees them too), and the API and viewer
//! tokens still working for programs. The server is the real binary, in a network
//! namespace of its own (so any Wake-on-LAN packet stays inside).

mod deploy_support;

use std::io::Write;
use std::process::{Command, Stdio};

use deploy_support::*;
use hyper::Method;
use serde_json::{json, Value};

fn add_user(users: &std::path::Path, name: &str, password: &str, rooms: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aula-bootserver"));
    cmd.args(["user", "add", name, "--users-file"]).arg(users);
    if let Some(r) = rooms {
        cmd.args(["--rooms", r]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn sign_in(c: &Client, user: &str, password: &str) -> (u16, Option<String>, Value) {
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
    let cookie = h
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (s, cookie, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_a_session_and_its_csrf_token_and_a_user_limited_to_room_a_cannot_deploy_to_room_b(
) {
    if !in_netns("writes_need_a_session_and_its_csrf_token_and_a_user_limited_to_room_a_cannot_deploy_to_room_b") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    let said = add_user(&users, "ana", "ana-password-1", Some("A"));
    assert!(said.contains("rooms: A"), "{said}");
    add_user(&users, "root", "root-password-1", None);
    let text = std::fs::read_to_string(&users).expect("users");
    assert!(
        text.contains("$argon2id$") && !text.contains("ana-password-1"),
        "{text}"
    );

    let server = ServerProc::start(
        &dir.path().join("server"),
        &format!("[console]\nusers_file = \"{}\"\n", users.display()),
    );
    let api = server.client();
    let src = ext4_image(dir.path(), 8, &[("a.txt", b"a".to_vec())]);
    upload(&server, &src, "img", 1 << 20).await;
    api.ok(Method::POST, "/v1/rooms", Some(json!({"name": "A"})))
        .await;
    api.ok(Method::POST, "/v1/rooms", Some(json!({"name": "B"})))
        .await;
    api.ok(
        Method::POST,
        "/v1/machines",
        Some(json!({"mac": "52:54:00:e0:00:01", "name": "a1", "room": "A"})),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/machines",
        Some(json!({"mac": "52:54:00:e0:00:02", "name": "b1", "room": "B"})),
    )
    .await;

    // Plain HTTP beside a TLS listener: no sign-in, pages go to HTTPS.
    let plain = Client::new(&server.base());
    let (s, _, v) = sign_in(&plain, "ana", "ana-password-1").await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = plain.call(Method::GET, "/v1/rooms", None).await;
    assert_eq!(s, 403, "the console API answered over plain HTTP: {v}");
    let (s, h, _) = plain
        .raw(Method::GET, "/", &[("host", "127.0.0.1")], None)
        .await;
    assert_eq!(s, 308);
    assert_eq!(
        h.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://127.0.0.1:{}/", server.https).as_str())
    );

    let c = Client::pinned(&server.https_base(), Some(&server.fingerprint));
    // Nothing without a session or the token.
    let (s, _, _) = c.raw(Method::GET, "/v1/rooms", &[], None).await;
    assert_eq!(s, 401);
    let (s, _, _) = c
        .raw(
            Method::GET,
            "/v1/rooms",
            &[("authorization", "Bearer wrong-token-0123456789")],
            None,
        )
        .await;
    assert_eq!(s, 401);
    // The page itself is open and embedded.
    let (s, h, page) = c.raw(Method::GET, "/", &[], None).await;
    assert_eq!(s, 200);
    assert!(page.as_str().unwrap_or("").contains("/assets/app.js"));
    assert!(h.get("content-security-policy").is_some());

    let (s, _, v) = sign_in(&c, "ana", "wrong").await;
    assert_eq!(s, 401, "{v}");
    let (s, _, v) = sign_in(&c, "nobody", "wrong-password").await;
    assert_eq!(s, 401, "{v}");
    let (s, cookie, v) = sign_in(&c, "ana", "ana-password-1").await;
    assert_eq!(s, 200, "{v}");
    let cookie = cookie.expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(attr), "cookie lacks {attr}: {cookie}");
    }
    let session = cookie.split(';').next().expect("pair").to_owned();
    let csrf = v["csrf"].as_str().expect("csrf").to_owned();
    assert!(csrf.len() >= 32);

    // Reads with the cookie; ana sees room A only.
    let (s, _, rooms) = c
        .raw(Method::GET, "/v1/rooms", &[("cookie", &session)], None)
        .await;
    assert_eq!(s, 200);
    let names: Vec<_> = rooms
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| r["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("A")]);
    let (_, _, ms) = c
        .raw(Method::GET, "/v1/machines", &[("cookie", &session)], None)
        .await;
    assert_eq!(ms["total"], 1, "{ms}");

    let deploy = |room: &str| {
        json!({"room": room, "image": "img", "partition": 1})
            .to_string()
            .into_bytes()
    };
    // Writes without the CSRF token, or with a wrong one: refused, nothing stored.
    let (s, _, v) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &[("cookie", &session)],
            Some(("application/json", deploy("A"))),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("CSRF"), "{v}");
    let (s, _, _) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &[("cookie", &session), ("x-csrf-token", "0000")],
            Some(("application/json", deploy("A"))),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _, _) = c
        .raw(
            Method::POST,
            "/v1/rooms",
            &[("x-csrf-token", &csrf)],
            Some(("application/json", b"{\"name\":\"C\"}".to_vec())),
        )
        .await;
    assert_eq!(s, 401, "a CSRF token without its session is nothing");
    let list = api.ok(Method::GET, "/v1/deployments", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // ana may not deploy to room B, nor name B's machine, nor make rooms.
    let with = [
        ("cookie", session.as_str()),
        ("x-csrf-token", csrf.as_str()),
    ];
    let (s, _, v) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &with,
            Some(("application/json", deploy("B"))),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("ana may not deploy to b1"),
        "{v}"
    );
    let body = json!({"machines": ["52:54:00:e0:00:02"], "image": "img", "partition": 1})
        .to_string()
        .into_bytes();
    let (s, _, _) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &with,
            Some(("application/json", body)),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _, _) = c
        .raw(
            Method::POST,
            "/v1/rooms",
            &with,
            Some(("application/json", b"{\"name\":\"C\"}".to_vec())),
        )
        .await;
    assert_eq!(s, 403);
    let list = api.ok(Method::GET, "/v1/deployments", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // Room A with session and token: accepted, recorded under ana's name.
    let (s, _, d) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &with,
            Some(("application/json", deploy("A"))),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    assert_eq!(d["created_by"], "ana");
    let id = d["id"].as_i64().expect("id");
    let (s, _, _) = c
        .raw(
            Method::POST,
            &format!("/v1/deployments/{id}/cancel"),
            &with,
            None,
        )
        .await;
    assert_eq!(s, 200);

    // root (every room) may act on B; the API token too.
    let (_, cookie, v) = sign_in(&c, "root", "root-password-1").await;
    let root_session = cookie
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let root_csrf = v["csrf"].as_str().expect("csrf").to_owned();
    let (s, _, d) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &[("cookie", &root_session), ("x-csrf-token", &root_csrf)],
            Some(("application/json", deploy("B"))),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    let rid = d["id"].as_i64().expect("id");
    api.ok(Method::POST, &format!("/v1/deployments/{rid}/cancel"), None)
        .await;
    // ana cannot see root's deployment to B.
    let (s, _, _) = c
        .raw(
            Method::GET,
            &format!("/v1/deployments/{rid}"),
            &[("cookie", &session)],
            None,
        )
        .await;
    assert_eq!(s, 403);

    // One rights model for the console and the API (src/auth.rs): a
    // session is a principal there too. ana (limited to A) may not read the
    // lab's machine list or set any machine's boot through the API; root
    // (every room) may, and a write needs the session's CSRF token there
    // too.
    let (s, _, v) = c
        .raw(Method::GET, "/v1/clients", &[("cookie", &session)], None)
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, _, v) = c
        .raw(
            Method::PUT,
            "/v1/clients/52:54:00:e0:00:01/boot",
            &with,
            Some(("application/json", b"{\"mode\":\"local\"}".to_vec())),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, _, v) = c
        .raw(
            Method::GET,
            "/v1/clients",
            &[("cookie", &root_session)],
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = c
        .raw(
            Method::GET,
            "/v1/agents",
            &[("cookie", &root_session)],
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = c
        .raw(
            Method::PUT,
            "/v1/clients/52:54:00:e0:00:02/boot",
            &[("cookie", &root_session)],
            Some(("application/json", b"{\"mode\":\"local\"}".to_vec())),
        )
        .await;
    assert_eq!(s, 403, "no CSRF token: {v}");
    let (s, _, v) = c
        .raw(
            Method::PUT,
            "/v1/clients/52:54:00:e0:00:02/boot",
            &[("cookie", &root_session), ("x-csrf-token", &root_csrf)],
            Some(("application/json", b"{\"mode\":\"local\"}".to_vec())),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Agents' tokens and capture grants stay the API token's.
    let (s, _, v) = c
        .raw(
            Method::PUT,
            "/v1/clients/52:54:00:e0:00:02/capture",
            &[("cookie", &root_session), ("x-csrf-token", &root_csrf)],
            Some(("application/json", b"{\"image\":\"x\"}".to_vec())),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    // A wrong token is refused even with a good cookie beside it.
    let (s, _, _) = c
        .raw(
            Method::GET,
            "/v1/rooms",
            &[
                ("cookie", &root_session),
                ("authorization", "Bearer wrong-token-0123456789"),
            ],
            None,
        )
        .await;
    assert_eq!(s, 401);
    // The viewer token reads the console's lists for programs, every room,
    // and changes nothing.
    let viewer = format!("Bearer {VIEWER_TOKEN}");
    let (s, _, v) = c
        .raw(
            Method::GET,
            "/v1/rooms",
            &[("authorization", &viewer)],
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    let (s, _, v) = c
        .raw(
            Method::POST,
            "/v1/deployments",
            &[("authorization", &viewer)],
            Some(("application/json", deploy("A"))),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, _, v) = c
        .raw(
            Method::GET,
            &format!("/v1/deployments/{rid}"),
            &[("authorization", &viewer)],
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");

    // The log says who did what, including the refusals.
    let log = api.ok(Method::GET, "/v1/log", None).await;
    let lines: Vec<String> = log
        .as_array()
        .expect("log")
        .iter()
        .map(|e| {
            format!(
                "{}|{}|{}",
                e["who"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ana|deploy img|refused")),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l == "ana|deploy img|ok"), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l == "root|deploy img|ok"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ana|session.create|refused")),
        "{lines:#?}"
    );

    // Every documented route is routed (event streams are exercised by the
    // browser test).
    for (m, path) in aula_bootserver::console::ROUTES {
        if path.ends_with("/events") {
            continue;
        }
        let path = path
            .replace("{id}", "1")
            .replace("{mac}", "52:54:00:e0:00:01");
        let method: Method = m.parse().expect("method");
        let (s, _, v) = api
            .raw(
                method,
                &path,
                &[("authorization", &format!("Bearer {API_TOKEN}"))],
                Some(("application/json", b"{}".to_vec())),
            )
            .await;
        assert!(
            s != 405 && v["error"] != "no such route",
            "{m} {path}: {s} {v}"
        );
    }

    // Sign-out ends the session.
    let (s, h, _) = c.raw(Method::DELETE, "/v1/session", &with, None).await;
    assert_eq!(s, 200);
    assert!(h
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .contains("Max-Age=0"));
    let (s, _, _) = c
        .raw(Method::GET, "/v1/rooms", &[("cookie", &session)], None)
        .await;
    assert_eq!(s, 401);
}
