//! TLS client configuration for the MQTT connection: the system's trust anchors plus any
//! extra PEM anchors from `hub.ca_file` (the emulator's CA, a TLS-inspecting proxy's CA).
//! rumqttc 0.24 is built on rustls 0.22, so this uses its re-export rather than the
//! crate's own rustls.

use std::sync::Arc;

use anyhow::Context as _;
use rumqttc::tokio_rustls::rustls;

/// Builds the client configuration; fails when `extra_ca_pem` holds no usable certificate.
pub fn client_config(extra_ca_pem: Option<&[u8]>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    // A gateway without a CA bundle can still reach a hub whose CA is given in ca_file.
    if let Ok(native) = rustls_native_certs::load_native_certs() {
        let _ = roots.add_parsable_certificates(native);
    }
    if let Some(pem) = extra_ca_pem {
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .context("the CA file is not valid PEM")?;
        anyhow::ensure!(!certs.is_empty(), "the CA file holds no certificate");
        for cert in certs {
            roots
                .add(cert)
                .context("the CA file holds an unusable certificate")?;
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
