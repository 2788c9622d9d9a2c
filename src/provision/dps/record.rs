//! `provisioning.json` in the state directory (DESIGN §5): what DPS assigned, so that a
//! reboot connects to the same hub and device instead of registering again. It holds the
//! assignment and what it was asked for (scope, registration id), never a key: the device
//! key is derived again from the configured enrollment key on each start.
//!
//! Written atomically and durably ([`crate::store::write_atomic`]); a record for another
//! scope or registration id is not reused ([`ProvisioningRecord::matches`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::wire::{valid_device_id, valid_hub_host};
use super::{DpsAssignment, DpsError, DpsRequest};

/// The file name under the state directory.
pub const RECORD_FILE: &str = "provisioning.json";
/// Format version of the file.
pub const RECORD_SCHEMA: u32 = 1;

/// `<state_dir>/provisioning.json`.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORD_FILE)
}

/// The persisted outcome of one DPS registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningRecord {
    pub schema: u32,
    /// Always `"dps"`: the only source that needs a record.
    pub source: String,
    pub id_scope: String,
    pub registration_id: String,
    pub assigned_hub: String,
    pub device_id: String,
    /// Unix seconds: when DPS assigned it (for people reading the file).
    pub registered_at: u64,
}

impl ProvisioningRecord {
    /// The record of `assignment`, the answer to `request`, made now.
    pub fn new(request: &DpsRequest, assignment: &DpsAssignment) -> Self {
        ProvisioningRecord {
            schema: RECORD_SCHEMA,
            source: "dps".into(),
            id_scope: request.id_scope.clone(),
            registration_id: request.registration_id.clone(),
            assigned_hub: assignment.assigned_hub.clone(),
            device_id: assignment.device_id.clone(),
            registered_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Whether this record answers `request` (same scope and registration id; DPS treats
    /// both case-insensitively). The endpoint may change: scopes are global.
    pub fn matches(&self, request: &DpsRequest) -> bool {
        self.id_scope.eq_ignore_ascii_case(&request.id_scope)
            && self
                .registration_id
                .eq_ignore_ascii_case(&request.registration_id)
    }

    pub fn assignment(&self) -> DpsAssignment {
        DpsAssignment {
            assigned_hub: self.assigned_hub.clone(),
            device_id: self.device_id.clone(),
        }
    }
}

/// Writes `record` to `path` (0600, atomically; the directory must exist).
pub fn save(path: &Path, record: &ProvisioningRecord) -> Result<(), DpsError> {
    let mut text = serde_json::to_string_pretty(record).map_err(|e| DpsError::Record {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    crate::store::write_atomic(path, text.as_bytes(), 0o600).map_err(|source| DpsError::State {
        path: path.to_owned(),
        source,
    })
}

/// The record at `path`; `None` when there is none yet. A file that is not a record of
/// this schema is [`DpsError::Record`]: the caller moves it aside and registers again.
pub fn load(path: &Path) -> Result<Option<ProvisioningRecord>, DpsError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DpsError::State {
                path: path.to_owned(),
                source,
            })
        }
    };
    let bad = |reason: String| DpsError::Record {
        path: path.to_owned(),
        reason,
    };
    let record: ProvisioningRecord = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("not a provisioning record: {e}")))?;
    if record.schema != RECORD_SCHEMA || record.source != "dps" {
        return Err(bad(format!(
            "schema {} source {:?} is not this version's (schema {RECORD_SCHEMA}, source \"dps\")",
            record.schema, record.source
        )));
    }
    if !valid_hub_host(&record.assigned_hub) || !valid_device_id(&record.device_id) {
        return Err(bad("assigned_hub or device_id is not valid".into()));
    }
    Ok(Some(record))
}
