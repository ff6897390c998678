//! Swarm restore: the machines restoring one image fetch its chunks from
//! each other, coordinated by the repository service, so the server sends
//! each chunk about once per room instead of once per machine.
//!
//! * Every chunk is checked against its SHA-256 (the manifest's id) before
//!   it is written, wherever it came from, so a peer can only waste time: a
//!   frame that fails is fetched again from the repository, and the peer is
//!   reported and avoided from then on.
//! * The coordinator (`aula-bootserver`, `POST /v1/swarm/...`, see
//!   [`wire`]) knows what each member holds and wants, and hands out work:
//!   a chunk nobody holds goes from the server to one member, the others
//!   get it from peers (rarest first, a few uploads per peer at once); no
//!   member waits for another, members join and leave at any time.
//! * Each member serves what it verified ([`store`]) from its own small
//!   read-only HTTP server ([`peer`]), with a per-session token handed out
//!   by the coordinator to members only (joining needs the repository's
//!   read credentials). This module is the only place `aula-imager` runs
//!   an HTTP server.
//!
//! A member that cannot reach the coordinator, or gets nothing from it for
//! a while, fetches from the repository alone: the swarm never makes a
//! restore fail that would have worked without it.

mod client;
pub mod peer;
pub mod store;
pub mod wire;

pub use client::{Swarm, SwarmOptions, SwarmStats};
pub use store::ServeStats;
