//! The image repository HTTP service.
//!
//! Storage is the imager's directory layout ([`LocalRepo`]), so a repository
//! directory can be served, copied or used locally by `aula-imager` alike.
//!
//! | method and path | auth | what |
//! |---|---|---|
//! | `GET /v1/images` | read | list: name, version, versions, kind, filesystem, sizes, state, created |
//! | `GET /v1/images/{name}[?version=N]` | read | the manifest |
//! | `PUT /v1/images/{name}` | write | publish a manifest (every chunk must be present; `409` lists the missing ones) |
//! | `DELETE /v1/images/{name}` | write | move the image to the trash |
//! | `GET`/`HEAD /v1/chunks/{id}` | read | a chunk's zstd frame, `Range` supported |
//! | `PUT /v1/chunks/{id}` | write | upload a chunk: decompressed and hashed on arrival, stored only if it matches its id |
//! | `POST /v1/chunks/missing` | read | `{"ids": [...]}` → `{"missing": [...]}` |
//! | `POST /v1/repo/gc` | write | delete chunks no image version references (older than the grace period), purge the trash |
//! | `POST /v1/repo/check[?image=NAME]` | write | verify every chunk of one image or all; marks images `corrupt` or `ready` |
//!
//! Image states: `uploading` (chunks arriving with `X-Aula-Image: NAME`, not
//! yet published), `ready`, `corrupt` (the last check found bad chunks).
//!
//! Writes need `Authorization: Bearer <write token>`; reads are open unless
//! a read token is configured. Names and chunk ids are validated before any
//! path is built from them (see `aula_imager::manifest::validate_name`).
//! Memory per connection is bounded: chunk downloads are streamed from the
//! file in 256 KiB pieces; uploads are bounded by the largest possible
//! chunk frame, and at most `max_uploads` are buffered at once.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aula_imager::chunk::{ChunkId, Decoder};
use aula_imager::manifest::{validate_name, Manifest};
use aula_imager::progress::Progress;
use aula_imager::repo::{ImageSummary, LocalRepo, Repository};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Semaphore;

use crate::http::{bearer, Body};

/// Largest chunk frame accepted (zstd bound of the largest chunk).
const MAX_FRAME: usize = (64 << 20) + (64 << 20) / 255 + 1024;
/// Largest manifest accepted.
const MAX_MANIFEST: usize = 256 << 20;
/// Largest `missing` query.
const MAX_QUERY: usize = 16 << 20;
/// Read size when streaming a chunk file.
const STREAM_BUF: usize = 256 << 10;

/// Repository service settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Repository directory (created when missing).
    pub root: PathBuf,
    /// Token that writes require. Without one, every write is refused.
    #[serde(default)]
    pub write_token: Option<String>,
    /// When set, reads require this token (or the write token).
    #[serde(default)]
    pub read_token: Option<String>,
    /// Chunks younger than this are never garbage-collected (uploads in
    /// progress have not published their manifest yet). Seconds.
    #[serde(default = "default_grace")]
    pub gc_grace_s: u64,
    /// Uploads buffered at once.
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
}

fn default_grace() -> u64 {
    3600
}
fn default_max_uploads() -> usize {
    16
}

impl RepoConfig {
    /// A configuration with defaults for `root`.
    pub fn new(root: PathBuf) -> RepoConfig {
        RepoConfig {
            root,
            write_token: None,
            read_token: None,
            gc_grace_s: default_grace(),
            max_uploads: default_max_uploads(),
        }
    }
}

/// Errors starting the service.
#[derive(Debug, thiserror::Error)]
pub enum RepoServiceError {
    /// The repository directory could not be opened.
    #[error("opening the repository: {0}")]
    Open(#[from] aula_imager::Error),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PersistedState {
    corrupt: HashSet<String>,
}

/// Decides whether a bearer token that is not the write token may write
/// (the boot server accepts granted agents' own tokens).
pub type WriteAuth = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The repository service.
pub struct RepoService {
    repo: Arc<LocalRepo>,
    extra_writer: Option<WriteAuth>,
    cfg: RepoConfig,
    /// Names with chunk uploads in progress, and when the last one came.
    uploads: Mutex<HashMap<String, Instant>>,
    state: Mutex<PersistedState>,
    upload_slots: Semaphore,
}

/// Result of a garbage collection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcReport {
    /// Chunk files referenced by some image version.
    pub referenced: u64,
    /// Chunk files removed.
    pub removed_chunks: u64,
    /// Bytes freed by removing chunks.
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub kept_recent: u64,
    /// Trash entries purged.
    pub trash_purged: u64,
}

/// Result of an integrity check of one image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Image name.
    pub name: String,
    /// Versions checked.
    pub versions: Vec<u32>,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Bad chunks (missing or corrupt) with the reason.
    pub bad: Vec<(ChunkId, String)>,
    /// Resulting state.
    pub state: String,
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let body: Bytes = body.into();
    let mut r = Response::new(Full::new(body).map_err(|e: Infallible| match e {}).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(b) => full(status, "application/json", b),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("serialising the answer: {e}"),
        ),
    }
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg }))
}

fn query_param<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Parse a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range against `len`.
/// `Ok(None)` means no usable Range header (serve everything); `Err` means
/// unsatisfiable.
fn parse_range(h: Option<&HeaderValue>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = h.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multiple ranges are not supported: serve the whole entity.
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len - 1)
        }
        (s, "") => (s.parse().map_err(|_| ())?, len.saturating_sub(1)),
        (s, e) => {
            let s: u64 = s.parse().map_err(|_| ())?;
            let e: u64 = e.parse().map_err(|_| ())?;
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if len == 0 || start >= len || end < start {
        return Err(());
    }
    Ok(Some((start, end)))
}

impl RepoService {
    /// Open (or create) the repository and load the service state.
    pub fn open(cfg: RepoConfig) -> Result<RepoService, RepoServiceError> {
        let repo = LocalRepo::open(&cfg.root, true)?;
        let state = std::fs::read(cfg.root.join("service-state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(RepoService {
            repo: Arc::new(repo),
            extra_writer: None,
            upload_slots: Semaphore::new(cfg.max_uploads.max(1)),
            cfg,
            uploads: Mutex::new(HashMap::new()),
            state: Mutex::new(state),
        })
    }

    /// Also accept writes with bearer tokens `auth` approves.
    pub fn with_write_auth(mut self, auth: WriteAuth) -> Self {
        self.extra_writer = Some(auth);
        self
    }

    /// The underlying repository.
    pub fn repo(&self) -> &Arc<LocalRepo> {
        &self.repo
    }

    /// True for the paths this service answers.
    pub fn owns(path: &str) -> bool {
        path == "/v1/images"
            || path.starts_with("/v1/images/")
            || path.starts_with("/v1/chunks/")
            || path.starts_with("/v1/repo/")
    }

    /// Whether the request carries the credentials reads need (the swarm
    /// coordinator follows the same policy).
    pub fn can_read(&self, req: &Request<Incoming>) -> bool {
        match &self.cfg.read_token {
            None => true,
            Some(t) => bearer(req).is_some_and(|b| {
                aula_imager::tls::secrets_equal(b.as_bytes(), t.as_bytes())
                    || self.cfg.write_token.as_deref().is_some_and(|w| {
                        aula_imager::tls::secrets_equal(b.as_bytes(), w.as_bytes())
                    })
            }),
        }
    }

    fn can_write(&self, req: &Request<Incoming>) -> bool {
        let Some(b) = bearer(req) else { return false };
        self.cfg
            .write_token
            .as_deref()
            .is_some_and(|t| aula_imager::tls::secrets_equal(b.as_bytes(), t.as_bytes()))
            || self.extra_writer.as_ref().is_some_and(|f| f(b))
    }

    fn save_state(&self) {
        let body = match self.state.lock() {
            Ok(s) => serde_json::to_vec(&*s).unwrap_or_default(),
            Err(_) => return,
        };
        let tmp = self.cfg.root.join("tmp").join("service-state.json.partial");
        let dest = self.cfg.root.join("service-state.json");
        let r = std::fs::write(&tmp, body)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &dest));
        if let Err(e) = r {
            tracing::warn!("could not save the repository state: {e}");
        }
    }

    /// Answer one request. Never fails: errors become JSON error responses.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if segs
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('%'))
        {
            return error(StatusCode::BAD_REQUEST, &format!("invalid path {path:?}"));
        }
        let is_write = matches!(method, Method::PUT | Method::DELETE)
            || (method == Method::POST && path.starts_with("/v1/repo/"));
        if is_write && !self.can_write(&req) {
            return error(
                StatusCode::UNAUTHORIZED,
                "this operation needs the repository's write token",
            );
        }
        if !is_write && !self.can_read(&req) {
            return error(
                StatusCode::UNAUTHORIZED,
                "this repository needs a token to read",
            );
        }
        match (method.clone(), segs.as_slice()) {
            (Method::GET, ["v1", "images"]) => self.list().await,
            (Method::GET | Method::HEAD, ["v1", "images", name]) => {
                self.get_manifest(name, &req).await
            }
            (Method::PUT, ["v1", "images", name]) => self.publish(name, req).await,
            (Method::DELETE, ["v1", "images", name]) => self.delete(name).await,
            (Method::POST, ["v1", "chunks", "missing"]) => self.missing(req).await,
            (Method::GET | Method::HEAD, ["v1", "chunks", id]) => self.get_chunk(id, &req).await,
            (Method::PUT, ["v1", "chunks", id]) => self.put_chunk(id, req).await,
            (Method::POST, ["v1", "repo", "gc"]) => self.gc(&req).await,
            (Method::POST, ["v1", "repo", "check"]) => self.check(&req).await,
            (_, ["v1", "images", ..] | ["v1", "chunks", ..] | ["v1", "repo", ..]) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} {path} is not supported"),
            ),
            _ => error(StatusCode::NOT_FOUND, &format!("no such resource: {path}")),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Response<Body>> {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("worker failed: {e}"),
            )
        })
    }

    async fn list(self: &Arc<Self>) -> Response<Body> {
        let repo = self.repo.clone();
        let mut images = match self.blocking(move || repo.list()).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => return r,
        };
        let corrupt = self
            .state
            .lock()
            .map(|s| s.corrupt.clone())
            .unwrap_or_default();
        for i in &mut images {
            if corrupt.contains(&i.name) {
                i.state = "corrupt".into();
            }
        }
        // Uploads in progress for names not yet published.
        let recent = Duration::from_secs(self.cfg.gc_grace_s.max(60));
        if let Ok(u) = self.uploads.lock() {
            for (name, at) in u.iter() {
                if at.elapsed() > recent {
                    continue;
                }
                match images.iter_mut().find(|i| &i.name == name) {
                    Some(i) if i.state == "ready" => i.state = "uploading".into(),
                    Some(_) => {}
                    None => images.push(ImageSummary {
                        name: name.clone(),
                        version: 0,
                        versions: vec![],
                        kind: aula_imager::manifest::ImageKind::Partition,
                        filesystem: None,
                        source_size: 0,
                        used_bytes: 0,
                        stored_bytes: 0,
                        created: String::new(),
                        state: "uploading".into(),
                    }),
                }
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        json(StatusCode::OK, &images)
    }

    async fn get_manifest(self: &Arc<Self>, name: &str, req: &Request<Incoming>) -> Response<Body> {
        if let Err(e) = validate_name(name) {
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        let version = match query_param(req, "version").map(str::parse::<u32>) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "version must be a number"),
        };
        let repo = self.repo.clone();
        let n = name.to_string();
        match self.blocking(move || repo.manifest(&n, version)).await {
            Ok(Ok(m)) => {
                let mut r = full(StatusCode::OK, "application/json", m.to_json());
                if req.method() == Method::HEAD {
                    *r.body_mut() = Full::new(Bytes::new())
                        .map_err(|e: Infallible| match e {})
                        .boxed();
                }
                r
            }
            Ok(Err(aula_imager::Error::ImageNotFound(what))) => {
                error(StatusCode::NOT_FOUND, &format!("image {what} not found"))
            }
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => r,
        }
    }

    async fn publish(self: &Arc<Self>, name: &str, req: Request<Incoming>) -> Response<Body> {
        if let Err(e) = validate_name(name) {
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        let body = match Limited::new(req.into_body(), MAX_MANIFEST).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("reading the manifest: {e}"),
                )
            }
        };
        let m = match Manifest::from_json(&body, "uploaded manifest") {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        if m.name != name {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "the manifest names image {:?} but was sent to {name:?}",
                    m.name
                ),
            );
        }
        let repo = self.repo.clone();
        let m2 = m.clone();
        let missing = match self
            .blocking(move || {
                let ids: Vec<ChunkId> = m2.unique_chunks().into_iter().map(|(id, _)| id).collect();
                repo.missing_chunks(&ids)
            })
            .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => return r,
        };
        if !missing.is_empty() {
            return json(
                StatusCode::CONFLICT,
                &serde_json::json!({
                    "error": format!("{} chunk(s) named by the manifest are not in the repository", missing.len()),
                    "missing": missing,
                }),
            );
        }
        let repo = self.repo.clone();
        match self.blocking(move || repo.publish(&m)).await {
            Ok(Ok(version)) => {
                if let Ok(mut u) = self.uploads.lock() {
                    u.remove(name);
                }
                tracing::info!(image = name, version, "published");
                json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "name": name, "version": version }),
                )
            }
            Ok(Err(e)) => error(StatusCode::CONFLICT, &e.to_string()),
            Err(r) => r,
        }
    }

    async fn delete(self: &Arc<Self>, name: &str) -> Response<Body> {
        if let Err(e) = validate_name(name) {
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        let repo = self.repo.clone();
        let n = name.to_string();
        match self.blocking(move || repo.delete(&n)).await {
            Ok(Ok(())) => {
                if let Ok(mut s) = self.state.lock() {
                    s.corrupt.remove(name);
                }
                self.save_state();
                json(StatusCode::OK, &serde_json::json!({ "deleted": name }))
            }
            Ok(Err(aula_imager::Error::ImageNotFound(_))) => {
                error(StatusCode::NOT_FOUND, &format!("image {name} not found"))
            }
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => r,
        }
    }

    async fn missing(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Q {
            ids: Vec<ChunkId>,
        }
        let body = match Limited::new(req.into_body(), MAX_QUERY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("reading the query: {e}"),
                )
            }
        };
        let q: Q = match serde_json::from_slice(&body) {
            Ok(q) => q,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("expected {{\"ids\": [chunk ids]}}: {e}"),
                )
            }
        };
        let repo = self.repo.clone();
        match self.blocking(move || repo.missing_chunks(&q.ids)).await {
            Ok(Ok(m)) => json(StatusCode::OK, &serde_json::json!({ "missing": m })),
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => r,
        }
    }

    async fn get_chunk(self: &Arc<Self>, id: &str, req: &Request<Incoming>) -> Response<Body> {
        let id: ChunkId = match id.parse() {
            Ok(id) => id,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let path = self.repo.chunk_path(&id);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return error(StatusCode::NOT_FOUND, &format!("chunk {id} not found"))
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("opening chunk {id}: {e}"),
                )
            }
        };
        let len = match file.metadata().await {
            Ok(m) => m.len(),
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reading chunk {id}: {e}"),
                )
            }
        };
        let (status, start, count) = match parse_range(req.headers().get(RANGE), len) {
            Ok(None) => (StatusCode::OK, 0, len),
            Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
            Err(()) => {
                let mut r = error(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(CONTENT_RANGE, v);
                }
                return r;
            }
        };
        let body: Body = if req.method() == Method::HEAD {
            Full::new(Bytes::new())
                .map_err(|e: Infallible| match e {})
                .boxed()
        } else {
            if start > 0 {
                if let Err(e) = file.seek(io::SeekFrom::Start(start)).await {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("seeking chunk {id}: {e}"),
                    );
                }
            }
            let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), STREAM_BUF);
            StreamBody::new(stream.map_ok(Frame::data)).boxed()
        };
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/zstd"));
        h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
            h.insert(CONTENT_LENGTH, v);
        }
        if status == StatusCode::PARTIAL_CONTENT {
            if let Ok(v) =
                HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
            {
                h.insert(CONTENT_RANGE, v);
            }
        }
        r
    }

    async fn put_chunk(self: &Arc<Self>, id: &str, req: Request<Incoming>) -> Response<Body> {
        let id: ChunkId = match id.parse() {
            Ok(id) => id,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        if let Some(name) = req
            .headers()
            .get("x-aula-image")
            .and_then(|v| v.to_str().ok())
        {
            if validate_name(name).is_ok() {
                if let Ok(mut u) = self.uploads.lock() {
                    u.insert(name.to_string(), Instant::now());
                }
            }
        }
        if self.repo.chunk_path(&id).exists() {
            // Content addressed: already present means already correct.
            // Drain nothing; the client may stop sending.
            return json(
                StatusCode::OK,
                &serde_json::json!({ "id": id, "stored": false }),
            );
        }
        let _slot = match self.upload_slots.acquire().await {
            Ok(s) => s,
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        };
        let body = match Limited::new(req.into_body(), MAX_FRAME).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("reading the chunk: {e}"),
                )
            }
        };
        let repo = self.repo.clone();
        let res = self
            .blocking(move || -> Result<(), aula_imager::Error> {
                // Verify on arrival: decompress (bounded) and hash.
                let mut dec = Decoder::new()?;
                let mut out = Vec::new();
                let len =
                    zstd_content_size(&body).ok_or_else(|| aula_imager::Error::ChunkCorrupt {
                        id,
                        why: "not a zstd frame with a content size of at most 64 MiB".into(),
                    })?;
                dec.decode_verified(&id, &body, len, &mut out)?;
                repo.put_chunk(&id, &body)
            })
            .await;
        match res {
            Ok(Ok(())) => json(
                StatusCode::CREATED,
                &serde_json::json!({ "id": id, "stored": true }),
            ),
            Ok(Err(e @ aula_imager::Error::ChunkCorrupt { .. })) => {
                error(StatusCode::BAD_REQUEST, &e.to_string())
            }
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => r,
        }
    }

    async fn gc(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let purge_trash = query_param(req, "purge_trash").is_some_and(|v| v == "1" || v == "true");
        let svc = self.clone();
        match self.blocking(move || svc.gc_blocking(purge_trash)).await {
            Ok(Ok(r)) => json(StatusCode::OK, &r),
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => r,
        }
    }

    /// Garbage-collect unreferenced chunks (blocking).
    pub fn gc_blocking(&self, purge_trash: bool) -> Result<GcReport, aula_imager::Error> {
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        for img in self.repo.list()? {
            for v in &img.versions {
                let m = self.repo.manifest(&img.name, Some(*v))?;
                referenced.extend(m.unique_chunks().into_iter().map(|(id, _)| id));
            }
        }
        let mut report = GcReport {
            referenced: referenced.len() as u64,
            ..Default::default()
        };
        let grace = Duration::from_secs(self.cfg.gc_grace_s);
        let now = SystemTime::now();
        let chunks_dir = self.repo.root().join("chunks");
        let io_err = |what: String| move |source| aula_imager::Error::Io { what, source };
        for sub in std::fs::read_dir(&chunks_dir)
            .map_err(io_err(format!("listing {}", chunks_dir.display())))?
        {
            let sub = sub.map_err(io_err("listing chunks".into()))?;
            if !sub.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())
                .map_err(io_err(format!("listing {}", sub.path().display())))?
            {
                let f = f.map_err(io_err("listing chunks".into()))?;
                let name = f.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".zst"))
                    .and_then(|h| h.parse::<ChunkId>().ok())
                else {
                    continue;
                };
                if referenced.contains(&id) {
                    continue;
                }
                let meta = f
                    .metadata()
                    .map_err(io_err(format!("reading {}", f.path().display())))?;
                let young = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_none_or(|age| age < grace);
                if young {
                    report.kept_recent += 1;
                    continue;
                }
                std::fs::remove_file(f.path())
                    .map_err(io_err(format!("removing {}", f.path().display())))?;
                report.removed_chunks += 1;
                report.freed_bytes += meta.len();
            }
        }
        if purge_trash {
            let trash = self.repo.root().join("trash");
            for e in
                std::fs::read_dir(&trash).map_err(io_err(format!("listing {}", trash.display())))?
            {
                let e = e.map_err(io_err("listing trash".into()))?;
                std::fs::remove_dir_all(e.path())
                    .map_err(io_err(format!("removing {}", e.path().display())))?;
                report.trash_purged += 1;
            }
        }
        tracing::info!(?report, "garbage collection");
        Ok(report)
    }

    async fn check(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let only = query_param(req, "image").map(str::to_string);
        if let Some(n) = &only {
            if let Err(e) = validate_name(n) {
                return error(StatusCode::BAD_REQUEST, &e.to_string());
            }
        }
        let svc = self.clone();
        match self
            .blocking(move || svc.check_blocking(only.as_deref()))
            .await
        {
            Ok(Ok(r)) => json(StatusCode::OK, &r),
            Ok(Err(aula_imager::Error::ImageNotFound(n))) => {
                error(StatusCode::NOT_FOUND, &format!("image {n} not found"))
            }
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(r) => r,
        }
    }

    /// Verify every chunk of one image (all versions) or of all images, and
    /// record each image's state (blocking).
    pub fn check_blocking(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<CheckReport>, aula_imager::Error> {
        let names: Vec<String> = match only {
            Some(n) => {
                if self.repo.versions(n)?.is_empty() {
                    return Err(aula_imager::Error::ImageNotFound(n.to_string()));
                }
                vec![n.to_string()]
            }
            None => self.repo.list()?.into_iter().map(|i| i.name).collect(),
        };
        let threads = aula_imager::pool::default_threads();
        let mut out = Vec::new();
        for name in names {
            let versions = self.repo.versions(&name)?;
            let mut rep = CheckReport {
                name: name.clone(),
                versions: versions.clone(),
                ..Default::default()
            };
            let mut seen = HashSet::new();
            for v in versions {
                let m = self.repo.manifest(&name, Some(v))?;
                let r = aula_imager::verify::verify_repo(
                    &m,
                    self.repo.as_ref(),
                    threads,
                    &Progress::new(),
                )?;
                rep.chunks_checked += r.chunks_checked;
                for b in r.bad {
                    if seen.insert(b.0) {
                        rep.bad.push(b);
                    }
                }
            }
            rep.state = if rep.bad.is_empty() {
                "ready"
            } else {
                "corrupt"
            }
            .into();
            if let Ok(mut s) = self.state.lock() {
                if rep.bad.is_empty() {
                    s.corrupt.remove(&name);
                } else {
                    s.corrupt.insert(name.clone());
                }
            }
            out.push(rep);
        }
        self.save_state();
        Ok(out)
    }
}

/// The decompressed size a zstd frame declares, if it is at most 64 MiB.
fn zstd_content_size(frame: &[u8]) -> Option<usize> {
    match zstd_frame_content_size(frame) {
        Some(n) if n <= aula_imager::manifest::MAX_CHUNK_SIZE => usize::try_from(n).ok(),
        _ => None,
    }
}

fn zstd_frame_content_size(frame: &[u8]) -> Option<u64> {
    // Frame header: magic, descriptor, [window], [dict id], [content size].
    if frame.len() < 6 || frame[0..4] != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let fhd = frame[4];
    let fcs_flag = fhd >> 6;
    let single = fhd & 0x20 != 0;
    let dict = match fhd & 3 {
        0 => 0,
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let mut pos = 5 + usize::from(!single) + dict;
    let size = match (fcs_flag, single) {
        (0, true) => 1,
        (0, false) => return None,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let b = frame.get(pos..pos + size)?;
    pos += size;
    let _ = pos;
    let mut v = 0u64;
    for (i, x) in b.iter().enumerate() {
        v |= u64::from(*x) << (8 * i);
    }
    if size == 2 {
        v += 256;
    }
    Some(v)
}

/// The repository as a route group of the server's HTTP listeners.
pub struct RepoRoutes(pub Arc<RepoService>);

impl crate::http::RouteGroup for RepoRoutes {
    fn name(&self) -> &'static str {
        "repository"
    }
    fn matches(&self, path: &str) -> bool {
        RepoService::owns(path)
    }
    fn handle(
        &self,
        req: crate::http::HttpRequest,
        _ctx: crate::http::RequestContext,
    ) -> crate::http::BoxFuture<'_, crate::http::HttpResponse> {
        Box::pin(async move { self.0.handle(req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_rfc_9110() {
        let h = |s: &str| HeaderValue::from_str(s).expect("header");
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(parse_range(Some(&h("bytes=0-9")), 100), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some(&h("bytes=90-")), 100), Ok(Some((90, 99))));
        assert_eq!(parse_range(Some(&h("bytes=-10")), 100), Ok(Some((90, 99))));
        assert_eq!(
            parse_range(Some(&h("bytes=50-500")), 100),
            Ok(Some((50, 99)))
        );
        assert_eq!(parse_range(Some(&h("bytes=100-")), 100), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=5-1")), 100), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=0-1,5-6")), 100), Ok(None));
        assert_eq!(parse_range(Some(&h("items=0-1")), 100), Ok(None));
    }

    #[test]
    fn zstd_frame_header_gives_the_content_size() {
        let data = vec![7u8; 300_000];
        let frame = zstd::bulk::compress(&data, 3).expect("compress");
        assert_eq!(zstd_content_size(&frame), Some(300_000));
        assert_eq!(zstd_content_size(b"not zstd at all"), None);
        let small = zstd::bulk::compress(b"x", 3).expect("compress");
        assert_eq!(zstd_content_size(&small), Some(1));
    }
}
