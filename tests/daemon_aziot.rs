//! The daemon on an IoT Edge host: its module identity from the emulator's aziot-identityd
//! and every SAS token signed by its aziot-keyd (`[aziot] enabled = true`), in-process
//! through `app::run_with`. It connects and acknowledges a patch with no key on its side;
//! a module deleted and re-created in the hub (a new generation, a new key handle) is
//! followed at the next connect; and each way the Identity Service can fail gets the
//! answer `app::aziot` documents: a missing socket is configuration (78), no principal is
//! permission (77) naming the principal file, nonsense is an error and never a crash; once
//! running, nothing of it stops the daemon.

mod daemon_support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon_support::logs::Logs;
use daemon_support::{Daemon, WAIT};
use edgetwin::app::{self, AppError, RunControl};
use edgetwin::aziot::{AziotClient, AziotError, PRINCIPAL_FILE};
use edgetwin::cli::exit_code;
use edgetwin::config::Settings;
use edgetwin_sim::aziot::AziotConfig;
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "edge-gw";
const MODULE: &str = "edgetwin";

/// The emulator with its Identity Service, and a state directory for the daemon.
struct Edge {
    sim: Sim,
    sim_dir: tempfile::TempDir,
    state_dir: tempfile::TempDir,
    events: broadcast::Receiver<SimEvent>,
}

impl Edge {
    async fn start() -> Edge {
        let sim_dir = tempfile::tempdir().expect("tempdir");
        let mut config = SimConfig::ephemeral(sim_dir.path().join("hub"));
        config.aziot = Some(AziotConfig::new(sim_dir.path().join("aziot"), DEVICE));
        let sim = Sim::start(config).await.expect("sim starts");
        Edge {
            events: sim.hub().events(),
            sim,
            sim_dir,
            state_dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn aziot_dir(&self) -> PathBuf {
        self.sim_dir.path().join("aziot")
    }

    /// Settings through the real loader: `[aziot]` with the sockets in `sockets`, the
    /// emulator's MQTT port as the gateway (its hub name is `localhost`).
    fn settings_in(&self, sockets: &Path) -> Settings {
        let gateway = format!(
            "gateway_host = \"127.0.0.1:{}\"",
            self.sim.mqtt_addr().port()
        );
        self.settings_with(sockets, &gateway)
    }

    fn settings_with(&self, sockets: &Path, hub_extra: &str) -> Settings {
        let path = self.sim_dir.path().join("edgetwin.toml");
        let text = format!(
            "[hub]\n{hub_extra}\nca_file = \"{}\"\n\
             backoff = {{ initial = \"50ms\", max = \"300ms\" }}\n\
             refused_backoff = {{ initial = \"50ms\", max = \"300ms\" }}\n\n\
             [aziot]\nenabled = true\nidentityd_socket = \"{}\"\nkeyd_socket = \"{}\"\n\n\
             [state]\ndir = \"{}\"\n",
            self.sim.ca_path().display(),
            sockets.join("identityd.sock").display(),
            sockets.join("keyd.sock").display(),
            self.state_dir.path().display(),
        );
        std::fs::write(&path, text).expect("config written");
        Settings::load(Some(&path)).expect("valid config")
    }

    fn settings(&self) -> Settings {
        self.settings_in(&self.aziot_dir())
    }

    fn set_desired(&self, desired: Value) -> u64 {
        daemon_support::set_desired(self.sim.hub(), DEVICE, MODULE, desired)
    }

    async fn wait_for(&mut self, what: &str, want: impl FnMut(&SimEvent) -> bool) -> SimEvent {
        edgetwin_sim::wait_for(&mut self.events, WAIT, want)
            .await
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    }

    async fn wait_ack(&mut self, property: &str, version: u64) {
        self.wait_for(&format!("ack of {property} v{version}"), |e| {
            matches!(e, SimEvent::ReportedPatched { patch, .. }
                if patch[property]["av"] == json!(version) && patch[property]["ac"] == json!(200))
        })
        .await;
    }

    async fn wait_connected(&mut self) {
        self.wait_for("the module's connect", |e| {
            matches!(e, SimEvent::Connected { module, .. }
                if module.device_id == DEVICE && module.module_id == MODULE)
        })
        .await;
    }

    fn generation(&self) -> String {
        self.sim.hub().get_module(DEVICE, MODULE).expect("module")["generationId"]
            .as_str()
            .expect("generationId")
            .to_owned()
    }
}

/// `run_with` that must end by itself, with an error.
async fn run_fails(settings: Settings) -> AppError {
    let run = app::run_with(settings, CancellationToken::new(), RunControl::default());
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the daemon stops by itself")
        .expect_err("the daemon refuses to run")
}

#[tokio::test]
async fn the_daemon_connects_as_the_module_identityd_names_and_acknowledges_a_patch() {
    let mut edge = Edge::start().await;
    let daemon = Daemon::start(edge.settings()).await;
    edge.wait_connected().await;

    let version = edge.set_desired(json!({"telemetryInterval": 42}));
    edge.wait_ack("telemetryInterval", version).await;
    let state: Value = serde_json::from_slice(
        &std::fs::read(edge.state_dir.path().join("state.json")).expect("state.json"),
    )
    .expect("JSON");
    assert_eq!(state["device_id"], json!(DEVICE));
    assert_eq!(state["module_id"], json!(MODULE));
    assert_eq!(state["properties"]["telemetryInterval"], json!(42));
    assert!(
        !edge.state_dir.path().join("module.connstr").exists(),
        "no key on edgetwin's side"
    );
    daemon.stop().await.expect("clean stop");
    edge.sim.shutdown().await;
}

#[tokio::test]
async fn the_daemon_connects_to_the_gateway_identityd_names_with_a_token_for_the_hub() {
    let mut edge = Edge::start().await;
    // A parent gateway (here: the emulator's MQTT listener under another name than the
    // hub's); nothing in edgetwin's configuration says where to connect.
    let gateway = format!("127.0.0.1:{}", edge.sim.mqtt_addr().port());
    edge.sim
        .aziot()
        .expect("aziot served")
        .set_gateway_host(Some(gateway));
    let daemon = Daemon::start(edge.settings_with(&edge.aziot_dir(), "")).await;
    // The emulator checks the token's `sr` against its hub name, `localhost`.
    edge.wait_connected().await;
    let version = edge.set_desired(json!({"telemetryInterval": 12}));
    edge.wait_ack("telemetryInterval", version).await;
    daemon.stop().await.expect("clean stop");
    edge.sim.shutdown().await;
}

// Current-thread: the daemon's log events are captured on the test's thread.
#[tokio::test]
async fn a_module_re_created_in_the_hub_is_followed_with_its_new_key_and_acks_again() {
    let mut logs = Logs::capture();
    let mut edge = Edge::start().await;
    let daemon = Daemon::start(edge.settings()).await;
    let first = edge.set_desired(json!({"telemetryInterval": 30}));
    edge.wait_ack("telemetryInterval", first).await;
    let before = edge.generation();

    // Deleted and created again: its connection closed, its old key (and handle) void.
    edge.sim
        .aziot()
        .expect("aziot served")
        .recreate_module()
        .expect("module re-created");
    assert_ne!(edge.generation(), before, "a new generation");
    edge.wait_connected().await;
    // The new twin's versions start again at 1 (its desired $version may equal the old
    // twin's; the agent tells them apart by the reported $version going back: twin::apply).
    edge.wait_for("the new twin read", |e| {
        matches!(e, SimEvent::TwinGet { status: 200, .. })
    })
    .await;
    let regenerated = logs.wait_for("module_regenerated").await;
    assert_eq!(
        regenerated.fields.get("generation"),
        Some(&edge.generation())
    );

    let again = edge.set_desired(json!({"telemetryInterval": 31}));
    edge.wait_ack("telemetryInterval", again).await;
    assert_eq!(
        logs.count("auth_refused"),
        0,
        "the new key was used from the first connect after the re-creation"
    );
    daemon.stop().await.expect("clean stop");
    edge.sim.shutdown().await;
}

#[tokio::test]
async fn identityd_refusing_the_principal_while_running_keeps_the_daemon_up_until_it_answers() {
    let mut logs = Logs::capture();
    let mut edge = Edge::start().await;
    let mut daemon = Daemon::start(edge.settings()).await;
    edge.wait_connected().await;
    let aziot = edge.sim.aziot().expect("aziot served").clone();
    let uid = aziot.config().principal_uid;

    // The principal file is gone (say): every connect now fails before the hub.
    aziot.set_principal_uid(uid.wrapping_add(1));
    edge.sim.faults().drop_all_connections();
    let failed = logs.wait_for("aziot_failed").await;
    let error = failed.fields.get("error").cloned().unwrap_or_default();
    assert!(error.contains(PRINCIPAL_FILE), "{error}");
    assert!(!daemon.task.is_finished(), "the daemon keeps running");

    aziot.set_principal_uid(uid);
    edge.wait_connected().await;
    let version = edge.set_desired(json!({"telemetryInterval": 77}));
    edge.wait_ack("telemetryInterval", version).await;
    daemon
        .wait_state("the patch in force", |s| {
            s.integer("telemetryInterval") == Some(77)
        })
        .await;
    daemon.stop().await.expect("clean stop");
    edge.sim.shutdown().await;
}

#[tokio::test]
async fn without_a_module_principal_the_daemon_exits_77_naming_the_principal_file() {
    let edge = Edge::start().await;
    let aziot = edge.sim.aziot().expect("aziot served");
    aziot.set_principal_uid(aziot.config().principal_uid.wrapping_add(1));

    let e = run_fails(edge.settings()).await;
    assert!(
        matches!(
            &e,
            AppError::Aziot(AziotError::NotPrincipal { status: 401, .. })
        ),
        "{e:?}"
    );
    assert_eq!(exit_code(&e), 77);
    assert!(e.to_string().contains(PRINCIPAL_FILE), "{e}");
    assert!(e.to_string().contains("idtype"), "{e}");
    edge.sim.shutdown().await;
}

#[tokio::test]
async fn missing_sockets_are_a_configuration_error_naming_them_and_iot_edge() {
    let edge = Edge::start().await;
    let nowhere = edge.sim_dir.path().join("no-aziot-here");
    let settings = edge.settings_in(&nowhere);

    // check-config's own check, and run: the same problem, exit 78.
    let checked = settings.check_credentials().expect_err("sockets missing");
    let e = run_fails(settings).await;
    assert_eq!(exit_code(&e), 78, "{e}");
    let message = e.to_string();
    assert_eq!(message, checked.to_string());
    for needed in [
        "aziot.identityd_socket",
        "aziot.keyd_socket",
        "IoT Edge",
        &nowhere.join("identityd.sock").display().to_string(),
    ] {
        assert!(message.contains(needed), "{needed} not in: {message}");
    }
    edge.sim.shutdown().await;
}

async fn edgetwin_provision(config: &Path) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg("provision")
        .arg("--config")
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, child)
        .await
        .expect("`edgetwin provision` exits")
        .expect("edgetwin runs")
}

#[tokio::test]
async fn provision_checks_the_identity_service_and_names_the_principal_file_when_refused() {
    let edge = Edge::start().await;
    let config = edge.sim_dir.path().join("edgetwin.toml");
    let _ = edge.settings(); // writes the file
    let out = edgetwin_provision(&config).await;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains(&format!("device: {DEVICE}")), "{printed}");
    assert!(
        printed.contains(&format!("module: {MODULE} (generation ")),
        "{printed}"
    );
    assert!(!printed.contains("sim-"), "no key handle shown: {printed}");

    let aziot = edge.sim.aziot().expect("aziot served");
    aziot.set_principal_uid(aziot.config().principal_uid.wrapping_add(1));
    let out = edgetwin_provision(&config).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{said}");
    assert!(said.contains(PRINCIPAL_FILE), "{said}");
    edge.sim.shutdown().await;
}

/// A fake identityd: every connection gets `answer` whatever it asked, then is closed.
fn scripted_identityd(dir: &Path, answer: Vec<u8>) -> PathBuf {
    let path = dir.join("identityd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bound");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            // The whole request (a GET: headers only) first, so the answer is not cut
            // off by a reset; what it asked does not matter.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match std::io::Read::read(&mut stream, &mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            let _ = stream.write_all(&answer);
        }
    });
    // keyd must exist too, for the check before the first request.
    std::os::unix::net::UnixListener::bind(dir.join("keyd.sock")).expect("bound");
    path
}

fn http_answer(status: &str, body: &[u8]) -> Vec<u8> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    text.extend_from_slice(body);
    text
}

#[tokio::test]
async fn a_malformed_identity_answer_is_an_error_and_never_a_crash() {
    let edge = Edge::start().await;
    let fake = tempfile::tempdir().expect("tempdir");
    scripted_identityd(
        fake.path(),
        http_answer("200 OK", br#"{"type":"aziot","spec":"#),
    );

    let e = run_fails(edge.settings_in(fake.path())).await;
    assert!(
        matches!(&e, AppError::Aziot(AziotError::Malformed { .. })),
        "{e:?}"
    );
    assert_eq!(exit_code(&e), 69, "may pass: systemd restarts the unit");
    edge.sim.shutdown().await;
}

#[tokio::test]
async fn oversized_garbage_and_silent_services_are_errors_of_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big");
    std::fs::create_dir(&big).unwrap();
    let huge = vec![b'x'; 200 * 1024];
    let socket = scripted_identityd(&big, http_answer("200 OK", &huge));
    let e = AziotClient::new(&socket, big.join("keyd.sock"))
        .identity()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AziotError::Malformed { reason, .. } if reason.contains("longer than")),
        "{e:?}"
    );

    let garbage = dir.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    let socket = scripted_identityd(&garbage, b"SSH-2.0-OpenSSH\r\n\r\n".to_vec());
    let e = AziotClient::new(&socket, garbage.join("keyd.sock"))
        .identity()
        .await
        .unwrap_err();
    assert!(matches!(&e, AziotError::Malformed { .. }), "{e:?}");

    // Accepts (the kernel does, from the backlog) and never answers.
    let silent = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).expect("bound");
    let e = AziotClient::new(&silent, &silent)
        .with_timeout(Duration::from_millis(300))
        .identity()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AziotError::Unavailable { reason, .. } if reason.contains("no answer")),
        "{e:?}"
    );
}
