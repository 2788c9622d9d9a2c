//! `edgetwin run` as a real process under a fake service manager: sd_notify READY,
//! STATUS, WATCHDOG, RELOADING and STOPPING arrive on `NOTIFY_SOCKET`; SIGHUP with a good
//! and a bad configuration keeps it running; SIGTERM exits 0 with the state flushed; and
//! not one line of its trace-level log holds the key, a SAS token or the connection
//! string.

mod daemon_support;

use std::path::Path;
use std::process::Stdio;

use daemon_support::notify::Notifications;
use daemon_support::{Env, WAIT};
use serde_json::json;
use tokio::io::AsyncReadExt;

fn signal(pid: u32, name: &str) {
    // The shell's builtin, so no procps package is needed.
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn write_config(path: &Path, base: &str, extra: &str) {
    std::fs::write(path, format!("{base}\n{extra}\n")).expect("config written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_signals_and_clean_logs() {
    let mut env = Env::start().await;
    let config = env.sim_dir.path().join("edgetwin.toml");
    env.settings("[log]\nlevel = \"trace\"\nformat = \"text\"");
    let base = std::fs::read_to_string(&config).expect("config");
    let version = env.set_desired(json!({"telemetryInterval": 40}));

    let mut notes = Notifications::bind();
    let sock_path = notes.path().to_path_buf();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env_remove("EDGETWIN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs");
    let pid = child.id().expect("pid");
    let mut stderr = child.stderr.take().expect("stderr");
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let ready = notes.expect("READY=1").await;
    assert!(ready.contains("STATUS="), "READY carries a status: {ready}");
    env.wait_ack("telemetryInterval", version).await;
    notes.expect("STATUS=connected to").await;
    notes.expect("WATCHDOG=1").await;

    write_config(
        &config,
        &base,
        "[twin.properties.fan]\ntype = \"integer\"\ndefault = 1\n",
    );
    signal(pid, "HUP");
    notes.expect("RELOADING=1").await;
    notes.expect("READY=1").await;

    write_config(&config, &base, "bogus_key = 1\n");
    signal(pid, "HUP");
    notes.expect("RELOADING=1").await;
    notes.expect("READY=1").await;
    notes.expect("WATCHDOG=1").await;

    signal(pid, "TERM");
    notes.expect("STOPPING=1").await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let state = env.state_file();
    assert_eq!(state["properties"]["telemetryInterval"], json!(40));
    assert_eq!(state["properties"]["fan"], json!(1), "good reload applied");

    let log = log.await.expect("log collected");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level was on"
    );
    let creds: edgetwin::identity::ModuleCredentials =
        env.connection_string.parse().expect("connection string");
    for secret in [
        creds.key.as_base64(),
        env.connection_string.as_str(),
        "SharedAccessSignature",
        "sig=",
        "SharedAccessKey",
    ] {
        assert!(!log.contains(secret), "log leaks a secret ({secret:.12}…)");
    }
}

/// PID 1 stalled: a `NOTIFY_SOCKET` whose reader never reads fills up after a few
/// messages. The daemon must still apply and acknowledge patches and stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_nobody_reads_blocks_neither_acks_nor_sigterm() {
    let mut env = Env::start().await;
    let config = env.sim_dir.path().join("edgetwin.toml");
    env.settings("[log]\nformat = \"text\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let _stalled_manager = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    // Full before the daemon starts: every notification it sends finds no room.
    let filler = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    filler.set_nonblocking(true).expect("non-blocking");
    let mut queued = 0;
    loop {
        match filler.send_to(b"STATUS=filler\n", &sock_path) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the notify socket: {e}"),
        }
    }
    assert!(queued > 0, "the notify socket took nothing");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "20000")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs");
    let pid = child.id().expect("pid");

    env.wait_connected().await;
    for interval in [41, 42, 43] {
        let version = env.set_desired(json!({ "telemetryInterval": interval }));
        env.wait_ack("telemetryInterval", version).await;
    }
    signal(pid, "TERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("SIGTERM honoured while the notify socket is full")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        env.state_file()["properties"]["telemetryInterval"],
        json!(43)
    );
}
