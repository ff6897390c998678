//! What the boot server knows about the machines right now, read from the
//! registry once per runner tick: registered agents (where and how to call
//! them), the last boot each machine was served, their addresses and boot
//! settings. The only place the deployment code reads the registry, so a
//! change of the registry's shape is fixed here.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::config::BootMode;
use crate::dhcp::DhcpService;
use crate::mac::MacAddr;
use crate::state::{BootSetting, Registry};

use super::agent::AgentAddr;

/// A registered agent.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// How to call it.
    pub addr: AgentAddr,
    /// Registration time (unix seconds).
    pub registered_at: u64,
}

/// One machine as the registry sees it.
#[derive(Debug, Clone, Default)]
pub struct ClientFacts {
    /// Current address (lease, sighting or agent).
    pub ip: Option<Ipv4Addr>,
    /// Last boot served: mode and unix seconds.
    pub last_boot: Option<(BootMode, u64)>,
    /// Stored boot setting.
    pub boot: BootSetting,
    /// Last sighting (unix seconds).
    pub last_seen: Option<u64>,
    /// Host name.
    pub hostname: Option<String>,
}

/// A snapshot.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    /// Agents by the MAC of the machine they registered for.
    pub agents: HashMap<MacAddr, AgentView>,
    /// Machines the registry knows.
    pub clients: HashMap<MacAddr, ClientFacts>,
    /// The last probe of each registered agent (empty where nobody asked).
    pub presence: HashMap<MacAddr, super::presence::Probe>,
}

fn parse_rfc3339(s: &str) -> Option<u64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| u64::try_from(t.unix_timestamp()).ok())
}

/// The lease address of `mac`, if DHCP runs and it holds a bound lease.
pub fn lease_ip(dhcp: Option<&DhcpService>, mac: MacAddr) -> Option<Ipv4Addr> {
    let d = dhcp?;
    d.leases()
        .get(mac)
        .filter(|l| l.state == crate::dhcp::leases::LeaseState::Bound)
        .map(|l| l.ip)
}

impl Fleet {
    /// Reads the registry.
    pub fn read(registry: &Registry, default_mode: BootMode, dhcp: Option<&DhcpService>) -> Fleet {
        let mut agents = HashMap::new();
        for a in registry.agents(true) {
            let Some(token) = a.token.clone() else {
                continue;
            };
            // The address the registration came from is the one that
            // reached us; else the first IPv4 the agent listed.
            let ip = a
                .source
                .filter(|s| !s.is_unspecified())
                .or_else(|| a.ips.iter().copied().find(IpAddr::is_ipv4))
                .or_else(|| a.ips.first().copied());
            let Some(ip) = ip else {
                continue;
            };
            let host = match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => v4.to_string(),
                    None => format!("[{v6}]"),
                },
            };
            let view = AgentView {
                addr: AgentAddr {
                    base: format!("https://{host}:{}", a.port),
                    fingerprint: a.cert_fingerprint.clone(),
                    token,
                },
                registered_at: a.registered_at,
            };
            // Only the machine's own MAC (the one it booted from, bound by
            // the registration): the other MACs an agent lists confer nothing.
            if let Some(m) = a.macs.first() {
                agents.insert(*m, view);
            }
        }
        let clients = registry
            .clients(default_mode, |m| lease_ip(dhcp, m))
            .into_iter()
            .map(|c| {
                let ip = match c.ip {
                    Some(IpAddr::V4(v4)) => Some(v4),
                    _ => None,
                };
                (
                    c.mac,
                    ClientFacts {
                        ip,
                        last_boot: c
                            .last_boot
                            .as_ref()
                            .and_then(|b| Some((b.mode, parse_rfc3339(&b.at)?))),
                        boot: c.boot.clone(),
                        last_seen: c.last_seen.as_deref().and_then(parse_rfc3339),
                        hostname: c.hostname.clone(),
                    },
                )
            })
            .collect();
        Fleet {
            agents,
            clients,
            presence: HashMap::new(),
        }
    }
}
