//! Registration with the boot server: `POST {server}/v1/agents/register`
//! over HTTPS verified against `aula.server_fp` (or the CA bundle), retried
//! with capped exponential backoff until it succeeds or the agent stops.

use std::sync::Mutex;
use std::time::Duration;

use hyper::Method;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Ctx;

/// Where registration stands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegStatus {
    /// The server, if one is configured.
    pub server: Option<String>,
    /// Accepted by the server.
    pub registered: bool,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// Shared registration state.
#[derive(Debug, Default)]
pub struct Registration(pub Mutex<RegStatus>);

impl Registration {
    /// A copy of the status.
    pub fn get(&self) -> RegStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
    fn update(&self, f: impl FnOnce(&mut RegStatus)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
}

/// The registration body.
pub fn body(ctx: &Ctx) -> serde_json::Value {
    let id = &ctx.identity;
    let mut v = json!({
        "macs": id.macs,
        "ips": id.ips,
        "firmware": id.firmware,
        "agent_version": env!("CARGO_PKG_VERSION"),
        "token": ctx.token,
        "cert_fingerprint": ctx.fingerprint,
        "port": ctx.port,
    });
    if let Some(m) = &id.mac {
        v["mac"] = json!(m);
    }
    if let Some(h) = &id.hostname {
        v["hostname"] = json!(h);
    }
    v
}

/// Register until accepted (or `stop`).
pub async fn run(ctx: std::sync::Arc<Ctx>, stop: CancellationToken) {
    let Some(server) = ctx.settings.server_url.clone() else {
        tracing::warn!("no boot server configured (aula.server= or server.url): not registering");
        return;
    };
    ctx.registration.update(|s| s.server = Some(server.clone()));
    let Some(client) = ctx.server_client.clone() else {
        tracing::error!("no HTTPS client for the server: not registering");
        return;
    };
    let url = format!("{server}/v1/agents/register");
    let payload = body(&ctx).to_string().into_bytes();
    let mut delay = Duration::from_millis(500);
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.call(Method::POST, &url, &[], payload.clone()) => r,
        };
        let err = match r {
            Ok(rep) if rep.status.is_success() => {
                tracing::info!(%server, mac = ?ctx.identity.mac, port = ctx.port, "registered with the boot server");
                ctx.registration.update(|s| {
                    s.registered = true;
                    s.attempts += 1;
                    s.last_error = None;
                    s.at = Some(crate::jobs::now());
                });
                return;
            }
            Ok(rep) => format!(
                "HTTP {}: {}",
                rep.status,
                String::from_utf8_lossy(&rep.body).trim()
            ),
            Err(e) => e.to_string(),
        };
        tracing::warn!(%server, error = %err, retry_in = ?delay, "registration failed");
        ctx.registration.update(|s| {
            s.attempts += 1;
            s.last_error = Some(err);
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(ctx.settings.register_max_backoff);
    }
}
