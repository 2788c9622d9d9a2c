//! The emulator's certificates: a CA of its own and a server certificate it signs (SANs
//! `localhost`, `127.0.0.1` and the hub name), generated with rcgen on first start and kept
//! in the state directory so clients that trust `ca.pem` keep trusting a restarted hub.
//! Offers TLS 1.2 and 1.3, as Microsoft's Python SDK insists on 1.2. Allows session
//! resumption (session ids and TLS 1.3 tickets kept in memory, 256 entries) so the bytes
//! a client saves by resuming on its renewal reconnect can be measured; a switch turns it
//! off at run time to measure the full handshake beside it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server.key";

/// The CA clients must trust and the server side of TLS.
pub struct SimTls {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
    /// Whether the server stores sessions and resumes them (on by default).
    pub resumption: Arc<AtomicBool>,
}

/// rustls's in-memory session store behind an on/off switch: off, it stores nothing (so
/// no TLS 1.3 tickets are issued) and finds nothing (so every handshake is full).
#[derive(Debug)]
struct SwitchableSessions {
    enabled: Arc<AtomicBool>,
    cache: Arc<rustls::server::ServerSessionMemoryCache>,
}

impl rustls::server::StoresServerSessions for SwitchableSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.cache.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.enabled
            .load(Ordering::Relaxed)
            .then(|| self.cache.get(key))
            .flatten()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.enabled
            .load(Ordering::Relaxed)
            .then(|| self.cache.take(key))
            .flatten()
    }

    fn can_cache(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
}

/// Loads the certificates from `dir`, creating them on first use.
pub fn load_or_create(dir: &Path, hub_name: &str) -> anyhow::Result<SimTls> {
    let server_cert = dir.join(SERVER_CERT_FILE);
    if !server_cert.exists() {
        create(dir, hub_name)?;
    }
    let ca_pem = std::fs::read_to_string(dir.join(CA_FILE)).context("reading ca.pem")?;
    let cert_pem = std::fs::read(&server_cert).context("reading server.pem")?;
    let key_pem = std::fs::read(dir.join(SERVER_KEY_FILE)).context("reading server.key")?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing server.pem")?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .context("parsing server.key")?
        .context("server.key holds no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("building the TLS server configuration")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let resumption = Arc::new(AtomicBool::new(true));
    config.session_storage = Arc::new(SwitchableSessions {
        enabled: Arc::clone(&resumption),
        cache: rustls::server::ServerSessionMemoryCache::new(256),
    });
    Ok(SimTls {
        ca_pem,
        server_config: Arc::new(config),
        resumption,
    })
}

fn create(dir: &Path, hub_name: &str) -> anyhow::Result<()> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "edgetwin sim CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string()];
    if hub_name != "localhost" && hub_name.parse::<IpAddr>().is_err() {
        names.push(hub_name.to_string());
    }
    let mut server = CertificateParams::new(names)?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

    let write = |name: &str, text: &str, mode: u32| {
        edgetwin::store::write_atomic(&dir.join(name), text.as_bytes(), mode)
            .with_context(|| format!("writing {}", dir.join(name).display()))
    };
    write(CA_KEY_FILE, &ca_key.serialize_pem(), 0o600)?;
    write(SERVER_KEY_FILE, &server_key.serialize_pem(), 0o600)?;
    write(CA_FILE, &ca_cert.pem(), 0o644)?;
    // Written last: its presence means the set is complete.
    write(SERVER_CERT_FILE, &server_cert.pem(), 0o644)?;
    Ok(())
}
