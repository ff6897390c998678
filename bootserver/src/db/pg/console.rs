//! The console's queries on the shared database: the same operations and
//! the same answers as the SQLite modules ([`crate::db::rooms`],
//! [`crate::db::deployments`], [`crate::db::sessions`],
//! [`crate::db::log`]), in PostgreSQL's dialect, plus what sharing adds:
//! a room names the boot server that serves it, a deployment the server
//! that carries it out, and a machine's run is written only by the server
//! holding its claim.
//!
//! Dialect notes: names are unique case-insensitively through
//! `lower(name)`; `group_concat` is `string_agg`; integer columns are
//! `BIGINT` (`u32` fields are range-checked on the way out); statements
//! that must see one state run in one transaction.

use std::collections::HashSet;

use tokio_postgres::{GenericClient, Row};

use super::super::deployments::compacted_run;
use super::super::deployments::{
    run_key, Deployment, DeploymentMachine, DeploymentState, NewDeployment,
};
use super::super::log::Entry;
use super::super::rooms::{
    check_layout, check_name, last_deployment, ImportReport, Machine, MachineFilter, MachineInput,
    MachinePatch, Room,
};
use super::super::sessions::{hash_secret, Session, SessionInfo, LIST_MAX};
use super::super::{now_ms, DbError};
use super::{unique, PgDb};
use crate::deploy::machine::{After, Kind, Run};
use crate::mac::MacAddr;

const ROOM_COLS: &str = "r.id, r.name, r.description, \
    (SELECT count(*) FROM machines m WHERE m.room_id = r.id), r.server";

const MACHINE_COLS: &str = "m.id, m.mac, m.name, m.room_id, r.name, m.seat, m.expected_ip, \
    m.disk_layout, m.image, m.image_version, m.imaged_at, \
    (SELECT dm.deployment_id::text || ' ' || dm.state || ' ' || COALESCE(dm.finished_at::text, '') \
       FROM deployment_machines dm \
       WHERE dm.mac = m.mac ORDER BY dm.deployment_id DESC LIMIT 1)";

const DEP_COLS: &str = "d.id, d.kind, d.room_id, r.name, d.image, d.version, d.disk, d.partition, d.method, \
    d.layout, d.after, d.start_at, d.max_concurrent, d.state, d.created_by, d.created_at, d.started_at, \
    d.finished_at, d.retry_of, d.total, d.done, d.failed, d.cancelled, d.server";

fn small(v: i64, what: &str) -> Result<u32, DbError> {
    u32::try_from(v).map_err(|_| DbError::Decode(format!("{what} {v} out of range")))
}

fn room_row(r: &Row) -> Result<Room, DbError> {
    Ok(Room {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        description: r.try_get(2)?,
        machines: r.try_get(3)?,
        server: r.try_get(4)?,
    })
}

fn machine_row(r: &Row) -> Result<Machine, DbError> {
    let mac: String = r.try_get(1)?;
    let ip: Option<String> = r.try_get(6)?;
    let layout: Option<String> = r.try_get(7)?;
    let last: Option<String> = r.try_get(11)?;
    Ok(Machine {
        id: r.try_get(0)?,
        mac: mac
            .parse()
            .map_err(|_| DbError::Decode(format!("stored MAC {mac:?}")))?,
        name: r.try_get(2)?,
        room_id: r.try_get(3)?,
        room: r.try_get(4)?,
        seat: r.try_get(5)?,
        expected_ip: ip.and_then(|s| s.parse().ok()),
        disk_layout: layout.and_then(|s| serde_json::from_str(&s).ok()),
        image: r.try_get(8)?,
        image_version: r.try_get(9)?,
        imaged_at: r.try_get(10)?,
        last_deployment: last.as_deref().and_then(last_deployment),
    })
}

fn dep_row(r: &Row) -> Result<Deployment, DbError> {
    let kind: String = r.try_get(1)?;
    let layout: Option<String> = r.try_get(9)?;
    let after: String = r.try_get(10)?;
    let state: String = r.try_get(13)?;
    let partition: Option<i64> = r.try_get(7)?;
    Ok(Deployment {
        id: r.try_get(0)?,
        kind: Kind::parse(&kind),
        room_id: r.try_get(2)?,
        room: r.try_get(3)?,
        image: r.try_get(4)?,
        version: r.try_get(5)?,
        disk: small(r.try_get(6)?, "disk")?,
        partition: partition.map(|p| small(p, "partition")).transpose()?,
        method: r.try_get(8)?,
        layout: layout.and_then(|s| serde_json::from_str(&s).ok()),
        after: After::parse(&after),
        start_at: r.try_get(11)?,
        max_concurrent: small(r.try_get(12)?, "max_concurrent")?,
        state: DeploymentState::parse(&state),
        created_by: r.try_get(14)?,
        created_at: r.try_get(15)?,
        started_at: r.try_get(16)?,
        finished_at: r.try_get(17)?,
        retry_of: r.try_get(18)?,
        total: r.try_get(19)?,
        done: r.try_get(20)?,
        failed: r.try_get(21)?,
        cancelled: r.try_get(22)?,
        server: r.try_get(23)?,
    })
}

fn dm_row(r: &Row) -> Result<DeploymentMachine, DbError> {
    let mac: String = r.try_get(0)?;
    let mac: MacAddr = mac
        .parse()
        .map_err(|_| DbError::Decode(format!("stored MAC {mac:?}")))?;
    let run: String = r.try_get(3)?;
    let run: Run = match serde_json::from_str(&run) {
        Ok(run) => run,
        // Ended rows are compacted: rebuild from the columns.
        Err(_) => compacted_run(
            &r.try_get::<_, String>(5)?,
            r.try_get(6)?,
            r.try_get(7)?,
            r.try_get(8)?,
            r.try_get(9)?,
        ),
    };
    Ok(DeploymentMachine {
        mac,
        machine_id: r.try_get(1)?,
        name: r.try_get(2)?,
        run,
        finished_at: r.try_get(4)?,
    })
}

fn session_info(r: &Row) -> Result<SessionInfo, DbError> {
    Ok(SessionInfo {
        id: r.try_get(0)?,
        user: r.try_get(1)?,
        created_at: r.try_get(2)?,
        expires_at: r.try_get(3)?,
    })
}

async fn get_room<C: GenericClient>(c: &C, id: i64) -> Result<Room, DbError> {
    let r = c
        .query_opt(
            &format!("SELECT {ROOM_COLS} FROM rooms r WHERE r.id = $1"),
            &[&id],
        )
        .await?
        .ok_or(DbError::NotFound("room"))?;
    room_row(&r)
}

async fn room_id_by_name<C: GenericClient>(c: &C, name: &str) -> Result<Option<i64>, DbError> {
    Ok(
        match c
            .query_opt(
                "SELECT id FROM rooms WHERE lower(name) = lower($1)",
                &[&name.trim()],
            )
            .await?
        {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        },
    )
}

async fn create_room<C: GenericClient>(
    c: &C,
    name: &str,
    description: &str,
    server: Option<&str>,
) -> Result<i64, DbError> {
    let name = check_name("room", name)?;
    if description.len() > 1000 {
        return Err(DbError::Invalid(
            "description is longer than 1000 bytes".into(),
        ));
    }
    let r = c
        .query_one(
            "INSERT INTO rooms (name, description, created_at, server) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&name, &description, &now_ms(), &server],
        )
        .await
        .map_err(|e| unique(e, format!("a room named {name:?} exists")))?;
    Ok(r.try_get(0)?)
}

async fn get_machine<C: GenericClient>(c: &C, id: i64) -> Result<Machine, DbError> {
    let r = c
        .query_opt(
            &format!("SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id WHERE m.id = $1"),
            &[&id],
        )
        .await?
        .ok_or(DbError::NotFound("machine"))?;
    machine_row(&r)
}

async fn machine_by_mac<C: GenericClient>(c: &C, mac: MacAddr) -> Result<Option<Machine>, DbError> {
    match c
        .query_opt(
            &format!("SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id WHERE m.mac = $1"),
            &[&mac.to_string()],
        )
        .await?
    {
        Some(r) => Ok(Some(machine_row(&r)?)),
        None => Ok(None),
    }
}

async fn room_machines<C: GenericClient>(c: &C, room: i64) -> Result<Vec<Machine>, DbError> {
    c.query(
        &format!(
            "SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id \
             WHERE m.room_id = $1 ORDER BY m.seat IS NULL, m.seat, m.name"
        ),
        &[&room],
    )
    .await?
    .iter()
    .map(machine_row)
    .collect()
}

async fn resolve_room<C: GenericClient>(
    c: &C,
    m: &MachineInput,
    create: bool,
    server: &str,
) -> Result<Option<i64>, DbError> {
    if let Some(id) = m.room_id {
        get_room(c, id).await?;
        return Ok(Some(id));
    }
    match m.room.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(name) => match room_id_by_name(c, name).await? {
            Some(id) => Ok(Some(id)),
            None if create => Ok(Some(create_room(c, name, "", Some(server)).await?)),
            None => Err(DbError::Invalid(format!("no room named {name:?}"))),
        },
    }
}

/// Creates a machine or updates the one with its MAC; `(id, created)`.
/// Rooms an import creates are served by `server` (the importing one).
async fn put_machine<C: GenericClient>(
    c: &C,
    m: &MachineInput,
    upsert: bool,
    create_rooms: bool,
    server: &str,
) -> Result<(i64, bool), DbError> {
    if m.mac.is_multicast() || m.mac.0 == [0; 6] {
        return Err(DbError::Invalid(format!("{} is not a unicast MAC", m.mac)));
    }
    let name = check_name("machine", m.name.as_deref().unwrap_or(&m.mac.to_string()))?;
    let room = resolve_room(c, m, create_rooms, server).await?;
    let layout = check_layout(&m.disk_layout)?;
    if let Some(s) = m.seat {
        if !(0..=10_000).contains(&s) {
            return Err(DbError::Invalid(format!("seat {s} is outside 0-10000")));
        }
    }
    let ip = m.expected_ip.map(|i| i.to_string());
    let mac = m.mac.to_string();
    let existing = c
        .query_opt("SELECT id FROM machines WHERE mac = $1", &[&mac])
        .await?;
    match existing {
        Some(r) if upsert => {
            let id: i64 = r.try_get(0)?;
            c.execute(
                "UPDATE machines SET name = $1, room_id = $2, seat = $3, expected_ip = $4, \
                 disk_layout = coalesce($5, disk_layout) WHERE id = $6",
                &[&name, &room, &m.seat, &ip, &layout, &id],
            )
            .await?;
            Ok((id, false))
        }
        Some(_) => Err(DbError::Conflict(format!(
            "a machine with MAC {mac} exists"
        ))),
        None => {
            let r = c
                .query_one(
                    "INSERT INTO machines (mac, name, room_id, seat, expected_ip, disk_layout, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    &[&mac, &name, &room, &m.seat, &ip, &layout, &now_ms()],
                )
                .await
                .map_err(|e| unique(e, format!("a machine with MAC {mac} exists")))?;
            Ok((r.try_get(0)?, true))
        }
    }
}

async fn import_in<C: GenericClient>(
    c: &C,
    machines: &[MachineInput],
    server: &str,
) -> Result<ImportReport, DbError> {
    let count = "SELECT count(*) FROM rooms";
    let rooms_before: i64 = c.query_one(count, &[]).await?.try_get(0)?;
    let mut rep = ImportReport::default();
    let mut seen = HashSet::new();
    for (i, m) in machines.iter().enumerate() {
        if !seen.insert(m.mac) {
            return Err(DbError::Invalid(format!(
                "entry {}: MAC {} is listed twice",
                i + 1,
                m.mac
            )));
        }
        let (_, created) = put_machine(c, m, true, true, server)
            .await
            .map_err(|e| match e {
                DbError::Invalid(s) | DbError::Conflict(s) => {
                    DbError::Invalid(format!("entry {}: {s}", i + 1))
                }
                other => other,
            })?;
        if created {
            rep.machines_created += 1;
        } else {
            rep.machines_updated += 1;
        }
    }
    let rooms_after: i64 = c.query_one(count, &[]).await?.try_get(0)?;
    rep.rooms_created = (rooms_after - rooms_before).max(0) as usize;
    Ok(rep)
}

async fn get_deployment<C: GenericClient>(c: &C, id: i64) -> Result<Deployment, DbError> {
    let r = c
        .query_opt(
            &format!("SELECT {DEP_COLS} FROM deployments d LEFT JOIN rooms r ON r.id = d.room_id WHERE d.id = $1"),
            &[&id],
        )
        .await?
        .ok_or(DbError::NotFound("deployment"))?;
    dep_row(&r)
}

impl PgDb {
    // ---- rooms and machines ----

    /// Every room with its machine count and server, by name.
    pub async fn list_rooms(&self, scope: Option<&[i64]>) -> Result<Vec<Room>, DbError> {
        let c = self.conn().await?;
        let rows = c
            .query(
                &format!("SELECT {ROOM_COLS} FROM rooms r ORDER BY lower(r.name)"),
                &[],
            )
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            let r = room_row(r)?;
            if scope.is_none_or(|s| s.contains(&r.id)) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// One room.
    pub async fn room(&self, id: i64) -> Result<Room, DbError> {
        get_room(&*self.conn().await?, id).await
    }

    /// A room's id by name (case-insensitive).
    pub async fn room_id_by_name(&self, name: &str) -> Result<Option<i64>, DbError> {
        room_id_by_name(&*self.conn().await?, name).await
    }

    /// Creates a room served by `server` (default: this boot server).
    pub async fn create_console_room(
        &self,
        name: &str,
        description: &str,
        server: Option<&str>,
    ) -> Result<Room, DbError> {
        let server = server.unwrap_or(&self.server);
        let c = self.conn().await?;
        let id = create_room(&*c, name, description, Some(server)).await?;
        get_room(&*c, id).await
    }

    /// Renames, re-describes or moves a room to another boot server.
    pub async fn update_room(
        &self,
        id: i64,
        name: Option<&str>,
        description: Option<&str>,
        server: Option<&str>,
    ) -> Result<Room, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        get_room(&tx, id).await?;
        if let Some(n) = name {
            let n = check_name("room", n)?;
            tx.execute("UPDATE rooms SET name = $1 WHERE id = $2", &[&n, &id])
                .await
                .map_err(|e| unique(e, format!("a room named {n:?} exists")))?;
        }
        if let Some(d) = description {
            if d.len() > 1000 {
                return Err(DbError::Invalid(
                    "description is longer than 1000 bytes".into(),
                ));
            }
            tx.execute(
                "UPDATE rooms SET description = $1 WHERE id = $2",
                &[&d, &id],
            )
            .await?;
        }
        if let Some(s) = server {
            super::check_server_id(s)?;
            tx.execute("UPDATE rooms SET server = $1 WHERE id = $2", &[&s, &id])
                .await?;
        }
        let room = get_room(&tx, id).await?;
        tx.commit().await?;
        Ok(room)
    }

    /// Deletes a room; its machines stay, without a room.
    pub async fn delete_room(&self, id: i64) -> Result<(), DbError> {
        let n = self
            .conn()
            .await?
            .execute("DELETE FROM rooms WHERE id = $1", &[&id])
            .await?;
        if n == 0 {
            return Err(DbError::NotFound("room"));
        }
        Ok(())
    }

    /// A room and its machines.
    pub async fn room_with_machines(&self, id: i64) -> Result<(Room, Vec<Machine>), DbError> {
        let c = self.conn().await?;
        Ok((get_room(&*c, id).await?, room_machines(&*c, id).await?))
    }

    /// Every machine of a room.
    pub async fn room_machines(&self, id: i64) -> Result<Vec<Machine>, DbError> {
        room_machines(&*self.conn().await?, id).await
    }

    /// Machines matching `f`, ordered by room, seat, name; `(total, page)`.
    pub async fn list_machines(
        &self,
        f: &MachineFilter,
        offset: i64,
        limit: i64,
    ) -> Result<(i64, Vec<Machine>), DbError> {
        let mut cond = vec!["TRUE".to_owned()];
        let mut room_arg = None;
        let mut pat_arg = None;
        let mut n = 0;
        if let Some(r) = f.room_id {
            n += 1;
            room_arg = Some(r);
            cond.push(format!("m.room_id = ${n}"));
        }
        if f.unassigned {
            cond.push("m.room_id IS NULL".into());
        }
        if let Some(s) = f.search.as_ref().filter(|s| !s.trim().is_empty()) {
            n += 1;
            pat_arg = Some(format!(
                "%{}%",
                s.trim()
                    .to_lowercase()
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            ));
            cond.push(format!(
                "(lower(m.name) LIKE ${n} ESCAPE '\\' OR m.mac LIKE ${n} ESCAPE '\\' OR m.expected_ip LIKE ${n} ESCAPE '\\')"
            ));
        }
        if let Some(scope) = &f.scope {
            let ids: Vec<String> = scope.iter().map(i64::to_string).collect();
            if ids.is_empty() {
                cond.push("FALSE".into());
            } else {
                cond.push(format!("m.room_id IN ({})", ids.join(",")));
            }
        }
        let wh = cond.join(" AND ");
        let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        if let Some(r) = &room_arg {
            args.push(r);
        }
        if let Some(p) = &pat_arg {
            args.push(p);
        }
        let c = self.conn().await?;
        let total: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM machines m WHERE {wh}"),
                &args,
            )
            .await?
            .try_get(0)?;
        let (limit, offset) = (limit.clamp(1, 1000), offset.max(0));
        args.push(&limit);
        args.push(&offset);
        let sql = format!(
            "SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id WHERE {wh} \
             ORDER BY r.name IS NULL, lower(r.name), m.seat IS NULL, m.seat, m.name LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let rows = c.query(&sql, &args).await?;
        Ok((
            total,
            rows.iter().map(machine_row).collect::<Result<_, _>>()?,
        ))
    }

    /// One machine by id.
    pub async fn machine(&self, id: i64) -> Result<Machine, DbError> {
        get_machine(&*self.conn().await?, id).await
    }

    /// One machine by MAC.
    pub async fn machine_by_mac(&self, mac: MacAddr) -> Result<Option<Machine>, DbError> {
        machine_by_mac(&*self.conn().await?, mac).await
    }

    /// A machine's id by its exact name.
    pub async fn machine_id_by_name(&self, name: &str) -> Result<Option<i64>, DbError> {
        let c = self.conn().await?;
        Ok(
            match c
                .query_opt(
                    "SELECT id FROM machines WHERE name = $1 ORDER BY id LIMIT 1",
                    &[&name],
                )
                .await?
            {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            },
        )
    }

    /// Creates one machine (a MAC already known is a conflict).
    pub async fn create_machine(&self, m: &MachineInput) -> Result<Machine, DbError> {
        let c = self.conn().await?;
        let (id, _) = put_machine(&*c, m, false, false, &self.server).await?;
        get_machine(&*c, id).await
    }

    /// Applies a patch to a machine.
    pub async fn patch_machine(&self, id: i64, p: &MachinePatch) -> Result<Machine, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let cur = get_machine(&tx, id).await?;
        let name = match &p.name {
            Some(n) => check_name("machine", n)?,
            None => cur.name,
        };
        let room = if p.unassign {
            None
        } else if let Some(r) = p.room_id {
            get_room(&tx, r).await?;
            Some(r)
        } else {
            cur.room_id
        };
        let layout = match &p.disk_layout {
            Some(v) => check_layout(&Some(v.clone()))?,
            None => cur.disk_layout.map(|v| v.to_string()),
        };
        tx.execute(
            "UPDATE machines SET name = $1, room_id = $2, seat = $3, expected_ip = $4, disk_layout = $5 WHERE id = $6",
            &[
                &name,
                &room,
                &p.seat.or(cur.seat),
                &p.expected_ip.or(cur.expected_ip).map(|i| i.to_string()),
                &layout,
                &id,
            ],
        )
        .await?;
        let m = get_machine(&tx, id).await?;
        tx.commit().await?;
        Ok(m)
    }

    /// Deletes a machine.
    pub async fn delete_machine(&self, id: i64) -> Result<(), DbError> {
        let n = self
            .conn()
            .await?
            .execute("DELETE FROM machines WHERE id = $1", &[&id])
            .await?;
        if n == 0 {
            return Err(DbError::NotFound("machine"));
        }
        Ok(())
    }

    /// Every known MAC.
    pub async fn machine_macs(&self) -> Result<HashSet<MacAddr>, DbError> {
        let rows = self
            .conn()
            .await?
            .query("SELECT mac FROM machines", &[])
            .await?;
        let mut out = HashSet::new();
        for r in &rows {
            if let Ok(m) = r.try_get::<_, String>(0)?.parse() {
                out.insert(m);
            }
        }
        Ok(out)
    }

    /// Imports machines in one transaction (any bad entry changes nothing).
    pub async fn import(&self, machines: &[MachineInput]) -> Result<ImportReport, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let rep = import_in(&tx, machines, &self.server).await?;
        tx.commit().await?;
        Ok(rep)
    }

    /// Imports the TOML form (rooms with descriptions, even empty ones).
    pub async fn import_toml(&self, text: &str) -> Result<ImportReport, DbError> {
        let (machines, rooms) = super::super::rooms::parse_toml(text)?;
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let mut created = 0;
        for (name, desc) in &rooms {
            match room_id_by_name(&tx, name).await? {
                Some(id) if !desc.is_empty() => {
                    tx.execute(
                        "UPDATE rooms SET description = $1 WHERE id = $2",
                        &[desc, &id],
                    )
                    .await?;
                }
                Some(_) => {}
                None => {
                    create_room(&tx, name, desc, Some(&self.server)).await?;
                    created += 1;
                }
            }
        }
        let mut rep = import_in(&tx, &machines, &self.server).await?;
        rep.rooms_created += created;
        tx.commit().await?;
        Ok(rep)
    }

    /// Records the image a finished restore left on a machine.
    pub async fn set_machine_image(
        &self,
        mac: MacAddr,
        image: &str,
        version: Option<i64>,
        at: i64,
    ) -> Result<(), DbError> {
        self.conn()
            .await?
            .execute(
                "UPDATE machines SET image = $1, image_version = $2, imaged_at = $3 WHERE mac = $4",
                &[&image, &version, &at, &mac.to_string()],
            )
            .await?;
        Ok(())
    }

    // ---- deployments ----

    /// Stores a new deployment and its machines (all pending). It is
    /// carried out by the boot server that serves its room and its
    /// machines' rooms, whichever console it came from (this server when
    /// none of them names one); machines of rooms served by different
    /// servers are refused.
    pub async fn insert_deployment(&self, d: &NewDeployment) -> Result<Deployment, DbError> {
        if d.machines.is_empty() {
            return Err(DbError::Invalid("the deployment has no machines".into()));
        }
        let now = now_ms();
        let state = if d.start_at.is_some_and(|t| t > now) {
            DeploymentState::Scheduled
        } else {
            DeploymentState::Running
        };
        let layout = match &d.layout {
            Some(v) => Some(serde_json::to_string(v).map_err(|e| DbError::Decode(e.to_string()))?),
            None => None,
        };
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let ids: Vec<i64> = d.machines.iter().filter_map(|(_, id, _)| *id).collect();
        let rows = tx
            .query(
                "SELECT DISTINCT r.server FROM rooms r WHERE r.server IS NOT NULL AND \
                 (r.id = $1 OR r.id IN (SELECT m.room_id FROM machines m WHERE m.id = ANY($2))) \
                 ORDER BY r.server",
                &[&d.room_id, &ids],
            )
            .await?;
        let servers = rows
            .iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()?;
        let server = match servers.as_slice() {
            [] => self.server.to_string(),
            [one] => one.clone(),
            many => {
                return Err(DbError::Invalid(format!(
                    "the machines are in rooms served by different boot servers ({}): \
                     deploy each server's machines separately",
                    many.join(", ")
                )))
            }
        };
        let id: i64 = tx
            .query_one(
                "INSERT INTO deployments (kind, room_id, image, version, disk, partition, method, layout, after, \
                 start_at, max_concurrent, state, created_by, created_at, started_at, retry_of, total, server) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) RETURNING id",
                &[
                    &d.kind.as_str(),
                    &d.room_id,
                    &d.image,
                    &d.version,
                    &i64::from(d.disk),
                    &d.partition.map(i64::from),
                    &d.method,
                    &layout,
                    &d.after.as_str(),
                    &d.start_at,
                    &i64::from(d.max_concurrent),
                    &state.as_str(),
                    &d.created_by,
                    &now,
                    &(state == DeploymentState::Running).then_some(now),
                    &d.retry_of,
                    &(d.machines.len() as i64),
                    &server,
                ],
            )
            .await?
            .try_get(0)?;
        let st = tx
            .prepare(
                "INSERT INTO deployment_machines (deployment_id, mac, machine_id, name, state, updated_at, run) \
                 VALUES ($1, $2, $3, $4, 'pending', $5, $6)",
            )
            .await?;
        for (mac, mid, name) in &d.machines {
            let run = Run::new(run_key(id, *mac), now);
            let json = serde_json::to_string(&run).map_err(|e| DbError::Decode(e.to_string()))?;
            tx.execute(&st, &[&id, &mac.to_string(), mid, name, &now, &json])
                .await
                .map_err(|e| unique(e, format!("{mac} is listed twice")))?;
        }
        let dep = get_deployment(&tx, id).await?;
        tx.commit().await?;
        Ok(dep)
    }

    /// One deployment.
    pub async fn deployment(&self, id: i64) -> Result<Deployment, DbError> {
        get_deployment(&*self.conn().await?, id).await
    }

    /// A deployment's machines, in seat order.
    pub async fn deployment_machines(&self, id: i64) -> Result<Vec<DeploymentMachine>, DbError> {
        let rows = self
            .conn().await?
            .query(
                "SELECT dm.mac, dm.machine_id, dm.name, dm.run, dm.finished_at, dm.state, dm.reason, \
                 dm.bytes_done, dm.bytes_total, dm.updated_at FROM deployment_machines dm \
                 LEFT JOIN machines m ON m.id = dm.machine_id \
                 WHERE dm.deployment_id = $1 ORDER BY m.seat IS NULL, m.seat, dm.name",
                &[&id],
            )
            .await?;
        rows.iter().map(dm_row).collect()
    }

    /// The MACs of a deployment's machines in `state`.
    pub async fn deployment_macs(&self, id: i64, state: &str) -> Result<Vec<MacAddr>, DbError> {
        let rows = self
            .conn().await?
            .query(
                "SELECT mac FROM deployment_machines WHERE deployment_id = $1 AND state = $2 ORDER BY name",
                &[&id, &state],
            )
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            if let Ok(m) = r.try_get::<_, String>(0)?.parse() {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Whether a machine is part of a deployment.
    pub async fn deployment_has(&self, id: i64, mac: MacAddr) -> Result<bool, DbError> {
        Ok(self
            .conn()
            .await?
            .query_opt(
                "SELECT 1 FROM deployment_machines WHERE deployment_id = $1 AND mac = $2",
                &[&id, &mac.to_string()],
            )
            .await?
            .is_some())
    }

    /// Deployments newest first (keyset paging), limited to `scope`.
    pub async fn list_deployments(
        &self,
        scope: Option<&[i64]>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Deployment>, DbError> {
        let scope_sql = match scope {
            Some([]) => "AND FALSE".to_owned(),
            Some(s) => format!(
                "AND d.room_id IN ({})",
                s.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ),
            None => String::new(),
        };
        let rows = self
            .conn()
            .await?
            .query(
                &format!(
                    "SELECT {DEP_COLS} FROM deployments d LEFT JOIN rooms r ON r.id = d.room_id \
                     WHERE d.id < $1 {scope_sql} ORDER BY d.id DESC LIMIT $2"
                ),
                &[&before.unwrap_or(i64::MAX), &limit.clamp(1, 500)],
            )
            .await?;
        rows.iter().map(dep_row).collect()
    }

    /// Writes machine runs, each unless another boot server holds the
    /// machine under a live lease (a server whose claim was taken over
    /// writes nothing more for it). Returns the rows written.
    pub async fn save_runs(
        &self,
        deployment: i64,
        runs: &[(MacAddr, Run, Option<i64>)],
    ) -> Result<u64, DbError> {
        let now = now_ms();
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        let st = tx
            .prepare(
                "UPDATE deployment_machines dm SET state = $1, reason = $2, bytes_done = $3, bytes_total = $4, \
                 rate_bps = $5, updated_at = $6, finished_at = $7, run = $8 WHERE dm.deployment_id = $9 AND dm.mac = $10 \
                 AND NOT EXISTS (SELECT 1 FROM machine_claims c WHERE c.mac = dm.mac \
                   AND c.server <> $11 AND c.lease_until >= $6)",
            )
            .await?;
        let mut n = 0;
        for (mac, run, finished) in runs {
            let json = serde_json::to_string(run).map_err(|e| DbError::Decode(e.to_string()))?;
            n += tx
                .execute(
                    &st,
                    &[
                        &run.phase.as_str(),
                        &run.reason,
                        &(run.bytes_done as i64),
                        &(run.bytes_total as i64),
                        &run.rate_bps,
                        &now,
                        finished,
                        &json,
                        &deployment,
                        &mac.to_string(),
                        &&*self.server,
                    ],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Updates a deployment's state and counters from its machines' rows.
    pub async fn set_deployment_state(
        &self,
        id: i64,
        state: DeploymentState,
    ) -> Result<(), DbError> {
        set_state(&*self.conn().await?, id, state).await
    }

    /// Ends a deployment: the image on the machines that restored it,
    /// state and counters, the runs compacted, and this server's claims
    /// on its machines released (one transaction).
    pub async fn end_deployment(
        &self,
        id: i64,
        state: DeploymentState,
        restored: &[(MacAddr, i64)],
        image: &str,
        version: Option<i64>,
    ) -> Result<Deployment, DbError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await?;
        for (mac, at) in restored {
            tx.execute(
                "UPDATE machines SET image = $1, image_version = $2, imaged_at = $3 WHERE mac = $4",
                &[&image, &version, at, &mac.to_string()],
            )
            .await?;
        }
        set_state(&tx, id, state).await?;
        tx.execute(
            "UPDATE deployment_machines SET run = '' WHERE deployment_id = $1",
            &[&id],
        )
        .await?;
        tx.execute(
            "DELETE FROM machine_claims WHERE deployment_id = $1 AND server = $2",
            &[&id, &&*self.server],
        )
        .await?;
        let d = get_deployment(&tx, id).await?;
        tx.commit().await?;
        Ok(d)
    }

    /// Machines per image they run (finished restores).
    pub async fn machines_per_image(&self) -> Result<Vec<(String, i64, Vec<String>)>, DbError> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT image, count(*), string_agg(name, ', ' ORDER BY name) FROM machines \
                 WHERE image IS NOT NULL GROUP BY image ORDER BY image",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let names: Option<String> = r.try_get(2)?;
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    names
                        .map(|s| s.split(", ").map(str::to_owned).collect())
                        .unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Asks the boot server carrying out deployment `id` to cancel it
    /// (`mac`: one machine of it), from this server's console.
    pub async fn request_cancel(&self, id: i64, mac: Option<MacAddr>) -> Result<(), DbError> {
        self.conn()
            .await?
            .execute(
                "INSERT INTO deployment_cancels (deployment_id, mac, requested_at, requested_on) \
                 VALUES ($1, $2, $3, $4)",
                &[&id, &mac.map(|m| m.to_string()), &now_ms(), &&*self.server],
            )
            .await?;
        Ok(())
    }

    /// Takes the cancels asked for this server's deployments (each once).
    pub async fn take_cancels(&self) -> Result<Vec<(i64, Option<MacAddr>)>, DbError> {
        let rows = self
            .conn()
            .await?
            .query(
                "DELETE FROM deployment_cancels c USING deployments d \
                 WHERE d.id = c.deployment_id AND d.server = $1 \
                 RETURNING c.deployment_id, c.mac, c.id",
                &[&&*self.server],
            )
            .await?;
        let mut out: Vec<(i64, i64, Option<MacAddr>)> = Vec::new();
        for r in &rows {
            let mac: Option<String> = r.try_get(1)?;
            let mac = match mac {
                Some(m) => Some(
                    m.parse()
                        .map_err(|_| DbError::Decode(format!("stored MAC {m:?}")))?,
                ),
                None => None,
            };
            out.push((r.try_get(2)?, r.try_get(0)?, mac));
        }
        // In the order they were asked.
        out.sort_by_key(|(n, _, _)| *n);
        Ok(out.into_iter().map(|(_, id, mac)| (id, mac)).collect())
    }

    // ---- sessions ----

    /// Stores a new session (and drops expired ones).
    pub async fn create_session(
        &self,
        secret: &str,
        user: &str,
        csrf: &str,
        ttl_ms: i64,
    ) -> Result<Session, DbError> {
        let now = now_ms();
        let c = self.conn().await?;
        c.execute("DELETE FROM sessions WHERE expires_at < $1", &[&now])
            .await?;
        c.execute(
            "INSERT INTO sessions (id, \"user\", csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
            &[&hash_secret(secret), &user, &csrf, &now, &(now + ttl_ms)],
        )
        .await?;
        Ok(Session {
            user: user.to_owned(),
            csrf: csrf.to_owned(),
            expires_at: now + ttl_ms,
        })
    }

    /// The live session of a cookie secret.
    pub async fn lookup_session(&self, secret: &str) -> Result<Option<Session>, DbError> {
        let r = self
            .conn()
            .await?
            .query_opt(
                "SELECT \"user\", csrf, expires_at FROM sessions WHERE id = $1 AND expires_at > $2",
                &[&hash_secret(secret), &now_ms()],
            )
            .await?;
        match r {
            Some(r) => Ok(Some(Session {
                user: r.try_get(0)?,
                csrf: r.try_get(1)?,
                expires_at: r.try_get(2)?,
            })),
            None => Ok(None),
        }
    }

    /// Ends the session of a cookie secret.
    pub async fn delete_session(&self, secret: &str) -> Result<(), DbError> {
        self.conn()
            .await?
            .execute(
                "DELETE FROM sessions WHERE id = $1",
                &[&hash_secret(secret)],
            )
            .await?;
        Ok(())
    }

    /// Live sessions, newest first, of one user or all.
    pub async fn list_sessions(&self, user: Option<&str>) -> Result<Vec<SessionInfo>, DbError> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT id, \"user\", created_at, expires_at FROM sessions \
                 WHERE expires_at > $1 AND ($2::text IS NULL OR \"user\" = $2) \
                 ORDER BY created_at DESC LIMIT $3",
                &[&now_ms(), &user, &(LIST_MAX as i64)],
            )
            .await?;
        rows.iter().map(session_info).collect()
    }

    /// One live session by id.
    pub async fn session(&self, id: &str) -> Result<Option<SessionInfo>, DbError> {
        let r = self
            .conn().await?
            .query_opt(
                "SELECT id, \"user\", created_at, expires_at FROM sessions WHERE id = $1 AND expires_at > $2",
                &[&id, &now_ms()],
            )
            .await?;
        r.as_ref().map(session_info).transpose()
    }

    /// Ends a session by id.
    pub async fn revoke_session(&self, id: &str) -> Result<bool, DbError> {
        Ok(self
            .conn()
            .await?
            .execute("DELETE FROM sessions WHERE id = $1", &[&id])
            .await?
            > 0)
    }

    // ---- command log ----

    /// Appends to the command log.
    pub async fn log_append(
        &self,
        who: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: Option<&str>,
    ) -> Result<i64, DbError> {
        let r = self
            .conn()
            .await?
            .query_one(
                "INSERT INTO command_log (at, who, action, target, outcome, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&now_ms(), &who, &action, &target, &outcome, &detail],
            )
            .await?;
        Ok(r.try_get(0)?)
    }

    /// The command log, newest first.
    pub async fn log_list(
        &self,
        who: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Entry>, DbError> {
        let rows = self
            .conn()
            .await?
            .query(
                "SELECT id, at, who, action, target, outcome, detail FROM command_log \
                 WHERE id < $1 AND ($3::text IS NULL OR who = $3) ORDER BY id DESC LIMIT $2",
                &[&before.unwrap_or(i64::MAX), &limit.clamp(1, 500), &who],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Entry {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    who: r.try_get(2)?,
                    action: r.try_get(3)?,
                    target: r.try_get(4)?,
                    outcome: r.try_get(5)?,
                    detail: r.try_get(6)?,
                })
            })
            .collect()
    }
}

async fn set_state<C: GenericClient>(
    c: &C,
    id: i64,
    state: DeploymentState,
) -> Result<(), DbError> {
    c.execute(
        "UPDATE deployments SET state = $1, \
           started_at = CASE WHEN $1 = 'running' THEN coalesce(started_at, $2) ELSE started_at END, \
           finished_at = CASE WHEN $1 IN ('finished', 'cancelled') THEN coalesce(finished_at, $2) ELSE finished_at END, \
           done = (SELECT count(*) FROM deployment_machines WHERE deployment_id = $3 AND state = 'done'), \
           failed = (SELECT count(*) FROM deployment_machines WHERE deployment_id = $3 AND state = 'failed'), \
           cancelled = (SELECT count(*) FROM deployment_machines WHERE deployment_id = $3 AND state = 'cancelled') \
         WHERE id = $3",
        &[&state.as_str(), &now_ms(), &id],
    )
    .await?;
    Ok(())
}
