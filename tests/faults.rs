//! The fault suite (issue 6): the real daemon against the emulator while the hub restarts,
//! connections drop (also between a reported patch and its 204), twin operations are
//! throttled or fail with 500, responses are lost or late, desired notifications are lost,
//! duplicated and reordered, tokens expire and the hub's clock is ±10 minutes off, the daemon is
//! SIGKILLed, and its state directory becomes unusable, read-only or full.
//!
//! Every scenario pushes a stream of desired patches through the service side and ends
//! with the invariant (harness::check_invariant): `state.json` equals the twin's final
//! desired properties, the acks carry the final `$version`, nothing was applied out of
//! order, and `state.json` parsed at every read. Each prints a `FAULT-FIGURES` line
//! (run with `--nocapture`) quoted in docs/RELIABILITY.md.
//!
//! Profiles: short by default (CI); `EDGETWIN_FAULT_PROFILE=long` for the on-demand run
//! (20 restarts × 50 patches, 100 drops, 30 s of throttling, 100 SIGKILLs).
//! `EDGETWIN_FAULT_SEED` replays a run.
//!
//! Two scenarios are `#[ignore]`d so that a plain `cargo test` never passes them without
//! running them:
//! - the tmpfs half of scenario 7 (faults/disk.rs) needs root (scripts/test runs it, as
//!   root, in CI):
//!   `cargo test -p edgetwin --test faults -- --ignored --exact disk::s7_root_no_ack_while_the_disk_is_read_only_or_full`
//! - scenario 8, the long run with RSS sampling (`EDGETWIN_FAULT_LONG_SECS`, default 600):
//!   `EDGETWIN_FAULT_PROFILE=long cargo test -p edgetwin --test faults -- --ignored --exact s8_long_run_memory_stays_flat --nocapture`

mod daemon_support;
#[path = "faults/disk.rs"]
mod disk;
#[path = "faults/harness.rs"]
mod harness;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use daemon_support::{Daemon, Env, WAIT};
use edgetwin::app::TWIN_TIMEOUT;
use edgetwin_sim::SimEvent;
use harness::{
    capture_logs, check_invariant, converge, logged, max_av, next_event, rng, Figures, Monitor,
    Profile, Stream,
};
use rand::Rng;

/// Env, monitor (watching the hub and the daemon) and a running daemon.
async fn setup(
    settings: impl FnOnce(&Env) -> edgetwin::config::Settings,
) -> (Env, Monitor, Daemon) {
    capture_logs();
    let mut env = Env::start().await;
    let (monitor, daemon) = start_watched(&mut env, settings).await;
    (env, monitor, daemon)
}

/// A running daemon on `env`, with the monitor watching it and the hub.
async fn start_watched(
    env: &mut Env,
    settings: impl FnOnce(&Env) -> edgetwin::config::Settings,
) -> (Monitor, Daemon) {
    let monitor = Monitor::new(env.state_dir.path());
    monitor.watch_hub(env.sim().hub().events());
    let daemon = Daemon::start(settings(env)).await;
    monitor.watch_daemon(daemon.view.state.clone());
    env.wait_twin_get().await;
    (monitor, daemon)
}

fn is_ack(e: &SimEvent) -> bool {
    matches!(e, SimEvent::ReportedPatched { .. })
}

/// Scenario 1: the hub restarts (state kept, connections gone) during the stream.
#[tokio::test]
async fn s1_hub_restarts_during_a_patch_stream() {
    let profile = Profile::from_env();
    let restarts = profile.pick(5, 20);
    let per_round = profile.pick(40, 50);
    let mut figures = Figures::new("1-hub-restarts", profile);
    let (mut env, monitor, daemon) = setup(|env| env.settings("")).await;
    let mut stream = Stream::new(rng("1"));

    for _ in 0..restarts {
        stream.send_n(&env, per_round);
        // Strike at a random point of the acknowledgements' flow.
        for _ in 0..stream.rng.random_range(0..4) {
            if next_event(&mut env.events, Duration::from_secs(5), is_ack)
                .await
                .is_none()
            {
                break;
            }
        }
        let sim = env.sim.take().expect("sim");
        let t = Instant::now();
        env.sim = Some(sim.restart().await.expect("sim restarts"));
        env.events = env.sim().hub().events();
        monitor.watch_hub(env.sim().hub().events());
        figures.faults += 1;
        env.wait_connected().await;
        figures.recoveries.push(t.elapsed());
    }
    let last = stream.send(&env);
    let took = converge(&mut env, &monitor, last).await;
    figures.patches = stream.sent;
    figures.note("final_converge_ms", took.as_millis());
    daemon.stop().await.expect("clean stop");
    check_invariant(&env, &monitor, &mut figures);
}

/// Scenario 2: connections dropped at random points, half of them between a reported
/// patch reaching the hub and its 204 reaching the daemon.
#[tokio::test]
async fn s2_connections_dropped_at_random_points() {
    let profile = Profile::from_env();
    let drops = profile.pick(10, 100);
    let patches: u64 = profile.pick(200, 1000);
    let mut figures = Figures::new("2-dropped-connections", profile);
    let (mut env, monitor, daemon) = setup(|env| env.settings("")).await;
    let mut stream = Stream::new(rng("2"));
    let mut between_patch_and_ack = 0;

    for _ in 0..drops {
        let cut_before_ack = stream.rng.random_bool(0.5);
        if cut_before_ack {
            env.sim().faults().drop_connection_after_reported(1);
            between_patch_and_ack += 1;
        }
        stream.send_n(&env, patches / drops);
        if !cut_before_ack {
            for _ in 0..stream.rng.random_range(0..3) {
                if next_event(&mut env.events, Duration::from_secs(5), is_ack)
                    .await
                    .is_none()
                {
                    break;
                }
            }
            env.sim().faults().drop_all_connections();
        }
        figures.faults += 1;
        env.wait_for("disconnect", |e| matches!(e, SimEvent::Disconnected { .. }))
            .await;
        let t = Instant::now();
        env.wait_connected().await;
        figures.recoveries.push(t.elapsed());
    }
    let last = stream.send(&env);
    let took = converge(&mut env, &monitor, last).await;
    figures.patches = stream.sent;
    figures.note("between_patch_and_ack", between_patch_and_ack);
    figures.note("final_converge_ms", took.as_millis());
    daemon.stop().await.expect("clean stop");
    check_invariant(&env, &monitor, &mut figures);
}

/// Scenario 3: every twin operation answered 429 for a while. The daemon backs off with
/// jitter (its requests are counted against what the back-off policy allows) and
/// recovers by itself once the hub accepts again. Then a few operations fail with 500.
#[tokio::test]
async fn s3_throttling_is_backed_off_and_recovered_from() {
    let profile = Profile::from_env();
    let period = profile.pick(Duration::from_secs(6), Duration::from_secs(30));
    let initial = Duration::from_millis(500);
    let max = Duration::from_secs(4);
    let mut figures = Figures::new("3-throttling", profile);
    let (mut env, monitor, daemon) = setup(|env| {
        let mut s = env.settings("");
        s.hub.backoff.initial = initial;
        s.hub.backoff.max = max;
        s
    })
    .await;
    let mut stream = Stream::new(rng("3"));
    let warm = stream.send_n(&env, 5);
    converge(&mut env, &monitor, warm).await;

    let before = env.sim().faults().twin_requests();
    env.sim().faults().throttle_twin_for(period);
    let end = tokio::time::Instant::now() + period;
    figures.faults += 1;
    stream.send_n(&env, 10);
    let mut throttled = 0u64;
    loop {
        match tokio::time::timeout_at(end, env.events.recv()).await {
            Err(_) => break,
            Ok(Ok(
                SimEvent::TwinGet { status: 429, .. }
                | SimEvent::ReportedRejected { status: 429, .. },
            )) => throttled += 1,
            Ok(_) => {}
        }
    }
    let during = env.sim().faults().twin_requests() - before;
    let recovery = converge(&mut env, &monitor, stream.last_version).await;
    figures.recoveries.push(recovery);
    // At most two requests are outstanding (one GET, one reported patch), each retried
    // no sooner than `initial` after the previous 429.
    let allowed = 2 * (period.as_millis() / initial.as_millis() + 2) as u64;
    figures.patches = stream.sent;
    figures.note("throttle_s", period.as_secs());
    figures.note("twin_requests_while_throttled", during);
    figures.note("answered_429", throttled);
    figures.note("allowed_by_backoff", allowed);
    assert!(throttled >= 1, "the throttle was felt");
    assert!(
        during <= allowed,
        "{during} twin requests in {period:?} of 429s hammer the hub (allowed {allowed})"
    );
    assert!(
        recovery <= max + Duration::from_secs(5),
        "recovered {recovery:?} after the throttle ended"
    );

    // Then internal errors: the next twin operations fail with 500 and are retried on the
    // same back-off until the hub answers again.
    let failures = profile.pick(4, 10);
    env.sim().faults().fail_twin_ops(failures);
    figures.faults += 1;
    let t = Instant::now();
    let v = stream.send_n(&env, 5);
    converge(&mut env, &monitor, v).await;
    figures.recoveries.push(t.elapsed());
    figures.note("answered_500", failures);
    figures.patches = stream.sent;
    daemon.stop().await.expect("clean stop");
    check_invariant(&env, &monitor, &mut figures);
}

/// Scenario 4: desired notifications duplicated, reordered and lost (so the next one skips
/// versions), twin responses lost, and a response delayed beyond the request timeout.
#[tokio::test]
async fn s4_lost_late_duplicate_and_reordered_traffic() {
    let profile = Profile::from_env();
    let rounds = profile.pick(1, 5);
    let mut figures = Figures::new("4-lost-late-duplicate-reordered", profile);
    let (mut env, monitor, daemon) = setup(|env| env.settings("")).await;
    let mut stream = Stream::new(rng("4"));
    let faults = env.sim().faults();
    let mut counts = [0u64; 5];

    for _ in 0..rounds {
        let n = stream.rng.random_range(3..8);
        faults.duplicate_desired_notifications(n);
        stream.send_n(&env, u64::from(n));
        counts[0] += u64::from(n);

        let n = stream.rng.random_range(2..5);
        faults.reorder_desired_notifications(n);
        stream.send_n(&env, 2 * u64::from(n) + 1);
        counts[1] += u64::from(n);

        let n = stream.rng.random_range(1..4);
        faults.drop_desired_notifications(n);
        stream.send_n(&env, u64::from(n) + 2);
        counts[2] += u64::from(n);
        let mid = stream.last_version;
        let t = Instant::now();
        converge(&mut env, &monitor, mid).await;
        figures.recoveries.push(t.elapsed());

        // A reported patch's 204 comes after the request timed out (it was re-sent), and
        // meanwhile a lost notification forces a GET whose answer is lost too.
        faults.delay_twin_responses(Some(TWIN_TIMEOUT + Duration::from_secs(1)));
        let late = stream.send(&env);
        env.wait_for(
            "the late ack applied by the hub",
            |e| matches!(e, SimEvent::ReportedPatched { patch, .. } if max_av(patch) == Some(late)),
        )
        .await;
        faults.delay_twin_responses(None);
        faults.drop_twin_responses(1);
        faults.drop_desired_notifications(1);
        stream.send_n(&env, 2);
        counts[3] += 1;
        counts[4] += 1;
        counts[2] += 1;
        let t = Instant::now();
        converge(&mut env, &monitor, stream.last_version).await;
        figures.recoveries.push(t.elapsed());
    }
    faults.clear();
    let last = stream.send(&env);
    converge(&mut env, &monitor, last).await;
    figures.faults = counts.iter().sum();
    figures.patches = stream.sent;
    figures.note("duplicated", counts[0]);
    figures.note("reordered", counts[1]);
    figures.note("notifications_lost", counts[2]);
    figures.note("responses_late", counts[3]);
    figures.note("responses_lost", counts[4]);
    figures.note("resyncs_logged", logged("resync"));
    daemon.stop().await.expect("clean stop");
    check_invariant(&env, &monitor, &mut figures);
}

/// MQTT over WebSocket to the emulator's HTTPS port, where the daemon reads the hub's
/// time after a refusal (over MQTT/TLS it reads port 443, where the emulator is not).
fn over_websocket(
    env: &Env,
    mut settings: edgetwin::config::Settings,
) -> edgetwin::config::Settings {
    settings.hub.transport = edgetwin::hub::options::HubTransport::MqttWs;
    settings.hub.gateway_host = Some(edgetwin::hub::options::HostPort {
        host: "127.0.0.1".into(),
        port: env.sim().https_addr().port(),
    });
    settings
}

/// Scenario 5: short-lived tokens renewed throughout the stream; the hub's clock 10
/// minutes ahead (the next token looks expired: refused once, the daemon reads the hub's
/// time, signs against it and goes on), back to normal and 10 minutes behind (tokens
/// signed on the learned skew only live longer: no harm, no storm); and a daemon started
/// while the hub's clock is off connects after one refusal instead of exiting.
#[tokio::test]
async fn s5_token_expiry_and_clock_skew() {
    let profile = Profile::from_env();
    let renewals = profile.pick(4, 40);
    let mut figures = Figures::new("5-token-expiry-clock-skew", profile);
    let (mut env, monitor, daemon) = setup(|env| {
        let mut s = over_websocket(env, env.settings(""));
        // Below the configurable minimum on purpose: renew every 2.4 s.
        s.hub.sas_ttl = Duration::from_secs(3);
        s
    })
    .await;
    let mut stream = Stream::new(rng("5"));
    let faults = env.sim().faults();

    let mut connects = 0;
    for _ in 0..renewals {
        stream.send_n(&env, 3);
        env.wait_connected().await;
        connects += 1;
    }
    converge(&mut env, &monitor, stream.last_version).await;

    // The hub's clock runs 10 minutes ahead: the next renewal's token is expired for it.
    let skews_before = logged("clock_skew");
    let t = Instant::now();
    faults.set_clock_offset(600);
    figures.faults += 1;
    let e = env
        .wait_for("a refused renewal", |e| {
            matches!(e, SimEvent::ConnectRefused { .. })
        })
        .await;
    if let SimEvent::ConnectRefused { reason, .. } = e {
        assert!(reason.contains("expired"), "refused as expired: {reason}");
    }
    stream.send_n(&env, 5);
    converge(&mut env, &monitor, stream.last_version).await;
    figures.recoveries.push(t.elapsed());
    assert_eq!(
        logged("clock_skew"),
        skews_before + 1,
        "the skew learned once"
    );
    let refused = logged("auth_refused");

    // Back to normal (NTP on the gateway, as the hub sees it), then 10 minutes behind:
    // tokens signed on the learned skew live longer for the hub; renewals go on.
    for offset in [0, -600] {
        faults.set_clock_offset(offset);
        figures.faults += 1;
        for _ in 0..2 {
            stream.send_n(&env, 3);
            env.wait_connected().await;
            connects += 1;
        }
        let t = Instant::now();
        converge(&mut env, &monitor, stream.last_version).await;
        figures.recoveries.push(t.elapsed());
    }
    assert_eq!(
        logged("auth_refused"),
        refused,
        "no refusal while the clock was behind"
    );
    faults.set_clock_offset(0);
    let last = stream.send(&env);
    converge(&mut env, &monitor, last).await;
    figures.note("auth_refused_logged", logged("auth_refused"));
    daemon.stop().await.expect("clean stop");

    // A daemon that never connected, with the hub's clock 10 minutes ahead and the
    // shortest token lifetime config allows: refused once, then connected on hub time.
    faults.set_clock_offset(600);
    figures.faults += 1;
    let before = logged("auth_refused");
    let mut settings = over_websocket(&env, env.settings(""));
    settings.hub.sas_ttl = Duration::from_secs(60);
    let t = Instant::now();
    let cold = Daemon::start(settings).await;
    let last = stream.send(&env);
    converge(&mut env, &monitor, last).await;
    let cold_start = t.elapsed();
    figures.recoveries.push(cold_start);
    assert_eq!(
        logged("auth_refused") - before,
        1,
        "refused once, then connected"
    );
    assert!(!cold.task.is_finished());
    cold.stop().await.expect("clean stop");
    faults.set_clock_offset(0);

    figures.patches = stream.sent;
    figures.note("connects", connects);
    figures.note("cold_start_connected_ms", cold_start.as_millis());
    check_invariant(&env, &monitor, &mut figures);
}

fn spawn_daemon(config: &Path, log: &Path) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .env_remove("EDGETWIN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("edgetwin runs")
}

/// Scenario 6: `edgetwin run` SIGKILLed at random moments of the stream. After every
/// kill `state.json` parses and its version never went back; the last run converges.
#[tokio::test]
async fn s6_daemon_sigkilled_during_a_patch_stream() {
    let profile = Profile::from_env();
    let kills = profile.pick(20, 100);
    let mut figures = Figures::new("6-sigkill", profile);
    let mut env = Env::start().await;
    let monitor = Monitor::new(env.state_dir.path());
    monitor.watch_hub(env.sim().hub().events());
    env.settings("[log]\nlevel = \"info\"\nformat = \"text\"");
    let config = env.sim_dir.path().join("edgetwin.toml");
    let log = env.sim_dir.path().join("daemon.log");
    let mut stream = Stream::new(rng("6"));
    let mut restarts = Vec::new();

    for _ in 0..kills {
        let started = Instant::now();
        let mut child = spawn_daemon(&config, &log);
        let burst = stream.rng.random_range(1..6);
        stream.send_n(&env, burst);
        // Strike after a random number of hub events: before the connect, between the
        // GET and its answer, between a patch and its ack, ...
        for _ in 0..stream.rng.random_range(1..12) {
            if next_event(&mut env.events, Duration::from_secs(5), |_| true)
                .await
                .is_none()
            {
                break;
            }
        }
        child.start_kill().expect("SIGKILL");
        let status = child.wait().await.expect("reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        figures.faults += 1;
        restarts.push(started.elapsed());
        // After each kill the file parses and its version did not go back (the monitor
        // counts both).
        monitor.read();
        // Patches keep coming while the daemon is down.
        let burst = stream.rng.random_range(0..3);
        stream.send_n(&env, burst);
    }
    let t = Instant::now();
    let mut child = spawn_daemon(&config, &log);
    let last = stream.send(&env);
    let took = converge(&mut env, &monitor, last).await;
    figures.recoveries.push(took);
    let pid = child.id().expect("pid");
    let term = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .expect("kill runs");
    assert!(term.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "clean stop after the kills");
    figures.patches = stream.sent;
    figures.note("restart_to_converge_ms", t.elapsed().as_millis());
    figures.note(
        "mean_run_before_kill_ms",
        restarts.iter().sum::<Duration>().as_millis() / restarts.len().max(1) as u128,
    );
    check_invariant(&env, &monitor, &mut figures);
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Scenario 8 (on demand, see the module header): `edgetwin run` for
/// `EDGETWIN_FAULT_LONG_SECS` (default 600) with the shortest token lifetime config allows
/// (renewal every 48 s), a patch every 50 ms and a dropped connection every minute; RSS
/// sampled every 30 s must not grow beyond a small bound after warm-up.
#[tokio::test]
#[ignore = "long run (10 min): EDGETWIN_FAULT_PROFILE=long cargo test -p edgetwin --test faults -- --ignored --exact s8_long_run_memory_stays_flat"]
async fn s8_long_run_memory_stays_flat() {
    let profile = Profile::from_env();
    let secs: u64 = std::env::var("EDGETWIN_FAULT_LONG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let mut figures = Figures::new("8-long-run", profile);
    let mut env = Env::start().await;
    let monitor = Monitor::new(env.state_dir.path());
    monitor.watch_hub(env.sim().hub().events());
    env.settings_with(
        "sas_ttl = \"60s\"",
        "[log]\nlevel = \"info\"\nformat = \"text\"",
    );
    let config = env.sim_dir.path().join("edgetwin.toml");
    let log = env.sim_dir.path().join("daemon.log");
    let mut stream = Stream::new(rng("8"));
    let mut child = spawn_daemon(&config, &log);
    let pid = child.id().expect("pid");
    env.wait_connected().await;

    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut sample = tokio::time::interval(Duration::from_secs(30));
    let mut drop_every = tokio::time::interval(Duration::from_secs(60));
    drop_every.tick().await;
    let mut samples = Vec::new();
    let mut connects = 0u64;
    while tokio::time::Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => { stream.send(&env); }
            _ = sample.tick() => {
                let rss = rss_kib(pid).expect("daemon alive");
                samples.push((start.elapsed().as_secs(), rss));
            }
            _ = drop_every.tick() => {
                env.sim().faults().drop_all_connections();
                figures.faults += 1;
            }
            e = env.events.recv() => {
                if matches!(e, Ok(SimEvent::Connected { .. })) {
                    connects += 1;
                }
            }
        }
    }
    let last = stream.send(&env);
    let took = converge(&mut env, &monitor, last).await;
    figures.recoveries.push(took);
    samples.push((start.elapsed().as_secs(), rss_kib(pid).expect("alive")));
    let term = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .expect("kill runs");
    assert!(term.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let warm = samples
        .iter()
        .find(|(t, _)| *t >= 60)
        .map_or(samples[0].1, |s| s.1);
    let last_rss = samples.last().expect("samples").1;
    figures.patches = stream.sent;
    figures.note("seconds", secs);
    figures.note("connects", connects);
    figures.note(
        "rss_kib",
        samples
            .iter()
            .map(|(t, r)| format!("{t}s:{r}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    check_invariant(&env, &monitor, &mut figures);
    assert!(
        last_rss <= warm + warm / 4 + 2048,
        "RSS grew from {warm} KiB to {last_rss} KiB"
    );
}
