//! The swarm protocol's messages (JSON), shared by the client in this crate
//! and the coordinator in `aula-bootserver`.
//!
//! Coordinator routes (on the repository service, with the repository's
//! read credentials):
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/swarm/join` | [`JoinRequest`] | [`JoinResponse`] |
//! | `POST /v1/swarm/sync` | [`SyncRequest`] | [`SyncResponse`] (long poll: waits up to `wait_ms` for work) |
//! | `POST /v1/swarm/leave` | [`LeaveRequest`] | `{}` |
//! | `GET /v1/swarm` | | [`Status`] |
//!
//! Peer route (each member's own read-only server):
//! `GET /v1/swarm/chunks/{id}` with `Authorization: Bearer <session token>`:
//! `200` and the chunk's zstd frame, `404` (not held), `503` (all upload
//! slots busy), `401` (wrong token).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;

/// Path prefix of the coordinator's routes.
pub const COORDINATOR: &str = "/v1/swarm";
/// Path prefix of a peer's chunk route.
pub const PEER_CHUNKS: &str = "/v1/swarm/chunks/";
/// The source name of the repository server in assignments and reports.
pub const SERVER: &str = "server";
/// Most chunk ids accepted in one list of a request.
pub const MAX_IDS: usize = 1 << 20;

/// `POST /v1/swarm/join`: take part in the swarm of one image version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Image name.
    pub image: String,
    /// Image version (as in the manifest the member restores).
    pub version: u32,
    /// TCP port of the member's chunk server, on the address the request
    /// comes from; None: the member fetches but does not serve.
    #[serde(default)]
    pub port: Option<u16>,
    /// Uploads the member serves at once.
    #[serde(default = "default_slots")]
    pub slots: u32,
}

/// Upload slots of a member that does not say.
pub fn default_slots() -> u32 {
    4
}

/// The answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    /// Session name (`image@version`).
    pub session: String,
    /// The member's public id (how others name it as a source).
    pub member: String,
    /// The member's secret: it authenticates its syncs and leave.
    pub key: String,
    /// The session's peer token: members ask each other for chunks with
    /// it, and serve only to holders of it.
    pub token: String,
    /// Sync at least this often (ms) or be forgotten.
    pub heartbeat_ms: u64,
}

/// A chunk fetched and verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// The chunk.
    pub id: ChunkId,
    /// Where it came from: [`SERVER`] or a member id.
    pub from: String,
    /// Compressed bytes received.
    pub bytes: u64,
}

/// A fetch from a peer that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failed {
    /// The chunk.
    pub id: ChunkId,
    /// The member that failed to serve it.
    pub from: String,
    /// `corrupt`, `timeout`, `refused`, `busy`, `error`.
    pub why: String,
}

/// `POST /v1/swarm/sync`: report, announce, and ask for work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The member's secret from the join.
    pub key: String,
    /// Chunks the member now needs (added to its wanted set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub want: Vec<ChunkId>,
    /// Chunks the member now holds verified and serves (besides those in
    /// `done`, e.g. found in place on its disk).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub have: Vec<ChunkId>,
    /// Chunks the member can no longer serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<ChunkId>,
    /// Chunks fetched and verified since the last sync (the member holds and
    /// serves them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<Done>,
    /// Peer fetches that failed since the last sync.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Failed>,
    /// Assignments handed out earlier that the member did not use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<ChunkId>,
    /// Assignments whose bytes have all arrived (being verified and
    /// written; `done` or `failed` follows): their source's upload slot is
    /// free again, the chunk stays the member's until then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub received: Vec<ChunkId>,
    /// How many new assignments the member takes now (0: report only).
    #[serde(default)]
    pub ask: u32,
    /// With `ask`, wait up to this long (ms) for work when there is none
    /// yet (the coordinator caps it).
    #[serde(default)]
    pub wait_ms: u64,
    /// The member's restore is complete (it may stay to serve: linger).
    #[serde(default)]
    pub finished: bool,
}

/// One chunk to fetch, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The chunk.
    pub id: ChunkId,
    /// [`SERVER`] (the repository) or a member id.
    pub from: String,
    /// The member's chunk server, when `from` is a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
}

/// The answer to a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncResponse {
    /// Work (at most `ask` entries).
    #[serde(default)]
    pub assign: Vec<Assignment>,
    /// Chunks the member wants that are neither done nor assigned to it.
    pub pending: u64,
    /// Members in the session.
    pub members: u32,
    /// Members still restoring (wanting chunks they do not hold).
    pub restoring: u32,
}

/// `POST /v1/swarm/leave`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    /// The member's secret.
    pub key: String,
}

/// One member as `GET /v1/swarm` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Public id.
    pub member: String,
    /// Its chunk server, when it serves.
    pub addr: Option<SocketAddr>,
    /// Chunks it wants and does not hold yet.
    pub missing: u64,
    /// Chunks it holds and serves.
    pub holds: u64,
    /// Fetches in flight to it.
    pub downloads: u32,
    /// Uploads in flight from it.
    pub uploads: u32,
    /// Compressed bytes it received from the server.
    pub bytes_from_server: u64,
    /// Compressed bytes it received from peers.
    pub bytes_from_peers: u64,
    /// Compressed bytes peers received from it.
    pub bytes_served: u64,
    /// Failed fetches others reported about it.
    pub reports: u32,
    /// No longer handed out as a source (failures reported by several
    /// members).
    pub banned: bool,
    /// Seconds since it joined.
    pub age_s: u64,
}

/// One session as `GET /v1/swarm` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    /// `image@version`.
    pub session: String,
    /// Distinct chunks of the image.
    pub chunks: u64,
    /// Compressed bytes of those chunks.
    pub image_bytes: u64,
    /// Compressed bytes members reported fetching from the server.
    pub bytes_from_server: u64,
    /// Compressed bytes members reported fetching from peers.
    pub bytes_from_peers: u64,
    /// Server transfers in flight.
    pub server_uploads: u32,
    /// The members.
    pub members: Vec<MemberStatus>,
}

/// `GET /v1/swarm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Active sessions.
    pub sessions: Vec<SessionStatus>,
}
