//! The agent driven directly through its channels, standing in for the hub session: the
//! cases the emulator cannot script (a `$version` gap, dropped events) and the ordering
//! promises (state on disk before an ack leaves, lost acks re-sent after reconnect).
//!
//! That something was *not* sent is shown by order, never by an empty channel: the agent
//! handles its events one at a time, so when a direct method sent after an event is the
//! next command out, nothing was sent in reply to that event.

mod daemon_support;

use std::time::Duration;

use bytes::Bytes;
use daemon_support::fault::TempPathBlocked;
use edgetwin::agent::{Agent, AgentConfig, AgentLinks};
use edgetwin::hub::session::{ConnectionState, HubCommand, HubEvent};
use edgetwin::hub::twin_requests::TwinFailure;
use edgetwin::systemd::Heartbeat;
use edgetwin::twin::{AckStyle, RuntimeState, Schema};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    events: mpsc::Sender<HubEvent>,
    commands: mpsc::Receiver<HubCommand>,
    state: watch::Receiver<RuntimeState>,
    dir: tempfile::TempDir,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _connection: watch::Sender<ConnectionState>,
}

impl Harness {
    fn start() -> Harness {
        Self::start_with_hook(|_| String::new())
    }

    /// `hook` builds the `hooks.on_change` command from the path it should write to.
    fn start_with_hook(hook: impl Fn(&str) -> String) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = hook(&dir.path().join("hook.json").display().to_string());
        let schema = Schema::default();
        let config = AgentConfig {
            device_id: "gw1".into(),
            module_id: "edgetwin".into(),
            state_file: dir.path().join("state.json"),
            ack: AckStyle::Pnp,
            schema: schema.clone(),
            telemetry_enabled: false,
            hook: (!hook.is_empty()).then_some(hook),
        };
        let (agent, state) = Agent::new(
            config,
            RuntimeState::from_defaults(&schema),
            Heartbeat::new(),
        );
        let (events_tx, events_rx) = mpsc::channel(16);
        let (commands_tx, commands_rx) = mpsc::channel(16);
        let (connection_tx, connection_rx) = watch::channel(ConnectionState::Connected);
        let (_control_tx, control_rx) = mpsc::channel(1);
        let links = AgentLinks {
            events: events_rx,
            commands: commands_tx,
            connection: connection_rx,
            control: control_rx,
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent.run(links, stop.clone()));
        Harness {
            events: events_tx,
            commands: commands_rx,
            state,
            dir,
            stop,
            task,
            _connection: connection_tx,
        }
    }

    async fn send(&self, event: HubEvent) {
        self.events.send(event).await.expect("agent alive");
    }

    async fn next_command(&mut self) -> HubCommand {
        tokio::time::timeout(WAIT, self.commands.recv())
            .await
            .expect("a command in time")
            .expect("agent alive")
    }

    async fn expect_get(&mut self) {
        match self.next_command().await {
            HubCommand::GetTwin => {}
            other => panic!("expected a twin GET, got {other:?}"),
        }
    }

    /// The next command must answer the method request `rid`; returns its payload.
    async fn expect_method_response(&mut self, rid: &str) -> Value {
        match self.next_command().await {
            HubCommand::MethodResponse {
                rid: answered,
                status: 200,
                payload,
            } if answered == rid => serde_json::from_slice(&payload).expect("JSON"),
            other => panic!("expected the answer to method {rid}, got {other:?}"),
        }
    }

    async fn expect_report(&mut self) -> Map<String, Value> {
        match self.next_command().await {
            HubCommand::Report(patch) => patch,
            other => panic!("expected a reported patch, got {other:?}"),
        }
    }

    /// Connected and synced to a twin at desired `version` with `desired`.
    async fn synced(&mut self, mut desired: Value, version: u64) {
        self.send(HubEvent::Connected {
            session_present: false,
        })
        .await;
        self.expect_get().await;
        desired["$version"] = json!(version);
        let twin = json!({"desired": desired, "reported": {"$version": 1}});
        self.send(HubEvent::Twin(Ok(Bytes::from(twin.to_string()))))
            .await;
    }

    fn state_file(&self) -> Value {
        let bytes = std::fs::read(self.dir.path().join("state.json")).expect("state.json");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    /// Stops the agent; returns its state directory, which lives as long as the caller
    /// keeps it.
    async fn stop(self) -> tempfile::TempDir {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops")
            .expect("no panic");
        self.dir
    }
}

fn desired(version: u64, body: Value) -> HubEvent {
    let mut body = body;
    body["$version"] = json!(version);
    HubEvent::Desired {
        version: Some(version),
        payload: Bytes::from(body.to_string()),
    }
}

fn method(name: &str, rid: &str) -> HubEvent {
    HubEvent::Method {
        name: name.into(),
        rid: rid.into(),
        payload: Bytes::from_static(b"{}"),
    }
}

#[tokio::test]
async fn patch_with_version_gap_triggers_full_get() {
    let mut h = Harness::start();
    h.synced(json!({}), 1).await;
    h.send(desired(3, json!({"telemetryInterval": 5}))).await;
    h.expect_get().await;
    assert_eq!(
        h.state.borrow().integer("telemetryInterval"),
        Some(60),
        "nothing applied from a patch that skipped a version"
    );
    h.stop().await;
}

#[tokio::test]
async fn ack_leaves_only_after_the_state_is_on_disk() {
    let mut h = Harness::start();
    h.synced(json!({}), 1).await;
    h.send(method("getState", "synced")).await;
    h.expect_method_response("synced").await;
    let state_file = h.dir.path().join("state.json");
    assert_eq!(h.state_file()["desired_version"], json!(1));

    // state.json cannot be written (EISDIR, for root too): the patch is put in force, the
    // ack is held. The method sent after it is answered first: nothing left before it.
    let blocked = TempPathBlocked::block(&state_file);
    h.send(desired(2, json!({"telemetryInterval": 5}))).await;
    h.send(method("getState", "marker")).await;
    let state = h.expect_method_response("marker").await;
    assert_eq!(state["desiredVersion"], json!(2), "the patch is in force");
    assert_eq!(state["pendingReported"], json!(1), "its ack is outstanding");
    assert_eq!(h.state_file()["desired_version"], json!(1));

    // The write succeeds on the agent's own retry; the ack follows.
    blocked.unblock();
    let report = h.expect_report().await;
    assert_eq!(report["telemetryInterval"]["av"], json!(2));
    let on_disk = h.state_file();
    assert_eq!(on_disk["properties"]["telemetryInterval"], json!(5));
    assert_eq!(on_disk["desired_version"], json!(2));
    h.stop().await;
}

#[tokio::test]
async fn unconfirmed_ack_is_coalesced_and_resent_after_reconnect() {
    let mut h = Harness::start();
    h.synced(json!({}), 1).await;
    h.send(desired(2, json!({"a": 1}))).await;
    let sent = h.expect_report().await;
    // As the session tells it once the agent knows it is offline: the connection dropped,
    // then the report in flight failed.
    h.send(HubEvent::Disconnected).await;
    h.send(HubEvent::Reported {
        patch: sent,
        result: Err(TwinFailure::Lost),
    })
    .await;
    // Nothing goes out while offline: a method sent afterwards is answered first.
    h.send(method("ping", "marker")).await;
    h.expect_method_response("marker").await;

    h.send(HubEvent::Connected {
        session_present: true,
    })
    .await;
    let mut saw_get = false;
    let mut resent = None;
    while !(saw_get && resent.is_some()) {
        match h.next_command().await {
            HubCommand::GetTwin => saw_get = true,
            HubCommand::Report(patch) => resent = Some(patch),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(resent.expect("resent")["a"]["av"], json!(2));
    h.stop().await;
}

#[tokio::test]
async fn resync_gets_the_twin_again_and_resends_the_report_in_flight() {
    let mut h = Harness::start();
    h.synced(json!({}), 1).await;
    h.send(desired(2, json!({"b": true}))).await;
    let sent = h.expect_report().await;
    h.send(HubEvent::Resync {
        twin_answer_lost: false,
    })
    .await;
    let mut saw_get = false;
    let mut resent = None;
    while !(saw_get && resent.is_some()) {
        match h.next_command().await {
            HubCommand::GetTwin => saw_get = true,
            HubCommand::Report(patch) => resent = Some(patch),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(resent, Some(sent));
    h.stop().await;
}

#[tokio::test]
async fn change_hook_gets_the_new_state_on_stdin() {
    // The hook is a separate process: it writes what it got, then says so on a FIFO.
    let mut h = Harness::start_with_hook(|out| {
        format!("cat > {out}.tmp && mv {out}.tmp {out} && echo done > {out}.done")
    });
    let out = h.dir.path().join("hook.json");
    let done = h.dir.path().join("hook.json.done");
    let made = std::process::Command::new("mkfifo")
        .arg(&done)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo failed");
    // Read-write, so the FIFO never reads as closed before the hook opens it.
    let fifo = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&done)
        .expect("fifo opened");
    h.synced(json!({}), 1).await;
    h.send(desired(2, json!({"telemetryInterval": 7}))).await;
    h.expect_report().await;
    let mut line = String::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(fifo), &mut line),
    )
    .await
    .expect("the hook ran")
    .expect("fifo read");
    assert_eq!(line, "done\n");
    let seen: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("hook output")).expect("hook got JSON");
    assert_eq!(seen["properties"]["telemetryInterval"], json!(7));
    assert_eq!(seen["desired_version"], json!(2));
    h.stop().await;
}

#[tokio::test]
async fn a_confirmed_report_rides_along_with_the_next_patch_write() {
    let mut h = Harness::start();
    h.synced(json!({}), 1).await;
    h.send(desired(2, json!({"telemetryInterval": 5}))).await;
    let patch = h.expect_report().await;
    h.send(HubEvent::Reported {
        patch,
        result: Ok(Some(7)),
    })
    .await;
    // The confirmation was handled before this answer; it cost no write of its own.
    h.send(method("getState", "after-confirmation")).await;
    let state = h.expect_method_response("after-confirmation").await;
    assert_eq!(state["reportedVersion"], json!(7), "confirmed in memory");
    assert_ne!(
        h.state_file()["reported_version"],
        json!(7),
        "not yet on disk"
    );

    // The next applied patch's one write carries it.
    h.send(desired(3, json!({"telemetryInterval": 6}))).await;
    h.expect_report().await;
    let on_disk = h.state_file();
    assert_eq!(on_disk["desired_version"], json!(3));
    assert_eq!(on_disk["reported_version"], json!(7));
    h.stop().await;
}

#[tokio::test]
async fn a_confirmation_not_yet_written_is_written_at_stop() {
    let mut h = Harness::start();
    h.synced(json!({}), 1).await;
    h.send(desired(2, json!({"telemetryInterval": 5}))).await;
    let patch = h.expect_report().await;
    h.send(HubEvent::Reported {
        patch,
        result: Ok(Some(9)),
    })
    .await;
    h.send(method("getState", "confirmed")).await;
    h.expect_method_response("confirmed").await;
    let dir = h.stop().await;
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).expect("state.json"))
            .expect("state.json is JSON");
    assert_eq!(on_disk["reported_version"], json!(9));
}
