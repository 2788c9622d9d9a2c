//! The hub's operation throttles (`edgetwin-sim serve --tier --units`): one token bucket per
//! kind of operation, at the rates IoT Hub publishes for each tier, with the traffic shaping
//! the hub applies before it answers 429. Pure: no I/O, no clock of its own (callers pass
//! `now`), so the arithmetic is unit-tested; [`crate::hub::Hub::admit`] holds one behind a
//! lock and the front ends (MQTT CONNECT, MQTT twin GET / reported PATCH, REST) ask it.
//!
//! Rates (operations per second or per minute, × units where the table says "/unit"), from
//! PROTOCOL.md §7 and §14.4, themselves from MicrosoftDocs/azure-docs
//! `articles/iot-hub/iot-hub-devguide-quotas-throttling.md` (2019 revision and the live page
//! <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-quotas-throttling>):
//!
//! | kind | Free / S1 | S2 | S3 |
//! |---|---|---|---|
//! | device (and module) connections | max(100/s, 12/s/unit) | 120/s/unit | 6,000/s/unit |
//! | twin reads | 100/s | max(100/s, 10/s/unit) | 500/s/unit |
//! | twin updates (reported and desired) | 50/s | max(50/s, 5/s/unit) | 250/s/unit |
//! | identity registry operations | 100/min/unit | 100/min/unit | 5,000/min/unit |
//! | queries | 20/min/unit | 20/min/unit | 1,000/min/unit |
//! | configurations and deployments | 20/min/unit | 20/min/unit | 20/min/unit |
//!
//! Free has one unit by definition; `--units` is honoured anyway for the "/unit" rows.
//!
//! What the documentation does not publish, and is therefore this emulator's choice:
//! - **Burst**: a bucket holds one period's worth of its rate (100 connects for S1, a
//!   minute's 100 registry operations), so an idle hub first accepts a burst of that size.
//! - **Shaping**: the doc says bursts above the limit "are first accepted, then queued and
//!   processed at the limit, then rejected with 429 ThrottlingException once the queue
//!   fills". An operation that finds the bucket empty is delayed until its token would be
//!   there, if that is at most [`SHAPING_MAX_WAIT`] away; beyond that it is throttled.
//! - **A throttled MQTT CONNECT** gets no CONNACK: the hub closes the connection (an Azure
//!   maintainer: "429 errors are only respective to the HTTP transport. For MQTT the
//!   connection is closed", Azure/azure-iot-sdk-c#1766), and a shaped one gets its CONNACK
//!   late ("during client connection the CONNECT requests can have a delay in being
//!   acknowledged", Azure/azure-iot-sdk-csharp#2044, which raised the SDK's CONNACK timeout
//!   to 60 s for it). CONNACK 5 would be wrong: SDKs take it as bad credentials (§3.4).
//! - Twin operations over MQTT answer `$iothub/twin/res/429/?$rid=` (PROTOCOL §7); REST
//!   answers 429 `ThrottlingException` (429001) in the hub's error body. No `Retry-After`:
//!   nothing documents IoT Hub sending one (only DPS does, PROTOCOL §12).

use std::fmt;
use std::time::{Duration, Instant};

/// Longest an operation is held back (traffic shaping) before it is throttled instead.
pub const SHAPING_MAX_WAIT: Duration = Duration::from_secs(5);

/// A kind of operation the hub meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    DeviceConnect,
    TwinRead,
    /// Reported patches from modules and desired/tags writes from the service.
    TwinUpdate,
    RegistryOperation,
    Query,
    Configuration,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::DeviceConnect,
        Kind::TwinRead,
        Kind::TwinUpdate,
        Kind::RegistryOperation,
        Kind::Query,
        Kind::Configuration,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::DeviceConnect => "device connects",
            Kind::TwinRead => "twin reads",
            Kind::TwinUpdate => "twin updates",
            Kind::RegistryOperation => "registry operations",
            Kind::Query => "queries",
            Kind::Configuration => "configurations",
        }
    }
}

/// An IoT Hub tier; `Off` meters nothing (the emulator's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    #[default]
    Off,
    Free,
    S1,
    S2,
    S3,
}

/// `--tier` values that are not a tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tier '{0}': expected off, free, s1, s2 or s3")]
pub struct UnknownTier(pub String);

impl std::str::FromStr for Tier {
    type Err = UnknownTier;
    fn from_str(s: &str) -> Result<Tier, UnknownTier> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Tier::Off),
            "free" | "f1" => Ok(Tier::Free),
            "s1" => Ok(Tier::S1),
            "s2" => Ok(Tier::S2),
            "s3" => Ok(Tier::S3),
            _ => Err(UnknownTier(s.to_string())),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Off => "off",
            Tier::Free => "free",
            Tier::S1 => "s1",
            Tier::S2 => "s2",
            Tier::S3 => "s3",
        })
    }
}

/// `amount` operations per `period` (one second or one minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub amount: u32,
    pub period: Duration,
}

impl Rate {
    pub const fn per_sec(amount: u32) -> Rate {
        Rate {
            amount,
            period: Duration::from_secs(1),
        }
    }
    pub const fn per_min(amount: u32) -> Rate {
        Rate {
            amount,
            period: Duration::from_secs(60),
        }
    }
    /// Operations per second, the bucket's refill rate.
    pub fn per_second(&self) -> f64 {
        f64::from(self.amount) / self.period.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 => write!(f, "{}/s", self.amount),
            60 => write!(f, "{}/min", self.amount),
            _ => write!(f, "{}/{:?}", self.amount, self.period),
        }
    }
}

/// The published rate of `kind` on `tier` with `units` units (None: not metered).
pub fn rate(tier: Tier, units: u32, kind: Kind) -> Option<Rate> {
    let u = units.max(1);
    let r = match (tier, kind) {
        (Tier::Off, _) => return None,
        (Tier::Free | Tier::S1, Kind::DeviceConnect) => Rate::per_sec(100.max(12 * u)),
        (Tier::S2, Kind::DeviceConnect) => Rate::per_sec(120 * u),
        (Tier::S3, Kind::DeviceConnect) => Rate::per_sec(6000 * u),
        (Tier::Free | Tier::S1, Kind::TwinRead) => Rate::per_sec(100),
        (Tier::S2, Kind::TwinRead) => Rate::per_sec(100.max(10 * u)),
        (Tier::S3, Kind::TwinRead) => Rate::per_sec(500 * u),
        (Tier::Free | Tier::S1, Kind::TwinUpdate) => Rate::per_sec(50),
        (Tier::S2, Kind::TwinUpdate) => Rate::per_sec(50.max(5 * u)),
        (Tier::S3, Kind::TwinUpdate) => Rate::per_sec(250 * u),
        (Tier::Free | Tier::S1 | Tier::S2, Kind::RegistryOperation) => Rate::per_min(100 * u),
        (Tier::S3, Kind::RegistryOperation) => Rate::per_min(5000 * u),
        (Tier::Free | Tier::S1 | Tier::S2, Kind::Query) => Rate::per_min(20 * u),
        (Tier::S3, Kind::Query) => Rate::per_min(1000 * u),
        (_, Kind::Configuration) => Rate::per_min(20 * u),
    };
    Some(r)
}

/// What the hub does with one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the rate: carry it out now.
    Now,
    /// Shaped: carry it out after this delay (its token is reserved).
    After(Duration),
    /// The queue is full: answer 429 (MQTT CONNECT: close without CONNACK).
    Throttled,
}

/// Operations of one kind seen by the hub.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Carried out (at once or after shaping).
    pub accepted: u64,
    /// Of those, held back by shaping first.
    pub delayed: u64,
    /// Answered 429 (or, for connects, closed).
    pub throttled: u64,
}

/// Counts per kind since the hub started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub tier: Tier,
    pub units: u32,
    limits: [Option<Rate>; 6],
    counts: [Count; 6],
}

impl Counts {
    pub fn get(&self, kind: Kind) -> Count {
        self.counts[kind.index()]
    }

    /// The rate enforced for `kind` (None: not metered).
    pub fn limit(&self, kind: Kind) -> Option<Rate> {
        self.limits[kind.index()]
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "throttling: tier {} units {}", self.tier, self.units)?;
        writeln!(
            f,
            "  {:<20} {:>10} {:>10} {:>10} {:>10}",
            "kind", "limit", "accepted", "delayed", "throttled"
        )?;
        for kind in Kind::ALL {
            let c = self.get(kind);
            let limit =
                rate(self.tier, self.units, kind).map_or("-".to_string(), |r| r.to_string());
            writeln!(
                f,
                "  {:<20} {:>10} {:>10} {:>10} {:>10}",
                kind.name(),
                limit,
                c.accepted,
                c.delayed,
                c.throttled
            )?;
        }
        Ok(())
    }
}

/// One token bucket. `level` goes below zero while operations are queued by shaping: each
/// one reserves the token the refill will bring.
#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: Rate, now: Instant) -> Bucket {
        let capacity = f64::from(rate.amount.max(1));
        Bucket {
            capacity,
            per_sec: rate.per_second(),
            level: capacity,
            last: now,
        }
    }

    fn admit(&mut self, now: Instant, max_wait: Duration) -> Admission {
        // An earlier `now` (callers racing for the lock) refills nothing rather than panicking.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.level = (self.level + elapsed * self.per_sec).min(self.capacity);
        if self.level >= 1.0 {
            self.level -= 1.0;
            return Admission::Now;
        }
        let wait = Duration::from_secs_f64((1.0 - self.level) / self.per_sec);
        if wait <= max_wait {
            self.level -= 1.0;
            Admission::After(wait)
        } else {
            Admission::Throttled
        }
    }
}

/// The throttles of one hub.
#[derive(Debug, Clone)]
pub struct Throttle {
    tier: Tier,
    units: u32,
    max_wait: Duration,
    limits: [Option<Rate>; 6],
    buckets: [Option<Bucket>; 6],
    counts: [Count; 6],
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(Tier::Off, 1, Instant::now())
    }
}

impl Throttle {
    /// Full buckets at `now`, shaping up to [`SHAPING_MAX_WAIT`].
    pub fn new(tier: Tier, units: u32, now: Instant) -> Throttle {
        Throttle::with_max_wait(tier, units, SHAPING_MAX_WAIT, now)
    }

    /// With another shaping queue (`Duration::ZERO`: no shaping, 429 at once).
    pub fn with_max_wait(tier: Tier, units: u32, max_wait: Duration, now: Instant) -> Throttle {
        let units = units.max(1);
        let limits = Kind::ALL.map(|k| rate(tier, units, k));
        Throttle {
            tier,
            units,
            max_wait,
            limits,
            buckets: limits.map(|r| r.map(|r| Bucket::new(r, now))),
            counts: [Count::default(); 6],
        }
    }

    /// Rates of one's own instead of a tier's (tests make a limit slow enough to hit on
    /// purpose); kinds not listed are not metered.
    pub fn with_rates(
        rates: impl IntoIterator<Item = (Kind, Rate)>,
        max_wait: Duration,
        now: Instant,
    ) -> Throttle {
        let mut t = Throttle::with_max_wait(Tier::Off, 1, max_wait, now);
        for (kind, rate) in rates {
            t.limits[kind.index()] = Some(rate);
            t.buckets[kind.index()] = Some(Bucket::new(rate, now));
        }
        t
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn units(&self) -> u32 {
        self.units
    }

    /// Decides one operation of `kind` arriving at `now`, and counts it.
    pub fn admit(&mut self, kind: Kind, now: Instant) -> Admission {
        let i = kind.index();
        let admission = match &mut self.buckets[i] {
            None => Admission::Now,
            Some(bucket) => bucket.admit(now, self.max_wait),
        };
        let c = &mut self.counts[i];
        match admission {
            Admission::Now => c.accepted += 1,
            Admission::After(_) => {
                c.accepted += 1;
                c.delayed += 1;
            }
            Admission::Throttled => c.throttled += 1,
        }
        admission
    }

    pub fn counts(&self) -> Counts {
        Counts {
            tier: self.tier,
            units: self.units,
            limits: self.limits,
            counts: self.counts,
        }
    }
}

#[cfg(test)]
mod tests;
