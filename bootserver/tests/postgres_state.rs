//! The console's shared state on a real PostgreSQL (Debian's `postgresql`),
//! started by each test in a temporary directory as the unprivileged user
//! `nobody` (PostgreSQL refuses to run as root), listening on a loopback
//! port with password (SCRAM) authentication.
//!
//! Needs root (to start PostgreSQL as `nobody`) and PostgreSQL's server
//! binaries (`AULA_PG_BIN`, default /usr/lib/postgresql/15/bin): without
//! either the tests fail and say so; scripts/test installs `postgresql`
//! and runs as root.
//!
//! What they prove (at the database layer, `aula_bootserver::db::pg`):
//! two boot servers on one database migrate once and share rooms; a
//! deployment started through either console is carried out by the boot
//! server that serves its room; two servers never both hold a machine; a
//! server killed mid-deployment leaves the other unaffected, its machines
//! are not taken while its lease lives, and it resumes them where they
//! were when it restarts; a lease that expired is taken over and the old
//! holder can no longer write.

mod pg_support;

use std::time::Duration;

use aula_bootserver::db::pg::{pg_schema_version, Claim, PgDb};
use aula_bootserver::db::store::Store;
use aula_bootserver::db::{Db, DbError};
use aula_bootserver::mac::MacAddr;
use pg_support::Postgres;

fn mac(i: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0x19, 0x00, i])
}

const LONG: Duration = Duration::from_secs(600);

/// Rooms `a-room` (served by `a`) and `b-room` (served by `b`), four
/// machines each.
async fn two_rooms(db: &PgDb) -> (i64, i64) {
    let ra = db.create_room("a-room", Some("a")).await.expect("room a");
    let rb = db.create_room("b-room", Some("b")).await.expect("room b");
    for i in 0..4u8 {
        db.add_machine(ra, mac(i), &format!("a{i}"))
            .await
            .expect("machine");
        db.add_machine(rb, mac(0x80 + i), &format!("b{i}"))
            .await
            .expect("machine");
    }
    (ra, rb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boot_servers_on_one_database_migrate_once_and_share_rooms() {
    let pg = Postgres::start();
    let (sa, sb) = (pg.settings("a", LONG), pg.settings("b", LONG));
    let (a, b) = tokio::join!(PgDb::connect(&sa), PgDb::connect(&sb));
    let (a, b) = (a.expect("a connects"), b.expect("b connects"));
    // Both migrated concurrently: the later one found everything applied.
    assert_eq!(
        a.migrate().await.expect("migrate"),
        (pg_schema_version(), pg_schema_version())
    );
    let room = a.create_room("Lab 1", Some("a")).await.expect("room");
    // Names are unique regardless of case, across servers (as in SQLite).
    let e = b
        .create_room("LAB 1", Some("b"))
        .await
        .expect_err("duplicate");
    assert!(matches!(e, DbError::Conflict(_)), "{e}");
    b.add_machine(room, mac(1), "pc1")
        .await
        .expect("b adds to a's room");
    let e = a
        .add_machine(room, mac(1), "pc1 again")
        .await
        .expect_err("dup mac");
    assert!(matches!(e, DbError::Conflict(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_started_through_either_console_is_run_by_the_server_of_its_room() {
    let pg = Postgres::start();
    let a = PgDb::connect(&pg.settings("a", LONG)).await.expect("a");
    let b = PgDb::connect(&pg.settings("b", LONG)).await.expect("b");
    let (ra, rb) = two_rooms(&a).await;
    // Each console starts a deployment on the other's room.
    let on_b = a
        .start_restore(rb, "win11", "alice")
        .await
        .expect("a starts");
    let on_a = b
        .start_restore(ra, "ubuntu", "bob")
        .await
        .expect("b starts");
    assert_eq!(a.deployments_to_run().await.expect("a runs"), vec![on_a]);
    assert_eq!(b.deployments_to_run().await.expect("b runs"), vec![on_b]);
    // A room nobody serves is refused with a clear error, nothing stored.
    let orphan = a.create_room("orphan", None).await.expect("room");
    a.add_machine(orphan, mac(0x40), "o")
        .await
        .expect("machine");
    let e = b
        .start_restore(orphan, "x", "bob")
        .await
        .expect_err("no server");
    assert!(e.to_string().contains("no boot server"), "{e}");
    assert_eq!(b.deployments_to_run().await.expect("b runs"), vec![on_b]);
    // Reassigning the room moves later deployments, not running ones.
    a.set_room_server(orphan, "b").await.expect("assign");
    let later = a.start_restore(orphan, "x", "alice").await.expect("start");
    assert_eq!(
        b.deployments_to_run().await.expect("b runs"),
        vec![on_b, later]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_racing_for_the_same_machines_never_both_hold_one() {
    let pg = Postgres::start();
    let a = PgDb::connect(&pg.settings("a", LONG)).await.expect("a");
    let b = PgDb::connect(&pg.settings("b", LONG)).await.expect("b");
    let (ra, _) = two_rooms(&a).await;
    let dep = a.start_restore(ra, "img", "alice").await.expect("start");
    // A misconfiguration: both think they serve the room and race for
    // all its machines at once.
    let race = |db: PgDb| async move {
        let mut won = Vec::new();
        for i in 0..4u8 {
            if db.claim(dep, mac(i)).await.expect("claim") == Claim::Granted {
                won.push(i);
            }
        }
        won
    };
    let (wa, wb) = tokio::join!(tokio::spawn(race(a.clone())), tokio::spawn(race(b.clone())));
    let (wa, wb) = (wa.expect("join"), wb.expect("join"));
    let mut all: Vec<u8> = wa.iter().chain(&wb).copied().collect();
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2, 3], "a won {wa:?}, b won {wb:?}");
    for i in 0..4u8 {
        let (holder, other, name) = if wa.contains(&i) {
            (&a, &b, "a")
        } else {
            (&b, &a, "b")
        };
        match other.claim(dep, mac(i)).await.expect("claim") {
            Claim::HeldBy {
                server, deployment, ..
            } => {
                assert_eq!((server.as_str(), deployment), (name, dep))
            }
            Claim::Granted => panic!("machine {i} granted twice"),
        }
        // Only the holder's progress is written.
        assert!(holder
            .set_machine_state(dep, mac(i), "restoring", 10)
            .await
            .expect("write"));
        assert!(!other
            .set_machine_state(dep, mac(i), "failed", 0)
            .await
            .expect("write"));
        assert_eq!(
            a.machine_state(dep, mac(i)).await.expect("state"),
            "restoring"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_the_other_unaffected_and_resumes_where_it_was() {
    let pg = Postgres::start();
    let a = PgDb::connect(&pg.settings("a", LONG)).await.expect("a");
    let b = PgDb::connect(&pg.settings("b", LONG)).await.expect("b");
    let (ra, rb) = two_rooms(&a).await;
    let da = a.start_restore(ra, "img", "alice").await.expect("start a");
    let db_ = b.start_restore(rb, "img", "bob").await.expect("start b");
    for i in 0..4u8 {
        assert_eq!(a.claim(da, mac(i)).await.expect("claim"), Claim::Granted);
        assert_eq!(
            b.claim(db_, mac(0x80 + i)).await.expect("claim"),
            Claim::Granted
        );
    }
    // a is mid-deployment: two machines restoring, one done.
    a.set_machine_state(da, mac(0), "done", 100)
        .await
        .expect("w");
    a.release(mac(0)).await.expect("release");
    a.set_machine_state(da, mac(1), "restoring", 40)
        .await
        .expect("w");
    a.set_machine_state(da, mac(2), "restoring", 70)
        .await
        .expect("w");
    // a is killed: its connection drops without a word.
    drop(a);
    // b carries on with its own room: heartbeats renew its 4 claims only,
    // its writes go through.
    assert_eq!(b.heartbeat().await.expect("heartbeat"), 4);
    for i in 0..4u8 {
        assert!(b
            .set_machine_state(db_, mac(0x80 + i), "restoring", 5)
            .await
            .expect("b writes"));
    }
    // b cannot take a's machines while a's lease lives.
    for i in 1..4u8 {
        match b.claim(da, mac(i)).await.expect("claim") {
            Claim::HeldBy { server, .. } => assert_eq!(server, "a"),
            Claim::Granted => panic!("b took machine {i} from a live lease"),
        }
    }
    // a restarts with the same id: it finds its own claims and resumes
    // each machine where it was.
    let a = PgDb::connect(&pg.settings("a", LONG))
        .await
        .expect("a again");
    let mine = a.my_claims().await.expect("claims");
    let macs: Vec<MacAddr> = mine.iter().map(|c| c.mac).collect();
    assert_eq!(macs, vec![mac(1), mac(2), mac(3)]);
    assert!(mine.iter().all(|c| c.deployment == da));
    assert_eq!(a.deployments_to_run().await.expect("runs"), vec![da]);
    let states = [
        a.machine_state(da, mac(0)).await.expect("s"),
        a.machine_state(da, mac(1)).await.expect("s"),
        a.machine_state(da, mac(2)).await.expect("s"),
        a.machine_state(da, mac(3)).await.expect("s"),
    ];
    assert_eq!(states, ["done", "restoring", "restoring", "pending"]);
    for c in &mine {
        assert_eq!(a.claim(da, c.mac).await.expect("reclaim"), Claim::Granted);
        assert!(a
            .set_machine_state(da, c.mac, "done", 100)
            .await
            .expect("a writes"));
    }
    // b was never disturbed.
    assert_eq!(b.my_claims().await.expect("b claims").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_its_old_holder_can_no_longer_write() {
    let pg = Postgres::start();
    let short = Duration::from_millis(300);
    let a = PgDb::connect(&pg.settings("a", short)).await.expect("a");
    let b = PgDb::connect(&pg.settings("b", short)).await.expect("b");
    let (ra, _) = two_rooms(&a).await;
    let dep = a.start_restore(ra, "img", "alice").await.expect("start");
    assert_eq!(a.claim(dep, mac(0)).await.expect("claim"), Claim::Granted);
    // Heartbeats keep it.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(a.heartbeat().await.expect("hb"), 1);
        assert!(matches!(
            b.claim(dep, mac(0)).await.expect("claim"),
            Claim::HeldBy { .. }
        ));
    }
    // a stops beating (hung, partitioned): after the lease, b may take over.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(b.claim(dep, mac(0)).await.expect("claim"), Claim::Granted);
    assert!(!a
        .set_machine_state(dep, mac(0), "restoring", 1)
        .await
        .expect("fenced"));
    assert!(a.my_claims().await.expect("claims").is_empty());
    assert!(!a.release(mac(0)).await.expect("release"));
    assert!(b
        .set_machine_state(dep, mac(0), "restoring", 1)
        .await
        .expect("b writes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gives_a_clear_error_without_the_password() {
    let pg = Postgres::start();
    let s = pg.settings("a", LONG);
    let pw = s.password_file.clone().expect("file");
    std::fs::write(&pw, "not-the-password\n").expect("write");
    let e = PgDb::connect(&s).await.expect_err("wrong password");
    let text = format!("{e}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
}

/// Recursively drops what legitimately differs between the two backends
/// (the boot server a shared row names) and zeroes times (ms since the
/// epoch: every integer above 10^12).
fn comparable(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, _)| k != "server")
                .map(|(k, v)| (k, comparable(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(comparable).collect()),
        Value::Number(n) if n.as_i64().is_some_and(|i| i > 1_000_000_000_000) => Value::from(0),
        other => other,
    }
}

/// Runs one console session against `store`; returns every answer.
async fn console_session(store: &Store) -> Vec<serde_json::Value> {
    use aula_bootserver::db::deployments::{DeploymentState, NewDeployment};
    use aula_bootserver::db::rooms::{MachineFilter, MachineInput, MachinePatch};
    use aula_bootserver::deploy::machine::{After, Kind, Phase, Run};
    use serde_json::json;
    let mut out = Vec::new();
    let mut put = |v: serde_json::Value| out.push(comparable(v));
    let room = store
        .create_room("Aula 1".into(), "first floor".into(), None)
        .await
        .expect("room");
    put(json!(room));
    let csv = "name,mac,room,ip,seat\n\
               pc02,52:54:00:00:01:02,Aula 1,10.0.1.12,2\n\
               pc01,52:54:00:00:01:01,Aula 1,10.0.1.11,1\n\
               pc_x,52:54:00:00:02:01,Aula 2,,1\n\
               lone,52:54:00:00:09:01,,,\n";
    put(json!(store
        .import_text(csv.into(), false)
        .await
        .expect("import")));
    put(json!(store.list_rooms(None).await.expect("rooms")));
    let m = store
        .create_machine(MachineInput {
            mac: "52:54:00:00:01:03".parse().expect("mac"),
            name: Some("pc03".into()),
            room_id: Some(room.id),
            seat: Some(3),
            ..Default::default()
        })
        .await
        .expect("machine");
    put(json!(m));
    for f in [
        MachineFilter::default(),
        MachineFilter {
            room_id: Some(room.id),
            ..Default::default()
        },
        MachineFilter {
            unassigned: true,
            ..Default::default()
        },
        MachineFilter {
            search: Some("PC_".into()),
            ..Default::default()
        },
        MachineFilter {
            search: Some("10.0.1.1".into()),
            scope: Some(vec![room.id]),
            ..Default::default()
        },
    ] {
        put(json!(store.list_machines(f, 1, 2).await.expect("page")));
    }
    let lone = store
        .find_machine("lone".into())
        .await
        .expect("find")
        .expect("lone");
    put(json!(store
        .patch_machine(
            lone.id,
            MachinePatch {
                room_id: Some(room.id),
                seat: Some(9),
                ..Default::default()
            },
        )
        .await
        .expect("patch")));
    put(json!(store
        .find_machine("52-54-00-00-01-01".into())
        .await
        .expect("find")));
    // A deployment of the room, its runs, its end.
    let machines = store.room_machines(room.id).await.expect("room machines");
    let dep = store
        .insert_deployment(NewDeployment {
            kind: Kind::Restore,
            room_id: Some(room.id),
            image: "lab".into(),
            version: Some(3),
            disk: 1,
            partition: Some(2),
            method: "unicast".into(),
            layout: None,
            after: After::RebootLocal,
            start_at: None,
            max_concurrent: 2,
            created_by: "ana".into(),
            retry_of: None,
            machines: machines
                .iter()
                .map(|m| (m.mac, Some(m.id), m.name.clone()))
                .collect(),
        })
        .await
        .expect("deployment");
    put(json!(dep));
    let mut runs = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        assert_eq!(
            store.claim(dep.id, m.mac).await.expect("claim"),
            Claim::Granted
        );
        let mut run = Run::new(format!("d{}-{i}", dep.id), 0);
        run.phase = if i == 0 { Phase::Failed } else { Phase::Done };
        run.reason = (i == 0).then(|| "the disk is too small".to_owned());
        run.bytes_done = 1000 * i as u64;
        runs.push((m.mac, run, Some(1_700_000_000_000)));
    }
    store
        .save_runs(vec![(dep.id, runs)])
        .await
        .expect("save runs");
    let (d, ms) = store
        .deployment_with_machines(dep.id)
        .await
        .expect("with machines");
    put(json!([d, ms]));
    put(json!(store
        .deployment_failed(dep.id)
        .await
        .expect("failed")));
    let restored: Vec<_> = machines
        .iter()
        .skip(1)
        .map(|m| (m.mac, 1_700_000_000_000))
        .collect();
    put(json!(store
        .end_deployment(
            dep.id,
            DeploymentState::Finished,
            restored,
            "lab".into(),
            Some(3)
        )
        .await
        .expect("end")));
    put(json!(
        store
            .deployment_with_machines(dep.id)
            .await
            .expect("after end")
            .1
    ));
    put(json!(store
        .list_deployments(Some(vec![room.id]), None, 10)
        .await
        .expect("list")));
    put(json!(store.machines_per_image().await.expect("per image")));
    put(json!(store
        .room_with_machines(room.id)
        .await
        .expect("room")));
    // Sessions and the command log.
    let s = store
        .create_session("secret-1".into(), "ana".into(), "csrf-1".into(), 60_000)
        .await
        .expect("session");
    put(json!([s.user, s.csrf]));
    let found = store
        .lookup_session("secret-1".into())
        .await
        .expect("lookup")
        .expect("live");
    put(json!([found.user, found.csrf]));
    assert!(store
        .lookup_session("secret-2".into())
        .await
        .expect("lookup")
        .is_none());
    let list = store.list_sessions(Some("ana".into())).await.expect("list");
    put(json!(list));
    assert!(store
        .revoke_session(list[0].id.clone())
        .await
        .expect("revoke"));
    put(json!(store.list_sessions(None).await.expect("list")));
    for i in 0..3 {
        store
            .log_append(
                "ana".into(),
                "room.create".into(),
                format!("room {i}"),
                "ok".into(),
                (i == 1).then(|| "detail".to_owned()),
            )
            .await
            .expect("log");
    }
    put(json!(store
        .log_list(Some("ana".into()), None, 2)
        .await
        .expect("log")));
    put(json!(store
        .room_ids(vec!["aula 1".into(), "nope".into()])
        .await
        .expect("ids")));
    // Refusals come last: PostgreSQL spends an id on a refused insert
    // (sequences are not transactional), SQLite does not.
    let e = store
        .create_room("AULA 1".into(), String::new(), None)
        .await
        .expect_err("same name, other case");
    assert!(matches!(e, DbError::Conflict(_)), "{e}");
    put(json!(e.to_string()));
    // A bad line refuses the whole import.
    let bad = "name,mac,room\nok,52:54:00:00:03:01,Aula 3\nbad,01:00:5e:00:00:01,Aula 3\n";
    let e = store
        .import_text(bad.into(), false)
        .await
        .expect_err("multicast MAC");
    put(json!(e.to_string()));
    put(json!(store
        .list_rooms(None)
        .await
        .expect("rooms unchanged")));
    let e = store
        .create_machine(MachineInput {
            mac: m.mac,
            ..Default::default()
        })
        .await
        .expect_err("same MAC");
    put(json!(e.to_string()));
    store.delete_machine(m.id).await.expect("delete machine");
    store.delete_room(room.id).await.expect("delete room");
    put(json!(store
        .list_machines(MachineFilter::default(), 0, 100)
        .await
        .expect("all")));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_store_answers_the_same_on_postgresql_as_on_sqlite() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Store::Local(Db::open(dir.path()).expect("sqlite"));
    let shared = Store::Shared(PgDb::connect(&pg.settings("a", LONG)).await.expect("pg"));
    let want = console_session(&local).await;
    let got = console_session(&shared).await;
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "answer {i} differs:\nsqlite:   {w}\npostgres: {g}");
    }
    // What sharing adds: the room and the deployment name the server.
    let rooms = shared.list_rooms(None).await.expect("rooms");
    assert!(
        rooms.iter().all(|r| r.server.as_deref() == Some("a")),
        "{rooms:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_goes_to_its_rooms_server_machines_of_two_servers_are_refused_and_a_held_machine_is_not_written(
) {
    use aula_bootserver::db::deployments::NewDeployment;
    use aula_bootserver::deploy::machine::{After, Kind};
    let pg = Postgres::start();
    let a = Store::Shared(PgDb::connect(&pg.settings("a", LONG)).await.expect("a"));
    let b = Store::Shared(PgDb::connect(&pg.settings("b", LONG)).await.expect("b"));
    let rb = a
        .create_room("b-room".into(), String::new(), Some("b".into()))
        .await
        .expect("room of b");
    let ra = b
        .create_room("a-room".into(), String::new(), Some("a".into()))
        .await
        .expect("room of a");
    let mut ids = Vec::new();
    for (i, room) in [(1u8, &ra), (2, &rb)] {
        let m = a
            .create_machine(aula_bootserver::db::rooms::MachineInput {
                mac: MacAddr([0x52, 0x54, 0, 0x20, 0, i]),
                room_id: Some(room.id),
                ..Default::default()
            })
            .await
            .expect("machine");
        ids.push((m.mac, Some(m.id), m.name));
    }
    let new = |room: Option<i64>, machines: Vec<(MacAddr, Option<i64>, String)>| NewDeployment {
        kind: Kind::Restore,
        room_id: room,
        image: "lab".into(),
        version: None,
        disk: 1,
        partition: None,
        method: "unicast".into(),
        layout: None,
        after: After::Stay,
        start_at: None,
        max_concurrent: 0,
        created_by: "ana".into(),
        retry_of: None,
        machines,
    };
    // Started through a's console for b's room: b carries it out.
    let d = a
        .insert_deployment(new(Some(rb.id), vec![ids[1].clone()]))
        .await
        .expect("deployment");
    assert_eq!(d.server.as_deref(), Some("b"));
    assert_eq!(b.deployments_to_run().await.expect("b runs"), vec![d.id]);
    assert!(a.deployments_to_run().await.expect("a runs").is_empty());
    // Machines of rooms of two servers in one deployment: refused, nothing stored.
    let e = a
        .insert_deployment(new(None, ids.clone()))
        .await
        .expect_err("two servers");
    assert!(e.to_string().contains("different boot servers"), "{e}");
    let all = a.list_deployments(None, None, 10).await.expect("list");
    assert_eq!(all.len(), 1);
    // A room handed to another server: its next deployment goes there.
    a.update_room(rb.id, None, None, Some("a".into()))
        .await
        .expect("hand over");
    let d2 = b
        .insert_deployment(new(Some(rb.id), vec![ids[1].clone()]))
        .await
        .expect("deployment");
    assert_eq!(d2.server.as_deref(), Some("a"));
    // The machine is still claimed by nobody: b's deployment, a's; whoever
    // claims first holds it, the other waits.
    assert_eq!(
        b.claim(d.id, ids[1].0).await.expect("claim"),
        Claim::Granted
    );
    assert!(matches!(
        a.claim(d2.id, ids[1].0).await.expect("claim"),
        Claim::HeldBy { .. }
    ));
    // While b holds it, a's writes about the machine change nothing.
    let mut run = aula_bootserver::deploy::machine::Run::new("x", 0);
    run.phase = aula_bootserver::deploy::machine::Phase::Restoring;
    a.save_runs(vec![(d2.id, vec![(ids[1].0, run.clone(), None)])])
        .await
        .expect("save");
    let (_, ms) = a.deployment_with_machines(d2.id).await.expect("d2");
    assert_eq!(
        ms[0].run.phase,
        aula_bootserver::deploy::machine::Phase::Pending
    );
    // Once b gives it up, a claims it and its writes land.
    b.release(ids[1].0).await.expect("release");
    assert_eq!(
        a.claim(d2.id, ids[1].0).await.expect("claim"),
        Claim::Granted
    );
    a.save_runs(vec![(d2.id, vec![(ids[1].0, run, None)])])
        .await
        .expect("save");
    let (_, ms) = a.deployment_with_machines(d2.id).await.expect("d2");
    assert_eq!(
        ms[0].run.phase,
        aula_bootserver::deploy::machine::Phase::Restoring
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_database_is_reconnected_and_keeps_the_state() {
    let pg = Postgres::start();
    let store = Store::Shared(PgDb::connect(&pg.settings("a", LONG)).await.expect("a"));
    store
        .create_room("Aula 1".into(), String::new(), None)
        .await
        .expect("room");
    pg.restart();
    // The call that finds the connection cut may fail; the next reconnects.
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(store.list_rooms(None).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = answers
        .pop()
        .expect("two answers")
        .expect("reconnected after the restart");
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].name, "Aula 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_with_the_same_id_is_refused_while_the_first_is_connected() {
    let pg = Postgres::start();
    let a = PgDb::connect(&pg.settings("a", LONG)).await.expect("a");
    let t = std::time::Instant::now();
    let e = PgDb::connect(&pg.settings("a", LONG))
        .await
        .expect_err("same id twice");
    assert!(matches!(e, DbError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("server_id"), "{e}");
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "it waited for the first to go"
    );
    // Another id connects at once; the same id once the first is gone.
    PgDb::connect(&pg.settings("b", LONG)).await.expect("b");
    drop(a);
    PgDb::connect(&pg.settings("a", LONG))
        .await
        .expect("a again after the first left");
}
