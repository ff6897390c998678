//! Operator sessions. The cookie carries a random secret; the table keeps
//! only its SHA-256 (a stolen database file opens no session), the user,
//! the session's CSRF token and its expiry.

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, DbError};

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// User name.
    pub user: String,
    /// The CSRF token writes must carry.
    pub csrf: String,
    /// Expiry (ms).
    pub expires_at: i64,
}

/// SHA-256 hex of a cookie secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        secret.as_bytes(),
    ))
}

/// Stores a session for `secret` (the cookie value).
pub fn create(
    c: &Connection,
    secret: &str,
    user: &str,
    csrf: &str,
    ttl_ms: i64,
) -> Result<Session, DbError> {
    let now = now_ms();
    c.execute("DELETE FROM sessions WHERE expires_at < ?1", params![now])?;
    c.execute(
        "INSERT INTO sessions (id, user, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![hash_secret(secret), user, csrf, now, now + ttl_ms],
    )?;
    Ok(Session {
        user: user.to_owned(),
        csrf: csrf.to_owned(),
        expires_at: now + ttl_ms,
    })
}

/// The unexpired session of a cookie secret.
pub fn lookup(c: &Connection, secret: &str) -> Result<Option<Session>, DbError> {
    Ok(c.query_row(
        "SELECT user, csrf, expires_at FROM sessions WHERE id = ?1 AND expires_at > ?2",
        params![hash_secret(secret), now_ms()],
        |r| {
            Ok(Session {
                user: r.get(0)?,
                csrf: r.get(1)?,
                expires_at: r.get(2)?,
            })
        },
    )
    .optional()?)
}

/// Ends a session.
pub fn delete(c: &Connection, secret: &str) -> Result<(), DbError> {
    c.execute("DELETE FROM sessions WHERE id = ?1", [hash_secret(secret)])?;
    Ok(())
}

/// Ends every session of a user.
pub fn delete_user(c: &Connection, user: &str) -> Result<usize, DbError> {
    Ok(c.execute("DELETE FROM sessions WHERE user = ?1", [user])?)
}

/// A live session as operators see it (never its secret or CSRF token).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionInfo {
    /// The SHA-256 of its cookie secret: names it, opens nothing.
    pub id: String,
    /// User name.
    pub user: String,
    /// Signed in at (ms).
    pub created_at: i64,
    /// Expires at (ms).
    pub expires_at: i64,
}

/// Most sessions one listing returns.
pub const LIST_MAX: usize = 1000;

/// The unexpired sessions, newest first; only `user`'s when given.
pub fn list(c: &Connection, user: Option<&str>) -> Result<Vec<SessionInfo>, DbError> {
    let mut st = c.prepare(
        "SELECT id, user, created_at, expires_at FROM sessions
         WHERE expires_at > ?1 AND (?2 IS NULL OR user = ?2)
         ORDER BY created_at DESC LIMIT ?3",
    )?;
    let rows = st.query_map(params![now_ms(), user, LIST_MAX as i64], |r| {
        Ok(SessionInfo {
            id: r.get(0)?,
            user: r.get(1)?,
            created_at: r.get(2)?,
            expires_at: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The session named `id` (see [`SessionInfo::id`]), if live.
pub fn get(c: &Connection, id: &str) -> Result<Option<SessionInfo>, DbError> {
    Ok(c.query_row(
        "SELECT id, user, created_at, expires_at FROM sessions WHERE id = ?1 AND expires_at > ?2",
        params![id, now_ms()],
        |r| {
            Ok(SessionInfo {
                id: r.get(0)?,
                user: r.get(1)?,
                created_at: r.get(2)?,
                expires_at: r.get(3)?,
            })
        },
    )
    .optional()?)
}

/// Ends the session named `id`.
pub fn revoke(c: &Connection, id: &str) -> Result<bool, DbError> {
    Ok(c.execute("DELETE FROM sessions WHERE id = ?1", [id])? > 0)
}
