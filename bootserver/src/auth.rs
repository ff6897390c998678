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
//!
//! The upload token is `hex(HMAC-SHA256(agent_token, "aula-upload-v1"))`
//! (`aula_imager::tls::upload_token`): an agent never sends its own token
//! to the repository, and what it sends there opens nothing but its grant.
//! The configured secrets must differ from each other (checked at start),
//! so a credential names exactly one principal.

use std::sync::Arc;

use hyper::header::HeaderMap;

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
        }
    }

    /// Read the lab: machines, leases, agents, agents' events.
    pub fn can_read_lab(&self) -> bool {
        matches!(self, Principal::Admin | Principal::Viewer)
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
            _ => false,
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

/// Turns credentials into principals.
pub struct Auth {
    secrets: Secrets,
    registry: Option<Arc<Registry>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api", &self.secrets.api.is_some())
            .field("viewer", &self.secrets.viewer.is_some())
            .field("repo_write", &self.secrets.repo_write.is_some())
            .field("repo_read", &self.secrets.repo_read.is_some())
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
        Auth { secrets, registry }
    }

    /// Whether an API token is configured (without one, admin calls are
    /// refused outright).
    pub fn has_api_token(&self) -> bool {
        self.secrets.api.is_some()
    }

    /// Whether repository reads need a token.
    pub fn repo_reads_need_token(&self) -> bool {
        self.secrets.repo_read.is_some()
    }

    /// The repository's read token (handed to registered agents).
    pub fn repo_read_token(&self) -> Option<&str> {
        self.secrets.repo_read.as_deref()
    }

    /// The principal `credential` names, if any.
    pub fn identify(&self, credential: &str) -> Option<Principal> {
        if eq(credential, &self.secrets.api) {
            return Some(Principal::Admin);
        }
        if eq(credential, &self.secrets.viewer) {
            return Some(Principal::Viewer);
        }
        if eq(credential, &self.secrets.repo_write) {
            return Some(Principal::RepoWriter);
        }
        if eq(credential, &self.secrets.repo_read) {
            return Some(Principal::RepoReader);
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

    /// The principal of a request (`None` without a usable credential or
    /// with one nobody issued).
    pub fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        aula_httpkit::auth::credential(headers).and_then(|c| self.identify(c))
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
