//! The MQTT session to IoT Hub as a module: the one task that owns the rumqttc
//! [`rumqttc::EventLoop`] (DESIGN §2).
//!
//! It polls the event loop and drives the [`Connection`] state machine (connect,
//! subscribe on every CONNACK 0, renew the SAS token by a planned reconnect, back off,
//! give up on refused credentials, stop), carrying out the actions it returns; it
//! correlates twin requests by `$rid` (retrying 429/5xx), and turns `$iothub` traffic into
//! [`HubEvent`]s for the agent. The agent talks back with [`HubCommand`]s; the connection
//! state is published on a `watch`. It must never await anything slow: events go out with
//! `try_send` (a dropped desired patch or twin answer raises [`HubEvent::Resync`]) and
//! publishes with `try_publish` — awaiting a publish on the task that polls the event
//! loop deadlocks rumqttc. The poll future is never cancelled mid-flight.

use std::ops::ControlFlow;

use bytes::Bytes;
use rumqttc::{AsyncClient, ConnectionError, Event, Outgoing, Packet, QoS, SubscribeFilter};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::{Action, Connection, Failure};
pub use super::connection::{ConnectionState, SessionError, AUTH_FAILURES_AT_START};
use super::options::{credentials, mqtt_options};
pub use super::options::{HttpProxy, HubTransport, SessionConfig};
use super::topics::{self, HubTopic};
use super::twin_requests::{Finished, TwinFailure, TwinOp, TwinReply, TwinRequests};
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
    /// Events were dropped because the agent fell behind: GET the twin again and re-send
    /// reported patches that were not confirmed.
    Resync,
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

/// The agent's ends of the session's channels.
pub struct SessionLink {
    pub events: mpsc::Receiver<HubEvent>,
    pub commands: mpsc::Sender<HubCommand>,
    pub state: watch::Receiver<ConnectionState>,
}

/// The session task; [`Session::run`] until shutdown.
pub struct Session {
    config: SessionConfig,
    events: mpsc::Sender<HubEvent>,
    commands: mpsc::Receiver<HubCommand>,
    state: watch::Sender<ConnectionState>,
    heartbeat: Heartbeat,
}

impl Session {
    pub fn new(config: SessionConfig, heartbeat: Heartbeat) -> (Session, SessionLink) {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Disconnected);
        let session = Session {
            config,
            events: events_tx,
            commands: commands_rx,
            state: state_tx,
            heartbeat,
        };
        let link = SessionLink {
            events: events_rx,
            commands: commands_tx,
            state: state_rx,
        };
        (session, link)
    }

    /// Runs until `shutdown` (then sends DISCONNECT and returns `Ok`), or until the
    /// credentials are found to be wrong at start-up.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SessionError> {
        let Session {
            config,
            events,
            mut commands,
            state,
            heartbeat,
        } = self;
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(&config), COMMAND_CAPACITY);
        eventloop
            .network_options
            .set_connection_timeout(config.keep_alive.as_secs().clamp(5, 30));
        let mut core = Core {
            client,
            events,
            state,
            requests: TwinRequests::new(config.twin_timeout, config.backoff),
            connection: Connection::new(config.sas_ttl, config.backoff),
            credentials_due: false,
            resync_pending: false,
            telemetry_topic: topics::telemetry(
                &config.credentials.device_id,
                &config.credentials.module_id,
            ),
        };
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let start = core.connection.start();
        if let ControlFlow::Break(result) = core.step(start, None) {
            return result;
        }

        loop {
            if std::mem::take(&mut core.credentials_due) {
                let (user, password) = credentials(&config);
                eventloop.mqtt_options.set_credentials(user, password);
            }
            if !core.connection.polls() {
                // Backing off: no attempt until the deadline, but commands are answered.
                let flow = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        let actions = core.connection.shutdown(Instant::now());
                        core.step(actions, None)
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
                if let ControlFlow::Break(result) = flow {
                    return result;
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
                    if let ControlFlow::Break(result) = flow {
                        return result;
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
            if let ControlFlow::Break(result) = flow {
                return result;
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
    telemetry_topic: String,
}

impl Core {
    /// Carries out what the connection machine asked for after an input, publishes its
    /// new state, and logs each transition once. `error` is what ended the connection.
    fn step(
        &mut self,
        actions: Vec<Action>,
        error: Option<&ConnectionError>,
    ) -> ControlFlow<Result<(), SessionError>> {
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
                Action::Refused { code, attempts } => tracing::error!(
                    edgetwin_event = "auth_refused",
                    code = ?code,
                    attempts,
                    "IoT Hub refused the connection (not authorized): check the module credentials and the clock"
                ),
                Action::Backoff { until } => tracing::debug!(
                    retry_in_ms =
                        until.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "waiting before the next connect attempt"
                ),
                Action::Stop(result) => return ControlFlow::Break(result),
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

    /// Forwards an event without waiting. What cannot be dropped safely raises a resync.
    fn emit(&mut self, event: HubEvent) {
        self.flush_resync();
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            tracing::warn!(
                edgetwin_event = "event_dropped",
                kind = event_kind(&event),
                "agent is behind; event dropped"
            );
            match event {
                HubEvent::Method { rid, .. } => {
                    self.publish(topics::method_response(503, &rid), b"null".to_vec());
                }
                _ => self.resync_pending = true,
            }
        }
    }

    fn flush_resync(&mut self) {
        if self.resync_pending && self.events.try_send(HubEvent::Resync).is_ok() {
            self.resync_pending = false;
        }
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "publish not queued");
                false
            }
        }
    }

    fn command(&mut self, command: HubCommand) {
        let now = Instant::now();
        match command {
            HubCommand::GetTwin if self.connection.is_connected() => {
                let p = self.requests.start(TwinOp::Get, now);
                self.publish(p.topic, p.payload);
            }
            HubCommand::GetTwin => self.emit(HubEvent::Twin(Err(TwinFailure::Lost))),
            HubCommand::Report(patch) if self.connection.is_connected() => {
                let p = self.requests.start(TwinOp::Report(patch), now);
                self.publish(p.topic, p.payload);
            }
            HubCommand::Report(patch) => self.emit(HubEvent::Reported {
                patch,
                result: Err(TwinFailure::Lost),
            }),
            HubCommand::MethodResponse {
                rid,
                status,
                payload,
            } => {
                if self.connection.is_connected() {
                    self.publish(topics::method_response(status, &rid), payload);
                }
            }
            HubCommand::Telemetry(payload) => {
                if self.connection.is_connected() {
                    self.publish(self.telemetry_topic.clone(), payload);
                } else {
                    tracing::debug!("telemetry skipped while disconnected");
                }
            }
        }
    }

    fn resend_due(&mut self, now: Instant) {
        for p in self.requests.due(now) {
            self.publish(p.topic, p.payload);
        }
    }

    fn incoming(&mut self, topic: &str, payload: Bytes) {
        match topics::parse(topic) {
            Some(HubTopic::DesiredPatch { version }) => {
                self.emit(HubEvent::Desired { version, payload })
            }
            Some(HubTopic::TwinResponse {
                status,
                rid,
                version,
            }) => {
                if status == 429 || status >= 500 {
                    tracing::warn!(status, "twin request throttled or failed; will retry");
                }
                if let Some(done) =
                    self.requests
                        .response(&rid, status, version, payload, Instant::now())
                {
                    self.finished(done);
                }
            }
            Some(HubTopic::MethodRequest { name, rid }) => {
                self.emit(HubEvent::Method { name, rid, payload })
            }
            None => tracing::debug!(topic, "ignoring a publish on an unknown topic"),
        }
    }

    fn finished(&mut self, done: Finished) {
        let event = match (done.op, done.result) {
            (TwinOp::Get, Ok(TwinReply::Twin(body))) => HubEvent::Twin(Ok(body)),
            (TwinOp::Get, Ok(TwinReply::Reported(_))) => return,
            (TwinOp::Get, Err(e)) => HubEvent::Twin(Err(e)),
            (TwinOp::Report(patch), Ok(TwinReply::Reported(version))) => HubEvent::Reported {
                patch,
                result: Ok(version),
            },
            (TwinOp::Report(_), Ok(TwinReply::Twin(_))) => return,
            (TwinOp::Report(patch), Err(e)) => HubEvent::Reported {
                patch,
                result: Err(e),
            },
        };
        self.emit(event);
    }
}

fn event_kind(event: &HubEvent) -> &'static str {
    match event {
        HubEvent::Connected { .. } => "connected",
        HubEvent::Disconnected => "disconnected",
        HubEvent::Desired { .. } => "desired",
        HubEvent::Twin(_) => "twin",
        HubEvent::Reported { .. } => "reported",
        HubEvent::Method { .. } => "method",
        HubEvent::Resync => "resync",
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
