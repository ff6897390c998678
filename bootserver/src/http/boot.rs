//! Boot routes: per-MAC iPXE scripts, the live kernel and initrd, and the
//! boot programs for UEFI HTTP boot.
//!
//! * `GET /boot/ipxe/{mac}` — the iPXE script for that machine's boot mode.
//!   Serving it consumes a one-shot mode.
//! * `GET|HEAD /boot/live/{kernel or initrd file name}` — with `Range`.
//! * `GET|HEAD /boot/programs/{path}` — files under the TFTP root.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};

use super::files::serve_file;
use super::{
    error_json, response, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use crate::config::{BootMode, Config, UefiLocal};
use crate::dhcp::pxe::script_url;
use crate::mac::MacAddr;
use crate::state::Registry;
use crate::tftp::{ConfinedRoot, OpenError};

/// What the live kernel line says about the server.
#[derive(Debug, Clone)]
pub struct LiveArgs {
    /// `aula.server=`.
    pub server_url: String,
    /// `aula.server_fp=`.
    pub server_fp: Option<String>,
}

/// The boot route group.
pub struct BootRoutes {
    live: LiveArgs,
    cfg: Arc<Config>,
    registry: Arc<Registry>,
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
    /// Creates the group. `programs` is the TFTP root, if it could be opened.
    pub fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        programs: Option<Arc<ConfinedRoot>>,
        live: LiveArgs,
    ) -> Self {
        Self {
            live,
            kernel_name: file_name(&cfg.boot.kernel),
            initrd_name: file_name(&cfg.boot.initrd),
            cfg,
            registry,
            programs,
        }
    }

    /// The iPXE script for `mode`.
    pub fn script(&self, mac: MacAddr, mode: BootMode) -> String {
        let base = self.cfg.public_url();
        match mode {
            BootMode::Live => {
                let b = &self.cfg.boot;
                let server = &self.live.server_url;
                let mut args = format!(
                    "initrd={initrd} BOOTIF=01-{dashed} aula.server={server}",
                    initrd = self.initrd_name,
                    dashed = mac.dashed(),
                );
                if let Some(core) = &b.core_url {
                    args.push_str(&format!(" aula.core={core}"));
                }
                if let Some(fp) = &self.live.server_fp {
                    args.push_str(&format!(" aula.server_fp={fp}"));
                }
                if !b.cmdline.trim().is_empty() {
                    args.push(' ');
                    args.push_str(b.cmdline.trim());
                }
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

    async fn ipxe_script(&self, mac: &str, ctx: RequestContext) -> HttpResponse {
        let Ok(mac) = mac.parse::<MacAddr>() else {
            return error_json(StatusCode::BAD_REQUEST, "not a MAC address");
        };
        let ip = match ctx.remote.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        let mode = match self
            .registry
            .take_boot(mac, self.cfg.boot.default_mode, ip)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                // Without a durable record of the consumed one-shot mode the
                // machine could boot it again: refuse rather than guess.
                tracing::error!(%mac, error = %e, "recording boot");
                return error_json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot record boot state",
                );
            }
        };
        tracing::info!(%mac, %mode, url = %script_url(&self.cfg.public_url(), mac), "serving iPXE script");
        response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            self.script(mac, mode),
        )
    }

    async fn live_file(&self, req: &HttpRequest, name: &str) -> HttpResponse {
        let path = if name == self.kernel_name {
            &self.cfg.boot.kernel
        } else if name == self.initrd_name {
            &self.cfg.boot.initrd
        } else {
            return error_json(StatusCode::NOT_FOUND, "no such live file");
        };
        let path = path.clone();
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
            Ok(Err(OpenError::BadName | OpenError::Escape)) => {
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

    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return error_json(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only");
            }
            let path = req.uri().path().to_owned();
            if let Some(mac) = path.strip_prefix("/boot/ipxe/") {
                self.ipxe_script(mac, ctx).await
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
