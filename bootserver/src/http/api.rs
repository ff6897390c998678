//! The management API (`/v1/...`).
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /v1/status` | open | version and which services run |
//! | `GET /v1/clients` | open | every known machine |
//! | `GET /v1/clients/{mac}` | open | one machine |
//! | `PUT /v1/clients/{mac}/boot` | token | `{"mode": "live"\|"local", "once": bool}` |
//! | `DELETE /v1/clients/{mac}/boot` | token | back to the default mode |
//! | `PUT /v1/clients/{mac}/capture` | token | `{"minutes": n}`: the agent on that machine may upload images to the repository with its own token for n minutes (default 60, at most 1440) |
//! | `DELETE /v1/clients/{mac}/capture` | token | withdraw that right |
//! | `GET /v1/leases` | open | bound DHCP leases |
//! | `POST /v1/agents/register` | open | agent registration |
//! | `GET /v1/agents` | open; tokens only with the API token | registered agents |
//! | `POST /v1/agents/events` | HMAC of the agent's token | the default webhook sink (`aula.core` unset) |
//! | `GET /v1/agents/{mac}/events` | open | the last events an agent posted |
//!
//! `PUT /v1/clients/{mac}/boot` also accepts the registered token of the
//! agent running on that machine (so `IniciarSesion` can ask for one local
//! boot of its own machine), never another machine's.
//!
//! Registration is open because an agent has no secret before it registers;
//! everything that changes how a machine boots needs `Authorization: Bearer`.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, StatusCode};
use serde::Deserialize;

use super::{
    bearer, error_json, json, BoxFuture, HttpRequest, HttpResponse, RequestContext, RouteGroup,
};
use crate::config::{BootMode, Config};
use crate::dhcp::DhcpService;
use crate::mac::MacAddr;
use crate::state::{unix_now, AgentRegistration, Registry, StateError};

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

/// What can go wrong in an API call; each maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a wrong bearer token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown resource.
    #[error("not found")]
    NotFound,
    /// Method not allowed on this route.
    #[error("method not allowed")]
    Method,
    /// Body too large.
    #[error("request body too large")]
    TooLarge,
    /// Body is not JSON.
    #[error("content type must be application/json")]
    MediaType,
    /// Storage failed.
    #[error("storage error")]
    Storage(#[from] StateError),
}

impl ApiError {
    fn into_response(self) -> HttpResponse {
        let status = match &self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Storage(e) => {
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

/// Events kept per agent.
const EVENTS_KEPT: usize = 200;

/// The API route group.
pub struct ApiRoutes {
    cfg: Arc<Config>,
    registry: Arc<Registry>,
    dhcp: Option<DhcpService>,
    token: Option<String>,
    events: std::sync::Mutex<
        std::collections::HashMap<MacAddr, std::collections::VecDeque<serde_json::Value>>,
    >,
}

impl ApiRoutes {
    /// Creates the group.
    pub fn new(
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        dhcp: Option<DhcpService>,
        token: Option<String>,
    ) -> Self {
        Self {
            cfg,
            registry,
            dhcp,
            token,
            events: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The API token, or the registered token of the agent on `mac`.
    fn require_auth_for(&self, req: &HttpRequest, mac: MacAddr) -> Result<(), ApiError> {
        if self.authorized(req) {
            return Ok(());
        }
        let own = self.registry.agent_token(mac);
        match (bearer(req), own) {
            (Some(b), Some(t)) if aula_imager::tls::secrets_equal(b.as_bytes(), t.as_bytes()) => {
                Ok(())
            }
            _ => self.require_auth(req),
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
        let bytes = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| ApiError::TooLarge)?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
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
        if let Ok(mut ev) = self.events.lock() {
            let q = ev.entry(mac).or_default();
            if q.len() >= EVENTS_KEPT {
                q.pop_front();
            }
            q.push_back(v);
        }
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "accepted": true }),
        ))
    }

    fn authorized(&self, req: &HttpRequest) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        bearer(req).is_some_and(|t| aula_imager::tls::secrets_equal(t.as_bytes(), token.as_bytes()))
    }

    fn require_auth(&self, req: &HttpRequest) -> Result<(), ApiError> {
        if self.token.is_none() {
            return Err(ApiError::Unauthorized(
                "API writes are disabled: no api_token configured",
            ));
        }
        if !self.authorized(req) {
            return Err(ApiError::Unauthorized("missing or wrong bearer token"));
        }
        Ok(())
    }

    async fn body_json<T: serde::de::DeserializeOwned>(req: HttpRequest) -> Result<T, ApiError> {
        let ct_ok = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/json"));
        if !ct_ok {
            return Err(ApiError::MediaType);
        }
        let bytes = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::TooLarge
                } else {
                    ApiError::BadRequest("could not read request body".into())
                }
            })?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
    }

    fn lease_ip(&self) -> impl Fn(MacAddr) -> Option<std::net::Ipv4Addr> + '_ {
        move |mac| {
            let d = self.dhcp.as_ref()?;
            let db = d.leases();
            db.get(mac)
                .filter(|l| l.state == crate::dhcp::leases::LeaseState::Bound)
                .map(|l| l.ip)
        }
    }

    async fn route(&self, req: HttpRequest, ctx: RequestContext) -> Result<HttpResponse, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        let method = req.method().clone();
        match (method.clone(), segs.as_slice()) {
            (Method::GET, ["v1", "status"]) => Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "service": "aula-bootserver",
                    "version": env!("CARGO_PKG_VERSION"),
                    "dhcp": self.cfg.dhcp.enabled.then_some(self.cfg.dhcp.mode_name()),
                    "tftp": self.cfg.tftp.enabled,
                    "ra": self.cfg.ra.enabled,
                    "default_mode": self.cfg.boot.default_mode,
                }),
            )),
            (Method::GET, ["v1", "clients"]) => {
                let list = self
                    .registry
                    .clients(self.cfg.boot.default_mode, self.lease_ip());
                Ok(json(StatusCode::OK, &list))
            }
            (Method::GET, ["v1", "clients", mac]) => {
                let mac = parse_mac(mac)?;
                let list = self
                    .registry
                    .clients(self.cfg.boot.default_mode, self.lease_ip());
                let c = list
                    .into_iter()
                    .find(|c| c.mac == mac)
                    .ok_or(ApiError::NotFound)?;
                Ok(json(StatusCode::OK, &c))
            }
            (Method::PUT, ["v1", "clients", mac, "boot"]) => {
                let mac = parse_mac(mac)?;
                self.require_auth_for(&req, mac)?;
                let body: SetBoot = Self::body_json(req).await?;
                let setting = self.registry.set_boot(mac, body.mode, body.once).await?;
                tracing::info!(%mac, mode = %body.mode, once = body.once, "boot mode set");
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
                self.require_auth(&req)?;
                let mac = parse_mac(mac)?;
                self.registry.clear_boot(mac).await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "mac": mac, "boot_mode": self.cfg.boot.default_mode }),
                ))
            }
            (Method::PUT, ["v1", "clients", mac, "capture"]) => {
                self.require_auth(&req)?;
                let mac = parse_mac(mac)?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Grant {
                    #[serde(default)]
                    minutes: Option<u64>,
                }
                let g: Grant = Self::body_json(req).await?;
                let minutes = g.minutes.unwrap_or(60);
                if !(1..=1440).contains(&minutes) {
                    return Err(ApiError::BadRequest("minutes must be 1..=1440".into()));
                }
                let until = unix_now() + minutes * 60;
                self.registry.grant_capture(mac, until);
                tracing::info!(%mac, minutes, "capture granted");
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "mac": mac, "capture_until": crate::state::rfc3339(until) }),
                ))
            }
            (Method::DELETE, ["v1", "clients", mac, "capture"]) => {
                self.require_auth(&req)?;
                let mac = parse_mac(mac)?;
                self.registry.revoke_capture(mac);
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "mac": mac, "capture_until": null }),
                ))
            }
            (Method::GET, ["v1", "leases"]) => {
                let leases = self
                    .dhcp
                    .as_ref()
                    .map(|d| d.leases().bound())
                    .unwrap_or_default();
                Ok(json(StatusCode::OK, &leases))
            }
            (Method::POST, ["v1", "agents", "register"]) => {
                let reg: AgentRegistration = Self::body_json(req).await?;
                let rec = reg
                    .into_record(unix_now(), Some(ctx.remote.ip()))
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                let macs = rec.macs.clone();
                self.registry.register_agent(rec).await?;
                tracing::info!(macs = ?macs, remote = %ctx.remote, "agent registered");
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "registered": true, "macs": macs }),
                ))
            }
            (Method::POST, ["v1", "agents", "events"]) => self.agent_event(req).await,
            (Method::GET, ["v1", "agents", mac, "events"]) => {
                let mac = parse_mac(mac)?;
                let list: Vec<serde_json::Value> = self
                    .events
                    .lock()
                    .map(|e| {
                        e.get(&mac)
                            .map(|q| q.iter().cloned().collect())
                            .unwrap_or_default()
                    })
                    .unwrap_or_default();
                Ok(json(StatusCode::OK, &list))
            }
            (Method::GET, ["v1", "agents"]) => {
                let with_tokens = self.authorized(&req);
                Ok(json(StatusCode::OK, &self.registry.agents(with_tokens)))
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
