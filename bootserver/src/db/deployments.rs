//! Deployments and their per-machine rows.
//!
//! A deployment row holds what was asked (image, target, method, after,
//! start time, concurrency) and running counters; each machine has one row
//! keyed `(deployment_id, mac)` with its state, reason, byte progress and
//! the serialised state-machine [`Run`] (everything needed to resume).

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use super::{now_ms, DbError};
use crate::deploy::machine::{After, Kind, Ms, Phase, Run};
use crate::mac::MacAddr;

/// A deployment's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentState {
    /// Waiting for its start time.
    Scheduled,
    /// Machines are being worked on.
    Running,
    /// Every machine ended (done, failed or cancelled).
    Finished,
    /// Cancelled as a whole.
    Cancelled,
}

impl DeploymentState {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Scheduled => "scheduled",
            DeploymentState::Running => "running",
            DeploymentState::Finished => "finished",
            DeploymentState::Cancelled => "cancelled",
        }
    }
    pub(crate) fn parse(s: &str) -> DeploymentState {
        match s {
            "scheduled" => DeploymentState::Scheduled,
            "running" => DeploymentState::Running,
            "cancelled" => DeploymentState::Cancelled,
            _ => DeploymentState::Finished,
        }
    }
    /// Scheduled or running.
    pub fn is_active(self) -> bool {
        matches!(self, DeploymentState::Scheduled | DeploymentState::Running)
    }
}

/// A deployment as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Deployment {
    /// Id.
    pub id: i64,
    /// Restore or capture.
    pub kind: Kind,
    /// The room it was made for.
    pub room_id: Option<i64>,
    /// That room's name.
    pub room: Option<String>,
    /// Image name.
    pub image: String,
    /// Image version (`None` = the latest when each restore starts).
    pub version: Option<i64>,
    /// Disk number.
    pub disk: u32,
    /// Partition (`None` = whole disk).
    pub partition: Option<u32>,
    /// `unicast`, `unicast-cache` or `swarm`.
    pub method: String,
    /// Layout: a `LayoutSpec`, `"machine"` (each machine's own), or none.
    pub layout: Option<serde_json::Value>,
    /// What happens at the end.
    pub after: After,
    /// Start time (ms), if scheduled.
    pub start_at: Option<i64>,
    /// Restores at once (0 = no limit).
    pub max_concurrent: u32,
    /// State.
    pub state: DeploymentState,
    /// Who asked.
    pub created_by: String,
    /// When (ms).
    pub created_at: i64,
    /// Started (ms).
    pub started_at: Option<i64>,
    /// Finished (ms).
    pub finished_at: Option<i64>,
    /// The deployment this retries.
    pub retry_of: Option<i64>,
    /// Machines.
    pub total: i64,
    /// Machines done.
    pub done: i64,
    /// Machines failed.
    pub failed: i64,
    /// Machines cancelled.
    pub cancelled: i64,
    /// The boot server carrying it out (shared database only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// One machine of a deployment.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentMachine {
    /// MAC.
    pub mac: MacAddr,
    /// Machine id (if the machine still exists).
    pub machine_id: Option<i64>,
    /// Name when the deployment was made.
    pub name: String,
    /// The state machine.
    pub run: Run,
    /// When it ended (ms).
    pub finished_at: Option<i64>,
}

/// A new deployment.
#[derive(Debug, Clone)]
pub struct NewDeployment {
    /// Restore or capture.
    pub kind: Kind,
    /// Room.
    pub room_id: Option<i64>,
    /// Image.
    pub image: String,
    /// Version.
    pub version: Option<i64>,
    /// Disk.
    pub disk: u32,
    /// Partition.
    pub partition: Option<u32>,
    /// Method.
    pub method: String,
    /// Layout.
    pub layout: Option<serde_json::Value>,
    /// After.
    pub after: After,
    /// Start time (ms).
    pub start_at: Option<i64>,
    /// Concurrency.
    pub max_concurrent: u32,
    /// Who.
    pub created_by: String,
    /// Retry of.
    pub retry_of: Option<i64>,
    /// Machines: MAC, machine id, name.
    pub machines: Vec<(MacAddr, Option<i64>, String)>,
}

pub(crate) const DEP_COLS: &str = "d.id, d.kind, d.room_id, r.name, d.image, d.version, d.disk, d.partition, d.method, \
    d.layout, d.after, d.start_at, d.max_concurrent, d.state, d.created_by, d.created_at, d.started_at, \
    d.finished_at, d.retry_of, d.total, d.done, d.failed, d.cancelled";

fn dep_row(r: &Row<'_>) -> rusqlite::Result<Deployment> {
    let kind: String = r.get(1)?;
    let layout: Option<String> = r.get(9)?;
    let after: String = r.get(10)?;
    let state: String = r.get(13)?;
    Ok(Deployment {
        id: r.get(0)?,
        kind: Kind::parse(&kind),
        room_id: r.get(2)?,
        room: r.get(3)?,
        image: r.get(4)?,
        version: r.get(5)?,
        disk: r.get(6)?,
        partition: r.get(7)?,
        method: r.get(8)?,
        layout: layout.and_then(|s| serde_json::from_str(&s).ok()),
        after: After::parse(&after),
        start_at: r.get(11)?,
        max_concurrent: r.get(12)?,
        state: DeploymentState::parse(&state),
        created_by: r.get(14)?,
        created_at: r.get(15)?,
        started_at: r.get(16)?,
        finished_at: r.get(17)?,
        retry_of: r.get(18)?,
        total: r.get(19)?,
        done: r.get(20)?,
        failed: r.get(21)?,
        cancelled: r.get(22)?,
        server: None,
    })
}

/// A compacted (ended) machine row's run, rebuilt from its columns:
/// state, reason, bytes done and total, and when it was made.
pub(crate) fn compacted_run(
    state: &str,
    reason: Option<String>,
    bytes_done: i64,
    bytes_total: i64,
    at: Ms,
) -> Run {
    let mut run = Run::new(String::new(), at);
    run.phase = Phase::parse(state).unwrap_or(Phase::Failed);
    run.reason = reason;
    run.bytes_done = u64::try_from(bytes_done).unwrap_or(0);
    run.bytes_total = u64::try_from(bytes_total).unwrap_or(0);
    run
}

fn machine_row(r: &Row<'_>) -> rusqlite::Result<DeploymentMachine> {
    let mac: String = r.get(0)?;
    let mac: MacAddr = mac.parse().unwrap_or_default();
    let run: String = r.get(3)?;
    let run: Run = match serde_json::from_str(&run) {
        Ok(run) => run,
        // Ended rows are compacted (see `compact`): rebuild from columns.
        Err(_) => compacted_run(
            &r.get::<_, String>(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
        ),
    };
    Ok(DeploymentMachine {
        mac,
        machine_id: r.get(1)?,
        name: r.get(2)?,
        run,
        finished_at: r.get(4)?,
    })
}

/// Drops the state-machine details of an ended deployment's rows (the
/// columns keep state, reason, bytes and times): a year of history stays
/// small.
pub fn compact(c: &Connection, id: i64) -> Result<(), DbError> {
    c.execute(
        "UPDATE deployment_machines SET run = '' WHERE deployment_id = ?1",
        [id],
    )?;
    Ok(())
}

/// The key agent job ids of one machine start with.
pub fn run_key(deployment: i64, mac: MacAddr) -> String {
    format!("d{deployment}-{}", hex::encode(mac.0))
}

/// Stores a new deployment and its machines (all pending).
pub fn insert(c: &mut Connection, d: &NewDeployment) -> Result<i64, DbError> {
    if d.machines.is_empty() {
        return Err(DbError::Invalid("the deployment has no machines".into()));
    }
    let now = now_ms();
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let state = if d.start_at.is_some_and(|t| t > now) {
        DeploymentState::Scheduled
    } else {
        DeploymentState::Running
    };
    let layout = match &d.layout {
        Some(v) => Some(serde_json::to_string(v).map_err(|e| DbError::Decode(e.to_string()))?),
        None => None,
    };
    tx.execute(
        "INSERT INTO deployments (kind, room_id, image, version, disk, partition, method, layout, after, \
         start_at, max_concurrent, state, created_by, created_at, started_at, retry_of, total) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            d.kind.as_str(),
            d.room_id,
            d.image,
            d.version,
            d.disk,
            d.partition,
            d.method,
            layout,
            d.after.as_str(),
            d.start_at,
            d.max_concurrent,
            state.as_str(),
            d.created_by,
            now,
            (state == DeploymentState::Running).then_some(now),
            d.retry_of,
            d.machines.len() as i64,
        ],
    )?;
    let id = tx.last_insert_rowid();
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO deployment_machines (deployment_id, mac, machine_id, name, state, updated_at, run) \
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
        )?;
        for (mac, mid, name) in &d.machines {
            let run = Run::new(run_key(id, *mac), now);
            let json = serde_json::to_string(&run).map_err(|e| DbError::Decode(e.to_string()))?;
            st.execute(params![id, mac.to_string(), mid, name, now, json])
                .map_err(|e| DbError::unique(e, format!("{mac} is listed twice")))?;
        }
    }
    tx.commit()?;
    Ok(id)
}

/// One deployment.
pub fn get(c: &Connection, id: i64) -> Result<Deployment, DbError> {
    c.query_row(
        &format!("SELECT {DEP_COLS} FROM deployments d LEFT JOIN rooms r ON r.id = d.room_id WHERE d.id = ?1"),
        [id],
        dep_row,
    )
    .optional()?
    .ok_or(DbError::NotFound("deployment"))
}

/// A deployment's machines, in the order they were given.
pub fn machines(c: &Connection, id: i64) -> Result<Vec<DeploymentMachine>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT dm.mac, dm.machine_id, dm.name, dm.run, dm.finished_at, dm.state, dm.reason, \
         dm.bytes_done, dm.bytes_total, dm.updated_at FROM deployment_machines dm \
         LEFT JOIN machines m ON m.id = dm.machine_id \
         WHERE dm.deployment_id = ?1 ORDER BY m.seat IS NULL, m.seat, dm.name",
    )?;
    let rows = st.query_map([id], machine_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok(out)
}

/// Deployments newest first, `before` an id (keyset paging), limited to
/// rooms in `scope` when given.
pub fn list(
    c: &Connection,
    scope: Option<&[i64]>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Deployment>, DbError> {
    let scope_sql = match scope {
        Some(s) => format!(
            "AND d.room_id IN ({})",
            s.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        ),
        None => String::new(),
    };
    let mut st = c.prepare_cached(&format!(
        "SELECT {DEP_COLS} FROM deployments d LEFT JOIN rooms r ON r.id = d.room_id \
         WHERE d.id < ?1 {scope_sql} ORDER BY d.id DESC LIMIT ?2"
    ))?;
    let rows = st.query_map(
        params![before.unwrap_or(i64::MAX), limit.clamp(1, 500)],
        dep_row,
    )?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok(out)
}

/// Scheduled and running deployments (to resume at start-up).
pub fn active(c: &Connection) -> Result<Vec<Deployment>, DbError> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {DEP_COLS} FROM deployments d LEFT JOIN rooms r ON r.id = d.room_id \
         WHERE d.state IN ('scheduled', 'running') ORDER BY d.id"
    ))?;
    let rows = st.query_map([], dep_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok(out)
}

/// Writes machine runs (one transaction).
pub fn save_runs(
    c: &mut Connection,
    deployment: i64,
    runs: &[(MacAddr, Run, Option<i64>)],
) -> Result<(), DbError> {
    let now = now_ms();
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut st = tx.prepare_cached(
            "UPDATE deployment_machines SET state = ?1, reason = ?2, bytes_done = ?3, bytes_total = ?4, \
             rate_bps = ?5, updated_at = ?6, finished_at = ?7, run = ?8 WHERE deployment_id = ?9 AND mac = ?10",
        )?;
        for (mac, run, finished) in runs {
            let json = serde_json::to_string(run).map_err(|e| DbError::Decode(e.to_string()))?;
            st.execute(params![
                run.phase.as_str(),
                run.reason,
                run.bytes_done as i64,
                run.bytes_total as i64,
                run.rate_bps,
                now,
                finished,
                json,
                deployment,
                mac.to_string(),
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Updates a deployment's state and counters from its machines' rows.
pub fn set_state(c: &Connection, id: i64, state: DeploymentState) -> Result<(), DbError> {
    let now = now_ms();
    c.execute(
        "UPDATE deployments SET state = ?1, \
           started_at = CASE WHEN ?1 = 'running' THEN coalesce(started_at, ?2) ELSE started_at END, \
           finished_at = CASE WHEN ?1 IN ('finished', 'cancelled') THEN coalesce(finished_at, ?2) ELSE finished_at END, \
           done = (SELECT count(*) FROM deployment_machines WHERE deployment_id = ?3 AND state = 'done'), \
           failed = (SELECT count(*) FROM deployment_machines WHERE deployment_id = ?3 AND state = 'failed'), \
           cancelled = (SELECT count(*) FROM deployment_machines WHERE deployment_id = ?3 AND state = 'cancelled') \
         WHERE id = ?3",
        params![state.as_str(), now, id],
    )?;
    Ok(())
}

/// The machines of a deployment that failed (for "retry the failed ones").
pub fn failed_macs(c: &Connection, id: i64) -> Result<Vec<MacAddr>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT mac FROM deployment_machines WHERE deployment_id = ?1 AND state = 'failed' ORDER BY name",
    )?;
    let rows = st.query_map([id], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        if let Ok(m) = r?.parse() {
            out.push(m);
        }
    }
    Ok(out)
}

/// Per-phase counts of a deployment (for summaries).
pub fn phase_counts(c: &Connection, id: i64) -> Result<Vec<(Phase, i64)>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT state, count(*) FROM deployment_machines WHERE deployment_id = ?1 GROUP BY state",
    )?;
    let rows = st.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (s, n) = r?;
        if let Some(p) = Phase::parse(&s) {
            out.push((p, n));
        }
    }
    Ok(out)
}

/// Machines by MAC that currently run an image, per image name (from
/// finished restores recorded on the machines).
pub fn machines_per_image(c: &Connection) -> Result<Vec<(String, i64, Vec<String>)>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT image, count(*), group_concat(name, ', ') FROM \
           (SELECT image, name FROM machines WHERE image IS NOT NULL ORDER BY name) GROUP BY image",
    )?;
    let rows = st.query_map([], |r| {
        let names: Option<String> = r.get(2)?;
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            names
                .map(|s| s.split(", ").map(str::to_owned).collect())
                .unwrap_or_default(),
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok(out)
}
