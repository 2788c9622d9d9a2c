//! First boot of `edgetwin run` (a real process under a fake service manager) with
//! `[provisioning] method = "service"` and no module credential: READY as soon as the
//! local state is in force with STATUS saying it is provisioning, provisioning retried
//! while the hub is unreachable, `module.connstr` written (0600), then connected and
//! applying desired patches. A second boot no longer needs the service credential. A
//! policy without registry write rights keeps the daemon up with STATUS and a log saying
//! why, trying again after the (here shortened) refused backoff, and it provisions once
//! the secret is fixed. With `method = "device"` (in-process, `app::run_with`): the
//! module keyed from the device key, connected, patches acked, a later boot without the
//! device key; a wrong device key is retried the same way until fixed.

mod daemon_support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use daemon_support::logs::Logs;
use daemon_support::notify::Notifications;
use daemon_support::{DEVICE, MODULE, WAIT};
use edgetwin::identity::{ModuleCredentials, ServiceCredentials, SharedKey};
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::process::Child;
use tokio::sync::broadcast;

/// The daemon's configuration: provisioning on, the service credential in `service_file`,
/// no module credential configured (it goes to `<state>/module.connstr`).
fn write_config(work: &Path, mqtt: SocketAddr, ca: &Path, service_file: &Path) -> PathBuf {
    let config = work.join("edgetwin.toml");
    let text = format!(
        "[hub]\ngateway_host = \"127.0.0.1:{port}\"\nca_file = {ca:?}\n\
         backoff = {{ initial = \"100ms\", max = \"500ms\" }}\n\
         refused_backoff = {{ initial = \"200ms\", max = \"500ms\" }}\n\n\
         [provisioning]\nmethod = \"service\"\nservice_connection_string_file = {svc:?}\n\
         device_id = \"{DEVICE}\"\nmodule_id = \"{MODULE}\"\n\n\
         [state]\ndir = {state:?}\n\n[log]\nlevel = \"debug\"\nformat = \"text\"\n",
        port = mqtt.port(),
        svc = service_file,
        state = work.join("state"),
    );
    std::fs::write(&config, text).expect("config written");
    config
}

/// `edgetwin run --config CONFIG`, stderr collected; `notify` is the NOTIFY_SOCKET.
fn spawn_daemon(config: &Path, notify: Option<&Path>) -> (Child, tokio::task::JoinHandle<String>) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"));
    for (name, _) in std::env::vars() {
        if name.starts_with("EDGETWIN_")
            || name == "CREDENTIALS_DIRECTORY"
            || name == "NOTIFY_SOCKET"
            || name.starts_with("WATCHDOG_")
            || name == "JOURNAL_STREAM"
        {
            cmd.env_remove(name);
        }
    }
    if let Some(socket) = notify {
        cmd.env("NOTIFY_SOCKET", socket)
            .env("WATCHDOG_USEC", "2000000");
    }
    let mut child = cmd
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs");
    let mut stderr = child.stderr.take().expect("stderr");
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    (child, log)
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running");
    // The shell's builtin, so no procps package is needed.
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// SIGTERM, then the exit code and the log.
async fn stop(mut child: Child, log: tokio::task::JoinHandle<String>) -> (i32, String) {
    signal(&child, "TERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    (status.code().expect("exit code"), log.await.expect("log"))
}

async fn wait_event(
    events: &mut broadcast::Receiver<SimEvent>,
    what: &str,
    want: impl FnMut(&SimEvent) -> bool,
) -> SimEvent {
    edgetwin_sim::wait_for(events, WAIT, want)
        .await
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

fn assert_no_secrets(log: &str, secrets: &[&str]) {
    for secret in secrets
        .iter()
        .chain(&["SharedAccessSignature", "sig=", "SharedAccessKey="])
    {
        assert!(
            !log.contains(secret),
            "log leaks a secret ({secret:.12}…):\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_provisions_once_the_hub_is_reachable_then_applies_patches() {
    // A fresh hub's state (policy keys, CA), made by starting the emulator once.
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
        .await
        .expect("sim starts");
    let policy: ServiceCredentials = sim
        .service_connection_string("registryReadWrite")
        .expect("registryReadWrite policy")
        .parse()
        .unwrap();
    let ca = sim.ca_path();
    sim.shutdown().await;

    // The ports the hub will have, held by this test until it comes up: MQTT never
    // answers, REST accepts and hangs up at once (counted). The hub is unreachable.
    let mqtt_hold = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let rest_hold = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (mqtt, https) = (
        mqtt_hold.local_addr().unwrap(),
        rest_hold.local_addr().unwrap(),
    );
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let unreachable = tokio::spawn(async move {
        let _mqtt_hold = mqtt_hold;
        while let Ok((tcp, _)) = rest_hold.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    let service_connstr = format!(
        "HostName=localhost:{};SharedAccessKeyName={};SharedAccessKey={}",
        https.port(),
        policy.policy_name,
        policy.key.as_base64()
    );

    let work = tempfile::tempdir().expect("tempdir");
    let service_file = work.path().join("service.connstr");
    std::fs::write(&service_file, &service_connstr).expect("service credential written");
    let config = write_config(work.path(), mqtt, &ca, &service_file);
    let credential = work.path().join("state").join("module.connstr");

    let mut notes = Notifications::bind();
    let sock_path = notes.path().to_path_buf();
    let (child, log) = spawn_daemon(&config, Some(&sock_path));

    // READY once the local state is in force, before any network I/O succeeded.
    let ready = notes.expect("READY=1").await;
    assert!(
        ready.contains(&format!("STATUS=provisioning {DEVICE}/{MODULE}")),
        "{ready}"
    );
    tokio::time::timeout(WAIT, async {
        while attempts.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("provisioning keeps trying while the hub is unreachable");
    notes.expect("WATCHDOG=1").await;
    assert!(!credential.exists(), "nothing written before success");
    // Reloads while provisioning are answered (READY=1 after RELOADING=1) and never
    // block the signal handler, however many arrive.
    for _ in 0..3 {
        signal(&child, "HUP");
        notes.expect("RELOADING=1").await;
        let ready = notes.expect("READY=1").await;
        assert!(ready.contains("STATUS=provisioning"), "{ready}");
    }

    // The hub comes up on the same ports.
    unreachable.abort();
    let _ = unreachable.await;
    let sim = Sim::start(SimConfig {
        mqtt_addr: mqtt,
        https_addr: https,
        ..SimConfig::ephemeral(sim_dir.path())
    })
    .await
    .expect("sim starts on the same ports");
    let mut events = sim.hub().events();

    let connected = notes.expect("STATUS=connected to").await;
    assert!(
        connected.contains(&format!("localhost as {DEVICE}/{MODULE}")),
        "{connected}"
    );
    let written = std::fs::read_to_string(&credential).expect("module.connstr written");
    assert_eq!(
        std::fs::metadata(&credential).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        sim.hub()
            .module_connection_string(DEVICE, MODULE)
            .as_deref(),
        Some(written.trim())
    );

    let twin = sim
        .hub()
        .write_module_twin(
            DEVICE,
            MODULE,
            TwinWrite::Patch,
            &json!({"properties": {"desired": {"telemetryInterval": 122}}}),
            None,
        )
        .expect("desired patched");
    let version = twin["properties"]["desired"]["$version"].as_u64().unwrap();
    let ack = wait_event(&mut events, "the ack of telemetryInterval", |e| {
        matches!(e, SimEvent::ReportedPatched { patch, .. }
            if patch["telemetryInterval"]["av"] == json!(version))
    })
    .await;
    let SimEvent::ReportedPatched { patch, .. } = ack else {
        unreachable!()
    };
    assert_eq!(patch["telemetryInterval"]["value"], 122);
    assert_eq!(patch["telemetryInterval"]["ac"], 200);

    let (code, log) = stop(child, log).await;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("retrying"), "{log}");
    assert!(log.contains("reload_deferred"), "{log}");
    assert!(log.contains("module identity provisioned"), "{log}");
    let service: ServiceCredentials = service_connstr.parse().unwrap();
    let module: ModuleCredentials = written.trim().parse().unwrap();
    assert_no_secrets(&log, &[service.key.as_base64(), module.key.as_base64()]);

    // Second boot: the service credential is gone and not needed any more.
    std::fs::remove_file(&service_file).expect("service credential removed");
    let (child, log) = spawn_daemon(&config, None);
    wait_event(&mut events, "the second boot's connect", |e| {
        matches!(e, SimEvent::Connected { .. })
    })
    .await;
    let (code, log) = stop(child, log).await;
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("edgetwin_event=\"provisioning\""), "{log}");
    // Starts, and says the secret is gone but not needed.
    assert!(
        log.contains("config_warning") && log.contains("not needed"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&credential).unwrap(), written);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_with_a_read_only_policy_stays_up_and_provisions_once_the_secret_is_fixed() {
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
        .await
        .expect("sim starts");
    let mut events = sim.hub().events();
    let work = tempfile::tempdir().expect("tempdir");
    let service_file = work.path().join("service.connstr");
    let read_only = sim
        .service_connection_string("registryRead")
        .expect("registryRead policy");
    std::fs::write(&service_file, &read_only).unwrap();
    let config = write_config(work.path(), sim.mqtt_addr(), &sim.ca_path(), &service_file);

    let mut notes = Notifications::bind();
    let (child, log) = spawn_daemon(&config, Some(notes.path()));
    notes.expect("READY=1").await;
    let refused = notes.expect("STATUS=provisioning refused by the hub").await;
    assert!(refused.contains("fix the provisioning secret"), "{refused}");
    assert!(sim.hub().get_device(DEVICE).is_err(), "nothing created");

    // The operator fixes the secret; the next attempt reads it anew.
    let writer = sim
        .service_connection_string("registryReadWrite")
        .expect("registryReadWrite policy");
    std::fs::write(&service_file, &writer).unwrap();
    wait_event(&mut events, "the connect after provisioning", |e| {
        matches!(e, SimEvent::Connected { .. })
    })
    .await;
    let (code, log) = stop(child, log).await;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("provision_refused"),
        "the event is named: {log}"
    );
    assert!(
        log.contains("registryReadWrite"),
        "says what is needed: {log}"
    );
    assert!(log.contains("module identity provisioned"), "{log}");
    let old: ServiceCredentials = read_only.parse().unwrap();
    let new: ServiceCredentials = writer.parse().unwrap();
    assert_no_secrets(&log, &[old.key.as_base64(), new.key.as_base64()]);
    sim.shutdown().await;
}

/// The daemon's configuration for `method = "device"` with `device_file`, no module
/// credential (it goes to `<work>/state/module.connstr`).
fn device_settings(work: &Path, sim: &Sim, device_file: &Path) -> edgetwin::config::Settings {
    let config = work.join("edgetwin.toml");
    let text = format!(
        "[hub]\ngateway_host = \"127.0.0.1:{port}\"\nca_file = {ca:?}\n\
         backoff = {{ initial = \"100ms\", max = \"500ms\" }}\n\
         refused_backoff = {{ initial = \"200ms\", max = \"500ms\" }}\n\n\
         [provisioning]\nmethod = \"device\"\ndevice_connection_string_file = {device_file:?}\n\n\
         [state]\ndir = {state:?}\n",
        port = sim.mqtt_addr().port(),
        ca = sim.ca_path(),
        state = work.join("state"),
    );
    std::fs::write(&config, text).expect("config written");
    edgetwin::config::Settings::load(Some(&config)).expect("valid config")
}

/// Creates `DEVICE` through the service API and writes its connection string (with the
/// REST port, as for the emulator) to `<work>/device.connstr`, signed with `key` if given.
fn device_file(work: &Path, sim: &Sim, key: Option<&SharedKey>) -> (PathBuf, SharedKey) {
    let doc = sim
        .hub()
        .put_device(DEVICE, &json!({}), None)
        .expect("device created");
    let hub_key = doc["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = key
        .cloned()
        .unwrap_or_else(|| SharedKey::from_base64(&hub_key).unwrap());
    let path = work.join("device.connstr");
    let text = format!(
        "HostName={};DeviceId={DEVICE};SharedAccessKey={}\n",
        sim.rest_authority(),
        key.as_base64()
    );
    std::fs::write(&path, text).expect("device credential written");
    (path, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_with_a_device_key_provisions_connects_and_later_needs_the_key_no_more() {
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
        .await
        .expect("sim starts");
    let mut events = sim.hub().events();
    let work = tempfile::tempdir().expect("tempdir");
    let (device_path, device_key) = device_file(work.path(), &sim, None);
    let settings = device_settings(work.path(), &sim, &device_path);
    assert!(settings.warnings.is_empty(), "{:?}", settings.warnings);

    let daemon = daemon_support::Daemon::start(settings).await;
    wait_event(&mut events, "the provisioned module's connect", |e| {
        matches!(e, SimEvent::Connected { module, .. }
            if module.device_id == DEVICE && module.module_id == MODULE)
    })
    .await;
    let credential = work.path().join("state").join("module.connstr");
    let written: ModuleCredentials = std::fs::read_to_string(&credential)
        .expect("module.connstr written")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        std::fs::metadata(&credential).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let module = sim
        .hub()
        .get_module(DEVICE, MODULE)
        .expect("module created");
    let generation = module["generationId"].as_str().unwrap();
    let (primary, _) = edgetwin::provision::module_keys(&device_key, MODULE, generation);
    assert_eq!(written.key, primary, "keys derived from the device key");

    let twin = sim
        .hub()
        .write_module_twin(
            DEVICE,
            MODULE,
            TwinWrite::Patch,
            &json!({"properties": {"desired": {"telemetryInterval": 33}}}),
            None,
        )
        .expect("desired patched");
    let version = twin["properties"]["desired"]["$version"].as_u64().unwrap();
    wait_event(&mut events, "the ack", |e| {
        matches!(e, SimEvent::ReportedPatched { patch, .. }
            if patch["telemetryInterval"]["av"] == json!(version))
    })
    .await;
    daemon.stop().await.expect("clean stop");

    // The device credential is gone after first boot: a warning, and the daemon starts.
    std::fs::remove_file(&device_path).expect("device credential removed");
    let settings = device_settings(work.path(), &sim, &device_path);
    let warnings: Vec<String> = settings.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("provisioning.device_connection_string_file")
            && warnings[0].contains("not needed"),
        "{warnings:?}"
    );
    let daemon = daemon_support::Daemon::start(settings).await;
    wait_event(&mut events, "the second boot's connect", |e| {
        matches!(e, SimEvent::Connected { .. })
    })
    .await;
    daemon.stop().await.expect("clean stop");
    sim.shutdown().await;
}

// Current-thread: the daemon's log events are captured on the test's thread.
#[tokio::test]
async fn first_boot_with_a_wrong_device_key_waits_and_provisions_once_the_key_is_fixed() {
    let mut logs = Logs::capture();
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
        .await
        .expect("sim starts");
    let mut events = sim.hub().events();
    let work = tempfile::tempdir().expect("tempdir");
    let wrong = SharedKey::generate();
    let (device_path, _) = device_file(work.path(), &sim, Some(&wrong));
    let settings = device_settings(work.path(), &sim, &device_path);
    // Not `Daemon::start`: that waits for the session, which comes after provisioning.
    let stop = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(edgetwin::app::run_with(
        settings,
        stop.clone(),
        edgetwin::app::RunControl::default(),
    ));
    let refused = logs.wait_for("provision_refused").await;
    let error = &refused.fields["error"];
    assert!(error.contains("device gw1"), "{error}");
    assert!(!error.contains(wrong.as_base64()), "{error}");
    assert!(
        sim.hub().get_module(DEVICE, MODULE).is_err(),
        "nothing created"
    );
    // The right key goes into the file; the next attempt reads it.
    let hub_key = sim.hub().get_device(DEVICE).expect("device")["authentication"]["symmetricKey"]
        ["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let fixed = std::fs::read_to_string(&device_path)
        .unwrap()
        .replace(wrong.as_base64(), &hub_key);
    std::fs::write(&device_path, fixed).unwrap();
    wait_event(&mut events, "the connect after provisioning", |e| {
        matches!(e, SimEvent::Connected { .. })
    })
    .await;
    assert!(work.path().join("state").join("module.connstr").exists());
    stop.cancel();
    tokio::time::timeout(WAIT, daemon)
        .await
        .expect("stops in time")
        .expect("no panic")
        .expect("clean stop");
    sim.shutdown().await;
}

// Current-thread: the daemon's log events are captured on the test's thread.
#[tokio::test]
async fn a_module_deleted_in_the_hub_is_provisioned_again_after_repeated_refusals() {
    let mut logs = Logs::capture();
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = Sim::start(SimConfig::ephemeral(sim_dir.path()))
        .await
        .expect("sim starts");
    let work = tempfile::tempdir().expect("tempdir");
    let (device_path, _) = device_file(work.path(), &sim, None);
    let settings = device_settings(work.path(), &sim, &device_path);
    let daemon = daemon_support::Daemon::start(settings).await;
    let first = sim
        .hub()
        .get_module(DEVICE, MODULE)
        .expect("module created")["generationId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Someone deletes the module; its connection goes with it.
    sim.hub()
        .delete_module(DEVICE, MODULE, Some("*"))
        .expect("module deleted");
    sim.hub().drop_all_connections();
    // From here on: no connect of this module can succeed until it is provisioned again.
    let mut events = sim.hub().events();
    let again = logs.wait_for("reprovisioning").await;
    assert!(
        again.int("attempts") >= Some(3),
        "only after repeated refusals: {again:?}"
    );
    logs.wait_for("reprovisioned").await;
    wait_event(
        &mut events,
        "the connect with the new identity",
        |e| matches!(e, SimEvent::Connected { module, .. } if module.module_id == MODULE),
    )
    .await;
    let second = sim
        .hub()
        .get_module(DEVICE, MODULE)
        .expect("module re-created")["generationId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(first, second, "a new module, with keys derived anew");
    daemon.stop().await.expect("clean stop");
    sim.shutdown().await;
}
