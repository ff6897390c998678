//! The lab console and its API: rooms, machines, deployments, captures,
//! the command log, operator sign-in, and the web pages at `/` (assets
//! embedded in the binary). One [`RouteGroup`] in the boot server's router.
//!
//! Every `/v1/…` route here needs the API token (`Authorization: Bearer`,
//! for programs) or a signed-in operator's session cookie; writes with a
//! session also need the session's CSRF token in `X-CSRF-Token`. Operators
//! limited to some rooms see and act on those rooms only. Every write is
//! recorded in the command log with who gave it and its outcome. See
//! `bootserver/openapi.json` for the full list.

pub mod auth;
mod pages;
mod sse;

use std::collections::HashMap;
use std::sync::Arc;

use hyper::header::{HeaderValue, CONTENT_TYPE, SET_COOKIE, WWW_AUTHENTICATE};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Denied, Principal};
use crate::config::BootMode;
use crate::db::deployments::{self as ddb, Deployment};
use crate::db::rooms::{self, MachineFilter, MachineInput, MachinePatch};
use crate::db::{self, DbError};
use crate::deploy::fleet::Fleet;
use crate::deploy::machine::Phase;
use crate::deploy::{CaptureRequest, DeployError, DeployService, DeploymentRequest, RoomRef};
use crate::http::{
    error_json, json as json_response, BoxFuture, HttpRequest, HttpResponse, RequestContext,
    RouteGroup,
};
use crate::mac::MacAddr;
use auth::Users;

/// Largest JSON body.
const MAX_BODY: usize = 256 * 1024;
/// Largest import file.
const MAX_IMPORT: usize = 4 << 20;
/// The session cookie.
pub const COOKIE_NAME: &str = crate::auth::SESSION_COOKIE;
/// Machines one bulk action may name.
pub const MAX_BULK: usize = 10_000;
/// The OpenAPI document of the console API.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// A console request that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Not signed in.
    #[error("{0}")]
    Unauthorized(String),
    /// Signed in but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// Bad input.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown thing.
    #[error("{0}")]
    NotFound(String),
    /// Conflict.
    #[error("{0}")]
    Conflict(String),
    /// Wrong method.
    #[error("method not allowed")]
    Method,
    /// The body could not be used (too large, not JSON, …).
    #[error(transparent)]
    Body(#[from] aula_httpkit::body::BodyError),
    /// No room for another machine in the boot server's table.
    #[error("{0}")]
    Full(String),
    /// Internal failure.
    #[error("internal error")]
    Internal(String),
}

impl From<crate::state::StateError> for ConsoleError {
    fn from(e: crate::state::StateError) -> Self {
        match e {
            e @ crate::state::StateError::Full(_) => ConsoleError::Full(e.to_string()),
            other => ConsoleError::Internal(other.to_string()),
        }
    }
}

impl From<DbError> for ConsoleError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Invalid(s) => ConsoleError::BadRequest(s),
            DbError::Conflict(s) => ConsoleError::Conflict(s),
            DbError::NotFound(w) => ConsoleError::NotFound(format!("{w} not found")),
            other => ConsoleError::Internal(other.to_string()),
        }
    }
}

impl From<DeployError> for ConsoleError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::Invalid(s) => ConsoleError::BadRequest(s),
            DeployError::Forbidden(s) => ConsoleError::Forbidden(s),
            DeployError::NotFound(s) => ConsoleError::NotFound(s),
            DeployError::Db(d) => d.into(),
        }
    }
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            ConsoleError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Conflict(_) => StatusCode::CONFLICT,
            ConsoleError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ConsoleError::Body(b) => b.status(),
            ConsoleError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            ConsoleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn into_response(self) -> HttpResponse {
        if let ConsoleError::Internal(m) = &self {
            tracing::error!(error = %m, "console request failed");
        }
        let status = self.status();
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

type Result<T> = std::result::Result<T, ConsoleError>;

/// The console route group, served on the HTTPS listener (and on plain
/// HTTP only when TLS is off). Cookies are `Secure` on requests that came
/// over TLS.
pub struct ConsoleRoutes {
    svc: Arc<DeployService>,
    users: Arc<Users>,
    auth: Arc<crate::auth::Auth>,
    /// The HTTPS port, when there is one: sign-in over plain HTTP is then
    /// refused and pages redirect there.
    https_port: Option<u16>,
    cancel: CancellationToken,
    signins: Arc<tokio::sync::Semaphore>,
}

/// Password checks at once (argon2 is slow on purpose; a flood of sign-ins
/// must not take every blocking thread).
const SIGNINS_AT_ONCE: usize = 2;

/// Shared parts, built once and given to both listeners' groups.
#[derive(Clone)]
pub struct Console {
    /// The deployment service.
    pub svc: Arc<DeployService>,
    /// Operators.
    pub users: Arc<Users>,
    /// Who a bearer credential names (the API token for programs).
    pub auth: Arc<crate::auth::Auth>,
    /// Stops event streams at shutdown.
    pub cancel: CancellationToken,
}

fn signin_slots() -> Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(SIGNINS_AT_ONCE)))
        .clone()
}

impl Console {
    /// The route group; `https_port` is the HTTPS listener's, if any.
    pub fn routes(&self, https_port: Option<u16>) -> ConsoleRoutes {
        ConsoleRoutes {
            svc: self.svc.clone(),
            users: self.users.clone(),
            auth: self.auth.clone(),
            https_port,
            cancel: self.cancel.clone(),
            signins: signin_slots(),
        }
    }
}

fn query(req: &HttpRequest) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((k.to_owned(), pct_decode(v)?))
        })
        .collect()
}

fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// A whole body of at most `max` bytes (the shared bounded reader).
async fn body_bytes(req: HttpRequest, max: usize) -> Result<bytes::Bytes> {
    let (parts, body) = req.into_parts();
    Ok(aula_httpkit::body::read_limited(&parts.headers, body, max).await?)
}

/// A JSON body (`application/json` or no content type), at most
/// [`MAX_BODY`] bytes.
async fn body_json<T: serde::de::DeserializeOwned>(req: HttpRequest) -> Result<T> {
    Ok(aula_httpkit::body::read_json(req, MAX_BODY).await?)
}

fn parse_id(s: &str) -> Result<i64> {
    s.parse()
        .map_err(|_| ConsoleError::BadRequest(format!("{s:?} is not an id")))
}

fn ok(v: Value) -> Result<HttpResponse> {
    Ok(json_response(StatusCode::OK, &v))
}

/// A tile's state for the rooms view.
pub fn tile_state(
    m: &rooms::Machine,
    fleet: &Fleet,
    live: &HashMap<MacAddr, crate::deploy::LiveMachine>,
) -> (String, Option<u8>, Option<i64>) {
    if let Some(l) = live.get(&m.mac) {
        let pct = (l.bytes_total > 0)
            .then(|| ((l.bytes_done.min(l.bytes_total) * 100) / l.bytes_total) as u8);
        return (l.phase.as_str().to_owned(), pct, Some(l.deployment));
    }
    let c = fleet.clients.get(&m.mac);
    let agent = fleet.agents.get(&m.mac);
    let last = c.and_then(|c| c.last_boot);
    let boot_ms = last.map(|(_, at)| (at as i64).saturating_mul(1000));
    // What the last deployment left, when nothing booted since it ended (or
    // no boot was ever seen by this server: an agent started elsewhere).
    let outcome = m.last_deployment.as_ref().and_then(|(_, s, end)| {
        let since = match (boot_ms, end) {
            (None, _) => true,
            (Some(b), Some(e)) => *e >= b,
            (Some(_), None) => false,
        };
        (since && (s == "done" || s == "failed")).then_some(s.as_str())
    });
    // A registered agent is live while it answers: asked since it
    // registered and silent, it is offline.
    let silent = agent.is_some_and(|a| {
        fleet
            .presence
            .get(&m.mac)
            .is_some_and(|p| !p.answered && p.checked_at >= a.registered_at)
    });
    let state = match (outcome, last, agent) {
        (Some(o), _, _) => o,
        (None, Some((BootMode::Live, at)), Some(a)) if a.registered_at >= at => {
            if silent {
                "offline"
            } else {
                "live"
            }
        }
        (None, Some((BootMode::Live, _)), _) => "booting",
        (None, Some((BootMode::Local, _)), _) => "os",
        (None, None, Some(_)) if silent => "offline",
        (None, None, Some(_)) => "live",
        (None, None, None) => "unseen",
    };
    // A machine whose last deployment failed stays marked failed when it
    // boots its (old) OS.
    let state = match (&m.last_deployment, state) {
        (Some((_, s, _)), "os") if s == "failed" => "failed",
        _ => state,
    };
    (
        state.to_owned(),
        None,
        m.last_deployment.as_ref().map(|d| d.0),
    )
}

impl ConsoleRoutes {
    /// The caller (see `crate::auth`): a bearer token or an operator's
    /// session; writes need a caller that may operate.
    async fn caller(&self, req: &HttpRequest) -> Result<Caller> {
        let c = self
            .auth
            .caller(req.headers(), req.method())
            .await
            .map_err(|d| match d {
                Denied::Csrf => ConsoleError::Forbidden(d.to_string()),
                d => ConsoleError::Unauthorized(d.to_string()),
            })?;
        let p = &c.principal;
        if !p.can_view_console() {
            return Err(ConsoleError::Forbidden(format!(
                "{} may not use the console",
                p.name()
            )));
        }
        let write = req.method() != Method::GET && req.method() != Method::HEAD;
        if write && !p.can_operate() {
            return Err(ConsoleError::Forbidden(format!(
                "{} may only read",
                p.name()
            )));
        }
        Ok(c)
    }

    /// Room ids `p` may see and act on (`None` = every room).
    async fn scope(&self, p: &Principal) -> Result<Option<Vec<i64>>> {
        let Some(names) = p.room_limit().map(<[String]>::to_vec) else {
            return Ok(None);
        };
        Ok(Some(self.svc.store().room_ids(names).await?))
    }

    async fn log(&self, p: &Principal, action: &str, target: &str, r: &Result<HttpResponse>) {
        let outcome = match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("refused: {e}"),
        };
        self.svc
            .log(&p.log_name(), action, target, &outcome, None)
            .await;
    }

    fn session_cookie(&self, value: &str, max_age: i64, tls: bool) -> HeaderValue {
        let secure = if tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("aula_session=; Max-Age=0"))
    }

    async fn sign_in(&self, req: HttpRequest, tls: bool) -> Result<HttpResponse> {
        if !tls && self.https_port.is_some() {
            return Err(ConsoleError::Forbidden(
                "sign in over HTTPS: this server has a TLS listener".into(),
            ));
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SignIn {
            user: String,
            password: String,
        }
        let b: SignIn = body_json(req).await?;
        let user = self.users.get(&b.user);
        let (name, pw) = (b.user.clone(), b.password);
        // Verify even for unknown users, so timing does not tell which
        // names exist.
        let hash = user.as_ref().map(|u| u.password_hash.clone()).unwrap_or_else(|| {
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Ot1oZ6E8iDNPIcY1RVxjTZq7+XR8vEdsoxmEl9uCbVs".into()
        });
        let good = {
            let _slot = self
                .signins
                .acquire()
                .await
                .map_err(|_| ConsoleError::Internal("sign-in slots closed".into()))?;
            tokio::task::spawn_blocking(move || auth::verify_password(&pw, &hash))
                .await
                .unwrap_or(false)
        };
        let Some(user) = user.filter(|_| good) else {
            self.svc
                .log(
                    &name,
                    "session.create",
                    &format!("user {name}"),
                    "refused: wrong user or password",
                    None,
                )
                .await;
            return Err(ConsoleError::Unauthorized(
                "wrong user name or password".into(),
            ));
        };
        let secret = auth::random_secret(32)
            .ok_or_else(|| ConsoleError::Internal("no randomness".into()))?;
        let csrf = auth::random_secret(24)
            .ok_or_else(|| ConsoleError::Internal("no randomness".into()))?;
        let ttl = i64::from(self.svc.config().console.session_hours) * 3_600_000;
        let (s2, u2, c2) = (secret.clone(), user.name.clone(), csrf.clone());
        self.svc.store().create_session(s2, u2, c2, ttl).await?;
        self.svc
            .log(
                &user.name,
                "session.create",
                &format!("user {}", user.name),
                "ok",
                None,
            )
            .await;
        let mut r = json_response(
            StatusCode::OK,
            &json!({"user": user.name, "rooms": user.rooms, "csrf": csrf}),
        );
        r.headers_mut()
            .insert(SET_COOKIE, self.session_cookie(&secret, ttl / 1000, tls));
        Ok(r)
    }

    async fn route(&self, req: HttpRequest, tls: bool) -> Result<HttpResponse> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        let method = req.method().clone();
        // Pages and assets: open (they hold no data).
        match (&method, segs.as_slice()) {
            (&Method::GET | &Method::HEAD, [] | [""] | ["console", ..]) => {
                return Ok(pages::index());
            }
            (&Method::GET | &Method::HEAD, ["assets", name]) => return Ok(pages::asset(name)),
            (&Method::GET, ["v1", "openapi.json"]) => {
                return Ok(crate::http::response(
                    StatusCode::OK,
                    "application/json",
                    OPENAPI,
                ));
            }
            (&Method::POST, ["v1", "session"]) => return self.sign_in(req, tls).await,
            _ => {}
        }
        let caller = self.caller(&req).await?;
        let p = caller.principal.clone();
        match (method, segs.as_slice()) {
            (Method::GET, ["v1", "session"]) => {
                let (user, rooms, csrf) = (
                    p.log_name(),
                    p.room_limit().map(<[String]>::to_vec),
                    caller.csrf.clone().unwrap_or_default(),
                );
                ok(json!({"user": user, "rooms": rooms, "csrf": csrf}))
            }
            (Method::DELETE, ["v1", "session"]) => {
                if let Some(secret) =
                    crate::auth::cookie(req.headers(), COOKIE_NAME).map(str::to_owned)
                {
                    self.svc.store().delete_session(secret).await?;
                }
                self.svc
                    .log(
                        &p.log_name(),
                        "session.delete",
                        &format!("user {}", p.log_name()),
                        "ok",
                        None,
                    )
                    .await;
                let mut r = json_response(StatusCode::OK, &json!({"signed_out": true}));
                r.headers_mut()
                    .insert(SET_COOKIE, self.session_cookie("", 0, tls));
                Ok(r)
            }
            (Method::GET, ["v1", "sessions"]) => {
                // Operators limited to rooms see their own sessions; the
                // API token, the viewer token and operators with every
                // room see everybody's.
                let own = match &p {
                    Principal::Operator {
                        name,
                        rooms: Some(_),
                    } => Some(name.clone()),
                    _ => None,
                };
                let current =
                    crate::auth::cookie(req.headers(), COOKIE_NAME).map(db::sessions::hash_secret);
                let list = self.svc.store().list_sessions(own).await?;
                let list: Vec<Value> = list
                    .into_iter()
                    .map(|s| {
                        let mine = current.as_deref() == Some(s.id.as_str());
                        json!({"id": s.id, "user": s.user, "current": mine,
                               "created_at": db::rfc3339_ms(s.created_at),
                               "expires_at": db::rfc3339_ms(s.expires_at)})
                    })
                    .collect();
                ok(json!(list))
            }
            (Method::DELETE, ["v1", "sessions", id]) => {
                let id = (*id).to_owned();
                let target = format!("session {}", id.get(..12).unwrap_or(&id));
                let r = async {
                    let lookup = id.clone();
                    let s = self.svc.store().session(lookup).await?.ok_or_else(|| {
                        ConsoleError::NotFound("no such session (it ended or expired)".into())
                    })?;
                    if !p.has_every_room() && p.log_name() != s.user {
                        return Err(ConsoleError::Forbidden(format!(
                            "{} may end only their own sessions",
                            p.log_name()
                        )));
                    }
                    self.svc.store().revoke_session(id).await?;
                    ok(json!({"revoked": s.id, "user": s.user}))
                }
                .await;
                self.log(&p, "session.revoke", &target, &r).await;
                r
            }
            (Method::GET, ["v1", "rooms"]) => {
                let scope = self.scope(&p).await?;
                let list = self.svc.store().list_rooms(scope).await?;
                ok(json!(list))
            }
            (Method::POST, ["v1", "rooms"]) => {
                self.need_all_rooms(&p)?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct NewRoom {
                    name: String,
                    #[serde(default)]
                    description: String,
                    /// The boot server serving it (shared database).
                    #[serde(default)]
                    server: Option<String>,
                }
                let b: NewRoom = body_json(req).await?;
                let name = b.name.clone();
                let r = async {
                    let id = self
                        .svc
                        .store()
                        .create_room(b.name, b.description, b.server)
                        .await?;
                    Ok(json_response(StatusCode::CREATED, &id))
                }
                .await;
                self.log(&p, "room.create", &format!("room {name}"), &r)
                    .await;
                r
            }
            (m, ["v1", "rooms", id]) => {
                let id = parse_id(id)?;
                self.need_room(&p, Some(id)).await?;
                match m {
                    Method::GET => {
                        let (room, machines) = self.svc.store().room_with_machines(id).await?;
                        ok(json!({"room": room, "machines": self.tiles(&machines).await}))
                    }
                    Method::PATCH => {
                        #[derive(Deserialize)]
                        #[serde(deny_unknown_fields)]
                        struct Patch {
                            name: Option<String>,
                            description: Option<String>,
                            /// Hand the room to another boot server (shared database).
                            server: Option<String>,
                        }
                        let b: Patch = body_json(req).await?;
                        let r = async {
                            let room = self
                                .svc
                                .store()
                                .update_room(id, b.name, b.description, b.server)
                                .await?;
                            ok(json!(room))
                        }
                        .await;
                        self.log(&p, "room.update", &format!("room {id}"), &r).await;
                        r
                    }
                    Method::DELETE => {
                        self.need_all_rooms(&p)?;
                        let r = async {
                            self.svc.store().delete_room(id).await?;
                            ok(json!({"deleted": id}))
                        }
                        .await;
                        self.log(&p, "room.delete", &format!("room {id}"), &r).await;
                        r
                    }
                    _ => Err(ConsoleError::Method),
                }
            }
            (Method::GET, ["v1", "machines"]) => {
                let q = query(&req);
                let scope = self.scope(&p).await?;
                let f = MachineFilter {
                    room_id: q.get("room").and_then(|s| s.parse().ok()),
                    unassigned: q.get("unassigned").is_some_and(|v| v == "1" || v == "true"),
                    search: q.get("q").cloned(),
                    scope,
                };
                let offset = q.get("offset").and_then(|s| s.parse().ok()).unwrap_or(0);
                let limit = q.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
                let (total, list) = self.svc.store().list_machines(f, offset, limit).await?;
                let tiles = self.tiles(&list).await;
                ok(json!({"total": total, "offset": offset, "machines": tiles}))
            }
            (Method::POST, ["v1", "machines"]) => {
                let b: MachineInput = body_json(req).await?;
                self.need_room_input(&p, &b).await?;
                let mac = b.mac;
                let r = async {
                    let m = self.svc.store().create_machine(b).await?;
                    Ok(json_response(StatusCode::CREATED, &m))
                }
                .await;
                self.log(&p, "machine.create", &mac.to_string(), &r).await;
                r
            }
            (Method::POST, ["v1", "machines", "import"]) => {
                self.need_all_rooms(&p)?;
                let ct = req
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_ascii_lowercase();
                let q = query(&req);
                let is_toml = ct.contains("toml") || q.get("format").is_some_and(|f| f == "toml");
                let body = body_bytes(req, MAX_IMPORT).await?;
                let text = String::from_utf8(body.to_vec())
                    .map_err(|_| ConsoleError::BadRequest("the file is not UTF-8 text".into()))?;
                let r = async {
                    let rep = self.svc.store().import_text(text, is_toml).await?;
                    ok(json!(rep))
                }
                .await;
                self.log(
                    &p,
                    "machine.import",
                    if is_toml { "TOML file" } else { "CSV file" },
                    &r,
                )
                .await;
                r
            }
            (Method::GET, ["v1", "machines", "unadopted"]) => {
                let fleet = self.fleet().await;
                let known: std::collections::HashSet<MacAddr> =
                    self.svc.store().machine_macs().await?;
                let mut list: Vec<Value> = fleet
                    .clients
                    .iter()
                    .filter(|(m, _)| !known.contains(m))
                    .map(|(m, c)| {
                        json!({"mac": m, "ip": c.ip, "hostname": c.hostname,
                               "last_seen": c.last_seen.map(crate::state::rfc3339),
                               "agent": fleet.agents.contains_key(m)})
                    })
                    .collect();
                list.sort_by(|a, b| a["mac"].as_str().cmp(&b["mac"].as_str()));
                ok(json!(list))
            }
            (Method::POST, ["v1", "machines", "adopt"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Adopt {
                    macs: Vec<MacAddr>,
                    room_id: Option<i64>,
                    #[serde(default)]
                    name_prefix: Option<String>,
                }
                let b: Adopt = body_json(req).await?;
                self.need_room(&p, b.room_id).await?;
                let fleet = self.fleet().await;
                let target = format!("{} machine(s)", b.macs.len());
                let r = async {
                    let inputs: Vec<MachineInput> = b
                        .macs
                        .iter()
                        .enumerate()
                        .map(|(i, m)| {
                            let c = fleet.clients.get(m);
                            MachineInput {
                                mac: *m,
                                name: match &b.name_prefix {
                                    Some(pre) => Some(format!("{pre}{:02}", i + 1)),
                                    None => c.and_then(|c| c.hostname.clone()),
                                },
                                room_id: b.room_id,
                                expected_ip: c.and_then(|c| c.ip),
                                ..Default::default()
                            }
                        })
                        .collect();
                    let rep = self.svc.store().import(inputs).await?;
                    ok(json!(rep))
                }
                .await;
                self.log(&p, "machine.adopt", &target, &r).await;
                r
            }
            (Method::POST, ["v1", "machines", "boot"]) => {
                // Bulk: every named machine is looked up and checked
                // against the caller's rooms before any changes.
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct SetBootMany {
                    ids: Vec<i64>,
                    mode: Option<BootMode>,
                    #[serde(default)]
                    once: bool,
                }
                let b: SetBootMany = body_json(req).await?;
                let what = match b.mode {
                    Some(m) => format!("{m}{}", if b.once { " once" } else { "" }),
                    None => "default".into(),
                };
                let target = format!("{} machine(s)", b.ids.len());
                let r = async {
                    if b.ids.is_empty() || b.ids.len() > MAX_BULK {
                        return Err(ConsoleError::BadRequest(format!(
                            "ids: name 1 to {MAX_BULK} machines"
                        )));
                    }
                    let ids = b.ids.clone();
                    let machines = self.svc.store().machines(ids).await?;
                    for m in &machines {
                        self.need_room(&p, m.room_id).await?;
                    }
                    // Concurrent writes share the registry's group commits.
                    let reg = self.svc.registry();
                    let results =
                        futures_util::future::join_all(machines.iter().map(|m| async move {
                            match b.mode {
                                Some(mode) => reg.set_boot(m.mac, mode, b.once).await.map(|_| ()),
                                None => reg.clear_boot(m.mac).await,
                            }
                        }))
                        .await;
                    let mut failed = Vec::new();
                    for (m, r) in machines.iter().zip(results) {
                        if let Err(e) = r {
                            failed.push(json!({"id": m.id, "mac": m.mac, "error": e.to_string()}));
                        }
                    }
                    ok(json!({"set": machines.len() - failed.len(), "failed": failed}))
                }
                .await;
                self.log(&p, &format!("boot.set {what}"), &target, &r).await;
                r
            }
            (m, ["v1", "machines", id]) => {
                let id = parse_id(id)?;
                let cur = self.svc.store().machine(id).await?;
                self.need_room(&p, cur.room_id).await?;
                match m {
                    Method::GET => ok(json!(self.tiles(&[cur]).await)),
                    Method::PATCH => {
                        let b: MachinePatch = body_json(req).await?;
                        if let Some(r) = b.room_id {
                            self.need_room(&p, Some(r)).await?;
                        }
                        let r = async {
                            let m = self.svc.store().patch_machine(id, b).await?;
                            ok(json!(m))
                        }
                        .await;
                        self.log(&p, "machine.update", &cur.mac.to_string(), &r)
                            .await;
                        r
                    }
                    Method::DELETE => {
                        let r = async {
                            self.svc.store().delete_machine(id).await?;
                            ok(json!({"deleted": id}))
                        }
                        .await;
                        self.log(&p, "machine.delete", &cur.mac.to_string(), &r)
                            .await;
                        r
                    }
                    _ => Err(ConsoleError::Method),
                }
            }
            (Method::PUT, ["v1", "machines", id, "boot"]) => {
                let id = parse_id(id)?;
                let cur = self.svc.store().machine(id).await?;
                self.need_room(&p, cur.room_id).await?;
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct SetBoot {
                    mode: Option<BootMode>,
                    #[serde(default)]
                    once: bool,
                }
                let b: SetBoot = body_json(req).await?;
                let r = async {
                    let setting = match b.mode {
                        Some(mode) => {
                            let s = self.svc.registry().set_boot(cur.mac, mode, b.once).await?;
                            json!(s)
                        }
                        None => {
                            self.svc.registry().clear_boot(cur.mac).await?;
                            json!({})
                        }
                    };
                    ok(json!({"mac": cur.mac, "boot": setting}))
                }
                .await;
                let what = match b.mode {
                    Some(m) => format!("{m}{}", if b.once { " once" } else { "" }),
                    None => "default".into(),
                };
                self.log(
                    &p,
                    &format!("boot.set {what}"),
                    &format!("{} ({})", cur.name, cur.mac),
                    &r,
                )
                .await;
                r
            }
            (Method::GET, ["v1", "deployments"]) => {
                let q = query(&req);
                let scope = self.scope(&p).await?;
                let before = q.get("before").and_then(|s| s.parse().ok());
                let limit = q.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
                let list = self
                    .svc
                    .store()
                    .list_deployments(scope, before, limit)
                    .await?;
                ok(json!(list))
            }
            (Method::POST, ["v1", "deployments", "preview"]) => {
                let b: DeploymentRequest = body_json(req).await?;
                let targets = self.targets(&p, &b).await?;
                let (name, version, is_disk) = self.svc.check_image(&b.image, true).await?;
                let what = match b.partition.filter(|p| *p != 0) {
                    Some(n) => format!("partition {n} of disk {}", b.disk),
                    None => format!("the whole disk {}", b.disk),
                };
                let layout = b.layout.as_ref().filter(|l| !l.is_null()).is_some();
                ok(json!({
                    "image": name,
                    "version": version,
                    "disk_image": is_disk,
                    "overwrites": if layout {
                        format!("every partition of disk {} (the layout rewrites the partition table), then {what}", b.disk)
                    } else { what },
                    "machines": targets.machines.iter().map(|m| json!({
                        "id": m.id, "name": m.name, "mac": m.mac, "room": m.room,
                        "image": m.image, "image_version": m.image_version,
                    })).collect::<Vec<_>>(),
                }))
            }
            (Method::POST, ["v1", "deployments"]) => {
                let b: DeploymentRequest = body_json(req).await?;
                let target = match &b.room {
                    Some(RoomRef::Id(i)) => format!("room {i}"),
                    Some(RoomRef::Name(n)) => format!("room {n}"),
                    None => format!("{} machine(s)", b.machines.len()),
                };
                let r = async {
                    let targets = self.targets(&p, &b).await?;
                    let d = self.svc.create(&b, targets, &p.log_name(), None).await?;
                    Ok(json_response(StatusCode::CREATED, &deployment_json(&d)))
                }
                .await;
                self.log(&p, &format!("deploy {}", b.image), &target, &r)
                    .await;
                r
            }
            (Method::POST, ["v1", "captures"]) => {
                let b: CaptureRequest = body_json(req).await?;
                let r = async {
                    let t = self.svc.resolve(None, vec![b.machine.clone()]).await?;
                    let m = t
                        .machines
                        .into_iter()
                        .next()
                        .ok_or_else(|| ConsoleError::NotFound("machine not found".into()))?;
                    self.need_room(&p, m.room_id).await?;
                    let d = self.svc.capture(&b, m, &p.log_name()).await?;
                    Ok(json_response(StatusCode::CREATED, &deployment_json(&d)))
                }
                .await;
                self.log(&p, &format!("capture {}", b.image), &b.machine, &r)
                    .await;
                r
            }
            (m, ["v1", "deployments", id, rest @ ..]) => {
                let id = parse_id(id)?;
                let (dep, machines) = self.svc.get(id).await?;
                self.need_room_of(&p, &dep, &machines).await?;
                match (m, rest) {
                    (Method::GET, []) => {
                        let doc = match self.svc.tick_json(id) {
                            Some(d) => serde_json::from_str::<Value>(&d).unwrap_or(Value::Null),
                            None => Value::Null,
                        };
                        let mut v = deployment_json(&dep);
                        v["machines"] = json!(machines
                            .iter()
                            .map(|m| json!({
                                "mac": m.mac, "name": m.name, "machine_id": m.machine_id,
                                "state": m.run.phase, "reason": m.run.reason,
                                "bytes_done": m.run.bytes_done, "bytes_total": m.run.bytes_total,
                                "rate_bps": m.run.rate_bps, "since": db::rfc3339_ms(m.run.since),
                                "job": m.run.job.as_ref().map(|j| &j.id),
                                "finished_at": m.finished_at.map(db::rfc3339_ms),
                            }))
                            .collect::<Vec<_>>());
                        if !doc.is_null() {
                            v["live"] = doc;
                        }
                        ok(v)
                    }
                    (Method::GET, ["events"]) => Ok(sse::deployment_stream(
                        self.svc.clone(),
                        id,
                        self.cancel.clone(),
                    )),
                    (Method::POST, ["cancel"]) => {
                        let r = async {
                            let d = self.svc.cancel(id, None).await?;
                            ok(deployment_json(&d))
                        }
                        .await;
                        self.log(&p, "deployment.cancel", &format!("deployment {id}"), &r)
                            .await;
                        r
                    }
                    (Method::POST, ["machines", mac, "cancel"]) => {
                        let mac: MacAddr =
                            mac.parse().map_err(|e: crate::mac::ParseMacError| {
                                ConsoleError::BadRequest(e.to_string())
                            })?;
                        let r = async {
                            self.svc.cancel(id, Some(mac)).await?;
                            ok(json!({"deployment": id, "mac": mac, "cancelled": true}))
                        }
                        .await;
                        self.log(
                            &p,
                            "deployment.cancel",
                            &format!("deployment {id} machine {mac}"),
                            &r,
                        )
                        .await;
                        r
                    }
                    (Method::POST, ["retry"]) => {
                        let r = async {
                            let d = self.svc.retry(id, &p.log_name()).await?;
                            Ok(json_response(StatusCode::CREATED, &deployment_json(&d)))
                        }
                        .await;
                        self.log(&p, "deployment.retry", &format!("deployment {id}"), &r)
                            .await;
                        r
                    }
                    _ => Err(ConsoleError::Method),
                }
            }
            (Method::GET, ["v1", "console", "events"]) => {
                let q = query(&req);
                let scope = self.scope(&p).await?;
                let room = q.get("room").and_then(|s| s.parse::<i64>().ok());
                if let (Some(r), Some(s)) = (room, &scope) {
                    if !s.contains(&r) {
                        return Err(ConsoleError::Forbidden("that room is not yours".into()));
                    }
                }
                Ok(sse::overview_stream(self.clone_parts(), room, scope))
            }
            (Method::GET, ["v1", "console", "images"]) => self.images().await,
            (Method::GET, ["v1", "console", "boot"]) => {
                let scope = self.scope(&p).await?;
                let fleet = self.fleet().await;
                let (_, list) = self
                    .svc
                    .store()
                    .list_machines(
                        MachineFilter {
                            scope,
                            ..Default::default()
                        },
                        0,
                        1000,
                    )
                    .await?;
                let default = self.svc.config().boot.default_mode;
                let rows: Vec<Value> = list
                    .iter()
                    .map(|m| {
                        let c = fleet.clients.get(&m.mac).cloned().unwrap_or_default();
                        json!({
                            "id": m.id, "name": m.name, "mac": m.mac, "room": m.room,
                            "boot": c.boot,
                            "next": c.boot.once.or(c.boot.mode).unwrap_or(default),
                            "last_boot": c.last_boot.map(|(m, at)| json!({"mode": m, "at": crate::state::rfc3339(at)})),
                        })
                    })
                    .collect();
                ok(json!({"default_mode": default, "machines": rows}))
            }
            (Method::GET, ["v1", "log"]) => {
                let q = query(&req);
                let before = q.get("before").and_then(|s| s.parse().ok());
                let limit = q.get("limit").and_then(|s| s.parse().ok()).unwrap_or(100);
                // Operators limited to rooms see their own commands only.
                let who = match (p.room_limit(), q.get("who")) {
                    (Some(_), _) => Some(p.log_name()),
                    (None, Some(w)) if !w.is_empty() => Some(w.clone()),
                    _ => None,
                };
                let list = self.svc.store().log_list(who, before, limit).await?;
                ok(json!(list
                    .into_iter()
                    .map(|e| json!({"id": e.id, "at": db::rfc3339_ms(e.at), "who": e.who,
                        "action": e.action, "target": e.target, "outcome": e.outcome, "detail": e.detail}))
                    .collect::<Vec<_>>()))
            }
            _ => Err(ConsoleError::NotFound("no such route".into())),
        }
    }

    fn clone_parts(&self) -> sse::Parts {
        sse::Parts {
            svc: self.svc.clone(),
            cancel: self.cancel.clone(),
        }
    }

    async fn fleet(&self) -> Fleet {
        self.svc.fleet().await
    }

    async fn tiles(&self, machines: &[rooms::Machine]) -> Vec<Value> {
        let fleet = self.fleet().await;
        let live = self.svc.live_machines();
        machines
            .iter()
            .map(|m| machine_json(m, &fleet, &live))
            .collect()
    }

    fn need_all_rooms(&self, p: &Principal) -> Result<()> {
        if p.has_every_room() {
            Ok(())
        } else {
            Err(ConsoleError::Forbidden(format!(
                "{} is limited to some rooms: only an operator with every room may do this",
                p.log_name()
            )))
        }
    }

    async fn need_room(&self, p: &Principal, room: Option<i64>) -> Result<()> {
        let Some(scope) = self.scope(p).await? else {
            return Ok(());
        };
        match room {
            Some(r) if scope.contains(&r) => Ok(()),
            Some(r) => {
                let name = self
                    .svc
                    .store()
                    .room(r)
                    .await
                    .map(|r| r.name)
                    .unwrap_or_else(|_| format!("room {r}"));
                Err(ConsoleError::Forbidden(format!(
                    "{} may not act on {name}",
                    p.log_name()
                )))
            }
            None => Err(ConsoleError::Forbidden(format!(
                "{} may act only on machines in their rooms",
                p.log_name()
            ))),
        }
    }

    async fn need_room_input(&self, p: &Principal, m: &MachineInput) -> Result<()> {
        let room = match (&m.room_id, &m.room) {
            (Some(id), _) => Some(*id),
            (None, Some(name)) => {
                let n = name.clone();
                self.svc.store().room_id_by_name(n).await?
            }
            _ => None,
        };
        self.need_room(p, room).await
    }

    async fn need_room_of(
        &self,
        p: &Principal,
        dep: &Deployment,
        machines: &[ddb::DeploymentMachine],
    ) -> Result<()> {
        if self.scope(p).await?.is_none() {
            return Ok(());
        }
        if dep.room_id.is_some() {
            return self.need_room(p, dep.room_id).await;
        }
        // A deployment by machine list: every machine must be in scope.
        for m in machines {
            let Some(mid) = m.machine_id else {
                return self.need_room(p, None).await;
            };
            let room = self.svc.store().machine(mid).await?.room_id;
            self.need_room(p, room).await?;
        }
        Ok(())
    }

    async fn targets(
        &self,
        p: &Principal,
        b: &DeploymentRequest,
    ) -> Result<crate::deploy::Targets> {
        let t = self.svc.resolve(b.room.clone(), b.machines.clone()).await?;
        if let Some(scope) = self.scope(p).await? {
            for m in &t.machines {
                if !m.room_id.is_some_and(|r| scope.contains(&r)) {
                    return Err(ConsoleError::Forbidden(format!(
                        "{} may not deploy to {} ({}): it is in {}",
                        p.log_name(),
                        m.name,
                        m.mac,
                        m.room.as_deref().unwrap_or("no room")
                    )));
                }
            }
        }
        Ok(t)
    }

    async fn images(&self) -> Result<HttpResponse> {
        let usage = self.svc.store().machines_per_image().await?;
        let list = match self.svc.repository().cloned() {
            Some(repo) => tokio::task::spawn_blocking(move || {
                use aula_imager::repo::Repository;
                repo.repo().list()
            })
            .await
            .map_err(|_| ConsoleError::Internal("image listing thread".into()))?
            .map_err(|e| ConsoleError::Internal(e.to_string()))?,
            None => Vec::new(),
        };
        let mut by: HashMap<String, (i64, Vec<String>)> = usage
            .into_iter()
            .map(|(i, n, names)| (i, (n, names)))
            .collect();
        let out: Vec<Value> = list
            .into_iter()
            .map(|s| {
                let (n, names) = by.remove(&s.name).unwrap_or_default();
                json!({"name": s.name, "version": s.version, "versions": s.versions, "kind": s.kind,
                    "filesystem": s.filesystem, "source_size": s.source_size, "used_bytes": s.used_bytes,
                    "stored_bytes": s.stored_bytes, "created": s.created, "state": s.state,
                    "machines": n, "machine_names": names})
            })
            .collect();
        ok(json!(out))
    }
}

/// Whether the console group serves `path`.
pub fn claims(path: &str) -> bool {
    if path == "/"
        || path == "/console"
        || path.starts_with("/console/")
        || path.starts_with("/assets/")
    {
        return true;
    }
    let p = path.trim_end_matches('/');
    [
        "/v1/rooms",
        "/v1/machines",
        "/v1/deployments",
        "/v1/captures",
        "/v1/session",
        "/v1/sessions",
        "/v1/log",
        "/v1/console",
    ]
    .iter()
    .any(|pre| p == *pre || p.strip_prefix(pre).is_some_and(|r| r.starts_with('/')))
        || p == "/v1/openapi.json"
}

/// A deployment as the API shows it.
pub fn deployment_json(d: &Deployment) -> Value {
    let mut v = json!(d);
    v["created_at"] = json!(db::rfc3339_ms(d.created_at));
    v["started_at"] = json!(d.started_at.map(db::rfc3339_ms));
    v["finished_at"] = json!(d.finished_at.map(db::rfc3339_ms));
    v["start_at"] = json!(d.start_at.map(db::rfc3339_ms));
    v
}

/// A machine with its live state, as the API and the console show it.
pub fn machine_json(
    m: &rooms::Machine,
    fleet: &Fleet,
    live: &HashMap<MacAddr, crate::deploy::LiveMachine>,
) -> Value {
    let (state, pct, dep) = tile_state(m, fleet, live);
    let c = fleet.clients.get(&m.mac);
    json!({
        "id": m.id, "mac": m.mac, "name": m.name, "room_id": m.room_id, "room": m.room,
        "seat": m.seat, "expected_ip": m.expected_ip, "disk_layout": m.disk_layout,
        "image": m.image, "image_version": m.image_version,
        "imaged_at": m.imaged_at.map(db::rfc3339_ms),
        "ip": c.and_then(|c| c.ip),
        "last_seen": c.and_then(|c| c.last_seen).map(crate::state::rfc3339),
        "agent": fleet.agents.contains_key(&m.mac),
        "agent_answered_at": fleet.presence.get(&m.mac).and_then(|p| p.answered_at).map(crate::state::rfc3339),
        "state": state, "percent": pct, "deployment": dep,
    })
}

impl RouteGroup for ConsoleRoutes {
    fn name(&self) -> &'static str {
        "console"
    }

    fn matches(&self, path: &str) -> bool {
        claims(path)
    }

    fn redirect_plain_get(&self, path: &str) -> bool {
        path == "/" || path == "/console" || path.starts_with("/console/")
    }

    fn handle(&self, req: HttpRequest, ctx: RequestContext) -> BoxFuture<'_, HttpResponse> {
        Box::pin(async move {
            match self.route(req, ctx.secure).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            }
        })
    }
}

/// Every API route of this group, `(method, path template)`; the OpenAPI
/// document lists exactly these (a test checks both ways, and one asks a
/// running server each of them).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/session"),
    ("GET", "/v1/session"),
    ("DELETE", "/v1/session"),
    ("GET", "/v1/sessions"),
    ("DELETE", "/v1/sessions/{id}"),
    ("GET", "/v1/rooms"),
    ("POST", "/v1/rooms"),
    ("GET", "/v1/rooms/{id}"),
    ("PATCH", "/v1/rooms/{id}"),
    ("DELETE", "/v1/rooms/{id}"),
    ("GET", "/v1/machines"),
    ("POST", "/v1/machines"),
    ("POST", "/v1/machines/import"),
    ("GET", "/v1/machines/unadopted"),
    ("POST", "/v1/machines/adopt"),
    ("POST", "/v1/machines/boot"),
    ("GET", "/v1/machines/{id}"),
    ("PATCH", "/v1/machines/{id}"),
    ("DELETE", "/v1/machines/{id}"),
    ("PUT", "/v1/machines/{id}/boot"),
    ("GET", "/v1/deployments"),
    ("POST", "/v1/deployments"),
    ("POST", "/v1/deployments/preview"),
    ("GET", "/v1/deployments/{id}"),
    ("GET", "/v1/deployments/{id}/events"),
    ("POST", "/v1/deployments/{id}/cancel"),
    ("POST", "/v1/deployments/{id}/machines/{mac}/cancel"),
    ("POST", "/v1/deployments/{id}/retry"),
    ("POST", "/v1/captures"),
    ("GET", "/v1/console/events"),
    ("GET", "/v1/console/images"),
    ("GET", "/v1/console/boot"),
    ("GET", "/v1/log"),
];

/// The phases, for documents and the console.
pub fn phases() -> Vec<&'static str> {
    Phase::ALL.iter().map(|p| p.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut listed: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for m in ops.as_object().expect("ops").keys() {
                if m != "parameters" {
                    listed.push((m.to_uppercase(), path.clone()));
                }
            }
        }
        listed.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(listed, routes);
        for (_, p) in ROUTES {
            assert!(claims(p), "{p} is not claimed by the console group");
        }
        for p in [
            "/v1/clients",
            "/v1/agents",
            "/v1/images",
            "/boot/ipxe/x",
            "/v1/status",
            "/v1/roomsx",
        ] {
            assert!(!claims(p), "{p} belongs to another group");
        }
    }
}
