//! Power operations (`Apagar`, `Reiniciar`) and booting the installed OS
//! (`IniciarSesion`).
//!
//! A power job succeeds first; its `succeeded` webhook is flushed (bounded
//! wait, `power.flush_webhooks_s`), then the machine is powered off or
//! rebooted: `sync()` and `reboot(2)` (`syscall` mode), the configured
//! command (`command` mode), or only a log line (`dry-run`).
//!
//! Booting the installed OS asks the boot server to boot this machine from
//! disk once (`PUT {server}/v1/clients/{mac}/boot` with
//! `{"mode": "local", "once": true}` and the agent's own token), then
//! reboots. If the server refuses or cannot be reached the job fails and
//! nothing reboots.

use std::time::Duration;

use hyper::Method;
use serde_json::json;

use crate::config::PowerMode;
use crate::jobs::{Failure, Job, Outcome};
use crate::spec::{BootOsSpec, JobSpec};
use crate::Ctx;

/// A power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Power off.
    PowerOff,
    /// Reboot.
    Reboot,
}

impl Action {
    /// Name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::PowerOff => "poweroff",
            Action::Reboot => "reboot",
        }
    }
}

/// Called when a job succeeds: power jobs act now.
pub fn after_job(ctx: &std::sync::Arc<Ctx>, job: &Job) {
    let action = match job.spec {
        JobSpec::Poweroff(_) => Action::PowerOff,
        JobSpec::Reboot(_) | JobSpec::BootOs(_) => Action::Reboot,
        _ => return,
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let wait = Duration::from_secs(ctx.settings.power.flush_webhooks_s);
        if !ctx.webhooks.flush(wait).await {
            tracing::warn!("webhooks not all delivered before {}", action.as_str());
        }
        perform(&ctx, action).await;
    });
}

async fn perform(ctx: &Ctx, action: Action) {
    tracing::warn!(
        action = action.as_str(),
        mode = ctx.power_mode(),
        "power action"
    );
    ctx.record_power(action);
    match ctx.settings.power.mode {
        PowerMode::DryRun => {}
        PowerMode::Command => {
            let argv = match action {
                Action::PowerOff => &ctx.settings.power.poweroff_command,
                Action::Reboot => &ctx.settings.power.reboot_command,
            };
            let Some((prog, args)) = argv.split_first() else {
                return;
            };
            match tokio::process::Command::new(prog).args(args).status().await {
                Ok(s) if s.success() => {}
                Ok(s) => tracing::error!(%s, "power command failed"),
                Err(e) => tracing::error!(error = %e, "power command could not start"),
            }
        }
        PowerMode::Syscall => {
            let r = tokio::task::spawn_blocking(move || {
                nix::unistd::sync();
                let how = match action {
                    Action::PowerOff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
                    Action::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
                };
                nix::sys::reboot::reboot(how)
            })
            .await;
            tracing::error!(result = ?r, "reboot(2) returned");
        }
    }
}

/// `IniciarSesion`: boot mode `local` once on the server, then (after the
/// job's webhook) reboot.
pub async fn boot_os(ctx: &Ctx, b: &BootOsSpec) -> Outcome {
    let server = ctx.settings.server_url.clone().ok_or_else(|| {
        Failure::new(
            "invalid",
            "no boot server configured (aula.server=): cannot switch this machine to local boot",
        )
    })?;
    let mac = ctx.identity.mac.clone().ok_or_else(|| {
        Failure::new(
            "invalid",
            "this machine's MAC is unknown (set identity.mac or BOOTIF=)",
        )
    })?;
    let client = ctx
        .server_client
        .as_ref()
        .ok_or_else(|| Failure::new("tls", "no HTTPS client for the server"))?;
    let url = format!("{server}/v1/clients/{mac}/boot");
    let body = json!({"mode": "local", "once": true})
        .to_string()
        .into_bytes();
    let auth = format!("Bearer {}", ctx.token);
    let mut delay = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=5 {
        match client
            .call(
                Method::PUT,
                &url,
                &[("authorization", auth.clone())],
                body.clone(),
            )
            .await
        {
            Ok(r) if r.status.is_success() => {
                tracing::info!(%mac, "server will boot this machine from disk once");
                ctx.note_os_boot(b);
                return Ok(json!({
                    "action": "reboot",
                    "mode": ctx.power_mode(),
                    "boot": {"mode": "local", "once": true},
                    "disk": b.disk,
                    "partition": b.partition,
                    "server": serde_json::from_slice::<serde_json::Value>(&r.body).ok(),
                }));
            }
            Ok(r) if r.status.is_client_error() && r.status.as_u16() != 429 => {
                return Err(Failure::new(
                    "server_refused",
                    format!(
                        "the server refused to set local boot ({}): {}; not rebooting",
                        r.status,
                        String::from_utf8_lossy(&r.body).trim()
                    ),
                ));
            }
            Ok(r) => last = format!("{}", r.status),
            Err(e) => last = e.to_string(),
        }
        tracing::warn!(attempt, error = %last, "setting local boot failed; retrying");
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    Err(Failure::new(
        "server_unreachable",
        format!("could not set local boot on {server}: {last}; not rebooting"),
    ))
}
