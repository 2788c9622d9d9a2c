//! IoT Hub error codes as the emulator answers them (PROTOCOL §6.7): an HTTP status, a
//! numeric code, its name for the `iothub-errorcode` header, and a message. The REST front
//! end renders them in the hub's newer body format; the MQTT front end uses only the status.

use serde_json::json;

/// One error answer of the hub. Messages never contain keys or tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {name} ({code}): {message}")]
pub struct HubError {
    pub status: u16,
    pub code: u32,
    pub name: &'static str,
    pub message: String,
}

impl HubError {
    pub fn new(status: u16, code: u32, name: &'static str, message: impl Into<String>) -> Self {
        HubError {
            status,
            code,
            name,
            message: message.into(),
        }
    }

    pub fn argument_invalid(message: impl Into<String>) -> Self {
        Self::new(400, 400004, "ArgumentInvalid", message)
    }
    pub fn format_error(message: impl Into<String>) -> Self {
        Self::new(400, 400006, "IotHubFormatError", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, 401002, "IotHubUnauthorizedAccess", message)
    }
    pub fn device_not_found(device_id: &str) -> Self {
        Self::new(
            404,
            404001,
            "DeviceNotFound",
            format!("Device {device_id} not registered"),
        )
    }
    pub fn module_not_found(device_id: &str, module_id: &str) -> Self {
        Self::new(
            404,
            404010,
            "ModuleNotFound",
            format!("Module {module_id} on device {device_id} not registered"),
        )
    }
    pub fn device_not_online(device_id: &str, module_id: &str) -> Self {
        Self::new(
            404,
            404103,
            "DeviceNotOnline",
            format!("Timed out waiting for module {device_id}/{module_id} to connect"),
        )
    }
    pub fn device_already_exists(device_id: &str) -> Self {
        Self::new(
            409,
            409001,
            "DeviceAlreadyExists",
            format!("A device with ID '{device_id}' is already registered."),
        )
    }
    pub fn module_already_exists(device_id: &str, module_id: &str) -> Self {
        Self::new(
            409,
            409301,
            "ModuleAlreadyExistsOnDevice",
            format!(
                "A module with ID '{module_id}' is already registered on device '{device_id}'."
            ),
        )
    }
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(412, 412001, "PreconditionFailed", message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, 413001, "MessageTooLarge", message)
    }
    pub fn throttled() -> Self {
        Self::new(
            429,
            429001,
            "ThrottlingException",
            "Throttling: the hub is temporarily rejecting this operation; retry with backoff",
        )
    }
    pub fn server_error(message: impl Into<String>) -> Self {
        Self::new(500, 500001, "ServerError", message)
    }
    pub fn method_timeout() -> Self {
        Self::new(
            504,
            504101,
            "GatewayTimeout",
            "Timed out waiting for the response from device.",
        )
    }

    /// The hub's newer error body: a JSON object whose `Message` is itself JSON text.
    pub fn body(&self, tracking_id: &str, timestamp_utc: &str) -> serde_json::Value {
        let inner = json!({
            "errorCode": self.code,
            "trackingId": tracking_id,
            "message": self.message,
            "info": {},
            "timestampUtc": timestamp_utc,
        });
        json!({ "Message": inner.to_string(), "ExceptionMessage": "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_nests_the_error_as_json_text_like_the_real_hub() {
        let body = HubError::device_not_found("d1").body("abc", "2026-01-01T00:00:00Z");
        let inner: serde_json::Value =
            serde_json::from_str(body["Message"].as_str().unwrap()).unwrap();
        assert_eq!(inner["errorCode"], 404001);
        assert_eq!(inner["trackingId"], "abc");
        assert_eq!(body["ExceptionMessage"], "");
    }
}
