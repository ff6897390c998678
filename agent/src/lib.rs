//! `aula-agent`: the agent of the Aula live system.
//!
//! It serves an HTTPS API (native `/v1/…` and OpenGnsys
//! `/CloningEngine/…`), runs imaging jobs through `aula-imager` on their own
//! threads, reports every state change and throttled progress to the core
//! by signed webhooks and to event-stream listeners, and registers itself
//! (token, certificate fingerprint, addresses) with the boot server.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use aula_agent::config::{FileConfig, KernelParams, Settings};
//! let file = FileConfig::load(std::path::Path::new("/etc/aula/agent.toml"))?;
//! let cmdline = std::fs::read_to_string("/proc/cmdline")?;
//! let settings = Settings::new(file, &KernelParams::parse(&cmdline))?;
//! let agent = aula_agent::Agent::start(settings).await?;
//! println!("listening on {}, token {}", agent.addr, agent.token());
//! agent.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Modules: [`config`] (file + kernel command line), [`server`] (HTTPS
//! listener), [`api`] (routes, auth, errors, event streams), [`opengnsys`]
//! (CloningEngine bodies), [`spec`] (job specs), [`jobs`] (table, ordering,
//! cancel, events), [`run`] (the ops), [`disks`] (disk numbers, exclusive
//! access, mounts, CACHE), [`software`] (OS detection), [`system`] (identity
//! and hardware inventory), [`script`], [`power`], [`webhook`],
//! [`register`], [`tls`] (certificate, token, HMAC, HTTPS client), [`swarm`]
//! (swarm restores and serving peers after them).

#![deny(missing_docs)]

pub mod api;
pub mod bootentry;
pub mod config;
pub mod disks;
pub mod jobs;
pub mod nvram;
pub mod opengnsys;
pub mod power;
pub mod register;
pub mod run;
pub mod script;
pub mod server;
pub mod software;
pub mod spec;
pub mod swarm;
pub mod system;
pub mod tls;
pub mod webhook;

/// Entry points of the fuzz targets (`imager/fuzz`), also replayed on the
/// committed corpora by `tests/fuzz_corpus.rs`. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::OnceLock;

    use crate::config::{FileConfig, KernelParams, Settings};

    fn settings() -> &'static Settings {
        static S: OnceLock<Settings> = OnceLock::new();
        S.get_or_init(|| {
            let k = KernelParams::parse("aula.server=https://192.0.2.1:8443");
            // The defaults with a server URL are a valid configuration.
            match Settings::new(FileConfig::default(), &k) {
                Ok(s) => s,
                Err(e) => panic!("default agent settings: {e}"),
            }
        })
    }

    /// An OpenGnsys `CloningEngine` body: the first byte picks the
    /// operation, the rest is the JSON body as the API reads it.
    pub fn opengnsys(input: &[u8]) {
        let Some((op, body)) = input.split_first() else {
            return;
        };
        let ops = crate::opengnsys::OPS;
        let op = ops[usize::from(*op) % ops.len()];
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        let _ = crate::opengnsys::parse(op, v, settings());
    }
}

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{PowerMode, Settings};
use crate::jobs::{AgentRef, Jobs};
use crate::system::Identity;
use crate::tls::HttpClient;
use crate::webhook::Webhooks;

/// Everything jobs and handlers share.
pub struct Ctx {
    /// Settings.
    pub settings: Arc<Settings>,
    /// The bearer token (also the webhook HMAC key).
    pub token: String,
    /// `sha256:<hex>` of the agent's certificate.
    pub fingerprint: String,
    /// The port actually listened on.
    pub port: u16,
    /// Who this machine is.
    pub identity: Identity,
    /// Webhook queue.
    pub webhooks: Webhooks,
    /// The CACHE partition mount.
    pub cache: disks::Cache,
    /// HTTPS client for the boot server.
    pub server_client: Option<HttpClient>,
    /// Jobs.
    pub jobs: Arc<Jobs>,
    /// Registration state.
    pub registration: register::Registration,
    /// Swarm members still serving after their restore.
    pub swarm: swarm::Lingering,
    /// Manifests the repository confirmed in this boot (the CACHE
    /// partition's manifests are trusted only when listed here).
    pub confirmed: Arc<aula_imager::repo::ConfirmedManifests>,
    /// `IniciarSesion` succeeded: the machine reboots into its installed OS.
    os_boot: Mutex<Option<serde_json::Value>>,
    power_log: Mutex<Vec<String>>,
    started: Instant,
}

impl Ctx {
    /// The agent as events name it.
    pub fn agent_ref(&self) -> AgentRef {
        AgentRef {
            mac: self.identity.mac.clone(),
            ip: self.identity.ips.first().copied(),
            hostname: self.identity.hostname.clone(),
        }
    }

    /// `syscall`, `command` or `dry-run`.
    pub fn power_mode(&self) -> &'static str {
        match self.settings.power.mode {
            PowerMode::Syscall => "syscall",
            PowerMode::Command => "command",
            PowerMode::DryRun => "dry-run",
        }
    }

    /// Remember a power action (shown in the status).
    pub fn record_power(&self, a: power::Action) {
        if let Ok(mut l) = self.power_log.lock() {
            l.push(format!("{} {}", jobs::now(), a.as_str()));
        }
    }

    /// Record that `IniciarSesion` set this machine to boot its installed
    /// OS (until the reboot, the status says so).
    pub fn note_os_boot(&self, b: &spec::BootOsSpec) {
        if let Ok(mut o) = self.os_boot.lock() {
            *o = Some(json!({
                "disk": b.disk,
                "partition": b.partition,
                "requested_at": jobs::now(),
            }));
        }
    }

    /// `GET /CloningEngine/status`: what OpenGnsys' core polls. `status` is
    /// `BSY` while a job runs or the machine is leaving for its installed
    /// OS, else `OPG` (the live system, idle); `session` is `live`, or
    /// `booting-os` after `IniciarSesion` until the reboot; no user is ever
    /// logged in to the live system.
    pub fn opengnsys_status(&self) -> serde_json::Value {
        let jobs = self.jobs.list();
        let ids = |s: jobs::JobState| -> Vec<String> {
            jobs.iter()
                .filter(|j| j.state() == s)
                .map(|j| j.id.clone())
                .collect()
        };
        let running = ids(jobs::JobState::Running);
        let os = self.os_boot.lock().ok().and_then(|o| o.clone());
        json!({
            "status": if running.is_empty() && os.is_none() { "OPG" } else { "BSY" },
            "loggedin": false,
            "session": if os.is_some() { "booting-os" } else { "live" },
            "os": os,
            "running": running,
            "queued": ids(jobs::JobState::Queued),
        })
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let (queued, running) = self.jobs.counts();
        json!({
            "service": "aula-agent",
            "version": env!("CARGO_PKG_VERSION"),
            "state": if running > 0 { "busy" } else { "idle" },
            "uptime_s": self.started.elapsed().as_secs(),
            "jobs": {"queued": queued, "running": running},
            "registration": self.registration.get(),
            "webhooks": self.webhooks.stats(),
            "swarm": self.swarm.status(),
            "power": {
                "mode": self.power_mode(),
                "actions": self.power_log.lock().map(|l| l.clone()).unwrap_or_default(),
            },
        })
    }
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS identity or clients.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listener.
    #[error("listening on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running agent.
pub struct Agent {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Shared state.
    pub ctx: Arc<Ctx>,
    /// The certificate (PEM).
    pub cert_pem: String,
    stop_http: CancellationToken,
    stop_bg: CancellationToken,
    tracker: TaskTracker,
}

impl Agent {
    /// Start: certificate, token, listener, webhook sender, registration.
    pub async fn start(settings: Settings) -> Result<Agent, StartError> {
        let settings = Arc::new(settings);
        let identity = Identity::discover(&settings.identity);
        let (token, id) = tls::boot_identity(
            settings.state_dir.as_deref(),
            settings.boot_nonce.as_deref(),
            identity.hostname.as_deref(),
            &identity.ips,
        )?;
        if settings.tls_off {
            tracing::warn!("aula.tls=off: the boot server has HTTPS turned off; this agent's token travels to it in clear");
        }
        let confirmed = match settings.state_dir.as_deref() {
            Some(d) => aula_imager::repo::ConfirmedManifests::at(&d.join("confirmed-manifests"))
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "confirmed-manifest record unusable; keeping it in memory");
                    aula_imager::repo::ConfirmedManifests::in_memory()
                }),
            None => aula_imager::repo::ConfirmedManifests::in_memory(),
        };
        let bind = SocketAddr::new(settings.listen.address, settings.listen.port);
        let listener = server::bind(bind)
            .await
            .map_err(|source| StartError::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr: bind, source })?;
        let timeout = Duration::from_secs(settings.webhooks.timeout_s.max(1));
        let server_client = match &settings.server_url {
            Some(_) => Some(HttpClient::new(&settings.server_trust, timeout)?),
            None => None,
        };
        let core_client = match &settings.core_url {
            Some(_) => Some(HttpClient::new(&settings.core_trust, timeout)?),
            None => None,
        };
        let webhooks = Webhooks::new(
            settings.core_url.clone(),
            core_client,
            token.clone(),
            settings.webhooks.queue,
            Duration::from_secs(settings.webhooks.max_backoff_s.max(1)),
        );
        let ctx = Arc::new(Ctx {
            settings: settings.clone(),
            token,
            fingerprint: id.fingerprint.clone(),
            port: addr.port(),
            identity,
            webhooks: webhooks.clone(),
            cache: disks::Cache::new(),
            server_client,
            jobs: Arc::new(Jobs::new()),
            registration: register::Registration::default(),
            swarm: swarm::Lingering::default(),
            confirmed,
            os_boot: Mutex::new(None),
            power_log: Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let stop_http = CancellationToken::new();
        let stop_bg = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(webhooks.run(stop_bg.clone()));
        tracker.spawn(server::serve(
            listener,
            id.acceptor,
            ctx.clone(),
            stop_http.clone(),
        ));
        tracker.spawn(register::run(ctx.clone(), stop_bg.clone()));
        tracker.close();
        tracing::info!(%addr, fingerprint = %ctx.fingerprint, mac = ?ctx.identity.mac, "agent started");
        Ok(Agent {
            addr,
            ctx,
            cert_pem: id.cert_pem,
            stop_http,
            stop_bg,
            tracker,
        })
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.ctx.token
    }

    /// The certificate fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.ctx.fingerprint
    }

    /// Graceful stop: no new connections or jobs, running jobs cancelled
    /// (each reaches its stated safe state; bounded wait), pending webhooks
    /// flushed (bounded), then every task ends.
    pub async fn shutdown(self) {
        self.stop_http.cancel();
        self.ctx
            .jobs
            .shutdown(&self.ctx, Duration::from_secs(60))
            .await;
        let ctx = self.ctx.clone();
        let _ =
            tokio::task::spawn_blocking(move || ctx.swarm.stop_all(Duration::from_secs(5))).await;
        if !self.ctx.webhooks.flush(Duration::from_secs(5)).await {
            tracing::warn!("shutting down with undelivered webhooks");
        }
        self.stop_bg.cancel();
        self.tracker.wait().await;
        tracing::info!("agent stopped");
    }
}
