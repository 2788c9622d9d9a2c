//! The emulator's durable state: service policies, devices, modules (with keys) and their
//! twins, persistent MQTT sessions and automatic configurations, kept as one JSON file (`hub.json`) in the state
//! directory and replaced atomically on every change so it survives `kill -9`.
//!
//! Besides the durable form this module owns the write ordering: [`Writer::ticket`]
//! numbers a change under the hub's lock, [`Writer::commit`] (after the lock is released)
//! writes the state as it is then unless a later write already covered the change (group
//! commit). The hub uses this module; this module knows nothing of the hub.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::twin_doc::ModuleTwin;
use edgetwin::identity::SharedKey;

pub const FILE_NAME: &str = "hub.json";
const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: Vec<Right>,
}

/// Rights of a shared access policy (PROTOCOL §2.6); stored by variant name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
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
    /// Automatic configurations by id (absent in state files of older emulators).
    #[serde(default)]
    pub configurations: BTreeMap<String, ConfigurationRecord>,
}

/// An automatic configuration as stored; its REST form is built by `configurations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigurationRecord {
    pub schema_version: String,
    pub labels: BTreeMap<String, String>,
    /// `properties.desired[.path]` → value, from `content.moduleContent`; immutable.
    pub module_content: serde_json::Map<String, serde_json::Value>,
    pub target_condition: String,
    pub priority: i64,
    /// Custom metric queries by name.
    pub metric_queries: BTreeMap<String, String>,
    /// Results of the last evaluation: custom metrics, and the system metrics
    /// `targetedCount` / `appliedCount`.
    pub metric_results: BTreeMap<String, i64>,
    pub system_results: BTreeMap<String, i64>,
    pub created: String,
    pub last_updated: String,
    /// Order of creation across the hub: ties of priority go to the newest.
    pub created_seq: u64,
    pub etag_seq: u64,
}

impl PersistedHub {
    /// A fresh hub with the default shared access policies and new keys.
    pub fn new() -> Self {
        use Right::*;
        let policy = |rights: &[Right]| Policy {
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
            configurations: BTreeMap::new(),
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

/// Serialises the state.
fn encode(hub: &PersistedHub) -> Vec<u8> {
    serde_json::to_vec(hub).expect("hub state is always serialisable")
}

/// Durably replaces `hub.json` in `dir` with an encoded snapshot.
fn write(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    edgetwin::store::write_atomic(&dir.join(FILE_NAME), bytes, 0o600)
}

/// A change's place in the order of changes: committing it makes it, and every change
/// before it, durable.
#[must_use = "a change that is not committed never reaches the disk"]
pub struct Ticket {
    generation: u64,
}

/// The encoded state as of change number `generation`.
pub struct Snapshot {
    generation: u64,
    bytes: Vec<u8>,
}

/// Writes the state to `hub.json` in `dir` by group commit: a change only takes a number
/// (under the state's lock, so numbers follow the order of the changes); committing it
/// encodes and writes the whole state as it is then, unless a write since the change
/// already covered it. Under load one encoding serves every change waiting for it, so a
/// hub of N modules costs O(N) per batch of changes rather than per change.
pub struct Writer {
    dir: PathBuf,
    /// Number of the last change.
    taken: AtomicU64,
    /// Number of the newest change on disk; held while writing so writes never reorder.
    written: Mutex<u64>,
}

impl Writer {
    pub fn new(dir: impl Into<PathBuf>) -> Writer {
        Writer {
            dir: dir.into(),
            taken: AtomicU64::new(0),
            written: Mutex::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Numbers a change. Call it under the lock that guards the state, after the change.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.taken.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }

    /// The number of the last change. Read it under the lock that guards the state, with
    /// the copy of the state that [`Writer::encode`] is then given.
    pub fn last_change(&self) -> u64 {
        self.taken.load(Ordering::SeqCst)
    }

    /// Encodes `hub`, a copy of the state as of change number `generation`. Needs no lock:
    /// the hub copies its state under its lock and encodes the copy outside it, so other
    /// operations go on meanwhile.
    pub fn encode(&self, generation: u64, hub: &PersistedHub) -> Snapshot {
        Snapshot {
            generation,
            bytes: encode(hub),
        }
    }

    /// Returns once the change `ticket` is on disk: at once if a write since covered it,
    /// otherwise after writing what `current` encodes (the state as it is then, see
    /// [`Writer::encode`]). Never call it holding the state's lock.
    pub fn commit(
        &self,
        ticket: Ticket,
        current: impl FnOnce() -> Snapshot,
    ) -> std::io::Result<()> {
        // A panic while holding the lock leaves a plain number behind; keep writing.
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *written >= ticket.generation {
            return Ok(());
        }
        let snapshot = current();
        write(&self.dir, &snapshot.bytes)?;
        *written = snapshot.generation;
        Ok(())
    }
}

pub fn save(dir: &Path, hub: &PersistedHub) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write(dir, &encode(hub)).with_context(|| format!("writing {}", dir.join(FILE_NAME).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_covers_every_change_made_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::new(dir.path());
        let mut hub = PersistedHub::new();
        hub.sessions.insert("first".into(), BTreeSet::new());
        let first = writer.ticket();
        hub.sessions.insert("second".into(), BTreeSet::new());
        let second = writer.ticket();

        let mut encodings = 0;
        writer
            .commit(second, || {
                encodings += 1;
                writer.encode(writer.last_change(), &hub)
            })
            .unwrap();
        writer
            .commit(first, || {
                encodings += 1;
                writer.encode(writer.last_change(), &hub)
            })
            .unwrap();

        assert_eq!(encodings, 1, "the first change was already on disk");
        let on_disk = load(dir.path()).unwrap().expect("hub.json written");
        assert!(on_disk.sessions.contains_key("first") && on_disk.sessions.contains_key("second"));
    }

    #[test]
    fn a_change_after_the_last_write_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::new(dir.path());
        let mut hub = PersistedHub::new();
        let t = writer.ticket();
        writer
            .commit(t, || writer.encode(writer.last_change(), &hub))
            .unwrap();
        hub.sessions.insert("later".into(), BTreeSet::new());
        let t = writer.ticket();
        writer
            .commit(t, || writer.encode(writer.last_change(), &hub))
            .unwrap();
        let on_disk = load(dir.path()).unwrap().expect("hub.json written");
        assert!(on_disk.sessions.contains_key("later"));
    }

    #[test]
    fn policy_rights_round_trip_by_name() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &PersistedHub::new()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert!(text.contains(r#""rights":["ServiceConnect"]"#), "{text}");
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.policies["service"].rights, [Right::ServiceConnect]);
    }
}
