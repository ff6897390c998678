//! The management API (`/v1/...`), served over HTTPS (plain HTTP only when
//! `[http.tls] enabled = false`). Who may call what is [`crate::auth`]'s
//! table; here each route says which right it needs.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /v1/status` | anyone | version and which services run |
//! | `GET /v1/clients` | admin, viewer | every known machine |
//! | `GET /v1/clients/{mac}` | admin, viewer | one machine |
//! | `PUT /v1/clients/{mac}/boot` | admin, or the agent of that machine | `{"mode": "live"\|"local", "once": bool}` |
//! | `DELETE /v1/clients/{mac}/boot` | admin | back to the default mode |
//! | `PUT /v1/clients/{mac}/capture` | admin | `{"image": NAME, "minutes": n}`: the agent on that machine may upload chunks and publish image NAME (only) with its upload token for n minutes (default 60, at most 1440) |
//! | `DELETE /v1/clients/{mac}/capture` | admin | withdraw that grant |
//! | `GET /v1/leases` | admin, viewer | bound DHCP leases |
//! | `POST /v1/agents/register` | the machine's own live boot (window, nonce, address: see [`crate::state`]) | agent registration; answers the repository's read token |
//! | `GET /v1/agents` | admin (with tokens), viewer (without) | registered agents |
//! | `POST /v1/agents/events` | HMAC of the body with the agent's token | the default webhook sink (`aula.core` unset) |
//! | `GET /v1/agents/{mac}/events` | admin, viewer | the last events an agent posted (bounded: [`crate::events`]) |
//!
//! No credential, or one nobody issued: 401. A known credential without
//! the right: 403. A refused registration: 403, logged with the reason.
//! No room for another machine ([`crate::state`]'s bounds): 507.

use std::net::IpAddr;
use std::sync::Arc;

use aula_httpkit::body::BodyError;
use hyper::header::{HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, StatusCode};
use serde::Deserialize;

use super::{error_json, json, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup};
use crate::auth::{Auth, Principal};
use crate::config::{BootMode, Config, DhcpMode};
use crate::dhcp::DhcpService;
use crate::mac::MacAddr;
use crate::state::{unix_now, AgentRegistration, LeaseCheck, Registered, Registry, StateError};

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

/// What can go wrong in an API call; each maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credential, or one nobody issued.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A known caller without the right.
    #[error("{0}")]
    Forbidden(String),
    /// Malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown resource.
    #[error("not found")]
    NotFound,
    /// Method not allowed on this route.
    #[error("method not allowed")]
    Method,
    /// The body could not be used.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// Storage failed, or is full.
    #[error("{}", storage_message(.0))]
    Storage(#[from] StateError),
    /// An event larger than a machine's share of the event sink.
    #[error(transparent)]
    EventTooLarge(#[from] crate::events::TooLarge),
}

/// What a client is told about a storage error: the limit when full, else
/// nothing more (the log has the details).
fn storage_message(e: &StateError) -> String {
    match e {
        StateError::Full(_) => e.to_string(),
        StateError::Io(_) | StateError::Corrupt { .. } | StateError::Join(_) => {
            "storage error".into()
        }
    }
}

impl ApiError {
    fn into_response(self) -> HttpResponse {
        let status = match &self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Body(b) => b.status(),
            ApiError::EventTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Storage(e @ StateError::Full(_)) => {
                tracing::warn!(error = %e, "refused: machine table full");
                StatusCode::INSUFFICIENT_STORAGE
            }
            ApiError::Storage(
                e @ (StateError::Io(_) | StateError::Corrupt { .. } | StateError::Join(_)),
            ) => {
                tracing::error!(error = %e, "API storage error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut r = error_json(status, &self.to_string());
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"aula\""),
            );
        }
        r
    }
}

/// Body of `PUT /v1/clients/{mac}/boot`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetBoot {
    /// `live` or `local`.
    pub mode: BootMode,
    /// Next boot only (then back to the permanent mode).
    #[serde(default)]
    pub once: bool,
}

/// Body of `PUT /v1/clients/{mac}/capture`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetCapture {
    /// The one image name the agent may publish.
    pub image: String,
    /// How long the grant lasts (default 60, 1..=1440).
    #[serde(default)]
    pub minutes: Option<u64>,
}

/// The API route group.
pub struct ApiRoutes {
    cfg: Arc<Config>,
    registry: Arc<Registry>,
    dhcp: Option<DhcpService>,
    auth: Arc<Auth>,
    events: crate::events::EventSink,
}

impl ApiRoutes {
    /// Creates the group.
    pub fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        dhcp: Option<DhcpService>,
        auth: Arc<Auth>,
    ) -> Self {
        Self {
            registry,
            dhcp,
            events: crate::events::EventSink::new(
                cfg.limits.events_per_machine_kib << 10,
                cfg.limits.events_total_mib << 20,
            ),
            cfg,
            auth,
        }
    }

    /// The caller, or 401.
    fn caller(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        if let Some(p) = self.auth.principal(req.headers()) {
            return Ok(p);
        }
        if super::credential(req).is_none() {
            Err(ApiError::Unauthorized(
                "this route needs Authorization: Bearer <token>",
            ))
        } else if !self.auth.has_api_token() {
            Err(ApiError::Unauthorized(
                "unknown token (and no api_token is configured: admin calls are disabled)",
            ))
        } else {
            Err(ApiError::Unauthorized("missing or wrong bearer token"))
        }
    }

    fn require(
        &self,
        req: &HttpRequest,
        allowed: impl Fn(&Principal) -> bool,
        what: &str,
    ) -> Result<Principal, ApiError> {
        let p = self.caller(req)?;
        if allowed(&p) {
            Ok(p)
        } else {
            tracing::warn!(caller = %p.name(), path = %req.uri().path(), "refused: no right to {what}");
            Err(ApiError::Forbidden(format!("{} may not {what}", p.name())))
        }
    }

    /// Accept a webhook an agent signed with its registered token.
    async fn agent_event(&self, req: HttpRequest) -> Result<HttpResponse, ApiError> {
        let sig = req
            .headers()
            .get("x-aula-signature")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("sha256="))
            .map(str::to_owned)
            .ok_or(ApiError::Unauthorized("missing X-Aula-Signature"))?;
        let (parts, body) = req.into_parts();
        let bytes = aula_httpkit::body::read_limited(&parts.headers, body, MAX_BODY).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::BadRequest("an event is a JSON object".into()));
        }
        let mac = v["agent"]["mac"]
            .as_str()
            .ok_or_else(|| ApiError::BadRequest("agent.mac is required".into()))?;
        let mac = parse_mac(mac)?;
        let token = self
            .registry
            .agent_token(mac)
            .ok_or(ApiError::Unauthorized("no agent registered for that MAC"))?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
        let sig = decode_hex(&sig).ok_or(ApiError::Unauthorized("malformed signature"))?;
        ring::hmac::verify(&key, &bytes, &sig)
            .map_err(|_| ApiError::Unauthorized("bad signature"))?;
        self.events.push(mac, bytes)?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "accepted": true }),
        ))
    }

    async fn body_json<T: serde::de::DeserializeOwned>(req: HttpRequest) -> Result<T, ApiError> {
        aula_httpkit::body::read_json(req, MAX_BODY)
            .await
            .map_err(|e| match e {
                BodyError::Json(m) => ApiError::BadRequest(format!("invalid JSON: {m}")),
                other => ApiError::Body(other),
            })
    }

    fn lease_of(&self, mac: MacAddr) -> Option<std::net::Ipv4Addr> {
        let d = self.dhcp.as_ref()?;
        let db = d.leases();
        db.get(mac)
            .filter(|l| l.state == crate::dhcp::leases::LeaseState::Bound)
            .map(|l| l.ip)
    }

    async fn register(
        &self,
        req: HttpRequest,
        ctx: RequestContext,
    ) -> Result<HttpResponse, ApiError> {
        let reg: AgentRegistration = Self::body_json(req).await?;
        let nonce = reg.boot_nonce.clone();
        let source = match ctx.remote.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(ctx.remote.ip()),
            v4 => v4,
        };
        let rec = reg
            .into_record(unix_now(), Some(source))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mac = rec.macs[0];
        let macs = rec.macs.clone();
        let lease = LeaseCheck {
            full_dhcp: self.cfg.dhcp.enabled
                && self.cfg.dhcp.mode == DhcpMode::Full
                && self.dhcp.is_some(),
            lease: self.lease_of(mac),
        };
        let verdict = self
            .registry
            .register_agent(
                rec,
                nonce.as_deref(),
                source,
                self.cfg.boot.registration_window_s,
                lease,
            )
            .await?;
        match verdict {
            Ok(how) => {
                match how {
                    Registered::New => {
                        tracing::info!(%mac, macs = ?macs, remote = %ctx.remote, "agent registered")
                    }
                    Registered::Repeat => {
                        tracing::info!(%mac, remote = %ctx.remote, "agent registered again (same token, certificate and address)")
                    }
                }
                let mut body = serde_json::json!({
                    "registered": true,
                    "macs": macs,
                    "repeat": how == Registered::Repeat,
                });
                if self.cfg.repository.enabled {
                    body["repository"] = serde_json::json!({
                        "read_token": self.auth.repo_read_token(),
                    });
                }
                Ok(json(StatusCode::OK, &body))
            }
            Err(refusal) => {
                tracing::warn!(%mac, remote = %ctx.remote, reason = %refusal, "agent registration refused");
                Err(ApiError::Forbidden(refusal.to_string()))
            }
        }
    }

    async fn route(&self, req: HttpRequest, ctx: RequestContext) -> Result<HttpResponse, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        let method = req.method().clone();
        let read_lab = |p: &Principal| p.can_read_lab();
        match (method.clone(), segs.as_slice()) {
            (Method::GET, ["v1", "status"]) => Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "service": "aula-bootserver",
                    "version": env!("CARGO_PKG_VERSION"),
                    "dhcp": self.cfg.dhcp.enabled.then_some(self.cfg.dhcp.mode_name()),
                    "tftp": self.cfg.tftp.enabled,
                    "ra": self.cfg.ra.enabled,
                    "tls": self.cfg.http.tls.enabled,
                    "default_mode": self.cfg.boot.default_mode,
                }),
            )),
            (Method::GET, ["v1", "clients"]) => {
                self.require(&req, read_lab, "read the machine list")?;
                let list = self
                    .registry
                    .clients(self.cfg.boot.default_mode, |m| self.lease_of(m));
                Ok(json(StatusCode::OK, &list))
            }
            (Method::GET, ["v1", "clients", mac]) => {
                self.require(&req, read_lab, "read machines")?;
                let mac = parse_mac(mac)?;
                let list = self
                    .registry
                    .clients(self.cfg.boot.default_mode, |m| self.lease_of(m));
                let c = list
                    .into_iter()
                    .find(|c| c.mac == mac)
                    .ok_or(ApiError::NotFound)?;
                Ok(json(StatusCode::OK, &c))
            }
            (Method::PUT, ["v1", "clients", mac, "boot"]) => {
                let mac = parse_mac(mac)?;
                let who = self.require(
                    &req,
                    |p| p.can_set_boot(mac),
                    "set this machine's boot mode",
                )?;
                let body: SetBoot = Self::body_json(req).await?;
                let setting = self.registry.set_boot(mac, body.mode, body.once).await?;
                tracing::info!(%mac, mode = %body.mode, once = body.once, by = %who.name(), "boot mode set");
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "mac": mac,
                        "boot": setting,
                        "boot_mode": setting.once.or(setting.mode).unwrap_or(self.cfg.boot.default_mode),
                    }),
                ))
            }
            (Method::DELETE, ["v1", "clients", mac, "boot"]) => {
                self.require(&req, Principal::is_admin, "reset boot modes")?;
                let mac = parse_mac(mac)?;
                self.registry.clear_boot(mac).await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "mac": mac, "boot_mode": self.cfg.boot.default_mode }),
                ))
            }
            (Method::PUT, ["v1", "clients", mac, "capture"]) => {
                self.require(&req, Principal::is_admin, "grant capture rights")?;
                let mac = parse_mac(mac)?;
                let g: SetCapture = Self::body_json(req).await?;
                aula_imager::manifest::validate_name(&g.image)
                    .map_err(|e| ApiError::BadRequest(format!("image: {e}")))?;
                let minutes = g.minutes.unwrap_or(60);
                if !(1..=1440).contains(&minutes) {
                    return Err(ApiError::BadRequest("minutes must be 1..=1440".into()));
                }
                let until = unix_now() + minutes * 60;
                self.registry.grant_capture(mac, g.image.clone(), until);
                tracing::info!(%mac, image = %g.image, minutes, "capture granted");
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "mac": mac,
                        "image": g.image,
                        "capture_until": crate::state::rfc3339(until),
                    }),
                ))
            }
            (Method::DELETE, ["v1", "clients", mac, "capture"]) => {
                self.require(&req, Principal::is_admin, "withdraw capture rights")?;
                let mac = parse_mac(mac)?;
                self.registry.revoke_capture(mac);
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "mac": mac, "capture_until": null }),
                ))
            }
            (Method::GET, ["v1", "leases"]) => {
                self.require(&req, read_lab, "read the leases")?;
                let leases = self
                    .dhcp
                    .as_ref()
                    .map(|d| d.leases().bound())
                    .unwrap_or_default();
                Ok(json(StatusCode::OK, &leases))
            }
            (Method::POST, ["v1", "agents", "register"]) => self.register(req, ctx).await,
            (Method::POST, ["v1", "agents", "events"]) => self.agent_event(req).await,
            (Method::GET, ["v1", "agents", mac, "events"]) => {
                self.require(&req, read_lab, "read agents' events")?;
                let mac = parse_mac(mac)?;
                Ok(super::response(
                    StatusCode::OK,
                    "application/json",
                    self.events.list_json(mac),
                ))
            }
            (Method::GET, ["v1", "agents"]) => {
                let who = self.require(&req, read_lab, "read the agent list")?;
                Ok(json(
                    StatusCode::OK,
                    &self.registry.agents(who.sees_agent_tokens()),
                ))
            }
            (_, ["v1", "status" | "clients" | "leases" | "agents"])
            | (_, ["v1", "clients", _])
            | (_, ["v1", "clients", _, "boot" | "capture"])
            | (_, ["v1", "agents", "register" | "events"])
            | (_, ["v1", "agents", _, "events"]) => Err(ApiError::Method),
            _ => Err(ApiError::NotFound),
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn parse_mac(s: &str) -> Result<MacAddr, ApiError> {
    s.parse()
        .map_err(|e: crate::mac::ParseMacError| ApiError::BadRequest(e.to_string()))
}

impl RouteGroup for ApiRoutes {
    fn name(&self) -> &'static str {
        "api"
    }

    fn matches(&self, path: &str) -> bool {
        // Only this group's own prefixes: other groups (the image repository)
        // serve other /v1 routes in the same process.
        ["/v1/status", "/v1/clients", "/v1/leases", "/v1/agents"]
            .iter()
            .any(|p| {
                path == *p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
    }

    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            match self.route(req, ctx).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            }
        })
    }
}
