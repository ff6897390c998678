//! The console in a real headless Chromium, driven over WebDriver
//! (chromedriver): sign in, deploy an image to a room of four real agents
//! from the deploy form (confirming what will be overwritten), watch every
//! progress bar reach done and the machine whose disk is too small show
//! its reason. Screenshots of the live deployment and the rooms view are
//! saved (into `bootserver/docs/` when `AULA_UPDATE_SCREENSHOTS=1`).
//! Needs root (a network namespace), `chromium` and `chromium-driver`.

mod deploy_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_support::*;
use hyper::Method;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    c: Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(tool).exists(),
                "{tool} is missing: apt-get install chromium chromium-driver (scripts/deps/apt-test.txt)"
            );
        }
        let port = free_port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let c = Client::new(&format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().expect("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--no-first-run",
                         "--disable-dev-shm-usage", "--window-size=1440,960", "--hide-scrollbars",
                         format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let (s, _, v) = c
            .raw(
                Method::POST,
                "/session",
                &[],
                Some(("application/json", caps.to_string().into_bytes())),
            )
            .await;
        assert_eq!(s, 200, "new WebDriver session: {v}");
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        Driver {
            child,
            c,
            session,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: Method, path: &str, body: Value) -> Value {
        let p = format!("/session/{}{path}", self.session);
        let body =
            (method != Method::GET).then(|| ("application/json", body.to_string().into_bytes()));
        let (s, _, v) = self.c.raw(method.clone(), &p, &[], body).await;
        assert_eq!(s, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", json!({ "url": url })).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let p = format!("/session/{}/element", self.session);
            let body = json!({"using": "css selector", "value": css})
                .to_string()
                .into_bytes();
            let (s, _, v) = self
                .c
                .raw(Method::POST, &p, &[], Some(("application/json", body)))
                .await;
            if s == 200 {
                return v["value"][ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("element id in {v}"))
                    .to_owned();
            }
            assert!(Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(Method::POST, &format!("/element/{e}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            Method::POST,
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// Waits until `script` returns something truthy; returns it.
    async fn wait_for(&self, script: &str, timeout: Duration, what: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            if Instant::now() > deadline {
                let shot = std::env::temp_dir().join("aula-console-timeout.png");
                self.screenshot(&shot).await;
                let html = self
                    .js("return document.getElementById('main').innerText")
                    .await;
                panic!(
                    "timed out waiting for {what}; screenshot {}; page: {html}",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A PNG of the page once its bars have stopped moving (the progress
    /// bars' width transitions), so the picture shows what the page says.
    async fn screenshot(&self, path: &std::path::Path) {
        let settle = Instant::now() + Duration::from_secs(3);
        while Instant::now() < settle {
            let running = self
                .js("return document.getAnimations().filter(a => a.playState === 'running').length")
                .await;
            if running == json!(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let b64 = self.cmd(Method::GET, "/screenshot", json!({})).await;
        let b64 = b64.as_str().expect("base64");
        let tmp = path.with_extension("b64");
        std::fs::write(&tmp, b64).expect("b64");
        let png = sh(Command::new("sh").arg("-c").arg(format!(
            "base64 -d {} > {} && echo ok",
            tmp.display(),
            path.display()
        )));
        assert_eq!(png.trim(), "ok");
        let _ = std::fs::remove_file(tmp);
        let bytes = std::fs::read(path).expect("png");
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is a PNG",
            path.display()
        );
    }
}

/// A room name as long as names may be (64 bytes), wider than a card.
const LONG_ROOM: &str = "Laboratorio de Informática Aplicada y Sistemas Embebidos, B-204";

/// Every room card's content stays inside the card: the name wraps onto
/// two lines at most (then an ellipsis; the card's title and the room's
/// page show it whole), the description keeps one line (ellipsis),
/// the Deploy button stays within the card's right edge; the top bar keeps
/// one line.
async fn assert_room_cards_and_top_bar_fit(d: &Driver) {
    let r = d
        .js(
            "return [...document.querySelectorAll('section.card[data-room]')].map(c => {
               const box = c.getBoundingClientRect();
               const h2 = c.querySelector('.room-title h2');
               const desc = c.querySelector('.room-desc');
               const btn = c.querySelector('.room-head > .btn').getBoundingClientRect();
               const lh = parseFloat(getComputedStyle(h2).lineHeight);
               return {name: h2.textContent,
                       overflow: c.scrollWidth > c.clientWidth,
                       name_lines: Math.round(h2.clientHeight / lh),
                       name_clipped: h2.scrollHeight > h2.clientHeight + 1,
                       desc_lines: Math.round(desc.clientHeight / parseFloat(getComputedStyle(desc).lineHeight)),
                       button_inside: btn.right <= box.right && btn.left >= box.left,
                       button_one_line: btn.height < 2 * lh};
             });",
        )
        .await;
    // The top bar keeps one line however many rooms the user has: menu
    // entries do not wrap, the user's rooms end in an ellipsis.
    let top = d
        .js("const nav = [...document.querySelectorAll('nav a')];
             const who = document.getElementById('whoami');
             const bar = document.querySelector('header.top');
             return {nav_one_line: nav.every(a => a.getBoundingClientRect().height < 40),
                     who_clipped: who.scrollWidth > who.clientWidth,
                     bar_overflow: bar.scrollWidth > bar.clientWidth};")
        .await;
    assert_eq!(top["nav_one_line"], true, "{top}");
    assert_eq!(top["bar_overflow"], false, "{top}");
    let cards = r.as_array().expect("cards");
    assert!(!cards.is_empty(), "{r}");
    for c in cards {
        assert_eq!(c["overflow"], false, "a card overflows: {c}");
        assert_eq!(c["button_inside"], true, "{c}");
        assert_eq!(c["button_one_line"], true, "{c}");
        assert_eq!(c["desc_lines"], 1, "{c}");
        let lines = c["name_lines"].as_i64().expect("lines");
        assert!((1..=2).contains(&lines), "{c}");
        if c["name"] == LONG_ROOM {
            assert_eq!(lines, 2, "the long name wraps onto two lines: {c}");
            assert_eq!(c["name_clipped"], true, "and ends in an ellipsis: {c}");
        } else {
            assert_eq!(c["name_clipped"], false, "a short name is whole: {c}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_signs_in_deploys_to_a_room_and_watches_it_finish_in_chromium() {
    if !in_netns("an_operator_signs_in_deploys_to_a_room_and_watches_it_finish_in_chromium") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    aula_bootserver::console::auth::add_user(
        &users,
        "tecnico",
        "aula-lab-2026",
        Some(vec!["Aula 3".into(), LONG_ROOM.into()]),
    )
    .expect("user");
    let server = ServerProc::start(
        &dir.path().join("server"),
        &format!("[console]\nusers_file = \"{}\"\n", users.display()),
    );
    let api = server.client();
    let files = vec![
        ("data/blob.bin", pseudo_random(5, 40 << 20)),
        ("etc/os-release", b"NAME=Lab\n".to_vec()),
    ];
    let src = ext4_image(dir.path(), 64, &files);
    upload(&server, &src, "lab-ubuntu-24.04", 1 << 20).await;
    api.ok(
        Method::POST,
        "/v1/rooms",
        Some(json!({"name": "Aula 3", "description": "second floor, 4 seats"})),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/rooms",
        Some(json!({"name": "Aula 4", "description": "library"})),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/rooms",
        Some(json!({"name": LONG_ROOM, "description": "Edificio Politécnico, planta 2, ala norte: 24 puestos con doble monitor y cabina de proyección"})),
    )
    .await;
    for i in 0..5u64 {
        api.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": format!("52:54:00:c0:05:{:02x}", i + 1), "name": format!("lab-sistemas-embebidos-pc{:02}", i + 1), "room": LONG_ROOM, "seat": i + 1})),
        )
        .await;
    }
    let layout = json!({"table": "mbr", "partitions": [
        {"number": 1, "type": "linux", "size": "16MiB", "filesystem": "ext4"},
        {"number": 2, "type": "linux", "size": "64MiB", "format": false}
    ]});
    let mut agents = Vec::new();
    // Images reach the agents at 12 MB/s in all, so the restores can be watched.
    let throttle = Throttle::start(server.https, 12_000_000).await;
    for i in 0..4u64 {
        let mac = format!("52:54:00:c0:03:{:02x}", i + 1);
        let disk = dir.path().join(format!("disk{i}.img"));
        let f = std::fs::File::create(&disk).expect("disk");
        f.set_len(if i == 2 { 64 * MIB } else { 128 * MIB })
            .expect("size");
        drop(f);
        api.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": mac, "name": format!("a3-pc{:02}", i + 1), "room": "Aula 3", "seat": i + 1,
                        "expected_ip": format!("10.0.3.{}", 11 + i), "disk_layout": layout})),
        )
        .await;
        agents.push(
            start_agent_via(
                &server,
                throttle.port,
                &dir.path().join(format!("agent{i}")),
                &mac,
                &disk,
            )
            .await,
        );
    }
    for i in 0..6u64 {
        api.ok(
            Method::POST,
            "/v1/machines",
            Some(json!({"mac": format!("52:54:00:c0:04:{:02x}", i + 1), "name": format!("a4-pc{:02}", i + 1), "room": "Aula 4", "seat": i + 1})),
        )
        .await;
    }
    wait_agents(&api, 4).await;

    let d = Driver::start().await;
    let base = server.https_base();
    d.goto(&format!("{base}/")).await;
    d.type_into("#user", "tecnico").await;
    d.type_into("#password", "aula-lab-2026").await;
    d.click("#signin button[type=submit]").await;
    d.wait_for(
        "return document.getElementById('whoami') && document.getElementById('whoami').textContent",
        Duration::from_secs(20),
        "the signed-in user",
    )
    .await;
    // Limited to Aula 3 and the long-named room: Aula 4 is not shown.
    let rooms = d
        .wait_for(
            "return document.querySelectorAll('section.card[data-room]').length",
            Duration::from_secs(20),
            "room cards",
        )
        .await;
    assert_eq!(rooms, 2);
    assert_room_cards_and_top_bar_fit(&d).await;

    d.goto(&format!("{base}/#/deploy?room=1")).await;
    d.find("#d-image option").await;
    d.js(
        "const s = document.getElementById('d-partition'); s.value = '2';
          document.getElementById('d-layout-mode').value = 'machine';
          document.getElementById('d-max').value = '2'; return true;",
    )
    .await;
    d.click("#review").await;
    let confirm = d
        .wait_for(
            "const b = document.querySelector('#confirm-box .confirm'); return b && b.textContent",
            Duration::from_secs(20),
            "the confirmation",
        )
        .await;
    let confirm = confirm.as_str().unwrap_or("").to_owned();
    assert!(confirm.contains("on 4 machine(s)"), "{confirm}");
    assert!(
        confirm.contains("a3-pc01") && confirm.contains("a3-pc04"),
        "{confirm}"
    );
    assert!(
        confirm.contains("partition 2 of disk 1"),
        "the confirmation names what is overwritten: {confirm}"
    );
    d.click("#confirm-deploy").await;
    d.wait_for(
        "return location.hash.startsWith('#/deployments/')",
        Duration::from_secs(20),
        "the deployment page",
    )
    .await;

    let shots = match std::env::var_os("AULA_UPDATE_SCREENSHOTS") {
        Some(_) => std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs"),
        None => dir.path().join("shots"),
    };
    std::fs::create_dir_all(&shots).expect("shots dir");
    // Mid-run: bars moving.
    let moving = d
        .wait_for(
            "return [...document.querySelectorAll('#dep-machines .progress')].some(p => p.dataset.state === 'restoring' && parseFloat(p.firstChild.style.width) > 35)",
            Duration::from_secs(60),
            "a restore in progress",
        )
        .await;
    assert_eq!(moving, json!(true));
    d.screenshot(&shots.join("console-deployment-live.png"))
        .await;
    let end = d
        .wait_for(
            "const p = [...document.querySelectorAll('#dep-machines .progress')];
             const done = p.filter(x => x.dataset.state === 'done' && parseFloat(x.firstChild.style.width) >= 99.9).length;
             const failed = p.filter(x => x.dataset.state === 'failed').length;
             return (p.length === 4 && done + failed === 4) ? {done, failed,
               reasons: [...document.querySelectorAll('#dep-machines .reason')].map(r => r.textContent),
               state: document.getElementById('dep-state').textContent,
               retry: !document.getElementById('retry').hidden} : null;",
            Duration::from_secs(180),
            "every machine to end",
        )
        .await;
    assert_eq!(end["done"], 3, "{end}");
    assert_eq!(end["failed"], 1, "{end}");
    assert_eq!(
        end["reasons"],
        json!(["disk 1 is 64 MiB, the layout needs 81 MiB"]),
        "{end}"
    );
    d.wait_for("return document.getElementById('dep-state').textContent === 'finished' && !document.getElementById('retry').hidden", Duration::from_secs(20), "the retry button").await;
    d.screenshot(&shots.join("console-deployment.png")).await;

    d.goto(&format!("{base}/#/rooms")).await;
    d.wait_for("return document.querySelectorAll('.tile.s-os, .tile.s-done').length >= 3 && document.querySelectorAll('.tile.s-failed').length === 1", Duration::from_secs(20), "room tiles").await;
    assert_room_cards_and_top_bar_fit(&d).await;
    d.screenshot(&shots.join("console-rooms.png")).await;

    let _ =
        d.c.raw(
            Method::DELETE,
            &format!("/session/{}", d.session),
            &[],
            None,
        )
        .await;
    drop(d);
    for a in agents {
        a.shutdown().await;
    }
}
