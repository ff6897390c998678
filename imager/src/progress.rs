//! Progress counters shared between a running pipeline and whoever watches
//! it (the CLI's bar, `--json` events, the agent's webhooks), plus the
//! cancellation flag.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One progress report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// What is being done: `scan`, `create`, `restore`, `verify`, `done`.
    pub phase: String,
    /// Bytes of used data processed (written, skipped or stored).
    pub bytes_done: u64,
    /// Bytes of used data in total.
    pub bytes_total: u64,
    /// Compressed bytes fetched (restore), from the repository and from
    /// peers.
    pub bytes_fetched: u64,
    /// Of `bytes_fetched`, those that came from the repository server.
    #[serde(default)]
    pub bytes_from_server: u64,
    /// Of `bytes_fetched`, those that came from peers (swarm restore).
    #[serde(default)]
    pub bytes_from_peers: u64,
    /// Used bytes skipped because the target already held them (delta).
    pub bytes_skipped: u64,
    /// Bytes written to the target (restore) or stored in the repository
    /// (create, compressed).
    pub bytes_written: u64,
    /// Recent throughput of `bytes_done`, bytes per second.
    pub rate_bps: f64,
    /// Estimated seconds left, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// Seconds since the phase started.
    pub elapsed_s: f64,
}

/// Counters of a running job. Cheap to update from many threads.
#[derive(Debug)]
pub struct Progress {
    phase: Mutex<(String, Instant)>,
    total: AtomicU64,
    done: AtomicU64,
    fetched: AtomicU64,
    from_peers: AtomicU64,
    skipped: AtomicU64,
    written: AtomicU64,
    cancelled: Arc<AtomicBool>,
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Fresh counters.
    pub fn new() -> Progress {
        Progress {
            phase: Mutex::new(("start".into(), Instant::now())),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            from_peers: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            cancelled: Arc::new(AtomicBool::new(false)),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Enter a phase with a new total; resets the counters.
    pub fn start_phase(&self, phase: &str, total: u64) {
        if let Ok(mut p) = self.phase.lock() {
            *p = (phase.to_string(), Instant::now());
        }
        self.total.store(total, Ordering::Relaxed);
        for c in [
            &self.done,
            &self.fetched,
            &self.from_peers,
            &self.skipped,
            &self.written,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        if let Ok(mut s) = self.samples.lock() {
            s.clear();
        }
    }

    /// Rename the phase without resetting counters (e.g. `done`).
    pub fn set_phase(&self, phase: &str) {
        if let Ok(mut p) = self.phase.lock() {
            p.0 = phase.to_string();
        }
    }

    /// Used bytes processed.
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    /// Compressed bytes fetched.
    pub fn add_fetched(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
    }
    /// Of the compressed bytes fetched, those that came from a peer
    /// (counted in `add_fetched` too).
    pub fn add_from_peers(&self, n: u64) {
        self.from_peers.fetch_add(n, Ordering::Relaxed);
    }
    /// Used bytes skipped by the delta check.
    pub fn add_skipped(&self, n: u64) {
        self.skipped.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes written (target) or stored (repository).
    pub fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    /// Ask the job to stop at the next chunk boundary.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
    /// The cancellation flag itself, for code that must notice a cancel
    /// while blocked inside one chunk (e.g. an HTTP download).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.clone()
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// A consistent-enough view for reporting. The rate is measured over
    /// the last ~5 s of snapshots (or since the phase started).
    pub fn snapshot(&self) -> ProgressEvent {
        let (phase, since) = self
            .phase
            .lock()
            .map(|p| (p.0.clone(), p.1))
            .unwrap_or_else(|_| ("unknown".into(), Instant::now()));
        let now = Instant::now();
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let elapsed = now.duration_since(since).as_secs_f64();
        let rate = match self.samples.lock() {
            Ok(mut s) => {
                s.push_back((now, done));
                while s.len() > 2 && now.duration_since(s[0].0) > Duration::from_secs(5) {
                    s.pop_front();
                }
                let (t0, d0) = s[0];
                let dt = now.duration_since(t0).as_secs_f64();
                if dt > 0.2 {
                    (done.saturating_sub(d0)) as f64 / dt
                } else if elapsed > 0.0 {
                    done as f64 / elapsed
                } else {
                    0.0
                }
            }
            Err(_) => 0.0,
        };
        let eta = if rate > 0.0 && total >= done {
            Some((total - done) as f64 / rate)
        } else {
            None
        };
        let fetched = self.fetched.load(Ordering::Relaxed);
        let from_peers = self.from_peers.load(Ordering::Relaxed).min(fetched);
        ProgressEvent {
            phase,
            bytes_done: done,
            bytes_total: total,
            bytes_fetched: fetched,
            bytes_from_server: fetched - from_peers,
            bytes_from_peers: from_peers,
            bytes_skipped: self.skipped.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            rate_bps: rate,
            eta_s: eta,
            elapsed_s: elapsed,
        }
    }
}
