//! The Azure IoT Identity Service's JSON, as edgetwin reads and writes it (PROTOCOL §13.2,
//! §13.3): the identity answer of `GET /identities/identity`, the `/sign` request and its
//! answer, and the error body both services send. Pure: status and body in, a typed
//! value or [`AziotError`] out, never a panic (fuzzed: `fuzz/fuzz_targets/aziot_response.rs`).
//!
//! Everything that comes back is checked before it is used: the names go into MQTT
//! topics, the user name and the `sr` of a token, and the key handle into the next
//! request, so a name with a `/`, whitespace or control character is refused here.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{AziotError, AziotIdentity, KeyHandle, Service};
use crate::identity::ModuleIdentity;

/// The api-version both services accept since IoT Edge 1.2 (PROTOCOL §13.2, §13.3).
pub const API_VERSION: &str = "2020-09-01";
/// `GET` path of the caller's own identity.
pub const IDENTITY_PATH: &str = "/identities/identity?api-version=2020-09-01";
/// `POST` path of keyd's signing.
pub const SIGN_PATH: &str = "/sign?api-version=2020-09-01";
/// Longest name (hub, gateway, device, module, generation) taken from identityd.
const MAX_NAME: usize = 256;
/// Longest key handle passed back to keyd (AIS handles are a few hundred bytes).
const MAX_HANDLE: usize = 4096;
/// Longest error message from a service that is repeated in edgetwin's own.
const MAX_MESSAGE: usize = 200;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityAnswer {
    #[serde(rename = "type")]
    kind: String,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    hub_name: String,
    #[serde(default)]
    gateway_host: Option<String>,
    device_id: String,
    #[serde(default)]
    module_id: Option<String>,
    #[serde(default)]
    gen_id: Option<String>,
    #[serde(default)]
    auth: Option<Auth>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Auth {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    key_handle: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignRequest<'a> {
    key_handle: &'a str,
    algorithm: &'static str,
    parameters: SignParameters,
}

#[derive(Serialize)]
struct SignParameters {
    message: String,
}

#[derive(Deserialize)]
struct SignAnswer {
    signature: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// The answer of `GET /identities/identity`: the caller's module identity and the handle
/// of its key, or why not. 401 and 404 are identityd's way of saying the caller is no
/// principal (or not one with a module identity).
pub fn parse_identity(status: u16, body: &[u8]) -> Result<AziotIdentity, AziotError> {
    const SERVICE: Service = Service::Identityd;
    match status {
        200 => {}
        401 | 404 => {
            return Err(AziotError::NotPrincipal {
                status,
                message: error_message(body),
            })
        }
        _ => {
            return Err(AziotError::Refused {
                service: SERVICE,
                status,
                message: error_message(body),
            })
        }
    }
    let answer: IdentityAnswer = serde_json::from_slice(body).map_err(|e| malformed(SERVICE, e))?;
    if answer.kind != "aziot" {
        return Err(AziotError::Unsupported(format!(
            "identity type {:?}, not \"aziot\"",
            shown(&answer.kind)
        )));
    }
    let spec = answer.spec;
    let module_id = spec.module_id.ok_or_else(|| {
        AziotError::Unsupported(
            "a device identity, no module: the principal needs idtype = [\"module\"]".into(),
        )
    })?;
    let auth = spec
        .auth
        .ok_or_else(|| malformed(SERVICE, "no auth in the identity"))?;
    if auth.kind != "sas" {
        return Err(AziotError::Unsupported(format!(
            "authentication {:?}; only \"sas\" (a symmetric key in aziot-keyd) is supported",
            shown(&auth.kind)
        )));
    }
    let key_handle = auth
        .key_handle
        .filter(|h| !h.is_empty() && h.len() <= MAX_HANDLE && !h.contains(char::is_control))
        .ok_or_else(|| malformed(SERVICE, "no usable keyHandle in the identity"))?;
    let host_name = name("hubName", spec.hub_name)?;
    // A gateway host equal to the hub is the hub itself: connect there directly.
    let gateway_host_name = match spec.gateway_host {
        Some(g) if !g.is_empty() && !g.eq_ignore_ascii_case(&host_name) => {
            Some(name("gatewayHost", g)?)
        }
        _ => None,
    };
    let gen_id = match spec.gen_id {
        Some(g) => Some(name("genId", g)?),
        None => None,
    };
    Ok(AziotIdentity {
        identity: ModuleIdentity {
            host_name,
            device_id: name("deviceId", spec.device_id)?,
            module_id: name("moduleId", module_id)?,
            gateway_host_name,
        },
        gen_id,
        key_handle: KeyHandle(key_handle),
    })
}

/// The JSON body of `POST /sign`: HMAC-SHA256 over `message` with the key behind `handle`.
pub fn sign_request(handle: &KeyHandle, message: &[u8]) -> Vec<u8> {
    let request = SignRequest {
        key_handle: &handle.0,
        algorithm: "HMAC-SHA256",
        parameters: SignParameters {
            message: BASE64.encode(message),
        },
    };
    serde_json::to_vec(&request).expect("a struct of strings serializes")
}

/// The answer of `POST /sign`: the signature as standard base64.
pub fn parse_signature(status: u16, body: &[u8]) -> Result<String, AziotError> {
    const SERVICE: Service = Service::Keyd;
    if status != 200 {
        return Err(AziotError::Refused {
            service: SERVICE,
            status,
            message: error_message(body),
        });
    }
    let answer: SignAnswer = serde_json::from_slice(body).map_err(|e| malformed(SERVICE, e))?;
    match BASE64.decode(&answer.signature) {
        Ok(bytes) if !bytes.is_empty() => Ok(answer.signature),
        _ => Err(malformed(SERVICE, "the signature is not base64")),
    }
}

/// A service's own words for an error, cut short and without control characters; the
/// body itself when it is not the usual `{"message": ...}`.
fn error_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = shown(text.trim());
    if text.is_empty() {
        "(no message)".into()
    } else {
        text
    }
}

/// `text` fit for a log line: control characters replaced, at most [`MAX_MESSAGE`] chars.
fn shown(text: &str) -> String {
    text.chars()
        .take(MAX_MESSAGE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A name identityd gave, fit for topics, user names and `sr`.
fn name(field: &'static str, value: String) -> Result<String, AziotError> {
    let fine = !value.is_empty()
        && value.len() <= MAX_NAME
        && !value
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '#' | '+' | '?'));
    if fine {
        Ok(value)
    } else {
        Err(malformed(
            Service::Identityd,
            format!("{field} is empty, too long or has characters no IoT Hub name has"),
        ))
    }
}

fn malformed(service: Service, reason: impl ToString) -> AziotError {
    AziotError::Malformed {
        service,
        reason: shown(&reason.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = r#"{"type":"aziot","spec":{"hubName":"myhub.azure-devices.net",
        "gatewayHost":"parentdevice","deviceId":"device01","moduleId":"edgetwin",
        "genId":"12345","auth":{"type":"sas","keyHandle":"opaque-handle=="}}}"#;

    #[test]
    fn a_module_identity_is_read_with_its_gateway_and_key_handle() {
        let id = parse_identity(200, MODULE.as_bytes()).unwrap();
        assert_eq!(id.identity.host_name, "myhub.azure-devices.net");
        assert_eq!(
            id.identity.gateway_host_name.as_deref(),
            Some("parentdevice")
        );
        assert_eq!(id.identity.device_id, "device01");
        assert_eq!(id.identity.module_id, "edgetwin");
        assert_eq!(id.gen_id.as_deref(), Some("12345"));
        assert_eq!(id.key_handle.0, "opaque-handle==");
        assert!(!format!("{id:?}").contains("opaque-handle"), "{id:?}");
    }

    #[test]
    fn a_gateway_host_that_is_the_hub_means_no_gateway() {
        let body = MODULE.replace("parentdevice", "MyHub.azure-devices.net");
        let id = parse_identity(200, body.as_bytes()).unwrap();
        assert_eq!(id.identity.gateway_host_name, None);
        assert_eq!(id.identity.connect_host(), "myhub.azure-devices.net");
    }

    #[test]
    fn not_being_a_principal_is_told_apart_from_other_errors() {
        let body = br#"{"message":"caller 1000 is not authorized"}"#;
        for status in [401, 404] {
            match parse_identity(status, body) {
                Err(AziotError::NotPrincipal { status: s, message }) => {
                    assert_eq!(s, status);
                    assert_eq!(message, "caller 1000 is not authorized");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        let e = parse_identity(500, b"boom\n\x1b[31m").unwrap_err();
        assert!(
            matches!(&e, AziotError::Refused { status: 500, message, .. } if message == "boom  [31m"),
            "{e:?}"
        );
    }

    #[test]
    fn device_x509_and_odd_identities_are_refused_with_the_reason() {
        let device = MODULE.replace(r#""moduleId":"edgetwin","#, "");
        assert!(matches!(
            parse_identity(200, device.as_bytes()),
            Err(AziotError::Unsupported(m)) if m.contains("idtype")
        ));
        let x509 = MODULE.replace(r#""type":"sas""#, r#""type":"x509""#);
        assert!(matches!(
            parse_identity(200, x509.as_bytes()),
            Err(AziotError::Unsupported(m)) if m.contains("x509")
        ));
        for bad in [
            MODULE.replace("device01", "dev/01"),
            MODULE.replace("device01", ""),
            MODULE.replace("edgetwin", "edge twin"),
            MODULE.replace("myhub.azure-devices.net", "hub\\u0000"),
            MODULE.replace("opaque-handle==", ""),
            MODULE.replace(r#""type":"aziot""#, r#""type":"aziot","spec":1"#),
            "[]".into(),
            "{".into(),
        ] {
            assert!(
                matches!(
                    parse_identity(200, bad.as_bytes()),
                    Err(AziotError::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_sign_request_carries_the_handle_and_the_message_in_base64() {
        let handle = KeyHandle("h1".into());
        let body = sign_request(&handle, b"hub%2Fdevices%2Fd\n1700000000");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "keyHandle": "h1",
                "algorithm": "HMAC-SHA256",
                "parameters": {"message": BASE64.encode(b"hub%2Fdevices%2Fd\n1700000000")}
            })
        );
    }

    #[test]
    fn a_signature_must_be_base64() {
        assert_eq!(
            parse_signature(200, br#"{"signature":"AAEC"}"#).unwrap(),
            "AAEC"
        );
        for bad in [&br#"{"signature":"not base64!"}"#[..], b"{}", b"", b"\xff"] {
            assert!(matches!(
                parse_signature(200, bad),
                Err(AziotError::Malformed { .. })
            ));
        }
        assert!(matches!(
            parse_signature(400, br#"{"message":"bad handle"}"#),
            Err(AziotError::Refused { status: 400, message, .. }) if message == "bad handle"
        ));
    }
}
