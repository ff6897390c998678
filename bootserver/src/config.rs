//! Configuration: a TOML file (see `aula-bootserver.example.toml`, which is also the
//! embedded default), parsed strictly (unknown keys are errors) and then validated.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::mac::MacAddr;

/// The embedded default configuration: the documented example, good for a demo
/// inside the `10.213.0.0/24` test network.
pub const DEFAULT_CONFIG: &str = include_str!("../aula-bootserver.example.toml");

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("parsing config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range or inconsistent with another.
    #[error("invalid config: {key}: {message}")]
    Invalid {
        /// Dotted key path of the offending value.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity of this server on the boot network.
    pub server: ServerConfig,
    /// DHCP / proxyDHCP.
    #[serde(default)]
    pub dhcp: DhcpConfig,
    /// TFTP (iPXE programs only).
    #[serde(default)]
    pub tftp: TftpConfig,
    /// HTTP (iPXE scripts, live kernel/initrd, API).
    #[serde(default)]
    pub http: HttpConfig,
    /// What clients boot.
    #[serde(default)]
    pub boot: BootConfig,
    /// IPv6 router advertisements on the boot interface.
    #[serde(default)]
    pub ra: RaConfig,
    /// The image repository service (served by the HTTP listeners).
    #[serde(default)]
    pub repository: RepositorySection,
    /// The lab console: rooms, deployments, operators (served by the HTTP listeners).
    #[serde(default)]
    pub console: ConsoleConfig,
    /// How much state the server keeps at most.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Who may read `GET /metrics` (off when the section is missing).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
}

/// `[console]`: rooms, machines, deployments, operators and the web console.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console and the deployment API.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The operators file (TOML, argon2 hashes); default `<data_dir>/users.toml`.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// Hours a sign-in lasts.
    #[serde(default = "default_session_hours")]
    pub session_hours: u32,
    /// UDP port of Wake-on-LAN packets.
    #[serde(default = "default_wol_port")]
    pub wol_port: u16,
    /// Extra subnets (CIDR) whose broadcast addresses wake machines that
    /// are not in a `[[dhcp.subnet]]` (relayed rooms, proxyDHCP sites).
    #[serde(default)]
    pub wol_networks: Vec<String>,
    /// Seconds from waking a machine until its agent must have registered.
    #[serde(default = "default_live_boot_timeout")]
    pub live_boot_timeout_s: u64,
    /// Seconds a layout job may take.
    #[serde(default = "default_partition_timeout")]
    pub partition_timeout_s: u64,
    /// Seconds a restore or capture may go without progress.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_s: u64,
    /// Seconds a reboot or power-off may take.
    #[serde(default = "default_power_timeout")]
    pub power_timeout_s: u64,
    /// Seconds between Wake-on-LAN packets while waiting.
    #[serde(default = "default_wol_resend")]
    pub wol_resend_s: u64,
    /// Seconds an agent may stop answering before its machine is given up.
    #[serde(default = "default_agent_gone")]
    pub agent_gone_s: u64,
    /// Seconds between two questions to every registered agent (the
    /// console's live/offline state).
    #[serde(default = "default_presence_probe")]
    pub presence_probe_s: u64,
    /// The shared console database, `postgres://user@host:port/dbname`
    /// (no password in it); absent: the embedded SQLite file. Several
    /// boot servers on one database share rooms, machines, deployments,
    /// sessions and the command log (`crate::db::store`).
    #[serde(default)]
    pub database: Option<String>,
    /// The file holding the database password (mode `0600` or stricter).
    #[serde(default)]
    pub database_password_file: Option<PathBuf>,
    /// This boot server's id in the shared database (`[A-Za-z0-9._-]`,
    /// 1-64): rooms name the server that serves them. Required with
    /// `database`.
    #[serde(default)]
    pub server_id: Option<String>,
    /// Seconds a boot server's claim on a machine lasts without its
    /// heartbeat (renewed every third of it).
    #[serde(default = "default_claim_lease")]
    pub claim_lease_s: u64,
}

fn default_claim_lease() -> u64 {
    30
}

fn default_session_hours() -> u32 {
    12
}
fn default_wol_port() -> u16 {
    9
}
fn default_live_boot_timeout() -> u64 {
    600
}
fn default_partition_timeout() -> u64 {
    600
}
fn default_stall_timeout() -> u64 {
    600
}
fn default_power_timeout() -> u64 {
    180
}
fn default_wol_resend() -> u64 {
    60
}
fn default_presence_probe() -> u64 {
    15
}
fn default_agent_gone() -> u64 {
    60
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            users_file: None,
            session_hours: default_session_hours(),
            wol_port: default_wol_port(),
            wol_networks: Vec::new(),
            live_boot_timeout_s: default_live_boot_timeout(),
            partition_timeout_s: default_partition_timeout(),
            stall_timeout_s: default_stall_timeout(),
            power_timeout_s: default_power_timeout(),
            wol_resend_s: default_wol_resend(),
            agent_gone_s: default_agent_gone(),
            presence_probe_s: default_presence_probe(),
            database: None,
            database_password_file: None,
            server_id: None,
            claim_lease_s: default_claim_lease(),
        }
    }
}

/// `[limits]`: how much the server keeps, so that nothing on the network
/// can grow it without bound.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Machines known at most (boot modes, DHCP sightings, boot sessions,
    /// registered agents).
    #[serde(default = "default_max_machines")]
    pub max_machines: usize,
    /// Agents' events kept per machine, in KiB.
    #[serde(default = "default_events_per_machine_kib")]
    pub events_per_machine_kib: usize,
    /// Agents' events kept in all, in MiB.
    #[serde(default = "default_events_total_mib")]
    pub events_total_mib: usize,
}

fn default_max_machines() -> usize {
    crate::state::DEFAULT_MAX_MACHINES
}
fn default_events_per_machine_kib() -> usize {
    256
}
fn default_events_total_mib() -> usize {
    64
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_machines: default_max_machines(),
            events_per_machine_kib: default_events_per_machine_kib(),
            events_total_mib: default_events_total_mib(),
        }
    }
}

/// `[repository]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySection {
    /// Serve the image repository.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Repository directory; default `<data_dir>/repo`.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Token that uploads, publishing, deletion and maintenance need.
    #[serde(default)]
    pub write_token: Option<String>,
    /// File holding the write token (first line).
    #[serde(default)]
    pub write_token_file: Option<PathBuf>,
    /// When set, reads need this token too.
    #[serde(default)]
    pub read_token: Option<String>,
    /// Unreferenced chunks younger than this (seconds) survive garbage
    /// collection: their upload may still be in progress.
    #[serde(default = "default_gc_grace")]
    pub gc_grace_s: u64,
    /// Chunk uploads buffered at once.
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    /// Where chunks and manifests live: `dir` (`root`, the default) or
    /// `s3` (the bucket of `[repository.s3]`, shared by several boot
    /// servers; `root` then keeps only this server's own state).
    #[serde(default)]
    pub backend: RepoBackend,
    /// `[repository.s3]`: bucket, endpoints, credentials file, cache.
    #[serde(default)]
    pub s3: Option<crate::repo_store::S3Settings>,
}

/// `repository.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoBackend {
    /// A directory.
    #[default]
    Dir,
    /// An S3-compatible bucket.
    S3,
}

fn default_gc_grace() -> u64 {
    3600
}
fn default_max_uploads() -> usize {
    16
}

impl Default for RepositorySection {
    fn default() -> Self {
        Self {
            enabled: false,
            root: None,
            write_token: None,
            write_token_file: None,
            read_token: None,
            gc_grace_s: default_gc_grace(),
            max_uploads: default_max_uploads(),
            backend: RepoBackend::Dir,
            s3: None,
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// This server's IPv4 address on the boot network (DHCP server id, next-server, URLs).
    pub address: Ipv4Addr,
    /// The boot network interface. When absent it is the interface holding `address`.
    #[serde(default)]
    pub interface: Option<String>,
    /// Where leases, boot modes and the agent registry are kept.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/aula-bootserver")
}

/// DHCP operating mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Full DHCP server: leases from the configured subnets.
    Full,
    /// ProxyDHCP beside the site's own DHCP server: boot information for PXE clients only.
    Proxy,
}

/// `[dhcp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpConfig {
    /// Run the DHCP service at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `full` or `proxy`.
    #[serde(default = "default_mode")]
    pub mode: DhcpMode,
    /// Server port (67). Changing it is only useful for tests.
    #[serde(default = "default_dhcp_port")]
    pub port: u16,
    /// Client port replies go to (68).
    #[serde(default = "default_dhcp_client_port")]
    pub client_port: u16,
    /// PXE boot-server discovery port (4011); 0 disables that listener.
    #[serde(default = "default_pxe_port")]
    pub pxe_port: u16,
    /// Answer NAK to requests for addresses this server does not know (full mode).
    #[serde(default = "yes")]
    pub authoritative: bool,
    /// Default lease time in seconds.
    #[serde(default = "default_lease_time")]
    pub lease_time: u32,
    /// How long an offered address is held for the client, in seconds.
    #[serde(default = "default_offer_time")]
    pub offer_time: u32,
    /// How long a declined address stays out of the pool, in seconds.
    #[serde(default = "default_decline_time")]
    pub decline_time: u32,
    /// Address pools (full mode). The one containing `giaddr`, or `server.address`
    /// for directly attached clients, is used.
    #[serde(default, rename = "subnet")]
    pub subnets: Vec<SubnetConfig>,
    /// Static reservations by MAC.
    #[serde(default, rename = "reservation")]
    pub reservations: Vec<ReservationConfig>,
}

/// `[[dhcp.subnet]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetConfig {
    /// The network, CIDR (`10.213.0.0/24`).
    pub network: String,
    /// First and last address handed out dynamically.
    pub range: [Ipv4Addr; 2],
    /// Default gateway (option 3).
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    #[serde(default)]
    pub domain: Option<String>,
    /// Lease time for this subnet, seconds (default: `dhcp.lease_time`).
    #[serde(default)]
    pub lease_time: Option<u32>,
}

/// `[[dhcp.reservation]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationConfig {
    /// The client.
    pub mac: MacAddr,
    /// Its fixed address (inside one of the subnets; may be outside the dynamic range).
    pub ip: Ipv4Addr,
    /// Host name sent as option 12.
    #[serde(default)]
    pub hostname: Option<String>,
}

impl DhcpConfig {
    /// `"full"` or `"proxy"`.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            DhcpMode::Full => "full",
            DhcpMode::Proxy => "proxy",
        }
    }
}

impl Default for DhcpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            mode: DhcpMode::Full,
            port: default_dhcp_port(),
            client_port: default_dhcp_client_port(),
            pxe_port: default_pxe_port(),
            authoritative: true,
            lease_time: default_lease_time(),
            offer_time: default_offer_time(),
            decline_time: default_decline_time(),
            subnets: Vec::new(),
            reservations: Vec::new(),
        }
    }
}

/// `[tftp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TftpConfig {
    /// Run the TFTP service.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address (default: `server.address`, port 69).
    #[serde(default)]
    pub bind: Option<SocketAddr>,
    /// Directory served read-only (default: Debian's `/usr/lib/ipxe`).
    #[serde(default = "default_tftp_root")]
    pub root: PathBuf,
    /// Largest block size granted (RFC 2348); 1468 fits a 1500-byte MTU.
    #[serde(default = "default_max_blksize")]
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440).
    #[serde(default = "default_max_windowsize")]
    pub max_windowsize: u16,
    /// Concurrent transfers whose client has acknowledged; more are
    /// refused with a TFTP error.
    #[serde(default = "default_max_transfers")]
    pub max_transfers: usize,
    /// Concurrent transfers from one client address.
    #[serde(default = "default_max_transfers_per_ip")]
    pub max_transfers_per_ip: usize,
    /// Requests waiting for their client's first acknowledgement (a forged
    /// source never sends one); when full, the oldest is dropped.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Retransmission timeout in milliseconds when the client asks for none.
    #[serde(default = "default_tftp_timeout_ms")]
    pub timeout_ms: u64,
    /// Largest retransmission timeout a client may ask for (RFC 2349), in
    /// seconds; a larger request is not acknowledged and `timeout_ms` applies.
    #[serde(default = "default_tftp_max_timeout")]
    pub max_timeout_s: u8,
    /// Retransmissions before a transfer is abandoned.
    #[serde(default = "default_tftp_retries")]
    pub retries: u32,
    /// Longest time a whole transfer may take, in seconds.
    #[serde(default = "default_tftp_max_transfer")]
    pub max_transfer_s: u64,
}

impl Default for TftpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: None,
            root: default_tftp_root(),
            max_blksize: default_max_blksize(),
            max_windowsize: default_max_windowsize(),
            max_transfers: default_max_transfers(),
            max_transfers_per_ip: default_max_transfers_per_ip(),
            max_pending: default_max_pending(),
            timeout_ms: default_tftp_timeout_ms(),
            max_timeout_s: default_tftp_max_timeout(),
            retries: default_tftp_retries(),
            max_transfer_s: default_tftp_max_transfer(),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Run the HTTP service.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address.
    #[serde(default = "default_http_bind")]
    pub bind: SocketAddr,
    /// Base URL clients use to reach this server (default `http://<server.address>:<port>`).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Bearer token required for API writes. Without one, API writes are refused.
    #[serde(default)]
    pub api_token: Option<String>,
    /// File holding the bearer token (first line), instead of `api_token`.
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
    /// Read-only token: lists machines, leases, agents and agents' events
    /// (never agents' tokens), changes nothing.
    #[serde(default)]
    pub viewer_token: Option<String>,
    /// File holding the viewer token (first line), instead of `viewer_token`.
    #[serde(default)]
    pub viewer_token_file: Option<PathBuf>,
    /// Concurrent connections (per listener). When all are taken, the
    /// oldest connection that has sent no request makes room.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent connections from one client address (per listener).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Seconds a request head may take to arrive.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_s: u64,
    /// Longest gap, in seconds, between two pieces of a request body.
    #[serde(default = "default_body_idle_timeout")]
    pub body_idle_timeout_s: u64,
    /// Seconds from a request's head to the end of its body.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
    /// Seconds a response may wait for the client to read a byte before
    /// its connection is dropped (slow readers of the kernel or chunks).
    #[serde(default = "default_send_stall_timeout")]
    pub send_stall_timeout_s: u64,
    /// The HTTPS listener (on by default): the API, agent registration and
    /// the repository are served over it; plain HTTP keeps only what
    /// firmware fetches.
    #[serde(default)]
    pub tls: TlsConfig,
}

impl HttpConfig {
    /// The limits of each HTTP(S) listener.
    pub fn listener_options(&self) -> aula_httpkit::server::Options {
        let secs = std::time::Duration::from_secs;
        aula_httpkit::server::Options {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_read_timeout: secs(self.header_timeout_s),
            body_idle_timeout: secs(self.body_idle_timeout_s),
            request_timeout: secs(self.request_timeout_s),
            send_stall_timeout: secs(self.send_stall_timeout_s),
            ..Default::default()
        }
    }
}

/// `[http.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Serve HTTPS. `false` turns it off: everything is then served over
    /// plain HTTP and the live kernel line says `aula.tls=off`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Listen address.
    #[serde(default = "default_https_bind")]
    pub bind: SocketAddr,
    /// PEM certificate chain (server certificate first). Without `cert`
    /// and `key` the server makes its own certificate on first start and
    /// keeps it in `<data_dir>/tls/` (key mode 0600).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: default_https_bind(),
            cert: None,
            key: None,
        }
    }
}

fn default_https_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: default_http_bind(),
            public_url: None,
            api_token: None,
            api_token_file: None,
            viewer_token: None,
            viewer_token_file: None,
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            header_timeout_s: default_header_timeout(),
            body_idle_timeout_s: default_body_idle_timeout(),
            request_timeout_s: default_request_timeout(),
            send_stall_timeout_s: default_send_stall_timeout(),
            tls: TlsConfig::default(),
        }
    }
}

/// A machine's boot mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// Boot the live system (kernel + initrd over HTTP).
    Live,
    /// Boot the installed operating system from the local disk.
    Local,
}

impl std::fmt::Display for BootMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootMode::Live => "live",
            BootMode::Local => "local",
        })
    }
}

/// How a UEFI machine in `local` mode leaves iPXE.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UefiLocal {
    /// `exit`: back to the firmware, which tries its next boot entry.
    Exit,
    /// `sanboot --no-describe --drive 0x80`.
    Sanboot,
}

/// `[boot.programs]`: boot program per firmware, paths relative to the TFTP root.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramsConfig {
    /// PC BIOS (option 93 = 0).
    #[serde(default = "default_bios_program")]
    pub bios: Option<String>,
    /// x86-64 UEFI (7, 9) and x86-64 UEFI HTTP boot (16).
    #[serde(default = "default_uefi_x64_program")]
    pub uefi_x64: Option<String>,
    /// 32-bit x86 UEFI (6, 15).
    #[serde(default)]
    pub uefi_ia32: Option<String>,
    /// 64-bit ARM UEFI (11) and its HTTP boot (19).
    #[serde(default = "default_arm64_program")]
    pub uefi_arm64: Option<String>,
}

impl Default for ProgramsConfig {
    fn default() -> Self {
        Self {
            bios: default_bios_program(),
            uefi_x64: default_uefi_x64_program(),
            uefi_ia32: None,
            uefi_arm64: default_arm64_program(),
        }
    }
}

/// `[boot]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// Mode of machines nobody has set a mode for.
    #[serde(default = "default_boot_mode")]
    pub default_mode: BootMode,
    /// Live kernel file.
    #[serde(default = "default_kernel")]
    pub kernel: PathBuf,
    /// Live initrd file.
    #[serde(default = "default_initrd")]
    pub initrd: PathBuf,
    /// Extra kernel command line (after the `aula.*` arguments).
    #[serde(default)]
    pub cmdline: String,
    /// `aula.core=` URL (where agents send webhooks); omitted when absent.
    #[serde(default)]
    pub core_url: Option<String>,
    /// `aula.server_fp=` value (`sha256:<hex>`) pinning the server's TLS
    /// certificate (default: computed from `[http.tls]`'s certificate).
    #[serde(default)]
    pub server_fingerprint: Option<String>,
    /// Override of the `aula.server=` URL (default: the HTTPS URL when
    /// `[http.tls]` is set, else the HTTP public URL).
    #[serde(default)]
    pub server_url: Option<String>,
    /// Seconds after a machine's live boot script was served during which
    /// its agent may register (the registration window).
    #[serde(default = "default_registration_window")]
    pub registration_window_s: u64,
    /// UEFI local boot method.
    #[serde(default = "default_uefi_local")]
    pub uefi_local: UefiLocal,
    /// Boot programs per firmware.
    #[serde(default)]
    pub programs: ProgramsConfig,
    /// The signed chain (shim → GRUB → kernel) for UEFI Secure Boot.
    #[serde(default)]
    pub secure_boot: SecureBootConfig,
}

/// `[boot.secure_boot]`: which x86-64 UEFI machines get the signed chain
/// (Microsoft-signed shim, Debian-signed GRUB, Debian-signed kernel) instead
/// of iPXE, which Secure Boot firmware refuses.
///
/// A machine gets it when its MAC is in `machines`, or it is in one of
/// `rooms` (the console's rooms), or `default` is true; `off` wins over all
/// three.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureBootConfig {
    /// Whether machines not listed get the signed chain.
    #[serde(default)]
    pub default: bool,
    /// Rooms (by name) whose machines get it.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Machines that get it.
    #[serde(default)]
    pub machines: Vec<MacAddr>,
    /// Machines that never get it (iPXE as before).
    #[serde(default)]
    pub off: Vec<MacAddr>,
    /// Directory holding `shimx64.efi` (Debian's `shim-signed`) and
    /// `grubx64.efi` (Debian's signed network GRUB, `grubnetx64.efi.signed`,
    /// under the name shim loads), as `live-image/build` puts them beside
    /// the signed kernel. Read when the server starts; served by TFTP under
    /// those names and by HTTP under `/boot/live/`.
    #[serde(default = "default_secure_boot_dir")]
    pub dir: PathBuf,
}

impl Default for SecureBootConfig {
    fn default() -> Self {
        Self {
            default: false,
            rooms: Vec::new(),
            machines: Vec::new(),
            off: Vec::new(),
            dir: default_secure_boot_dir(),
        }
    }
}

impl SecureBootConfig {
    /// Whether `mac` gets the signed chain; `in_listed_room` says whether it
    /// sits in one of `rooms`.
    pub fn wants(&self, mac: MacAddr, in_listed_room: bool) -> bool {
        if self.off.contains(&mac) {
            return false;
        }
        self.machines.contains(&mac) || in_listed_room || self.default
    }

    /// Whether any machine can get the signed chain.
    pub fn any(&self) -> bool {
        self.default || !self.rooms.is_empty() || !self.machines.is_empty()
    }
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            default_mode: default_boot_mode(),
            kernel: default_kernel(),
            initrd: default_initrd(),
            cmdline: String::new(),
            core_url: None,
            server_fingerprint: None,
            server_url: None,
            registration_window_s: default_registration_window(),
            uefi_local: default_uefi_local(),
            programs: ProgramsConfig::default(),
            secure_boot: SecureBootConfig::default(),
        }
    }
}

/// `[ra]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaConfig {
    /// Send router advertisements on the boot interface.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The ULA prefix advertised (must be a /64), e.g. `fd00:213::/64`.
    #[serde(default = "default_ra_prefix")]
    pub prefix: String,
    /// Seconds between unsolicited advertisements.
    #[serde(default = "default_ra_interval")]
    pub interval: u32,
}

impl Default for RaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            prefix: default_ra_prefix(),
            interval: default_ra_interval(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_mode() -> DhcpMode {
    DhcpMode::Full
}
fn default_dhcp_port() -> u16 {
    67
}
fn default_dhcp_client_port() -> u16 {
    68
}
fn default_pxe_port() -> u16 {
    4011
}
fn default_lease_time() -> u32 {
    3600
}
fn default_offer_time() -> u32 {
    30
}
fn default_decline_time() -> u32 {
    600
}
fn default_tftp_root() -> PathBuf {
    PathBuf::from("/usr/lib/ipxe")
}
fn default_max_blksize() -> u16 {
    1468
}
fn default_max_windowsize() -> u16 {
    16
}
fn default_max_transfers() -> usize {
    64
}
fn default_max_transfers_per_ip() -> usize {
    8
}
fn default_max_pending() -> usize {
    256
}
fn default_tftp_timeout_ms() -> u64 {
    1000
}
fn default_tftp_max_timeout() -> u8 {
    5
}
fn default_tftp_max_transfer() -> u64 {
    60
}
fn default_tftp_retries() -> u32 {
    5
}
fn default_http_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_max_connections() -> usize {
    512
}
fn default_max_connections_per_ip() -> usize {
    32
}
fn default_header_timeout() -> u64 {
    20
}
fn default_body_idle_timeout() -> u64 {
    10
}
fn default_request_timeout() -> u64 {
    60
}
fn default_send_stall_timeout() -> u64 {
    30
}
fn default_boot_mode() -> BootMode {
    BootMode::Live
}
fn default_kernel() -> PathBuf {
    PathBuf::from("/srv/aula/live/vmlinuz")
}
fn default_initrd() -> PathBuf {
    PathBuf::from("/srv/aula/live/initrd.img")
}
fn default_registration_window() -> u64 {
    600
}
fn default_uefi_local() -> UefiLocal {
    UefiLocal::Exit
}
fn default_bios_program() -> Option<String> {
    Some("undionly.kpxe".into())
}
fn default_secure_boot_dir() -> PathBuf {
    PathBuf::from("/srv/aula/live")
}
fn default_uefi_x64_program() -> Option<String> {
    Some("ipxe.efi".into())
}
fn default_arm64_program() -> Option<String> {
    Some("arm64/snponly.efi".into())
}
fn default_ra_prefix() -> String {
    "fd00:213::/64".into()
}
fn default_ra_interval() -> u32 {
    30
}

/// An IPv4 network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Ipv4Net {
    /// Parses `a.b.c.d/n`, refusing host bits.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not in CIDR form (a.b.c.d/len)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{p:?} is not a prefix length 0-32"))?;
        let net = Self { addr, prefix };
        if u32::from(addr) & !net.mask_u32() != 0 {
            return Err(format!("{s} has host bits set"));
        }
        Ok(net)
    }

    /// The netmask as an integer.
    pub fn mask_u32(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The netmask.
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_u32())
    }

    /// The directed broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask_u32())
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_u32() == u32::from(self.addr)
    }
}

/// Parses an IPv6 /64 prefix such as `fd00:213::/64`.
pub fn parse_ra_prefix(s: &str) -> Result<Ipv6Addr, String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR form (prefix/64)"))?;
    if p != "64" {
        return Err(format!("prefix length must be 64 for SLAAC, got /{p}"));
    }
    let addr: Ipv6Addr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IPv6 address"))?;
    let seg = addr.segments();
    if seg[4..].iter().any(|s| *s != 0) {
        return Err(format!("{s} has bits set beyond /64"));
    }
    if seg[0] & 0xfe00 != 0xfc00 {
        return Err(format!(
            "{s} is not a unique local (fc00::/7) prefix; only ULA prefixes are advertised"
        ));
    }
    Ok(addr)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The embedded default.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The HTTP base URL clients use (no trailing slash).
    pub fn public_url(&self) -> String {
        match &self.http.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!("http://{}:{}", self.server.address, self.http.bind.port()),
        }
    }

    /// Checks everything that can be checked without touching the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let addr = self.server.address;
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(invalid(
                "server.address",
                format!("{addr} cannot be a server address"),
            ));
        }
        if let Some(i) = &self.server.interface {
            if i.is_empty() || i.len() > 15 || i.contains('/') {
                return Err(invalid(
                    "server.interface",
                    format!("{i:?} is not an interface name"),
                ));
            }
        }
        self.validate_dhcp()?;
        self.validate_console()?;
        self.metrics.validate()?;
        let t = &self.tftp;
        if !(8..=65464).contains(&t.max_blksize) {
            return Err(invalid("tftp.max_blksize", "must be 8..=65464 (RFC 2348)"));
        }
        if t.max_windowsize == 0 {
            return Err(invalid(
                "tftp.max_windowsize",
                "must be 1..=65535 (RFC 7440)",
            ));
        }
        if t.max_transfers == 0 {
            return Err(invalid("tftp.max_transfers", "must be at least 1"));
        }
        if t.max_transfers_per_ip == 0 || t.max_pending == 0 {
            return Err(invalid(
                "tftp.max_transfers_per_ip",
                "max_transfers_per_ip and max_pending must be at least 1",
            ));
        }
        if !(10..=255_000).contains(&t.timeout_ms) {
            return Err(invalid("tftp.timeout_ms", "must be 10..=255000"));
        }
        if t.max_timeout_s == 0 {
            return Err(invalid("tftp.max_timeout_s", "must be 1..=255"));
        }
        if !(1..=3600).contains(&t.max_transfer_s) {
            return Err(invalid("tftp.max_transfer_s", "must be 1..=3600 seconds"));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        if self.http.max_connections_per_ip == 0 {
            return Err(invalid("http.max_connections_per_ip", "must be at least 1"));
        }
        for (key, v) in [
            ("http.header_timeout_s", self.http.header_timeout_s),
            ("http.body_idle_timeout_s", self.http.body_idle_timeout_s),
            ("http.request_timeout_s", self.http.request_timeout_s),
            ("http.send_stall_timeout_s", self.http.send_stall_timeout_s),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, "must be 1..=3600 seconds"));
            }
        }
        if self.http.api_token.is_some() && self.http.api_token_file.is_some() {
            return Err(invalid(
                "http.api_token",
                "set api_token or api_token_file, not both",
            ));
        }
        if let Some(tok) = &self.http.api_token {
            if tok.len() < 16 {
                return Err(invalid("http.api_token", "must be at least 16 characters"));
            }
        }
        if self.http.viewer_token.is_some() && self.http.viewer_token_file.is_some() {
            return Err(invalid(
                "http.viewer_token",
                "set viewer_token or viewer_token_file, not both",
            ));
        }
        if let Some(tok) = &self.http.viewer_token {
            if tok.len() < 16 {
                return Err(invalid(
                    "http.viewer_token",
                    "must be at least 16 characters",
                ));
            }
            if self.http.api_token.as_deref() == Some(tok.as_str()) {
                return Err(invalid(
                    "http.viewer_token",
                    "must differ from http.api_token",
                ));
            }
        }
        let t = &self.http.tls;
        if t.cert.is_some() != t.key.is_some() {
            return Err(invalid(
                "http.tls",
                "give both cert and key, or neither (then the server makes its own)",
            ));
        }
        if t.enabled && self.http.enabled && t.bind == self.http.bind && t.bind.port() != 0 {
            return Err(invalid(
                "http.tls.bind",
                "must differ from http.bind (plain HTTP stays for firmware)",
            ));
        }
        if !(10..=86_400).contains(&self.boot.registration_window_s) {
            return Err(invalid(
                "boot.registration_window_s",
                "must be 10..=86400 seconds",
            ));
        }
        for (key, url) in [
            ("http.public_url", &self.http.public_url),
            ("boot.core_url", &self.boot.core_url),
            ("boot.server_url", &self.boot.server_url),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("http://") || u.starts_with("https://"))
                    || u.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(invalid(key, format!("{u:?} is not an http(s) URL")));
                }
            }
        }
        if let Some(fp) = &self.boot.server_fingerprint {
            let ok = fp
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(invalid(
                    "boot.server_fingerprint",
                    "must be sha256:<64 hex digits>",
                ));
            }
        }
        if self.boot.cmdline.chars().any(|c| c.is_control()) {
            return Err(invalid("boot.cmdline", "must be a single line"));
        }
        for (key, p) in [
            ("boot.programs.bios", &self.boot.programs.bios),
            ("boot.programs.uefi_x64", &self.boot.programs.uefi_x64),
            ("boot.programs.uefi_ia32", &self.boot.programs.uefi_ia32),
            ("boot.programs.uefi_arm64", &self.boot.programs.uefi_arm64),
        ] {
            if let Some(p) = p {
                if crate::tftp::safe_relative_path(p).is_none() || p.len() > 100 {
                    return Err(invalid(
                        key,
                        format!("{p:?} must be a relative path inside the TFTP root"),
                    ));
                }
            }
        }
        for (key, p) in [
            ("boot.kernel", &self.boot.kernel),
            ("boot.initrd", &self.boot.initrd),
        ] {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
            {
                return Err(invalid(
                    key,
                    "file name must be plain ASCII (letters, digits, . _ - +): it appears in URLs and on the kernel line",
                ));
            }
        }
        let r = &self.repository;
        if r.enabled {
            if !self.http.enabled {
                return Err(invalid(
                    "repository.enabled",
                    "the repository is served over HTTP: enable [http] too",
                ));
            }
            if r.write_token.is_some() && r.write_token_file.is_some() {
                return Err(invalid(
                    "repository.write_token",
                    "set write_token or write_token_file, not both",
                ));
            }
            for (key, t) in [
                ("repository.write_token", &r.write_token),
                ("repository.read_token", &r.read_token),
            ] {
                if t.as_ref().is_some_and(|t| t.len() < 16) {
                    return Err(invalid(key, "must be at least 16 characters"));
                }
            }
            if r.max_uploads == 0 {
                return Err(invalid("repository.max_uploads", "must be at least 1"));
            }
            match (r.backend, &r.s3) {
                (RepoBackend::S3, None) => {
                    return Err(invalid(
                        "repository.backend",
                        "backend \"s3\" needs a [repository.s3] section (url, credentials_file)",
                    ))
                }
                (RepoBackend::S3, Some(s3)) => {
                    aula_imager::repo::parse_s3_url(&s3.url)
                        .map_err(|e| invalid("repository.s3.url", e.to_string()))?;
                    if !s3.credentials_file.is_absolute() {
                        return Err(invalid(
                            "repository.s3.credentials_file",
                            "must be an absolute path",
                        ));
                    }
                }
                (RepoBackend::Dir, _) => {}
            }
        }
        let l = &self.limits;
        if !(1..=10_000_000).contains(&l.max_machines) {
            return Err(invalid("limits.max_machines", "must be 1..=10000000"));
        }
        if !(64..=65_536).contains(&l.events_per_machine_kib) {
            return Err(invalid(
                "limits.events_per_machine_kib",
                "must be 64..=65536 (an event may be 64 KiB)",
            ));
        }
        if !(1..=65_536).contains(&l.events_total_mib) {
            return Err(invalid("limits.events_total_mib", "must be 1..=65536"));
        }
        if self.ra.enabled {
            parse_ra_prefix(&self.ra.prefix).map_err(|m| invalid("ra.prefix", m))?;
            if !(4..=1800).contains(&self.ra.interval) {
                return Err(invalid(
                    "ra.interval",
                    "must be 4..=1800 seconds (RFC 4861)",
                ));
            }
        }
        Ok(())
    }

    fn validate_console(&self) -> Result<(), ConfigError> {
        let c = &self.console;
        for (i, n) in c.wol_networks.iter().enumerate() {
            Ipv4Net::parse(n).map_err(|m| invalid(format!("console.wol_networks[{i}]"), m))?;
        }
        if !(1..=720).contains(&c.session_hours) {
            return Err(invalid("console.session_hours", "must be 1..=720"));
        }
        for (k, v) in [
            ("live_boot_timeout_s", c.live_boot_timeout_s),
            ("partition_timeout_s", c.partition_timeout_s),
            ("stall_timeout_s", c.stall_timeout_s),
            ("power_timeout_s", c.power_timeout_s),
            ("wol_resend_s", c.wol_resend_s),
            ("agent_gone_s", c.agent_gone_s),
            ("presence_probe_s", c.presence_probe_s),
            ("claim_lease_s", c.claim_lease_s),
        ] {
            if !(1..=86_400).contains(&v) {
                return Err(invalid(format!("console.{k}"), "must be 1..=86400 seconds"));
            }
        }
        if let Some(url) = &c.database {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid(
                    "console.database",
                    "must be a postgres://user@host:port/dbname URL",
                ));
            }
            if c.server_id.is_none() {
                return Err(invalid(
                    "console.server_id",
                    "is required with console.database (this boot server's id in the shared database)",
                ));
            }
        } else if c.database_password_file.is_some() {
            return Err(invalid(
                "console.database_password_file",
                "is set but console.database is not",
            ));
        }
        Ok(())
    }

    fn validate_dhcp(&self) -> Result<(), ConfigError> {
        let d = &self.dhcp;
        if !d.enabled {
            return Ok(());
        }
        if d.lease_time < 60 {
            return Err(invalid("dhcp.lease_time", "must be at least 60 seconds"));
        }
        if d.offer_time == 0 || d.offer_time > 600 {
            return Err(invalid("dhcp.offer_time", "must be 1..=600 seconds"));
        }
        if d.port == 0 || d.client_port == 0 {
            return Err(invalid("dhcp.port", "ports must be non-zero"));
        }
        let mut nets: Vec<Ipv4Net> = Vec::new();
        for (i, s) in d.subnets.iter().enumerate() {
            let key = format!("dhcp.subnet[{i}]");
            let net =
                Ipv4Net::parse(&s.network).map_err(|m| invalid(format!("{key}.network"), m))?;
            if net.prefix > 30 || net.prefix < 8 {
                return Err(invalid(
                    format!("{key}.network"),
                    "prefix must be /8 to /30",
                ));
            }
            let [a, b] = s.range;
            if u32::from(a) > u32::from(b) {
                return Err(invalid(format!("{key}.range"), format!("{a} is after {b}")));
            }
            for ip in [a, b] {
                if !net.contains(ip) || ip == net.addr || ip == net.broadcast() {
                    return Err(invalid(
                        format!("{key}.range"),
                        format!("{ip} is not a host address of {}", s.network),
                    ));
                }
            }
            if let Some(lt) = s.lease_time {
                if lt < 60 {
                    return Err(invalid(
                        format!("{key}.lease_time"),
                        "must be at least 60 seconds",
                    ));
                }
            }
            if let Some(dom) = &s.domain {
                if dom.is_empty() || dom.len() > 253 || dom.chars().any(|c| c.is_whitespace()) {
                    return Err(invalid(format!("{key}.domain"), "not a domain name"));
                }
            }
            if nets
                .iter()
                .any(|n| n.contains(net.addr) || net.contains(n.addr))
            {
                return Err(invalid(format!("{key}.network"), "overlaps another subnet"));
            }
            nets.push(net);
        }
        match d.mode {
            DhcpMode::Full => {
                if d.subnets.is_empty() {
                    return Err(invalid(
                        "dhcp.subnet",
                        "full mode needs at least one [[dhcp.subnet]]",
                    ));
                }
                if !nets.iter().any(|n| n.contains(self.server.address)) {
                    return Err(invalid(
                        "server.address",
                        format!(
                            "{} is in none of the [[dhcp.subnet]] networks; directly attached clients would get no pool",
                            self.server.address
                        ),
                    ));
                }
                for (i, s) in d.subnets.iter().enumerate() {
                    let [a, b] = s.range;
                    if (u32::from(a)..=u32::from(b)).contains(&u32::from(self.server.address)) {
                        return Err(invalid(
                            format!("dhcp.subnet[{i}].range"),
                            "contains server.address",
                        ));
                    }
                }
            }
            DhcpMode::Proxy => {
                if !d.reservations.is_empty() {
                    return Err(invalid("dhcp.reservation", "reservations need full mode"));
                }
            }
        }
        let mut macs = HashSet::new();
        let mut ips = HashSet::new();
        for (i, r) in d.reservations.iter().enumerate() {
            let key = format!("dhcp.reservation[{i}]");
            if !macs.insert(r.mac) {
                return Err(invalid(
                    format!("{key}.mac"),
                    format!("{} reserved twice", r.mac),
                ));
            }
            if !ips.insert(r.ip) {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!("{} reserved twice", r.ip),
                ));
            }
            if r.ip == self.server.address {
                return Err(invalid(format!("{key}.ip"), "is the server's own address"));
            }
            if !nets
                .iter()
                .any(|n| n.contains(r.ip) && r.ip != n.addr && r.ip != n.broadcast())
            {
                return Err(invalid(
                    format!("{key}.ip"),
                    format!("{} is in no subnet", r.ip),
                ));
            }
            if let Some(h) = &r.hostname {
                if h.is_empty()
                    || h.len() > 63
                    || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(invalid(format!("{key}.hostname"), "not a host name"));
                }
            }
        }
        Ok(())
    }

    /// The TFTP listen address.
    pub fn tftp_bind(&self) -> SocketAddr {
        self.tftp
            .bind
            .unwrap_or(SocketAddr::new(IpAddr::V4(self.server.address), 69))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_validates() {
        let cfg = Config::embedded_default().expect("the example config must be valid");
        assert_eq!(cfg.dhcp.mode, DhcpMode::Full);
        assert!(cfg.dhcp.enabled && cfg.tftp.enabled && cfg.http.enabled && cfg.ra.enabled);
        assert_eq!(cfg.public_url(), "http://10.213.0.1:8080");
        assert!(cfg.http.tls.enabled, "HTTPS is on by default");
        assert_eq!(cfg.http.tls.bind.port(), 8443);
        assert!(
            cfg.http.tls.cert.is_none(),
            "the server makes its own certificate"
        );
        assert_eq!(cfg.boot.registration_window_s, 600);
    }

    #[test]
    fn https_is_on_without_a_tls_section_and_off_only_when_asked() {
        let cfg = Config::parse(&with(
            "[http]
",
        ))
        .expect("config");
        assert!(cfg.http.tls.enabled);
        let cfg = Config::parse(&with(
            "[http]
[http.tls]
enabled = false
",
        ))
        .expect("config");
        assert!(!cfg.http.tls.enabled);
        let err = Config::parse(&with(
            "[http]
[http.tls]
cert = \"/x.crt\"
",
        ))
        .expect_err("cert without key");
        assert!(err.to_string().contains("http.tls"), "{err}");
    }

    fn with(extra: &str) -> String {
        format!("[server]\naddress = \"10.213.0.1\"\n{extra}")
    }

    #[test]
    fn a_shared_console_database_needs_a_postgres_url_and_a_server_id() {
        let cfg = Config::parse(&with(
            "[console]\ndatabase = \"postgres://aula@db:5432/aula\"\n\
             database_password_file = \"/etc/aula/db-password\"\nserver_id = \"north\"\n",
        ))
        .expect("shared database");
        assert_eq!(cfg.console.server_id.as_deref(), Some("north"));
        assert_eq!(cfg.console.claim_lease_s, 30);
        for (extra, key) in [
            (
                "[console]\ndatabase = \"postgres://aula@db/aula\"\n",
                "console.server_id",
            ),
            (
                "[console]\ndatabase = \"mysql://aula@db/aula\"\nserver_id = \"a\"\n",
                "console.database",
            ),
            (
                "[console]\ndatabase_password_file = \"/etc/aula/pw\"\n",
                "console.database_password_file",
            ),
            ("[console]\nclaim_lease_s = 0\n", "console.claim_lease_s"),
        ] {
            let err = Config::parse(&with(extra)).expect_err(extra);
            assert!(err.to_string().contains(key), "{extra}: {err}");
        }
        // Without a database the console keeps its SQLite file.
        assert!(Config::parse(&with(""))
            .expect("default")
            .console
            .database
            .is_none());
    }

    #[test]
    fn s3_backend_needs_its_section_a_valid_url_and_an_absolute_credentials_file() {
        let base = "[http]\n[repository]\nbackend = \"s3\"\n";
        let err = Config::parse(&with(base)).expect_err("no [repository.s3]");
        assert!(err.to_string().contains("repository.s3"), "{err}");
        let cfg = Config::parse(&with(&format!(
            "{base}[repository.s3]\nurl = \"s3://aula/site1\"\ncredentials_file = \"/etc/aula/s3.env\"\n"
        )))
        .expect("s3 config");
        assert_eq!(cfg.repository.backend, RepoBackend::S3);
        let s3 = cfg.repository.s3.expect("s3 section");
        assert_eq!((s3.url.as_str(), s3.cache_mib), ("s3://aula/site1", 256));
        let err = Config::parse(&with(&format!(
            "{base}[repository.s3]\nurl = \"http://aula\"\ncredentials_file = \"/etc/aula/s3.env\"\n"
        )))
        .expect_err("not s3://");
        assert!(err.to_string().contains("repository.s3.url"), "{err}");
        let err = Config::parse(&with(&format!(
            "{base}[repository.s3]\nurl = \"s3://aula\"\ncredentials_file = \"s3.env\"\n"
        )))
        .expect_err("relative");
        assert!(err.to_string().contains("credentials_file"), "{err}");
        // Credentials have no place in the config itself.
        let err = Config::parse(&with(&format!(
            "{base}[repository.s3]\nurl = \"s3://aula\"\ncredentials_file = \"/x\"\nsecret_key = \"x\"\n"
        )))
        .expect_err("secret in the config");
        assert!(err.to_string().contains("secret_key"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse(&with("bogus = 1\n")).expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn full_mode_needs_a_subnet_holding_the_server() {
        let err = Config::parse(&with("[dhcp]\nmode = \"full\"\n")).expect_err("no subnet");
        assert!(err.to_string().contains("dhcp.subnet"), "{err}");
        let err = Config::parse(&with(
            "[dhcp]\n[[dhcp.subnet]]\nnetwork = \"10.9.0.0/24\"\nrange = [\"10.9.0.10\", \"10.9.0.20\"]\n",
        ))
        .expect_err("server outside");
        assert!(err.to_string().contains("server.address"), "{err}");
    }

    #[test]
    fn range_outside_network_or_reversed_is_refused() {
        for range in [
            "[\"10.213.1.10\", \"10.213.1.20\"]",
            "[\"10.213.0.20\", \"10.213.0.10\"]",
        ] {
            let text = with(&format!(
                "[dhcp]\n[[dhcp.subnet]]\nnetwork = \"10.213.0.0/24\"\nrange = {range}\n"
            ));
            assert!(Config::parse(&text).is_err(), "range {range} accepted");
        }
    }

    #[test]
    fn proxy_mode_needs_no_subnet() {
        let cfg = Config::parse(&with("[dhcp]\nmode = \"proxy\"\n")).expect("proxy config");
        assert_eq!(cfg.dhcp.mode, DhcpMode::Proxy);
    }

    #[test]
    fn ra_prefix_must_be_ula_slash_64() {
        assert!(parse_ra_prefix("fd00:213::/64").is_ok());
        assert!(parse_ra_prefix("2001:db8::/64").is_err());
        assert!(parse_ra_prefix("fd00:213::/48").is_err());
        assert!(parse_ra_prefix("fd00:213::1/64").is_err());
    }

    #[test]
    fn escaping_program_paths_are_refused() {
        let text = with("[boot.programs]\nbios = \"../etc/passwd\"\n");
        let err = Config::parse(&text).expect_err("escaping program");
        assert!(err.to_string().contains("boot.programs.bios"), "{err}");
    }
}
