//! What a back-end service can do to the hub over REST (PROTOCOL §2.6, §5.2, §6): authorise
//! with a shared access policy, manage devices and modules, read and write module twins,
//! and invoke direct methods. The REST front end maps HTTP onto these calls; everything
//! here answers with JSON documents shaped like the real hub's, or a [`HubError`].

use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::errors::HubError;
use super::hub::{
    generation_id, hub_unix_now, identity_etag, if_match_allows, now_ts, sas_keys, valid_id, Hub,
    ModuleKey, PendingMethod, Right, SimEvent, State,
};
use super::persist::{DeviceRecord, ModuleRecord};
use super::twin_doc::{check_patch, ModuleTwin};
use edgetwin::identity::{SasError, SasToken, SharedKey};

/// Modules per device, as documented for IoT Hub.
pub const MAX_MODULES_PER_DEVICE: usize = 20;
/// Default and bounds of a method's response timeout (seconds).
pub const METHOD_TIMEOUT_DEFAULT: u64 = 30;
pub const METHOD_TIMEOUT_MAX: u64 = 300;
/// Method payloads are limited to 128 KB each way.
pub const METHOD_PAYLOAD_MAX: usize = 128 * 1024;

/// Which half of a twin document a REST write replaces or merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinWrite {
    Patch,
    Replace,
}

impl Hub {
    /// Checks an `Authorization: SharedAccessSignature ...` header against the policies and
    /// the right the operation needs. Clock trouble is named, as users cannot see it
    /// otherwise.
    pub fn authorize(&self, authorization: Option<&str>, needs: Right) -> Result<(), HubError> {
        let header =
            authorization.ok_or_else(|| HubError::unauthorized("missing Authorization header"))?;
        let token = SasToken::parse(header.trim())
            .map_err(|e| HubError::unauthorized(format!("malformed SharedAccessSignature: {e}")))?;
        let Some(policy_name) = token.key_name.clone() else {
            // A device-scoped token reaches here for anything but its own modules.
            return Err(HubError::unauthorized(match self.token_device(&token) {
                Some(device) => format!(
                    "a token of device '{device}' may manage only that device's modules \
                     (/devices/{device}/modules)"
                ),
                None => "service tokens must name a policy (skn)".to_owned(),
            }));
        };
        let scope_ok = token.resource.eq_ignore_ascii_case(self.hub_name())
            || super::hub::lock(&self.inner.rest_authority)
                .as_deref()
                .is_some_and(|a| token.resource.eq_ignore_ascii_case(a));
        if !scope_ok {
            return Err(HubError::unauthorized(format!(
                "token audience '{}' is not this hub",
                token.resource
            )));
        }
        let st = self.state();
        let policy = st.data.policies.get(&policy_name).ok_or_else(|| {
            HubError::unauthorized(format!("no shared access policy named '{policy_name}'"))
        })?;
        let now = hub_unix_now(st.faults.clock_offset_secs);
        let mut outcome = Err(SasError::BadSignature);
        for key in [&policy.primary_key, &policy.secondary_key] {
            if let Ok(key) = SharedKey::from_base64(key) {
                outcome = token.verify(&key, now);
                if outcome.is_ok() || matches!(outcome, Err(SasError::Expired { .. })) {
                    break;
                }
            }
        }
        match outcome {
            Ok(()) => {}
            Err(SasError::Expired { expired_for_secs }) => {
                return Err(HubError::new(
                    401,
                    401003,
                    "IotHubUnauthorized",
                    format!("token expired {expired_for_secs} s ago; check the client's clock against this response's Date"),
                ))
            }
            Err(_) => return Err(HubError::unauthorized("signature does not match the policy key")),
        }
        if !policy.rights.contains(&needs) {
            return Err(HubError::unauthorized(format!(
                "policy '{policy_name}' does not grant {needs:?}"
            )));
        }
        Ok(())
    }

    // ---- devices -------------------------------------------------------------------

    /// `PUT /devices/{id}`: create (409 if it exists and no If-Match), or update with If-Match.
    pub fn put_device(
        &self,
        device_id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, HubError> {
        if !valid_id(device_id) {
            return Err(HubError::argument_invalid(format!(
                "'{device_id}' is not a valid device id"
            )));
        }
        if body
            .get("deviceId")
            .and_then(Value::as_str)
            .is_some_and(|id| id != device_id)
        {
            return Err(HubError::argument_invalid(
                "deviceId in the body differs from the path",
            ));
        }
        let (primary_key, secondary_key) = sas_keys(body)?;
        let enabled = match body.get("status").and_then(Value::as_str) {
            None | Some("enabled") => true,
            Some("disabled") => false,
            Some(other) => {
                return Err(HubError::argument_invalid(format!(
                    "unknown device status '{other}'"
                )))
            }
        };
        let iot_edge = body["capabilities"]["iotEdge"].as_bool().unwrap_or(false);
        let mut st = self.state();
        let now = now_ts();
        match st.data.devices.get_mut(device_id) {
            Some(_) if if_match.is_none() => {
                return Err(HubError::device_already_exists(device_id))
            }
            Some(d) => {
                if !if_match_allows(if_match, &identity_etag(d.etag_seq)) {
                    return Err(HubError::precondition_failed("device etag does not match"));
                }
                d.etag_seq += 1;
                d.primary_key = primary_key;
                d.secondary_key = secondary_key;
                if d.enabled != enabled {
                    d.status_updated = now;
                }
                d.enabled = enabled;
                d.status_reason = body
                    .get("statusReason")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                d.iot_edge = iot_edge;
            }
            None => {
                st.data.devices.insert(
                    device_id.to_string(),
                    DeviceRecord {
                        generation_id: generation_id(),
                        etag_seq: 1,
                        enabled,
                        status_reason: body
                            .get("statusReason")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        status_updated: now,
                        primary_key,
                        secondary_key,
                        iot_edge,
                        modules: Default::default(),
                    },
                );
            }
        }
        let closed = if enabled {
            Vec::new()
        } else {
            close_device_connections(&mut st, device_id)
        };
        let doc = device_doc(&st, device_id);
        let pending = self.snapshot(&st);
        drop(st);
        self.announce_disconnects(closed);
        self.commit(pending)?;
        Ok(doc)
    }

    pub fn get_device(&self, device_id: &str) -> Result<Value, HubError> {
        let st = self.state();
        if !st.data.devices.contains_key(device_id) {
            return Err(HubError::device_not_found(device_id));
        }
        Ok(device_doc(&st, device_id))
    }

    pub fn delete_device(&self, device_id: &str, if_match: Option<&str>) -> Result<(), HubError> {
        let mut st = self.state();
        let d = st
            .data
            .devices
            .get(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id))?;
        if !if_match_allows(if_match, &identity_etag(d.etag_seq)) {
            return Err(HubError::precondition_failed("device etag does not match"));
        }
        let closed = close_device_connections(&mut st, device_id);
        st.data.devices.remove(device_id);
        let prefix = format!("{device_id}/");
        st.data
            .sessions
            .retain(|client, _| !client.starts_with(&prefix));
        let pending = self.snapshot(&st);
        drop(st);
        self.announce_disconnects(closed);
        self.commit(pending)
    }

    // ---- modules -------------------------------------------------------------------

    /// `PUT /devices/{d}/modules/{m}`: create (409 if it exists and no If-Match) or update.
    pub fn put_module(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, HubError> {
        if !valid_id(module_id) {
            return Err(HubError::argument_invalid(format!(
                "'{module_id}' is not a valid module id"
            )));
        }
        for (field, expected) in [("deviceId", device_id), ("moduleId", module_id)] {
            if body
                .get(field)
                .and_then(Value::as_str)
                .is_some_and(|v| v != expected)
            {
                return Err(HubError::argument_invalid(format!(
                    "{field} in the body differs from the path"
                )));
            }
        }
        let (primary_key, secondary_key) = sas_keys(body)?;
        let managed_by = body
            .get("managedBy")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let mut st = self.state();
        let device = st
            .data
            .devices
            .get_mut(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id))?;
        let count = device.modules.len();
        match device.modules.get_mut(module_id) {
            Some(_) if if_match.is_none() => {
                return Err(HubError::module_already_exists(device_id, module_id))
            }
            Some(m) => {
                if !if_match_allows(if_match, &identity_etag(m.etag_seq)) {
                    return Err(HubError::precondition_failed("module etag does not match"));
                }
                m.etag_seq += 1;
                m.primary_key = primary_key;
                m.secondary_key = secondary_key;
                m.managed_by = managed_by;
            }
            None if count >= MAX_MODULES_PER_DEVICE => {
                return Err(HubError::new(
                    413,
                    413003,
                    "TooManyModulesOnDevice",
                    format!("device {device_id} already has {MAX_MODULES_PER_DEVICE} modules"),
                ))
            }
            None => {
                let now = now_ts();
                device.modules.insert(
                    module_id.to_string(),
                    ModuleRecord {
                        generation_id: generation_id(),
                        etag_seq: 1,
                        managed_by,
                        primary_key,
                        secondary_key,
                        twin: ModuleTwin::new(&now),
                        last_activity: "0001-01-01T00:00:00Z".into(),
                    },
                );
            }
        }
        let doc = module_doc(&st, device_id, module_id);
        let pending = self.snapshot(&st);
        drop(st);
        self.commit(pending)?;
        Ok(doc)
    }

    pub fn get_module(&self, device_id: &str, module_id: &str) -> Result<Value, HubError> {
        let st = self.state();
        find_module(&st, device_id, module_id)?;
        Ok(module_doc(&st, device_id, module_id))
    }

    pub fn list_modules(&self, device_id: &str) -> Result<Value, HubError> {
        let st = self.state();
        let d = st
            .data
            .devices
            .get(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id))?;
        Ok(Value::Array(
            d.modules
                .keys()
                .map(|m| module_doc(&st, device_id, m))
                .collect(),
        ))
    }

    pub fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: Option<&str>,
    ) -> Result<(), HubError> {
        let mut st = self.state();
        let m = find_module(&st, device_id, module_id)?;
        if !if_match_allows(if_match, &identity_etag(m.etag_seq)) {
            return Err(HubError::precondition_failed("module etag does not match"));
        }
        let key = ModuleKey {
            device_id: device_id.into(),
            module_id: module_id.into(),
        };
        let mut closed = Vec::new();
        if let Some(c) = st.connections.remove(&key) {
            let _ = c.tx.try_send(super::hub::Outbound::Close {
                reason: "module identity deleted",
            });
            closed.push(key.clone());
        }
        st.data.sessions.remove(&key.to_string());
        if let Some(d) = st.data.devices.get_mut(device_id) {
            d.modules.remove(module_id);
        }
        let pending = self.snapshot(&st);
        drop(st);
        self.announce_disconnects(closed);
        self.commit(pending)
    }

    // ---- module twins --------------------------------------------------------------

    pub fn get_module_twin(&self, device_id: &str, module_id: &str) -> Result<Value, HubError> {
        let st = self.state();
        twin_doc(&st, device_id, module_id)
    }

    /// `PATCH` (merge) or `PUT` (replace) of a module twin's tags and desired properties,
    /// honouring a quoted `If-Match`. A desired change notifies the connected module.
    pub fn write_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        how: TwinWrite,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, HubError> {
        let body = body
            .as_object()
            .ok_or_else(|| HubError::argument_invalid("twin body must be a JSON object"))?;
        let tags = match body.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(t)) => Some(t.clone()),
            Some(_) => return Err(HubError::argument_invalid("tags must be an object")),
        };
        let desired = match body.get("properties").map(|p| p.get("desired")) {
            None | Some(None) | Some(Some(Value::Null)) => None,
            Some(Some(Value::Object(d))) => Some(
                d.iter()
                    .filter(|(k, _)| !k.starts_with('$'))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Map<_, _>>(),
            ),
            Some(Some(_)) => {
                return Err(HubError::argument_invalid(
                    "properties.desired must be an object",
                ))
            }
        };
        if body
            .get("properties")
            .and_then(|p| p.get("reported"))
            .is_some_and(|r| !r.is_null())
        {
            return Err(HubError::argument_invalid(
                "reported properties cannot be written by the back end",
            ));
        }
        if let Some(d) = &desired {
            check_patch(d, "desired")?;
        }
        let mut st = self.state();
        let record = find_module_mut(&mut st, device_id, module_id)?;
        if !if_match_allows(if_match, &record.twin.etag()) {
            return Err(HubError::precondition_failed(format!(
                "twin etag is {}; If-Match did not match",
                record.twin.etag()
            )));
        }
        // Validate on a copy so a rejected write changes nothing.
        let mut twin = record.twin.clone();
        let now = now_ts();
        match (how, tags) {
            (TwinWrite::Patch, Some(t)) => twin.patch_tags(&t)?,
            (TwinWrite::Replace, t) => twin.replace_tags(t.unwrap_or_default())?,
            (TwinWrite::Patch, None) => {}
        }
        let notification = match (how, desired) {
            (TwinWrite::Patch, Some(d)) => {
                let v = twin.patch_desired(&d, &now)?;
                Some((Value::Object(d), v))
            }
            (TwinWrite::Replace, d) => {
                let v = twin.replace_desired(d.unwrap_or_default(), &now)?;
                Some((Value::Object(twin.desired.props.clone()), v))
            }
            (TwinWrite::Patch, None) => None,
        };
        record.twin = twin;
        let key = ModuleKey {
            device_id: device_id.into(),
            module_id: module_id.into(),
        };
        let doc = twin_doc(&st, device_id, module_id)?;
        let pending = self.snapshot(&st);
        drop(st);
        self.commit(pending)?;
        if let Some((mut payload, version)) = notification {
            payload["$version"] = json!(version);
            // Notify only after the change is durable, so a client never sees a version the
            // hub could lose.
            let mut st = self.state();
            let notified = self.notify_desired(&mut st, &key, &payload, version);
            drop(st);
            self.emit(SimEvent::DesiredChanged {
                module: key,
                version,
                notified,
            });
        }
        Ok(doc)
    }

    fn announce_disconnects(&self, modules: Vec<ModuleKey>) {
        for module in modules {
            self.emit(SimEvent::Disconnected { module });
        }
    }

    // ---- direct methods ------------------------------------------------------------

    /// `POST /twins/{d}/modules/{m}/methods`: forwards to the connected module and waits for
    /// its answer (404 offline, 504 on timeout).
    pub async fn invoke_module_method(
        &self,
        device_id: &str,
        module_id: &str,
        request: &Value,
    ) -> Result<Value, HubError> {
        let name = request
            .get("methodName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| HubError::argument_invalid("methodName is required"))?
            .to_string();
        let timeout = request
            .get("responseTimeoutInSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(METHOD_TIMEOUT_DEFAULT)
            .clamp(1, METHOD_TIMEOUT_MAX);
        let payload = request.get("payload").cloned().unwrap_or(Value::Null);
        if payload.to_string().len() > METHOD_PAYLOAD_MAX {
            return Err(HubError::too_large(format!(
                "method payload exceeds {METHOD_PAYLOAD_MAX} bytes"
            )));
        }
        let key = ModuleKey {
            device_id: device_id.into(),
            module_id: module_id.into(),
        };
        let (tx, rx) = oneshot::channel();
        let rid = {
            let mut st = self.state();
            find_module(&st, device_id, module_id)?;
            let rid = format!("{:x}", st.next_method_rid);
            st.next_method_rid += 1;
            if !self.send_method_request(&st, &key, &name, &rid, &payload) {
                return Err(HubError::device_not_online(device_id, module_id));
            }
            st.pending_methods.insert(
                rid.clone(),
                PendingMethod {
                    module: key.clone(),
                    reply: tx,
                },
            );
            rid
        };
        self.emit(SimEvent::MethodInvoked {
            module: key,
            method: name,
        });
        match tokio::time::timeout(Duration::from_secs(timeout), rx).await {
            Ok(Ok((status, payload))) => Ok(json!({ "status": status, "payload": payload })),
            _ => {
                self.state().pending_methods.remove(&rid);
                Err(HubError::method_timeout())
            }
        }
    }
}

/// Closes the device's module connections; returns them so the caller can announce the
/// disconnects once the lock is released.
fn close_device_connections(st: &mut State, device_id: &str) -> Vec<ModuleKey> {
    let keys: Vec<ModuleKey> = st
        .connections
        .keys()
        .filter(|k| k.device_id == device_id)
        .cloned()
        .collect();
    for k in &keys {
        if let Some(c) = st.connections.remove(k) {
            let _ = c.tx.try_send(super::hub::Outbound::Close {
                reason: "device disabled or deleted",
            });
        }
    }
    keys
}

fn find_module<'a>(
    st: &'a State,
    device_id: &str,
    module_id: &str,
) -> Result<&'a ModuleRecord, HubError> {
    st.data
        .devices
        .get(device_id)
        .ok_or_else(|| HubError::device_not_found(device_id))?
        .modules
        .get(module_id)
        .ok_or_else(|| HubError::module_not_found(device_id, module_id))
}

fn find_module_mut<'a>(
    st: &'a mut State,
    device_id: &str,
    module_id: &str,
) -> Result<&'a mut ModuleRecord, HubError> {
    st.data
        .devices
        .get_mut(device_id)
        .ok_or_else(|| HubError::device_not_found(device_id))?
        .modules
        .get_mut(module_id)
        .ok_or_else(|| HubError::module_not_found(device_id, module_id))
}

fn connected(st: &State, device_id: &str, module_id: &str) -> bool {
    st.connections.contains_key(&ModuleKey {
        device_id: device_id.into(),
        module_id: module_id.into(),
    })
}

pub(super) fn twin_doc(st: &State, device_id: &str, module_id: &str) -> Result<Value, HubError> {
    let m = find_module(st, device_id, module_id)?;
    Ok(m.twin.service_view(
        device_id,
        module_id,
        connected(st, device_id, module_id),
        &m.last_activity,
    ))
}

fn device_doc(st: &State, device_id: &str) -> Value {
    let d = &st.data.devices[device_id];
    let any_connected = st.connections.keys().any(|k| k.device_id == device_id);
    json!({
        "deviceId": device_id,
        "generationId": d.generation_id,
        "etag": identity_etag(d.etag_seq),
        "connectionState": if any_connected { "Connected" } else { "Disconnected" },
        "status": if d.enabled { "enabled" } else { "disabled" },
        "statusReason": d.status_reason,
        "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "statusUpdatedTime": d.status_updated,
        "lastActivityTime": "0001-01-01T00:00:00Z",
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "symmetricKey": {"primaryKey": d.primary_key, "secondaryKey": d.secondary_key},
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "type": "sas"
        },
        "capabilities": {"iotEdge": d.iot_edge}
    })
}

fn module_doc(st: &State, device_id: &str, module_id: &str) -> Value {
    let m = &st.data.devices[device_id].modules[module_id];
    json!({
        "moduleId": module_id,
        "managedBy": m.managed_by,
        "deviceId": device_id,
        "generationId": m.generation_id,
        "etag": identity_etag(m.etag_seq),
        "connectionState": if connected(st, device_id, module_id) { "Connected" } else { "Disconnected" },
        "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "lastActivityTime": m.last_activity,
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "symmetricKey": {"primaryKey": m.primary_key, "secondaryKey": m.secondary_key},
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "type": "sas"
        }
    })
}
