//! Client for the IoT Hub service REST API (registry, module twins, direct methods) over
//! reqwest with rustls (PROTOCOL §6). Mints a short-lived SAS token per request from a
//! policy key, or from a device key for that device's own modules (§11, [`RegistryAuth`]).
//! Errors are a typed enum callers branch on; the hub's error body is parsed into the
//! message users see. Never logs or returns the key or a token.
//!
//! Throttling (429) and transient failures (5xx, timeouts, connection errors) are retried
//! inside the client with jittered exponential backoff, bounded in attempts and in total
//! time ([`RetryPolicy`]). Transient failures are retried only for requests that are safe
//! to repeat: GET, PUT (a create repeated after a lost answer gets 409, which callers
//! treat as "exists"; a twin replace is the same replace), DELETE, and a PATCH with a
//! real etag (if the first one went through, the etag changed and the repeat gets 412).
//! A PATCH with `If-Match: "*"` and a direct-method POST are repeated only when the hub
//! cannot have acted on them: 429, or no connection made. A 429's `Retry-After` is
//! waited out (plus jitter, within the policy's `max_delay`) before the next attempt.
//! The exception are the per-minute metered operations (queries, configurations): their
//! 429 goes back to the caller with its `Retry-After` ([`Refusal`]), which paces itself.
//!
//! A 401 whose `Date` shows this machine's clock off by more than the tolerance is sent
//! once more at once, signed against the hub's time; the skew is kept for the client's
//! later requests (a gateway without a battery-backed clock boots with a wrong time).
//!
//! - `auth`: [`RegistryAuth`], the token each request carries.
//! - `errors`: [`RegistryError`], [`ClientSetupError`], the hub's error bodies.
//! - `request`: one operation on the wire, with its retries.
//! - `configurations`: twin queries and automatic configurations, whose 429s the caller
//!   paces (they are metered per minute).

mod auth;
mod configurations;
mod errors;
mod request;

pub use auth::{hub_host_name, RegistryAuth};
pub use configurations::{QueryPage, MAX_PAGE};
pub(crate) use errors::without_url;
pub use errors::{error_message, ClientSetupError, RegistryError};
pub use request::Refusal;

use std::path::Path;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::hub::backoff::BackoffPolicy;
use crate::identity::{DeviceCredentials, ServiceCredentials, SharedKey};

pub const API_VERSION: &str = "2021-04-12";
/// Tokens live this long; each request gets a fresh one.
const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Default limit for one request (connect, send, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds of the retries of throttled and transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub attempts: u32,
    /// Pause before the first retry; the ceiling doubles per retry up to `max_delay`, and
    /// each pause is drawn uniformly between `first_delay` and that ceiling.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// No retry starts later than this after the first attempt began.
    pub total: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
            total: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub const NONE: RetryPolicy = RetryPolicy {
        attempts: 1,
        first_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
        total: Duration::ZERO,
    };

    fn delay(&self, retry: u32) -> Duration {
        BackoffPolicy {
            initial: self.first_delay,
            max: self.max_delay,
        }
        .delay(retry)
    }

    /// The pause the hub asked for, at least `first_delay`, plus up to `first_delay` of
    /// jitter (clients throttled together do not return together), within `max_delay`.
    fn after(&self, retry_after: Duration) -> Duration {
        let ceiling = self.max_delay.max(self.first_delay);
        let jitter = self
            .first_delay
            .mul_f64(rand::Rng::random::<f64>(&mut rand::rng()));
        (retry_after.max(self.first_delay) + jitter).min(ceiling)
    }
}

/// Whether a request may be sent again after the hub may have acted on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Idempotent (or made safe by `If-Match`): retry 429 and transient failures.
    Safe,
    /// Retry only when the hub cannot have acted on it: 429, or no connection made.
    IfUnprocessed,
}

/// A typed client for one hub.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    auth: RegistryAuth,
    retry: RetryPolicy,
    request_timeout: Duration,
    /// Seconds the hub's clock is ahead of the machine's, as a 401's `Date` showed;
    /// shared by the clones of this client.
    skew_secs: Arc<AtomicI64>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// `extra_ca_pem`: trust anchors added to the system roots (the emulator's CA, a TLS
    /// inspection proxy's CA).
    pub fn new(
        credentials: ServiceCredentials,
        extra_ca_pem: Option<&[u8]>,
    ) -> Result<Self, RegistryError> {
        Self::with_auth(RegistryAuth::Service(credentials), extra_ca_pem)
    }

    /// A client signing with a device's own key: it may manage that device's modules
    /// and nothing else (the hub answers 401 for any other resource).
    pub fn for_device(
        credentials: DeviceCredentials,
        extra_ca_pem: Option<&[u8]>,
    ) -> Result<Self, RegistryError> {
        Self::with_auth(RegistryAuth::Device(credentials), extra_ca_pem)
    }

    fn with_auth(auth: RegistryAuth, extra_ca_pem: Option<&[u8]>) -> Result<Self, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("edgetwin/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = extra_ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::Invalid(format!("CA file is not PEM: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| RegistryError::Transient(format!("building the HTTP client: {e}")))?;
        Ok(RegistryClient {
            http,
            base: format!("https://{}", auth.endpoint()),
            auth,
            retry: RetryPolicy::default(),
            request_timeout: REQUEST_TIMEOUT,
            skew_secs: Arc::new(AtomicI64::new(0)),
        })
    }

    /// A client for the hub of a service (policy) connection string, trusting also the
    /// PEM anchors in `ca_file`. What the CLI and first-boot provisioning both build.
    pub fn from_connection_string(
        connection_string: &str,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientSetupError> {
        let credentials: ServiceCredentials = connection_string.trim().parse()?;
        Self::trusting(RegistryAuth::Service(credentials), ca_file)
    }

    /// A client signing with `auth`, trusting also the PEM anchors in `ca_file`.
    pub fn trusting(auth: RegistryAuth, ca_file: Option<&Path>) -> Result<Self, ClientSetupError> {
        let ca_error = |reason: String| ClientSetupError::CaFile {
            path: ca_file.map(Path::to_path_buf).unwrap_or_default(),
            reason,
        };
        let pem = ca_file
            .map(std::fs::read)
            .transpose()
            .map_err(|e| ca_error(format!("cannot read: {e}")))?;
        RegistryClient::with_auth(auth, pem.as_deref()).map_err(|e| match e {
            RegistryError::Invalid(reason) => ca_error(reason),
            other => ClientSetupError::Client(other),
        })
    }

    /// The same client sending to `https://{endpoint}` instead of the credential's host
    /// (an emulator's REST port, a TLS-inspecting proxy); tokens are unchanged.
    pub fn with_endpoint(mut self, endpoint: &str) -> Self {
        self.base = format!("https://{endpoint}");
        self
    }

    /// The same client with other retry bounds (tests use short ones).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same client with another limit for one request (default 30 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// The hub's host name as the credential gives it (may carry a port).
    pub fn host_name(&self) -> &str {
        self.auth.host_name()
    }

    /// Whose key signs this client's requests.
    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    pub async fn create_device(&self, device_id: &str) -> Result<Value, RegistryError> {
        let body = json!({
            "deviceId": device_id,
            "status": "enabled",
            "authentication": {"symmetricKey": {}, "type": "sas"},
            "capabilities": {"iotEdge": false}
        });
        self.call(
            reqwest::Method::PUT,
            &format!("/devices/{}", seg(device_id)),
            Some(&body),
            None,
            Repeat::Safe,
        )
        .await
    }

    pub async fn get_device(&self, device_id: &str) -> Result<Value, RegistryError> {
        self.call(
            reqwest::Method::GET,
            &format!("/devices/{}", seg(device_id)),
            None,
            None,
            Repeat::Safe,
        )
        .await
    }

    /// DELETE a device (and its modules); `etag` `None` sends `If-Match: "*"`.
    pub async fn delete_device(
        &self,
        device_id: &str,
        etag: Option<&str>,
    ) -> Result<(), RegistryError> {
        let path = format!("/devices/{}", seg(device_id));
        let if_match = quoted(etag);
        self.call(
            reqwest::Method::DELETE,
            &path,
            None,
            Some(&if_match),
            Repeat::Safe,
        )
        .await
        .map(drop)
    }

    pub async fn create_module(
        &self,
        device_id: &str,
        module_id: &str,
    ) -> Result<Value, RegistryError> {
        let body = json!({
            "moduleId": module_id,
            "deviceId": device_id,
            "authentication": {"symmetricKey": {}, "type": "sas"}
        });
        let path = format!("/devices/{}/modules/{}", seg(device_id), seg(module_id));
        self.call(reqwest::Method::PUT, &path, Some(&body), None, Repeat::Safe)
            .await
    }

    pub async fn get_module(
        &self,
        device_id: &str,
        module_id: &str,
    ) -> Result<Value, RegistryError> {
        let path = format!("/devices/{}/modules/{}", seg(device_id), seg(module_id));
        self.call(reqwest::Method::GET, &path, None, None, Repeat::Safe)
            .await
    }

    /// PUT the module's SAS keys, unconditionally (`If-Match: *`, as the Azure IoT
    /// Identity Service sends it, PROTOCOL §11.1). Setting the same keys again changes
    /// nothing but the etag, so the request is safe to repeat.
    pub async fn set_module_keys(
        &self,
        device_id: &str,
        module_id: &str,
        primary: &SharedKey,
        secondary: &SharedKey,
    ) -> Result<Value, RegistryError> {
        let body = json!({
            "moduleId": module_id,
            "deviceId": device_id,
            "authentication": {
                "symmetricKey": {
                    "primaryKey": primary.as_base64(),
                    "secondaryKey": secondary.as_base64()
                },
                "type": "sas"
            }
        });
        let path = format!("/devices/{}/modules/{}", seg(device_id), seg(module_id));
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&body),
            Some("*"),
            Repeat::Safe,
        )
        .await
    }

    /// DELETE a module; `etag` `None` sends `If-Match: "*"`.
    pub async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        etag: Option<&str>,
    ) -> Result<(), RegistryError> {
        let path = format!("/devices/{}/modules/{}", seg(device_id), seg(module_id));
        let if_match = quoted(etag);
        self.call(
            reqwest::Method::DELETE,
            &path,
            None,
            Some(&if_match),
            Repeat::Safe,
        )
        .await
        .map(drop)
    }

    pub async fn get_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
    ) -> Result<Value, RegistryError> {
        let path = format!("/twins/{}/modules/{}", seg(device_id), seg(module_id));
        self.call(reqwest::Method::GET, &path, None, None, Repeat::Safe)
            .await
    }

    /// PATCH desired properties, conditional on `etag` (`None`: unconditional, `"*"`).
    pub async fn patch_desired(
        &self,
        device_id: &str,
        module_id: &str,
        desired: &Value,
        etag: Option<&str>,
    ) -> Result<Value, RegistryError> {
        let body = json!({ "properties": { "desired": desired } });
        self.patch_module_twin(device_id, module_id, &body, etag)
            .await
    }

    /// PATCH a twin fragment (`{"tags": {...}, "properties": {"desired": {...}}}`): both
    /// merge, `null` removes. Conditional on `etag` as [`Self::patch_desired`].
    pub async fn patch_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Value,
        etag: Option<&str>,
    ) -> Result<Value, RegistryError> {
        let path = format!("/twins/{}/modules/{}", seg(device_id), seg(module_id));
        let if_match = quoted(etag);
        let repeat = match etag {
            Some(e) if e.trim_matches('"') != "*" => Repeat::Safe,
            _ => Repeat::IfUnprocessed,
        };
        self.call(
            reqwest::Method::PATCH,
            &path,
            Some(body),
            Some(&if_match),
            repeat,
        )
        .await
    }

    /// PUT (replace) the twin's tags and desired properties: `twin` is a fragment such as
    /// `{"tags": {...}, "properties": {"desired": {...}}}`; `etag` `None` sends `"*"`.
    pub async fn replace_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        twin: &Value,
        etag: Option<&str>,
    ) -> Result<Value, RegistryError> {
        let path = format!("/twins/{}/modules/{}", seg(device_id), seg(module_id));
        let if_match = quoted(etag);
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(twin),
            Some(&if_match),
            Repeat::Safe,
        )
        .await
    }

    pub async fn invoke_module_method(
        &self,
        device_id: &str,
        module_id: &str,
        method: &str,
        payload: &Value,
        timeout_secs: u64,
    ) -> Result<Value, RegistryError> {
        let path = format!(
            "/twins/{}/modules/{}/methods",
            seg(device_id),
            seg(module_id)
        );
        let body = json!({
            "methodName": method,
            "payload": payload,
            "responseTimeoutInSeconds": timeout_secs,
            "connectTimeoutInSeconds": 0
        });
        self.call(
            reqwest::Method::POST,
            &path,
            Some(&body),
            None,
            Repeat::IfUnprocessed,
        )
        .await
    }
}

/// `If-Match` as the SDKs send it: the etag in double quotes, or `"*"`.
fn quoted(etag: Option<&str>) -> String {
    format!("\"{}\"", etag.map_or("*", |e| e.trim_matches('"')))
}

/// Percent-encodes one path segment (ids may hold characters such as `#` or `?`).
fn seg(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}
