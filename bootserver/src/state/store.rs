//! The registry's rows in SQLite (`aula.db`, migration 2): one row per
//! machine in `clients` (sightings, boot setting, last boot served, the
//! live boot session), one per bound agent in `agents` (keyed by the
//! machine's MAC), one per capture grant in `capture_grants`.
//!
//! The registry keeps its maps in memory as the read path; this module
//! loads them at start, writes the rows that changed, and imports a
//! `state.json` left by an older Aula once.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;

use super::{AgentRecord, BootSession, BootSetting, CaptureGrant, ClientRecord, StateError};
use crate::config::BootMode;
use crate::db::DbError;
use crate::mac::MacAddr;

/// What the tables hold.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Snapshot {
    #[serde(default)]
    pub clients: BTreeMap<MacAddr, ClientRecord>,
    #[serde(default)]
    pub agents: BTreeMap<MacAddr, AgentRecord>,
    #[serde(skip)]
    pub grants: HashMap<MacAddr, CaptureGrant>,
}

/// Rows to write: `None` deletes.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub clients: Vec<(MacAddr, Option<ClientRecord>)>,
    pub agents: Vec<(MacAddr, Option<AgentRecord>)>,
    pub grants: Vec<(MacAddr, Option<CaptureGrant>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.agents.is_empty() && self.grants.is_empty()
    }

    pub fn len(&self) -> usize {
        self.clients.len() + self.agents.len() + self.grants.len()
    }
}

fn decode(what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Decode(format!("{what}: {e}"))
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: Option<i64>) -> Option<u64> {
    v.and_then(|x| u64::try_from(x).ok())
}

fn mode_str(m: BootMode) -> &'static str {
    match m {
        BootMode::Live => "live",
        BootMode::Local => "local",
    }
}

fn mode_of(s: Option<String>) -> Result<Option<BootMode>, DbError> {
    match s.as_deref() {
        None => Ok(None),
        Some("live") => Ok(Some(BootMode::Live)),
        Some("local") => Ok(Some(BootMode::Local)),
        Some(other) => Err(decode("boot mode", other)),
    }
}

fn parsed<T: std::str::FromStr>(what: &str, s: Option<String>) -> Result<Option<T>, DbError>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| s.parse::<T>().map_err(|e| decode(what, e)))
        .transpose()
}

/// Reads every row (grants that have expired are left out).
pub(super) fn load(c: &Connection, now: u64) -> Result<Snapshot, DbError> {
    let mut snap = Snapshot::default();
    let mut st = c.prepare(
        "SELECT mac, firmware, ip, hostname, last_seen, boot_mode, boot_once, last_boot_mode, \
         last_boot_at, session_nonce, session_source, session_opened_at, session_bound FROM clients",
    )?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let mac: MacAddr = r
            .get::<_, String>(0)?
            .parse()
            .map_err(|e| decode("mac", e))?;
        let firmware = r
            .get::<_, Option<String>>(1)?
            .map(|f| serde_json::from_str(&f).map_err(|e| decode("firmware", e)))
            .transpose()?;
        let last_boot = match (mode_of(r.get(7)?)?, uint(r.get(8)?)) {
            (Some(m), Some(at)) => Some((m, at)),
            _ => None,
        };
        let session = match (
            r.get::<_, Option<String>>(9)?,
            parsed::<IpAddr>("session source", r.get(10)?)?,
            uint(r.get(11)?),
        ) {
            (Some(nonce), Some(source), Some(opened_at)) => Some(BootSession {
                nonce,
                source,
                opened_at,
                bound: r.get::<_, i64>(12)? != 0,
            }),
            _ => None,
        };
        snap.clients.insert(
            mac,
            ClientRecord {
                firmware,
                ip: parsed::<Ipv4Addr>("ip", r.get(2)?)?,
                hostname: r.get(3)?,
                last_seen: uint(r.get(4)?),
                boot: BootSetting {
                    mode: mode_of(r.get(5)?)?,
                    once: mode_of(r.get(6)?)?,
                },
                last_boot,
                session,
            },
        );
    }
    let mut st = c.prepare(
        "SELECT mac, macs, ips, hostname, firmware, agent_version, token, cert_fingerprint, port, \
         registered_at, source FROM agents",
    )?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let mac: MacAddr = r
            .get::<_, String>(0)?
            .parse()
            .map_err(|e| decode("mac", e))?;
        let macs: Vec<MacAddr> =
            serde_json::from_str(&r.get::<_, String>(1)?).map_err(|e| decode("agent macs", e))?;
        let ips: Vec<IpAddr> =
            serde_json::from_str(&r.get::<_, String>(2)?).map_err(|e| decode("agent ips", e))?;
        snap.agents.insert(
            mac,
            AgentRecord {
                macs,
                ips,
                hostname: r.get(3)?,
                firmware: r.get(4)?,
                agent_version: r.get(5)?,
                token: r.get(6)?,
                cert_fingerprint: r.get(7)?,
                port: u16::try_from(r.get::<_, i64>(8)?).map_err(|e| decode("agent port", e))?,
                registered_at: uint(r.get(9)?).unwrap_or(0),
                source: parsed::<IpAddr>("agent source", r.get(10)?)?,
            },
        );
    }
    let mut st = c.prepare("SELECT mac, image, until FROM capture_grants WHERE until > ?1")?;
    let mut rows = st.query([int(now)])?;
    while let Some(r) = rows.next()? {
        let mac: MacAddr = r
            .get::<_, String>(0)?
            .parse()
            .map_err(|e| decode("mac", e))?;
        snap.grants.insert(
            mac,
            CaptureGrant {
                image: r.get(1)?,
                until: uint(r.get(2)?).unwrap_or(0),
            },
        );
    }
    Ok(snap)
}

fn put_client(c: &Connection, mac: MacAddr, rec: &ClientRecord) -> Result<(), DbError> {
    let firmware = rec
        .firmware
        .map(|f| serde_json::to_string(&f).map_err(|e| decode("firmware", e)))
        .transpose()?;
    let s = rec.session.as_ref();
    c.prepare_cached(
        "INSERT OR REPLACE INTO clients (mac, firmware, ip, hostname, last_seen, boot_mode, \
         boot_once, last_boot_mode, last_boot_at, session_nonce, session_source, session_opened_at, \
         session_bound) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        mac.to_string(),
        firmware,
        rec.ip.map(|i| i.to_string()),
        rec.hostname,
        rec.last_seen.map(int),
        rec.boot.mode.map(mode_str),
        rec.boot.once.map(mode_str),
        rec.last_boot.map(|(m, _)| mode_str(m)),
        rec.last_boot.map(|(_, at)| int(at)),
        s.map(|s| s.nonce.as_str()),
        s.map(|s| s.source.to_string()),
        s.map(|s| int(s.opened_at)),
        s.is_some_and(|s| s.bound),
    ])?;
    Ok(())
}

fn put_agent(c: &Connection, mac: MacAddr, a: &AgentRecord) -> Result<(), DbError> {
    let macs = serde_json::to_string(&a.macs).map_err(|e| decode("agent macs", e))?;
    let ips = serde_json::to_string(&a.ips).map_err(|e| decode("agent ips", e))?;
    c.prepare_cached(
        "INSERT OR REPLACE INTO agents (mac, macs, ips, hostname, firmware, agent_version, token, \
         cert_fingerprint, port, registered_at, source) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        mac.to_string(),
        macs,
        ips,
        a.hostname,
        a.firmware,
        a.agent_version,
        a.token,
        a.cert_fingerprint,
        i64::from(a.port),
        int(a.registered_at),
        a.source.map(|s| s.to_string()),
    ])?;
    Ok(())
}

/// Writes `batch` in one transaction. `durable`: the commit reaches the
/// disk before this returns (`synchronous=FULL`: the WAL is synced), as
/// the answers that follow it promise (a one-shot mode consumed, a
/// registration bound); otherwise the database's `NORMAL` (a power cut
/// may lose the last sightings, never corrupt the file).
pub(super) fn write(c: &mut Connection, batch: &Batch, durable: bool) -> Result<(), DbError> {
    if durable {
        c.pragma_update(None, "synchronous", "FULL")?;
    }
    let r = (|| {
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (mac, rec) in &batch.clients {
            match rec {
                Some(rec) => put_client(&tx, *mac, rec)?,
                None => {
                    tx.execute("DELETE FROM clients WHERE mac = ?1", [mac.to_string()])?;
                }
            }
        }
        for (mac, rec) in &batch.agents {
            match rec {
                Some(a) => put_agent(&tx, *mac, a)?,
                None => {
                    tx.execute("DELETE FROM agents WHERE mac = ?1", [mac.to_string()])?;
                }
            }
        }
        for (mac, g) in &batch.grants {
            match g {
                Some(g) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO capture_grants (mac, image, until) VALUES (?1, ?2, ?3)",
                        params![mac.to_string(), g.image, int(g.until)],
                    )?;
                }
                None => {
                    tx.execute(
                        "DELETE FROM capture_grants WHERE mac = ?1",
                        [mac.to_string()],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    })();
    if durable {
        // Back to the pool's default for whoever uses this connection next.
        c.pragma_update(None, "synchronous", "NORMAL")?;
    }
    r
}

/// The file older Aula versions kept the registry in.
pub const STATE_JSON: &str = "state.json";
/// What it is renamed to once imported.
pub const STATE_JSON_MIGRATED: &str = "state.json.migrated";

/// What [`import_state_json`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Import {
    /// No `state.json`.
    Nothing,
    /// Imported: clients and agents.
    Imported {
        /// Machines.
        clients: usize,
        /// Agents.
        agents: usize,
    },
    /// Imported by an earlier start that stopped before the rename: only
    /// renamed now.
    AlreadyImported,
}

/// Imports `<dir>/state.json` (written by Aula before the registry moved
/// into the database) once: every row in one transaction that also
/// records the import, then the file is renamed `state.json.migrated`. A
/// file that does not parse is refused (the server does not start) and
/// nothing changes. Rows already in the tables win over the file's.
pub(super) fn import_state_json(c: &mut Connection, dir: &Path) -> Result<Import, StateError> {
    let path = dir.join(STATE_JSON);
    let Some(bytes) = crate::persist::read_optional(&path)? else {
        return Ok(Import::Nothing);
    };
    let done: Option<i64> = c
        .query_row(
            "SELECT at FROM registry_imports WHERE name = ?1",
            [STATE_JSON],
            |r| r.get(0),
        )
        .optional()
        .map_err(DbError::from)?;
    let result = if done.is_some() {
        Import::AlreadyImported
    } else {
        let snap: Snapshot =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        let (clients, agents) = (snap.clients.len(), snap.agents.len());
        c.pragma_update(None, "synchronous", "FULL")
            .map_err(DbError::from)?;
        let r = (|| -> Result<(), DbError> {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let exists = |table: &str, mac: MacAddr| -> Result<bool, DbError> {
                Ok(tx
                    .query_row(
                        &format!("SELECT 1 FROM {table} WHERE mac = ?1"),
                        [mac.to_string()],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some())
            };
            for (mac, rec) in &snap.clients {
                if !exists("clients", *mac)? {
                    put_client(&tx, *mac, rec)?;
                }
            }
            for (mac, a) in &snap.agents {
                if !exists("agents", *mac)? {
                    put_agent(&tx, *mac, a)?;
                }
            }
            tx.execute(
                "INSERT INTO registry_imports (name, at, rows) VALUES (?1, ?2, ?3)",
                params![
                    STATE_JSON,
                    int(super::unix_now()),
                    (clients + agents) as i64
                ],
            )?;
            tx.commit()?;
            Ok(())
        })();
        c.pragma_update(None, "synchronous", "NORMAL")
            .map_err(DbError::from)?;
        r?;
        Import::Imported { clients, agents }
    };
    let to = dir.join(STATE_JSON_MIGRATED);
    std::fs::rename(&path, &to)
        .map_err(|e| crate::persist::PersistError::new("renaming", &path, e))?;
    crate::persist::sync_dir(dir)?;
    Ok(result)
}
