//! The console's web assets, embedded in the binary: one page (the app
//! routes by `#/…` fragments), its script, its style sheet and an icon.
//! Nothing is loaded from anywhere else.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY};
use hyper::StatusCode;

use crate::http::{error_json, response, HttpResponse};

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

fn with_headers(mut r: HttpResponse, cache: &'static str) -> HttpResponse {
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    // Everything comes from this server; no inline script, no framing.
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

/// The page.
pub fn index() -> HttpResponse {
    with_headers(
        response(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "no-cache",
    )
}

/// One asset by file name.
pub fn asset(name: &str) -> HttpResponse {
    let (ct, body) = match name {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        "icon.svg" => ("image/svg+xml", ICON),
        _ => return error_json(StatusCode::NOT_FOUND, "no such asset"),
    };
    with_headers(response(StatusCode::OK, ct, body), "no-cache")
}
