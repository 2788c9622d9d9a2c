//! `edgetwin provision [--config PATH] [--ca-file PATH]` (DESIGN §1): obtains the module
//! identity through [`crate::provision`] with the configured `[provisioning] method`
//! (`dps`: registered with the Device Provisioning Service, then as `device`; `device`:
//! this device's own credential; `service`: a registry policy key) and
//! reports what it did. Prints identities and the credential file's path, never a key.
//!
//! With `[aziot]` there is nothing to provision (aziot-identityd does it): the command asks
//! identityd who edgetwin is and has keyd sign once, and says so, or exits 77/78/69 as
//! `run` would at start, naming the group or the principal file: the check to run (as the
//! edgetwin user) after installing them.

use super::{aziot_exit_code, config_path, exit, Failure, ProvisionArgs};
use crate::aziot::AziotClient;
use crate::config::{ProvisioningMethod, Settings};
use crate::provision::{Plan, Provisioned};

/// Runs the command; returns the exit code (messages already printed).
pub async fn run(args: ProvisionArgs) -> u8 {
    let config = config_path(args.config);
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgetwin provision: {e}");
            return exit::CONFIG;
        }
    };
    // Never a secret in them: keys and files only.
    for warning in &settings.warnings {
        eprintln!("edgetwin provision: warning: {warning}");
    }
    if let Some(client) = &settings.aziot {
        return aziot(client).await;
    }
    match provision(&settings, args.ca_file.as_deref()).await {
        Ok(done) => {
            let how = |created| if created { "created" } else { "existing" };
            match done.method {
                ProvisioningMethod::Device | ProvisioningMethod::Dps => {
                    let whose = if done.method == ProvisioningMethod::Dps {
                        "assigned by DPS"
                    } else {
                        "its own credential"
                    };
                    println!("device: {} ({whose})", done.device_id);
                    let keys = if done.keys_set {
                        "keys derived from the device key and set"
                    } else {
                        "keys derived from the device key, already set"
                    };
                    let module = how(done.module_created);
                    println!("module: {} ({module}; {keys})", done.module_id);
                }
                _ => {
                    println!("device: {} ({})", done.device_id, how(done.device_created));
                    println!("module: {} ({})", done.module_id, how(done.module_created));
                }
            }
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

/// `ca_file` replaces the config's `hub.ca_file`.
async fn provision(
    settings: &Settings,
    ca_file: Option<&std::path::Path>,
) -> Result<Provisioned, Failure> {
    Ok(Plan::from_settings(settings, ca_file)?.run().await?)
}

/// `[aziot]`: the identity aziot-identityd gives this user, or why none.
async fn aziot(client: &AziotClient) -> u8 {
    // keyd too: the token edgetwin will need is signed once (and thrown away).
    let checked = match client.identity().await {
        Ok(found) => client
            .sign(&found.key_handle, b"edgetwin provision")
            .await
            .map(|_| found),
        Err(e) => Err(e),
    };
    match checked {
        Ok(found) => {
            let id = &found.identity;
            println!("hub: {}", id.host_name);
            if let Some(gateway) = &id.gateway_host_name {
                println!("gateway: {gateway}");
            }
            println!("device: {}", id.device_id);
            let generation = found.gen_id.as_deref().unwrap_or("unknown");
            println!("module: {} (generation {generation})", id.module_id);
            println!("from aziot-identityd; nothing to provision: the key stays in aziot-keyd");
            exit::OK
        }
        Err(e) => {
            eprintln!("edgetwin provision: {e}");
            aziot_exit_code(&e)
        }
    }
}
