//! The token buckets with a hand-held clock: published rates, burst, refill, shaping,
//! counts.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn s1_rates_are_the_published_ones() {
    let r = |k| rate(Tier::S1, 1, k).unwrap().to_string();
    assert_eq!(r(Kind::DeviceConnect), "100/s");
    assert_eq!(r(Kind::TwinRead), "100/s");
    assert_eq!(r(Kind::TwinUpdate), "50/s");
    assert_eq!(r(Kind::RegistryOperation), "100/min");
    assert_eq!(r(Kind::Query), "20/min");
    assert_eq!(r(Kind::Configuration), "20/min");
}

#[test]
fn units_scale_the_rates_the_table_gives_per_unit() {
    // S1: connects are the higher of 100/s and 12/s/unit; twin reads do not scale.
    assert_eq!(rate(Tier::S1, 10, Kind::DeviceConnect).unwrap().amount, 120);
    assert_eq!(rate(Tier::S1, 10, Kind::TwinRead).unwrap().amount, 100);
    assert_eq!(
        rate(Tier::S1, 3, Kind::RegistryOperation).unwrap().amount,
        300
    );
    assert_eq!(rate(Tier::S2, 20, Kind::TwinRead).unwrap().amount, 200);
    assert_eq!(rate(Tier::S2, 2, Kind::TwinUpdate).unwrap().amount, 50);
    assert_eq!(
        rate(Tier::S3, 2, Kind::DeviceConnect).unwrap().amount,
        12_000
    );
    assert_eq!(
        rate(Tier::S3, 1, Kind::Query).unwrap().to_string(),
        "1000/min"
    );
    assert_eq!(rate(Tier::S3, 4, Kind::Configuration).unwrap().amount, 80);
    assert_eq!(rate(Tier::Off, 1, Kind::TwinRead), None);
}

#[test]
fn tiers_parse_from_the_command_line_spelling() {
    assert_eq!("S1".parse::<Tier>(), Ok(Tier::S1));
    assert_eq!("off".parse::<Tier>(), Ok(Tier::Off));
    assert!("s4".parse::<Tier>().is_err());
}

#[test]
fn off_admits_everything_and_still_counts() {
    let t0 = Instant::now();
    let mut t = Throttle::new(Tier::Off, 1, t0);
    for _ in 0..10_000 {
        assert_eq!(t.admit(Kind::TwinRead, t0), Admission::Now);
    }
    assert_eq!(t.counts().get(Kind::TwinRead).accepted, 10_000);
}

#[test]
fn a_burst_of_one_periods_worth_is_accepted_at_once() {
    let t0 = Instant::now();
    let mut t = Throttle::with_max_wait(Tier::S1, 1, Duration::ZERO, t0);
    for _ in 0..100 {
        assert_eq!(t.admit(Kind::DeviceConnect, t0), Admission::Now);
    }
    assert_eq!(t.admit(Kind::DeviceConnect, t0), Admission::Throttled);
    let c = t.counts().get(Kind::DeviceConnect);
    assert_eq!((c.accepted, c.throttled), (100, 1));
}

#[test]
fn an_empty_bucket_refills_at_the_rate() {
    let t0 = Instant::now();
    let mut t = Throttle::with_max_wait(Tier::S1, 1, Duration::ZERO, t0);
    for _ in 0..50 {
        t.admit(Kind::TwinUpdate, t0);
    }
    assert_eq!(t.admit(Kind::TwinUpdate, t0), Admission::Throttled);
    // 50/s: one token every 20 ms.
    assert_eq!(t.admit(Kind::TwinUpdate, t0 + ms(19)), Admission::Throttled);
    assert_eq!(t.admit(Kind::TwinUpdate, t0 + ms(21)), Admission::Now);
    assert_eq!(t.admit(Kind::TwinUpdate, t0 + ms(21)), Admission::Throttled);
    // A long pause refills no more than the burst.
    let later = t0 + Duration::from_secs(3600);
    let accepted = (0..200)
        .filter(|_| t.admit(Kind::TwinUpdate, later) == Admission::Now)
        .count();
    assert_eq!(accepted, 50);
}

#[test]
fn per_minute_rates_refill_a_token_every_sixtieth_of_the_amount() {
    let t0 = Instant::now();
    let mut t = Throttle::with_max_wait(Tier::S1, 1, Duration::ZERO, t0);
    for _ in 0..20 {
        assert_eq!(t.admit(Kind::Query, t0), Admission::Now);
    }
    assert_eq!(t.admit(Kind::Query, t0), Admission::Throttled);
    assert_eq!(t.admit(Kind::Query, t0 + ms(2_900)), Admission::Throttled);
    assert_eq!(t.admit(Kind::Query, t0 + ms(3_001)), Admission::Now);
}

#[test]
fn shaping_delays_until_the_token_and_throttles_beyond_the_queue() {
    let t0 = Instant::now();
    let mut t = Throttle::with_max_wait(Tier::S1, 1, ms(50), t0);
    for _ in 0..100 {
        t.admit(Kind::TwinRead, t0);
    }
    // 100/s: the next ones wait 10, 20, ... ms; 50 ms is the last that fits.
    for n in 1..=5u64 {
        match t.admit(Kind::TwinRead, t0) {
            Admission::After(d) => assert!(d.abs_diff(ms(10 * n)) < ms(1), "{d:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(t.admit(Kind::TwinRead, t0), Admission::Throttled);
    let c = t.counts().get(Kind::TwinRead);
    assert_eq!((c.accepted, c.delayed, c.throttled), (105, 5, 1));
    // Once the queued ones are served, tokens flow again.
    assert_eq!(t.admit(Kind::TwinRead, t0 + ms(61)), Admission::Now);
}

#[test]
fn kinds_have_separate_buckets() {
    let t0 = Instant::now();
    let mut t = Throttle::with_max_wait(Tier::S1, 1, Duration::ZERO, t0);
    for _ in 0..100 {
        t.admit(Kind::TwinRead, t0);
    }
    assert_eq!(t.admit(Kind::TwinRead, t0), Admission::Throttled);
    assert_eq!(t.admit(Kind::TwinUpdate, t0), Admission::Now);
    assert_eq!(t.admit(Kind::DeviceConnect, t0), Admission::Now);
}

#[test]
fn an_earlier_instant_than_the_last_one_refills_nothing() {
    let t0 = Instant::now();
    let mut t = Throttle::with_max_wait(Tier::S1, 1, Duration::ZERO, t0 + ms(500));
    for _ in 0..100 {
        t.admit(Kind::TwinRead, t0 + ms(500));
    }
    assert_eq!(t.admit(Kind::TwinRead, t0), Admission::Throttled);
}

#[test]
fn rates_of_ones_own_meter_only_the_kinds_given() {
    let t0 = Instant::now();
    let slow = Rate {
        amount: 1,
        period: Duration::from_secs(2),
    };
    let mut t = Throttle::with_rates([(Kind::TwinRead, slow)], Duration::ZERO, t0);
    assert_eq!(t.admit(Kind::TwinRead, t0), Admission::Now);
    assert_eq!(
        t.admit(Kind::TwinRead, t0 + ms(1_900)),
        Admission::Throttled
    );
    assert_eq!(t.admit(Kind::TwinRead, t0 + ms(2_001)), Admission::Now);
    assert_eq!(t.admit(Kind::DeviceConnect, t0), Admission::Now);
    assert_eq!(t.counts().limit(Kind::TwinRead), Some(slow));
    assert_eq!(t.counts().limit(Kind::Query), None);
}

#[test]
fn the_counts_print_as_a_table_with_the_limits() {
    let t0 = Instant::now();
    let mut t = Throttle::new(Tier::S1, 1, t0);
    t.admit(Kind::Query, t0);
    let text = t.counts().to_string();
    assert!(text.contains("tier s1 units 1"), "{text}");
    assert!(text.contains("queries"), "{text}");
    assert!(text.contains("20/min"), "{text}");
}
