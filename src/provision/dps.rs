//! Device Provisioning Service client (PROTOCOL §12): register a registration id with a
//! symmetric key over HTTPS, poll the operation until DPS assigns a hub and a device, and
//! remember the outcome in `provisioning.json` ([`record`]) so a reboot does not register
//! again. DPS hands out only device identities; the module is created afterwards with the
//! device credential (the `device` provisioning flow).
//!
//! Flow: `PUT /{idScope}/registrations/{registrationId}/register` → 202 with an
//! `operationId` → `GET .../operations/{operationId}` after each `Retry-After` until the
//! status is final. Authorisation is a SAS token for `{idScope}/registrations/{registrationId}`
//! signed with the device key, `skn=registration`; a group enrollment's device key is
//! derived from the group key ([`derive_device_key`]).
//!
//! Waiting: at least what DPS asks (`Retry-After`), never less than
//! [`PollPolicy::min_interval`], plus jitter; throttling (429), 5xx and network failures are
//! retried within [`PollPolicy`]'s bounds, after which the error is returned and
//! [`DpsError::is_retryable`] tells the caller whether to try again later (with its own
//! backoff) or to stop: an unknown scope, a refused key, a disabled enrollment, a failed or
//! unassigned registration are final.
//!
//! Library code: no printing, no configuration types (callers build a [`DpsRequest`]), no
//! key in any error, log line or file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

use crate::hub::backoff::BackoffPolicy;
use crate::hub::options::HostPort;
use crate::hub::tls::CaBundle;
use crate::identity::clock::{exceeds_tolerance, hub_time, SkewedClock};
use crate::identity::{token, DeviceCredentials, SharedKey};
use crate::registry::without_url;

mod flow;
pub mod record;
pub mod wire;

pub use record::{load, record_path, save, ProvisioningRecord, RECORD_FILE};
pub use wire::{parse_reply, DpsAssignment, FinalStatus, Reply};

/// The public DPS endpoint (`global_endpoint`'s default).
pub const DEFAULT_GLOBAL_ENDPOINT: &str = "global.azure-devices-provisioning.net";
/// HTTPS port when the endpoint names none.
pub const DEFAULT_PORT: u16 = 443;
/// The device registration API version the Identity Service uses (PROTOCOL §12.1).
pub const API_VERSION: &str = "2021-06-01";
/// Registration tokens live this long; every request gets a fresh one.
const TOKEN_TTL: Duration = Duration::from_secs(600);
/// Limit for one request (connect, send, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The device key of `registration_id` in a group enrollment whose key is `group_key`
/// (PROTOCOL §12.2): `base64(HMAC-SHA256(key = group key bytes, msg = registration id))`.
pub fn derive_device_key(group_key: &SharedKey, registration_id: &str) -> SharedKey {
    let bytes = BASE64
        .decode(group_key.as_base64())
        .expect("a SharedKey is valid base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&bytes).expect("HMAC accepts keys of any length");
    mac.update(registration_id.as_bytes());
    let derived = BASE64.encode(mac.finalize().into_bytes());
    SharedKey::from_base64(&derived).expect("a 32-byte HMAC encodes to valid base64")
}

/// The key configured for DPS: an individual enrollment's, or a group enrollment's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentKey {
    Individual(SharedKey),
    Group(SharedKey),
}

impl EnrollmentKey {
    /// The key this registration id signs with (and its device connects with).
    pub fn device_key(&self, registration_id: &str) -> SharedKey {
        match self {
            EnrollmentKey::Individual(key) => key.clone(),
            EnrollmentKey::Group(key) => derive_device_key(key, registration_id),
        }
    }
}

/// One registration to make. `Debug` redacts the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsRequest {
    /// `global.azure-devices-provisioning.net:443`, or an emulator's `host:port`.
    pub global_endpoint: HostPort,
    pub id_scope: String,
    pub registration_id: String,
    /// The device key: an individual enrollment's, or derived from the group key.
    pub key: SharedKey,
}

impl DpsRequest {
    /// The SAS resource: `{idScope}/registrations/{registrationId}`.
    pub fn resource_uri(&self) -> String {
        format!("{}/registrations/{}", self.id_scope, self.registration_id)
    }

    /// Checks the ids the way DPS does (PROTOCOL §12.2): the scope alphanumeric, the
    /// registration id up to 128 of alphanumerics and `-._:`.
    pub fn validate(&self) -> Result<(), DpsError> {
        check_id_scope(&self.id_scope).map_err(DpsError::InvalidRequest)?;
        check_registration_id(&self.registration_id).map_err(DpsError::InvalidRequest)
    }
}

/// An ID scope as DPS accepts it: letters and digits, at most 64 (the configuration
/// checks it with this too, so `check-config` and `run` agree).
pub fn check_id_scope(id_scope: &str) -> Result<(), String> {
    let ok = !id_scope.is_empty()
        && id_scope.len() <= 64
        && id_scope.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "id_scope {id_scope:?} is not a DPS ID scope (letters and digits, e.g. 0ne00012345)"
        ))
    }
}

/// A registration id as DPS accepts it: 1..128 of letters, digits and `-._:`.
pub fn check_registration_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "registration_id {id:?} is not valid for DPS (1..128 of letters, digits, - . _ :)"
        ))
    }
}

impl DpsAssignment {
    /// The device credential to use with this assignment and the request's key.
    pub fn device_credentials(&self, key: SharedKey) -> DeviceCredentials {
        DeviceCredentials {
            host_name: self.assigned_hub.clone(),
            device_id: self.device_id.clone(),
            key,
            gateway_host_name: None,
        }
    }
}

/// Bounds of the waiting within one [`DpsClient::register`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPolicy {
    /// No pause is shorter, whatever DPS asks (no tight loop on `Retry-After: 0`).
    pub min_interval: Duration,
    /// A `Retry-After` longer than this ends the call with a retryable error carrying it,
    /// so the caller can wait that long on its own terms.
    pub max_interval: Duration,
    /// The pause between polls when DPS gives no `Retry-After`.
    pub default_interval: Duration,
    /// Failed attempts (429, 5xx, network, garbled answers) in a row before giving up.
    pub attempts: u32,
    /// No pause starts that would end later than this after the call began.
    pub total: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            default_interval: Duration::from_secs(3),
            attempts: 5,
            total: Duration::from_secs(300),
        }
    }
}

impl PollPolicy {
    /// The pause before the next request when DPS asked for `retry_after`: at least that
    /// (or the default interval) and at least `min_interval`, plus up to a fifth as jitter.
    /// `Err` with the asked pause when it exceeds `max_interval`.
    pub fn pause(&self, retry_after: Option<Duration>) -> Result<Duration, Duration> {
        let base = retry_after
            .unwrap_or(self.default_interval)
            .max(self.min_interval);
        if base > self.max_interval.max(self.min_interval) {
            return Err(base);
        }
        let spread = (base / 5).as_millis() as u64;
        Ok(base + Duration::from_millis(rand::Rng::random_range(&mut rand::rng(), 0..=spread)))
    }

    /// The pause after the `failures`-th failure in a row that came without `Retry-After`:
    /// exponential from `min_interval` to `max_interval`, full jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        BackoffPolicy {
            initial: self.min_interval,
            max: self.max_interval,
        }
        .delay(failures.saturating_sub(1))
    }
}

/// Why a registration did not produce an assignment. Messages name the scope, the
/// registration id and the endpoint, never a key or a token.
#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    /// The request cannot be sent as configured (malformed ids).
    #[error("{0}")]
    InvalidRequest(String),
    /// The HTTP client could not be built.
    #[error("building the DPS client: {0}")]
    Client(String),
    #[error("DPS refused the key of registration {registration_id} (HTTP {status}): {message}; check the enrollment key (or group key) and this machine's clock")]
    Unauthorized {
        registration_id: String,
        status: u16,
        message: String,
    },
    #[error("DPS at {endpoint} knows no ID scope {id_scope}: {message}")]
    UnknownScope {
        id_scope: String,
        endpoint: String,
        message: String,
    },
    #[error("DPS rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("the enrollment of registration {registration_id} is disabled in DPS{}", detail(.message))]
    Disabled {
        registration_id: String,
        message: String,
    },
    #[error("DPS registration of {registration_id} failed{}{}", code_note(*.error_code), detail(.message))]
    Failed {
        registration_id: String,
        error_code: Option<i64>,
        message: String,
    },
    #[error("DPS did not assign registration {registration_id} to any hub{}", detail(.message))]
    Unassigned {
        registration_id: String,
        message: String,
    },
    #[error("DPS is throttling: {message}")]
    Throttled {
        message: String,
        /// What DPS asked to wait, when it said.
        retry_after: Option<Duration>,
    },
    #[error("DPS unavailable: {0}")]
    Transient(String),
    #[error("DPS was still assigning registration {registration_id} after {}s", waited.as_secs())]
    Timeout {
        registration_id: String,
        waited: Duration,
    },
    #[error("DPS answered something unexpected: {0}")]
    Malformed(String),
    #[error("{}: {source}", path.display())]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Record { path: PathBuf, reason: String },
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn code_note(code: Option<i64>) -> String {
    code.map(|c| format!(" (error {c})")).unwrap_or_default()
}

impl DpsError {
    /// Worth trying again later: throttling, DPS or the network unavailable, an answer
    /// that could not be read, an assignment still pending. Everything DPS decided about
    /// this registration (unknown scope, refused key, disabled, failed, unassigned) and
    /// local problems are final.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DpsError::Throttled { .. }
                | DpsError::Transient(_)
                | DpsError::Timeout { .. }
                | DpsError::Malformed(_)
        )
    }

    /// The wait DPS asked for, when it did (throttling).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DpsError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The DPS device registration client (HTTPS).
#[derive(Clone)]
pub struct DpsClient {
    http: reqwest::Client,
    policy: PollPolicy,
    request_timeout: Duration,
    /// Seconds DPS's clock is ahead of the machine's, as a 401's `Date` showed; shared
    /// by the clones of this client.
    skew_secs: Arc<AtomicI64>,
}

impl std::fmt::Debug for DpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpsClient")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl DpsClient {
    /// A client trusting the system roots plus `ca` (the emulator's CA, a TLS inspection
    /// proxy's).
    pub fn new(ca: Option<&CaBundle>) -> Result<DpsClient, DpsError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("edgetwin/", env!("CARGO_PKG_VERSION")));
        for cert in ca.map(CaBundle::certificates).unwrap_or_default() {
            let cert = reqwest::Certificate::from_der(cert.as_ref())
                .map_err(|e| DpsError::Client(format!("CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| DpsError::Client(e.to_string()))?;
        Ok(DpsClient {
            http,
            policy: PollPolicy::default(),
            request_timeout: REQUEST_TIMEOUT,
            skew_secs: Arc::new(AtomicI64::new(0)),
        })
    }

    /// The same client with other waiting bounds (tests use short ones).
    pub fn with_poll_policy(mut self, policy: PollPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn poll_policy(&self) -> PollPolicy {
        self.policy
    }

    /// Registers, polls until DPS decides, and returns the assignment; the device key to
    /// use with it is `request.key`.
    pub async fn register(&self, request: &DpsRequest) -> Result<DpsAssignment, DpsError> {
        request.validate()?;
        flow::run(self, request).await
    }

    /// One request: `None` registers, `Some(id)` polls that operation. A 401 whose `Date`
    /// shows this machine's clock off is sent once more at once, signed on DPS's time (a
    /// gateway without a battery-backed clock boots with a wrong time).
    async fn send(&self, request: &DpsRequest, operation: Option<&str>) -> Result<Reply, DpsError> {
        let (reply, offset) = self.send_signed(request, operation).await?;
        let Some(offset) = offset else {
            return Ok(reply);
        };
        let signer = SkewedClock::system(self.skew_secs.load(Ordering::Relaxed));
        let skew = signer.corrected(offset).skew_secs();
        self.skew_secs.store(skew, Ordering::Relaxed);
        tracing::warn!(
            edgetwin_event = "clock_skew",
            skew_secs = skew,
            "this machine's clock differs from DPS's; signing the request again against its time (check NTP)"
        );
        let (mut reply, still) = self.send_signed(request, operation).await?;
        if let (Some(_), Reply::Error { message, .. }) = (still, &mut reply) {
            message.push_str(&format!(
                "; refused also when signed against DPS's time (this machine's clock differs \
                 by {skew} s)"
            ));
        }
        Ok(reply)
    }

    /// One request signed on the clock as corrected so far; with a 401, how far DPS's
    /// clock is ahead of the one that signed, when more than the tolerance.
    async fn send_signed(
        &self,
        request: &DpsRequest,
        operation: Option<&str>,
    ) -> Result<(Reply, Option<i64>), DpsError> {
        let base = format!(
            "https://{}/{}/registrations/{}",
            request.global_endpoint,
            seg(&request.id_scope),
            seg(&request.registration_id)
        );
        let signer = SkewedClock::system(self.skew_secs.load(Ordering::Relaxed));
        let expiry = signer.expiry(TOKEN_TTL);
        let auth = token(
            &request.key,
            &request.resource_uri(),
            expiry,
            Some("registration"),
        );
        let builder = match operation {
            None => self
                .http
                .put(format!("{base}/register?api-version={API_VERSION}"))
                .header("Content-Type", "application/json; charset=utf-8")
                .body(serde_json::json!({"registrationId": request.registration_id}).to_string()),
            Some(id) => self.http.get(format!(
                "{base}/operations/{}?api-version={API_VERSION}",
                seg(id)
            )),
        };
        let what = if operation.is_some() {
            "poll"
        } else {
            "register"
        };
        let resp = builder
            .timeout(self.request_timeout)
            .header("Authorization", auth)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| {
                DpsError::Transient(format!(
                    "{what} at {}: {}",
                    request.global_endpoint,
                    without_url(&e)
                ))
            })?;
        let status = resp.status().as_u16();
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header(reqwest::header::RETRY_AFTER);
        let date = header(reqwest::header::DATE);
        let body = resp.bytes().await.map_err(|e| {
            DpsError::Transient(format!("{what}: reading the answer: {}", without_url(&e)))
        })?;
        let reply = parse_reply(status, &body, retry_after.as_deref())
            .map_err(|e| DpsError::Malformed(e.0))?;
        let offset = match reply {
            Reply::Error {
                http_status: 401, ..
            } => date
                .as_deref()
                .and_then(hub_time)
                .map(|t| signer.offset_to(t))
                .filter(|&o| exceeds_tolerance(o)),
            _ => None,
        };
        Ok((reply, offset))
    }
}

/// Path segments: ids are plain, but never let one change the path.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');

fn seg(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

#[cfg(test)]
mod tests;
