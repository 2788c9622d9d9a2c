//! The daemon keeps the twin in force through what real networks and hubs do: outages
//! with patches made meanwhile, SAS renewals, throttling, lost responses, a hub that is
//! down at start-up, and a corrupt state file.

mod daemon_support;

use std::time::Duration;

use daemon_support::{Daemon, Env};
use edgetwin::hub::session::ConnectionState;
use edgetwin_sim::SimEvent;
use serde_json::json;

#[tokio::test]
async fn patches_made_while_disconnected_are_applied_after_reconnect() {
    let mut env = Env::start().await;
    // The refusals (CONNACK 5) back off like refused credentials: minutes by default.
    let short = "refused_backoff = { initial = \"50ms\", max = \"300ms\" }";
    let mut daemon = Daemon::start(env.settings_with(short, "")).await;
    env.wait_twin_get().await;

    env.sim().faults().refuse_next_connects(3);
    env.sim().faults().drop_all_connections();
    env.wait_for("disconnect", |e| matches!(e, SimEvent::Disconnected { .. }))
        .await;
    let version = env.set_desired(json!({"telemetryInterval": 77, "mode": "eco"}));

    let ack = env.wait_ack("telemetryInterval", version).await;
    assert_eq!(ack["value"], json!(77));
    daemon
        .wait_state("both applied", |s| {
            s.integer("telemetryInterval") == Some(77)
                && s.properties.get("mode") == Some(&json!("eco"))
        })
        .await;
    assert_eq!(env.reported()["mode"]["av"], json!(version));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn token_renewal_keeps_patches_flowing() {
    let mut env = Env::start().await;
    let mut settings = env.settings("");
    // Below the configurable minimum on purpose: renew every 2.4 s.
    settings.hub.sas_ttl = Duration::from_secs(3);
    let daemon = Daemon::start(settings).await;
    let mut connects = 0;
    for round in 0..5 {
        env.wait_connected().await;
        connects += 1;
        let version = env.set_desired(json!({"round": round}));
        let ack = env.wait_ack("round", version).await;
        assert_eq!(ack["value"], json!(round));
    }
    assert!(connects >= 5);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn throttling_and_lost_responses_are_retried_until_acknowledged() {
    let mut env = Env::start().await;
    env.sim().faults().throttle_twin_ops(4);
    let daemon = Daemon::start(env.settings("")).await;
    let first = env.set_desired(json!({"telemetryInterval": 20}));
    env.wait_ack("telemetryInterval", first).await;

    // The hub applies the next reported patch but its 204 is lost: the agent must not
    // wait for it forever.
    env.sim().faults().drop_twin_responses(1);
    let lost = env.set_desired(json!({"telemetryInterval": 21}));
    env.wait_ack("telemetryInterval", lost).await;
    env.sim().faults().throttle_twin_ops(3);
    let next = env.set_desired(json!({"telemetryInterval": 22}));
    let ack = env.wait_ack("telemetryInterval", next).await;
    assert_eq!(ack["value"], json!(22));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn restart_with_the_hub_down_puts_persisted_state_in_force() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(env.settings("")).await;
    let version = env.set_desired(json!({"telemetryInterval": 600, "site": "north"}));
    env.wait_ack("telemetryInterval", version).await;
    daemon.stop().await.expect("clean stop");

    let settings = env.settings("");
    env.sim.take().expect("sim").shutdown().await;
    let daemon = Daemon::start(settings).await;
    let state = daemon.view.state.borrow().clone();
    assert_eq!(state.integer("telemetryInterval"), Some(600));
    assert_eq!(state.properties.get("site"), Some(&json!("north")));
    assert_eq!(state.desired_version, Some(version));
    assert_ne!(*daemon.view.connection.borrow(), ConnectionState::Connected);
    daemon.stop().await.expect("clean stop while offline");
}

#[tokio::test]
async fn corrupt_state_file_is_moved_aside_and_the_twin_restores_state() {
    let mut env = Env::start().await;
    let state_path = env.state_dir.path().join("state.json");
    std::fs::write(&state_path, b"{\"schema\": 1, \"properties\": tru").expect("written");
    let version = env.set_desired(json!({"telemetryInterval": 15}));
    let daemon = Daemon::start(env.settings("")).await;

    let aside: Vec<_> = std::fs::read_dir(env.state_dir.path())
        .expect("state dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "corrupt file moved aside: {aside:?}");
    env.wait_ack("telemetryInterval", version).await;
    assert_eq!(
        env.state_file()["properties"]["telemetryInterval"],
        json!(15)
    );
    daemon.stop().await.expect("clean stop");
}
