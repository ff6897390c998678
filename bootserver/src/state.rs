//! Per-machine state: boot modes, what the DHCP service saw, boot sessions,
//! registered agents, capture grants.
//!
//! Kept in memory behind a mutex and persisted as one JSON file
//! (`state.json` in the data directory, mode 0600: it holds every agent's
//! bearer token) with an atomic write. Changes made through the API (boot
//! modes, registrations), the consumption of a one-shot mode and the opening
//! of a boot session are written before the request is answered; sightings
//! from DHCP only mark the state changed and a background task saves it at
//! most every couple of seconds, so the packet path never waits for the disk.
//!
//! Writes are group commits: each change bumps a generation, and a caller
//! that must wait for the disk waits only for the first write that starts
//! after its change. A room booting at once (a hundred script requests in
//! a second) costs a few writes, not a hundred.
//!
//! # Bounded
//!
//! At most `max_machines` (`[limits]`, default 10 000) machines are known.
//! A new one takes the place of the least recently seen machine that holds
//! nothing an operator or an agent gave it (no boot mode, no registered
//! agent; those without a boot session first). When every record holds
//! something, a boot-mode write for a new machine is refused
//! ([`StateError::Full`], 507), its script is served without recording it,
//! and DHCP sightings of new machines are ignored.
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

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::BootMode;
use crate::dhcp::pxe::Firmware;
use crate::mac::MacAddr;
use crate::persist::{atomic_write, read_optional, PersistError};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Disk I/O.
    #[error(transparent)]
    Io(#[from] PersistError),
    /// The state file is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A background task failed to run.
    #[error("state writer task failed")]
    Join(#[from] tokio::task::JoinError),
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct Inner {
    #[serde(default)]
    clients: BTreeMap<MacAddr, ClientRecord>,
    #[serde(default)]
    agents: BTreeMap<MacAddr, AgentRecord>,
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

/// The state store.
pub struct Registry {
    inner: Mutex<Inner>,
    /// Bumped (under `inner`'s lock) by every change.
    generation: AtomicU64,
    /// The generation the file on disk holds.
    saved: AtomicU64,
    /// Writes of the state file so far.
    writes: AtomicU64,
    max_machines: usize,
    path: PathBuf,
    write_lock: tokio::sync::Mutex<()>,
    /// Capture grants. In memory: grants are short-lived.
    capture: Mutex<std::collections::HashMap<MacAddr, CaptureGrant>>,
    /// Addresses machines announced on the proxyDHCP port, and when.
    announced: Mutex<std::collections::HashMap<MacAddr, (Ipv4Addr, u64)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .finish()
    }
}

impl Registry {
    /// Loads `state.json` from `dir` (absent = empty).
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state.json");
        let inner = match read_optional(&path)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?
            }
            None => Inner::default(),
        };
        Ok(Self {
            inner: Mutex::new(inner),
            generation: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            max_machines: DEFAULT_MAX_MACHINES,
            path,
            write_lock: tokio::sync::Mutex::new(()),
            capture: Mutex::new(std::collections::HashMap::new()),
            announced: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// At most `n` machines are known (see the module's bounds).
    pub fn with_max_machines(mut self, n: usize) -> Self {
        self.max_machines = n.max(1);
        self
    }

    /// How many times the state file was written since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Records a change; call with `inner` locked.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
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
                tracing::debug!(evicted = %v, new = %mac, "machine table full: forgot the least recently seen machine that held nothing");
                true
            }
            None => false,
        }
    }

    /// Let the agent on `mac` upload chunks and publish image `image` until
    /// `until` (unix seconds), with its upload token.
    pub fn grant_capture(&self, mac: MacAddr, image: String, until: u64) {
        if let Ok(mut g) = self.capture.lock() {
            g.insert(mac, CaptureGrant { image, until });
        }
    }

    /// Withdraw a capture grant.
    pub fn revoke_capture(&self, mac: MacAddr) {
        if let Ok(mut g) = self.capture.lock() {
            g.remove(&mac);
        }
    }

    /// The active capture grant of `mac`.
    pub fn capture_grant(&self, mac: MacAddr) -> Option<CaptureGrant> {
        let now = unix_now();
        self.capture
            .lock()
            .ok()?
            .get(&mac)
            .filter(|g| g.until > now)
            .cloned()
    }

    /// Every active capture grant.
    pub fn capture_grants(&self) -> Vec<(MacAddr, CaptureGrant)> {
        let now = unix_now();
        self.capture
            .lock()
            .map(|g| {
                g.iter()
                    .filter(|(_, c)| c.until > now)
                    .map(|(m, c)| (*m, c.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records the address `mac` announced on the proxyDHCP port (a
    /// boot-server discovery request from a client that has an address).
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

    /// Records a netboot DHCP request (packet path: memory only).
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
            // state without bound, nor push out other sightings: a new
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
        self.changed();
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
            self.changed();
            let c = g.clients.entry(mac).or_default();
            if once {
                c.boot.once = Some(mode);
            } else {
                c.boot.mode = Some(mode);
                c.boot.once = None;
            }
            c.boot.clone()
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
            }
            self.changed();
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
            self.changed();
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
                self.changed();
                g.agents.insert(key, rec);
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
                    self.changed();
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

    /// Makes every change made so far durable: returns once a write that
    /// started after them has finished (a group commit: callers waiting
    /// together share one write).
    pub async fn save(&self) -> Result<(), StateError> {
        let wanted = self.generation.load(Ordering::SeqCst);
        let _w = self.write_lock.lock().await;
        if self.saved.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let (bytes, generation) = {
            let g = self.lock();
            let bytes = serde_json::to_vec_pretty(&*g).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
            (bytes, self.generation.load(Ordering::SeqCst))
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || atomic_write(&path, &bytes)).await??;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.saved.store(generation, Ordering::SeqCst);
        Ok(())
    }

    fn unsaved(&self) -> bool {
        self.generation.load(Ordering::SeqCst) > self.saved.load(Ordering::SeqCst)
    }

    /// Saves sightings every `period` while there are unsaved ones, until cancelled.
    pub async fn autosave(self: Arc<Self>, period: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
            if self.unsaved() {
                if let Err(e) = self.save().await {
                    tracing::error!(error = %e, "saving client state");
                }
            }
        }
        if self.unsaved() {
            if let Err(e) = self.save().await {
                tracing::error!(error = %e, "saving client state at shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 100));

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
