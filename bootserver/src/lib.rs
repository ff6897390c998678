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
//! * Agents' events ([`events`]): the default webhook sink, bounded.
//! * IPv6 router advertisements ([`ra`]) so iPXE does not wait for one.
//! * The image repository ([`repository`]): manifests and chunks over HTTP(S),
//!   and the swarm coordinator ([`swarm`]) of machines restoring an image.
//! * The lab console ([`console`]): rooms, machines, deployments ([`deploy`]),
//!   operators and the web pages at `/`, with its state in SQLite ([`db`]).
//! * Prometheus metrics at `GET /metrics` ([`metrics`]).
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
pub mod events;
pub mod grub;
pub mod http;
pub mod mac;
pub mod metrics;
pub mod netutil;
pub mod persist;
pub mod ra;
pub mod repo_store;
pub mod repository;
mod server;
pub mod state;
pub mod swarm;
pub mod tftp;
pub mod tls;

/// Entry points of the fuzz targets (`imager/fuzz`), also replayed on the
/// committed corpora by `tests/fuzz_corpus.rs`. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// A DHCP packet as the server parses it.
    pub fn dhcp(input: &[u8]) {
        if let Ok(r) = crate::dhcp::packet::parse(input) {
            let _ = r.broadcast_flag();
            let _ = r.hostname_str();
        }
        let _ = crate::dhcp::packet::option_codes(input);
    }

    /// A TFTP request.
    pub fn tftp(input: &[u8]) {
        if let Some(r) = crate::tftp::parse_request(input) {
            let _ = crate::tftp::safe_relative_path(&r.filename);
        }
    }

    /// A `Range` header against a length (the first 8 input bytes): the one
    /// parser every route uses (`aula_httpkit::range`) answers a range
    /// inside the file, or none, or unsatisfiable.
    pub fn range(input: &[u8]) {
        use aula_httpkit::range::{parse, RangeSpec};
        let (len, header) = match input.split_first_chunk::<8>() {
            Some((l, h)) => (u64::from_le_bytes(*l) >> (l[7] % 64), h),
            None => return,
        };
        let Ok(v) = hyper::header::HeaderValue::from_bytes(header) else {
            return;
        };
        match parse(Some(&v), len) {
            RangeSpec::Full | RangeSpec::Unsatisfiable => {}
            RangeSpec::Partial(a, b) => {
                assert!(a <= b && b < len, "range {a}-{b} of {len} bytes from {v:?}");
            }
        }
    }
}

pub use server::{Server, ServerError};
