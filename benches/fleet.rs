//! `cargo bench --bench fleet`: N edgetwin gateways against one throttled emulator.
//!
//! Every gateway is the real daemon (`edgetwin::app::run_with`, the code `edgetwin run`
//! runs) with its own module identity, config file and state directory, all in this one
//! process on one tokio runtime with the emulator (`Sim`, on ephemeral loopback ports, at
//! `--tier s1 --units 1` by default). In-process rather than N processes: a process per
//! gateway costs its own runtime threads and ~10 MB of RSS, so 1,000 of them would measure
//! the 2-core machine's scheduler more than the protocol; in one runtime the gateways share
//! two worker threads with the emulator, as the hub-side work does on a real machine.
//!
//! Registration happens before the clock starts, with throttling off (as a fleet is
//! registered once, by bulk import); the tier is switched on for the measured phases:
//!
//! 1. cold start: every gateway started at once → all connected with their twin read
//!    (`desired_version` known);
//! 2. rollout: one desired patch per module through the REST API (`PATCH /twins/..`, at
//!    most `EDGETWIN_FLEET_WRITERS` in flight, 429 retried with jittered backoff, as an
//!    operator's script would) → every gateway applied it, → every ack in the hub;
//! 3. outage: the hub is stopped, every module's desired changes while it is down (written
//!    to its state directory, as the service side of a real hub would still accept them),
//!    the hub is started again on the same ports after `EDGETWIN_FLEET_OUTAGE_SECS` → every
//!    gateway reconnected, resynced (applied the version written while down) and acked.
//!
//! Rates seen by the hub are sampled from its throttle counters every 100 ms; a peak is
//! the most operations accepted in any 1 s window. The bound of a phase is the time the
//! tier's buckets alone impose: per kind, the operations beyond the burst (one period's
//! worth) divided by the rate, the largest over kinds (N / limit, less the burst).
//! At the end every gateway's state in force is compared with the hub's desired twin (and
//! its ack with the version): any difference is a lost version.
//!
//! Environment (all optional): `EDGETWIN_FLEET_N` ("100,1000": the fleet sizes, run in
//! turn); `EDGETWIN_FLEET_TIER` (s1) and `EDGETWIN_FLEET_UNITS` (1);
//! `EDGETWIN_FLEET_OUTAGE_SECS` (10); `EDGETWIN_FLEET_WRITERS` (8);
//! `EDGETWIN_FLEET_DIR` (`/dev/shm`: the gateways' and the emulator's state on tmpfs, so
//! the shared disk stays out of it); `EDGETWIN_FLEET_TIMEOUT_SECS` (1800 per phase).
//!
//! Timings are printed, never asserted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use edgetwin::app::{self, ReadyView, RunControl};
use edgetwin::config::Settings;
use edgetwin::hub::session::ConnectionState;
use edgetwin::identity::ServiceCredentials;
use edgetwin_sim::hub::Hub;
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::throttle::{Counts, Kind};
use edgetwin_sim::{Sim, SimConfig, Tier};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MODULE: &str = "edgetwin";
const PROPERTY: &str = "fleetSetting";
const POLL: Duration = Duration::from_millis(50);
const SAMPLE: Duration = Duration::from_millis(100);

struct Opts {
    sizes: Vec<usize>,
    tier: Tier,
    units: u32,
    outage: Duration,
    writers: usize,
    /// Roll out by a desired patch per module instead of a module configuration.
    patch_rollout: bool,
    dir: PathBuf,
    timeout: Duration,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Opts {
    fn from_env() -> Result<Opts> {
        let sizes = std::env::var("EDGETWIN_FLEET_N").unwrap_or_else(|_| "100,1000".into());
        let sizes = sizes
            .split(',')
            .map(|s| s.trim().parse::<usize>().context("EDGETWIN_FLEET_N"))
            .collect::<Result<Vec<_>>>()?;
        let tier = std::env::var("EDGETWIN_FLEET_TIER").unwrap_or_else(|_| "s1".into());
        Ok(Opts {
            sizes,
            tier: tier.parse()?,
            units: env_num("EDGETWIN_FLEET_UNITS", 1).max(1) as u32,
            outage: Duration::from_secs(env_num("EDGETWIN_FLEET_OUTAGE_SECS", 10)),
            writers: env_num("EDGETWIN_FLEET_WRITERS", 8).max(1) as usize,
            patch_rollout: std::env::var("EDGETWIN_FLEET_ROLLOUT").is_ok_and(|v| v == "patch"),
            dir: std::env::var_os("EDGETWIN_FLEET_DIR")
                .map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from),
            timeout: Duration::from_secs(env_num("EDGETWIN_FLEET_TIMEOUT_SECS", 1800)),
        })
    }
}

fn device(i: usize) -> String {
    format!("gw{i:05}")
}

// ---- gateways -------------------------------------------------------------------------

struct Gateway {
    device: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), app::AppError>>,
    view: ReadyView,
}

fn settings(root: &Path, sim: &Sim, device: &str) -> Result<Settings> {
    let dir = root.join(device);
    std::fs::create_dir_all(dir.join("state"))?;
    let connstr = sim
        .hub()
        .module_connection_string(device, MODULE)
        .context("registered")?;
    let path = dir.join("edgetwin.toml");
    // The daemon's defaults otherwise: backoff, timeouts, telemetry every 60 s.
    let text = format!(
        "[hub]\nconnection_string = \"{connstr}\"\ngateway_host = \"127.0.0.1:{}\"\n\
         ca_file = \"{}\"\n\n[state]\ndir = \"{}\"\n",
        sim.mqtt_addr().port(),
        sim.ca_path().display(),
        dir.join("state").display(),
    );
    std::fs::write(&path, text)?;
    Settings::load(Some(&path)).map_err(|e| anyhow::anyhow!("{device}: {e}"))
}

async fn start_gateways(root: &Path, sim: &Sim, n: usize) -> Result<Vec<Gateway>> {
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let device = device(i);
        let settings = settings(root, sim, &device)?;
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let control = RunControl {
            reloads: None,
            on_ready: Some(ready_tx),
        };
        let task = tokio::spawn(app::run_with(settings, shutdown.clone(), control));
        pending.push((device, shutdown, task, ready_rx));
    }
    let mut gateways = Vec::with_capacity(n);
    for (device, shutdown, task, ready) in pending {
        let view = ready
            .await
            .with_context(|| format!("{device} did not reach READY"))?;
        gateways.push(Gateway {
            device,
            shutdown,
            task,
            view,
        });
    }
    Ok(gateways)
}

async fn stop_gateways(gateways: Vec<Gateway>) {
    for g in &gateways {
        g.shutdown.cancel();
    }
    for g in gateways {
        let _ = g.task.await;
    }
}

fn connected(g: &Gateway) -> bool {
    *g.view.connection.borrow() == ConnectionState::Connected
}

/// Polls until `done` holds for every gateway; returns how long it took from `since`.
async fn until_all(
    gateways: &[Gateway],
    since: Instant,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Gateway) -> bool,
) -> Result<Duration> {
    let mut left: Vec<usize> = (0..gateways.len()).collect();
    loop {
        left.retain(|&i| !done(&gateways[i]));
        if left.is_empty() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!(
                "{what}: {} gateways still not there after {timeout:?}",
                left.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---- the hub's view: rates -------------------------------------------------------------

/// Reads the hub's counters every [`SAMPLE`] on a thread of its own, so a busy runtime
/// (a thousand gateways on two cores) does not starve it.
struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Counts)>>,
}

impl Sampler {
    fn start(hub: Hub) -> Sampler {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = vec![(Instant::now(), hub.throttle_counts())];
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE);
                // On a loaded machine the thread can be descheduled between reading the
                // clock and the counters; such a sample would skew its window, so it is
                // dropped.
                let before = Instant::now();
                let counts = hub.throttle_counts();
                if before.elapsed() < Duration::from_millis(5) {
                    samples.push((before, counts));
                }
            }
            samples
        });
        Sampler { stop, thread }
    }

    async fn finish(self) -> Rates {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread;
        let samples = tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default();
        Rates(samples)
    }
}

struct Rates(Vec<(Instant, Counts)>);

impl Rates {
    /// Most operations of `kind` accepted within any 1 s window.
    fn peak(&self, kind: Kind) -> u64 {
        let s = &self.0;
        let mut best = 0;
        let mut j = 0;
        for i in 0..s.len() {
            while j + 1 < s.len() && s[j + 1].0.duration_since(s[i].0) <= Duration::from_secs(1) {
                j += 1;
            }
            j = j.max(i);
            best = best.max(s[j].1.get(kind).accepted - s[i].1.get(kind).accepted);
        }
        best
    }

    fn total(&self, kind: Kind) -> (u64, u64) {
        let (Some(first), Some(last)) = (self.0.first(), self.0.last()) else {
            return (0, 0);
        };
        let (a, b) = (first.1.get(kind), last.1.get(kind));
        (b.accepted - a.accepted, b.throttled - a.throttled)
    }

    /// Seconds the tier's buckets alone need for what was accepted in the phase: per
    /// kind, what exceeds the burst (one period's worth) at the rate; the slowest kind.
    fn bound(&self) -> f64 {
        let Some((_, last)) = self.0.last() else {
            return 0.0;
        };
        Kind::ALL
            .iter()
            .filter_map(|&k| {
                let rate = last.limit(k)?;
                let beyond = self.total(k).0.saturating_sub(u64::from(rate.amount));
                Some(beyond as f64 / rate.per_second())
            })
            .fold(0.0, f64::max)
    }
}

// ---- service side ----------------------------------------------------------------------

struct Rest {
    client: reqwest::Client,
    base: String,
    creds: ServiceCredentials,
}

impl Rest {
    fn new(sim: &Sim) -> Result<Rest> {
        let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes())?;
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("localhost", sim.https_addr())
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        let creds = sim
            // Configurations need RegistryWrite as well as ServiceConnect.
            .service_connection_string("iothubowner")
            .context("iothubowner policy")?
            .parse()?;
        Ok(Rest {
            client,
            base: format!("https://{}", sim.rest_authority()),
            creds,
        })
    }

    /// PATCH desired; 429 retried with jittered backoff. Returns the new desired `$version`
    /// and how many 429s it took.
    async fn set_desired(&self, device: &str, value: u64) -> Result<(u64, u64)> {
        let url = format!(
            "{}/twins/{device}/modules/{MODULE}?api-version=2021-04-12",
            self.base
        );
        let body = json!({"properties": {"desired": {PROPERTY: value}}});
        let mut throttled = 0;
        let mut ceiling = Duration::from_millis(200);
        loop {
            let token = self.creds.sas_token(edgetwin_sim::hub::unix_now() + 3600);
            let res = self
                .client
                .patch(&url)
                .header("Authorization", token)
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.to_string())
                .send()
                .await?;
            match res.status().as_u16() {
                200 => {
                    let twin: Value = res.json().await?;
                    let version = twin["properties"]["desired"]["$version"]
                        .as_u64()
                        .context("desired $version")?;
                    return Ok((version, throttled));
                }
                429 => {
                    throttled += 1;
                    let jitter = rand_below(ceiling.as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    ceiling = (ceiling * 2).min(Duration::from_secs(5));
                }
                status => bail!("PATCH {device}: {status} {}", res.text().await?),
            }
        }
    }
}

fn rand_below(n: u64) -> u64 {
    use rand::Rng;
    rand::rng().random_range(0..n.max(1))
}

/// The rollout as a module configuration (PROTOCOL §14.3) targeting every gateway's module.
fn configuration(value: u64, priority: i64) -> Value {
    json!({
        "schemaVersion": "2.0",
        "labels": {},
        "content": {"moduleContent": {format!("properties.desired.{PROPERTY}"): value}},
        "targetCondition": format!("FROM devices.modules WHERE moduleId = '{MODULE}'"),
        "priority": priority,
        "metrics": {"queries": {}},
    })
}

impl Rest {
    /// `PUT /configurations/{id}`; 429 retried. Returns how many 429s it took.
    async fn put_configuration(&self, id: &str, value: u64, priority: i64) -> Result<u64> {
        let url = format!("{}/configurations/{id}?api-version=2021-04-12", self.base);
        let mut body = configuration(value, priority);
        body["id"] = json!(id);
        let mut throttled = 0;
        loop {
            let token = self.creds.sas_token(edgetwin_sim::hub::unix_now() + 3600);
            let res = self
                .client
                .put(&url)
                .header("Authorization", token)
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.to_string())
                .send()
                .await?;
            match res.status().as_u16() {
                200 | 201 => return Ok(throttled),
                429 => {
                    throttled += 1;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                status => bail!("PUT configuration {id}: {status} {}", res.text().await?),
            }
        }
    }
}

/// One desired patch per module, `writers` at a time; the versions written and the 429s.
async fn patch_all(
    rest: &Arc<Rest>,
    n: usize,
    value: u64,
    writers: usize,
) -> Result<(Vec<(String, u64)>, u64)> {
    let queue = Arc::new(Mutex::new((0..n).map(device).collect::<Vec<_>>()));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (rest, queue) = (Arc::clone(rest), Arc::clone(&queue));
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut throttled = 0;
            loop {
                let next = queue.lock().expect("queue").pop();
                let Some(d) = next else { break };
                let (v, t) = rest.set_desired(&d, value).await?;
                throttled += t;
                done.push((d, v));
            }
            anyhow::Ok((done, throttled))
        }));
    }
    let mut versions = Vec::new();
    let mut throttled = 0;
    for t in tasks {
        let (done, t) = t.await??;
        versions.extend(done);
        throttled += t;
    }
    Ok((versions, throttled))
}

/// Every gateway's desired `$version` in the hub now.
fn desired_versions(hub: &Hub, n: usize) -> Result<Vec<(String, u64)>> {
    (0..n)
        .map(|i| {
            let d = device(i);
            let twin = hub.get_module_twin(&d, MODULE)?;
            let v = twin["properties"]["desired"]["$version"]
                .as_u64()
                .unwrap_or(0);
            Ok((d, v))
        })
        .collect()
}

fn acked(hub: &Hub, device: &str, version: u64) -> bool {
    hub.get_module_twin(device, MODULE).is_ok_and(|t| {
        t["properties"]["reported"][PROPERTY]["av"]
            .as_u64()
            .is_some_and(|av| av >= version)
    })
}

async fn until_acked(
    hub: &Hub,
    versions: &[(String, u64)],
    since: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let mut left: Vec<&(String, u64)> = versions.iter().collect();
    loop {
        left.retain(|(d, v)| !acked(hub, d, *v));
        if left.is_empty() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!("acks: {} modules still unacknowledged", left.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn applied(g: &Gateway, value: u64) -> bool {
    g.view.state.borrow().properties.get(PROPERTY) == Some(&json!(value))
}

// ---- one fleet size --------------------------------------------------------------------

#[derive(Default)]
struct Figures {
    n: usize,
    cold: f64,
    cold_bound: f64,
    cold_peaks: (u64, u64),
    cold_throttled: (u64, u64),
    rollout_how: &'static str,
    rollout_applied: f64,
    rollout_acked: f64,
    rollout_bound: f64,
    rollout_429_rest: u64,
    rollout_throttled_updates: u64,
    resync_connected: f64,
    resync_applied: f64,
    resync_acked: f64,
    resync_bound: f64,
    resync_peaks: (u64, u64, u64),
    resync_throttled: (u64, u64, u64),
    lost: usize,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn run_fleet(opts: &Opts, n: usize) -> Result<Figures> {
    let root = tempfile::Builder::new()
        .prefix("edgetwin-fleet-")
        .tempdir_in(&opts.dir)?;
    let sim_dir = root.path().join("hub");
    let mut sim = Sim::start(SimConfig::ephemeral(&sim_dir)).await?;
    // Registered from a few threads so their writes of hub.json are shared (group commit).
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let hub = sim.hub().clone();
                scope.spawn(move || -> Result<()> {
                    for i in (w..n).step_by(4) {
                        let d = device(i);
                        hub.put_device(&d, &json!({}), None)?;
                        hub.put_module(&d, MODULE, &json!({}), None)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("registration panicked"))?
        })
    })?;
    sim.set_throttle(opts.tier, opts.units);
    let mut f = Figures {
        n,
        ..Figures::default()
    };

    // 1. Cold start.
    let sampler = Sampler::start(sim.hub().clone());
    let t0 = Instant::now();
    let gateways = start_gateways(root.path(), &sim, n).await?;
    let cold = until_all(&gateways, t0, opts.timeout, "cold start", |g| {
        connected(g) && g.view.state.borrow().desired_version.is_some()
    })
    .await?;
    let rates = sampler.finish().await;
    f.cold = secs(cold);
    f.cold_bound = rates.bound();
    f.cold_peaks = (rates.peak(Kind::DeviceConnect), rates.peak(Kind::TwinRead));
    f.cold_throttled = (
        rates.total(Kind::DeviceConnect).1,
        rates.total(Kind::TwinRead).1,
    );
    eprintln!("fleet {n}: cold start {:.1} s", f.cold);

    // 2. Rollout: a module configuration, or a desired patch per module, over REST.
    let rest = Arc::new(Rest::new(&sim)?);
    let sampler = Sampler::start(sim.hub().clone());
    let value = 1_000 + n as u64;
    let t1 = Instant::now();
    f.rollout_how = if opts.patch_rollout {
        "a desired PATCH per module over REST"
    } else {
        "one module configuration over REST"
    };
    let versions = if opts.patch_rollout {
        let (versions, throttled) = patch_all(&rest, n, value, opts.writers).await?;
        f.rollout_429_rest = throttled;
        versions
    } else {
        f.rollout_429_rest = rest.put_configuration("rollout-1", value, 10).await?;
        desired_versions(sim.hub(), n)?
    };
    let applied_in = until_all(&gateways, t1, opts.timeout, "rollout", |g| {
        applied(g, value)
    })
    .await?;
    let acked_in = until_acked(sim.hub(), &versions, t1, opts.timeout).await?;
    let rates = sampler.finish().await;
    f.rollout_applied = secs(applied_in);
    f.rollout_acked = secs(acked_in);
    f.rollout_bound = rates.bound();
    f.rollout_throttled_updates = rates.total(Kind::TwinUpdate).1;
    eprintln!(
        "fleet {n}: rollout applied {:.1} s, acked {:.1} s",
        f.rollout_applied, f.rollout_acked
    );

    // 3. Outage: stop, change every twin while down, start again on the same ports.
    let config = SimConfig {
        mqtt_addr: sim.mqtt_addr(),
        https_addr: sim.https_addr(),
        hub_name: sim.hub_name().to_string(),
        ..SimConfig::ephemeral(&sim_dir)
    };
    sim.shutdown().await;
    let value = 2_000 + n as u64;
    let down = Instant::now();
    {
        // What the service side changes while the hub is down: a new configuration with a
        // higher priority (configurations' content is immutable), or a patch per module.
        let hub = Hub::open(&config.hub_name, &config.state_dir)?;
        if opts.patch_rollout {
            for i in 0..n {
                let body = json!({"properties": {"desired": {PROPERTY: value}}});
                hub.write_module_twin(&device(i), MODULE, TwinWrite::Patch, &body, None)?;
            }
        } else {
            hub.put_configuration("rollout-2", &configuration(value, 20), None)?;
        }
    }
    tokio::time::sleep(opts.outage.saturating_sub(down.elapsed())).await;
    sim = Sim::start(config).await?;
    sim.set_throttle(opts.tier, opts.units);
    let sampler = Sampler::start(sim.hub().clone());
    let t2 = Instant::now();
    let versions = desired_versions(sim.hub(), n)?;
    let connected_in = until_all(&gateways, t2, opts.timeout, "reconnect", connected).await?;
    let applied_in =
        until_all(&gateways, t2, opts.timeout, "resync", |g| applied(g, value)).await?;
    let acked_in = until_acked(sim.hub(), &versions, t2, opts.timeout).await?;
    let rates = sampler.finish().await;
    f.resync_connected = secs(connected_in);
    f.resync_applied = secs(applied_in);
    f.resync_acked = secs(acked_in);
    f.resync_bound = rates.bound();
    f.resync_peaks = (
        rates.peak(Kind::DeviceConnect),
        rates.peak(Kind::TwinRead),
        rates.peak(Kind::TwinUpdate),
    );
    f.resync_throttled = (
        rates.total(Kind::DeviceConnect).1,
        rates.total(Kind::TwinRead).1,
        rates.total(Kind::TwinUpdate).1,
    );
    eprintln!(
        "fleet {n}: resync connected {:.1} s, applied {:.1} s, acked {:.1} s",
        f.resync_connected, f.resync_applied, f.resync_acked
    );

    // Every gateway's state in force against the hub's desired twin.
    for (g, (_, version)) in gateways.iter().zip(&versions) {
        let state = g.view.state.borrow();
        let twin = sim.hub().get_module_twin(&g.device, MODULE)?;
        let ok = state.desired_version == Some(*version)
            && state.properties.get(PROPERTY) == Some(&twin["properties"]["desired"][PROPERTY])
            && acked(sim.hub(), &g.device, *version);
        if !ok {
            f.lost += 1;
        }
    }
    print!("{}", sim.throttle_counts());
    stop_gateways(gateways).await;
    sim.shutdown().await;
    Ok(f)
}

// ---- report ----------------------------------------------------------------------------

/// `time / bound`, or `-` when everything fitted in the burst (bound 0).
fn ratio_text(time: f64, bound: f64) -> String {
    if bound > 0.0 {
        format!("{:.2}", time / bound)
    } else {
        "-".into()
    }
}

fn print_raw(f: &Figures, limits: (f64, f64, f64)) {
    let (conn, read, update) = limits;
    println!("\n== fleet of {} gateways ==", f.n);
    println!(
        "cold start: all connected + twin read in {:.2} s (bound {:.2} s, ratio {}); \
         peak {} connects/s (limit {conn}), {} twin reads/s (limit {read}); \
         throttled: {} connects, {} twin reads",
        f.cold,
        f.cold_bound,
        ratio_text(f.cold, f.cold_bound),
        f.cold_peaks.0,
        f.cold_peaks.1,
        f.cold_throttled.0,
        f.cold_throttled.1
    );
    println!(
        "rollout ({}): all applied in {:.2} s, all acked in \
         {:.2} s (bound {:.2} s, ratio {}); 429s: {} to the operator, {} twin updates \
         in all (limit {update}/s)",
        f.rollout_how,
        f.rollout_applied,
        f.rollout_acked,
        f.rollout_bound,
        ratio_text(f.rollout_acked, f.rollout_bound),
        f.rollout_429_rest,
        f.rollout_throttled_updates
    );
    println!(
        "outage and restart: all reconnected in {:.2} s, resynced (applied) in {:.2} s, acked in \
         {:.2} s (bound {:.2} s, ratio {}); peak {} connects/s, {} twin reads/s, {} twin \
         updates/s; throttled: {} connects, {} twin reads, {} twin updates; lost versions: {}",
        f.resync_connected,
        f.resync_applied,
        f.resync_acked,
        f.resync_bound,
        ratio_text(f.resync_acked, f.resync_bound),
        f.resync_peaks.0,
        f.resync_peaks.1,
        f.resync_peaks.2,
        f.resync_throttled.0,
        f.resync_throttled.1,
        f.resync_throttled.2,
        f.lost
    );
}

fn print_table(all: &[Figures]) {
    println!(
        "\n| figure | {} |",
        all.iter()
            .map(|f| format!("N = {}", f.n))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(all.len()));
    let row = |name: &str, cell: &dyn Fn(&Figures) -> String| {
        println!(
            "| {name} | {} |",
            all.iter().map(cell).collect::<Vec<_>>().join(" | ")
        );
    };
    let ratio = |t: f64, b: f64| {
        if b > 0.0 {
            format!("{t:.1} s ({:.2}× bound {b:.1} s)", t / b)
        } else {
            format!("{t:.1} s (within the burst)")
        }
    };
    row("cold start: connected + twin read", &|f| {
        ratio(f.cold, f.cold_bound)
    });
    row("cold start: peak connects/s, twin reads/s", &|f| {
        format!("{}, {}", f.cold_peaks.0, f.cold_peaks.1)
    });
    row("cold start: throttled connects, twin reads", &|f| {
        format!("{}, {}", f.cold_throttled.0, f.cold_throttled.1)
    });
    row("rollout: all applied", &|f| {
        format!("{:.1} s", f.rollout_applied)
    });
    row("rollout: all acked", &|f| {
        ratio(f.rollout_acked, f.rollout_bound)
    });
    row(
        "rollout: 429s to the operator, throttled twin updates",
        &|f| format!("{}, {}", f.rollout_429_rest, f.rollout_throttled_updates),
    );
    row("outage: all reconnected", &|f| {
        format!("{:.1} s", f.resync_connected)
    });
    row("outage: all resynced (applied)", &|f| {
        format!("{:.1} s", f.resync_applied)
    });
    row("outage: all acked", &|f| {
        ratio(f.resync_acked, f.resync_bound)
    });
    row("outage: peak connects/s, reads/s, updates/s", &|f| {
        format!(
            "{}, {}, {}",
            f.resync_peaks.0, f.resync_peaks.1, f.resync_peaks.2
        )
    });
    row("outage: throttled connects, reads, updates", &|f| {
        format!(
            "{}, {}, {}",
            f.resync_throttled.0, f.resync_throttled.1, f.resync_throttled.2
        )
    });
    row("lost versions", &|f| f.lost.to_string());
}

fn main() -> Result<()> {
    let opts = Opts::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rate = |k| {
        edgetwin_sim::throttle::rate(opts.tier, opts.units, k)
            .map_or(f64::INFINITY, |r| r.per_second())
    };
    let limits = (
        rate(Kind::DeviceConnect),
        rate(Kind::TwinRead),
        rate(Kind::TwinUpdate),
    );
    println!(
        "fleet bench: sizes {:?}, tier {} units {}, outage {:?}, {} REST writers, state under {}",
        opts.sizes,
        opts.tier,
        opts.units,
        opts.outage,
        opts.writers,
        opts.dir.display()
    );
    let mut all = Vec::new();
    for &n in &opts.sizes {
        let f = rt.block_on(run_fleet(&opts, n))?;
        print_raw(&f, limits);
        all.push(f);
    }
    print_table(&all);
    Ok(())
}
