//! Registration with the boot server: `POST {server}/v1/agents/register`
//! over HTTPS verified against `aula.server_fp` (or the CA bundle), with
//! this boot's nonce (`aula.boot=`), retried with capped exponential
//! backoff until it succeeds, is refused (403: the server says why; this
//! boot cannot register), or the agent stops.
//!
//! The answer carries the repository's read token (when the repository
//! needs one), which the agent then sends with its reads from the server's
//! repository, and only there.

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
pub struct Registration(pub Mutex<RegStatus>, Mutex<Option<String>>);

impl Registration {
    /// A copy of the status.
    pub fn get(&self) -> RegStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
    /// The server repository's read token, as the registration answer gave it.
    pub fn read_token(&self) -> Option<String> {
        self.1.lock().ok().and_then(|t| t.clone())
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
    if let Some(n) = &ctx.settings.boot_nonce {
        v["boot_nonce"] = json!(n);
    }
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
                let answer: serde_json::Value =
                    serde_json::from_slice(&rep.body).unwrap_or_default();
                let read_token = answer["repository"]["read_token"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .map(str::to_string);
                if let Ok(mut t) = ctx.registration.1.lock() {
                    *t = read_token;
                }
                tracing::info!(%server, mac = ?ctx.identity.mac, port = ctx.port, "registered with the boot server");
                ctx.registration.update(|s| {
                    s.registered = true;
                    s.attempts += 1;
                    s.last_error = None;
                    s.at = Some(crate::jobs::now());
                });
                return;
            }
            Ok(rep) if rep.status == hyper::StatusCode::FORBIDDEN => {
                let why = serde_json::from_slice::<serde_json::Value>(&rep.body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&rep.body).trim().to_string());
                tracing::error!(%server, reason = %why, "the boot server refused this registration; not retrying in this boot");
                ctx.registration.update(|s| {
                    s.attempts += 1;
                    s.last_error = Some(format!("refused: {why}"));
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
