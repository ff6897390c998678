//! Bounded request bodies and JSON.
//!
//! | what happened | error | status |
//! |---|---|---|
//! | `Content-Length` or the bytes received pass the limit | [`BodyError::TooLarge`] | 413 |
//! | the client disconnected, or the body's framing is broken | [`BodyError::Read`] | 400 |
//! | a `Content-Type` the route does not take | [`BodyError::MediaType`] | 415 |
//! | not JSON, or empty where JSON is needed | [`BodyError::Json`] / [`BodyError::Empty`] | 400 |

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
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
}

impl BodyError {
    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
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

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(BodyError::TooLarge { limit })
        }
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
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
