//! Start-up and shutdown of all services in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, Secrets};
use crate::config::{parse_ra_prefix, Config};
use crate::dhcp::{self, DhcpService};
use crate::http::{self, api::ApiRoutes, boot::BootRoutes, boot::LiveArgs, RouteGroup, Serves};
use crate::state::{Registry, StateError};
use crate::tftp::{self, ConfinedRoot};
use crate::{netutil, ra};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory cannot be created or made private.
    #[error("data directory")]
    DataDir(#[source] crate::persist::PersistError),
    /// A token file cannot be read.
    #[error("reading {key} {path}")]
    TokenFile {
        /// The configuration key naming it.
        key: String,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No interface holds `server.address`.
    #[error("no interface holds {0}; set server.interface or add the address")]
    NoInterface(std::net::Ipv4Addr),
    /// Interface lookup failed.
    #[error("listing interfaces")]
    Interfaces(#[source] std::io::Error),
    /// State store.
    #[error(transparent)]
    State(#[from] StateError),
    /// DHCP.
    #[error(transparent)]
    Dhcp(#[from] dhcp::server_error::DhcpError),
    /// TFTP.
    #[error(transparent)]
    Tftp(#[from] tftp::TftpError),
    /// HTTP.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// Router advertisements.
    #[error(transparent)]
    Ra(#[from] ra::RaError),
    /// TLS certificate or key.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The image repository could not be opened.
    #[error("image repository")]
    Repository(#[from] crate::repository::RepoServiceError),
}

struct Started {
    dhcp: Option<DhcpService>,
    tftp_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    tls_fingerprint: Option<String>,
}

/// A running server.
pub struct Server {
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// HTTP listening address, if HTTP runs.
    pub http_addr: Option<SocketAddr>,
    /// HTTPS listening address (unless `[http.tls] enabled = false`).
    pub https_addr: Option<SocketAddr>,
    /// `sha256:<hex>` of the HTTPS certificate.
    pub tls_fingerprint: Option<String>,
    /// TFTP listening address, if TFTP runs.
    pub tftp_addr: Option<SocketAddr>,
    /// DHCP service handle, if DHCP runs.
    pub dhcp: Option<DhcpService>,
    /// The state store.
    pub registry: Arc<Registry>,
    /// The boot interface, if one was needed.
    pub interface: Option<String>,
}

impl Server {
    /// Starts every enabled service. `extra_routes` are HTTP route groups
    /// consulted before the built-in ones.
    pub async fn start(
        cfg: Config,
        extra_routes: Vec<Arc<dyn RouteGroup>>,
    ) -> Result<Self, ServerError> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        let data_dir = cfg.server.data_dir.clone();
        crate::persist::private_dir(&data_dir).map_err(ServerError::DataDir)?;
        let token = read_secret(
            cfg.http.api_token.as_ref(),
            cfg.http.api_token_file.as_ref(),
            "http.api_token_file",
        )?;
        let viewer = read_secret(
            cfg.http.viewer_token.as_ref(),
            cfg.http.viewer_token_file.as_ref(),
            "http.viewer_token_file",
        )?;
        for (key, inline, t) in [
            ("http.api_token_file", &cfg.http.api_token, &token),
            ("http.viewer_token_file", &cfg.http.viewer_token, &viewer),
        ] {
            if inline.is_none() && t.as_ref().is_some_and(|t| t.len() < 16) {
                return Err(ServerError::Config(crate::config::ConfigError::Invalid {
                    key: key.into(),
                    message: "token must be at least 16 characters".into(),
                }));
            }
        }
        if cfg.http.enabled && token.is_none() {
            tracing::warn!("no http.api_token configured: API writes (boot modes) are refused");
        }
        let repo_write = if cfg.repository.enabled {
            read_secret(
                cfg.repository.write_token.as_ref(),
                cfg.repository.write_token_file.as_ref(),
                "repository.write_token_file",
            )?
            .filter(|t| !t.is_empty())
        } else {
            None
        };
        let secrets = Secrets {
            api: token,
            viewer,
            repo_write,
            repo_read: cfg.repository.read_token.clone(),
        };
        if let Some((a, b)) = secrets.duplicate() {
            return Err(ServerError::Config(crate::config::ConfigError::Invalid {
                key: b.into(),
                message: format!("must differ from {a}: each token names one kind of caller"),
            }));
        }
        let registry =
            Arc::new(Registry::load(&data_dir)?.with_max_machines(cfg.limits.max_machines));
        let auth = Arc::new(Auth::new(secrets, Some(registry.clone())));
        let needs_iface = cfg.dhcp.enabled || cfg.ra.enabled;
        let interface = if needs_iface {
            match &cfg.server.interface {
                Some(i) => Some(i.clone()),
                None => Some(
                    netutil::interface_for(cfg.server.address)
                        .map_err(ServerError::Interfaces)?
                        .ok_or(ServerError::NoInterface(cfg.server.address))?,
                ),
            }
        } else {
            cfg.server.interface.clone()
        };
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let started = Self::start_services(
            &cfg,
            &registry,
            interface.as_deref(),
            auth,
            extra_routes,
            &cancel,
            &tracker,
        )
        .await;
        let Started {
            dhcp,
            tftp_addr,
            http_addr,
            https_addr,
            tls_fingerprint,
        } = match started {
            Ok(v) => v,
            Err(e) => {
                cancel.cancel();
                tracker.close();
                tracker.wait().await;
                return Err(e);
            }
        };
        tracker.spawn(
            registry
                .clone()
                .autosave(Duration::from_secs(2), cancel.clone()),
        );
        tracker.close();
        Ok(Self {
            cancel,
            tracker,
            http_addr,
            https_addr,
            tls_fingerprint,
            tftp_addr,
            dhcp,
            registry,
            interface,
        })
    }

    async fn start_services(
        cfg: &Arc<Config>,
        registry: &Arc<Registry>,
        interface: Option<&str>,
        auth: Arc<Auth>,
        extra_routes: Vec<Arc<dyn RouteGroup>>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Started, ServerError> {
        let dhcp = match (cfg.dhcp.enabled, interface) {
            (true, Some(i)) => Some(dhcp::start(
                cfg.clone(),
                i,
                registry.clone(),
                cancel.clone(),
                tracker,
            )?),
            _ => None,
        };
        let tftp_addr = if cfg.tftp.enabled {
            Some(
                tftp::start(
                    &cfg.tftp,
                    programs_of(cfg),
                    cfg.tftp_bind(),
                    None,
                    cancel.clone(),
                    tracker,
                )?
                .local_addr,
            )
        } else {
            None
        };
        let mut tls_fingerprint = None;
        let (mut http_addr, mut https_addr) = (None, None);
        if cfg.http.enabled {
            let tls = if cfg.http.tls.enabled {
                let names = vec![cfg.server.address.to_string(), "aula-bootserver".into()];
                Some(crate::tls::load(
                    &cfg.http.tls,
                    &cfg.server.data_dir,
                    &names,
                )?)
            } else {
                tracing::warn!("[http.tls] enabled = false: the API, registrations and the repository are served over plain HTTP; tokens travel in clear");
                None
            };
            tls_fingerprint = tls.as_ref().map(|t| t.fingerprint.clone());
            let plain = http::bind(cfg.http.bind).await?;
            http_addr = Some(plain.local_addr().map_err(|source| http::HttpError {
                addr: cfg.http.bind,
                source,
            })?);
            let secure = match &tls {
                Some(_) => {
                    let l = http::bind(cfg.http.tls.bind).await?;
                    https_addr = Some(l.local_addr().map_err(|source| http::HttpError {
                        addr: cfg.http.tls.bind,
                        source,
                    })?);
                    Some(l)
                }
                None => None,
            };
            let https_url =
                https_addr.map(|a| format!("https://{}:{}", cfg.server.address, a.port()));
            let programs = match ConfinedRoot::open_with_programs(&cfg.tftp.root, programs_of(cfg))
            {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::warn!(root = %cfg.tftp.root.display(), error = %e, "boot programs unavailable over HTTP");
                    None
                }
            };
            let live = LiveArgs {
                server_url: cfg
                    .boot
                    .server_url
                    .clone()
                    .or(https_url.clone())
                    .unwrap_or_else(|| cfg.public_url()),
                server_fp: cfg
                    .boot
                    .server_fingerprint
                    .clone()
                    .or(tls_fingerprint.clone()),
                tls_off: !cfg.http.tls.enabled,
            };
            let mut groups = extra_routes;
            if cfg.repository.enabled {
                let repo = open_repository(cfg, &auth)?;
                groups.push(Arc::new(crate::swarm::SwarmRoutes(Arc::new(
                    crate::swarm::Coordinator::new(repo.clone(), auth.clone(), Default::default()),
                ))));
                groups.push(Arc::new(crate::repository::RepoRoutes(repo)));
            }
            groups.push(Arc::new(BootRoutes::new(
                cfg.clone(),
                registry.clone(),
                dhcp.clone(),
                programs,
                live,
            )));
            groups.push(Arc::new(ApiRoutes::new(
                cfg.clone(),
                registry.clone(),
                dhcp.clone(),
                auth,
            )));
            let serves = match &https_url {
                Some(u) => Serves::PlainOnly {
                    https_url: u.clone(),
                },
                None => Serves::All,
            };
            http::spawn(
                plain,
                None,
                groups.clone(),
                serves,
                cfg.http.listener_options(),
                cancel.clone(),
                tracker,
            );
            if let (Some(l), Some(tls)) = (secure, tls) {
                tracing::info!(fingerprint = %tls.fingerprint, url = ?https_url, "HTTPS certificate");
                http::spawn(
                    l,
                    Some(tls.acceptor),
                    groups,
                    Serves::All,
                    cfg.http.listener_options(),
                    cancel.clone(),
                    tracker,
                );
            }
        }
        if cfg.ra.enabled {
            if let Some(i) = interface {
                let prefix = parse_ra_prefix(&cfg.ra.prefix).map_err(|message| {
                    crate::config::ConfigError::Invalid {
                        key: "ra.prefix".into(),
                        message,
                    }
                })?;
                ra::start(
                    i,
                    prefix,
                    Duration::from_secs(u64::from(cfg.ra.interval)),
                    cancel.clone(),
                    tracker,
                )?;
            }
        }
        Ok(Started {
            dhcp,
            tftp_addr,
            http_addr,
            https_addr,
            tls_fingerprint,
        })
    }

    /// Asks every service to stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// A token that is cancelled when the server stops.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Waits until every task has finished (after [`Server::shutdown`]).
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
}

/// The boot programs named in the configuration.
fn programs_of(cfg: &Config) -> impl Iterator<Item = &str> {
    let p = &cfg.boot.programs;
    [&p.bios, &p.uefi_x64, &p.uefi_ia32, &p.uefi_arm64]
        .into_iter()
        .flatten()
        .map(String::as_str)
}

/// A secret given inline, or else as the first line of a file (`key` names
/// the file's setting in errors).
fn read_secret(
    inline: Option<&String>,
    file: Option<&std::path::PathBuf>,
    key: &str,
) -> Result<Option<String>, ServerError> {
    match (inline, file) {
        (Some(t), _) => Ok(Some(t.clone())),
        (None, Some(p)) => {
            let text = std::fs::read_to_string(p).map_err(|source| ServerError::TokenFile {
                key: key.into(),
                path: p.clone(),
                source,
            })?;
            Ok(Some(text.lines().next().unwrap_or("").trim().to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// Opens the image repository described by `[repository]`; `auth` decides
/// who reads and writes (its tokens, capture grants' upload tokens).
fn open_repository(
    cfg: &Config,
    auth: &Arc<Auth>,
) -> Result<Arc<crate::repository::RepoService>, ServerError> {
    let r = &cfg.repository;
    let root = r
        .root
        .clone()
        .unwrap_or_else(|| cfg.server.data_dir.join("repo"));
    let mut rc = crate::repository::RepoConfig::new(root);
    rc.read_token = r.read_token.clone();
    rc.gc_grace_s = r.gc_grace_s;
    rc.max_uploads = r.max_uploads;
    let svc = crate::repository::RepoService::open(rc)?.with_auth(auth.clone());
    if r.write_token.is_none() && r.write_token_file.is_none() {
        tracing::warn!(
            "no repository.write_token configured: only agents granted capture rights can upload"
        );
    }
    tracing::info!(root = %svc.repo().root().display(), "image repository");
    Ok(Arc::new(svc))
}
