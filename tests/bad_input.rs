//! The bad-input catalogue (DESIGN §7), rows not already covered elsewhere: each test
//! asserts the exact answer — exit code, the key or field named, the ack code, the state
//! left untouched. docs/RELIABILITY.md maps every row to its tests.

mod daemon_support;
#[path = "faults/harness.rs"]
mod harness;

use std::path::Path;
use std::process::Output;

use daemon_support::{Daemon, Env, WAIT};
use edgetwin_sim::SimEvent;
use serde_json::{json, Value};

// ---- row 1: desired patch not JSON, not an object, too deep, too big -------------------

fn deep(levels: usize, version: u64) -> Vec<u8> {
    let mut doc = json!(1);
    for _ in 0..levels {
        doc = json!({ "a": doc });
    }
    doc["$version"] = json!(version);
    doc.to_string().into_bytes()
}

#[tokio::test]
async fn malformed_desired_patches_are_logged_ignored_and_resynced() {
    harness::capture_logs();
    let mut env = Env::start().await;
    let mut daemon = Daemon::start(env.settings("")).await;
    env.wait_twin_get().await;
    let v = env.set_desired(json!({"telemetryInterval": 30, "mode": "a"}));
    env.wait_ack("mode", v).await;
    let before = env.state_file();
    let next = v + 1;
    let big = json!({"blob": "x".repeat(40 * 1024), "$version": next})
        .to_string()
        .into_bytes();
    let cases: [(&str, Vec<u8>); 4] = [
        ("not JSON", b"{\"mode\": \"b\", ".to_vec()),
        ("not an object", format!("[\"mode\", {next}]").into_bytes()),
        ("too deep", deep(12, next)),
        ("too big", big),
    ];
    for (what, payload) in cases {
        let logged = harness::logged("patch_malformed");
        assert!(
            env.sim()
                .faults()
                .send_raw_desired(&Env::key(), Some(next), &payload),
            "{what}: sent"
        );
        // Full GET to resync.
        env.wait_for(&format!("{what}: resync GET"), |e| {
            matches!(e, SimEvent::TwinGet { status: 200, .. })
        })
        .await;
        daemon
            .wait_state("resynced", |s| s.desired_version == Some(v))
            .await;
        assert_eq!(
            harness::logged("patch_malformed"),
            logged + 1,
            "{what}: logged"
        );
        let state = daemon.view.state.borrow().clone();
        assert_eq!(state.properties.get("mode"), Some(&json!("a")), "{what}");
        assert_eq!(state.integer("telemetryInterval"), Some(30), "{what}");
        let file = env.state_file();
        assert_eq!(
            file["properties"], before["properties"],
            "{what}: untouched"
        );
        assert_eq!(file["desired_version"], json!(v), "{what}: untouched");
    }
    // Nothing was wedged: the next real patch is applied and acknowledged.
    let good = env.set_desired(json!({"mode": "c"}));
    assert_eq!(env.wait_ack("mode", good).await["ac"], json!(200));
    daemon.stop().await.expect("clean stop");
}

// ---- row 2: desired value of the wrong type ------------------------------------------

#[tokio::test]
async fn wrong_type_is_acknowledged_400_naming_the_type_and_the_old_value_stays() {
    let mut env = Env::start().await;
    let daemon = Daemon::start(
        env.settings("[twin.properties.enabled]\ntype = \"boolean\"\ndefault = true\n"),
    )
    .await;
    env.wait_twin_get().await;
    let good = env.set_desired(json!({"telemetryInterval": 45, "enabled": false}));
    env.wait_ack("enabled", good).await;

    let bad = env.set_desired(json!({"telemetryInterval": "fast", "enabled": 1}));
    let ack = env.wait_ack("telemetryInterval", bad).await;
    assert_eq!(ack["ac"], json!(400));
    assert_eq!(ack["value"], json!(45));
    assert!(
        ack["ad"].as_str().is_some_and(|r| r.contains("integer")),
        "reason names the type: {ack}"
    );
    let reported = env.reported();
    assert_eq!(reported["enabled"]["ac"], json!(400));
    assert_eq!(reported["enabled"]["value"], json!(false));
    assert!(reported["enabled"]["ad"]
        .as_str()
        .is_some_and(|r| r.contains("boolean")));
    let state = env.state_file();
    assert_eq!(state["properties"]["telemetryInterval"], json!(45));
    assert_eq!(state["properties"]["enabled"], json!(false));
    daemon.stop().await.expect("clean stop");
}

// ---- rows 3 and 4: configuration and connection strings, through the binary ------------

async fn run_binary(config: &Path) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("EDGETWIN_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs");
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("exits by itself")
        .expect("output")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A config whose `[hub]` has `hub` and whose state dir is `state`.
fn config_file(dir: &Path, top: &str, hub: &str, state: &Path) -> std::path::PathBuf {
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "{top}\n[hub]\n{hub}\nbackoff = {{ initial = \"50ms\", max = \"300ms\" }}\n\n[state]\ndir = \"{}\"\n",
            state.display()
        ),
    )
    .expect("config written");
    path
}

#[tokio::test]
async fn config_problems_exit_78_naming_every_key_and_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let path = config_file(
        dir.path(),
        "bogus_key = 1",
        "connection_string = \"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==\"\nkeep_alive = \"soon\"\ntransport = 7",
        &state,
    );
    let out = run_binary(&path).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(78), "{all}");
    for key in ["bogus_key", "hub.keep_alive", "hub.transport"] {
        assert!(all.contains(key), "{key} named: {all}");
    }
    assert!(
        all.contains(&path.display().to_string()),
        "file named: {all}"
    );
    assert!(!state.join("state.json").exists(), "nothing written");

    // Missing credentials.
    let path = config_file(dir.path(), "", "", &state);
    let out = run_binary(&path).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(78), "{all}");
    assert!(all.contains("hub.connection_string"), "{all}");
}

#[tokio::test]
async fn malformed_connection_strings_exit_78_naming_the_field_never_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let secret = "c2VjcmV0LWtleS1tYXRlcmlhbC0xMjM0NTY3ODkw";
    let cases = [
        (
            format!("DeviceId=d;ModuleId=m;SharedAccessKey={secret}"),
            "HostName",
        ),
        (
            "HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey=not*base64!secretish".to_owned(),
            "SharedAccessKey",
        ),
        (
            format!("HostName=h;DeviceId=d;ModuleId=m;{secret}"),
            "segment 4",
        ),
        (
            format!("HostName=h;ModuleId=m;SharedAccessKey={secret}"),
            "DeviceId",
        ),
    ];
    for (connstr, field) in cases {
        let path = config_file(
            dir.path(),
            "",
            &format!("connection_string = \"{connstr}\""),
            &state,
        );
        let out = run_binary(&path).await;
        let all = text(&out);
        assert_eq!(out.status.code(), Some(78), "{field}: {all}");
        assert!(all.contains(field), "{field} named: {all}");
        assert!(!all.contains(secret), "key printed: {all}");
        assert!(!all.contains("secretish"), "key printed: {all}");
        assert!(!all.contains(&connstr), "connection string printed: {all}");
    }
}

// ---- row 5: the hub refuses the credentials, through the binary -----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_keep_the_daemon_up_saying_why_until_the_file_is_fixed() {
    use tokio::io::AsyncReadExt as _;

    let env = Env::start().await;
    let mut creds: edgetwin::identity::ModuleCredentials =
        env.connection_string.parse().expect("connection string");
    creds.key = edgetwin::identity::SharedKey::generate();
    let credential = env.sim_dir.path().join("module.connstr");
    std::fs::write(&credential, creds.to_connection_string()).expect("credential written");
    // Short refused backoff for the test (the default waits minutes).
    env.settings_with(
        "refused_backoff = { initial = \"200ms\", max = \"1s\" }",
        "[log]\nformat = \"text\"",
    );
    let path = env.sim_dir.path().join("edgetwin.toml");
    let text_before = std::fs::read_to_string(&path).expect("config");
    let inline = format!("connection_string = \"{}\"", env.connection_string);
    let from_file = format!("connection_string_file = \"{}\"", credential.display());
    assert!(text_before.contains(&inline));
    std::fs::write(&path, text_before.replace(&inline, &from_file)).expect("config written");

    let mut notes = daemon_support::notify::Notifications::bind();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("NOTIFY_SOCKET", notes.path())
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .env_remove("EDGETWIN_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs");
    let mut stderr = child.stderr.take().expect("stderr");
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let status = notes.expect("STATUS=credentials refused by the hub").await;
    assert!(status.contains("CONNACK 5"), "{status}");
    assert!(
        status.contains("fix the credential file or reload"),
        "{status}"
    );
    // Refused again on the next attempts: still up, still saying so.
    let pid = child.id().expect("running");
    assert!(child.try_wait().expect("status").is_none(), "still running");

    std::fs::write(&credential, &env.connection_string).expect("credential fixed");
    notes.expect("STATUS=connected to").await;
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("stops in time")
        .expect("exit status");
    let all = log.await.expect("log collected");
    assert_eq!(exit.code(), Some(0), "{all}");
    assert!(all.contains("not authorized"), "clear log: {all}");
    assert!(
        all.contains("credentials refused by the hub"),
        "clear log: {all}"
    );
    assert!(all.contains("credential_changed"), "{all}");
    assert!(!all.contains(creds.key.as_base64()), "key printed");
    assert!(!all.contains("SharedAccessSignature"), "token printed");
}

// ---- row 8: state file corrupt (foreign, newer schema) ---------------------------------

async fn moved_aside_and_resynced(content: Value) {
    let mut env = Env::start().await;
    let path = env.state_dir.path().join("state.json");
    std::fs::write(&path, content.to_string()).expect("written");
    let version = env.set_desired(json!({"telemetryInterval": 25}));
    let daemon = Daemon::start(env.settings("")).await;
    let state = daemon.view.state.borrow().clone();
    assert_eq!(
        state.desired_version, None,
        "defaults in force, not the file"
    );
    assert_eq!(state.integer("telemetryInterval"), Some(60));
    let aside: Vec<_> = std::fs::read_dir(env.state_dir.path())
        .expect("state dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .map(|e| e.path())
        .collect();
    assert_eq!(aside.len(), 1, "moved aside: {aside:?}");
    let kept: Value =
        serde_json::from_slice(&std::fs::read(&aside[0]).expect("aside")).expect("json");
    assert_eq!(kept, content, "moved aside unchanged");
    env.wait_ack("telemetryInterval", version).await;
    assert_eq!(
        env.state_file()["properties"]["telemetryInterval"],
        json!(25)
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn foreign_state_file_is_moved_aside_and_the_twin_restores_state() {
    moved_aside_and_resynced(json!({
        "schema": 1, "device_id": "other", "module_id": "edgetwin",
        "desired_version": 99, "properties": {"telemetryInterval": 5},
        "reported_version": 3, "updated_at": 0
    }))
    .await;
}

#[tokio::test]
async fn state_file_of_a_newer_schema_is_moved_aside_not_trusted() {
    moved_aside_and_resynced(json!({
        "schema": 99, "device_id": "gw1", "module_id": "edgetwin",
        "desired_version": 99, "properties": {"telemetryInterval": 5},
        "reported_version": 3, "updated_at": 0
    }))
    .await;
}

#[test]
fn command_line_mistakes_exit_64_and_help_exits_0() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
            .args(args)
            .output()
            .expect("run edgetwin")
    };
    for args in [
        &["no-such-command"][..],
        &["run", "--no-such-flag"],
        &["twin", "show", "--device", "d"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says nothing");
    }
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage"));
}
