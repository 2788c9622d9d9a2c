//! Identity material: IoT Hub connection strings and SAS tokens.
//!
//! This module owns
//! - [`SharedKey`], the decoded symmetric key of a device, module or access policy;
//! - parsing and rendering of connection strings ([`ConnectionString`],
//!   [`ModuleCredentials`], [`DeviceCredentials`], [`ServiceCredentials`]) following
//!   PROTOCOL.md §1.1;
//! - SAS token signing ([`sign`], [`token`]) with the Python device SDK's `sr` encoding,
//!   and SAS token parsing and verification ([`SasToken`]) as the emulator needs it
//!   (PROTOCOL.md §2.2–2.4);
//! - [`ModuleIdentity`]: a module's names without its key (a key in aziot-keyd signs for
//!   it on IoT Edge hosts);
//! - [`clock`]: the wall clock token expiries are computed from, shifted by the skew
//!   measured against the hub's `Date` when the machine's clock is wrong.
//!
//! Users: the daemon (module connection string → MQTT password), provisioning (service
//! connection string → registry REST `Authorization`), and the emulator (`sim`: generates
//! keys, verifies tokens presented by clients).
//!
//! Invariant: nothing in here ever prints a key. [`SharedKey`], every credentials type and
//! [`SasToken`] redact their secrets in `Debug`, none of them implements `Display`, and no
//! error message contains a key, a signature or the whole connection string. The only
//! ways to get a key back out as text are [`SharedKey::as_base64`] and the explicit
//! `to_connection_string` methods.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Text shown instead of secrets in `Debug` output.
const REDACTED: &str = "<redacted>";

// ---------------------------------------------------------------------------------------
// Shared keys
// ---------------------------------------------------------------------------------------

/// A symmetric key (device, module or access-policy key): the decoded bytes used as the
/// HMAC key, plus the original base64 text (needed to write connection strings back).
///
/// `Debug` prints `SharedKey(<redacted>)`; there is deliberately no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey {
    bytes: Vec<u8>,
    base64: String,
}

/// Why a base64 key was rejected. Never contains the key text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is not valid base64")]
    NotBase64,
}

impl SharedKey {
    /// Decodes a standard (padded) base64 key, as found in connection strings.
    pub fn from_base64(text: &str) -> Result<SharedKey, KeyError> {
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        let bytes = BASE64.decode(text).map_err(|_| KeyError::NotBase64)?;
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(SharedKey {
            bytes,
            base64: text.to_owned(),
        })
    }

    /// A fresh key of 32 random bytes from the operating system's CSPRNG (the emulator
    /// uses it for hub-generated device, module and policy keys).
    pub fn generate() -> SharedKey {
        // ThreadRng is a CSPRNG (ChaCha12) seeded from the operating system.
        let mut bytes = vec![0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
        let base64 = BASE64.encode(&bytes);
        SharedKey { bytes, base64 }
    }

    /// The key exactly as it was given (or, for generated keys, its standard base64).
    /// Only for writing connection strings; never log it.
    pub fn as_base64(&self) -> &str {
        &self.base64
    }

    /// A key derived from this one: HMAC-SHA256(this key, `message`), as a new key.
    /// Module keys from a device key (`"{moduleId}:{generationId}:primary"`, PROTOCOL
    /// §11.3, what the Azure IoT Identity Service does) and a DPS device key from an
    /// enrollment-group key (`registrationId`, §12.2) are both made this way.
    pub fn derive(&self, message: &str) -> SharedKey {
        let mut mac = self.mac();
        mac.update(message.as_bytes());
        let bytes = mac.finalize().into_bytes().to_vec();
        let base64 = BASE64.encode(&bytes);
        SharedKey { bytes, base64 }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.bytes).expect("HMAC accepts keys of any length")
    }
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedKey({REDACTED})")
    }
}

// ---------------------------------------------------------------------------------------
// Connection strings
// ---------------------------------------------------------------------------------------

const HOST_NAME: &str = "HostName";
const DEVICE_ID: &str = "DeviceId";
const MODULE_ID: &str = "ModuleId";
const SHARED_ACCESS_KEY: &str = "SharedAccessKey";
const SHARED_ACCESS_KEY_NAME: &str = "SharedAccessKeyName";
const SHARED_ACCESS_SIGNATURE: &str = "SharedAccessSignature";
const GATEWAY_HOST_NAME: &str = "GatewayHostName";
const X509: &str = "x509";

/// The keys the Python parsers accept (PROTOCOL.md §1.1), in a fixed order.
const KNOWN_KEYS: [&str; 8] = [
    HOST_NAME,
    DEVICE_ID,
    MODULE_ID,
    SHARED_ACCESS_KEY,
    SHARED_ACCESS_KEY_NAME,
    SHARED_ACCESS_SIGNATURE,
    GATEWAY_HOST_NAME,
    X509,
];

const KIND_MODULE: &str = "a module connection string (DeviceId and ModuleId)";
const KIND_DEVICE: &str = "a device connection string (DeviceId, no ModuleId)";
const KIND_SERVICE: &str = "a service connection string (SharedAccessKeyName, no DeviceId)";

/// Why a connection string was rejected. Messages name the offending key or segment
/// position, never a value: neither the key nor the whole string ever appears.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionStringError {
    #[error("connection string is empty")]
    Empty,
    /// `;;`, a leading `;` or a trailing `;`. `position` is 1-based.
    #[error("empty segment (segment {position}) in connection string; remove the stray `;`")]
    EmptySegment { position: usize },
    /// A segment without `=`. `position` is 1-based.
    #[error("segment {position} of the connection string is not a `key=value` pair")]
    NotKeyValue { position: usize },
    /// `name` is `None` when the would-be key name looks like it could be secret material
    /// (e.g. a base64 key pasted without `SharedAccessKey=`), so it is withheld.
    #[error("unknown key {}", describe_unknown_key(.name.as_deref()))]
    UnknownKey { name: Option<String> },
    #[error("duplicate key `{key}`")]
    DuplicateKey { key: &'static str },
    #[error("missing {key}")]
    Missing { key: &'static str },
    #[error("{key} is empty")]
    EmptyValue { key: &'static str },
    #[error("SharedAccessKey is not valid base64")]
    InvalidKey,
    #[error("{key} is not allowed in {kind}")]
    NotAllowed {
        key: &'static str,
        kind: &'static str,
    },
    #[error("SharedAccessKey and {other} cannot be used together (mixed authentication scheme)")]
    MixedAuthentication { other: &'static str },
    #[error("{key} authentication is not supported; a SharedAccessKey is required")]
    Unsupported { key: &'static str },
    #[error("expected {expected}, found {found}")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
}

fn describe_unknown_key(name: Option<&str>) -> String {
    match name {
        Some(name) => format!("`{name}`"),
        None => "(name withheld because it looks like key material)".to_owned(),
    }
}

/// A parsed connection string of any supported kind. Only shared-key authentication is
/// supported (x509 and pre-made `SharedAccessSignature` strings are rejected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionString {
    Module(ModuleCredentials),
    Device(DeviceCredentials),
    Service(ServiceCredentials),
}

/// A module identity: `HostName=..;DeviceId=..;ModuleId=..;SharedAccessKey=..[;GatewayHostName=..]`.
/// `Debug` redacts the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCredentials {
    pub host_name: String,
    pub device_id: String,
    pub module_id: String,
    pub key: SharedKey,
    /// Only the TCP/TLS target; `sr` and the MQTT user name still use `host_name`.
    pub gateway_host_name: Option<String>,
}

/// A device identity: `HostName=..;DeviceId=..;SharedAccessKey=..[;GatewayHostName=..]`.
/// `Debug` redacts the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredentials {
    pub host_name: String,
    pub device_id: String,
    pub key: SharedKey,
    pub gateway_host_name: Option<String>,
}

/// A shared-access policy: `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`.
/// `host_name` may carry a port (`localhost:8443`) for the registry REST client.
/// `Debug` redacts the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCredentials {
    pub host_name: String,
    pub policy_name: String,
    pub key: SharedKey,
}

/// Would-be key names are echoed in errors only when they look like a key *name*: short,
/// identifier-like, and not followed by a value that looks like base64 padding.
fn echoable_key_name(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !value.bytes().all(|b| b == b'=')
}

/// Splits into known `key → value` pairs, enforcing the §1.1 grammar.
fn split_pairs(s: &str) -> Result<[Option<&str>; KNOWN_KEYS.len()], ConnectionStringError> {
    if s.is_empty() {
        return Err(ConnectionStringError::Empty);
    }
    let mut values: [Option<&str>; KNOWN_KEYS.len()] = [None; KNOWN_KEYS.len()];
    for (index, segment) in s.split(';').enumerate() {
        let position = index + 1;
        if segment.is_empty() {
            return Err(ConnectionStringError::EmptySegment { position });
        }
        let Some((name, value)) = segment.split_once('=') else {
            return Err(ConnectionStringError::NotKeyValue { position });
        };
        let Some(slot) = KNOWN_KEYS.iter().position(|k| *k == name) else {
            let name = echoable_key_name(name, value).then(|| name.to_owned());
            return Err(ConnectionStringError::UnknownKey { name });
        };
        if values[slot].is_some() {
            return Err(ConnectionStringError::DuplicateKey {
                key: KNOWN_KEYS[slot],
            });
        }
        values[slot] = Some(value);
    }
    Ok(values)
}

struct Fields<'a> {
    values: [Option<&'a str>; KNOWN_KEYS.len()],
}

impl<'a> Fields<'a> {
    fn get(&self, key: &'static str) -> Option<&'a str> {
        let slot = KNOWN_KEYS.iter().position(|k| *k == key)?;
        self.values[slot]
    }

    fn has(&self, key: &'static str) -> bool {
        self.get(key).is_some()
    }

    /// Present and non-empty.
    fn required(&self, key: &'static str) -> Result<String, ConnectionStringError> {
        match self.get(key) {
            None => Err(ConnectionStringError::Missing { key }),
            Some("") => Err(ConnectionStringError::EmptyValue { key }),
            Some(v) => Ok(v.to_owned()),
        }
    }

    /// Absent, or present and non-empty.
    fn optional(&self, key: &'static str) -> Result<Option<String>, ConnectionStringError> {
        match self.get(key) {
            None => Ok(None),
            Some("") => Err(ConnectionStringError::EmptyValue { key }),
            Some(v) => Ok(Some(v.to_owned())),
        }
    }

    fn key(&self) -> Result<SharedKey, ConnectionStringError> {
        for other in [X509, SHARED_ACCESS_SIGNATURE] {
            if self.has(other) {
                return Err(if self.has(SHARED_ACCESS_KEY) {
                    ConnectionStringError::MixedAuthentication { other }
                } else {
                    ConnectionStringError::Unsupported { key: other }
                });
            }
        }
        let text = self.required(SHARED_ACCESS_KEY)?;
        SharedKey::from_base64(&text).map_err(|e| match e {
            KeyError::Empty => ConnectionStringError::EmptyValue {
                key: SHARED_ACCESS_KEY,
            },
            KeyError::NotBase64 => ConnectionStringError::InvalidKey,
        })
    }
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields = Fields {
            values: split_pairs(s)?,
        };
        let host_name = fields.required(HOST_NAME)?;

        if fields.has(DEVICE_ID) {
            // Device or module. A SharedAccessKeyName is ignored, as the Python device
            // client does (PROTOCOL.md §1.1 notes).
            let device_id = fields.required(DEVICE_ID)?;
            let gateway_host_name = fields.optional(GATEWAY_HOST_NAME)?;
            let module_id = fields.optional(MODULE_ID)?;
            let key = fields.key()?;
            return Ok(match module_id {
                Some(module_id) => ConnectionString::Module(ModuleCredentials {
                    host_name,
                    device_id,
                    module_id,
                    key,
                    gateway_host_name,
                }),
                None => ConnectionString::Device(DeviceCredentials {
                    host_name,
                    device_id,
                    key,
                    gateway_host_name,
                }),
            });
        }

        if fields.has(MODULE_ID) {
            return Err(ConnectionStringError::Missing { key: DEVICE_ID });
        }
        if !fields.has(SHARED_ACCESS_KEY_NAME) {
            return Err(ConnectionStringError::Missing {
                key: "DeviceId (device or module) or SharedAccessKeyName (service)",
            });
        }
        if fields.has(GATEWAY_HOST_NAME) {
            return Err(ConnectionStringError::NotAllowed {
                key: GATEWAY_HOST_NAME,
                kind: "a service connection string",
            });
        }
        let policy_name = fields.required(SHARED_ACCESS_KEY_NAME)?;
        let key = fields.key()?;
        Ok(ConnectionString::Service(ServiceCredentials {
            host_name,
            policy_name,
            key,
        }))
    }
}

impl ConnectionString {
    /// Human description of the kind, as used in [`ConnectionStringError::WrongKind`].
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectionString::Module(_) => KIND_MODULE,
            ConnectionString::Device(_) => KIND_DEVICE,
            ConnectionString::Service(_) => KIND_SERVICE,
        }
    }

    /// Renders the string back (contains the key: never log it).
    pub fn to_connection_string(&self) -> String {
        match self {
            ConnectionString::Module(c) => c.to_connection_string(),
            ConnectionString::Device(c) => c.to_connection_string(),
            ConnectionString::Service(c) => c.to_connection_string(),
        }
    }
}

fn wrong_kind(expected: &'static str, found: &ConnectionString) -> ConnectionStringError {
    ConnectionStringError::WrongKind {
        expected,
        found: found.kind(),
    }
}

impl FromStr for ModuleCredentials {
    type Err = ConnectionStringError;

    /// Parses a connection string that must be a module one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<ConnectionString>()? {
            ConnectionString::Module(c) => Ok(c),
            other => Err(wrong_kind(KIND_MODULE, &other)),
        }
    }
}

impl FromStr for DeviceCredentials {
    type Err = ConnectionStringError;

    /// Parses a connection string that must be a device one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<ConnectionString>()? {
            ConnectionString::Device(c) => Ok(c),
            other => Err(wrong_kind(KIND_DEVICE, &other)),
        }
    }
}

impl FromStr for ServiceCredentials {
    type Err = ConnectionStringError;

    /// Parses a connection string that must be a service (policy) one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<ConnectionString>()? {
            ConnectionString::Service(c) => Ok(c),
            other => Err(wrong_kind(KIND_SERVICE, &other)),
        }
    }
}

impl ModuleCredentials {
    /// `HostName=..;DeviceId=..;ModuleId=..;SharedAccessKey=..[;GatewayHostName=..]`.
    /// Contains the key: never log it.
    pub fn to_connection_string(&self) -> String {
        let mut s = format!(
            "{HOST_NAME}={};{DEVICE_ID}={};{MODULE_ID}={};{SHARED_ACCESS_KEY}={}",
            self.host_name,
            self.device_id,
            self.module_id,
            self.key.as_base64()
        );
        if let Some(gw) = &self.gateway_host_name {
            s.push_str(&format!(";{GATEWAY_HOST_NAME}={gw}"));
        }
        s
    }

    /// `{host}/devices/{deviceId}/modules/{moduleId}` (unencoded).
    pub fn resource_uri(&self) -> String {
        format!(
            "{}/devices/{}/modules/{}",
            self.host_name, self.device_id, self.module_id
        )
    }

    /// Where to open the TCP/TLS connection: the gateway if set, else the hub.
    pub fn connect_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }

    /// A module-key token for [`Self::resource_uri`], without `skn`, exactly as the Python
    /// device SDK builds it.
    pub fn sas_token(&self, expiry: u64) -> String {
        token(&self.key, &self.resource_uri(), expiry, None)
    }
}

impl DeviceCredentials {
    /// `HostName=..;DeviceId=..;SharedAccessKey=..[;GatewayHostName=..]`.
    /// Contains the key: never log it.
    pub fn to_connection_string(&self) -> String {
        let mut s = format!(
            "{HOST_NAME}={};{DEVICE_ID}={};{SHARED_ACCESS_KEY}={}",
            self.host_name,
            self.device_id,
            self.key.as_base64()
        );
        if let Some(gw) = &self.gateway_host_name {
            s.push_str(&format!(";{GATEWAY_HOST_NAME}={gw}"));
        }
        s
    }

    /// `{host}/devices/{deviceId}` (unencoded).
    pub fn resource_uri(&self) -> String {
        format!("{}/devices/{}", self.host_name, self.device_id)
    }

    /// Where to open the TCP/TLS connection: the gateway if set, else the hub.
    pub fn connect_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }

    /// A device-key token for [`Self::resource_uri`], without `skn`.
    pub fn sas_token(&self, expiry: u64) -> String {
        token(&self.key, &self.resource_uri(), expiry, None)
    }
}

impl ServiceCredentials {
    /// `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`. Contains the key: never log it.
    pub fn to_connection_string(&self) -> String {
        format!(
            "{HOST_NAME}={};{SHARED_ACCESS_KEY_NAME}={};{SHARED_ACCESS_KEY}={}",
            self.host_name,
            self.policy_name,
            self.key.as_base64()
        )
    }

    /// A policy token scoped to the hub (`sr` = encoded host name, so `localhost:8443`
    /// becomes `localhost%3A8443`) with `skn` = the policy name.
    pub fn sas_token(&self, expiry: u64) -> String {
        token(&self.key, &self.host_name, expiry, Some(&self.policy_name))
    }
}

pub mod clock;
mod module;
mod sas;
pub use module::ModuleIdentity;
pub use sas::{
    encode_resource_uri, sign, string_to_sign, token, token_with_signature, SasError, SasToken,
};

#[cfg(test)]
mod tests;
