//! The per-machine state machine of a deployment, pure: no I/O, no clock.
//!
//! ```text
//! pending ─▶ waking ─▶ booting-live ─▶ agent-ready ─▶ partitioning ─▶ restoring ─▶ setting-local-boot ─▶ rebooting ─▶ done
//!    │          │  (agent already up) ──▶ ▲       └──▶ capturing ─────────┘ (no layout)  └─▶ powering-off ─┘
//!    └──────────┴─────────────── any non-final state ─▶ failed(reason) | cancelled
//! ```
//!
//! [`Run::step`] takes one [`Input`] (an observation the runner made, or a
//! tick of the clock) and the time, changes the run and returns the
//! [`Action`]s the runner must carry out (send a Wake-on-LAN packet, post an
//! agent job, set local boot, …). Everything a run needs to resume after a
//! restart is in [`Run`] (serialised into the deployment's row).

use serde::{Deserialize, Serialize};

/// Unix milliseconds.
pub type Ms = i64;

/// Where one machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for the start time.
    #[default]
    Pending,
    /// One-shot live boot set, Wake-on-LAN sent; waiting for the machine to PXE-boot.
    Waking,
    /// The boot server handed it the live system; waiting for its agent.
    BootingLive,
    /// Its agent answers; waiting for a restore slot.
    AgentReady,
    /// Laying out the disk.
    Partitioning,
    /// Restoring the image.
    Restoring,
    /// Capturing an image.
    Capturing,
    /// Switching the machine to local boot.
    SettingLocalBoot,
    /// Rebooting into the restored system.
    Rebooting,
    /// Powering off.
    PoweringOff,
    /// Finished.
    Done,
    /// Failed; `reason` says why.
    Failed,
    /// Cancelled by an operator.
    Cancelled,
}

impl Phase {
    /// Every phase, in flow order.
    pub const ALL: [Phase; 13] = [
        Phase::Pending,
        Phase::Waking,
        Phase::BootingLive,
        Phase::AgentReady,
        Phase::Partitioning,
        Phase::Restoring,
        Phase::Capturing,
        Phase::SettingLocalBoot,
        Phase::Rebooting,
        Phase::PoweringOff,
        Phase::Done,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Waking => "waking",
            Phase::BootingLive => "booting-live",
            Phase::AgentReady => "agent-ready",
            Phase::Partitioning => "partitioning",
            Phase::Restoring => "restoring",
            Phase::Capturing => "capturing",
            Phase::SettingLocalBoot => "setting-local-boot",
            Phase::Rebooting => "rebooting",
            Phase::PoweringOff => "powering-off",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Done, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }

    /// Holds a restore slot (counts against `max_concurrent`).
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Phase::Partitioning | Phase::Restoring | Phase::Capturing
        )
    }
}

/// Restore an image, or capture one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Put an image on the machines.
    Restore,
    /// Take an image from one machine.
    Capture,
}

impl Kind {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Restore => "restore",
            Kind::Capture => "capture",
        }
    }

    /// From its stored name (anything else is a restore).
    pub(crate) fn parse(s: &str) -> Kind {
        if s == "capture" {
            Kind::Capture
        } else {
            Kind::Restore
        }
    }
}

/// What happens once the image is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum After {
    /// Set local boot and reboot into the restored system.
    #[default]
    RebootLocal,
    /// Set local boot and power off.
    Poweroff,
    /// Set local boot and leave the machine in the live system.
    Stay,
}

impl After {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            After::RebootLocal => "reboot-local",
            After::Poweroff => "poweroff",
            After::Stay => "stay",
        }
    }

    /// From its stored name (anything else is the default).
    pub(crate) fn parse(s: &str) -> After {
        match s {
            "poweroff" => After::Poweroff,
            "stay" => After::Stay,
            _ => After::RebootLocal,
        }
    }
}

/// The deployment-wide facts the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Restore or capture.
    pub kind: Kind,
    /// What to do at the end.
    pub after: After,
    /// This machine's disk is laid out before the restore.
    pub layout: bool,
}

/// Time limits (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From waking to a registered agent.
    pub live_boot: Ms,
    /// A layout job.
    pub partition: Ms,
    /// A restore or capture with no byte of progress.
    pub stall: Ms,
    /// From posting a reboot or power-off to its end.
    pub power: Ms,
    /// Between Wake-on-LAN packets while waking.
    pub wol_resend: Ms,
    /// Wake-on-LAN packets at most.
    pub wol_max: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            live_boot: 600_000,
            partition: 600_000,
            stall: 600_000,
            power: 180_000,
            wol_resend: 60_000,
            wol_max: 3,
        }
    }
}

/// An agent job a phase runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobOp {
    /// Lay out the disk.
    Layout,
    /// Restore the image.
    Restore,
    /// Capture an image.
    Create,
    /// Reboot.
    Reboot,
    /// Power off.
    Poweroff,
}

impl JobOp {
    /// The agent's op name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobOp::Layout => "layout",
            JobOp::Restore => "restore",
            JobOp::Create => "create",
            JobOp::Reboot => "reboot",
            JobOp::Poweroff => "poweroff",
        }
    }
}

/// The job of the current phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    /// Agent job id (deterministic: posting it again is idempotent).
    pub id: String,
    /// What it does.
    pub op: JobOp,
    /// The agent answered 202/200 for it.
    pub accepted: bool,
}

/// One machine's run through a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Agent job ids start with this (`d<deployment>-<mac hex>`).
    pub key: String,
    /// Where it is.
    pub phase: Phase,
    /// Since when.
    pub since: Ms,
    /// When the wake step began (a live boot or registration counts only after it).
    #[serde(default)]
    pub woke_at: Option<Ms>,
    /// Wake-on-LAN packets sent.
    #[serde(default)]
    pub wol_sent: u32,
    /// The last one.
    #[serde(default)]
    pub last_wol: Option<Ms>,
    /// The live boot was seen (the boot server served the live script).
    #[serde(default)]
    pub live_served: bool,
    /// An agent that was already up was used.
    #[serde(default)]
    pub reused_agent: bool,
    /// The current job.
    #[serde(default)]
    pub job: Option<JobRef>,
    /// Bytes done.
    #[serde(default)]
    pub bytes_done: u64,
    /// Bytes in all.
    #[serde(default)]
    pub bytes_total: u64,
    /// Bytes per second now.
    #[serde(default)]
    pub rate_bps: f64,
    /// When `bytes_done` last moved (or the job was accepted).
    #[serde(default)]
    pub progress_at: Ms,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// What the runner observed, or the clock.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The start time came and the slot for waking is free; `agent_up`:
    /// the machine's registered agent answered with its registered
    /// certificate.
    Start {
        /// Agent answered.
        agent_up: bool,
    },
    /// The boot server served this machine the live system after `woke_at`.
    LiveBootServed,
    /// An agent registered for this machine after `woke_at`.
    AgentRegistered,
    /// A restore slot is free.
    SlotGranted,
    /// The agent accepted the current job.
    JobAccepted,
    /// Progress of the current job.
    JobProgress {
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
        /// Bytes per second.
        rate: f64,
    },
    /// The current job succeeded.
    JobSucceeded,
    /// The current job (or the step the runner did for this phase) failed.
    JobFailed {
        /// Why, for a technician.
        reason: String,
    },
    /// Local boot is set.
    LocalBootSet,
    /// The agent stopped answering.
    AgentGone,
    /// An operator cancelled this machine.
    Cancel,
    /// Time passed.
    Tick,
}

/// What the runner must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Set a one-shot live boot for the machine.
    SetLiveOnce,
    /// Send a Wake-on-LAN packet.
    SendWol,
    /// Drop a one-shot live boot that was not used.
    ReleaseLiveOnce,
    /// Allow the machine's agent to upload the captured image.
    GrantCapture,
    /// Post this job to the agent (idempotent by id).
    PostJob(JobRef),
    /// Cancel this job on the agent.
    CancelJob(String),
    /// Set the machine's boot mode to local.
    SetLocalBoot,
}

/// "10 min", "45 s", "2 h".
pub fn human_duration(ms: Ms) -> String {
    let s = (ms.max(0) + 999) / 1000;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", (s + 30) / 60)
    } else {
        format!("{} h", (s + 1800) / 3600)
    }
}

impl Run {
    /// A machine waiting to start, with job ids from `key`.
    pub fn new(key: impl Into<String>, now: Ms) -> Run {
        Run {
            key: key.into(),
            phase: Phase::Pending,
            since: now,
            woke_at: None,
            wol_sent: 0,
            last_wol: None,
            live_served: false,
            reused_agent: false,
            job: None,
            bytes_done: 0,
            bytes_total: 0,
            rate_bps: 0.0,
            progress_at: now,
            reason: None,
        }
    }

    /// The job id of `op` for this machine.
    pub fn job_id(&self, op: JobOp) -> String {
        format!("aula-{}-{}", self.key, op.as_str())
    }

    fn enter(&mut self, phase: Phase, now: Ms) {
        self.phase = phase;
        self.since = now;
    }

    fn fail(&mut self, reason: impl Into<String>, now: Ms) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(j) = self.job.take() {
            if !self.phase.is_final()
                && matches!(j.op, JobOp::Layout | JobOp::Restore | JobOp::Create)
            {
                out.push(Action::CancelJob(j.id));
            }
        }
        if matches!(self.phase, Phase::Waking | Phase::BootingLive) {
            out.push(Action::ReleaseLiveOnce);
        }
        self.reason = Some(reason.into());
        self.rate_bps = 0.0;
        self.enter(Phase::Failed, now);
        out
    }

    fn start_job(&mut self, phase: Phase, op: JobOp, now: Ms) -> Action {
        let j = JobRef {
            id: self.job_id(op),
            op,
            accepted: false,
        };
        self.job = Some(j.clone());
        self.progress_at = now;
        self.rate_bps = 0.0;
        self.enter(phase, now);
        Action::PostJob(j)
    }

    fn imaging_phase(&mut self, plan: &Plan, now: Ms) -> Vec<Action> {
        match plan.kind {
            Kind::Capture => vec![
                Action::GrantCapture,
                self.start_job(Phase::Capturing, JobOp::Create, now),
            ],
            Kind::Restore => vec![self.start_job(Phase::Restoring, JobOp::Restore, now)],
        }
    }

    /// Feeds one input; returns the actions to carry out.
    pub fn step(&mut self, plan: &Plan, input: Input, now: Ms, t: &Timeouts) -> Vec<Action> {
        if self.phase.is_final() {
            return Vec::new();
        }
        if input == Input::Cancel {
            let mut out = Vec::new();
            if let Some(j) = self.job.take() {
                out.push(Action::CancelJob(j.id));
            }
            if matches!(self.phase, Phase::Waking | Phase::BootingLive) {
                out.push(Action::ReleaseLiveOnce);
            }
            self.rate_bps = 0.0;
            self.enter(Phase::Cancelled, now);
            return out;
        }
        match (self.phase, input) {
            (Phase::Pending, Input::Start { agent_up: true }) => {
                self.reused_agent = true;
                self.enter(Phase::AgentReady, now);
                Vec::new()
            }
            (Phase::Pending, Input::Start { agent_up: false }) => {
                self.woke_at = Some(now);
                self.wol_sent = 1;
                self.last_wol = Some(now);
                self.enter(Phase::Waking, now);
                vec![Action::SetLiveOnce, Action::SendWol]
            }
            (Phase::Waking, Input::LiveBootServed) => {
                self.live_served = true;
                self.enter(Phase::BootingLive, now);
                Vec::new()
            }
            (Phase::Waking | Phase::BootingLive, Input::AgentRegistered) => {
                self.enter(Phase::AgentReady, now);
                Vec::new()
            }
            (Phase::Waking, Input::Tick) => {
                let woke = self.woke_at.unwrap_or(self.since);
                if now - woke >= t.live_boot {
                    return self.fail(
                        format!(
                            "did not boot into the live system within {}: check power and PXE",
                            human_duration(t.live_boot)
                        ),
                        now,
                    );
                }
                let last = self.last_wol.unwrap_or(woke);
                if self.wol_sent < t.wol_max && now - last >= t.wol_resend {
                    self.wol_sent += 1;
                    self.last_wol = Some(now);
                    return vec![Action::SendWol];
                }
                Vec::new()
            }
            (Phase::BootingLive, Input::Tick) => {
                let woke = self.woke_at.unwrap_or(self.since);
                if now - woke >= t.live_boot {
                    return self.fail(
                        format!(
                            "started the live system but its agent did not register within {}: check the live system's network and its server address",
                            human_duration(t.live_boot)
                        ),
                        now,
                    );
                }
                Vec::new()
            }
            (Phase::AgentReady, Input::SlotGranted) => {
                if plan.layout && plan.kind == Kind::Restore {
                    vec![self.start_job(Phase::Partitioning, JobOp::Layout, now)]
                } else {
                    self.imaging_phase(plan, now)
                }
            }
            (
                Phase::Partitioning
                | Phase::Restoring
                | Phase::Capturing
                | Phase::Rebooting
                | Phase::PoweringOff,
                Input::JobAccepted,
            ) => {
                if let Some(j) = &mut self.job {
                    j.accepted = true;
                }
                self.progress_at = now;
                Vec::new()
            }
            (Phase::Restoring | Phase::Capturing, Input::JobProgress { done, total, rate }) => {
                if done != self.bytes_done {
                    self.progress_at = now;
                }
                self.bytes_done = done;
                self.bytes_total = total;
                self.rate_bps = if rate.is_finite() && rate >= 0.0 {
                    rate
                } else {
                    0.0
                };
                Vec::new()
            }
            (Phase::Partitioning, Input::JobSucceeded) => {
                self.job = None;
                self.imaging_phase(plan, now)
            }
            (Phase::Restoring | Phase::Capturing, Input::JobSucceeded) => {
                self.job = None;
                self.bytes_done = self.bytes_total.max(self.bytes_done);
                self.rate_bps = 0.0;
                self.enter(Phase::SettingLocalBoot, now);
                vec![Action::SetLocalBoot]
            }
            (Phase::SettingLocalBoot, Input::LocalBootSet) => match plan.after {
                After::RebootLocal => vec![self.start_job(Phase::Rebooting, JobOp::Reboot, now)],
                After::Poweroff => vec![self.start_job(Phase::PoweringOff, JobOp::Poweroff, now)],
                After::Stay => {
                    self.enter(Phase::Done, now);
                    Vec::new()
                }
            },
            (Phase::Rebooting | Phase::PoweringOff, Input::JobSucceeded) => {
                self.job = None;
                self.enter(Phase::Done, now);
                Vec::new()
            }
            // A machine that went away after accepting the reboot did what
            // was asked.
            (Phase::Rebooting | Phase::PoweringOff, Input::AgentGone)
                if self.job.as_ref().is_some_and(|j| j.accepted) =>
            {
                self.job = None;
                self.enter(Phase::Done, now);
                Vec::new()
            }
            // A failed job (or a failed step of the runner: storing a boot
            // mode, reading the disks) ends the machine with its reason.
            (phase, Input::JobFailed { reason }) if phase != Phase::Pending => {
                // The failed job is over on the agent: nothing to cancel.
                self.job = None;
                self.fail(reason, now)
            }
            (
                Phase::AgentReady
                | Phase::Partitioning
                | Phase::Restoring
                | Phase::Capturing
                | Phase::Rebooting
                | Phase::PoweringOff,
                Input::AgentGone,
            ) => {
                self.job = None;
                let what = self.phase.as_str().replace('-', " ");
                self.fail(
                    format!("lost contact with the machine's agent while {what}: check power and network, then retry"),
                    now,
                )
            }
            (Phase::Partitioning, Input::Tick) if now - self.since >= t.partition => self.fail(
                format!(
                    "partitioning did not finish within {}",
                    human_duration(t.partition)
                ),
                now,
            ),
            (Phase::Restoring | Phase::Capturing, Input::Tick)
                if now - self.progress_at >= t.stall =>
            {
                let what = if self.phase == Phase::Restoring {
                    "restore"
                } else {
                    "capture"
                };
                self.fail(
                    format!(
                        "the {what} made no progress for {}: check the network and the repository",
                        human_duration(t.stall)
                    ),
                    now,
                )
            }
            (Phase::Rebooting | Phase::PoweringOff, Input::Tick) if now - self.since >= t.power => {
                let what = if self.phase == Phase::Rebooting {
                    "reboot"
                } else {
                    "power off"
                };
                self.job = None;
                self.fail(
                    format!(
                        "the machine did not {what} within {}",
                        human_duration(t.power)
                    ),
                    now,
                )
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        live_boot: 600_000,
        partition: 300_000,
        stall: 120_000,
        power: 60_000,
        wol_resend: 30_000,
        wol_max: 3,
    };

    fn plan(kind: Kind, after: After, layout: bool) -> Plan {
        Plan {
            kind,
            after,
            layout,
        }
    }

    const RESTORE: Plan = Plan {
        kind: Kind::Restore,
        after: After::RebootLocal,
        layout: true,
    };

    /// A fake clock: every step advances it by `dt`.
    struct Clock(Ms);
    impl Clock {
        fn at(&mut self, dt: Ms) -> Ms {
            self.0 += dt;
            self.0
        }
    }

    fn posted(actions: &[Action]) -> Vec<JobOp> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::PostJob(j) => Some(j.op),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_woken_machine_walks_every_phase_to_done() {
        let mut c = Clock(1_000);
        let mut r = Run::new("d1-525400000001", c.0);
        let a = r.step(&RESTORE, Input::Start { agent_up: false }, c.at(10), &T);
        assert_eq!(a, vec![Action::SetLiveOnce, Action::SendWol]);
        assert_eq!(r.phase, Phase::Waking);
        assert!(r
            .step(&RESTORE, Input::LiveBootServed, c.at(10_000), &T)
            .is_empty());
        assert_eq!(r.phase, Phase::BootingLive);
        r.step(&RESTORE, Input::AgentRegistered, c.at(10_000), &T);
        assert_eq!(r.phase, Phase::AgentReady);
        let a = r.step(&RESTORE, Input::SlotGranted, c.at(1), &T);
        assert_eq!(posted(&a), vec![JobOp::Layout]);
        assert_eq!(r.phase, Phase::Partitioning);
        assert_eq!(
            r.job.as_ref().expect("job").id,
            "aula-d1-525400000001-layout"
        );
        r.step(&RESTORE, Input::JobAccepted, c.at(100), &T);
        assert!(r.job.as_ref().expect("job").accepted);
        let a = r.step(&RESTORE, Input::JobSucceeded, c.at(2_000), &T);
        assert_eq!(posted(&a), vec![JobOp::Restore]);
        assert_eq!(r.phase, Phase::Restoring);
        r.step(&RESTORE, Input::JobAccepted, c.at(100), &T);
        r.step(
            &RESTORE,
            Input::JobProgress {
                done: 50,
                total: 100,
                rate: 10.0,
            },
            c.at(1_000),
            &T,
        );
        assert_eq!((r.bytes_done, r.bytes_total, r.rate_bps), (50, 100, 10.0));
        let a = r.step(&RESTORE, Input::JobSucceeded, c.at(1_000), &T);
        assert_eq!(a, vec![Action::SetLocalBoot]);
        assert_eq!(
            (r.phase, r.bytes_done, r.rate_bps),
            (Phase::SettingLocalBoot, 100, 0.0)
        );
        let a = r.step(&RESTORE, Input::LocalBootSet, c.at(10), &T);
        assert_eq!(posted(&a), vec![JobOp::Reboot]);
        assert_eq!(r.phase, Phase::Rebooting);
        r.step(&RESTORE, Input::JobAccepted, c.at(10), &T);
        r.step(&RESTORE, Input::JobSucceeded, c.at(10), &T);
        assert_eq!(r.phase, Phase::Done);
        assert_eq!(r.job, None);
        // Final: nothing moves it any more.
        assert!(r.step(&RESTORE, Input::Cancel, c.at(10), &T).is_empty());
        assert!(r
            .step(&RESTORE, Input::Tick, c.at(10_000_000), &T)
            .is_empty());
        assert_eq!(r.phase, Phase::Done);
    }

    #[test]
    fn an_agent_already_up_is_reused_and_no_layout_goes_straight_to_restoring() {
        let p = plan(Kind::Restore, After::Stay, false);
        let mut r = Run::new("k", 0);
        assert!(r
            .step(&p, Input::Start { agent_up: true }, 1, &T)
            .is_empty());
        assert_eq!(r.phase, Phase::AgentReady);
        assert!(r.reused_agent);
        let a = r.step(&p, Input::SlotGranted, 2, &T);
        assert_eq!(posted(&a), vec![JobOp::Restore]);
        r.step(&p, Input::JobSucceeded, 3, &T);
        r.step(&p, Input::LocalBootSet, 4, &T);
        assert_eq!(r.phase, Phase::Done, "stay: done once local boot is set");
    }

    #[test]
    fn a_registration_without_a_seen_live_boot_still_counts() {
        let mut r = Run::new("k", 0);
        r.step(&RESTORE, Input::Start { agent_up: false }, 0, &T);
        r.step(&RESTORE, Input::AgentRegistered, 5, &T);
        assert_eq!(r.phase, Phase::AgentReady);
    }

    #[test]
    fn poweroff_ends_after_the_poweroff_job_or_when_the_agent_goes_away() {
        let p = plan(Kind::Restore, After::Poweroff, false);
        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        r.step(&p, Input::SlotGranted, 0, &T);
        r.step(&p, Input::JobSucceeded, 0, &T);
        let a = r.step(&p, Input::LocalBootSet, 0, &T);
        assert_eq!(posted(&a), vec![JobOp::Poweroff]);
        assert_eq!(r.phase, Phase::PoweringOff);
        // Gone before it accepted: not proof of anything; gone after: done.
        let mut early = r.clone();
        early.step(&p, Input::AgentGone, 1, &T);
        assert_eq!(early.phase, Phase::Failed);
        r.step(&p, Input::JobAccepted, 1, &T);
        r.step(&p, Input::AgentGone, 2, &T);
        assert_eq!(r.phase, Phase::Done);
    }

    #[test]
    fn a_capture_grants_upload_rights_then_runs_create() {
        let p = plan(Kind::Capture, After::RebootLocal, true);
        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        let a = r.step(&p, Input::SlotGranted, 0, &T);
        assert_eq!(a[0], Action::GrantCapture);
        assert_eq!(posted(&a), vec![JobOp::Create], "captures never lay out");
        assert_eq!(r.phase, Phase::Capturing);
        r.step(
            &p,
            Input::JobProgress {
                done: 1,
                total: 2,
                rate: 1.0,
            },
            1,
            &T,
        );
        assert_eq!(r.bytes_done, 1);
        let a = r.step(&p, Input::JobSucceeded, 2, &T);
        assert_eq!(a, vec![Action::SetLocalBoot]);
    }

    #[test]
    fn waking_resends_wol_then_times_out_with_a_reason_and_releases_the_live_boot() {
        let mut r = Run::new("k", 0);
        r.step(&RESTORE, Input::Start { agent_up: false }, 0, &T);
        assert!(r.step(&RESTORE, Input::Tick, 29_999, &T).is_empty());
        assert_eq!(
            r.step(&RESTORE, Input::Tick, 30_000, &T),
            vec![Action::SendWol]
        );
        assert_eq!(
            r.step(&RESTORE, Input::Tick, 60_000, &T),
            vec![Action::SendWol]
        );
        assert_eq!(r.wol_sent, 3);
        assert!(
            r.step(&RESTORE, Input::Tick, 90_000, &T).is_empty(),
            "at most wol_max packets"
        );
        assert!(r.step(&RESTORE, Input::Tick, 599_999, &T).is_empty());
        let a = r.step(&RESTORE, Input::Tick, 600_000, &T);
        assert_eq!(a, vec![Action::ReleaseLiveOnce]);
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(
            r.reason.as_deref(),
            Some("did not boot into the live system within 10 min: check power and PXE")
        );
    }

    #[test]
    fn booting_live_times_out_when_the_agent_never_registers() {
        let mut r = Run::new("k", 0);
        r.step(&RESTORE, Input::Start { agent_up: false }, 0, &T);
        r.step(&RESTORE, Input::LiveBootServed, 20_000, &T);
        assert!(r.step(&RESTORE, Input::Tick, 599_000, &T).is_empty());
        r.step(&RESTORE, Input::Tick, 600_000, &T);
        assert_eq!(r.phase, Phase::Failed);
        assert!(
            r.reason
                .as_deref()
                .unwrap_or("")
                .contains("agent did not register within 10 min"),
            "{:?}",
            r.reason
        );
    }

    #[test]
    fn partitioning_times_out_and_cancels_its_job() {
        let mut r = Run::new("k", 0);
        r.step(&RESTORE, Input::Start { agent_up: true }, 0, &T);
        r.step(&RESTORE, Input::SlotGranted, 0, &T);
        assert!(r.step(&RESTORE, Input::Tick, 299_999, &T).is_empty());
        let a = r.step(&RESTORE, Input::Tick, 300_000, &T);
        assert_eq!(a, vec![Action::CancelJob("aula-k-layout".into())]);
        assert_eq!(
            r.reason.as_deref(),
            Some("partitioning did not finish within 5 min")
        );
    }

    #[test]
    fn a_stalled_restore_fails_but_a_moving_one_does_not() {
        let p = plan(Kind::Restore, After::RebootLocal, false);
        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        r.step(&p, Input::SlotGranted, 0, &T);
        r.step(&p, Input::JobAccepted, 0, &T);
        for i in 1..=10 {
            r.step(
                &p,
                Input::JobProgress {
                    done: i,
                    total: 100,
                    rate: 1.0,
                },
                i as Ms * 100_000,
                &T,
            );
            assert!(r
                .step(&p, Input::Tick, i as Ms * 100_000 + 1, &T)
                .is_empty());
        }
        // The same count again does not reset the stall clock.
        r.step(
            &p,
            Input::JobProgress {
                done: 10,
                total: 100,
                rate: 0.0,
            },
            1_100_000,
            &T,
        );
        let a = r.step(&p, Input::Tick, 1_000_000 + 120_000, &T);
        assert_eq!(a, vec![Action::CancelJob("aula-k-restore".into())]);
        assert_eq!(
            r.reason.as_deref(),
            Some("the restore made no progress for 2 min: check the network and the repository")
        );
    }

    #[test]
    fn a_reboot_that_never_ends_fails_after_the_power_timeout() {
        let p = plan(Kind::Restore, After::RebootLocal, false);
        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        r.step(&p, Input::SlotGranted, 0, &T);
        r.step(&p, Input::JobSucceeded, 0, &T);
        r.step(&p, Input::LocalBootSet, 1_000, &T);
        assert!(r.step(&p, Input::Tick, 60_999, &T).is_empty());
        r.step(&p, Input::Tick, 61_000, &T);
        assert_eq!(
            r.reason.as_deref(),
            Some("the machine did not reboot within 60 s")
        );
    }

    #[test]
    fn job_failures_carry_their_reason_in_every_job_phase() {
        for (steps, phase) in [
            (0, Phase::Partitioning),
            (1, Phase::Restoring),
            (2, Phase::SettingLocalBoot),
            (3, Phase::Rebooting),
        ] {
            let mut r = Run::new("k", 0);
            r.step(&RESTORE, Input::Start { agent_up: true }, 0, &T);
            r.step(&RESTORE, Input::SlotGranted, 0, &T);
            let seq = [
                Input::JobSucceeded,
                Input::JobSucceeded,
                Input::LocalBootSet,
            ];
            for i in seq.into_iter().take(steps) {
                r.step(&RESTORE, i, 0, &T);
            }
            assert_eq!(r.phase, phase);
            let a = r.step(
                &RESTORE,
                Input::JobFailed {
                    reason: "disk 1 is 96 MiB, the layout needs 160 MiB".into(),
                },
                1,
                &T,
            );
            assert!(
                a.is_empty(),
                "{phase:?}: the failed job needs no cancel: {a:?}"
            );
            assert_eq!(r.phase, Phase::Failed);
            assert_eq!(
                r.reason.as_deref(),
                Some("disk 1 is 96 MiB, the layout needs 160 MiB")
            );
        }
    }

    #[test]
    fn a_failed_runner_step_while_waking_fails_and_releases_the_live_boot() {
        let mut r = Run::new("k", 0);
        r.step(&RESTORE, Input::Start { agent_up: false }, 0, &T);
        let a = r.step(
            &RESTORE,
            Input::JobFailed {
                reason: "could not store the one-shot live boot".into(),
            },
            1,
            &T,
        );
        assert_eq!(a, vec![Action::ReleaseLiveOnce]);
        assert_eq!(r.phase, Phase::Failed);
    }

    #[test]
    fn losing_the_agent_mid_restore_fails_with_a_reason() {
        let p = plan(Kind::Restore, After::RebootLocal, false);
        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        r.step(&p, Input::SlotGranted, 0, &T);
        r.step(&p, Input::JobAccepted, 0, &T);
        r.step(&p, Input::AgentGone, 5, &T);
        assert_eq!(r.phase, Phase::Failed);
        assert!(r.reason.as_deref().unwrap_or("").contains("lost contact"));
    }

    #[test]
    fn cancel_from_every_live_phase_cleans_up_what_that_phase_started() {
        let p = plan(Kind::Restore, After::RebootLocal, false);
        let mut r = Run::new("k", 0);
        assert!(r.step(&p, Input::Cancel, 0, &T).is_empty());
        assert_eq!(r.phase, Phase::Cancelled);

        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: false }, 0, &T);
        assert_eq!(
            r.step(&p, Input::Cancel, 1, &T),
            vec![Action::ReleaseLiveOnce]
        );

        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: false }, 0, &T);
        r.step(&p, Input::LiveBootServed, 0, &T);
        assert_eq!(
            r.step(&p, Input::Cancel, 1, &T),
            vec![Action::ReleaseLiveOnce]
        );

        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        assert!(r.step(&p, Input::Cancel, 1, &T).is_empty());

        let mut r = Run::new("k", 0);
        r.step(&p, Input::Start { agent_up: true }, 0, &T);
        r.step(&p, Input::SlotGranted, 0, &T);
        assert_eq!(
            r.step(&p, Input::Cancel, 1, &T),
            vec![Action::CancelJob("aula-k-restore".into())]
        );
        assert_eq!(r.phase, Phase::Cancelled);
    }

    #[test]
    fn inputs_that_do_not_apply_change_nothing() {
        let mut r = Run::new("k", 0);
        let before = r.clone();
        for i in [
            Input::LiveBootServed,
            Input::AgentRegistered,
            Input::SlotGranted,
            Input::JobAccepted,
            Input::JobSucceeded,
            Input::LocalBootSet,
            Input::AgentGone,
            Input::Tick,
        ] {
            assert!(r.step(&RESTORE, i, 10, &T).is_empty());
        }
        assert_eq!(r, before, "pending waits only for Start or Cancel");
    }

    #[test]
    fn runs_round_trip_through_json_and_phases_through_their_names() {
        let mut r = Run::new("k", 0);
        r.step(&RESTORE, Input::Start { agent_up: false }, 0, &T);
        let s = serde_json::to_string(&r).expect("ser");
        let back: Run = serde_json::from_str(&s).expect("de");
        assert_eq!(back, r);
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).expect("ser"), p.as_str());
        }
        assert_eq!(human_duration(45_000), "45 s");
        assert_eq!(human_duration(600_000), "10 min");
        assert_eq!(human_duration(7_200_000), "2 h");
    }
}
