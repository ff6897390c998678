//! Per-machine state: boot modes, what the DHCP service saw, boot sessions,
//! registered agents, capture grants.
//!
//! Kept in memory behind a mutex (the read path: the DHCP and iPXE paths
//! never wait for the database) and stored in SQLite, the same `aula.db` as
//! the console's tables (`clients`, `agents`, `capture_grants`; see
//! [`store`]). What changed is marked dirty and written as rows:
//!
//! | change | written |
//! |---|---|
//! | boot mode set or cleared through the API | before the answer, committed to disk |
//! | a one-shot mode consumed, a boot session opened (the script served to the machine) | before the script is answered, committed to disk |
//! | a registration accepted (session bound, agent stored) | before the answer, committed to disk |
//! | DHCP sightings, capture grants | by [`Registry::autosave`] every couple of seconds, every machine seen since in one transaction (or with the next write above) |
//!
//! Writes are group commits: a caller that must wait for the disk takes
//! every row marked dirty so far into one transaction, and callers whose
//! rows an earlier writer already took find nothing left to write. A room
//! booting at once (a hundred script requests in a second) costs a few
//! commits, not a hundred.
//!
//! An older Aula kept all of this in `state.json`; the first start of this
//! version imports it in one transaction and renames it
//! `state.json.migrated`.
//!
//! # Bounded
//!
//! At most `max_machines` (`[limits]`, default 10 000) machines are known.
//! A new one takes the place of the least recently seen machine that holds
//! nothing an operator or an agent gave it (no boot mode, no registered
//! agent; those without a boot session first); its row is deleted with the
//! next commit. When every record holds something, a boot-mode write for a
//! new machine is refused ([`StateError::Full`], 507), its script is served
//! without recording it, and DHCP sightings of new machines are ignored.
//!
//! # Registration is bound to the boot
//!
//! | step | what is checked | refused with |
//! |---|---|---|
//! | the live iPXE script of MAC M is served to M's own address ([`Registry::take_boot`] with `verified`) | the boot routes' address check | no session: the script of the permanent mode, nothing consumed |
//! | a boot session opens | — | — |
//! | `POST /v1/agents/register` for M ([`Registry::register_agent`]) | a session exists and is not bound | `NoSession` / `Bound` |
//! | | within `registration_window_s` of the script | `Expired` |
//! | | the session's nonce (`aula.boot=` on the kernel line) | `Nonce` |
//! | | from the address the script went to | `Source` |
//! | | where this server leases addresses, from M's bound lease | `Lease` |
//! | accepted | the session is bound: every later registration of M is refused until M boots live again, except an exact repeat (same token, certificate and address) | — |

pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::BootMode;
use crate::db::{Db, DbError};
use crate::dhcp::pxe::Firmware;
use crate::mac::MacAddr;
use crate::persist::PersistError;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Disk I/O (the `state.json` import).
    #[error(transparent)]
    Io(#[from] PersistError),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A `state.json` to import is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt: fix or remove it (nothing was imported)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// No room for another machine.
    #[error("the server knows {0} machines, its limit ([limits] max_machines), and each holds a boot mode or a registered agent; reset some machines' boot modes or raise the limit")]
    Full(usize),
}

/// Machines known at most, unless `[limits] max_machines` says otherwise.
pub const DEFAULT_MAX_MACHINES: usize = 10_000;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A stored per-MAC boot setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSetting {
    /// Permanent mode; `None` means the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BootMode>,
    /// One-shot mode for the next boot only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub once: Option<BootMode>,
}

/// What the server knows about one machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Firmware seen in its last netboot DHCP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// Last IPv4 address seen or handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Host name it sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Unix time of the last DHCP request or script fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// Boot mode setting.
    #[serde(default)]
    pub boot: BootSetting,
    /// Mode of the last iPXE script served, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_boot: Option<(BootMode, u64)>,
    /// The live boot whose agent may register (or has registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<BootSession>,
}

/// One live boot of a machine: opened when its live script was served to
/// its own address; its agent registers once with the nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSession {
    /// The `aula.boot=` value on that script's kernel line.
    pub nonce: String,
    /// The address the script was served to.
    pub source: IpAddr,
    /// Unix time the script was served.
    pub opened_at: u64,
    /// An agent registered through this session.
    #[serde(default)]
    pub bound: bool,
}

/// Why a registration was refused (each is logged; the API answers 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No live boot script was served to this machine's address.
    #[error("no live boot of {0} is waiting for its agent: PXE-boot it live first")]
    NoSession(MacAddr),
    /// An agent already registered for this boot.
    #[error("{0} is bound to the agent that registered in this boot; it can be claimed again only after it boots live again")]
    Bound(MacAddr),
    /// The window closed.
    #[error("the registration window of {mac} closed {ago} s ago; PXE-boot it live again")]
    Expired {
        /// The machine.
        mac: MacAddr,
        /// Seconds since it closed.
        ago: u64,
    },
    /// No or a wrong boot nonce.
    #[error("boot_nonce does not match this boot of {0} (aula.boot= on its kernel line)")]
    Nonce(MacAddr),
    /// From another address than the boot.
    #[error("registration of {mac} from {got}, but its live boot script was served to {want}")]
    Source {
        /// The machine.
        mac: MacAddr,
        /// Where the registration came from.
        got: IpAddr,
        /// Where the script went.
        want: IpAddr,
    },
    /// Not from the address this server leased to the machine.
    #[error("registration of {mac} from {got}, but this server leased {mac} {want}")]
    Lease {
        /// The machine.
        mac: MacAddr,
        /// Where the registration came from.
        got: IpAddr,
        /// Its lease, if any.
        want: String,
    },
}

/// What [`Registry::register_agent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new registration, bound to this boot.
    New,
    /// The same agent again (restarted in the same boot): nothing changed.
    Repeat,
}

/// What the lease side knows when a registration arrives.
#[derive(Debug, Clone, Copy)]
pub struct LeaseCheck {
    /// This server hands out addresses (full DHCP).
    pub full_dhcp: bool,
    /// The machine's bound lease.
    pub lease: Option<Ipv4Addr>,
}

/// A capture grant: the agent on a machine may upload chunks and publish
/// one image name until a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureGrant {
    /// The one image name it may publish.
    pub image: String,
    /// Unix seconds.
    pub until: u64,
}

/// An agent registration as posted by the live system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRegistration {
    /// The agent's MAC (one interface).
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// All its MACs.
    #[serde(default)]
    pub macs: Vec<MacAddr>,
    /// Its IP addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Firmware as the agent sees it (`bios`, `uefi`, …).
    #[serde(default)]
    pub firmware: Option<String>,
    /// Agent version.
    pub agent_version: String,
    /// The agent's bearer token.
    pub token: String,
    /// `sha256:<hex>` of the agent's certificate.
    pub cert_fingerprint: String,
    /// Its HTTPS API port.
    pub port: u16,
    /// The `aula.boot=` nonce of the boot it runs in.
    #[serde(default)]
    pub boot_nonce: Option<String>,
}

/// A stored agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    /// MACs. The first is the machine's (the one it booted from, bound by
    /// the registration); the others are informational and confer nothing.
    pub macs: Vec<MacAddr>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Firmware as reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// Agent version.
    pub agent_version: String,
    /// Bearer token (redacted in listings unless authorized).
    pub token: Option<String>,
    /// Certificate fingerprint.
    pub cert_fingerprint: String,
    /// API port.
    pub port: u16,
    /// Unix time of the registration.
    pub registered_at: u64,
    /// Address the registration came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
}

/// A registration that cannot be stored.
#[derive(Debug, thiserror::Error)]
#[error("invalid registration: {0}")]
pub struct RegistrationError(pub &'static str);

impl AgentRegistration {
    /// Validates and normalises into a record.
    pub fn into_record(
        self,
        now: u64,
        source: Option<IpAddr>,
    ) -> Result<AgentRecord, RegistrationError> {
        let mut macs = Vec::new();
        for m in self.mac.into_iter().chain(self.macs) {
            if !macs.contains(&m) {
                macs.push(m);
            }
        }
        if macs.is_empty() {
            return Err(RegistrationError("mac or macs is required"));
        }
        if macs.len() > 32 || self.ips.len() > 64 {
            return Err(RegistrationError("too many macs or ips"));
        }
        if macs.iter().any(|m| m.is_multicast() || m.0 == [0; 6]) {
            return Err(RegistrationError("mac must be a unicast address"));
        }
        if self.token.len() < 16
            || self.token.len() > 512
            || !self.token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(RegistrationError(
                "token must be 16-512 printable ASCII characters",
            ));
        }
        let fp_ok = self
            .cert_fingerprint
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !fp_ok {
            return Err(RegistrationError(
                "cert_fingerprint must be sha256:<64 hex digits>",
            ));
        }
        if self.port == 0 {
            return Err(RegistrationError("port must be non-zero"));
        }
        if self.boot_nonce.as_ref().is_some_and(|n| n.len() > 128) {
            return Err(RegistrationError("boot_nonce is too long"));
        }
        let short = |s: &Option<String>| {
            s.as_ref()
                .is_none_or(|s| s.len() <= 255 && !s.chars().any(char::is_control))
        };
        if !short(&self.hostname)
            || !short(&self.firmware)
            || self.agent_version.len() > 64
            || self.agent_version.is_empty()
        {
            return Err(RegistrationError(
                "hostname, firmware or agent_version malformed or too long",
            ));
        }
        Ok(AgentRecord {
            macs,
            ips: self.ips,
            hostname: self.hostname,
            firmware: self.firmware,
            agent_version: self.agent_version,
            token: Some(self.token),
            cert_fingerprint: self.cert_fingerprint.to_ascii_lowercase(),
            port: self.port,
            registered_at: now,
            source,
        })
    }
}

/// One machine as `GET /v1/clients` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    /// MAC.
    pub mac: MacAddr,
    /// IP address (lease, DHCP sighting or agent registration).
    pub ip: Option<IpAddr>,
    /// Host name.
    pub hostname: Option<String>,
    /// Firmware.
    pub firmware: Option<Firmware>,
    /// RFC 3339 time of the last sighting.
    pub last_seen: Option<String>,
    /// Mode the next boot will use.
    pub boot_mode: BootMode,
    /// The stored setting (`mode` permanent, `once` one-shot).
    pub boot: BootSetting,
    /// Mode and RFC 3339 time of the last script served.
    pub last_boot: Option<LastBootView>,
    /// Whether an agent registered for this MAC.
    pub agent_registered: bool,
    /// The last live boot session (its nonce is never shown).
    pub session: Option<SessionView>,
}

/// A boot session as listings show it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// RFC 3339 time the live script was served.
    pub opened_at: String,
    /// The address it was served to.
    pub source: IpAddr,
    /// An agent registered through it.
    pub bound: bool,
}

/// Last boot.
#[derive(Debug, Clone, Serialize)]
pub struct LastBootView {
    /// Mode served.
    pub mode: BootMode,
    /// When.
    pub at: String,
}

/// A fresh boot nonce: 16 random bytes, hex. None when the system's
/// random generator fails (then no session opens: nobody can register).
pub fn random_nonce() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        tracing::error!("the system random generator failed: no boot session opened");
        return None;
    }
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Formats Unix seconds as RFC 3339.
pub fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Rows changed in memory and not yet written.
#[derive(Debug, Default)]
struct Dirty {
    clients: HashSet<MacAddr>,
    agents: HashSet<MacAddr>,
    grants: HashSet<MacAddr>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.agents.is_empty() && self.grants.is_empty()
    }

    fn merge(&mut self, other: Dirty) {
        self.clients.extend(other.clients);
        self.agents.extend(other.agents);
        self.grants.extend(other.grants);
    }
}

#[derive(Debug, Default)]
struct Inner {
    clients: BTreeMap<MacAddr, ClientRecord>,
    agents: BTreeMap<MacAddr, AgentRecord>,
    /// Capture grants by machine.
    grants: HashMap<MacAddr, CaptureGrant>,
    dirty: Dirty,
}

impl Inner {
    /// The current rows of everything dirty (clearing the marks).
    fn take_batch(&mut self) -> (store::Batch, Dirty) {
        let dirty = std::mem::take(&mut self.dirty);
        let batch = store::Batch {
            clients: dirty
                .clients
                .iter()
                .map(|m| (*m, self.clients.get(m).cloned()))
                .collect(),
            agents: dirty
                .agents
                .iter()
                .map(|m| (*m, self.agents.get(m).cloned()))
                .collect(),
            grants: dirty
                .grants
                .iter()
                .map(|m| (*m, self.grants.get(m).cloned()))
                .collect(),
        };
        (batch, dirty)
    }
}

/// The state store.
pub struct Registry {
    inner: Mutex<Inner>,
    db: Db,
    /// One writer at a time: each takes the current rows of what is dirty
    /// while holding it, so the last write of a row is its newest state.
    write_lock: tokio::sync::Mutex<()>,
    /// Commits of registry rows so far.
    writes: AtomicU64,
    max_machines: usize,
    /// Addresses machines announced on the proxyDHCP port, and when.
    announced: Mutex<HashMap<MacAddr, (Ipv4Addr, u64)>>,
    /// Machines in the rooms `[boot.secure_boot] rooms` lists (refreshed
    /// from the database by [`Registry::refresh_secure_boot_rooms`]).
    secure_boot_rooms: Mutex<std::collections::HashSet<MacAddr>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("db", &self.db).finish()
    }
}

impl Registry {
    /// Opens the registry in `<dir>/aula.db` (created, migrated), importing
    /// a `state.json` of an older Aula there once. Blocking.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        Self::open(Db::open(dir)?)
    }

    /// The registry in `db`, whose directory may hold a `state.json` of an
    /// older Aula to import once (see [`store::import_state_json`]).
    /// Blocking: reads every row.
    pub fn open(db: Db) -> Result<Self, StateError> {
        let dir = db
            .path()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        let snap = db.call_blocking(|c| {
            match store::import_state_json(c, &dir) {
                Ok(store::Import::Nothing) => {}
                Ok(store::Import::Imported { clients, agents }) => tracing::info!(
                    clients, agents, dir = %dir.display(),
                    "imported state.json into the database; renamed it state.json.migrated"
                ),
                Ok(store::Import::AlreadyImported) => tracing::warn!(
                    dir = %dir.display(),
                    "state.json was imported before; renamed it state.json.migrated"
                ),
                Err(e) => return Ok(Err(e)),
            }
            Ok(Ok(store::load(c, unix_now())?))
        })??;
        Ok(Self {
            inner: Mutex::new(Inner {
                clients: snap.clients,
                agents: snap.agents,
                grants: snap.grants,
                dirty: Dirty::default(),
            }),
            db,
            write_lock: tokio::sync::Mutex::new(()),
            writes: AtomicU64::new(0),
            max_machines: DEFAULT_MAX_MACHINES,
            announced: Mutex::new(HashMap::new()),
            secure_boot_rooms: Mutex::new(Default::default()),
        })
    }

    /// Whether `mac` sits in a room `[boot.secure_boot] rooms` lists (as of
    /// the last refresh).
    pub fn in_secure_boot_room(&self, mac: MacAddr) -> bool {
        self.secure_boot_rooms
            .lock()
            .map(|s| s.contains(&mac))
            .unwrap_or(false)
    }

    /// Reloads the machines of the rooms named in `rooms` from the database
    /// (names compare case-insensitively; unknown rooms hold no machine).
    /// Returns how many machines they hold.
    pub async fn refresh_secure_boot_rooms(&self, rooms: &[String]) -> Result<usize, StateError> {
        let rooms = rooms.to_vec();
        let macs = self
            .db
            .call(move |c| {
                let mut out = std::collections::HashSet::new();
                for name in &rooms {
                    if let Some(id) = crate::db::rooms::room_id_by_name(c, name)? {
                        for m in crate::db::rooms::room_machines(c, id)? {
                            out.insert(m.mac);
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        let n = macs.len();
        if let Ok(mut s) = self.secure_boot_rooms.lock() {
            *s = macs;
        }
        Ok(n)
    }

    /// At most `n` machines are known (see the module's bounds).
    pub fn with_max_machines(mut self, n: usize) -> Self {
        self.max_machines = n.max(1);
        self
    }

    /// How many commits of registry rows were made since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Makes room for a record of `mac` if it has none (see the module's
    /// bounds); false when there is no room. Call with `inner` locked.
    fn room_for(&self, g: &mut Inner, mac: MacAddr) -> bool {
        if g.clients.contains_key(&mac) || g.clients.len() < self.max_machines {
            return true;
        }
        let victim = g
            .clients
            .iter()
            .filter(|(m, c)| c.boot == BootSetting::default() && !g.agents.contains_key(m))
            .min_by_key(|(_, c)| (c.session.is_some(), c.last_seen.unwrap_or(0)))
            .map(|(m, _)| *m);
        match victim {
            Some(v) => {
                g.clients.remove(&v);
                g.dirty.clients.insert(v);
                tracing::debug!(evicted = %v, new = %mac, "machine table full: forgot the least recently seen machine that held nothing");
                true
            }
            None => false,
        }
    }

    /// The database the registry lives in.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Let the agent on `mac` upload chunks and publish image `image` until
    /// `until` (unix seconds), with its upload token. Written with the next
    /// save (at most a couple of seconds; [`Registry::save`] for at once).
    pub fn grant_capture(&self, mac: MacAddr, image: String, until: u64) {
        let mut g = self.lock();
        g.grants.insert(mac, CaptureGrant { image, until });
        g.dirty.grants.insert(mac);
    }

    /// Withdraw a capture grant.
    pub fn revoke_capture(&self, mac: MacAddr) {
        let mut g = self.lock();
        g.grants.remove(&mac);
        g.dirty.grants.insert(mac);
    }

    /// The active capture grant of `mac`.
    pub fn capture_grant(&self, mac: MacAddr) -> Option<CaptureGrant> {
        let now = unix_now();
        self.lock()
            .grants
            .get(&mac)
            .filter(|g| g.until > now)
            .cloned()
    }

    /// Every active capture grant.
    pub fn capture_grants(&self) -> Vec<(MacAddr, CaptureGrant)> {
        let now = unix_now();
        self.lock()
            .grants
            .iter()
            .filter(|(_, c)| c.until > now)
            .map(|(m, c)| (*m, c.clone()))
            .collect()
    }

    /// Records the address `mac` announced on the proxyDHCP port (a
    /// boot-server discovery request from a client that has an address).
    /// Kept in memory only: it matters for minutes.
    pub fn note_announce(&self, mac: MacAddr, ip: Ipv4Addr) {
        if let Ok(mut a) = self.announced.lock() {
            if a.len() >= self.max_machines && !a.contains_key(&mac) {
                return;
            }
            a.insert(mac, (ip, unix_now()));
        }
    }

    /// The address `mac` announced on the proxyDHCP port within `max_age_s`.
    pub fn announced(&self, mac: MacAddr, max_age_s: u64) -> Option<Ipv4Addr> {
        let now = unix_now();
        self.announced
            .lock()
            .ok()?
            .get(&mac)
            .filter(|(_, at)| now.saturating_sub(*at) <= max_age_s)
            .map(|(ip, _)| *ip)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in
        // a way that matters more than losing the whole server; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a netboot DHCP request (packet path: memory only; the
    /// periodic save writes every machine seen since in one transaction).
    pub fn note_dhcp(
        &self,
        mac: MacAddr,
        firmware: Option<Firmware>,
        ip: Option<Ipv4Addr>,
        hostname: Option<&str>,
    ) {
        let mut g = self.lock();
        if !g.clients.contains_key(&mac) && g.clients.len() >= self.max_machines {
            // Forged netboot requests with random MACs must not grow the
            // table without bound, nor push out other sightings: a new
            // machine seen only by DHCP is recorded while there is room.
            return;
        }
        let c = g.clients.entry(mac).or_default();
        if firmware.is_some() {
            c.firmware = firmware;
        }
        if ip.is_some() {
            c.ip = ip;
        }
        if let Some(h) = hostname {
            if c.hostname.as_deref() != Some(h) {
                c.hostname = Some(h.to_owned());
            }
        }
        c.last_seen = Some(unix_now());
        g.dirty.clients.insert(mac);
    }

    /// Sets a machine's boot mode and persists it before returning.
    pub async fn set_boot(
        &self,
        mac: MacAddr,
        mode: BootMode,
        once: bool,
    ) -> Result<BootSetting, StateError> {
        let setting = {
            let mut g = self.lock();
            if !self.room_for(&mut g, mac) {
                return Err(StateError::Full(self.max_machines));
            }
            let c = g.clients.entry(mac).or_default();
            if once {
                c.boot.once = Some(mode);
            } else {
                c.boot.mode = Some(mode);
                c.boot.once = None;
            }
            let s = c.boot.clone();
            g.dirty.clients.insert(mac);
            s
        };
        self.save().await?;
        Ok(setting)
    }

    /// Clears a machine's setting (back to the default), persisted.
    pub async fn clear_boot(&self, mac: MacAddr) -> Result<(), StateError> {
        {
            let mut g = self.lock();
            if let Some(c) = g.clients.get_mut(&mac) {
                c.boot = BootSetting::default();
                g.dirty.clients.insert(mac);
            }
        }
        self.save().await
    }

    /// The mode for the script being served now, and the nonce of the boot
    /// session it opens.
    ///
    /// `verified` is the address the request came from when it passed the
    /// boot routes' check that it is the machine's own. Only then is a
    /// one-shot mode consumed (the boot counts as used when its script is
    /// served), and a live mode opens a new boot session (replacing the last
    /// one); both are on disk before this returns. An unverified request
    /// gets the permanent mode and changes nothing.
    pub async fn take_boot(
        &self,
        mac: MacAddr,
        default: BootMode,
        verified: Option<IpAddr>,
    ) -> Result<(BootMode, Option<String>), StateError> {
        let Some(source) = verified else {
            let g = self.lock();
            let mode = g
                .clients
                .get(&mac)
                .and_then(|c| c.boot.mode)
                .unwrap_or(default);
            return Ok((mode, None));
        };
        let (mode, nonce, persist) = {
            let mut g = self.lock();
            if !self.room_for(&mut g, mac) {
                tracing::warn!(%mac, max = self.max_machines, "machine table full: serving the default mode without recording the boot (no registration window)");
                return Ok((default, None));
            }
            g.dirty.clients.insert(mac);
            let c = g.clients.entry(mac).or_default();
            let now = unix_now();
            let (mode, consumed) = match c.boot.once.take() {
                Some(m) => (m, true),
                None => (c.boot.mode.unwrap_or(default), false),
            };
            c.last_seen = Some(now);
            c.last_boot = Some((mode, now));
            if let IpAddr::V4(v4) = source {
                c.ip = Some(v4);
            }
            let nonce = if mode == BootMode::Live {
                random_nonce()
            } else {
                None
            };
            if let Some(n) = &nonce {
                c.session = Some(BootSession {
                    nonce: n.clone(),
                    source,
                    opened_at: now,
                    bound: false,
                });
            }
            (mode, nonce, consumed || mode == BootMode::Live)
        };
        if persist {
            self.save().await?;
        }
        Ok((mode, nonce))
    }

    /// Stores an agent registration if it belongs to the machine's current
    /// live boot (see the module table), persisted before returning.
    /// `nonce` is the registration's `boot_nonce`, `source` its address.
    pub async fn register_agent(
        &self,
        rec: AgentRecord,
        nonce: Option<&str>,
        source: IpAddr,
        window_s: u64,
        lease: LeaseCheck,
    ) -> Result<Result<Registered, Refusal>, StateError> {
        let key = rec.macs[0];
        let verdict = {
            let mut g = self.lock();
            let now = unix_now();
            let session = g.clients.get(&key).and_then(|c| c.session.clone());
            let repeat = session.as_ref().is_some_and(|s| s.bound)
                && g.agents.get(&key).is_some_and(|a| {
                    a.source == Some(source)
                        && a.cert_fingerprint == rec.cert_fingerprint
                        && match (&a.token, &rec.token) {
                            (Some(x), Some(y)) => {
                                aula_imager::tls::secrets_equal(x.as_bytes(), y.as_bytes())
                            }
                            _ => false,
                        }
                });
            if repeat {
                // The same agent (it holds the token): its port or
                // addresses may have changed with the restart.
                g.agents.insert(key, rec);
                g.dirty.agents.insert(key);
                Ok(Registered::Repeat)
            } else {
                let verdict = match &session {
                    None => Err(Refusal::NoSession(key)),
                    Some(s) if s.bound => Err(Refusal::Bound(key)),
                    Some(s) if now > s.opened_at.saturating_add(window_s) => {
                        Err(Refusal::Expired {
                            mac: key,
                            ago: now - s.opened_at.saturating_add(window_s),
                        })
                    }
                    Some(s)
                        if !nonce.is_some_and(|n| {
                            aula_imager::tls::secrets_equal(n.as_bytes(), s.nonce.as_bytes())
                        }) =>
                    {
                        Err(Refusal::Nonce(key))
                    }
                    Some(s) if s.source != source => Err(Refusal::Source {
                        mac: key,
                        got: source,
                        want: s.source,
                    }),
                    Some(_) if lease.full_dhcp && lease.lease.map(IpAddr::V4) != Some(source) => {
                        Err(Refusal::Lease {
                            mac: key,
                            got: source,
                            want: lease
                                .lease
                                .map(|l| l.to_string())
                                .unwrap_or_else(|| "no address".into()),
                        })
                    }
                    Some(_) => Ok(Registered::New),
                };
                if verdict.is_ok() {
                    if let Some(s) = g.clients.get_mut(&key).and_then(|c| c.session.as_mut()) {
                        s.bound = true;
                    }
                    let c = g.clients.entry(key).or_default();
                    c.last_seen = Some(rec.registered_at);
                    if let Some(IpAddr::V4(v4)) = rec.ips.iter().find(|i| i.is_ipv4()) {
                        c.ip = Some(*v4);
                    }
                    if rec.hostname.is_some() {
                        c.hostname = rec.hostname.clone();
                    }
                    g.agents.insert(key, rec);
                    g.dirty.clients.insert(key);
                    g.dirty.agents.insert(key);
                }
                verdict
            }
        };
        if verdict.is_ok() {
            self.save().await?;
        }
        Ok(verdict)
    }

    /// The registered token of the agent bound to machine `mac`, if any
    /// (only the machine's own MAC counts, not extra MACs an agent listed).
    pub fn agent_token(&self, mac: MacAddr) -> Option<String> {
        self.lock().agents.get(&mac).and_then(|a| a.token.clone())
    }

    /// The machine whose registered agent token is `token`, if any.
    pub fn agent_of_token(&self, token: &str) -> Option<MacAddr> {
        let g = self.lock();
        g.agents
            .iter()
            .find(|(_, a)| {
                a.token.as_deref().is_some_and(|t| {
                    aula_imager::tls::secrets_equal(token.as_bytes(), t.as_bytes())
                })
            })
            .map(|(m, _)| *m)
    }

    /// How many agents are registered.
    pub fn agent_count(&self) -> usize {
        self.lock().agents.len()
    }

    /// Registered agents, tokens removed unless `with_tokens`.
    pub fn agents(&self, with_tokens: bool) -> Vec<AgentRecord> {
        let g = self.lock();
        g.agents
            .values()
            .map(|a| {
                let mut a = a.clone();
                if !with_tokens {
                    a.token = None;
                }
                a
            })
            .collect()
    }

    /// The view of every known machine. `lease_ip` looks up current leases.
    pub fn clients(
        &self,
        default: BootMode,
        lease_ip: impl Fn(MacAddr) -> Option<Ipv4Addr>,
    ) -> Vec<ClientView> {
        let g = self.lock();
        let agent_macs: std::collections::HashSet<MacAddr> = g.agents.keys().copied().collect();
        g.clients
            .iter()
            .map(|(mac, c)| ClientView {
                mac: *mac,
                ip: lease_ip(*mac).or(c.ip).map(IpAddr::V4),
                hostname: c.hostname.clone(),
                firmware: c.firmware,
                last_seen: c.last_seen.map(rfc3339),
                boot_mode: c.boot.once.or(c.boot.mode).unwrap_or(default),
                boot: c.boot.clone(),
                last_boot: c.last_boot.map(|(mode, at)| LastBootView {
                    mode,
                    at: rfc3339(at),
                }),
                agent_registered: agent_macs.contains(mac),
                session: c.session.as_ref().map(|s| SessionView {
                    opened_at: rfc3339(s.opened_at),
                    source: s.source,
                    bound: s.bound,
                }),
            })
            .collect()
    }

    /// Writes every changed row now, the commit on disk before this
    /// returns (serialised with other writers).
    pub async fn save(&self) -> Result<(), StateError> {
        self.flush().await
    }

    /// Every flush is durable (`synchronous=FULL` for its commit): a
    /// caller of [`Registry::save`] whose rows the periodic flush took
    /// finds nothing left to write, and must find them on disk. One sync
    /// every couple of seconds costs nothing next to the group commits.
    async fn flush(&self) -> Result<(), StateError> {
        let durable = true;
        let _w = self.write_lock.lock().await;
        let (batch, marks) = self.lock().take_batch();
        if batch.is_empty() {
            return Ok(());
        }
        let rows = batch.len();
        let started = std::time::Instant::now();
        let r = self
            .db
            .call(move |c| store::write(c, &batch, durable))
            .await;
        match r {
            Ok(()) => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    rows,
                    durable,
                    ms = started.elapsed().as_millis() as u64,
                    "registry rows written"
                );
                Ok(())
            }
            Err(e) => {
                // Still to be written: the next save tries again.
                self.lock().dirty.merge(marks);
                Err(e.into())
            }
        }
    }

    /// Writes what changed (DHCP sightings, grants) every `period`, in one
    /// transaction each time, until cancelled; then once more.
    pub async fn autosave(self: Arc<Self>, period: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
            if self.lock().dirty.is_empty() {
                continue;
            }
            if let Err(e) = self.flush().await {
                tracing::error!(error = %e, "saving client state");
            }
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "saving client state at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 100));

    #[tokio::test]
    async fn secure_boot_rooms_hold_exactly_the_machines_of_the_listed_rooms() {
        use crate::db::rooms::{create_room, put_machine, MachineInput};
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::load(dir.path()).expect("load");
        let a: MacAddr = "52:54:00:5b:00:01".parse().expect("mac");
        let b: MacAddr = "52:54:00:5b:00:02".parse().expect("mac");
        reg.db()
            .call_blocking(|c| {
                let sb = create_room(c, "Lab SB", "")?;
                let other = create_room(c, "Lab 2", "")?;
                for (mac, room) in [(a, sb), (b, other)] {
                    let m = MachineInput {
                        mac,
                        room_id: Some(room),
                        ..Default::default()
                    };
                    put_machine(c, &m, false, false)?;
                }
                Ok(())
            })
            .expect("rooms");
        let n = reg
            .refresh_secure_boot_rooms(&["Lab SB".into(), "no such room".into()])
            .await
            .expect("refresh");
        assert_eq!(n, 1);
        assert!(reg.in_secure_boot_room(a));
        assert!(!reg.in_secure_boot_room(b));
        let mut cfg = crate::config::SecureBootConfig {
            rooms: vec!["Lab SB".into()],
            ..Default::default()
        };
        assert!(cfg.wants(a, reg.in_secure_boot_room(a)));
        assert!(!cfg.wants(b, reg.in_secure_boot_room(b)));
        cfg.off = vec![a];
        assert!(!cfg.wants(a, true), "off wins over the room");
        cfg.default = true;
        assert!(cfg.wants(b, false));
        // The room emptied: the next refresh drops the machine.
        reg.refresh_secure_boot_rooms(&[]).await.expect("refresh");
        assert!(!reg.in_secure_boot_room(a));
    }

    #[tokio::test]
    async fn one_shot_mode_is_consumed_once_and_survives_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac: MacAddr = "52:54:00:00:00:01".parse().expect("mac");
        let reg = Registry::load(dir.path()).expect("load");
        reg.set_boot(mac, BootMode::Local, false)
            .await
            .expect("set perm");
        reg.set_boot(mac, BootMode::Live, true)
            .await
            .expect("set once");
        let reg = Registry::load(dir.path()).expect("reload");
        // A request that is not the machine's own consumes nothing.
        assert_eq!(
            reg.take_boot(mac, BootMode::Live, None)
                .await
                .expect("take"),
            (BootMode::Local, None)
        );
        let (mode, nonce) = reg
            .take_boot(mac, BootMode::Live, Some(SRC))
            .await
            .expect("take");
        assert_eq!(mode, BootMode::Live);
        assert!(
            nonce.is_some_and(|n| n.len() == 32),
            "a live boot opens a session"
        );
        let reg = Registry::load(dir.path()).expect("reload after consume");
        assert_eq!(
            reg.take_boot(mac, BootMode::Live, Some(SRC))
                .await
                .expect("take")
                .0,
            BootMode::Local
        );
    }

    fn record(mac: MacAddr, token: &str) -> AgentRecord {
        AgentRecord {
            macs: vec![mac],
            ips: vec![SRC],
            hostname: None,
            firmware: None,
            agent_version: "t".into(),
            token: Some(token.into()),
            cert_fingerprint: format!("sha256:{}", "ab".repeat(32)),
            port: 8000,
            registered_at: unix_now(),
            source: Some(SRC),
        }
    }

    #[tokio::test]
    async fn a_registration_needs_the_boot_its_nonce_and_its_address_and_binds_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac: MacAddr = "52:54:00:00:00:02".parse().expect("mac");
        let reg = Registry::load(dir.path()).expect("load");
        let no_dhcp = LeaseCheck {
            full_dhcp: false,
            lease: None,
        };
        let r = reg
            .register_agent(
                record(mac, "token-a-0123456789"),
                Some("x"),
                SRC,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert_eq!(r, Err(Refusal::NoSession(mac)));
        let (_, nonce) = reg
            .take_boot(mac, BootMode::Live, Some(SRC))
            .await
            .expect("take");
        let nonce = nonce.expect("nonce");
        let other = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 66));
        let r = reg
            .register_agent(
                record(mac, "token-a-0123456789"),
                Some("wrong"),
                SRC,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert_eq!(r, Err(Refusal::Nonce(mac)));
        let r = reg
            .register_agent(
                record(mac, "token-a-0123456789"),
                Some(&nonce),
                other,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert!(matches!(r, Err(Refusal::Source { .. })), "{r:?}");
        let full = LeaseCheck {
            full_dhcp: true,
            lease: Some(Ipv4Addr::new(10, 213, 0, 101)),
        };
        let r = reg
            .register_agent(
                record(mac, "token-a-0123456789"),
                Some(&nonce),
                SRC,
                600,
                full,
            )
            .await
            .expect("io");
        assert!(matches!(r, Err(Refusal::Lease { .. })), "{r:?}");
        let r = reg
            .register_agent(
                record(mac, "token-a-0123456789"),
                Some(&nonce),
                SRC,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert_eq!(r, Ok(Registered::New));
        // Bound: another token is refused, the same agent again is a repeat.
        let r = reg
            .register_agent(
                record(mac, "token-b-0123456789"),
                Some(&nonce),
                SRC,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert_eq!(r, Err(Refusal::Bound(mac)));
        let r = reg
            .register_agent(
                record(mac, "token-a-0123456789"),
                Some(&nonce),
                SRC,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert_eq!(r, Ok(Registered::Repeat));
        assert_eq!(reg.agent_token(mac).as_deref(), Some("token-a-0123456789"));
        // A new live boot opens a new window.
        let (_, n2) = reg
            .take_boot(mac, BootMode::Live, Some(SRC))
            .await
            .expect("take");
        let r = reg
            .register_agent(
                record(mac, "token-b-0123456789"),
                n2.as_deref(),
                SRC,
                600,
                no_dhcp,
            )
            .await
            .expect("io");
        assert_eq!(r, Ok(Registered::New));
        assert_eq!(reg.agent_token(mac).as_deref(), Some("token-b-0123456789"));
    }

    #[tokio::test]
    async fn a_registration_after_the_window_closed_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac: MacAddr = "52:54:00:00:00:03".parse().expect("mac");
        let reg = Registry::load(dir.path()).expect("load");
        let (_, nonce) = reg
            .take_boot(mac, BootMode::Live, Some(SRC))
            .await
            .expect("take");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let r = reg
            .register_agent(
                record(mac, "token-late-0123456789"),
                nonce.as_deref(),
                SRC,
                0,
                LeaseCheck {
                    full_dhcp: false,
                    lease: None,
                },
            )
            .await
            .expect("io");
        assert!(matches!(r, Err(Refusal::Expired { .. })), "{r:?}");
        assert!(reg.agent_token(mac).is_none());
    }

    fn nth_mac(i: u32) -> MacAddr {
        let b = i.to_be_bytes();
        MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_room_booting_at_once_is_written_in_a_few_group_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Arc::new(Registry::load(dir.path()).expect("load"));
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let reg = reg.clone();
                tokio::spawn(async move {
                    let src = IpAddr::V4(Ipv4Addr::new(10, 213, 1, (i % 250) as u8));
                    reg.take_boot(nth_mac(i), BootMode::Live, Some(src)).await
                })
            })
            .collect();
        for t in tasks {
            let (mode, nonce) = t.await.expect("task").expect("take_boot");
            assert_eq!(mode, BootMode::Live);
            assert!(nonce.is_some());
        }
        let writes = reg.writes();
        assert!(writes < 40, "{writes} writes for 200 script requests");
        // Every session is on disk although most callers wrote nothing.
        let again = Registry::load(dir.path()).expect("reload");
        let sessions = again
            .clients(BootMode::Live, |_| None)
            .iter()
            .filter(|c| c.session.is_some())
            .count();
        assert_eq!(sessions, 200);
        println!("RESULT script_requests=200 state_writes={writes}");
    }

    #[tokio::test]
    async fn the_machine_table_is_bounded_and_keeps_what_operators_and_agents_gave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::load(dir.path())
            .expect("load")
            .with_max_machines(10);
        for i in 0..3 {
            reg.set_boot(nth_mac(i), BootMode::Local, false)
                .await
                .expect("set");
        }
        // Scripts for 50 unknown machines (from one address, as a flood
        // through the URL's ip=/mac= would be): the table stays at 10.
        for i in 100..150 {
            reg.take_boot(nth_mac(i), BootMode::Live, Some(SRC))
                .await
                .expect("take");
        }
        let list = reg.clients(BootMode::Live, |_| None);
        assert_eq!(list.len(), 10);
        // The forgotten machines' rows are gone from the database too.
        let on_disk = Registry::load(dir.path()).expect("reload");
        assert_eq!(on_disk.clients(BootMode::Live, |_| None).len(), 10);
        for i in 0..3 {
            assert!(
                list.iter()
                    .any(|c| c.mac == nth_mac(i) && c.boot.mode == Some(BootMode::Local)),
                "the operator's boot mode of {} was dropped",
                nth_mac(i)
            );
        }
        assert!(
            list.iter().any(|c| c.mac == nth_mac(149)),
            "the newest boot is kept"
        );
        // DHCP sightings of new machines do not push anybody out.
        reg.note_dhcp(nth_mac(500), None, None, None);
        assert!(!reg
            .clients(BootMode::Live, |_| None)
            .iter()
            .any(|c| c.mac == nth_mac(500)));
        // Operators' settings fill the table; then a new one is refused.
        for i in 3..10 {
            reg.set_boot(nth_mac(i), BootMode::Live, true)
                .await
                .expect("room made by forgetting machines that held nothing");
        }
        let e = reg
            .set_boot(nth_mac(10), BootMode::Local, false)
            .await
            .expect_err("full");
        assert!(matches!(e, StateError::Full(10)), "{e}");
        assert!(e.to_string().contains("max_machines"), "{e}");
        // A script for a new machine is still served, unrecorded.
        let (mode, nonce) = reg
            .take_boot(nth_mac(11), BootMode::Live, Some(SRC))
            .await
            .expect("served");
        assert_eq!((mode, nonce), (BootMode::Live, None));
        assert_eq!(reg.clients(BootMode::Live, |_| None).len(), 10);
        // Known machines are still updated.
        reg.set_boot(nth_mac(0), BootMode::Live, false)
            .await
            .expect("known machine");
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    /// `state.json` as the previous version (trust, issue 12) wrote it:
    /// produced by that code's `Registry` (four machines: a permanent
    /// local mode with a one-shot live pending, a bound live boot with its
    /// agent, an open registration window, a DHCP sighting only).
    const OLD_STATE: &str = include_str!("../tests/fixtures/state-trust.json");
    /// Long enough that the fixture's open window is still open.
    const YEARS: u64 = 100 * 365 * 86_400;

    fn mac(s: &str) -> MacAddr {
        s.parse().expect("mac")
    }

    fn rows(dir: &Path, table: &str) -> i64 {
        let db = Db::open(dir).expect("db");
        db.call_blocking(|c| {
            Ok(c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)
        })
        .expect("count")
    }

    #[tokio::test]
    async fn a_state_json_of_the_previous_version_is_imported_once_and_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("state.json"), OLD_STATE).expect("write");
        let reg = Registry::load(dir.path()).expect("load");
        assert!(!dir.path().join("state.json").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("state.json.migrated")).expect("migrated"),
            OLD_STATE,
            "the old file is kept, renamed, unchanged"
        );
        // Every field came over.
        let views = reg.clients(BootMode::Local, |_| None);
        assert_eq!(views.len(), 4);
        let v = |m: &str| {
            views
                .iter()
                .find(|c| c.mac == mac(m))
                .cloned()
                .expect("client")
        };
        let pc01 = v("52:54:00:12:00:01");
        assert_eq!(pc01.boot.mode, Some(BootMode::Local));
        assert_eq!(pc01.boot.once, Some(BootMode::Live));
        assert_eq!(pc01.firmware, Some(Firmware::Bios));
        assert_eq!(pc01.hostname.as_deref(), Some("pc01"));
        assert_eq!(pc01.ip, Some("10.213.0.100".parse().expect("ip")));
        let pc02 = v("52:54:00:12:00:02");
        assert!(pc02.agent_registered);
        assert!(pc02.session.as_ref().is_some_and(|s| s.bound));
        assert_eq!(
            pc02.last_boot.as_ref().map(|b| b.mode),
            Some(BootMode::Live)
        );
        assert_eq!(v("52:54:00:12:00:03").firmware, Some(Firmware::Other(42)));
        assert_eq!(v("52:54:00:12:00:04").firmware, Some(Firmware::HttpX64));
        assert_eq!(
            reg.agent_token(mac("52:54:00:12:00:02")).as_deref(),
            Some("agent-token-of-pc02-0123456789")
        );
        assert_eq!(
            reg.agent_of_token("agent-token-of-pc02-0123456789"),
            Some(mac("52:54:00:12:00:02"))
        );
        let agents = reg.agents(true);
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].macs.len(), 2);
        assert_eq!(agents[0].ips.len(), 2);
        assert_eq!(agents[0].port, 8443);
        // The binding holds: pc02 cannot be claimed by another agent; the
        // open window of pc03 still takes its agent, with its nonce.
        let src2 = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 101));
        let r = reg
            .register_agent(
                record(mac("52:54:00:12:00:02"), "impostor-token-0123456789", src2),
                None,
                src2,
                YEARS,
                no_dhcp(),
            )
            .await
            .expect("io");
        assert_eq!(r, Err(Refusal::Bound(mac("52:54:00:12:00:02"))));
        let old: serde_json::Value = serde_json::from_str(OLD_STATE).expect("json");
        let nonce3 = old["clients"]["52:54:00:12:00:03"]["session"]["nonce"]
            .as_str()
            .expect("nonce");
        let src3 = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 102));
        let r = reg
            .register_agent(
                record(mac("52:54:00:12:00:03"), "pc03-token-0123456789", src3),
                Some(nonce3),
                src3,
                YEARS,
                no_dhcp(),
            )
            .await
            .expect("io");
        assert_eq!(r, Ok(Registered::New));
        drop(reg);

        // Started again: nothing is imported twice, the change is kept.
        let reg = Registry::load(dir.path()).expect("reload");
        assert_eq!(rows(dir.path(), "registry_imports"), 1);
        assert_eq!(
            reg.agent_token(mac("52:54:00:12:00:03")).as_deref(),
            Some("pc03-token-0123456789")
        );
        // The one-shot live mode of pc01 is still pending, and consumed once.
        let pc01_ip = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 100));
        let (m, _) = reg
            .take_boot(mac("52:54:00:12:00:01"), BootMode::Local, Some(pc01_ip))
            .await
            .expect("take");
        assert_eq!(m, BootMode::Live);
        let (m, _) = reg
            .take_boot(mac("52:54:00:12:00:01"), BootMode::Local, Some(pc01_ip))
            .await
            .expect("take");
        assert_eq!(m, BootMode::Local);
    }

    #[tokio::test]
    async fn a_state_json_from_before_boot_sessions_is_imported_too() {
        // The version before issue 12 wrote no `session` (and no nonce).
        let mut old: serde_json::Value = serde_json::from_str(OLD_STATE).expect("json");
        for c in old["clients"]
            .as_object_mut()
            .expect("clients")
            .values_mut()
        {
            c.as_object_mut().expect("client").remove("session");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("state.json"),
            serde_json::to_vec_pretty(&old).expect("json"),
        )
        .expect("write");
        let reg = Registry::load(dir.path()).expect("load");
        let views = reg.clients(BootMode::Local, |_| None);
        assert_eq!(views.len(), 4);
        assert!(views.iter().all(|c| c.session.is_none()));
        assert_eq!(reg.agents(false).len(), 1);
    }

    #[tokio::test]
    async fn an_import_interrupted_before_the_rename_is_not_imported_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("state.json"), OLD_STATE).expect("write");
        let reg = Registry::load(dir.path()).expect("load");
        reg.set_boot(mac("52:54:00:12:00:04"), BootMode::Live, false)
            .await
            .expect("set");
        drop(reg);
        // As if the process died after the commit, before the rename.
        std::fs::rename(
            dir.path().join("state.json.migrated"),
            dir.path().join("state.json"),
        )
        .expect("rename back");
        let reg = Registry::load(dir.path()).expect("reload");
        assert!(!dir.path().join("state.json").exists());
        let c = reg
            .clients(BootMode::Local, |_| None)
            .into_iter()
            .find(|c| c.mac == mac("52:54:00:12:00:04"))
            .expect("client");
        assert_eq!(
            c.boot.mode,
            Some(BootMode::Live),
            "the database's newer row was not overwritten by the old file"
        );
    }

    #[test]
    fn a_corrupt_state_json_is_refused_and_nothing_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let torn = &OLD_STATE[..OLD_STATE.len() / 2];
        std::fs::write(dir.path().join("state.json"), torn).expect("write");
        let e = Registry::load(dir.path()).expect_err("corrupt");
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("state.json"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("state.json")).expect("kept"),
            torn
        );
        assert!(!dir.path().join("state.json.migrated").exists());
        assert_eq!(rows(dir.path(), "clients"), 0);
        assert_eq!(rows(dir.path(), "registry_imports"), 0);
    }

    #[tokio::test]
    async fn dhcp_sightings_are_written_in_one_batch_not_per_packet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::load(dir.path()).expect("load");
        for i in 0..200u8 {
            let m = MacAddr([0x52, 0x54, 0, 0x13, 0, i]);
            for _ in 0..5 {
                reg.note_dhcp(
                    m,
                    Some(Firmware::UefiX64),
                    Some(Ipv4Addr::new(10, 213, 1, i)),
                    None,
                );
            }
        }
        assert_eq!(
            rows(dir.path(), "clients"),
            0,
            "no write on the packet path"
        );
        reg.flush().await.expect("flush");
        assert_eq!(rows(dir.path(), "clients"), 200);
        // Nothing left to write: the next flush does nothing.
        assert!(reg.lock().dirty.is_empty());
        let reg = Registry::load(dir.path()).expect("reload");
        let c = reg.clients(BootMode::Local, |_| None);
        assert_eq!(c.len(), 200);
        assert!(c.iter().all(|c| c.firmware == Some(Firmware::UefiX64)));
    }

    #[tokio::test]
    async fn the_autosave_writes_sightings_and_grants_and_once_more_at_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Arc::new(Registry::load(dir.path()).expect("load"));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            reg.clone()
                .autosave(Duration::from_millis(100), cancel.clone()),
        );
        reg.note_dhcp(mac("52:54:00:14:00:01"), None, None, Some("a"));
        reg.grant_capture(mac("52:54:00:14:00:01"), "lab".into(), unix_now() + 600);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rows(dir.path(), "capture_grants") == 0 {
            assert!(std::time::Instant::now() < deadline, "not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rows(dir.path(), "clients"), 1);
        reg.revoke_capture(mac("52:54:00:14:00:01"));
        reg.note_dhcp(mac("52:54:00:14:00:02"), None, None, Some("b"));
        cancel.cancel();
        task.await.expect("autosave");
        assert_eq!(rows(dir.path(), "capture_grants"), 0, "revoked at shutdown");
        assert_eq!(rows(dir.path(), "clients"), 2);
        // A grant survives a restart until it expires.
        let reg = Registry::load(dir.path()).expect("reload");
        reg.grant_capture(mac("52:54:00:14:00:02"), "lab2".into(), unix_now() + 600);
        reg.grant_capture(mac("52:54:00:14:00:03"), "old".into(), unix_now() - 1);
        reg.save().await.expect("save");
        let reg = Registry::load(dir.path()).expect("reload");
        assert_eq!(
            reg.capture_grants(),
            vec![(
                mac("52:54:00:14:00:02"),
                CaptureGrant {
                    image: "lab2".into(),
                    until: reg
                        .capture_grant(mac("52:54:00:14:00:02"))
                        .expect("grant")
                        .until
                }
            )]
        );
    }

    fn no_dhcp() -> LeaseCheck {
        LeaseCheck {
            full_dhcp: false,
            lease: None,
        }
    }

    fn record(mac: MacAddr, token: &str, src: IpAddr) -> AgentRecord {
        AgentRecord {
            macs: vec![mac],
            ips: vec![src],
            hostname: None,
            firmware: None,
            agent_version: "t".into(),
            token: Some(token.into()),
            cert_fingerprint: format!("sha256:{}", "ab".repeat(32)),
            port: 8000,
            registered_at: unix_now(),
            source: Some(src),
        }
    }
}
