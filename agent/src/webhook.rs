//! Webhooks to the core: one delivery task, one FIFO queue, so events of a
//! job arrive in `seq` order. Jobs only push (a short mutex section), they
//! never wait for delivery.
//!
//! * Signed: `X-Aula-Signature: sha256=<hex HMAC-SHA256(body, token)>`.
//! * Retried with capped exponential backoff (0.5 s doubling up to
//!   `webhooks.max_backoff_s`) on connection errors, timeouts, 408, 429 and
//!   5xx, for as long as it takes; the head of the queue waits, so order is
//!   kept. Other 4xx answers are final: the event is counted as `rejected`
//!   and dropped.
//! * Bounded: beyond `webhooks.queue` events the oldest queued *progress*
//!   event is dropped; state changes are never dropped (there are at most
//!   four per job and the job table is bounded).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::jobs::Event;
use crate::tls::HttpClient;

struct Item {
    body: Bytes,
    progress: bool,
    job_id: String,
    seq: u64,
    kind: &'static str,
}

struct Inner {
    queue: Mutex<VecDeque<Item>>,
    in_flight: std::sync::atomic::AtomicBool,
    wake: Notify,
    drained: Notify,
    url: Option<String>,
    client: Option<HttpClient>,
    key: String,
    bound: usize,
    max_backoff: Duration,
    delivered: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    failures: AtomicU64,
}

/// Counters for `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Where events go.
    pub url: Option<String>,
    /// Waiting to be delivered.
    pub queued: usize,
    /// Delivered (2xx).
    pub delivered: u64,
    /// Progress events dropped because the queue was full.
    pub dropped: u64,
    /// Refused by the core with a final 4xx.
    pub rejected: u64,
    /// Failed attempts (each retried).
    pub failed_attempts: u64,
}

/// The webhook queue.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

impl Webhooks {
    /// A queue for `url` (none: events are only counted and dropped).
    pub fn new(
        url: Option<String>,
        client: Option<HttpClient>,
        key: String,
        bound: usize,
        max_backoff: Duration,
    ) -> Webhooks {
        Webhooks {
            inner: Arc::new(Inner {
                queue: Mutex::new(VecDeque::new()),
                in_flight: std::sync::atomic::AtomicBool::new(false),
                wake: Notify::new(),
                drained: Notify::new(),
                url,
                client,
                key,
                bound: bound.max(1),
                max_backoff,
                delivered: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Item>> {
        self.inner.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an event (never blocks on the network).
    pub fn push(&self, ev: &Event) {
        if self.inner.url.is_none() {
            return;
        }
        let body = match serde_json::to_vec(ev) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "encoding a webhook");
                return;
            }
        };
        let progress = ev.event == "progress";
        let mut q = self.queue();
        if q.len() >= self.inner.bound {
            // The head may be in flight: never drop it from under the sender.
            let skip = usize::from(self.inner.in_flight.load(Ordering::SeqCst));
            if let Some(i) = q.iter().skip(skip).position(|it| it.progress) {
                q.remove(i + skip);
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            } else if progress {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        q.push_back(Item {
            body,
            progress,
            job_id: ev.job_id.clone(),
            seq: ev.seq,
            kind: ev.event,
        });
        drop(q);
        self.inner.wake.notify_one();
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            url: self.inner.url.clone(),
            queued: self.queue().len(),
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            dropped: self.inner.dropped.load(Ordering::Relaxed),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
            failed_attempts: self.inner.failures.load(Ordering::Relaxed),
        }
    }

    /// Wait until the queue is empty (true) or `timeout` passes (false).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.inner.drained.notified();
            if self.queue().is_empty() || self.inner.url.is_none() {
                return true;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return self.queue().is_empty();
            }
        }
    }

    /// The delivery loop; ends when `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let (Some(url), Some(client)) = (self.inner.url.clone(), self.inner.client.clone()) else {
            stop.cancelled().await;
            return;
        };
        let mut backoff = Duration::from_millis(500);
        loop {
            let wake = self.inner.wake.notified();
            let head = {
                let q = self.queue();
                q.front()
                    .map(|it| (it.body.clone(), it.job_id.clone(), it.seq, it.kind))
            };
            let Some((body, job_id, seq, kind)) = head else {
                self.inner.drained.notify_waiters();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake => continue,
                }
            };
            self.inner.in_flight.store(true, Ordering::SeqCst);
            let headers = [
                ("x-aula-signature", crate::tls::sign(&self.inner.key, &body)),
                ("x-aula-event", kind.to_string()),
                ("x-aula-job", job_id.clone()),
                ("x-aula-seq", seq.to_string()),
                (
                    "user-agent",
                    format!("aula-agent/{}", env!("CARGO_PKG_VERSION")),
                ),
            ];
            let r = tokio::select! {
                _ = stop.cancelled() => {
                    self.inner.in_flight.store(false, Ordering::SeqCst);
                    return;
                }
                r = client.call(Method::POST, &url, &headers, body.to_vec()) => r,
            };
            let outcome = match &r {
                Ok(rep) if rep.status.is_success() => Ok(true),
                Ok(rep)
                    if rep.status.is_client_error()
                        && !matches!(rep.status.as_u16(), 408 | 429) =>
                {
                    Ok(false)
                }
                Ok(rep) => Err(format!("HTTP {}", rep.status)),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(accepted) => {
                    {
                        let mut q = self.queue();
                        q.pop_front();
                        self.inner.in_flight.store(false, Ordering::SeqCst);
                    }
                    if accepted {
                        self.inner.delivered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.inner.rejected.fetch_add(1, Ordering::Relaxed);
                        let status = r.as_ref().map(|x| x.status.as_u16()).unwrap_or(0);
                        tracing::warn!(%job_id, seq, status, "the core refused a webhook; dropped");
                    }
                    backoff = Duration::from_millis(500);
                }
                Err(why) => {
                    self.inner.in_flight.store(false, Ordering::SeqCst);
                    self.inner.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%job_id, seq, error = %why, retry_in = ?backoff, "webhook not delivered");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.inner.max_backoff);
                }
            }
        }
    }
}
