//! Refused credentials never leave the gateway dead (issue 16): the in-process daemon,
//! refused by the emulator (its module key regenerated, or a wrong key from the start),
//! stays up in a long refused backoff that the connection watch shows, never ends by
//! itself, and connects again without a restart once the credential file is fixed — on
//! its next attempt, or at once on a reload.
//!
//! The credential is a file (`hub.connection_string_file`), as on a gateway. MQTT goes
//! over WebSocket, so that the clock check after the refusal reaches the emulator's HTTPS
//! port and finds the clock right. Recovery times are printed (`--nocapture`), not
//! asserted.

mod daemon_support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use daemon_support::logs::Logs;
use daemon_support::{Daemon, Env, DEVICE, MODULE, WAIT};
use edgetwin::config::{CredentialSource, Settings};
use edgetwin::hub::options::{HostPort, HubTransport};
use edgetwin::hub::session::ConnectionState;
use edgetwin::identity::{ModuleCredentials, SharedKey};
use serde_json::json;

/// Settings reading the module credential from `file`, over WebSocket, with
/// `refused_backoff` (TOML) for the refused backoff.
fn settings(env: &Env, file: &Path, refused_backoff: &str) -> Settings {
    let mut settings = env.settings_with(&format!("refused_backoff = {refused_backoff}"), "");
    settings.hub.credentials = CredentialSource::File(file.to_path_buf());
    settings.hub.transport = HubTransport::MqttWs;
    settings.hub.gateway_host = Some(HostPort {
        host: "127.0.0.1".into(),
        port: env.sim().https_addr().port(),
    });
    settings
}

/// Short enough for a test: attempts every 200 ms to 1 s instead of minutes.
const SHORT: &str = "{ initial = \"200ms\", max = \"1s\" }";

fn credential_file(env: &Env, text: &str) -> PathBuf {
    let path = env.sim_dir.path().join("module.connstr");
    std::fs::write(&path, format!("{text}\n")).expect("credential written");
    path
}

/// A credential for the registered module with a key the hub does not know.
fn wrong_key(env: &Env) -> String {
    let mut creds: ModuleCredentials = env.connection_string.parse().expect("credential");
    creds.key = SharedKey::generate();
    creds.to_connection_string()
}

async fn wait_connection(daemon: &mut Daemon, what: &str, want: impl Fn(&ConnectionState) -> bool) {
    tokio::time::timeout(WAIT, daemon.view.connection.wait_for(want))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the connection: {what}"))
        .expect("session alive");
}

fn refused(state: &ConnectionState) -> bool {
    matches!(state, ConnectionState::Refused { code: 5, .. })
}

#[tokio::test]
async fn a_regenerated_key_keeps_the_daemon_up_refused_and_the_fixed_file_reconnects_it() {
    let mut logs = Logs::capture();
    let mut env = Env::start().await;
    let file = credential_file(&env, &env.connection_string);
    let mut daemon = Daemon::start(settings(&env, &file, SHORT)).await;
    let v1 = env.set_desired(json!({"telemetryInterval": 31}));
    env.wait_ack("telemetryInterval", v1).await;

    // The module's keys are regenerated in the hub, and the connection drops.
    let hub = env.sim().hub().clone();
    hub.put_module(DEVICE, MODULE, &json!({}), Some("*"))
        .expect("keys regenerated");
    env.sim().faults().drop_all_connections();
    wait_connection(&mut daemon, "refused", refused).await;
    let clock = logs.wait_for("clock_ok").await;
    assert!(
        clock.int("skew_secs").is_some_and(|s| s.abs() <= 5),
        "{clock:?}"
    );
    let backoff = logs.wait_for("auth_backoff").await;
    assert_eq!(backoff.int("code"), Some(5));
    // Several long-backoff attempts, still refused, and the daemon still running.
    logs.wait_nth("auth_backoff", 3).await;
    assert!(!daemon.task.is_finished(), "refusals never end the daemon");
    assert_eq!(
        logs.count("clock_check"),
        1,
        "the clock is read once per episode"
    );

    // The operator writes the new credential; no reload, no restart.
    let fixed = Instant::now();
    let new = hub
        .module_connection_string(DEVICE, MODULE)
        .expect("registered");
    std::fs::write(&file, &new).expect("credential fixed");
    wait_connection(&mut daemon, "connected", |s| {
        *s == ConnectionState::Connected
    })
    .await;
    println!(
        "RECOVERY regenerated key: connected {} ms after the file was fixed (refused backoff 200ms..1s)",
        fixed.elapsed().as_millis()
    );
    logs.wait_for("credential_changed").await;
    let v2 = env.set_desired(json!({"telemetryInterval": 32}));
    let ack = env.wait_ack("telemetryInterval", v2).await;
    assert_eq!(ack["value"], json!(32));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_wrong_key_from_the_start_waits_out_a_long_backoff_and_a_reload_connects_at_once() {
    let mut logs = Logs::capture();
    let mut env = Env::start().await;
    let file = credential_file(&env, &wrong_key(&env));
    // The default refused backoff: a minute before the next attempt, at the least.
    let long = "{ initial = \"1m\", max = \"1h\" }";
    let mut daemon = Daemon::start(settings(&env, &file, long)).await;
    wait_connection(&mut daemon, "refused", refused).await;
    let backoff = logs.wait_for("auth_backoff").await;
    assert!(
        backoff.int("retry_in_secs").is_some_and(|s| s >= 55),
        "{backoff:?}"
    );
    assert!(!daemon.task.is_finished(), "no exit 77 from run");

    // Fixed and reloaded (SIGHUP): tried at once, not after the minute.
    let fixed = Instant::now();
    std::fs::write(&file, &env.connection_string).expect("credential fixed");
    daemon
        .reloads
        .send(settings(&env, &file, long))
        .await
        .expect("reload sent");
    // WAIT (30 s) is shorter than the minute the backoff waits at the least, so it is
    // the reload that connects it.
    wait_connection(&mut daemon, "connected", |s| {
        *s == ConnectionState::Connected
    })
    .await;
    println!(
        "RECOVERY wrong key at start, fixed and reloaded: connected {} ms after the reload",
        fixed.elapsed().as_millis()
    );
    assert_eq!(
        logs.count("reload_partial"),
        0,
        "a new credential needs no restart"
    );
    let version = env.set_desired(json!({"telemetryInterval": 33}));
    env.wait_ack("telemetryInterval", version).await;
    daemon.stop().await.expect("clean stop");
}
