//! Small network helpers: interface lookup and socket set-up.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// The interface holding `addr`, if any.
pub fn interface_for(addr: Ipv4Addr) -> io::Result<Option<String>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    for ifa in addrs {
        let Some(a) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in().map(|s| s.ip()))
        else {
            continue;
        };
        if a == addr {
            return Ok(Some(ifa.interface_name));
        }
    }
    Ok(None)
}

/// Index of an interface.
pub fn if_index(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}

/// MAC address of an interface, from sysfs.
pub fn interface_mac(name: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    let m: crate::mac::MacAddr = s.trim().parse().ok()?;
    Some(m.0)
}

/// A non-blocking UDP socket bound to `bind`, optionally to one device, with
/// broadcast allowed and large buffers (DHCP bursts).
pub fn udp_socket(
    bind: SocketAddr,
    device: Option<&str>,
    broadcast: bool,
) -> io::Result<UdpSocket> {
    let domain = if bind.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    if broadcast {
        s.set_broadcast(true)?;
    }
    if let Some(dev) = device {
        s.bind_device(Some(dev.as_bytes()))?;
    }
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&bind.into())?;
    Ok(s.into())
}
