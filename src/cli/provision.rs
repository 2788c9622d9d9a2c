//! `edgetwin provision [--config PATH] [--ca-file PATH]` (DESIGN §1): obtains the module
//! identity through [`crate::provision`] with the configured `[provisioning] method`
//! (`dps`: registered with the Device Provisioning Service, then as `device`; `device`:
//! this device's own credential; `service`: a registry policy key) and
//! reports what it did. Prints identities and the credential file's path, never a key.

use super::{config_path, exit, Failure, ProvisionArgs};
use crate::config::{ProvisioningMethod, Settings};
use crate::provision::{Plan, Provisioned};

/// Runs the command; returns the exit code (messages already printed).
pub async fn run(args: ProvisionArgs) -> u8 {
    let config = config_path(args.config);
    match provision(config.as_deref(), args.ca_file.as_deref()).await {
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
    config: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> Result<Provisioned, Failure> {
    let settings = Settings::load(config).map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?;
    // Never a secret in them: keys and files only.
    for warning in &settings.warnings {
        eprintln!("edgetwin provision: warning: {warning}");
    }
    Ok(Plan::from_settings(&settings, ca_file)?.run().await?)
}
