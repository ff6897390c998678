//! The boot server's state in SQLite: rooms, machines, deployments and
//! their per-machine rows, operator sessions, the command log, and the
//! registry (machines seen, boot modes, boot sessions, agents, capture
//! grants; `crate::state` keeps it in memory and writes its rows here).
//!
//! * One file, `<data_dir>/aula.db`, created `0600` in a `0700` directory,
//!   in WAL mode (readers never wait for the writer), `synchronous=NORMAL`
//!   (a power cut may lose the last transactions, never corrupt the file),
//!   foreign keys on.
//! * Versioned migrations ([`MIGRATIONS`]): `PRAGMA user_version` is the
//!   number applied; each migration runs in one transaction; a database
//!   newer than this binary is refused.
//! * No query runs on the async runtime: [`Db::call`] hands a closure to a
//!   blocking thread with one of a small pool of connections.

pub mod deployments;
pub mod log;
pub mod pg;
pub mod rooms;
pub mod sessions;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite said no.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no (the shared database; see [`pg`]).
    #[error("shared database: {}", pg::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The file or directory could not be prepared.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer Aula.
    #[error("database {path} is at schema version {found}; this aula-bootserver knows up to {known}: upgrade it")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: i64,
    },
    /// A stored value could not be decoded.
    #[error("stored value: {0}")]
    Decode(String),
    /// The blocking thread died.
    #[error("database worker failed")]
    Worker,
    /// The request conflicts with what is stored (a duplicate name or MAC).
    #[error("{0}")]
    Conflict(String),
    /// No such row.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Refused input.
    #[error("{0}")]
    Invalid(String),
}

impl DbError {
    /// Maps unique-constraint failures to [`DbError::Conflict`] with `what`.
    pub fn unique(e: rusqlite::Error, what: impl Into<String>) -> DbError {
        match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                DbError::Conflict(what.into())
            }
            _ => DbError::Sqlite(e),
        }
    }
}

/// The schema, one migration per entry; entry `i` takes the database from
/// version `i` to `i + 1`. Never edit an applied entry: append a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: rooms, machines, deployments, per-machine rows, sessions, command log.
    r#"
    CREATE TABLE rooms (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE COLLATE NOCASE,
        description TEXT NOT NULL DEFAULT '',
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE machines (
        id             INTEGER PRIMARY KEY,
        mac            TEXT NOT NULL UNIQUE,
        name           TEXT NOT NULL,
        room_id        INTEGER REFERENCES rooms(id) ON DELETE SET NULL,
        seat           INTEGER,
        expected_ip    TEXT,
        disk_layout    TEXT,
        image          TEXT,
        image_version  INTEGER,
        imaged_at      INTEGER,
        created_at     INTEGER NOT NULL
    );
    CREATE INDEX machines_by_room ON machines(room_id, seat, name);
    CREATE INDEX machines_by_image ON machines(image) WHERE image IS NOT NULL;
    CREATE TABLE deployments (
        id              INTEGER PRIMARY KEY,
        kind            TEXT NOT NULL,
        room_id         INTEGER REFERENCES rooms(id) ON DELETE SET NULL,
        image           TEXT NOT NULL,
        version         INTEGER,
        disk            INTEGER NOT NULL,
        partition       INTEGER,
        method          TEXT NOT NULL,
        layout          TEXT,
        after           TEXT NOT NULL,
        start_at        INTEGER,
        max_concurrent  INTEGER NOT NULL,
        state           TEXT NOT NULL,
        created_by      TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER,
        retry_of        INTEGER REFERENCES deployments(id) ON DELETE SET NULL,
        total           INTEGER NOT NULL,
        done            INTEGER NOT NULL DEFAULT 0,
        failed          INTEGER NOT NULL DEFAULT 0,
        cancelled       INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX deployments_active ON deployments(state) WHERE state IN ('scheduled', 'running');
    CREATE INDEX deployments_by_room ON deployments(room_id, id);
    CREATE TABLE deployment_machines (
        deployment_id  INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
        mac            TEXT NOT NULL,
        machine_id     INTEGER REFERENCES machines(id) ON DELETE SET NULL,
        name           TEXT NOT NULL,
        state          TEXT NOT NULL,
        reason         TEXT,
        bytes_done     INTEGER NOT NULL DEFAULT 0,
        bytes_total    INTEGER NOT NULL DEFAULT 0,
        rate_bps       REAL NOT NULL DEFAULT 0,
        updated_at     INTEGER NOT NULL,
        finished_at    INTEGER,
        run            TEXT NOT NULL,
        PRIMARY KEY (deployment_id, mac)
    ) WITHOUT ROWID;
    CREATE INDEX deployment_machines_by_mac ON deployment_machines(mac, deployment_id);
    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        user        TEXT NOT NULL,
        csrf        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_by_expiry ON sessions(expires_at);
    CREATE TABLE command_log (
        id       INTEGER PRIMARY KEY,
        at       INTEGER NOT NULL,
        who      TEXT NOT NULL,
        action   TEXT NOT NULL,
        target   TEXT NOT NULL,
        outcome  TEXT NOT NULL,
        detail   TEXT
    );
    CREATE INDEX command_log_by_who ON command_log(who, id);
    "#,
    // 2: the boot server's registry (was state.json): machines seen and
    // their boot settings and live boot sessions, bound agents, capture
    // grants; and a record of one-time imports.
    r#"
    CREATE TABLE clients (
        mac                TEXT PRIMARY KEY,
        firmware           TEXT,
        ip                 TEXT,
        hostname           TEXT,
        last_seen          INTEGER,
        boot_mode          TEXT,
        boot_once          TEXT,
        last_boot_mode     TEXT,
        last_boot_at       INTEGER,
        session_nonce      TEXT,
        session_source     TEXT,
        session_opened_at  INTEGER,
        session_bound      INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE agents (
        mac               TEXT PRIMARY KEY,
        macs              TEXT NOT NULL,
        ips               TEXT NOT NULL,
        hostname          TEXT,
        firmware          TEXT,
        agent_version     TEXT NOT NULL,
        token             TEXT,
        cert_fingerprint  TEXT NOT NULL,
        port              INTEGER NOT NULL,
        registered_at     INTEGER NOT NULL,
        source            TEXT
    ) WITHOUT ROWID;
    CREATE TABLE capture_grants (
        mac    TEXT PRIMARY KEY,
        image  TEXT NOT NULL,
        until  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE registry_imports (
        name  TEXT PRIMARY KEY,
        at    INTEGER NOT NULL,
        rows  INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this binary writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

struct Inner {
    path: PathBuf,
    conns: Mutex<Vec<Connection>>,
    slots: Semaphore,
}

/// A pool of connections to one database file, used from blocking threads.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// Connections in the pool: the runner, SSE ticks and requests share them;
/// SQLite in WAL mode lets readers run beside the one writer.
pub const POOL_SIZE: usize = 4;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DbError + 'a {
    move |source| DbError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn configure(conn: &Connection) -> Result<(), DbError> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Applies every migration the database lacks. Returns the versions
/// before and after.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(i64, i64), DbError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = schema_version();
    if found > known {
        return Err(DbError::TooNew {
            path: path.to_owned(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, path = %path.display(), "database migrated");
    }
    Ok((found, known))
}

impl Db {
    /// Opens (creating) `<dir>/aula.db`: the directory is made `0700`, the
    /// file `0600`, WAL mode, migrations applied.
    pub fn open(dir: &Path) -> Result<Db, DbError> {
        use std::os::unix::fs::PermissionsExt;
        crate::persist::private_dir(dir).map_err(|e| DbError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        })?;
        let path = dir.join("aula.db");
        // Create the file ourselves so it never exists with looser rights;
        // SQLite gives its -wal and -shm files the same mode.
        crate::persist::create_private(&path, false).map_err(io_err("creating", &path))?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(crate::persist::FILE_MODE),
        )
        .map_err(io_err("restricting", &path))?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let mut first = Connection::open_with_flags(&path, flags)?;
        let mode: String =
            first.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL mode");
        }
        configure(&first)?;
        migrate(&mut first, &path)?;
        let mut conns = vec![first];
        for _ in 1..POOL_SIZE {
            let c = Connection::open_with_flags(&path, flags)?;
            configure(&c)?;
            conns.push(c);
        }
        Ok(Db {
            inner: Arc::new(Inner {
                path,
                conns: Mutex::new(conns),
                slots: Semaphore::new(POOL_SIZE),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with a connection on a blocking thread.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let _permit = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|_| DbError::Worker)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_conn(f))
            .await
            .map_err(|_| DbError::Worker)?
    }

    /// Runs `f` with a connection on this thread (blocking code and tests
    /// only; never on the async runtime).
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&mut Connection) -> Result<T, DbError>,
    {
        self.inner.with_conn(f)
    }
}

impl Inner {
    fn with_conn<T, F>(&self, f: F) -> Result<T, DbError>
    where
        F: FnOnce(&mut Connection) -> Result<T, DbError>,
    {
        let conn = self.conns.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match conn {
            Some(c) => c,
            // More callers than pooled connections (call_blocking beside
            // call): open one more for this call.
            None => {
                let c = Connection::open(&self.path)?;
                configure(&c)?;
                c
            }
        };
        let r = f(&mut conn);
        let mut pool = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_SIZE {
            pool.push(conn);
        }
        r
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_creates_a_private_file_in_wal_mode_at_the_latest_version() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let db = Db::open(&data).expect("open");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(db.path()), 0o600);
        let (v, jm): (i64, String) = db
            .call_blocking(|c| {
                Ok((
                    c.pragma_query_value(None, "user_version", |r| r.get(0))?,
                    c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                ))
            })
            .expect("pragmas");
        assert_eq!(v, schema_version());
        assert_eq!(jm, "wal");
        drop(db);
        // Reopening applies nothing and keeps the data.
        let db = Db::open(&data).expect("reopen");
        let n: i64 = db
            .call_blocking(|c| Ok(c.query_row("SELECT count(*) FROM rooms", [], |r| r.get(0))?))
            .expect("count");
        assert_eq!(n, 0);
    }

    #[test]
    fn a_database_from_a_newer_aula_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path()).expect("open");
        db.call_blocking(|c| Ok(c.pragma_update(None, "user_version", schema_version() + 1)?))
            .expect("bump");
        drop(db);
        let e = Db::open(dir.path()).expect_err("newer schema");
        assert!(matches!(e, DbError::TooNew { .. }), "{e}");
    }
}
