//! Static file responses with `Range` (single range, `aula_httpkit::range`)
//! and `HEAD` support.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    LAST_MODIFIED, RANGE,
};
use hyper::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use super::{empty, error_json, Body, HttpResponse};

const CHUNK: usize = 256 * 1024;

/// Streams `remaining` bytes of a file.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.remaining).unwrap_or(CHUNK).min(CHUNK);
        this.buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while being served",
                    ))));
                }
                this.remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(
                    &this.buf[..n],
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Serves an opened file: 200 or 206 with `Range`, `HEAD` without a body.
pub async fn serve_file(
    method: &Method,
    headers: &HeaderMap,
    file: std::fs::File,
    content_type: &'static str,
) -> HttpResponse {
    let meta = match file.metadata() {
        Ok(m) if m.is_file() => m,
        Ok(_) => return error_json(StatusCode::NOT_FOUND, "not a file"),
        Err(e) => {
            tracing::warn!(error = %e, "stat of served file");
            return error_json(StatusCode::INTERNAL_SERVER_ERROR, "cannot read file");
        }
    };
    let len = meta.len();
    let (status, start, end) = match aula_httpkit::range::parse(headers.get(RANGE), len) {
        aula_httpkit::range::RangeSpec::Full => (StatusCode::OK, 0, len),
        aula_httpkit::range::RangeSpec::Partial(s, e) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
        aula_httpkit::range::RangeSpec::Unsatisfiable => {
            let mut r = error_json(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let count = end - start;
    let mut file = tokio::fs::File::from_std(file);
    let body: Body = if method == Method::HEAD || count == 0 {
        empty()
    } else {
        if start > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(start)).await {
                tracing::warn!(error = %e, "seek in served file");
                return error_json(StatusCode::INTERNAL_SERVER_ERROR, "cannot read file");
            }
        }
        FileBody {
            file,
            remaining: count,
            buf: Vec::new(),
        }
        .boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(count));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)) {
            h.insert(CONTENT_RANGE, v);
        }
    }
    if let Ok(m) = meta.modified() {
        if let Ok(d) = m.duration_since(std::time::UNIX_EPOCH) {
            let t = time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc2822)
                        .ok()
                });
            if let Some(v) = t.and_then(|s| HeaderValue::from_str(&s.replace("+0000", "GMT")).ok())
            {
                h.insert(LAST_MODIFIED, v);
            }
        }
    }
    r
}
