//! Bounded request bodies and JSON.
//!
//! | what happened | error | status |
//! |---|---|---|
//! | `Content-Length` or the bytes received pass the limit | [`BodyError::TooLarge`] | 413 |
//! | the client disconnected, or the body's framing is broken | [`BodyError::Read`] | 400 |
//! | no body byte for the idle limit, or the body not complete by the request deadline | [`BodyError::Timeout`] | 408 |
//! | a `Content-Type` the route does not take | [`BodyError::MediaType`] | 415 |
//! | not JSON, or empty where JSON is needed | [`BodyError::Json`] / [`BodyError::Empty`] | 400 |
//!
//! # Deadlines
//!
//! A slow client must not hold a connection slot for ever by trickling a
//! body. The accept loop ([`crate::server`]) runs every request's handler
//! inside [`with_deadlines`]: the whole body must have arrived by the
//! request deadline (`request_timeout` after its head), and no gap between
//! two pieces of it may exceed `body_idle_timeout`. [`read_limited`] and the
//! JSON readers enforce both. Outside a served request (a handler that moved
//! the body to another task) the defaults apply, counted from the first read.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, StatusCode};

/// Why a body could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Larger than the route accepts.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body could not be read (client gone, broken chunking).
    #[error("could not read the request body: {0}")]
    Read(String),
    /// The declared content type is not one the route takes.
    #[error("content type {0:?} is not accepted here: send JSON (application/json)")]
    MediaType(String),
    /// The bytes are not the JSON the route wants.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// No body where one is needed.
    #[error("the body is empty (a JSON object is expected)")]
    Empty,
    /// The body came too slowly (see the module's deadlines).
    #[error("request body too slow: {0}")]
    Timeout(&'static str),
}

/// Longest gap between two pieces of a body, unless the listener says otherwise.
pub const DEFAULT_BODY_IDLE: Duration = Duration::from_secs(10);
/// Longest time from a request's head to the end of its body, unless the
/// listener says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes reserved up front for a body, at most (the rest grows as it comes).
const PREALLOCATE: usize = 1 << 20;

/// The deadlines of the request being served.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Longest gap between two pieces of the body.
    pub idle: Duration,
    /// When the whole body must have arrived.
    pub until: tokio::time::Instant,
}

tokio::task_local! {
    static DEADLINES: Deadlines;
}

/// Runs `f` (a request's handler) with `d` as the deadlines its body reads obey.
pub async fn with_deadlines<F: std::future::Future>(d: Deadlines, f: F) -> F::Output {
    DEADLINES.scope(d, f).await
}

/// The deadlines in force: the served request's, else the defaults from now.
pub fn deadlines() -> Deadlines {
    DEADLINES.try_with(|d| *d).unwrap_or_else(|_| Deadlines {
        idle: DEFAULT_BODY_IDLE,
        until: tokio::time::Instant::now() + DEFAULT_REQUEST_TIMEOUT,
    })
}

impl BodyError {
    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) | BodyError::Json(_) | BodyError::Empty => StatusCode::BAD_REQUEST,
            BodyError::MediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
}

/// Which `Content-Type` values a JSON route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonTypes {
    /// None, or `application/json`.
    Json,
    /// None, `application/json`, or the types generic clients send by
    /// default (`application/x-www-form-urlencoded` from `curl -d`,
    /// `text/plain`): the body is parsed as JSON all the same, and refused
    /// when it is not JSON. OpenGnsys cores post this way.
    Lenient,
}

/// Checks the `Content-Type` against `types`.
pub fn check_content_type(headers: &HeaderMap, types: JsonTypes) -> Result<(), BodyError> {
    let Some(v) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let text = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
    let essence = text.split(';').next().unwrap_or("").trim();
    let ok = match types {
        JsonTypes::Json => essence == "application/json",
        JsonTypes::Lenient => matches!(
            essence,
            "application/json" | "application/x-www-form-urlencoded" | "text/plain" | ""
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(BodyError::MediaType(text))
    }
}

/// Reads a whole body of at most `limit` bytes, within the deadlines of
/// the request being served (see the module's deadlines).
pub async fn read_limited(
    headers: &HeaderMap,
    mut body: Incoming,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let d = deadlines();
    let reserve = declared.map_or(0, |n| n as usize).min(PREALLOCATE);
    let mut buf = BytesMut::with_capacity(reserve);
    loop {
        let gap = tokio::time::Instant::now() + d.idle;
        let wake = gap.min(d.until);
        let frame = match tokio::time::timeout_at(wake, body.frame()).await {
            Err(_) if wake == d.until => {
                return Err(BodyError::Timeout(
                    "the body did not arrive within the request deadline",
                ))
            }
            Err(_) => {
                return Err(BodyError::Timeout(
                    "no part of the body arrived within the idle limit",
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Reads a request's body as a JSON value: content type per `types`, at
/// most `limit` bytes. An empty body is `Value::Null` when `allow_empty`.
pub async fn read_json_value(
    req: Request<Incoming>,
    limit: usize,
    types: JsonTypes,
    allow_empty: bool,
) -> Result<serde_json::Value, BodyError> {
    check_content_type(req.headers(), types)?;
    let (parts, body) = req.into_parts();
    let bytes = read_limited(&parts.headers, body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return if allow_empty {
            Ok(serde_json::Value::Null)
        } else {
            Err(BodyError::Empty)
        };
    }
    serde_json::from_slice(&bytes).map_err(|e| BodyError::Json(e.to_string()))
}

/// Reads a request's body as a `T` (content type `application/json` or none).
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, BodyError> {
    check_content_type(req.headers(), JsonTypes::Json)?;
    let (parts, body) = req.into_parts();
    let bytes = read_limited(&parts.headers, body, limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    serde_json::from_slice(&bytes).map_err(|e| BodyError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn ct(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn content_types_follow_the_policy() {
        assert!(check_content_type(&HeaderMap::new(), JsonTypes::Json).is_ok());
        assert!(
            check_content_type(&ct("application/json; charset=utf-8"), JsonTypes::Json).is_ok()
        );
        assert!(
            check_content_type(&ct("application/x-www-form-urlencoded"), JsonTypes::Json).is_err()
        );
        assert!(
            check_content_type(&ct("application/x-www-form-urlencoded"), JsonTypes::Lenient)
                .is_ok()
        );
        assert!(check_content_type(&ct("text/plain"), JsonTypes::Lenient).is_ok());
        let e = check_content_type(&ct("application/xml"), JsonTypes::Lenient).expect_err("xml");
        assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
