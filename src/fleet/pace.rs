//! Staying inside IoT Hub's per-minute quotas (PROTOCOL §14.4): 20 queries and 20
//! configuration operations per minute per S1 unit.
//!
//! - [`QuotaPolicy`]: the pause before retrying a throttled (429) call — full jitter
//!   (uniform in `[0, min(cap, base·2ⁿ)]`) added to the hub's `Retry-After` when it gave
//!   one, so throttled clients neither hammer nor return together.
//! - [`poll_interval`]: how long `fleet status --wait` waits between polls so that its
//!   polls alone stay within the S1 quota: 60 s / 20 = 3 s per query (or configuration
//!   operation) a poll made. One rollout's poll is 4 queries and 1 configuration read:
//!   a poll every 12 s.
//! - [`Clock`]: time and sleeping, injected so the backoff is tested without sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;

use crate::registry::{Refusal, RegistryError};

/// Queries per minute per S1 unit.
pub const S1_QUERIES_PER_MINUTE: u32 = 20;
/// Configuration operations (create, read, list, delete) per minute per S1 unit.
pub const S1_CONFIGURATION_OPS_PER_MINUTE: u32 = 20;

/// Time and sleeping for the fleet client.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()>;
}

/// The real clock (tokio's sleep).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A clock that only moves when slept on, recording every sleep (for tests).
#[cfg(test)]
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    state: std::sync::Mutex<(Duration, Vec<Duration>)>,
}

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            start: Instant::now(),
            state: std::sync::Mutex::new((Duration::ZERO, Vec::new())),
        }
    }
}

#[cfg(test)]
impl ManualClock {
    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.lock().1.clone()
    }

    /// Time elapsed on this clock.
    pub fn elapsed(&self) -> Duration {
        self.lock().0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Duration, Vec<Duration>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.lock().0
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        let mut state = self.lock();
        state.0 += duration;
        state.1.push(duration);
        Box::pin(std::future::ready(()))
    }
}

/// Retries of throttled quota-metered calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaPolicy {
    /// Jitter window of the first retry; doubles per retry up to `cap`.
    pub base: Duration,
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// No retry starts later than this after the first attempt.
    pub budget: Duration,
}

impl Default for QuotaPolicy {
    /// Windows of one query's share of the S1 minute (3 s) up to the whole minute; a
    /// throttled call gives up after about five minutes.
    fn default() -> Self {
        QuotaPolicy {
            base: Duration::from_secs(3),
            cap: Duration::from_secs(60),
            attempts: 8,
            budget: Duration::from_secs(300),
        }
    }
}

impl QuotaPolicy {
    /// The pause before retry number `retry` (0-based): `Retry-After` (when the hub gave
    /// one) plus `draw` × `min(cap, base·2^retry)`, `draw` uniform in `[0, 1)`.
    pub fn pause(&self, retry: u32, retry_after: Option<Duration>, draw: f64) -> Duration {
        let window = self
            .base
            .checked_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        retry_after.unwrap_or_default() + window.mul_f64(draw.clamp(0.0, 1.0))
    }
}

/// Runs `op` until it is not throttled, pausing per `policy` on `clock` between tries
/// (`draw` gives the jitter, uniform in `[0, 1)`). Other failures come back at once; the
/// last 429 comes back once the attempts or the budget are spent, its message saying so.
pub async fn retry_throttled<T, F, Fut>(
    policy: &QuotaPolicy,
    clock: &dyn Clock,
    draw: &(dyn Fn() -> f64 + Send + Sync),
    mut op: F,
) -> Result<T, Refusal>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Refusal>>,
{
    let started = clock.now();
    let mut retry = 0;
    loop {
        let refusal = match op().await {
            Ok(value) => return Ok(value),
            Err(r) => r,
        };
        let RegistryError::Throttled(message) = &refusal.error else {
            return Err(refusal);
        };
        let pause = policy.pause(retry, refusal.retry_after, draw());
        let attempts = retry + 1;
        if attempts >= policy.attempts || clock.now() - started + pause > policy.budget {
            return Err(Refusal {
                error: RegistryError::Throttled(format!(
                    "{message} (still throttled after {attempts} attempts over {} s)",
                    (clock.now() - started).as_secs()
                )),
                retry_after: refusal.retry_after,
            });
        }
        tracing::warn!(
            attempt = attempts,
            pause_ms = pause.as_millis() as u64,
            retry_after_s = refusal.retry_after.map(|d| d.as_secs()),
            "throttled by the hub's quota; waiting before the next try"
        );
        clock.sleep(pause).await;
        retry += 1;
    }
}

/// The least time between two polls that made `queries` queries and `configuration_ops`
/// configuration operations, for their rate to stay within one S1 unit's quotas.
pub fn poll_interval(queries: u32, configuration_ops: u32) -> Duration {
    let per = |n: u32, per_minute: u32| Duration::from_secs(60) * n / per_minute;
    per(queries, S1_QUERIES_PER_MINUTE)
        .max(per(configuration_ops, S1_CONFIGURATION_OPS_PER_MINUTE))
        .max(Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_grows_to_the_cap() {
        let p = QuotaPolicy {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(10),
            attempts: 5,
            budget: Duration::from_secs(60),
        };
        assert_eq!(p.pause(0, None, 0.0), Duration::ZERO);
        assert_eq!(p.pause(0, None, 0.5), Duration::from_secs(1));
        assert_eq!(p.pause(2, None, 0.5), Duration::from_secs(4));
        assert_eq!(p.pause(3, None, 1.0), Duration::from_secs(10));
        assert_eq!(p.pause(40, None, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn retry_after_is_a_floor_with_jitter_on_top() {
        let p = QuotaPolicy::default();
        assert_eq!(
            p.pause(0, Some(Duration::from_secs(20)), 0.0),
            Duration::from_secs(20)
        );
        assert_eq!(
            p.pause(1, Some(Duration::from_secs(20)), 0.5),
            Duration::from_secs(23)
        );
    }

    #[test]
    fn polls_stay_within_the_s1_quota() {
        // One rollout: 4 queries and 1 configuration read per poll.
        assert_eq!(poll_interval(4, 1), Duration::from_secs(12));
        // Polls over the minute never exceed 20 queries.
        for queries in 1..=40 {
            let polls_per_minute = 60.0 / poll_interval(queries, 1).as_secs_f64();
            assert!(
                polls_per_minute * f64::from(queries) <= 20.0 + 1e-9,
                "{queries}"
            );
        }
        assert_eq!(poll_interval(0, 0), Duration::from_secs(3));
    }

    fn throttled(retry_after: Option<u64>) -> Refusal {
        Refusal {
            error: RegistryError::Throttled("POST /devices/query: ThrottlingException".into()),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[tokio::test]
    async fn a_throttled_call_waits_out_retry_after_and_then_succeeds() {
        let clock = ManualClock::default();
        let mut answers = vec![Err(throttled(Some(30))), Err(throttled(None)), Ok(7)].into_iter();
        let got = retry_throttled(&QuotaPolicy::default(), &clock, &|| 0.5, || {
            std::future::ready(answers.next().unwrap())
        })
        .await;
        assert_eq!(got.unwrap(), 7);
        // 30 s asked + half of the first 3 s window; then half of the 6 s window.
        assert_eq!(
            clock.sleeps(),
            vec![Duration::from_millis(31_500), Duration::from_secs(3)]
        );
    }

    #[tokio::test]
    async fn throttling_gives_up_within_the_attempts_and_says_so() {
        let clock = ManualClock::default();
        let policy = QuotaPolicy {
            attempts: 3,
            ..QuotaPolicy::default()
        };
        let mut calls = 0;
        let got: Result<(), _> = retry_throttled(&policy, &clock, &|| 1.0, || {
            calls += 1;
            std::future::ready(Err(throttled(None)))
        })
        .await;
        let err = got.unwrap_err();
        assert_eq!(calls, 3);
        assert_eq!(
            clock.sleeps(),
            vec![Duration::from_secs(3), Duration::from_secs(6)]
        );
        assert!(
            matches!(&err.error, RegistryError::Throttled(m) if m.contains("after 3 attempts")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn throttling_gives_up_when_the_next_pause_would_pass_the_budget() {
        let clock = ManualClock::default();
        let policy = QuotaPolicy {
            budget: Duration::from_secs(100),
            ..QuotaPolicy::default()
        };
        let mut calls = 0;
        let got: Result<(), _> = retry_throttled(&policy, &clock, &|| 0.0, || {
            calls += 1;
            std::future::ready(Err(throttled(Some(60))))
        })
        .await;
        assert!(got.is_err());
        assert_eq!((calls, clock.sleeps()), (2, vec![Duration::from_secs(60)]));
    }

    #[tokio::test]
    async fn other_failures_are_not_retried() {
        let clock = ManualClock::default();
        let mut calls = 0;
        let got: Result<(), _> = retry_throttled(&QuotaPolicy::default(), &clock, &|| 0.0, || {
            calls += 1;
            std::future::ready(Err(Refusal {
                error: RegistryError::Invalid("bad query".into()),
                retry_after: None,
            }))
        })
        .await;
        assert!(matches!(got.unwrap_err().error, RegistryError::Invalid(_)));
        assert_eq!(calls, 1);
        assert!(clock.sleeps().is_empty());
    }

    #[test]
    fn the_manual_clock_moves_only_when_slept_on() {
        let clock = ManualClock::default();
        let t0 = clock.now();
        futures_executor_free_sleep(&clock, Duration::from_secs(5));
        assert_eq!(clock.now() - t0, Duration::from_secs(5));
        assert_eq!(clock.sleeps(), vec![Duration::from_secs(5)]);
    }

    /// The manual clock's sleep is ready at once; polling it needs no executor.
    fn futures_executor_free_sleep(clock: &ManualClock, d: Duration) {
        drop(clock.sleep(d));
    }
}
