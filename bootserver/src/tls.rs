//! Server-side TLS set-up (rustls with the ring provider, the workspace's
//! one crypto provider): certificates from PEM files, or the server's own
//! self-signed pair, made on first start and kept in the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// PEM text holds nothing usable.
    #[error("reading {what} from {origin}")]
    Pem {
        /// Certificate or key.
        what: &'static str,
        /// Where the PEM text came from.
        origin: String,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The PEM text holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(String),
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// Making a self-signed certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(String),
    /// The generated certificate or key could not be written.
    #[error("writing {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A ready acceptor and the `sha256:<hex>` fingerprint of the server certificate.
pub struct Tls {
    /// The acceptor.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `sha256:<hex>` of the leaf certificate (DER), as `aula.server_fp=` wants it.
    pub fingerprint: String,
}

/// A certificate chain and private key, PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// Certificate chain (leaf first).
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
}

/// `sha256:<hex>` of DER bytes.
pub fn fingerprint(der: &[u8]) -> String {
    aula_imager::tls::fingerprint(der)
}

/// A fresh self-signed certificate for these DNS names or IP addresses.
pub fn self_signed(names: &[String]) -> Result<PemPair, TlsError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(PemPair {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
    })
}

/// Builds the acceptor from PEM text; `origin` names it in errors.
pub fn from_pem(pair: &PemPair, origin: &str) -> Result<Tls, TlsError> {
    let pem = |what| {
        let origin = origin.to_owned();
        move |source| TlsError::Pem {
            what,
            origin,
            source,
        }
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(pem("certificates"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::NoCertificate(origin.to_owned()))?;
    let fingerprint = fingerprint(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(pem("private key"))?;
    let mut sc = rustls::ServerConfig::builder_with_provider(aula_imager::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(sc)),
        fingerprint,
    })
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads the certificate chain and key named by the configuration, or,
/// when it names none, the server's own pair kept in `data_dir` (made on
/// first start, see [`load_or_create`]).
pub fn load(cfg: &TlsConfig, data_dir: &Path, names: &[String]) -> Result<Tls, TlsError> {
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let pair = PemPair {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            };
            from_pem(&pair, &format!("{} / {}", cert.display(), key.display()))
        }
        _ => load_or_create(&data_dir.join("tls"), names),
    }
}

/// The server's own certificate in `dir` (`server.crt`, `server.key`):
/// loaded when present, else made (self-signed for `names`) and written
/// there first, key and certificate mode 0600 in a 0700 directory. The
/// certificate is kept, so its fingerprint (the pin on every live kernel
/// line) survives restarts.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Tls, TlsError> {
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    if cert.exists() || key.exists() {
        let pair = PemPair {
            cert_pem: read(&cert)?,
            key_pem: read(&key)?,
        };
        return from_pem(&pair, &format!("{} / {}", cert.display(), key.display()));
    }
    crate::persist::private_dir(dir).map_err(|e| TlsError::Write {
        path: dir.to_owned(),
        source: e.source,
    })?;
    let pair = self_signed(names)?;
    for (path, text) in [(&key, &pair.key_pem), (&cert, &pair.cert_pem)] {
        crate::persist::atomic_write(path, text.as_bytes()).map_err(|e| TlsError::Write {
            path: path.clone(),
            source: e.source,
        })?;
    }
    let tls = from_pem(&pair, &format!("{} / {}", cert.display(), key.display()))?;
    tracing::info!(cert = %cert.display(), fingerprint = %tls.fingerprint, "made the server's TLS certificate");
    Ok(tls)
}
