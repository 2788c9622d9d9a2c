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
//! - `validate`: raw → typed, cross-field checks (`[aziot]` in `validate/aziot.rs`).
//! - `redact`: the effective config as TOML with secrets replaced.
//!
//! Besides problems, loading can yield [`Settings::warnings`]: things that work but
//! should be changed (a deprecated key, a provisioning secret that is gone but no longer
//! needed). `check-config` prints them with the configuration, `run` logs them.

pub mod credentials;
pub mod duration;
pub mod errors;
mod raw;
mod redact;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_provisioning;
#[cfg(test)]
mod tests_run_parity;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use credentials::{CredentialSource, Secret};
pub use errors::{ConfigError, ConfigErrors};
pub use raw::DPS_GLOBAL_ENDPOINT;

/// A warning has the shape of a problem (key, origin, message) but does not stop `load`.
pub type ConfigWarning = ConfigError;

use crate::aziot::AziotClient;
use crate::hub::backoff::BackoffPolicy;
use crate::hub::options::{HostPort, HttpProxy, HubTransport};
use crate::hub::tls::CaBundle;
use crate::identity::{DeviceCredentials, ModuleCredentials, ServiceCredentials, SharedKey};
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
    /// `[aziot] enabled`: the module identity comes from the Azure IoT Identity Service
    /// through these sockets (and `hub.credentials` is then unused).
    pub aziot: Option<AziotClient>,
    pub twin: TwinSettings,
    pub telemetry: TelemetrySettings,
    pub state: StateSettings,
    pub hooks: HookSettings,
    pub log: LogSettings,
    /// What should be changed although it works; never contains a secret.
    pub warnings: Vec<ConfigWarning>,
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

/// How the module identity is obtained on first boot (DESIGN §4), least privilege last
/// here but first in the documentation: `dps`, `device`, `service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisioningMethod {
    /// The module credential is supplied; nothing is provisioned.
    #[default]
    None,
    /// A registryReadWrite policy key creates the device and the module.
    Service,
    /// This device's own connection string creates (or finds) its module.
    Device,
    /// The Device Provisioning Service assigns the hub and device, then as `Device`.
    Dps,
}

impl ProvisioningMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisioningMethod::None => "none",
            ProvisioningMethod::Service => "service",
            ProvisioningMethod::Device => "device",
            ProvisioningMethod::Dps => "dps",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProvisioningSettings {
    pub method: ProvisioningMethod,
    /// Service (registry) credentials, if configured; `service` reads them with
    /// [`Settings::service_identity`] while provisioning is due.
    pub service_credentials: Option<CredentialSource>,
    /// This device's connection string, if configured (`device`; see
    /// [`Settings::device_identity`]).
    pub device_credentials: Option<CredentialSource>,
    /// The device whose module is provisioned, when known before provisioning: as
    /// configured, else (`service` only) this machine's hostname. `device` without one
    /// takes the DeviceId of its credential; `dps` gets it assigned.
    pub device_id: Option<String>,
    pub module_id: String,
    /// Where the hub's registry REST API is reached when not `https://{hub}:443` (an
    /// emulator, a TLS-inspecting proxy); used by `device` and `dps`.
    pub registry_endpoint: Option<HostPort>,
    pub dps: DpsSettings,
}

/// `[provisioning.dps]`: what the Device Provisioning Service registration needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DpsSettings {
    /// `host` or `host:port` of the DPS global endpoint.
    pub global_endpoint: String,
    pub id_scope: String,
    /// Default: this machine's hostname.
    pub registration_id: String,
    /// The enrollment key, if configured; read with [`Settings::dps_key`].
    pub key: Option<(DpsKeyKind, CredentialSource)>,
}

/// Which DPS enrollment a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpsKeyKind {
    /// An individual enrollment's key: the device key itself.
    Individual,
    /// An enrollment group's key: the device key is derived from it and the
    /// registration id (PROTOCOL §12.2).
    Group,
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

    /// [`Self::service_identity`], required: `method = "service"` cannot do without.
    pub fn required_service_identity(&self) -> Result<ServiceCredentials, ConfigErrors> {
        self.service_identity()?
            .ok_or_else(|| missing(ProvisioningMethod::Service))
    }

    /// This device's own identity (`method = "device"`), if one is configured. A
    /// module or service connection string in its place is refused, naming the setting.
    pub fn device_identity(&self) -> Result<Option<DeviceCredentials>, ConfigErrors> {
        match &self.provisioning.device_credentials {
            Some(source) => source.read_as(credentials::device_key(source)),
            None => Ok(None),
        }
    }

    /// [`Self::device_identity`], required: `method = "device"` cannot do without.
    pub fn required_device_identity(&self) -> Result<DeviceCredentials, ConfigErrors> {
        self.device_identity()?
            .ok_or_else(|| missing(ProvisioningMethod::Device))
    }

    /// The DPS enrollment key (`method = "dps"`), read and decoded, if one is configured.
    pub fn dps_key(&self) -> Result<Option<(DpsKeyKind, SharedKey)>, ConfigErrors> {
        let Some((kind, source)) = &self.provisioning.dps.key else {
            return Ok(None);
        };
        let key = credentials::dps_key_setting(*kind, source);
        Ok(source.read_key(key)?.map(|k| (*kind, k)))
    }

    /// [`Self::dps_key`], required: `method = "dps"` cannot do without.
    pub fn required_dps_key(&self) -> Result<(DpsKeyKind, SharedKey), ConfigErrors> {
        self.dps_key()?
            .ok_or_else(|| missing(ProvisioningMethod::Dps))
    }

    /// Reads and parses the credentials `edgetwin run` reads as it starts: the module
    /// credential, and the provisioning secret of the configured method when first-boot
    /// provisioning is due. `check-config` calls it after [`Self::load`] so that it
    /// refuses what `run` would. `load` itself reads only inline ones, because the other
    /// commands that load the config must work while a credential file is still missing
    /// or unreadable to them (`edgetwin provision` is what writes the module credential).
    pub fn check_credentials(&self) -> Result<(), ConfigErrors> {
        if let Some(aziot) = &self.aziot {
            return aziot_sockets(aziot);
        }
        if self.module_identity()?.is_some() {
            return Ok(());
        }
        match self.provisioning.method {
            // `load` refuses this; reached only when a file vanished since.
            ProvisioningMethod::None => Err(missing(ProvisioningMethod::None)),
            ProvisioningMethod::Service => self.required_service_identity().map(drop),
            ProvisioningMethod::Device => self.required_device_identity().map(drop),
            ProvisioningMethod::Dps => self.required_dps_key().map(drop),
        }
    }

    /// The effective configuration as TOML, every secret replaced by `<redacted>`, and
    /// the warnings as comments,
    /// for `edgetwin check-config`.
    pub fn redacted_toml(&self) -> String {
        redact::toml(self)
    }
}

/// With `[aziot]`, what stands for the credential: both sockets exist (they are not
/// opened: `check-config` runs as another user, often outside the unit's groups). The
/// problem is the one `run` would meet connecting.
fn aziot_sockets(aziot: &AziotClient) -> Result<(), ConfigErrors> {
    use crate::aziot::{AziotError, Service};
    let mut errors = ConfigErrors::new();
    for (key, service, socket) in [
        (
            "aziot.identityd_socket",
            Service::Identityd,
            aziot.identityd_socket(),
        ),
        ("aziot.keyd_socket", Service::Keyd, aziot.keyd_socket()),
    ] {
        if matches!(socket.try_exists(), Ok(false)) {
            let socket = socket.to_path_buf();
            errors.push(
                key,
                None,
                AziotError::SocketMissing { service, socket }.to_string(),
            );
        }
    }
    errors.into_result(())
}

/// The problem of a provisioning secret that is not configured.
fn missing(method: ProvisioningMethod) -> ConfigErrors {
    let (key, message) = credentials::missing_secret(method);
    ConfigErrors::single(key, None, message)
}
