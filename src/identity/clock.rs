//! The wall clock SAS token expiries are computed from, as a value the signer takes.
//!
//! A gateway without a battery-backed clock boots with a wrong time; the hub judges a
//! token's `se` by its own clock, so a token signed "for an hour" on a clock two days
//! behind is long expired for the hub. [`SkewedClock`] is the machine's clock shifted by
//! the skew measured against the hub (from the `Date` of one HTTPS answer,
//! [`hub_time`]): tokens are then signed against the hub's time. Who measures and when
//! is the callers' business (the MQTT session's state machine, the registry client);
//! this module only does the arithmetic. Pure: the base clock is injected ([`Clock`]),
//! so tests use a fixed one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A skew below this is not corrected: an HTTP `Date` has a resolution of one second and
/// arrives after a round trip, and every token lives for minutes at least, so a few
/// seconds either way never decide whether the hub accepts it.
pub const SKEW_TOLERANCE: Duration = Duration::from_secs(30);

/// Where "now" comes from.
pub trait Clock {
    fn now(&self) -> SystemTime;
}

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// `base` shifted by `skew_secs`: the hub's time as far as it was measured (positive:
/// the hub is ahead of the machine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkewedClock<C = SystemClock> {
    base: C,
    skew_secs: i64,
}

impl SkewedClock<SystemClock> {
    /// The machine's clock shifted by `skew_secs`.
    pub fn system(skew_secs: i64) -> Self {
        SkewedClock::new(SystemClock, skew_secs)
    }
}

impl<C: Clock> SkewedClock<C> {
    pub fn new(base: C, skew_secs: i64) -> Self {
        SkewedClock { base, skew_secs }
    }

    pub fn skew_secs(&self) -> i64 {
        self.skew_secs
    }

    /// `se` for a token that lives `ttl` from now (at least one second), rounded up so
    /// that it lives at least `ttl`: a renewal scheduled at a share of `ttl` then always
    /// comes before the hub closes the connection.
    pub fn expiry(&self, ttl: Duration) -> u64 {
        let since_epoch = self.now().duration_since(UNIX_EPOCH).unwrap_or_default();
        (since_epoch + ttl.max(Duration::from_secs(1)))
            .as_secs_f64()
            .ceil() as u64
    }

    /// Seconds `reference` (the hub's time) is ahead of this clock (negative: behind).
    pub fn offset_to(&self, reference: SystemTime) -> i64 {
        seconds_between(self.now(), reference)
    }

    /// The same base with the skew moved by `by_secs` (what [`Self::offset_to`] measured).
    pub fn corrected(self, by_secs: i64) -> Self {
        SkewedClock {
            skew_secs: self.skew_secs.saturating_add(by_secs),
            ..self
        }
    }
}

impl<C: Clock> Clock for SkewedClock<C> {
    fn now(&self) -> SystemTime {
        shift(self.base.now(), self.skew_secs)
    }
}

/// The machine's clock in Unix seconds (0 before 1970), for timestamps that need no
/// correction (file names, `updated_at`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a measured offset is worth correcting (see [`SKEW_TOLERANCE`]).
pub fn exceeds_tolerance(offset_secs: i64) -> bool {
    offset_secs.unsigned_abs() > SKEW_TOLERANCE.as_secs()
}

/// The hub's time from the `Date` header of one of its answers (RFC 9110 HTTP-date).
/// The header is truncated to the second, so the middle of that second is returned.
pub fn hub_time(date: &str) -> Option<SystemTime> {
    let at = httpdate::parse_http_date(date.trim()).ok()?;
    Some(at + Duration::from_millis(500))
}

/// `to - from` in whole seconds, rounded to the nearest.
fn seconds_between(from: SystemTime, to: SystemTime) -> i64 {
    let (magnitude, sign) = match to.duration_since(from) {
        Ok(d) => (d, 1),
        Err(e) => (e.duration(), -1),
    };
    let secs = i64::try_from(magnitude.as_secs()).unwrap_or(i64::MAX);
    let rounded = secs.saturating_add(i64::from(magnitude.subsec_millis() >= 500));
    sign * rounded
}

fn shift(t: SystemTime, secs: i64) -> SystemTime {
    let by = Duration::from_secs(secs.unsigned_abs());
    let shifted = if secs >= 0 {
        t.checked_add(by)
    } else {
        t.checked_sub(by)
    };
    // Only a clock shifted past what SystemTime holds gets here; the epoch is as wrong
    // as anything else and keeps the caller going.
    shifted.unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    /// A clock stopped at `secs` after the epoch.
    #[derive(Clone, Copy)]
    struct Fixed(u64);

    impl Clock for Fixed {
        fn now(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(self.0)
        }
    }

    #[test]
    fn without_skew_the_expiry_is_now_plus_the_lifetime() {
        let clock = SkewedClock::new(Fixed(1_700_000_000), 0);
        assert_eq!(clock.expiry(Duration::from_secs(3600)), 1_700_003_600);
        assert_eq!(
            clock.expiry(Duration::ZERO),
            1_700_000_001,
            "lives a second at least"
        );
    }

    #[test]
    fn a_part_second_lifetime_is_rounded_up() {
        let clock = SkewedClock::new(Fixed(100), 0);
        assert_eq!(clock.expiry(Duration::from_millis(1_500)), 102);
    }

    #[test]
    fn a_clock_two_days_behind_signs_against_hub_time_once_corrected() {
        let machine = Fixed(1_700_000_000);
        let hub = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 2 * DAY as u64);
        let clock = SkewedClock::new(machine, 0);
        let offset = clock.offset_to(hub);
        assert_eq!(offset, 2 * DAY);
        assert!(exceeds_tolerance(offset));
        let corrected = clock.corrected(offset);
        assert_eq!(corrected.skew_secs(), 2 * DAY);
        assert_eq!(corrected.now(), hub);
        assert_eq!(
            corrected.expiry(Duration::from_secs(3600)),
            1_700_000_000 + 2 * DAY as u64 + 3600
        );
        assert_eq!(corrected.offset_to(hub), 0, "measured again: nothing left");
    }

    #[test]
    fn a_clock_ahead_gets_a_negative_skew() {
        let clock = SkewedClock::new(Fixed(1_700_000_000), 0);
        let hub = UNIX_EPOCH + Duration::from_secs(1_700_000_000 - 2 * DAY as u64);
        let offset = clock.offset_to(hub);
        assert_eq!(offset, -2 * DAY);
        assert_eq!(clock.corrected(offset).now(), hub);
    }

    #[test]
    fn a_stale_correction_is_measured_relative_to_the_clock_that_signs() {
        // Corrected by two days, then NTP fixed the machine: the signer is now two days
        // ahead, and measuring again says so.
        let hub = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let signer = SkewedClock::new(Fixed(1_700_000_000), 2 * DAY);
        let offset = signer.offset_to(hub);
        assert_eq!(offset, -2 * DAY);
        assert_eq!(signer.corrected(offset).skew_secs(), 0);
    }

    #[test]
    fn small_offsets_are_within_tolerance() {
        for offset in [0, 1, -1, 30, -30] {
            assert!(!exceeds_tolerance(offset), "{offset}");
        }
        for offset in [31, -31, DAY, i64::MIN] {
            assert!(exceeds_tolerance(offset), "{offset}");
        }
    }

    #[test]
    fn hub_time_reads_an_http_date_as_the_middle_of_its_second() {
        let t = hub_time("Tue, 14 Nov 2023 22:13:20 GMT").expect("a date");
        assert_eq!(
            t,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(500)
        );
        assert_eq!(hub_time(" Tue, 14 Nov 2023 22:13:20 GMT "), Some(t));
        assert_eq!(hub_time("yesterday"), None);
        assert_eq!(hub_time(""), None);
    }

    #[test]
    fn offsets_round_to_the_nearest_second() {
        let base = UNIX_EPOCH + Duration::from_secs(1_000);
        let ms = Duration::from_millis;
        assert_eq!(seconds_between(base, base + ms(499)), 0);
        assert_eq!(seconds_between(base, base + ms(500)), 1);
        assert_eq!(seconds_between(base + ms(1_600), base), -2);
    }

    #[test]
    fn the_system_clock_shifted_follows_the_machine() {
        let clock = SkewedClock::system(60);
        let ahead = clock
            .now()
            .duration_since(SystemTime::now())
            .expect("ahead of the machine");
        assert!(ahead > Duration::from_secs(55), "{ahead:?}");
        assert_eq!(clock.skew_secs(), 60);
    }
}
