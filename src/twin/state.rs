//! Runtime state: the desired version applied and the property values in force, and its
//! on-disk form (`state.json`, DESIGN §5).
//!
//! The agent owns the one [`RuntimeState`] (through [`super::TwinSync`]) and `store`
//! writes the bytes of [`StateFile`]. Nothing here touches the disk or reads a clock:
//! `updated_at` is whatever the caller passes in.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::schema::Schema;

/// Version of the `state.json` layout; bumped when a field changes meaning.
pub const STATE_SCHEMA: u32 = 1;

/// What is in force now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuntimeState {
    /// Desired `$version` whose content is in force; `None` until a twin was seen, in
    /// which case any patch needs a full GET first (nothing to count from).
    pub desired_version: Option<u64>,
    /// Values in force: accepted desired values, declared defaults where desired has
    /// none, and the previous good value where a desired one was rejected.
    pub properties: Map<String, Value>,
    /// Reported `$version` last confirmed by the hub (from a GET or a 204).
    pub reported_version: Option<u64>,
}

impl RuntimeState {
    /// The state of a gateway that never saw its twin: declared defaults only.
    pub fn from_defaults(schema: &Schema) -> Self {
        RuntimeState {
            desired_version: None,
            properties: schema.defaults(),
            reported_version: None,
        }
    }

    /// Integer value of a property, if it holds one.
    pub fn integer(&self, name: &str) -> Option<i64> {
        self.properties.get(name).and_then(Value::as_i64)
    }

    /// The `state.json` document for this state.
    pub fn to_file(
        &self,
        device_id: &str,
        module_id: &str,
        updated_at: impl Into<UpdatedAt>,
    ) -> StateFile {
        StateFile {
            schema: STATE_SCHEMA,
            device_id: device_id.to_owned(),
            module_id: module_id.to_owned(),
            desired_version: self.desired_version,
            properties: self.properties.clone(),
            reported_version: self.reported_version,
            updated_at: updated_at.into(),
        }
    }
}

/// Timestamp of the last write, chosen by the caller (RFC 3339 text or Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UpdatedAt {
    Unix(u64),
    Text(String),
}

impl From<u64> for UpdatedAt {
    fn from(secs: u64) -> Self {
        UpdatedAt::Unix(secs)
    }
}
impl From<String> for UpdatedAt {
    fn from(text: String) -> Self {
        UpdatedAt::Text(text)
    }
}
impl From<&str> for UpdatedAt {
    fn from(text: &str) -> Self {
        UpdatedAt::Text(text.to_owned())
    }
}

/// `state.json` exactly as written to disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub schema: u32,
    pub device_id: String,
    pub module_id: String,
    pub desired_version: Option<u64>,
    pub properties: Map<String, Value>,
    pub reported_version: Option<u64>,
    pub updated_at: UpdatedAt,
}

/// Why a state file may not be trusted; `store` moves such a file aside.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFileError {
    #[error("state file is not valid: {0}")]
    Corrupt(String),
    #[error("state file has schema {found}, this edgetwin understands {STATE_SCHEMA}")]
    UnsupportedSchema { found: u32 },
    #[error("state file belongs to {device}/{module}, not to this module")]
    Foreign { device: String, module: String },
}

impl StateFile {
    pub fn to_json(&self) -> Vec<u8> {
        // A map of JSON values always serializes.
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Parses the file and checks it is ours; a file for another identity is refused
    /// rather than trusted, because its properties were never meant for this module.
    pub fn parse(bytes: &[u8], device_id: &str, module_id: &str) -> Result<Self, StateFileError> {
        let probe: Value =
            serde_json::from_slice(bytes).map_err(|e| StateFileError::Corrupt(e.to_string()))?;
        // Check the schema before the layout so a newer file says so instead of "corrupt".
        if let Some(found) = probe.get("schema").and_then(Value::as_u64) {
            if found != u64::from(STATE_SCHEMA) {
                return Err(StateFileError::UnsupportedSchema {
                    found: u32::try_from(found).unwrap_or(u32::MAX),
                });
            }
        }
        let file: StateFile =
            serde_json::from_value(probe).map_err(|e| StateFileError::Corrupt(e.to_string()))?;
        if file.device_id != device_id || file.module_id != module_id {
            return Err(StateFileError::Foreign {
                device: file.device_id,
                module: file.module_id,
            });
        }
        Ok(file)
    }

    pub fn into_state(self) -> RuntimeState {
        RuntimeState {
            desired_version: self.desired_version,
            properties: self.properties,
            reported_version: self.reported_version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> RuntimeState {
        RuntimeState {
            desired_version: Some(7),
            properties: json!({"telemetryInterval": 122, "site": {"name": "north"}})
                .as_object()
                .cloned()
                .unwrap(),
            reported_version: Some(3),
        }
    }

    #[test]
    fn state_file_round_trips_through_json() {
        let file = sample().to_file("gw1", "edgetwin", "2026-01-02T03:04:05Z");
        let parsed = StateFile::parse(&file.to_json(), "gw1", "edgetwin").unwrap();
        assert_eq!(parsed, file);
        assert_eq!(parsed.into_state(), sample());
    }

    #[test]
    fn state_file_has_exactly_the_documented_fields() {
        let file = sample().to_file("gw1", "edgetwin", 1_700_000_000u64);
        let value: Value = serde_json::from_slice(&file.to_json()).unwrap();
        let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "desired_version",
                "device_id",
                "module_id",
                "properties",
                "reported_version",
                "schema",
                "updated_at"
            ]
        );
        assert_eq!(value["updated_at"], json!(1_700_000_000u64));
    }

    #[test]
    fn state_file_of_another_module_is_foreign() {
        let bytes = sample().to_file("gw1", "other", 0u64).to_json();
        assert_eq!(
            StateFile::parse(&bytes, "gw1", "edgetwin"),
            Err(StateFileError::Foreign {
                device: "gw1".into(),
                module: "other".into()
            })
        );
    }

    #[test]
    fn state_file_with_newer_schema_is_refused_by_name() {
        let bytes = br#"{"schema": 9, "whatever": true}"#;
        assert_eq!(
            StateFile::parse(bytes, "gw1", "edgetwin"),
            Err(StateFileError::UnsupportedSchema { found: 9 })
        );
    }

    #[test]
    fn truncated_state_file_is_corrupt() {
        let bytes = sample().to_file("gw1", "edgetwin", 0u64).to_json();
        let err = StateFile::parse(&bytes[..bytes.len() / 2], "gw1", "edgetwin").unwrap_err();
        assert!(matches!(err, StateFileError::Corrupt(_)));
    }
}
