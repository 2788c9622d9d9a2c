//! The service side's connection to the hub, shared by `twin` and `fleet` (DESIGN §1):
//! the service connection string from `--hub-connection-string`, the environment
//! variable `EDGETWIN_SERVICE_CONNECTION_STRING` (both through clap), or the config's
//! `[provisioning]` credentials; extra trust anchors from `--ca-file` or `hub.ca_file`.
//! Never prints or returns the key.

use std::path::Path;

use super::{exit, Failure, HubArgs};
use crate::config::Settings;
use crate::registry::RegistryClient;

/// A registry client for the hub, and the configuration it was found in (if one was read).
#[derive(Debug)]
pub struct Service {
    pub client: RegistryClient,
    pub settings: Option<Settings>,
}

/// Resolves the credential and the CA, and builds the client.
pub fn connect(args: &HubArgs) -> Result<Service, Failure> {
    // The config is needed when a flag is missing; an explicit --config must load.
    let settings = match (&args.config, &args.hub_connection_string, &args.ca_file) {
        (Some(path), _, _) => Some(load_settings(Some(path))?),
        (None, Some(_), Some(_)) => None,
        (None, Some(_), None) => Settings::load(None).ok(),
        (None, None, _) => Some(load_settings(None)?),
    };
    let connstr = match &args.hub_connection_string {
        Some(text) => text.trim().to_owned(),
        None => settings
            .as_ref()
            .map(Settings::service_credentials)
            .transpose()
            .map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?
            .flatten()
            .ok_or_else(|| {
                Failure::new(
                    exit::CONFIG,
                    "no service connection string: give --hub-connection-string, set \
                     EDGETWIN_SERVICE_CONNECTION_STRING, or configure \
                     provisioning.service_connection_string_file",
                )
            })?,
    };
    let ca_file = args.ca_file.clone().or_else(|| {
        settings
            .as_ref()?
            .hub
            .ca_file
            .as_ref()
            .map(|ca| ca.path().to_owned())
    });
    let client = RegistryClient::from_connection_string(&connstr, ca_file.as_deref())?;
    Ok(Service { client, settings })
}

fn load_settings(path: Option<&Path>) -> Result<Settings, Failure> {
    Settings::load(path).map_err(|e| Failure::new(exit::CONFIG, e.to_string()))
}
