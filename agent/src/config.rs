//! Configuration: the TOML file (`/etc/aula/agent.toml`, `--config`) and
//! the kernel command line (`/proc/cmdline`), merged into [`Settings`].
//!
//! Kernel parameters win over the file for the values they carry, because
//! the boot server writes them for this very boot:
//!
//! | parameter | file key | meaning |
//! |---|---|---|
//! | `aula.server=<url>` | `server.url` | boot server: registration, boot modes, default repository host |
//! | `aula.server_fp=sha256:<hex>` | `server.fingerprint` | pin of the server's TLS certificate |
//! | `aula.core=<url>` | `core.url` | where webhooks go (default `<server>/v1/agents/events`) |
//! | `aula.core_fp=sha256:<hex>` | `core.fingerprint` | pin of the core's certificate |
//! | `aula.boot=<nonce>` | — | this boot's nonce, sent with the registration |
//! | `aula.tls=off` | — | the boot server has HTTPS turned off (said plainly, logged as a warning) |
//! | `BOOTIF=01-aa-bb-cc-dd-ee-ff` | `identity.mac` | the interface the machine booted from |
//!
//! # Where the repository is, and what goes there
//!
//! | job names | repository URL | trust | credentials sent |
//! |---|---|---|---|
//! | nothing (native job) | `repository.url`, else `aula.server`'s origin | `repository.fingerprint`, else the server's | the configured origin's: write token, read token |
//! | `ipr` = the host of `aula.server` | `aula.server`'s scheme, port and pin | the server's | the read token from registration; uploads the upload token (capture grant) |
//! | `ipr` = another host, or a `repository` URL | `<repository.scheme>://<ipr>:<repository.port>`, or that URL | `repository.fingerprint`, else the CA bundle, else the server's | only if its origin is the configured one |
//!
//! An agent that pins the server (`aula.server_fp`) or has a CA bundle
//! refuses `http://` repositories unless the job says `"allow_http": true`
//! or `repository.allow_http = true`.
//!
//! See `aula-agent.example.toml` for every key with its default.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aula_imager::tls::ServerTrust;
use serde::Deserialize;

/// Configuration problems; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("parsing {origin}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or malformed.
    #[error("{key}: {message}")]
    Invalid {
        /// The key (`section.name`, or a kernel parameter).
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Kernel command line to read (default `/proc/cmdline`).
    #[serde(default)]
    pub kernel_cmdline: Option<PathBuf>,
    /// Where restore records are kept (see `aula_imager::record`); an empty
    /// string turns them off. Default `/run/aula/records`.
    #[serde(default)]
    pub restore_records: Option<PathBuf>,
    /// Private directory (0700, on a RAM filesystem) for what one boot
    /// keeps across agent restarts: token and certificate, manifests the
    /// repository confirmed. An empty string keeps nothing. Default
    /// `/run/aula/agent`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// `[listen]`
    #[serde(default)]
    pub listen: ListenSection,
    /// `[server]`
    #[serde(default)]
    pub server: ServerSection,
    /// `[core]`
    #[serde(default)]
    pub core: CoreSection,
    /// `[repository]`
    #[serde(default)]
    pub repository: RepositorySection,
    /// `[disks]`: `dsk` number → device or image file.
    #[serde(default)]
    pub disks: BTreeMap<String, PathBuf>,
    /// `[cache]`
    #[serde(default)]
    pub cache: CacheSection,
    /// `[jobs]`
    #[serde(default)]
    pub jobs: JobsSection,
    /// `[webhooks]`
    #[serde(default)]
    pub webhooks: WebhookSection,
    /// `[power]`
    #[serde(default)]
    pub power: PowerSection,
    /// `[identity]`
    #[serde(default)]
    pub identity: IdentitySection,
    /// `[swarm]`
    #[serde(default)]
    pub swarm: crate::swarm::SwarmSection,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Address to bind.
    #[serde(default = "default_listen_address")]
    pub address: IpAddr,
    /// HTTPS port (0 = any free port; the registration says which).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_listen_address() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}
fn default_port() -> u16 {
    8000
}
fn default_max_connections() -> usize {
    256
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            address: default_listen_address(),
            port: default_port(),
            max_connections: default_max_connections(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Boot server URL (`aula.server=` wins).
    #[serde(default)]
    pub url: Option<String>,
    /// `sha256:<hex>` pin of its certificate (`aula.server_fp=` wins).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// PEM CA bundle to verify the server (and the core) when no pin is given.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// Seconds between registration attempts at most (backoff cap).
    #[serde(default = "default_register_backoff")]
    pub register_max_backoff_s: u64,
}

fn default_register_backoff() -> u64 {
    30
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            url: None,
            fingerprint: None,
            ca_bundle: None,
            register_max_backoff_s: default_register_backoff(),
        }
    }
}

/// `[core]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreSection {
    /// Webhook URL (`aula.core=` wins).
    #[serde(default)]
    pub url: Option<String>,
    /// `sha256:<hex>` pin of the core's certificate (`aula.core_fp=` wins).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// `[repository]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySection {
    /// `http` or `https`: with an `ipr` that is not the server's host, it
    /// makes the repository URL.
    #[serde(default = "default_repo_scheme")]
    pub scheme: String,
    /// Port of such a repository (an `ipr` naming the server's host uses
    /// `aula.server`'s port).
    #[serde(default = "default_repo_port")]
    pub port: u16,
    /// Accept `http://` repositories although the server is pinned (by
    /// default only a job's `"allow_http": true` does).
    #[serde(default)]
    pub allow_http: bool,
    /// Repository URL for native jobs that name none (default: scheme +
    /// the server's host + port).
    #[serde(default)]
    pub url: Option<String>,
    /// `sha256:<hex>` pin for an https repository (default: the server's).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Token for uploads (`CrearImagen`).
    #[serde(default)]
    pub write_token: Option<String>,
    /// File whose first line is the upload token.
    #[serde(default)]
    pub write_token_file: Option<PathBuf>,
    /// Token for reads from the configured repository (the boot server
    /// hands its own read token to a registered agent; this is for another
    /// configured repository).
    #[serde(default)]
    pub read_token: Option<String>,
    /// Seconds a failing repository call is retried before the job fails.
    #[serde(default = "default_repo_retry")]
    pub retry_s: u64,
}

fn default_repo_scheme() -> String {
    "https".into()
}
fn default_repo_port() -> u16 {
    8443
}
fn default_repo_retry() -> u64 {
    300
}

impl Default for RepositorySection {
    fn default() -> Self {
        RepositorySection {
            scheme: default_repo_scheme(),
            port: default_repo_port(),
            allow_http: false,
            url: None,
            fingerprint: None,
            write_token: None,
            write_token_file: None,
            read_token: None,
            retry_s: default_repo_retry(),
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Disk holding the CACHE partition.
    #[serde(default = "default_cache_disk")]
    pub disk: u32,
    /// Where the CACHE partition is mounted during `unicast-cache` jobs.
    #[serde(default = "default_cache_mount")]
    pub mount_dir: PathBuf,
}

fn default_cache_disk() -> u32 {
    1
}
fn default_cache_mount() -> PathBuf {
    PathBuf::from("/run/aula/cache")
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            disk: default_cache_disk(),
            mount_dir: default_cache_mount(),
        }
    }
}

/// `[jobs]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    /// Finished jobs kept for `GET /v1/jobs` (oldest forgotten first).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Queued + running jobs accepted at once (more → 429).
    #[serde(default = "default_max_active")]
    pub max_active: usize,
    /// Default and maximum run time of a script, seconds.
    #[serde(default = "default_script_timeout")]
    pub script_timeout_s: u64,
    /// Bytes of script stdout / stderr kept (each).
    #[serde(default = "default_script_output")]
    pub script_output_bytes: usize,
    /// Shell that runs scripts.
    #[serde(default = "default_shell")]
    pub shell: PathBuf,
    /// Program run (when it exists) after a job changed partitions or
    /// filesystems (restore, layout): the live system's `aula-disklinks`,
    /// which rebuilds `/dev/disk/by-*` where there is no udev.
    #[serde(default = "default_after_disk_change")]
    pub after_disk_change: PathBuf,
    /// efivarfs, where a restore on a UEFI machine writes the boot entry of
    /// the restored OS (see `bootentry`); when it is no directory (BIOS),
    /// boot entries are left alone.
    #[serde(default = "default_efivars")]
    pub efivars: PathBuf,
}

fn default_keep() -> usize {
    256
}
fn default_max_active() -> usize {
    64
}
fn default_script_timeout() -> u64 {
    3600
}
fn default_script_output() -> usize {
    1 << 20
}
fn default_shell() -> PathBuf {
    PathBuf::from("/bin/sh")
}
fn default_efivars() -> PathBuf {
    PathBuf::from(crate::bootentry::EFIVARS)
}
fn default_after_disk_change() -> PathBuf {
    PathBuf::from("/usr/sbin/aula-disklinks")
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            keep: default_keep(),
            max_active: default_max_active(),
            script_timeout_s: default_script_timeout(),
            script_output_bytes: default_script_output(),
            shell: default_shell(),
            after_disk_change: default_after_disk_change(),
            efivars: default_efivars(),
        }
    }
}

/// `[webhooks]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// Events kept while the core is unreachable (progress dropped first).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Longest wait between delivery attempts, seconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_s: u64,
    /// Per-attempt timeout, seconds.
    #[serde(default = "default_hook_timeout")]
    pub timeout_s: u64,
    /// Minimum milliseconds between two progress events of one job.
    #[serde(default = "default_progress_interval")]
    pub progress_interval_ms: u64,
}

fn default_queue() -> usize {
    1000
}
fn default_max_backoff() -> u64 {
    30
}
fn default_hook_timeout() -> u64 {
    10
}
fn default_progress_interval() -> u64 {
    1000
}

impl Default for WebhookSection {
    fn default() -> Self {
        WebhookSection {
            queue: default_queue(),
            max_backoff_s: default_max_backoff(),
            timeout_s: default_hook_timeout(),
            progress_interval_ms: default_progress_interval(),
        }
    }
}

/// How power operations are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerMode {
    /// `sync`, then `reboot(2)`.
    Syscall,
    /// Run the configured commands.
    Command,
    /// Log only (tests, demos).
    DryRun,
}

/// `[power]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerSection {
    /// `syscall` (default), `command` or `dry-run`.
    #[serde(default = "default_power_mode")]
    pub mode: PowerMode,
    /// Program and arguments for power-off in `command` mode.
    #[serde(default)]
    pub poweroff_command: Vec<String>,
    /// Program and arguments for reboot in `command` mode.
    #[serde(default)]
    pub reboot_command: Vec<String>,
    /// Seconds to wait for pending webhooks before powering off.
    #[serde(default = "default_power_flush")]
    pub flush_webhooks_s: u64,
}

fn default_power_mode() -> PowerMode {
    PowerMode::Syscall
}
fn default_power_flush() -> u64 {
    5
}

impl Default for PowerSection {
    fn default() -> Self {
        PowerSection {
            mode: default_power_mode(),
            poweroff_command: Vec::new(),
            reboot_command: Vec::new(),
            flush_webhooks_s: default_power_flush(),
        }
    }
}

/// `[identity]`: overrides of what the agent finds out by itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    /// Primary MAC (default: `BOOTIF=`, else the first physical NIC).
    #[serde(default)]
    pub mac: Option<String>,
    /// Host name (default: the kernel's).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Address the core should use to reach the agent (default: all the
    /// machine's addresses are registered).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl FileConfig {
    /// Parse TOML text.
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.into(),
            source: Box::new(e),
        })
    }

    /// Read a file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// The `aula.*` (and `BOOTIF`) parameters of a kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelParams {
    /// `aula.server=`
    pub server: Option<String>,
    /// `aula.server_fp=`
    pub server_fp: Option<String>,
    /// `aula.core=`
    pub core: Option<String>,
    /// `aula.core_fp=`
    pub core_fp: Option<String>,
    /// `BOOTIF=` as a MAC (`aa:bb:…`).
    pub bootif: Option<String>,
    /// `aula.boot=`: this boot's registration nonce.
    pub boot: Option<String>,
    /// `aula.tls=off`: the boot server serves everything over plain HTTP.
    pub tls_off: bool,
}

impl KernelParams {
    /// Parse a command line (space-separated `key=value` words; quotes are
    /// not needed for these values).
    pub fn parse(cmdline: &str) -> KernelParams {
        let mut p = KernelParams::default();
        for word in cmdline.split_whitespace() {
            if word == "--" {
                break;
            }
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            let v = v.trim_matches('"').to_string();
            match k {
                "aula.server" => p.server = Some(v),
                "aula.server_fp" => p.server_fp = Some(v),
                "aula.core" => p.core = Some(v),
                "aula.core_fp" => p.core_fp = Some(v),
                "aula.boot" => p.boot = Some(v),
                "aula.tls" => p.tls_off = v.eq_ignore_ascii_case("off"),
                // pxelinux/iPXE form: 01-aa-bb-cc-dd-ee-ff (01 = Ethernet).
                "BOOTIF" => {
                    let mac = v.strip_prefix("01-").unwrap_or(&v).replace('-', ":");
                    p.bootif = Some(mac.to_ascii_lowercase());
                }
                _ => {}
            }
        }
        p
    }
}

/// Validated, merged settings the agent runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: ListenSection,
    /// Boot server base URL.
    pub server_url: Option<String>,
    /// How to trust the server.
    pub server_trust: ServerTrust,
    /// Webhook URL, if any.
    pub core_url: Option<String>,
    /// How to trust the core.
    pub core_trust: ServerTrust,
    /// Repository settings.
    pub repository: RepositorySection,
    /// Write token of the configured repository (sent only to its origin).
    pub repo_write_token: Option<String>,
    /// How to trust the configured repository, when it is not the server.
    pub repo_trust: ServerTrust,
    /// CA bundle for repositories that are neither the server nor pinned.
    pub ca_bundle: Option<PathBuf>,
    /// This boot's nonce (`aula.boot=`).
    pub boot_nonce: Option<String>,
    /// The kernel line said `aula.tls=off`.
    pub tls_off: bool,
    /// Private per-boot state directory; None: keep nothing.
    pub state_dir: Option<PathBuf>,
    /// `dsk` → path. Empty: the machine's own disks.
    pub disks: BTreeMap<u32, PathBuf>,
    /// Cache.
    pub cache: CacheSection,
    /// Jobs.
    pub jobs: JobsSection,
    /// Webhooks.
    pub webhooks: WebhookSection,
    /// Power.
    pub power: PowerSection,
    /// Identity overrides; `mac` already merged with `BOOTIF`.
    pub identity: IdentitySection,
    /// Registration backoff cap.
    pub register_max_backoff: Duration,
    /// Restore records directory; None: off.
    pub restore_records: Option<PathBuf>,
    /// Swarm restores.
    pub swarm: crate::swarm::SwarmSection,
}

fn check_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let u = url.trim().trim_end_matches('/');
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        return Err(invalid(
            key,
            format!("{url:?} must start with http:// or https://"),
        ));
    }
    u.parse::<hyper::Uri>()
        .map_err(|e| invalid(key, format!("{url:?}: {e}")))?;
    Ok(u.to_string())
}

fn pin(key: &str, fp: &str) -> Result<ServerTrust, ConfigError> {
    aula_imager::tls::parse_fingerprint(fp)
        .map(ServerTrust::Pin)
        .map_err(|e| invalid(key, e.to_string()))
}

/// `scheme://host:port` of a URL (for comparing origins).
pub fn authority_of(url: &str) -> Option<String> {
    let u: hyper::Uri = url.parse().ok()?;
    Some(format!("{}://{}", u.scheme_str()?, u.authority()?))
}

/// The origin of a URL: scheme, host and port (the scheme's default port
/// when none is written), lowercased, so `https://h` and `https://H:443`
/// compare equal.
pub fn origin_of(url: &str) -> Option<(String, String, u16)> {
    let u: hyper::Uri = url.trim().parse().ok()?;
    let scheme = u.scheme_str()?.to_ascii_lowercase();
    let port = u.port_u16().or(match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    let host = u
        .host()?
        .trim_matches(|c| c == '[' || c == ']')
        .to_ascii_lowercase();
    Some((scheme, host, port))
}

/// Whether two URLs have the same origin (both must parse).
pub fn same_origin(a: &str, b: &str) -> bool {
    matches!((origin_of(a), origin_of(b)), (Some(x), Some(y)) if x == y)
}

/// The host of a URL.
pub fn host_of(url: &str) -> Option<String> {
    let u: hyper::Uri = url.parse().ok()?;
    Some(u.host()?.trim_matches(|c| c == '[' || c == ']').to_string())
}

impl Settings {
    /// Merge the file and the kernel parameters and check every value.
    pub fn new(file: FileConfig, kernel: &KernelParams) -> Result<Settings, ConfigError> {
        let server_url = match kernel.server.as_deref().or(file.server.url.as_deref()) {
            Some(u) => Some(check_url("aula.server / server.url", u)?),
            None => None,
        };
        let server_fp = kernel
            .server_fp
            .as_deref()
            .or(file.server.fingerprint.as_deref());
        let ca = file.server.ca_bundle.clone();
        let server_trust = match (server_fp, &ca) {
            (Some(fp), _) => pin("aula.server_fp / server.fingerprint", fp)?,
            (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
            (None, None) => ServerTrust::System,
        };
        let core_url = match kernel.core.as_deref().or(file.core.url.as_deref()) {
            Some(u) => Some(check_url("aula.core / core.url", u)?),
            None => server_url.as_ref().map(|s| format!("{s}/v1/agents/events")),
        };
        let core_fp = kernel
            .core_fp
            .as_deref()
            .or(file.core.fingerprint.as_deref());
        let same_origin = match (&core_url, &server_url) {
            (Some(c), Some(s)) => authority_of(c).is_some() && authority_of(c) == authority_of(s),
            _ => false,
        };
        let core_trust = match (core_fp, &ca) {
            (Some(fp), _) => pin("aula.core_fp / core.fingerprint", fp)?,
            (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
            (None, None) if same_origin => server_trust.clone(),
            (None, None) => ServerTrust::System,
        };
        let repo = file.repository.clone();
        match repo.scheme.as_str() {
            "http" | "https" => {}
            other => {
                return Err(invalid(
                    "repository.scheme",
                    format!("{other:?} (use http or https)"),
                ))
            }
        }
        if let Some(u) = &repo.url {
            check_url("repository.url", u)?;
        }
        let repo_trust = match (&repo.fingerprint, &ca) {
            (Some(fp), _) => pin("repository.fingerprint", fp)?,
            _ => server_trust.clone(),
        };
        if let Some(t) = &repo.read_token {
            if t.trim().is_empty() {
                return Err(invalid("repository.read_token", "must not be empty"));
            }
        }
        let repo_write_token = match (&repo.write_token, &repo.write_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                text.lines()
                    .next()
                    .map(|l| l.trim().to_string())
                    .filter(|t| !t.is_empty())
            }
            (None, None) => None,
        };
        let mut disks = BTreeMap::new();
        for (k, v) in &file.disks {
            let n: u32 = k
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid(&format!("disks.{k}"), "disk numbers are 1, 2, …"))?;
            disks.insert(n, v.clone());
        }
        if file.jobs.max_active == 0 {
            return Err(invalid("jobs.max_active", "must be at least 1"));
        }
        if file.webhooks.queue == 0 {
            return Err(invalid("webhooks.queue", "must be at least 1"));
        }
        if file.power.mode == PowerMode::Command
            && (file.power.poweroff_command.is_empty() || file.power.reboot_command.is_empty())
        {
            return Err(invalid(
                "power",
                "mode = \"command\" needs poweroff_command and reboot_command",
            ));
        }
        let mut identity = file.identity.clone();
        if identity.mac.is_none() {
            identity.mac = kernel.bootif.clone();
        }
        Ok(Settings {
            listen: file.listen.clone(),
            server_url,
            server_trust,
            core_url,
            core_trust,
            repository: repo,
            repo_write_token,
            repo_trust,
            ca_bundle: ca,
            boot_nonce: kernel.boot.clone(),
            tls_off: kernel.tls_off,
            state_dir: match &file.state_dir {
                None => Some(PathBuf::from("/run/aula/agent")),
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p.clone()),
            },
            disks,
            cache: file.cache.clone(),
            jobs: file.jobs.clone(),
            webhooks: file.webhooks.clone(),
            power: file.power.clone(),
            identity,
            register_max_backoff: Duration::from_secs(file.server.register_max_backoff_s.max(1)),
            restore_records: match &file.restore_records {
                None => Some(PathBuf::from(aula_imager::record::ROOT_DIR)),
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p.clone()),
            },
            swarm: file.swarm.clone(),
        })
    }

    /// Repository URL for an OpenGnsys `ipr` (IP or host name): the boot
    /// server's origin when `ipr` names its host, else
    /// `<repository.scheme>://<ipr>:<repository.port>`.
    pub fn repo_url_for(&self, ipr: &str) -> String {
        if let Some(server) = &self.server_url {
            if let Some((scheme, host, port)) = origin_of(server) {
                let ipr_host = ipr
                    .trim_matches(|c| c == '[' || c == ']')
                    .to_ascii_lowercase();
                if ipr_host == host {
                    let h = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    return format!("{scheme}://{h}:{port}");
                }
            }
        }
        let host = if ipr.contains(':') && !ipr.starts_with('[') {
            format!("[{ipr}]")
        } else {
            ipr.to_string()
        };
        format!(
            "{}://{}:{}",
            self.repository.scheme, host, self.repository.port
        )
    }

    /// Repository URL for native jobs that name none: `repository.url`,
    /// else the boot server's origin.
    pub fn default_repo_url(&self) -> Option<String> {
        if let Some(u) = &self.repository.url {
            return Some(u.trim_end_matches('/').to_string());
        }
        let (scheme, host, port) = origin_of(self.server_url.as_deref()?)?;
        let h = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(format!("{scheme}://{h}:{port}"))
    }

    /// Whether `url` is the configured repository (`repository.url`, else
    /// the server): the only origin its tokens are sent to.
    pub fn is_configured_repo(&self, url: &str) -> bool {
        self.default_repo_url()
            .is_some_and(|c| same_origin(&c, url))
    }

    /// Whether `url` is the boot server itself (same origin as `aula.server`).
    pub fn is_server(&self, url: &str) -> bool {
        self.server_url
            .as_deref()
            .is_some_and(|s| same_origin(s, url))
    }

    /// The agent pins the server or holds a CA bundle: it then refuses
    /// plain `http://` repositories unless asked.
    pub fn strict_tls(&self) -> bool {
        matches!(
            self.server_trust,
            ServerTrust::Pin(_) | ServerTrust::CaFile(_)
        )
    }

    /// How to trust the repository at `url`.
    pub fn trust_for(&self, url: &str) -> ServerTrust {
        if self.is_server(url) {
            return self.server_trust.clone();
        }
        if self.repository.fingerprint.is_some() {
            return self.repo_trust.clone();
        }
        match &self.ca_bundle {
            Some(ca) => ServerTrust::CaFile(ca.clone()),
            None => self.repo_trust.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameters_are_picked_out_of_a_real_command_line() {
        let p = KernelParams::parse(
            "BOOT_IMAGE=/vmlinuz initrd=initrd.gz BOOTIF=01-52-54-00-AB-CD-EF aula.server=https://10.0.0.1:8443 aula.server_fp=sha256:00 quiet aula.core=https://core:9000/hooks",
        );
        assert_eq!(p.server.as_deref(), Some("https://10.0.0.1:8443"));
        assert_eq!(p.server_fp.as_deref(), Some("sha256:00"));
        assert_eq!(p.core.as_deref(), Some("https://core:9000/hooks"));
        assert_eq!(p.bootif.as_deref(), Some("52:54:00:ab:cd:ef"));
    }

    #[test]
    fn kernel_parameters_override_the_file_and_the_core_defaults_to_the_server() {
        let file = FileConfig::parse(
            "[server]\nurl = \"http://file:1\"\n[disks]\n1 = \"/tmp/d1.img\"\n",
            "test",
        )
        .expect("parse");
        let k = KernelParams::parse("aula.server=http://10.1.2.3:8080/");
        let s = Settings::new(file, &k).expect("settings");
        assert_eq!(s.server_url.as_deref(), Some("http://10.1.2.3:8080"));
        assert_eq!(
            s.core_url.as_deref(),
            Some("http://10.1.2.3:8080/v1/agents/events")
        );
        assert_eq!(s.disks.get(&1), Some(&PathBuf::from("/tmp/d1.img")));
        assert_eq!(s.repo_url_for("10.9.9.9"), "https://10.9.9.9:8443");
        assert_eq!(s.repo_url_for("10.1.2.3"), "http://10.1.2.3:8080");
        assert_eq!(
            s.default_repo_url().as_deref(),
            Some("http://10.1.2.3:8080")
        );
    }

    #[test]
    fn an_ipr_naming_the_servers_host_takes_its_scheme_port_and_pin() {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let k = KernelParams::parse(&format!(
            "aula.server=https://10.0.0.1:8443 aula.server_fp={fp} aula.boot=0123abcd"
        ));
        let s = Settings::new(FileConfig::default(), &k).expect("settings");
        assert_eq!(s.boot_nonce.as_deref(), Some("0123abcd"));
        assert_eq!(s.repo_url_for("10.0.0.1"), "https://10.0.0.1:8443");
        assert!(
            s.is_server("https://10.0.0.1:8443") && s.is_configured_repo("https://10.0.0.1:8443/")
        );
        assert!(!s.is_configured_repo("https://10.0.0.9:8443"));
        assert!(!s.is_configured_repo("http://10.0.0.1:8443"));
        assert_eq!(s.trust_for("https://10.0.0.1:8443"), s.server_trust);
        assert!(s.strict_tls());
        assert_eq!(s.repo_url_for("10.0.0.9"), "https://10.0.0.9:8443");
        assert!(same_origin("https://H:443/x", "https://h"));
    }

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let text = include_str!("../aula-agent.example.toml");
        let f = FileConfig::parse(text, "example").expect("example parses");
        let s = Settings::new(f, &KernelParams::default()).expect("settings");
        let d = Settings::new(FileConfig::default(), &KernelParams::default()).expect("defaults");
        assert_eq!(format!("{s:?}"), format!("{d:?}"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = FileConfig::parse("[listen]\nprot = 1\n", "t").expect_err("unknown key");
        assert!(format!("{e:#}").contains("parsing"), "{e}");
        let file = FileConfig::parse("[disks]\nzero = \"/x\"\n", "t").expect("parse");
        let e = Settings::new(file, &KernelParams::default()).expect_err("bad disk");
        assert!(e.to_string().starts_with("disks.zero"), "{e}");
        let file = FileConfig::default();
        let e = Settings::new(file, &KernelParams::parse("aula.server_fp=sha256:12"))
            .expect_err("bad fp");
        assert!(e.to_string().contains("aula.server_fp"), "{e}");
    }
}
