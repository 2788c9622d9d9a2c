//! TLS trust for the MQTT connection: the system's trust anchors plus the extra PEM
//! anchors of `hub.ca_file` (the emulator's CA, a TLS-inspecting proxy's CA).
//!
//! [`CaBundle`] is read and checked by `config` validation, so a CA file the session
//! could not use is refused by `check-config` exactly as by `run`; [`client_config`] then
//! only assembles. It uses rumqttc's rustls re-export, the same rustls 0.23 that reqwest
//! is built on (one rustls in the daemon, with the `ring` provider).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::tokio_rustls::rustls;
use rustls::pki_types::CertificateDer;

/// The certificates of a PEM file, each one checked to be usable as a trust anchor.
#[derive(Clone, PartialEq, Eq)]
pub struct CaBundle {
    path: PathBuf,
    certificates: Vec<CertificateDer<'static>>,
}

/// Why a CA file cannot be used; names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid PEM", path.display())]
    NotPem { path: PathBuf },
    #[error("{} holds no PEM certificate", path.display())]
    Empty { path: PathBuf },
    #[error("certificate {number} in {} is not usable as a trust anchor: {reason}", path.display())]
    Unusable {
        path: PathBuf,
        /// 1-based, in file order.
        number: usize,
        reason: String,
    },
}

impl CaBundle {
    /// Reads and checks the PEM file at `path`.
    pub fn read(path: &Path) -> Result<CaBundle, CaError> {
        let pem = std::fs::read(path).map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })?;
        CaBundle::from_pem(path, &pem)
    }

    /// Checks `pem` (the content of `path`): at least one certificate, every one a
    /// usable trust anchor. Other PEM sections (keys, CRLs) are ignored.
    pub fn from_pem(path: &Path, pem: &[u8]) -> Result<CaBundle, CaError> {
        let certificates = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| CaError::NotPem {
                path: path.to_owned(),
            })?;
        if certificates.is_empty() {
            return Err(CaError::Empty {
                path: path.to_owned(),
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certificates.iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| CaError::Unusable {
                path: path.to_owned(),
                number: i + 1,
                reason: e.to_string(),
            })?;
        }
        Ok(CaBundle {
            path: path.to_owned(),
            certificates,
        })
    }

    /// The file the certificates were read from (for the REST clients, which read PEM).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

/// The client configuration: system roots (when the gateway has any) plus `extra`.
pub fn client_config(extra: Option<&CaBundle>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    // A gateway without a CA bundle can still reach a hub whose CA is given in ca_file.
    // Unreadable or unparsable system anchors are skipped: the hub may be trusted
    // through ca_file alone.
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    if let Some(bundle) = extra {
        // Every one was checked by `CaBundle::from_pem`, so none is dropped here.
        roots.add_parsable_certificates(bundle.certificates.iter().cloned());
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A self-signed P-256 CA certificate (no key kept), for tests of CA handling.
#[cfg(test)]
pub(crate) const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBjTCCATOgAwIBAgIUet0o4gBXstjhaF2KJf7gLWc51RwwCgYIKoZIzj0EAwIw\n\
GzEZMBcGA1UEAwwQZWRnZXR3aW4gdGVzdCBDQTAgFw0yNjExMjkyMzExMDhaGA8y\n\
MTI2MTEwNTIzMTEwOFowGzEZMBcGA1UEAwwQZWRnZXR3aW4gdGVzdCBDQTBZMBMG\n\
ByqGSM49AgEGCCqGSM49AwEHA0IABECxbWfKams1hqQ02zAMunBNAe52hUk8WN6f\n\
jgb/qYWmKS2uduSoBptoAjcHEKc1r8UrmNyA2xk3bJ1gc1LcZeKjUzBRMB0GA1Ud\n\
DgQWBBQ5yed2Q34RM6qGvOA1wwnCdDr0SzAfBgNVHSMEGDAWgBQ5yed2Q34RM6qG\n\
vOA1wwnCdDr0SzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIDuI\n\
wN2f5358YYgDG2u6TJI8fOQ+/I5CGu29+d0xnaI+AiEA6oPvLYTp+GfNZnXkrwQI\n\
gfKkGPv22heHiHIVDMec9I8=\n\
-----END CERTIFICATE-----\n\
";

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("/etc/edgetwin/ca.pem")
    }

    fn pem(der: &[u8]) -> Vec<u8> {
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n").into_bytes()
    }

    #[test]
    fn text_without_a_certificate_is_refused() {
        let e = CaBundle::from_pem(path(), b"just some text\n").unwrap_err();
        assert!(matches!(e, CaError::Empty { .. }), "{e}");
        assert!(e.to_string().contains("/etc/edgetwin/ca.pem"), "{e}");
    }

    #[test]
    fn a_pem_block_that_is_not_a_certificate_is_refused() {
        let e = CaBundle::from_pem(path(), &pem(b"not DER at all")).unwrap_err();
        assert!(matches!(e, CaError::Unusable { number: 1, .. }), "{e}");
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        let e = CaBundle::from_pem(path(), broken).unwrap_err();
        assert!(matches!(e, CaError::NotPem { .. }), "{e}");
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let e = CaBundle::read(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(matches!(e, CaError::Read { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_ca_certificate_is_a_usable_bundle() {
        let bundle = CaBundle::from_pem(path(), TEST_CA_PEM.as_bytes()).expect("usable");
        assert_eq!(bundle.certificates().len(), 1);
        assert_eq!(bundle.path(), path());
        assert!(!format!("{bundle:?}").contains("BEGIN"));
        let twice = format!("{TEST_CA_PEM}{TEST_CA_PEM}");
        let two = CaBundle::from_pem(path(), twice.as_bytes()).expect("usable");
        assert_eq!(two.certificates().len(), 2);
        assert_ne!(bundle, two);
        let _ = client_config(Some(&two));
    }
}
