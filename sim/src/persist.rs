//! The emulator's durable state: service policies, devices, modules (with keys) and their
//! twins, and persistent MQTT sessions, kept as one JSON file (`hub.json`) in the state
//! directory and replaced atomically on every change so it survives `kill -9`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::hub::Right;
use super::twin_doc::ModuleTwin;
use edgetwin::identity::SharedKey;

pub const FILE_NAME: &str = "hub.json";
const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<RightName>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RightName {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

impl From<RightName> for Right {
    fn from(r: RightName) -> Right {
        match r {
            RightName::RegistryRead => Right::RegistryRead,
            RightName::RegistryWrite => Right::RegistryWrite,
            RightName::ServiceConnect => Right::ServiceConnect,
            RightName::DeviceConnect => Right::DeviceConnect,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub generation_id: String,
    pub etag_seq: u64,
    pub enabled: bool,
    pub status_reason: Option<String>,
    pub status_updated: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub iot_edge: bool,
    pub modules: BTreeMap<String, ModuleRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub generation_id: String,
    pub etag_seq: u64,
    pub managed_by: Option<String>,
    pub primary_key: String,
    pub secondary_key: String,
    pub twin: ModuleTwin,
    pub last_activity: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedHub {
    pub schema: u32,
    pub policies: BTreeMap<String, Policy>,
    pub devices: BTreeMap<String, DeviceRecord>,
    /// Persistent MQTT sessions: client id → subscribed filters.
    pub sessions: BTreeMap<String, BTreeSet<String>>,
}

impl PersistedHub {
    /// A fresh hub with the default shared access policies and new keys.
    pub fn new() -> Self {
        use RightName::*;
        let policy = |rights: &[RightName]| Policy {
            primary_key: SharedKey::generate().as_base64().to_string(),
            secondary_key: SharedKey::generate().as_base64().to_string(),
            rights: rights.to_vec(),
        };
        let mut policies = BTreeMap::new();
        policies.insert(
            "iothubowner".to_string(),
            policy(&[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect]),
        );
        policies.insert("service".to_string(), policy(&[ServiceConnect]));
        policies.insert("device".to_string(), policy(&[DeviceConnect]));
        policies.insert("registryRead".to_string(), policy(&[RegistryRead]));
        policies.insert(
            "registryReadWrite".to_string(),
            policy(&[RegistryRead, RegistryWrite]),
        );
        PersistedHub {
            schema: SCHEMA,
            policies,
            devices: BTreeMap::new(),
            sessions: BTreeMap::new(),
        }
    }
}

impl Default for PersistedHub {
    fn default() -> Self {
        Self::new()
    }
}

/// Loads `hub.json` from `dir`; `None` when the hub is new.
pub fn load(dir: &Path) -> anyhow::Result<Option<PersistedHub>> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let hub: PersistedHub = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid emulator state file", path.display()))?;
    anyhow::ensure!(
        hub.schema == SCHEMA,
        "{} has schema {}, this emulator understands {SCHEMA}",
        path.display(),
        hub.schema
    );
    Ok(Some(hub))
}

/// Serialises the state; done under the hub lock so the snapshot is consistent.
pub fn encode(hub: &PersistedHub) -> Vec<u8> {
    serde_json::to_vec(hub).expect("hub state is always serialisable")
}

/// Durably replaces `hub.json` in `dir` with an encoded snapshot.
pub fn write(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    edgetwin::store::write_atomic(&dir.join(FILE_NAME), bytes, 0o600)
}

pub fn save(dir: &Path, hub: &PersistedHub) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write(dir, &encode(hub)).with_context(|| format!("writing {}", dir.join(FILE_NAME).display()))
}
