//! The MQTT session to IoT Hub as a module: the one task that owns the rumqttc
//! [`rumqttc::EventLoop`] (DESIGN §2).
//!
//! It connects (TLS or WebSocket), subscribes on every CONNACK 0, renews the SAS token by
//! a planned reconnect at 80 % of its lifetime, backs off with jitter between attempts,
//! correlates twin requests by `$rid` (retrying 429/5xx), and turns `$iothub` traffic into
//! [`HubEvent`]s for the agent. The agent talks back with [`HubCommand`]s; the connection
//! state is published on a `watch`. It must never await anything slow: events go out with
//! `try_send` (a dropped desired patch or twin answer raises [`HubEvent::Resync`]) and
//! publishes with `try_publish` — awaiting a publish on the task that polls the event
//! loop deadlocks rumqttc. The poll future is never cancelled mid-flight.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, Outgoing, Packet, QoS, SubscribeFilter,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::options::{credentials, mqtt_options};
pub use super::options::{HttpProxy, HubTransport, SessionConfig};
use super::topics::{self, HubTopic};
use super::twin_requests::{Finished, TwinFailure, TwinOp, TwinReply, TwinRequests};
use crate::systemd::{Heartbeat, BEAT_EVERY};

/// Refusals (CONNACK 4/5) in a row, before any success, after which the credentials are
/// taken to be wrong and the daemon stops (exit 77) instead of retrying forever.
pub const AUTH_FAILURES_AT_START: u32 = 3;
const EVENT_CAPACITY: usize = 256;
const COMMAND_CAPACITY: usize = 64;
/// How long a graceful stop waits for the DISCONNECT to go out.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Connection state, published through `watch`.
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

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The hub refused the credentials every time since start: exit 77.
    #[error("IoT Hub refused the module credentials (CONNACK {code}) {attempts} times in a row")]
    Unauthorized { code: String, attempts: u32 },
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
            connected: false,
            resync_pending: false,
            telemetry_topic: topics::telemetry(
                &config.credentials.device_id,
                &config.credentials.module_id,
            ),
        };
        let mut backoff = Backoff::new(config.backoff);
        let mut ever_connected = false;
        let mut refusals = 0u32;
        let mut renew_at: Option<Instant> = None;
        let mut renewing = false;
        let mut stop_by: Option<Instant> = None;
        let mut beat = tokio::time::interval(BEAT_EVERY);

        loop {
            if !core.connected {
                let (user, password) = credentials(&config);
                eventloop.mqtt_options.set_credentials(user, password);
                core.set_state(ConnectionState::Connecting);
            }
            let event = {
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    let wakeup = [core.requests.next_wakeup(), renew_at, stop_by]
                        .into_iter()
                        .flatten()
                        .min();
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled(), if stop_by.is_none() => {
                            if !core.connected {
                                core.set_state(ConnectionState::Disconnected);
                                return Ok(());
                            }
                            let _ = core.client.try_disconnect();
                            stop_by = Some(Instant::now() + STOP_GRACE);
                        }
                        event = &mut poll => break event,
                        Some(command) = commands.recv() => core.command(command),
                        _ = sleep_until(wakeup) => {
                            let now = Instant::now();
                            if stop_by.is_some_and(|t| t <= now) {
                                core.set_state(ConnectionState::Disconnected);
                                return Ok(());
                            }
                            if renew_at.is_some_and(|t| t <= now) && core.connected {
                                tracing::info!(edgetwin_event = "sas_renewal", "renewing the SAS token by reconnecting");
                                renew_at = None;
                                renewing = true;
                                let _ = core.client.try_disconnect();
                            }
                            core.resend_due(now);
                        }
                        _ = beat.tick() => {
                            heartbeat.beat();
                            core.flush_resync();
                        }
                    }
                }
            };
            heartbeat.beat();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    ever_connected = true;
                    refusals = 0;
                    backoff.reset();
                    core.connected = true;
                    renew_at = Some(Instant::now() + config.sas_ttl.mul_f64(0.8));
                    let filters = topics::SUBSCRIPTIONS
                        .iter()
                        .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
                    if let Err(e) = core.client.try_subscribe_many(filters) {
                        tracing::warn!(error = %e, "could not queue the subscriptions");
                    }
                    tracing::info!(
                        edgetwin_event = "connected",
                        session_present = ack.session_present,
                        "connected to IoT Hub"
                    );
                    core.set_state(ConnectionState::Connected);
                    core.emit(HubEvent::Connected {
                        session_present: ack.session_present,
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => core.incoming(&p.topic, p.payload),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    // Our own DISCONNECT went out: drop the socket now rather than waiting
                    // for the hub to close it.
                    eventloop.clean();
                    core.lost("disconnect requested");
                    if stop_by.is_some() {
                        core.set_state(ConnectionState::Disconnected);
                        return Ok(());
                    }
                    renewing = false;
                }
                Ok(_) => {}
                Err(error) => {
                    if stop_by.is_some() {
                        core.set_state(ConnectionState::Disconnected);
                        return Ok(());
                    }
                    let was_connected = core.connected;
                    core.lost("connection error");
                    renew_at = None;
                    if renewing {
                        renewing = false;
                        continue;
                    }
                    if let Some(code) = refused_credentials(&error) {
                        refusals += 1;
                        tracing::error!(
                            edgetwin_event = "auth_refused",
                            code = ?code,
                            attempts = refusals,
                            "IoT Hub refused the connection (not authorized): check the module credentials and the clock"
                        );
                        if !ever_connected && refusals >= AUTH_FAILURES_AT_START {
                            return Err(SessionError::Unauthorized {
                                code: format!("{code:?}"),
                                attempts: refusals,
                            });
                        }
                    } else {
                        tracing::warn!(
                            edgetwin_event = if was_connected { "disconnected" } else { "connect_failed" },
                            error = %error,
                            "IoT Hub connection failed"
                        );
                    }
                    let until = Instant::now() + backoff.next_delay();
                    core.set_state(ConnectionState::Backoff { until });
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => {
                                core.set_state(ConnectionState::Disconnected);
                                return Ok(());
                            }
                            _ = tokio::time::sleep_until(until) => break,
                            Some(command) = commands.recv() => core.command(command),
                            _ = beat.tick() => {
                                heartbeat.beat();
                                core.flush_resync();
                            }
                        }
                    }
                }
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
    connected: bool,
    resync_pending: bool,
    telemetry_topic: String,
}

impl Core {
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
            HubCommand::GetTwin if self.connected => {
                let p = self.requests.start(TwinOp::Get, now);
                self.publish(p.topic, p.payload);
            }
            HubCommand::GetTwin => self.emit(HubEvent::Twin(Err(TwinFailure::Lost))),
            HubCommand::Report(patch) if self.connected => {
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
                if self.connected {
                    self.publish(topics::method_response(status, &rid), payload);
                }
            }
            HubCommand::Telemetry(payload) => {
                if self.connected {
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

    /// The connection is gone (error, or our own DISCONNECT).
    fn lost(&mut self, why: &'static str) {
        if !self.connected {
            return;
        }
        self.connected = false;
        tracing::info!(
            edgetwin_event = "disconnected",
            reason = why,
            "disconnected from IoT Hub"
        );
        for done in self.requests.fail_all() {
            self.finished(done);
        }
        self.set_state(ConnectionState::Disconnected);
        self.emit(HubEvent::Disconnected);
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

fn refused_credentials(error: &ConnectionError) -> Option<ConnectReturnCode> {
    match error {
        ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword),
        ) => Some(*code),
        _ => None,
    }
}
