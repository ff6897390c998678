//! Whether registered agents answer: the console's "live system" state is
//! what an agent said a moment ago, not what it registered once.
//!
//! Every `console.presence_probe_s` (default 15 s) each registered agent is
//! asked `GET /v1/status` over HTTPS pinned to the certificate it
//! registered (3 s to answer, 16 at a time, at most [`MAX_PROBED`] agents a
//! round). The last answer or silence is kept in memory per machine; a
//! machine whose agent stopped answering shows `offline` ("agent not
//! answering") instead of `live` until it boots again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use hyper::{Method, StatusCode};

use crate::mac::MacAddr;

use super::agent::AgentClients;
use super::DeployService;

/// Agents asked per round, at most.
pub const MAX_PROBED: usize = 5000;
/// Questions in flight at once.
const CONCURRENT: usize = 16;
/// How long an agent has to answer.
const ANSWER: Duration = Duration::from_secs(3);

/// The last probe of one machine's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// When it last answered (unix seconds).
    pub answered_at: Option<u64>,
    /// When it was last asked (unix seconds).
    pub checked_at: u64,
    /// Whether it answered then.
    pub answered: bool,
}

/// Probes by machine.
#[derive(Debug, Default)]
pub struct Presence {
    probes: RwLock<HashMap<MacAddr, Probe>>,
}

impl Presence {
    /// A copy of every probe.
    pub fn snapshot(&self) -> HashMap<MacAddr, Probe> {
        self.probes.read().map(|g| g.clone()).unwrap_or_default()
    }

    fn record(&self, mac: MacAddr, answered: bool, now: u64) {
        if let Ok(mut g) = self.probes.write() {
            let prev = g.get(&mac).and_then(|p| p.answered_at);
            g.insert(
                mac,
                Probe {
                    answered_at: if answered { Some(now) } else { prev },
                    checked_at: now,
                    answered,
                },
            );
        }
    }

    fn keep_only(&self, macs: &std::collections::HashSet<MacAddr>) {
        if let Ok(mut g) = self.probes.write() {
            g.retain(|m, _| macs.contains(m));
        }
    }
}

/// Asks every registered agent every `period`, until cancelled.
pub async fn run(
    svc: Arc<DeployService>,
    period: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let clients = AgentClients::default();
    loop {
        let fleet = svc.fleet_without_presence().await;
        let macs: std::collections::HashSet<MacAddr> = fleet.agents.keys().copied().collect();
        svc.presence.keep_only(&macs);
        let asks = fleet.agents.into_iter().take(MAX_PROBED).map(|(mac, a)| {
            let clients = &clients;
            async move {
                let ok = matches!(
                    clients.call(&a.addr, Method::GET, "/v1/status", None, ANSWER).await,
                    Ok(r) if r.status == StatusCode::OK
                );
                (mac, ok)
            }
        });
        let mut answers = futures_util::stream::iter(asks).buffer_unordered(CONCURRENT);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                next = answers.next() => match next {
                    Some((mac, ok)) => svc.presence.record(mac, ok, crate::state::unix_now()),
                    None => break,
                },
            }
        }
        drop(answers);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_keeps_the_last_answer_through_silences() {
        let p = Presence::default();
        let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        p.record(mac, true, 100);
        p.record(mac, false, 115);
        let s = p.snapshot()[&mac];
        assert_eq!(
            s,
            Probe {
                answered_at: Some(100),
                checked_at: 115,
                answered: false
            }
        );
        p.keep_only(&std::collections::HashSet::new());
        assert!(p.snapshot().is_empty(), "unregistered agents are forgotten");
    }
}
