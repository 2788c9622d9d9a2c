//! `cargo bench --bench twin`: edgetwin against Microsoft's Python SDK (azure-iot-device
//! 2.14, `benches/python_receiver.py`) on the same in-process emulator, in the same run.
//!
//! Both receivers run as child processes (`target/release/edgetwin run --config …` and
//! `.venv/bin/python benches/python_receiver.py`) against one `Sim` started here; the
//! emulator's MQTT listener is on 127.0.0.1:8883 because the Python SDK cannot dial another
//! port. What is measured, per receiver:
//!
//! 1. paced patch → ack latency (next patch after the previous ack), p50/p99/max;
//! 2. a burst of patches issued back to back → time until the reported ack carries the
//!    final `$version`, with every version accounted for (acked, or coalesced because a
//!    later ack superseded it);
//! 3. footprint: RSS after start, after the bursts and after an idle period; CPU used
//!    while idle; the binary's size (stripped);
//! 4. start-up: process start → `READY=1` on a `NOTIFY_SOCKET` we bind (fresh, with
//!    persisted state, hub unreachable), → subscribed, → twin read;
//! 5. resync: hub stopped, twin changed while it is down, hub started again → module
//!    reconnected → the change acknowledged.
//!
//! Timing method: `SimEvent`s are received by a dedicated thread (`blocking_recv` on the
//! hub's broadcast) that stamps each with `Instant::now()` on arrival. A patch's start is
//! stamped on the issuing thread just after `Hub::write_module_twin` returns (the
//! notification is queued to the module's connection by then); its end is the stamp of
//! the `ReportedPatched` event, emitted after the hub has applied and stored the reported
//! patch and queued its 204. The emulator's own state lives on tmpfs (`/dev/shm`) so its
//! persistence stays out of the measurement; the daemon's state directory is on the real
//! disk (`target/bench-twin/`), with the durable writes it ships with.
//!
//! Environment (all optional):
//! - `EDGETWIN_BENCH_QUICK=1`: a fast smoke (small counts, short idle, one repetition);
//! - `EDGETWIN_BENCH_REPEATS` (3): repetitions of each measurement; medians are printed;
//! - `EDGETWIN_BENCH_PACED` (1000), `EDGETWIN_BENCH_BURST` (10000): patch counts;
//! - `EDGETWIN_BENCH_BURSTS` (8): bursts per receiver (RSS is read at the end of each
//!   and again after 4 s of quiet);
//! - `EDGETWIN_BENCH_TMPFS=0`: skip the run with the daemon's state on tmpfs;
//! - `EDGETWIN_BENCH_BIN`: the daemon binary to measure, e.g. a build of another release
//!   profile. The default is the one cargo builds for the bench (`target/release/edgetwin`),
//!   which unwinds: cargo ignores `panic = "abort"` for bench builds. To measure the
//!   shipped binary, build it with `cargo build --release -p edgetwin` and copy it out of
//!   `target/release` first (docs/BENCHMARKS.md, "How to reproduce");
//! - `EDGETWIN_BENCH_GAP_MS` (0): pause between a paced patch's ack and the next patch;
//! - `EDGETWIN_BENCH_CPU_SECS` (60): the idle CPU window;
//! - `EDGETWIN_BENCH_IDLE_SECS` (60): idle period before the last RSS reading (the issue
//!   asks for 600; the default is shorter to keep the run short);
//! - `EDGETWIN_BENCH_PYTHON`: the Python interpreter (default `.venv/bin/python`), `0`
//!   to skip the Python receiver;
//! - `EDGETWIN_BENCH_PORT_WAIT` (120): seconds to wait for 127.0.0.1:8883 to be free;
//! - `EDGETWIN_BENCH_PROFILE=<dir>`: profile the daemon during its paced and burst runs:
//!   `perf trace -s` on the durable one (syscall times, `<dir>/daemon-syscalls.txt`),
//!   `perf record -g` on the tmpfs one (`<dir>/daemon-tmpfs.perf.data`); timings of such a
//!   run are perturbed by the profilers.
//!
//! Besides the durable run, the daemon is also measured with its state directory on tmpfs
//! (not durable; shows what the disk costs) for the paced and burst runs.
//!
//! Timings are printed, never asserted.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use edgetwin_sim::hub::{Hub, ModuleKey};
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

const DEVICE: &str = "bench";
const RUST_MODULE: &str = "edgetwin";
const PY_MODULE: &str = "python";
const PROPERTY: &str = "telemetryInterval";
const MQTT_PORT: u16 = 8883;
const WAIT: Duration = Duration::from_secs(60);
const BURST_WAIT: Duration = Duration::from_secs(900);
/// Quiet after each burst before RSS is read again.
const SETTLE: Duration = Duration::from_secs(4);
const BUILT_BIN: &str = env!("CARGO_BIN_EXE_edgetwin");

/// The daemon under test: `EDGETWIN_BENCH_BIN`, else the one cargo built.
fn bin() -> PathBuf {
    std::env::var_os("EDGETWIN_BENCH_BIN").map_or_else(|| PathBuf::from(BUILT_BIN), PathBuf::from)
}
const REPO: &str = env!("CARGO_MANIFEST_DIR");

// ---- options --------------------------------------------------------------------------

struct Opts {
    quick: bool,
    repeats: usize,
    paced: usize,
    burst: usize,
    bursts: usize,
    gap: Duration,
    cpu_secs: u64,
    idle_secs: u64,
    python: Option<PathBuf>,
    port_wait: u64,
    profile: Option<PathBuf>,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Opts {
    fn from_env() -> Opts {
        let quick = std::env::var("EDGETWIN_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
        let q = |full: u64, fast: u64| if quick { fast } else { full };
        let python = match std::env::var("EDGETWIN_BENCH_PYTHON") {
            Ok(v) if v == "0" || v.eq_ignore_ascii_case("off") => None,
            Ok(v) if !v.is_empty() => Some(PathBuf::from(v)),
            _ => Some(Path::new(REPO).join(".venv/bin/python")),
        };
        Opts {
            quick,
            repeats: env_num("EDGETWIN_BENCH_REPEATS", q(3, 1)).max(1) as usize,
            paced: env_num("EDGETWIN_BENCH_PACED", q(1000, 50)).max(1) as usize,
            burst: env_num("EDGETWIN_BENCH_BURST", q(10_000, 300)).max(1) as usize,
            bursts: env_num("EDGETWIN_BENCH_BURSTS", q(8, 1)).max(1) as usize,
            gap: Duration::from_millis(env_num("EDGETWIN_BENCH_GAP_MS", 0)),
            cpu_secs: env_num("EDGETWIN_BENCH_CPU_SECS", q(60, 3)).max(1),
            idle_secs: env_num("EDGETWIN_BENCH_IDLE_SECS", q(60, 3)),
            python,
            port_wait: env_num("EDGETWIN_BENCH_PORT_WAIT", q(120, 0)),
            profile: std::env::var_os("EDGETWIN_BENCH_PROFILE").map(PathBuf::from),
        }
    }
}

// ---- event recorder -------------------------------------------------------------------

type Stamped = (Instant, SimEvent);

/// Receives the hub's events on dedicated threads and stamps them on arrival.
struct Recorder {
    tx: mpsc::Sender<Stamped>,
    rx: mpsc::Receiver<Stamped>,
    lagged: Arc<AtomicU64>,
}

impl Recorder {
    fn new() -> Recorder {
        let (tx, rx) = mpsc::channel();
        Recorder {
            tx,
            rx,
            lagged: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts recording `hub`'s events (again after each hub restart).
    fn attach(&self, hub: &Hub) {
        let mut events = hub.events();
        let tx = self.tx.clone();
        let lagged = Arc::clone(&self.lagged);
        thread::Builder::new()
            .name("sim-events".into())
            .spawn(move || loop {
                match events.blocking_recv() {
                    Ok(event) => {
                        if tx.send((Instant::now(), event)).is_err() {
                            break;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        lagged.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(RecvError::Closed) => break,
                }
            })
            .expect("recorder thread");
    }

    fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// The first event matching `want` within `timeout`; others are dropped.
    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&SimEvent) -> bool,
    ) -> Result<Stamped> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, e)) if want(&e) => return Ok((t, e)),
                Ok(_) => {}
                Err(_) => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }
}

fn key(module: &str) -> ModuleKey {
    ModuleKey {
        device_id: DEVICE.into(),
        module_id: module.into(),
    }
}

/// The `av` of `PROPERTY` in a reported patch of `module`.
fn acked_version(e: &SimEvent, module: &ModuleKey) -> Option<u64> {
    match e {
        SimEvent::ReportedPatched {
            module: m, patch, ..
        } if m == module => patch[PROPERTY]["av"].as_u64(),
        _ => None,
    }
}

fn is_ack_of(e: &SimEvent, module: &ModuleKey, version: u64) -> bool {
    acked_version(e, module) == Some(version)
}

// ---- the emulator ---------------------------------------------------------------------

struct Hubside {
    rt: tokio::runtime::Runtime,
    sim: Option<Sim>,
    config: SimConfig,
    rec: Recorder,
    /// Successive values written, so every patch changes the property.
    counter: u64,
}

impl Hubside {
    fn start(opts: &Opts, state_dir: &Path) -> Result<(Hubside, bool)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut config = SimConfig::ephemeral(state_dir);
        if opts.python.is_none() {
            // Only the Python SDK needs 8883; leave it to others.
            let sim = rt.block_on(Sim::start(config.clone()))?;
            return Hubside::ready(rt, sim, config).map(|h| (h, false));
        }
        config.mqtt_addr = SocketAddr::from(([127, 0, 0, 1], MQTT_PORT));
        let deadline = Instant::now() + Duration::from_secs(opts.port_wait);
        let (sim, on_8883) = loop {
            match rt.block_on(Sim::start(config.clone())) {
                Ok(sim) => break (sim, true),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("127.0.0.1:{MQTT_PORT} busy ({e:#}); retrying in 10 s");
                    thread::sleep(Duration::from_secs(10));
                }
                Err(e) => {
                    eprintln!(
                        "127.0.0.1:{MQTT_PORT} unavailable ({e:#}): the emulator takes a free port \
                         and the Python receiver (which can only dial 8883) is skipped"
                    );
                    let mut free = config.clone();
                    free.mqtt_addr = SocketAddr::from(([127, 0, 0, 1], 0));
                    break (rt.block_on(Sim::start(free))?, false);
                }
            }
        };
        Hubside::ready(rt, sim, config).map(|h| (h, on_8883))
    }

    /// Registers the modules and starts recording events.
    fn ready(rt: tokio::runtime::Runtime, sim: Sim, mut config: SimConfig) -> Result<Hubside> {
        config.mqtt_addr = sim.mqtt_addr();
        config.https_addr = sim.https_addr();
        let hub = sim.hub();
        hub.put_device(DEVICE, &json!({}), None)
            .map_err(|e| anyhow!("device: {e:?}"))?;
        for m in [RUST_MODULE, PY_MODULE] {
            hub.put_module(DEVICE, m, &json!({}), None)
                .map_err(|e| anyhow!("module {m}: {e:?}"))?;
        }
        let rec = Recorder::new();
        rec.attach(hub);
        Ok(Hubside {
            rt,
            sim: Some(sim),
            config,
            rec,
            counter: 0,
        })
    }

    fn hub(&self) -> &Hub {
        self.sim.as_ref().expect("sim running").hub()
    }

    fn connection_string(&self, module: &str) -> String {
        self.hub()
            .module_connection_string(DEVICE, module)
            .expect("module registered")
    }

    fn next_value(&mut self) -> u64 {
        self.counter += 1;
        100 + self.counter % 10_000
    }

    /// Service side: PATCH desired `PROPERTY`; returns the new desired `$version`.
    fn set(&mut self, module: &str, value: u64) -> Result<u64> {
        write_desired(self.hub(), module, value)
    }

    /// Stops the hub, changes `module`'s twin while it is down, starts it again on the same
    /// ports. Returns the version written and when the hub was back.
    fn restart_with_change(&mut self, module: &str) -> Result<(u64, Instant)> {
        let sim = self.sim.take().expect("sim running");
        self.rt.block_on(sim.shutdown());
        let value = self.next_value();
        let version = {
            let hub = Hub::open(&self.config.hub_name, &self.config.state_dir)?;
            write_desired(&hub, module, value)?
        };
        let sim = self.rt.block_on(Sim::start(self.config.clone()))?;
        let back = Instant::now();
        self.rec.attach(sim.hub());
        self.sim = Some(sim);
        Ok((version, back))
    }

    fn stop(mut self) {
        if let Some(sim) = self.sim.take() {
            self.rt.block_on(sim.shutdown());
        }
    }
}

fn write_desired(hub: &Hub, module: &str, value: u64) -> Result<u64> {
    let twin = hub
        .write_module_twin(
            DEVICE,
            module,
            TwinWrite::Patch,
            &json!({"properties": {"desired": {PROPERTY: value}}}),
            None,
        )
        .map_err(|e| anyhow!("twin write: {e:?}"))?;
    twin["properties"]["desired"]["$version"]
        .as_u64()
        .context("no desired $version")
}

// ---- receivers as processes -----------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rust,
    Python,
}

impl Kind {
    fn module(self) -> &'static str {
        match self {
            Kind::Rust => RUST_MODULE,
            Kind::Python => PY_MODULE,
        }
    }
}

struct Receiver {
    child: Child,
    started: Instant,
    /// READY=1 (daemon) or the `ready` line (Python).
    ready: mpsc::Receiver<Instant>,
    stop_notify: Arc<AtomicBool>,
}

impl Receiver {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&self) -> Result<Duration> {
        let t = self
            .ready
            .recv_timeout(WAIT)
            .map_err(|_| anyhow!("receiver not ready within {WAIT:?}"))?;
        Ok(t - self.started)
    }

    /// SIGTERM, then wait (SIGKILL after a while).
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_notify.store(true, Ordering::Relaxed);
    }
}

/// Files of one daemon configuration.
struct DaemonFiles {
    config: PathBuf,
    unreachable_config: PathBuf,
    log: PathBuf,
    notify: PathBuf,
}

impl DaemonFiles {
    fn write(dir: &Path, state: &Path, hub: &Hubside) -> Result<DaemonFiles> {
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(state)?;
        let connstr = dir.join("module.connstr");
        edgetwin::store::write_atomic(
            &connstr,
            hub.connection_string(RUST_MODULE).as_bytes(),
            0o600,
        )?;
        let ca = hub.config.state_dir.join("ca.pem");
        let text = |port: u16| {
            format!(
                "[hub]\nconnection_string_file = {:?}\ngateway_host = \"127.0.0.1:{port}\"\n\
                 ca_file = {:?}\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\n\n\
                 [state]\ndir = {:?}\n\n[log]\nlevel = \"info\"\nformat = \"text\"\n",
                connstr.display().to_string(),
                ca.display().to_string(),
                state.display().to_string(),
            )
        };
        let config = dir.join("edgetwin.toml");
        std::fs::write(&config, text(hub.config.mqtt_addr.port()))?;
        // A port nobody listens on: bound, then released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let unreachable_config = dir.join("unreachable.toml");
        std::fs::write(&unreachable_config, text(closed))?;
        Ok(DaemonFiles {
            config,
            unreachable_config,
            log: dir.join("daemon.log"),
            notify: dir.join("notify.sock"),
        })
    }
}

/// `edgetwin run --config …` under a fake service manager (a `NOTIFY_SOCKET` we bind).
fn spawn_daemon(files: &DaemonFiles, config: &Path) -> Result<Receiver> {
    let _ = std::fs::remove_file(&files.notify);
    let socket = UnixDatagram::bind(&files.notify)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (ready_tx, ready) = mpsc::channel();
    let stop_notify = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&stop_notify);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)?;
    let started = Instant::now();
    let child = Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", &files.notify)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env_remove("EDGETWIN_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("spawning edgetwin run")?;
    // Keeps reading so the daemon's later STATUS= notifications have somewhere to go.
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut ready_tx = Some(ready_tx);
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                let now = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.lines().any(|l| l == "READY=1") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(now);
                    }
                }
            }
        }
    });
    Ok(Receiver {
        child,
        started,
        ready,
        stop_notify,
    })
}

fn spawn_python(python: &Path, hub: &Hubside, log: &Path) -> Result<Receiver> {
    let script = Path::new(REPO).join("benches/python_receiver.py");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let started = Instant::now();
    let mut child = Command::new(python)
        .arg("-u")
        .arg(&script)
        .env("BENCH_CONNECTION_STRING", hub.connection_string(PY_MODULE))
        .env("SSL_CERT_FILE", hub.config.state_dir.join("ca.pem"))
        .env("BENCH_RETRY_INTERVAL", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawning {}", python.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (ready_tx, ready) = mpsc::channel();
    thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "ready" {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Instant::now());
                }
            }
        }
    });
    Ok(Receiver {
        child,
        started,
        ready,
        stop_notify: Arc::new(AtomicBool::new(false)),
    })
}

// ---- /proc ----------------------------------------------------------------------------

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

// ---- statistics -----------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median_f(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---- measurements ---------------------------------------------------------------------

/// Results of one receiver; every `Vec` holds one value per repetition.
#[derive(Default)]
struct Row {
    ready_fresh_ms: Vec<f64>,
    ready_ms: Vec<f64>,
    ready_unreachable_ms: Vec<f64>,
    subscribed_ms: Vec<f64>,
    synced_ms: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    max_ms: Vec<f64>,
    burst_ms: Vec<f64>,
    burst_issue_ms: Vec<f64>,
    burst_notes: Vec<String>,
    resync_connected_ms: Vec<f64>,
    resync_ms: Vec<f64>,
    rss_start_kib: f64,
    rss_burst_kib: f64,
    rss_each_burst_kib: Vec<f64>,
    rss_settled_kib: Vec<f64>,
    rss_settled_anon_kib: Vec<f64>,
    rss_anon_start_kib: f64,
    rss_file_start_kib: f64,
    rss_idle_kib: f64,
    rss_peak_kib: f64,
    rss_anon_kib: f64,
    rss_file_kib: f64,
    idle_cpu_pct: f64,
    work_cpu_s: f64,
}

impl Row {
    fn new() -> Row {
        Row {
            rss_start_kib: f64::NAN,
            rss_burst_kib: f64::NAN,
            rss_anon_start_kib: f64::NAN,
            rss_file_start_kib: f64::NAN,
            rss_idle_kib: f64::NAN,
            rss_peak_kib: f64::NAN,
            rss_anon_kib: f64::NAN,
            rss_file_kib: f64::NAN,
            idle_cpu_pct: f64::NAN,
            work_cpu_s: f64::NAN,
            ..Row::default()
        }
    }
}

/// Waits for the module's subscription to desired patches; ms since `started`.
fn wait_subscribed(rec: &Recorder, module: &ModuleKey, started: Instant) -> Result<f64> {
    let (t_sub, _) = rec.wait("subscription to desired patches", WAIT, |e| {
        matches!(e, SimEvent::Subscribed { module: m, filters }
            if m == module && filters.iter().any(|f| f.contains("PATCH/properties/desired")))
    })?;
    Ok(ms(t_sub - started))
}

fn wait_synced(rec: &Recorder, module: &ModuleKey, started: Instant) -> Result<f64> {
    let (t, _) = rec.wait(
        "twin GET",
        WAIT,
        |e| matches!(e, SimEvent::TwinGet { module: m, status: 200 } if m == module),
    )?;
    Ok(ms(t - started))
}

/// Start-up of the daemon: fresh, with persisted state, with the hub unreachable.
fn rust_startups(opts: &Opts, hub: &Hubside, files: &DaemonFiles, row: &mut Row) -> Result<()> {
    let module = key(RUST_MODULE);
    for round in 0..=opts.repeats {
        hub.rec.drain();
        let d = spawn_daemon(files, &files.config)?;
        let ready = d.wait_ready()?;
        let sub = wait_subscribed(&hub.rec, &module, d.started)?;
        let synced = wait_synced(&hub.rec, &module, d.started)?;
        if round == 0 {
            row.ready_fresh_ms.push(ms(ready));
        } else {
            row.ready_ms.push(ms(ready));
        }
        row.subscribed_ms.push(sub);
        row.synced_ms.push(synced);
        // Let the ack of the twin land before the next start (state persisted).
        thread::sleep(Duration::from_millis(300));
        d.stop();
    }
    for _ in 0..opts.repeats {
        let d = spawn_daemon(files, &files.unreachable_config)?;
        row.ready_unreachable_ms.push(ms(d.wait_ready()?));
        d.stop();
    }
    Ok(())
}

fn python_startups(
    opts: &Opts,
    hub: &Hubside,
    python: &Path,
    log: &Path,
    row: &mut Row,
) -> Result<()> {
    let module = key(PY_MODULE);
    for _ in 0..opts.repeats {
        hub.rec.drain();
        let p = spawn_python(python, hub, log)?;
        let ready = p.wait_ready()?;
        let sub = wait_subscribed(&hub.rec, &module, p.started)?;
        row.ready_ms.push(ms(ready));
        row.subscribed_ms.push(sub);
        thread::sleep(Duration::from_millis(300));
        p.stop();
    }
    Ok(())
}

fn paced(hub: &mut Hubside, module: &str, n: usize, gap: Duration, row: &mut Row) -> Result<()> {
    let k = key(module);
    let mut lat = Vec::with_capacity(n);
    hub.rec.drain();
    for _ in 0..n {
        let value = hub.next_value();
        let version = hub.set(module, value)?;
        let t0 = Instant::now();
        let (t1, _) = hub.rec.wait(&format!("ack of v{version}"), WAIT, |e| {
            is_ack_of(e, &k, version)
        })?;
        lat.push(t1.saturating_duration_since(t0));
        if !gap.is_zero() {
            thread::sleep(gap);
            hub.rec.drain();
        }
    }
    lat.sort();
    row.p50_ms.push(ms(percentile(&lat, 50.0)));
    row.p99_ms.push(ms(percentile(&lat, 99.0)));
    row.max_ms.push(ms(*lat.last().unwrap_or(&Duration::ZERO)));
    Ok(())
}

fn burst(hub: &mut Hubside, module: &str, n: usize, row: &mut Row) -> Result<()> {
    let k = key(module);
    hub.rec.drain();
    let lagged_before = hub.rec.lagged();
    let start = Instant::now();
    let mut versions = Vec::with_capacity(n);
    for _ in 0..n {
        let value = hub.next_value();
        versions.push(hub.set(module, value)?);
    }
    let issued = Instant::now();
    let first = versions[0];
    let last = *versions.last().expect("n ≥ 1");
    let mut acked = BTreeSet::new();
    let (mut notified, mut not_notified, mut disconnects, mut gets) = (0u64, 0u64, 0u64, 0u64);
    let deadline = start + BURST_WAIT;
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, e) = hub
            .rec
            .rx
            .recv_timeout(left)
            .map_err(|_| anyhow!("burst: no ack of v{last} within {BURST_WAIT:?}"))?;
        match &e {
            SimEvent::DesiredChanged {
                module: m,
                version,
                notified: sent,
            } if *m == k && (first..=last).contains(version) => {
                if *sent {
                    notified += 1
                } else {
                    not_notified += 1
                }
            }
            SimEvent::Disconnected { module: m } if *m == k => disconnects += 1,
            SimEvent::TwinGet { module: m, .. } if *m == k => gets += 1,
            _ => {}
        }
        if let Some(v) = acked_version(&e, &k) {
            acked.insert(v);
            if v == last {
                break t;
            }
        }
    };
    let in_range = acked.range(first..=last).count() as u64;
    let coalesced = n as u64 - in_range;
    let lagged = hub.rec.lagged() - lagged_before;
    row.burst_ms.push(ms(end - start));
    row.burst_issue_ms.push(ms(issued - start));
    row.burst_notes.push(format!(
        "v{first}..v{last}: {n} issued, {notified} notified{}, {in_range} acked individually, \
         {coalesced} coalesced into a later ack, 0 unaccounted (final v{last} acked); \
         {disconnects} disconnects, {gets} full-twin GETs{}",
        if not_notified > 0 {
            format!(" ({not_notified} not notified)")
        } else {
            String::new()
        },
        if lagged > 0 {
            format!(", recorder lagged by {lagged} events")
        } else {
            String::new()
        }
    ));
    Ok(())
}

fn resync(hub: &mut Hubside, module: &str, row: &mut Row) -> Result<()> {
    let k = key(module);
    hub.rec.drain();
    let (version, back) = hub.restart_with_change(module)?;
    let (t_conn, _) = hub.rec.wait(
        "reconnect",
        WAIT,
        |e| matches!(e, SimEvent::Connected { module: m, .. } if *m == k),
    )?;
    let (t_ack, _) = hub
        .rec
        .wait(&format!("resync ack of v{version}"), WAIT, |e| {
            is_ack_of(e, &k, version)
        })?;
    row.resync_connected_ms
        .push(ms(t_conn.saturating_duration_since(back)));
    row.resync_ms
        .push(ms(t_ack.saturating_duration_since(back)));
    // Let the module settle (its acks, the hub's session) before the next round.
    thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Paced, burst, resync and footprint against a running receiver.
/// With `full` false only paced and burst run (the tmpfs variant).
fn steady(
    opts: &Opts,
    hub: &mut Hubside,
    r: &Receiver,
    kind: Kind,
    full: bool,
    row: &mut Row,
) -> Result<()> {
    let module = kind.module();
    let k = key(module);
    let pid = r.pid();
    // Settled: connected, twin read, first ack (if any) sent.
    let value = hub.next_value();
    let v = hub.set(module, value)?;
    hub.rec.wait("first ack", WAIT, |e| is_ack_of(e, &k, v))?;
    thread::sleep(Duration::from_secs(1));
    row.rss_start_kib = rss_kib(pid, "VmRSS:").map_or(f64::NAN, |v| v as f64);
    row.rss_anon_start_kib = rss_kib(pid, "RssAnon:").map_or(f64::NAN, |v| v as f64);
    row.rss_file_start_kib = rss_kib(pid, "RssFile:").map_or(f64::NAN, |v| v as f64);

    let work_c0 = cpu_ticks(pid);
    let profilers = match (&opts.profile, kind) {
        (Some(dir), Kind::Rust) => start_profiler(dir, pid, full)?,
        _ => Vec::new(),
    };
    for round in 0..opts.repeats {
        eprintln!("  paced {}/{}", round + 1, opts.repeats);
        paced(hub, module, opts.paced, opts.gap, row)?;
    }
    for round in 0..opts.bursts {
        eprintln!("  burst {}/{}", round + 1, opts.bursts);
        burst(hub, module, opts.burst, row)?;
        row.rss_each_burst_kib
            .push(rss_kib(pid, "VmRSS:").map_or(f64::NAN, |v| v as f64));
        // Settled: edgetwin gives a burst's heap back after 2 s of quiet.
        thread::sleep(SETTLE);
        row.rss_settled_kib
            .push(rss_kib(pid, "VmRSS:").map_or(f64::NAN, |v| v as f64));
        row.rss_settled_anon_kib
            .push(rss_kib(pid, "RssAnon:").map_or(f64::NAN, |v| v as f64));
    }
    stop_profilers(profilers);
    // CPU time for the same work (paced and bursts): less sensitive to other load than
    // wall-clock latency, so release profiles can be compared on a busy machine.
    if let (Some(c0), Some(c1)) = (work_c0, cpu_ticks(pid)) {
        row.work_cpu_s = (c1 - c0) as f64 / clock_ticks_per_sec() as f64;
    }
    thread::sleep(Duration::from_secs(1));
    row.rss_burst_kib = rss_kib(pid, "VmRSS:").map_or(f64::NAN, |v| v as f64);
    if !full {
        return Ok(());
    }
    for round in 0..opts.repeats {
        eprintln!("  resync {}/{}", round + 1, opts.repeats);
        resync(hub, module, row)?;
    }

    // Idle at the shipped default interval.
    let v = hub.set(module, 60)?;
    hub.rec
        .wait("ack of the idle interval", WAIT, |e| is_ack_of(e, &k, v))?;
    thread::sleep(Duration::from_secs(1));
    eprintln!(
        "  idle: CPU over {} s, RSS after {} s",
        opts.cpu_secs,
        opts.idle_secs.max(opts.cpu_secs)
    );
    let idle_start = Instant::now();
    let c0 = cpu_ticks(pid).context("reading /proc/PID/stat")?;
    thread::sleep(Duration::from_secs(opts.cpu_secs));
    let c1 = cpu_ticks(pid).context("reading /proc/PID/stat")?;
    let secs = idle_start.elapsed().as_secs_f64();
    row.idle_cpu_pct = (c1 - c0) as f64 / clock_ticks_per_sec() as f64 / secs * 100.0;
    let rest = Duration::from_secs(opts.idle_secs).saturating_sub(idle_start.elapsed());
    thread::sleep(rest);
    row.rss_idle_kib = rss_kib(pid, "VmRSS:").map_or(f64::NAN, |v| v as f64);
    row.rss_peak_kib = rss_kib(pid, "VmHWM:").map_or(f64::NAN, |v| v as f64);
    row.rss_anon_kib = rss_kib(pid, "RssAnon:").map_or(f64::NAN, |v| v as f64);
    row.rss_file_kib = rss_kib(pid, "RssFile:").map_or(f64::NAN, |v| v as f64);
    Ok(())
}

/// `perf trace -s` on the durable daemon (where its time goes is off-CPU, in syscalls),
/// `perf record -g` on the tmpfs one (what is left is on-CPU work).
fn start_profiler(dir: &Path, pid: u32, durable: bool) -> Result<Vec<Child>> {
    std::fs::create_dir_all(dir)?;
    let pid = pid.to_string();
    let mut perf = Command::new("perf");
    if durable {
        perf.args(["trace", "-s", "-p", &pid, "-o"])
            .arg(dir.join("daemon-syscalls.txt"));
    } else {
        perf.args(["record", "-F", "999", "-g", "-p", &pid, "-o"])
            .arg(dir.join("daemon-tmpfs.perf.data"));
    }
    let child = perf
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf")?;
    // perf needs a moment to attach.
    thread::sleep(Duration::from_secs(1));
    Ok(vec![child])
}

fn stop_profilers(profilers: Vec<Child>) {
    for mut p in profilers {
        let _ = Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
}

/// `store::write_atomic` of a state-sized file where the daemon keeps its state: the
/// floor under every durable ack.
fn fsync_floor(dir: &Path, n: usize) -> Result<(f64, f64)> {
    let path = dir.join("fsync-probe.json");
    let bytes = vec![b'x'; 400];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        edgetwin::store::write_atomic(&path, &bytes, 0o600)?;
        lat.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    lat.sort();
    Ok((ms(percentile(&lat, 50.0)), ms(percentile(&lat, 99.0))))
}

fn binary_sizes(dir: &Path) -> (u64, Option<u64>) {
    let bin = bin();
    let built = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let copy = dir.join("edgetwin.stripped");
    let stripped = std::fs::copy(&bin, &copy)
        .ok()
        .and_then(|_| Command::new("strip").arg(&copy).status().ok())
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&copy).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_file(&copy);
    (built, stripped)
}

// ---- report ---------------------------------------------------------------------------

fn fmt(v: f64, unit: &str) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if unit == "MiB" {
        format!("{:.2} MiB", v / 1024.0)
    } else if unit == "%" {
        format!("{v:.3} %")
    } else {
        format!("{v:.2} {unit}")
    }
}

fn print_table(rust: &Row, tmpfs: &Row, py: Option<&Row>) {
    const NAN: f64 = f64::NAN;
    let m = |v: &Vec<f64>| median_f(v);
    let p = |f: fn(&Row) -> &Vec<f64>| py.map_or(NAN, |p| median_f(f(p)));
    let pv = |f: fn(&Row) -> f64| py.map_or(NAN, f);
    #[rustfmt::skip]
    let rows: Vec<(&str, f64, f64, &str)> = vec![
        ("start → READY=1, fresh state", m(&rust.ready_fresh_ms), NAN, "ms"),
        ("start → READY=1, persisted state", m(&rust.ready_ms), NAN, "ms"),
        ("start → READY=1, hub unreachable", m(&rust.ready_unreachable_ms), NAN, "ms"),
        ("start → `ready` printed (connected)", NAN, p(|r| &r.ready_ms), "ms"),
        ("start → subscribed to desired", m(&rust.subscribed_ms), p(|r| &r.subscribed_ms), "ms"),
        ("start → twin read (GET 200)", m(&rust.synced_ms), NAN, "ms"),
        ("paced patch → ack p50", m(&rust.p50_ms), p(|r| &r.p50_ms), "ms"),
        ("paced patch → ack p99", m(&rust.p99_ms), p(|r| &r.p99_ms), "ms"),
        ("paced patch → ack max", m(&rust.max_ms), p(|r| &r.max_ms), "ms"),
        ("burst → final version acked", m(&rust.burst_ms), p(|r| &r.burst_ms), "ms"),
        ("  (service side issuing the burst)", m(&rust.burst_issue_ms), p(|r| &r.burst_issue_ms), "ms"),
        ("  daemon state on tmpfs: paced p50", m(&tmpfs.p50_ms), NAN, "ms"),
        ("  daemon state on tmpfs: paced p99", m(&tmpfs.p99_ms), NAN, "ms"),
        ("  daemon state on tmpfs: paced max", m(&tmpfs.max_ms), NAN, "ms"),
        ("  daemon state on tmpfs: burst", m(&tmpfs.burst_ms), NAN, "ms"),
        ("hub back → reconnected", m(&rust.resync_connected_ms), p(|r| &r.resync_connected_ms), "ms"),
        ("hub back → twin resynced (ack)", m(&rust.resync_ms), p(|r| &r.resync_ms), "ms"),
        ("RSS after start", rust.rss_start_kib, pv(|r| r.rss_start_kib), "MiB"),
        ("  of which anonymous", rust.rss_anon_start_kib, pv(|r| r.rss_anon_start_kib), "MiB"),
        ("  of which file-backed", rust.rss_file_start_kib, pv(|r| r.rss_file_start_kib), "MiB"),
        ("RSS after bursts", rust.rss_burst_kib, pv(|r| r.rss_burst_kib), "MiB"),
        ("RSS after idle", rust.rss_idle_kib, pv(|r| r.rss_idle_kib), "MiB"),
        ("  of which anonymous (heap, stacks)", rust.rss_anon_kib, pv(|r| r.rss_anon_kib), "MiB"),
        ("  of which file-backed (code, libraries)", rust.rss_file_kib, pv(|r| r.rss_file_kib), "MiB"),
        ("peak RSS (VmHWM)", rust.rss_peak_kib, pv(|r| r.rss_peak_kib), "MiB"),
        ("idle CPU (of one core)", rust.idle_cpu_pct, pv(|r| r.idle_cpu_pct), "%"),
        ("CPU time for the paced and burst work", rust.work_cpu_s, pv(|r| r.work_cpu_s), "s"),
    ];
    println!();
    println!(
        "| {:<42} | {:>14} | {:>14} | {:>15} |",
        "metric (median)", "edgetwin", "Python SDK", "Python/edgetwin"
    );
    println!("|{:-<44}|{:->16}|{:->16}|{:->17}|", "", "", "", "");
    for (name, r, p, unit) in rows {
        let ratio = if r.is_nan() || p.is_nan() || r == 0.0 {
            String::new()
        } else {
            format!("{:.2}×", p / r)
        };
        println!(
            "| {:<42} | {:>14} | {:>14} | {:>15} |",
            name,
            fmt(r, unit),
            fmt(p, unit),
            ratio
        );
    }
    println!("(Python/edgetwin above 1: edgetwin is that many times faster or smaller)");
}

fn print_raw(name: &str, row: &Row) {
    let list = |v: &Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\nraw values per repetition, {name} (ms):");
    for (label, v) in [
        ("ready fresh", &row.ready_fresh_ms),
        ("ready (Python: `ready` line)", &row.ready_ms),
        ("ready unreachable", &row.ready_unreachable_ms),
        ("subscribed", &row.subscribed_ms),
        ("twin read", &row.synced_ms),
        ("p50", &row.p50_ms),
        ("p99", &row.p99_ms),
        ("max", &row.max_ms),
        ("burst", &row.burst_ms),
        ("burst issue", &row.burst_issue_ms),
        ("resync connected", &row.resync_connected_ms),
        ("resync acked", &row.resync_ms),
    ] {
        if !v.is_empty() {
            println!("  {label:<26} {}", list(v));
        }
    }
    for (label, list) in [
        ("RSS at each burst's end", &row.rss_each_burst_kib),
        ("RSS 4 s after each burst", &row.rss_settled_kib),
        ("  of which anonymous", &row.rss_settled_anon_kib),
    ] {
        if !list.is_empty() {
            let mib: Vec<String> = list.iter().map(|k| format!("{:.2}", k / 1024.0)).collect();
            println!("  {label:<26} {} MiB", mib.join(", "));
        }
    }
    for note in &row.burst_notes {
        println!("  burst: {note}");
    }
}

// ---- main -----------------------------------------------------------------------------

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let opts = Opts::from_env();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "edgetwin twin bench: {} mode, {} repetitions, {} paced patches, {} bursts of {}, idle CPU over {} s, idle RSS after {} s",
        if opts.quick { "quick" } else { "full" },
        opts.repeats,
        opts.paced,
        opts.bursts,
        opts.burst,
        opts.cpu_secs,
        opts.idle_secs.max(opts.cpu_secs)
    );
    println!("load average at start: {}", load.trim());
    println!("daemon binary: {}", bin().display());
    if !opts.gap.is_zero() {
        println!(
            "paced patches {} ms apart after each ack",
            opts.gap.as_millis()
        );
    }

    let work = Path::new(REPO).join("target/bench-twin");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let shm = Path::new("/dev/shm");
    let sim_dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("edgetwin-bench-sim-")
            .tempdir_in(shm)?
    } else {
        tempfile::Builder::new()
            .prefix("edgetwin-bench-sim-")
            .tempdir()?
    };
    let (mut hub, on_8883) = Hubside::start(&opts, &sim_dir.path().join("state"))?;
    println!(
        "emulator: MQTT {} (state on {}), daemon state on {}",
        hub.config.mqtt_addr,
        sim_dir.path().display(),
        work.display()
    );

    let (floor50, floor99) = fsync_floor(&work, if opts.quick { 20 } else { 200 })?;
    println!(
        "storage floor: store::write_atomic (write, fsync, rename, fsync dir) p50 {floor50:.2} ms, p99 {floor99:.2} ms"
    );
    let (built, stripped) = binary_sizes(&work);
    println!(
        "binary: {:.2} MiB as built (release, strip = \"debuginfo\"), {} stripped",
        built as f64 / 1048576.0,
        stripped.map_or("n/a".into(), |s| format!("{:.2} MiB", s as f64 / 1048576.0))
    );

    // edgetwin
    eprintln!("edgetwin: start-up");
    let files = DaemonFiles::write(&work.join("daemon"), &work.join("daemon/state"), &hub)?;
    let mut rust = Row::new();
    rust_startups(&opts, &hub, &files, &mut rust)?;
    let daemon = spawn_daemon(&files, &files.config)?;
    daemon.wait_ready()?;
    let result = steady(&opts, &mut hub, &daemon, Kind::Rust, true, &mut rust);
    daemon.stop();
    result?;

    let tmpfs_wanted = std::env::var("EDGETWIN_BENCH_TMPFS").map_or(true, |v| v != "0");
    eprintln!("edgetwin, state on tmpfs");
    let tmpfs_state = tempfile::Builder::new()
        .prefix("edgetwin-bench-state-")
        .tempdir_in(if shm.is_dir() { shm } else { &work })?;
    let files = DaemonFiles::write(&work.join("daemon-tmpfs"), tmpfs_state.path(), &hub)?;
    let mut tmpfs = Row::new();
    let daemon = spawn_daemon(&files, &files.config)?;
    daemon.wait_ready()?;
    let result = if tmpfs_wanted {
        steady(&opts, &mut hub, &daemon, Kind::Rust, false, &mut tmpfs)
    } else {
        Ok(())
    };
    daemon.stop();
    result?;

    // Python
    let mut py_row = None;
    match opts.python.as_deref() {
        Some(python) if on_8883 && python.exists() => {
            eprintln!("python: start-up");
            let log = work.join("python.log");
            let mut row = Row::new();
            python_startups(&opts, &hub, python, &log, &mut row)?;
            let p = spawn_python(python, &hub, &log)?;
            p.wait_ready()?;
            let result = steady(&opts, &mut hub, &p, Kind::Python, true, &mut row);
            p.stop();
            result?;
            py_row = Some(row);
        }
        Some(python) if !python.exists() => {
            println!("Python receiver skipped: {} not found (create .venv with azure-iot-device==2.14.0)", python.display());
        }
        Some(_) => println!("Python receiver skipped: the emulator is not on 127.0.0.1:8883"),
        None => println!("Python receiver skipped (EDGETWIN_BENCH_PYTHON=0)"),
    }
    hub.stop();

    print_table(&rust, &tmpfs, py_row.as_ref());
    print_raw("edgetwin", &rust);
    print_raw("edgetwin, state on tmpfs (not durable)", &tmpfs);
    if let Some(p) = &py_row {
        print_raw("Python SDK", p);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at end: {}", load.trim());
    Ok(())
}
