//! The HTTP API: routing, authentication, bodies, error → status mapping,
//! the event stream. The OpenAPI document (`agent/openapi.json`, served at
//! `GET /v1/openapi.json`) describes every route.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/status` | open: service, version, idle/busy, registration, webhooks |
//! | `GET /v1/inventory` | hardware inventory (synchronous) |
//! | `GET /v1/openapi.json` | this API's OpenAPI 3.1 document |
//! | `POST /v1/jobs` | accept a job: 202 + job; same `id` and spec again: 200 + job; same `id`, other spec: 409 |
//! | `GET /v1/jobs` | every stored job |
//! | `GET /v1/jobs/{id}` | one job |
//! | `DELETE /v1/jobs/{id}` | cancel: 200 (was queued, now cancelled), 202 (running, stopping), 409 (finished / not stoppable) |
//! | `GET /v1/jobs/{id}/events` | server-sent events: a snapshot, then every event until the job ends |
//! | `POST /CloningEngine/{op}` | OpenGnsys operations → `{"job_id": "<op>-<8 hex>"}` (200) |
//! | `GET /CloningEngine/status` | `{"status": "OPG"|"BSY", "session": "live"|"booting-os", …}` |
//!
//! Everything but `GET /v1/status` needs the agent's token, as
//! `Authorization: Bearer <token>` or, as OpenGnsys' core sends it,
//! `Authorization: <token>`; the check comes before routing, so without the
//! token every path answers 401 and nothing runs.
//!
//! Bodies: `/v1/jobs` takes JSON (`Content-Type` absent or
//! `application/json`); `/CloningEngine/*` also takes the content types
//! generic clients send by default (`curl -d`: form-urlencoded; text/plain)
//! and parses the body as JSON all the same: anything that is not JSON is
//! 400, other content types 415. Over 1 MiB: 413; a body the client failed
//! to send: 400.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aula_httpkit::body::{BodyError, JsonTypes};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;

use crate::jobs::{CancelError, Event, JobState, Locks, SubmitError};
use crate::spec::{BadRequest, JobSpec};
use crate::Ctx;

/// Response body.
pub type Body = aula_httpkit::Body;

/// Largest request body.
const MAX_BODY: usize = 1 << 20;

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route: (method, path template). The OpenAPI document must list
/// exactly these (a test checks).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/status"),
    ("GET", "/v1/inventory"),
    ("GET", "/v1/openapi.json"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/CloningEngine/status"),
    ("POST", "/CloningEngine/RestaurarImagen"),
    ("POST", "/CloningEngine/CrearImagen"),
    ("POST", "/CloningEngine/Configurar"),
    ("POST", "/CloningEngine/InventarioHardware"),
    ("POST", "/CloningEngine/InventarioSoftware"),
    ("POST", "/CloningEngine/EjecutarScript"),
    ("POST", "/CloningEngine/Apagar"),
    ("POST", "/CloningEngine/Reiniciar"),
    ("POST", "/CloningEngine/IniciarSesion"),
];

/// Every way a request can fail; each maps to one status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or wrong bearer token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// Malformed request.
    #[error("{0}")]
    BadRequest(BadRequest),
    /// Unknown resource.
    #[error("{0}")]
    NotFound(String),
    /// Known path, other method.
    #[error("method not allowed (allowed: {0})")]
    Method(&'static str),
    /// Conflicts with the state of a job.
    #[error("{0}")]
    Conflict(String),
    /// Body too large.
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The body came too slowly (the listener's body deadlines).
    #[error("{0}")]
    Timeout(String),
    /// A content type the route does not take.
    #[error("{0}")]
    MediaType(String),
    /// Too many jobs.
    #[error("{0}")]
    TooMany(String),
    /// Shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an environment failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<BadRequest> for ApiError {
    fn from(b: BadRequest) -> Self {
        ApiError::BadRequest(b)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Conflict(_) => ApiError::Conflict(e.to_string()),
            SubmitError::TooMany(_) => ApiError::TooMany(e.to_string()),
            SubmitError::ShuttingDown => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl ApiError {
    /// The status code (exhaustive).
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::MediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut body = json!({"error": self.to_string()});
        if let ApiError::BadRequest(b) = &self {
            body["error"] = json!(b.message);
            if let Some(f) = &b.field {
                body["field"] = json!(f);
            }
        }
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "internal error");
        }
        let mut r = json_response(status, &body);
        match &self {
            ApiError::Unauthorized => {
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"aula-agent\""),
                );
            }
            ApiError::Method(allow) => {
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        r
    }
}

use aula_httpkit::full;

fn json_response(status: StatusCode, v: &impl serde::Serialize) -> Response<Body> {
    aula_httpkit::json_response(status, v)
}

/// Entry point for every request.
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>, remote: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let req_id = crate::tls::random_hex(4);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", %req_id, %remote, %method, %path);
    async move {
        let resp = match route(&ctx, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        tracing::info!(
            response_code = resp.status().as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            "request completed"
        );
        resp
    }
    .instrument(span)
    .await
}

fn authorized(ctx: &Ctx, req: &Request<Incoming>) -> bool {
    aula_httpkit::auth::credential(req.headers())
        .is_some_and(|t| aula_imager::tls::secrets_equal(t.as_bytes(), ctx.token.as_bytes()))
}

async fn body_json(
    req: Request<Incoming>,
    types: JsonTypes,
    allow_empty: bool,
) -> Result<Value, ApiError> {
    aula_httpkit::body::read_json_value(req, MAX_BODY, types, allow_empty)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { .. } => ApiError::TooLarge,
            BodyError::Timeout(_) => ApiError::Timeout(e.to_string()),
            BodyError::MediaType(_) => ApiError::MediaType(e.to_string()),
            BodyError::Read(_) => {
                ApiError::BadRequest(BadRequest::body("could not read the request body"))
            }
            BodyError::Empty => ApiError::BadRequest(BadRequest::body(
                "the body is empty (a JSON object is expected)",
            )),
            BodyError::Json(m) => {
                ApiError::BadRequest(BadRequest::body(format!("invalid JSON: {m}")))
            }
        })
}

async fn route(ctx: &Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let method = req.method().clone();
    let open = method == Method::GET && segs.as_slice() == ["v1", "status"];
    if !open && !authorized(ctx, &req) {
        return Err(ApiError::Unauthorized);
    }
    match (method, segs.as_slice()) {
        (Method::GET, ["v1", "status"]) => Ok(json_response(StatusCode::OK, &ctx.status())),
        (Method::GET, ["v1", "inventory"]) => {
            let c = ctx.clone();
            let hw =
                tokio::task::spawn_blocking(move || crate::system::hardware(&c.settings.disks))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(json_response(StatusCode::OK, &hw))
        }
        (Method::GET, ["v1", "openapi.json"]) => {
            let mut r = Response::new(full(OPENAPI));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(r)
        }
        (Method::POST, ["v1", "jobs"]) => {
            let body = body_json(req, JsonTypes::Json, false).await?;
            create_job(ctx, body).await
        }
        (Method::GET, ["v1", "jobs"]) => {
            let list: Vec<_> = ctx.jobs.list().iter().map(|j| j.view()).collect();
            Ok(json_response(StatusCode::OK, &list))
        }
        (Method::GET, ["v1", "jobs", id]) => {
            let j = ctx
                .jobs
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
            Ok(json_response(StatusCode::OK, &j.view()))
        }
        (Method::DELETE, ["v1", "jobs", id]) => match ctx.jobs.cancel(ctx, id) {
            Ok(j) => {
                let v = j.view();
                let status = if v.state == JobState::Cancelled {
                    StatusCode::OK
                } else {
                    StatusCode::ACCEPTED
                };
                Ok(json_response(status, &v))
            }
            Err(e @ CancelError::NotFound) => Err(ApiError::NotFound(format!("{e}: {id}"))),
            Err(e @ (CancelError::Finished { .. } | CancelError::NotCancellable(..))) => {
                Err(ApiError::Conflict(e.to_string()))
            }
        },
        (Method::GET, ["v1", "jobs", id, "events"]) => events(ctx, id),
        (Method::GET, ["CloningEngine", "status"]) => {
            Ok(json_response(StatusCode::OK, &ctx.opengnsys_status()))
        }
        (Method::POST, ["CloningEngine", op]) if crate::opengnsys::OPS.contains(op) => {
            let op = op.to_string();
            let body = body_json(req, JsonTypes::Lenient, true).await?;
            opengnsys_job(ctx, &op, body).await
        }
        (_, ["v1", "status" | "inventory" | "openapi.json"]) | (_, ["CloningEngine", "status"]) => {
            Err(ApiError::Method("GET"))
        }
        (_, ["v1", "jobs"]) => Err(ApiError::Method("GET, POST")),
        (_, ["v1", "jobs", _]) => Err(ApiError::Method("GET, DELETE")),
        (_, ["v1", "jobs", _, "events"]) => Err(ApiError::Method("GET")),
        (_, ["CloningEngine", op]) if crate::opengnsys::OPS.contains(op) => {
            Err(ApiError::Method("POST"))
        }
        _ => Err(ApiError::NotFound(format!("no route {path}"))),
    }
}

/// Check disks and compute locks (blocking: resolves disks, plans layouts).
fn prepare(ctx: &Ctx, spec: &JobSpec) -> Result<Locks, BadRequest> {
    let disk = |n: u32, field: &str| {
        crate::disks::resolve(&ctx.settings.disks, n)
            .map_err(|e| BadRequest::field(field, e.to_string()))
    };
    let mut locks = Locks::default();
    match spec {
        JobSpec::Restore(r) => {
            locks.disks.push(disk(r.disk, "disk")?);
            if r.method == crate::spec::Method::UnicastCache {
                let c = crate::disks::resolve(&ctx.settings.disks, ctx.settings.cache.disk)
                    .map_err(|e| {
                        BadRequest::field(
                            "method",
                            format!("unicast-cache needs the CACHE disk: {e}"),
                        )
                    })?;
                if !locks.disks.contains(&c) {
                    locks.disks.push(c);
                }
            }
        }
        JobSpec::Create(c) => locks.disks.push(disk(c.disk, "disk")?),
        JobSpec::SoftwareInventory(p) => locks.disks.push(disk(p.disk, "disk")?),
        JobSpec::Layout(l) => {
            let path = disk(l.disk, "disk")?;
            // Refuse layouts that cannot fit before accepting the job.
            let dev = aula_imager::device::Device::open_read(&path).map_err(|e| {
                BadRequest::field("disk", format!("opening {}: {e}", path.display()))
            })?;
            aula_imager::disk::layout::plan(&l.layout, dev.size(), dev.sector_size())
                .map_err(|e| BadRequest::field("layout", crate::tls::error_chain(&e)))?;
            locks.disks.push(path);
        }
        JobSpec::BootOs(_) | JobSpec::Poweroff(_) | JobSpec::Reboot(_) => locks.barrier = true,
        JobSpec::HardwareInventory(_) | JobSpec::Script(_) => {}
    }
    Ok(locks)
}

async fn prepare_async(ctx: &Arc<Ctx>, spec: &JobSpec) -> Result<Locks, ApiError> {
    let c = ctx.clone();
    let s = spec.clone();
    tokio::task::spawn_blocking(move || prepare(&c, &s))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::BadRequest)
}

async fn create_job(ctx: &Arc<Ctx>, body: Value) -> Result<Response<Body>, ApiError> {
    let Value::Object(mut map) = body else {
        return Err(BadRequest::body("the body must be a JSON object").into());
    };
    let id = match map.remove("id") {
        Some(Value::String(s)) => {
            crate::spec::check_job_id(&s)?;
            Some(s)
        }
        Some(_) => return Err(BadRequest::field("id", "must be a string").into()),
        None => None,
    };
    let mut spec = JobSpec::parse(map)?;
    spec.normalise();
    spec.check()?;
    let locks = prepare_async(ctx, &spec).await?;
    let id = id.unwrap_or_else(|| format!("job-{}", crate::tls::random_hex(4)));
    let op = spec.op().to_string();
    let (job, created) = ctx.jobs.submit(ctx, id, op, spec, None, locks)?;
    let mut r = json_response(
        if created {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        },
        &job.view(),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        r.headers_mut().insert(LOCATION, v);
    }
    Ok(r)
}

async fn opengnsys_job(ctx: &Arc<Ctx>, op: &str, body: Value) -> Result<Response<Body>, ApiError> {
    let mut req = crate::opengnsys::parse(op, body, &ctx.settings)?;
    req.spec.normalise();
    let locks = prepare_async(ctx, &req.spec).await.map_err(|e| match e {
        ApiError::BadRequest(mut b) => {
            b.field = b.field.map(|f| match (f.as_str(), op) {
                ("disk", "Configurar") => f,
                ("layout", _) => "partition_setup".into(),
                ("disk", _) => "dsk".into(),
                _ => f,
            });
            ApiError::BadRequest(b)
        }
        other => other,
    })?;
    // Ids are random: retry the (unlikely) collision.
    for _ in 0..4 {
        let id = format!("{}-{}", req.op, crate::tls::random_hex(4));
        let (job, created) = ctx.jobs.submit(
            ctx,
            id,
            req.op.to_string(),
            req.spec.clone(),
            Some(req.echo.clone()),
            locks.clone(),
        )?;
        if created {
            return Ok(json_response(StatusCode::OK, &json!({"job_id": job.id})));
        }
    }
    Err(ApiError::Internal("could not allocate a job id".into()))
}

/// A response body fed by a channel (the event stream).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn sse(ev: &Event) -> Bytes {
    let data = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        ev.seq, ev.event, data
    ))
}

fn events(ctx: &Arc<Ctx>, id: &str) -> Result<Response<Body>, ApiError> {
    let job = ctx
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    // Subscribe before the snapshot so nothing falls between them.
    let mut rx = job.subscribe();
    let snap = job.snapshot_event(ctx);
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    let ctx2 = ctx.clone();
    tokio::spawn(
        async move {
            let mut last = snap.seq;
            let done = snap.state.is_terminal();
            if tx.send(Bytes::from_static(b"retry: 2000\n\n")).await.is_err()
                || tx.send(sse(&snap)).await.is_err()
                || done
            {
                return;
            }
            let mut keepalive = tokio::time::interval(Duration::from_secs(15));
            keepalive.tick().await;
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = keepalive.tick() => {
                        if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                            return;
                        }
                    }
                    r = rx.recv() => match r {
                        Ok(ev) => {
                            if ev.seq <= last {
                                continue;
                            }
                            last = ev.seq;
                            if tx.send(sse(&ev)).await.is_err() || ev.state.is_terminal() && ev.event == "state" {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::debug!(missed = n, "event-stream listener lagged");
                            let s = job.snapshot_event(&ctx2);
                            last = s.seq;
                            if tx.send(sse(&s)).await.is_err() || s.state.is_terminal() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        }
        .in_current_span(),
    );
    let mut r = Response::new(BodyExt::boxed(ChannelBody { rx: body_rx }));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(r)
}
