//! Identity material: IoT Hub connection strings and SAS tokens.
//!
//! This module owns
//! - [`SharedKey`], the decoded symmetric key of a device, module or access policy;
//! - parsing and rendering of connection strings ([`ConnectionString`],
//!   [`ModuleCredentials`], [`DeviceCredentials`], [`ServiceCredentials`]) following
//!   PROTOCOL.md §1.1;
//! - SAS token signing ([`sign`], [`token`]) with the Python device SDK's `sr` encoding,
//!   and SAS token parsing and verification ([`SasToken`]) as the emulator needs it
//!   (PROTOCOL.md §2.2–2.4).
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
        use rand::RngCore as _;
        let mut bytes = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let base64 = BASE64.encode(&bytes);
        SharedKey { bytes, base64 }
    }

    /// The key exactly as it was given (or, for generated keys, its standard base64).
    /// Only for writing connection strings; never log it.
    pub fn as_base64(&self) -> &str {
        &self.base64
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

// ---------------------------------------------------------------------------------------
// SAS tokens
// ---------------------------------------------------------------------------------------

const SAS_PREFIX: &str = "SharedAccessSignature ";

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Za-z0-9_.-~` is
/// percent-encoded (UTF-8 bytes, upper-case hex).
const QUOTE_SAFE_NOTHING: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');

/// Encodes a resource URI for `sr` the way the Python device SDK does
/// (`quote(uri, safe="")`): `a.b/devices/d` → `a.b%2Fdevices%2Fd`.
pub fn encode_resource_uri(uri: &str) -> String {
    utf8_percent_encode(uri, QUOTE_SAFE_NOTHING).to_string()
}

/// The base64 HMAC-SHA256 signature over `sr_as_transmitted + "\n" + expiry`
/// (PROTOCOL.md §2.2). `sr_as_transmitted` is the already-encoded `sr` text.
pub fn sign(key: &SharedKey, sr_as_transmitted: &str, expiry: u64) -> String {
    let mut mac = key.mac();
    mac.update(sr_as_transmitted.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.to_string().as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Builds `SharedAccessSignature sr=<encoded uri>&sig=<encoded sig>&se=<expiry>[&skn=<policy>]`
/// with the Python device SDK's field order and encoding.
pub fn token(key: &SharedKey, resource_uri: &str, expiry: u64, policy: Option<&str>) -> String {
    let sr = encode_resource_uri(resource_uri);
    let sig = sign(key, &sr, expiry);
    let mut t = format!(
        "{SAS_PREFIX}sr={sr}&sig={}&se={expiry}",
        utf8_percent_encode(&sig, QUOTE_SAFE_NOTHING)
    );
    if let Some(policy) = policy {
        t.push_str("&skn=");
        t.push_str(&utf8_percent_encode(policy, QUOTE_SAFE_NOTHING).to_string());
    }
    t
}

/// Why a SAS token was refused. Messages never contain the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The token text does not follow PROTOCOL.md §2.4; the reason names the field.
    #[error("malformed SAS token: {0}")]
    Malformed(String),
    #[error("SAS token signature does not match")]
    BadSignature,
    #[error("SAS token expired {expired_for_secs} s ago")]
    Expired { expired_for_secs: u64 },
}

/// A parsed `SharedAccessSignature ...` token (emulator side). `Debug` redacts the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as transmitted: the HMAC is computed over this text.
    pub sr_raw: String,
    /// `sr` percent-decoded: what the token grants access to.
    pub resource: String,
    /// `sig` percent-decoded: standard base64.
    pub signature: String,
    /// `se`: seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn`, percent-decoded, for policy tokens.
    pub key_name: Option<String>,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("sr_raw", &self.sr_raw)
            .field("resource", &self.resource)
            .field("signature", &REDACTED)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish()
    }
}

fn malformed(reason: impl Into<String>) -> SasError {
    SasError::Malformed(reason.into())
}

/// Plain percent-decoding (`+` stays `+`), requiring UTF-8.
fn percent_decode_field(field: &str, raw: &str) -> Result<String, SasError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| malformed(format!("{field} is not UTF-8 after percent-decoding")))
}

impl SasToken {
    /// Parses a token: `SharedAccessSignature ` prefix, then `&`-separated fields in any
    /// order, each split on its first `=`. `sr`, `sig`, `se` are required, `skn` is
    /// optional, anything else (or a repeated field) is refused. `se` must be canonical
    /// decimal (no sign, no leading zeros) so that re-rendering it gives the signed text.
    pub fn parse(text: &str) -> Result<SasToken, SasError> {
        let rest = text
            .strip_prefix(SAS_PREFIX)
            .ok_or_else(|| malformed("missing `SharedAccessSignature ` prefix"))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for (index, field) in rest.split('&').enumerate() {
            let position = index + 1;
            if field.is_empty() {
                return Err(malformed(format!("empty field (field {position})")));
            }
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| malformed(format!("field {position} is not `name=value`")))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                other => {
                    return Err(malformed(if echoable_key_name(other, value) {
                        format!("unknown field `{other}`")
                    } else {
                        format!("unknown field (field {position})")
                    }))
                }
            };
            if slot.is_some() {
                return Err(malformed(format!("duplicate field `{name}`")));
            }
            *slot = Some(value);
        }

        let sr_raw = sr.ok_or_else(|| malformed("missing sr"))?;
        let sig_raw = sig.ok_or_else(|| malformed("missing sig"))?;
        let se_raw = se.ok_or_else(|| malformed("missing se"))?;
        if sr_raw.is_empty() {
            return Err(malformed("sr is empty"));
        }
        let resource = percent_decode_field("sr", sr_raw)?;
        let signature = percent_decode_field("sig", sig_raw)?;
        if signature.is_empty() {
            return Err(malformed("sig is empty"));
        }
        if BASE64.decode(&signature).is_err() {
            return Err(malformed("sig is not valid base64"));
        }
        let canonical = !se_raw.is_empty()
            && se_raw.bytes().all(|b| b.is_ascii_digit())
            && (se_raw == "0" || !se_raw.starts_with('0'));
        if !canonical {
            return Err(malformed("se is not a canonical decimal number"));
        }
        let expiry = se_raw
            .parse::<u64>()
            .map_err(|_| malformed("se is out of range"))?;
        let key_name = match skn {
            None => None,
            Some("") => return Err(malformed("skn is empty")),
            Some(raw) => Some(percent_decode_field("skn", raw)?),
        };
        Ok(SasToken {
            sr_raw: sr_raw.to_owned(),
            resource,
            signature,
            expiry,
            key_name,
        })
    }

    /// Checks the signature (HMAC over the raw `sr` + `"\n"` + `se`, compared in constant
    /// time), then the expiry: a token is valid up to and including second `se`.
    pub fn verify(&self, key: &SharedKey, now_unix: u64) -> Result<(), SasError> {
        let presented = BASE64
            .decode(&self.signature)
            .map_err(|_| SasError::BadSignature)?;
        let mut mac = key.mac();
        mac.update(self.sr_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.expiry.to_string().as_bytes());
        mac.verify_slice(&presented)
            .map_err(|_| SasError::BadSignature)?;
        if self.expiry < now_unix {
            return Err(SasError::Expired {
                expired_for_secs: now_unix - self.expiry,
            });
        }
        Ok(())
    }

    /// Whether the token's decoded resource is an ASCII-case-insensitive, path-segment
    /// prefix of `resource`: `a/b` covers `a/b` and `a/b/c`, not `a/bc`.
    pub fn covers(&self, resource: &str) -> bool {
        let granted = self.resource.as_bytes();
        let wanted = resource.as_bytes();
        if granted.is_empty() || wanted.len() < granted.len() {
            return false;
        }
        let (head, tail) = wanted.split_at(granted.len());
        head.eq_ignore_ascii_case(granted)
            && (tail.is_empty() || tail[0] == b'/' || granted.ends_with(b"/"))
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// PROTOCOL.md §2.4: base64 of bytes 0x00..0x1f.
    const VECTOR_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const VECTOR_SE: u64 = 1_700_000_000;
    const MODULE_URI: &str = "myhub.azure-devices.net/devices/dev1/modules/mod1";
    const MODULE_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1&sig=kA6xjFLkZvk4Cdh0nD8uWAzassq6PB47f7BepMMtmlY%3D&se=1700000000";
    const SERVICE_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net&sig=iIzEw6hi6GK79RY5jNXO6QeQkSL/Ax4zTmy44X2G1VY%3D&se=1700000000&skn=iothubowner";

    fn vector_key() -> SharedKey {
        SharedKey::from_base64(VECTOR_KEY).unwrap()
    }

    fn module_string() -> String {
        format!(
            "HostName=myhub.azure-devices.net;DeviceId=dev1;ModuleId=mod1;SharedAccessKey={VECTOR_KEY}"
        )
    }

    fn err(s: &str) -> ConnectionStringError {
        s.parse::<ConnectionString>().unwrap_err()
    }

    fn assert_names_without_key(e: &ConnectionStringError, needle: &str) {
        let text = e.to_string();
        assert!(text.contains(needle), "{text:?} should mention {needle:?}");
        assert!(!text.contains(VECTOR_KEY), "{text:?} leaks the key");
        assert!(!text.contains("AAECAwQF"), "{text:?} leaks part of the key");
        assert!(!format!("{e:?}").contains("AAECAwQF"));
    }

    // --- PROTOCOL.md §2.4 vectors ------------------------------------------------------

    #[test]
    fn vector_key_decodes_to_bytes_0_to_31() {
        assert_eq!(vector_key().bytes, (0u8..32).collect::<Vec<_>>());
        assert_eq!(vector_key().as_base64(), VECTOR_KEY);
    }

    #[test]
    fn module_string_to_sign_matches_python_device_sdk_vector() {
        let sr = encode_resource_uri(MODULE_URI);
        assert_eq!(
            format!("{sr}\n{VECTOR_SE}"),
            "myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1\n1700000000"
        );
    }

    #[test]
    fn module_token_matches_python_device_sdk_vector() {
        assert_eq!(
            token(&vector_key(), MODULE_URI, VECTOR_SE, None),
            MODULE_TOKEN
        );
        let creds: ModuleCredentials = module_string().parse().unwrap();
        assert_eq!(creds.sas_token(VECTOR_SE), MODULE_TOKEN);
    }

    #[test]
    fn python_device_sdk_module_token_parses_and_verifies() {
        let t = SasToken::parse(MODULE_TOKEN).unwrap();
        assert_eq!(t.resource, MODULE_URI);
        assert_eq!(t.signature, "kA6xjFLkZvk4Cdh0nD8uWAzassq6PB47f7BepMMtmlY=");
        assert_eq!(t.key_name, None);
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
        assert!(t.covers(MODULE_URI));
    }

    #[test]
    fn token_with_lower_case_percent_2f_sr_verifies_against_raw_sr() {
        let sr = "myhub.azure-devices.net%2fdevices%2fdev1%2fmodules%2fmod1";
        assert_eq!(
            sign(&vector_key(), sr, VECTOR_SE),
            "bPFfnhAtwCRVWbKipGC3EYoJn5w8lbYcgcffN44jlHU="
        );
        let text = format!(
            "SharedAccessSignature sr={sr}&sig=bPFfnhAtwCRVWbKipGC3EYoJn5w8lbYcgcffN44jlHU%3D&se=1700000000"
        );
        let t = SasToken::parse(&text).unwrap();
        assert_eq!(t.resource, MODULE_URI);
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
        assert!(t.covers(MODULE_URI));
    }

    #[test]
    fn token_with_raw_slash_sr_verifies() {
        assert_eq!(
            sign(&vector_key(), MODULE_URI, VECTOR_SE),
            "I4aVKG2QTuLR9lAIk6VVxJTOm8T3kpO12u6pE2eyRIk="
        );
        // sig field order differs from the SDK's and `=` is left raw: both allowed.
        let text = format!(
            "SharedAccessSignature sig=I4aVKG2QTuLR9lAIk6VVxJTOm8T3kpO12u6pE2eyRIk=&se=1700000000&sr={MODULE_URI}"
        );
        let t = SasToken::parse(&text).unwrap();
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
        assert!(t.covers(MODULE_URI));
    }

    #[test]
    fn service_sdk_token_with_raw_slash_in_sig_parses_and_verifies_with_skn() {
        let t = SasToken::parse(SERVICE_TOKEN).unwrap();
        assert_eq!(t.resource, "myhub.azure-devices.net");
        assert_eq!(t.key_name.as_deref(), Some("iothubowner"));
        assert_eq!(t.signature, "iIzEw6hi6GK79RY5jNXO6QeQkSL/Ax4zTmy44X2G1VY=");
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));

        let creds: ServiceCredentials = format!(
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey={VECTOR_KEY}"
        )
        .parse()
        .unwrap();
        // Ours percent-encodes `/` in sig; same signature, so it verifies identically.
        let ours = SasToken::parse(&creds.sas_token(VECTOR_SE)).unwrap();
        assert_eq!(ours.signature, t.signature);
        assert_eq!(ours.key_name.as_deref(), Some("iothubowner"));
        assert_eq!(ours.verify(&vector_key(), VECTOR_SE), Ok(()));
    }

    #[test]
    fn service_token_for_host_with_port_encodes_colon() {
        let creds: ServiceCredentials = format!(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={VECTOR_KEY}"
        )
        .parse()
        .unwrap();
        let text = creds.sas_token(VECTOR_SE);
        assert!(text.starts_with("SharedAccessSignature sr=localhost%3A8443&sig="));
        assert!(text.ends_with("&se=1700000000&skn=iothubowner"));
        let t = SasToken::parse(&text).unwrap();
        assert_eq!(t.resource, "localhost:8443");
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
    }

    #[test]
    fn encode_resource_uri_matches_python_quote_with_nothing_safe() {
        assert_eq!(encode_resource_uri("aZ09_.-~"), "aZ09_.-~");
        assert_eq!(
            encode_resource_uri("a/b:c d+e=f&g%h é"),
            "a%2Fb%3Ac%20d%2Be%3Df%26g%25h%20%C3%A9"
        );
    }

    // --- connection strings ------------------------------------------------------------

    #[test]
    fn module_connection_string_parses_and_round_trips() {
        let ConnectionString::Module(m) = module_string().parse().unwrap() else {
            panic!("expected module");
        };
        assert_eq!(m.host_name, "myhub.azure-devices.net");
        assert_eq!(m.device_id, "dev1");
        assert_eq!(m.module_id, "mod1");
        assert_eq!(m.key, vector_key());
        assert_eq!(m.gateway_host_name, None);
        assert_eq!(m.resource_uri(), MODULE_URI);
        assert_eq!(m.connect_host(), "myhub.azure-devices.net");
        assert_eq!(m.to_connection_string(), module_string());
    }

    #[test]
    fn module_connection_string_with_gateway_connects_to_gateway_but_signs_for_hub() {
        let s = format!("{};GatewayHostName=localhost", module_string());
        let m: ModuleCredentials = s.parse().unwrap();
        assert_eq!(m.gateway_host_name.as_deref(), Some("localhost"));
        assert_eq!(m.connect_host(), "localhost");
        assert_eq!(m.resource_uri(), MODULE_URI);
        assert_eq!(m.sas_token(VECTOR_SE), MODULE_TOKEN);
        assert_eq!(m.to_connection_string(), s);
    }

    #[test]
    fn keys_may_appear_in_any_order_and_split_on_first_equals() {
        let s = format!(
            "SharedAccessKey={VECTOR_KEY};ModuleId=mod1;DeviceId=dev1;HostName=myhub.azure-devices.net"
        );
        let m: ModuleCredentials = s.parse().unwrap();
        assert_eq!(m.key.as_base64(), VECTOR_KEY);
        assert_eq!(m.to_connection_string(), module_string());
    }

    #[test]
    fn device_connection_string_parses_with_and_without_gateway() {
        let s = format!("HostName=localhost;DeviceId=dev1;SharedAccessKey={VECTOR_KEY}");
        let ConnectionString::Device(d) = s.parse().unwrap() else {
            panic!("expected device");
        };
        assert_eq!(d.host_name, "localhost");
        assert_eq!(d.device_id, "dev1");
        assert_eq!(d.resource_uri(), "localhost/devices/dev1");
        assert_eq!(d.connect_host(), "localhost");
        assert_eq!(d.to_connection_string(), s);
        let t = SasToken::parse(&d.sas_token(VECTOR_SE)).unwrap();
        assert_eq!(t.resource, "localhost/devices/dev1");
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));

        let gw = format!("{s};GatewayHostName=edge.local");
        let d: DeviceCredentials = gw.parse().unwrap();
        assert_eq!(d.connect_host(), "edge.local");
        assert_eq!(d.to_connection_string(), gw);
    }

    #[test]
    fn service_connection_string_with_port_parses_and_round_trips() {
        let s = format!(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={VECTOR_KEY}"
        );
        let ConnectionString::Service(c) = s.parse().unwrap() else {
            panic!("expected service");
        };
        assert_eq!(c.host_name, "localhost:8443");
        assert_eq!(c.policy_name, "iothubowner");
        assert_eq!(c.to_connection_string(), s);
        assert_eq!(
            s.parse::<ConnectionString>()
                .unwrap()
                .to_connection_string(),
            s
        );
    }

    #[test]
    fn device_string_with_shared_access_key_name_is_still_a_device() {
        let s = format!(
            "HostName=h;DeviceId=d;SharedAccessKeyName=ignored;SharedAccessKey={VECTOR_KEY}"
        );
        assert!(matches!(s.parse().unwrap(), ConnectionString::Device(_)));
    }

    #[test]
    fn wrong_kind_says_what_was_expected() {
        let device = format!("HostName=h;DeviceId=d;SharedAccessKey={VECTOR_KEY}");
        let e = device.parse::<ModuleCredentials>().unwrap_err();
        assert_names_without_key(
            &e,
            "expected a module connection string (DeviceId and ModuleId)",
        );
        assert_names_without_key(&e, "found a device connection string");

        let e = module_string().parse::<ServiceCredentials>().unwrap_err();
        assert_names_without_key(&e, "expected a service connection string");
        assert_names_without_key(&e, "found a module connection string");

        let e = module_string().parse::<DeviceCredentials>().unwrap_err();
        assert_names_without_key(&e, "expected a device connection string");
    }

    #[test]
    fn invalid_base64_key_is_named_without_echoing_it() {
        let bad = "AAECAwQF!!notbase64";
        let e = err(&format!("HostName=h;DeviceId=d;SharedAccessKey={bad}"));
        assert_eq!(e, ConnectionStringError::InvalidKey);
        assert_names_without_key(&e, "SharedAccessKey is not valid base64");
        assert!(!e.to_string().contains("notbase64"));
    }

    #[test]
    fn missing_fields_are_named() {
        let e = err(&format!("DeviceId=d;SharedAccessKey={VECTOR_KEY}"));
        assert_names_without_key(&e, "missing HostName");
        let e = err("HostName=h;DeviceId=d");
        assert_names_without_key(&e, "missing SharedAccessKey");
        let e = err(&format!(
            "HostName=h;ModuleId=m;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "missing DeviceId");
        let e = err(&format!("HostName=h;SharedAccessKey={VECTOR_KEY}"));
        assert_names_without_key(&e, "missing DeviceId");
        assert_names_without_key(&e, "SharedAccessKeyName");
    }

    #[test]
    fn empty_values_are_named() {
        let e = err(&format!(
            "HostName=;DeviceId=d;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "HostName is empty");
        let e = err(&format!(
            "HostName=h;DeviceId=d;ModuleId=;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "ModuleId is empty");
        let e = err("HostName=h;DeviceId=d;SharedAccessKey=");
        assert_names_without_key(&e, "SharedAccessKey is empty");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!(
            "HostName=h;DeviceId=d;Foo=bar;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "unknown key `Foo`");
        // Keys are case-sensitive.
        let e = err(&format!(
            "hostname=h;DeviceId=d;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "unknown key `hostname`");
    }

    #[test]
    fn key_pasted_without_its_name_is_not_echoed_as_an_unknown_key() {
        let e = err(&format!("HostName=h;DeviceId=d;{VECTOR_KEY}"));
        assert!(matches!(
            e,
            ConnectionStringError::UnknownKey { name: None }
        ));
        assert_names_without_key(&e, "unknown key");
        // Also for a padded key whose head happens to be short and identifier-like.
        let e = err("HostName=h;DeviceId=d;AAECAwQFBgcICQoLDA0ODx==");
        assert!(!e.to_string().contains("AAECAwQF"));
    }

    #[test]
    fn duplicate_key_is_named() {
        let e = err(&format!(
            "HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_eq!(e, ConnectionStringError::DuplicateKey { key: "DeviceId" });
        assert_names_without_key(&e, "duplicate key `DeviceId`");
        let e = err(&format!(
            "HostName=h;DeviceId=d;SharedAccessKey={VECTOR_KEY};SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "duplicate key `SharedAccessKey`");
    }

    #[test]
    fn trailing_or_doubled_semicolon_is_an_empty_segment() {
        let e = err(&format!("{};", module_string()));
        assert_eq!(e, ConnectionStringError::EmptySegment { position: 5 });
        assert_names_without_key(&e, "empty segment");
        let e = err(&format!(
            "HostName=h;;DeviceId=d;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "empty segment (segment 2)");
        assert_eq!(err(""), ConnectionStringError::Empty);
    }

    #[test]
    fn segment_without_equals_is_rejected_by_position() {
        let e = err(&format!("HostName=h;DeviceId;SharedAccessKey={VECTOR_KEY}"));
        assert_eq!(e, ConnectionStringError::NotKeyValue { position: 2 });
        assert_names_without_key(&e, "segment 2");
    }

    #[test]
    fn x509_and_sas_strings_are_refused_by_name() {
        let e = err("HostName=h;DeviceId=d;x509=true");
        assert_names_without_key(&e, "x509 authentication is not supported");
        let e = err(&format!(
            "HostName=h;DeviceId=d;x509=true;SharedAccessKey={VECTOR_KEY}"
        ));
        assert_names_without_key(&e, "mixed authentication");
        let e = err("HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h");
        assert_names_without_key(&e, "SharedAccessSignature authentication is not supported");
    }

    #[test]
    fn gateway_host_name_is_refused_in_a_service_string() {
        let e = err(&format!(
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey={VECTOR_KEY};GatewayHostName=g"
        ));
        assert_names_without_key(&e, "GatewayHostName is not allowed");
    }

    #[test]
    fn debug_of_keys_and_every_credential_type_redacts_the_key() {
        let key = vector_key();
        assert_eq!(format!("{key:?}"), "SharedKey(<redacted>)");
        let module: ConnectionString = format!("{};GatewayHostName=g", module_string())
            .parse()
            .unwrap();
        let device: ConnectionString =
            format!("HostName=h;DeviceId=d;SharedAccessKey={VECTOR_KEY}")
                .parse()
                .unwrap();
        let service: ConnectionString =
            format!("HostName=h;SharedAccessKeyName=p;SharedAccessKey={VECTOR_KEY}")
                .parse()
                .unwrap();
        for cs in [&module, &device, &service] {
            for text in [format!("{cs:?}"), format!("{cs:#?}")] {
                assert!(!text.contains("AAECAwQF"), "{text}");
                assert!(text.contains("<redacted>"), "{text}");
            }
        }
        let ConnectionString::Module(m) = module else {
            unreachable!()
        };
        assert!(!format!("{m:?}").contains("AAECAwQF"));
    }

    #[test]
    fn generated_keys_are_32_random_bytes_and_round_trip_through_base64() {
        let a = SharedKey::generate();
        let b = SharedKey::generate();
        assert_eq!(a.bytes.len(), 32);
        assert_ne!(a, b);
        assert_eq!(SharedKey::from_base64(a.as_base64()).unwrap(), a);
    }

    // --- SAS parsing, verification, expiry, scope --------------------------------------

    #[test]
    fn token_is_valid_through_its_expiry_second_and_expired_after() {
        let t = SasToken::parse(MODULE_TOKEN).unwrap();
        assert_eq!(t.verify(&vector_key(), 0), Ok(()));
        assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
        assert_eq!(
            t.verify(&vector_key(), VECTOR_SE + 90),
            Err(SasError::Expired {
                expired_for_secs: 90
            })
        );
    }

    #[test]
    fn wrong_key_or_tampered_fields_give_bad_signature() {
        let t = SasToken::parse(MODULE_TOKEN).unwrap();
        assert_eq!(
            t.verify(&SharedKey::generate(), VECTOR_SE),
            Err(SasError::BadSignature)
        );
        let mut later = t.clone();
        later.expiry += 1;
        assert_eq!(later.verify(&vector_key(), 0), Err(SasError::BadSignature));
        let mut other = t.clone();
        other.sr_raw = other.sr_raw.replace("dev1", "dev2");
        assert_eq!(other.verify(&vector_key(), 0), Err(SasError::BadSignature));
    }

    #[test]
    fn bad_signature_beats_expiry() {
        let t = SasToken::parse(MODULE_TOKEN).unwrap();
        assert_eq!(
            t.verify(&SharedKey::generate(), u64::MAX),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_named_reason() {
        let cases = [
            ("sr=a&sig=AAAA&se=1", "prefix"),
            ("SharedAccessSignature sig=AAAA&se=1", "missing sr"),
            ("SharedAccessSignature sr=a&se=1", "missing sig"),
            ("SharedAccessSignature sr=a&sig=AAAA", "missing se"),
            (
                "SharedAccessSignature sr=a&sig=AAAA&se=1&foo=x",
                "unknown field `foo`",
            ),
            (
                "SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1",
                "duplicate field `sr`",
            ),
            ("SharedAccessSignature sr=a&sig=AAAA&se=1&", "empty field"),
            ("SharedAccessSignature sr=a&sig&se=1", "field 2"),
            ("SharedAccessSignature sr=a&sig=AAAA&se=-1", "se"),
            ("SharedAccessSignature sr=a&sig=AAAA&se=+1", "se"),
            ("SharedAccessSignature sr=a&sig=AAAA&se=01", "se"),
            (
                "SharedAccessSignature sr=a&sig=AAAA&se=99999999999999999999",
                "se",
            ),
            (
                "SharedAccessSignature sr=a&sig=!!!&se=1",
                "sig is not valid base64",
            ),
            ("SharedAccessSignature sr=&sig=AAAA&se=1", "sr is empty"),
            (
                "SharedAccessSignature sr=a&sig=AAAA&se=1&skn=",
                "skn is empty",
            ),
            (
                "SharedAccessSignature sr=%FF&sig=AAAA&se=1",
                "sr is not UTF-8",
            ),
        ];
        for (text, needle) in cases {
            match SasToken::parse(text) {
                Err(SasError::Malformed(reason)) => {
                    assert!(
                        reason.contains(needle),
                        "{text:?}: {reason:?} lacks {needle:?}"
                    )
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn plus_in_sig_is_not_decoded_as_space() {
        let t = SasToken::parse("SharedAccessSignature sr=a&sig=ab+/&se=1").unwrap();
        assert_eq!(t.signature, "ab+/");
    }

    #[test]
    fn sas_token_debug_redacts_the_signature() {
        let t = SasToken::parse(MODULE_TOKEN).unwrap();
        let text = format!("{t:?}");
        assert!(!text.contains("kA6xjFLk"), "{text}");
        assert!(text.contains("<redacted>"));
        assert!(text.contains("dev1"));
    }

    #[test]
    fn covers_is_a_case_insensitive_path_segment_prefix() {
        let t = SasToken::parse(&token(&vector_key(), "Hub.net/devices/Dev1", 1, None)).unwrap();
        assert!(t.covers("Hub.net/devices/Dev1"));
        assert!(t.covers("hub.NET/devices/dev1"));
        assert!(t.covers("Hub.net/devices/Dev1/modules/m"));
        assert!(!t.covers("Hub.net/devices/Dev10"));
        assert!(!t.covers("Hub.net/devices/Dev1x/modules/m"));
        assert!(!t.covers("Hub.net/devices"));
        assert!(!t.covers("Other.net/devices/Dev1"));
        let hub = SasToken::parse(&token(&vector_key(), "Hub.net", 1, Some("p"))).unwrap();
        assert!(hub.covers("hub.net/devices/x/modules/y"));
        assert!(!hub.covers("hub.network"));
        let slash = SasToken::parse(&token(&vector_key(), "Hub.net/devices/", 1, None)).unwrap();
        assert!(slash.covers("hub.net/devices/x"));
    }

    // --- properties --------------------------------------------------------------------

    /// Characters IoT Hub allows in device and module ids, plus some that need encoding.
    const ID: &str = "[A-Za-z0-9\\-.%_*?!(),:=@$' +é]{1,40}";

    proptest! {
        #[test]
        fn signed_tokens_parse_verify_and_cover_their_resource(
            key_bytes in proptest::collection::vec(any::<u8>(), 1..80),
            host in "[a-z0-9.-]{1,30}(:[0-9]{1,5})?",
            device in ID,
            module in ID,
            expiry in any::<u64>(),
            policy in proptest::option::of("[A-Za-z0-9_+/ -]{1,20}"),
        ) {
            let key = SharedKey::from_base64(&BASE64.encode(&key_bytes)).unwrap();
            let uri = format!("{host}/devices/{device}/modules/{module}");
            let text = token(&key, &uri, expiry, policy.as_deref());
            let t = SasToken::parse(&text).unwrap();
            prop_assert_eq!(&t.resource, &uri);
            prop_assert_eq!(t.expiry, expiry);
            prop_assert_eq!(&t.key_name, &policy);
            prop_assert_eq!(t.verify(&key, expiry), Ok(()));
            prop_assert!(t.covers(&uri));
            let below = format!("{uri}/more");
            let sibling = format!("{uri}x");
            prop_assert!(t.covers(&below));
            prop_assert!(!t.covers(&sibling));
        }

        #[test]
        fn module_connection_strings_round_trip(
            key_bytes in proptest::collection::vec(any::<u8>(), 1..80),
            host in "[a-z0-9.-]{1,30}",
            device in "[A-Za-z0-9\\-.%_*?!(),:@$']{1,40}",
            module in "[A-Za-z0-9\\-.%_*?!(),:@$']{1,40}",
            gateway in proptest::option::of("[a-z0-9.-]{1,30}"),
        ) {
            let key = SharedKey::from_base64(&BASE64.encode(&key_bytes)).unwrap();
            let creds = ModuleCredentials {
                host_name: host,
                device_id: device,
                module_id: module,
                key,
                gateway_host_name: gateway,
            };
            let parsed: ModuleCredentials = creds.to_connection_string().parse().unwrap();
            prop_assert_eq!(parsed, creds);
        }

        #[test]
        fn parsers_never_panic_on_arbitrary_input(s in "\\PC*") {
            let _ = s.parse::<ConnectionString>();
            let _ = s.parse::<ModuleCredentials>();
            let _ = SasToken::parse(&s);
            let _ = SasToken::parse(&format!("SharedAccessSignature {s}"));
            let _ = SharedKey::from_base64(&s);
        }

        #[test]
        fn parsers_never_panic_on_structured_noise(
            s in "(HostName|DeviceId|ModuleId|SharedAccessKey|SharedAccessKeyName|GatewayHostName|x509|sr|sig|se|skn|[=;& %A-Za-z0-9+/])*"
        ) {
            let _ = s.parse::<ConnectionString>();
            if let Ok(t) = SasToken::parse(&format!("SharedAccessSignature {s}")) {
                let _ = t.verify(&SharedKey::generate(), 0);
                let _ = t.covers(&s);
            }
        }

        #[test]
        fn connection_string_errors_never_contain_the_key(
            key_bytes in proptest::collection::vec(any::<u8>(), 16..64),
            mutation in 0usize..6,
        ) {
            let k = BASE64.encode(&key_bytes);
            let s = match mutation {
                0 => format!("HostName=h;DeviceId=d;{k}"),
                1 => format!("HostName=h;{k};DeviceId=d"),
                2 => format!("HostName=h;DeviceId=d;SharedAccessKey={k};"),
                3 => format!("HostName=h;DeviceId=d;SharedAccessKey={k}!"),
                4 => format!("DeviceId=d;SharedAccessKey={k}"),
                _ => format!("HostName=h;SharedAccessKey={k};Bogus={k}"),
            };
            let e = s.parse::<ConnectionString>().unwrap_err();
            // Any 8-character window of the key would be a leak.
            let text = format!("{e} {e:?}");
            for window in k.as_bytes().windows(8) {
                let w = std::str::from_utf8(window).unwrap();
                prop_assert!(!text.contains(w), "{} leaks {}", text, w);
            }
        }
    }
}
