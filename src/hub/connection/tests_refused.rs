//! Refused credentials: the clock checked once per episode, a wrong clock corrected and
//! retried at once, anything else a long capped backoff that never ends the session,
//! and a changed credential tried at once.

use super::tests::{ceiling, connected, connection, secs, REFUSED, REFUSED_POLICY};
use super::*;

const DAY: i64 = 86_400;
const CODE: ConnectReturnCode = ConnectReturnCode::NotAuthorized;

/// A connection whose first connect was just refused (now measuring the clock).
fn refused_at_start(now: Instant) -> Connection {
    let mut c = connection();
    c.start();
    c.failed(REFUSED, now);
    c
}

/// The refused backoff `actions` end with, as a delay from `now`.
fn refused_delay(actions: &[Action], now: Instant) -> Duration {
    match actions.last() {
        Some(Action::RefusedBackoff { until, code }) => {
            assert_eq!(*code, CODE);
            *until - now
        }
        other => panic!("expected a refused backoff, got {other:?}"),
    }
}

#[test]
fn a_first_refusal_asks_for_the_hubs_time_and_stops_polling_meanwhile() {
    let now = Instant::now();
    let mut c = connection();
    c.start();
    assert_eq!(
        c.failed(REFUSED, now),
        vec![
            Action::Refused {
                code: CODE,
                attempts: 1
            },
            Action::MeasureClock
        ]
    );
    assert_eq!(c.state(), ConnectionState::CheckingClock);
    assert!(!c.polls() && !c.is_connected());
    assert_eq!(c.next_wakeup(), Some(now + MEASURE_DEADLINE));
    assert!(c.refused_since_success());
}

#[test]
fn a_clock_days_behind_is_corrected_and_the_connect_retried_at_once() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    assert_eq!(
        c.clock_measured(Some(2 * DAY), now),
        vec![Action::ClockSkew { skew_secs: 2 * DAY }, Action::Connect]
    );
    assert_eq!(c.skew_secs(), 2 * DAY);
    assert_eq!(c.state(), ConnectionState::Connecting);
    assert_eq!(
        c.connack(false, now),
        vec![Action::Connected {
            session_present: false
        }]
    );
    assert_eq!(c.skew_secs(), 2 * DAY, "kept for every later token");
    assert!(!c.refused_since_success());
}

#[test]
fn a_refusal_after_the_correction_backs_off_long_without_measuring_again() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    c.clock_measured(Some(-2 * DAY), now);
    let actions = c.failed(REFUSED, now);
    assert_eq!(
        actions[0],
        Action::Refused {
            code: CODE,
            attempts: 2
        }
    );
    assert!(!actions.contains(&Action::MeasureClock), "{actions:?}");
    assert_eq!(refused_delay(&actions, now), REFUSED_POLICY.initial);
    assert_eq!(
        c.state(),
        ConnectionState::Refused {
            until: now + REFUSED_POLICY.initial,
            code: 5,
            attempts: 2
        }
    );
    assert_eq!(c.state().describe(), "credentials refused");
}

#[test]
fn a_refusal_with_the_clock_within_tolerance_backs_off_long_and_keeps_the_clock() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    let actions = c.clock_measured(Some(3), now);
    assert_eq!(actions.len(), 1, "no skew, no connect: {actions:?}");
    assert_eq!(refused_delay(&actions, now), secs(60));
    assert_eq!(c.skew_secs(), 0);
    assert!(!c.polls());
}

#[test]
fn refused_backoffs_grow_to_their_cap_and_never_end_the_session() {
    let mut now = Instant::now();
    let mut c = refused_at_start(now);
    let mut delays = vec![refused_delay(&c.clock_measured(Some(0), now), now)];
    for attempt in 2..=8 {
        now = c.next_wakeup().expect("a backoff deadline");
        assert_eq!(c.timer(now), vec![Action::Connect]);
        let actions = c.failed(REFUSED, now);
        assert_eq!(
            actions[0],
            Action::Refused {
                code: CODE,
                attempts: attempt
            }
        );
        assert!(!actions.contains(&Action::Stop), "{actions:?}");
        delays.push(refused_delay(&actions, now));
    }
    let expected: Vec<_> = [60, 120, 240, 480, 480, 480, 480, 480].map(secs).to_vec();
    assert_eq!(delays, expected);
}

#[test]
fn a_network_failure_between_refusals_keeps_its_short_backoff() {
    let mut now = Instant::now();
    let mut c = refused_at_start(now);
    c.clock_measured(Some(0), now);
    now = c.next_wakeup().expect("deadline");
    c.timer(now);
    let actions = c.failed(Failure::Other, now);
    assert_eq!(
        actions,
        vec![
            Action::ConnectFailed,
            Action::Backoff {
                until: now + secs(1)
            }
        ]
    );
    assert!(matches!(c.state(), ConnectionState::Backoff { .. }));
    now += secs(1);
    c.timer(now);
    let actions = c.failed(REFUSED, now);
    assert_eq!(
        refused_delay(&actions, now),
        secs(120),
        "the refused backoff goes on growing"
    );
}

#[test]
fn a_failed_reading_backs_off_long_and_the_next_refusal_reads_again() {
    let mut now = Instant::now();
    let mut c = refused_at_start(now);
    assert_eq!(refused_delay(&c.clock_measured(None, now), now), secs(60));
    now = c.next_wakeup().expect("deadline");
    c.timer(now);
    assert_eq!(c.failed(REFUSED, now).last(), Some(&Action::MeasureClock));
}

#[test]
fn no_reading_by_the_deadline_counts_as_a_failed_reading() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    assert_eq!(c.timer(now + MEASURE_DEADLINE - secs(1)), vec![]);
    let late = now + MEASURE_DEADLINE;
    assert_eq!(refused_delay(&c.timer(late), late), secs(60));
    assert_eq!(
        c.clock_measured(Some(2 * DAY), late),
        vec![],
        "a reading after the deadline changes nothing"
    );
    assert_eq!(c.skew_secs(), 0);
}

#[test]
fn a_changed_credential_is_tried_at_once_and_opens_a_new_episode() {
    let mut now = Instant::now();
    let mut c = refused_at_start(now);
    c.clock_measured(Some(0), now);
    now = c.next_wakeup().expect("deadline");
    c.timer(now);
    c.failed(REFUSED, now);
    assert!(matches!(c.state(), ConnectionState::Refused { .. }));
    assert_eq!(c.credentials_changed(), vec![Action::Connect]);
    assert_eq!(c.state(), ConnectionState::Connecting);
    assert!(!c.refused_since_success());
    let actions = c.failed(REFUSED, now);
    assert_eq!(
        actions,
        vec![
            Action::Refused {
                code: CODE,
                attempts: 1
            },
            Action::MeasureClock
        ],
        "the new credential's refusal checks the clock again"
    );
    assert_eq!(
        refused_delay(&c.clock_measured(Some(0), now), now),
        secs(60),
        "and backs off from the start"
    );
}

#[test]
fn a_changed_credential_while_checking_the_clock_is_tried_at_once() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    assert_eq!(c.credentials_changed(), vec![Action::Connect]);
    assert_eq!(
        c.clock_measured(Some(2 * DAY), now),
        vec![],
        "the old episode's reading arrives late and is ignored"
    );
}

#[test]
fn a_changed_credential_elsewhere_waits_for_the_next_connect() {
    let now = Instant::now();
    let mut c = connected(now);
    assert_eq!(c.credentials_changed(), vec![]);
    assert!(c.is_connected());
    c.failed(Failure::Other, now);
    assert_eq!(
        c.credentials_changed(),
        vec![],
        "a plain backoff keeps its deadline"
    );
    let mut fresh = connection();
    assert_eq!(fresh.credentials_changed(), vec![]);
    assert_eq!(fresh.phase(), Phase::Idle);
}

#[test]
fn a_success_ends_the_episode_and_a_later_refusal_measures_against_the_corrected_clock() {
    let mut now = Instant::now();
    let mut c = refused_at_start(now);
    c.clock_measured(Some(2 * DAY), now);
    c.connack(true, now);
    // NTP has since set the machine's clock right: the signer is two days ahead.
    now += secs(10);
    c.failed(Failure::Other, now);
    now = c.next_wakeup().expect("deadline");
    c.timer(now);
    assert_eq!(c.failed(REFUSED, now).last(), Some(&Action::MeasureClock));
    assert_eq!(
        c.clock_measured(Some(-2 * DAY), now),
        vec![Action::ClockSkew { skew_secs: 0 }, Action::Connect]
    );
}

#[test]
fn a_refusal_of_the_renewal_reconnect_is_planned_then_checked_like_any_other() {
    let now = Instant::now();
    let mut c = connected(now);
    c.timer(now + secs(80));
    assert_eq!(
        c.failed(REFUSED, now + secs(80)),
        vec![Action::Lost { planned: true }, Action::Connect]
    );
    assert_eq!(
        c.failed(REFUSED, now + secs(81)).last(),
        Some(&Action::MeasureClock)
    );
}

#[test]
fn stop_while_checking_the_clock_is_immediate() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    assert_eq!(c.shutdown(now), vec![Action::Stop]);
    assert_eq!(c.clock_measured(Some(2 * DAY), now), vec![]);
    assert_eq!(c.next_wakeup(), None);
    let mut c = refused_at_start(now);
    c.clock_measured(None, now);
    assert_eq!(
        c.shutdown(now),
        vec![Action::Stop],
        "in the refused backoff too"
    );
}

#[test]
fn inputs_that_cannot_happen_while_checking_the_clock_change_nothing() {
    let now = Instant::now();
    let mut c = refused_at_start(now);
    let checking = c.phase();
    assert_eq!(c.connack(false, now), vec![]);
    assert_eq!(c.failed(REFUSED, now), vec![]);
    assert_eq!(c.disconnect_sent(), vec![]);
    assert_eq!(c.start(), vec![]);
    assert_eq!(c.phase(), checking);
    let mut connected = connected(now);
    assert_eq!(connected.clock_measured(Some(2 * DAY), now), vec![]);
    assert_eq!(connected.skew_secs(), 0);
}

#[test]
fn the_default_refused_backoff_is_a_minute_doubling_to_an_hour() {
    assert_eq!(REFUSED_BACKOFF.initial, secs(60));
    assert_eq!(REFUSED_BACKOFF.max, secs(3600));
    assert_eq!(ceiling(&REFUSED_BACKOFF, 6), secs(3600));
    for attempt in 0..10 {
        let d = REFUSED_BACKOFF.delay(attempt);
        assert!((secs(60)..=secs(3600)).contains(&d), "{d:?}");
    }
}
