//! A repository in an S3-compatible object store (Garage, Ceph RGW, AWS S3).
//!
//! ```text
//! PREFIX/aula-repo.json                 {"format":"aula-repo","version":1}
//! PREFIX/chunks/ab/<sha256>.zst         one zstd frame per chunk (as in a directory repository)
//! PREFIX/images/<name>/<N>.json         manifest version N (never overwritten)
//! PREFIX/claims/<name>/<N>/<token>      a publisher's claim on version N
//! PREFIX/leases/<token>.json            an upload in progress (renewed while it runs)
//! PREFIX/gc-running                     a garbage collection in progress
//! PREFIX/trash/<name>.<stamp>/<N>.json  deleted images
//! ```
//!
//! The client is written for the store with the fewest guarantees: no
//! conditional writes (Garage ignores `If-None-Match` on `PutObject`), but
//! linearizable single-key writes and listings (Garage's quorum reads and
//! writes; AWS S3 since 2020).
//!
//! * **Chunks** are content addressed: `HEAD`, then `PUT` when absent. Two
//!   writers racing on one id write identical bytes.
//! * **Publishing version N** of an image: a publisher writes a claim
//!   object with a random token under `claims/<name>/<N>/`, then lists that
//!   folder. It owns N only when its claim is the only one; otherwise it
//!   withdraws its claim and tries again (N + 1 when N got published)
//!   after a random pause. Of two writers, at least the later one to write
//!   its claim sees both, so two never both own N; if both withdraw they
//!   retry, and after [`PUBLISH_ATTEMPTS`] the caller gets a clear conflict
//!   error. The owner checks that no manifest N exists, writes it (with
//!   `If-None-Match: *` for stores that honour it) and reads it back.
//!   Claims of a writer that died leave a gap in the numbering, never a
//!   blocked name.
//! * **Garbage collection** (see [`S3Repo::gc`]) never runs while an upload
//!   lease is live, and an upload waits for a running collection before it
//!   trusts that a present chunk will stay: gc writes `gc-running` before
//!   it lists the leases a last time, an upload writes its lease before it
//!   looks for `gc-running`, so one of the two always sees the other.
//!   Unreferenced chunks are removed only once older than the grace
//!   period.
//!
//! Credentials are used to sign requests (AWS Signature Version 4) and are
//! never logged or put in an error message; only the access key id is
//! named when the store refuses it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request, StatusCode};
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};

use super::{check_publishable, ImageSummary, Repository};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::{validate_name, Manifest};
use crate::tls::{client_config, ServerTrust};

/// Largest chunk frame accepted (zstd bound of 64 MiB).
const MAX_FRAME: usize = (64 << 20) + (64 << 20) / 255 + 1024;
/// Largest other object read (manifests of very large disks, listings).
const MAX_OBJECT: usize = 256 << 20;
/// Publish attempts before a conflict is reported.
pub const PUBLISH_ATTEMPTS: u32 = 12;
/// Requests in flight for batch operations (missing checks, gc deletes).
const BATCH_PARALLEL: usize = 32;

/// Where and how to reach the store.
#[derive(Clone)]
pub struct S3Config {
    /// Endpoints (`http://host:port` or `https://…`), tried in turn when one
    /// fails: the nodes of one cluster.
    pub endpoints: Vec<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Signing region (`garage` for Garage, `us-east-1`, …).
    pub region: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
    /// Keep retrying a failing request for this long.
    pub retry_for: Duration,
    /// A response (or the next piece of its body) must arrive within this.
    pub timeout: Duration,
    /// Upload leases expire this long after their last renewal.
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoints", &self.endpoints)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &"…")
            .finish()
    }
}

/// Credentials and endpoint read from a file or the environment.
#[derive(Clone, Default)]
pub struct S3Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_key: String,
    /// `AWS_ENDPOINT_URL` (comma-separated for several nodes).
    pub endpoints: Vec<String>,
    /// `AWS_REGION`.
    pub region: Option<String>,
}

impl S3Credentials {
    /// Read `KEY=VALUE` lines (`#` comments; the `AWS_*` names above).
    /// The file must not be readable by others when it holds a secret.
    pub fn from_file(path: &Path) -> Result<S3Credentials> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            what: format!("reading the S3 credentials file {}", path.display()),
            source: e,
        })?;
        let mut c = S3Credentials::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(Error::Invalid(format!(
                    "{} line {}: expected KEY=VALUE",
                    path.display(),
                    n + 1
                )));
            };
            let v = v.trim().trim_matches('"').to_string();
            c.set(k.trim(), v).map_err(|k| {
                Error::Invalid(format!(
                    "{} line {}: unknown key {k:?} (expected AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or AWS_REGION)",
                    path.display(),
                    n + 1
                ))
            })?;
        }
        c.check(&path.display().to_string())?;
        Ok(c)
    }

    /// Read the `AWS_*` variables of the environment.
    pub fn from_env() -> Result<S3Credentials> {
        let mut c = S3Credentials::default();
        for k in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
        ] {
            if let Ok(v) = std::env::var(k) {
                let _ = c.set(k, v);
            }
        }
        c.check("the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")?;
        Ok(c)
    }

    fn set(&mut self, k: &str, v: String) -> std::result::Result<(), String> {
        match k {
            "AWS_ACCESS_KEY_ID" => self.access_key = v,
            "AWS_SECRET_ACCESS_KEY" => self.secret_key = v,
            "AWS_ENDPOINT_URL" => {
                self.endpoints = v
                    .split(',')
                    .map(|s| s.trim().trim_end_matches('/').to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "AWS_REGION" | "AWS_DEFAULT_REGION" => self.region = Some(v),
            _ => return Err(k.to_string()),
        }
        Ok(())
    }

    fn check(&self, from: &str) -> Result<()> {
        if self.access_key.is_empty() || self.secret_key.is_empty() {
            return Err(Error::Invalid(format!(
                "no S3 access key id and secret in {from}"
            )));
        }
        Ok(())
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3GcReport {
    /// Distinct chunks referenced by some image version.
    pub referenced: u64,
    /// Unreferenced chunks removed.
    pub removed_chunks: u64,
    /// Their stored bytes.
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because younger than the grace period.
    pub kept_recent: u64,
    /// Stale claims and leases removed.
    pub removed_markers: u64,
    /// Nothing was removed because uploads are in progress (their names).
    pub deferred_for: Vec<String>,
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Key, without the repository prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification.
    pub modified: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct Lease {
    name: String,
    holder: String,
    started: u64,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
}

use super::http::HttpClient;

struct Inner {
    cfg: S3Config,
    client: HttpClient,
    current: AtomicUsize,
    /// Chunk reads are spread over the endpoints: the next one's turn.
    next_read: AtomicUsize,
    /// Per endpoint: chunk reads avoid it until this many ms after
    /// `started` (it failed).
    down_until: Vec<AtomicU64>,
    started: Instant,
    /// `/bucket/` or `/bucket/prefix/`, path-style.
    base_path: String,
    /// Key prefix with its trailing `/` (or empty).
    key_prefix: String,
}

/// Leases this client holds: image name → (token, renewal task).
type Leases = HashMap<String, (String, tokio::task::JoinHandle<()>)>;

/// An S3 repository.
pub struct S3Repo {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    /// Its own runtime (always; taken only by drop).
    rt: Option<tokio::runtime::Runtime>,
    leases: Mutex<Leases>,
}

impl std::fmt::Debug for S3Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Repo")
            .field("location", &self.location())
            .finish()
    }
}

enum Fail {
    Retry(String),
    Fatal(Error),
}

/// `s3://bucket/prefix` → (bucket, prefix).
pub fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| Error::Invalid(format!("{url:?} is not an s3://BUCKET[/PREFIX] URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(Error::Invalid(format!(
            "invalid bucket name {bucket:?} in {url:?}: 3-63 characters from a-z 0-9 . -"
        )));
    }
    let prefix = prefix.trim_matches('/').to_string();
    if !prefix.split('/').all(|s| {
        s.is_empty()
            || (s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    }) || prefix.contains("//")
    {
        return Err(Error::Invalid(format!(
            "invalid key prefix {prefix:?} in {url:?}: segments from A-Z a-z 0-9 . _ -"
        )));
    }
    Ok((bucket.to_string(), prefix))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_token() -> String {
    let mut b = [0u8; 12];
    // A failing system RNG still leaves a unique-enough token from time and pid.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    hex::encode(b)
}

/// RFC 3986 encoding of everything but unreserved characters (and `/`
/// when `keep_slash`), as Signature Version 4 wants.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
}

/// The first `<tag>…</tag>` text of an XML document.
fn xml_text<'a>(doc: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let s = doc.find(&open)? + open.len();
    let e = doc[s..].find(&close)? + s;
    Some(&doc[s..e])
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

/// The `Authorization` header of AWS Signature Version 4 for a request
/// whose headers to sign (lower-case names) are `headers`.
#[allow(clippy::too_many_arguments)]
fn sigv4_authorization(
    method: &str,
    path: &str,
    canon_query: &str,
    headers: &BTreeMap<String, String>,
    payload_hash: &str,
    amz_date: &str,
    region: &str,
    access_key: &str,
    secret_key: &str,
) -> String {
    let date = &amz_date[..8.min(amz_date.len())];
    let signed_headers = headers.keys().cloned().collect::<Vec<_>>().join(";");
    let mut canon = format!("{method}\n{path}\n{canon_query}\n");
    for (k, v) in headers {
        let _ = writeln!(canon, "{k}:{v}");
    }
    let _ = write!(canon, "\n{signed_headers}\n{payload_hash}");
    let scope = format!("{date}/{region}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canon.as_bytes())
    );
    let k_date = hmac_sha256(format!("AWS4{secret_key}").as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(k_date.as_ref(), region.as_bytes());
    let k_service = hmac_sha256(k_region.as_ref(), b"s3");
    let k_signing = hmac_sha256(k_service.as_ref(), b"aws4_request");
    let signature = hex::encode(hmac_sha256(k_signing.as_ref(), to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
}

impl Inner {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.key_prefix)
    }

    /// Build and sign one request.
    fn signed(
        &self,
        endpoint: &str,
        method: &Method,
        key: Option<&str>,
        query: &BTreeMap<String, String>,
        extra: &[(&str, String)],
        body: Bytes,
    ) -> std::result::Result<Request<Full<Bytes>>, Fail> {
        let path = match key {
            Some(k) => format!("/{}/{}", self.cfg.bucket, uri_encode(&self.key(k), true)),
            None => format!("/{}", self.cfg.bucket),
        };
        let canon_query = query
            .iter()
            .map(|(k, v)| format!("{}={}", uri_encode(k, false), uri_encode(v, false)))
            .collect::<Vec<_>>()
            .join("&");
        let uri = if canon_query.is_empty() {
            format!("{endpoint}{path}")
        } else {
            format!("{endpoint}{path}?{canon_query}")
        };
        let parsed: hyper::Uri = uri
            .parse()
            .map_err(|e| Fail::Fatal(Error::Invalid(format!("invalid S3 URL {uri}: {e}"))))?;
        let host = match (parsed.host(), parsed.port_u16()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => {
                return Err(Fail::Fatal(Error::Invalid(format!(
                    "S3 endpoint {endpoint} has no host"
                ))))
            }
        };
        let now = time::OffsetDateTime::now_utc();
        let amz_date = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            now.month() as u8,
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let payload_hash = sha256_hex(&body);
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        headers.insert("host".into(), host);
        headers.insert("x-amz-content-sha256".into(), payload_hash.clone());
        headers.insert("x-amz-date".into(), amz_date.clone());
        for (k, v) in extra {
            headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
        }
        let auth = sigv4_authorization(
            method.as_str(),
            &path,
            &canon_query,
            &headers,
            &payload_hash,
            &amz_date,
            &self.cfg.region,
            &self.cfg.access_key,
            &self.cfg.secret_key,
        );
        let mut b = Request::builder().method(method.clone()).uri(parsed);
        for (k, v) in &headers {
            if k != "host" {
                b = b.header(k.as_str(), v.as_str());
            }
        }
        b = b.header(hyper::header::AUTHORIZATION, auth);
        b = b.header(CONTENT_LENGTH, body.len());
        b.body(Full::new(body))
            .map_err(|e| Fail::Fatal(Error::Invalid(format!("building an S3 request: {e}"))))
    }

    /// One attempt: send and read the body (bounded).
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        endpoint: &str,
        method: &Method,
        key: Option<&str>,
        query: &BTreeMap<String, String>,
        extra: &[(&str, String)],
        body: Bytes,
        limit: usize,
    ) -> std::result::Result<(StatusCode, hyper::HeaderMap, Vec<u8>), Fail> {
        let req = self.signed(endpoint, method, key, query, extra, body)?;
        let what = format!(
            "{method} {endpoint}/{}/{}",
            self.cfg.bucket,
            key.map(|k| self.key(k)).unwrap_or_default()
        );
        let resp = self.send(&what, req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let out = self.read_body(&what, resp.into_body(), limit).await?;
        self.judge(&what, status, &out)?;
        Ok((status, headers, out))
    }

    /// Sends a signed request; no answer within the timeout, or a
    /// connection error, is worth a retry (on the next endpoint).
    async fn send(
        &self,
        what: &str,
        req: Request<Full<Bytes>>,
    ) -> std::result::Result<hyper::Response<hyper::body::Incoming>, Fail> {
        match tokio::time::timeout(self.cfg.timeout, self.client.request(req)).await {
            Err(_) => Err(Fail::Retry(format!(
                "{what}: no response within {:?}",
                self.cfg.timeout
            ))),
            Ok(Err(e)) => Err(Fail::Retry(format!("{what}: {}", error_chain(&e)))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A response body, whole (at most `limit` bytes).
    async fn read_body(
        &self,
        what: &str,
        mut body: hyper::body::Incoming,
        limit: usize,
    ) -> std::result::Result<Vec<u8>, Fail> {
        let mut out = Vec::new();
        loop {
            let frame = match tokio::time::timeout(self.cfg.timeout, body.frame()).await {
                Err(_) => return Err(Fail::Retry(format!("{what}: body stalled"))),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(Fail::Retry(format!(
                        "{what}: reading body: {}",
                        error_chain(&e)
                    )))
                }
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(d) = frame.into_data() {
                if out.len() + d.len() > limit {
                    return Err(Fail::Fatal(Error::Repo(format!(
                        "{what}: response larger than {limit} bytes"
                    ))));
                }
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    /// Errors worth another attempt (the store is busy or a node is
    /// down) and refusals (credentials), from a status and its body.
    fn judge(&self, what: &str, status: StatusCode, out: &[u8]) -> std::result::Result<(), Fail> {
        if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            return Err(Fail::Retry(format!(
                "{what}: {status}{}",
                s3_error_text(out)
            )));
        }
        if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
            let text = String::from_utf8_lossy(out);
            let code = xml_text(&text, "Code").unwrap_or("");
            // Garage answers AccessDenied for both, saying which in the message.
            let message = xml_text(&text, "Message")
                .unwrap_or("")
                .to_ascii_lowercase();
            let code = if message.contains("signature") {
                "SignatureDoesNotMatch"
            } else if message.contains("no such key") {
                "InvalidAccessKeyId"
            } else {
                code
            };
            let why = match code {
                "InvalidAccessKeyId" | "InvalidAccessKey" => format!(
                    "the S3 store does not know access key {} (wrong credentials?)",
                    self.cfg.access_key
                ),
                "SignatureDoesNotMatch" | "InvalidSignature" | "InvalidRequest" => format!(
                    "the S3 store refused the signature of access key {}: wrong secret key or region ({})",
                    self.cfg.access_key, self.cfg.region
                ),
                "AccessDenied" | "" => format!(
                    "access key {} may not do this in bucket {} (or the credentials are wrong)",
                    self.cfg.access_key, self.cfg.bucket
                ),
                c => format!("access key {} refused: {c}", self.cfg.access_key),
            };
            return Err(Fail::Fatal(Error::Repo(format!("{what}: {status}: {why}"))));
        }
        Ok(())
    }
}

fn s3_error_text(body: &[u8]) -> String {
    let t = String::from_utf8_lossy(body);
    match (xml_text(&t, "Code"), xml_text(&t, "Message")) {
        (Some(c), Some(m)) => format!(" ({c}: {})", xml_unescape(m)),
        (Some(c), None) => format!(" ({c})"),
        _ => String::new(),
    }
}

/// Result of one S3 call: status, headers, body.
type Answer = (StatusCode, hyper::HeaderMap, Vec<u8>);

/// How long chunk reads avoid an endpoint that failed.
const READ_AVOID: Duration = Duration::from_secs(10);
/// Pieces of a streamed chunk waiting for the reader.
const STREAM_PIECES: usize = 16;

/// A chunk's bytes as they arrive from the store ([`S3Repo::open_chunk`]).
#[derive(Debug)]
pub struct ChunkStream {
    /// 200 (the whole frame) or 206 (the range asked for).
    pub status: StatusCode,
    /// Bytes this answer carries.
    pub len: u64,
    /// Size of the whole frame.
    pub total: u64,
    /// The body in pieces, `len` bytes in all; an error ends it early (the
    /// store's answer broke off after its headers).
    pub body: tokio::sync::mpsc::Receiver<Result<Bytes>>,
}

impl Inner {
    /// The endpoint for a chunk read's `turn`-th attempt: in turn, skipping
    /// endpoints that failed in the last [`READ_AVOID`] unless all did.
    fn read_endpoint(&self, turn: usize) -> usize {
        let n = self.cfg.endpoints.len();
        let now = self.started.elapsed().as_millis() as u64;
        (0..n)
            .map(|k| (turn + k) % n)
            .find(|&i| self.down_until[i].load(Ordering::Relaxed) <= now)
            .unwrap_or(turn % n)
    }

    fn avoid(&self, idx: usize) {
        let until = (self.started.elapsed() + READ_AVOID).as_millis() as u64;
        self.down_until[idx].store(until, Ordering::Relaxed);
    }

    /// GET a chunk object (bytes `range` of it) and return the response
    /// once its headers say it is there (None: absent), retrying across
    /// the endpoints until then.
    async fn open_get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Option<(hyper::Response<hyper::body::Incoming>, String)>> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        let n = self.cfg.endpoints.len();
        let first = self.next_read.fetch_add(1, Ordering::Relaxed);
        let extra: Vec<(&str, String)> = range
            .map(|(a, b)| ("range", format!("bytes={a}-{b}")))
            .into_iter()
            .collect();
        let mut tries = 0usize;
        loop {
            let idx = self.read_endpoint(first.wrapping_add(tries));
            tries += 1;
            let endpoint = &self.cfg.endpoints[idx];
            let what = format!("GET {endpoint}/{}/{}", self.cfg.bucket, self.key(key));
            let attempt = async {
                let req = self.signed(
                    endpoint,
                    &Method::GET,
                    Some(key),
                    &BTreeMap::new(),
                    &extra,
                    Bytes::new(),
                )?;
                let resp = self.send(&what, req).await?;
                let status = resp.status();
                if status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT {
                    return Ok(Some(resp));
                }
                let out = self.read_body(&what, resp.into_body(), 1 << 20).await?;
                if status == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                self.judge(&what, status, &out)?;
                Err(Fail::Fatal(Error::Repo(format!(
                    "{what}: {status}{}",
                    s3_error_text(&out)
                ))))
            };
            match attempt.await {
                Ok(r) => return Ok(r.map(|r| (r, what))),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(why)) => {
                    self.avoid(idx);
                    if start.elapsed() + delay > self.cfg.retry_for {
                        return Err(Error::Repo(format!(
                            "giving up after {tries} attempts over {:.0} s: {why}",
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    tracing::warn!("S3: {why}; trying another endpoint");
                    if tries.is_multiple_of(n) {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }
}

/// The number in header `name`.
fn header_u64(h: &hyper::HeaderMap, name: hyper::header::HeaderName) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl S3Repo {
    /// Open the repository at `cfg` (bucket and prefix), creating its
    /// marker when `create` and the prefix holds none.
    pub fn open(cfg: S3Config, create: bool) -> Result<S3Repo> {
        if cfg.endpoints.is_empty() {
            return Err(Error::Invalid(
                "no S3 endpoint: set AWS_ENDPOINT_URL (in the credentials file or the environment) or repository.s3.endpoints".into(),
            ));
        }
        for e in &cfg.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Error::Invalid(format!(
                    "S3 endpoint {e:?} must start with http:// or https://"
                )));
            }
        }
        // Its own runtime, whoever calls: callers block on it (from
        // plain threads, or, inside another runtime, from a helper thread).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("aula-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Io {
                what: "starting the S3 client runtime".into(),
                source: e,
            })?;
        let handle = rt.handle().clone();
        let client = super::http::pooled_client(
            client_config(&ServerTrust::System)?,
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        let key_prefix = if cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", cfg.prefix)
        };
        let inner = Arc::new(Inner {
            base_path: format!("/{}/{key_prefix}", cfg.bucket),
            key_prefix,
            down_until: (0..cfg.endpoints.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            cfg,
            client,
            current: AtomicUsize::new(0),
            next_read: AtomicUsize::new(0),
            started: Instant::now(),
        });
        let repo = S3Repo {
            inner,
            handle,
            rt: Some(rt),
            leases: Mutex::new(HashMap::new()),
        };
        repo.check_marker(create)?;
        Ok(repo)
    }

    fn check_marker(&self, create: bool) -> Result<()> {
        match self.get_object("aula-repo.json", MAX_OBJECT)? {
            Some(bytes) => {
                let m: Marker = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Repo(format!(
                        "{}aula-repo.json is not a repository marker: {e}",
                        self.location()
                    ))
                })?;
                if m.format != "aula-repo" || m.version != 1 {
                    return Err(Error::Repo(format!(
                        "{} is a {} v{} repository, this build handles aula-repo v1",
                        self.location(),
                        m.format,
                        m.version
                    )));
                }
                Ok(())
            }
            None if create => {
                let body = serde_json::to_vec(&Marker {
                    format: "aula-repo".into(),
                    version: 1,
                })
                .map_err(|e| Error::Repo(e.to_string()))?;
                self.put_object("aula-repo.json", Bytes::from(body), &[])
            }
            None => Err(Error::Repo(format!(
                "{} is not an Aula repository (no aula-repo.json); create an image into it first",
                self.location()
            ))),
        }
    }

    /// Run `f` on the client's runtime and wait. Inside another runtime
    /// (a boot server's blocking worker, or its start-up) that wait happens
    /// on a helper thread, where blocking is always allowed.
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.handle.block_on(f);
        }
        std::thread::scope(|s| match s.spawn(|| self.handle.block_on(f)).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    /// One call with retries across the endpoints.
    async fn call(
        inner: &Inner,
        method: Method,
        key: Option<&str>,
        query: &BTreeMap<String, String>,
        extra: &[(&str, String)],
        body: Bytes,
        limit: usize,
    ) -> Result<Answer> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut tries = 0u32;
        let n = inner.cfg.endpoints.len();
        loop {
            tries += 1;
            let idx = inner.current.load(Ordering::Relaxed) % n;
            let endpoint = &inner.cfg.endpoints[idx];
            match inner
                .exchange(endpoint, &method, key, query, extra, body.clone(), limit)
                .await
            {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(why)) => {
                    // Another node of the cluster may answer.
                    let _ = inner.current.compare_exchange(
                        idx,
                        (idx + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if start.elapsed() + delay > inner.cfg.retry_for {
                        return Err(Error::Repo(format!(
                            "giving up after {tries} attempts over {:.0} s: {why}",
                            start.elapsed().as_secs_f64()
                        )));
                    }
                    tracing::warn!("S3: {why}; retrying in {:.2} s", delay.as_secs_f64());
                    // The next endpoint is tried at once; a full round waits.
                    if (tries as usize).is_multiple_of(n) {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    fn call_blocking(
        &self,
        method: Method,
        key: Option<&str>,
        query: &BTreeMap<String, String>,
        extra: &[(&str, String)],
        body: Bytes,
        limit: usize,
    ) -> Result<Answer> {
        self.block_on(Self::call(
            &self.inner,
            method,
            key,
            query,
            extra,
            body,
            limit,
        ))
    }

    fn unexpected(&self, what: &str, key: &str, status: StatusCode, body: &[u8]) -> Error {
        Error::Repo(format!(
            "{what} {}{}: {status}{}",
            self.location(),
            key,
            s3_error_text(body)
        ))
    }

    /// An object's bytes, or None when absent.
    pub fn get_object(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        let (s, _, body) = self.call_blocking(
            Method::GET,
            Some(key),
            &BTreeMap::new(),
            &[],
            Bytes::new(),
            limit,
        )?;
        match s {
            StatusCode::OK => Ok(Some(body)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.unexpected("reading", key, s, &body)),
        }
    }

    /// An object's size, or None when absent.
    pub fn head_object(&self, key: &str) -> Result<Option<u64>> {
        self.block_on(Self::head_async(self.inner.clone(), key.to_string()))
    }

    async fn head_async(inner: Arc<Inner>, key: String) -> Result<Option<u64>> {
        let (s, h, body) = Self::call(
            &inner,
            Method::HEAD,
            Some(&key),
            &BTreeMap::new(),
            &[],
            Bytes::new(),
            0,
        )
        .await?;
        match s {
            StatusCode::OK => Ok(h
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Error::Repo(format!(
                "checking {}{key}: {s}{}",
                inner.base_path,
                s3_error_text(&body)
            ))),
        }
    }

    fn put_object(&self, key: &str, body: Bytes, extra: &[(&str, String)]) -> Result<()> {
        let (s, _, b) = self.call_blocking(
            Method::PUT,
            Some(key),
            &BTreeMap::new(),
            extra,
            body,
            MAX_OBJECT,
        )?;
        if s.is_success() {
            Ok(())
        } else if s == StatusCode::PRECONDITION_FAILED {
            Err(Error::Repo(format!(
                "{}{key} exists already",
                self.location()
            )))
        } else {
            Err(self.unexpected("writing", key, s, &b))
        }
    }

    /// Remove an object (absent is fine).
    pub fn delete_object(&self, key: &str) -> Result<()> {
        self.block_on(Self::delete_async(self.inner.clone(), key.to_string()))
    }

    async fn delete_async(inner: Arc<Inner>, key: String) -> Result<()> {
        let (s, _, b) = Self::call(
            &inner,
            Method::DELETE,
            Some(&key),
            &BTreeMap::new(),
            &[],
            Bytes::new(),
            MAX_OBJECT,
        )
        .await?;
        if s.is_success() || s == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(Error::Repo(format!(
                "removing {}{key}: {s}{}",
                inner.base_path,
                s3_error_text(&b)
            )))
        }
    }

    /// Every object under `prefix` (relative to the repository), in key order.
    pub fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let full_prefix = self.inner.key(prefix);
        loop {
            let mut q = BTreeMap::new();
            q.insert("list-type".to_string(), "2".to_string());
            q.insert("prefix".to_string(), full_prefix.clone());
            q.insert("max-keys".to_string(), "1000".to_string());
            if let Some(t) = &token {
                q.insert("continuation-token".to_string(), t.clone());
            }
            let (s, _, body) =
                self.call_blocking(Method::GET, None, &q, &[], Bytes::new(), MAX_OBJECT)?;
            if !s.is_success() {
                return Err(self.unexpected("listing", prefix, s, &body));
            }
            let text = String::from_utf8_lossy(&body);
            let mut rest: &str = &text;
            while let Some(i) = rest.find("<Contents>") {
                let after = &rest[i + "<Contents>".len()..];
                let end = after.find("</Contents>").unwrap_or(after.len());
                let item = &after[..end];
                rest = &after[end..];
                let Some(key) = xml_text(item, "Key").map(xml_unescape) else {
                    continue;
                };
                let Some(rel) = key.strip_prefix(&self.inner.key_prefix) else {
                    continue;
                };
                let size = xml_text(item, "Size")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let modified = xml_text(item, "LastModified")
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .map(SystemTime::from)
                    .unwrap_or(UNIX_EPOCH);
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size,
                    modified,
                });
            }
            let truncated = xml_text(&text, "IsTruncated") == Some("true");
            token = xml_text(&text, "NextContinuationToken").map(xml_unescape);
            if !truncated || token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Key of a chunk.
    pub fn chunk_key(id: &ChunkId) -> String {
        let h = id.hex();
        format!("chunks/{}/{h}.zst", &h[..2])
    }

    /// Bytes `start ..= end` of a chunk's frame (a ranged GET); None when
    /// the chunk is absent.
    pub fn get_chunk_range(&self, id: &ChunkId, start: u64, end: u64) -> Result<Option<Vec<u8>>> {
        let key = Self::chunk_key(id);
        let (s, _, body) = self.call_blocking(
            Method::GET,
            Some(&key),
            &BTreeMap::new(),
            &[("range", format!("bytes={start}-{end}"))],
            Bytes::new(),
            MAX_FRAME,
        )?;
        match s {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => Ok(Some(body)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.unexpected("reading", &key, s, &body)),
        }
    }

    /// A chunk's frame (or bytes `start ..= end` of it) as it arrives,
    /// spreading reads over the endpoints; None when the chunk is absent.
    /// Endpoints are retried until the answer's headers arrive; a break
    /// after that ends [`ChunkStream::body`] with an error. Callable from
    /// any runtime: the transfer runs on the client's own.
    pub async fn open_chunk(
        &self,
        id: &ChunkId,
        range: Option<(u64, u64)>,
    ) -> Result<Option<ChunkStream>> {
        let inner = self.inner.clone();
        let key = Self::chunk_key(id);
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        self.handle.spawn(async move {
            let (resp, what) = match inner.open_get(&key, range).await {
                Ok(Some(r)) => r,
                Ok(None) => return drop(head_tx.send(Ok(None))),
                Err(e) => return drop(head_tx.send(Err(e))),
            };
            let status = resp.status();
            let h = resp.headers();
            let Some(len) = header_u64(h, CONTENT_LENGTH) else {
                let e = Error::Repo(format!("{what}: the store sent no Content-Length"));
                return drop(head_tx.send(Err(e)));
            };
            let total = if status == StatusCode::PARTIAL_CONTENT {
                h.get(hyper::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('/').next())
                    .and_then(|t| t.trim().parse().ok())
            } else {
                Some(len)
            };
            let Some(total) = total else {
                let e = Error::Repo(format!(
                    "{what}: partial answer without a usable Content-Range"
                ));
                return drop(head_tx.send(Err(e)));
            };
            if len > MAX_FRAME as u64 {
                let e = Error::Repo(format!(
                    "{what}: {len} bytes is larger than any chunk frame"
                ));
                return drop(head_tx.send(Err(e)));
            }
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_PIECES);
            let stream = ChunkStream {
                status,
                len,
                total,
                body: rx,
            };
            if head_tx.send(Ok(Some(stream))).is_err() {
                return;
            }
            let mut body = resp.into_body();
            let mut got = 0u64;
            let end = loop {
                match tokio::time::timeout(inner.cfg.timeout, body.frame()).await {
                    Err(_) => break Some(format!("{what}: body stalled after {got} bytes")),
                    Ok(None) if got == len => break None,
                    Ok(None) => {
                        break Some(format!("{what}: body ended after {got} of {len} bytes"))
                    }
                    Ok(Some(Err(e))) => {
                        break Some(format!("{what}: reading body: {}", error_chain(&e)))
                    }
                    Ok(Some(Ok(f))) => {
                        let Ok(d) = f.into_data() else { continue };
                        got += d.len() as u64;
                        if got > len {
                            break Some(format!("{what}: body longer than its {len} bytes"));
                        }
                        if tx.send(Ok(d)).await.is_err() {
                            // The reader is gone.
                            break None;
                        }
                    }
                }
            };
            if let Some(why) = end {
                let _ = tx.send(Err(Error::Repo(why))).await;
            }
        });
        head_rx
            .await
            .map_err(|_| Error::Repo("the S3 client stopped during a read".into()))?
    }

    /// Store a chunk unless present; true when this call stored it.
    pub fn put_chunk_if_absent(&self, id: &ChunkId, frame: &[u8]) -> Result<bool> {
        let key = Self::chunk_key(id);
        if self.head_object(&key)?.is_some() {
            return Ok(false);
        }
        self.put_object(&key, Bytes::copy_from_slice(frame), &[])?;
        Ok(true)
    }

    /// Version numbers of an image, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u32>> {
        validate_name(name)?;
        let mut v: Vec<u32> = self
            .list_objects(&format!("images/{name}/"))?
            .iter()
            .filter_map(|o| {
                o.key
                    .rsplit('/')
                    .next()
                    .and_then(|f| f.strip_suffix(".json"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Highest version claimed (published or being published).
    fn highest_claimed(&self, name: &str) -> Result<u32> {
        let claims = self.list_objects(&format!("claims/{name}/"))?;
        Ok(claims
            .iter()
            .filter_map(|o| o.key.split('/').nth(2).and_then(|n| n.parse::<u32>().ok()))
            .max()
            .unwrap_or(0))
    }

    /// Store a manifest under its own version (migration): a version
    /// present with the same bytes is left alone; a different one is an
    /// error (versions are never overwritten).
    pub fn store_version(&self, m: &Manifest) -> Result<bool> {
        validate_name(&m.name)?;
        let key = format!("images/{}/{}.json", m.name, m.image_version);
        let body = m.to_json();
        if let Some(old) = self.get_object(&key, MAX_OBJECT)? {
            if old == body {
                return Ok(false);
            }
            return Err(Error::Repo(format!(
                "{}{key} exists with a different manifest; versions are never overwritten",
                self.location()
            )));
        }
        self.put_object(
            &format!("claims/{}/{}/migrated", m.name, m.image_version),
            Bytes::from_static(b"migrated"),
            &[],
        )?;
        self.put_object(&key, Bytes::from(body), &[])?;
        Ok(true)
    }

    /// Which of `ids` are absent, asking in parallel.
    fn missing_parallel(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let inner = self.inner.clone();
        let ids = ids.to_vec();
        self.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(BATCH_PARALLEL));
            let mut set = tokio::task::JoinSet::new();
            for (i, id) in ids.iter().enumerate() {
                let inner = inner.clone();
                let sem = sem.clone();
                let key = Self::chunk_key(id);
                set.spawn(async move {
                    let _p = sem.acquire_owned().await;
                    (i, Self::head_async(inner, key).await)
                });
            }
            let mut absent = vec![false; ids.len()];
            while let Some(r) = set.join_next().await {
                let (i, res) = r.map_err(|e| Error::Repo(format!("a chunk check failed: {e}")))?;
                absent[i] = res?.is_none();
            }
            Ok(ids
                .iter()
                .zip(absent)
                .filter(|(_, a)| *a)
                .map(|(id, _)| *id)
                .collect())
        })
    }

    /// Announce an upload of image `name`: a lease object, renewed in the
    /// background until [`S3Repo::end_upload`] (or drop), keeps gc from
    /// removing anything meanwhile. Waits for a gc in progress to end
    /// first, so that present chunks found afterwards stay. Idempotent.
    pub fn start_upload(&self, name: &str) -> Result<()> {
        if let Ok(l) = self.leases.lock() {
            if l.contains_key(name) {
                return Ok(());
            }
        }
        let token = random_token();
        let key = format!("leases/{token}.json");
        let lease = Lease {
            name: name.to_string(),
            holder: format!(
                "{}:{}",
                std::fs::read_to_string("/etc/hostname")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
                std::process::id()
            ),
            started: now_unix(),
        };
        let body = Bytes::from(serde_json::to_vec(&lease).map_err(|e| Error::Repo(e.to_string()))?);
        self.put_object(&key, body.clone(), &[])?;
        let inner = self.inner.clone();
        let every = self.inner.cfg.lease_ttl / 3;
        let renew_key = key.clone();
        let task = self.handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = Self::call(
                    &inner,
                    Method::PUT,
                    Some(&renew_key),
                    &BTreeMap::new(),
                    &[],
                    body.clone(),
                    MAX_OBJECT,
                )
                .await
                {
                    tracing::warn!("renewing the upload lease: {e}");
                }
            }
        });
        if let Ok(mut l) = self.leases.lock() {
            l.insert(name.to_string(), (token, task));
        }
        // A gc that started before our lease was visible may still be
        // removing chunks: wait for it (bounded by its marker's lifetime).
        let waited = Instant::now();
        loop {
            let live = self
                .list_objects("gc-running")?
                .into_iter()
                .any(|o| self.age(o.modified) < self.gc_marker_ttl());
            if !live {
                break;
            }
            if waited.elapsed() > self.gc_marker_ttl() {
                break;
            }
            tracing::info!("waiting for a garbage collection of the repository to end");
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// End the upload lease of `name` (no-op without one).
    pub fn end_upload(&self, name: &str) -> Result<()> {
        let lease = self.leases.lock().ok().and_then(|mut l| l.remove(name));
        if let Some((token, task)) = lease {
            task.abort();
            self.delete_object(&format!("leases/{token}.json"))?;
        }
        Ok(())
    }

    fn age(&self, t: SystemTime) -> Duration {
        SystemTime::now().duration_since(t).unwrap_or_default()
    }

    fn gc_marker_ttl(&self) -> Duration {
        Duration::from_secs(600)
    }

    /// Garbage-collect: remove chunks no image version references and that
    /// are older than `grace`, unless an upload lease is live (then
    /// nothing is removed and the report names the uploads). Also removes
    /// expired leases and claims of versions never published whose age
    /// passed the grace period.
    pub fn gc(&self, grace: Duration) -> Result<S3GcReport> {
        let mut report = S3GcReport::default();
        let live_leases = |repo: &S3Repo, report: &mut S3GcReport| -> Result<Vec<String>> {
            let mut names = Vec::new();
            for o in repo.list_objects("leases/")? {
                if repo.age(o.modified) < repo.inner.cfg.lease_ttl {
                    // Gone since the listing: that upload ended.
                    let Some(body) = repo.get_object(&o.key, MAX_OBJECT)? else {
                        continue;
                    };
                    let name = serde_json::from_slice::<Lease>(&body)
                        .map(|l| l.name)
                        .unwrap_or_else(|_| o.key.clone());
                    names.push(name);
                } else {
                    repo.delete_object(&o.key)?;
                    report.removed_markers += 1;
                }
            }
            names.sort();
            names.dedup();
            Ok(names)
        };
        let first = live_leases(self, &mut report)?;
        if !first.is_empty() {
            report.deferred_for = first;
            return Ok(report);
        }
        let marker = format!("gc-running/{}", random_token());
        self.put_object(&marker, Bytes::from_static(b"gc"), &[])?;
        let res = self.gc_sweep(grace, &mut report, &live_leases);
        let cleanup = self.delete_object(&marker);
        res?;
        cleanup?;
        tracing::info!(?report, location = %self.location(), "garbage collection");
        Ok(report)
    }

    fn gc_sweep(
        &self,
        grace: Duration,
        report: &mut S3GcReport,
        live_leases: &dyn Fn(&S3Repo, &mut S3GcReport) -> Result<Vec<String>>,
    ) -> Result<()> {
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        let mut published: HashSet<(String, u32)> = HashSet::new();
        for o in self.list_objects("images/")? {
            let mut parts = o.key.split('/');
            let (Some(_), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(v) = file
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let m = self.manifest(name, Some(v))?;
            referenced.extend(m.unique_chunks().into_iter().map(|(id, _)| id));
            published.insert((name.to_string(), v));
        }
        report.referenced = referenced.len() as u64;
        let mut doomed = Vec::new();
        for o in self.list_objects("chunks/")? {
            let Some(id) = o
                .key
                .rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".zst"))
                .and_then(|h| h.parse::<ChunkId>().ok())
            else {
                continue;
            };
            if referenced.contains(&id) {
                continue;
            }
            if self.age(o.modified) < grace {
                report.kept_recent += 1;
                continue;
            }
            doomed.push(o);
        }
        // The last look: an upload whose lease appeared after the first
        // one will wait for our marker to go.
        let late = live_leases(self, report)?;
        if !late.is_empty() {
            report.deferred_for = late;
            return Ok(());
        }
        let keys: Vec<String> = doomed.iter().map(|o| o.key.clone()).collect();
        self.delete_parallel(&keys)?;
        report.removed_chunks = doomed.len() as u64;
        report.freed_bytes = doomed.iter().map(|o| o.size).sum();
        // Claims of versions never published (a publisher that died).
        let mut stale = Vec::new();
        for o in self.list_objects("claims/")? {
            let mut p = o.key.split('/');
            let (Some(_), Some(name), Some(v)) = (p.next(), p.next(), p.next()) else {
                continue;
            };
            let Ok(v) = v.parse::<u32>() else { continue };
            if !published.contains(&(name.to_string(), v)) && self.age(o.modified) >= grace {
                stale.push(o.key.clone());
            }
        }
        report.removed_markers += stale.len() as u64;
        self.delete_parallel(&stale)?;
        Ok(())
    }

    fn delete_parallel(&self, keys: &[String]) -> Result<()> {
        let inner = self.inner.clone();
        let keys = keys.to_vec();
        self.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(BATCH_PARALLEL));
            let mut set = tokio::task::JoinSet::new();
            for k in keys {
                let inner = inner.clone();
                let sem = sem.clone();
                set.spawn(async move {
                    let _p = sem.acquire_owned().await;
                    Self::delete_async(inner, k).await
                });
            }
            while let Some(r) = set.join_next().await {
                r.map_err(|e| Error::Repo(format!("a delete failed: {e}")))??;
            }
            Ok(())
        })
    }

    /// Claim and write the next version of `m`'s image (see the module
    /// documentation).
    fn publish_claimed(&self, m: &Manifest) -> Result<u32> {
        let name = &m.name;
        let mut last_seen = 0u32;
        for attempt in 0..PUBLISH_ATTEMPTS {
            let newest = self.versions(name)?.last().copied().unwrap_or(0);
            let next = newest.max(self.highest_claimed(name)?).max(last_seen) + 1;
            let token = random_token();
            let claim = format!("claims/{name}/{next}/{token}");
            self.put_object(&claim, Bytes::from_static(b"claim"), &[])?;
            let claims = self.list_objects(&format!("claims/{name}/{next}/"))?;
            let mine_alone = claims.len() == 1 && claims[0].key == claim;
            let key = format!("images/{name}/{next}.json");
            if mine_alone && self.head_object(&key)?.is_none() {
                let mut mm = m.clone();
                mm.image_version = next;
                let body = mm.to_json();
                self.put_object(
                    &key,
                    Bytes::from(body.clone()),
                    &[("if-none-match", "*".to_string())],
                )?;
                let back = self.get_object(&key, MAX_OBJECT)?;
                if back.as_deref() == Some(&body[..]) {
                    return Ok(next);
                }
                return Err(Error::Repo(format!(
                    "publishing {name}: version {next} changed under us (another writer that does not claim versions?)"
                )));
            }
            // Someone else wants `next` too: withdraw and try again.
            self.delete_object(&claim)?;
            last_seen = next.saturating_sub(1);
            let mut r = [0u8; 2];
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
            let pause = 20 + (u16::from_le_bytes(r) as u64 % 80) * (attempt as u64 + 1);
            tracing::debug!(image = %name, version = next, "version claimed by another writer; retrying");
            std::thread::sleep(Duration::from_millis(pause));
        }
        Err(Error::Repo(format!(
            "publishing {name}: conflict: other writers kept publishing this image at the same moment ({PUBLISH_ATTEMPTS} attempts); try again"
        )))
    }
}

impl Drop for S3Repo {
    fn drop(&mut self) {
        let leases: Vec<(String, tokio::task::JoinHandle<()>)> = self
            .leases
            .lock()
            .map(|mut l| l.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for (token, task) in leases {
            task.abort();
            if let Err(e) = self.delete_object(&format!("leases/{token}.json")) {
                tracing::warn!("ending an upload lease: {e}");
            }
        }
        // Dropping a runtime blocks, which is refused inside another one.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Repository for S3Repo {
    fn location(&self) -> String {
        format!("s3://{}", self.inner.base_path.trim_start_matches('/'))
    }

    fn chunk_size_stored(&self, id: &ChunkId) -> Result<Option<u64>> {
        self.head_object(&Self::chunk_key(id))
    }

    fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        self.missing_parallel(ids)
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<()> {
        self.put_chunk_if_absent(id, frame).map(|_| ())
    }

    fn get_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        match self.get_object(&Self::chunk_key(id), MAX_FRAME)? {
            Some(b) => {
                *out = b;
                Ok(())
            }
            None => Err(Error::ChunkMissing(*id)),
        }
    }

    fn preferred_threads(&self) -> usize {
        16
    }

    fn begin_upload(&self, name: &str) {
        if let Err(e) = self.start_upload(name) {
            tracing::warn!("announcing the upload of {name}: {e}");
        }
    }

    fn fetch_attempts(&self) -> u32 {
        3
    }

    fn sync_chunks(&self) -> Result<()> {
        // A PUT is acknowledged once the store wrote it (Garage: a write
        // quorum of nodes).
        Ok(())
    }

    fn publish(&self, manifest: &Manifest) -> Result<u32> {
        check_publishable(self, manifest)?;
        let v = self.publish_claimed(manifest)?;
        self.end_upload(&manifest.name)?;
        Ok(v)
    }

    fn manifest(&self, name: &str, version: Option<u32>) -> Result<Manifest> {
        validate_name(name)?;
        let v = match version {
            Some(v) => v,
            None => *self
                .versions(name)?
                .last()
                .ok_or_else(|| Error::ImageNotFound(name.to_string()))?,
        };
        let key = format!("images/{name}/{v}.json");
        let bytes = self
            .get_object(&key, MAX_OBJECT)?
            .ok_or_else(|| Error::ImageNotFound(format!("{name}@{v}")))?;
        let m = Manifest::from_json(&bytes, &format!("{}{key}", self.location()))?;
        if m.name != name {
            return Err(Error::BadManifest {
                source_name: Some(key),
                why: format!("names image {:?}, stored under {name:?}", m.name),
            });
        }
        Ok(m)
    }

    fn list(&self) -> Result<Vec<ImageSummary>> {
        let mut by_name: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for o in self.list_objects("images/")? {
            let mut parts = o.key.split('/');
            let (Some(_), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            if let Some(v) = file.strip_suffix(".json").and_then(|n| n.parse().ok()) {
                by_name.entry(name.to_string()).or_default().push(v);
            }
        }
        let mut out = Vec::new();
        for (name, mut versions) in by_name {
            versions.sort_unstable();
            let m = self.manifest(&name, versions.last().copied())?;
            out.push(ImageSummary::of(&m, versions));
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let versions = self.versions(name)?;
        if versions.is_empty() {
            return Err(Error::ImageNotFound(name.to_string()));
        }
        let stamp = now_unix();
        for v in &versions {
            let key = format!("images/{name}/{v}.json");
            if let Some(b) = self.get_object(&key, MAX_OBJECT)? {
                self.put_object(
                    &format!("trash/{name}.{stamp}.{}/{v}.json", std::process::id()),
                    Bytes::from(b),
                    &[],
                )?;
            }
        }
        for v in &versions {
            self.delete_object(&format!("images/{name}/{v}.json"))?;
        }
        let claims: Vec<String> = self
            .list_objects(&format!("claims/{name}/"))?
            .into_iter()
            .map(|o| o.key)
            .collect();
        self.delete_parallel(&claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_s3_url("s3://aula-images/site1/lab").expect("url"),
            ("aula-images".into(), "site1/lab".into())
        );
        assert_eq!(
            parse_s3_url("s3://aula").expect("url"),
            ("aula".into(), String::new())
        );
        assert!(parse_s3_url("http://x/y").is_err());
        assert!(parse_s3_url("s3://A_B/x").is_err());
        assert!(parse_s3_url("s3://aula/../x").is_err());
    }

    #[test]
    fn uri_encoding_follows_sigv4() {
        assert_eq!(uri_encode("a b/c~d", true), "a%20b/c~d");
        assert_eq!(uri_encode("a/b=", false), "a%2Fb%3D");
    }

    // The "GET Object" example of AWS's Signature Version 4
    // documentation: a signing bug fails this.
    #[test]
    fn signature_matches_the_aws_documentation_example() {
        let mut h = BTreeMap::new();
        h.insert(
            "host".to_string(),
            "examplebucket.s3.amazonaws.com".to_string(),
        );
        h.insert("range".to_string(), "bytes=0-9".to_string());
        let empty = sha256_hex(b"");
        h.insert("x-amz-content-sha256".to_string(), empty.clone());
        h.insert("x-amz-date".to_string(), "20130524T000000Z".to_string());
        let a = sigv4_authorization(
            "GET",
            "/test.txt",
            "",
            &h,
            &empty,
            "20130524T000000Z",
            "us-east-1",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        assert_eq!(
            a,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn credentials_file_is_parsed_and_unknown_keys_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s3.env");
        std::fs::write(
            &p,
            "# test\nAWS_ACCESS_KEY_ID=GK1\nAWS_SECRET_ACCESS_KEY=\"s\"\nAWS_ENDPOINT_URL=http://a:1, http://b:2/\nAWS_REGION=garage\n",
        )
        .expect("write");
        let c = S3Credentials::from_file(&p).expect("parse");
        assert_eq!(c.access_key, "GK1");
        assert_eq!(c.secret_key, "s");
        assert_eq!(c.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.region.as_deref(), Some("garage"));
        std::fs::write(&p, "AWS_ACCESS_KEY_ID=GK1\nPASSWORD=x\n").expect("write");
        let e = S3Credentials::from_file(&p).err().expect("refused");
        assert!(e.to_string().contains("PASSWORD"), "{e}");
    }

    #[test]
    fn config_debug_hides_the_secret() {
        let c = S3Config {
            endpoints: vec!["http://127.0.0.1:1".into()],
            bucket: "b".into(),
            prefix: String::new(),
            region: "garage".into(),
            access_key: "GKabc".into(),
            secret_key: "topsecretvalue".into(),
            retry_for: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(60),
        };
        let s = format!("{c:?}");
        assert!(!s.contains("topsecretvalue") && s.contains("GKabc"), "{s}");
    }
}
