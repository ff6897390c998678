//! The runner: one task that owns every active deployment.
//!
//! Every [`TICK`] it reads the registry once ([`Fleet`]), feeds each
//! machine's state machine what changed (a live boot served, an agent
//! registered, a free restore slot, the clock), starts the I/O each machine
//! needs (probe its agent, post its job, poll the job, set its boot mode)
//! as separate tasks whose results come back as messages, writes changed
//! rows in one transaction, and publishes one JSON document per deployment
//! for the console's event streams.
//!
//! Jobs are followed by the agents' signed webhooks, applied as they
//! arrive ([`Msg::Event`], from `POST /v1/agents/events`), and by polling
//! the agent's job API (`GET /v1/jobs/{id}`): about once a second until a
//! job's first webhook arrives (an agent whose webhooks go to another core),
//! then every [`POLL_FALLBACK_MS`] after the last one. The poll answers
//! whether a webhook was missed or the server restarted, so a resumed
//! deployment needs nothing else. Every observation names its job and the
//! agent's event count (`seq`): one about a job the machine has left, or
//! older than one applied already, is dropped, so a late poll cannot undo
//! a webhook. Job ids are deterministic, so posting a job again after a
//! restart is idempotent.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::agent::{AgentAddr, AgentClients, CallError};
use super::fleet::Fleet;
use super::machine::{Action, Input, JobOp, JobRef, Kind, Ms, Phase, Plan, Run, Timeouts};
use super::{AgentEvent, DeployService, LiveMachine, Msg, Observed, Published};
use crate::config::BootMode;
use crate::db::deployments::{Deployment, DeploymentState};
use crate::db::now_ms;
use crate::db::pg::Claim;
use crate::mac::MacAddr;

/// How often the runner looks at every machine.
pub const TICK: Duration = Duration::from_millis(500);
/// How often a running job is polled while no webhook of it arrived.
const POLL_MS: Ms = 1_000;
/// How long after a job's last webhook it is polled (the fallback).
pub const POLL_FALLBACK_MS: Ms = 5_000;
/// Progress-only changes are written at most this often.
const PROGRESS_SAVE_MS: Ms = 3_000;
/// Minutes a capture grant lasts.
const CAPTURE_MINUTES: u64 = 240;

struct Slot {
    mac: MacAddr,
    name: String,
    expected_ip: Option<Ipv4Addr>,
    layout: Option<Value>,
    run: Run,
    finished_at: Option<i64>,
    /// An I/O task for this machine is in flight.
    busy: bool,
    /// State changed since the last write.
    dirty: bool,
    /// Only progress changed since the last write.
    progress_dirty: bool,
    last_poll: Ms,
    unreachable_since: Option<Ms>,
    /// The newest observation applied for the current job.
    seen: Option<Seen>,
    /// This boot server holds the machine's claim (always, without a
    /// shared database); an unclaimed machine is not acted on.
    claimed: bool,
}

/// The newest observation applied for a job.
struct Seen {
    job: String,
    seq: u64,
    /// When its last webhook arrived.
    event_at: Option<Ms>,
}

impl Slot {
    /// Whether an observation `about` a job still applies; records it.
    fn admit(&mut self, about: &Observed, webhook: Option<Ms>) -> bool {
        let current = self.run.job.as_ref().map(|j| j.id.as_str());
        if current != Some(about.job.as_str()) {
            return false;
        }
        let seen = match &mut self.seen {
            Some(s) if s.job == about.job => s,
            other => other.insert(Seen {
                job: about.job.clone(),
                seq: 0,
                event_at: None,
            }),
        };
        if let Some(seq) = about.seq {
            if seq < seen.seq {
                return false;
            }
            seen.seq = seq;
        }
        if webhook.is_some() {
            seen.event_at = webhook;
        }
        true
    }

    /// When the current job is next polled.
    fn poll_due(&self, now: Ms) -> bool {
        let event_at = self
            .seen
            .as_ref()
            .filter(|s| self.run.job.as_ref().is_some_and(|j| j.id == s.job))
            .and_then(|s| s.event_at);
        match event_at {
            Some(at) => now - self.last_poll.max(at) >= POLL_FALLBACK_MS,
            None => now - self.last_poll >= POLL_MS,
        }
    }
}

struct Active {
    dep: Deployment,
    slots: Vec<Slot>,
    cancel_all: bool,
    last_progress_save: Ms,
}

impl Active {
    fn plan(&self, slot: &Slot) -> Plan {
        Plan {
            kind: self.dep.kind,
            after: self.dep.after,
            layout: slot.layout.is_some(),
        }
    }
}

fn timeouts(svc: &DeployService) -> Timeouts {
    let c = &svc.cfg.console;
    let ms = |s: u64| (s as i64).saturating_mul(1000);
    Timeouts {
        live_boot: ms(c.live_boot_timeout_s),
        partition: ms(c.partition_timeout_s),
        stall: ms(c.stall_timeout_s),
        power: ms(c.power_timeout_s),
        wol_resend: ms(c.wol_resend_s),
        wol_max: 3,
    }
}

struct Runner {
    svc: Arc<DeployService>,
    tx: mpsc::UnboundedSender<Msg>,
    active: BTreeMap<i64, Active>,
    t: Timeouts,
    clients: AgentClients,
    fleet: Arc<Fleet>,
    /// Deployments that ended: their last document stays published a while.
    ended: HashMap<i64, (Arc<String>, Ms)>,
    /// When the shared database was last asked for new deployments.
    last_discover: Ms,
}

/// How often a boot server on a shared database looks for deployments
/// another console started for its rooms.
const DISCOVER_MS: Ms = 2_000;

/// The runner task.
pub(crate) async fn run(
    svc: Arc<DeployService>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    cancel: CancellationToken,
) {
    let mut r = Runner {
        tx: svc.tx.clone(),
        t: timeouts(&svc),
        svc,
        active: BTreeMap::new(),
        clients: AgentClients::default(),
        fleet: Arc::new(Fleet::default()),
        ended: HashMap::new(),
        last_discover: now_ms(),
    };
    match r.svc.store.deployments_to_run().await {
        Ok(list) => {
            for id in list {
                tracing::info!(deployment = id, "resuming deployment");
                r.load(id).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "reading active deployments"),
    }
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = every.tick() => r.tick().await,
            m = rx.recv() => match m {
                Some(m) => r.message(m).await,
                None => break,
            },
        }
    }
    // Whatever changed is written; nothing is ended on the way out: a
    // restarted server resumes from here.
    r.save(true).await;
    tracing::debug!("deployment runner stopped");
}

fn reason_of(op: JobOp, dep: &Deployment, job: &Value) -> String {
    let kind = job["error"]["kind"].as_str().unwrap_or("");
    let msg = job["error"]["message"]
        .as_str()
        .unwrap_or("no reason given");
    let part = dep
        .partition
        .map(|p| format!("partition {p}"))
        .unwrap_or_else(|| "the disk".into());
    match kind {
        "image_not_found" => format!("image {} is not in the repository ({msg})", dep.image),
        "target_too_small" => format!(
            "{part} of disk {} is too small for the image: {msg}",
            dep.disk
        ),
        "no_disk" => format!("the machine has no disk {}: {msg}", dep.disk),
        "no_partition" => format!(
            "disk {} has no {part}: deploy with a layout ({msg})",
            dep.disk
        ),
        "chunk_missing" | "chunk_corrupt" | "bad_manifest" | "repository" => {
            format!("the repository failed during the {}: {msg}", op.as_str())
        }
        "cancelled" => format!("the {} was cancelled on the machine", op.as_str()),
        "busy" => format!("the disk is in use on the machine: {msg}"),
        _ => format!("{} failed: {msg}", op.as_str()),
    }
}

/// "96 MiB", "120 GiB".
pub fn human_bytes(b: u64) -> String {
    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;
    if b >= 10 * G {
        format!("{} GiB", b / G)
    } else if b >= G {
        format!("{:.1} GiB", b as f64 / G as f64)
    } else {
        format!("{} MiB", b.div_ceil(M))
    }
}

/// The smallest disk (bytes, MiB steps) the layout fits on, or why it fits
/// on none.
pub fn layout_need(
    spec: &aula_imager::disk::layout::LayoutSpec,
    sector: u32,
) -> Result<u64, String> {
    const MIB: u64 = 1 << 20;
    let fits = |mib: u64| aula_imager::disk::layout::plan(spec, mib * MIB, sector).is_ok();
    let (mut lo, mut hi) = (1u64, 1u64 << 30); // 1 MiB .. 1 PiB
    if !fits(hi) {
        return Err(
            match aula_imager::disk::layout::plan(spec, hi * MIB, sector) {
                Err(e) => e.to_string(),
                Ok(_) => "the layout does not fit any disk".into(),
            },
        );
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo * MIB)
}

impl Runner {
    async fn load(&mut self, id: i64) {
        let store = &self.svc.store;
        let loaded = async {
            let (d, ms) = store.deployment_with_machines(id).await?;
            let mut out = Vec::new();
            for m in ms {
                let info = match m.machine_id {
                    Some(mid) => store.machine(mid).await.ok(),
                    None => None,
                };
                out.push((m, info));
            }
            Ok::<_, crate::db::DbError>((d, out))
        }
        .await;
        let (dep, machines) = match loaded {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(deployment = id, error = %e, "loading deployment");
                return;
            }
        };
        if let Some(me) = self.svc.store.server_id() {
            if dep.server.as_deref() != Some(me) {
                tracing::debug!(
                    deployment = id,
                    server = dep.server.as_deref().unwrap_or("none"),
                    "deployment carried out by another boot server"
                );
                return;
            }
        }
        let shared = self.svc.store.shared().is_some();
        let slots = machines
            .into_iter()
            .map(|(m, info)| {
                let layout = match &dep.layout {
                    Some(Value::String(s)) if s == "machine" => {
                        info.as_ref().and_then(|i| i.disk_layout.clone())
                    }
                    other => other.clone(),
                };
                Slot {
                    mac: m.mac,
                    name: m.name,
                    expected_ip: info.as_ref().and_then(|i| i.expected_ip),
                    layout: if dep.kind == Kind::Capture {
                        None
                    } else {
                        layout
                    },
                    finished_at: m.finished_at,
                    run: m.run,
                    busy: false,
                    dirty: false,
                    progress_dirty: false,
                    last_poll: 0,
                    unreachable_since: None,
                    seen: None,
                    claimed: !shared,
                }
            })
            .collect();
        self.active.insert(
            id,
            Active {
                dep,
                slots,
                cancel_all: false,
                last_progress_save: 0,
            },
        );
        if shared {
            self.claim_machines().await;
        }
    }

    async fn message(&mut self, m: Msg) {
        match m {
            Msg::Load(id) => {
                self.load(id).await;
                self.tick().await;
            }
            Msg::Cancel(id, mac) => {
                let now = now_ms();
                let mut actions = Vec::new();
                if let Some(a) = self.active.get_mut(&id) {
                    if mac.is_none() {
                        a.cancel_all = true;
                    }
                    for i in 0..a.slots.len() {
                        if mac.is_some_and(|m| m != a.slots[i].mac) {
                            continue;
                        }
                        let plan = a.plan(&a.slots[i]);
                        let s = &mut a.slots[i];
                        let acts = s.run.step(&plan, Input::Cancel, now, &self.t);
                        s.dirty = true;
                        s.finished_at = Some(now);
                        actions.push((i, acts));
                    }
                }
                for (i, acts) in actions {
                    self.exec(id, i, acts);
                }
                self.tick().await;
            }
            Msg::Input {
                dep,
                mac,
                input,
                io_done,
                about,
            } => {
                let now = now_ms();
                let Some(i) = self.slot_of(dep, mac) else {
                    return;
                };
                let admitted = match self.active.get_mut(&dep) {
                    Some(a) => {
                        let s = &mut a.slots[i];
                        if io_done {
                            s.busy = false;
                        }
                        s.unreachable_since = None;
                        about.as_ref().is_none_or(|o| s.admit(o, None))
                    }
                    None => false,
                };
                if admitted {
                    self.apply(dep, i, vec![input], now);
                }
            }
            Msg::Event { mac, event } => self.event(mac, event),
            Msg::Unreachable { dep, mac } => {
                let now = now_ms();
                let gone_ms = (self.svc.cfg.console.agent_gone_s as i64) * 1000;
                let mut todo = None;
                if let Some(a) = self.active.get_mut(&dep) {
                    if let Some(i) = a.slots.iter().position(|s| s.mac == mac) {
                        let plan = a.plan(&a.slots[i]);
                        let s = &mut a.slots[i];
                        s.busy = false;
                        let since = *s.unreachable_since.get_or_insert(now);
                        // A machine told to reboot is expected to go away.
                        let power = matches!(s.run.phase, Phase::Rebooting | Phase::PoweringOff);
                        if power || now - since >= gone_ms {
                            let acts = s.run.step(&plan, Input::AgentGone, now, &self.t);
                            s.dirty = true;
                            if s.run.phase.is_final() {
                                s.finished_at = Some(now);
                            }
                            todo = Some((i, acts));
                        }
                    }
                }
                if let Some((i, acts)) = todo {
                    self.exec(dep, i, acts);
                }
            }
        }
    }

    /// The slot of `mac` in deployment `dep`.
    fn slot_of(&self, dep: i64, mac: MacAddr) -> Option<usize> {
        self.active
            .get(&dep)?
            .slots
            .iter()
            .position(|s| s.mac == mac)
    }

    /// Steps machine `i` of `dep` through `inputs` and carries out what it
    /// asks.
    fn apply(&mut self, dep: i64, i: usize, inputs: Vec<Input>, now: Ms) {
        let mut actions = Vec::new();
        if let Some(a) = self.active.get_mut(&dep) {
            let plan = a.plan(&a.slots[i]);
            let s = &mut a.slots[i];
            for input in inputs {
                let before = s.run.phase;
                let progress_only = matches!(input, Input::JobProgress { .. });
                actions.extend(s.run.step(&plan, input, now, &self.t));
                if s.run.phase != before || !progress_only {
                    s.dirty = true;
                } else {
                    s.progress_dirty = true;
                }
                if s.run.phase.is_final() && s.finished_at.is_none() {
                    s.finished_at = Some(now);
                }
            }
        }
        self.exec(dep, i, actions);
    }

    /// A signed webhook of the agent on `mac`: applied to the machine whose
    /// current job it names, if it is newer than what was applied.
    fn event(&mut self, mac: MacAddr, ev: AgentEvent) {
        let now = now_ms();
        let found = self.active.iter().find_map(|(id, a)| {
            let i = a
                .slots
                .iter()
                .position(|s| s.mac == mac && s.run.job.as_ref().is_some_and(|j| j.id == ev.job))?;
            Some((*id, i))
        });
        let Some((dep, i)) = found else {
            tracing::trace!(%mac, job = %ev.job, "webhook of no job a deployment follows");
            return;
        };
        let Some(a) = self.active.get_mut(&dep) else {
            return;
        };
        let about = Observed {
            job: ev.job.clone(),
            seq: Some(ev.seq),
        };
        let s = &mut a.slots[i];
        if !s.admit(&about, Some(now)) {
            tracing::debug!(%mac, job = %ev.job, seq = ev.seq, "older webhook dropped");
            return;
        }
        s.unreachable_since = None;
        let accepted = s.run.job.as_ref().is_some_and(|j| j.accepted);
        let op = s.run.job.as_ref().map(|j| j.op);
        let mut inputs = Vec::new();
        if !accepted {
            // The agent has the job, whatever the post's answer is doing.
            inputs.push(Input::JobAccepted);
        }
        if let Some((done, total, rate)) = ev.progress {
            inputs.push(Input::JobProgress { done, total, rate });
        }
        match (ev.state.as_str(), op) {
            ("succeeded", _) => inputs.push(Input::JobSucceeded),
            ("failed" | "cancelled", Some(op)) => inputs.push(Input::JobFailed {
                reason: reason_of(op, &a.dep, &ev.body),
            }),
            _ => {}
        }
        tracing::debug!(%mac, job = %ev.job, seq = ev.seq, state = %ev.state, "webhook applied");
        self.apply(dep, i, inputs, now);
    }

    async fn tick(&mut self) {
        let now = now_ms();
        let svc = self.svc.clone();
        let fleet = {
            let default = svc.cfg.boot.default_mode;
            let registry = svc.registry.clone();
            let dhcp = svc.dhcp.clone();
            tokio::task::spawn_blocking(move || Fleet::read(&registry, default, dhcp.as_ref()))
                .await
                .unwrap_or_default()
        };
        self.fleet = Arc::new(fleet);
        if self.svc.store.shared().is_some() && now - self.last_discover >= DISCOVER_MS {
            self.last_discover = now;
            self.discover().await;
            self.claim_machines().await;
        }
        let ids: Vec<i64> = self.active.keys().copied().collect();
        for id in ids {
            self.tick_one(id, now).await;
        }
        self.save(false).await;
        self.publish(now);
    }

    /// Loads the active deployments of this boot server that another
    /// console started, and takes the cancels other consoles asked for
    /// (shared database only).
    async fn discover(&mut self) {
        match self.svc.store.deployments_to_run().await {
            Ok(ids) => {
                for id in ids {
                    if !self.active.contains_key(&id) && !self.ended.contains_key(&id) {
                        tracing::info!(deployment = id, "picking up deployment");
                        self.load(id).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for deployments to run"),
        }
        match self.svc.store.take_cancels().await {
            Ok(list) => {
                for (id, mac) in list {
                    tracing::info!(deployment = id, mac = ?mac, "cancel asked on another console");
                    let _ = self.tx.send(Msg::Cancel(id, mac));
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading cancels asked on other consoles"),
        }
    }

    /// Claims the machines not yet claimed (at load, then every
    /// [`DISCOVER_MS`]): a machine another boot server holds under a live
    /// lease waits until it is released or its lease runs out.
    async fn claim_machines(&mut self) {
        let mut want = Vec::new();
        for (id, a) in &self.active {
            for (i, s) in a.slots.iter().enumerate() {
                if !s.claimed && !s.run.phase.is_final() {
                    want.push((*id, i, s.mac));
                }
            }
        }
        for (id, i, mac) in want {
            match self.svc.store.claim(id, mac).await {
                Ok(Claim::Granted) => {
                    if let Some(s) = self.active.get_mut(&id).and_then(|a| a.slots.get_mut(i)) {
                        s.claimed = true;
                    }
                }
                Ok(Claim::HeldBy {
                    server,
                    deployment,
                    until,
                }) => tracing::debug!(
                    %mac,
                    deployment = id,
                    holder = %server,
                    holder_deployment = deployment,
                    until,
                    "machine held by another boot server: waiting"
                ),
                Err(e) => tracing::warn!(%mac, error = %e, "claiming a machine"),
            }
        }
    }

    async fn tick_one(&mut self, id: i64, now: Ms) {
        let mut started = false;
        let mut work: Vec<(usize, Vec<Action>)> = Vec::new();
        let mut io: Vec<(usize, Io)> = Vec::new();
        {
            let Some(a) = self.active.get_mut(&id) else {
                return;
            };
            if a.dep.state == DeploymentState::Scheduled {
                if a.dep.start_at.is_some_and(|t| t > now) {
                    // Not yet; but a scheduled deployment cancelled as a
                    // whole ends now.
                    self.finish_if_done(id).await;
                    return;
                }
                a.dep.state = DeploymentState::Running;
                started = true;
            }
            let holders = a.slots.iter().filter(|s| s.run.phase.holds_slot()).count();
            let mut free = match a.dep.max_concurrent {
                0 => usize::MAX,
                n => (n as usize).saturating_sub(holders),
            };
            for i in 0..a.slots.len() {
                let plan = a.plan(&a.slots[i]);
                let s = &mut a.slots[i];
                if s.run.phase.is_final() || !s.claimed {
                    continue;
                }
                let mut inputs = Vec::new();
                match s.run.phase {
                    Phase::Pending if !s.busy => io.push((i, Io::Probe)),
                    Phase::Waking | Phase::BootingLive => {
                        let woke_s = s.run.woke_at.unwrap_or(s.run.since).div_euclid(1000);
                        let seen = self.fleet.clients.get(&s.mac);
                        if s.run.phase == Phase::Waking
                            && seen
                                .and_then(|c| c.last_boot)
                                .is_some_and(|(m, at)| m == BootMode::Live && at as i64 >= woke_s)
                        {
                            inputs.push(Input::LiveBootServed);
                        }
                        if self
                            .fleet
                            .agents
                            .get(&s.mac)
                            .is_some_and(|a| a.registered_at as i64 >= woke_s)
                        {
                            inputs.push(Input::AgentRegistered);
                        }
                    }
                    Phase::AgentReady if free > 0 => {
                        free -= 1;
                        inputs.push(Input::SlotGranted);
                    }
                    Phase::SettingLocalBoot if !s.busy => io.push((i, Io::SetLocal)),
                    p if p.holds_slot() || matches!(p, Phase::Rebooting | Phase::PoweringOff) => {
                        if let Some(j) = s.run.job.clone() {
                            if !s.busy && !j.accepted {
                                io.push((i, Io::Post(j)));
                            } else if !s.busy && s.poll_due(now) {
                                s.last_poll = now;
                                io.push((i, Io::Poll(j)));
                            }
                        }
                    }
                    _ => {}
                }
                inputs.push(Input::Tick);
                for input in inputs {
                    let before = s.run.phase;
                    let acts = s.run.step(&plan, input, now, &self.t);
                    if s.run.phase != before {
                        s.dirty = true;
                    }
                    if s.run.phase.is_final() && s.finished_at.is_none() {
                        s.finished_at = Some(now);
                    }
                    if !acts.is_empty() {
                        work.push((i, acts));
                    }
                }
            }
        }
        if started {
            let _ = self
                .svc
                .store
                .set_deployment_state(id, DeploymentState::Running)
                .await;
        }
        for (i, acts) in work {
            self.exec(id, i, acts);
        }
        for (i, what) in io {
            self.spawn_io(id, i, what);
        }
        self.finish_if_done(id).await;
    }

    async fn finish_if_done(&mut self, id: i64) {
        let done = self
            .active
            .get(&id)
            .is_some_and(|a| a.slots.iter().all(|s| s.run.phase.is_final()));
        if !done {
            return;
        }
        self.save(true).await;
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        if a.dep.kind == Kind::Capture {
            // The upload right ends with the capture (done, failed or
            // cancelled), not when its time runs out; a grant given by
            // hand for another image stays.
            for s in &a.slots {
                if self
                    .svc
                    .registry
                    .capture_grant(s.mac)
                    .is_some_and(|g| g.image == a.dep.image)
                {
                    self.svc.registry.revoke_capture(s.mac);
                    if let Err(e) = self.svc.registry.save().await {
                        tracing::error!(error = %e, mac = %s.mac, "storing the end of a capture grant");
                    }
                    tracing::info!(mac = %s.mac, image = %a.dep.image, "capture grant ended with the capture");
                }
            }
        }
        let state = if a.cancel_all {
            DeploymentState::Cancelled
        } else {
            DeploymentState::Finished
        };
        let restored: Vec<(MacAddr, i64)> = a
            .slots
            .iter()
            .filter(|s| s.run.phase == super::machine::Phase::Done && a.dep.kind == Kind::Restore)
            .map(|s| (s.mac, s.finished_at.unwrap_or_else(now_ms)))
            .collect();
        let (image, version) = (a.dep.image.clone(), a.dep.version);
        let r = self
            .svc
            .store
            .end_deployment(id, state, restored, image, version)
            .await;
        match r {
            Ok(d) => {
                tracing::info!(
                    deployment = id,
                    state = d.state.as_str(),
                    done = d.done,
                    failed = d.failed,
                    cancelled = d.cancelled,
                    "deployment ended"
                );
                self.svc
                    .log(
                        "system",
                        "deployment.end",
                        &format!("deployment {id}"),
                        &format!(
                            "{}: {} done, {} failed, {} cancelled",
                            d.state.as_str(),
                            d.done,
                            d.failed,
                            d.cancelled
                        ),
                        None,
                    )
                    .await;
                let mut a = a;
                a.dep = d;
                let doc = Arc::new(active_document(&a));
                self.ended.insert(id, (doc, now_ms()));
            }
            Err(e) => tracing::error!(deployment = id, error = %e, "ending deployment"),
        }
    }

    async fn save(&mut self, all: bool) {
        let now = now_ms();
        let mut batches = Vec::new();
        for (id, a) in self.active.iter_mut() {
            let progress_due = all || now - a.last_progress_save >= PROGRESS_SAVE_MS;
            let mut rows = Vec::new();
            for s in a.slots.iter_mut() {
                if s.dirty || (progress_due && s.progress_dirty) {
                    rows.push((s.mac, s.run.clone(), s.finished_at));
                    s.dirty = false;
                    s.progress_dirty = false;
                }
            }
            if progress_due {
                a.last_progress_save = now;
            }
            if !rows.is_empty() {
                batches.push((*id, rows));
            }
        }
        if batches.is_empty() {
            return;
        }
        let r = self.svc.store.save_runs(batches).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "saving deployment rows");
        }
    }

    fn publish(&mut self, now: Ms) {
        let mut p = Published::default();
        for (id, a) in &self.active {
            p.deployments.insert(*id, Arc::new(active_document(a)));
            for s in &a.slots {
                if !s.run.phase.is_final() {
                    p.machines.insert(
                        s.mac,
                        LiveMachine {
                            deployment: *id,
                            phase: s.run.phase,
                            bytes_done: s.run.bytes_done,
                            bytes_total: s.run.bytes_total,
                        },
                    );
                }
            }
        }
        self.ended.retain(|_, (_, at)| now - *at < 60_000);
        for (id, (doc, _)) in &self.ended {
            p.deployments.entry(*id).or_insert_with(|| doc.clone());
        }
        if let Ok(mut g) = self.svc.published.write() {
            *g = p;
        }
        self.svc.ticks.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn exec(&mut self, id: i64, i: usize, actions: Vec<Action>) {
        for act in actions {
            match act {
                Action::PostJob(j) => self.spawn_io(id, i, Io::Post(j)),
                Action::SetLocalBoot => self.spawn_io(id, i, Io::SetLocal),
                Action::SetLiveOnce => self.spawn_io(id, i, Io::SetLive),
                Action::SendWol => self.spawn_io(id, i, Io::Wol),
                Action::ReleaseLiveOnce => self.spawn_io(id, i, Io::Release),
                Action::CancelJob(job) => self.spawn_io(id, i, Io::Cancel(job)),
                Action::GrantCapture => {
                    if let Some(a) = self.active.get(&id) {
                        let mac = a.slots[i].mac;
                        let until = crate::state::unix_now() + CAPTURE_MINUTES * 60;
                        grant_capture(&self.svc, mac, &a.dep.image, until);
                    }
                }
            }
        }
    }

    fn spawn_io(&mut self, id: i64, i: usize, what: Io) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        let s = &mut a.slots[i];
        // Probe, post, poll and set-local are one at a time per machine;
        // the others are fire-and-forget.
        let exclusive = matches!(what, Io::Probe | Io::Post(_) | Io::Poll(_) | Io::SetLocal);
        if exclusive {
            if s.busy {
                return;
            }
            s.busy = true;
        }
        let ctx = IoCtx {
            svc: self.svc.clone(),
            tx: self.tx.clone(),
            clients: self.clients.clone(),
            agent: self.fleet.agents.get(&s.mac).map(|a| a.addr.clone()),
            dep: a.dep.clone(),
            mac: s.mac,
            expected_ip: s
                .expected_ip
                .or_else(|| self.fleet.clients.get(&s.mac).and_then(|c| c.ip)),
            layout: s.layout.clone(),
            phase: s.run.phase,
        };
        tokio::spawn(ctx.run(what));
    }
}

/// The runner's JSON document for one deployment (one SSE tick).
/// Machines are arrays `[mac, name, phase, bytes_done, bytes_total,
/// rate_bps, reason, since_ms]` to keep 200 machines small.
pub fn document<'a>(
    d: &Deployment,
    rows: impl Iterator<Item = (MacAddr, &'a str, &'a Run)>,
) -> String {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut done, mut total, mut rate) = (0u64, 0u64, 0f64);
    let machines: Vec<Value> = rows
        .map(|(mac, name, run)| {
            *counts.entry(run.phase.as_str()).or_default() += 1;
            done += run.bytes_done;
            total += run.bytes_total;
            rate += run.rate_bps;
            json!([
                mac,
                name,
                run.phase.as_str(),
                run.bytes_done,
                run.bytes_total,
                run.rate_bps.round(),
                run.reason,
                run.since
            ])
        })
        .collect();
    json!({
        "id": d.id,
        "kind": d.kind,
        "state": d.state.as_str(),
        "image": d.image,
        "version": d.version,
        "room": d.room,
        "created_by": d.created_by,
        "total": machines.len(),
        "counts": counts,
        "bytes_done": done,
        "bytes_total": total,
        "rate_bps": rate.round(),
        "machines": machines,
    })
    .to_string()
}

fn active_document(a: &Active) -> String {
    document(
        &a.dep,
        a.slots.iter().map(|s| (s.mac, s.name.as_str(), &s.run)),
    )
}

/// Lets the agent of `mac` upload chunks and publish `image`, nothing else.
fn grant_capture(svc: &DeployService, mac: MacAddr, image: &str, until: u64) {
    svc.registry.grant_capture(mac, image.to_owned(), until);
    tracing::info!(%mac, image, "capture granted for the deployment");
}

enum Io {
    Probe,
    Post(JobRef),
    Poll(JobRef),
    SetLocal,
    SetLive,
    Release,
    Wol,
    Cancel(String),
}

struct IoCtx {
    svc: Arc<DeployService>,
    tx: mpsc::UnboundedSender<Msg>,
    clients: AgentClients,
    agent: Option<AgentAddr>,
    dep: Deployment,
    mac: MacAddr,
    expected_ip: Option<Ipv4Addr>,
    layout: Option<Value>,
    phase: Phase,
}

const CALL: Duration = Duration::from_secs(10);

impl IoCtx {
    fn send(&self, input: Input, io_done: bool) {
        self.send_about(input, io_done, None);
    }

    /// An observation about job `about` (see [`Observed`]).
    fn send_about(&self, input: Input, io_done: bool, about: Option<Observed>) {
        let _ = self.tx.send(Msg::Input {
            dep: self.dep.id,
            mac: self.mac,
            input,
            io_done,
            about,
        });
    }

    async fn run(self, what: Io) {
        match what {
            Io::Probe => {
                let up = match &self.agent {
                    Some(a) => matches!(
                        self.clients.call(a, Method::GET, "/v1/status", None, Duration::from_secs(3)).await,
                        Ok(r) if r.status == StatusCode::OK
                    ),
                    None => false,
                };
                self.send(Input::Start { agent_up: up }, true);
            }
            Io::Post(j) => self.post(j).await,
            Io::Poll(j) => self.poll(j).await,
            Io::SetLocal => {
                match self
                    .svc
                    .registry
                    .set_boot(self.mac, BootMode::Local, false)
                    .await
                {
                    Ok(_) => self.send(Input::LocalBootSet, true),
                    Err(e) => self.send(
                        Input::JobFailed {
                            reason: format!("could not store the local boot mode: {e}"),
                        },
                        true,
                    ),
                }
            }
            Io::SetLive => {
                if let Err(e) = self
                    .svc
                    .registry
                    .set_boot(self.mac, BootMode::Live, true)
                    .await
                {
                    self.send(
                        Input::JobFailed {
                            reason: format!("could not store the one-shot live boot: {e}"),
                        },
                        false,
                    );
                }
            }
            Io::Release => {
                let fleet = {
                    let default = self.svc.cfg.boot.default_mode;
                    let reg = self.svc.registry.clone();
                    let dhcp = self.svc.dhcp.clone();
                    tokio::task::spawn_blocking(move || Fleet::read(&reg, default, dhcp.as_ref()))
                        .await
                        .unwrap_or_default()
                };
                if let Some(c) = fleet.clients.get(&self.mac) {
                    if c.boot.once == Some(BootMode::Live) {
                        let r = match c.boot.mode {
                            Some(m) => self
                                .svc
                                .registry
                                .set_boot(self.mac, m, false)
                                .await
                                .map(|_| ()),
                            None => self.svc.registry.clear_boot(self.mac).await,
                        };
                        if let Err(e) = r {
                            tracing::warn!(mac = %self.mac, error = %e, "dropping the one-shot live boot");
                        }
                    }
                }
            }
            Io::Wol => {
                let bcast = super::wol::broadcast_for(&self.svc.cfg, self.expected_ip);
                let port = self.svc.cfg.console.wol_port;
                let pkt = super::wol::magic_packet(self.mac);
                let r = async {
                    let s = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
                    s.set_broadcast(true)?;
                    s.send_to(&pkt, (bcast, port)).await
                }
                .await;
                match r {
                    Ok(_) => {
                        tracing::info!(mac = %self.mac, broadcast = %bcast, port, "Wake-on-LAN sent")
                    }
                    Err(e) => {
                        tracing::warn!(mac = %self.mac, broadcast = %bcast, error = %e, "Wake-on-LAN failed")
                    }
                }
            }
            Io::Cancel(job) => {
                if let Some(a) = &self.agent {
                    let path = format!("/v1/jobs/{job}");
                    match self
                        .clients
                        .call(a, Method::DELETE, &path, None, CALL)
                        .await
                    {
                        Ok(r) => {
                            tracing::info!(mac = %self.mac, job, status = r.status.as_u16(), "job cancel sent")
                        }
                        Err(e) => {
                            tracing::warn!(mac = %self.mac, job, error = %e, "job cancel not delivered")
                        }
                    }
                }
            }
        }
    }

    fn job_body(&self, j: &JobRef) -> Result<Value, String> {
        let d = &self.dep;
        let mut body = match j.op {
            JobOp::Layout => {
                let layout = self.layout.clone().ok_or("no layout")?;
                json!({"op": "layout", "disk": d.disk, "layout": layout})
            }
            JobOp::Restore => {
                let image = match d.version {
                    Some(v) => format!("{}@{v}", d.image),
                    None => d.image.clone(),
                };
                let mut b =
                    json!({"op": "restore", "disk": d.disk, "image": image, "method": d.method});
                if let Some(p) = d.partition {
                    b["partition"] = json!(p);
                }
                b
            }
            JobOp::Create => {
                let mut b = json!({"op": "create", "disk": d.disk, "image": d.image,
                    "description": format!("captured by deployment {} ({})", d.id, d.created_by)});
                if let Some(p) = d.partition {
                    b["partition"] = json!(p);
                }
                b
            }
            JobOp::Reboot => json!({"op": "reboot"}),
            JobOp::Poweroff => json!({"op": "poweroff"}),
        };
        body["id"] = json!(j.id);
        Ok(body)
    }

    /// Before a layout: the disk must be large enough, said in a way a
    /// technician acts on.
    async fn check_layout_fits(&self, a: &AgentAddr) -> Result<(), String> {
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        let spec: aula_imager::disk::layout::LayoutSpec = serde_json::from_value(layout.clone())
            .map_err(|e| format!("the machine's stored layout is invalid: {e}"))?;
        let inv = self
            .clients
            .call(
                a,
                Method::GET,
                "/v1/inventory",
                None,
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| format!("could not read the machine's disks: {e}"))?;
        if inv.status != StatusCode::OK {
            return Err(format!(
                "could not read the machine's disks: HTTP {}",
                inv.status
            ));
        }
        let disk = self.dep.disk;
        let found = inv.json["disks"]
            .as_array()
            .and_then(|ds| {
                ds.iter()
                    .find(|x| x["dsk"].as_u64() == Some(u64::from(disk)))
            })
            .cloned();
        let Some(dj) = found else {
            return Err(format!("the machine has no disk {disk}"));
        };
        let size = dj["size"].as_u64().unwrap_or(0);
        let sector = dj["logical_sector_size"]
            .as_u64()
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(512);
        let need = tokio::task::spawn_blocking(move || layout_need(&spec, sector))
            .await
            .map_err(|_| "checking the layout failed".to_owned())??;
        if need > size {
            return Err(format!(
                "disk {disk} is {}, the layout needs {}",
                human_bytes(size),
                human_bytes(need)
            ));
        }
        Ok(())
    }

    async fn post(&self, j: JobRef) {
        let about = || {
            Some(Observed {
                job: j.id.clone(),
                seq: None,
            })
        };
        let Some(a) = self.agent.clone() else {
            self.send_about(
                Input::JobFailed {
                    reason: "no agent is registered for this machine any more".into(),
                },
                true,
                about(),
            );
            return;
        };
        if j.op == JobOp::Layout {
            if let Err(reason) = self.check_layout_fits(&a).await {
                self.send_about(Input::JobFailed { reason }, true, about());
                return;
            }
        }
        let body = match self.job_body(&j) {
            Ok(b) => b,
            Err(e) => {
                self.send_about(Input::JobFailed { reason: e }, true, about());
                return;
            }
        };
        let mut last = String::new();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(2 * u64::from(attempt))).await;
            }
            match self
                .clients
                .call(&a, Method::POST, "/v1/jobs", Some(&body), CALL)
                .await
            {
                Ok(r) if r.status == StatusCode::ACCEPTED || r.status == StatusCode::OK => {
                    tracing::info!(mac = %self.mac, job = %j.id, op = j.op.as_str(), "job accepted");
                    self.send_about(Input::JobAccepted, true, about());
                    return;
                }
                Ok(r)
                    if r.status == StatusCode::TOO_MANY_REQUESTS
                        || r.status == StatusCode::SERVICE_UNAVAILABLE =>
                {
                    last = format!("the agent is busy (HTTP {})", r.status.as_u16());
                }
                Ok(r) => {
                    let msg = r.json["error"].as_str().unwrap_or("no reason given");
                    self.send_about(
                        Input::JobFailed {
                            reason: format!(
                                "the machine's agent refused the {} job: {msg}",
                                j.op.as_str()
                            ),
                        },
                        true,
                        about(),
                    );
                    return;
                }
                Err(CallError::Request(e)) => {
                    self.send_about(Input::JobFailed { reason: e }, true, about());
                    return;
                }
                Err(e) => last = format!("could not reach the agent at {}: {e}", a.base),
            }
        }
        self.send_about(Input::JobFailed { reason: last }, true, about());
    }

    async fn poll(&self, j: JobRef) {
        let Some(a) = self.agent.clone() else {
            let _ = self.tx.send(Msg::Unreachable {
                dep: self.dep.id,
                mac: self.mac,
            });
            return;
        };
        let path = format!("/v1/jobs/{}", j.id);
        // A machine told to reboot goes away: do not wait long for it.
        let limit = match self.phase {
            Phase::Rebooting | Phase::PoweringOff => Duration::from_secs(3),
            _ => CALL,
        };
        let about = |seq: Option<u64>| {
            Some(Observed {
                job: j.id.clone(),
                seq,
            })
        };
        match self.clients.call(&a, Method::GET, &path, None, limit).await {
            Ok(r) if r.status == StatusCode::OK => {
                let v = r.json;
                let seq = v["seq"].as_u64();
                let p = &v["progress"];
                if p.is_object() {
                    self.send_about(
                        Input::JobProgress {
                            done: p["bytes_done"].as_u64().unwrap_or(0),
                            total: p["bytes_total"].as_u64().unwrap_or(0),
                            rate: p["rate_bps"].as_f64().unwrap_or(0.0),
                        },
                        false,
                        about(seq),
                    );
                }
                match v["state"].as_str().unwrap_or("") {
                    "succeeded" => self.send_about(Input::JobSucceeded, true, about(seq)),
                    "failed" | "cancelled" => self.send_about(
                        Input::JobFailed {
                            reason: reason_of(j.op, &self.dep, &v),
                        },
                        true,
                        about(seq),
                    ),
                    _ => self.send_about(Input::Tick, true, about(seq)),
                }
            }
            Ok(r) if r.status == StatusCode::NOT_FOUND => {
                if matches!(self.phase, Phase::Rebooting | Phase::PoweringOff) {
                    self.send_about(Input::AgentGone, true, about(None));
                } else {
                    self.send_about(
                        Input::JobFailed {
                            reason: format!(
                                "the machine's agent no longer knows job {} (did the machine restart?)",
                                j.id
                            ),
                        },
                        true, about(None));
                }
            }
            Ok(r) => {
                tracing::warn!(mac = %self.mac, status = r.status.as_u16(), "polling a job");
                let _ = self.tx.send(Msg::Unreachable {
                    dep: self.dep.id,
                    mac: self.mac,
                });
            }
            Err(e) => {
                tracing::debug!(mac = %self.mac, error = %e, "agent unreachable");
                let _ = self.tx.send(Msg::Unreachable {
                    dep: self.dep.id,
                    mac: self.mac,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_on(job: &str) -> Slot {
        let mut run = Run::new("d1-525400000001", 0);
        run.job = Some(JobRef {
            id: job.into(),
            op: JobOp::Restore,
            accepted: true,
        });
        Slot {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            name: "pc01".into(),
            expected_ip: None,
            layout: None,
            run,
            finished_at: None,
            busy: false,
            dirty: false,
            progress_dirty: false,
            last_poll: 0,
            unreachable_since: None,
            seen: None,
            claimed: true,
        }
    }

    fn about(job: &str, seq: Option<u64>) -> Observed {
        Observed {
            job: job.into(),
            seq,
        }
    }

    #[test]
    fn an_observation_of_another_job_or_older_than_one_applied_is_dropped() {
        let mut s = slot_on("restore");
        assert!(!s.admit(&about("layout", Some(9)), None), "the job left");
        assert!(s.admit(&about("restore", Some(3)), Some(1_000)));
        assert!(
            s.admit(&about("restore", Some(3)), None),
            "same event count"
        );
        assert!(!s.admit(&about("restore", Some(2)), None), "older");
        assert!(s.admit(&about("restore", None), None), "a post's answer");
        // Polls: every second until a webhook, then 5 s after the last one.
        let mut fresh = slot_on("restore");
        assert!(fresh.poll_due(1_000));
        fresh.last_poll = 1_000;
        assert!(!fresh.poll_due(1_500) && fresh.poll_due(2_000));
        assert!(!s.poll_due(5_999) && s.poll_due(6_000));
        // A new job starts over.
        s.run.job = Some(JobRef {
            id: "reboot".into(),
            op: JobOp::Reboot,
            accepted: false,
        });
        assert!(s.poll_due(1_000));
        assert!(s.admit(&about("reboot", Some(1)), None));
    }

    #[test]
    fn a_tick_document_of_a_200_machine_room_stays_small() {
        let dep = Deployment {
            id: 12,
            kind: Kind::Restore,
            room_id: Some(1),
            room: Some("Aula 3".into()),
            image: "win11-lab".into(),
            version: Some(7),
            disk: 1,
            partition: Some(2),
            method: "unicast".into(),
            layout: None,
            after: super::super::machine::After::RebootLocal,
            start_at: None,
            max_concurrent: 0,
            state: DeploymentState::Running,
            created_by: "ana".into(),
            created_at: 0,
            started_at: None,
            finished_at: None,
            retry_of: None,
            total: 200,
            done: 0,
            failed: 0,
            cancelled: 0,
            server: None,
        };
        let rows: Vec<(MacAddr, String, Run)> = (0..200u32)
            .map(|i| {
                let mac = MacAddr([0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8]);
                let mut r = Run::new(format!("d12-{i}"), 1_790_000_000_000);
                r.phase = Phase::Restoring;
                r.bytes_done = 12_345_678_901;
                r.bytes_total = 40_000_000_000;
                r.rate_bps = 112_345_678.0;
                (mac, format!("a3-pc{i:03}"), r)
            })
            .collect();
        let doc = document(&dep, rows.iter().map(|(m, n, r)| (*m, n.as_str(), r)));
        let v: Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(v["machines"].as_array().map(Vec::len), Some(200));
        println!(
            "RESULT tick_bytes_200_machines={} per_machine={}",
            doc.len(),
            doc.len() / 200
        );
        assert!(doc.len() < 32 << 10, "{} bytes", doc.len());
    }

    #[test]
    fn layout_need_is_the_smallest_disk_the_plan_accepts() {
        let spec: aula_imager::disk::layout::LayoutSpec = serde_json::from_value(json!({
            "table": "mbr",
            "partitions": [
                {"number": 1, "type": "linux", "size": "100MiB"},
                {"number": 2, "type": "linux", "size": "60MiB"}
            ]
        }))
        .expect("spec");
        let need = layout_need(&spec, 512).expect("fits somewhere");
        assert!(aula_imager::disk::layout::plan(&spec, need, 512).is_ok());
        assert!(aula_imager::disk::layout::plan(&spec, need - (1 << 20), 512).is_err());
        assert_eq!(human_bytes(need), "161 MiB");
        assert_eq!(human_bytes(120 << 30), "120 GiB");
    }
}
