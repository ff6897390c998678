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
//! | `GET`/`HEAD /v1/chunks/{id}` | read | a chunk's zstd frame, `Range` supported; `Cache-Control: no-cache` drops an S3-backed server's cached copy and reads the bucket |
//! | `PUT /v1/chunks/{id}` | write | upload a chunk: decompressed and hashed on arrival, stored only if it matches its id |
//! | `POST /v1/chunks/missing` | read | `{"ids": [...]}` → `{"missing": [...]}` |
//! | `POST /v1/repo/gc` | write | delete chunks no image version references (older than the grace period), purge the trash |
//! | `POST /v1/repo/check[?image=NAME]` | write | verify every chunk of one image or all; marks images `corrupt` or `ready` |
//!
//! Image states: `uploading` (chunks arriving with `X-Aula-Image: NAME`, not
//! yet published), `ready`, `corrupt` (the last check found bad chunks).
//!
//! Who may do what is [`crate::auth`]'s table: writes need the write token,
//! or a capture grant's upload token, which uploads chunks and publishes the
//! one granted image name only (no other name, no delete, gc or check).
//! Reads are open unless a read token is configured. No credential or an
//! unknown one: 401; a known one without the right: 403. Names and chunk
//! ids are validated before any path is built from them (see
//! `aula_imager::manifest::validate_name`). A body over its limit is 413; a
//! body the client failed to send is 400.
//! Memory per connection is bounded: chunk downloads are streamed from the
//! file in 256 KiB pieces; uploads are bounded by the largest possible
//! chunk frame, and at most `max_uploads` are buffered at once; a
//! missing-chunk query names at most [`MAX_MISSING_IDS`] ids; at most two
//! manifests are parsed at once, off the async runtime.
//!
//! # Storage guarantees
//!
//! | what | guarantee |
//! |---|---|
//! | `PUT /v1/chunks/{id}` answers 201 | the chunk file is fsynced, renamed into place and its directory fsynced |
//! | garbage collection | exclusive against uploads, missing-checks, publishing and deletion (a lock they share), so a publish never links a manifest whose chunks gc is removing; while a capture is in progress it keeps every chunk younger than that capture, however long it runs |
//! | a chunk a missing-check, an upload, or a capture's `HEAD` (one with `X-Aula-Image`) finds present | its modification time is refreshed, so gc's grace period keeps it until the capture that reuses it publishes |
//! | a full filesystem | `507 Insufficient Storage` naming it; the failed write leaves no temporary file and publishes nothing |
//! | start | temporary files of writers that died are removed from `tmp/` |
//! | `GET /v1/images` | served from a listing rebuilt only when an image directory changed (publish, delete, or a local `aula-imager` writing into the same directory) |

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

use crate::repo_store::{zstd_content_size, FrameResult, Joined, Lead, S3Settings, S3Store, Store};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Semaphore;

use crate::auth::{Auth, Principal, Secrets};
use crate::http::Body;
use aula_httpkit::range::RangeSpec;

/// Largest chunk frame accepted (zstd bound of the largest chunk).
const MAX_FRAME: usize = (64 << 20) + (64 << 20) / 255 + 1024;
/// Largest manifest accepted.
const MAX_MANIFEST: usize = 256 << 20;
/// Most chunk ids one missing-chunk query may name (the imager sends 8192
/// at a time).
pub const MAX_MISSING_IDS: usize = 65_536;
/// Largest `missing` query: the ids as JSON strings, and some slack.
const MAX_QUERY: usize = MAX_MISSING_IDS * 70 + 1024;
/// Manifests parsed and validated at once.
const PUBLISH_SLOTS: usize = 2;
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
    /// Keep chunks and manifests in this S3 bucket instead of `root`
    /// (which then holds only the service's own state).
    #[serde(default)]
    pub s3: Option<S3Settings>,
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
            s3: None,
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

/// The repository service.
pub struct RepoService {
    repo: Store,
    auth: Arc<Auth>,
    cfg: RepoConfig,
    /// Captures in progress: image name, when it started and when its
    /// last request came.
    uploads: Mutex<HashMap<String, (Instant, Instant)>>,
    state: Mutex<PersistedState>,
    upload_slots: Semaphore,
    publish_slots: Semaphore,
    /// Shared by writers, exclusive for garbage collection.
    gc_lock: tokio::sync::RwLock<()>,
    /// The last listing and the image directories' state it was made from.
    listing: Mutex<Option<(ListingStamp, Arc<Vec<ImageSummary>>)>>,
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
    /// S3: nothing was removed because these images are being uploaded
    /// (by this or another boot server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred_for: Vec<String>,
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

/// What a request wants to do, for [`RepoService::authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action<'a> {
    /// Read manifests, chunks, lists, the missing-chunk query.
    Read,
    /// Upload a chunk, for the image named in `X-Aula-Image` if any.
    UploadChunk(Option<&'a str>),
    /// Publish a version of this image.
    Publish(&'a str),
    /// Delete, gc, check.
    Maintain,
}

impl RepoService {
    /// Open (or create) the repository and load the service state.
    pub fn open(cfg: RepoConfig) -> Result<RepoService, RepoServiceError> {
        let repo = match &cfg.s3 {
            Some(s3) => {
                std::fs::create_dir_all(&cfg.root).map_err(|e| aula_imager::Error::Io {
                    what: format!("creating {}", cfg.root.display()),
                    source: e,
                })?;
                Store::open_s3(s3)?
            }
            None => {
                let repo = LocalRepo::open(&cfg.root, true)?;
                let swept = repo.sweep_tmp()?;
                if swept > 0 {
                    tracing::info!(
                        files = swept,
                        "removed temporary files of writers that died"
                    );
                }
                Store::Dir(Arc::new(repo))
            }
        };
        sweep_state_temps(&cfg.root);
        let state = std::fs::read(cfg.root.join("service-state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let auth = Arc::new(Auth::new(
            Secrets {
                repo_write: cfg.write_token.clone(),
                repo_read: cfg.read_token.clone(),
                ..Default::default()
            },
            None,
        ));
        Ok(RepoService {
            repo,
            auth,
            upload_slots: Semaphore::new(cfg.max_uploads.max(1)),
            publish_slots: Semaphore::new(PUBLISH_SLOTS),
            gc_lock: tokio::sync::RwLock::new(()),
            listing: Mutex::new(None),
            cfg,
            uploads: Mutex::new(HashMap::new()),
            state: Mutex::new(state),
        })
    }

    /// Decide who may read and write with `auth` (the server's one
    /// [`Auth`]: its capture grants' upload tokens, the repository tokens)
    /// instead of the repository tokens alone.
    pub fn with_auth(mut self, auth: Arc<Auth>) -> Self {
        self.auth = auth;
        self
    }

    /// The underlying repository.
    pub fn repo(&self) -> &Store {
        &self.repo
    }

    /// True for the paths this service answers.
    pub fn owns(path: &str) -> bool {
        path == "/v1/images"
            || path.starts_with("/v1/images/")
            || path.starts_with("/v1/chunks/")
            || path.starts_with("/v1/repo/")
    }

    /// The caller's right to `action`: the refusal's status and reason.
    fn authorize(
        &self,
        req: &Request<Incoming>,
        action: Action<'_>,
    ) -> Result<(), (StatusCode, String)> {
        if action == Action::Read && !self.auth.repo_reads_need_token() {
            return Ok(());
        }
        let Some(p) = self.auth.principal(req.headers()) else {
            let msg = match action {
                Action::Read => "this repository needs a token to read",
                _ => "this operation needs the repository's write token or a capture grant",
            };
            return Err((StatusCode::UNAUTHORIZED, msg.into()));
        };
        let ok = match action {
            Action::Read => p.can_read_repo(),
            Action::UploadChunk(image) => p.can_upload_chunks(image),
            Action::Publish(name) => p.can_publish(name),
            Action::Maintain => p.can_maintain_repo(),
        };
        if ok {
            return Ok(());
        }
        let why = match (&p, action) {
            (Principal::Upload { image, .. }, Action::Publish(name)) => format!(
                "the capture grant allows publishing image {image:?} only, not {name:?}"
            ),
            (Principal::Upload { image, .. }, Action::UploadChunk(Some(name))) => format!(
                "the capture grant is for image {image:?}, not {name:?}"
            ),
            (Principal::Upload { .. }, _) => {
                "a capture grant uploads and publishes its image; it cannot delete, collect garbage or check".into()
            }
            _ => format!("{} may not do this", p.name()),
        };
        tracing::warn!(caller = %p.name(), path = %req.uri().path(), reason = %why, "repository request refused");
        Err((StatusCode::FORBIDDEN, why))
    }

    fn save_state(&self) {
        let body = match self.state.lock() {
            Ok(s) => serde_json::to_vec(&*s).unwrap_or_default(),
            Err(_) => return,
        };
        let dest = self.cfg.root.join("service-state.json");
        if let Err(e) = crate::persist::atomic_write(&dest, &body) {
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
        let image_header = req
            .headers()
            .get("x-aula-image")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let action = match (&method, segs.as_slice()) {
            (&Method::PUT, ["v1", "chunks", _]) => Action::UploadChunk(image_header.as_deref()),
            (&Method::PUT, ["v1", "images", name]) => Action::Publish(name),
            (&Method::DELETE, _) | (&Method::PUT, _) => Action::Maintain,
            (&Method::POST, ["v1", "repo", ..]) => Action::Maintain,
            _ => Action::Read,
        };
        if let Err((status, why)) = self.authorize(&req, action) {
            return error(status, &why);
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

    /// Forgets the cached listing (after publish, delete, check).
    fn invalidate_listing(&self) {
        if let Ok(mut l) = self.listing.lock() {
            *l = None;
        }
    }

    /// The images' summaries: the cached listing while no image directory
    /// changed, else a fresh one (blocking).
    fn listing_blocking(&self) -> Result<Arc<Vec<ImageSummary>>, aula_imager::Error> {
        let stamp = match &self.repo {
            Store::Dir(d) => ListingStamp::Dirs(image_dirs_stamp(d.root())?),
            // Other boot servers publish into the bucket too: a listing
            // is reused for a few seconds only.
            Store::S3(_) => ListingStamp::Time(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs() / 3)
                    .unwrap_or(0),
            ),
        };
        if let Ok(l) = self.listing.lock() {
            if let Some((_, list)) = l.as_ref().filter(|(s, _)| *s == stamp) {
                return Ok(list.clone());
            }
        }
        let list = Arc::new(self.repo.list()?);
        if let Ok(mut l) = self.listing.lock() {
            *l = Some((stamp, list.clone()));
        }
        Ok(list)
    }

    async fn list(self: &Arc<Self>) -> Response<Body> {
        let svc = self.clone();
        let mut images = match self.blocking(move || svc.listing_blocking()).await {
            Ok(Ok(l)) => l.as_ref().clone(),
            Ok(Err(e)) => return failure("listing images", &e),
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
            for (name, (_, at)) in u.iter() {
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
        let get = move || {
            let m = repo.manifest(&n, version)?;
            // A restore starts with its manifest: read-ahead learns the
            // order in which it will ask for the chunks.
            if let Store::S3(s) = &repo {
                s.readahead.learn(&m);
            }
            Ok(m)
        };
        match self.blocking(get).await {
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
        let (parts, body) = req.into_parts();
        let body = match aula_httpkit::body::read_limited(&parts.headers, body, MAX_MANIFEST).await
        {
            Ok(b) => b,
            Err(e) => return error(e.status(), &format!("reading the manifest: {e}")),
        };
        // Parsing and validating a large manifest is CPU work: off the
        // async runtime, a bounded number at once.
        let _slot = match self.publish_slots.acquire().await {
            Ok(s) => s,
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        };
        let m = match self
            .blocking(move || Manifest::from_json(&body, "uploaded manifest"))
            .await
        {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            Err(r) => return r,
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
        enum Outcome {
            Missing(Vec<ChunkId>),
            Published(u32),
        }
        // Shared with uploads, exclusive of gc: no chunk this manifest
        // names can disappear between the check and the link.
        let _gc = self.gc_lock.read().await;
        let repo = self.repo.clone();
        let res = self
            .blocking(move || -> Result<Outcome, aula_imager::Error> {
                let ids: Vec<ChunkId> = m.unique_chunks().into_iter().map(|(id, _)| id).collect();
                let missing = repo.missing_chunks(&ids)?;
                if !missing.is_empty() {
                    return Ok(Outcome::Missing(missing));
                }
                repo.publish(&m).map(Outcome::Published)
            })
            .await;
        self.invalidate_listing();
        match res {
            Ok(Ok(Outcome::Missing(missing))) => json(
                StatusCode::CONFLICT,
                &serde_json::json!({
                    "error": format!("{} chunk(s) named by the manifest are not in the repository", missing.len()),
                    "missing": missing,
                }),
            ),
            Ok(Ok(Outcome::Published(version))) => {
                if let Ok(mut u) = self.uploads.lock() {
                    u.remove(name);
                }
                tracing::info!(image = name, version, "published");
                json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "name": name, "version": version }),
                )
            }
            Ok(Err(
                e @ (aula_imager::Error::BadManifest { .. } | aula_imager::Error::Invalid(_)),
            )) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            Ok(Err(e @ aula_imager::Error::Repo(_))) => error(StatusCode::CONFLICT, &e.to_string()),
            Ok(Err(e)) => failure(&format!("publishing {name}"), &e),
            Err(r) => r,
        }
    }

    async fn delete(self: &Arc<Self>, name: &str) -> Response<Body> {
        if let Err(e) = validate_name(name) {
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
        let repo = self.repo.clone();
        let n = name.to_string();
        let _gc = self.gc_lock.read().await;
        let res = self.blocking(move || repo.delete(&n)).await;
        self.invalidate_listing();
        match res {
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
            Ok(Err(e)) => failure(&format!("deleting {name}"), &e),
            Err(r) => r,
        }
    }

    async fn missing(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Q {
            ids: Vec<ChunkId>,
        }
        let (parts, body) = req.into_parts();
        let body = match aula_httpkit::body::read_limited(&parts.headers, body, MAX_QUERY).await {
            Ok(b) => b,
            Err(e) => return error(e.status(), &format!("reading the query: {e}")),
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
        if q.ids.len() > MAX_MISSING_IDS {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "{} ids in one query; at most {MAX_MISSING_IDS}: ask in batches",
                    q.ids.len()
                ),
            );
        }
        // Present chunks are refreshed, so gc keeps them until the capture
        // that asked publishes; the gc lock keeps gc out meanwhile.
        let _gc = self.gc_lock.read().await;
        let svc = self.clone();
        let res = self
            .blocking(move || -> io::Result<Vec<ChunkId>> {
                if let Store::S3(s) = &svc.repo {
                    // HEADs in parallel (one at a time cost a restore's
                    // preflight 2.5 s for 357 chunks on a 3-node Garage);
                    // a chunk in the cache came from the bucket just now.
                    let unknown: Vec<ChunkId> = q
                        .ids
                        .iter()
                        .filter(|id| !s.cache.contains(id))
                        .copied()
                        .collect();
                    return s.repo.missing_chunks(&unknown).map_err(io::Error::other);
                }
                let mut missing = Vec::new();
                for id in &q.ids {
                    if !svc.refresh_chunk(id)? {
                        missing.push(*id);
                    }
                }
                Ok(missing)
            })
            .await;
        match res {
            Ok(Ok(m)) => json(StatusCode::OK, &serde_json::json!({ "missing": m })),
            Ok(Err(e)) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("checking chunks: {e}"),
            ),
            Err(r) => r,
        }
    }

    async fn get_chunk(self: &Arc<Self>, id: &str, req: &Request<Incoming>) -> Response<Body> {
        let id: ChunkId = match id.parse() {
            Ok(id) => id,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        if req.method() == Method::HEAD && req.headers().contains_key("x-aula-image") {
            // A capture asking whether it must upload this chunk (it names
            // its image on every request): present means it will be reused,
            // so it is refreshed for gc's grace period, under the gc lock.
            let name = req
                .headers()
                .get("x-aula-image")
                .and_then(|v| v.to_str().ok());
            if let Some(name) = name.filter(|n| {
                self.auth
                    .principal(req.headers())
                    .is_some_and(|p| p.can_upload_chunks(Some(n)))
            }) {
                self.note_capture(name).await;
            }
            let _gc = self.gc_lock.read().await;
            let svc = self.clone();
            if let Ok(Err(e)) = self.blocking(move || svc.refresh_chunk(&id)).await {
                tracing::warn!(%id, error = %e, "refreshing a reused chunk");
            }
        }
        let local = match &self.repo {
            Store::Dir(d) => d.clone(),
            Store::S3(s) => return self.get_chunk_s3(s.clone(), id, req).await,
        };
        let path = local.chunk_path(&id);
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
        let (status, start, count) = match aula_httpkit::range::parse(req.headers().get(RANGE), len)
        {
            RangeSpec::Full => (StatusCode::OK, 0, len),
            RangeSpec::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
            RangeSpec::Unsatisfiable => {
                let mut r = error(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(CONTENT_RANGE, v);
                }
                return r;
            }
        };
        if req.method() != Method::HEAD {
            crate::metrics::global().chunk_served(count);
        }
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
        chunk_response(body, status, start, count, len)
    }

    /// `get_chunk` from an S3 store: whole frames streamed from the store
    /// as they arrive (filling the chunk cache on the way; callers missing
    /// the same chunk meanwhile wait for the complete frame), or from the
    /// cache; a `Range` request is a slice of a cached frame, else a
    /// ranged GET.
    async fn get_chunk_s3(
        self: &Arc<Self>,
        s: Arc<S3Store>,
        id: ChunkId,
        req: &Request<Incoming>,
    ) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let range = req.headers().get(RANGE).cloned();
        if asks_no_cache(req) && s.cache.remove(&id) {
            // A client found the copy it got corrupt (clients verify every
            // chunk): the bucket's copy is read again.
            tracing::warn!(%id, "a client asked past the cache for a chunk; its cached copy is dropped");
        }
        if !head && range.is_none() {
            return self.stream_chunk_s3(s, id).await;
        }
        enum Got {
            Absent,
            Unsatisfiable(u64),
            Part(Bytes, StatusCode, u64, u64, u64),
        }
        let res = self
            .blocking(move || -> Result<Got, aula_imager::Error> {
                let ranged = |len: u64| match aula_httpkit::range::parse(range.as_ref(), len) {
                    RangeSpec::Full => Some((StatusCode::OK, 0, len)),
                    RangeSpec::Partial(a, b) => Some((StatusCode::PARTIAL_CONTENT, a, b - a + 1)),
                    RangeSpec::Unsatisfiable => None,
                };
                if !head {
                    if let Some(frame) = s.cache.get(&id) {
                        let len = frame.len() as u64;
                        let Some((st, a, n)) = ranged(len) else {
                            return Ok(Got::Unsatisfiable(len));
                        };
                        return Ok(Got::Part(
                            frame.slice(a as usize..(a + n) as usize),
                            st,
                            a,
                            n,
                            len,
                        ));
                    }
                }
                let Some(len) = s.repo.chunk_size_stored(&id)? else {
                    return Ok(Got::Absent);
                };
                let Some((st, a, n)) = ranged(len) else {
                    return Ok(Got::Unsatisfiable(len));
                };
                if head || n == 0 {
                    return Ok(Got::Part(Bytes::new(), st, a, n, len));
                }
                Ok(match s.repo.get_chunk_range(&id, a, a + n - 1)? {
                    Some(b) if b.len() as u64 == n => Got::Part(Bytes::from(b), st, a, n, len),
                    Some(b) => {
                        return Err(aula_imager::Error::Repo(format!(
                            "chunk {id}: the store answered {} bytes for a range of {n}",
                            b.len()
                        )))
                    }
                    None => Got::Absent,
                })
            })
            .await;
        match res {
            Ok(Ok(Got::Absent)) => error(StatusCode::NOT_FOUND, &format!("chunk {id} not found")),
            Ok(Ok(Got::Unsatisfiable(len))) => {
                let mut r = error(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(CONTENT_RANGE, v);
                }
                r
            }
            Ok(Ok(Got::Part(bytes, status, start, count, len))) => {
                if !head {
                    crate::metrics::global().chunk_served(count);
                }
                let body = Full::new(bytes).map_err(|e: Infallible| match e {}).boxed();
                chunk_response(body, status, start, count, len)
            }
            Ok(Err(e)) => failure(&format!("reading chunk {id}"), &e),
            Err(r) => r,
        }
    }

    /// A whole chunk from an S3 store: from the cache, from another
    /// caller's GET of it in flight, or streamed from the store while it
    /// arrives (then kept in the cache and handed to callers that waited).
    async fn stream_chunk_s3(self: &Arc<Self>, s: Arc<S3Store>, id: ChunkId) -> Response<Body> {
        let whole = |frame: Bytes| {
            let len = frame.len() as u64;
            crate::metrics::global().chunk_served(len);
            let body = Full::new(frame).map_err(|e: Infallible| match e {}).boxed();
            chunk_response(body, StatusCode::OK, 0, len, len)
        };
        let absent = || error(StatusCode::NOT_FOUND, &format!("chunk {id} not found"));
        s.read_ahead(&id);
        loop {
            if let Some(f) = s.cache.get(&id) {
                return whole(f);
            }
            let lead = match s.gets.join(&id) {
                Joined::Lead(l) => l,
                Joined::Wait(w) => match self.blocking(move || w.wait()).await {
                    Ok(Some(Ok(Some(f)))) => {
                        s.cache.note_joined();
                        return whole(f);
                    }
                    Ok(Some(Ok(None))) => return absent(),
                    Ok(Some(Err(e))) => {
                        return failure(
                            &format!("reading chunk {id}"),
                            &aula_imager::Error::Repo(e.to_string()),
                        )
                    }
                    // The leader ended without the chunk (its client left,
                    // or the store broke off): ask again.
                    Ok(None) => continue,
                    Err(r) => return r,
                },
            };
            // A call that finished just before this one joined may have
            // filled the cache.
            if let Some(f) = s.cache.peek(&id) {
                lead.finish(Ok(Some(f.clone())));
                return whole(f);
            }
            let cs = match s.repo.open_chunk(&id, None).await {
                Ok(Some(cs)) => cs,
                Ok(None) => {
                    lead.finish(Ok(None));
                    return absent();
                }
                Err(e) => {
                    let shared = Arc::new(aula_imager::Error::Repo(e.to_string()));
                    lead.finish(Err(shared));
                    return failure(&format!("reading chunk {id}"), &e);
                }
            };
            let len = cs.len;
            crate::metrics::global().chunk_served(len);
            // The pieces pass through as they come and are kept; the whole
            // frame goes to the cache and the waiters once complete.
            struct Tee {
                rx: tokio::sync::mpsc::Receiver<aula_imager::Result<Bytes>>,
                pieces: Vec<Bytes>,
                left: u64,
                lead: Option<Lead<ChunkId, FrameResult>>,
                s: Arc<S3Store>,
                id: ChunkId,
            }
            impl Tee {
                /// The whole frame arrived: to the cache and the waiters.
                /// (Done on the last piece: hyper stops polling a body once
                /// its Content-Length is sent.)
                fn complete(&mut self) {
                    if let Some(lead) = self.lead.take() {
                        let mut all = bytes::BytesMut::with_capacity(
                            self.pieces.iter().map(Bytes::len).sum(),
                        );
                        for p in self.pieces.drain(..) {
                            all.extend_from_slice(&p);
                        }
                        let frame = all.freeze();
                        // Whole, as the bucket sent it: kept (clients
                        // verify; see `ChunkCache::fill`).
                        self.s.cache.fill(self.id, frame.clone());
                        lead.finish(Ok(Some(frame)));
                    }
                }
            }
            let tee = Tee {
                rx: cs.body,
                pieces: Vec::new(),
                left: len,
                lead: Some(lead),
                s,
                id,
            };
            let stream = futures_util::stream::unfold(tee, |mut t| async move {
                match t.rx.recv().await {
                    Some(Ok(piece)) => {
                        t.left = t.left.saturating_sub(piece.len() as u64);
                        t.pieces.push(piece.clone());
                        if t.left == 0 {
                            t.complete();
                        }
                        Some((Ok(Frame::data(piece)), t))
                    }
                    Some(Err(e)) => {
                        // Waiters fetch it themselves; this client resumes
                        // with a Range request.
                        t.lead = None;
                        t.pieces.clear();
                        Some((Err(io::Error::other(e.to_string())), t))
                    }
                    None => {
                        if t.left == 0 {
                            t.complete();
                        }
                        None
                    }
                }
            });
            return chunk_response(StreamBody::new(stream).boxed(), StatusCode::OK, 0, len, len);
        }
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
            self.note_capture(name).await;
        }
        {
            // Content addressed: already present means already correct. It
            // is refreshed (gc's grace period starts again) under the gc
            // lock, so gc cannot remove it between this answer and the
            // publish that will name it. The client may stop sending.
            let _gc = self.gc_lock.read().await;
            let svc = self.clone();
            match self.blocking(move || svc.refresh_chunk(&id)).await {
                Ok(Ok(true)) => {
                    crate::metrics::global().chunk_upload("present", false);
                    return json(
                        StatusCode::OK,
                        &serde_json::json!({ "id": id, "stored": false }),
                    );
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("checking chunk {id}: {e}"),
                    )
                }
                Err(r) => return r,
            }
        }
        let _slot = match self.upload_slots.acquire().await {
            Ok(s) => s,
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        };
        let (parts, body) = req.into_parts();
        let body = match aula_httpkit::body::read_limited(&parts.headers, body, MAX_FRAME).await {
            Ok(b) => b,
            Err(e) => {
                if let aula_httpkit::body::BodyError::Read(why) = &e {
                    tracing::debug!(%id, why, "chunk upload ended early (client gone?)");
                }
                return error(e.status(), &format!("reading the chunk: {e}"));
            }
        };
        let repo = self.repo.clone();
        let _gc = self.gc_lock.read().await;
        let res = self
            .blocking(move || -> Result<bool, aula_imager::Error> {
                // Verify on arrival: decompress (bounded) and hash.
                let mut dec = Decoder::new()?;
                let mut out = Vec::new();
                let len =
                    zstd_content_size(&body).ok_or_else(|| aula_imager::Error::ChunkCorrupt {
                        id,
                        why: "not a zstd frame with a content size of at most 64 MiB".into(),
                    })?;
                dec.decode_verified(&id, &body, len, &mut out)?;
                // Acknowledged only once durable.
                repo.put_durable(&id, &body)
            })
            .await;
        let m = crate::metrics::global();
        match res {
            Ok(Ok(stored)) => {
                m.chunk_upload(if stored { "stored" } else { "present" }, false);
                json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "id": id, "stored": stored }),
                )
            }
            Ok(Err(e @ aula_imager::Error::ChunkCorrupt { .. })) => {
                m.chunk_upload("refused", true);
                error(StatusCode::BAD_REQUEST, &e.to_string())
            }
            Ok(Err(e)) => failure(&format!("storing chunk {id}"), &e),
            Err(r) => r,
        }
    }

    /// Records a request of the capture of image `name` (one that may
    /// upload it): see [`RepoService::gc_blocking`].
    ///
    /// With an S3 store, the first request of a capture also takes an
    /// upload lease in the bucket, which keeps every boot server's gc from
    /// removing chunks until the capture publishes (or goes quiet for the
    /// grace period).
    async fn note_capture(self: &Arc<Self>, name: &str) {
        if validate_name(name).is_err() {
            return;
        }
        let stale = Duration::from_secs(self.cfg.gc_grace_s.max(60));
        let mut new = false;
        if let Ok(mut u) = self.uploads.lock() {
            let now = Instant::now();
            let e = u.entry(name.to_string()).or_insert_with(|| {
                new = true;
                (now, now)
            });
            if e.1.elapsed() > stale {
                *e = (now, now);
                new = true;
            }
            e.1 = now;
        }
        if let (true, Store::S3(s)) = (new, &self.repo) {
            let (s, n) = (s.clone(), name.to_string());
            if let Ok(Err(e)) = self.blocking(move || s.repo.start_upload(&n)).await {
                tracing::warn!(image = name, error = %e, "taking an upload lease in the bucket");
            }
        }
    }

    /// Whether chunk `id` is present; a present one older than a quarter
    /// of the grace period gets its modification time set to now
    /// (blocking).
    fn refresh_chunk(&self, id: &ChunkId) -> io::Result<bool> {
        let local = match &self.repo {
            Store::Dir(d) => d,
            // No modification time to refresh in a bucket: the capture's
            // upload lease keeps gc away instead (see `note_capture`).
            Store::S3(s) => {
                return s
                    .repo
                    .chunk_size_stored(id)
                    .map(|o| o.is_some())
                    .map_err(io::Error::other)
            }
        };
        let path = local.chunk_path(id);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let quarter = Duration::from_secs(self.cfg.gc_grace_s / 4);
        let age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok());
        if age.is_none_or(|a| a >= quarter) {
            std::fs::File::open(&path)?.set_modified(SystemTime::now())?;
        }
        Ok(true)
    }

    async fn gc(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let purge_trash = query_param(req, "purge_trash").is_some_and(|v| v == "1" || v == "true");
        let svc = self.clone();
        let res = self.blocking(move || svc.gc_blocking(purge_trash)).await;
        self.invalidate_listing();
        match res {
            Ok(Ok(r)) => json(StatusCode::OK, &r),
            Ok(Err(e)) => failure("garbage collection", &e),
            Err(r) => r,
        }
    }

    /// Garbage-collect unreferenced chunks (blocking; not on an async
    /// worker). Waits for uploads, missing-checks and publishes in
    /// progress, and keeps new ones waiting until it is done.
    ///
    /// An unreferenced chunk is kept while it is younger than the grace
    /// period, and, while a capture is in progress (a request in the last
    /// grace period), when it is younger than that capture's start (less
    /// a quarter of the grace period, the refresh granularity): every
    /// chunk a capture uploads or finds present has such a time, so a
    /// capture that takes longer than the grace period loses nothing
    /// either.
    pub fn gc_blocking(&self, purge_trash: bool) -> Result<GcReport, aula_imager::Error> {
        let _exclusive = self.gc_lock.blocking_write();
        let grace = Duration::from_secs(self.cfg.gc_grace_s);
        if let Store::S3(s) = &self.repo {
            // Captures that went quiet give up their lease.
            let quiet: Vec<String> = self
                .uploads
                .lock()
                .map(|mut u| {
                    let q = u
                        .iter()
                        .filter(|(_, (_, last))| {
                            last.elapsed() > grace.max(Duration::from_secs(60))
                        })
                        .map(|(n, _)| n.clone())
                        .collect::<Vec<_>>();
                    for n in &q {
                        u.remove(n);
                    }
                    q
                })
                .unwrap_or_default();
            for n in quiet {
                s.repo.end_upload(&n)?;
            }
            let r = s.repo.gc(grace)?;
            let report = GcReport {
                referenced: r.referenced,
                removed_chunks: r.removed_chunks,
                freed_bytes: r.freed_bytes,
                kept_recent: r.kept_recent,
                trash_purged: 0,
                deferred_for: r.deferred_for,
            };
            tracing::info!(?report, "garbage collection (S3)");
            return Ok(report);
        }
        let oldest_capture = self.uploads.lock().ok().and_then(|mut u| {
            u.retain(|_, (_, last)| last.elapsed() <= grace.max(Duration::from_secs(60)));
            u.values().map(|(first, _)| first.elapsed()).max()
        });
        let keep_window = match oldest_capture {
            Some(running) => grace.max(running + grace / 4 + Duration::from_secs(60)),
            None => grace,
        };
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
        let now = SystemTime::now();
        let Some(local) = self.repo.local() else {
            return Err(aula_imager::Error::Repo("no directory repository".into()));
        };
        let chunks_dir = local.root().join("chunks");
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
                    .is_none_or(|age| age < keep_window);
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
            let trash = local.root().join("trash");
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
        let res = self
            .blocking(move || svc.check_blocking(only.as_deref()))
            .await;
        self.invalidate_listing();
        match res {
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
                let r =
                    aula_imager::verify::verify_repo(&m, &self.repo, threads, &Progress::new())?;
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

/// A chunk download's response: `body` holds bytes `start` .. `start +
/// count` of a frame of `len` bytes.
fn chunk_response(
    body: Body,
    status: StatusCode,
    start: u64,
    count: u64,
    len: u64,
) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/zstd"));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&count.to_string()) {
        h.insert(CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
        {
            h.insert(CONTENT_RANGE, v);
        }
    }
    r
}

/// The request says `Cache-Control: no-cache` (or `Pragma: no-cache`).
fn asks_no_cache(req: &Request<Incoming>) -> bool {
    let has = |name, what: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|d| d.trim().eq_ignore_ascii_case(what)))
        })
    };
    has(hyper::header::CACHE_CONTROL, "no-cache") || has(hyper::header::PRAGMA, "no-cache")
}

/// What a cached listing was made from.
#[derive(Debug, PartialEq, Eq)]
enum ListingStamp {
    /// The image directories' state.
    Dirs(DirsStamp),
    /// A few seconds' window (S3: other boot servers publish too).
    Time(u64),
}

/// The answer to a storage failure while `what`: 507 when the filesystem
/// is full (or over quota), else 500; the OS error is named either way.
fn failure(what: &str, e: &aula_imager::Error) -> Response<Body> {
    let mut os = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            os = Some(io);
        }
        cur = err.source();
    }
    let full = os
        .and_then(|io| io.raw_os_error())
        .is_some_and(|c| c == libc::ENOSPC || c == libc::EDQUOT);
    let msg = match os {
        Some(io) => format!("{what}: {e}: {io}"),
        None => format!("{what}: {e}"),
    };
    if full {
        tracing::error!(error = %msg, "repository filesystem full");
        error(
            StatusCode::INSUFFICIENT_STORAGE,
            &format!("no space left on the repository's filesystem ({msg}); nothing was stored"),
        )
    } else {
        tracing::error!(error = %msg, "repository storage error");
        error(StatusCode::INTERNAL_SERVER_ERROR, &msg)
    }
}

/// Each image directory's name and modification time (s, ns).
type DirsStamp = Vec<(String, i64, i64)>;

/// What the listing depends on: each image directory and its modification
/// time (a new version file changes it).
fn image_dirs_stamp(root: &std::path::Path) -> Result<DirsStamp, aula_imager::Error> {
    use std::os::unix::fs::MetadataExt;
    let dir = root.join("images");
    let io_err = |source| aula_imager::Error::Io {
        what: format!("listing {}", dir.display()),
        source,
    };
    let mut out = Vec::new();
    for ent in std::fs::read_dir(&dir).map_err(io_err)? {
        let ent = ent.map_err(io_err)?;
        let Ok(meta) = ent.metadata() else { continue };
        out.push((
            ent.file_name().to_string_lossy().into_owned(),
            meta.mtime(),
            meta.mtime_nsec(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Removes temporary copies of `service-state.json` left by a crash.
fn sweep_state_temps(root: &std::path::Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".service-state.json.") && name.ends_with(".partial") {
            let _ = std::fs::remove_file(ent.path());
        }
    }
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
    fn zstd_frame_header_gives_the_content_size() {
        let data = vec![7u8; 300_000];
        let frame = zstd::bulk::compress(&data, 3).expect("compress");
        assert_eq!(zstd_content_size(&frame), Some(300_000));
        assert_eq!(zstd_content_size(b"not zstd at all"), None);
        let small = zstd::bulk::compress(b"x", 3).expect("compress");
        assert_eq!(zstd_content_size(&small), Some(1));
    }
}
