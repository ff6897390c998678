//! DHCPv4: full server (pools, reservations, persisted leases, relays) and
//! proxyDHCP for PXE clients beside a site's own DHCP server.

pub mod journal;
pub mod leases;
pub mod packet;
pub mod pxe;
mod server;

pub use server::{start, DhcpService};

/// Error type of [`start`].
pub mod server_error {
    pub use super::server::DhcpError;
}
