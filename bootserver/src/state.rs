//! Per-machine state: boot modes, what the DHCP service saw, registered agents.
//!
//! Kept in memory behind a mutex and persisted as one JSON file
//! (`state.json` in the data directory) with an atomic write. Changes made
//! through the API (boot modes, registrations) and the consumption of a
//! one-shot mode are written before the request is answered; sightings from
//! DHCP only mark the state dirty and a background task saves it at most
//! every couple of seconds, so the packet path never waits for the disk.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
}

/// Most machines recorded from DHCP sightings alone.
pub const MAX_CLIENTS: usize = 50_000;

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
}

/// A stored agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    /// MACs (first = key).
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
}

/// Last boot.
#[derive(Debug, Clone, Serialize)]
pub struct LastBootView {
    /// Mode served.
    pub mode: BootMode,
    /// When.
    pub at: String,
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
    dirty: AtomicBool,
    path: PathBuf,
    write_lock: tokio::sync::Mutex<()>,
    /// Machines allowed to upload images with their agent's own token, and
    /// until when (unix seconds). In memory: grants are short-lived.
    capture: Mutex<std::collections::HashMap<MacAddr, u64>>,
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
            dirty: AtomicBool::new(false),
            path,
            write_lock: tokio::sync::Mutex::new(()),
            capture: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Let the agent on `mac` upload images with its own token until
    /// `until` (unix seconds).
    pub fn grant_capture(&self, mac: MacAddr, until: u64) {
        if let Ok(mut g) = self.capture.lock() {
            g.insert(mac, until);
        }
    }

    /// Withdraw a capture grant.
    pub fn revoke_capture(&self, mac: MacAddr) {
        if let Ok(mut g) = self.capture.lock() {
            g.remove(&mac);
        }
    }

    /// Until when (unix seconds) `mac` may upload, if a grant is active.
    pub fn capture_until(&self, mac: MacAddr) -> Option<u64> {
        let now = unix_now();
        self.capture
            .lock()
            .ok()?
            .get(&mac)
            .copied()
            .filter(|&t| t > now)
    }

    /// True when `token` is the registered token of an agent on a machine
    /// with an active capture grant.
    pub fn token_may_capture(&self, token: &str) -> bool {
        self.agents(true).iter().any(|a| {
            a.token
                .as_deref()
                .is_some_and(|t| aula_imager::tls::secrets_equal(token.as_bytes(), t.as_bytes()))
                && a.macs.iter().any(|m| self.capture_until(*m).is_some())
        })
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
        if g.clients.len() >= MAX_CLIENTS && !g.clients.contains_key(&mac) {
            // Forged netboot requests with random MACs must not grow the
            // state file without bound; known machines are still updated.
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
        self.dirty.store(true, Ordering::Relaxed);
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
        }
        self.save().await
    }

    /// The mode for the script being served now. A one-shot mode is consumed
    /// here (the boot counts as used when its script is served) and the
    /// change is on disk before this returns.
    pub async fn take_boot(
        &self,
        mac: MacAddr,
        default: BootMode,
        ip: Option<Ipv4Addr>,
    ) -> Result<BootMode, StateError> {
        let (mode, consumed) = {
            let mut g = self.lock();
            let c = g.clients.entry(mac).or_default();
            let now = unix_now();
            let (mode, consumed) = match c.boot.once.take() {
                Some(m) => (m, true),
                None => (c.boot.mode.unwrap_or(default), false),
            };
            c.last_seen = Some(now);
            c.last_boot = Some((mode, now));
            if ip.is_some() {
                c.ip = ip;
            }
            (mode, consumed)
        };
        if consumed {
            self.save().await?;
        } else {
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(mode)
    }

    /// Stores an agent registration (replacing one with the same first MAC,
    /// and any older one claiming the same MACs), persisted.
    pub async fn register_agent(&self, rec: AgentRecord) -> Result<(), StateError> {
        {
            let mut g = self.lock();
            let key = rec.macs[0];
            g.agents
                .retain(|_, a| !a.macs.iter().any(|m| rec.macs.contains(m)));
            for m in &rec.macs {
                let c = g.clients.entry(*m).or_default();
                c.last_seen = Some(rec.registered_at);
                if let Some(IpAddr::V4(v4)) = rec.ips.iter().find(|i| i.is_ipv4()) {
                    c.ip = Some(*v4);
                }
                if rec.hostname.is_some() {
                    c.hostname = rec.hostname.clone();
                }
            }
            g.agents.insert(key, rec);
        }
        self.save().await
    }

    /// The registered token of the agent that owns `mac`, if any.
    pub fn agent_token(&self, mac: MacAddr) -> Option<String> {
        self.agents(true)
            .into_iter()
            .find(|a| a.macs.contains(&mac))
            .and_then(|a| a.token)
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
        let agent_macs: std::collections::HashSet<MacAddr> = g
            .agents
            .values()
            .flat_map(|a| a.macs.iter().copied())
            .collect();
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
            })
            .collect()
    }

    /// Writes the state now (serialised with other writers).
    pub async fn save(&self) -> Result<(), StateError> {
        let _w = self.write_lock.lock().await;
        self.dirty.store(false, Ordering::Relaxed);
        let bytes = {
            let g = self.lock();
            serde_json::to_vec_pretty(&*g).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            })?
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || atomic_write(&path, &bytes)).await??;
        Ok(())
    }

    /// Saves sightings every `period` while there are unsaved ones, until cancelled.
    pub async fn autosave(self: Arc<Self>, period: Duration, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
            if self.dirty.load(Ordering::Relaxed) {
                if let Err(e) = self.save().await {
                    tracing::error!(error = %e, "saving client state");
                }
            }
        }
        if self.dirty.load(Ordering::Relaxed) {
            if let Err(e) = self.save().await {
                tracing::error!(error = %e, "saving client state at shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            reg.take_boot(mac, BootMode::Live, None)
                .await
                .expect("take"),
            BootMode::Live
        );
        let reg = Registry::load(dir.path()).expect("reload after consume");
        assert_eq!(
            reg.take_boot(mac, BootMode::Live, None)
                .await
                .expect("take"),
            BootMode::Local
        );
    }
}
