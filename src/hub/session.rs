//! The MQTT session to IoT Hub as a module: the one task that owns the rumqttc
//! [`rumqttc::EventLoop`] (DESIGN §2).
//!
//! It polls the event loop and drives the [`Connection`] state machine (connect,
//! subscribe on every CONNACK 0, renew the SAS token by a planned reconnect, back off,
//! check the clock after refused credentials and back off long, stop), carrying out the
//! actions it returns; it correlates twin requests by `$rid` (retrying 429/5xx), and turns
//! `$iothub` traffic into [`HubEvent`]s for the agent. The agent talks back with
//! [`HubCommand`]s; the connection state is published on a `watch`; a new module
//! credential arrives on another (reload), and after a refusal the credential is read
//! again from its source before each connect.
//!
//! It must never await anything slow: events go out with `try_send` (a dropped desired
//! patch or twin answer raises [`HubEvent::Resync`]) and publishes with `try_publish` —
//! awaiting a publish on the task that polls the event loop deadlocks rumqttc. The one
//! HTTPS request that reads the hub's time runs as a task of the session's own tracker and
//! reports back on a channel. The poll future is never cancelled mid-flight. One await
//! is bounded rather than quick: with aziot, signing the token before a connect asks
//! aziot-identityd and aziot-keyd on local sockets (each request under its timeout), at a
//! moment when no connection is up to be starved, with the heartbeat fed and shutdown
//! taking precedence ([`super::signer`]).
//!
//! - `refusal`: reading the hub's time after a refusal; taking a new module credential;
//!   a token that could not be signed (aziot).
//! - `traffic`: commands, `$iothub` publishes and twin answers to and from the agent.

use std::ops::ControlFlow;

use bytes::Bytes;
use rumqttc::{AsyncClient, ConnectionError, Event, Outgoing, Packet, QoS, SubscribeFilter};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod refusal;
mod traffic;

use refusal::Clock;

pub use super::connection::ConnectionState;
use super::connection::{Action, Connection, Failure};
use super::hub_time::TimeSource;
use super::options::{mqtt_options, user_name, ReadCredential};
pub use super::options::{HttpProxy, HubTransport, SessionConfig};
use super::signer::{SignError, Signer};
use super::topics;
use super::twin_requests::{TwinFailure, TwinRequests};
use crate::identity::clock::SkewedClock;
use crate::identity::{ModuleCredentials, ModuleIdentity};
use crate::systemd::{Heartbeat, BEAT_EVERY};

const EVENT_CAPACITY: usize = 256;
const COMMAND_CAPACITY: usize = 64;

/// What the session tells the agent, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum HubEvent {
    /// CONNACK 0; subscriptions are on their way. The agent GETs the twin (rule 1).
    Connected {
        session_present: bool,
    },
    Disconnected,
    Desired {
        version: Option<u64>,
        payload: Bytes,
    },
    /// Answer to [`HubCommand::GetTwin`].
    Twin(Result<Bytes, TwinFailure>),
    /// Answer to [`HubCommand::Report`]; `patch` is what was sent.
    Reported {
        patch: Map<String, Value>,
        result: Result<Option<u64>, TwinFailure>,
    },
    Method {
        name: String,
        rid: String,
        payload: Bytes,
    },
    /// Events were dropped because the agent fell behind: GET the twin again (once the
    /// GET in flight is answered, unless its answer was among them) and re-send reported
    /// patches that were not confirmed.
    Resync {
        /// A twin GET's answer was dropped: the GET in flight will never be answered.
        twin_answer_lost: bool,
    },
}

/// What the agent asks of the session.
#[derive(Debug, Clone, PartialEq)]
pub enum HubCommand {
    GetTwin,
    Report(Map<String, Value>),
    MethodResponse {
        rid: String,
        status: u16,
        payload: Vec<u8>,
    },
    Telemetry(Vec<u8>),
}

/// The agent's ends of the session's channels, and the app's.
pub struct SessionLink {
    pub events: mpsc::Receiver<HubEvent>,
    pub commands: mpsc::Sender<HubCommand>,
    pub state: watch::Receiver<ConnectionState>,
    /// The app's end: a new module credential (read on reload). Waiting out a refusal,
    /// the session tries it at once; otherwise it signs with it from the next connect.
    /// `None` until one is sent (and always with aziot, which has none).
    pub credentials: watch::Sender<Option<ModuleCredentials>>,
}

/// The session task; [`Session::run`] until shutdown.
pub struct Session {
    config: SessionConfig,
    events: mpsc::Sender<HubEvent>,
    commands: mpsc::Receiver<HubCommand>,
    state: watch::Sender<ConnectionState>,
    credentials: watch::Receiver<Option<ModuleCredentials>>,
    heartbeat: Heartbeat,
}

impl Session {
    pub fn new(config: SessionConfig, heartbeat: Heartbeat) -> (Session, SessionLink) {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Disconnected);
        let (credentials_tx, credentials_rx) = watch::channel(None);
        let session = Session {
            config,
            events: events_tx,
            commands: commands_rx,
            state: state_tx,
            credentials: credentials_rx,
            heartbeat,
        };
        let link = SessionLink {
            events: events_rx,
            commands: commands_tx,
            state: state_rx,
            credentials: credentials_tx,
        };
        (session, link)
    }

    /// Runs until `shutdown`, then sends DISCONNECT and returns. Refused credentials do
    /// not end it: it backs off and tries again, with a corrected clock or a new credential.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let stop_measuring = CancellationToken::new();
        self.drive(shutdown, &tasks, &stop_measuring).await;
        // A reading of the hub's time still in flight is abandoned.
        stop_measuring.cancel();
        tasks.close();
        tasks.wait().await;
    }

    async fn drive(
        self,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
        stop_measuring: &CancellationToken,
    ) {
        let Session {
            config,
            events,
            mut commands,
            state,
            credentials: mut new_credentials,
            heartbeat,
        } = self;
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(&config), COMMAND_CAPACITY);
        eventloop
            .network_options
            .set_connection_timeout(config.keep_alive.as_secs().clamp(5, 30));
        let (readings_tx, mut readings) = mpsc::channel(4);
        let time_source = TimeSource::new(&config).map_err(|e| e.to_string());
        let mut core = Core {
            client,
            events,
            state,
            requests: TwinRequests::new(config.twin_timeout, config.backoff),
            connection: Connection::new(config.sas_ttl, config.backoff, config.refused_backoff),
            credentials_due: false,
            resync_pending: false,
            resync_twin_lost: false,
            dropped: 0,
            telemetry_topic: topics::telemetry(
                &config.identity.device_id,
                &config.identity.module_id,
            ),
            identity: config.identity.clone(),
            signer: config.signer.clone(),
            generation: None,
            reread: config.reread.clone(),
            clock: Clock::new(
                time_source,
                readings_tx,
                tasks.clone(),
                stop_measuring.clone(),
            ),
        };
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let start = core.connection.start();
        if core.step(start, None).is_break() {
            return;
        }

        loop {
            if std::mem::take(&mut core.credentials_due) {
                if core.connection.refused_since_success() {
                    core.reread();
                }
                // Signed now, on the hub's time as far as it is known, so a clock stepped
                // since the last token never shortens the next one. With aziot this asks
                // identityd and keyd (each bounded by its timeout): the connection is down
                // meanwhile anyway; shutdown does not wait for it, and the heartbeat goes
                // on, as this is progress the watchdog must not take for a hang.
                let expiry =
                    SkewedClock::system(core.connection.skew_secs()).expiry(config.sas_ttl);
                let signed = {
                    let signing = core.signer.password(&core.identity, expiry);
                    tokio::pin!(signing);
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break None,
                            signed = &mut signing => break Some(signed),
                            _ = beat.tick() => heartbeat.beat(),
                        }
                    }
                };
                let flow = match signed {
                    None => {
                        let actions = core.connection.shutdown(Instant::now());
                        core.step(actions, None)
                    }
                    Some(Ok(signed)) => {
                        core.generation(signed.generation);
                        let user = user_name(&core.identity);
                        eventloop
                            .mqtt_options
                            .set_credentials(user, signed.password);
                        ControlFlow::Continue(())
                    }
                    Some(Err(e)) => core.unsigned(&e),
                };
                if flow.is_break() {
                    return;
                }
            }
            if !core.connection.polls() {
                // Backing off or reading the hub's time: no attempt until the deadline,
                // but commands are answered.
                let flow = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        let actions = core.connection.shutdown(Instant::now());
                        core.step(actions, None)
                    }
                    Some(reading) = readings.recv() => core.clock_reading(reading),
                    Ok(()) = new_credentials.changed() => {
                        match new_credentials.borrow_and_update().clone() {
                            Some(new) => core.adopt(new, "reload"),
                            None => ControlFlow::Continue(()),
                        }
                    }
                    _ = sleep_until(core.connection.next_wakeup()) => {
                        let actions = core.connection.timer(Instant::now());
                        core.step(actions, None)
                    }
                    Some(command) = commands.recv() => {
                        core.command(command);
                        ControlFlow::Continue(())
                    }
                    _ = beat.tick() => {
                        heartbeat.beat();
                        core.flush_resync();
                        ControlFlow::Continue(())
                    }
                };
                if flow.is_break() {
                    return;
                }
                continue;
            }
            let event = {
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    let wakeup = [core.requests.next_wakeup(), core.connection.next_wakeup()]
                        .into_iter()
                        .flatten()
                        .min();
                    let flow = tokio::select! {
                        biased;
                        _ = shutdown.cancelled(), if !core.connection.is_stopping() => {
                            let actions = core.connection.shutdown(Instant::now());
                            core.step(actions, None)
                        }
                        event = &mut poll => break event,
                        Ok(()) = new_credentials.changed() => {
                            match new_credentials.borrow_and_update().clone() {
                                Some(new) => core.adopt(new, "reload"),
                                None => ControlFlow::Continue(()),
                            }
                        }
                        Some(command) = commands.recv() => {
                            core.command(command);
                            ControlFlow::Continue(())
                        }
                        _ = sleep_until(wakeup) => {
                            let now = Instant::now();
                            let actions = core.connection.timer(now);
                            let flow = core.step(actions, None);
                            if flow.is_continue() {
                                core.resend_due(now);
                            }
                            flow
                        }
                        _ = beat.tick() => {
                            heartbeat.beat();
                            core.flush_resync();
                            ControlFlow::Continue(())
                        }
                    };
                    // Returning drops the poll future: only ever at the end of the session.
                    if flow.is_break() {
                        return;
                    }
                }
            };
            heartbeat.beat();
            let now = Instant::now();
            let flow = match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    let actions = core.connection.connack(ack.session_present, now);
                    core.step(actions, None)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    core.incoming(&p.topic, p.payload);
                    ControlFlow::Continue(())
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    // Our own DISCONNECT went out: drop the socket now rather than waiting
                    // for the hub to close it.
                    eventloop.clean();
                    let actions = core.connection.disconnect_sent();
                    core.step(actions, None)
                }
                Ok(_) => ControlFlow::Continue(()),
                Err(error) => {
                    let actions = core.connection.failed(Failure::of(&error), now);
                    core.step(actions, Some(&error))
                }
            };
            if flow.is_break() {
                return;
            }
        }
    }
}

/// State the select loop mutates while the poll future borrows the event loop.
struct Core {
    client: AsyncClient,
    events: mpsc::Sender<HubEvent>,
    state: watch::Sender<ConnectionState>,
    requests: TwinRequests,
    connection: Connection,
    /// The machine asked for a connect: sign a fresh token before the next poll.
    credentials_due: bool,
    resync_pending: bool,
    /// Among the events dropped since the last `Resync`: a twin GET's answer.
    resync_twin_lost: bool,
    /// Events dropped since the last `Resync` was delivered (logged once per episode).
    dropped: u64,
    telemetry_topic: String,
    /// The module the session is for.
    identity: ModuleIdentity,
    /// Who signs its tokens.
    signer: Signer,
    /// The module's generation as the signer last saw it (aziot only).
    generation: Option<String>,
    reread: Option<ReadCredential>,
    clock: Clock,
}

impl Core {
    /// Carries out what the connection machine asked for after an input, publishes its
    /// new state, and logs each transition once. `error` is what ended the connection.
    fn step(&mut self, actions: Vec<Action>, error: Option<&ConnectionError>) -> ControlFlow<()> {
        self.set_state(self.connection.state());
        for action in actions {
            match action {
                Action::Connect => self.credentials_due = true,
                Action::Connected { session_present } => {
                    let filters = topics::SUBSCRIPTIONS
                        .iter()
                        .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
                    if let Err(e) = self.client.try_subscribe_many(filters) {
                        tracing::warn!(error = %e, "could not queue the subscriptions");
                    }
                    tracing::info!(
                        edgetwin_event = "connected",
                        session_present,
                        "connected to IoT Hub"
                    );
                    self.emit(HubEvent::Connected { session_present });
                }
                Action::Renew => {
                    tracing::info!(
                        edgetwin_event = "sas_renewal",
                        "renewing the SAS token by reconnecting"
                    );
                    self.disconnect();
                }
                Action::Disconnect => self.disconnect(),
                Action::Lost { planned } => self.lost(planned, error),
                Action::ConnectFailed => tracing::warn!(
                    edgetwin_event = "connect_failed",
                    error = error.map(tracing::field::display),
                    "IoT Hub connection failed"
                ),
                Action::Refused { code, attempts } => tracing::warn!(
                    edgetwin_event = "auth_refused",
                    code = code as u8,
                    attempts,
                    "IoT Hub refused the connection (not authorized)"
                ),
                Action::MeasureClock => self.clock.measure(self.connection.skew_secs()),
                Action::ClockSkew { skew_secs } => tracing::warn!(
                    edgetwin_event = "clock_skew",
                    skew_secs,
                    "this machine's clock differs from the hub's; signing SAS tokens against \
                     the hub's time (check NTP) and connecting again"
                ),
                Action::Backoff { until } => tracing::debug!(
                    retry_in_ms =
                        until.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "waiting before the next connect attempt"
                ),
                Action::RefusedBackoff { until, code } => tracing::error!(
                    edgetwin_event = "auth_backoff",
                    code = code as u8,
                    retry_in_secs = until.saturating_duration_since(Instant::now()).as_secs(),
                    "credentials refused by the hub, and the clock is not the cause; \
                     retrying later: fix the credential file or reload"
                ),
                Action::Stop => return ControlFlow::Break(()),
            }
        }
        ControlFlow::Continue(())
    }

    fn disconnect(&self) {
        if let Err(e) = self.client.try_disconnect() {
            tracing::warn!(error = %e, "could not queue the DISCONNECT");
        }
    }

    /// The connection is gone (an error, or our own DISCONNECT).
    fn lost(&mut self, planned: bool, error: Option<&ConnectionError>) {
        let error = error.map(tracing::field::display);
        if planned {
            tracing::info!(
                edgetwin_event = "disconnected",
                reason = "disconnect requested",
                error,
                "disconnected from IoT Hub"
            );
        } else {
            tracing::warn!(
                edgetwin_event = "disconnected",
                reason = "connection error",
                error,
                "disconnected from IoT Hub"
            );
        }
        for done in self.requests.fail_all() {
            self.finished(done);
        }
        self.emit(HubEvent::Disconnected);
    }

    fn set_state(&self, new: ConnectionState) {
        self.state.send_if_modified(|s| {
            let changed = *s != new;
            *s = new;
            changed
        });
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
