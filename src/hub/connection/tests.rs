//! The connection state machine driven through its inputs with a hand-held clock:
//! connect, renewal, backoff and stop. Refusals are in `tests_refused`.

use super::*;

pub(super) const TTL: Duration = Duration::from_secs(100);
pub(super) const REFUSED: Failure = Failure::Refused(ConnectReturnCode::NotAuthorized);

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Delays at the top of the jitter range: 1, 2, 4, 8, 8, ... seconds (refused: 60, 120,
/// 240, 480, 480, ...).
pub(super) fn ceiling(policy: &BackoffPolicy, attempt: u32) -> Duration {
    policy
        .initial
        .saturating_mul(1 << attempt.min(16))
        .min(policy.max)
}

pub(super) const REFUSED_POLICY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_secs(60),
    max: Duration::from_secs(480),
};

pub(super) fn connection() -> Connection {
    let policy = BackoffPolicy {
        initial: secs(1),
        max: secs(8),
    };
    Connection::with_draw(TTL, policy, REFUSED_POLICY, ceiling)
}

pub(super) fn connected(now: Instant) -> Connection {
    let mut c = connection();
    c.start();
    c.connack(false, now);
    c
}

/// The backoff a failure at `now` asks for, as a delay.
fn backoff_after(c: &mut Connection, failure: Failure, now: Instant) -> Duration {
    match c.failed(failure, now).last() {
        Some(Action::Backoff { until }) => *until - now,
        other => panic!("expected a backoff, got {other:?}"),
    }
}

#[test]
fn first_start_connects_with_fresh_credentials_and_connack_0_subscribes() {
    let now = Instant::now();
    let mut c = connection();
    assert_eq!(c.state(), ConnectionState::Disconnected);
    assert!(!c.polls());
    assert_eq!(c.start(), vec![Action::Connect]);
    assert_eq!(c.state(), ConnectionState::Connecting);
    assert!(c.polls() && !c.is_connected());
    assert_eq!(
        c.connack(true, now),
        vec![Action::Connected {
            session_present: true
        }]
    );
    assert_eq!(c.state(), ConnectionState::Connected);
    assert!(c.is_connected());
    assert_eq!(c.start(), vec![], "a second start changes nothing");
}

#[test]
fn connack_4_counts_as_a_refusal_like_connack_5() {
    let bad_password = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
    let not_authorized = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
    let unavailable = ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable);
    assert_eq!(
        Failure::of(&bad_password),
        Failure::Refused(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(Failure::of(&not_authorized), REFUSED);
    assert_eq!(Failure::of(&unavailable), Failure::Other);
    assert_eq!(
        Failure::of(&ConnectionError::NetworkTimeout),
        Failure::Other
    );
}

#[test]
fn other_errors_before_any_success_back_off_and_never_stop() {
    let mut now = Instant::now();
    let mut c = connection();
    c.start();
    for _ in 0..10 {
        let actions = c.failed(Failure::Other, now);
        assert_eq!(actions[0], Action::ConnectFailed);
        now = c.next_wakeup().expect("a backoff deadline");
        assert_eq!(c.timer(now), vec![Action::Connect]);
    }
}

#[test]
fn token_is_renewed_at_80_percent_of_its_lifetime_by_a_planned_reconnect() {
    let now = Instant::now();
    let mut c = connected(now);
    assert_eq!(c.next_wakeup(), Some(now + secs(80)));
    assert_eq!(c.timer(now + secs(79)), vec![]);
    assert_eq!(c.timer(now + secs(80)), vec![Action::Renew]);
    assert_eq!(c.phase(), Phase::Renewing);
    assert_eq!(c.state(), ConnectionState::Connected);
    assert_eq!(c.next_wakeup(), None);
    assert_eq!(
        c.disconnect_sent(),
        vec![Action::Lost { planned: true }, Action::Connect]
    );
    assert_eq!(c.state(), ConnectionState::Connecting);
    c.connack(true, now + secs(81));
    assert_eq!(c.next_wakeup(), Some(now + secs(161)));
}

#[test]
fn an_error_after_the_renewal_disconnect_reconnects_at_once_and_is_not_a_failure() {
    let start = Instant::now();
    let mut c = connected(start);
    c.failed(Failure::Other, start);
    let now = c.next_wakeup().expect("a backoff deadline");
    c.timer(now);
    c.connack(false, now);
    c.timer(now + secs(80));
    assert_eq!(
        c.failed(REFUSED, now + secs(80)),
        vec![Action::Lost { planned: true }, Action::Connect],
        "no refusal counted, no backoff"
    );
    assert_eq!(
        backoff_after(&mut c, Failure::Other, now + secs(81)),
        secs(1),
        "the next real failure is the first since the last success"
    );
}

#[test]
fn a_lost_connection_backs_off_with_growing_capped_delays_and_resets_after_success() {
    let mut now = Instant::now();
    let mut c = connected(now);
    let first = c.failed(Failure::Other, now);
    assert_eq!(first[0], Action::Lost { planned: false });
    assert!(
        !first.contains(&Action::ConnectFailed),
        "a lost connection is logged once, as a loss"
    );
    let mut delays = vec![c.next_wakeup().expect("a backoff deadline") - now];
    for _ in 0..4 {
        now = c.next_wakeup().expect("a backoff deadline");
        assert_eq!(c.timer(now - Duration::from_millis(1)), vec![]);
        assert_eq!(c.timer(now), vec![Action::Connect]);
        delays.push(backoff_after(&mut c, Failure::Other, now));
    }
    // The loss is spread over 1..=8 s (drawn at its ceiling here); the failed attempts
    // after it grow from the start of the policy, up to its cap.
    assert_eq!(delays, [secs(8), secs(2), secs(4), secs(8), secs(8)]);
    now = c.next_wakeup().expect("a backoff deadline");
    c.timer(now);
    c.connack(true, now);
    assert_eq!(backoff_after(&mut c, Failure::Other, now), secs(8));
}

/// Records the attempt numbers the machine draws delays for.
fn attempt_as_secs(_: &BackoffPolicy, attempt: u32) -> Duration {
    secs(u64::from(attempt) + 1)
}

#[test]
fn a_lost_connection_draws_its_first_reconnect_from_a_spread_window_then_grows_as_usual() {
    let mut now = Instant::now();
    let policy = BackoffPolicy {
        initial: secs(1),
        max: secs(120),
    };
    let mut c = Connection::with_draw(TTL, policy, REFUSED_POLICY, attempt_as_secs);
    c.start();
    c.connack(false, now);
    let mut attempts = Vec::new();
    c.failed(Failure::Other, now);
    for _ in 0..3 {
        let at = c.next_wakeup().expect("a backoff deadline");
        attempts.push((at - now).as_secs() - 1);
        now = at;
        c.timer(now);
        c.failed(Failure::Other, now);
    }
    assert_eq!(attempts, [u64::from(LOSS_SPREAD), 1, 2]);
}

#[test]
fn connect_failures_before_any_connection_start_at_the_first_attempt() {
    let now = Instant::now();
    let mut c = Connection::with_draw(
        TTL,
        BackoffPolicy::default(),
        REFUSED_POLICY,
        attempt_as_secs,
    );
    c.start();
    assert_eq!(backoff_after(&mut c, Failure::Other, now), secs(1));
}

#[test]
fn the_spread_window_after_a_loss_is_jittered_within_the_policy() {
    let policy = BackoffPolicy {
        initial: secs(1),
        max: secs(120),
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let now = Instant::now();
        let mut c = Connection::new(TTL, policy, REFUSED_POLICY);
        c.start();
        c.connack(false, now);
        let delay = backoff_after(&mut c, Failure::Other, now);
        assert!((secs(1)..=secs(8)).contains(&delay), "{delay:?}");
        seen.insert(delay.as_millis() / 1000);
    }
    assert!(
        seen.len() > 3,
        "reconnects spread over the window: {seen:?}"
    );
}

#[test]
fn delays_drawn_with_full_jitter_stay_within_the_policy() {
    let now = Instant::now();
    let policy = BackoffPolicy {
        initial: secs(1),
        max: secs(8),
    };
    let mut c = Connection::new(TTL, policy, REFUSED_POLICY);
    c.start();
    assert_eq!(backoff_after(&mut c, Failure::Other, now), secs(1));
    for _ in 0..20 {
        let at = c.next_wakeup().expect("a backoff deadline");
        c.timer(at);
        let delay = backoff_after(&mut c, Failure::Other, at);
        assert!((secs(1)..=secs(8)).contains(&delay), "{delay:?}");
    }
}

#[test]
fn stop_while_connecting_is_immediate() {
    let now = Instant::now();
    let mut c = connection();
    c.start();
    assert_eq!(c.shutdown(now), vec![Action::Stop]);
    assert_eq!(c.state(), ConnectionState::Disconnected);
    assert_eq!(c.shutdown(now), vec![], "asked twice, stopped once");
}

#[test]
fn stop_before_start_is_immediate() {
    let mut c = connection();
    assert_eq!(c.shutdown(Instant::now()), vec![Action::Stop]);
    assert_eq!(c.start(), vec![]);
}

#[test]
fn stop_while_connected_sends_disconnect_and_stops_when_it_went_out() {
    let now = Instant::now();
    let mut c = connected(now);
    assert_eq!(c.shutdown(now), vec![Action::Disconnect]);
    assert!(c.is_stopping() && c.is_connected() && c.polls());
    assert_eq!(c.shutdown(now), vec![], "asked twice, one DISCONNECT");
    assert_eq!(
        c.disconnect_sent(),
        vec![Action::Lost { planned: true }, Action::Stop]
    );
    assert_eq!(c.state(), ConnectionState::Disconnected);
}

#[test]
fn stop_while_connected_gives_up_on_the_disconnect_at_the_grace_deadline() {
    let now = Instant::now();
    let mut c = connected(now);
    c.shutdown(now);
    assert_eq!(c.next_wakeup(), Some(now + STOP_GRACE));
    assert_eq!(c.timer(now + STOP_GRACE - Duration::from_millis(1)), vec![]);
    assert_eq!(
        c.timer(now + STOP_GRACE),
        vec![Action::Lost { planned: true }, Action::Stop]
    );
}

#[test]
fn stop_while_connected_ends_on_a_connection_error_too() {
    let now = Instant::now();
    let mut c = connected(now);
    c.shutdown(now);
    assert_eq!(
        c.failed(Failure::Other, now),
        vec![Action::Lost { planned: true }, Action::Stop]
    );
}

#[test]
fn stop_while_renewing_disconnects_and_does_not_reconnect() {
    let now = Instant::now();
    let mut c = connected(now);
    c.timer(now + secs(80));
    assert_eq!(c.shutdown(now + secs(80)), vec![Action::Disconnect]);
    assert_eq!(
        c.disconnect_sent(),
        vec![Action::Lost { planned: true }, Action::Stop]
    );
}

#[test]
fn stop_during_backoff_is_immediate() {
    let now = Instant::now();
    let mut c = connection();
    c.start();
    c.failed(Failure::Other, now);
    assert!(!c.polls());
    assert_eq!(c.shutdown(now), vec![Action::Stop]);
    assert_eq!(c.next_wakeup(), None);
    assert_eq!(c.timer(now + secs(60)), vec![], "no connect after the stop");
}

#[test]
fn inputs_that_cannot_happen_in_a_phase_change_nothing() {
    let now = Instant::now();
    let mut c = connection();
    assert_eq!(c.connack(false, now), vec![]);
    assert_eq!(c.failed(Failure::Other, now), vec![]);
    assert_eq!(c.disconnect_sent(), vec![]);
    assert_eq!(c.timer(now), vec![]);
    assert_eq!(c.phase(), Phase::Idle);
    c.start();
    c.failed(Failure::Other, now);
    let backoff = c.phase();
    assert_eq!(c.connack(false, now), vec![]);
    assert_eq!(c.failed(REFUSED, now), vec![]);
    assert_eq!(c.phase(), backoff);
}

#[test]
fn published_state_reads_as_status_words() {
    let now = Instant::now();
    let mut c = connection();
    c.start();
    assert_eq!(c.state().describe(), "connecting");
    c.failed(Failure::Other, now);
    assert_eq!(
        c.state(),
        ConnectionState::Backoff {
            until: now + secs(1)
        }
    );
    assert_eq!(c.state().describe(), "waiting to reconnect");
    c.shutdown(now);
    assert_eq!(c.state().describe(), "disconnected");
}
