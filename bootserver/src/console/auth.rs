//! Operators: a users file with argon2 password hashes, sign-in sessions
//! (HttpOnly, SameSite=Strict, Secure under TLS), CSRF tokens on writes,
//! per-user room limits. Who a request acts as, and what each caller may
//! do, is `crate::auth` (`Principal::Operator` for a session); this module
//! is where sessions are found ([`Sessions`]).
//!
//! The users file (TOML, `0600`):
//!
//! ```toml
//! [[user]]
//! name = "ana"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$…"
//! rooms = ["Aula 1", "Aula 2"]   # absent = every room
//! ```
//!
//! It is re-read when its modification time changes, so `aula-bootserver
//! user add` takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};

/// One operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Sign-in name.
    pub name: String,
    /// PHC string of an argon2 hash.
    pub password_hash: String,
    /// Rooms this user may see and deploy to (by name); absent = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<User>,
}

/// Users-file failures.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// Reading or writing.
    #[error("{action} {path}")]
    Io {
        /// What.
        action: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Malformed file.
    #[error("{path}: {message}")]
    Parse {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
}

/// The users file, cached by modification time.
pub struct Users {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Arc<Vec<User>>)>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").field("path", &self.path).finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<User>, UsersError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(UsersError::Io {
                action: "reading",
                path: path.to_owned(),
                source,
            })
        }
    };
    let f: UsersFile = toml::from_str(&text).map_err(|e| UsersError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    for u in &f.user {
        PasswordHash::new(&u.password_hash).map_err(|e| UsersError::Parse {
            path: path.to_owned(),
            message: format!("user {:?}: password_hash: {e}", u.name),
        })?;
    }
    Ok(f.user)
}

impl Users {
    /// The users in `path` (absent file = no users).
    pub fn open(path: PathBuf) -> Result<Users, UsersError> {
        let users = read_file(&path)?;
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Ok(Users {
            path,
            cache: Mutex::new((mtime, Arc::new(users))),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current users (re-read when the file changed; a broken edit keeps
    /// the last good list and is logged).
    pub fn all(&self) -> Arc<Vec<User>> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut g = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if mtime != g.0 {
            match read_file(&self.path) {
                Ok(u) => *g = (mtime, Arc::new(u)),
                Err(e) => {
                    tracing::error!(error = %e, "users file unreadable; keeping the previous users")
                }
            }
        }
        g.1.clone()
    }

    /// One user.
    pub fn get(&self, name: &str) -> Option<User> {
        self.all().iter().find(|u| u.name == name).cloned()
    }
}

/// Hashes a password (argon2id, default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, UsersError> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| UsersError::Invalid("no randomness available".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| UsersError::Invalid(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Invalid(e.to_string()))
}

/// Checks a password against a stored hash (slow on purpose: call it off
/// the async runtime).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn check_user_name(name: &str) -> Result<(), UsersError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok && name != "system" && name != "api-token" {
        Ok(())
    } else {
        Err(UsersError::Invalid(format!(
            "user name {name:?}: use 1-64 of A-Z a-z 0-9 . _ - @ (not \"system\" or \"api-token\")"
        )))
    }
}

/// Adds or replaces a user in the file (written atomically, `0600`).
pub fn add_user(
    path: &Path,
    name: &str,
    password: &str,
    rooms: Option<Vec<String>>,
) -> Result<(), UsersError> {
    check_user_name(name)?;
    if password.chars().count() < 8 {
        return Err(UsersError::Invalid(
            "the password must have at least 8 characters".into(),
        ));
    }
    let mut users = read_file(path)?;
    let hash = hash_password(password)?;
    users.retain(|u| u.name != name);
    users.push(User {
        name: name.to_owned(),
        password_hash: hash,
        rooms,
    });
    let text = toml::to_string(&UsersFile { user: users })
        .map_err(|e| UsersError::Invalid(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| UsersError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
    }
    let tmp = path.with_extension("toml.partial");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| UsersError::Io {
                action: "writing",
                path: tmp.clone(),
                source,
            })?;
        f.write_all(
            format!("# Aula console operators (aula-bootserver user add).\n{text}").as_bytes(),
        )
        .and_then(|_| f.sync_all())
        .map_err(|source| UsersError::Io {
            action: "writing",
            path: tmp.clone(),
            source,
        })?;
    }
    std::fs::rename(&tmp, path).map_err(|source| UsersError::Io {
        action: "renaming into place",
        path: path.to_owned(),
        source,
    })
}

/// The console's sessions as the boot server's [`crate::auth::Auth`] looks
/// them up: the `sessions` table (SHA-256 of the cookie secret) and the
/// users file as it is now (a removed user's sessions open nothing; changed
/// rooms apply at once).
pub struct Sessions {
    store: crate::db::store::Store,
    users: Arc<Users>,
}

impl Sessions {
    /// Sessions in `store` of the operators in `users`.
    pub fn new(store: crate::db::store::Store, users: Arc<Users>) -> Sessions {
        Sessions { store, users }
    }
}

impl crate::auth::SessionStore for Sessions {
    fn lookup(
        &self,
        secret: String,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<crate::auth::Session, crate::auth::SessionMiss>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let s = self
                .store
                .lookup_session(secret)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "reading sessions");
                    crate::auth::SessionMiss::Ended
                })?
                .ok_or(crate::auth::SessionMiss::Ended)?;
            let user = self
                .users
                .get(&s.user)
                .ok_or(crate::auth::SessionMiss::NoUser)?;
            Ok(crate::auth::Session {
                user: user.name,
                rooms: user.rooms,
                csrf: s.csrf,
            })
        })
    }
}

/// Room ids of `names` (rooms that do not exist are left out).
pub fn room_ids(
    c: &rusqlite::Connection,
    names: &[String],
) -> Result<Vec<i64>, crate::db::DbError> {
    let mut ids = Vec::new();
    for n in names {
        if let Some(id) = crate::db::rooms::room_id_by_name(c, n)? {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// A random URL-safe secret of `n` bytes (hex).
pub fn random_secret(n: usize) -> Option<String> {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).ok()?;
    Some(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_added_hashed_and_verified_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("users.toml");
        add_user(&p, "ana", "correct horse", Some(vec!["Aula 1".into()])).expect("add");
        add_user(&p, "root", "battery staple", None).expect("add");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let users = Users::open(p.clone()).expect("open");
        let ana = users.get("ana").expect("ana");
        assert!(ana.password_hash.starts_with("$argon2id$"));
        assert!(!std::fs::read_to_string(&p)
            .expect("read")
            .contains("correct horse"));
        assert!(verify_password("correct horse", &ana.password_hash));
        assert!(!verify_password("wrong horse", &ana.password_hash));
        assert_eq!(ana.rooms, Some(vec!["Aula 1".to_owned()]));
        // Replacing keeps one entry.
        add_user(&p, "ana", "new password", None).expect("replace");
        assert_eq!(users.all().len(), 2);
        assert!(verify_password(
            "new password",
            &users.get("ana").expect("ana").password_hash
        ));
        assert!(add_user(&p, "system", "long enough", None).is_err());
        assert!(add_user(&p, "bob", "short", None).is_err());
    }
}
