//! The command log: every command given through the API or the console,
//! who gave it and its outcome (OpenGnsys calls these traces).

use rusqlite::{params, Connection};
use serde::Serialize;

use super::{now_ms, DbError};

/// One entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    /// Id (ascending in time).
    pub id: i64,
    /// When (ms).
    pub at: i64,
    /// Who: a user name, `api-token`, or `system`.
    pub who: String,
    /// What (`deploy`, `cancel`, `room.create`, `boot.set`, …).
    pub action: String,
    /// On what (`room Aula 1`, `deployment 12`, a MAC).
    pub target: String,
    /// `ok`, `refused: …`, `failed: …`.
    pub outcome: String,
    /// Details (JSON text or free text).
    pub detail: Option<String>,
}

/// Appends an entry.
pub fn append(
    c: &Connection,
    who: &str,
    action: &str,
    target: &str,
    outcome: &str,
    detail: Option<&str>,
) -> Result<i64, DbError> {
    let mut st = c.prepare_cached(
        "INSERT INTO command_log (at, who, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    st.execute(params![now_ms(), who, action, target, outcome, detail])?;
    Ok(c.last_insert_rowid())
}

/// Entries newest first, before id `before`, optionally of one user.
pub fn list(
    c: &Connection,
    who: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Entry>, DbError> {
    let sql = match who {
        Some(_) => {
            "SELECT id, at, who, action, target, outcome, detail FROM command_log \
                    WHERE who = ?3 AND id < ?1 ORDER BY id DESC LIMIT ?2"
        }
        None => {
            "SELECT id, at, who, action, target, outcome, detail FROM command_log \
                 WHERE id < ?1 AND ?3 IS NULL ORDER BY id DESC LIMIT ?2"
        }
    };
    let mut st = c.prepare_cached(sql)?;
    let rows = st.query_map(
        params![before.unwrap_or(i64::MAX), limit.clamp(1, 500), who],
        |r| {
            Ok(Entry {
                id: r.get(0)?,
                at: r.get(1)?,
                who: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                outcome: r.get(5)?,
                detail: r.get(6)?,
            })
        },
    )?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?);
    }
    Ok(out)
}
