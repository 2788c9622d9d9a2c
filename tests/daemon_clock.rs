//! A wrong clock at boot never keeps the gateway off the hub (issue 16): the emulator's
//! clock is put days off (its SAS checks and every REST `Date` follow it), and the
//! in-process daemon learns the hub's time from one HTTPS answer after the refusal, signs
//! against it, connects within seconds and acknowledges a patch. A clock stepped while
//! running causes no reconnect storm. The registry client does the same on a 401.
//!
//! The daemon runs over MQTT-over-WebSocket here, so that the emulator's HTTPS port is
//! where it reads the hub's time (over MQTT/TLS it reads port 443 of the hub's host, which
//! the emulator does not listen on). Recovery times are printed (`--nocapture`), not
//! asserted.

mod daemon_support;

use std::time::{Duration, Instant};

use daemon_support::logs::Logs;
use daemon_support::{Daemon, Env};
use edgetwin::config::Settings;
use edgetwin::hub::options::{HostPort, HubTransport};
use edgetwin::registry::RegistryClient;
use edgetwin_sim::SimEvent;
use serde_json::json;

const DAY: i64 = 86_400;

/// The daemon's settings with MQTT over WebSocket to the emulator's HTTPS port.
fn over_websocket(env: &Env) -> Settings {
    let mut settings = env.settings("");
    settings.hub.transport = HubTransport::MqttWs;
    settings.hub.gateway_host = Some(HostPort {
        host: "127.0.0.1".into(),
        port: env.sim().https_addr().port(),
    });
    settings
}

fn assert_near(actual: Option<i64>, expected: i64, what: &str) {
    let actual = actual.unwrap_or_else(|| panic!("{what}: no value"));
    assert!(
        (actual - expected).abs() <= 5,
        "{what}: {actual} not near {expected}"
    );
}

#[tokio::test]
async fn a_hub_clock_two_days_ahead_is_learned_and_the_daemon_connects_within_seconds() {
    let mut logs = Logs::capture();
    let mut env = Env::start().await;
    env.sim().faults().set_clock_offset(2 * DAY);
    let version = env.set_desired(json!({"telemetryInterval": 21}));
    let started = Instant::now();
    let daemon = Daemon::start(over_websocket(&env)).await;

    let refused = env
        .wait_for("the first token refused as expired", |e| {
            matches!(e, SimEvent::ConnectRefused { .. })
        })
        .await;
    assert!(
        matches!(&refused, SimEvent::ConnectRefused { reason, .. } if reason.contains("expired")),
        "{refused:?}"
    );
    let skew = logs.wait_for("clock_skew").await;
    assert_near(skew.int("skew_secs"), 2 * DAY, "skew_secs");
    env.wait_connected().await;
    let connected_after = started.elapsed();
    let ack = env.wait_ack("telemetryInterval", version).await;
    assert_eq!(ack["value"], json!(21));
    assert_eq!(logs.count("auth_refused"), 1, "one refusal, then connected");
    assert_eq!(logs.count("clock_skew"), 1, "logged once");
    assert_eq!(
        logs.count("auth_backoff"),
        0,
        "no long backoff for a wrong clock"
    );
    println!(
        "RECOVERY hub clock +2 d: connected {} ms after start (one refusal, one HTTPS Date)",
        connected_after.as_millis()
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_hub_clock_two_days_behind_accepts_the_first_token_without_a_correction() {
    // The machine is ahead: its tokens live two days longer for the hub, which is no
    // reason to refuse them, so nothing is measured or corrected.
    let logs = Logs::capture();
    let mut env = Env::start().await;
    env.sim().faults().set_clock_offset(-2 * DAY);
    let version = env.set_desired(json!({"telemetryInterval": 22}));
    let started = Instant::now();
    let daemon = Daemon::start(over_websocket(&env)).await;
    let ack = env.wait_ack("telemetryInterval", version).await;
    assert_eq!(ack["value"], json!(22));
    assert_eq!(logs.count("auth_refused"), 0);
    assert_eq!(logs.count("clock_skew"), 0);
    println!(
        "RECOVERY hub clock -2 d: acknowledged {} ms after start (no refusal)",
        started.elapsed().as_millis()
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn clock_steps_while_running_cause_no_reconnect_storm_and_a_new_skew_is_learned_again() {
    let mut logs = Logs::capture();
    let mut env = Env::start().await;
    let faults = env.sim().faults();
    faults.set_clock_offset(2 * DAY);
    let mut settings = over_websocket(&env);
    // Below the configurable minimum on purpose: a renewal every 2.4 s.
    settings.hub.sas_ttl = Duration::from_secs(3);
    let daemon = Daemon::start(settings).await;
    logs.wait_for("clock_skew").await;
    env.wait_connected().await;

    // NTP sets the gateway right (the same, for the hub, as its clock jumping back two
    // days): tokens signed on the learned skew now live two days longer; renewals go on
    // on the monotonic clock, one reconnect each, nothing refused.
    faults.set_clock_offset(0);
    for _ in 0..3 {
        env.wait_connected().await;
    }
    assert_eq!(
        logs.count("auth_refused"),
        1,
        "only the first token was refused"
    );
    assert_eq!(
        logs.count("connect_failed"),
        0,
        "every reconnect was a renewal"
    );

    // The hub's clock jumps four days ahead of the learned one: the next renewal is
    // refused, the clock is read once more, and the session comes back by itself.
    let stepped = Instant::now();
    faults.set_clock_offset(6 * DAY);
    let second = logs.wait_nth("clock_skew", 2).await;
    assert_near(second.int("skew_secs"), 6 * DAY, "the second skew_secs");
    env.wait_connected().await;
    println!(
        "RECOVERY hub clock stepped +4 d while running: connected again {} ms after the step",
        stepped.elapsed().as_millis()
    );
    let version = env.set_desired(json!({"telemetryInterval": 23}));
    env.wait_ack("telemetryInterval", version).await;
    assert_eq!(logs.count("auth_backoff"), 0);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_registry_401_from_a_clock_two_days_behind_is_signed_again_on_hub_time() {
    let mut logs = Logs::capture();
    let env = Env::start().await;
    env.sim().faults().set_clock_offset(2 * DAY);
    let service = env
        .sim()
        .service_connection_string("iothubowner")
        .expect("policy");
    let ca = std::fs::read(&env.ca_path).expect("CA");
    let client = RegistryClient::new(service.parse().expect("service credential"), Some(&ca))
        .expect("client");
    let device = client
        .get_device("gw1")
        .await
        .expect("answered after one retry");
    assert_eq!(device["deviceId"], json!("gw1"));
    let skew = logs.wait_for("clock_skew").await;
    assert_near(skew.int("skew_secs"), 2 * DAY, "skew_secs");
    // The skew is kept: the next call is signed on hub time straight away.
    client
        .get_module_twin("gw1", "edgetwin")
        .await
        .expect("twin");
    assert_eq!(logs.count("clock_skew"), 1);
}
