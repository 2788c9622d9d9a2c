//! The configuration as written: serde mirrors of DESIGN §4, and the figment layers that
//! fill them (defaults ← main file ← `conf.d/*.toml` ← `EDGETWIN_*` env).
//!
//! Only `config` uses these types; they hold text as written (durations, paths, empty
//! strings for "unset") and must never be handed to the rest of the daemon, which gets
//! the validated `Settings`. Every deserialization problem is collected, not just the
//! first one serde would stop at.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider};
use serde::{Deserialize, Serialize};

use super::errors::ConfigErrors;
use super::{LogFormat, ProvisioningMethod};
use crate::hub::connection::REFUSED_BACKOFF;
use crate::hub::options::HubTransport;
use crate::twin::{AckStyle, PropertyType, UnknownPolicy};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub hub: RawHub,
    pub provisioning: RawProvisioning,
    pub aziot: RawAziot,
    pub twin: RawTwin,
    pub telemetry: RawTelemetry,
    pub state: RawState,
    pub hooks: RawHooks,
    pub log: RawLog,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHub {
    pub connection_string: String,
    pub connection_string_file: String,
    pub transport: HubTransport,
    pub gateway_host: String,
    pub ca_file: String,
    pub sas_ttl: String,
    pub keep_alive: String,
    pub backoff: RawBackoff,
    pub refused_backoff: RawBackoff,
    pub proxy: String,
}

impl Default for RawHub {
    fn default() -> Self {
        RawHub {
            connection_string: String::new(),
            connection_string_file: String::new(),
            transport: HubTransport::Mqtt,
            gateway_host: String::new(),
            ca_file: String::new(),
            sas_ttl: "1h".into(),
            keep_alive: "60s".into(),
            backoff: RawBackoff::default(),
            refused_backoff: RawBackoff {
                initial: super::duration::format(REFUSED_BACKOFF.initial),
                max: super::duration::format(REFUSED_BACKOFF.max),
            },
            proxy: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBackoff {
    pub initial: String,
    pub max: String,
}

impl Default for RawBackoff {
    fn default() -> Self {
        RawBackoff {
            initial: "1s".into(),
            max: "120s".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProvisioning {
    /// Unset: `none`, unless the deprecated `enabled = true` says `service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<ProvisioningMethod>,
    /// Deprecated predecessor of `method`: `true` meant `method = "service"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    pub service_connection_string_file: String,
    pub service_connection_string: String,
    pub device_connection_string_file: String,
    pub device_connection_string: String,
    pub device_id: String,
    pub module_id: String,
    pub registry_endpoint: String,
    pub dps: RawDps,
}

impl Default for RawProvisioning {
    fn default() -> Self {
        RawProvisioning {
            method: None,
            enabled: None,
            service_connection_string_file: String::new(),
            service_connection_string: String::new(),
            device_connection_string_file: String::new(),
            device_connection_string: String::new(),
            device_id: String::new(),
            module_id: "edgetwin".into(),
            registry_endpoint: String::new(),
            dps: RawDps::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDps {
    pub global_endpoint: String,
    pub id_scope: String,
    pub registration_id: String,
    pub symmetric_key_file: String,
    pub group_key_file: String,
}

impl Default for RawDps {
    fn default() -> Self {
        RawDps {
            global_endpoint: DPS_GLOBAL_ENDPOINT.into(),
            id_scope: String::new(),
            registration_id: String::new(),
            symmetric_key_file: String::new(),
            group_key_file: String::new(),
        }
    }
}

/// Azure's global DPS endpoint (DESIGN §4).
pub const DPS_GLOBAL_ENDPOINT: &str = "global.azure-devices-provisioning.net";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAziot {
    pub enabled: bool,
    pub identityd_socket: String,
    pub keyd_socket: String,
}

impl Default for RawAziot {
    fn default() -> Self {
        RawAziot {
            enabled: false,
            identityd_socket: crate::aziot::IDENTITYD_SOCKET.into(),
            keyd_socket: crate::aziot::KEYD_SOCKET.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTwin {
    pub ack: AckStyle,
    pub unknown: UnknownPolicy,
    pub properties: BTreeMap<String, RawProperty>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProperty {
    #[serde(rename = "type")]
    pub kind: PropertyType,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub default: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    pub enabled: bool,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        RawTelemetry { enabled: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    pub dir: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            dir: "/var/lib/edgetwin".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHooks {
    pub on_change: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: String,
    pub format: LogFormat,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// The merged layers, kept so validation can say which file or variable set a key.
pub struct Layers {
    figment: Figment,
    /// Every file read, in merge order.
    pub files: Vec<PathBuf>,
}

impl Layers {
    /// Builds the layers. Files that do not parse are reported and left out, so the
    /// rest can still be checked and every problem shown at once.
    pub fn load(main: &Path, main_required: bool, errors: &mut ConfigErrors) -> Layers {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        let mut files = Vec::new();
        if main.exists() {
            files.push(main.to_path_buf());
        } else if main_required {
            errors.push("(file)", Some(main.display().to_string()), "no such file");
        }
        let conf_d = main.parent().unwrap_or(Path::new(".")).join("conf.d");
        if let Ok(entries) = std::fs::read_dir(&conf_d) {
            let mut drop_ins: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect();
            drop_ins.sort();
            files.extend(drop_ins);
        }
        for file in &files {
            let toml = Toml::file_exact(file);
            match toml.data() {
                Ok(_) => figment = figment.merge(toml),
                Err(e) => errors.push(
                    "(file)",
                    Some(file.display().to_string()),
                    e.kind.to_string(),
                ),
            }
        }
        // Only variables with a level separator are config: EDGETWIN_SERVICE_CONNECTION_STRING
        // and the like belong to the command line, and every section is a table anyway.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains(ENV_SEPARATOR))
            .split(ENV_SEPARATOR);
        figment = figment.merge(env);
        Layers { figment, files }
    }

    /// Where the value of `key` came from, as a user would look for it.
    pub fn origin(&self, key: &str) -> Option<String> {
        let metadata = self.figment.find_metadata(key)?;
        if let Some(path) = metadata.source.as_ref().and_then(|s| s.file_path()) {
            return Some(path.display().to_string());
        }
        if metadata.name.contains("environment") {
            let var = key.replace('.', ENV_SEPARATOR).to_ascii_uppercase();
            return Some(format!("environment variable {ENV_PREFIX}{var}"));
        }
        Some(metadata.name.to_string())
    }

    /// Deserializes the layers into [`RawConfig`]. serde stops at the first problem, so
    /// each offending key is recorded, removed and the rest tried again; what remains
    /// falls back to defaults and is still validated.
    pub fn extract(&self, errors: &mut ConfigErrors) -> RawConfig {
        let mut dict: Dict = match self.figment.data() {
            Ok(mut profiles) => profiles.remove(&Profile::Default).unwrap_or_default(),
            Err(e) => {
                errors.push("(config)", None, e.to_string());
                return RawConfig::default();
            }
        };
        let mut removed = BTreeSet::new();
        // Each round removes at least one key, so this bounds the work on hostile input.
        for _ in 0..256 {
            let error = match Figment::from(Serialized::defaults(&dict)).extract::<RawConfig>() {
                Ok(raw) => return raw,
                Err(error) => error,
            };
            let mut progressed = false;
            for e in error {
                let mut path = e.path.clone();
                // figment's path ends with the offending field for these kinds; serde's
                // own errors do not, so add it only when missing.
                let mut with_field = |field: &str| {
                    if path.last().map(String::as_str) != Some(field) {
                        path.push(field.to_owned());
                    }
                };
                let message = match &e.kind {
                    Kind::UnknownField(field, _) => {
                        with_field(field);
                        "unknown key".to_owned()
                    }
                    Kind::MissingField(field) => {
                        with_field(field);
                        // Already reported as the value we removed; drop its parent instead.
                        if removed.contains(&path.join(".")) {
                            path.pop();
                            progressed |= remove(&mut dict, &path);
                            continue;
                        }
                        "required key is missing".to_owned()
                    }
                    Kind::UnknownVariant(found, expected) => {
                        let expected: Vec<String> =
                            expected.iter().map(|v| format!("{v:?}")).collect();
                        format!("{found:?} is not one of {}", expected.join(", "))
                    }
                    Kind::InvalidType(found, expected) => {
                        format!("wrong type: found {found}, expected {expected}")
                    }
                    kind => kind.to_string(),
                };
                let key = path.join(".");
                let origin = self.origin(&key).or_else(|| {
                    let parent = &path[..path.len().saturating_sub(1)];
                    self.origin(&parent.join("."))
                });
                errors.push(key.clone(), origin, message);
                // A missing key cannot be removed; its parent table goes instead.
                if !remove(&mut dict, &path) {
                    path.pop();
                    remove(&mut dict, &path);
                }
                removed.insert(key);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        RawConfig::default()
    }
}

pub const ENV_PREFIX: &str = "EDGETWIN_";
pub const ENV_SEPARATOR: &str = "__";

/// Removes the value at `path`; `false` when there was none.
fn remove(dict: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(Value::Dict(_, inner)) => remove(inner, rest),
            _ => false,
        },
    }
}
