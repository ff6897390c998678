//! TLS client settings shared by every Aula client (imager, agent): trust a
//! server by the SHA-256 fingerprint of its certificate (`aula.server_fp=`),
//! by a CA bundle, or by the system's CA store. Everything uses rustls with
//! the `ring` provider, the workspace's one crypto provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::error::{Error, Result};

/// How a client decides to trust a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// Accept exactly the certificate whose DER SHA-256 is this.
    Pin([u8; 32]),
    /// Verify the chain against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Verify against the system CA bundle.
    System,
}

/// The crypto provider used everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// True when a secret someone presented (a bearer token) equals the
/// expected one, in time that depends on neither.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    // Comparing digests in constant time hides both where the first
    // difference lies and the expected secret's length.
    let a = ring::digest::digest(&ring::digest::SHA256, given);
    let b = ring::digest::digest(&ring::digest::SHA256, expected);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Context string of the upload token derivation.
pub const UPLOAD_TOKEN_CONTEXT: &[u8] = b"aula-upload-v1";

/// The upload token an agent derives from its bearer token:
/// `hex(HMAC-SHA256(key = agent_token, "aula-upload-v1"))`. The boot server
/// computes the same for machines it granted capture rights, so uploads
/// never carry the agent's own token (which opens the agent's API), and
/// the upload token opens nothing but that grant.
pub fn upload_token(agent_token: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, agent_token.as_bytes());
    hex::encode(ring::hmac::sign(&k, UPLOAD_TOKEN_CONTEXT).as_ref())
}

/// `sha256:<hex>` fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
    )
}

/// Parse `sha256:<64 hex>` (or bare hex, with or without colons).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32]> {
    let h: String = s
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(h.to_ascii_lowercase(), &mut out).map_err(|_| {
        Error::Invalid(format!(
            "invalid certificate fingerprint {s:?}: expected sha256:<64 hex digits>"
        ))
    })?;
    Ok(out)
}

#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if got.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate {} does not match the pinned fingerprint sha256:{}",
                fingerprint(end_entity.as_ref()),
                hex::encode(self.pin)
            )))
        }
    }

    // The handshake signature is still checked: it proves the server holds
    // the pinned certificate's private key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Invalid(format!("reading CA bundle {}: {e}", path.display())))?;
    for c in certs {
        let c =
            c.map_err(|e| Error::Invalid(format!("reading CA bundle {}: {e}", path.display())))?;
        // Skip certificates rustls cannot use rather than failing the bundle.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(Error::Invalid(format!(
            "CA bundle {} holds no usable certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// A rustls client configuration for the given trust.
pub fn client_config(trust: &ServerTrust) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS setup: {e}")))?;
    let cfg = match trust {
        ServerTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
        ServerTrust::CaFile(p) => builder
            .with_root_certificates(load_roots(p)?)
            .with_no_client_auth(),
        ServerTrust::System => {
            let candidates = [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
            ];
            let p = candidates
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    Error::Invalid(
                        "no system CA bundle found; pin the server fingerprint or give a CA file"
                            .into(),
                    )
                })?;
            builder
                .with_root_certificates(load_roots(p)?)
                .with_no_client_auth()
        }
    };
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_exactly_whatever_their_lengths() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"ab", b"abc"));
        assert!(!secrets_equal(b"", b"abc"));
        assert!(secrets_equal(b"", b""));
    }

    #[test]
    fn upload_tokens_are_an_hmac_of_the_context_and_differ_from_the_token() {
        let t = "agent-token-0123456789abcdef";
        let u = upload_token(t);
        assert_eq!(u.len(), 64);
        assert_ne!(u, t);
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, t.as_bytes());
        assert!(ring::hmac::verify(&k, b"aula-upload-v1", &hex::decode(&u).expect("hex")).is_ok());
        assert_ne!(upload_token("another-token-0123456789"), u);
    }

    #[test]
    fn fingerprints_parse_in_every_usual_spelling() {
        let fp = fingerprint(b"cert");
        let raw = parse_fingerprint(&fp).expect("parse");
        assert_eq!(format!("sha256:{}", hex::encode(raw)), fp);
        let colons: String = hex::encode(raw)
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons).expect("colons"), raw);
        assert!(parse_fingerprint("sha256:1234").is_err());
    }
}
