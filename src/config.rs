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
//!
//! Validation produces the types the daemon runs with, not look-alikes: the hub's
//! [`HubTransport`], [`HostPort`], [`HttpProxy`], [`BackoffPolicy`] and [`CaBundle`] (the
//! CA file is read and checked here), the twin's [`Schema`]. What `check-config` accepts
//! is therefore what `run` accepts, with two runtime-only exceptions: credential files
//! are read by [`Settings::check_credentials`] (called by `check-config` and, through
//! [`Settings::module_identity`], by `run`) rather than by `load`, and the state
//! directory is created and written only by `run`, as the daemon's user (systemd's
//! `StateDirectory=` creates it at start; `check-config` typically runs as another user).
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
#[cfg(test)]
mod tests_run_parity;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use credentials::{CredentialSource, Secret};
pub use errors::{ConfigError, ConfigErrors};

use crate::hub::backoff::BackoffPolicy;
use crate::hub::options::{HostPort, HttpProxy, HubTransport};
use crate::hub::tls::CaBundle;
use crate::identity::{ModuleCredentials, ServiceCredentials};
use crate::twin::{AckStyle, Schema};

/// Main configuration file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/edgetwin/edgetwin.toml";

/// The validated configuration the daemon runs with. Compared by value (secrets
/// included) to tell what a reload changed.
#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
pub struct HubSettings {
    /// Where the module connection string comes from; read it with
    /// [`Settings::module_identity`]. An inline one was parsed at load.
    pub credentials: CredentialSource,
    pub transport: HubTransport,
    /// TCP/TLS target instead of the connection string's host (`GatewayHostName`), its
    /// port defaulted from `transport` when the config names none.
    pub gateway_host: Option<HostPort>,
    /// Extra PEM trust anchors besides the system roots, read and checked at load.
    pub ca_file: Option<CaBundle>,
    /// SAS token lifetime; the session renews (by reconnecting) at 80 % of it.
    pub sas_ttl: Duration,
    pub keep_alive: Duration,
    /// Exponential reconnect backoff with full jitter; `0 < initial <= max`.
    pub backoff: BackoffPolicy,
    /// The same after refused credentials that the clock did not explain: long, as a
    /// wrong key does not fix itself (default 1 min up to 1 h).
    pub refused_backoff: BackoffPolicy,
    pub proxy: Option<HttpProxy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProvisioningSettings {
    pub enabled: bool,
    /// Service (registry) credentials; `Some` whenever provisioning is enabled.
    pub service_credentials: Option<CredentialSource>,
    pub device_id: String,
    pub module_id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TwinSettings {
    pub ack: AckStyle,
    /// Declared properties (with the built-in `telemetryInterval`) and unknown policy.
    pub schema: Schema,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetrySettings {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq)]
pub struct HookSettings {
    /// Command run after each change, given the new state as JSON on stdin.
    pub on_change: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
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

    /// The module identity, read from its source and parsed, or `None` when it is to be
    /// provisioned and has not been yet. A problem names the setting it came from.
    pub fn module_identity(&self) -> Result<Option<ModuleCredentials>, ConfigErrors> {
        let source = &self.hub.credentials;
        source.read_as(credentials::module_key(source))
    }

    /// [`Self::module_identity`] as connection string text (it contains the key).
    pub fn module_credentials(&self) -> Result<Option<String>, ConfigErrors> {
        Ok(self.module_identity()?.map(|c| c.to_connection_string()))
    }

    /// The service (registry) identity for provisioning, if one is configured.
    pub fn service_identity(&self) -> Result<Option<ServiceCredentials>, ConfigErrors> {
        match &self.provisioning.service_credentials {
            Some(source) => source.read_as(credentials::service_key(source)),
            None => Ok(None),
        }
    }

    /// [`Self::service_identity`] as connection string text (it contains the key).
    pub fn service_credentials(&self) -> Result<Option<String>, ConfigErrors> {
        Ok(self.service_identity()?.map(|c| c.to_connection_string()))
    }

    /// Reads and parses the credentials `edgetwin run` reads as it starts: the module
    /// credential, and the service credential when first-boot provisioning is due.
    /// `check-config` calls it after [`Self::load`] so that it refuses what `run` would.
    /// `load` itself reads only inline ones, because the other commands that load the
    /// config must work while a credential file is still missing or unreadable to them
    /// (`edgetwin provision` is what writes the module credential).
    pub fn check_credentials(&self) -> Result<(), ConfigErrors> {
        if self.module_identity()?.is_some() {
            return Ok(());
        }
        // `load` refuses both of these; reached only when a file vanished since.
        if !self.provisioning.enabled {
            return Err(ConfigErrors::single(
                "hub.connection_string_file",
                None,
                "no module credentials, and [provisioning] is not enabled to create them",
            ));
        }
        if self.service_identity()?.is_none() {
            return Err(ConfigErrors::single(
                "provisioning.service_connection_string_file",
                None,
                "provisioning is enabled but no service connection string is configured",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, every secret replaced by `<redacted>`,
    /// for `edgetwin check-config`.
    pub fn redacted_toml(&self) -> String {
        redact::toml(self)
    }
}
