//! A repository served over HTTP(S) by `aula-bootserver`.
//!
//! Blocking API over an async hyper client: pipeline workers call it from
//! their own threads, each call runs on a tokio runtime (the caller's when
//! there is one, else a private one). Connections are kept alive and shared.
//!
//! Resilience: every call is retried with capped exponential backoff on
//! connection errors, timeouts, 408/429 and 5xx, for up to `retry_for`
//! (default 5 minutes), so a restarted server or a cut link only delays the
//! job. A chunk download cut mid-body resumes with a `Range` request for the
//! missing bytes; the restore then verifies the chunk's SHA-256, so a resumed
//! or mangled download can never be written unverified. 4xx answers other
//! than 408/429 are final.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE,
};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde::{Deserialize, Serialize};

use super::{ImageSummary, Repository};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::tls::{client_config, ServerTrust};

/// Largest response body accepted for a chunk (zstd bound of 64 MiB).
const MAX_FRAME: usize = (64 << 20) + (64 << 20) / 255 + 1024;
/// Largest JSON response accepted (manifests of very large disks).
const MAX_JSON: usize = 256 << 20;

/// Client settings.
#[derive(Clone)]
pub struct HttpOptions {
    /// How to trust an https:// server.
    pub trust: ServerTrust,
    /// Bearer token for writes (upload, publish, delete); also sent with
    /// reads when no `read_token` is given.
    pub token: Option<String>,
    /// Bearer token for reads (manifests, chunks, lists), for a repository
    /// that needs one to read (`repository.read_token`).
    pub read_token: Option<String>,
    /// Bearer token for the swarm coordinator's routes (`/v1/swarm/…`): an
    /// agent's own registered token, which its boot server knows it by;
    /// without it the read credential is sent.
    pub swarm_token: Option<String>,
    /// Keep retrying a failing call for this long.
    pub retry_for: Duration,
    /// A response (or the next piece of its body) must arrive within this.
    pub timeout: Duration,
    /// Chunks fetched at once by a restore.
    pub parallel: usize,
    /// When set (e.g. `Progress::cancel_flag`), a download in progress stops
    /// between two pieces of body and retries stop: the call returns
    /// `Error::Cancelled` instead of waiting for the chunk to finish.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            trust: ServerTrust::System,
            token: None,
            read_token: None,
            swarm_token: None,
            retry_for: Duration::from_secs(300),
            timeout: Duration::from_secs(30),
            parallel: 8,
            cancel: None,
        }
    }
}

pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled HTTP/1.1 client over `tls` (plain `http://` allowed), with
/// TCP_NODELAY, the given connect timeout and idle-connection lifetime, up
/// to 64 idle connections per host: the repository and S3 clients share it.
pub(crate) fn pooled_client(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    idle: Duration,
) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(64)
        .build(conn)
}

/// An HTTP(S) repository client.
pub struct HttpRepo {
    base: String,
    client: HttpClient,
    handle: tokio::runtime::Handle,
    _rt: Option<tokio::runtime::Runtime>,
    opts: HttpOptions,
    upload_name: std::sync::Mutex<Option<String>>,
    /// Chunks whose last copy failed verification: fetched again with
    /// `Cache-Control: no-cache`, so a server's cache drops its copy and
    /// reads its store.
    stale: std::sync::Mutex<std::collections::HashSet<ChunkId>>,
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field("trust", &self.trust)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("read_token", &self.read_token.as_ref().map(|_| "…"))
            .field("swarm_token", &self.swarm_token.as_ref().map(|_| "…"))
            .field("retry_for", &self.retry_for)
            .field("timeout", &self.timeout)
            .field("parallel", &self.parallel)
            .finish()
    }
}

impl std::fmt::Debug for HttpRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRepo")
            .field("base", &self.base)
            .finish()
    }
}

enum Fail {
    /// Worth trying again.
    Retry(String),
    /// Final.
    Fatal(Error),
}

/// The next data frame of a response body, waiting at most `timeout` for
/// each frame (trailers are skipped): None at the end, or why the body
/// broke off.
async fn next_data(
    body: &mut hyper::body::Incoming,
    timeout: Duration,
) -> std::result::Result<Option<Bytes>, String> {
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(format!("body stalled for {timeout:?}")),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    return Ok(Some(d));
                }
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct MissingReq {
    ids: Vec<ChunkId>,
}
#[derive(Serialize, Deserialize)]
struct MissingResp {
    missing: Vec<ChunkId>,
}
#[derive(Deserialize)]
struct PublishResp {
    version: u32,
}

impl HttpRepo {
    /// A client for the repository at `url` (`http://host:port` or
    /// `https://…`, optionally with a path prefix).
    pub fn new(url: &str, opts: HttpOptions) -> Result<HttpRepo> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "repository URL {url:?} must start with http:// or https://"
            )));
        }
        base.parse::<hyper::Uri>()
            .map_err(|e| Error::Invalid(format!("invalid repository URL {url:?}: {e}")))?;
        let (rt, handle) = match tokio::runtime::Handle::try_current() {
            Ok(h) => (None, h),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("aula-http")
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Io {
                        what: "starting the HTTP client runtime".into(),
                        source: e,
                    })?;
                let h = rt.handle().clone();
                (Some(rt), h)
            }
        };
        let client = pooled_client(
            client_config(&opts.trust)?,
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        Ok(HttpRepo {
            base,
            client,
            handle,
            _rt: rt,
            opts,
            upload_name: std::sync::Mutex::new(None),
            stale: std::sync::Mutex::default(),
        })
    }

    /// The runtime the client runs on (the swarm's chunk server and peer
    /// fetches share it).
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// One request to a route of the repository service (the swarm
    /// coordinator's), with the swarm credential (else that of reads) and
    /// no retry: the
    /// caller falls back to the repository alone when it fails. The
    /// response must be complete within `timeout`.
    pub fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let req = match self.request(method, path, false, Bytes::from(body)) {
            Ok(mut r) => {
                if let Some(t) = &self.opts.swarm_token {
                    match hyper::header::HeaderValue::from_str(&format!("Bearer {t}")) {
                        Ok(v) => {
                            r.headers_mut().insert(AUTHORIZATION, v);
                        }
                        Err(_) => {
                            return Err(Error::Invalid(
                                "the swarm token is not a header value".into(),
                            ))
                        }
                    }
                }
                r
            }
            Err(Fail::Fatal(e)) => return Err(e),
            Err(Fail::Retry(why)) => return Err(Error::Repo(why)),
        };
        let uri = self.url(path);
        match self
            .block_on(async { tokio::time::timeout(timeout, self.exchange(req, MAX_JSON)).await })
        {
            Err(_) => Err(Error::Repo(format!("{uri}: no answer within {timeout:?}"))),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Fail::Fatal(e))) => Err(e),
            Ok(Err(Fail::Retry(why))) => Err(Error::Repo(why)),
        }
    }

    /// Chunks a restore should fetch at once.
    pub fn parallel(&self) -> usize {
        self.opts.parallel.max(1)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Run `attempt` until it succeeds, fails finally, or the retry budget
    /// is spent.
    fn retrying<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Fail>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            tries += 1;
            if self.cancelled() {
                return Err(Error::Cancelled);
            }
            match self.block_on(attempt()) {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(why)) => {
                    if start.elapsed() + delay > self.opts.retry_for {
                        return Err(Error::Repo(format!(
                            "{what}: giving up after {tries} attempts over {:.0} s: {why}",
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    tracing::warn!("{what}: {why}; retrying in {:.1} s", delay.as_secs_f64());
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        auth: bool,
        body: Bytes,
    ) -> std::result::Result<Request<Full<Bytes>>, Fail> {
        let mut b = Request::builder().method(method).uri(self.url(path));
        let credential = if auth {
            self.opts.token.as_ref()
        } else {
            self.opts.read_token.as_ref().or(self.opts.token.as_ref())
        };
        if let Some(t) = credential {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if !body.is_empty() {
            b = b.header(CONTENT_TYPE, "application/octet-stream");
        }
        if let Some(n) = self.upload_name.lock().ok().and_then(|g| g.clone()) {
            b = b.header("x-aula-image", n);
        }
        b.body(Full::new(body))
            .map_err(|e| Fail::Fatal(Error::Invalid(format!("building request for {path}: {e}"))))
    }

    /// Send a request and wait, bounded, for the response head; a timeout
    /// or transport failure is worth retrying.
    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> std::result::Result<hyper::Response<hyper::body::Incoming>, Fail> {
        let uri = req.uri().to_string();
        match tokio::time::timeout(self.opts.timeout, self.client.request(req)).await {
            Err(_) => Err(Fail::Retry(format!(
                "{uri}: no response within {:?}",
                self.opts.timeout
            ))),
            Ok(Err(e)) => Err(Fail::Retry(format!("{uri}: {}", error_chain(&e)))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Send and read the whole body (bounded), classifying failures.
    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        limit: usize,
    ) -> std::result::Result<(StatusCode, Vec<u8>), Fail> {
        let uri = req.uri().to_string();
        let resp = self.send(req).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            if self.cancelled() {
                return Err(Fail::Fatal(Error::Cancelled));
            }
            let Some(d) = next_data(&mut body, self.opts.timeout)
                .await
                .map_err(|e| Fail::Retry(format!("{uri}: reading body: {e}")))?
            else {
                break;
            };
            if out.len() + d.len() > limit {
                return Err(Fail::Fatal(Error::Repo(format!(
                    "{uri}: response larger than {limit} bytes"
                ))));
            }
            out.extend_from_slice(&d);
        }
        Ok((status, out))
    }

    fn json_call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        auth: bool,
        body: Bytes,
    ) -> Result<(StatusCode, Option<T>, String)> {
        let what = format!("{method} {}", self.url(path));
        self.retrying(&what, || {
            let req = self.request(method.clone(), path, auth, body.clone());
            async move {
                let (status, bytes) = self.exchange(req?, MAX_JSON).await?;
                classify(status, &self.url(path), &bytes)?;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let parsed = if status.is_success() {
                    serde_json::from_slice::<T>(&bytes).ok()
                } else {
                    None
                };
                Ok((status, parsed, text))
            }
        })
    }

    fn fetch_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        let path = format!("/v1/chunks/{id}");
        let what = format!("GET {}", self.url(&path));
        let fresh = self.stale.lock().is_ok_and(|mut s| s.remove(id));
        // `out` carries the bytes received so far across attempts.
        let cell = std::sync::Mutex::new(std::mem::take(out));
        let res = self.retrying(&what, || {
            let cell = &cell;
            let path = path.clone();
            async move {
                let have = cell.lock().map(|v| v.len()).unwrap_or(0);
                let mut req = self.request(Method::GET, &path, false, Bytes::new())?;
                if fresh {
                    req.headers_mut()
                        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                }
                if have > 0 {
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes={have}-")) {
                        req.headers_mut().insert(RANGE, v);
                    }
                }
                let uri = self.url(&path);
                let resp = self.send(req).await?;
                let status = resp.status();
                match status {
                    StatusCode::OK => {
                        if let Ok(mut v) = cell.lock() {
                            v.clear();
                        }
                    }
                    StatusCode::PARTIAL_CONTENT => {
                        let ok = resp
                            .headers()
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
                        if !ok {
                            if let Ok(mut v) = cell.lock() {
                                v.clear();
                            }
                            return Err(Fail::Retry(format!(
                                "{uri}: unexpected Content-Range; starting over"
                            )));
                        }
                    }
                    StatusCode::NOT_FOUND => return Err(Fail::Fatal(Error::ChunkMissing(*id))),
                    StatusCode::RANGE_NOT_SATISFIABLE => {
                        if let Ok(mut v) = cell.lock() {
                            v.clear();
                        }
                        return Err(Fail::Retry(format!(
                            "{uri}: range not satisfiable; starting over"
                        )));
                    }
                    s => {
                        let bytes = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        classify(s, &uri, &bytes)?;
                        return Err(Fail::Fatal(Error::Repo(format!(
                            "{uri}: unexpected status {s}"
                        ))));
                    }
                }
                let expect_total = match status {
                    StatusCode::OK => resp
                        .headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<usize>().ok()),
                    _ => resp
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit('/').next())
                        .and_then(|v| v.parse::<usize>().ok()),
                };
                let mut body = resp.into_body();
                loop {
                    if self.cancelled() {
                        return Err(Fail::Fatal(Error::Cancelled));
                    }
                    let Some(d) = next_data(&mut body, self.opts.timeout)
                        .await
                        .map_err(|e| Fail::Retry(format!("{uri}: cut after partial body: {e}")))?
                    else {
                        break;
                    };
                    let mut v = cell
                        .lock()
                        .map_err(|_| Fail::Fatal(Error::Repo("lock poisoned".into())))?;
                    if v.len() + d.len() > MAX_FRAME {
                        v.clear();
                        return Err(Fail::Fatal(Error::ChunkCorrupt {
                            id: *id,
                            why: "server sent more than any chunk can hold".into(),
                        }));
                    }
                    v.extend_from_slice(&d);
                }
                let got = cell.lock().map(|v| v.len()).unwrap_or(0);
                if let Some(total) = expect_total {
                    if got < total {
                        return Err(Fail::Retry(format!(
                            "{uri}: body ended at {got} of {total} bytes"
                        )));
                    }
                }
                Ok(())
            }
        });
        *out = cell.into_inner().unwrap_or_default();
        res
    }
}

/// A blocking reader over an HTTP(S) download that resumes with `Range`
/// after a cut (used for legacy partclone images served as plain files).
pub struct HttpStream {
    repo: std::sync::Arc<HttpRepo>,
    path: String,
    offset: u64,
    rx: Option<std::sync::mpsc::Receiver<std::result::Result<Bytes, String>>>,
    pending: Bytes,
    total: Option<u64>,
}

impl HttpRepo {
    /// Open `path` (relative to the base URL) as a resumable byte stream.
    pub fn stream(self: &std::sync::Arc<Self>, path: &str) -> Result<HttpStream> {
        let mut s = HttpStream {
            repo: self.clone(),
            path: path.to_string(),
            offset: 0,
            rx: None,
            pending: Bytes::new(),
            total: None,
        };
        s.connect()?;
        Ok(s)
    }
}

impl HttpStream {
    fn connect(&mut self) -> Result<()> {
        let repo = self.repo.clone();
        let what = format!("GET {}", repo.url(&self.path));
        let offset = self.offset;
        let path = self.path.clone();
        let (resp, total) = repo.retrying(&what, || {
            let req = repo.request(Method::GET, &path, false, Bytes::new());
            let repo = repo.clone();
            async move {
                let mut req = req?;
                if offset > 0 {
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                        req.headers_mut().insert(RANGE, v);
                    }
                }
                let uri = req.uri().to_string();
                let resp = repo.send(req).await?;
                let st = resp.status();
                let ok = (offset == 0 && st == StatusCode::OK)
                    || (offset > 0 && st == StatusCode::PARTIAL_CONTENT);
                if !ok {
                    if st == StatusCode::OK && offset > 0 {
                        return Err(Fail::Fatal(Error::Repo(format!(
                            "{uri}: server ignored Range; cannot resume"
                        ))));
                    }
                    classify(st, &uri, b"")?;
                    return Err(Fail::Fatal(Error::Repo(format!("{uri}: {st}"))));
                }
                let total = if st == StatusCode::OK {
                    resp.headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                } else {
                    resp.headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit('/').next())
                        .and_then(|v| v.parse::<u64>().ok())
                };
                Ok((resp, total))
            }
        })?;
        if total.is_some() {
            self.total = total;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let timeout = self.repo.opts.timeout;
        self.repo.handle.spawn(async move {
            let mut body = resp.into_body();
            loop {
                let item = match next_data(&mut body, timeout).await {
                    Ok(Some(d)) => Ok(d),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                let end = item.is_err();
                if tx.send(item).is_err() || end {
                    break;
                }
            }
        });
        self.rx = Some(rx);
        Ok(())
    }

    /// Total size, when the server said.
    pub fn total(&self) -> Option<u64> {
        self.total
    }
}

impl std::io::Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.len());
                buf[..n].copy_from_slice(&self.pending[..n]);
                self.pending = self.pending.slice(n..);
                self.offset += n as u64;
                return Ok(n);
            }
            let next = self.rx.as_ref().map(|rx| rx.recv());
            match next {
                Some(Ok(Ok(d))) => self.pending = d,
                Some(Ok(Err(why))) => {
                    tracing::warn!("download cut at byte {} ({why}); resuming", self.offset);
                    self.connect().map_err(std::io::Error::other)?;
                }
                // The sender is gone: the body ended.
                Some(Err(_)) if self.total.is_some_and(|t| self.offset < t) => {
                    tracing::warn!("download ended early at byte {}; resuming", self.offset);
                    self.connect().map_err(std::io::Error::other)?;
                }
                Some(Err(_)) | None => return Ok(0),
            }
        }
    }
}

/// Map an HTTP status to retry / final error. Success passes.
fn classify(status: StatusCode, uri: &str, body: &[u8]) -> std::result::Result<(), Fail> {
    if status.is_success() || status == StatusCode::NOT_FOUND || status == StatusCode::CONFLICT {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(500)])
        .trim()
        .to_string();
    let msg = format!(
        "{uri}: {status}{}",
        if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        }
    );
    if status == StatusCode::INSUFFICIENT_STORAGE {
        // A full disk does not empty itself in seconds: fail now, clearly.
        Err(Fail::Fatal(Error::Repo(format!(
            "{msg} (the repository's filesystem is full)"
        ))))
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Err(Fail::Retry(msg))
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        Err(Fail::Fatal(Error::Repo(format!(
            "{msg} (check the repository token)"
        ))))
    } else {
        Err(Fail::Fatal(Error::Repo(msg)))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Repository for HttpRepo {
    fn location(&self) -> String {
        self.base.clone()
    }

    fn chunk_size_stored(&self, id: &ChunkId) -> Result<Option<u64>> {
        let path = format!("/v1/chunks/{id}");
        let what = format!("HEAD {}", self.url(&path));
        self.retrying(&what, || {
            let req = self.request(Method::HEAD, &path, false, Bytes::new());
            async move {
                let req = req?;
                let uri = req.uri().to_string();
                let resp = self.send(req).await?;
                match resp.status() {
                    StatusCode::OK => Ok(resp
                        .headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())),
                    StatusCode::NOT_FOUND => Ok(None),
                    s => {
                        classify(s, &uri, b"")?;
                        Err(Fail::Fatal(Error::Repo(format!(
                            "{uri}: unexpected status {s}"
                        ))))
                    }
                }
            }
        })
    }

    fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for batch in ids.chunks(8192) {
            let body = serde_json::to_vec(&MissingReq {
                ids: batch.to_vec(),
            })
            .map_err(|e| Error::Repo(e.to_string()))?;
            let (status, parsed, text) = self.json_call::<MissingResp>(
                Method::POST,
                "/v1/chunks/missing",
                false,
                Bytes::from(body),
            )?;
            match parsed {
                Some(r) if status.is_success() => out.extend(r.missing),
                _ => {
                    return Err(Error::Repo(format!(
                        "POST /v1/chunks/missing: {status}: {text}"
                    )))
                }
            }
        }
        Ok(out)
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<()> {
        let path = format!("/v1/chunks/{id}");
        let body = Bytes::copy_from_slice(frame);
        let (status, _, text) =
            self.json_call::<serde_json::Value>(Method::PUT, &path, true, body)?;
        if status.is_success() {
            Ok(())
        } else {
            Err(Error::Repo(format!(
                "PUT {}: {status}: {text}",
                self.url(&path)
            )))
        }
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.fetch_chunk(id, out)
    }

    fn invalid(&self, id: &ChunkId) {
        if let Ok(mut s) = self.stale.lock() {
            s.insert(*id);
        }
    }

    fn fetch_attempts(&self) -> u32 {
        3
    }

    fn preferred_threads(&self) -> usize {
        self.parallel().max(crate::pool::default_threads())
    }

    fn begin_upload(&self, name: &str) {
        if let Ok(mut g) = self.upload_name.lock() {
            *g = Some(name.to_string());
        }
    }

    fn sync_chunks(&self) -> Result<()> {
        // The server makes every chunk durable before it answers the PUT.
        Ok(())
    }

    fn publish(&self, manifest: &Manifest) -> Result<u32> {
        crate::manifest::validate_name(&manifest.name)?;
        let path = format!("/v1/images/{}", manifest.name);
        let (status, parsed, text) = self.json_call::<PublishResp>(
            Method::PUT,
            &path,
            true,
            Bytes::from(manifest.to_json()),
        )?;
        match parsed {
            Some(p) if status.is_success() => Ok(p.version),
            _ => Err(Error::Repo(format!(
                "publishing {}: {status}: {text}",
                manifest.name
            ))),
        }
    }

    fn manifest(&self, name: &str, version: Option<u32>) -> Result<Manifest> {
        crate::manifest::validate_name(name)?;
        let path = match version {
            Some(v) => format!("/v1/images/{name}?version={v}"),
            None => format!("/v1/images/{name}"),
        };
        let what = format!("GET {}", self.url(&path));
        let path_ref = &path;
        let (status, bytes) = self.retrying(&what, || {
            let req = self.request(Method::GET, path_ref, false, Bytes::new());
            async move {
                let (status, bytes) = self.exchange(req?, MAX_JSON).await?;
                classify(status, &self.url(path_ref), &bytes)?;
                Ok((status, bytes))
            }
        })?;
        if status == StatusCode::NOT_FOUND {
            return Err(Error::ImageNotFound(match version {
                Some(v) => format!("{name}@{v}"),
                None => name.to_string(),
            }));
        }
        Manifest::from_json(&bytes, &self.url(&path))
    }

    fn list(&self) -> Result<Vec<ImageSummary>> {
        let (status, parsed, text) =
            self.json_call::<Vec<ImageSummary>>(Method::GET, "/v1/images", false, Bytes::new())?;
        parsed.ok_or_else(|| Error::Repo(format!("GET /v1/images: {status}: {text}")))
    }

    fn delete(&self, name: &str) -> Result<()> {
        crate::manifest::validate_name(name)?;
        let path = format!("/v1/images/{name}");
        let (status, _, text) =
            self.json_call::<serde_json::Value>(Method::DELETE, &path, true, Bytes::new())?;
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(Error::ImageNotFound(name.to_string())),
            s => Err(Error::Repo(format!(
                "DELETE {}: {s}: {text}",
                self.url(&path)
            ))),
        }
    }
}
