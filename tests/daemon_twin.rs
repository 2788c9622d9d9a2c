//! The daemon against the emulator, in-process through `app::run_with`: the twin is
//! applied, persisted before it is acknowledged, acknowledged with the right version,
//! bad values are refused, direct methods answer, telemetry follows the interval, and a
//! stop flushes the state.

mod daemon_support;

use daemon_support::{Daemon, Env, DEVICE, MODULE};
use edgetwin_sim::SimEvent;
use serde_json::json;

#[tokio::test]
async fn first_connect_applies_the_twin_and_acknowledges_every_property() {
    let mut env = Env::start().await;
    let version = env.set_desired(json!({"telemetryInterval": 30, "site": "north"}));
    let daemon = Daemon::start(env.settings("")).await;

    let ack = env.wait_ack("telemetryInterval", version).await;
    assert_eq!(
        ack,
        json!({"value": 30, "ac": 200, "av": version, "ad": "applied"})
    );
    let state = env.state_file();
    assert_eq!(state["desired_version"], json!(version));
    assert_eq!(state["properties"]["telemetryInterval"], json!(30));
    assert_eq!(state["properties"]["site"], json!("north"));
    assert_eq!(env.reported()["site"]["value"], json!("north"));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn patch_is_applied_persisted_before_the_ack_and_acknowledged_with_its_version() {
    let mut env = Env::start().await;
    let mut daemon = Daemon::start(env.settings("")).await;
    env.wait_twin_get().await;

    let version = env.set_desired(json!({"telemetryInterval": 122}));
    let ack = env.wait_ack("telemetryInterval", version).await;
    // The ack is out, so the state must already be on disk (DESIGN §3 rule 6).
    let state = env.state_file();
    assert_eq!(state["properties"]["telemetryInterval"], json!(122));
    assert_eq!(state["desired_version"], json!(version));
    assert_eq!(ack["value"], json!(122));
    assert_eq!(ack["ac"], json!(200));
    daemon
        .wait_state("interval in force", |s| {
            s.integer("telemetryInterval") == Some(122)
        })
        .await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn bad_desired_value_is_acknowledged_400_and_the_old_value_stays() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(env.settings("")).await;
    env.wait_twin_get().await;
    let good = env.set_desired(json!({"telemetryInterval": 45}));
    env.wait_ack("telemetryInterval", good).await;

    let bad = env.set_desired(json!({"telemetryInterval": 0}));
    let ack = env.wait_ack("telemetryInterval", bad).await;
    assert_eq!(ack["ac"], json!(400));
    assert_eq!(ack["value"], json!(45), "previous good value is reported");
    assert!(ack["ad"].as_str().is_some_and(|r| !r.is_empty()));
    let state = env.state_file();
    assert_eq!(state["properties"]["telemetryInterval"], json!(45));
    assert_eq!(state["desired_version"], json!(bad));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn direct_methods_get_state_ping_and_404_for_unknown() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(env.settings("")).await;
    let version = env.set_desired(json!({"telemetryInterval": 99}));
    env.wait_ack("telemetryInterval", version).await;
    let hub = env.sim().hub().clone();
    let invoke = |name: &str| {
        let hub = hub.clone();
        let request = json!({"methodName": name, "payload": {}, "responseTimeoutInSeconds": 10});
        async move {
            hub.invoke_module_method(DEVICE, MODULE, &request)
                .await
                .expect("method invoked")
        }
    };
    let ping = invoke("ping").await;
    assert_eq!(ping["status"], json!(200));
    assert_eq!(ping["payload"]["pong"], json!(true));

    let state = invoke("getState").await;
    assert_eq!(state["status"], json!(200));
    assert_eq!(
        state["payload"]["properties"]["telemetryInterval"],
        json!(99)
    );
    assert_eq!(state["payload"]["desiredVersion"], json!(version));
    assert_eq!(state["payload"]["connected"], json!(true));

    let unknown = invoke("reboot").await;
    assert_eq!(unknown["status"], json!(404));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn telemetry_follows_the_interval_set_in_the_twin() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(env.settings("")).await;
    env.wait_twin_get().await;
    // The default interval (60 s) would not send anything during this test; 1 s must.
    let version = env.set_desired(json!({"telemetryInterval": 1}));
    env.wait_ack("telemetryInterval", version).await;
    env.wait_for("telemetry", |e| matches!(e, SimEvent::Telemetry { .. }))
        .await;
    let sent = env.sim().hub().telemetry_of(&Env::key());
    let last = sent.last().expect("a message");
    assert_eq!(last.property("$.ct"), Some("application/json"));
    assert_eq!(last.property("$.ce"), Some("utf-8"));
    let body: serde_json::Value = serde_json::from_slice(&last.body).expect("JSON body");
    assert_eq!(body["telemetryInterval"], json!(1));
    assert!(body["uptimeSeconds"].is_u64());
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn stop_flushes_state_and_disconnects() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(env.settings("")).await;
    let version = env.set_desired(json!({"telemetryInterval": 321}));
    env.wait_ack("telemetryInterval", version).await;
    std::fs::remove_file(env.state_dir.path().join("state.json")).expect("state.json exists");

    daemon.stop().await.expect("clean stop");
    env.wait_for("disconnect", |e| matches!(e, SimEvent::Disconnected { .. }))
        .await;
    let state = env.state_file();
    assert_eq!(state["properties"]["telemetryInterval"], json!(321));
    assert!(state["reported_version"].is_u64());
}

#[tokio::test]
async fn reload_applies_a_new_schema_live() {
    let mut env = Env::start().await;
    let mut daemon = Daemon::start(env.settings("")).await;
    let version = env.set_desired(json!({"fan": 5}));
    env.wait_ack("fan", version).await;

    // A declared bound that the value in force violates: reload re-reads the twin and
    // acknowledges fan under the new rules.
    let stricter =
        env.settings("[twin.properties.fan]\ntype = \"integer\"\nmax = 3\ndefault = 1\n");
    daemon.reloads.send(stricter).await.expect("reload sent");
    let ack = env.wait_ack("fan", version).await;
    assert_eq!(ack["ac"], json!(400));
    daemon
        .wait_state("fan back to its default", |s| s.integer("fan") == Some(1))
        .await;
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn mqtt_over_websocket_reaches_the_hub() {
    let mut env = Env::start().await;
    let mut settings = env.settings("");
    settings.hub.transport = edgetwin::hub::options::HubTransport::MqttWs;
    settings.hub.gateway_host = Some(edgetwin::hub::options::HostPort {
        host: "127.0.0.1".into(),
        port: env.sim().https_addr().port(),
    });
    let version = env.set_desired(json!({"telemetryInterval": 33}));
    let daemon = Daemon::start(settings).await;
    let ack = env.wait_ack("telemetryInterval", version).await;
    assert_eq!(ack["value"], json!(33));
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn wrong_credentials_at_start_leave_the_daemon_running_in_a_refused_backoff() {
    let env = Env::start().await;
    let mut creds: edgetwin::identity::ModuleCredentials =
        env.connection_string.parse().expect("connection string");
    creds.key = edgetwin::identity::SharedKey::generate();
    let mut settings = env.settings("");
    settings.hub.credentials = edgetwin::config::CredentialSource::Inline(
        edgetwin::config::Secret::new(creds.to_connection_string()),
    );
    let mut daemon = Daemon::start(settings).await;
    // Over MQTT/TLS the clock is read from port 443 of the target host, where the
    // emulator does not listen: the reading fails and the refusal is the credential's.
    tokio::time::timeout(
        daemon_support::WAIT,
        daemon
            .view
            .connection
            .wait_for(|s| matches!(s, edgetwin::hub::session::ConnectionState::Refused { .. })),
    )
    .await
    .expect("refused backoff in time")
    .expect("session alive");
    assert!(
        !daemon.task.is_finished(),
        "refused credentials are not fatal"
    );
    daemon.stop().await.expect("clean stop");
}

/// A minimal HTTP CONNECT proxy; counts the tunnels it opened.
async fn connect_proxy() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tunnels = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                    .expect("a CONNECT request")
                    .to_owned();
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .expect("reply");
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, tunnels)
}

#[tokio::test]
async fn http_connect_proxy_tunnels_the_session() {
    let mut env = Env::start().await;
    let (port, tunnels) = connect_proxy().await;
    let settings = env.settings_with(&format!("proxy = \"http://127.0.0.1:{port}\""), "");
    let version = env.set_desired(json!({"telemetryInterval": 44}));
    let daemon = Daemon::start(settings).await;
    let ack = env.wait_ack("telemetryInterval", version).await;
    assert_eq!(ack["value"], json!(44));
    assert!(tunnels.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    daemon.stop().await.expect("clean stop");
}
