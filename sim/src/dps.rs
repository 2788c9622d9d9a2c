//! The emulated Device Provisioning Service (PROTOCOL §12, DESIGN §8): one DPS instance
//! with one ID scope, one enrollment group with a symmetric key, and individual
//! enrollments tests add. Any registration id whose key verifies — the group key's
//! derivation for that id, or its individual enrollment's key — is assigned to the
//! emulator's hub, and the device is created there (or its keys replaced) with that key, so
//! it can then manage its own modules.
//!
//! Front ends: [`http`] mounts the registration REST API on the HTTPS listener, and the MQTT
//! listener hands a CONNECT whose user name is `{idScope}/registrations/{id}/api-version=...`
//! to `mqtt::dps`. Both call [`Dps::register`] and [`Dps::operation_status`], which answer
//! with the status, body and `Retry-After` DPS would.
//!
//! At start the instance writes `dps/id_scope`, `dps/group.key` (0600) and `dps/endpoint`
//! (`localhost:<https port>`) into the state directory; scope and group key are read back
//! on the next start. Enrollments other than the group, registrations and operations live
//! in memory only. Never logs a key or a token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context as _;
use edgetwin::identity::SharedKey;

use super::hub::Hub;

pub mod http;
mod registration;

pub use registration::DpsAnswer;

/// Directory under the state directory holding the DPS files.
pub const DPS_DIR: &str = "dps";
pub const ID_SCOPE_FILE: &str = "id_scope";
pub const GROUP_KEY_FILE: &str = "group.key";
pub const ENDPOINT_FILE: &str = "endpoint";
/// `Retry-After` (seconds) on 202 and 429 unless a test sets another.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 1;

/// An individual enrollment (symmetric key).
#[derive(Debug, Clone)]
pub(crate) struct Individual {
    pub(crate) key: SharedKey,
    /// The device id DPS assigns; the registration id when `None`.
    pub(crate) device_id: Option<String>,
    pub(crate) enabled: bool,
}

/// Scriptable faults and pacing.
#[derive(Debug, Clone)]
pub(crate) struct FaultState {
    pub(crate) throttle_next: u32,
    pub(crate) retry_after_secs: u32,
    pub(crate) assigning_polls: u32,
    pub(crate) fail_next: u32,
}

impl Default for FaultState {
    fn default() -> Self {
        FaultState {
            throttle_next: 0,
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            assigning_polls: 0,
            fail_next: 0,
        }
    }
}

/// Which request a [`DpsCall`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpsCallKind {
    Register,
    Poll,
}

/// One request DPS answered, for tests to inspect after the fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsCall {
    pub kind: DpsCallKind,
    pub registration_id: String,
    pub status: u16,
    /// When it arrived (the machine's monotonic clock).
    pub at: Instant,
}

pub(crate) struct State {
    pub(crate) group_enabled: bool,
    /// Keyed by lower-cased registration id (DPS ids are case-insensitive).
    pub(crate) individuals: HashMap<String, Individual>,
    pub(crate) operations: HashMap<String, registration::Operation>,
    /// Registration ids assigned before, lower-cased, with when they first were.
    pub(crate) registered: HashMap<String, String>,
    pub(crate) faults: FaultState,
    pub(crate) calls: Vec<DpsCall>,
}

/// The DPS instance. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct Dps {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) hub: Hub,
    pub(crate) id_scope: String,
    pub(crate) group_key: SharedKey,
    pub(crate) state: Mutex<State>,
}

impl Dps {
    /// The instance of the emulator whose state is in `state_dir`: its ID scope and group
    /// key are read from `dps/`, or made and written there on first use.
    pub fn open(hub: Hub, state_dir: &Path) -> anyhow::Result<Dps> {
        let dir = state_dir.join(DPS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let read = |name: &str| -> anyhow::Result<Option<String>> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text.trim().to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
            }
        };
        let id_scope = match read(ID_SCOPE_FILE)? {
            Some(scope) if !scope.is_empty() => scope,
            _ => {
                let scope = new_id_scope();
                write(&dir.join(ID_SCOPE_FILE), &scope, 0o644)?;
                scope
            }
        };
        let group_key = match read(GROUP_KEY_FILE)? {
            Some(text) => SharedKey::from_base64(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(GROUP_KEY_FILE).display()))?,
            None => {
                let key = SharedKey::generate();
                write(&dir.join(GROUP_KEY_FILE), key.as_base64(), 0o600)?;
                key
            }
        };
        Ok(Dps {
            inner: Arc::new(Inner {
                hub,
                id_scope,
                group_key,
                state: Mutex::new(State {
                    group_enabled: true,
                    individuals: HashMap::new(),
                    operations: HashMap::new(),
                    registered: HashMap::new(),
                    faults: FaultState::default(),
                    calls: Vec::new(),
                }),
            }),
        })
    }

    /// Writes `dps/endpoint`: the `host:port` clients give as the global endpoint.
    pub fn write_endpoint(&self, state_dir: &Path, authority: &str) -> anyhow::Result<()> {
        write(
            &state_dir.join(DPS_DIR).join(ENDPOINT_FILE),
            authority,
            0o644,
        )
    }

    pub fn id_scope(&self) -> &str {
        &self.inner.id_scope
    }

    /// The enrollment group's key; device keys are derived from it (PROTOCOL §12.2).
    pub fn group_key(&self) -> &SharedKey {
        &self.inner.group_key
    }

    /// The host name DPS answers as `assignedHub`: the emulator's hub.
    pub fn assigned_hub(&self) -> &str {
        self.inner.hub.hub_name()
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Adds (or replaces) an individual enrollment for `registration_id` with a fresh key,
    /// assigning `device_id` (the registration id when `None`); returns its key.
    pub fn add_individual_enrollment(
        &self,
        registration_id: &str,
        device_id: Option<&str>,
    ) -> SharedKey {
        let key = SharedKey::generate();
        self.state().individuals.insert(
            registration_id.to_ascii_lowercase(),
            Individual {
                key: key.clone(),
                device_id: device_id.map(str::to_owned),
                enabled: true,
            },
        );
        key
    }

    /// Enables or disables the enrollment group: registrations through it then end with
    /// status `disabled`.
    pub fn set_group_enabled(&self, enabled: bool) {
        self.state().group_enabled = enabled;
    }

    /// Enables or disables an individual enrollment; false if there is none.
    pub fn set_enrollment_enabled(&self, registration_id: &str, enabled: bool) -> bool {
        match self
            .state()
            .individuals
            .get_mut(&registration_id.to_ascii_lowercase())
        {
            Some(e) => {
                e.enabled = enabled;
                true
            }
            None => false,
        }
    }

    /// The next `n` requests (register or poll) are answered 429 with `Retry-After`.
    pub fn throttle_next(&self, n: u32) {
        self.state().faults.throttle_next = n;
    }

    /// The `Retry-After` seconds on 202 and 429 answers (default 1).
    pub fn set_retry_after(&self, secs: u32) {
        self.state().faults.retry_after_secs = secs;
    }

    /// How many polls of each new operation answer `assigning` before its final state
    /// (default 0: the first poll has it).
    pub fn set_assigning_polls(&self, n: u32) {
        self.state().faults.assigning_polls = n;
    }

    /// The next `n` registrations that authenticate end with status `failed`.
    pub fn fail_next_registrations(&self, n: u32) {
        self.state().faults.fail_next = n;
    }

    /// Every request answered so far, oldest first.
    pub fn calls(&self) -> Vec<DpsCall> {
        self.state().calls.clone()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `0ne` and eight upper-case hex digits, the shape of real ID scopes.
fn new_id_scope() -> String {
    format!("0ne{:08X}", rand::random::<u32>())
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    edgetwin::store::write_atomic(path, format!("{text}\n").as_bytes(), mode)
        .with_context(|| format!("writing {}", path.display()))
}
