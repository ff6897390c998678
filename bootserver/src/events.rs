//! The default webhook sink: the last events each agent posted, in memory,
//! bounded three ways so that agents (or one misbehaving agent) cannot
//! grow the server without limit.
//!
//! | bound | default (`[limits]`) | when reached |
//! |---|---|---|
//! | events per machine | 200 | that machine's oldest event is dropped |
//! | bytes per machine | 256 KiB (`events_per_machine_kib`) | that machine's oldest events are dropped |
//! | bytes in all | 64 MiB (`events_total_mib`) | the oldest events of any machine are dropped |
//!
//! An event larger than a machine's whole share is refused. Events are kept
//! as the JSON bytes the agent posted (already checked to be JSON).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::mac::MacAddr;

/// Events kept per machine, at most.
pub const EVENTS_PER_MACHINE: usize = 200;

/// An event larger than a machine's share.
#[derive(Debug, thiserror::Error)]
#[error("event of {size} bytes is larger than the {limit} bytes kept per machine")]
pub struct TooLarge {
    /// The event's size.
    pub size: usize,
    /// The per-machine limit.
    pub limit: usize,
}

#[derive(Default)]
struct Machine {
    bytes: usize,
    events: VecDeque<(u64, Bytes)>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    bytes: usize,
    live: usize,
    machines: HashMap<MacAddr, Machine>,
    /// Every kept event in arrival order (and some already dropped, which
    /// are skipped; compacted when they outnumber the kept ones).
    order: VecDeque<(u64, MacAddr)>,
}

/// The bounded event store.
pub struct EventSink {
    per_machine: usize,
    total: usize,
    inner: Mutex<Inner>,
}

impl EventSink {
    /// A sink keeping at most `per_machine` bytes per machine and `total` in all.
    pub fn new(per_machine: usize, total: usize) -> Self {
        EventSink {
            per_machine: per_machine.max(1),
            total: total.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `event` (JSON bytes) as `mac`'s newest, dropping old ones as
    /// the bounds require.
    pub fn push(&self, mac: MacAddr, event: Bytes) -> Result<(), TooLarge> {
        let size = event.len();
        if size > self.per_machine || size > self.total {
            return Err(TooLarge {
                size,
                limit: self.per_machine.min(self.total),
            });
        }
        let mut g = self.lock();
        let g = &mut *g;
        let seq = g.next;
        g.next += 1;
        let m = g.machines.entry(mac).or_default();
        m.events.push_back((seq, event));
        m.bytes += size;
        g.bytes += size;
        g.live += 1;
        g.order.push_back((seq, mac));
        while m.events.len() > EVENTS_PER_MACHINE || m.bytes > self.per_machine {
            let Some((_, old)) = m.events.pop_front() else {
                break;
            };
            m.bytes -= old.len();
            g.bytes -= old.len();
            g.live -= 1;
        }
        while g.bytes > self.total {
            let Some((seq, owner)) = g.order.pop_front() else {
                break;
            };
            let Some(m) = g.machines.get_mut(&owner) else {
                continue;
            };
            if m.events.front().is_some_and(|(s, _)| *s == seq) {
                if let Some((_, old)) = m.events.pop_front() {
                    m.bytes -= old.len();
                    g.bytes -= old.len();
                    g.live -= 1;
                }
                if m.events.is_empty() {
                    g.machines.remove(&owner);
                }
            }
        }
        if g.order.len() > 2 * g.live + 64 {
            let machines = &g.machines;
            g.order.retain(|(seq, mac)| {
                machines
                    .get(mac)
                    .is_some_and(|m| m.events.front().is_some_and(|(first, _)| first <= seq))
            });
        }
        Ok(())
    }

    /// `mac`'s kept events, oldest first, as one JSON array.
    pub fn list_json(&self, mac: MacAddr) -> Vec<u8> {
        let g = self.lock();
        let mut out = b"[".to_vec();
        if let Some(m) = g.machines.get(&mac) {
            for (i, (_, e)) in m.events.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(e);
            }
        }
        out.extend_from_slice(b"]\n");
        out
    }

    /// Bytes kept in all.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Bookkeeping entries held (kept events plus dropped ones not yet
    /// compacted away): stays within a constant factor of the kept events.
    pub fn order_len(&self) -> usize {
        self.lock().order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: u32) -> MacAddr {
        let b = i.to_be_bytes();
        MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    fn event(n: usize, tag: u32) -> Bytes {
        let pad = "x".repeat(n.saturating_sub(30));
        Bytes::from(format!("{{\"tag\":{tag:>8},\"p\":\"{pad}\"}}"))
    }

    #[test]
    fn each_machine_keeps_its_newest_events_within_its_share() {
        let sink = EventSink::new(10_000, 1 << 20);
        for i in 0..50 {
            sink.push(mac(1), event(1000, i)).expect("push");
        }
        let list: Vec<serde_json::Value> =
            serde_json::from_slice(&sink.list_json(mac(1))).expect("a JSON array");
        assert!(list.len() <= 10, "{} events over 10 kB", list.len());
        assert_eq!(list.last().expect("newest")["tag"], 49);
        assert!(sink.bytes() <= 10_000);
        let e = sink
            .push(mac(1), event(20_000, 0))
            .expect_err("larger than the share");
        assert_eq!(e.limit, 10_000);
        assert_eq!(
            serde_json::from_slice::<Vec<serde_json::Value>>(&sink.list_json(mac(9)))
                .expect("empty array"),
            Vec::<serde_json::Value>::new()
        );
    }

    #[test]
    fn the_total_drops_the_oldest_events_of_any_machine_and_bookkeeping_stays_bounded() {
        let sink = EventSink::new(100_000, 50_000);
        for i in 0..1000u32 {
            sink.push(mac(i % 20), event(1000, i)).expect("push");
            assert!(sink.bytes() <= 50_000, "{} bytes kept", sink.bytes());
        }
        // The newest event of the latest machine is kept, the oldest is gone.
        let last: Vec<serde_json::Value> =
            serde_json::from_slice(&sink.list_json(mac(999 % 20))).expect("json");
        assert_eq!(last.last().expect("kept")["tag"], 999);
        let first: Vec<serde_json::Value> =
            serde_json::from_slice(&sink.list_json(mac(0))).expect("json");
        assert!(first.iter().all(|e| e["tag"].as_u64() > Some(900)));
        // One machine posting for ever within its share: the order list is
        // compacted, not grown.
        let sink = EventSink::new(5_000, 1 << 30);
        for i in 0..100_000 {
            sink.push(mac(1), event(1000, i)).expect("push");
        }
        assert!(sink.order_len() < 200, "{}", sink.order_len());
    }
}
