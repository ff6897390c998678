//! The console's store: what the HTTP handlers and the deployment runner
//! call, with the two backends behind it.
//!
//! | backend | chosen by | holds | runs on |
//! |---|---|---|---|
//! | [`Store::Local`] | default | the embedded SQLite file (`<data_dir>/aula.db`) | blocking threads ([`Db::call`]) |
//! | [`Store::Shared`] | `[console] database = "postgres://…"` | a PostgreSQL database shared by several boot servers | the runtime (tokio-postgres) |
//!
//! Shared: rooms, machines, deployments and their per-machine rows,
//! operator sessions, the command log. Each boot server's registry
//! (machines seen, boot modes, boot sessions, agents, capture grants) stays
//! in its own SQLite file either way: a boot server answers DHCP, TFTP and
//! its agents for its own subnets only.
//!
//! What sharing adds, and what the local backend answers instead:
//!
//! | operation | shared | local |
//! |---|---|---|
//! | a room's server | `rooms.server`, default the creating console's | none |
//! | [`Store::insert_deployment`] | carried out by the room's server | by this server |
//! | [`Store::deployments_to_run`] | active ones of this server | every active one |
//! | [`Store::claim`] | one row per MAC, leased ([`pg::PgDb::claim`]) | always granted |
//! | [`Store::save_runs`] | not while another server holds the machine | always written |
//! | [`Store::request_cancel`] | queued for the carrying server, taken within 2 s | (cancelled in place) |

use std::collections::HashSet;

use super::deployments::{self, Deployment, DeploymentMachine, DeploymentState, NewDeployment};
use super::log::{self, Entry};
use super::pg::{Claim, PgDb};
use super::rooms::{self, ImportReport, Machine, MachineFilter, MachineInput, MachinePatch, Room};
use super::sessions::{self, Session, SessionInfo};
use super::{Db, DbError};
use crate::deploy::machine::Run;
use crate::mac::MacAddr;

/// The console's store (see the module doc).
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded SQLite file, this boot server's alone.
    Local(Db),
    /// A PostgreSQL database shared by several boot servers.
    Shared(PgDb),
}

/// One batch of runs to write: deployment id and its changed machines.
pub type RunBatch = (i64, Vec<(MacAddr, Run, Option<i64>)>);

impl Store {
    /// This boot server's id in a shared database.
    pub fn server_id(&self) -> Option<&str> {
        match self {
            Store::Local(_) => None,
            Store::Shared(p) => Some(p.server_id()),
        }
    }

    /// The shared database, if this is one.
    pub fn shared(&self) -> Option<&PgDb> {
        match self {
            Store::Local(_) => None,
            Store::Shared(p) => Some(p),
        }
    }

    // ---- rooms and machines ----

    /// Rooms by name (only `scope`'s when given).
    pub async fn list_rooms(&self, scope: Option<Vec<i64>>) -> Result<Vec<Room>, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| rooms::list_rooms(c, scope.as_deref()))
                    .await
            }
            Store::Shared(p) => p.list_rooms(scope.as_deref()).await,
        }
    }

    /// One room.
    pub async fn room(&self, id: i64) -> Result<Room, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::get_room(c, id)).await,
            Store::Shared(p) => p.room(id).await,
        }
    }

    /// A room's id by name (case-insensitive).
    pub async fn room_id_by_name(&self, name: String) -> Result<Option<i64>, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::room_id_by_name(c, &name)).await,
            Store::Shared(p) => p.room_id_by_name(&name).await,
        }
    }

    /// The ids of the rooms named (unknown names are skipped).
    pub async fn room_ids(&self, names: Vec<String>) -> Result<Vec<i64>, DbError> {
        let mut ids = Vec::new();
        match self {
            Store::Local(db) => {
                return db
                    .call(move |c| {
                        let mut ids = Vec::new();
                        for n in &names {
                            if let Some(id) = rooms::room_id_by_name(c, n)? {
                                ids.push(id);
                            }
                        }
                        Ok(ids)
                    })
                    .await
            }
            Store::Shared(p) => {
                for n in &names {
                    if let Some(id) = p.room_id_by_name(n).await? {
                        ids.push(id);
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Creates a room; `server` (shared database only, default this
    /// boot server) is the boot server that serves it.
    pub async fn create_room(
        &self,
        name: String,
        description: String,
        server: Option<String>,
    ) -> Result<Room, DbError> {
        match self {
            Store::Local(db) => {
                if server.is_some() {
                    return Err(no_servers());
                }
                db.call(move |c| {
                    let id = rooms::create_room(c, &name, &description)?;
                    rooms::get_room(c, id)
                })
                .await
            }
            Store::Shared(p) => {
                if let Some(s) = &server {
                    super::pg::check_server_id(s)?;
                }
                p.create_console_room(&name, &description, server.as_deref())
                    .await
            }
        }
    }

    /// Renames, re-describes, or (shared) hands a room to another server.
    pub async fn update_room(
        &self,
        id: i64,
        name: Option<String>,
        description: Option<String>,
        server: Option<String>,
    ) -> Result<Room, DbError> {
        match self {
            Store::Local(db) => {
                if server.is_some() {
                    return Err(no_servers());
                }
                db.call(move |c| {
                    rooms::update_room(c, id, name.as_deref(), description.as_deref())?;
                    rooms::get_room(c, id)
                })
                .await
            }
            Store::Shared(p) => {
                p.update_room(
                    id,
                    name.as_deref(),
                    description.as_deref(),
                    server.as_deref(),
                )
                .await
            }
        }
    }

    /// Deletes a room (its machines stay, without a room).
    pub async fn delete_room(&self, id: i64) -> Result<(), DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::delete_room(c, id)).await,
            Store::Shared(p) => p.delete_room(id).await,
        }
    }

    /// A room and its machines.
    pub async fn room_with_machines(&self, id: i64) -> Result<(Room, Vec<Machine>), DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| Ok((rooms::get_room(c, id)?, rooms::room_machines(c, id)?)))
                    .await
            }
            Store::Shared(p) => p.room_with_machines(id).await,
        }
    }

    /// Machines matching `f`; `(total, page)`.
    pub async fn list_machines(
        &self,
        f: MachineFilter,
        offset: i64,
        limit: i64,
    ) -> Result<(i64, Vec<Machine>), DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| rooms::list_machines(c, &f, offset, limit))
                    .await
            }
            Store::Shared(p) => p.list_machines(&f, offset, limit).await,
        }
    }

    /// One machine.
    pub async fn machine(&self, id: i64) -> Result<Machine, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::get_machine(c, id)).await,
            Store::Shared(p) => p.machine(id).await,
        }
    }

    /// Several machines by id (any unknown one is an error).
    pub async fn machines(&self, ids: Vec<i64>) -> Result<Vec<Machine>, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| ids.iter().map(|id| rooms::get_machine(c, *id)).collect())
                    .await
            }
            Store::Shared(p) => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    out.push(p.machine(id).await?);
                }
                Ok(out)
            }
        }
    }

    /// Creates a machine (its MAC must be new).
    pub async fn create_machine(&self, m: MachineInput) -> Result<Machine, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    let (id, _) = rooms::put_machine(c, &m, false, false)?;
                    rooms::get_machine(c, id)
                })
                .await
            }
            Store::Shared(p) => p.create_machine(&m).await,
        }
    }

    /// Applies a patch to a machine.
    pub async fn patch_machine(&self, id: i64, patch: MachinePatch) -> Result<Machine, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    rooms::patch_machine(c, id, &patch)?;
                    rooms::get_machine(c, id)
                })
                .await
            }
            Store::Shared(p) => p.patch_machine(id, &patch).await,
        }
    }

    /// Deletes a machine.
    pub async fn delete_machine(&self, id: i64) -> Result<(), DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::delete_machine(c, id)).await,
            Store::Shared(p) => p.delete_machine(id).await,
        }
    }

    /// Every MAC with a machine row.
    pub async fn machine_macs(&self) -> Result<HashSet<MacAddr>, DbError> {
        match self {
            Store::Local(db) => {
                db.call(|c| {
                    let mut st = c.prepare("SELECT mac FROM machines")?;
                    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
                    let mut out = HashSet::new();
                    for r in rows {
                        if let Ok(m) = r?.parse() {
                            out.insert(m);
                        }
                    }
                    Ok(out)
                })
                .await
            }
            Store::Shared(p) => p.machine_macs().await,
        }
    }

    /// Imports machines (one transaction).
    pub async fn import(&self, machines: Vec<MachineInput>) -> Result<ImportReport, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::import(c, &machines)).await,
            Store::Shared(p) => p.import(&machines).await,
        }
    }

    /// Imports a CSV or (`toml`) TOML file.
    pub async fn import_text(&self, text: String, toml: bool) -> Result<ImportReport, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    if toml {
                        rooms::import_toml(c, &text)
                    } else {
                        let ms = rooms::parse_csv(&text)?;
                        rooms::import(c, &ms)
                    }
                })
                .await
            }
            Store::Shared(p) => {
                if toml {
                    p.import_toml(&text).await
                } else {
                    p.import(&rooms::parse_csv(&text)?).await
                }
            }
        }
    }

    /// A machine by MAC, id or exact name.
    pub async fn find_machine(&self, key: String) -> Result<Option<Machine>, DbError> {
        let key = key.trim().to_owned();
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    if let Ok(mac) = key.parse::<MacAddr>() {
                        rooms::machine_by_mac(c, mac)
                    } else if let Ok(id) = key.parse::<i64>() {
                        Ok(rooms::get_machine(c, id).ok())
                    } else {
                        let id: Option<i64> = rusqlite::OptionalExtension::optional(c.query_row(
                            "SELECT id FROM machines WHERE name = ?1",
                            [&key],
                            |r| r.get(0),
                        ))?;
                        match id {
                            Some(id) => Ok(Some(rooms::get_machine(c, id)?)),
                            None => Ok(None),
                        }
                    }
                })
                .await
            }
            Store::Shared(p) => {
                if let Ok(mac) = key.parse::<MacAddr>() {
                    p.machine_by_mac(mac).await
                } else if let Ok(id) = key.parse::<i64>() {
                    Ok(p.machine(id).await.ok())
                } else {
                    match p.machine_id_by_name(&key).await? {
                        Some(id) => Ok(Some(p.machine(id).await?)),
                        None => Ok(None),
                    }
                }
            }
        }
    }

    /// Every machine of a room.
    pub async fn room_machines(&self, id: i64) -> Result<Vec<Machine>, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| rooms::room_machines(c, id)).await,
            Store::Shared(p) => p.room_machines(id).await,
        }
    }

    // ---- deployments ----

    /// Stores a new deployment (see [`pg::PgDb::insert_deployment`] for
    /// which server carries it out when shared).
    pub async fn insert_deployment(&self, d: NewDeployment) -> Result<Deployment, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    let id = deployments::insert(c, &d)?;
                    deployments::get(c, id)
                })
                .await
            }
            Store::Shared(p) => p.insert_deployment(&d).await,
        }
    }

    /// One deployment.
    pub async fn deployment(&self, id: i64) -> Result<Deployment, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| deployments::get(c, id)).await,
            Store::Shared(p) => p.deployment(id).await,
        }
    }

    /// A deployment and its machines.
    pub async fn deployment_with_machines(
        &self,
        id: i64,
    ) -> Result<(Deployment, Vec<DeploymentMachine>), DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| Ok((deployments::get(c, id)?, deployments::machines(c, id)?)))
                    .await
            }
            Store::Shared(p) => Ok((p.deployment(id).await?, p.deployment_machines(id).await?)),
        }
    }

    /// A deployment and the MACs of its failed machines.
    pub async fn deployment_failed(&self, id: i64) -> Result<(Deployment, Vec<MacAddr>), DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| Ok((deployments::get(c, id)?, deployments::failed_macs(c, id)?)))
                    .await
            }
            Store::Shared(p) => Ok((
                p.deployment(id).await?,
                p.deployment_macs(id, "failed").await?,
            )),
        }
    }

    /// Whether `mac` is one of a deployment's machines.
    pub async fn deployment_has(&self, id: i64, mac: MacAddr) -> Result<bool, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    Ok(c.query_row(
                        "SELECT count(*) FROM deployment_machines WHERE deployment_id = ?1 AND mac = ?2",
                        rusqlite::params![id, mac.to_string()],
                        |r| r.get::<_, i64>(0),
                    )? > 0)
                })
                .await
            }
            Store::Shared(p) => p.deployment_has(id, mac).await,
        }
    }

    /// Deployments newest first.
    pub async fn list_deployments(
        &self,
        scope: Option<Vec<i64>>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Deployment>, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| deployments::list(c, scope.as_deref(), before, limit))
                    .await
            }
            Store::Shared(p) => p.list_deployments(scope.as_deref(), before, limit).await,
        }
    }

    /// The active deployments this boot server carries out (all of them
    /// when local).
    pub async fn deployments_to_run(&self) -> Result<Vec<i64>, DbError> {
        match self {
            Store::Local(db) => Ok(db
                .call(|c| deployments::active(c))
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect()),
            Store::Shared(p) => p.deployments_to_run().await,
        }
    }

    /// Writes machine runs (shared: not those another server holds under
    /// a live lease).
    pub async fn save_runs(&self, batches: Vec<RunBatch>) -> Result<(), DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    for (id, rows) in &batches {
                        deployments::save_runs(c, *id, rows)?;
                    }
                    Ok(())
                })
                .await
            }
            Store::Shared(p) => {
                for (id, rows) in &batches {
                    let n = p.save_runs(*id, rows).await?;
                    if n < rows.len() as u64 {
                        tracing::warn!(
                            deployment = id,
                            unwritten = rows.len() as u64 - n,
                            "machine rows not written: another boot server holds their machines"
                        );
                    }
                }
                Ok(())
            }
        }
    }

    /// Sets a deployment's state and recounts it.
    pub async fn set_deployment_state(
        &self,
        id: i64,
        state: DeploymentState,
    ) -> Result<(), DbError> {
        match self {
            Store::Local(db) => db.call(move |c| deployments::set_state(c, id, state)).await,
            Store::Shared(p) => p.set_deployment_state(id, state).await,
        }
    }

    /// Ends a deployment: the image recorded on the machines that restored
    /// it, the final state, the runs compacted (shared: the claims given
    /// up). Returns it as stored.
    pub async fn end_deployment(
        &self,
        id: i64,
        state: DeploymentState,
        restored: Vec<(MacAddr, i64)>,
        image: String,
        version: Option<i64>,
    ) -> Result<Deployment, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    for (mac, at) in &restored {
                        rooms::set_machine_image(c, *mac, &image, version, *at)?;
                    }
                    deployments::set_state(c, id, state)?;
                    deployments::compact(c, id)?;
                    deployments::get(c, id)
                })
                .await
            }
            Store::Shared(p) => {
                p.end_deployment(id, state, &restored, &image, version)
                    .await
            }
        }
    }

    /// Machines per image they run.
    pub async fn machines_per_image(&self) -> Result<Vec<(String, i64, Vec<String>)>, DbError> {
        match self {
            Store::Local(db) => db.call(|c| deployments::machines_per_image(c)).await,
            Store::Shared(p) => p.machines_per_image().await,
        }
    }

    /// Asks the server carrying out a deployment to cancel it (or one
    /// machine of it); local: there is no other server to ask.
    pub async fn request_cancel(&self, id: i64, mac: Option<MacAddr>) -> Result<(), DbError> {
        match self {
            Store::Local(_) => Err(DbError::Invalid(
                "no other boot server shares this database".into(),
            )),
            Store::Shared(p) => p.request_cancel(id, mac).await,
        }
    }

    /// Cancels other consoles asked for this server's deployments.
    pub async fn take_cancels(&self) -> Result<Vec<(i64, Option<MacAddr>)>, DbError> {
        match self {
            Store::Local(_) => Ok(Vec::new()),
            Store::Shared(p) => p.take_cancels().await,
        }
    }

    // ---- claims ----

    /// Claims a machine for a deployment before acting on it (local:
    /// always granted, one server acts alone).
    pub async fn claim(&self, deployment: i64, mac: MacAddr) -> Result<Claim, DbError> {
        match self {
            Store::Local(_) => Ok(Claim::Granted),
            Store::Shared(p) => p.claim(deployment, mac).await,
        }
    }

    /// Gives a machine up.
    pub async fn release(&self, mac: MacAddr) -> Result<(), DbError> {
        match self {
            Store::Local(_) => Ok(()),
            Store::Shared(p) => p.release(mac).await.map(|_| ()),
        }
    }

    // ---- sessions ----

    /// Stores a new session.
    pub async fn create_session(
        &self,
        secret: String,
        user: String,
        csrf: String,
        ttl_ms: i64,
    ) -> Result<Session, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| sessions::create(c, &secret, &user, &csrf, ttl_ms))
                    .await
            }
            Store::Shared(p) => p.create_session(&secret, &user, &csrf, ttl_ms).await,
        }
    }

    /// The live session of a cookie secret.
    pub async fn lookup_session(&self, secret: String) -> Result<Option<Session>, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| sessions::lookup(c, &secret)).await,
            Store::Shared(p) => p.lookup_session(&secret).await,
        }
    }

    /// Ends the session of a cookie secret.
    pub async fn delete_session(&self, secret: String) -> Result<(), DbError> {
        match self {
            Store::Local(db) => db.call(move |c| sessions::delete(c, &secret)).await,
            Store::Shared(p) => p.delete_session(&secret).await,
        }
    }

    /// Live sessions of one user or all.
    pub async fn list_sessions(&self, user: Option<String>) -> Result<Vec<SessionInfo>, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| sessions::list(c, user.as_deref())).await,
            Store::Shared(p) => p.list_sessions(user.as_deref()).await,
        }
    }

    /// One live session by id.
    pub async fn session(&self, id: String) -> Result<Option<SessionInfo>, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| sessions::get(c, &id)).await,
            Store::Shared(p) => p.session(&id).await,
        }
    }

    /// Ends a session by id.
    pub async fn revoke_session(&self, id: String) -> Result<bool, DbError> {
        match self {
            Store::Local(db) => db.call(move |c| sessions::revoke(c, &id)).await,
            Store::Shared(p) => p.revoke_session(&id).await,
        }
    }

    // ---- command log ----

    /// Appends to the command log.
    pub async fn log_append(
        &self,
        who: String,
        action: String,
        target: String,
        outcome: String,
        detail: Option<String>,
    ) -> Result<i64, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| {
                    log::append(c, &who, &action, &target, &outcome, detail.as_deref())
                })
                .await
            }
            Store::Shared(p) => {
                p.log_append(&who, &action, &target, &outcome, detail.as_deref())
                    .await
            }
        }
    }

    /// The command log, newest first.
    pub async fn log_list(
        &self,
        who: Option<String>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Entry>, DbError> {
        match self {
            Store::Local(db) => {
                db.call(move |c| log::list(c, who.as_deref(), before, limit))
                    .await
            }
            Store::Shared(p) => p.log_list(who.as_deref(), before, limit).await,
        }
    }
}

fn no_servers() -> DbError {
    DbError::Invalid(
        "a room names its boot server only with a shared database ([console] database)".into(),
    )
}
