//! Provisioning (DESIGN §1, §4, §5): obtain this gateway's module identity with the
//! method the configuration chooses and store its connection string as
//! `<state.dir>/module.connstr` (mode 0600, atomic write), the one place the module key
//! is kept: never printed, never logged. Every method is idempotent, and a run that was
//! interrupted anywhere is completed by the next one.
//!
//! - `device`: this device's own connection string; a device-scoped token may create
//!   and key the device's own modules and nothing else (PROTOCOL §11).
//! - `service`: a registryReadWrite policy key creates the device and the module, as the
//!   tutorial's CreateModule.py does; least preferred (the key can touch every device).
//! - `dps`: the Device Provisioning Service assigns the hub and the device (once: the
//!   assignment is kept in `provisioning.json`), then as `device` (`register`).
//!
//! Library code: it returns a typed [`ProvisionError`] and never prints. Its callers are
//! `edgetwin provision` (`cli::provision`, which prints and picks the exit code) and the
//! daemon's first boot (`app`, which retries what [`ProvisionError::is_retryable`]).

mod device;
mod register;
mod service;

pub mod dps;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{ProvisioningMethod, Settings};
use crate::hub::tls::CaBundle;
use crate::identity::{DeviceCredentials, ModuleCredentials};
use crate::registry::{ClientSetupError, RegistryAuth, RegistryClient, RegistryError, RetryPolicy};
use dps::DpsError;

pub use crate::registry::hub_host_name;
pub use device::module_keys;

/// The registry retries of provisioning: as the default, but a 429's `Retry-After` of up
/// to 30 s is waited out in full (first boot has time; the hub asked for it).
pub const RETRY: RetryPolicy = RetryPolicy {
    attempts: 4,
    first_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(30),
    total: Duration::from_secs(60),
};

/// What provisioning produced (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub method: ProvisioningMethod,
    pub device_id: String,
    pub module_id: String,
    /// Where the module connection string was written.
    pub credential_file: PathBuf,
    /// Whether the device was created by this run (`service` only; a device credential
    /// implies the device exists).
    pub device_created: bool,
    /// Whether the module was created by this run (else it existed).
    pub module_created: bool,
    /// `device`: whether this run put the derived keys into the hub (else they were
    /// there already).
    pub keys_set: bool,
}

/// Why provisioning did not happen. Callers branch on the variant (the CLI picks its exit
/// code from it) and on [`ProvisionError::is_retryable`] (first boot retries those).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The configuration does not allow provisioning: no method, ids unset, the secret
    /// missing, unreadable or of the wrong kind, CA file unusable.
    #[error("{what}")]
    Config { what: String },
    /// The hub refused or failed a registry request.
    #[error("{0}{hint}", hint = registry_hint(.0))]
    Registry(#[from] RegistryError),
    /// The hub refused a device's credential (401): a wrong or rotated device key, a
    /// disabled or deleted device, or another device's modules. Names the devices only.
    #[error("{}", device_refusal(.device, .target, .source))]
    DeviceRefused {
        /// The device whose connection string signed the request.
        device: String,
        /// The device whose module was to be provisioned.
        target: String,
        source: RegistryError,
    },
    /// The hub's module has no SAS key to put into the credential.
    #[error("the hub's module {0} has no primary symmetric key (not a SAS identity?)")]
    NoKey(String),
    /// The hub's module has no `generationId` to derive its keys from.
    #[error("the hub's module {0} has no generationId to derive its keys from")]
    NoGenerationId(String),
    /// DPS did not assign this gateway (final: refused key, unknown scope, disabled,
    /// failed, unassigned) or could not be reached (see [`ProvisionError::is_retryable`]).
    #[error("{0}")]
    Dps(#[from] DpsError),
    /// The module credential could not be written under the state directory.
    #[error("writing {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ProvisionError {
    /// Worth trying again later (hub throttling or unreachable).
    pub fn is_retryable(&self) -> bool {
        match self {
            ProvisionError::Registry(e) => e.is_retryable(),
            ProvisionError::Dps(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// How long the service asked to be left alone, when it did (DPS throttling).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProvisionError::Dps(e) => e.retry_after(),
            _ => None,
        }
    }

    /// The hub refused the secret (401): wrong, rotated or revoked, or without the
    /// rights; or DPS decided against this registration (refused key, unknown scope,
    /// disabled enrollment, failed or unassigned). Fixed by someone changing the secret
    /// or the enrollment, not by asking again soon.
    pub fn is_refused(&self) -> bool {
        match self {
            ProvisionError::DeviceRefused { .. }
            | ProvisionError::Registry(RegistryError::Unauthorized(_)) => true,
            ProvisionError::Dps(e) => matches!(
                e,
                DpsError::Unauthorized { .. }
                    | DpsError::UnknownScope { .. }
                    | DpsError::Rejected { .. }
                    | DpsError::Disabled { .. }
                    | DpsError::Failed { .. }
                    | DpsError::Unassigned { .. }
            ),
            _ => false,
        }
    }

    fn config(what: impl Into<String>) -> Self {
        ProvisionError::Config { what: what.into() }
    }
}

impl From<ClientSetupError> for ProvisionError {
    fn from(e: ClientSetupError) -> Self {
        match e {
            ClientSetupError::Client(e) => ProvisionError::Registry(e),
            config => ProvisionError::config(config.to_string()),
        }
    }
}

/// What to do about a refusal: a policy without registry write rights is the usual cause.
fn registry_hint(e: &RegistryError) -> &'static str {
    match e {
        RegistryError::Unauthorized(_) => {
            "; provisioning needs a service policy with registry write rights (registryReadWrite)"
        }
        _ => "",
    }
}

fn device_refusal(device: &str, target: &str, source: &RegistryError) -> String {
    if device == target {
        format!(
            "the hub refused the credential of device {device} ({source}); check that the \
             device connection string is current (keys rotated?) and the device is enabled"
        )
    } else {
        format!(
            "the credential of device {device} may manage only that device's modules, not \
             device {target}'s ({source}); remove provisioning.device_id or make it {device}"
        )
    }
}

/// Everything provisioning needs, taken from the configuration: the registry client
/// (its secret read once, here), the identities and where the credential goes.
#[derive(Debug)]
pub struct Plan {
    pub method: ProvisioningMethod,
    /// HostName of the module credential (the hub's, without a port).
    pub host_name: String,
    pub device_id: String,
    pub module_id: String,
    pub credential_file: PathBuf,
    work: Work,
}

/// How a plan gets its registry client: at once, or after a DPS registration.
#[derive(Debug)]
enum Work {
    Registry(RegistryClient),
    Dps(register::Registration),
}

impl Plan {
    /// `ca_file` overrides `hub.ca_file`. Every failure here is a
    /// [`ProvisionError::Config`] (or a DPS request DPS would refuse, or, rarely, the HTTP
    /// client not building): no network is used; `dps` registers in [`Plan::run`].
    pub fn from_settings(
        settings: &Settings,
        ca_file: Option<&Path>,
    ) -> Result<Plan, ProvisionError> {
        let p = &settings.provisioning;
        let config = |e: crate::config::ConfigErrors| ProvisionError::config(e.to_string());
        match p.method {
            ProvisioningMethod::None => Err(ProvisionError::config(
                "no provisioning method: set provisioning.method to \"device\" (this \
                 device's connection string) or \"service\" (a registry policy key)",
            )),
            // Registration (network) waits for `run`; it hands over a device credential,
            // then as `device`, through [`Plan::for_device`].
            ProvisioningMethod::Dps => {
                let registration = register::Registration::from_settings(settings, ca_file)?;
                let module_id = settings.provisioning.module_id.clone();
                if module_id.is_empty() {
                    return Err(ProvisionError::config("provisioning.module_id must be set"));
                }
                let (host_name, device_id) = registration.expected();
                Ok(Plan {
                    method: p.method,
                    host_name,
                    device_id,
                    module_id,
                    credential_file: settings.state.provisioned_credentials_file(),
                    work: Work::Dps(registration),
                })
            }
            ProvisioningMethod::Service => {
                let device_id = p.device_id.clone().ok_or_else(|| {
                    ProvisionError::config(
                        "provisioning.device_id must be set (it defaults to the hostname)",
                    )
                })?;
                let credentials = settings.required_service_identity().map_err(config)?;
                let auth = RegistryAuth::Service(credentials);
                Plan::new(settings, p.method, auth, device_id, ca_file)
            }
            ProvisioningMethod::Device => {
                let credentials = settings.required_device_identity().map_err(config)?;
                Plan::for_device(settings, p.method, credentials, ca_file)
            }
        }
    }

    /// A plan that provisions the module with a device's own credential (`device`, and
    /// `dps` once registration assigned one). The device is `provisioning.device_id`
    /// when configured, else the credential's.
    pub fn for_device(
        settings: &Settings,
        method: ProvisioningMethod,
        credentials: DeviceCredentials,
        ca_file: Option<&Path>,
    ) -> Result<Plan, ProvisionError> {
        let device_id = settings
            .provisioning
            .device_id
            .clone()
            .unwrap_or_else(|| credentials.device_id.clone());
        let auth = RegistryAuth::Device(credentials);
        Plan::new(settings, method, auth, device_id, ca_file)
    }

    fn new(
        settings: &Settings,
        method: ProvisioningMethod,
        auth: RegistryAuth,
        device_id: String,
        ca_file: Option<&Path>,
    ) -> Result<Plan, ProvisionError> {
        let module_id = settings.provisioning.module_id.clone();
        if module_id.is_empty() {
            return Err(ProvisionError::config("provisioning.module_id must be set"));
        }
        let configured_ca = settings.hub.ca_file.as_ref().map(CaBundle::path);
        let mut client =
            RegistryClient::trusting(auth, ca_file.or(configured_ca))?.with_retry(RETRY);
        if let Some(endpoint) = &settings.provisioning.registry_endpoint {
            client = client.with_endpoint(&endpoint.to_string());
        }
        Ok(Plan {
            method,
            host_name: hub_host_name(client.host_name()).to_owned(),
            device_id,
            module_id,
            credential_file: settings.state.provisioned_credentials_file(),
            work: Work::Registry(client),
        })
    }

    /// Provisions with the plan's method and writes the module credential.
    pub async fn run(&self) -> Result<Provisioned, ProvisionError> {
        let client = match &self.work {
            Work::Registry(client) => client,
            Work::Dps(registration) => return registration.run().await,
        };
        match client.auth() {
            RegistryAuth::Service(_) => service::provision(self, client).await,
            RegistryAuth::Device(device) => device::provision(self, client, device).await,
        }
    }

    /// Writes `module.connstr` for the module whose primary key is `key` (0600,
    /// atomically; the directory is created). `device` carries a gateway to keep.
    fn write(
        &self,
        key: crate::identity::SharedKey,
        device: Option<&DeviceCredentials>,
    ) -> Result<(), ProvisionError> {
        let credentials = ModuleCredentials {
            host_name: self.host_name.clone(),
            device_id: self.device_id.clone(),
            module_id: self.module_id.clone(),
            key,
            gateway_host_name: device.and_then(|d| d.gateway_host_name.clone()),
        };
        let path = &self.credential_file;
        let write_error = |source| ProvisionError::StateDir {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        let mut text = credentials.to_connection_string();
        text.push('\n');
        crate::store::write_atomic(path, text.as_bytes(), 0o600).map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_provisioning_says_which_rights_are_needed() {
        let refused = ProvisionError::from(RegistryError::Unauthorized("401".into()));
        assert!(
            refused.to_string().contains("registryReadWrite"),
            "{refused}"
        );
        let throttled = ProvisionError::from(RegistryError::Throttled("429".into()));
        assert!(throttled.is_retryable());
        assert!(!throttled.to_string().contains("registryReadWrite"));
    }

    #[test]
    fn a_refused_device_names_the_devices_and_no_policy() {
        let refused = |target: &str| ProvisionError::DeviceRefused {
            device: "gw1".into(),
            target: target.into(),
            source: RegistryError::Unauthorized("401".into()),
        };
        let own = refused("gw1").to_string();
        assert!(
            own.contains("device gw1") && own.contains("keys rotated"),
            "{own}"
        );
        assert!(!own.contains("registryReadWrite"), "{own}");
        let other = refused("gw2").to_string();
        assert!(other.contains("device gw2's"), "{other}");
        assert!(!refused("gw1").is_retryable());
    }
}
