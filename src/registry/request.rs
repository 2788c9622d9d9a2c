//! One registry operation on the wire: the request with a fresh token, the hub's answer
//! read into a value or a [`RegistryError`], and the retries of throttled and transient
//! failures within the client's [`super::RetryPolicy`] (see the `registry` module docs for which
//! requests are repeated when).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::errors::without_url;
use super::{error_message, RegistryClient, RegistryError, Repeat, API_VERSION, TOKEN_TTL};
use crate::identity::clock::{exceeds_tolerance, hub_time, SkewedClock};

impl RegistryClient {
    /// One operation: attempts within [`super::RetryPolicy`]; the last error says how many.
    pub(super) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        repeat: Repeat,
    ) -> Result<Value, RegistryError> {
        let started = tokio::time::Instant::now();
        let mut attempt = 1;
        let mut clock_corrected = None;
        loop {
            let mut failure = match self.attempt(&method, path, body, if_match).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if let RegistryError::Unauthorized(message) = &mut failure.error {
                match (clock_corrected, failure.hub_clock) {
                    // A 401 is not acted on: sending it again is safe for any request.
                    (None, Some(hub)) if exceeds_tolerance(hub.offset_secs) => {
                        let skew = hub.skew_secs;
                        self.skew_secs.store(skew, Ordering::Relaxed);
                        clock_corrected = Some(skew);
                        tracing::warn!(
                            edgetwin_event = "clock_skew",
                            skew_secs = skew,
                            "this machine's clock differs from the hub's; signing the \
                             request again against the hub's time (check NTP)"
                        );
                        continue;
                    }
                    (Some(skew), _) => message.push_str(&format!(
                        "; refused also when signed against the hub's time (this \
                         machine's clock differs from the hub's by {skew} s)"
                    )),
                    _ => {}
                }
            }
            let retryable = match &failure.error {
                RegistryError::Throttled(_) => true,
                RegistryError::Transient(_) => repeat == Repeat::Safe || failure.unprocessed,
                _ => false,
            };
            if !retryable {
                return Err(failure.error);
            }
            let pause = failure
                .retry_after
                .map(|d| self.retry.after(d))
                .unwrap_or_else(|| self.retry.delay(attempt - 1));
            if attempt >= self.retry.attempts || started.elapsed() + pause > self.retry.total {
                return Err(failure.error.after_attempts(attempt));
            }
            tracing::warn!(
                error = %failure.error,
                attempt,
                pause_ms = pause.as_millis() as u64,
                "hub request failed; retrying"
            );
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// One request.
    async fn attempt(
        &self,
        method: &reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Value, AttemptFailure> {
        let signer = SkewedClock::system(self.skew_secs.load(Ordering::Relaxed));
        let expiry = signer.expiry(TOKEN_TTL);
        let url = format!("{}{}?api-version={API_VERSION}", self.base, path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .timeout(self.request_timeout)
            .header("Authorization", self.auth.token(expiry))
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json; charset=utf-8")
                .body(b.to_string());
        }
        if let Some(m) = if_match {
            req = req.header("If-Match", m);
        }
        let resp = req.send().await.map_err(|e| AttemptFailure {
            unprocessed: e.is_connect(),
            retry_after: None,
            hub_clock: None,
            error: RegistryError::Transient(format!("{method} {path}: {}", without_url(&e))),
        })?;
        let status = resp.status();
        // Read at once: compared with the clock this request was signed on.
        let hub_clock = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(hub_time)
            .map(|t| {
                let offset_secs = signer.offset_to(t);
                HubClock {
                    offset_secs,
                    skew_secs: signer.corrected(offset_secs).skew_secs(),
                }
            });
        let code_name = resp
            .headers()
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.map_err(|e| {
            AttemptFailure::from(RegistryError::Transient(format!(
                "{method} {path}: reading the body: {}",
                without_url(&e)
            )))
        })?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|e| {
                AttemptFailure::from(RegistryError::Invalid(format!(
                    "{method} {path}: hub answered non-JSON: {e}"
                )))
            });
        }
        let message = format!(
            "{method} {path}: {}",
            error_message(&text, code_name.as_deref())
        );
        let error = match status.as_u16() {
            401 | 403 => RegistryError::Unauthorized(message),
            404 => RegistryError::NotFound(message),
            409 => RegistryError::Conflict(message),
            412 => RegistryError::PreconditionFailed(message),
            429 => RegistryError::Throttled(message),
            500..=599 => RegistryError::Transient(message),
            _ => RegistryError::Invalid(message),
        };
        Err(AttemptFailure {
            error,
            unprocessed: false,
            retry_after,
            hub_clock: hub_clock.filter(|_| status.as_u16() == 401),
        })
    }
}

/// A failed attempt, with what the retry decision needs.
struct AttemptFailure {
    error: RegistryError,
    /// The request cannot have reached the hub (no connection was made).
    unprocessed: bool,
    /// The hub's `Retry-After`, in seconds.
    retry_after: Option<Duration>,
    /// For a 401: the hub's clock as its `Date` showed it.
    hub_clock: Option<HubClock>,
}

/// The hub's clock against ours, from one answer's `Date`.
#[derive(Debug, Clone, Copy)]
struct HubClock {
    /// Seconds the hub is ahead of the clock the request was signed on.
    offset_secs: i64,
    /// Seconds the hub is ahead of the machine's clock: the skew to sign with.
    skew_secs: i64,
}

impl From<RegistryError> for AttemptFailure {
    fn from(error: RegistryError) -> Self {
        AttemptFailure {
            error,
            unprocessed: false,
            retry_after: None,
            hub_clock: None,
        }
    }
}
