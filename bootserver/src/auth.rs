//! Who is calling: the one place where a request's credential becomes a
//! [`Principal`], and where each principal's rights are written down.
//!
//! The credential is the `Authorization` header's key, `Bearer <key>` or a
//! bare `<key>` (`aula_httpkit::auth`). It is compared in constant time with
//! every secret the server knows:
//!
//! | credential | principal | may |
//! |---|---|---|
//! | `http.api_token` | [`Principal::Admin`] | everything in the API: boot modes, capture grants, agents' tokens, every read (repository reads too) |
//! | `http.viewer_token` | [`Principal::Viewer`] | read machines, leases, agents (no tokens), agents' events and the repository; change nothing |
//! | an agent's registered token | [`Principal::Agent`] | set the boot mode of its own machine (`IniciarSesion`) |
//! | an agent's upload token, while its machine has a capture grant | [`Principal::Upload`] | repository reads, chunk uploads, publishing the one granted image name |
//! | `repository.write_token` | [`Principal::RepoWriter`] | every repository read and write: publish, delete, gc, check |
//! | `repository.read_token` | [`Principal::RepoReader`] | repository reads |
//! | the `aula_session` cookie of a signed-in operator (console; writes also need the session's `X-CSRF-Token`) | [`Principal::Operator`] | the console within its rooms: rooms, machines, deployments, captures, boot modes of its machines; an operator with every room also reads the lab and sets boot modes through the API as an admin does, and manages rooms; never agents' tokens or capture grants by hand |
//!
//! The console's routes and the API take their caller from
//! [`Auth::caller`] (a bearer credential, else a session cookie); the
//! repository takes bearer credentials only ([`Auth::principal`]). The API
//! and viewer tokens keep working for programs in the console's routes
//! too: the API token acts on every room, the viewer token reads them.
//!
//! The upload token is `hex(HMAC-SHA256(agent_token, "aula-upload-v1"))`
//! (`aula_imager::tls::upload_token`): an agent never sends its own token
//! to the repository, and what it sends there opens nothing but its grant.
//! The configured secrets must differ from each other (checked at start),
//! so a credential names exactly one principal.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::Method;

use crate::mac::MacAddr;
use crate::state::Registry;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The API token.
    Admin,
    /// The read-only viewer token.
    Viewer,
    /// The agent registered for machine `mac`.
    Agent {
        /// Its machine.
        mac: MacAddr,
    },
    /// The upload grant of the agent on `mac`, for image `image`.
    Upload {
        /// The machine.
        mac: MacAddr,
        /// The one image name it may publish.
        image: String,
    },
    /// The repository's write token.
    RepoWriter,
    /// The repository's read token.
    RepoReader,
    /// A signed-in operator (console session).
    Operator {
        /// The user name.
        name: String,
        /// The rooms (by name) the operator may see and act on; `None` =
        /// every room.
        rooms: Option<Vec<String>>,
    },
}

impl Principal {
    /// Name for logs.
    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::Viewer => "viewer".into(),
            Principal::Agent { mac } => format!("agent {mac}"),
            Principal::Upload { mac, image } => format!("upload grant of {mac} for {image}"),
            Principal::RepoWriter => "repository writer".into(),
            Principal::RepoReader => "repository reader".into(),
            Principal::Operator { name, .. } => format!("operator {name}"),
        }
    }

    /// Who gave a command, as the command log records it.
    pub fn log_name(&self) -> String {
        match self {
            Principal::Admin => "api-token".into(),
            Principal::Viewer => "viewer-token".into(),
            Principal::Operator { name, .. } => name.clone(),
            other => other.name(),
        }
    }

    /// The rooms (by name) this principal is limited to, if it is.
    pub fn room_limit(&self) -> Option<&[String]> {
        match self {
            Principal::Operator { rooms: Some(r), .. } => Some(r),
            _ => None,
        }
    }

    /// An operator with every room, or the API token: may create and
    /// delete rooms and import machines.
    pub fn has_every_room(&self) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Operator { rooms, .. } => rooms.is_none(),
            _ => false,
        }
    }

    /// See the console's lists (rooms, machines, deployments, images, boot
    /// modes, the command log), within its rooms.
    pub fn can_view_console(&self) -> bool {
        matches!(
            self,
            Principal::Admin | Principal::Viewer | Principal::Operator { .. }
        )
    }

    /// Act through the console's routes (deploy, capture, cancel, edit
    /// rooms and machines, set boot modes), within its rooms.
    pub fn can_operate(&self) -> bool {
        matches!(self, Principal::Admin | Principal::Operator { .. })
    }

    /// Read the lab: machines, leases, agents, agents' events.
    pub fn can_read_lab(&self) -> bool {
        matches!(self, Principal::Admin | Principal::Viewer) || self.is_lab_operator()
    }

    /// An operator with every room acts on the lab as the API token does
    /// (except agents' tokens and capture grants by hand).
    fn is_lab_operator(&self) -> bool {
        matches!(self, Principal::Operator { rooms: None, .. })
    }

    /// See agents' bearer tokens (to call them, as a core does).
    pub fn sees_agent_tokens(&self) -> bool {
        matches!(self, Principal::Admin)
    }

    /// Change how machine `mac` boots.
    pub fn can_set_boot(&self, mac: MacAddr) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Agent { mac: own } => *own == mac,
            // Operators limited to rooms set boot modes through the
            // console's machine routes, which check the machine's room.
            p => p.is_lab_operator(),
        }
    }

    /// Administer the lab (boot modes of any machine, capture grants).
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin)
    }

    /// Read the repository when it needs a token to read.
    pub fn can_read_repo(&self) -> bool {
        matches!(
            self,
            Principal::Admin
                | Principal::Viewer
                | Principal::RepoReader
                | Principal::RepoWriter
                | Principal::Upload { .. }
        )
    }

    /// Upload chunks (content-addressed and verified on arrival). `image`
    /// is the name the upload says it is for (`X-Aula-Image`), if any.
    pub fn can_upload_chunks(&self, image: Option<&str>) -> bool {
        match self {
            Principal::RepoWriter => true,
            Principal::Upload { image: granted, .. } => image.is_none_or(|i| i == granted),
            _ => false,
        }
    }

    /// Publish a version of image `name`.
    pub fn can_publish(&self, name: &str) -> bool {
        match self {
            Principal::RepoWriter => true,
            Principal::Upload { image, .. } => image == name,
            _ => false,
        }
    }

    /// Delete images, collect garbage, check integrity.
    pub fn can_maintain_repo(&self) -> bool {
        matches!(self, Principal::RepoWriter)
    }
}

/// The secrets the server was configured with.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// `http.api_token` / `api_token_file`.
    pub api: Option<String>,
    /// `http.viewer_token` / `viewer_token_file`.
    pub viewer: Option<String>,
    /// `repository.write_token` / `write_token_file`.
    pub repo_write: Option<String>,
    /// `repository.read_token`.
    pub repo_read: Option<String>,
}

impl Secrets {
    /// Names of two configured secrets that are equal, if any.
    pub fn duplicate(&self) -> Option<(&'static str, &'static str)> {
        let all = [
            ("http.api_token", &self.api),
            ("http.viewer_token", &self.viewer),
            ("repository.write_token", &self.repo_write),
            ("repository.read_token", &self.repo_read),
        ];
        for (i, (a, x)) in all.iter().enumerate() {
            for (b, y) in &all[i + 1..] {
                if let (Some(x), Some(y)) = (x, y) {
                    if x == y {
                        return Some((a, b));
                    }
                }
            }
        }
        None
    }
}

/// The session cookie of a signed-in operator.
pub const SESSION_COOKIE: &str = "aula_session";

/// A live operator session, as a [`SessionStore`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The user name.
    pub user: String,
    /// The user's rooms (`None` = every room), as the users file says now.
    pub rooms: Option<Vec<String>>,
    /// The CSRF token writes with this session must carry.
    pub csrf: String,
}

/// Why a session cookie opens nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionMiss {
    /// No such live session.
    Ended,
    /// The session's user is no longer in the users file.
    NoUser,
}

/// Where operator sessions live (the console: the `sessions` table and the
/// users file). Kept behind a trait so that rights stay here and the
/// console depends on this module, not the other way round.
pub trait SessionStore: Send + Sync {
    /// The session of a cookie secret.
    fn lookup(
        &self,
        secret: String,
    ) -> Pin<Box<dyn Future<Output = Result<Session, SessionMiss>> + Send + '_>>;
}

/// A request's caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// The session's CSRF token, for a caller signed in by cookie.
    pub csrf: Option<String>,
}

/// Why a request has no caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Neither a credential nor a session cookie.
    #[error("sign in, or send a token as Authorization: Bearer <token>")]
    Nothing,
    /// A credential nobody issued.
    #[error("missing or wrong bearer token")]
    BadCredential,
    /// The session cookie names no live session.
    #[error("the session has ended: sign in again")]
    SessionEnded,
    /// The session's user was removed.
    #[error("this user no longer exists")]
    NoUser,
    /// A write with a session but without its CSRF token (forbidden, not
    /// unauthenticated).
    #[error("missing or wrong CSRF token (X-CSRF-Token): reload the page")]
    Csrf,
}

/// The value of cookie `name` in a request's headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Turns credentials into principals.
pub struct Auth {
    secrets: std::sync::RwLock<Secrets>,
    registry: Option<Arc<Registry>>,
    sessions: Option<Arc<dyn SessionStore>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.secrets();
        f.debug_struct("Auth")
            .field("api", &s.api.is_some())
            .field("viewer", &s.viewer.is_some())
            .field("repo_write", &s.repo_write.is_some())
            .field("repo_read", &s.repo_read.is_some())
            .finish()
    }
}

fn eq(given: &str, secret: &Option<String>) -> bool {
    secret
        .as_deref()
        .is_some_and(|s| aula_imager::tls::secrets_equal(given.as_bytes(), s.as_bytes()))
}

impl Auth {
    /// `registry` resolves agents' and upload tokens; without it only the
    /// configured secrets are known.
    pub fn new(secrets: Secrets, registry: Option<Arc<Registry>>) -> Auth {
        Auth {
            secrets: std::sync::RwLock::new(secrets),
            registry,
            sessions: None,
        }
    }

    /// Also recognise operators' session cookies, looked up in `store`.
    pub fn with_sessions(mut self, store: Arc<dyn SessionStore>) -> Auth {
        self.sessions = Some(store);
        self
    }

    fn secrets(&self) -> std::sync::RwLockReadGuard<'_, Secrets> {
        self.secrets.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the API, viewer and repository write secrets (a reload,
    /// SIGHUP): callers holding the old ones are refused from now on. The
    /// repository's read token is not rotated (the repository service and
    /// registered agents hold it; it needs a restart). Refused when two
    /// secrets would be equal.
    pub fn rotate(&self, new: Secrets) -> Result<(), (&'static str, &'static str)> {
        let mut g = self.secrets.write().unwrap_or_else(|p| p.into_inner());
        let next = Secrets {
            repo_read: g.repo_read.clone(),
            ..new
        };
        if let Some(d) = next.duplicate() {
            return Err(d);
        }
        *g = next;
        Ok(())
    }

    /// Whether an API token is configured (without one, admin calls are
    /// refused outright).
    pub fn has_api_token(&self) -> bool {
        self.secrets().api.is_some()
    }

    /// Whether repository reads need a token.
    pub fn repo_reads_need_token(&self) -> bool {
        self.secrets().repo_read.is_some()
    }

    /// The repository's read token (handed to registered agents).
    pub fn repo_read_token(&self) -> Option<String> {
        self.secrets().repo_read.clone()
    }

    /// The principal `credential` names, if any.
    pub fn identify(&self, credential: &str) -> Option<Principal> {
        {
            let s = self.secrets();
            if eq(credential, &s.api) {
                return Some(Principal::Admin);
            }
            if eq(credential, &s.viewer) {
                return Some(Principal::Viewer);
            }
            if eq(credential, &s.repo_write) {
                return Some(Principal::RepoWriter);
            }
            if eq(credential, &s.repo_read) {
                return Some(Principal::RepoReader);
            }
        }
        let reg = self.registry.as_ref()?;
        if let Some(mac) = reg.agent_of_token(credential) {
            return Some(Principal::Agent { mac });
        }
        for (mac, grant) in reg.capture_grants() {
            let Some(token) = reg.agent_token(mac) else {
                continue;
            };
            let upload = aula_imager::tls::upload_token(&token);
            if aula_imager::tls::secrets_equal(credential.as_bytes(), upload.as_bytes()) {
                return Some(Principal::Upload {
                    mac,
                    image: grant.image,
                });
            }
        }
        None
    }

    /// The principal of a request's bearer credential (`None` without a
    /// usable credential or with one nobody issued). Session cookies are
    /// not looked at: see [`Auth::caller`].
    pub fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        aula_httpkit::auth::credential(headers).and_then(|c| self.identify(c))
    }

    /// The caller of a request: its bearer credential when it has one
    /// (a wrong one is refused, whatever cookie comes with it), else an
    /// operator's session cookie. A request that may change something
    /// (any method but `GET`/`HEAD`) with a session must carry the
    /// session's CSRF token in `X-CSRF-Token`.
    pub async fn caller(&self, headers: &HeaderMap, method: &Method) -> Result<Caller, Denied> {
        if aula_httpkit::auth::credential(headers).is_some() || headers.contains_key(AUTHORIZATION)
        {
            return self
                .principal(headers)
                .map(|principal| Caller {
                    principal,
                    csrf: None,
                })
                .ok_or(Denied::BadCredential);
        }
        let (Some(secret), Some(store)) = (cookie(headers, SESSION_COOKIE), &self.sessions) else {
            return Err(Denied::Nothing);
        };
        let s = store.lookup(secret.to_owned()).await.map_err(|m| match m {
            SessionMiss::Ended => Denied::SessionEnded,
            SessionMiss::NoUser => Denied::NoUser,
        })?;
        if method != Method::GET && method != Method::HEAD {
            let sent = headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if sent.is_empty()
                || !aula_imager::tls::secrets_equal(sent.as_bytes(), s.csrf.as_bytes())
            {
                return Err(Denied::Csrf);
            }
        }
        Ok(Caller {
            principal: Principal::Operator {
                name: s.user,
                rooms: s.rooms,
            },
            csrf: Some(s.csrf),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_secret_names_its_principal_and_rights_follow_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Arc::new(Registry::load(dir.path()).expect("registry"));
        let auth = Auth::new(
            Secrets {
                api: Some("api-token-0123456789".into()),
                viewer: Some("viewer-token-0123456789".into()),
                repo_write: Some("write-token-0123456789".into()),
                repo_read: Some("read-token-0123456789".into()),
            },
            Some(reg),
        );
        assert_eq!(
            auth.identify("api-token-0123456789"),
            Some(Principal::Admin)
        );
        assert_eq!(
            auth.identify("viewer-token-0123456789"),
            Some(Principal::Viewer)
        );
        assert_eq!(auth.identify("nobody-0123456789"), None);
        let v = Principal::Viewer;
        assert!(v.can_read_lab() && !v.sees_agent_tokens() && !v.is_admin());
        let mac: MacAddr = "52:54:00:00:00:07".parse().expect("mac");
        let other: MacAddr = "52:54:00:00:00:08".parse().expect("mac");
        let a = Principal::Agent { mac };
        assert!(a.can_set_boot(mac) && !a.can_set_boot(other) && !a.can_read_repo());
        assert!(Principal::Admin.can_read_repo() && !Principal::Admin.can_publish("x"));
        let u = Principal::Upload {
            mac,
            image: "lab".into(),
        };
        assert!(u.can_publish("lab") && !u.can_publish("other"));
        assert!(u.can_upload_chunks(Some("lab")) && !u.can_upload_chunks(Some("other")));
        assert!(!u.can_maintain_repo() && !u.can_read_lab());
        assert!(Principal::RepoWriter.can_maintain_repo());
        assert!(!Principal::RepoReader.can_upload_chunks(None));
    }

    #[test]
    fn operators_act_within_their_rooms_and_one_with_every_room_reads_the_lab() {
        let mac: MacAddr = "52:54:00:00:00:07".parse().expect("mac");
        let ana = Principal::Operator {
            name: "ana".into(),
            rooms: Some(vec!["Aula 1".into()]),
        };
        let root = Principal::Operator {
            name: "root".into(),
            rooms: None,
        };
        for p in [&ana, &root] {
            assert!(p.can_view_console() && p.can_operate());
            assert!(!p.sees_agent_tokens() && !p.is_admin() && !p.can_read_repo());
            assert!(!p.can_publish("x") && !p.can_maintain_repo());
        }
        assert_eq!(ana.room_limit(), Some(&["Aula 1".to_owned()][..]));
        assert!(!ana.has_every_room() && !ana.can_read_lab() && !ana.can_set_boot(mac));
        assert!(root.has_every_room() && root.can_read_lab() && root.can_set_boot(mac));
        assert_eq!(ana.log_name(), "ana");
        assert_eq!(Principal::Admin.log_name(), "api-token");
        let v = Principal::Viewer;
        assert!(v.can_view_console() && !v.can_operate() && v.room_limit().is_none());
        assert!(Principal::Admin.can_operate() && Principal::Admin.has_every_room());
        let agent = Principal::Agent { mac };
        assert!(!agent.can_view_console() && !agent.can_operate());
    }

    struct OneSession;
    impl SessionStore for OneSession {
        fn lookup(
            &self,
            secret: String,
        ) -> Pin<Box<dyn Future<Output = Result<Session, SessionMiss>> + Send + '_>> {
            Box::pin(async move {
                match secret.as_str() {
                    "good" => Ok(Session {
                        user: "ana".into(),
                        rooms: Some(vec!["A".into()]),
                        csrf: "csrf-0123456789".into(),
                    }),
                    "gone" => Err(SessionMiss::NoUser),
                    _ => Err(SessionMiss::Ended),
                }
            })
        }
    }

    #[tokio::test]
    async fn a_session_cookie_is_an_operator_and_its_writes_need_the_csrf_token() {
        let auth = Auth::new(
            Secrets {
                api: Some("api-token-0123456789".into()),
                viewer: Some("viewer-token-0123456789".into()),
                ..Default::default()
            },
            None,
        )
        .with_sessions(Arc::new(OneSession));
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, v.parse().expect("header"));
            }
            m
        };
        let c = auth
            .caller(&h(&[("cookie", "x=1; aula_session=good")]), &Method::GET)
            .await
            .expect("session");
        assert_eq!(
            c.principal,
            Principal::Operator {
                name: "ana".into(),
                rooms: Some(vec!["A".into()])
            }
        );
        assert_eq!(c.csrf.as_deref(), Some("csrf-0123456789"));
        let post = Method::POST;
        let cookie = ("cookie", "aula_session=good");
        assert_eq!(auth.caller(&h(&[cookie]), &post).await, Err(Denied::Csrf));
        assert_eq!(
            auth.caller(&h(&[cookie, ("x-csrf-token", "nope")]), &post)
                .await,
            Err(Denied::Csrf)
        );
        assert!(auth
            .caller(&h(&[cookie, ("x-csrf-token", "csrf-0123456789")]), &post)
            .await
            .is_ok());
        assert_eq!(
            auth.caller(&h(&[("cookie", "aula_session=old")]), &Method::GET)
                .await,
            Err(Denied::SessionEnded)
        );
        assert_eq!(
            auth.caller(&h(&[("cookie", "aula_session=gone")]), &Method::GET)
                .await,
            Err(Denied::NoUser)
        );
        assert_eq!(
            auth.caller(&h(&[]), &Method::GET).await,
            Err(Denied::Nothing)
        );
        // A credential decides alone: a wrong one with a good cookie fails,
        // a token needs no CSRF token.
        assert_eq!(
            auth.caller(
                &h(&[cookie, ("authorization", "Bearer wrong-0123456789")]),
                &Method::GET
            )
            .await,
            Err(Denied::BadCredential)
        );
        let c = auth
            .caller(&h(&[("authorization", "viewer-token-0123456789")]), &post)
            .await
            .expect("viewer");
        assert_eq!(c.principal, Principal::Viewer);
        assert!(c.csrf.is_none());
    }

    #[test]
    fn equal_secrets_are_found() {
        let s = Secrets {
            api: Some("same-token-0123456789".into()),
            repo_write: Some("same-token-0123456789".into()),
            ..Default::default()
        };
        assert_eq!(
            s.duplicate(),
            Some(("http.api_token", "repository.write_token"))
        );
    }
}
