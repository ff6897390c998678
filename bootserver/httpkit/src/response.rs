//! Response bodies and the JSON responses both services send.

use std::io;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

/// The response body type of every handler.
pub type Body = BoxBody<Bytes, io::Error>;

/// A complete body.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// `value` as a one-line JSON response.
pub fn json_response<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<Body> {
    let (status, bytes) = match serde_json::to_vec(value) {
        Ok(mut b) => {
            b.push(b'\n');
            (status, b)
        }
        Err(e) => {
            tracing::error!(error = %e, "encoding a JSON response");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                b"{\"error\":\"internal error\"}\n".to_vec(),
            )
        }
    };
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": message }))
}
