//! The DHCP socket loops.
//!
//! One tokio task per listening socket (port 67, and the PXE port 4011). Each
//! drains its socket with non-blocking reads, decides under a short-held lock
//! on the lease database and answers at once — except ACKs for new or renewed
//! leases, which go to the journal thread and leave only after the lease is on
//! disk ([`super::journal`]). A datagram that does not parse is dropped
//! silently; nothing a client sends can stop the loop.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use dhcproto::v4::MessageType;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::journal::{self, DeferredReply, Journal};
use super::leases::{LeaseChange, LeaseDb, RequestOutcome};
use super::packet::{self, ReplyOptions, Request};
use super::pxe::{self, ClientKind};
use crate::config::{Config, DhcpMode};
use crate::metrics::DhcpCounters;
use crate::netutil;
use crate::state::{unix_now, Registry};

/// Errors starting the DHCP service.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// A socket could not be opened.
    #[error("binding DHCP socket {addr} on {device}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Interface.
        device: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lease journal could not be read or opened.
    #[error(transparent)]
    Journal(#[from] crate::persist::PersistError),
}

/// The running DHCP service: what the API needs from it.
#[derive(Clone)]
pub struct DhcpService {
    leases: Arc<Mutex<LeaseDb>>,
    /// Local addresses of the listening sockets (67 first).
    pub local_addrs: Vec<SocketAddr>,
}

impl DhcpService {
    /// Locks the lease database.
    pub fn leases(&self) -> MutexGuard<'_, LeaseDb> {
        lock(&self.leases)
    }
}

fn lock(m: &Mutex<LeaseDb>) -> MutexGuard<'_, LeaseDb> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    cfg: Arc<Config>,
    leases: Arc<Mutex<LeaseDb>>,
    registry: Arc<Registry>,
    journal: Option<Journal>,
    server: Ipv4Addr,
    base_url: String,
    /// Counters per pool (same index as the lease database's pools).
    pool_metrics: Vec<DhcpCounters>,
    /// Counters of proxyDHCP answers.
    proxy_metrics: DhcpCounters,
}

/// What to do with a request.
enum Action {
    None,
    Send(SocketAddr),
    Defer(LeaseChange, SocketAddr),
    Record(LeaseChange),
}

/// Opens the sockets, loads the leases and spawns the loops on `tracker`.
pub fn start(
    cfg: Arc<Config>,
    device: &str,
    registry: Arc<Registry>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<DhcpService, DhcpError> {
    let d = &cfg.dhcp;
    let mut ports = vec![d.port];
    if d.pxe_port != 0 && d.pxe_port != d.port {
        ports.push(d.pxe_port);
    }
    let mut std_socks = Vec::new();
    for port in &ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
        let s =
            netutil::udp_socket(addr, Some(device), true).map_err(|source| DhcpError::Bind {
                addr,
                device: device.to_owned(),
                source,
            })?;
        std_socks.push(s);
    }
    let mut db = LeaseDb::new(d, cfg.server.address);
    let journal = if d.mode == DhcpMode::Full {
        let path: PathBuf = cfg.server.data_dir.join("leases.journal");
        let changes = journal::load(&path)?;
        let mut skipped = 0usize;
        for c in &changes {
            if !db.replay(c) {
                skipped += 1;
            }
        }
        tracing::info!(
            entries = changes.len(),
            skipped,
            bound = db.bound().len(),
            "leases loaded"
        );
        let clones = std_socks
            .iter()
            .map(|s| s.try_clone())
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| DhcpError::Bind {
                addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, d.port)),
                device: device.to_owned(),
                source,
            })?;
        let live: Vec<LeaseChange> = db
            .bound()
            .into_iter()
            .map(|l| LeaseChange::Bind {
                mac: l.mac,
                ip: l.ip,
                expires: l.expires,
                hostname: l.hostname,
            })
            .collect();
        let (j, handle) = journal::start(path, &live, clones)?;
        // The thread ends when the last Journal handle (held by the loops) drops.
        tracker.spawn_blocking(move || {
            if handle.join().is_err() {
                tracing::error!("lease journal thread panicked");
            }
        });
        Some(j)
    } else {
        None
    };
    let m = crate::metrics::global();
    let pool_metrics = db
        .pools()
        .iter()
        .map(|p| m.dhcp_counters(&format!("{}/{}", p.net.addr, p.net.prefix)))
        .collect();
    let leases = Arc::new(Mutex::new(db));
    let shared = Arc::new(Shared {
        pool_metrics,
        proxy_metrics: m.dhcp_counters("proxy"),
        base_url: cfg.public_url(),
        server: cfg.server.address,
        cfg: cfg.clone(),
        leases: leases.clone(),
        registry,
        journal,
    });
    let mut local_addrs = Vec::new();
    for (idx, s) in std_socks.into_iter().enumerate() {
        let sock = UdpSocket::from_std(s).map_err(|source| DhcpError::Bind {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, ports[idx])),
            device: device.to_owned(),
            source,
        })?;
        if let Ok(a) = sock.local_addr() {
            local_addrs.push(a);
        }
        let shared = shared.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move { shared.run(idx, sock, cancel).await });
    }
    tracing::info!(mode = ?cfg.dhcp.mode, %device, ports = ?ports, "DHCP service started");
    Ok(DhcpService {
        leases,
        local_addrs,
    })
}

impl Shared {
    async fn run(self: Arc<Self>, idx: usize, sock: UdpSocket, cancel: CancellationToken) {
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::with_capacity(1024);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = sock.readable() => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "DHCP socket error");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            loop {
                let (n, src) = match sock.try_recv_from(&mut buf) {
                    Ok(v) => v,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "DHCP receive error");
                        break;
                    }
                };
                match self.handle(idx, &buf[..n], src, &mut out) {
                    Action::None => {}
                    Action::Send(dest) => send(&sock, &out, dest).await,
                    Action::Defer(change, dest) => {
                        let reply = DeferredReply {
                            data: std::mem::take(&mut out),
                            dest,
                            socket: idx,
                        };
                        self.submit(change, Some(reply));
                        out.reserve(1024);
                    }
                    Action::Record(change) => self.submit(change, None),
                }
            }
        }
        tracing::debug!(socket = idx, "DHCP loop stopped");
    }

    fn submit(&self, change: LeaseChange, reply: Option<DeferredReply>) {
        if let Some(j) = &self.journal {
            if j.submit(change, reply).is_err() {
                tracing::warn!("lease journal is behind; dropping a reply (the client will retry)");
            }
        }
    }

    fn handle(&self, idx: usize, buf: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> Action {
        let req = match packet::parse(buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::trace!(%src, error = %e, "dropping malformed DHCP datagram");
                return Action::None;
            }
        };
        let kind = pxe::classify(&req);
        if let Some(k) = kind {
            let ci = req.msg.ciaddr();
            self.registry.note_dhcp(
                req.mac,
                Some(k.firmware),
                (!ci.is_unspecified()).then_some(ci),
                req.hostname_str(),
            );
        }
        let on_pxe_port = idx > 0;
        if self.cfg.dhcp.mode == DhcpMode::Proxy || on_pxe_port {
            self.handle_proxy(&req, kind, on_pxe_port, src, out)
        } else {
            self.handle_full(&req, kind, out)
        }
    }

    fn boot(
        &self,
        req: &Request<'_>,
        kind: Option<ClientKind>,
        proxy: bool,
    ) -> Option<packet::PxeBoot> {
        let k = kind?;
        let sb = &self.cfg.boot.secure_boot;
        let signed = sb.any() && sb.wants(req.mac, self.registry.in_secure_boot_room(req.mac));
        let b = pxe::boot_for(
            req,
            k,
            req.mac,
            &self.cfg.boot.programs,
            &self.base_url,
            proxy,
            signed.then_some(crate::grub::SHIM),
        );
        match &b {
            Some(b) => {
                tracing::info!(mac = %req.mac, firmware = ?k.firmware, ipxe = k.ipxe, secure_boot = signed, file = %b.file, msg = ?req.msg_type, "netboot client")
            }
            None => {
                tracing::info!(mac = %req.mac, firmware = ?k.firmware, "no boot program configured for this firmware")
            }
        }
        b
    }

    fn dest(&self, req: &Request<'_>, nak: bool) -> SocketAddr {
        let d = &self.cfg.dhcp;
        let gi = req.msg.giaddr();
        if !gi.is_unspecified() {
            return SocketAddr::V4(SocketAddrV4::new(gi, d.port));
        }
        let ci = req.msg.ciaddr();
        if nak || ci.is_unspecified() {
            // Without injecting ARP entries the server cannot unicast to a
            // client that has no address yet (iPXE sets no broadcast flag):
            // broadcast on the boot interface, as RFC 2131 allows.
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, d.client_port))
        } else {
            SocketAddr::V4(SocketAddrV4::new(ci, d.client_port))
        }
    }

    fn encode(
        &self,
        req: &Request<'_>,
        t: MessageType,
        yiaddr: Ipv4Addr,
        opts: &ReplyOptions,
        out: &mut Vec<u8>,
    ) -> bool {
        let ciaddr = if matches!(t, MessageType::Ack) {
            req.msg.ciaddr()
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        match packet::build_reply(req, t, self.server, yiaddr, ciaddr, opts, out) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "encoding DHCP reply");
                false
            }
        }
    }

    fn handle_proxy(
        &self,
        req: &Request<'_>,
        kind: Option<ClientKind>,
        on_pxe_port: bool,
        src: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Action {
        let m = &self.proxy_metrics;
        if req.msg_type == MessageType::Discover {
            m.discover.inc();
        } else if req.msg_type == MessageType::Request {
            m.request.inc();
        }
        let (reply_type, dest) = match (on_pxe_port, req.msg_type) {
            (false, MessageType::Discover) => (MessageType::Offer, self.dest(req, false)),
            (true, MessageType::Request | MessageType::Inform) => {
                // Boot-server discovery: the client has an address and listens
                // on the port it sent from.
                let dest = match src {
                    SocketAddr::V4(s) if !s.ip().is_unspecified() => src,
                    _ => self.dest(req, false),
                };
                // The address it announces here is the one its script
                // request must come from (see http::boot).
                if kind.is_some() {
                    let announced = match src {
                        SocketAddr::V4(s) if !s.ip().is_unspecified() => Some(*s.ip()),
                        _ => Some(req.msg.ciaddr()).filter(|c| !c.is_unspecified()),
                    };
                    if let Some(ip) = announced {
                        self.registry.note_announce(req.mac, ip);
                    }
                }
                (MessageType::Ack, dest)
            }
            (true, MessageType::Discover) => (MessageType::Offer, self.dest(req, false)),
            _ => return Action::None,
        };
        let Some(boot) = self.boot(req, kind, true) else {
            return Action::None;
        };
        let opts = ReplyOptions {
            boot: Some(boot),
            ..Default::default()
        };
        if self.encode(req, reply_type, Ipv4Addr::UNSPECIFIED, &opts, out) {
            if reply_type == MessageType::Offer {
                m.offer.inc();
            } else {
                m.ack.inc();
            }
            Action::Send(dest)
        } else {
            Action::None
        }
    }

    fn handle_full(
        &self,
        req: &Request<'_>,
        kind: Option<ClientKind>,
        out: &mut Vec<u8>,
    ) -> Action {
        let now = unix_now();
        let mut db = lock(&self.leases);
        let Some(pool) = db.pool_for(req.msg.giaddr(), self.server) else {
            tracing::debug!(giaddr = %req.msg.giaddr(), "no pool for relay");
            return Action::None;
        };
        let ours = |sid: Option<Ipv4Addr>| sid.is_none_or(|s| s == self.server);
        let Some(m) = self.pool_metrics.get(pool) else {
            return Action::None;
        };
        match req.msg_type {
            MessageType::Discover => {
                m.discover.inc();
                let Some(ip) = db.offer(pool, req.mac, req.requested_ip, now) else {
                    tracing::warn!(mac = %req.mac, "address pool exhausted");
                    return Action::None;
                };
                let opts = self.lease_options(&db, pool, req, kind, true);
                drop(db);
                if self.encode(req, MessageType::Offer, ip, &opts, out) {
                    m.offer.inc();
                    Action::Send(self.dest(req, false))
                } else {
                    Action::None
                }
            }
            MessageType::Request => {
                m.request.inc();
                let ip = if let Some(sid) = req.server_id {
                    if sid != self.server {
                        db.forget_offer(req.mac);
                        return Action::None;
                    }
                    match req.requested_ip {
                        Some(ip) => ip,
                        None => return Action::None,
                    }
                } else {
                    match req.requested_ip {
                        Some(ip) => ip,
                        None if !req.msg.ciaddr().is_unspecified() => req.msg.ciaddr(),
                        None => return Action::None,
                    }
                };
                let (outcome, change) = db.request(pool, req.mac, ip, req.hostname_str(), now);
                match (outcome, change) {
                    (RequestOutcome::Ack(_), Some(change)) => {
                        let opts = self.lease_options(&db, pool, req, kind, true);
                        drop(db);
                        if kind.is_some() {
                            self.registry.note_dhcp(req.mac, None, Some(ip), None);
                        }
                        if self.encode(req, MessageType::Ack, ip, &opts, out) {
                            m.ack.inc();
                            Action::Defer(change, self.dest(req, false))
                        } else {
                            Action::None
                        }
                    }
                    (RequestOutcome::Nak(reason), _) => {
                        drop(db);
                        tracing::debug!(mac = %req.mac, %ip, reason, "NAK");
                        let opts = ReplyOptions {
                            message: Some(reason.to_owned()),
                            ..Default::default()
                        };
                        if self.encode(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED, &opts, out) {
                            m.nak.inc();
                            Action::Send(self.dest(req, true))
                        } else {
                            Action::None
                        }
                    }
                    _ => Action::None,
                }
            }
            MessageType::Decline => {
                if !ours(req.server_id) {
                    return Action::None;
                }
                let Some(ip) = req.requested_ip else {
                    return Action::None;
                };
                tracing::warn!(mac = %req.mac, %ip, "client declined address (in use on the network)");
                match db.decline(req.mac, ip, now) {
                    Some(c) => Action::Record(c),
                    None => Action::None,
                }
            }
            MessageType::Release => {
                if !ours(req.server_id) {
                    return Action::None;
                }
                match db.release(req.mac, req.msg.ciaddr()) {
                    Some(c) => Action::Record(c),
                    None => Action::None,
                }
            }
            MessageType::Inform => {
                let opts = self.lease_options(&db, pool, req, kind, false);
                drop(db);
                if req.msg.ciaddr().is_unspecified() {
                    return Action::None;
                }
                if self.encode(req, MessageType::Ack, Ipv4Addr::UNSPECIFIED, &opts, out) {
                    m.ack.inc();
                    Action::Send(self.dest(req, false))
                } else {
                    Action::None
                }
            }
            _ => Action::None,
        }
    }

    fn lease_options(
        &self,
        db: &LeaseDb,
        pool: usize,
        req: &Request<'_>,
        kind: Option<ClientKind>,
        with_lease: bool,
    ) -> ReplyOptions {
        let Some(p) = db.pools().get(pool) else {
            return ReplyOptions::default();
        };
        ReplyOptions {
            subnet_mask: Some(p.net.mask()),
            router: p.router,
            dns: p.dns.clone(),
            domain: p.domain.clone(),
            hostname: db.reservation(req.mac).and_then(|r| r.hostname.clone()),
            broadcast: Some(p.net.broadcast()),
            lease_time: with_lease.then_some(p.lease_time),
            boot: self.boot(req, kind, false),
            message: None,
        }
    }
}

async fn send(sock: &UdpSocket, data: &[u8], dest: SocketAddr) {
    match sock.try_send_to(data, dest) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if let Err(e) = sock.send_to(data, dest).await {
                tracing::debug!(%dest, error = %e, "sending DHCP reply");
            }
        }
        Err(e) => tracing::debug!(%dest, error = %e, "sending DHCP reply"),
    }
}
