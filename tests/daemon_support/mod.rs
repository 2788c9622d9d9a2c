//! Harness for the daemon integration tests: the emulator on free loopback ports with a
//! registered module, and the daemon in-process through `app::run_with` on a temporary
//! state directory. Tests wait on [`SimEvent`]s and `watch` changes with a timeout; they
//! never sleep to synchronise.
#![allow(dead_code)]

pub mod fault;
pub mod logs;
pub mod notify;

use std::path::PathBuf;
use std::time::Duration;

use edgetwin::app::{self, AppError, ReadyView, RunControl};
use edgetwin::config::Settings;
use edgetwin_sim::hub::ModuleKey;
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEVICE: &str = "gw1";
pub const MODULE: &str = "edgetwin";
/// Longest wait for anything; generous because CI machines are small.
pub const WAIT: Duration = Duration::from_secs(30);

/// Service side: PATCH the desired properties of `device`/`module` in the emulator's hub;
/// returns the new desired `$version`.
pub fn set_desired(hub: &edgetwin_sim::Hub, device: &str, module: &str, desired: Value) -> u64 {
    let twin = hub
        .write_module_twin(
            device,
            module,
            TwinWrite::Patch,
            &json!({"properties": {"desired": desired}}),
            None,
        )
        .expect("twin written");
    twin["properties"]["desired"]["$version"]
        .as_u64()
        .expect("desired $version")
}

/// Whether `event` is the hub accepting a reported patch that acknowledges desired
/// `$version` `version` or a later one.
pub fn acks_at_least(event: &SimEvent, version: u64) -> bool {
    match event {
        SimEvent::ReportedPatched { patch, .. } => patch.as_object().is_some_and(|m| {
            m.values()
                .filter_map(|ack| ack.get("av").and_then(Value::as_u64))
                .any(|av| av >= version)
        }),
        _ => false,
    }
}

pub struct Env {
    pub sim: Option<Sim>,
    pub sim_dir: tempfile::TempDir,
    pub state_dir: tempfile::TempDir,
    pub events: broadcast::Receiver<SimEvent>,
    pub connection_string: String,
    pub ca_path: PathBuf,
    pub mqtt_port: u16,
}

impl Env {
    pub async fn start() -> Env {
        let sim_dir = tempfile::tempdir().expect("tempdir");
        let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
            .await
            .expect("sim starts");
        let hub = sim.hub();
        hub.put_device(DEVICE, &json!({}), None).expect("device");
        hub.put_module(DEVICE, MODULE, &json!({}), None)
            .expect("module");
        let connection_string = hub
            .module_connection_string(DEVICE, MODULE)
            .expect("registered");
        Env {
            events: hub.events(),
            ca_path: sim.ca_path(),
            mqtt_port: sim.mqtt_addr().port(),
            sim: Some(sim),
            sim_dir,
            state_dir: tempfile::tempdir().expect("tempdir"),
            connection_string,
        }
    }

    pub fn sim(&self) -> &Sim {
        self.sim.as_ref().expect("sim running")
    }

    /// Daemon settings through the real config loader; `extra` is appended to the file.
    pub fn settings(&self, extra: &str) -> Settings {
        self.settings_with("", extra)
    }

    /// [`Self::settings`] with `hub_extra` added to the `[hub]` table.
    pub fn settings_with(&self, hub_extra: &str, extra: &str) -> Settings {
        let path = self.sim_dir.path().join("edgetwin.toml");
        let text = format!(
            "[hub]\nconnection_string = \"{}\"\ngateway_host = \"127.0.0.1:{}\"\nca_file = \"{}\"\n\
             backoff = {{ initial = \"50ms\", max = \"300ms\" }}\n{hub_extra}\n\n[state]\ndir = \"{}\"\n\n{extra}\n",
            self.connection_string,
            self.mqtt_port,
            self.ca_path.display(),
            self.state_dir.path().display(),
        );
        std::fs::write(&path, text).expect("config written");
        Settings::load(Some(&path)).expect("valid config")
    }

    /// Service side: PATCH desired; returns the new desired `$version`.
    pub fn set_desired(&self, desired: Value) -> u64 {
        set_desired(self.sim().hub(), DEVICE, MODULE, desired)
    }

    pub fn reported(&self) -> Value {
        let twin = self
            .sim()
            .hub()
            .get_module_twin(DEVICE, MODULE)
            .expect("twin");
        twin["properties"]["reported"].clone()
    }

    /// Waits for the first event matching `want`; panics after [`WAIT`].
    pub async fn wait_for(&mut self, what: &str, want: impl FnMut(&SimEvent) -> bool) -> SimEvent {
        edgetwin_sim::wait_for(&mut self.events, WAIT, want)
            .await
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    }

    /// Waits for the ack of `property` at desired `$version`; returns the ack.
    pub async fn wait_ack(&mut self, property: &str, version: u64) -> Value {
        let event = self
            .wait_for(&format!("ack of {property} v{version}"), |e| {
                matches!(e, SimEvent::ReportedPatched { patch, .. }
                    if patch[property]["av"] == json!(version))
            })
            .await;
        match event {
            SimEvent::ReportedPatched { patch, .. } => patch[property].clone(),
            _ => unreachable!(),
        }
    }

    pub async fn wait_connected(&mut self) {
        self.wait_for("connect", |e| matches!(e, SimEvent::Connected { .. }))
            .await;
    }

    pub async fn wait_twin_get(&mut self) {
        self.wait_for("twin GET answered", |e| {
            matches!(e, SimEvent::TwinGet { status: 200, .. })
        })
        .await;
    }

    /// Invokes the `getState` direct method and returns its answer with every hub event
    /// seen before the answer reached the hub. The module's publishes reach the hub in the
    /// order it sent them, and the agent answers a method only after it finished with the
    /// events before it, so whatever the daemon sent in reply to those (an ack, say) is
    /// among the returned events: this is how a test shows something was *not* sent.
    pub async fn get_state_marker(&mut self) -> (Vec<SimEvent>, Value) {
        let hub = self.sim().hub().clone();
        let request =
            json!({"methodName": "getState", "payload": {}, "responseTimeoutInSeconds": 30});
        let invoke = async move {
            hub.invoke_module_method(DEVICE, MODULE, &request)
                .await
                .expect("getState answered")
        };
        let events = &mut self.events;
        let before = async {
            let mut seen = Vec::new();
            loop {
                match events.recv().await {
                    Ok(SimEvent::MethodResponded { module, .. }) if module == Env::key() => {
                        return seen
                    }
                    Ok(event) => seen.push(event),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        panic!("{n} hub events missed: absence cannot be shown")
                    }
                    Err(broadcast::error::RecvError::Closed) => panic!("sim closed"),
                }
            }
        };
        let (answer, seen) = tokio::time::timeout(WAIT, async { tokio::join!(invoke, before) })
            .await
            .expect("getState answered in time");
        assert_eq!(answer["status"], json!(200), "{answer}");
        (seen, answer["payload"].clone())
    }

    /// Waits until the daemon has handled everything the hub sent it so far (the answers
    /// to its reported patches included) and has no ack outstanding: a fault injected
    /// next hits the next patch, not the tail of the last one.
    pub async fn settled(&mut self) {
        let (_, state) = self.get_state_marker().await;
        assert_eq!(
            state["pendingReported"],
            json!(0),
            "acks still outstanding: {state}"
        );
    }

    pub fn state_file(&self) -> Value {
        let bytes = std::fs::read(self.state_dir.path().join("state.json")).expect("state.json");
        serde_json::from_slice(&bytes).expect("state.json is JSON")
    }

    pub fn key() -> ModuleKey {
        ModuleKey {
            device_id: DEVICE.into(),
            module_id: MODULE.into(),
        }
    }
}

/// The daemon running in-process.
pub struct Daemon {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), AppError>>,
    pub view: ReadyView,
    pub reloads: mpsc::Sender<Settings>,
}

impl Daemon {
    /// Starts `app::run_with` and waits until it is ready (state in force, READY sent).
    pub async fn start(settings: Settings) -> Daemon {
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (reloads, reload_rx) = mpsc::channel(1);
        let control = RunControl {
            reloads: Some(reload_rx),
            on_ready: Some(ready_tx),
        };
        let task = tokio::spawn(app::run_with(settings, shutdown.clone(), control));
        let view = tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("daemon ready in time")
            .expect("daemon reached READY");
        Daemon {
            shutdown,
            task,
            view,
            reloads,
        }
    }

    /// SIGTERM-equivalent: cancel and wait for a clean stop.
    pub async fn stop(self) -> Result<(), AppError> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task did not panic")
    }

    /// Waits until the state in force satisfies `want`.
    pub async fn wait_state(
        &mut self,
        what: &str,
        want: impl Fn(&edgetwin::twin::RuntimeState) -> bool,
    ) {
        tokio::time::timeout(WAIT, self.view.state.wait_for(|s| want(s)))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for state: {what}"))
            .expect("agent alive");
    }
}
