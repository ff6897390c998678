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
    /// The console's database.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// The operators file.
    #[error(transparent)]
    Users(#[from] crate::console::auth::UsersError),
}

/// Who may do what: the credentials and, with the console, its operators.
struct Access {
    auth: Arc<Auth>,
    users: Option<Arc<crate::console::auth::Users>>,
    store: crate::db::store::Store,
}

struct Started {
    dhcp: Option<DhcpService>,
    tftp_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    tls_fingerprint: Option<String>,
    deployments: Option<Arc<crate::deploy::DeployService>>,
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
    /// The deployment service (rooms, deployments, console), if it runs.
    pub deployments: Option<Arc<crate::deploy::DeployService>>,
    cfg: Arc<Config>,
    auth: Arc<Auth>,
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
        let secrets = read_secrets(&cfg)?;
        if cfg.http.enabled && secrets.api.is_none() {
            tracing::warn!("no http.api_token configured: API writes (boot modes) are refused");
        }
        // One database for the registry and the console (blocking: opens,
        // migrates, imports an old state.json, reads the registry's rows).
        let registry = {
            let dir = data_dir.clone();
            let reg =
                tokio::task::spawn_blocking(move || Registry::open(crate::db::Db::open(&dir)?))
                    .await
                    .map_err(|_| ServerError::Db(crate::db::DbError::Worker))??;
            Arc::new(reg.with_max_machines(cfg.limits.max_machines))
        };
        // Operators of the console sign in with sessions that are a
        // principal like the tokens (auth.rs): one rights model.
        let users = if cfg.http.enabled && cfg.console.enabled {
            let path = cfg
                .console
                .users_file
                .clone()
                .unwrap_or_else(|| data_dir.join("users.toml"));
            Some(Arc::new(crate::console::auth::Users::open(path)?))
        } else {
            None
        };
        // The console's store: this server's SQLite file, or the
        // PostgreSQL database several boot servers share.
        let store = match (&cfg.console.database, users.is_some()) {
            (Some(url), true) => {
                let settings = crate::db::pg::PgSettings {
                    url: url.clone(),
                    password_file: cfg.console.database_password_file.clone(),
                    server_id: cfg.console.server_id.clone().unwrap_or_default(),
                    lease: std::time::Duration::from_secs(cfg.console.claim_lease_s),
                };
                let pg = crate::db::pg::PgDb::connect(&settings).await?;
                tracing::info!(server = %pg.server_id(), "console state in the shared database");
                crate::db::store::Store::Shared(pg)
            }
            _ => crate::db::store::Store::Local(registry.db().clone()),
        };
        let mut auth = Auth::new(secrets, Some(registry.clone()));
        if let Some(u) = &users {
            auth = auth.with_sessions(Arc::new(crate::console::auth::Sessions::new(
                store.clone(),
                u.clone(),
            )));
        }
        let auth = Arc::new(auth);
        let auth_handle = auth.clone();
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
            Access { auth, users, store },
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
            deployments,
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
        let sb_rooms = cfg.boot.secure_boot.rooms.clone();
        if !sb_rooms.is_empty() {
            tracker.spawn(refresh_secure_boot_rooms(
                registry.clone(),
                sb_rooms,
                cancel.clone(),
            ));
        }
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
            deployments,
            cfg,
            auth: auth_handle,
        })
    }

    /// Applies what can change while running from `new` (a SIGHUP): the
    /// API, viewer and repository write tokens (inline or re-read from
    /// their files). Returns the settings that differ but take effect only
    /// after a restart (sockets, pools, paths, TLS, limits, metrics access,
    /// the repository read token). Nothing is applied when `new` is invalid.
    pub fn reload(&self, new: &Config) -> Result<Vec<&'static str>, ServerError> {
        new.validate()?;
        let secrets = read_secrets(new)?;
        self.auth.rotate(secrets).map_err(|(a, b)| {
            ServerError::Config(crate::config::ConfigError::Invalid {
                key: b.into(),
                message: format!("must differ from {a}: each token names one kind of caller"),
            })
        })?;
        Ok(restart_needed(&self.cfg, new))
    }

    async fn start_services(
        cfg: &Arc<Config>,
        registry: &Arc<Registry>,
        interface: Option<&str>,
        access: Access,
        extra_routes: Vec<Arc<dyn RouteGroup>>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Started, ServerError> {
        let Access { auth, users, store } = access;
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
        let mut tls_fingerprint = None;
        let (mut http_addr, mut https_addr) = (None, None);
        let mut deployments = None;
        let mut boot_routes = None;
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
            let repo = if cfg.repository.enabled {
                Some(open_repository(cfg, &auth)?)
            } else {
                None
            };
            let mut groups = extra_routes;
            if cfg.metrics.enabled {
                groups.push(metrics_routes(cfg, registry, &auth, tls.is_some())?);
            }
            if let Some(users) = users {
                let svc = crate::deploy::DeployService::start(
                    store,
                    registry.clone(),
                    cfg.clone(),
                    repo.clone(),
                    dhcp.clone(),
                    cancel.clone(),
                    tracker,
                );
                deployments = Some(svc.clone());
                deployment_gauge(&svc);
                let console = crate::console::Console {
                    svc,
                    users,
                    auth: auth.clone(),
                    cancel: cancel.clone(),
                };
                groups.push(Arc::new(console.routes(https_addr.map(|a| a.port()))));
            }
            if let Some(r) = &repo {
                groups.push(Arc::new(crate::swarm::SwarmRoutes(Arc::new(
                    crate::swarm::Coordinator::new(r.clone(), auth.clone(), Default::default()),
                ))));
                groups.push(Arc::new(crate::repository::RepoRoutes(r.clone())));
            }
            let boot = Arc::new(BootRoutes::new(
                cfg.clone(),
                registry.clone(),
                dhcp.clone(),
                programs,
                live,
            ));
            boot_routes = Some(boot.clone());
            groups.push(boot);
            let api = ApiRoutes::new(cfg.clone(), registry.clone(), dhcp.clone(), auth);
            // Webhooks reach the deployment runner at once.
            let api = match &deployments {
                Some(d) => api.with_event_listener(d.clone()),
                None => api,
            };
            groups.push(Arc::new(api));
            let serves = match (&https_url, https_addr) {
                (Some(u), Some(a)) => Serves::PlainOnly {
                    https_url: u.clone(),
                    https_port: a.port(),
                },
                _ => Serves::All,
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
        // After the HTTP routes: the signed chain's per-MAC GRUB
        // configuration over TFTP comes from the same boot routes as the
        // iPXE script.
        let dynamic: Option<Arc<dyn tftp::Dynamic>> = match boot_routes {
            Some(b) => Some(Arc::new(crate::http::boot::SignedChainTftp::new(b))),
            None => {
                if cfg.boot.secure_boot.any() {
                    tracing::warn!("[boot.secure_boot] needs [http] enabled: without the boot routes Secure Boot machines get no GRUB configuration");
                }
                None
            }
        };
        let tftp_addr = if cfg.tftp.enabled {
            Some(
                tftp::start_with(
                    &cfg.tftp,
                    programs_of(cfg),
                    generated_tftp_files(cfg),
                    dynamic,
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
            deployments,
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

/// Keeps the registry's view of the machines in `[boot.secure_boot] rooms`
/// current: a room change in the console takes effect within 10 s.
async fn refresh_secure_boot_rooms(
    registry: Arc<Registry>,
    rooms: Vec<String>,
    cancel: CancellationToken,
) {
    let mut last = None;
    loop {
        match registry.refresh_secure_boot_rooms(&rooms).await {
            Ok(n) if last != Some(n) => {
                tracing::info!(machines = n, rooms = ?rooms, "Secure Boot rooms");
                last = Some(n);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the Secure Boot rooms"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// Files the TFTP service generates: GRUB's first configuration of the
/// Secure Boot chain when any machine may get that chain, and shim and
/// GRUB from `[boot.secure_boot] dir`.
fn generated_tftp_files(cfg: &Config) -> std::collections::HashMap<String, bytes::Bytes> {
    let mut m = std::collections::HashMap::new();
    let sb = &cfg.boot.secure_boot;
    if sb.any() {
        m.insert(
            crate::grub::STAGE1_PATH.to_owned(),
            bytes::Bytes::from(crate::grub::stage1()),
        );
        for name in [crate::grub::SHIM, crate::grub::GRUB] {
            let path = sb.dir.join(name);
            match std::fs::read(&path) {
                Ok(data) => {
                    m.insert(name.to_owned(), bytes::Bytes::from(data));
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "[boot.secure_boot]: cannot read a file of the signed chain; Secure Boot machines will not boot (run live-image/build)")
                }
            }
        }
    }
    m
}

/// Every token of the configuration, read from their files, checked to be
/// long enough and to differ from each other.
fn read_secrets(cfg: &Config) -> Result<Secrets, ServerError> {
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
    Ok(secrets)
}

/// The sections of `new` that differ from `old` in more than what
/// [`Server::reload`] applies.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    fn http_sans_tokens(c: &Config) -> String {
        let mut h = c.http.clone();
        h.api_token = None;
        h.api_token_file = None;
        h.viewer_token = None;
        h.viewer_token_file = None;
        format!("{h:?}")
    }
    fn repo_sans_write(c: &Config) -> String {
        let mut r = c.repository.clone();
        r.write_token = None;
        r.write_token_file = None;
        format!("{r:?}")
    }
    let mut v = Vec::new();
    let mut diff = |name, a: String, b: String| {
        if a != b {
            v.push(name);
        }
    };
    diff(
        "server",
        format!("{:?}", old.server),
        format!("{:?}", new.server),
    );
    diff("dhcp", format!("{:?}", old.dhcp), format!("{:?}", new.dhcp));
    diff("tftp", format!("{:?}", old.tftp), format!("{:?}", new.tftp));
    diff("http", http_sans_tokens(old), http_sans_tokens(new));
    diff("boot", format!("{:?}", old.boot), format!("{:?}", new.boot));
    diff("ra", format!("{:?}", old.ra), format!("{:?}", new.ra));
    diff("repository", repo_sans_write(old), repo_sans_write(new));
    diff(
        "limits",
        format!("{:?}", old.limits),
        format!("{:?}", new.limits),
    );
    diff(
        "metrics",
        format!("{:?}", old.metrics),
        format!("{:?}", new.metrics),
    );
    v
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

/// The `/metrics` group; the registered-agents gauge reads `registry`.
fn metrics_routes(
    cfg: &Config,
    registry: &Arc<Registry>,
    auth: &Arc<Auth>,
    tls_on: bool,
) -> Result<Arc<dyn RouteGroup>, ServerError> {
    let m = &cfg.metrics;
    let token = read_secret(
        m.token.as_ref(),
        m.token_file.as_ref(),
        "metrics.token_file",
    )?
    .filter(|t| !t.is_empty());
    let reg = registry.clone();
    crate::metrics::global().set_agents_source(Arc::new(move || {
        i64::try_from(reg.agent_count()).unwrap_or(i64::MAX)
    }));
    Ok(Arc::new(crate::metrics::MetricsRoutes::new(
        m,
        token,
        auth.clone(),
        tls_on,
    )?))
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
    rc.s3 = match r.backend {
        crate::config::RepoBackend::Dir => None,
        crate::config::RepoBackend::S3 => r.s3.clone(),
    };
    let svc = crate::repository::RepoService::open(rc)?.with_auth(auth.clone());
    if r.write_token.is_none() && r.write_token_file.is_none() {
        tracing::warn!(
            "no repository.write_token configured: only agents granted capture rights can upload"
        );
    }
    tracing::info!(backend = svc.repo().kind(), location = %aula_imager::repo::Repository::location(svc.repo()), "image repository");
    Ok(Arc::new(svc))
}

/// `aula_deployment_machines{state=…}`: machines in active deployments by
/// phase, read from what the runner last published (every phase listed, so
/// the series set is fixed and bounded).
fn deployment_gauge(svc: &Arc<crate::deploy::DeployService>) {
    let weak = Arc::downgrade(svc);
    crate::metrics::global().add_state_gauge(
        "deployment_machines",
        "Machines in active deployments, by state",
        Arc::new(move || {
            let live = weak
                .upgrade()
                .map(|s| s.live_machines())
                .unwrap_or_default();
            crate::deploy::machine::Phase::ALL
                .iter()
                .map(|p| {
                    let n = live.values().filter(|m| m.phase == *p).count();
                    (p.as_str().to_owned(), i64::try_from(n).unwrap_or(i64::MAX))
                })
                .collect()
        }),
    );
}
