//! What DPS answers, as data (PROTOCOL §12.1): a `RegistrationOperationStatus` on 2xx, a
//! service error body otherwise. Pure: bytes in, [`Reply`] out, no I/O and no panic on any
//! input (the `dps_response` fuzz target holds it to that).
//!
//! The assigned hub and device id end up in a connection string (`HostName=..;DeviceId=..`),
//! so they are checked here: a `;` or a space from a broken or hostile endpoint must not
//! reach the credential file.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Longest error text kept from a DPS body (they are short; a proxy's HTML page is not).
const MAX_MESSAGE: usize = 300;

/// The hub and device DPS assigned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DpsAssignment {
    /// The IoT hub's host name, e.g. `myhub.azure-devices.net`.
    pub assigned_hub: String,
    pub device_id: String,
}

/// A registration's final state other than `assigned` (PROTOCOL §12.1 `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Failed,
    Disabled,
    Unassigned,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Failed => "failed",
            FinalStatus::Disabled => "disabled",
            FinalStatus::Unassigned => "unassigned",
        }
    }
}

/// One DPS answer, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Still working: poll `operation_id` after `retry_after` (or the client's default).
    Assigning {
        operation_id: String,
        retry_after: Option<Duration>,
    },
    Assigned {
        assignment: DpsAssignment,
        /// `initialAssignment`, `deviceDataUpdated`, ... when DPS says.
        substatus: Option<String>,
    },
    /// The registration ended without a hub.
    Final {
        status: FinalStatus,
        error_code: Option<i64>,
        message: String,
    },
    /// A non-2xx answer: the service error body's code and message.
    Error {
        http_status: u16,
        error_code: Option<i64>,
        message: String,
        retry_after: Option<Duration>,
    },
}

/// Why an answer could not be understood. Its text quotes at most a short, cleaned
/// excerpt of what DPS sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationStatus {
    operation_id: Option<String>,
    status: Option<String>,
    registration_state: Option<RegistrationState>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationState {
    assigned_hub: Option<String>,
    device_id: Option<String>,
    substatus: Option<String>,
    error_code: Option<Value>,
    error_message: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceError {
    error_code: Option<Value>,
    message: Option<String>,
}

/// Classifies one HTTP answer (or its MQTT equivalent: the status from the response topic
/// and `retry-after` from its query). `retry_after` is the raw header value: seconds.
pub fn parse_reply(
    status: u16,
    body: &[u8],
    retry_after: Option<&str>,
) -> Result<Reply, Malformed> {
    let retry_after = retry_after.and_then(parse_retry_after);
    if !(200..300).contains(&status) {
        let parsed: Option<ServiceError> = serde_json::from_slice(body).ok();
        let (error_code, message) = match parsed {
            Some(e) => (e.error_code.as_ref().and_then(code), e.message.map(clean)),
            None => (None, None),
        };
        let message = message
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| excerpt(body));
        return Ok(Reply::Error {
            http_status: status,
            error_code,
            message,
            retry_after,
        });
    }
    let op: OperationStatus = serde_json::from_slice(body).map_err(|e| {
        Malformed(format!(
            "DPS answered {status} with a body that is not an operation status ({e}): {}",
            excerpt(body)
        ))
    })?;
    let state = op.registration_state;
    match op.status.as_deref() {
        Some("assigning") => {
            let operation_id = op
                .operation_id
                .filter(|id| valid_operation_id(id))
                .ok_or_else(|| {
                    Malformed("DPS answered `assigning` without a usable operationId".into())
                })?;
            Ok(Reply::Assigning {
                operation_id,
                retry_after,
            })
        }
        Some("assigned") => {
            let state = state.ok_or_else(|| {
                Malformed("DPS answered `assigned` without a registrationState".into())
            })?;
            let assigned_hub = state
                .assigned_hub
                .filter(|h| valid_hub_host(h))
                .ok_or_else(|| {
                    Malformed("DPS answered `assigned` without a valid assignedHub".into())
                })?;
            let device_id = state
                .device_id
                .filter(|d| valid_device_id(d))
                .ok_or_else(|| {
                    Malformed("DPS answered `assigned` without a valid deviceId".into())
                })?;
            Ok(Reply::Assigned {
                assignment: DpsAssignment {
                    assigned_hub,
                    device_id,
                },
                substatus: state.substatus.map(clean),
            })
        }
        Some(s @ ("failed" | "disabled" | "unassigned")) => {
            let status = match s {
                "failed" => FinalStatus::Failed,
                "disabled" => FinalStatus::Disabled,
                _ => FinalStatus::Unassigned,
            };
            let (error_code, message) = match state {
                Some(st) => (
                    st.error_code.as_ref().and_then(code),
                    st.error_message.map(clean).unwrap_or_default(),
                ),
                None => (None, String::new()),
            };
            Ok(Reply::Final {
                status,
                error_code,
                message,
            })
        }
        Some(other) => Err(Malformed(format!(
            "DPS answered an unknown registration status `{}`",
            clean(other.to_owned())
        ))),
        None => Err(Malformed(
            "DPS answered without a registration status".into(),
        )),
    }
}

/// `Retry-After` as DPS sends it: whole seconds (an HTTP date is not used by DPS).
pub fn parse_retry_after(text: &str) -> Option<Duration> {
    text.trim()
        .parse::<u32>()
        .ok()
        .map(|s| Duration::from_secs(s.into()))
}

/// DPS error codes are numbers (`401002`); some bodies carry them as strings.
fn code(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Operation ids go into a URL path and an MQTT topic: keep them to what DPS issues.
fn valid_operation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}

/// A DNS host name, optionally with a port: what a `HostName=` may hold.
pub(crate) fn valid_hub_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && !host.starts_with(['.', '-', ':'])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
}

/// IoT Hub device ids: up to 128 of ASCII alphanumerics and `-.+%_#*?!(),:=@$'`.
pub(crate) fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.+%_#*?!(),:=@$'".contains(&b))
}

/// Printable, single-line, bounded.
fn clean(text: String) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE)
        .collect();
    if text.chars().count() > MAX_MESSAGE {
        s.push('…');
    }
    s.trim().to_owned()
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).into_owned();
    if text.trim().is_empty() {
        "no details from DPS".to_owned()
    } else {
        clean(text)
    }
}
