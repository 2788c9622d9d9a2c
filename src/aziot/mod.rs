//! The module identity from the Azure IoT Identity Service, on IoT Edge 1.2+ hosts
//! (`[aziot] enabled = true`; PROTOCOL §13, DESIGN §4).
//!
//! edgetwin is declared a principal of aziot-identityd; [`AziotClient::identity`] asks
//! identityd who it is (`GET /identities/identity`: hub, device, module, generation and
//! the handle of the module key) and [`AziotClient::sas_token`] has aziot-keyd sign each
//! SAS token with that handle (`POST /sign`). No key is ever on edgetwin's side. The
//! session asks again before every connect and renewal (a re-created module has a new
//! generation and key handle) and never otherwise: each identity request may cost
//! identityd a registry read in the hub.
//!
//! - [`http`]: one HTTP/1.1 request over a Unix socket, with a timeout and a body cap.
//! - [`wire`]: the JSON both ways, parsed into typed values, never a panic.
//!
//! Errors are typed ([`AziotError`]) and name what the operator must do: install and
//! configure IoT Edge, join a group, or write the principal file. Neither the key handle
//! (enough to have keyd sign) nor a token is ever logged or shown.

pub mod http;
pub mod wire;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;

use crate::identity::{encode_resource_uri, string_to_sign, token_with_signature, ModuleIdentity};

/// Where edgetwin's principal is declared (PROTOCOL §13.1), named in errors and docs.
pub const PRINCIPAL_FILE: &str = "/etc/aziot/identityd/config.d/edgetwin.toml";
/// Default sockets of the services (their systemd socket units).
pub const IDENTITYD_SOCKET: &str = "/run/aziot/identityd.sock";
pub const KEYD_SOCKET: &str = "/run/aziot/keyd.sock";
/// Longest one request may take: a local service that has not answered by then is stuck
/// (identityd's own hub request has a shorter timeout and falls back to its cache).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Which of the two services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Identityd,
    Keyd,
}

impl Service {
    /// The group whose members may open the service's socket.
    pub fn group(self) -> &'static str {
        match self {
            Service::Identityd => "aziotid",
            Service::Keyd => "aziotks",
        }
    }

    fn host(self) -> &'static str {
        match self {
            Service::Identityd => "identityd.sock",
            Service::Keyd => "keyd.sock",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Identityd => "aziot-identityd",
            Service::Keyd => "aziot-keyd",
        })
    }
}

/// Why no identity or signature came from the Identity Service. Never carries a key
/// handle or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AziotError {
    #[error(
        "{service} socket {} does not exist: [aziot] needs IoT Edge (the Azure IoT Identity \
         Service) installed and configured on this host (`iotedge config apply`)",
        socket.display()
    )]
    SocketMissing { service: Service, socket: PathBuf },
    #[error(
        "permission denied on the {service} socket {}: the edgetwin user must be in group \
         {group} (`usermod -aG {group} edgetwin`, or SupplementaryGroups= in the unit's \
         aziot drop-in), then restart edgetwin",
        socket.display(),
        group = service.group()
    )]
    PermissionDenied { service: Service, socket: PathBuf },
    /// Nobody answers, the answer broke off, or it took too long: may pass.
    #[error("{service} at {}: {reason}", socket.display())]
    Unavailable {
        service: Service,
        socket: PathBuf,
        reason: String,
    },
    #[error(
        "aziot-identityd does not give this process a module identity (HTTP {status}: \
         {message}): declare edgetwin's user as a module principal in {PRINCIPAL_FILE} \
         ([[principal]] uid = <uid of edgetwin>, name = \"edgetwin\", idtype = [\"module\"]; \
         owner aziotid, mode 0600)"
    )]
    NotPrincipal { status: u16, message: String },
    #[error("{service} answered HTTP {status}: {message}")]
    Refused {
        service: Service,
        status: u16,
        message: String,
    },
    #[error("{service} sent an answer edgetwin cannot use: {reason}")]
    Malformed { service: Service, reason: String },
    #[error("aziot-identityd gives no identity edgetwin can use: {0}")]
    Unsupported(String),
}

impl AziotError {
    /// Whether waiting may help, without anyone changing the host's configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            AziotError::Unavailable { .. } | AziotError::Malformed { .. } => true,
            AziotError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// The handle of the module key in aziot-keyd. Whoever holds it can have keyd sign with
/// the key, so it is treated as a secret: `Debug` redacts it, there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHandle(String);

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHandle(<redacted>)")
    }
}

/// What identityd says this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AziotIdentity {
    pub identity: ModuleIdentity,
    /// The module's generation: a new one when the module was deleted and re-created.
    pub gen_id: Option<String>,
    pub key_handle: KeyHandle,
}

/// The two sockets; cheap to clone. Each call opens its own connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AziotClient {
    identityd: PathBuf,
    keyd: PathBuf,
    timeout: Duration,
}

impl AziotClient {
    pub fn new(identityd: impl Into<PathBuf>, keyd: impl Into<PathBuf>) -> Self {
        AziotClient {
            identityd: identityd.into(),
            keyd: keyd.into(),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// With another limit per request (tests of a service that never answers).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn identityd_socket(&self) -> &Path {
        &self.identityd
    }

    pub fn keyd_socket(&self) -> &Path {
        &self.keyd
    }

    /// `GET /identities/identity`: this process's module identity, asked anew.
    pub async fn identity(&self) -> Result<AziotIdentity, AziotError> {
        let (status, body) = http::exchange(
            Service::Identityd,
            &self.identityd,
            Method::GET,
            wire::IDENTITY_PATH,
            None,
            self.timeout,
        )
        .await?;
        wire::parse_identity(status, &body)
    }

    /// `POST /sign`: keyd's HMAC-SHA256 over `message` with the key behind `handle`,
    /// standard base64.
    pub async fn sign(&self, handle: &KeyHandle, message: &[u8]) -> Result<String, AziotError> {
        let (status, body) = http::exchange(
            Service::Keyd,
            &self.keyd,
            Method::POST,
            wire::SIGN_PATH,
            Some(wire::sign_request(handle, message)),
            self.timeout,
        )
        .await?;
        wire::parse_signature(status, &body)
    }

    /// A module SAS token for `identity` valid until `expiry`, signed by keyd: `sr` is
    /// the hub's resource URI (never the gateway's), encoded as the SDKs do (PROTOCOL §13.4).
    pub async fn sas_token(
        &self,
        identity: &AziotIdentity,
        expiry: u64,
    ) -> Result<String, AziotError> {
        let uri = identity.identity.resource_uri();
        let message = string_to_sign(&encode_resource_uri(&uri), expiry);
        let signature = self.sign(&identity.key_handle, message.as_bytes()).await?;
        Ok(token_with_signature(&uri, expiry, &signature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_what_the_operator_must_do() {
        let socket = PathBuf::from("/run/aziot/keyd.sock");
        let e = AziotError::PermissionDenied {
            service: Service::Keyd,
            socket: socket.clone(),
        };
        assert!(e.to_string().contains("group aziotks"), "{e}");
        let e = AziotError::SocketMissing {
            service: Service::Identityd,
            socket,
        };
        assert!(e.to_string().contains("IoT Edge"), "{e}");
        let e = AziotError::NotPrincipal {
            status: 404,
            message: "x".into(),
        };
        assert!(e.to_string().contains(PRINCIPAL_FILE), "{e}");
        assert!(!e.is_transient());
    }

    #[test]
    fn the_key_handle_is_never_shown() {
        let handle = KeyHandle("secret-handle".into());
        assert!(!format!("{handle:?}").contains("secret"));
    }
}
