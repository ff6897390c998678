//! A stream whose writes must make progress: when the peer stops reading
//! (its receive window and our send buffer are full) a write stays pending;
//! if no byte is accepted for `limit`, the write fails with `TimedOut` and
//! the connection ends. This is what frees the slot of a client that opens
//! a download and then reads nothing, or one byte now and then: Linux wakes
//! a blocked writer only when half of the send buffer has drained, so a
//! trickling reader is no better than a silent one.
//!
//! An idle connection (nothing to write) never times out here: an event
//! stream waiting for its next event is not a stalled one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `inner`, with writes that fail after `limit` without progress.
pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, limit: Duration) -> Self {
        StallGuard {
            inner,
            limit,
            timer: None,
        }
    }

    /// Called when an output operation is pending: arms the timer on the
    /// first pending call and reports whether it has run out.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).is_ready()
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(v) => {
                self.timer = None;
                Poll::Ready(v)
            }
            Poll::Pending if self.stalled(cx) => {
                self.timer = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer accepted no data for {:?}", self.limit),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_limit_and_one_that_is_read_does_not() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = StallGuard::new(a, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let e = w
            .write_all(&vec![0u8; 1 << 20])
            .await
            .expect_err("nobody reads");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );

        // A reader that keeps reading (slowly, but within the limit) is fine.
        let (a, mut r) = tokio::io::duplex(1024);
        let mut w = StallGuard::new(a, Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 512];
            let mut n = 0;
            while n < 8192 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                n += r.read(&mut buf).await.expect("read");
            }
        });
        w.write_all(&[1u8; 8192]).await.expect("read in time");
        reader.await.expect("reader");
        drop(b.shutdown().await);
    }
}
