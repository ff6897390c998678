//! A minimal IPv6 router advertiser for the boot interface.
//!
//! iPXE waits about 16 s for IPv6 autoconfiguration before it finishes
//! "Configuring" unless a router advertisement arrives. This sends one: a
//! unique-local /64 prefix for SLAAC, router lifetime 0 (so nobody takes this
//! server as a default router), M and O flags clear. Advertisements go to
//! all-nodes (ff02::1) every `interval` seconds and at once when a router
//! solicitation arrives. It uses a raw ICMPv6 socket bound to the interface
//! with hop limit 255 (RFC 4861 requires it); the kernel fills in the
//! checksum and picks the link-local source address.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;

/// Errors starting the advertiser.
#[derive(Debug, thiserror::Error)]
#[error("router advertisements on {interface}: {what}")]
pub struct RaError {
    /// Interface.
    pub interface: String,
    /// Step that failed.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Builds the advertisement for `prefix` (a /64).
pub fn build_ra(prefix: Ipv6Addr, mac: Option<[u8; 6]>, lifetime: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.push(ROUTER_ADVERTISEMENT);
    p.push(0); // code
    p.extend_from_slice(&[0, 0]); // checksum: filled in by the kernel
    p.push(64); // current hop limit
    p.push(0); // flags: M=0 O=0
    p.extend_from_slice(&0u16.to_be_bytes()); // router lifetime 0: not a default router
    p.extend_from_slice(&0u32.to_be_bytes()); // reachable time: unspecified
    p.extend_from_slice(&0u32.to_be_bytes()); // retrans timer: unspecified
    if let Some(mac) = mac {
        p.push(1); // source link-layer address
        p.push(1); // length in units of 8 bytes
        p.extend_from_slice(&mac);
    }
    p.push(3); // prefix information
    p.push(4);
    p.push(64); // prefix length
    p.push(0xc0); // L (on-link) + A (autonomous address configuration)
    p.extend_from_slice(&lifetime.to_be_bytes()); // valid lifetime
    p.extend_from_slice(&(lifetime / 2).to_be_bytes()); // preferred lifetime
    p.extend_from_slice(&0u32.to_be_bytes()); // reserved
    p.extend_from_slice(&prefix.octets());
    p
}

/// Opens the socket and spawns the advertiser.
pub fn start(
    interface: &str,
    prefix: Ipv6Addr,
    interval: Duration,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), RaError> {
    let err = |what: &'static str| {
        let interface = interface.to_owned();
        move |source: io::Error| RaError {
            interface: interface.clone(),
            what,
            source,
        }
    };
    let ifindex = crate::netutil::if_index(interface).map_err(err("interface lookup"))?;
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(err("raw ICMPv6 socket"))?;
    s.bind_device(Some(interface.as_bytes()))
        .map_err(err("binding to the interface"))?;
    s.set_multicast_hops_v6(255)
        .map_err(err("setting hop limit"))?;
    s.set_unicast_hops_v6(255)
        .map_err(err("setting hop limit"))?;
    s.set_multicast_if_v6(ifindex)
        .map_err(err("selecting the multicast interface"))?;
    s.set_multicast_loop_v6(false)
        .map_err(err("disabling multicast loop"))?;
    s.join_multicast_v6(&ALL_ROUTERS, ifindex)
        .map_err(err("joining ff02::2"))?;
    s.set_nonblocking(true)
        .map_err(err("setting non-blocking"))?;
    // SAFETY: the Socket owns its descriptor, keeps it open and returns the
    // same one from as_raw_fd() for as long as it lives, and the AsyncFd takes
    // ownership of the Socket, so the registration never outlives the fd.
    let fd = unsafe { AsyncFd::register(s) }
        .map_err(|e| err("registering with the runtime")(e.into_parts().1))?;
    let ra = build_ra(prefix, crate::netutil::interface_mac(interface), 3600);
    let dest = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, ifindex));
    let iface = interface.to_owned();
    tracing::info!(interface = %iface, %prefix, "IPv6 router advertisements started");
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        // A few quick ones at start-up (RFC 4861 §6.2.4 initial advertisements).
        let mut initial = 3u32;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        loop {
            let wait = if initial > 0 {
                Duration::from_secs(2)
            } else {
                interval
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick(), if initial == 0 => send(&fd, &ra, &dest, &iface),
                _ = tokio::time::sleep(wait), if initial > 0 => {
                    initial -= 1;
                    send(&fd, &ra, &dest, &iface);
                }
                r = fd.readable() => {
                    let Ok(mut guard) = r else { continue };
                    loop {
                        match guard.try_io(|inner| inner.get_ref().recv(&mut buf)) {
                            Ok(Ok(n)) => {
                                // SAFETY: recv initialised the first n bytes of buf.
                                let first = (n > 0).then(|| unsafe { buf[0].assume_init() });
                                if first == Some(ROUTER_SOLICITATION) {
                                    tracing::debug!(interface = %iface, "router solicitation");
                                    send(&fd, &ra, &dest, &iface);
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "ICMPv6 receive");
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
            }
        }
        tracing::debug!("router advertiser stopped");
    });
    Ok(())
}

fn send(fd: &AsyncFd<Socket>, ra: &[u8], dest: &SockAddr, iface: &str) {
    if let Err(e) = fd.get_ref().send_to(ra, dest) {
        // Before the interface has its link-local address the kernel refuses;
        // the next tick retries.
        tracing::debug!(interface = %iface, error = %e, "sending router advertisement");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_layout_follows_rfc_4861() {
        let prefix: Ipv6Addr = "fd00:213::".parse().expect("prefix");
        let p = build_ra(prefix, Some([2, 0, 0, 0, 0, 1]), 3600);
        assert_eq!(p[0], 134);
        assert_eq!(&p[6..8], &[0, 0], "router lifetime 0");
        assert_eq!(&p[16..18], &[1, 1], "source link-layer option");
        assert_eq!(&p[24..28], &[3, 4, 64, 0xc0], "prefix option, /64, L+A");
        assert_eq!(&p[40..56], &prefix.octets());
        assert_eq!(p.len(), 56);
    }
}
