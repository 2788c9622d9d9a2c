//! Harness of the fault suite: the profile (short by default, long with
//! `EDGETWIN_FAULT_PROFILE=long`), the desired-patch stream, the monitors that read
//! `state.json` and watch the daemon while faults happen, the convergence wait and the
//! invariant check every scenario ends with, a capture of the daemon's `edgetwin_event`
//! log fields, and the per-scenario figures printed for docs/RELIABILITY.md.
//!
//! Waits are on `SimEvent`s and `watch` changes with a deadline; nothing sleeps to
//! synchronise. Absence ("no ack left") is shown by order, with a later marker
//! (`Env::get_state_marker`), never by waiting; the only timed waits are the random
//! moments at which faults strike.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use edgetwin::twin::{RuntimeState, StateFile};
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::SimEvent;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::daemon_support::{Env, DEVICE, MODULE};

/// Longest a scenario waits for convergence after its last fault.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// Which profile runs: short in CI, long on demand.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub long: bool,
}

impl Profile {
    pub fn from_env() -> Profile {
        Profile {
            long: std::env::var("EDGETWIN_FAULT_PROFILE").is_ok_and(|p| p == "long"),
        }
    }

    pub fn pick<T>(&self, short: T, long: T) -> T {
        if self.long {
            long
        } else {
            short
        }
    }

    pub fn name(&self) -> &'static str {
        self.pick("short", "long")
    }
}

/// A seeded random source; the seed is printed so a failure can be replayed with
/// `EDGETWIN_FAULT_SEED`.
pub fn rng(scenario: &str) -> StdRng {
    let seed = std::env::var("EDGETWIN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("fault scenario {scenario}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

// ---- figures ---------------------------------------------------------------------------

/// What a scenario reports (docs/RELIABILITY.md).
#[derive(Debug, Default)]
pub struct Figures {
    pub scenario: String,
    pub profile: &'static str,
    pub faults: u64,
    pub patches: u64,
    pub versions_lost: u64,
    pub recoveries: Vec<Duration>,
    pub extra: Vec<(String, String)>,
    pub started: Option<Instant>,
}

impl Figures {
    pub fn new(scenario: &str, profile: Profile) -> Figures {
        Figures {
            scenario: scenario.to_owned(),
            profile: profile.name(),
            started: Some(Instant::now()),
            ..Figures::default()
        }
    }

    pub fn note(&mut self, key: &str, value: impl std::fmt::Display) {
        self.extra.push((key.to_owned(), value.to_string()));
    }

    /// Prints one line (`FAULT-FIGURES ...`) that docs/RELIABILITY.md quotes.
    pub fn print(&self, disk: &DiskStats) {
        let max = self.recoveries.iter().max().copied().unwrap_or_default();
        let mean = if self.recoveries.is_empty() {
            Duration::ZERO
        } else {
            self.recoveries.iter().sum::<Duration>() / self.recoveries.len() as u32
        };
        let mut line = format!(
            "FAULT-FIGURES scenario={} profile={} faults={} patches={} versions_lost={} \
             state_reads={} corrupt_reads={} version_regressions={} acks_ahead_of_disk={} \
             out_of_order={} recovery_max_ms={} recovery_mean_ms={} recoveries={} elapsed_s={:.1}",
            self.scenario,
            self.profile,
            self.faults,
            self.patches,
            self.versions_lost,
            disk.reads,
            disk.corrupt,
            disk.regressions,
            disk.acks_ahead_of_disk,
            disk.out_of_order,
            max.as_millis(),
            mean.as_millis(),
            self.recoveries.len(),
            self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
        );
        for (k, v) in &self.extra {
            line.push_str(&format!(" {k}={v}"));
        }
        println!("{line}");
    }
}

// ---- patch stream ----------------------------------------------------------------------

/// Desired patches pushed through the service side: every patch sets `seq` (so the last
/// one's ack must carry the final `$version`), most set one of a few keys, some delete one
/// (`null`), some set a nested object.
pub struct Stream {
    pub rng: StdRng,
    pub sent: u64,
    pub last_version: u64,
}

impl Stream {
    pub fn new(rng: StdRng) -> Stream {
        Stream {
            rng,
            sent: 0,
            last_version: 0,
        }
    }

    pub fn patch(&mut self) -> Value {
        let n = self.sent + 1;
        let key = format!("k{}", self.rng.random_range(0..8));
        let mut patch = Map::new();
        patch.insert("seq".into(), json!(n));
        match self.rng.random_range(0..10) {
            0 => {
                patch.insert(key, Value::Null);
            }
            1 => {
                patch.insert("nested".into(), json!({ "a": { key: n }, "b": n % 3 }));
            }
            _ => {
                patch.insert(key, json!(n));
            }
        }
        Value::Object(patch)
    }

    /// Sends one patch; returns its desired `$version`.
    pub fn send(&mut self, env: &Env) -> u64 {
        let patch = self.patch();
        let twin = env
            .sim()
            .hub()
            .write_module_twin(
                DEVICE,
                MODULE,
                TwinWrite::Patch,
                &json!({"properties": {"desired": patch}}),
                None,
            )
            .expect("twin written");
        self.sent += 1;
        self.last_version = twin["properties"]["desired"]["$version"]
            .as_u64()
            .expect("desired $version");
        self.last_version
    }

    pub fn send_n(&mut self, env: &Env, n: u64) -> u64 {
        for _ in 0..n {
            self.send(env);
        }
        self.last_version
    }
}

// ---- monitors --------------------------------------------------------------------------

/// What the monitors saw.
#[derive(Debug, Default, Clone)]
pub struct DiskStats {
    /// `state.json` reads (the file existed).
    pub reads: u64,
    /// Reads that did not parse as a state file of this module.
    pub corrupt: u64,
    /// Reads whose `desired_version` was below an earlier read's.
    pub regressions: u64,
    /// Acks the hub received for a `$version` newer than what `state.json` held then.
    pub acks_ahead_of_disk: u64,
    /// Desired versions put in force below one in force before (watch of the daemon).
    pub out_of_order: u64,
    pub max_version: Option<u64>,
    pub last_in_force: Option<u64>,
    pub problems: Vec<String>,
}

/// Reads `state.json` whenever something happens and watches the daemon's state.
#[derive(Clone)]
pub struct Monitor {
    pub path: PathBuf,
    pub stats: Arc<Mutex<DiskStats>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Monitor {
    pub fn new(state_dir: &Path) -> Monitor {
        Monitor {
            path: state_dir.join("state.json"),
            stats: Arc::default(),
            tasks: Arc::default(),
        }
    }

    /// Reads and checks `state.json` now; returns it when it exists and parses.
    pub fn read(&self) -> Option<StateFile> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            // A scenario swapped the state directory for a file: nothing to read until it
            // is put back (an ack meanwhile is still caught: it finds nothing on disk).
            Err(e) if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::NOTDIR) => {
                return None
            }
            Err(e) => {
                let mut st = self.stats.lock().unwrap();
                st.reads += 1;
                st.corrupt += 1;
                st.problems.push(format!("read failed: {e}"));
                return None;
            }
        };
        let mut st = self.stats.lock().unwrap();
        st.reads += 1;
        match StateFile::parse(&bytes, DEVICE, MODULE) {
            Ok(file) => {
                if let (Some(max), Some(v)) = (st.max_version, file.desired_version) {
                    if v < max {
                        st.regressions += 1;
                        st.problems
                            .push(format!("state.json went back from v{max} to v{v}"));
                    }
                }
                if file.desired_version > st.max_version {
                    st.max_version = file.desired_version;
                }
                Some(file)
            }
            Err(e) => {
                st.corrupt += 1;
                st.problems.push(format!("corrupt state.json: {e}"));
                None
            }
        }
    }

    /// On every reported patch the hub accepts, `state.json` must already hold every
    /// `$version` acknowledged in it (rule 6).
    pub fn watch_hub(&self, mut events: broadcast::Receiver<SimEvent>) {
        let me = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(SimEvent::ReportedPatched { patch, .. }) => {
                        let acked = patch
                            .as_object()
                            .into_iter()
                            .flat_map(|m| m.values())
                            .filter_map(|ack| ack.get("av").and_then(Value::as_u64))
                            .max();
                        let on_disk = me.read().and_then(|f| f.desired_version);
                        if let Some(av) = acked {
                            if on_disk.map_or(true, |d| d < av) {
                                let mut st = me.stats.lock().unwrap();
                                st.acks_ahead_of_disk += 1;
                                st.problems.push(format!(
                                    "ack of v{av} reached the hub with state.json at {on_disk:?}"
                                ));
                            }
                        }
                    }
                    Ok(SimEvent::DesiredChanged { .. } | SimEvent::Connected { .. }) => {
                        me.read();
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        self.tasks.lock().unwrap().push(task);
    }

    /// The daemon's desired version in force must never go down; `state.json` is read at
    /// every change.
    pub fn watch_daemon(&self, mut state: watch::Receiver<RuntimeState>) {
        let me = self.clone();
        let task = tokio::spawn(async move {
            while state.changed().await.is_ok() {
                let version = state.borrow_and_update().desired_version;
                {
                    let mut st = me.stats.lock().unwrap();
                    if let (Some(prev), Some(v)) = (st.last_in_force, version) {
                        if v < prev {
                            st.out_of_order += 1;
                            st.problems
                                .push(format!("daemon put v{v} in force after v{prev}"));
                        }
                    }
                    if version > st.last_in_force {
                        st.last_in_force = version;
                    }
                }
                me.read();
            }
        });
        self.tasks.lock().unwrap().push(task);
    }

    pub fn snapshot(&self) -> DiskStats {
        self.stats.lock().unwrap().clone()
    }

    pub fn stop(&self) -> DiskStats {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.snapshot()
    }
}

// ---- convergence and the invariant -----------------------------------------------------

/// The twin's desired properties without `$` keys, and its reported section.
pub fn twin_sections(env: &Env) -> (Map<String, Value>, Value, u64) {
    let twin = env
        .sim()
        .hub()
        .get_module_twin(DEVICE, MODULE)
        .expect("twin");
    let desired = &twin["properties"]["desired"];
    let version = desired["$version"].as_u64().expect("desired $version");
    let props = desired
        .as_object()
        .expect("desired object")
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (props, twin["properties"]["reported"].clone(), version)
}

fn converged(env: &Env, monitor: &Monitor, version: u64) -> bool {
    let (_, reported, _) = twin_sections(env);
    reported["seq"]["av"] == json!(version)
        && monitor
            .read()
            .is_some_and(|f| f.desired_version == Some(version))
}

/// Waits until the daemon has applied, persisted and acknowledged desired `version`;
/// returns how long that took.
pub async fn converge(env: &mut Env, monitor: &Monitor, version: u64) -> Duration {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !converged(env, monitor, version) {
        match tokio::time::timeout_at(deadline, env.events.recv()).await {
            Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("sim closed"),
            Err(_) => {
                let (desired, reported, v) = twin_sections(env);
                panic!(
                    "no convergence on v{version} within {CONVERGE:?}: twin v{v} desired={desired:?} \
                     reported seq={} state.json={:?} monitor={:?}",
                    reported["seq"],
                    monitor.read(),
                    monitor.snapshot().problems
                );
            }
        }
    }
    start.elapsed()
}

/// The invariant every scenario ends with: `state.json` equals the twin's final desired
/// properties (plus declared defaults), every desired property is acknowledged 200 with
/// its value, the last patch's ack carries the final `$version`, and the monitors saw no
/// corrupt read, no regression, no ack ahead of the disk and nothing out of order.
/// Returns the number of versions lost (properties whose final value is missing).
pub fn check_invariant(env: &Env, monitor: &Monitor, figures: &mut Figures) -> DiskStats {
    let (desired, reported, version) = twin_sections(env);
    let file = monitor
        .read()
        .expect("state.json exists and parses at the end");
    let mut lost = Vec::new();
    if file.desired_version != Some(version) {
        lost.push(format!(
            "state.json at {:?}, twin at v{version}",
            file.desired_version
        ));
    }
    for (k, v) in &desired {
        if file.properties.get(k) != Some(v) {
            lost.push(format!(
                "{k}: twin {v}, state.json {:?}",
                file.properties.get(k)
            ));
        }
        let ack = &reported[k];
        if ack["value"] != *v || ack["ac"] != json!(200) {
            lost.push(format!("{k}: twin {v}, ack {ack}"));
        }
        if ack["av"].as_u64().map_or(true, |av| av > version) {
            lost.push(format!("{k}: ack version {} beyond v{version}", ack["av"]));
        }
    }
    for (k, v) in &file.properties {
        let default = (k == "telemetryInterval" && *v == json!(60)).then_some(());
        if !desired.contains_key(k) && default.is_none() {
            lost.push(format!("{k}={v} in state.json but not in the twin"));
        }
    }
    if reported["seq"]["av"] != json!(version) {
        lost.push(format!(
            "last ack carries {} not v{version}",
            reported["seq"]["av"]
        ));
    }
    figures.versions_lost = lost.len() as u64;
    let stats = monitor.stop();
    figures.print(&stats);
    assert!(lost.is_empty(), "invariant broken: {lost:#?}");
    assert_eq!(stats.corrupt, 0, "corrupt reads: {:?}", stats.problems);
    assert_eq!(stats.regressions, 0, "regressions: {:?}", stats.problems);
    assert_eq!(
        stats.acks_ahead_of_disk, 0,
        "acks ahead of disk: {:?}",
        stats.problems
    );
    assert_eq!(stats.out_of_order, 0, "out of order: {:?}", stats.problems);
    stats
}

// ---- the daemon's log events -----------------------------------------------------------

type Captured = Mutex<Vec<(std::thread::ThreadId, String)>>;

static CAPTURED: OnceLock<Arc<Captured>> = OnceLock::new();

struct Capture(Arc<Captured>);

struct EventField(Option<String>);

impl tracing::field::Visit for EventField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "edgetwin_event" {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "edgetwin_event" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut field = EventField(None);
        event.record(&mut field);
        if let Some(name) = field.0 {
            self.0
                .lock()
                .unwrap()
                .push((std::thread::current().id(), name));
        }
    }
}

/// Installs the capture of `edgetwin_event` fields (once per test binary). Each scenario
/// runs on its own current-thread runtime, so events are told apart by thread.
pub fn capture_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    CAPTURED.get_or_init(|| {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("edgetwin", tracing::Level::INFO);
        let subscriber =
            tracing_subscriber::registry().with(Capture(Arc::clone(&captured)).with_filter(filter));
        let _ = tracing::subscriber::set_global_default(subscriber);
        captured
    });
}

/// How many times this thread's daemon logged `edgetwin_event = name`.
pub fn logged(name: &str) -> usize {
    let me = std::thread::current().id();
    CAPTURED.get().map_or(0, |c| {
        c.lock()
            .unwrap()
            .iter()
            .filter(|(t, n)| *t == me && n == name)
            .count()
    })
}

/// Counts of every event name this thread's daemon logged.
pub fn logged_all() -> HashMap<String, usize> {
    let me = std::thread::current().id();
    let mut counts = HashMap::new();
    if let Some(c) = CAPTURED.get() {
        for (t, n) in c.lock().unwrap().iter() {
            if *t == me {
                *counts.entry(n.clone()).or_default() += 1;
            }
        }
    }
    counts
}

use tracing_subscriber::Layer as _;

// ---- helpers ---------------------------------------------------------------------------

/// Waits for the next event matching `want` within `within`; `None` on timeout.
pub async fn next_event(
    events: &mut broadcast::Receiver<SimEvent>,
    within: Duration,
    want: impl FnMut(&SimEvent) -> bool,
) -> Option<SimEvent> {
    edgetwin_sim::wait_for(events, within, want).await.ok()
}

/// The highest `av` in a reported patch.
pub fn max_av(patch: &Value) -> Option<u64> {
    patch
        .as_object()?
        .values()
        .filter_map(|a| a.get("av").and_then(Value::as_u64))
        .max()
}
