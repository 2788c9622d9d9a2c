//! `method = "service"`: with a registry policy key, create the device (409 → get the
//! existing one) and the module (409 → get), exactly as the tutorial's CreateModule.py,
//! and keep the module key the hub generated. A run interrupted between device and
//! module is completed by the next. The least preferred method: the policy key can
//! create, change and delete every device of the hub (README "Provisioning").

use serde_json::Value;

use super::{Plan, ProvisionError, Provisioned};
use crate::identity::SharedKey;
use crate::registry::{RegistryClient, RegistryError};

pub(super) async fn provision(
    plan: &Plan,
    client: &RegistryClient,
) -> Result<Provisioned, ProvisionError> {
    let (device_id, module_id) = (&plan.device_id, &plan.module_id);
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
    plan.write(key, None)?;
    tracing::debug!(
        device = %device_id,
        module = %module_id,
        device_created,
        module_created,
        "module identity provisioned with a service policy"
    );
    Ok(Provisioned {
        method: plan.method,
        device_id: device_id.clone(),
        module_id: module_id.clone(),
        credential_file: plan.credential_file.clone(),
        device_created,
        module_created,
        keys_set: false,
    })
}
