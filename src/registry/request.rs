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
        let call = Call {
            method: &method,
            path,
            body,
            if_match,
            repeat,
            headers: &[],
            throttling: Throttling::Retry,
        };
        self.exchange(&call)
            .await
            .map(|answer| answer.body)
            .map_err(|refusal| refusal.error)
    }

    /// [`Self::call`] with extra request headers, the answer's headers kept, and a 429
    /// either retried here or handed back with its `Retry-After` ([`Throttling`]).
    pub(super) async fn exchange(&self, call: &Call<'_>) -> Result<Answer, Refusal> {
        let started = tokio::time::Instant::now();
        let mut attempt = 1;
        let mut clock_corrected = None;
        loop {
            let mut failure = match self.attempt(call).await {
                Ok(answer) => return Ok(answer),
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
                RegistryError::Throttled(_) => call.throttling == Throttling::Retry,
                RegistryError::Transient(_) => call.repeat == Repeat::Safe || failure.unprocessed,
                _ => false,
            };
            if !retryable {
                return Err(Refusal {
                    error: failure.error,
                    retry_after: failure.retry_after,
                });
            }
            let pause = failure
                .retry_after
                .map(|d| self.retry.after(d))
                .unwrap_or_else(|| self.retry.delay(attempt - 1));
            if attempt >= self.retry.attempts || started.elapsed() + pause > self.retry.total {
                return Err(Refusal {
                    error: failure.error.after_attempts(attempt),
                    retry_after: failure.retry_after,
                });
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
    async fn attempt(&self, call: &Call<'_>) -> Result<Answer, AttemptFailure> {
        let Call {
            method,
            path,
            body,
            if_match,
            ..
        } = *call;
        let signer = SkewedClock::system(self.skew_secs.load(Ordering::Relaxed));
        let expiry = signer.expiry(TOKEN_TTL);
        // A path may carry its own query (`/configurations?top=100`).
        let separator = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{separator}api-version={API_VERSION}", self.base);
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
        for (name, value) in call.headers {
            req = req.header(*name, value);
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
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(|e| {
            AttemptFailure::from(RegistryError::Transient(format!(
                "{method} {path}: reading the body: {}",
                without_url(&e)
            )))
        })?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Answer {
                    body: Value::Null,
                    headers,
                });
            }
            return serde_json::from_str(&text)
                .map(|body| Answer { body, headers })
                .map_err(|e| {
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

/// One operation as [`RegistryClient::exchange`] sends it.
pub(super) struct Call<'a> {
    pub method: &'a reqwest::Method,
    pub path: &'a str,
    pub body: Option<&'a Value>,
    pub if_match: Option<&'a str>,
    pub repeat: Repeat,
    /// Request headers beyond authorisation, content type and `If-Match`.
    pub headers: &'a [(&'static str, String)],
    pub throttling: Throttling,
}

/// Who waits out a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Throttling {
    /// The client, within its [`super::RetryPolicy`].
    Retry,
    /// The caller: quota-metered operations (queries, configurations) are paced by a
    /// policy of their own, so the first 429 comes back with its `Retry-After`.
    Return,
}

/// A successful answer: the body (`null` when empty) and the response headers.
#[derive(Debug)]
pub struct Answer {
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

/// A failed operation: the error, and the `Retry-After` of the last answer if it had one.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refusal {
    pub error: RegistryError,
    pub retry_after: Option<Duration>,
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
