//! The console's queries at the size of a year of a large site: 50 rooms
//! (one of 200 machines), 50,000 deployments with 2,000,000 per-machine
//! rows, 200,000 command-log entries. Every query a page or an event
//! stream makes must answer in well under 100 ms; the figures are printed
//! as a `RESULT` line (`cargo test --test db_scale -- --nocapture`).

use std::time::Instant;

use aula_bootserver::db::{self, deployments as ddb, log, rooms, Db};
use rusqlite::params;

const ROOMS: i64 = 50;
const BIG_ROOM: i64 = 200;
const DEPLOYMENTS: i64 = 50_000;
const ROWS: i64 = 2_000_000;
const LOG: i64 = 200_000;

fn mac(n: i64) -> String {
    let b = n.to_be_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[4], b[5], b[6], b[7])
}

/// Median of 7 runs, in milliseconds.
fn time<T>(mut f: impl FnMut() -> T) -> f64 {
    let mut v: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[3]
}

#[test]
fn a_year_of_deployments_keeps_room_tables_and_lists_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
    let t0 = Instant::now();
    // Machines: room 1 has 200, the 49 others 44 each (2,356 in all).
    let machines: Vec<(i64, i64)> = db
        .call_blocking(|c| {
            let tx = c.transaction()?;
            let mut out = Vec::new();
            {
                let mut room = tx.prepare("INSERT INTO rooms (name, created_at) VALUES (?1, 0)")?;
                let mut m = tx.prepare(
                    "INSERT INTO machines (mac, name, room_id, seat, expected_ip, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                )?;
                let mut n = 0i64;
                for r in 1..=ROOMS {
                    room.execute([format!("Aula {r:02}")])?;
                    let count = if r == 1 { BIG_ROOM } else { 44 };
                    for s in 1..=count {
                        n += 1;
                        m.execute(params![mac(n), format!("a{r:02}-pc{s:03}"), r, s, format!("10.{r}.0.{s}")])?;
                        out.push((n, r));
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .expect("machines");
    // Deployments: each to one room (40 machines a deployment on average),
    // 3 % of machines failed.
    db.call_blocking(|c| {
        let tx = c.transaction()?;
        {
            let mut d = tx.prepare(
                "INSERT INTO deployments (kind, room_id, image, disk, partition, method, after, max_concurrent, state, \
                 created_by, created_at, started_at, finished_at, total, done, failed) \
                 VALUES ('restore', ?1, ?2, 1, 2, 'unicast', 'reboot-local', 0, 'finished', 'ana', ?3, ?3, ?3, ?4, ?4, 0)",
            )?;
            let mut dm = tx.prepare(
                "INSERT INTO deployment_machines (deployment_id, mac, machine_id, name, state, reason, bytes_done, bytes_total, \
                 rate_bps, updated_at, finished_at, run) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 0, ?8, ?8, '')",
            )?;
            let mut rows = 0i64;
            let per_room: Vec<Vec<i64>> = (1..=ROOMS)
                .map(|r| machines.iter().filter(|m| m.1 == r).map(|m| m.0).collect())
                .collect();
            for i in 1..=DEPLOYMENTS {
                let room = (i % ROOMS) + 1;
                let ms = &per_room[(room - 1) as usize];
                // Spread the rows so their total is ROWS.
                let want = ((ROWS - rows) / (DEPLOYMENTS - i + 1)).min(ms.len() as i64);
                let at = 1_700_000_000_000 + i * 600_000;
                d.execute(params![room, format!("img-{}", i % 7), at, want])?;
                let id = tx.last_insert_rowid();
                for (k, m) in ms.iter().take(want as usize).enumerate() {
                    let failed = (i + k as i64) % 33 == 0;
                    dm.execute(params![
                        id,
                        mac(*m),
                        m,
                        format!("pc{m}"),
                        if failed { "failed" } else { "done" },
                        failed.then_some("the restore made no progress for 10 min: check the network and the repository"),
                        8_000_000_000i64,
                        at
                    ])?;
                    rows += 1;
                }
            }
            assert_eq!(rows, ROWS);
            let mut l = tx.prepare(
                "INSERT INTO command_log (at, who, action, target, outcome) VALUES (?1, ?2, 'deploy img', ?3, 'ok')",
            )?;
            for i in 0..LOG {
                l.execute(params![i, if i % 5 == 0 { "ana" } else { "root" }, format!("room Aula {:02}", i % ROOMS)])?;
            }
        }
        tx.commit()?;
        Ok(())
    })
    .expect("history");
    // Machines remember their image.
    db.call_blocking(|c| {
        c.execute("UPDATE machines SET image = 'img-3', image_version = 4", [])?;
        c.execute("ANALYZE", [])?;
        Ok(())
    })
    .expect("images");
    let fill_s = t0.elapsed().as_secs_f64();
    let size_mib = std::fs::metadata(db.path()).expect("stat").len() as f64 / 1048576.0;

    let room_ms = time(|| {
        db.call_blocking(|c| rooms::room_machines(c, 1))
            .expect("room")
    });
    let n = db
        .call_blocking(|c| rooms::room_machines(c, 1))
        .expect("room");
    assert_eq!(n.len(), 200);
    let with_history = n.iter().filter(|m| m.last_deployment.is_some()).count();
    assert!(
        with_history >= 40,
        "latest deployment per machine: {with_history}"
    );
    let table_first = time(|| {
        db.call_blocking(|c| rooms::list_machines(c, &rooms::MachineFilter::default(), 0, 50))
            .expect("page")
    });
    let table_last = time(|| {
        db.call_blocking(|c| rooms::list_machines(c, &rooms::MachineFilter::default(), 1900, 50))
            .expect("page")
    });
    let search = time(|| {
        db.call_blocking(|c| {
            rooms::list_machines(
                c,
                &rooms::MachineFilter {
                    search: Some("pc1".into()),
                    ..Default::default()
                },
                0,
                50,
            )
        })
        .expect("search")
    });
    let all_tiles = time(|| {
        db.call_blocking(|c| rooms::list_machines(c, &rooms::MachineFilter::default(), 0, 1000))
            .expect("tiles")
    });
    let deps_first = time(|| {
        db.call_blocking(|c| ddb::list(c, None, None, 50))
            .expect("list")
    });
    let deps_deep = time(|| {
        db.call_blocking(|c| ddb::list(c, None, Some(1_000), 50))
            .expect("list")
    });
    let deps_scoped = time(|| {
        db.call_blocking(|c| ddb::list(c, Some(&[1, 2]), None, 50))
            .expect("list")
    });
    let dep_rows = time(|| {
        db.call_blocking(|c| ddb::machines(c, 49_950))
            .expect("rows")
    });
    let failed = time(|| {
        db.call_blocking(|c| ddb::failed_macs(c, 33))
            .expect("failed")
    });
    let log_first = time(|| {
        db.call_blocking(|c| log::list(c, None, None, 100))
            .expect("log")
    });
    let log_user = time(|| {
        db.call_blocking(|c| log::list(c, Some("ana"), Some(100_000), 100))
            .expect("log")
    });
    let images = time(|| {
        db.call_blocking(|c| ddb::machines_per_image(c))
            .expect("images")
    });
    let active = time(|| db.call_blocking(|c| ddb::active(c)).expect("active"));

    let figures = [
        ("room_200_ms", room_ms),
        ("machine_page_first_ms", table_first),
        ("machine_page_last_ms", table_last),
        ("machine_search_ms", search),
        ("tiles_1000_ms", all_tiles),
        ("deployments_page_ms", deps_first),
        ("deployments_deep_page_ms", deps_deep),
        ("deployments_scoped_ms", deps_scoped),
        ("deployment_rows_ms", dep_rows),
        ("failed_of_deployment_ms", failed),
        ("log_page_ms", log_first),
        ("log_user_page_ms", log_user),
        ("images_usage_ms", images),
        ("active_deployments_ms", active),
    ];
    let mut line = format!(
        "RESULT fill_s={fill_s:.1} db_mib={size_mib:.0} rows={ROWS} deployments={DEPLOYMENTS}"
    );
    for (k, v) in &figures {
        line.push_str(&format!(" {k}={v:.2}"));
    }
    println!("{line}");
    for (k, v) in figures {
        assert!(v < 100.0, "{k} took {v:.1} ms (limit 100 ms): {line}");
    }
    let _ = db::now_ms();
}
