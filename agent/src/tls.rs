//! The agent's TLS identity (a fresh self-signed certificate per boot), its
//! bearer token, and the HTTPS client it uses towards the server and the
//! core. rustls with the ring provider only (`aula_imager::tls::provider`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use ring::rand::SecureRandom;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use aula_imager::tls::ServerTrust;

/// TLS and token set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("generating the certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// Client trust could not be set up (CA bundle unreadable, …).
    #[error("client TLS: {0}")]
    Client(String),
}

/// A server certificate, its key and its fingerprint.
pub struct Identity {
    /// The acceptor for the HTTPS listener.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `sha256:<hex>` of the certificate (DER).
    pub fingerprint: String,
    /// The certificate in PEM (tests and operators may want it).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (kept across restarts in one boot).
    key_pem: String,
}

/// The identity from a PEM certificate and PKCS#8 PEM key.
pub fn identity_from_pem(cert_pem: &str, key_pem: &str) -> Result<Identity, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| TlsError::Generate(format!("certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Generate(format!("key: {e}")))?;
    let fingerprint = aula_imager::tls::fingerprint(der.as_ref());
    let mut sc = rustls::ServerConfig::builder_with_provider(aula_imager::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Identity {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(sc)),
        fingerprint,
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
    })
}

/// What one boot keeps across agent restarts (`<state_dir>/identity.json`,
/// mode 0600 in a 0700 directory): the token and certificate it registered
/// with, so a restarted agent registers again as the same agent (the
/// server accepts only that exact repeat once the machine is bound).
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    boot: Option<String>,
    token: String,
    cert_pem: String,
    key_pem: String,
}

/// The token and certificate of this boot: the kept ones when `state_dir`
/// holds a pair made in the same boot (same `aula.boot=` nonce), else fresh
/// ones, kept there for the next restart.
pub fn boot_identity(
    state_dir: Option<&std::path::Path>,
    boot: Option<&str>,
    hostname: Option<&str>,
    ips: &[IpAddr],
) -> Result<(String, Identity), TlsError> {
    let file = state_dir.map(|d| d.join("identity.json"));
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            match serde_json::from_slice::<Kept>(&bytes) {
                Ok(k) if k.boot.as_deref() == boot => {
                    match identity_from_pem(&k.cert_pem, &k.key_pem) {
                        Ok(id) => {
                            tracing::info!(file = %f.display(), "kept token and certificate of this boot");
                            return Ok((k.token, id));
                        }
                        Err(e) => {
                            tracing::warn!(file = %f.display(), error = %e, "kept identity unusable; making a new one")
                        }
                    }
                }
                Ok(_) => {
                    tracing::info!(file = %f.display(), "kept identity is from another boot; making a new one")
                }
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "kept identity unreadable; making a new one")
                }
            }
        }
    }
    let token = random_token()?;
    let id = self_signed(hostname, ips)?;
    if let (Some(dir), Some(f)) = (state_dir, &file) {
        let kept = Kept {
            boot: boot.map(str::to_string),
            token: token.clone(),
            cert_pem: id.cert_pem.clone(),
            key_pem: id.key_pem.clone(),
        };
        if let Err(e) = write_private(dir, f, &kept) {
            tracing::warn!(file = %f.display(), error = %e, "could not keep the token and certificate (a restarted agent will not be able to register again in this boot)");
        }
    }
    Ok((token, id))
}

fn write_private(dir: &std::path::Path, f: &std::path::Path, kept: &Kept) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".identity.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    out.write_all(&serde_json::to_vec(kept).map_err(std::io::Error::other)?)?;
    out.sync_all()?;
    std::fs::rename(&tmp, f)
}

/// A fresh self-signed certificate for these names and addresses.
pub fn self_signed(hostname: Option<&str>, ips: &[IpAddr]) -> Result<Identity, TlsError> {
    let mut names: Vec<String> = vec!["aula-agent".into(), "localhost".into()];
    if let Some(h) = hostname {
        names.push(h.to_string());
    }
    names.extend(ips.iter().map(|ip| ip.to_string()));
    names.push("127.0.0.1".into());
    names.dedup();
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    identity_from_pem(&ck.cert.pem(), &ck.key_pair.serialize_pem())
}

/// A random bearer token: 32 bytes, hex (64 characters).
pub fn random_token() -> Result<String, TlsError> {
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| TlsError::Random)?;
    Ok(hex::encode(b))
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Not security relevant (job ids): fall back to the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8;
        }
    }
    hex::encode(b)
}

/// `sha256=<hex>` HMAC of `body` keyed with `key` (the webhook signature).
pub fn sign(key: &str, body: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&k, body).as_ref())
    )
}

type Inner = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP(S) client for JSON calls with a fixed server trust.
#[derive(Clone)]
pub struct HttpClient {
    inner: Inner,
    timeout: Duration,
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Body (at most 1 MiB is read).
    pub body: Bytes,
}

/// Why a call failed before a status arrived.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Bad URL or header.
    #[error("invalid request: {0}")]
    Request(String),
    /// Connection, TLS or protocol failure.
    #[error("{0}")]
    Transport(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl HttpClient {
    /// A client trusting servers as `trust` says.
    pub fn new(trust: &ServerTrust, timeout: Duration) -> Result<HttpClient, TlsError> {
        let tls =
            aula_imager::tls::client_config(trust).map_err(|e| TlsError::Client(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        Ok(HttpClient { inner, timeout })
    }

    /// Send `body` (JSON) with extra headers.
    pub async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<Reply, CallError> {
        let mut req = Request::builder().method(method).uri(url);
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let mut req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CallError::Request(e.to_string()))?;
        for (k, v) in headers {
            let v = HeaderValue::from_str(v).map_err(|e| CallError::Request(e.to_string()))?;
            req.headers_mut().insert(HeaderName::from_static(k), v);
        }
        let fut = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| CallError::Transport(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?
                .to_bytes();
            Ok(Reply { status, body })
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }
}

/// An error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let s = sign("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tokens_are_long_and_differ() {
        let a = random_token().expect("token");
        let b = random_token().expect("token");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(aula_imager::tls::secrets_equal(a.as_bytes(), a.as_bytes()));
        assert!(!aula_imager::tls::secrets_equal(a.as_bytes(), b.as_bytes()));
    }
}
