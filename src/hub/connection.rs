//! The connection to IoT Hub as a state machine: when to connect, when the SAS token is
//! renewed, how long to back off, when refused credentials end the session, and how to
//! stop.
//!
//! Owned by the session task ([`super::session`]), which polls the rumqttc event loop,
//! feeds [`Connection`] what happened and carries out the [`Action`]s it returns. Pure:
//! no I/O, no logging, and the caller passes the clock in. Each transition checks the
//! phase it starts from; an input that cannot happen in a phase changes nothing. The
//! twin requests' timers are not here but in [`super::twin_requests`].

use std::time::Duration;

use rumqttc::{ConnectReturnCode, ConnectionError};
use tokio::time::Instant;

use super::backoff::BackoffPolicy;

/// Refusals (CONNACK 4/5) in a row, before any success, after which the credentials are
/// taken to be wrong and the daemon stops (exit 77) instead of retrying forever.
pub const AUTH_FAILURES_AT_START: u32 = 3;
/// How long a graceful stop waits for the DISCONNECT to go out.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// The share of the token's lifetime after which it is renewed, leaving the rest for a
/// slow reconnect and some clock skew.
const RENEW_AT: f64 = 0.8;

/// Connection state as the agent and `STATUS=` see it, published through `watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Disconnected,
    Connecting,
    Connected,
    Backoff { until: Instant },
}

impl ConnectionState {
    pub fn describe(&self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Backoff { .. } => "waiting to reconnect",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The hub refused the credentials every time since start: exit 77.
    #[error("IoT Hub refused the module credentials (CONNACK {code}) {attempts} times in a row")]
    Unauthorized { code: String, attempts: u32 },
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
    /// Put fresh credentials (a new SAS token) on the event loop; its next poll connects.
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
    /// The hub refused the credentials, `attempts` times since the last success.
    Refused {
        code: ConnectReturnCode,
        attempts: u32,
    },
    /// No connect attempt before `until`.
    Backoff { until: Instant },
    /// The session is over.
    Stop(Result<(), SessionError>),
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
    Backoff {
        until: Instant,
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
    draw: DrawDelay,
    /// Unplanned failures since the last CONNACK 0: the next backoff's attempt number.
    failures: u32,
    /// Refusals since the last CONNACK 0.
    refusals: u32,
    ever_connected: bool,
}

impl Connection {
    /// Backoff delays with the policy's full jitter.
    pub fn new(sas_ttl: Duration, policy: BackoffPolicy) -> Self {
        Connection::with_draw(sas_ttl, policy, BackoffPolicy::delay)
    }

    /// With the delays drawn by `draw` (deterministic in tests).
    pub fn with_draw(sas_ttl: Duration, policy: BackoffPolicy, draw: DrawDelay) -> Self {
        Connection {
            phase: Phase::Idle,
            sas_ttl,
            policy,
            draw,
            failures: 0,
            refusals: 0,
            ever_connected: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The published view.
    pub fn state(&self) -> ConnectionState {
        match self.phase {
            Phase::Idle | Phase::Stopped => ConnectionState::Disconnected,
            Phase::Connecting => ConnectionState::Connecting,
            Phase::Connected { .. } | Phase::Renewing | Phase::Stopping { .. } => {
                ConnectionState::Connected
            }
            Phase::Backoff { until } => ConnectionState::Backoff { until },
        }
    }

    /// Whether publishes can go out (subscriptions were made on this connection).
    pub fn is_connected(&self) -> bool {
        matches!(
            self.phase,
            Phase::Connected { .. } | Phase::Renewing | Phase::Stopping { .. }
        )
    }

    /// Whether the event loop is to be polled: always, except while backing off or done.
    pub fn polls(&self) -> bool {
        !matches!(
            self.phase,
            Phase::Idle | Phase::Backoff { .. } | Phase::Stopped
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
            Phase::Backoff { until } => Some(until),
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

    /// CONNACK 0.
    pub fn connack(&mut self, session_present: bool, now: Instant) -> Vec<Action> {
        if self.phase != Phase::Connecting {
            return Vec::new();
        }
        self.ever_connected = true;
        self.refusals = 0;
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
            Phase::Idle | Phase::Backoff { .. } | Phase::Stopped => return Vec::new(),
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
                if !self.ever_connected && self.refusals >= AUTH_FAILURES_AT_START {
                    self.phase = Phase::Stopped;
                    actions.push(Action::Stop(Err(SessionError::Unauthorized {
                        code: format!("{code:?}"),
                        attempts: self.refusals,
                    })));
                    return actions;
                }
            }
            Failure::Other if !was_connected => actions.push(Action::ConnectFailed),
            Failure::Other => {}
        }
        let until = now + (self.draw)(&self.policy, self.failures);
        self.failures = self.failures.saturating_add(1);
        self.phase = Phase::Backoff { until };
        actions.push(Action::Backoff { until });
        actions
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
            Phase::Backoff { until } if until <= now => self.connect(),
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
            Phase::Idle | Phase::Connecting | Phase::Backoff { .. } => {
                self.phase = Phase::Stopped;
                vec![Action::Stop(Ok(()))]
            }
            Phase::Stopping { .. } | Phase::Stopped => Vec::new(),
        }
    }

    fn connect(&mut self) -> Vec<Action> {
        self.phase = Phase::Connecting;
        vec![Action::Connect]
    }

    /// A planned loss is not a failure: reconnect at once, with no backoff.
    fn reconnect_at_once(&mut self) -> Vec<Action> {
        let mut actions = vec![Action::Lost { planned: true }];
        actions.extend(self.connect());
        actions
    }

    fn stopped(&mut self) -> Vec<Action> {
        self.phase = Phase::Stopped;
        vec![Action::Lost { planned: true }, Action::Stop(Ok(()))]
    }
}

#[cfg(test)]
mod tests;
