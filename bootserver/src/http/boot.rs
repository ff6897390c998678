//! Boot routes: per-MAC iPXE scripts, the live kernel and initrd, and the
//! boot programs for UEFI HTTP boot. They are what firmware fetches, so they
//! are served over plain HTTP too, and they carry no secret.
//!
//! * `GET /boot/ipxe/{mac}[?ip=…&mac=…]` — the iPXE script for that
//!   machine's boot mode.
//! * `GET /boot/grub/{mac}[?ip=…&mac=…]` — the same for the Secure Boot
//!   chain: a GRUB configuration (see [`crate::grub`]). It plays the iPXE
//!   script's role in everything below (one-shot modes, boot sessions).
//! * `GET|HEAD /boot/live/{kernel or initrd file name}` — with `Range`;
//!   also `shimx64.efi` and `grubx64.efi` of `[boot.secure_boot] dir`.
//! * `GET|HEAD /boot/programs/{path}` — files under the TFTP root.
//!
//! # Whose script request counts
//!
//! Serving the script of a machine consumes its one-shot mode and, for a
//! live boot, opens the boot session its agent registers through (with the
//! nonce put on the kernel line as `aula.boot=`). Only a request from the
//! machine's own address may do that:
//!
//! | where addresses come from | the request must come from |
//! |---|---|
//! | this server's full DHCP | the machine's bound lease |
//! | proxyDHCP, and the machine asked on port 4011 within the registration window | the address it announced there |
//! | anything else (another DHCP server chains iPXE to this URL) | the `ip=` iPXE put in the URL, with `mac=` naming the machine: boot file `http://server:8080/boot/ipxe/${net0/mac:hexhyp}?ip=${net0/ip}&mac=${net0/mac}` |
//!
//! Any other request gets the script of the machine's permanent mode,
//! consumes nothing and opens no session (logged). Its live kernel line
//! carries a nonce nobody can register with.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};

use super::files::serve_file;
use super::{
    error_json, response, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use crate::config::{BootMode, Config, DhcpMode, UefiLocal};
use crate::dhcp::pxe::{grub_cfg_url, script_url};
use crate::dhcp::DhcpService;
use crate::mac::MacAddr;
use crate::state::Registry;
use crate::tftp::{ConfinedRoot, DynFile, DynFuture, Dynamic, OpenError};

/// What the live kernel line says about the server.
#[derive(Debug, Clone)]
pub struct LiveArgs {
    /// `aula.server=`.
    pub server_url: String,
    /// `aula.server_fp=`.
    pub server_fp: Option<String>,
    /// HTTPS is turned off (`[http.tls] enabled = false`): the kernel line
    /// says `aula.tls=off`.
    pub tls_off: bool,
}

/// Which boot configuration a machine asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    /// The iPXE script.
    Ipxe,
    /// The signed chain's GRUB configuration, loading the kernel and
    /// initrd by this transport.
    Grub(crate::grub::Transport),
}

/// How a script request showed it comes from the machine itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From the address this server leased to it.
    Lease,
    /// From the address it announced on the proxyDHCP port.
    Announced,
    /// From the address iPXE put in the URL.
    Url,
}

/// The boot route group.
pub struct BootRoutes {
    live: LiveArgs,
    cfg: Arc<Config>,
    registry: Arc<Registry>,
    dhcp: Option<DhcpService>,
    programs: Option<Arc<ConfinedRoot>>,
    kernel_name: String,
    initrd_name: String,
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned()
}

impl BootRoutes {
    /// Creates the group. `programs` is the TFTP root, if it could be
    /// opened; `dhcp` the running DHCP service, if any (its leases).
    pub fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        dhcp: Option<DhcpService>,
        programs: Option<Arc<ConfinedRoot>>,
        live: LiveArgs,
    ) -> Self {
        Self {
            live,
            kernel_name: file_name(&cfg.boot.kernel),
            initrd_name: file_name(&cfg.boot.initrd),
            cfg,
            registry,
            dhcp,
            programs,
        }
    }

    /// Whether a script request for `mac` from `src` comes from the machine
    /// itself (see the module table); the error says why not.
    pub fn origin(&self, mac: MacAddr, src: IpAddr, query: Option<&str>) -> Result<Origin, String> {
        let src4 = match src {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        let d = &self.cfg.dhcp;
        if let (true, Some(dhcp)) = (d.enabled, &self.dhcp) {
            match d.mode {
                DhcpMode::Full => {
                    let lease = dhcp
                        .leases()
                        .get(mac)
                        .filter(|l| l.state == crate::dhcp::leases::LeaseState::Bound)
                        .map(|l| l.ip);
                    return match lease {
                        Some(ip) if Some(ip) == src4 => Ok(Origin::Lease),
                        Some(ip) => Err(format!("{mac} holds the lease {ip}, not {src}")),
                        None => Err(format!("this server leased no address to {mac}")),
                    };
                }
                DhcpMode::Proxy => {
                    if let Some(ip) = self
                        .registry
                        .announced(mac, self.cfg.boot.registration_window_s)
                    {
                        return if Some(ip) == src4 {
                            Ok(Origin::Announced)
                        } else {
                            Err(format!(
                                "{mac} announced {ip} on the proxyDHCP port, not {src}"
                            ))
                        };
                    }
                }
            }
        }
        let mut q_ip = None;
        let mut q_mac = None;
        for kv in query.unwrap_or("").split('&') {
            match kv.split_once('=') {
                Some(("ip", v)) => q_ip = v.parse::<IpAddr>().ok(),
                Some(("mac", v)) => {
                    q_mac = v
                        .replace("%3A", ":")
                        .replace("%3a", ":")
                        .parse::<MacAddr>()
                        .ok()
                }
                _ => {}
            }
        }
        match (q_ip, q_mac) {
            (Some(ip), Some(m)) if m == mac && (Some(ip) == src4.map(IpAddr::V4) || ip == src) => {
                Ok(Origin::Url)
            }
            (Some(ip), Some(m)) if m == mac => Err(format!(
                "the URL says {ip}, but the request came from {src}"
            )),
            (Some(_), Some(m)) => Err(format!("the URL names {m}, not {mac}")),
            _ => Err(format!(
                "no lease or proxyDHCP announcement of {mac}, and no ip=/mac= in the URL"
            )),
        }
    }

    /// The live kernel command line (without `initrd=`): `BOOTIF=`,
    /// `aula.server=`, `aula.core=`, `aula.server_fp=`, `aula.tls=off`,
    /// `aula.boot=<nonce>`, then the configured extra words.
    pub fn live_args(&self, mac: MacAddr, nonce: &str) -> Vec<String> {
        let b = &self.cfg.boot;
        let mut args = vec![
            format!("BOOTIF=01-{}", mac.dashed()),
            format!("aula.server={}", self.live.server_url),
        ];
        if let Some(core) = &b.core_url {
            args.push(format!("aula.core={core}"));
        }
        if let Some(fp) = &self.live.server_fp {
            args.push(format!("aula.server_fp={fp}"));
        }
        if self.live.tls_off {
            args.push("aula.tls=off".into());
        }
        args.push(format!("aula.boot={nonce}"));
        args.extend(b.cmdline.split_whitespace().map(str::to_owned));
        args
    }

    /// The GRUB configuration of the signed chain for `mode`.
    pub fn grub_cfg(
        &self,
        mac: MacAddr,
        mode: BootMode,
        nonce: &str,
        transport: crate::grub::Transport,
    ) -> String {
        crate::grub::machine(
            &self.cfg,
            mac,
            mode,
            &self.kernel_name,
            &self.initrd_name,
            &self.live_args(mac, nonce),
            transport,
        )
    }

    /// The iPXE script for `mode`; a live script puts `nonce` on the kernel
    /// line (`aula.boot=`).
    pub fn script(&self, mac: MacAddr, mode: BootMode, nonce: &str) -> String {
        let base = self.cfg.public_url();
        match mode {
            BootMode::Live => {
                // The EFI stub loads the initrd iPXE registered by this name.
                let args = format!(
                    "initrd={} {}",
                    self.initrd_name,
                    self.live_args(mac, nonce).join(" ")
                );
                format!(
                    "#!ipxe\n\
                     # Aula: live boot for {mac}\n\
                     echo Aula: live boot for {mac}\n\
                     :retry\n\
                     kernel {base}/boot/live/{kernel} {args} || goto failed\n\
                     initrd {base}/boot/live/{initrd} || goto failed\n\
                     boot || goto failed\n\
                     :failed\n\
                     echo Aula: live boot failed, retrying in 10 s\n\
                     sleep 10\n\
                     goto retry\n",
                    kernel = self.kernel_name,
                    initrd = self.initrd_name,
                )
            }
            BootMode::Local => {
                let uefi = match self.cfg.boot.uefi_local {
                    // A non-zero exit status: UEFI boot managers (EDK2's
                    // BDS among them) stop at a boot option that returns
                    // success and show their menu; an error makes them go
                    // on to the next option, the disk.
                    UefiLocal::Exit => "exit 1",
                    UefiLocal::Sanboot => "sanboot --no-describe --drive 0x80 || goto failed",
                };
                format!(
                    "#!ipxe\n\
                     # Aula: local boot for {mac}\n\
                     echo Aula: booting the local disk of {mac}\n\
                     iseq ${{platform}} efi && goto uefi ||\n\
                     sanboot --no-describe --drive 0x80 || goto failed\n\
                     :uefi\n\
                     {uefi}\n\
                     :failed\n\
                     echo Aula: local boot failed\n\
                     sleep 10\n\
                     exit\n"
                )
            }
        }
    }

    /// The boot configuration `kind` of `mac` for a request from `src`
    /// (with `query`, the URL's `ip=`/`mac=`): the iPXE script or the GRUB
    /// configuration of the machine's boot mode, from the same registry
    /// state. A request from the machine itself (see the module table)
    /// consumes a one-shot mode and opens a live boot session.
    pub async fn boot_config(
        &self,
        mac: MacAddr,
        src: IpAddr,
        query: Option<&str>,
        kind: ConfigKind,
    ) -> Result<String, crate::state::StateError> {
        let verified = match self.origin(mac, src, query) {
            Ok(origin) => {
                tracing::debug!(%mac, %src, ?origin, "script request from the machine itself");
                Some(match src {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(src),
                    v4 => v4,
                })
            }
            Err(why) => {
                tracing::warn!(%mac, %src, reason = %why, "script request not from the machine: serving its permanent mode, nothing consumed, no registration window");
                None
            }
        };
        // Without a durable record of the consumed one-shot mode the
        // machine could boot it again: the caller refuses rather than guess.
        let (mode, nonce) = self
            .registry
            .take_boot(mac, self.cfg.boot.default_mode, verified)
            .await
            .inspect_err(|e| tracing::error!(%mac, error = %e, "recording boot"))?;
        // A request that is not the machine's gets a nonce no session holds.
        let nonce = nonce
            .or_else(crate::state::random_nonce)
            .unwrap_or_else(|| "none".into());
        let session = verified.is_some() && mode == BootMode::Live;
        Ok(match kind {
            ConfigKind::Ipxe => {
                tracing::info!(%mac, %mode, session, url = %script_url(&self.cfg.public_url(), mac), "serving iPXE script");
                self.script(mac, mode, &nonce)
            }
            ConfigKind::Grub(transport) => {
                let at = match transport {
                    crate::grub::Transport::Http => grub_cfg_url(&self.cfg.public_url(), mac),
                    crate::grub::Transport::Tftp => {
                        format!("tftp:{}", crate::grub::mac_cfg_path(mac))
                    }
                };
                tracing::info!(%mac, %mode, session, url = %at, "serving GRUB configuration (signed chain)");
                self.grub_cfg(mac, mode, &nonce, transport)
            }
        })
    }

    async fn ipxe_script(
        &self,
        mac: &str,
        query: Option<&str>,
        ctx: RequestContext,
        kind: ConfigKind,
    ) -> HttpResponse {
        let Ok(mac) = mac.parse::<MacAddr>() else {
            return error_json(StatusCode::BAD_REQUEST, "not a MAC address");
        };
        match self.boot_config(mac, ctx.remote.ip(), query, kind).await {
            Ok(body) => response(StatusCode::OK, "text/plain; charset=utf-8", body),
            Err(_) => error_json(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot record boot state",
            ),
        }
    }

    async fn live_file(&self, req: &HttpRequest, name: &str) -> HttpResponse {
        let sb = &self.cfg.boot.secure_boot;
        let path = if name == self.kernel_name {
            self.cfg.boot.kernel.clone()
        } else if name == self.initrd_name {
            self.cfg.boot.initrd.clone()
        } else if sb.any() && (name == crate::grub::SHIM || name == crate::grub::GRUB) {
            // UEFI HTTP boot of the signed chain: shim, then the GRUB
            // beside it (shim loads it relative to its own URL).
            sb.dir.join(name)
        } else {
            return error_json(StatusCode::NOT_FOUND, "no such live file");
        };
        match tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
            Ok(Ok(f)) => {
                serve_file(req.method(), req.headers(), f, "application/octet-stream").await
            }
            Ok(Err(e)) => {
                tracing::warn!(file = %name, error = %e, "live file unavailable");
                error_json(StatusCode::NOT_FOUND, "live file not available")
            }
            Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        }
    }

    async fn program(&self, req: &HttpRequest, rel: &str) -> HttpResponse {
        let Some(root) = self.programs.clone() else {
            return error_json(StatusCode::NOT_FOUND, "no program directory");
        };
        let rel = rel.to_owned();
        match tokio::task::spawn_blocking(move || root.open_file(&rel)).await {
            Ok(Ok((f, _))) => serve_file(req.method(), req.headers(), f, "application/efi").await,
            Ok(Err(OpenError::NotFound | OpenError::NotFile)) => {
                error_json(StatusCode::NOT_FOUND, "not found")
            }
            Ok(Err(OpenError::BadName | OpenError::Escape | OpenError::NotAllowed(_))) => {
                error_json(StatusCode::FORBIDDEN, "path not allowed")
            }
            Ok(Err(e @ (OpenError::TooLarge | OpenError::Io(_)))) => {
                tracing::warn!(error = %e, "boot program");
                error_json(StatusCode::INTERNAL_SERVER_ERROR, "cannot read file")
            }
            Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        }
    }
}

impl RouteGroup for BootRoutes {
    fn name(&self) -> &'static str {
        "boot"
    }

    fn matches(&self, path: &str) -> bool {
        path.starts_with("/boot/")
    }

    fn plain_http(&self) -> bool {
        true
    }

    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return error_json(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only");
            }
            let path = req.uri().path().to_owned();
            if let Some(mac) = path.strip_prefix("/boot/ipxe/") {
                self.ipxe_script(mac, req.uri().query(), ctx, ConfigKind::Ipxe)
                    .await
            } else if let Some(mac) = path.strip_prefix("/boot/grub/") {
                let kind = ConfigKind::Grub(crate::grub::Transport::Http);
                self.ipxe_script(mac, req.uri().query(), ctx, kind).await
            } else if let Some(name) = path.strip_prefix("/boot/live/") {
                self.live_file(&req, name).await
            } else if let Some(rel) = path.strip_prefix("/boot/programs/") {
                self.program(&req, rel).await
            } else {
                error_json(StatusCode::NOT_FOUND, "no such route")
            }
        })
    }
}

/// How long a repeated TFTP request of the same machine's configuration,
/// from the same address, gets the same bytes (a retransmitted RRQ must
/// not consume a one-shot mode twice nor replace the boot session).
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The signed chain's per-request TFTP files (see [`crate::grub`]): the
/// per-MAC GRUB configuration, made by [`BootRoutes::boot_config`] like the
/// iPXE script, and the live kernel and initrd. Only Secure Boot machines
/// get a configuration; only those three kinds of names are served under
/// `grub/` and `live/`; anything else there is refused, logged by the TFTP
/// service with the reason.
pub struct SignedChainTftp {
    routes: Arc<BootRoutes>,
    recent: std::sync::Mutex<
        std::collections::HashMap<MacAddr, (IpAddr, std::time::Instant, bytes::Bytes)>,
    >,
}

impl SignedChainTftp {
    /// The provider for `routes` (the server's boot routes).
    pub fn new(routes: Arc<BootRoutes>) -> Self {
        Self {
            routes,
            recent: Default::default(),
        }
    }

    async fn machine_cfg(&self, mac: MacAddr, peer: IpAddr) -> Result<DynFile, OpenError> {
        let r = &self.routes;
        let sb = &r.cfg.boot.secure_boot;
        if !sb.wants(mac, r.registry.in_secure_boot_room(mac)) {
            return Err(OpenError::NotAllowed(
                "the machine does not get the signed chain ([boot.secure_boot])",
            ));
        }
        let now = std::time::Instant::now();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.retain(|_, (_, at, _)| now.duration_since(*at) < REPEAT_WINDOW);
            if let Some((ip, _, body)) = recent.get(&mac) {
                if *ip == peer {
                    tracing::debug!(%mac, %peer, "repeated TFTP request of the GRUB configuration: the same bytes again");
                    return Ok(DynFile::Bytes(body.clone()));
                }
            }
        }
        // GRUB asks from the address it got by DHCP: the request names the
        // machine by the path and shows its address as the source, as the
        // HTTP route's `?ip=…&mac=…` does.
        let query = format!("ip={peer}&mac={mac}");
        let body = r
            .boot_config(
                mac,
                peer,
                Some(&query),
                ConfigKind::Grub(crate::grub::Transport::Tftp),
            )
            .await
            .map_err(|_| OpenError::NotAllowed("cannot record boot state"))?;
        let body = bytes::Bytes::from(body);
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mac, (peer, now, body.clone()));
        Ok(DynFile::Bytes(body))
    }
}

impl Dynamic for SignedChainTftp {
    fn file<'a>(
        &'a self,
        name: &'a std::path::Path,
        peer: IpAddr,
    ) -> Option<DynFuture<'a, Result<DynFile, OpenError>>> {
        let r = &self.routes;
        if !r.cfg.boot.secure_boot.any() {
            return None;
        }
        let name = name.to_str()?;
        if let Some(rest) = name
            .strip_prefix(crate::grub::LIVE_DIR)
            .and_then(|n| n.strip_prefix('/'))
        {
            let path = if rest == r.kernel_name {
                Ok(DynFile::Path(r.cfg.boot.kernel.clone()))
            } else if rest == r.initrd_name {
                Ok(DynFile::Path(r.cfg.boot.initrd.clone()))
            } else {
                Err(OpenError::NotAllowed(
                    "only the live kernel and initrd are under live/",
                ))
            };
            return Some(Box::pin(async move { path }));
        }
        if name == crate::grub::STAGE1_PATH {
            return None; // a generated file
        }
        let rest = name.strip_prefix("grub/")?;
        if rest.starts_with("x86_64-efi/") {
            return Some(Box::pin(async {
                Err(OpenError::NotAllowed(
                    "GRUB's module files are not served (signed GRUB loads no module under Secure Boot)",
                ))
            }));
        }
        let mac = rest
            .strip_prefix("mac/")
            .and_then(|n| n.strip_suffix(".cfg"))
            .and_then(|m| m.parse::<MacAddr>().ok())
            .filter(|m| crate::grub::mac_cfg_path(*m) == name);
        Some(match mac {
            Some(mac) => Box::pin(self.machine_cfg(mac, peer)),
            None => Box::pin(async {
                Err(OpenError::NotAllowed(
                    "under grub/ only grub.cfg and mac/<mac, lower case with colons>.cfg",
                ))
            }),
        })
    }
}
