//! Configuration: figment layers → raw serde structs → validated [`Settings`].
//!
//! Layers, later winning: built-in defaults ← the main file (`/etc/edgetwin/edgetwin.toml`
//! or `--config`) ← `<dir of main file>/conf.d/*.toml` in name order ← `EDGETWIN_*`
//! environment variables (`__` separates levels: `EDGETWIN_LOG__LEVEL=debug`).
//!
//! `main` calls [`Settings::load`] for every subcommand that needs it and exits 78 with
//! the [`ConfigErrors`] it returns; `app` receives the `Settings`. Every problem is
//! collected and named by key and file, never only the first. This module reads files
//! and the environment but must never connect anywhere, and never print a secret: the
//! `Debug` of `Settings` and [`Settings::redacted_toml`] redact connection strings.
//!
//! - `raw`: serde mirrors of the file format and the figment layering.
//! - [`duration`]: `"500ms"`, `"60s"`, `"1h"` parsing.
//! - [`credentials`]: where connection strings come from; [`Secret`].
//! - `validate`: raw → typed, cross-field checks.
//! - `redact`: the effective config as TOML with secrets replaced.

pub mod credentials;
pub mod duration;
pub mod errors;
mod raw;
mod redact;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use credentials::{CredentialSource, Secret};
pub use errors::{ConfigError, ConfigErrors};

use crate::twin::{AckStyle, Schema};

/// Main configuration file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edgetwin/edgetwin.toml";

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Files that were read, in merge order (main file first, then `conf.d`).
    pub files: Vec<PathBuf>,
    pub hub: HubSettings,
    pub provisioning: ProvisioningSettings,
    pub twin: TwinSettings,
    pub telemetry: TelemetrySettings,
    pub state: StateSettings,
    pub hooks: HookSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Where the module connection string comes from; read it with
    /// [`Settings::module_credentials`].
    pub credentials: CredentialSource,
    pub transport: Transport,
    /// TCP/TLS target instead of the connection string's host (`GatewayHostName`).
    pub gateway_host: Option<GatewayHost>,
    /// Extra PEM trust anchors besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// SAS token lifetime; the session renews (by reconnecting) at 80 % of it.
    pub sas_ttl: Duration,
    pub keep_alive: Duration,
    pub backoff: Backoff,
    pub proxy: Option<Proxy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Transport {
    /// MQTT over TLS, port 8883.
    #[default]
    #[serde(rename = "mqtt")]
    Mqtt,
    /// MQTT over WebSocket over TLS, port 443 (for networks that only pass HTTPS).
    #[serde(rename = "mqtt-ws")]
    MqttWs,
}

/// Exponential reconnect backoff with full jitter, between these bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// `host` or `host:port` (`[v6addr]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayHost {
    pub host: String,
    pub port: Option<u16>,
}

/// An HTTP CONNECT proxy URL. Its `Debug` hides any `user:password@`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy(String);

impl Proxy {
    pub fn new(url: impl Into<String>) -> Self {
        Proxy(url.into())
    }

    pub fn url(&self) -> &str {
        &self.0
    }

    /// The URL with any user information replaced, for logs and `check-config`.
    pub fn redacted(&self) -> String {
        match self.0.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((_, host)) => format!("{scheme}://{}@{host}", credentials::REDACTED),
                None => self.0.clone(),
            },
            None => self.0.clone(),
        }
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Debug, Clone)]
pub struct ProvisioningSettings {
    pub enabled: bool,
    /// Service (registry) credentials; `Some` whenever provisioning is enabled.
    pub service_credentials: Option<CredentialSource>,
    pub device_id: String,
    pub module_id: String,
}

#[derive(Debug, Clone)]
pub struct TwinSettings {
    pub ack: AckStyle,
    /// Declared properties (with the built-in `telemetryInterval`) and unknown policy.
    pub schema: Schema,
}

#[derive(Debug, Clone, Copy)]
pub struct TelemetrySettings {
    pub enabled: bool,
}

#[derive(Debug, Clone)]
pub struct StateSettings {
    pub dir: PathBuf,
}

impl StateSettings {
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn provisioned_credentials_file(&self) -> PathBuf {
        self.dir.join(credentials::PROVISIONED_MODULE_CREDENTIAL)
    }
}

#[derive(Debug, Clone)]
pub struct HookSettings {
    /// Command run after each change, given the new state as JSON on stdin.
    pub on_change: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `info,edgetwin=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when started by systemd (`JOURNAL_STREAM` set), text otherwise.
    #[default]
    Auto,
    Journald,
    Text,
    Json,
}

impl Settings {
    /// Loads and validates the configuration. `path` is `--config`; without it the
    /// default path is used and may be absent (defaults and environment still apply).
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigErrors> {
        let main = path.unwrap_or(Path::new(DEFAULT_PATH));
        let mut errors = ConfigErrors::new();
        let layers = raw::Layers::load(main, path.is_some(), &mut errors);
        let raw = layers.extract(&mut errors);
        let settings = validate::settings(raw, &layers, &mut errors);
        errors.into_result(settings)
    }

    /// The module connection string text, or `None` when it is to be provisioned and
    /// has not been yet. Parsing it is `identity`'s job.
    pub fn module_credentials(&self) -> Result<Option<String>, ConfigErrors> {
        let key = match &self.hub.credentials {
            CredentialSource::Inline(_) => "hub.connection_string",
            CredentialSource::File(_) => "hub.connection_string_file",
            CredentialSource::SystemdCredential(_) => {
                "$CREDENTIALS_DIRECTORY/module-connection-string"
            }
            CredentialSource::Provisioned(_) => "state.dir/module.connstr",
        };
        self.hub.credentials.read(key)
    }

    /// The service (registry) connection string for provisioning, if one is configured.
    pub fn service_credentials(&self) -> Result<Option<String>, ConfigErrors> {
        let Some(source) = &self.provisioning.service_credentials else {
            return Ok(None);
        };
        let key = match source {
            CredentialSource::Inline(_) => "provisioning.service_connection_string",
            CredentialSource::File(_) => "provisioning.service_connection_string_file",
            _ => "$CREDENTIALS_DIRECTORY/service-connection-string",
        };
        source.read(key)
    }

    /// The effective configuration as TOML, every secret replaced by `<redacted>`,
    /// for `edgetwin check-config`.
    pub fn redacted_toml(&self) -> String {
        redact::toml(self)
    }
}
