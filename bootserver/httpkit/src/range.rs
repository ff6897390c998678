//! One `Range: bytes=…` header against an entity of known length
//! (RFC 9110 §14.1.2). The boot files and the repository's chunks both use
//! this parser, so both answer a range the same way.

use hyper::header::HeaderValue;

/// A parsed `Range` header against an entity of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// No usable range (absent, another unit, malformed, several ranges):
    /// the whole entity, 200.
    Full,
    /// Inclusive byte range `first..=last`, 206.
    Partial(u64, u64),
    /// Cannot be satisfied (starts at or past the end): 416.
    Unsatisfiable,
}

/// Parses a single `bytes=` range. Multiple ranges and other units are
/// ignored (whole entity), as the RFC allows.
pub fn parse(header: Option<&HeaderValue>, len: u64) -> RangeSpec {
    let Some(v) = header.and_then(|h| h.to_str().ok()) else {
        return RangeSpec::Full;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if a.is_empty() {
        // Suffix range: the last n bytes.
        return match num(b) {
            None => RangeSpec::Full,
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if len == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Partial(len.saturating_sub(n), len - 1),
        };
    }
    let Some(start) = num(a) else {
        return RangeSpec::Full;
    };
    let end = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        match num(b) {
            Some(e) if e >= start => e.min(len.saturating_sub(1)),
            _ => return RangeSpec::Full,
        }
    };
    if start >= len {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Partial(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str, len: u64) -> RangeSpec {
        parse(Some(&HeaderValue::from_str(s).expect("header")), len)
    }

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(r("bytes=0-99", 1000), RangeSpec::Partial(0, 99));
        assert_eq!(r("bytes=900-", 1000), RangeSpec::Partial(900, 999));
        assert_eq!(r("bytes=-100", 1000), RangeSpec::Partial(900, 999));
        assert_eq!(r("bytes=990-2000", 1000), RangeSpec::Partial(990, 999));
        assert_eq!(r("bytes=1000-", 1000), RangeSpec::Unsatisfiable);
        assert_eq!(r("bytes=-0", 1000), RangeSpec::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6", 1000), RangeSpec::Full);
        assert_eq!(r("items=0-1", 1000), RangeSpec::Full);
        assert_eq!(r("bytes=5-1", 1000), RangeSpec::Full);
        assert_eq!(r("bytes=x-1", 1000), RangeSpec::Full);
        assert_eq!(r("bytes=0-", 0), RangeSpec::Unsatisfiable);
        assert_eq!(parse(None, 10), RangeSpec::Full);
    }
}
