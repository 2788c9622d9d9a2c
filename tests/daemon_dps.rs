//! First boot with `[provisioning] method = "dps"` against the emulator's DPS: the
//! gateway registers with the enrollment group's key (its device key derived from it),
//! records the assignment in `provisioning.json` (no key in it), provisions its module
//! with the device key, connects and acks a patch. A later first boot (module.connstr
//! gone) uses the record and does not register again. A wrong group key keeps the daemon
//! up (`provision_refused`, naming the registration id, never the key), and
//! `edgetwin provision` with it exits 77.

mod daemon_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use daemon_support::logs::Logs;
use daemon_support::{MODULE, WAIT};
use edgetwin::identity::SharedKey;
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use serde_json::json;

const REGISTRATION: &str = "gw-dps-1";

/// What the emulator wrote for gateways: endpoint, scope, group key.
fn sim_file(sim: &Sim, name: &str) -> String {
    std::fs::read_to_string(sim.state_dir().join("dps").join(name))
        .expect("emulator DPS file")
        .trim()
        .to_owned()
}

/// The configuration for `method = "dps"` with the group key in `<work>/dps-group.key`.
fn dps_config(work: &Path, sim: &Sim, group_key: &str) -> PathBuf {
    let key_file = work.join("dps-group.key");
    std::fs::write(&key_file, format!("{group_key}\n")).expect("key written");
    let config = work.join("edgetwin.toml");
    let text = format!(
        "[hub]\ngateway_host = \"127.0.0.1:{port}\"\nca_file = {ca:?}\n\
         backoff = {{ initial = \"100ms\", max = \"500ms\" }}\n\
         refused_backoff = {{ initial = \"200ms\", max = \"500ms\" }}\n\n\
         [provisioning]\nmethod = \"dps\"\nregistry_endpoint = \"{rest}\"\n\n\
         [provisioning.dps]\nglobal_endpoint = \"{endpoint}\"\nid_scope = \"{scope}\"\n\
         registration_id = \"{REGISTRATION}\"\ngroup_key_file = {key_file:?}\n\n\
         [state]\ndir = {state:?}\n",
        port = sim.mqtt_addr().port(),
        ca = sim.ca_path(),
        rest = sim.rest_authority(),
        endpoint = sim_file(sim, "endpoint"),
        scope = sim_file(sim, "id_scope"),
        state = work.join("state"),
    );
    std::fs::write(&config, text).expect("config written");
    config
}

fn settings(config: &Path) -> edgetwin::config::Settings {
    edgetwin::config::Settings::load(Some(config)).expect("valid config")
}

async fn start_sim(dir: &Path) -> Sim {
    let sim = Sim::start(SimConfig::ephemeral(dir))
        .await
        .expect("sim starts");
    sim.dps().set_retry_after(0);
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_registers_with_dps_provisions_and_a_later_boot_uses_the_record() {
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = start_sim(sim_dir.path()).await;
    let mut events = sim.hub().events();
    let work = tempfile::tempdir().expect("tempdir");
    let group_key = sim_file(&sim, "group.key");
    let config = dps_config(work.path(), &sim, &group_key);

    let daemon = daemon_support::Daemon::start(settings(&config)).await;
    let connected = edgetwin_sim::wait_for(
        &mut events,
        WAIT,
        |e| matches!(e, SimEvent::Connected { module, .. } if module.module_id == MODULE),
    )
    .await
    .expect("the provisioned module connects");
    let SimEvent::Connected { module, .. } = connected else {
        unreachable!()
    };
    let device = module.device_id.clone();
    let twin = sim
        .hub()
        .write_module_twin(
            &device,
            MODULE,
            TwinWrite::Patch,
            &json!({"properties": {"desired": {"telemetryInterval": 41}}}),
            None,
        )
        .expect("desired patched");
    let version = twin["properties"]["desired"]["$version"].as_u64().unwrap();
    edgetwin_sim::wait_for(&mut events, WAIT, |e| {
        matches!(e, SimEvent::ReportedPatched { patch, .. }
            if patch["telemetryInterval"]["av"] == json!(version))
    })
    .await
    .expect("the patch is acked");
    daemon.stop().await.expect("clean stop");

    let state = work.path().join("state");
    let record = std::fs::read_to_string(state.join("provisioning.json")).expect("record");
    let parsed: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(parsed["registration_id"], json!(REGISTRATION));
    assert_eq!(parsed["device_id"], json!(device));
    let device_key = edgetwin::provision::dps::derive_device_key(
        &SharedKey::from_base64(&group_key).unwrap(),
        REGISTRATION,
    );
    for secret in [group_key.as_str(), device_key.as_base64()] {
        assert!(!record.contains(secret), "provisioning.json holds a key");
    }
    let registered = sim.dps().calls().len();
    assert!(registered > 0, "DPS was called");

    // A later first boot (the module credential lost): the record, not DPS.
    std::fs::remove_file(state.join("module.connstr")).expect("module credential removed");
    let daemon = daemon_support::Daemon::start(settings(&config)).await;
    edgetwin_sim::wait_for(&mut events, WAIT, |e| {
        matches!(e, SimEvent::Connected { .. })
    })
    .await
    .expect("the second boot connects");
    daemon.stop().await.expect("clean stop");
    assert!(state.join("module.connstr").exists());
    assert_eq!(
        sim.dps().calls().len(),
        registered,
        "no second registration"
    );
    sim.shutdown().await;
}

// Current-thread: the daemon's log events are captured on the test's thread.
#[tokio::test]
async fn first_boot_with_a_wrong_group_key_stays_up_and_names_the_registration() {
    let mut logs = Logs::capture();
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = start_sim(sim_dir.path()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let wrong = SharedKey::generate();
    let config = dps_config(work.path(), &sim, wrong.as_base64());
    let stop = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(edgetwin::app::run_with(
        settings(&config),
        stop.clone(),
        edgetwin::app::RunControl::default(),
    ));
    let refused = logs.wait_for("provision_refused").await;
    let error = &refused.fields["error"];
    assert!(error.contains(REGISTRATION), "{error}");
    assert!(!error.contains(wrong.as_base64()), "{error}");
    // Still up: a second refusal after the (short) refused backoff.
    logs.wait_nth("provision_refused", 2).await;
    assert!(!daemon.is_finished(), "the daemon stays up");
    assert!(!work.path().join("state").join("provisioning.json").exists());
    stop.cancel();
    tokio::time::timeout(WAIT, daemon)
        .await
        .expect("stops in time")
        .expect("no panic")
        .expect("clean stop");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_with_a_wrong_group_key_exits_77_naming_the_registration() {
    let sim_dir = tempfile::tempdir().expect("tempdir");
    let sim = start_sim(sim_dir.path()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let wrong = SharedKey::generate();
    let config = dps_config(work.path(), &sim, wrong.as_base64());
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"));
    for (name, _) in std::env::vars() {
        if name.starts_with("EDGETWIN_") || name == "CREDENTIALS_DIRECTORY" {
            cmd.env_remove(name);
        }
    }
    let out = tokio::time::timeout(
        WAIT,
        cmd.arg("provision")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("provision ends in time")
    .expect("provision runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains(REGISTRATION), "{stderr}");
    assert!(!stderr.contains(wrong.as_base64()), "{stderr}");
    assert!(!work.path().join("state").join("module.connstr").exists());
    sim.shutdown().await;
}
