//! `method = "device"`: with this device's own connection string, and nothing more
//! privileged, get the module (404 → create it), derive its keys from the device key and
//! the module's `generationId`, put them into the hub with `If-Match: *`, and write the
//! module credential (PROTOCOL §11, as the Azure IoT Identity Service does).
//!
//! Nothing module-specific needs keeping: the keys are reproducible from the device key,
//! so a run interrupted anywhere (module created but not keyed, keyed but the file not
//! written) is completed by the next, and a module re-created in the hub (a new
//! `generationId`) gets new keys. A 401 names the devices, never a key.

use serde_json::Value;

use super::{Plan, ProvisionError, Provisioned};
use crate::identity::{DeviceCredentials, SharedKey};
use crate::registry::{RegistryClient, RegistryError};

/// How often a module that is re-created under our feet (its `generationId` changing
/// between reading it and keying it) is tried again before giving up.
const ATTEMPTS: usize = 3;

/// The module's primary and secondary keys for `generation_id` (PROTOCOL §11.3).
pub fn module_keys(
    device_key: &SharedKey,
    module_id: &str,
    generation_id: &str,
) -> (SharedKey, SharedKey) {
    (
        device_key.derive(&format!("{module_id}:{generation_id}:primary")),
        device_key.derive(&format!("{module_id}:{generation_id}:secondary")),
    )
}

pub(super) async fn provision(
    plan: &Plan,
    client: &RegistryClient,
    device: &DeviceCredentials,
) -> Result<Provisioned, ProvisionError> {
    let (device_id, module_id) = (&plan.device_id, &plan.module_id);
    let refused = |e: RegistryError| match e {
        RegistryError::Unauthorized(_) => ProvisionError::DeviceRefused {
            device: device.device_id.clone(),
            target: device_id.clone(),
            source: e,
        },
        other => ProvisionError::Registry(other),
    };
    let name = format!("{device_id}/{module_id}");
    for _ in 0..ATTEMPTS {
        let (module, module_created) = match client.get_module(device_id, module_id).await {
            Ok(m) => (m, false),
            Err(RegistryError::NotFound(_)) => {
                match client.create_module(device_id, module_id).await {
                    Ok(m) => (m, true),
                    // Created by someone else since the GET: take theirs.
                    Err(RegistryError::Conflict(_)) => (
                        client
                            .get_module(device_id, module_id)
                            .await
                            .map_err(refused)?,
                        false,
                    ),
                    Err(e) => return Err(refused(e)),
                }
            }
            Err(e) => return Err(refused(e)),
        };
        let generation = generation_id(&module)
            .ok_or_else(|| ProvisionError::NoGenerationId(name.clone()))?
            .to_owned();
        let (primary, secondary) = module_keys(&device.key, module_id, &generation);
        let keys_set = if has_keys(&module, &primary, &secondary) {
            false
        } else {
            let keyed = client
                .set_module_keys(device_id, module_id, &primary, &secondary)
                .await
                .map_err(refused)?;
            // Deleted and re-created meanwhile: these keys belong to the old one.
            if generation_id(&keyed) != Some(generation.as_str()) {
                continue;
            }
            true
        };
        plan.write(primary, Some(device))?;
        tracing::debug!(
            device = %device_id,
            module = %module_id,
            generation = %generation,
            module_created,
            keys_set,
            "module identity provisioned with the device credential"
        );
        return Ok(Provisioned {
            method: plan.method,
            device_id: device_id.clone(),
            module_id: module_id.clone(),
            credential_file: plan.credential_file.clone(),
            device_created: false,
            module_created,
            keys_set,
        });
    }
    Err(ProvisionError::Registry(RegistryError::Conflict(format!(
        "module {name} was re-created {ATTEMPTS} times while its keys were being set"
    ))))
}

fn generation_id(module: &Value) -> Option<&str> {
    module
        .get("generationId")
        .and_then(Value::as_str)
        .filter(|g| !g.is_empty())
}

/// Whether the hub's module already carries exactly these keys.
fn has_keys(module: &Value, primary: &SharedKey, secondary: &SharedKey) -> bool {
    let key = |which: &str| {
        module
            .pointer(&format!("/authentication/symmetricKey/{which}"))
            .and_then(Value::as_str)
    };
    key("primaryKey") == Some(primary.as_base64())
        && key("secondaryKey") == Some(secondary.as_base64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_those_of_the_identity_service_derivation() {
        let device =
            SharedKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let (primary, secondary) = module_keys(&device, "edgetwin", "636904759703045768");
        assert_eq!(
            primary.as_base64(),
            "44kLs5Qu0WbkbNfya4cIRzxkdhDHXShRS6Mrw589lbs="
        );
        assert_eq!(
            secondary.as_base64(),
            "ZO0I2P9zzm2tsVRAxLKGO+GqbxRzfA7YlI5W+//97c8="
        );
        let module = json!({"generationId": "636904759703045768", "authentication": {
            "symmetricKey": {"primaryKey": primary.as_base64(), "secondaryKey": secondary.as_base64()}}});
        assert!(has_keys(&module, &primary, &secondary));
        assert!(!has_keys(&module, &secondary, &primary));
        assert_eq!(generation_id(&module), Some("636904759703045768"));
        assert_eq!(generation_id(&json!({"generationId": ""})), None);
    }
}
