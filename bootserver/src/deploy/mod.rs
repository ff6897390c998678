//! Deployments: put an image on a room (or a list of machines), or capture
//! one machine's partition as an image, each machine through its own state
//! machine ([`machine`]), driven by one runner task ([`runner`]) that talks
//! to the agents over HTTPS ([`agent`]), wakes machines ([`wol`]) and reads
//! the registry once a tick ([`fleet`]). Deployments live in the database
//! ([`crate::db::deployments`]) and resume after a restart.

pub mod agent;
pub mod fleet;
pub mod machine;
pub mod presence;
pub mod runner;
pub mod wol;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::db::deployments::{self, Deployment, NewDeployment};
use crate::db::rooms::Machine;
use crate::db::store::Store;
use crate::db::DbError;
use crate::dhcp::DhcpService;
use crate::mac::MacAddr;
use crate::repository::RepoService;
use crate::state::Registry;
use machine::{After, Kind, Phase};

/// Why a deployment request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Outside the operator's rooms.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown deployment or machine.
    #[error("{0}")]
    NotFound(String),
    /// Storage.
    #[error(transparent)]
    Db(#[from] DbError),
}

fn one() -> u32 {
    1
}
fn unicast() -> String {
    "unicast".into()
}

/// A room by id or name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RoomRef {
    /// Id.
    Id(i64),
    /// Name.
    Name(String),
}

/// Body of `POST /v1/deployments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    /// Every machine of this room.
    #[serde(default)]
    pub room: Option<RoomRef>,
    /// Machines by MAC, name or id (added to the room's, if any).
    #[serde(default)]
    pub machines: Vec<String>,
    /// `name` or `name@version`.
    pub image: String,
    /// Disk number (1-based).
    #[serde(default = "one")]
    pub disk: u32,
    /// Partition number; absent or 0 = the whole disk (disk images).
    #[serde(default)]
    pub partition: Option<u32>,
    /// `unicast` or `unicast-cache` (`swarm` is refused until it exists).
    #[serde(default = "unicast")]
    pub method: String,
    /// A layout (`LayoutSpec`) to apply before restoring, or `"machine"`:
    /// each machine's own stored layout.
    #[serde(default)]
    pub layout: Option<serde_json::Value>,
    /// `reboot-local` (default), `poweroff` or `stay`.
    #[serde(default)]
    pub after: After,
    /// RFC 3339 start time; absent = now.
    #[serde(default)]
    pub start_at: Option<String>,
    /// Machines restoring at once (0 or absent = all).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

/// Body of `POST /v1/captures`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// The machine (MAC, name or id).
    pub machine: String,
    /// Disk number.
    #[serde(default = "one")]
    pub disk: u32,
    /// Partition; absent or 0 = the whole disk (a disk image).
    #[serde(default)]
    pub partition: Option<u32>,
    /// Image name to publish.
    pub image: String,
    /// What to do after.
    #[serde(default)]
    pub after: After,
    /// RFC 3339 start time.
    #[serde(default)]
    pub start_at: Option<String>,
}

/// The machines a request names, resolved.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The room, when one was named.
    pub room_id: Option<i64>,
    /// The machines.
    pub machines: Vec<Machine>,
}

/// Messages to the runner.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A deployment was stored: load it.
    Load(i64),
    /// Cancel a deployment, or one machine of it.
    Cancel(i64, Option<MacAddr>),
    /// An observation about one machine (from an I/O task).
    Input {
        dep: i64,
        mac: MacAddr,
        input: machine::Input,
        /// The I/O task of this machine is over.
        io_done: bool,
        /// The job (and the agent's event count for it) this observation is
        /// about: dropped when the machine has moved on to another job, or
        /// when a newer observation of the job was applied already.
        about: Option<Observed>,
    },
    /// A webhook the machine's agent signed (`POST /v1/agents/events`).
    Event { mac: MacAddr, event: AgentEvent },
    /// A poll failed to reach the agent.
    Unreachable { dep: i64, mac: MacAddr },
}

/// Which job, and which of its events, an observation reflects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The job id.
    pub job: String,
    /// The agent's `seq` for the job when the observation was made (the
    /// webhook's own, or the job's event count in a `GET /v1/jobs/{id}`).
    pub seq: Option<u64>,
}

/// The parts of an agent's webhook the runner follows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AgentEvent {
    /// `job_id`.
    pub job: String,
    /// `seq`.
    pub seq: u64,
    /// `state`: queued, running, succeeded, failed, cancelled.
    pub state: String,
    /// `progress`: bytes done, total, rate.
    pub progress: Option<(u64, u64, f64)>,
    /// The whole event (for the failure's `error`).
    pub body: serde_json::Value,
}

impl AgentEvent {
    /// The fields of a webhook body (`agent/WEBHOOKS.md`), if it is one.
    pub fn parse(v: &serde_json::Value) -> Option<AgentEvent> {
        let p = &v["progress"];
        Some(AgentEvent {
            job: v["job_id"].as_str()?.to_owned(),
            seq: v["seq"].as_u64()?,
            state: v["state"].as_str()?.to_owned(),
            progress: p.is_object().then(|| {
                (
                    p["bytes_done"].as_u64().unwrap_or(0),
                    p["bytes_total"].as_u64().unwrap_or(0),
                    p["rate_bps"].as_f64().unwrap_or(0.0),
                )
            }),
            body: v.clone(),
        })
    }
}

/// The live state of one machine in a running deployment (room tiles).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LiveMachine {
    /// Deployment.
    pub deployment: i64,
    /// Phase.
    pub phase: Phase,
    /// Bytes done / total.
    pub bytes_done: u64,
    /// Bytes in all.
    pub bytes_total: u64,
}

/// What the runner publishes after each tick.
#[derive(Debug, Default)]
pub struct Published {
    /// One JSON document per active (or just finished) deployment.
    pub deployments: HashMap<i64, Arc<String>>,
    /// Machines in active deployments.
    pub machines: HashMap<MacAddr, LiveMachine>,
}

/// The deployment service: requests in, runner behind.
pub struct DeployService {
    pub(crate) store: Store,
    pub(crate) registry: Arc<Registry>,
    pub(crate) cfg: Arc<Config>,
    pub(crate) repo: Option<Arc<RepoService>>,
    pub(crate) dhcp: Option<DhcpService>,
    pub(crate) tx: mpsc::UnboundedSender<Msg>,
    pub(crate) published: RwLock<Published>,
    pub(crate) ticks: watch::Sender<u64>,
    /// Whether registered agents answer (see [`presence`]).
    pub(crate) presence: presence::Presence,
}

impl std::fmt::Debug for DeployService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployService").finish_non_exhaustive()
    }
}

impl crate::http::api::EventListener for DeployService {
    fn agent_event(&self, mac: MacAddr, event: &serde_json::Value) {
        DeployService::agent_event(self, mac, event);
    }
}

/// Renews this boot server's heartbeat and machine claims every third of
/// the lease, until `cancel`.
async fn heartbeat(pg: crate::db::pg::PgDb, cancel: tokio_util::sync::CancellationToken) {
    let period = (pg.lease() / 3).max(Duration::from_millis(200));
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = every.tick() => {
                if let Err(e) = pg.heartbeat().await {
                    tracing::warn!(error = %e, "renewing machine claims in the shared database");
                }
            }
        }
    }
}

/// Parses an RFC 3339 time into unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, DeployError> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
        DeployError::Invalid(format!(
            "start_at {s:?} is not an RFC 3339 time (2026-03-02T02:00:00+01:00): {e}"
        ))
    })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Checks a method name.
pub fn check_method(m: &str) -> Result<(), DeployError> {
    match m {
        // swarm: the agents fetch from each other under the repository's
        // coordinator (`/v1/swarm`), the server sending each chunk about
        // once per room.
        "unicast" | "unicast-cache" | "swarm" => Ok(()),
        other => Err(DeployError::Invalid(format!(
            "method {other:?} is not one of unicast, unicast-cache, swarm"
        ))),
    }
}

impl DeployService {
    /// Starts the service and its runner on `tracker`; resumes deployments
    /// left active by the previous run.
    pub fn start(
        store: Store,
        registry: Arc<Registry>,
        cfg: Arc<Config>,
        repo: Option<Arc<RepoService>>,
        dhcp: Option<DhcpService>,
        cancel: tokio_util::sync::CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<DeployService> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ticks, _) = watch::channel(0u64);
        let svc = Arc::new(DeployService {
            store,
            registry,
            cfg,
            repo,
            dhcp,
            tx,
            published: RwLock::new(Published::default()),
            ticks,
            presence: presence::Presence::default(),
        });
        let period = Duration::from_secs(svc.cfg.console.presence_probe_s.max(1));
        tracker.spawn(presence::run(svc.clone(), period, cancel.clone()));
        if let Some(pg) = svc.store.shared().cloned() {
            tracker.spawn(heartbeat(pg, cancel.clone()));
        }
        tracker.spawn(runner::run(svc.clone(), rx, cancel));
        svc
    }

    /// What the registry knows now (off the runtime), without the probes.
    pub async fn fleet_without_presence(&self) -> fleet::Fleet {
        let reg = self.registry.clone();
        let default = self.cfg.boot.default_mode;
        let dhcp = self.dhcp.clone();
        tokio::task::spawn_blocking(move || fleet::Fleet::read(&reg, default, dhcp.as_ref()))
            .await
            .unwrap_or_default()
    }

    /// What the registry knows now, with whether each agent answers.
    pub async fn fleet(&self) -> fleet::Fleet {
        let mut f = self.fleet_without_presence().await;
        f.presence = self.presence.snapshot();
        f
    }

    /// The console's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A webhook the agent of `mac` signed (checked by the caller): handed
    /// to the runner at once, which applies it to the machine whose current
    /// job it names (newer events only). Never blocks.
    pub fn agent_event(&self, mac: MacAddr, event: &serde_json::Value) {
        if let Some(event) = AgentEvent::parse(event) {
            let _ = self.tx.send(Msg::Event { mac, event });
        }
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// The DHCP service, if it runs.
    pub fn dhcp(&self) -> Option<&DhcpService> {
        self.dhcp.as_ref()
    }

    /// The image repository, if it runs.
    pub fn repository(&self) -> Option<&Arc<RepoService>> {
        self.repo.as_ref()
    }

    /// A receiver that changes after every runner tick.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.ticks.subscribe()
    }

    /// The last tick document of a deployment (active or just finished).
    pub fn tick_json(&self, id: i64) -> Option<Arc<String>> {
        self.published
            .read()
            .ok()
            .and_then(|p| p.deployments.get(&id).cloned())
    }

    /// Machines in active deployments.
    pub fn live_machines(&self) -> HashMap<MacAddr, LiveMachine> {
        self.published
            .read()
            .map(|p| p.machines.clone())
            .unwrap_or_default()
    }

    /// Resolves the machines a request names.
    pub async fn resolve(
        &self,
        room: Option<RoomRef>,
        names: Vec<String>,
    ) -> Result<Targets, DeployError> {
        let store = &self.store;
        async move {
            let room_id = match &room {
                None => None,
                Some(RoomRef::Id(id)) => Some(store.room(*id).await?.id),
                Some(RoomRef::Name(n)) => Some(
                    store
                        .room_id_by_name(n.clone())
                        .await?
                        .ok_or_else(|| DbError::Invalid(format!("no room named {n:?}")))?,
                ),
            };
            let mut out: Vec<Machine> = match room_id {
                Some(r) => store.room_machines(r).await?,
                None => Vec::new(),
            };
            for n in &names {
                let m = store.find_machine(n.clone()).await?.ok_or_else(|| {
                    DbError::Invalid(format!(
                        "unknown machine {:?}: add it to a room or adopt it first",
                        n.trim()
                    ))
                })?;
                if !out.iter().any(|o| o.id == m.id) {
                    out.push(m);
                }
            }
            if out.is_empty() {
                return Err(DbError::Invalid(match room_id {
                    Some(_) => "the room has no machines".into(),
                    None => "name a room or at least one machine".into(),
                }));
            }
            Ok(Targets {
                room_id,
                machines: out,
            })
        }
        .await
        .map_err(|e| match e {
            DbError::Invalid(s) => DeployError::Invalid(s),
            DbError::NotFound(w) => DeployError::NotFound(format!("{w} not found")),
            other => DeployError::Db(other),
        })
    }

    /// Checks the image against the repository: `(name, version, is a
    /// disk image)`; without a repository only the name is checked.
    pub async fn check_image(
        &self,
        image: &str,
        must_exist: bool,
    ) -> Result<(String, Option<u32>, Option<bool>), DeployError> {
        let (name, version) = aula_imager::repo::parse_image_ref(image)
            .map_err(|e| DeployError::Invalid(format!("image: {e}")))?;
        aula_imager::manifest::validate_name(&name)
            .map_err(|e| DeployError::Invalid(format!("image: {e}")))?;
        let Some(repo) = self.repo.clone().filter(|_| must_exist) else {
            return Ok((name, version, None));
        };
        let n2 = name.clone();
        // Without a version, the newest now: a room ends on one version
        // even if another is published while it restores.
        let (kind, version) = tokio::task::spawn_blocking(move || {
            use aula_imager::repo::Repository;
            let version = match version {
                Some(v) => Some(v),
                None => repo.repo().versions(&n2)?.last().copied(),
            };
            repo.repo()
                .manifest(&n2, version)
                .map(|m| (m.kind, version))
        })
        .await
        .map_err(|_| DeployError::Db(DbError::Worker))?
        .map_err(|e| {
            DeployError::Invalid(format!("image {image:?} is not in the repository ({e})"))
        })?;
        Ok((
            name,
            version,
            Some(kind == aula_imager::manifest::ImageKind::Disk),
        ))
    }

    /// Stores a restore deployment for resolved targets and starts it.
    pub async fn create(
        &self,
        req: &DeploymentRequest,
        targets: Targets,
        who: &str,
        retry_of: Option<i64>,
    ) -> Result<Deployment, DeployError> {
        check_method(&req.method)?;
        if req.disk == 0 || req.disk > 64 {
            return Err(DeployError::Invalid("disk must be 1..=64".into()));
        }
        let partition = req.partition.filter(|p| *p != 0);
        let (name, version, is_disk) = self.check_image(&req.image, true).await?;
        match (is_disk, partition) {
            (Some(true), Some(p)) => {
                return Err(DeployError::Invalid(format!(
                    "{name} is a whole-disk image: restore it to the disk, not to partition {p}"
                )))
            }
            (Some(false), None) => {
                return Err(DeployError::Invalid(format!(
                    "{name} is a partition image: name the partition to restore it to"
                )))
            }
            _ => {}
        }
        let layout = match &req.layout {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s == "machine" => {
                Some(serde_json::Value::String("machine".into()))
            }
            Some(v) => {
                let spec: aula_imager::disk::layout::LayoutSpec = serde_json::from_value(v.clone())
                    .map_err(|e| DeployError::Invalid(format!("layout: {e}")))?;
                if is_disk == Some(true) {
                    return Err(DeployError::Invalid(
                        "a whole-disk image brings its own partition table: drop the layout".into(),
                    ));
                }
                Some(
                    serde_json::to_value(spec)
                        .map_err(|e| DeployError::Invalid(format!("layout: {e}")))?,
                )
            }
        };
        let start_at = match &req.start_at {
            Some(s) => Some(parse_time(s)?),
            None => None,
        };
        let max = req.max_concurrent.unwrap_or(0);
        if max > 10_000 {
            return Err(DeployError::Invalid(
                "max_concurrent must be 0..=10000".into(),
            ));
        }
        let d = NewDeployment {
            kind: Kind::Restore,
            room_id: targets.room_id,
            image: name,
            version: version.map(i64::from),
            disk: req.disk,
            partition,
            method: req.method.clone(),
            layout,
            after: req.after,
            start_at,
            max_concurrent: max,
            created_by: who.to_owned(),
            retry_of,
            machines: targets
                .machines
                .iter()
                .map(|m| (m.mac, Some(m.id), m.name.clone()))
                .collect(),
        };
        self.save_new(d).await
    }

    /// Stores a capture of one machine and starts it.
    pub async fn capture(
        &self,
        req: &CaptureRequest,
        target: Machine,
        who: &str,
    ) -> Result<Deployment, DeployError> {
        let (name, version, _) = self.check_image(&req.image, false).await?;
        if version.is_some() {
            return Err(DeployError::Invalid(
                "a capture publishes the next version: name the image without @version".into(),
            ));
        }
        if req.disk == 0 || req.disk > 64 {
            return Err(DeployError::Invalid("disk must be 1..=64".into()));
        }
        let start_at = match &req.start_at {
            Some(s) => Some(parse_time(s)?),
            None => None,
        };
        let d = NewDeployment {
            kind: Kind::Capture,
            room_id: target.room_id,
            image: name,
            version: None,
            disk: req.disk,
            partition: req.partition.filter(|p| *p != 0),
            method: "unicast".into(),
            layout: None,
            after: req.after,
            start_at,
            max_concurrent: 1,
            created_by: who.to_owned(),
            retry_of: None,
            machines: vec![(target.mac, Some(target.id), target.name.clone())],
        };
        self.save_new(d).await
    }

    async fn save_new(&self, d: NewDeployment) -> Result<Deployment, DeployError> {
        let dep = self.store.insert_deployment(d).await?;
        let _ = self.tx.send(Msg::Load(dep.id));
        Ok(dep)
    }

    /// "Retry the failed ones": a new deployment of the failed machines of
    /// `id`, with the same image, target and options.
    pub async fn retry(&self, id: i64, who: &str) -> Result<Deployment, DeployError> {
        let (dep, macs) = self
            .store
            .deployment_failed(id)
            .await
            .map_err(|e| match e {
                DbError::NotFound(_) => DeployError::NotFound(format!("deployment {id} not found")),
                other => DeployError::Db(other),
            })?;
        if dep.state.is_active() {
            return Err(DeployError::Invalid(format!(
                "deployment {id} is still running: retry its failed machines when it has finished"
            )));
        }
        if macs.is_empty() {
            return Err(DeployError::Invalid(format!(
                "deployment {id} has no failed machines"
            )));
        }
        let targets = self
            .resolve(None, macs.iter().map(MacAddr::to_string).collect())
            .await?;
        let targets = Targets {
            room_id: dep.room_id,
            ..targets
        };
        match dep.kind {
            Kind::Restore => {
                let req = DeploymentRequest {
                    room: None,
                    machines: Vec::new(),
                    image: match dep.version {
                        Some(v) => format!("{}@{v}", dep.image),
                        None => dep.image.clone(),
                    },
                    disk: dep.disk,
                    partition: dep.partition,
                    method: dep.method.clone(),
                    layout: dep.layout.clone(),
                    after: dep.after,
                    start_at: None,
                    max_concurrent: Some(dep.max_concurrent),
                };
                self.create(&req, targets, who, Some(id)).await
            }
            Kind::Capture => {
                let req = CaptureRequest {
                    machine: macs[0].to_string(),
                    disk: dep.disk,
                    partition: dep.partition,
                    image: dep.image.clone(),
                    after: dep.after,
                    start_at: None,
                };
                let m = targets
                    .machines
                    .into_iter()
                    .next()
                    .ok_or_else(|| DeployError::NotFound("machine not found".into()))?;
                self.capture(&req, m, who).await
            }
        }
    }

    /// Cancels a deployment or one of its machines.
    pub async fn cancel(&self, id: i64, mac: Option<MacAddr>) -> Result<Deployment, DeployError> {
        let store = &self.store;
        let dep = async move {
            let d = store.deployment(id).await?;
            if let Some(m) = mac {
                if !store.deployment_has(id, m).await? {
                    return Err(DbError::NotFound("machine in this deployment"));
                }
            }
            Ok(d)
        }
        .await
        .map_err(|e| match e {
            DbError::NotFound(w) => DeployError::NotFound(format!("{w} not found")),
            other => DeployError::Db(other),
        })?;
        if !dep.state.is_active() {
            return Err(DeployError::Invalid(format!(
                "deployment {id} has already {}",
                dep.state.as_str()
            )));
        }
        if let (Some(me), Some(owner)) = (self.store.server_id(), dep.server.as_deref()) {
            if me != owner {
                // Carried out by another boot server: it takes the request
                // from the shared database within a couple of seconds.
                self.store.request_cancel(id, mac).await?;
                tracing::info!(
                    deployment = id,
                    server = owner,
                    "cancel passed to the boot server carrying it out"
                );
                return Ok(dep);
            }
        }
        let _ = self.tx.send(Msg::Cancel(id, mac));
        Ok(dep)
    }

    /// A deployment with its machines as stored now.
    pub async fn get(
        &self,
        id: i64,
    ) -> Result<(Deployment, Vec<deployments::DeploymentMachine>), DeployError> {
        self.store
            .deployment_with_machines(id)
            .await
            .map_err(|e| match e {
                DbError::NotFound(_) => DeployError::NotFound(format!("deployment {id} not found")),
                other => DeployError::Db(other),
            })
    }

    /// Appends to the command log (errors only logged: the command itself
    /// already happened).
    pub async fn log(
        &self,
        who: &str,
        action: &str,
        target: &str,
        outcome: &str,
        detail: Option<String>,
    ) {
        let (who, action, target, outcome) = (
            who.to_owned(),
            action.to_owned(),
            target.to_owned(),
            outcome.to_owned(),
        );
        if let Err(e) = self
            .store
            .log_append(who, action, target, outcome, detail)
            .await
        {
            tracing::error!(error = %e, "writing the command log");
        }
    }
}
