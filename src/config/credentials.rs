//! Where connection strings come from, and reading them without ever showing them.
//!
//! `config` decides the [`CredentialSource`] at load time (parsing an inline one there);
//! [`CredentialSource::read_as`] reads and parses it, with `identity`'s parser, when the
//! daemon or `check-config` needs it. A problem names the setting and the file, never
//! the content. Nothing here prints a connection string.
//!
//! systemd credentials: the packaged unit hands each optional secret over with
//! `LoadCredential=NAME:/etc/edgetwin/FILE` plus `SetCredential=NAME:absent` as the
//! fallback systemd uses when the file does not exist (an absolute `LoadCredential=`
//! source that is missing fails the unit on systemd 252). A credential whose content is
//! [`SYSTEMD_CREDENTIAL_ABSENT`] is therefore treated as not supplied.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::errors::ConfigErrors;
use super::{DpsKeyKind, ProvisioningMethod};
use crate::identity::{ConnectionStringError, SharedKey};

/// File name of the module credential in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
pub const SYSTEMD_MODULE_CREDENTIAL: &str = "module-connection-string";
/// File name of the service credential in `$CREDENTIALS_DIRECTORY`.
pub const SYSTEMD_SERVICE_CREDENTIAL: &str = "service-connection-string";
/// File name of the device credential (`method = "device"`) in `$CREDENTIALS_DIRECTORY`.
pub const SYSTEMD_DEVICE_CREDENTIAL: &str = "device-connection-string";
/// File names of the DPS individual-enrollment key and enrollment-group key.
pub const SYSTEMD_DPS_SYMMETRIC_KEY: &str = "dps-symmetric-key";
pub const SYSTEMD_DPS_GROUP_KEY: &str = "dps-group-key";
/// Content of a systemd credential that stands for "not supplied" (the unit's
/// `SetCredential=` fallback for a missing file).
pub const SYSTEMD_CREDENTIAL_ABSENT: &str = "absent";
/// File name of the module credential that provisioning writes into the state dir.
pub const PROVISIONED_MODULE_CREDENTIAL: &str = "module.connstr";

pub(crate) const REDACTED: &str = "<redacted>";

/// A secret string whose `Debug` and `Display` never show it. Compared by value (so a
/// reload notices a changed one), in time independent of where two values differ.
#[derive(Clone)]
pub struct Secret(String);

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
    }
}

impl Eq for Secret {}

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    /// The secret itself, for the one place that signs with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Which of the documented places a connection string is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// Written in the config itself (`hub.connection_string`).
    Inline(Secret),
    /// A file named by the config (`hub.connection_string_file`).
    File(PathBuf),
    /// A systemd credential, `$CREDENTIALS_DIRECTORY/<name>`.
    SystemdCredential(PathBuf),
    /// `<state.dir>/module.connstr`, written by provisioning; may not exist yet.
    Provisioned(PathBuf),
}

impl CredentialSource {
    /// The file this source reads, if it is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            CredentialSource::Inline(_) => None,
            CredentialSource::File(p)
            | CredentialSource::SystemdCredential(p)
            | CredentialSource::Provisioned(p) => Some(p),
        }
    }

    /// The connection string text, trimmed. `Ok(None)` only for a provisioned credential
    /// that provisioning has not written yet. `key` names the setting in errors.
    pub fn read(&self, key: &str) -> Result<Option<String>, ConfigErrors> {
        let path = match self {
            CredentialSource::Inline(secret) => return Ok(Some(secret.expose().trim().to_owned())),
            CredentialSource::Provisioned(path) if !path.exists() => return Ok(None),
            CredentialSource::File(path)
            | CredentialSource::SystemdCredential(path)
            | CredentialSource::Provisioned(path) => path,
        };
        let origin = Some(path.display().to_string());
        // The error text names the file and the OS reason only; never the content.
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::single(key, origin.clone(), format!("cannot read: {e}")))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(ConfigErrors::single(key, origin, "file is empty"));
        }
        Ok(Some(text.to_owned()))
    }
}

impl CredentialSource {
    /// [`Self::read`], then decoded as a base64 symmetric key (DPS enrollment keys).
    pub fn read_key(&self, key: &str) -> Result<Option<SharedKey>, ConfigErrors> {
        let Some(text) = self.read(key)? else {
            return Ok(None);
        };
        let origin = self.path().map(|p| p.display().to_string());
        SharedKey::from_base64(&text)
            .map(Some)
            .map_err(|e| ConfigErrors::single(key, origin, e.to_string()))
    }

    /// [`Self::read`], then parsed as the connection string kind `T`. A parse problem
    /// is named by `key` and, for a file, the file; the message never quotes the text.
    pub fn read_as<T>(&self, key: &str) -> Result<Option<T>, ConfigErrors>
    where
        T: FromStr<Err = ConnectionStringError>,
    {
        let Some(text) = self.read(key)? else {
            return Ok(None);
        };
        let origin = self.path().map(|p| p.display().to_string());
        text.parse()
            .map(Some)
            .map_err(|e: ConnectionStringError| ConfigErrors::single(key, origin, e.to_string()))
    }
}

/// The setting a module credential is named by in problems.
pub fn module_key(source: &CredentialSource) -> &'static str {
    match source {
        CredentialSource::Inline(_) => "hub.connection_string",
        CredentialSource::File(_) => "hub.connection_string_file",
        CredentialSource::SystemdCredential(_) => "$CREDENTIALS_DIRECTORY/module-connection-string",
        CredentialSource::Provisioned(_) => "state.dir/module.connstr",
    }
}

/// The setting a service credential is named by in problems.
pub fn service_key(source: &CredentialSource) -> &'static str {
    match source {
        CredentialSource::Inline(_) => "provisioning.service_connection_string",
        CredentialSource::File(_) => "provisioning.service_connection_string_file",
        _ => "$CREDENTIALS_DIRECTORY/service-connection-string",
    }
}

/// The setting a device credential is named by in problems.
pub fn device_key(source: &CredentialSource) -> &'static str {
    match source {
        CredentialSource::Inline(_) => "provisioning.device_connection_string",
        CredentialSource::File(_) => "provisioning.device_connection_string_file",
        _ => "$CREDENTIALS_DIRECTORY/device-connection-string",
    }
}

/// The setting to name, and what to say, when the secret `method` provisions with is not
/// configured at all. One text for `load`, `check-config` and `run`.
pub fn missing_secret(method: ProvisioningMethod) -> (&'static str, &'static str) {
    match method {
        ProvisioningMethod::Service => (
            "provisioning.service_connection_string_file",
            "provisioning method \"service\" needs a service connection string: set \
             provisioning.service_connection_string_file or pass the systemd credential \
             service-connection-string",
        ),
        ProvisioningMethod::Device => (
            "provisioning.device_connection_string_file",
            "provisioning method \"device\" needs this device's connection string: set \
             provisioning.device_connection_string_file or pass the systemd credential \
             device-connection-string",
        ),
        ProvisioningMethod::Dps => (
            "provisioning.dps.symmetric_key_file",
            "provisioning method \"dps\" needs an enrollment key: set \
             provisioning.dps.symmetric_key_file or group_key_file, or pass the systemd \
             credential dps-symmetric-key or dps-group-key",
        ),
        ProvisioningMethod::None => (
            "hub.connection_string_file",
            "no module credentials, and no [provisioning] method to create them",
        ),
    }
}

/// The setting a DPS enrollment key is named by in problems.
pub fn dps_key_setting(kind: DpsKeyKind, source: &CredentialSource) -> &'static str {
    match (kind, source) {
        (DpsKeyKind::Individual, CredentialSource::File(_)) => {
            "provisioning.dps.symmetric_key_file"
        }
        (DpsKeyKind::Group, CredentialSource::File(_)) => "provisioning.dps.group_key_file",
        (DpsKeyKind::Individual, _) => "$CREDENTIALS_DIRECTORY/dps-symmetric-key",
        (DpsKeyKind::Group, _) => "$CREDENTIALS_DIRECTORY/dps-group-key",
    }
}

/// `$CREDENTIALS_DIRECTORY/<name>` when systemd passed that credential, and it is not
/// the unit's [`SYSTEMD_CREDENTIAL_ABSENT`] stand-in. Only that word is compared; the
/// content is not kept.
pub(crate) fn systemd_credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = Path::new(&dir).join(name);
    if !path.is_file() {
        return None;
    }
    // An unreadable credential is passed on, so that reading it reports why.
    let absent = std::fs::read(&path)
        .is_ok_and(|bytes| bytes.trim_ascii() == SYSTEMD_CREDENTIAL_ABSENT.as_bytes());
    (!absent).then_some(path)
}

/// Picks the source among an inline secret, a file, and the systemd credential `name`,
/// in that order of precedence. Both inline and file set is refused: which one the
/// operator meant cannot be guessed, and the wrong guess would connect as someone else.
pub(crate) fn choose(
    inline: (&str, &str),
    file: (&str, &str),
    systemd_name: &str,
    origin: impl Fn(&str) -> Option<String>,
    errors: &mut ConfigErrors,
) -> Option<CredentialSource> {
    let (inline_key, inline) = inline;
    let (file_key, file) = file;
    match (inline.trim().is_empty(), file.trim().is_empty()) {
        (false, false) => {
            errors.push(
                inline_key,
                origin(inline_key),
                format!("set either {inline_key} or {file_key}, not both"),
            );
            None
        }
        (false, true) => Some(CredentialSource::Inline(Secret::new(inline.trim()))),
        (true, false) => Some(CredentialSource::File(PathBuf::from(file.trim()))),
        (true, true) => systemd_credential(systemd_name).map(CredentialSource::SystemdCredential),
    }
}
