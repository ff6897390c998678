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
//! * The image repository ([`repository`]): manifests and chunks over HTTP(S).
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

    /// A `Range` header against a length (the first 8 input bytes): both
    /// route groups give the same answer, inside the file.
    pub fn range(input: &[u8]) {
        use crate::http::files::{parse_range, RangeSpec};
        let (len, header) = match input.split_first_chunk::<8>() {
            Some((l, h)) => (u64::from_le_bytes(*l) >> (l[7] % 64), h),
            None => return,
        };
        let Ok(v) = hyper::header::HeaderValue::from_bytes(header) else {
            return;
        };
        let files = parse_range(Some(&v), len);
        let repo = crate::repository::parse_range(Some(&v), len);
        match (&files, &repo) {
            (RangeSpec::Full, Ok(None)) | (RangeSpec::Unsatisfiable, Err(())) => {}
            (RangeSpec::Partial(a, b), Ok(Some((c, d)))) if (a, b) == (c, d) => {
                assert!(a <= b && *b < len, "range {a}-{b} of {len} bytes");
            }
            _ => panic!("the parsers disagree on {v:?} / {len}: {files:?} against {repo:?}"),
        }
    }
}

pub use server::{Server, ServerError};
