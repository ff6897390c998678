//! Wake-on-LAN: the magic packet (6 × `ff`, then the MAC 16 times) sent by
//! UDP to the directed broadcast address of the machine's subnet.
//!
//! The subnet comes from the machine's expected (or last known) address and
//! the DHCP subnets of the configuration; without one it is the subnet of
//! the server's own boot address, and without that the limited broadcast
//! `255.255.255.255`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use crate::config::{Config, Ipv4Net};
use crate::mac::MacAddr;

/// The 102-byte magic packet for `mac`.
pub fn magic_packet(mac: MacAddr) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac.0);
    }
    p
}

/// Where a machine's packet goes: the broadcast address of the configured
/// subnet holding `ip`, else of the one holding the server's address.
pub fn broadcast_for(cfg: &Config, ip: Option<Ipv4Addr>) -> Ipv4Addr {
    let nets: Vec<Ipv4Net> = cfg
        .dhcp
        .subnets
        .iter()
        .filter_map(|s| Ipv4Net::parse(&s.network).ok())
        .chain(
            cfg.console
                .wol_networks
                .iter()
                .filter_map(|s| Ipv4Net::parse(s).ok()),
        )
        .collect();
    let find = |a: Ipv4Addr| nets.iter().find(|n| n.contains(a)).map(|n| n.broadcast());
    ip.and_then(find)
        .or_else(|| find(cfg.server.address))
        .unwrap_or(Ipv4Addr::BROADCAST)
}

/// Sends one magic packet for `mac` to `broadcast:port`.
pub fn send(mac: MacAddr, broadcast: Ipv4Addr, port: u16) -> std::io::Result<()> {
    let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    s.set_broadcast(true)?;
    s.send_to(&magic_packet(mac), SocketAddr::from((broadcast, port)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_magic_packet_is_six_ff_then_the_mac_sixteen_times() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().expect("mac");
        let p = magic_packet(mac);
        assert_eq!(&p[..6], &[0xff; 6]);
        for i in 0..16 {
            assert_eq!(&p[6 + 6 * i..12 + 6 * i], &mac.0);
        }
    }

    #[test]
    fn the_broadcast_address_follows_the_machines_subnet() {
        let mut cfg = Config::parse(
            r#"
[server]
address = "10.213.0.1"
[dhcp]
enabled = false
[[dhcp.subnet]]
network = "10.213.0.0/24"
range = ["10.213.0.100", "10.213.0.199"]
[console]
wol_networks = ["10.214.8.0/22"]
"#,
        )
        .expect("config");
        assert_eq!(
            broadcast_for(&cfg, Some("10.214.9.7".parse().expect("ip"))),
            Ipv4Addr::new(10, 214, 11, 255)
        );
        assert_eq!(
            broadcast_for(&cfg, Some("10.213.0.50".parse().expect("ip"))),
            Ipv4Addr::new(10, 213, 0, 255)
        );
        // Unknown subnet or no address: the server's own subnet.
        assert_eq!(broadcast_for(&cfg, None), Ipv4Addr::new(10, 213, 0, 255));
        cfg.dhcp.subnets.clear();
        cfg.console.wol_networks.clear();
        assert_eq!(broadcast_for(&cfg, None), Ipv4Addr::BROADCAST);
    }
}
