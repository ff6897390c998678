//! Rooms and machines: CRUD, paging, and imports from CSV or TOML.
//!
//! A machine is known by its MAC (unique); it has a name, optionally a room
//! and a seat (its place in the room's grid), an expected IP address (where
//! Wake-on-LAN aims and what the console shows before DHCP saw it) and an
//! optional disk layout (the imager's `LayoutSpec`, used by deployments
//! that lay out disks per machine).

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{now_ms, DbError};
use crate::mac::MacAddr;

/// A room.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Room {
    /// Id.
    pub id: i64,
    /// Unique name (case-insensitive).
    pub name: String,
    /// Free text.
    pub description: String,
    /// Machines in it.
    pub machines: i64,
    /// The boot server that serves it (shared database only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// A machine.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Machine {
    /// Id.
    pub id: i64,
    /// MAC (lowercase, colons).
    pub mac: MacAddr,
    /// Name.
    pub name: String,
    /// Room id.
    pub room_id: Option<i64>,
    /// Room name.
    pub room: Option<String>,
    /// Place in the room grid.
    pub seat: Option<i64>,
    /// Expected IPv4 address.
    pub expected_ip: Option<std::net::Ipv4Addr>,
    /// Disk layout (`LayoutSpec` JSON).
    pub disk_layout: Option<serde_json::Value>,
    /// Image last restored by a deployment.
    pub image: Option<String>,
    /// Its version.
    pub image_version: Option<i64>,
    /// When (ms).
    pub imaged_at: Option<i64>,
    /// The machine's latest deployment: id, per-machine state, and when
    /// that machine's part of it ended (ms), if it has.
    pub last_deployment: Option<(i64, String, Option<i64>)>,
}

/// Create or update a machine.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachineInput {
    /// MAC.
    pub mac: MacAddr,
    /// Name (default: the MAC).
    #[serde(default)]
    pub name: Option<String>,
    /// Room by id.
    #[serde(default)]
    pub room_id: Option<i64>,
    /// Room by name (created by imports when missing).
    #[serde(default)]
    pub room: Option<String>,
    /// Seat.
    #[serde(default)]
    pub seat: Option<i64>,
    /// Expected IP.
    #[serde(default, alias = "ip")]
    pub expected_ip: Option<std::net::Ipv4Addr>,
    /// Disk layout.
    #[serde(default, alias = "layout")]
    pub disk_layout: Option<serde_json::Value>,
}

/// Which machines to list.
#[derive(Debug, Clone, Default)]
pub struct MachineFilter {
    /// Only this room.
    pub room_id: Option<i64>,
    /// Only machines without a room.
    pub unassigned: bool,
    /// Name, MAC or IP contains this.
    pub search: Option<String>,
    /// Only these rooms (an operator's scope); `None` = all, and machines
    /// without a room are visible only then.
    pub scope: Option<Vec<i64>>,
}

const MACHINE_COLS: &str = "m.id, m.mac, m.name, m.room_id, r.name, m.seat, m.expected_ip, \
    m.disk_layout, m.image, m.image_version, m.imaged_at, \
    (SELECT dm.deployment_id || ' ' || dm.state || ' ' || COALESCE(dm.finished_at, '') \
       FROM deployment_machines dm \
       WHERE dm.mac = m.mac ORDER BY dm.deployment_id DESC LIMIT 1)";

/// A machine's last deployment as the queries give it: "id state [finished_at]".
pub(crate) fn last_deployment(s: &str) -> Option<(i64, String, Option<i64>)> {
    let mut w = s.split(' ');
    let id = w.next()?.parse().ok()?;
    let st = w.next()?.to_owned();
    Some((id, st, w.next().and_then(|t| t.parse().ok())))
}

fn machine_row(r: &Row<'_>) -> rusqlite::Result<Machine> {
    let mac: String = r.get(1)?;
    let ip: Option<String> = r.get(6)?;
    let layout: Option<String> = r.get(7)?;
    let last: Option<String> = r.get(11)?;
    Ok(Machine {
        id: r.get(0)?,
        mac: mac.parse().unwrap_or_default(),
        name: r.get(2)?,
        room_id: r.get(3)?,
        room: r.get(4)?,
        seat: r.get(5)?,
        expected_ip: ip.and_then(|s| s.parse().ok()),
        disk_layout: layout.and_then(|s| serde_json::from_str(&s).ok()),
        image: r.get(8)?,
        image_version: r.get(9)?,
        imaged_at: r.get(10)?,
        last_deployment: last.as_deref().and_then(last_deployment),
    })
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<String, DbError> {
    let n = name.trim();
    if n.is_empty() || n.len() > 64 || n.chars().any(char::is_control) {
        return Err(DbError::Invalid(format!(
            "{what} name {name:?} must be 1-64 printable characters"
        )));
    }
    Ok(n.to_owned())
}

pub(crate) fn check_layout(v: &Option<serde_json::Value>) -> Result<Option<String>, DbError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => {
            let spec: aula_imager::disk::layout::LayoutSpec = serde_json::from_value(v.clone())
                .map_err(|e| DbError::Invalid(format!("disk layout: {e}")))?;
            Ok(Some(
                serde_json::to_string(&spec).map_err(|e| DbError::Decode(e.to_string()))?,
            ))
        }
    }
}

/// Every room with its machine count, by name.
pub fn list_rooms(c: &Connection, scope: Option<&[i64]>) -> Result<Vec<Room>, DbError> {
    let mut st = c.prepare_cached(
        "SELECT r.id, r.name, r.description, (SELECT count(*) FROM machines m WHERE m.room_id = r.id) \
         FROM rooms r ORDER BY r.name",
    )?;
    let rows = st.query_map([], |r| {
        Ok(Room {
            id: r.get(0)?,
            name: r.get(1)?,
            description: r.get(2)?,
            machines: r.get(3)?,
            server: None,
        })
    })?;
    let mut out = Vec::new();
    for r in rows {
        let r = r?;
        if scope.is_none_or(|s| s.contains(&r.id)) {
            out.push(r);
        }
    }
    Ok(out)
}

/// One room.
pub fn get_room(c: &Connection, id: i64) -> Result<Room, DbError> {
    c.query_row(
        "SELECT r.id, r.name, r.description, (SELECT count(*) FROM machines m WHERE m.room_id = r.id) \
         FROM rooms r WHERE r.id = ?1",
        [id],
        |r| {
            Ok(Room {
                id: r.get(0)?,
                name: r.get(1)?,
                description: r.get(2)?,
                machines: r.get(3)?,
                server: None,
            })
        },
    )
    .optional()?
    .ok_or(DbError::NotFound("room"))
}

/// A room's id by name (case-insensitive).
pub fn room_id_by_name(c: &Connection, name: &str) -> Result<Option<i64>, DbError> {
    Ok(
        c.query_row("SELECT id FROM rooms WHERE name = ?1", [name.trim()], |r| {
            r.get(0)
        })
        .optional()?,
    )
}

/// Creates a room.
pub fn create_room(c: &Connection, name: &str, description: &str) -> Result<i64, DbError> {
    let name = check_name("room", name)?;
    if description.len() > 1000 {
        return Err(DbError::Invalid(
            "description is longer than 1000 bytes".into(),
        ));
    }
    c.execute(
        "INSERT INTO rooms (name, description, created_at) VALUES (?1, ?2, ?3)",
        params![name, description, now_ms()],
    )
    .map_err(|e| DbError::unique(e, format!("a room named {name:?} exists")))?;
    Ok(c.last_insert_rowid())
}

/// Renames or re-describes a room.
pub fn update_room(
    c: &Connection,
    id: i64,
    name: Option<&str>,
    description: Option<&str>,
) -> Result<(), DbError> {
    get_room(c, id)?;
    if let Some(n) = name {
        let n = check_name("room", n)?;
        c.execute("UPDATE rooms SET name = ?1 WHERE id = ?2", params![n, id])
            .map_err(|e| DbError::unique(e, format!("a room named {n:?} exists")))?;
    }
    if let Some(d) = description {
        c.execute(
            "UPDATE rooms SET description = ?1 WHERE id = ?2",
            params![d, id],
        )?;
    }
    Ok(())
}

/// Deletes a room; its machines stay, without a room.
pub fn delete_room(c: &Connection, id: i64) -> Result<(), DbError> {
    if c.execute("DELETE FROM rooms WHERE id = ?1", [id])? == 0 {
        return Err(DbError::NotFound("room"));
    }
    Ok(())
}

/// Machines matching `f`, ordered by room, seat, name; `(total, page)`.
pub fn list_machines(
    c: &Connection,
    f: &MachineFilter,
    offset: i64,
    limit: i64,
) -> Result<(i64, Vec<Machine>), DbError> {
    let mut cond = vec!["1 = 1".to_owned()];
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(r) = f.room_id {
        args.push(r.into());
        cond.push(format!("m.room_id = ?{}", args.len()));
    }
    if f.unassigned {
        cond.push("m.room_id IS NULL".into());
    }
    if let Some(s) = f.search.as_ref().filter(|s| !s.trim().is_empty()) {
        let pat = format!(
            "%{}%",
            s.trim()
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        args.push(pat.into());
        let n = args.len();
        cond.push(format!(
            "(lower(m.name) LIKE ?{n} ESCAPE '\\' OR m.mac LIKE ?{n} ESCAPE '\\' OR m.expected_ip LIKE ?{n} ESCAPE '\\')"
        ));
    }
    if let Some(scope) = &f.scope {
        let ids: Vec<String> = scope.iter().map(i64::to_string).collect();
        cond.push(format!("m.room_id IN ({})", ids.join(",")));
    }
    let wh = cond.join(" AND ");
    let total: i64 = c.query_row(
        &format!("SELECT count(*) FROM machines m WHERE {wh}"),
        rusqlite::params_from_iter(args.iter()),
        |r| r.get(0),
    )?;
    args.push(limit.clamp(1, 1000).into());
    let nl = args.len();
    args.push(offset.max(0).into());
    let no = args.len();
    let sql = format!(
        "SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id WHERE {wh} \
         ORDER BY r.name IS NULL, r.name, m.seat IS NULL, m.seat, m.name LIMIT ?{nl} OFFSET ?{no}"
    );
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(rusqlite::params_from_iter(args.iter()), machine_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok((total, out))
}

/// One machine by id.
pub fn get_machine(c: &Connection, id: i64) -> Result<Machine, DbError> {
    c.query_row(
        &format!("SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id WHERE m.id = ?1"),
        [id],
        machine_row,
    )
    .optional()?
    .ok_or(DbError::NotFound("machine"))
}

/// One machine by MAC.
pub fn machine_by_mac(c: &Connection, mac: MacAddr) -> Result<Option<Machine>, DbError> {
    Ok(c
        .query_row(
            &format!("SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id WHERE m.mac = ?1"),
            [mac.to_string()],
            machine_row,
        )
        .optional()?)
}

/// Every machine of a room (the room grid), by seat then name.
pub fn room_machines(c: &Connection, room_id: i64) -> Result<Vec<Machine>, DbError> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {MACHINE_COLS} FROM machines m LEFT JOIN rooms r ON r.id = m.room_id \
         WHERE m.room_id = ?1 ORDER BY m.seat IS NULL, m.seat, m.name"
    ))?;
    let rows = st.query_map([room_id], machine_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok(out)
}

fn resolve_room(c: &Connection, m: &MachineInput, create: bool) -> Result<Option<i64>, DbError> {
    if let Some(id) = m.room_id {
        get_room(c, id)?;
        return Ok(Some(id));
    }
    match m.room.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(name) => match room_id_by_name(c, name)? {
            Some(id) => Ok(Some(id)),
            None if create => Ok(Some(create_room(c, name, "")?)),
            None => Err(DbError::Invalid(format!("no room named {name:?}"))),
        },
    }
}

/// Creates a machine, or updates the one with that MAC (`upsert`).
/// Returns its id and whether it was created.
pub fn put_machine(
    c: &Connection,
    m: &MachineInput,
    upsert: bool,
    create_rooms: bool,
) -> Result<(i64, bool), DbError> {
    if m.mac.is_multicast() || m.mac.0 == [0; 6] {
        return Err(DbError::Invalid(format!("{} is not a unicast MAC", m.mac)));
    }
    let name = check_name("machine", m.name.as_deref().unwrap_or(&m.mac.to_string()))?;
    let room = resolve_room(c, m, create_rooms)?;
    let layout = check_layout(&m.disk_layout)?;
    if let Some(s) = m.seat {
        if !(0..=10_000).contains(&s) {
            return Err(DbError::Invalid(format!("seat {s} is outside 0-10000")));
        }
    }
    let ip = m.expected_ip.map(|i| i.to_string());
    let mac = m.mac.to_string();
    let existing: Option<i64> = c
        .query_row("SELECT id FROM machines WHERE mac = ?1", [&mac], |r| {
            r.get(0)
        })
        .optional()?;
    match existing {
        Some(id) if upsert => {
            c.execute(
                "UPDATE machines SET name = ?1, room_id = ?2, seat = ?3, expected_ip = ?4, \
                 disk_layout = coalesce(?5, disk_layout) WHERE id = ?6",
                params![name, room, m.seat, ip, layout, id],
            )?;
            Ok((id, false))
        }
        Some(_) => Err(DbError::Conflict(format!(
            "a machine with MAC {mac} exists"
        ))),
        None => {
            c.execute(
                "INSERT INTO machines (mac, name, room_id, seat, expected_ip, disk_layout, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![mac, name, room, m.seat, ip, layout, now_ms()],
            )?;
            Ok((c.last_insert_rowid(), true))
        }
    }
}

/// Partial update of a machine.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New room (`null` leaves it; use `unassign` to remove).
    #[serde(default)]
    pub room_id: Option<i64>,
    /// Remove from its room.
    #[serde(default)]
    pub unassign: bool,
    /// Seat.
    #[serde(default)]
    pub seat: Option<i64>,
    /// Expected IP.
    #[serde(default)]
    pub expected_ip: Option<std::net::Ipv4Addr>,
    /// Disk layout.
    #[serde(default)]
    pub disk_layout: Option<serde_json::Value>,
}

/// Applies a patch.
pub fn patch_machine(c: &Connection, id: i64, p: &MachinePatch) -> Result<(), DbError> {
    let cur = get_machine(c, id)?;
    let name = match &p.name {
        Some(n) => check_name("machine", n)?,
        None => cur.name,
    };
    let room = if p.unassign {
        None
    } else if let Some(r) = p.room_id {
        get_room(c, r)?;
        Some(r)
    } else {
        cur.room_id
    };
    let layout = match &p.disk_layout {
        Some(v) => check_layout(&Some(v.clone()))?,
        None => cur.disk_layout.map(|v| v.to_string()),
    };
    c.execute(
        "UPDATE machines SET name = ?1, room_id = ?2, seat = ?3, expected_ip = ?4, disk_layout = ?5 WHERE id = ?6",
        params![
            name,
            room,
            p.seat.or(cur.seat),
            p.expected_ip.or(cur.expected_ip).map(|i| i.to_string()),
            layout,
            id
        ],
    )?;
    Ok(())
}

/// Deletes a machine (its deployment history keeps its MAC and name).
pub fn delete_machine(c: &Connection, id: i64) -> Result<(), DbError> {
    if c.execute("DELETE FROM machines WHERE id = ?1", [id])? == 0 {
        return Err(DbError::NotFound("machine"));
    }
    Ok(())
}

/// Records the image a finished restore left on a machine.
pub fn set_machine_image(
    c: &Connection,
    mac: MacAddr,
    image: &str,
    version: Option<i64>,
    at: i64,
) -> Result<(), DbError> {
    c.execute(
        "UPDATE machines SET image = ?1, image_version = ?2, imaged_at = ?3 WHERE mac = ?4",
        params![image, version, at, mac.to_string()],
    )?;
    Ok(())
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ImportReport {
    /// Rooms created.
    pub rooms_created: usize,
    /// Machines created.
    pub machines_created: usize,
    /// Machines updated (same MAC).
    pub machines_updated: usize,
}

/// Imports machines (creating missing rooms, updating machines by MAC) in
/// one transaction: any bad line refuses the whole import.
pub fn import(c: &mut Connection, machines: &[MachineInput]) -> Result<ImportReport, DbError> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let rooms_before: i64 = tx.query_row("SELECT count(*) FROM rooms", [], |r| r.get(0))?;
    let mut rep = ImportReport::default();
    let mut seen = std::collections::HashSet::new();
    for (i, m) in machines.iter().enumerate() {
        if !seen.insert(m.mac) {
            return Err(DbError::Invalid(format!(
                "entry {}: MAC {} is listed twice",
                i + 1,
                m.mac
            )));
        }
        let (_, created) = put_machine(&tx, m, true, true).map_err(|e| match e {
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
    let rooms_after: i64 = tx.query_row("SELECT count(*) FROM rooms", [], |r| r.get(0))?;
    rep.rooms_created = (rooms_after - rooms_before).max(0) as usize;
    tx.commit()?;
    Ok(rep)
}

/// Parses a CSV file: a header line naming the columns (`mac` required;
/// `name`, `room`, `ip`, `seat` optional, any order), then one machine a
/// line. Quoted fields (`"a,b"`, `""` for a quote) are understood.
pub fn parse_csv(text: &str) -> Result<Vec<MachineInput>, DbError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (_, header) = lines
        .next()
        .ok_or_else(|| DbError::Invalid("the CSV file is empty".into()))?;
    let cols: Vec<String> = split_csv(header, 1)?
        .into_iter()
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let idx = |name: &str| cols.iter().position(|c| c == name);
    let mac_i =
        idx("mac").ok_or_else(|| DbError::Invalid("the CSV header has no mac column".into()))?;
    for c in &cols {
        if !["mac", "name", "room", "ip", "expected_ip", "seat"].contains(&c.as_str()) {
            return Err(DbError::Invalid(format!(
                "unknown CSV column {c:?} (known: mac, name, room, ip, seat)"
            )));
        }
    }
    let ip_i = idx("ip").or(idx("expected_ip"));
    let mut out = Vec::new();
    for (n, line) in lines {
        let lineno = n + 1;
        let f = split_csv(line, lineno)?;
        if f.len() != cols.len() {
            return Err(DbError::Invalid(format!(
                "line {lineno}: {} fields, the header has {}",
                f.len(),
                cols.len()
            )));
        }
        let get = |i: Option<usize>| i.map(|i| f[i].trim().to_owned()).filter(|s| !s.is_empty());
        let mac = f[mac_i]
            .trim()
            .parse::<MacAddr>()
            .map_err(|e| DbError::Invalid(format!("line {lineno}: {e}")))?;
        let expected_ip = match get(ip_i) {
            Some(s) => Some(s.parse().map_err(|_| {
                DbError::Invalid(format!("line {lineno}: {s:?} is not an IPv4 address"))
            })?),
            None => None,
        };
        let seat = match get(idx("seat")) {
            Some(s) => Some(s.parse().map_err(|_| {
                DbError::Invalid(format!("line {lineno}: seat {s:?} is not a number"))
            })?),
            None => None,
        };
        out.push(MachineInput {
            mac,
            name: get(idx("name")),
            room: get(idx("room")),
            seat,
            expected_ip,
            ..Default::default()
        });
    }
    Ok(out)
}

fn split_csv(line: &str, lineno: usize) -> Result<Vec<String>, DbError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    if quoted {
        return Err(DbError::Invalid(format!(
            "line {lineno}: unterminated quote"
        )));
    }
    out.push(cur);
    Ok(out)
}

/// The TOML import form:
///
/// ```toml
/// [[room]]
/// name = "Aula 3"
/// description = "second floor"
/// [[room.machine]]
/// name = "a3-pc01"
/// mac = "52:54:00:00:03:01"
/// ip = "10.0.3.11"
/// seat = 1
/// layout = { table = "gpt", partitions = [ ... ] }
///
/// [[machine]]          # machines without a room
/// mac = "52:54:00:00:09:01"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlImport {
    #[serde(default)]
    room: Vec<TomlRoom>,
    #[serde(default)]
    machine: Vec<TomlMachine>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlRoom {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    machine: Vec<TomlMachine>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlMachine {
    mac: MacAddr,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    ip: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    seat: Option<i64>,
    #[serde(default)]
    layout: Option<toml::Value>,
}

/// Rooms of an import: name and description.
pub type RoomDescriptions = Vec<(String, String)>;

/// Parses the TOML form; returns the machines and room descriptions.
pub fn parse_toml(text: &str) -> Result<(Vec<MachineInput>, RoomDescriptions), DbError> {
    let t: TomlImport = toml::from_str(text).map_err(|e| DbError::Invalid(format!("TOML: {e}")))?;
    let conv = |m: TomlMachine, room: Option<&str>| -> Result<MachineInput, DbError> {
        let layout = match m.layout {
            Some(v) => Some(
                serde_json::to_value(v).map_err(|e| DbError::Invalid(format!("layout: {e}")))?,
            ),
            None => None,
        };
        Ok(MachineInput {
            mac: m.mac,
            name: m.name,
            room: room.map(str::to_owned),
            seat: m.seat,
            expected_ip: m.ip,
            disk_layout: layout,
            room_id: None,
        })
    };
    let mut out = Vec::new();
    let mut rooms = Vec::new();
    for r in t.room {
        rooms.push((r.name.clone(), r.description.clone().unwrap_or_default()));
        for m in r.machine {
            out.push(conv(m, Some(&r.name))?);
        }
    }
    for m in t.machine {
        out.push(conv(m, None)?);
    }
    Ok((out, rooms))
}

/// Imports the TOML form (rooms with descriptions, even empty ones).
pub fn import_toml(c: &mut Connection, text: &str) -> Result<ImportReport, DbError> {
    let (machines, rooms) = parse_toml(text)?;
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut created = 0;
    for (name, desc) in &rooms {
        match room_id_by_name(&tx, name)? {
            Some(id) if !desc.is_empty() => update_room(&tx, id, None, Some(desc))?,
            Some(_) => {}
            None => {
                create_room(&tx, name, desc)?;
                created += 1;
            }
        }
    }
    tx.commit()?;
    let mut rep = import(c, &machines)?;
    rep.rooms_created += created;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, super::super::Db) {
        let d = tempfile::tempdir().expect("tempdir");
        let db = super::super::Db::open(d.path()).expect("open");
        (d, db)
    }

    #[test]
    fn csv_import_creates_rooms_and_machines_and_a_bad_line_changes_nothing() {
        let (_d, db) = db();
        let csv = "name,mac,room,ip,seat\n\
                   pc01,52:54:00:00:01:01,Aula 1,10.0.1.11,1\n\
                   \"pc, two\",52-54-00-00-01-02,Aula 1,,2\n\
                   lone,52:54:00:00:09:01,,,\n";
        let rep = db
            .call_blocking(|c| import(c, &parse_csv(csv)?))
            .expect("import");
        assert_eq!(
            rep,
            ImportReport {
                rooms_created: 1,
                machines_created: 3,
                machines_updated: 0
            }
        );
        let (total, ms) = db
            .call_blocking(|c| list_machines(c, &MachineFilter::default(), 0, 50))
            .expect("list");
        assert_eq!(total, 3);
        assert_eq!(ms[1].name, "pc, two");
        assert_eq!(ms[0].expected_ip, Some("10.0.1.11".parse().expect("ip")));
        assert_eq!(ms[2].room, None);
        // A bad MAC on the last line: nothing of this import is stored.
        let bad = "name,mac,room\nnew,52:54:00:00:02:01,Aula 2\nbroken,zz:54:00:00:02:02,Aula 2\n";
        let e = db
            .call_blocking(|c| import(c, &parse_csv(bad)?))
            .expect_err("bad mac");
        assert!(e.to_string().contains("line 3"), "{e}");
        let rooms = db.call_blocking(|c| list_rooms(c, None)).expect("rooms");
        assert_eq!(rooms.len(), 1, "{rooms:?}");
        // A bad IP names the line too.
        let e = parse_csv("mac,ip\n52:54:00:00:02:01,10.0.0.300\n").expect_err("ip");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn toml_import_keeps_layouts_and_updates_by_mac() {
        let (_d, db) = db();
        let text = r#"
[[room]]
name = "Aula 3"
description = "second floor"
[[room.machine]]
name = "a3-pc01"
mac = "52:54:00:00:03:01"
ip = "10.0.3.11"
seat = 1
layout = { table = "gpt", partitions = [ { number = 1, type = "linux", size = "rest", filesystem = "ext4" } ] }
[[machine]]
mac = "52:54:00:00:09:09"
"#;
        let rep = db.call_blocking(|c| import_toml(c, text)).expect("import");
        assert_eq!(rep.rooms_created, 1);
        assert_eq!(rep.machines_created, 2);
        let m = db
            .call_blocking(|c| machine_by_mac(c, "52:54:00:00:03:01".parse().expect("mac")))
            .expect("get")
            .expect("present");
        assert_eq!(m.room.as_deref(), Some("Aula 3"));
        assert_eq!(m.disk_layout.as_ref().expect("layout")["table"], "gpt");
        let again = db.call_blocking(|c| import_toml(c, text)).expect("again");
        assert_eq!(again.machines_updated, 2);
        assert_eq!(again.machines_created, 0);
        let bad = "[[machine]]\nmac = \"52:54:00:00:09:0a\"\nlayout = { table = \"gpt\", partitions = [ { number = 1, type = \"linux\", size = \"1x\" } ] }\n";
        assert!(db.call_blocking(|c| import_toml(c, bad)).is_err());
    }

    #[test]
    fn rooms_and_machines_crud_with_conflicts_and_scope() {
        let (_d, db) = db();
        db.call_blocking(|c| {
            let a = create_room(c, "A", "")?;
            let b = create_room(c, "B", "")?;
            assert!(matches!(create_room(c, "a", ""), Err(DbError::Conflict(_))));
            let m = MachineInput {
                mac: "52:54:00:00:00:0a".parse().expect("mac"),
                name: Some("pc-a".into()),
                room_id: Some(a),
                ..Default::default()
            };
            let (id, _) = put_machine(c, &m, false, false)?;
            assert!(matches!(
                put_machine(c, &m, false, false),
                Err(DbError::Conflict(_))
            ));
            let mb = MachineInput {
                mac: "52:54:00:00:00:0b".parse().expect("mac"),
                room_id: Some(b),
                ..Default::default()
            };
            put_machine(c, &mb, false, false)?;
            let f = MachineFilter {
                scope: Some(vec![a]),
                ..Default::default()
            };
            let (n, rows) = list_machines(c, &f, 0, 10)?;
            assert_eq!((n, rows[0].id), (1, id));
            patch_machine(
                c,
                id,
                &MachinePatch {
                    room_id: Some(b),
                    ..Default::default()
                },
            )?;
            assert_eq!(room_machines(c, b)?.len(), 2);
            delete_room(c, b)?;
            let f = MachineFilter {
                unassigned: true,
                ..Default::default()
            };
            assert_eq!(list_machines(c, &f, 0, 10)?.0, 2);
            Ok(())
        })
        .expect("crud");
    }
}
