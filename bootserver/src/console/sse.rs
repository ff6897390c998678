//! Server-sent event streams for the console: one stream per page.
//!
//! * a deployment page gets `event: deployment` with the runner's document
//!   (every machine of the deployment in one JSON array) at most twice a
//!   second, only when it changed;
//! * the rooms overview (or one room) gets `event: tiles`, one JSON with
//!   every visible machine's state, at most once a second, only when it
//!   changed.
//!
//! A comment line every 15 s keeps idle streams open through proxies;
//! streams end when the client goes away or the server stops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::rooms::MachineFilter;
use crate::deploy::DeployService;
use crate::http::HttpResponse;

/// What an overview stream needs.
pub struct Parts {
    /// The service.
    pub svc: Arc<DeployService>,
    /// Server shutdown.
    pub cancel: CancellationToken,
}

const KEEPALIVE: Duration = Duration::from_secs(15);

fn stream_response(rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(s).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The document of a deployment that is not (or no longer) in the runner.
async fn stored_document(svc: &DeployService, id: i64) -> Option<String> {
    let (d, ms) = svc.get(id).await.ok()?;
    Some(crate::deploy::runner::document(
        &d,
        ms.iter().map(|m| (m.mac, m.name.as_str(), &m.run)),
    ))
}

/// `GET /v1/deployments/{id}/events`.
pub fn deployment_stream(
    svc: Arc<DeployService>,
    id: i64,
    cancel: CancellationToken,
) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut ticks = svc.subscribe();
        let mut last: Option<Arc<String>> = None;
        let mut last_sent = Instant::now() - Duration::from_secs(10);
        let mut last_any = Instant::now();
        loop {
            let doc = match svc.tick_json(id) {
                Some(d) => Some(d),
                None => stored_document(&svc, id).await.map(Arc::new),
            };
            if let Some(d) = doc {
                if last.as_deref() != Some(&*d) {
                    if tx.send(event("deployment", &d)).await.is_err() {
                        return;
                    }
                    last = Some(d);
                    last_sent = Instant::now();
                    last_any = last_sent;
                }
            }
            if last_any.elapsed() >= KEEPALIVE {
                if tx
                    .send(Bytes::from_static(b": keepalive\n\n"))
                    .await
                    .is_err()
                {
                    return;
                }
                last_any = Instant::now();
            }
            // At most two documents a second.
            let pause = Duration::from_millis(500).saturating_sub(last_sent.elapsed());
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                r = ticks.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    stream_response(rx)
}

/// The tiles document: rooms with per-state counts and every visible
/// machine as `[id, state, percent, deployment]`.
pub async fn tiles_document(
    svc: &DeployService,
    room: Option<i64>,
    scope: Option<Vec<i64>>,
) -> Option<String> {
    let sc = scope.clone();
    let store = svc.store();
    let rooms_list = store.list_rooms(sc.clone()).await.ok()?;
    let f = MachineFilter {
        room_id: room,
        scope: sc,
        ..Default::default()
    };
    let (_, machines) = store.list_machines(f, 0, 1000).await.ok()?;
    let fleet = svc.fleet().await;
    let live = svc.live_machines();
    let mut counts: BTreeMap<i64, BTreeMap<String, u32>> = BTreeMap::new();
    let tiles: Vec<Value> = machines
        .iter()
        .map(|m| {
            let (state, pct, dep) = super::tile_state(m, &fleet, &live);
            if let Some(r) = m.room_id {
                *counts
                    .entry(r)
                    .or_default()
                    .entry(state.clone())
                    .or_default() += 1;
            }
            json!([m.id, state, pct, dep])
        })
        .collect();
    let rooms_json: Vec<Value> = rooms_list
        .iter()
        .filter(|r| room.is_none_or(|id| id == r.id))
        .map(|r| json!({"id": r.id, "counts": counts.get(&r.id)}))
        .collect();
    Some(json!({"rooms": rooms_json, "machines": tiles}).to_string())
}

/// `GET /v1/console/events[?room=ID]`.
pub fn overview_stream(parts: Parts, room: Option<i64>, scope: Option<Vec<i64>>) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut last = String::new();
        let mut last_any = Instant::now();
        loop {
            if let Some(doc) = tiles_document(&parts.svc, room, scope.clone()).await {
                if doc != last {
                    if tx.send(event("tiles", &doc)).await.is_err() {
                        return;
                    }
                    last = doc;
                    last_any = Instant::now();
                }
            }
            if last_any.elapsed() >= KEEPALIVE {
                if tx
                    .send(Bytes::from_static(b": keepalive\n\n"))
                    .await
                    .is_err()
                {
                    return;
                }
                last_any = Instant::now();
            }
            tokio::select! {
                _ = parts.cancel.cancelled() => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    stream_response(rx)
}
