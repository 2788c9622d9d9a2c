//! The agent task: sole owner of the runtime state (DESIGN §2).
//!
//! It feeds [`HubEvent`]s from the session into the pure [`TwinSync`], persists every
//! change to `state.json` durably *before* the acknowledgement may leave (rule 6), keeps
//! unconfirmed reported changes coalesced while offline and sends one patch at a time,
//! waiting for the hub's 204 (rule 7), sends gateway vitals every `telemetryInterval`,
//! answers direct methods, and triggers the change hook. The app starts it and can
//! [`AgentControl::Reload`] it; nobody else reads or writes the state, which is published
//! read-only on a `watch`. It must never block on the hub: commands go to the session,
//! which never waits either.
//!
//! - [`vitals`]: what the telemetry message contains.
//! - [`hook`]: the `hooks.on_change` runner.

pub mod hook;
pub mod vitals;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::hub::session::{ConnectionState, HubCommand, HubEvent};
use crate::hub::twin_requests::TwinFailure;
use crate::systemd::{Heartbeat, BEAT_EVERY};
use crate::twin::{
    AckStyle, Disposition, Outcome, ReportedCoalescer, RuntimeState, Schema, TwinSync, Verdict,
};
use hook::{HookRunner, HookTask};

/// Reported keys kept while they cannot be sent; one per desired property is plenty.
const MAX_PENDING_REPORTED: usize = 1024;
/// Wait before retrying a failed state write or a twin GET the hub refused.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a confirmed reported version may wait for the next write of the state. Losing
/// it costs nothing but one reported patch sent again after a crash, so it rides along
/// with the next applied patch (one durable write per patch) and is written on its own
/// only once the twin has been quiet this long.
const WRITE_BEHIND: Duration = Duration::from_secs(2);

/// What the agent is configured with; the live-changeable part arrives again on reload.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: String,
    pub module_id: String,
    pub state_file: PathBuf,
    pub ack: AckStyle,
    pub schema: Schema,
    pub telemetry_enabled: bool,
    pub hook: Option<String>,
}

/// Sent by the app on SIGHUP with the new configuration's live settings.
#[derive(Debug, Clone)]
pub enum AgentControl {
    Reload {
        ack: AckStyle,
        schema: Schema,
        telemetry_enabled: bool,
        hook: Option<String>,
    },
}

/// The agent's ends of the session and of the app.
pub struct AgentLinks {
    pub events: mpsc::Receiver<HubEvent>,
    pub commands: mpsc::Sender<HubCommand>,
    pub connection: watch::Receiver<ConnectionState>,
    pub control: mpsc::Receiver<AgentControl>,
}

pub struct Agent {
    config: AgentConfig,
    sync: TwinSync,
    pending: ReportedCoalescer,
    /// The reported patch sent and not yet answered.
    in_flight: Option<Map<String, Value>>,
    /// The state in force is not on disk yet: acks must wait (rule 6).
    unpersisted: bool,
    /// When a confirmed reported version not yet on disk is written on its own.
    write_behind_at: Option<Instant>,
    connected: bool,
    retry_at: Option<Instant>,
    get_retry_at: Option<Instant>,
    next_telemetry: Option<Instant>,
    /// The telemetry period the timer was last set with.
    interval: Duration,
    published: watch::Sender<RuntimeState>,
    hook: HookRunner,
    /// The hook's task, spawned by [`Agent::run`] on the agent's own tracker.
    hook_task: Option<HookTask>,
    /// The properties the hook last saw; `None` before its first run.
    hooked: Option<Map<String, Value>>,
    heartbeat: Heartbeat,
}

impl Agent {
    /// Puts `state` in force (DESIGN §3 rule 8); returns the agent and a read-only view of
    /// the state for the supervisor.
    pub fn new(
        config: AgentConfig,
        state: RuntimeState,
        heartbeat: Heartbeat,
    ) -> (Agent, watch::Receiver<RuntimeState>) {
        let sync = TwinSync::new(config.schema.clone(), config.ack, state);
        let (published, view) = watch::channel(sync.state().clone());
        let (hook, hook_task) = HookRunner::new(hook::HOOK_TIMEOUT);
        let mut agent = Agent {
            config,
            sync,
            pending: ReportedCoalescer::new(MAX_PENDING_REPORTED),
            in_flight: None,
            unpersisted: false,
            write_behind_at: None,
            connected: false,
            retry_at: None,
            get_retry_at: None,
            next_telemetry: None,
            interval: Duration::ZERO,
            published,
            hook,
            hook_task: Some(hook_task),
            hooked: None,
            heartbeat,
        };
        agent.hooked = Some(agent.sync.state().properties.clone());
        agent.reschedule_telemetry();
        (agent, view)
    }

    pub fn state(&self) -> &RuntimeState {
        self.sync.state()
    }

    /// Runs until `shutdown`, then writes the state one last time and stops the hook
    /// task (a hook still running is killed): nothing it started outlives it.
    pub async fn run(mut self, mut links: AgentLinks, shutdown: CancellationToken) {
        let hooks = TaskTracker::new();
        let hook_stop = CancellationToken::new();
        if let Some(task) = self.hook_task.take() {
            // In the agent's span, so hook logs name the device and module too.
            hooks.spawn(
                task.run(hook_stop.clone())
                    .instrument(tracing::Span::current()),
            );
        }
        hooks.close();
        let mut beat = tokio::time::interval(BEAT_EVERY);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(event) = links.events.recv() => self.on_event(event, &links).await,
                Some(control) = links.control.recv() => self.on_control(control, &links).await,
                _ = sleep_until(self.retry_at) => {
                    self.retry_at = None;
                    if self.unpersisted && self.persist().await {
                        self.pump(&links).await;
                    }
                }
                _ = sleep_until(self.write_behind_at) => {
                    self.write_behind_at = None;
                    // It may also be the write acks were waiting for (a failed one before).
                    if self.persist().await {
                        self.pump(&links).await;
                    }
                    // 2 s of quiet after activity: a burst is over, give its heap back.
                    crate::memory::release_free_heap();
                }
                _ = sleep_until(self.get_retry_at) => {
                    self.get_retry_at = None;
                    self.request_get(&links).await;
                }
                _ = sleep_until(self.next_telemetry) => self.telemetry(&links).await,
                _ = beat.tick() => self.heartbeat.beat(),
            }
            self.heartbeat.beat();
        }
        if !self.persist().await {
            tracing::error!(
                edgetwin_event = "flush_failed",
                "state could not be written at shutdown"
            );
        } else {
            tracing::info!(
                edgetwin_event = "state_flushed",
                "state written at shutdown"
            );
        }
        hook_stop.cancel();
        hooks.wait().await;
    }

    async fn on_event(&mut self, event: HubEvent, links: &AgentLinks) {
        match event {
            HubEvent::Connected { .. } => {
                self.connected = true;
                self.request_get(links).await;
                self.pump(links).await;
            }
            HubEvent::Disconnected => {
                self.connected = false;
                let out = self.sync.disconnected();
                self.outcome(out, links).await;
            }
            HubEvent::Desired { version, payload } => {
                let out = self.sync.patch(version, &payload);
                self.outcome(out, links).await;
            }
            HubEvent::Twin(Ok(body)) => {
                let out = self.sync.get_response(&body);
                self.outcome(out, links).await;
            }
            HubEvent::Twin(Err(failure)) => {
                let mut out = self.sync.get_failed();
                if let TwinFailure::Refused { status } = failure {
                    tracing::warn!(status, "twin GET refused by the hub; retrying later");
                    out.need_full_get = false;
                    self.get_retry_at = Some(Instant::now() + RETRY_AFTER);
                }
                self.outcome(out, links).await;
            }
            HubEvent::Reported { patch, result } => {
                if self.in_flight.as_ref() == Some(&patch) {
                    self.in_flight = None;
                }
                match result {
                    Ok(version) => {
                        tracing::debug!(reported_version = ?version, "reported patch confirmed");
                        if version.is_some_and(|v| self.sync.reported_confirmed(v)) {
                            self.publish_state();
                            self.write_behind_at
                                .get_or_insert_with(|| Instant::now() + WRITE_BEHIND);
                        }
                    }
                    Err(TwinFailure::Lost) => self.pending.restore(patch),
                    Err(TwinFailure::Refused { status }) => tracing::error!(
                        edgetwin_event = "reported_refused",
                        status,
                        "the hub refused a reported patch; it is dropped"
                    ),
                }
                self.pump(links).await;
            }
            HubEvent::Method { name, rid, payload } => {
                let (status, body) = self.method(&name, &payload);
                tracing::info!(edgetwin_event = "method", method = %name, status, "direct method answered");
                let response = HubCommand::MethodResponse {
                    rid,
                    status,
                    payload: serde_json::to_vec(&body).unwrap_or_default(),
                };
                let _ = links.commands.send(response).await;
            }
            HubEvent::Resync { twin_answer_lost } => {
                if let Some(patch) = self.in_flight.take() {
                    self.pending.restore(patch);
                }
                // A GET still in flight is awaited, then followed by one more GET; a new
                // GET per resync would pile GETs up on the hub in a burst.
                let out = if twin_answer_lost {
                    self.sync.get_failed()
                } else {
                    self.sync.events_lost()
                };
                self.outcome(out, links).await;
                self.pump(links).await;
            }
        }
    }

    async fn on_control(&mut self, control: AgentControl, links: &AgentLinks) {
        let AgentControl::Reload {
            ack,
            schema,
            telemetry_enabled,
            hook,
        } = control;
        let state = self.sync.state().clone();
        self.sync = TwinSync::new(schema.clone(), ack, state);
        self.config.ack = ack;
        self.config.schema = schema;
        self.config.telemetry_enabled = telemetry_enabled;
        self.config.hook = hook;
        tracing::info!(
            edgetwin_event = "reloaded",
            "agent took the new configuration"
        );
        self.reschedule_telemetry();
        self.publish_state();
        self.persist().await;
        // The desired properties may read differently under the new schema.
        self.request_get(links).await;
    }

    /// Persist, queue the acks, GET if needed, act on the new state (rules 3–7).
    async fn outcome(&mut self, out: Outcome, links: &AgentLinks) {
        log_outcome(&out);
        if out.changed {
            self.publish_state();
            self.persist().await;
            self.run_hook();
        }
        if !out.reported.is_empty() {
            self.pending.push(out.reported);
        }
        if self.sync.telemetry_interval() != self.interval {
            self.reschedule_telemetry();
        }
        if out.need_full_get {
            self.request_get(links).await;
        }
        self.pump(links).await;
    }

    async fn request_get(&mut self, links: &AgentLinks) {
        if !self.connected || self.sync.get_in_flight() {
            return;
        }
        if links.commands.send(HubCommand::GetTwin).await.is_ok() {
            self.sync.get_started();
        }
    }

    /// Sends the pending reported changes when nothing else is in flight (rule 7).
    async fn pump(&mut self, links: &AgentLinks) {
        if !self.connected || self.in_flight.is_some() || self.unpersisted {
            return;
        }
        let Some(patch) = self.pending.take() else {
            return;
        };
        self.in_flight = Some(patch.clone());
        if links
            .commands
            .send(HubCommand::Report(patch))
            .await
            .is_err()
        {
            if let Some(patch) = self.in_flight.take() {
                self.pending.restore(patch);
            }
        }
    }

    /// Writes `state.json` (temp, fsync, rename, fsync dir). On failure the acks wait and
    /// the write is retried.
    async fn persist(&mut self) -> bool {
        let bytes = self
            .sync
            .state()
            .to_file(
                &self.config.device_id,
                &self.config.module_id,
                crate::identity::clock::unix_now(),
            )
            .to_json();
        let path = self.config.state_file.clone();
        let written =
            tokio::task::spawn_blocking(move || crate::store::write_atomic(&path, &bytes, 0o600))
                .await;
        match written {
            Ok(Ok(())) => {
                self.unpersisted = false;
                // Whatever waited to be written went with this write.
                self.write_behind_at = None;
                true
            }
            Ok(Err(e)) => self.persist_failed(e.to_string()),
            Err(e) => self.persist_failed(e.to_string()),
        }
    }

    fn persist_failed(&mut self, error: String) -> bool {
        tracing::error!(
            edgetwin_event = "persist_failed",
            error = %error,
            path = %self.config.state_file.display(),
            "could not write the state file; acknowledgements wait"
        );
        self.unpersisted = true;
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
        false
    }

    /// Runs the change hook when the values in force changed since its last run.
    fn run_hook(&mut self) {
        let Some(command) = &self.config.hook else {
            return;
        };
        let properties = &self.sync.state().properties;
        if self.hooked.as_ref() == Some(properties) {
            return;
        }
        self.hooked = Some(properties.clone());
        self.hook.trigger(command, self.state_json());
    }

    fn publish_state(&self) {
        self.published.send_replace(self.sync.state().clone());
    }

    fn state_json(&self) -> Vec<u8> {
        self.sync
            .state()
            .to_file(
                &self.config.device_id,
                &self.config.module_id,
                crate::identity::clock::unix_now(),
            )
            .to_json()
    }

    fn reschedule_telemetry(&mut self) {
        self.interval = self.sync.telemetry_interval();
        self.next_telemetry = self
            .config
            .telemetry_enabled
            .then(|| Instant::now() + self.sync.telemetry_interval());
    }

    async fn telemetry(&mut self, links: &AgentLinks) {
        self.reschedule_telemetry();
        if !self.connected {
            return;
        }
        let state = self.sync.state();
        let extra = json!({
            "telemetryInterval": self.sync.telemetry_interval().as_secs(),
            "twinVersion": state.desired_version,
        });
        let dir = self
            .config
            .state_file
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let body = vitals::collect(&dir, extra.as_object().cloned().unwrap_or_default());
        let payload = serde_json::to_vec(&body).unwrap_or_default();
        let _ = links.commands.send(HubCommand::Telemetry(payload)).await;
        tracing::debug!(edgetwin_event = "telemetry", "telemetry sent");
    }

    /// Direct methods (PROTOCOL §5.2): `getState`, `ping`; anything else is 404.
    fn method(&self, name: &str, _payload: &[u8]) -> (u16, Value) {
        let state = self.sync.state();
        match name {
            "getState" => (
                200,
                json!({
                    "deviceId": self.config.device_id,
                    "moduleId": self.config.module_id,
                    "desiredVersion": state.desired_version,
                    "reportedVersion": state.reported_version,
                    "properties": state.properties,
                    "connected": self.connected,
                    "pendingReported": self.pending.len() + usize::from(self.in_flight.is_some()),
                }),
            ),
            "ping" => (200, json!({"pong": true})),
            other => (404, json!({"error": format!("unknown method {other:?}")})),
        }
    }
}

fn log_outcome(out: &Outcome) {
    for handled in &out.handled {
        let version = handled.version;
        match &handled.disposition {
            Disposition::FullTwin => tracing::info!(
                edgetwin_event = "twin_applied",
                edgetwin_twin_version = version,
                "full twin applied"
            ),
            Disposition::UpToDate => {
                tracing::debug!(edgetwin_twin_version = version, "twin already up to date")
            }
            Disposition::Applied => tracing::info!(
                edgetwin_event = "patch_applied",
                edgetwin_twin_version = version,
                "desired patch applied"
            ),
            Disposition::Queued => {
                tracing::debug!(edgetwin_twin_version = version, "patch queued during GET")
            }
            Disposition::Duplicate { applied } => tracing::debug!(
                edgetwin_twin_version = version,
                applied,
                "duplicate patch ignored"
            ),
            Disposition::Gap { applied } => {
                tracing::info!(edgetwin_event = "resync", edgetwin_twin_version = version, applied = ?applied, "version gap; fetching the full twin")
            }
            Disposition::Malformed(reason) => {
                tracing::warn!(edgetwin_event = "patch_malformed", edgetwin_twin_version = version, reason = %reason, "malformed desired document ignored")
            }
            Disposition::Dropped => {
                tracing::debug!(edgetwin_twin_version = version, "queued patch dropped")
            }
        }
    }
    for item in &out.items {
        if let Verdict::Rejected(reason) = &item.verdict {
            tracing::warn!(
                edgetwin_event = "patch_rejected",
                edgetwin_twin_version = item.version,
                property = %item.property,
                reason = %reason,
                "desired value rejected; previous value kept"
            );
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
