//! `aula-bootserver`: the Aula lab server: boot side and image repository.
//!
//! * DHCPv4 ([`dhcp`]): a full server with pools, reservations, durable leases
//!   and relay support, or proxyDHCP beside the site's DHCP server; firmware
//!   detection picks the boot program, iPXE gets its per-MAC script URL.
//! * TFTP ([`tftp`]): read-only, confined, with blksize/tsize/windowsize.
//! * HTTP ([`http`]): iPXE scripts that follow each machine's boot mode, the
//!   live kernel and initrd with `Range`, the management API and the agent
//!   registry. More route groups (the image repository) plug in through
//!   [`http::RouteGroup`].
//! * IPv6 router advertisements ([`ra`]) so iPXE does not wait for one.
//! * The image repository ([`repository`]): manifests and chunks over HTTP(S),
//!   and the swarm coordinator ([`swarm`]) of machines restoring an image.
//!
//! Embedding:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = aula_bootserver::config::Config::embedded_default()?;
//! let server = aula_bootserver::Server::start(cfg, Vec::new()).await?;
//! println!("HTTP on {:?}", server.http_addr);
//! server.shutdown();
//! server.wait().await;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod config;
pub mod dhcp;
pub mod http;
pub mod mac;
pub mod netutil;
pub mod persist;
pub mod ra;
pub mod repository;
mod server;
pub mod state;
pub mod swarm;
pub mod tftp;
pub mod tls;

pub use server::{Server, ServerError};
