//! Provisioning (DESIGN §1, §5): create the device (409 → get the existing one) and the
//! module (409 → get), exactly as the tutorial's CreateModule.py, then store the module
//! connection string as `<state.dir>/module.connstr` (mode 0600, atomic write).
//!
//! Idempotent: a second run finds both identities and writes the same file; a run
//! interrupted between device and module is completed by the next one. The module key
//! is written to the file and nowhere else: never printed, never logged.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cli::exit;
use crate::config::Settings;
use crate::hub::tls::CaBundle;
use crate::identity::{ModuleCredentials, ServiceCredentials, SharedKey};
use crate::registry::{RegistryClient, RegistryError};
use crate::twin_cli::{client_for, Failure};

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

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the hub's module {0} has no primary symmetric key (not a SAS identity?)")]
    NoKey(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl ProvisionError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ProvisionError::Registry(e) => crate::twin_cli::registry_exit_code(e),
            ProvisionError::NoKey(_) => exit::DATA,
            ProvisionError::Write { .. } => exit::CONFIG,
        }
    }

    /// Worth trying again later (hub throttling or unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProvisionError::Registry(e) if e.is_retryable())
    }
}

/// The module credential's HostName: the hub's host name without a port (service
/// connection strings for the emulator carry `localhost:PORT`).
pub fn hub_host_name(service: &ServiceCredentials) -> &str {
    let host = service.host_name.as_str();
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
    let write_error = |source| ProvisionError::Write {
        path: credential_file.display().to_string(),
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

/// `edgetwin provision [--config PATH] [--ca-file PATH]`; returns the exit code
/// (messages printed). `ca_file` replaces the config's `hub.ca_file`.
pub async fn command(config: Option<&Path>, ca_file: Option<&Path>) -> u8 {
    match command_inner(config, ca_file).await {
        Ok(done) => {
            let how = |created| if created { "created" } else { "existing" };
            println!("device: {} ({})", done.device_id, how(done.device_created));
            println!("module: {} ({})", done.module_id, how(done.module_created));
            println!(
                "module connection string written to {}",
                done.credential_file.display()
            );
            exit::OK
        }
        Err(f) => {
            eprintln!("edgetwin provision: {}", f.message);
            f.code
        }
    }
}

async fn command_inner(
    config: Option<&Path>,
    ca_file: Option<&Path>,
) -> Result<Provisioned, Failure> {
    let settings = Settings::load(config).map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?;
    Plan::from_settings(&settings, ca_file)?
        .run()
        .await
        .map_err(|e| Failure::new(e.exit_code(), e.to_string()))
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
    /// `ca_file` overrides `hub.ca_file`. Failures are configuration problems (78).
    pub fn from_settings(settings: &Settings, ca_file: Option<&Path>) -> Result<Plan, Failure> {
        let p = &settings.provisioning;
        if p.device_id.is_empty() || p.module_id.is_empty() {
            return Err(Failure::new(
                exit::CONFIG,
                "provisioning.device_id and provisioning.module_id must be set (device_id \
                 defaults to the hostname)",
            ));
        }
        let connstr = settings
            .service_credentials()
            .map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?
            .ok_or_else(|| {
                Failure::new(
                    exit::CONFIG,
                    "no service connection string: set \
                     provisioning.service_connection_string_file (or the systemd credential \
                     service-connection-string)",
                )
            })?;
        let service: ServiceCredentials = connstr
            .parse()
            .map_err(|e| Failure::new(exit::CONFIG, format!("service connection string: {e}")))?;
        let configured_ca = settings.hub.ca_file.as_ref().map(CaBundle::path);
        let client = client_for(&connstr, ca_file.or(configured_ca))?;
        Ok(Plan {
            client,
            host_name: hub_host_name(&service).to_owned(),
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
        let creds = |host: &str| -> ServiceCredentials {
            format!("HostName={host};SharedAccessKeyName=p;SharedAccessKey=AAAA")
                .parse()
                .unwrap()
        };
        assert_eq!(hub_host_name(&creds("localhost:8443")), "localhost");
        assert_eq!(
            hub_host_name(&creds("hub.azure-devices.net")),
            "hub.azure-devices.net"
        );
    }
}
