//! Provisioning (DESIGN §1, §5): create the device (409 → get the existing one) and the
//! module (409 → get), exactly as the tutorial's CreateModule.py, then store the module
//! connection string as `<state.dir>/module.connstr` (mode 0600, atomic write).
//!
//! Idempotent: a second run finds both identities and writes the same file; a run
//! interrupted between device and module is completed by the next one. The module key
//! is written to the file and nowhere else: never printed, never logged.
//!
//! Library code: it returns a typed [`ProvisionError`] and never prints. Its callers are
//! `edgetwin provision` (`cli::provision`, which prints and picks the exit code) and the
//! daemon's first boot (`app`, which retries what [`ProvisionError::is_retryable`]).
//! Identity sources beyond the service key (device key, DPS) will live beside this file.

pub mod dps;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::Settings;
use crate::hub::tls::CaBundle;
use crate::identity::{ModuleCredentials, SharedKey};
use crate::registry::{ClientSetupError, RegistryClient, RegistryError};

/// What provisioning produced (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub device_id: String,
    pub module_id: String,
    /// Where the module connection string was written.
    pub credential_file: PathBuf,
    /// Whether the device / module were created by this run (else they existed).
    pub device_created: bool,
    pub module_created: bool,
}

/// Why provisioning did not happen. Callers branch on the variant (the CLI picks its exit
/// code from it) and on [`ProvisionError::is_retryable`] (first boot retries those).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The configuration does not allow provisioning: ids unset, service credential
    /// missing, unreadable or malformed, CA file unusable.
    #[error("{what}")]
    Config { what: String },
    /// The hub refused or failed a registry request.
    #[error("{0}{hint}", hint = registry_hint(.0))]
    Registry(#[from] RegistryError),
    /// The hub's module has no SAS key to put into the credential.
    #[error("the hub's module {0} has no primary symmetric key (not a SAS identity?)")]
    NoKey(String),
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
        matches!(self, ProvisionError::Registry(e) if e.is_retryable())
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

/// The module credential's HostName: the hub's host name without a port (service
/// connection strings for the emulator carry `localhost:PORT`).
pub fn hub_host_name(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Creates or fetches `device_id` and `module_id` and writes the module connection
/// string to `credential_file` (0600, atomically; its directory is created).
pub async fn provision(
    client: &RegistryClient,
    host_name: &str,
    device_id: &str,
    module_id: &str,
    credential_file: &Path,
) -> Result<Provisioned, ProvisionError> {
    let device_created = match client.create_device(device_id).await {
        Ok(_) => true,
        Err(RegistryError::Conflict(_)) => {
            client.get_device(device_id).await?;
            false
        }
        Err(e) => return Err(e.into()),
    };
    let (module, module_created) = match client.create_module(device_id, module_id).await {
        Ok(m) => (m, true),
        Err(RegistryError::Conflict(_)) => (client.get_module(device_id, module_id).await?, false),
        Err(e) => return Err(e.into()),
    };
    let key = module
        .pointer("/authentication/symmetricKey/primaryKey")
        .and_then(Value::as_str)
        .and_then(|k| SharedKey::from_base64(k).ok())
        .ok_or_else(|| ProvisionError::NoKey(format!("{device_id}/{module_id}")))?;
    let credentials = ModuleCredentials {
        host_name: host_name.to_owned(),
        device_id: device_id.to_owned(),
        module_id: module_id.to_owned(),
        key,
        gateway_host_name: None,
    };
    let write_error = |source| ProvisionError::StateDir {
        path: credential_file.to_owned(),
        source,
    };
    if let Some(dir) = credential_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(write_error)?;
    }
    let mut text = credentials.to_connection_string();
    text.push('\n');
    crate::store::write_atomic(credential_file, text.as_bytes(), 0o600).map_err(write_error)?;
    tracing::debug!(
        device = device_id,
        module = module_id,
        device_created,
        module_created,
        "module identity provisioned"
    );
    Ok(Provisioned {
        device_id: device_id.to_owned(),
        module_id: module_id.to_owned(),
        credential_file: credential_file.to_owned(),
        device_created,
        module_created,
    })
}

/// Everything provisioning needs, taken from the configuration: the registry client
/// (service credential read once, here), the identities and where the credential goes.
#[derive(Debug)]
pub struct Plan {
    pub client: RegistryClient,
    /// HostName of the module credential (the hub's, without a port).
    pub host_name: String,
    pub device_id: String,
    pub module_id: String,
    pub credential_file: PathBuf,
}

impl Plan {
    /// `ca_file` overrides `hub.ca_file`. Every failure here is a
    /// [`ProvisionError::Config`] (or, rarely, the HTTP client not building).
    pub fn from_settings(
        settings: &Settings,
        ca_file: Option<&Path>,
    ) -> Result<Plan, ProvisionError> {
        let p = &settings.provisioning;
        if p.device_id.is_empty() || p.module_id.is_empty() {
            return Err(ProvisionError::config(
                "provisioning.device_id and provisioning.module_id must be set (device_id \
                 defaults to the hostname)",
            ));
        }
        let connstr = settings
            .service_credentials()
            .map_err(|e| ProvisionError::config(e.to_string()))?
            .ok_or_else(|| {
                ProvisionError::config(
                    "no service connection string: set \
                     provisioning.service_connection_string_file (or the systemd credential \
                     service-connection-string)",
                )
            })?;
        let configured_ca = settings.hub.ca_file.as_ref().map(CaBundle::path);
        let client = RegistryClient::from_connection_string(&connstr, ca_file.or(configured_ca))?;
        Ok(Plan {
            host_name: hub_host_name(client.host_name()).to_owned(),
            client,
            device_id: p.device_id.clone(),
            module_id: p.module_id.clone(),
            credential_file: settings.state.provisioned_credentials_file(),
        })
    }

    /// [`provision`] with this plan.
    pub async fn run(&self) -> Result<Provisioned, ProvisionError> {
        provision(
            &self.client,
            &self.host_name,
            &self.device_id,
            &self.module_id,
            &self.credential_file,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_loses_only_a_port() {
        assert_eq!(hub_host_name("localhost:8443"), "localhost");
        assert_eq!(
            hub_host_name("hub.azure-devices.net"),
            "hub.azure-devices.net"
        );
        assert_eq!(hub_host_name("[::1]:8443"), "[::1]");
    }

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
}
