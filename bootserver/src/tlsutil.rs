//! Server-side TLS: load a certificate and key (PEM), or make a self-signed
//! pair for demos and tests.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or parsing a PEM file.
    #[error("{path}: {why}")]
    Pem {
        /// File.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Gen(String),
}

/// A PEM certificate chain and private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl CertPair {
    /// SHA-256 fingerprint (`sha256:<hex>`) of the leaf certificate.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            TlsError::Pem {
                path: "<certificate>".into(),
                why: e.to_string(),
            }
        })?;
        Ok(aula_imager::tls::fingerprint(der.as_ref()))
    }
}

/// A fresh self-signed certificate for the given names (DNS names or IPs).
pub fn self_signed(names: &[String]) -> Result<CertPair, TlsError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Gen(e.to_string()))?;
    Ok(CertPair {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
    })
}

/// Read a certificate chain and key from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<CertPair, TlsError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| TlsError::Pem {
            path: p.display().to_string(),
            why: e.to_string(),
        })
    };
    Ok(CertPair {
        cert_pem: read(cert)?,
        key_pem: read(key)?,
    })
}

/// A rustls server configuration (ring provider, HTTP/1.1).
pub fn server_config(pair: &CertPair) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: "<certificate>".into(),
                why: e.to_string(),
            })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: "<certificate>".into(),
            why: "no certificate found".into(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            path: "<key>".into(),
            why: e.to_string(),
        })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(aula_imager::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
