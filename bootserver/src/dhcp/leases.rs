//! The lease database: address pools, reservations and leases, all in memory
//! with O(1) lookups (hash maps by MAC and by address, a free list per pool).
//! Durability is the journal's job ([`super::journal`]); this module only
//! decides.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::config::{DhcpConfig, Ipv4Net};
use crate::mac::MacAddr;

/// State of a lease record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Offered, waiting for the client's REQUEST (not persisted).
    Offered,
    /// Acknowledged.
    Bound,
    /// Released, declined or reclaimed; kept only to give the client the same
    /// address again if it is still free.
    Released,
}

/// One client's lease record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// Unix time the lease (or offer) runs out.
    pub expires: u64,
    /// State.
    pub state: LeaseState,
    /// Host name the client sent.
    pub hostname: Option<String>,
}

/// A lease as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseInfo {
    /// Client.
    pub mac: MacAddr,
    /// Address.
    pub ip: Ipv4Addr,
    /// Unix time it runs out.
    pub expires: u64,
    /// State.
    pub state: LeaseState,
    /// Host name the client sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// One address pool.
#[derive(Debug)]
pub struct Pool {
    /// The network.
    pub net: Ipv4Net,
    /// First dynamic address.
    pub start: u32,
    /// Last dynamic address.
    pub end: u32,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain: Option<String>,
    /// Lease time, seconds.
    pub lease_time: u32,
    /// Candidate free addresses. Entries may be stale (taken since); they are
    /// checked when popped.
    free: VecDeque<u32>,
    /// Last time expired leases were reclaimed into `free`.
    last_reclaim: u64,
}

impl Pool {
    fn in_range(&self, ip: u32) -> bool {
        (self.start..=self.end).contains(&ip)
    }
}

/// A static reservation.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// Address.
    pub ip: Ipv4Addr,
    /// Option 12.
    pub hostname: Option<String>,
}

/// Result of a REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Bind and ACK with this lease time.
    Ack(u32),
    /// NAK with this reason.
    Nak(&'static str),
    /// Stay silent.
    Ignore,
}

/// A change that must reach the journal before the client is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum LeaseChange {
    /// A lease bound or renewed.
    Bind {
        /// Client.
        mac: MacAddr,
        /// Address.
        ip: Ipv4Addr,
        /// Unix expiry.
        expires: u64,
        /// Host name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
    },
    /// A lease released or declined.
    Free {
        /// Client.
        mac: MacAddr,
        /// Address.
        ip: Ipv4Addr,
    },
}

/// All pools, reservations and leases.
#[derive(Debug)]
pub struct LeaseDb {
    pools: Vec<Pool>,
    leases: HashMap<MacAddr, Lease>,
    owner: HashMap<u32, MacAddr>,
    reserved_by_mac: HashMap<MacAddr, Reservation>,
    reserved_ips: HashMap<u32, MacAddr>,
    declined: HashMap<u32, u64>,
    decline_time: u32,
    offer_time: u32,
    authoritative: bool,
    /// Above this many records, released ones (kept only for address
    /// affinity) are purged, so random MACs cannot grow memory without bound.
    max_records: usize,
}

impl LeaseDb {
    /// Builds the pools from a validated config.
    pub fn new(cfg: &DhcpConfig, server: Ipv4Addr) -> Self {
        let mut reserved_by_mac = HashMap::new();
        let mut reserved_ips = HashMap::new();
        for r in &cfg.reservations {
            reserved_by_mac.insert(
                r.mac,
                Reservation {
                    ip: r.ip,
                    hostname: r.hostname.clone(),
                },
            );
            reserved_ips.insert(u32::from(r.ip), r.mac);
        }
        let pools: Vec<Pool> = cfg
            .subnets
            .iter()
            .filter_map(|s| {
                let net = Ipv4Net::parse(&s.network).ok()?;
                let start = u32::from(s.range[0]);
                let end = u32::from(s.range[1]);
                let free = (start..=end)
                    .filter(|ip| *ip != u32::from(server) && !reserved_ips.contains_key(ip))
                    .collect();
                Some(Pool {
                    net,
                    start,
                    end,
                    router: s.router,
                    dns: s.dns.clone(),
                    domain: s.domain.clone(),
                    lease_time: s.lease_time.unwrap_or(cfg.lease_time),
                    free,
                    last_reclaim: 0,
                })
            })
            .collect();
        let addresses: usize = pools
            .iter()
            .map(|p: &Pool| (p.end - p.start) as usize + 1)
            .sum();
        Self {
            max_records: (addresses * 4).max(4096),
            pools,
            leases: HashMap::new(),
            owner: HashMap::new(),
            reserved_by_mac,
            reserved_ips,
            declined: HashMap::new(),
            decline_time: cfg.decline_time,
            offer_time: cfg.offer_time,
            authoritative: cfg.authoritative,
        }
    }

    /// The pools.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The pool serving a request: the one holding the relay's `giaddr`, or
    /// for directly attached clients the one holding the server's address.
    pub fn pool_for(&self, giaddr: Ipv4Addr, server: Ipv4Addr) -> Option<usize> {
        let key = if giaddr.is_unspecified() {
            server
        } else {
            giaddr
        };
        self.pools.iter().position(|p| p.net.contains(key))
    }

    fn pool_of_ip(&self, ip: u32) -> Option<usize> {
        self.pools
            .iter()
            .position(|p| p.net.contains(Ipv4Addr::from(ip)))
    }

    /// Replays a journal entry at start-up. Entries that no longer fit the
    /// configuration (address outside every pool, reserved for another
    /// client) are skipped and reported as `false`.
    pub fn replay(&mut self, change: &LeaseChange) -> bool {
        match change {
            LeaseChange::Bind {
                mac,
                ip,
                expires,
                hostname,
            } => {
                let n = u32::from(*ip);
                let Some(p) = self.pool_of_ip(n) else {
                    return false;
                };
                let reserved_ok = match self.reserved_ips.get(&n) {
                    Some(owner) => owner == mac,
                    None => self.pools[p].in_range(n) && !self.reserved_by_mac.contains_key(mac),
                };
                if !reserved_ok {
                    return false;
                }
                if let Some(other) = self.owner.get(&n).copied() {
                    if other != *mac {
                        self.leases.remove(&other);
                    }
                }
                self.set_lease(
                    *mac,
                    Lease {
                        ip: *ip,
                        expires: *expires,
                        state: LeaseState::Bound,
                        hostname: hostname.clone(),
                    },
                );
                true
            }
            LeaseChange::Free { mac, ip } => {
                if self.leases.get(mac).is_some_and(|l| l.ip == *ip) {
                    self.release_record(*mac);
                }
                true
            }
        }
    }

    /// Installs `lease` as the record of `mac`, dropping its previous one.
    fn set_lease(&mut self, mac: MacAddr, lease: Lease) {
        let n = u32::from(lease.ip);
        if let Some(old) = self.leases.get(&mac) {
            let old_n = u32::from(old.ip);
            if old_n != n && self.owner.get(&old_n) == Some(&mac) {
                self.owner.remove(&old_n);
                if let Some(p) = self.pool_of_ip(old_n) {
                    self.pools[p].free.push_back(old_n);
                }
            }
        }
        self.owner.insert(n, mac);
        self.leases.insert(mac, lease);
    }

    /// Marks `mac`'s record released and returns its address to the pool.
    fn release_record(&mut self, mac: MacAddr) {
        if let Some(l) = self.leases.get_mut(&mac) {
            l.state = LeaseState::Released;
            let n = u32::from(l.ip);
            if self.owner.get(&n) == Some(&mac) {
                self.owner.remove(&n);
                if let Some(p) = self
                    .pools
                    .iter()
                    .position(|p| p.net.contains(Ipv4Addr::from(n)))
                {
                    if self.pools[p].in_range(n) {
                        self.pools[p].free.push_back(n);
                    }
                }
            }
        }
    }

    fn usable_by(&self, ip: u32, mac: MacAddr, now: u64) -> bool {
        if let Some(owner) = self.reserved_ips.get(&ip) {
            return *owner == mac;
        }
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return false;
        }
        match self.owner.get(&ip) {
            None => true,
            Some(o) if *o == mac => true,
            // Another client's record: usable only once it has run out.
            Some(o) => self.leases.get(o).is_none_or(|l| l.expires <= now),
        }
    }

    /// Takes `ip` away from an expired previous owner, if any.
    fn evict_expired_owner(&mut self, ip: u32, mac: MacAddr) {
        if let Some(o) = self.owner.get(&ip).copied() {
            if o != mac {
                self.owner.remove(&ip);
                self.leases.remove(&o);
            }
        }
    }

    /// Picks an address for a DISCOVER and holds it as an offer.
    pub fn offer(
        &mut self,
        pool: usize,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        let p_net = self.pools.get(pool)?.net;
        if self.leases.len() > self.max_records {
            self.leases.retain(|_, l| l.state != LeaseState::Released);
        }
        // 1. A reservation.
        if let Some(r) = self.reserved_by_mac.get(&mac) {
            if !p_net.contains(r.ip) {
                return None;
            }
            let ip = r.ip;
            self.hold_offer(mac, ip, now);
            return Some(ip);
        }
        // 2. The client's previous address.
        if let Some(l) = self.leases.get(&mac) {
            let n = u32::from(l.ip);
            if p_net.contains(l.ip) && self.pools[pool].in_range(n) && self.usable_by(n, mac, now) {
                let ip = l.ip;
                self.evict_expired_owner(n, mac);
                self.hold_offer(mac, ip, now);
                return Some(ip);
            }
        }
        // 3. The address it asks for.
        if let Some(req) = requested {
            let n = u32::from(req);
            if self.pools[pool].in_range(n) && self.usable_by(n, mac, now) {
                self.evict_expired_owner(n, mac);
                self.hold_offer(mac, req, now);
                return Some(req);
            }
        }
        // 4. The free list; reclaim expired leases once if it runs dry.
        let ip = match self.pop_free(pool, now) {
            Some(ip) => ip,
            None => {
                if self.pools[pool].last_reclaim == now {
                    return None;
                }
                self.pools[pool].last_reclaim = now;
                self.reclaim(pool, now);
                self.pop_free(pool, now)?
            }
        };
        self.hold_offer(mac, ip, now);
        Some(ip)
    }

    fn pop_free(&mut self, pool: usize, now: u64) -> Option<Ipv4Addr> {
        let mut tries = self.pools[pool].free.len();
        while tries > 0 {
            tries -= 1;
            let n = self.pools[pool].free.pop_front()?;
            if self.owner.contains_key(&n) || self.reserved_ips.contains_key(&n) {
                continue; // stale entry: taken since it was freed
            }
            if self.declined.get(&n).is_some_and(|until| *until > now) {
                self.pools[pool].free.push_back(n);
                continue;
            }
            self.declined.remove(&n);
            return Some(Ipv4Addr::from(n));
        }
        None
    }

    /// Returns expired offers and leases of `pool` to its free list.
    fn reclaim(&mut self, pool: usize, now: u64) {
        let net = self.pools[pool].net;
        let expired: Vec<MacAddr> = self
            .leases
            .iter()
            .filter(|(_, l)| {
                l.state != LeaseState::Released && l.expires <= now && net.contains(l.ip)
            })
            .map(|(m, _)| *m)
            .collect();
        for m in expired {
            let offered = self
                .leases
                .get(&m)
                .is_some_and(|l| l.state == LeaseState::Offered);
            self.release_record(m);
            if offered {
                // A never-acknowledged offer carries no affinity worth keeping.
                self.leases.remove(&m);
            }
        }
    }

    fn hold_offer(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) {
        let offer_until = now + u64::from(self.offer_time);
        let hostname = self.leases.get(&mac).and_then(|l| l.hostname.clone());
        match self.leases.get_mut(&mac) {
            // An unexpired bound lease on the same address stays bound.
            Some(l) if l.ip == ip && l.state == LeaseState::Bound && l.expires > now => {}
            _ => self.set_lease(
                mac,
                Lease {
                    ip,
                    expires: offer_until,
                    state: LeaseState::Offered,
                    hostname,
                },
            ),
        }
    }

    /// Handles a REQUEST for `ip` (SELECTING, INIT-REBOOT, RENEWING or
    /// REBINDING; the caller has already checked the server identifier).
    /// On `Ack` the lease is bound in memory and the returned change must be
    /// journaled before the ACK goes out.
    pub fn request(
        &mut self,
        pool: usize,
        mac: MacAddr,
        ip: Ipv4Addr,
        hostname: Option<&str>,
        now: u64,
    ) -> (RequestOutcome, Option<LeaseChange>) {
        let Some(p) = self.pools.get(pool) else {
            return (RequestOutcome::Ignore, None);
        };
        let n = u32::from(ip);
        if !p.net.contains(ip) {
            return (RequestOutcome::Nak("address not on this network"), None);
        }
        let lease_time = p.lease_time;
        let in_range = p.in_range(n);
        if let Some(r) = self.reserved_by_mac.get(&mac) {
            if r.ip != ip {
                return (RequestOutcome::Nak("client has a reserved address"), None);
            }
        } else if let Some(owner) = self.reserved_ips.get(&n) {
            if *owner != mac {
                return (
                    RequestOutcome::Nak("address reserved for another client"),
                    None,
                );
            }
        } else if !in_range {
            let known = self.leases.get(&mac).is_some_and(|l| l.ip == ip);
            if !known {
                return if self.authoritative {
                    (RequestOutcome::Nak("address outside the pool"), None)
                } else {
                    (RequestOutcome::Ignore, None)
                };
            }
        }
        if !self.usable_by(n, mac, now) {
            return (RequestOutcome::Nak("address in use"), None);
        }
        self.evict_expired_owner(n, mac);
        self.declined.remove(&n);
        let expires = now + u64::from(lease_time);
        let hostname = hostname
            .map(str::to_owned)
            .or_else(|| self.leases.get(&mac).and_then(|l| l.hostname.clone()));
        self.set_lease(
            mac,
            Lease {
                ip,
                expires,
                state: LeaseState::Bound,
                hostname: hostname.clone(),
            },
        );
        (
            RequestOutcome::Ack(lease_time),
            Some(LeaseChange::Bind {
                mac,
                ip,
                expires,
                hostname,
            }),
        )
    }

    /// A client chose another server: drop our offer.
    pub fn forget_offer(&mut self, mac: MacAddr) {
        if self
            .leases
            .get(&mac)
            .is_some_and(|l| l.state == LeaseState::Offered)
        {
            self.release_record(mac);
            self.leases.remove(&mac);
        }
    }

    /// RELEASE of `ip` by `mac`.
    pub fn release(&mut self, mac: MacAddr, ip: Ipv4Addr) -> Option<LeaseChange> {
        if self
            .leases
            .get(&mac)
            .is_some_and(|l| l.ip == ip && l.state == LeaseState::Bound)
        {
            self.release_record(mac);
            return Some(LeaseChange::Free { mac, ip });
        }
        None
    }

    /// DECLINE of `ip` by `mac`: the address is in use by someone else.
    pub fn decline(&mut self, mac: MacAddr, ip: Ipv4Addr, now: u64) -> Option<LeaseChange> {
        let n = u32::from(ip);
        self.pool_of_ip(n)?;
        let was_ours = self.leases.get(&mac).is_some_and(|l| l.ip == ip);
        if !was_ours {
            return None;
        }
        let bound = self
            .leases
            .get(&mac)
            .is_some_and(|l| l.state == LeaseState::Bound);
        self.release_record(mac);
        // Forget the client's affinity to an address that is taken.
        self.leases.remove(&mac);
        self.declined.insert(n, now + u64::from(self.decline_time));
        bound.then_some(LeaseChange::Free { mac, ip })
    }

    /// The reservation of a client.
    pub fn reservation(&self, mac: MacAddr) -> Option<&Reservation> {
        self.reserved_by_mac.get(&mac)
    }

    /// The record of a client.
    pub fn get(&self, mac: MacAddr) -> Option<&Lease> {
        self.leases.get(&mac)
    }

    /// Bound leases, for the API.
    pub fn bound(&self) -> Vec<LeaseInfo> {
        let mut v: Vec<LeaseInfo> = self
            .leases
            .iter()
            .filter(|(_, l)| l.state == LeaseState::Bound)
            .map(|(m, l)| LeaseInfo {
                mac: *m,
                ip: l.ip,
                expires: l.expires,
                state: l.state,
                hostname: l.hostname.clone(),
            })
            .collect();
        v.sort_by_key(|l| u32::from(l.ip));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReservationConfig, SubnetConfig};

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    fn db() -> LeaseDb {
        let cfg = DhcpConfig {
            enabled: true,
            subnets: vec![SubnetConfig {
                network: "10.0.0.0/24".into(),
                range: [Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 12)],
                router: None,
                dns: vec![],
                domain: None,
                lease_time: None,
            }],
            reservations: vec![ReservationConfig {
                mac: mac(99),
                ip: Ipv4Addr::new(10, 0, 0, 50),
                hostname: Some("pc99".into()),
            }],
            ..DhcpConfig::default()
        };
        LeaseDb::new(&cfg, Ipv4Addr::new(10, 0, 0, 1))
    }

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    #[test]
    fn offer_request_binds_and_the_same_client_gets_the_same_address() {
        let mut d = db();
        let p = d.pool_for(Ipv4Addr::UNSPECIFIED, SERVER).expect("pool");
        let ip = d.offer(p, mac(1), None, 100).expect("offer");
        let (out, change) = d.request(p, mac(1), ip, Some("pc1"), 100);
        assert_eq!(out, RequestOutcome::Ack(3600));
        assert!(matches!(change, Some(LeaseChange::Bind { .. })));
        assert_eq!(d.offer(p, mac(1), None, 200), Some(ip));
        let other = d.offer(p, mac(2), Some(ip), 200).expect("second client");
        assert_ne!(
            other, ip,
            "a bound address must not be offered to another client"
        );
    }

    #[test]
    fn pool_exhaustion_then_expiry_reclaims_addresses() {
        let mut d = db();
        let p = 0;
        for i in 1..=3 {
            let ip = d.offer(p, mac(i), None, 0).expect("offer");
            assert_eq!(
                d.request(p, mac(i), ip, None, 0).0,
                RequestOutcome::Ack(3600)
            );
        }
        assert_eq!(d.offer(p, mac(4), None, 10), None, "pool of 3 is full");
        assert!(
            d.offer(p, mac(4), None, 4000).is_some(),
            "expired leases are reclaimed"
        );
    }

    #[test]
    fn reservations_are_honoured_and_protected() {
        let mut d = db();
        assert_eq!(
            d.offer(0, mac(99), None, 0),
            Some(Ipv4Addr::new(10, 0, 0, 50))
        );
        let (out, _) = d.request(0, mac(1), Ipv4Addr::new(10, 0, 0, 50), None, 0);
        assert!(matches!(out, RequestOutcome::Nak(_)));
        let (out, _) = d.request(0, mac(99), Ipv4Addr::new(10, 0, 0, 50), None, 0);
        assert_eq!(out, RequestOutcome::Ack(3600));
    }

    #[test]
    fn release_frees_and_decline_quarantines() {
        let mut d = db();
        let ip = d.offer(0, mac(1), None, 0).expect("offer");
        d.request(0, mac(1), ip, None, 0);
        assert!(d.release(mac(1), ip).is_some());
        assert!(d.bound().is_empty());
        let ip2 = d.offer(0, mac(2), None, 0).expect("offer");
        d.request(0, mac(2), ip2, None, 0);
        assert!(d.decline(mac(2), ip2, 0).is_some());
        let (out, _) = d.request(0, mac(3), ip2, None, 10);
        assert!(
            matches!(out, RequestOutcome::Nak(_)),
            "declined address is quarantined"
        );
    }

    #[test]
    fn requests_outside_the_network_are_nakked() {
        let mut d = db();
        let (out, _) = d.request(0, mac(1), Ipv4Addr::new(192, 0, 2, 7), None, 0);
        assert!(matches!(out, RequestOutcome::Nak(_)));
    }

    #[test]
    fn replay_restores_bound_leases() {
        let mut d = db();
        let ip = Ipv4Addr::new(10, 0, 0, 11);
        assert!(d.replay(&LeaseChange::Bind {
            mac: mac(7),
            ip,
            expires: 9999,
            hostname: None
        }));
        let other = d.offer(0, mac(8), Some(ip), 10).expect("offer");
        assert_ne!(other, ip);
        assert_eq!(d.offer(0, mac(7), None, 10), Some(ip));
    }

    #[test]
    fn random_macs_cannot_grow_the_table_without_bound() {
        let mut d = db();
        for i in 0..20_000u32 {
            let b = i.to_be_bytes();
            let m = MacAddr([2, 1, b[0], b[1], b[2], b[3]]);
            let now = u64::from(i) * 100; // every earlier offer has expired
            if let Some(ip) = d.offer(0, m, None, now) {
                if i % 2 == 0 {
                    d.request(0, m, ip, None, now);
                }
            }
        }
        assert!(
            d.leases.len() <= d.max_records + 4,
            "{} records",
            d.leases.len()
        );
    }
}
