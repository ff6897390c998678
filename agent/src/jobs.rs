//! Jobs: the table, the scheduler and the events.
//!
//! A job is stored when its request is accepted and runs on its own task
//! (disk work on a blocking thread), never tied to the HTTP request that
//! created it. States: `queued → running → succeeded | failed | cancelled`.
//!
//! Ordering. Each job holds a set of locks decided from its spec:
//! * restore, create, layout, software inventory lock their disk (and a
//!   `unicast-cache` restore the CACHE disk too): jobs on one disk run one
//!   after another, in the order they were accepted;
//! * power-off, reboot and boot-OS are barriers: they wait for every job
//!   accepted before them, and every later disk job waits for them;
//! * hardware inventory and scripts lock nothing and start at once.
//!
//! A queued job starts when no job accepted before it (queued or running)
//! holds a conflicting lock. Every state change and at most one progress
//! report per interval are published as [`Event`]s to the webhook queue and
//! to event-stream listeners.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aula_imager::progress::{Progress, ProgressEvent};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::spec::JobSpec;
use crate::Ctx;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted, waiting for its disk.
    Queued,
    /// Running.
    Running,
    /// Done.
    Succeeded,
    /// Failed; `error` says why and what the disk looks like.
    Failed,
    /// Cancelled; `error.disk_state` says what the disk looks like.
    Cancelled,
}

impl JobState {
    /// Succeeded, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Why a job did not succeed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobError {
    /// Machine-readable class (`image_not_found`, `busy`, `cancelled`, …).
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// What the disk looks like now, for jobs that write disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_state: Option<String>,
}

/// The end of a job that did not succeed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The error.
    pub error: JobError,
    /// Cancelled rather than failed.
    pub cancelled: bool,
    /// A partial result (script output of a failed script).
    pub result: Option<serde_json::Value>,
}

impl Failure {
    /// A failure of kind `kind`.
    pub fn new(kind: &str, message: impl Into<String>) -> Failure {
        Failure {
            error: JobError {
                kind: kind.into(),
                message: message.into(),
                disk_state: None,
            },
            cancelled: false,
            result: None,
        }
    }
    /// With a disk state.
    pub fn disk_state(mut self, s: impl Into<String>) -> Failure {
        self.error.disk_state = Some(s.into());
        self
    }
    /// Marked as a cancellation.
    pub fn cancelled(mut self) -> Failure {
        self.cancelled = true;
        self
    }
}

/// What a job runner returns.
pub type Outcome = Result<serde_json::Value, Failure>;

/// A job's locks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locks {
    /// Disks (resolved paths) used exclusively.
    pub disks: Vec<PathBuf>,
    /// Waits for all earlier jobs; all later disk jobs wait for it.
    pub barrier: bool,
}

impl Locks {
    fn conflicts(&self, earlier: &Locks) -> bool {
        if self.barrier {
            return earlier.barrier || !earlier.disks.is_empty();
        }
        if self.disks.is_empty() {
            return false;
        }
        earlier.barrier || self.disks.iter().any(|d| earlier.disks.contains(d))
    }
}

#[derive(Debug)]
struct Status {
    state: JobState,
    started: Option<String>,
    finished: Option<String>,
    result: Option<serde_json::Value>,
    error: Option<JobError>,
    seq: u64,
    last_progress: Option<ProgressEvent>,
}

/// A job.
pub struct Job {
    /// Id (`<nfn>-<8 hex>` for OpenGnsys jobs, client-supplied or
    /// `job-<8 hex>` for native ones).
    pub id: String,
    /// The OpenGnsys `nfn` or the native op name.
    pub op: String,
    /// What it does.
    pub spec: JobSpec,
    /// OpenGnsys request fields (echoed in events).
    pub echo: Option<BTreeMap<String, String>>,
    /// When it was accepted (RFC 3339).
    pub created: String,
    /// Its locks.
    pub locks: Locks,
    /// Progress counters and the imager's cancel flag.
    pub progress: Arc<Progress>,
    /// Cancelled by the API (async parts watch this).
    pub cancel: CancellationToken,
    /// Spec fingerprint for idempotent resubmission.
    fingerprint: String,
    status: Mutex<Status>,
    events: broadcast::Sender<Arc<Event>>,
    /// The job's tracing span.
    pub span: tracing::Span,
}

/// The agent, as events name it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRef {
    /// Primary MAC.
    pub mac: Option<String>,
    /// First address.
    pub ip: Option<std::net::IpAddr>,
    /// Host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// One event: the body of a webhook and the data of an event-stream message.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Who sends it.
    pub agent: AgentRef,
    /// The job.
    pub job_id: String,
    /// OpenGnsys `nfn` or native op.
    pub op: String,
    /// `state` (a state change) or `progress`.
    pub event: &'static str,
    /// The job's state.
    pub state: JobState,
    /// Per job, starting at 1, +1 per event.
    pub seq: u64,
    /// When (RFC 3339, UTC).
    pub timestamp: String,
    /// Progress counters, when the job has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressEvent>,
    /// The result (`succeeded`; failed scripts too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error (`failed`, `cancelled`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// OpenGnsys `ids`, echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<String>,
    /// OpenGnsys `idi`, echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idi: Option<String>,
    /// Every scalar field of the OpenGnsys request, as received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opengnsys: Option<BTreeMap<String, String>>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// Id.
    pub id: String,
    /// OpenGnsys `nfn` or native op.
    pub op: String,
    /// The spec (native form).
    pub spec: JobSpec,
    /// State.
    pub state: JobState,
    /// Accepted at.
    pub created: String,
    /// Started at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// Finished at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Progress (live while running, final after).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressEvent>,
    /// Result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Events published so far (the last `seq`).
    pub seq: u64,
    /// OpenGnsys request fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opengnsys: Option<BTreeMap<String, String>>,
}

/// RFC 3339 UTC now.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn has_progress(spec: &JobSpec) -> bool {
    matches!(spec, JobSpec::Restore(_) | JobSpec::Create(_))
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, Status> {
        // A panic while holding the lock leaves consistent data (plain
        // assignments); keep serving.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current state.
    pub fn state(&self) -> JobState {
        self.lock().state
    }

    /// Listen to this job's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    fn progress_now(&self, st: &Status) -> Option<ProgressEvent> {
        if !has_progress(&self.spec) {
            return None;
        }
        match st.state {
            JobState::Queued => None,
            JobState::Running => Some(self.progress.snapshot()),
            _ => st.last_progress.clone(),
        }
    }

    /// A snapshot for the API.
    pub fn view(&self) -> JobView {
        let st = self.lock();
        JobView {
            id: self.id.clone(),
            op: self.op.clone(),
            spec: self.spec.clone(),
            state: st.state,
            created: self.created.clone(),
            started: st.started.clone(),
            finished: st.finished.clone(),
            progress: self.progress_now(&st),
            result: st.result.clone(),
            error: st.error.clone(),
            seq: st.seq,
            opengnsys: self.echo.clone(),
        }
    }

    fn event(&self, ctx: &Ctx, st: &mut Status, kind: &'static str) -> Event {
        st.seq += 1;
        let echo = |k: &str| self.echo.as_ref().and_then(|e| e.get(k).cloned());
        Event {
            agent: ctx.agent_ref(),
            job_id: self.id.clone(),
            op: self.op.clone(),
            event: kind,
            state: st.state,
            seq: st.seq,
            timestamp: now(),
            progress: match kind {
                "progress" => st.last_progress.clone(),
                _ => self.progress_now(st),
            },
            result: if st.state.is_terminal() {
                st.result.clone()
            } else {
                None
            },
            error: st.error.clone(),
            ids: echo("ids"),
            idi: echo("idi"),
            opengnsys: self.echo.clone(),
        }
    }

    /// Publish under the status lock, so `seq` order is delivery order.
    fn publish(&self, ctx: &Ctx, st: &mut Status, kind: &'static str) {
        let ev = Arc::new(self.event(ctx, st, kind));
        ctx.webhooks.push(&ev);
        let _ = self.events.send(ev);
    }

    /// A synthetic event describing the job now (first message of an
    /// event stream); does not consume a `seq`.
    pub fn snapshot_event(&self, ctx: &Ctx) -> Event {
        let mut st = self.lock();
        let mut ev = self.event(ctx, &mut st, "state");
        st.seq -= 1;
        ev.seq = st.seq;
        ev.event = "snapshot";
        ev
    }
}

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A job with this id exists with another spec.
    #[error("job {0} exists with different parameters")]
    Conflict(String),
    /// Too many queued and running jobs.
    #[error("{0} jobs are queued or running; try again later")]
    TooMany(usize),
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// Why a cancel did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// Unknown id.
    #[error("no such job")]
    NotFound,
    /// The job has finished.
    #[error("job {id} has already {state}", state = state.as_str())]
    Finished {
        /// The job.
        id: String,
        /// Its final state.
        state: JobState,
    },
    /// The job cannot stop half-way (a layout being written, a power-off).
    #[error("job {0} cannot be stopped once running ({1})")]
    NotCancellable(String, &'static str),
}

#[derive(Default)]
struct Table {
    jobs: HashMap<String, Arc<Job>>,
    /// Every stored job in acceptance order.
    order: VecDeque<String>,
    /// Queued and running jobs in acceptance order.
    active: Vec<Arc<Job>>,
    closed: bool,
}

/// The job table and scheduler.
pub struct Jobs {
    table: Mutex<Table>,
    idle: tokio::sync::Notify,
}

impl Default for Jobs {
    fn default() -> Self {
        Self::new()
    }
}

impl Jobs {
    /// An empty table.
    pub fn new() -> Jobs {
        Jobs {
            table: Mutex::new(Table::default()),
            idle: tokio::sync::Notify::new(),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.table().jobs.get(id).cloned()
    }

    /// Every stored job, oldest first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        let t = self.table();
        t.order
            .iter()
            .filter_map(|id| t.jobs.get(id).cloned())
            .collect()
    }

    /// Counts of queued and running jobs.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.table();
        let running = t
            .active
            .iter()
            .filter(|j| j.state() == JobState::Running)
            .count();
        (t.active.len() - running, running)
    }

    /// Accept a job (or return the existing one with the same id and spec:
    /// `(job, false)`).
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        self: &Arc<Self>,
        ctx: &Arc<Ctx>,
        id: String,
        op: String,
        spec: JobSpec,
        echo: Option<BTreeMap<String, String>>,
        locks: Locks,
    ) -> Result<(Arc<Job>, bool), SubmitError> {
        let fingerprint = serde_json::to_string(&spec).unwrap_or_default();
        let job = {
            let mut t = self.table();
            if t.closed {
                return Err(SubmitError::ShuttingDown);
            }
            if let Some(j) = t.jobs.get(&id) {
                return if j.fingerprint == fingerprint && j.op == op {
                    Ok((j.clone(), false))
                } else {
                    Err(SubmitError::Conflict(id))
                };
            }
            if t.active.len() >= ctx.settings.jobs.max_active {
                return Err(SubmitError::TooMany(t.active.len()));
            }
            let span = tracing::info_span!("job", job_id = %id, op = %op);
            let (events, _) = broadcast::channel(256);
            let job = Arc::new(Job {
                id: id.clone(),
                op,
                spec,
                echo,
                created: now(),
                locks,
                progress: Arc::new(Progress::new()),
                cancel: CancellationToken::new(),
                fingerprint,
                status: Mutex::new(Status {
                    state: JobState::Queued,
                    started: None,
                    finished: None,
                    result: None,
                    error: None,
                    seq: 0,
                    last_progress: None,
                }),
                events,
                span,
            });
            t.jobs.insert(id.clone(), job.clone());
            t.order.push_back(id);
            t.active.push(job.clone());
            // Forget the oldest finished jobs beyond the bound.
            let keep = ctx.settings.jobs.keep;
            let mut i = 0;
            while t.order.len() > keep + t.active.len() && i < t.order.len() {
                let old = t.order[i].clone();
                let done = t.jobs.get(&old).is_none_or(|j| j.state().is_terminal());
                if done {
                    t.jobs.remove(&old);
                    t.order.remove(i);
                } else {
                    i += 1;
                }
            }
            {
                let mut st = job.lock();
                job.publish(ctx, &mut st, "state");
            }
            job
        };
        job.span
            .in_scope(|| tracing::info!(spec = ?job.spec, "job accepted"));
        self.schedule(ctx);
        Ok((job, true))
    }

    /// Start every queued job whose locks are free.
    fn schedule(self: &Arc<Self>, ctx: &Arc<Ctx>) {
        let mut to_start = Vec::new();
        {
            let t = self.table();
            for (i, j) in t.active.iter().enumerate() {
                if j.state() != JobState::Queued {
                    continue;
                }
                let blocked = t.active[..i].iter().any(|e| j.locks.conflicts(&e.locks));
                if !blocked {
                    let mut st = j.lock();
                    st.state = JobState::Running;
                    st.started = Some(now());
                    if has_progress(&j.spec) {
                        st.last_progress = Some(j.progress.snapshot());
                    }
                    j.publish(ctx, &mut st, "state");
                    to_start.push(j.clone());
                }
            }
        }
        for j in to_start {
            let this = self.clone();
            let ctx = ctx.clone();
            let span = j.span.clone();
            tokio::spawn(
                async move {
                    tracing::info!("job started");
                    let ticker = tokio::spawn(progress_ticker(j.clone(), ctx.clone()));
                    let outcome = crate::run::run(j.clone(), ctx.clone()).await;
                    ticker.abort();
                    this.finish(&ctx, &j, outcome);
                }
                .instrument(span),
            );
        }
    }

    fn finish(self: &Arc<Self>, ctx: &Arc<Ctx>, job: &Arc<Job>, outcome: Outcome) {
        {
            let mut st = job.lock();
            if has_progress(&job.spec) {
                st.last_progress = Some(job.progress.snapshot());
            }
            st.finished = Some(now());
            match outcome {
                Ok(v) => {
                    st.state = JobState::Succeeded;
                    st.result = Some(v);
                    tracing::info!("job succeeded");
                }
                Err(f) => {
                    st.state = if f.cancelled {
                        JobState::Cancelled
                    } else {
                        JobState::Failed
                    };
                    tracing::warn!(kind = %f.error.kind, error = %f.error.message, disk_state = ?f.error.disk_state, "job {}", st.state.as_str());
                    st.result = f.result;
                    st.error = Some(f.error);
                }
            }
            job.publish(ctx, &mut st, "state");
        }
        {
            let mut t = self.table();
            t.active.retain(|j| !Arc::ptr_eq(j, job));
        }
        self.idle.notify_waiters();
        if job.state() == JobState::Succeeded {
            crate::power::after_job(ctx, job);
        }
        self.schedule(ctx);
    }

    /// Cancel a queued or running job.
    pub fn cancel(self: &Arc<Self>, ctx: &Arc<Ctx>, id: &str) -> Result<Arc<Job>, CancelError> {
        let job = self.get(id).ok_or(CancelError::NotFound)?;
        let was_queued = {
            let mut st = job.lock();
            match st.state {
                JobState::Queued => {
                    st.state = JobState::Cancelled;
                    st.finished = Some(now());
                    st.error = Some(JobError {
                        kind: "cancelled".into(),
                        message: "cancelled before it started".into(),
                        disk_state: Some("unchanged: the job never started".into()),
                    });
                    job.publish(ctx, &mut st, "state");
                    true
                }
                JobState::Running => {
                    if let Some(why) = not_cancellable(&job.spec) {
                        return Err(CancelError::NotCancellable(job.id.clone(), why));
                    }
                    false
                }
                s => {
                    return Err(CancelError::Finished {
                        id: job.id.clone(),
                        state: s,
                    })
                }
            }
        };
        if was_queued {
            job.span
                .in_scope(|| tracing::info!("job cancelled while queued"));
            let mut t = self.table();
            t.active.retain(|j| !Arc::ptr_eq(j, &job));
            drop(t);
            self.idle.notify_waiters();
            self.schedule(ctx);
        } else {
            job.span.in_scope(|| tracing::info!("cancel requested"));
            job.progress.cancel();
            job.cancel.cancel();
        }
        Ok(job)
    }

    /// Refuse new jobs, cancel running ones, and wait (bounded) for them.
    pub async fn shutdown(self: &Arc<Self>, ctx: &Arc<Ctx>, wait: Duration) {
        let active: Vec<Arc<Job>> = {
            let mut t = self.table();
            t.closed = true;
            t.active.clone()
        };
        for j in &active {
            match j.state() {
                JobState::Queued => {
                    let _ = self.cancel(ctx, &j.id);
                }
                JobState::Running if not_cancellable(&j.spec).is_none() => {
                    j.progress.cancel();
                    j.cancel.cancel();
                }
                _ => {}
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.idle.notified();
            if self.table().active.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("jobs still running at shutdown");
                return;
            }
        }
    }
}

fn not_cancellable(spec: &JobSpec) -> Option<&'static str> {
    match spec {
        JobSpec::Layout(_) => Some("a partition table is being written"),
        JobSpec::Poweroff(_) | JobSpec::Reboot(_) | JobSpec::BootOs(_) => {
            Some("a power operation is under way")
        }
        JobSpec::Restore(_)
        | JobSpec::Create(_)
        | JobSpec::HardwareInventory(_)
        | JobSpec::SoftwareInventory(_)
        | JobSpec::Script(_) => None,
    }
}

/// Publish progress at most once per interval while the job runs, and only
/// when something moved.
async fn progress_ticker(job: Arc<Job>, ctx: Arc<Ctx>) {
    if !has_progress(&job.spec) {
        return;
    }
    let period = Duration::from_millis(ctx.settings.webhooks.progress_interval_ms.max(100));
    // The next report is due one full period after the last one was
    // published, so two reports are never closer than `period`.
    let mut due = tokio::time::Instant::now() + period;
    let mut last: Option<(String, u64, u64, u64, u64)> = None;
    loop {
        tokio::time::sleep_until(due).await;
        let mut st = job.lock();
        if st.state != JobState::Running {
            return;
        }
        let p = job.progress.snapshot();
        let key = (
            p.phase.clone(),
            p.bytes_done,
            p.bytes_total,
            p.bytes_fetched,
            p.bytes_written,
        );
        if last.as_ref() == Some(&key) {
            due = tokio::time::Instant::now() + Duration::from_millis(100);
            continue;
        }
        last = Some(key);
        st.last_progress = Some(p);
        job.publish(&ctx, &mut st, "progress");
        drop(st);
        due = tokio::time::Instant::now() + period;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks(d: &[&str]) -> Locks {
        Locks {
            disks: d.iter().map(PathBuf::from).collect(),
            barrier: false,
        }
    }

    #[test]
    fn locks_order_disk_jobs_and_barriers_but_not_read_only_jobs() {
        let free = Locks::default();
        let barrier = Locks {
            disks: vec![],
            barrier: true,
        };
        assert!(disks(&["/a"]).conflicts(&disks(&["/a"])));
        assert!(!disks(&["/a"]).conflicts(&disks(&["/b"])));
        assert!(disks(&["/a", "/c"]).conflicts(&disks(&["/c"])));
        assert!(!free.conflicts(&disks(&["/a"])));
        assert!(!free.conflicts(&barrier));
        assert!(barrier.conflicts(&disks(&["/a"])));
        assert!(!barrier.conflicts(&free));
        assert!(disks(&["/a"]).conflicts(&barrier));
    }
}
