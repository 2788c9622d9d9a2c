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
//! Timings are printed, never asserted. `hub_side`: the hub's counters and the operator's
//! REST calls; `report`: what is printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use edgetwin::app::{self, ReadyView, RunControl};
use edgetwin::config::Settings;
use edgetwin::hub::session::ConnectionState;
use edgetwin_sim::hub::Hub;
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::throttle::Kind;
use edgetwin_sim::{Sim, SimConfig, Tier};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MODULE: &str = "edgetwin";
const PROPERTY: &str = "fleetSetting";
const POLL: Duration = Duration::from_millis(50);

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

mod hub_side;
mod report;

use hub_side::{acked, configuration, desired_versions, patch_all, until_acked, Rest, Sampler};
use report::{print_raw, print_table, Figures};

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

fn applied(g: &Gateway, value: u64) -> bool {
    g.view.state.borrow().properties.get(PROPERTY) == Some(&json!(value))
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

// ---- one fleet size --------------------------------------------------------------------

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
