//! `aula-httpkit`: the HTTP server plumbing the agent and the boot server
//! share, so each exists once.
//!
//! | module | what | guarantee |
//! |---|---|---|
//! | [`server`] | accept loop over plain TCP or TLS | one semaphore permit per connection, a cap per client address, and a full table closes the oldest connection that sent no request; TLS handshakes (10 s), request heads (20 s), bodies (10 s idle, 60 s in all) and stalled responses (30 s) bounded; on shutdown no new connection is accepted and open ones are drained for at most 5 s |
//! | [`stall`] | a stream whose writes must make progress | a response the client stops reading fails after the limit |
//! | [`auth`] | the credential of an `Authorization` header | `Bearer <key>` and a bare `<key>` (ogAgent's form) both yield the key; anything else yields none |
//! | [`body`] | bounded body and JSON reading | a body over its limit is [`body::BodyError::TooLarge`] (413); a client that disconnects or sends a broken body is [`body::BodyError::Read`] (400), never 413; a body too slow is [`body::BodyError::Timeout`] (408) |
//! | [`range`] | one `Range: bytes=` header against a length | RFC 9110 §14: malformed or multiple ranges are ignored (whole entity), a start past the end is unsatisfiable (416) |
//! | [`response`] | JSON and error responses | bodies are `application/json`, one line ending in `\n` |
//!
//! The imager does not depend on this crate: it knows no HTTP server.

#![deny(missing_docs)]

pub mod auth;
pub mod body;
pub mod range;
pub mod response;
pub mod server;
pub mod stall;

pub use response::{empty, error_response, full, json_response, Body};
