//! The connection to IoT Hub as a state machine: when to connect, when the SAS token is
//! renewed, how long to back off, what a refusal of the credentials leads to (first a
//! check of the clock against the hub's, then a long backoff), and how to stop.
//!
//! Owned by the session task ([`super::session`]), which polls the rumqttc event loop,
//! feeds [`Connection`] what happened and carries out the [`Action`]s it returns. Pure:
//! no I/O, no logging, and the caller passes the clock in. Each transition checks the
//! phase it starts from; an input that cannot happen in a phase changes nothing. The
//! twin requests' timers are not here but in [`super::twin_requests`].
//!
//! Refused credentials (CONNACK 4/5) never end the session: a gateway nobody can reach
//! must come back by itself once its clock or its credential is right. The first refusal
//! of an episode (since the last CONNACK 0 or credential change) asks the session to read
//! the hub's time ([`Action::MeasureClock`]); a clock off by more than the tolerance is
//! corrected (tokens are then signed against hub time, [`Connection::skew_secs`]) and the
//! connect retried at once. Otherwise the refusal backs off long ([`REFUSED_BACKOFF`]), and
//! a changed credential ([`Connection::credentials_changed`]) retries at once.
//!
//! A connection lost while established waits a jittered window before its first reconnect
//! ([`LOSS_SPREAD`]), so a fleet that lost the hub together does not return together.

use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError};
use tokio::time::Instant;

use super::backoff::BackoffPolicy;
use crate::identity::clock::exceeds_tolerance;

/// Delays after a refusal that is not the clock: a wrong key does not fix itself within
/// seconds, and a fleet whose keys were rotated must not hammer the hub, so minutes
/// doubling up to an hour, with full jitter; yet never "given up", as the credential may
/// be fixed (or the module re-created) at any time. `hub.refused_backoff` in config.
pub const REFUSED_BACKOFF: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_secs(60),
    max: Duration::from_secs(3600),
};
/// A connection lost while established is what a whole fleet shares (a hub restart, a
/// network outage): the first reconnect is drawn as if it were attempt number
/// `LOSS_SPREAD` (from `[initial, initial·2³]`, 1–8 s by default), never at exactly
/// `initial`, or every gateway would come back in the same instant and meet the hub's
/// connect throttle together. Attempts after that grow from the policy's start as usual.
pub const LOSS_SPREAD: u32 = 3;
/// How long a graceful stop waits for the DISCONNECT to go out.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the session may take to read the hub's time before the refusal is taken as
/// not the clock's. Above the session's own request timeout, so this is only a backstop.
pub const MEASURE_DEADLINE: Duration = Duration::from_secs(20);
/// The share of the token's lifetime after which it is renewed, leaving the rest for a
/// slow reconnect and some clock skew.
const RENEW_AT: f64 = 0.8;

/// Connection state as the agent and `STATUS=` see it, published through `watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Disconnected,
    Connecting,
    Connected,
    Backoff {
        until: Instant,
    },
    /// The hub refused the credentials; no attempt before `until`. `code` is the CONNACK
    /// return code (4 or 5); `attempts` the refusals since the last success or credential
    /// change (what re-provisioning after repeated refusals would count).
    Refused {
        until: Instant,
        code: u8,
        attempts: u32,
    },
    /// After a refusal: reading the hub's time to tell a wrong clock from a wrong key.
    CheckingClock,
}

impl ConnectionState {
    pub fn describe(&self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Backoff { .. } => "waiting to reconnect",
            ConnectionState::Refused { .. } => "credentials refused",
            ConnectionState::CheckingClock => "checking the clock against the hub's",
        }
    }
}

/// Why a connection or a connect attempt ended, as far as the machine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// CONNACK 4 (bad user name or password) or 5 (not authorized).
    Refused(ConnectReturnCode),
    /// Anything else: network, TLS, timeout, another CONNACK code, a protocol error.
    Other,
}

impl Failure {
    pub fn of(error: &ConnectionError) -> Failure {
        match error {
            ConnectionError::ConnectionRefused(
                code @ (ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword),
            ) => Failure::Refused(*code),
            _ => Failure::Other,
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put fresh credentials (a new SAS token, signed on [`Connection::skew_secs`]) on
    /// the event loop; its next poll connects.
    Connect,
    /// CONNACK 0: subscribe and tell the agent, which then GETs the twin.
    Connected { session_present: bool },
    /// Send DISCONNECT: the token is at 80 % of its life and the reconnect renews it.
    Renew,
    /// Send DISCONNECT: shutting down.
    Disconnect,
    /// The connection we had is gone: fail the twin requests in flight, tell the agent.
    /// `planned` when we asked for it (renewal, shutdown).
    Lost { planned: bool },
    /// A connect attempt failed for a reason other than refused credentials.
    ConnectFailed,
    /// The hub refused the credentials, `attempts` times since the last success or
    /// credential change.
    Refused {
        code: ConnectReturnCode,
        attempts: u32,
    },
    /// Read the hub's time (one HTTPS request, off the event-loop task) and feed the
    /// offset to the signing clock back through [`Connection::clock_measured`].
    MeasureClock,
    /// The clock was off: tokens are signed `skew_secs` from the machine's clock from now
    /// on. A [`Action::Connect`] follows.
    ClockSkew { skew_secs: i64 },
    /// No connect attempt before `until`.
    Backoff { until: Instant },
    /// The refusal was not the clock's: no attempt before `until` (long).
    RefusedBackoff {
        until: Instant,
        code: ConnectReturnCode,
    },
    /// The session is over.
    Stop,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Idle,
    /// A poll is connecting with fresh credentials.
    Connecting,
    Connected {
        renew_at: Instant,
    },
    /// Our DISCONNECT for the renewal is queued: the loss that follows is planned.
    Renewing,
    /// `refused` when it follows refused credentials.
    Backoff {
        until: Instant,
        refused: Option<ConnectReturnCode>,
    },
    /// Refused with `code`; the hub's time is being read, until `by` at the latest.
    MeasuringClock {
        by: Instant,
        code: ConnectReturnCode,
    },
    /// Our DISCONNECT for shutdown is queued: stop when it went out, or at `by`.
    Stopping {
        by: Instant,
    },
    Stopped,
}

/// How a backoff delay is drawn: attempt number (0-based since the last success) to delay.
pub type DrawDelay = fn(&BackoffPolicy, u32) -> Duration;

/// The connection of one session.
#[derive(Debug)]
pub struct Connection {
    phase: Phase,
    sas_ttl: Duration,
    policy: BackoffPolicy,
    refused_policy: BackoffPolicy,
    draw: DrawDelay,
    /// Unplanned failures since the last CONNACK 0: the next backoff's attempt number.
    failures: u32,
    /// Refusals since the last CONNACK 0 or credential change.
    refusals: u32,
    /// Refused backoffs since then: the next one's attempt number.
    refused_backoffs: u32,
    /// The clock was compared with the hub's in this refusal episode (a failed reading
    /// does not count: the next refusal reads again, after a long backoff).
    clock_checked: bool,
    /// Seconds the signing clock is set from the machine's (the measured skew).
    skew_secs: i64,
}

impl Connection {
    /// Backoff delays with the policies' full jitter.
    pub fn new(sas_ttl: Duration, policy: BackoffPolicy, refused_policy: BackoffPolicy) -> Self {
        Connection::with_draw(sas_ttl, policy, refused_policy, BackoffPolicy::delay)
    }

    /// With the delays drawn by `draw` (deterministic in tests).
    pub fn with_draw(
        sas_ttl: Duration,
        policy: BackoffPolicy,
        refused_policy: BackoffPolicy,
        draw: DrawDelay,
    ) -> Self {
        Connection {
            phase: Phase::Idle,
            sas_ttl,
            policy,
            refused_policy,
            draw,
            failures: 0,
            refusals: 0,
            refused_backoffs: 0,
            clock_checked: false,
            skew_secs: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Seconds to add to the machine's clock when signing a token (0 until a refusal
    /// showed the clock off).
    pub fn skew_secs(&self) -> i64 {
        self.skew_secs
    }

    /// Whether the hub refused the credentials since the last CONNACK 0 (the session
    /// then reads the credential again before each connect).
    pub fn refused_since_success(&self) -> bool {
        self.refusals > 0
    }

    /// The published view.
    pub fn state(&self) -> ConnectionState {
        match self.phase {
            Phase::Idle | Phase::Stopped => ConnectionState::Disconnected,
            Phase::Connecting => ConnectionState::Connecting,
            Phase::Connected { .. } | Phase::Renewing | Phase::Stopping { .. } => {
                ConnectionState::Connected
            }
            Phase::Backoff {
                until,
                refused: None,
            } => ConnectionState::Backoff { until },
            Phase::Backoff {
                until,
                refused: Some(code),
            } => ConnectionState::Refused {
                until,
                code: code as u8,
                attempts: self.refusals,
            },
            Phase::MeasuringClock { .. } => ConnectionState::CheckingClock,
        }
    }

    /// Whether publishes can go out (subscriptions were made on this connection).
    pub fn is_connected(&self) -> bool {
        matches!(
            self.phase,
            Phase::Connected { .. } | Phase::Renewing | Phase::Stopping { .. }
        )
    }

    /// Whether the event loop is to be polled: always, except while backing off, reading
    /// the hub's time, or done.
    pub fn polls(&self) -> bool {
        !matches!(
            self.phase,
            Phase::Idle | Phase::Backoff { .. } | Phase::MeasuringClock { .. } | Phase::Stopped
        )
    }

    /// Whether shutdown was already requested (a further request changes nothing).
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. } | Phase::Stopped)
    }

    /// When [`Self::timer`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        match self.phase {
            Phase::Connected { renew_at } => Some(renew_at),
            Phase::Backoff { until, .. } => Some(until),
            Phase::MeasuringClock { by, .. } => Some(by),
            Phase::Stopping { by } => Some(by),
            _ => None,
        }
    }

    pub fn start(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::Idle => self.connect(),
            _ => Vec::new(),
        }
    }

    /// CONNACK 0. Renewal is scheduled on the monotonic clock, so the wall clock being
    /// stepped (NTP) neither hastens nor delays it.
    pub fn connack(&mut self, session_present: bool, now: Instant) -> Vec<Action> {
        if self.phase != Phase::Connecting {
            return Vec::new();
        }
        self.refusals = 0;
        self.refused_backoffs = 0;
        self.clock_checked = false;
        self.failures = 0;
        self.phase = Phase::Connected {
            renew_at: now + self.sas_ttl.mul_f64(RENEW_AT),
        };
        vec![Action::Connected { session_present }]
    }

    /// The event loop returned an error: the attempt or the connection is over.
    pub fn failed(&mut self, failure: Failure, now: Instant) -> Vec<Action> {
        let was_connected = match self.phase {
            Phase::Renewing => return self.reconnect_at_once(),
            Phase::Stopping { .. } => return self.stopped(),
            Phase::Connected { .. } => true,
            Phase::Connecting => false,
            Phase::Idle | Phase::Backoff { .. } | Phase::MeasuringClock { .. } | Phase::Stopped => {
                return Vec::new()
            }
        };
        let mut actions = Vec::new();
        if was_connected {
            actions.push(Action::Lost { planned: false });
        }
        match failure {
            Failure::Refused(code) => {
                self.refusals = self.refusals.saturating_add(1);
                actions.push(Action::Refused {
                    code,
                    attempts: self.refusals,
                });
                if self.clock_checked {
                    actions.extend(self.refused_backoff(code, now));
                } else {
                    self.phase = Phase::MeasuringClock {
                        by: now + MEASURE_DEADLINE,
                        code,
                    };
                    actions.push(Action::MeasureClock);
                }
                return actions;
            }
            Failure::Other if !was_connected => actions.push(Action::ConnectFailed),
            Failure::Other => {}
        }
        // Only the first reconnect after a loss is spread: later ones grow from the start
        // of the policy, or a long outage would push the whole fleet's windows (and the
        // time to come back once the hub is up) three doublings further out.
        let attempt = if was_connected {
            LOSS_SPREAD
        } else {
            self.failures
        };
        let until = now + (self.draw)(&self.policy, attempt);
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::Backoff {
            until,
            refused: None,
        };
        actions.push(Action::Backoff { until });
        actions
    }

    /// What [`Action::MeasureClock`] found: the seconds the hub's time is ahead of the
    /// signing clock (negative: behind), or `None` when the hub's time could not be read.
    /// An offset beyond the tolerance is corrected and the connect retried at once;
    /// otherwise the refusal was not the clock's and backs off long.
    pub fn clock_measured(&mut self, offset_secs: Option<i64>, now: Instant) -> Vec<Action> {
        let Phase::MeasuringClock { code, .. } = self.phase else {
            return Vec::new();
        };
        match offset_secs {
            Some(offset) if exceeds_tolerance(offset) => {
                self.clock_checked = true;
                self.skew_secs = self.skew_secs.saturating_add(offset);
                let mut actions = vec![Action::ClockSkew {
                    skew_secs: self.skew_secs,
                }];
                actions.extend(self.connect());
                actions
            }
            Some(_) => {
                self.clock_checked = true;
                self.refused_backoff(code, now)
            }
            None => self.refused_backoff(code, now),
        }
    }

    /// The module credential changed (a new file, a reload): a new refusal episode. A
    /// connection waiting out a refusal tries the new credential at once; any other
    /// phase uses it at its next connect.
    pub fn credentials_changed(&mut self) -> Vec<Action> {
        self.refusals = 0;
        self.refused_backoffs = 0;
        self.clock_checked = false;
        match self.phase {
            Phase::Backoff {
                refused: Some(_), ..
            }
            | Phase::MeasuringClock { .. } => self.connect(),
            _ => Vec::new(),
        }
    }

    /// Our DISCONNECT went out; the driver has dropped the socket.
    pub fn disconnect_sent(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::Renewing | Phase::Connected { .. } => self.reconnect_at_once(),
            Phase::Stopping { .. } => self.stopped(),
            _ => Vec::new(),
        }
    }

    /// A deadline from [`Self::next_wakeup`] may have passed.
    pub fn timer(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Connected { renew_at } if renew_at <= now => {
                self.phase = Phase::Renewing;
                vec![Action::Renew]
            }
            Phase::Backoff { until, .. } if until <= now => self.connect(),
            Phase::MeasuringClock { by, .. } if by <= now => self.clock_measured(None, now),
            Phase::Stopping { by } if by <= now => self.stopped(),
            _ => Vec::new(),
        }
    }

    /// Shutdown was requested: a live connection gets a DISCONNECT and [`STOP_GRACE`] for
    /// it to go out; anything else stops at once.
    pub fn shutdown(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Connected { .. } | Phase::Renewing => {
                self.phase = Phase::Stopping {
                    by: now + STOP_GRACE,
                };
                vec![Action::Disconnect]
            }
            Phase::Idle
            | Phase::Connecting
            | Phase::Backoff { .. }
            | Phase::MeasuringClock { .. } => {
                self.phase = Phase::Stopped;
                vec![Action::Stop]
            }
            Phase::Stopping { .. } | Phase::Stopped => Vec::new(),
        }
    }

    fn connect(&mut self) -> Vec<Action> {
        self.phase = Phase::Connecting;
        vec![Action::Connect]
    }

    fn refused_backoff(&mut self, code: ConnectReturnCode, now: Instant) -> Vec<Action> {
        let until = now + (self.draw)(&self.refused_policy, self.refused_backoffs);
        self.refused_backoffs = self.refused_backoffs.saturating_add(1);
        self.phase = Phase::Backoff {
            until,
            refused: Some(code),
        };
        vec![Action::RefusedBackoff { until, code }]
    }

    /// A planned loss is not a failure: reconnect at once, with no backoff.
    fn reconnect_at_once(&mut self) -> Vec<Action> {
        let mut actions = vec![Action::Lost { planned: true }];
        actions.extend(self.connect());
        actions
    }

    fn stopped(&mut self) -> Vec<Action> {
        self.phase = Phase::Stopped;
        vec![Action::Lost { planned: true }, Action::Stop]
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_refused;
