//! `aula-bootserver`: the Aula lab server: boot side and image repository.
//!
//! * DHCPv4 ([`dhcp`]): a full server with pools, reservations, durable leases
//!   and relay support, or proxyDHCP beside the site's DHCP server; firmware
//!   detection picks the boot program, iPXE gets its per-MAC script URL.
//! * TFTP ([`tftp`]): read-only, confined, with blksize/tsize/windowsize.
//! * HTTP ([`http`]): iPXE scripts that follow each machine's boot mode, the
//!   live kernel and initrd with `Range` over plain HTTP (what firmware
//!   fetches); the management API, the agent registry and the repository
//!   over HTTPS with the server's own certificate. More route groups plug
//!   in through [`http::RouteGroup`]. Who may call what: [`auth`].
//! * IPv6 router advertisements ([`ra`]) so iPXE does not wait for one.
//! * The image repository ([`repository`]): manifests and chunks over HTTP(S).
//! * The lab console ([`console`]): rooms, machines, deployments ([`deploy`]),
//!   operators and the web pages at `/`, with its state in SQLite ([`db`]).
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

pub mod auth;
pub mod config;
pub mod console;
pub mod db;
pub mod deploy;
pub mod dhcp;
pub mod http;
pub mod mac;
pub mod netutil;
pub mod persist;
pub mod ra;
pub mod repository;
mod server;
pub mod state;
pub mod tftp;
pub mod tls;

pub use server::{Server, ServerError};
