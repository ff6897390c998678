//! The credential a request presents in its `Authorization` header.
//!
//! Two forms are accepted, because two kinds of client exist:
//!
//! | header | credential |
//! |---|---|
//! | `Authorization: Bearer <key>` (any case of `Bearer`) | `<key>` |
//! | `Authorization: <key>` (no scheme, as ogAgent and ogCore send it) | `<key>` |
//! | `Authorization: Basic …`, an empty value, several words | none |
//!
//! Comparing the credential with a secret is the caller's business (in
//! constant time: `aula_imager::tls::secrets_equal`).

use hyper::header::{HeaderMap, AUTHORIZATION};

/// The credential of an `Authorization` header value (see the module table).
pub fn parse(value: &str) -> Option<&str> {
    let v = value.trim();
    if let Some((scheme, rest)) = v.split_once(char::is_whitespace) {
        let rest = rest.trim();
        return (scheme.eq_ignore_ascii_case("bearer")
            && !rest.is_empty()
            && !rest.contains(char::is_whitespace))
        .then_some(rest);
    }
    (!v.is_empty()).then_some(v)
}

/// The credential of a request's `Authorization` header, if it has one of
/// the accepted forms.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_bare_keys_are_credentials_other_schemes_are_not() {
        assert_eq!(parse("Bearer abc123"), Some("abc123"));
        assert_eq!(parse("bearer  abc123 "), Some("abc123"));
        assert_eq!(parse("abc123"), Some("abc123"));
        assert_eq!(parse("  abc123  "), Some("abc123"));
        assert_eq!(parse("Basic dXNlcjpwYXNz"), None);
        assert_eq!(parse("Bearer"), Some("Bearer"), "a bare word is a key");
        assert_eq!(parse("Bearer a b"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("   "), None);
    }
}
