//! Rule 6 (state on disk before the ack) proven by injecting the fault, not by reading the
//! file after an ack arrived (which passes whichever came first): while `state.json`
//! cannot be written, a desired patch is put in force but no ack of it reaches the hub;
//! once the disk takes writes again the agent's retry writes it and only then acks it.
//!
//! The daemon runs in-process against the emulator. The write fails for root too: a
//! directory sits where the atomic write creates its temporary file (EISDIR).

mod daemon_support;

use daemon_support::fault::TempPathBlocked;
use daemon_support::{acks_at_least, Daemon, Env};
use serde_json::json;

#[tokio::test]
async fn an_applied_patch_is_acknowledged_only_once_its_state_is_on_disk() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(env.settings("")).await;
    let state_file = env.state_dir.path().join("state.json");
    let before = env.set_desired(json!({"telemetryInterval": 30}));
    env.wait_ack("telemetryInterval", before).await;
    env.settled().await;

    let blocked = TempPathBlocked::block(&state_file);
    let v = env.set_desired(json!({"telemetryInterval": 45}));
    // getState is answered after the agent handled the patch: any ack it sent for the
    // patch reached the hub before this answer.
    let (seen, state) = env.get_state_marker().await;
    assert_eq!(state["desiredVersion"], json!(v), "the patch is in force");
    assert_eq!(state["properties"]["telemetryInterval"], json!(45));
    assert!(
        state["pendingReported"].as_u64() >= Some(1),
        "its ack is outstanding: {state}"
    );
    let early: Vec<_> = seen.iter().filter(|e| acks_at_least(e, v)).collect();
    assert!(
        early.is_empty(),
        "v{v} acknowledged while state.json could not be written: {early:?}"
    );
    assert_eq!(
        env.reported()["telemetryInterval"]["av"],
        json!(before),
        "the hub holds no ack of v{v}"
    );
    assert_eq!(
        env.state_file()["desired_version"],
        json!(before),
        "state.json still holds the previous version"
    );

    blocked.unblock();
    // The agent retries the write on its own; the ack follows it.
    let ack = env.wait_ack("telemetryInterval", v).await;
    assert_eq!(ack["ac"], json!(200));
    assert_eq!(ack["value"], json!(45));
    let on_disk = env.state_file();
    assert_eq!(on_disk["desired_version"], json!(v));
    assert_eq!(on_disk["properties"]["telemetryInterval"], json!(45));
    daemon.stop().await.expect("clean stop");
}
