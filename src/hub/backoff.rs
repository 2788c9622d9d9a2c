//! Reconnect and retry delays: exponential growth from `initial` to `max`, with full
//! jitter so a fleet of gateways that lost the hub together does not come back together.
//!
//! Owned by the session task (one for reconnects, one per twin request for 429/5xx).
//! Pure arithmetic plus a random draw; it never sleeps itself.

use std::time::Duration;

use rand::Rng;

/// `backoff = { initial, max }` from config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(120),
        }
    }
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (0-based): uniform in
    /// `[initial, min(max, initial * 2^attempt)]`. Never below `initial`, so a refused
    /// peer is never retried in a hot loop.
    pub fn delay(&self, attempt: u32) -> Duration {
        let initial = self.initial.max(Duration::from_millis(1));
        let max = self.max.max(initial);
        let ceiling = initial
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(max)
            .min(max);
        if ceiling <= initial {
            return initial;
        }
        let span = (ceiling - initial).as_millis() as u64;
        initial + Duration::from_millis(rand::rng().random_range(0..=span))
    }
}

/// Attempts since the last success, and the delay for the next one.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoff { policy, attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, max_ms: u64) -> BackoffPolicy {
        BackoffPolicy {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn delays_stay_between_initial_and_the_growing_ceiling() {
        let p = policy(100, 1_000);
        for attempt in 0..40 {
            let ceiling = (100u64 << attempt.min(20)).min(1_000);
            for _ in 0..20 {
                let d = p.delay(attempt).as_millis() as u64;
                assert!((100..=ceiling).contains(&d), "attempt {attempt}: {d}");
            }
        }
    }

    #[test]
    fn first_delay_is_initial() {
        assert_eq!(policy(250, 10_000).delay(0), Duration::from_millis(250));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(policy(10, 1_000));
        b.next_delay();
        b.next_delay();
        assert_eq!(b.attempt(), 2);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }

    #[test]
    fn max_below_initial_is_treated_as_initial() {
        assert_eq!(policy(500, 10).delay(5), Duration::from_millis(500));
    }
}
