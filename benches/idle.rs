//! `cargo bench --bench idle`: what an idle module costs on the wire per day — edgetwin as
//! shipped, edgetwin with the settings recommended for metered links, and Microsoft's
//! Python SDK (azure-iot-device 2.14, `benches/python_receiver.py`) with its defaults —
//! counted by the emulator beneath TLS ([`edgetwin_sim::wire`]: TCP payload bytes both
//! ways, handshakes and TLS records included, plus the kernel's segment counts), and the
//! operations the hub bills (telemetry messages, twin reads, twin updates; keep-alive
//! pings and connects are not billed).
//!
//! Time is scaled, never assumed: each client runs for real in phases of
//! `EDGETWIN_IDLE_SECS` (180) seconds, and the day is extrapolated from what was counted:
//!
//! - **steady**: the configured keep-alive and a token that does not expire in the window;
//!   bytes per second after the connection settled (keep-alive pings, telemetry);
//! - **renewal**: the same client with a short token (edgetwin `sas_ttl = 60s`, renewed at
//!   80 %, every 48 s; Python `sastoken_ttl = 180`, renewed 120 s before expiry, every
//!   60 s); per renewal = (bytes in the window − steady rate × window) / renewals seen;
//!   measured with the emulator allowing TLS resumption and, for edgetwin, refusing it;
//! - **day** = first connect + steady rate × 86,400 s + per renewal × renewals a day
//!   (edgetwin: 86,400 / (0.8 × sas_ttl); Python: 86,400 / (ttl − 120 s)).
//!
//! The metered-link variant differs from the shipped one only in its settings, so its
//! renewal cost is the shipped client's; its steady phase runs with telemetry off and a
//! 60 s keep-alive to count what one ping costs, and the day uses its own keep-alive and
//! token lifetime (`METERED_*` below) for the number of pings and renewals.
//!
//! IP-level bytes add 52 B per TCP segment (IPv4 20 + TCP 20 + timestamp option 12), from
//! the segment counts; link-layer framing (cellular or Ethernet) is not included.
//!
//! Environment: `EDGETWIN_IDLE_SECS` (180) per phase; `EDGETWIN_BENCH_PYTHON` (default
//! `.venv/bin/python`, `0` skips it); `EDGETWIN_BENCH_BIN` (the daemon to measure; bytes do
//! not depend on its build).
//! The emulator listens on 127.0.0.1:8883 (the Python SDK cannot dial another port), or on
//! a free port when Python is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use edgetwin_sim::hub::ModuleKey;
use edgetwin_sim::wire::{ConnectionWire, Listener};
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

const DEVICE: &str = "idle";
const MQTT_PORT: u16 = 8883;
const BUILT_BIN: &str = env!("CARGO_BIN_EXE_edgetwin");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DAY: f64 = 86_400.0;
/// IPv4 + TCP headers with the timestamp option, per segment.
const HEADER_BYTES: f64 = 52.0;
/// The shipped defaults (config/edgetwin.toml) and the Python SDK's.
const DEFAULT_KEEP_ALIVE: f64 = 60.0;
const DEFAULT_TTL: f64 = 3600.0;
const PYTHON_RENEW_MARGIN: f64 = 120.0;
/// Recommended for metered links (README, "Metered links").
const METERED_KEEP_ALIVE: f64 = 240.0;
const METERED_TTL: f64 = 86_400.0;

fn bin() -> PathBuf {
    std::env::var_os("EDGETWIN_BENCH_BIN").map_or_else(|| PathBuf::from(BUILT_BIN), PathBuf::from)
}

/// Counts of the hub's events per module, as they happen.
#[derive(Debug, Default, Clone, Copy)]
struct Billed {
    connects: u64,
    twin_gets: u64,
    reported: u64,
    telemetry: u64,
}

impl Billed {
    fn minus(self, o: Billed) -> Billed {
        Billed {
            connects: self.connects - o.connects,
            twin_gets: self.twin_gets - o.twin_gets,
            reported: self.reported - o.reported,
            telemetry: self.telemetry - o.telemetry,
        }
    }

    /// Billed messages (each of these is well under the 4 KB unit).
    fn messages(self) -> u64 {
        self.twin_gets + self.reported + self.telemetry
    }
}

struct Hubside {
    rt: tokio::runtime::Runtime,
    sim: Sim,
    counts: Arc<Mutex<std::collections::HashMap<String, Billed>>>,
}

impl Hubside {
    /// On 127.0.0.1:8883 when the Python SDK is measured (it dials no other port), else
    /// on a free port.
    fn start(state: &Path, port: u16) -> Result<Hubside> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut config = SimConfig::ephemeral(state);
        config.mqtt_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let sim = rt
            .block_on(Sim::start(config))
            .with_context(|| format!("the emulator needs 127.0.0.1:{port} free"))?;
        let hub = sim.hub();
        hub.put_device(DEVICE, &json!({}), None)
            .map_err(|e| anyhow!("device: {e:?}"))?;
        let counts: Arc<Mutex<std::collections::HashMap<String, Billed>>> = Arc::default();
        let mut events = hub.events();
        let sink = Arc::clone(&counts);
        thread::spawn(move || loop {
            let e = match events.blocking_recv() {
                Ok(e) => e,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => break,
            };
            let (module, field): (&ModuleKey, fn(&mut Billed)) = match &e {
                SimEvent::Connected { module, .. } => (module, |b| b.connects += 1),
                SimEvent::TwinGet { module, .. } => (module, |b| b.twin_gets += 1),
                SimEvent::ReportedPatched { module, .. } => (module, |b| b.reported += 1),
                SimEvent::Telemetry { module, .. } => (module, |b| b.telemetry += 1),
                _ => continue,
            };
            let mut map = sink.lock().expect("counts");
            field(map.entry(module.module_id.clone()).or_default());
        });
        Ok(Hubside { rt, sim, counts })
    }

    fn add_module(&self, module: &str) -> Result<String> {
        let hub = self.sim.hub();
        hub.put_module(DEVICE, module, &json!({}), None)
            .map_err(|e| anyhow!("module {module}: {e:?}"))?;
        hub.module_connection_string(DEVICE, module)
            .ok_or_else(|| anyhow!("no connection string for {module}"))
    }

    fn billed(&self, module: &str) -> Billed {
        self.counts
            .lock()
            .expect("counts")
            .get(module)
            .copied()
            .unwrap_or_default()
    }

    /// MQTT connections accepted after connection `after` (an id).
    fn mqtt_since(&self, after: Option<u64>) -> Vec<ConnectionWire> {
        self.sim
            .wire()
            .connections()
            .into_iter()
            .filter(|c| c.listener == Listener::Mqtt && after.map_or(true, |a| c.id > a))
            .collect()
    }

    fn last_id(&self) -> Option<u64> {
        self.sim.wire().connections().last().map(|c| c.id)
    }
}

/// Bytes and segments summed over connections.
#[derive(Debug, Default, Clone, Copy)]
struct Wire {
    up: u64,
    down: u64,
    segments: u64,
}

impl Wire {
    fn of(conns: &[ConnectionWire]) -> Wire {
        conns.iter().fold(Wire::default(), |w, c| Wire {
            up: w.up + c.bytes_from_client,
            down: w.down + c.bytes_to_client,
            segments: w.segments + u64::from(c.segments_in) + u64::from(c.segments_out),
        })
    }

    fn minus(self, o: Wire) -> Wire {
        Wire {
            up: self.up - o.up,
            down: self.down - o.down,
            segments: self.segments - o.segments,
        }
    }

    fn payload(self) -> f64 {
        (self.up + self.down) as f64
    }

    fn ip(self) -> f64 {
        self.payload() + HEADER_BYTES * self.segments as f64
    }
}

/// What to run: edgetwin with settings, or the Python receiver.
#[derive(Clone)]
enum Client {
    Edgetwin {
        sas_ttl: &'static str,
        keep_alive: &'static str,
        telemetry: bool,
    },
    Python {
        ttl: u32,
    },
}

struct Running {
    child: Child,
}

impl Running {
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(client: &Client, hub: &Hubside, module: &str, work: &Path) -> Result<Running> {
    let connstr = hub.add_module(module)?;
    let dir = work.join(module);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state"))?;
    let log = std::fs::File::create(dir.join("log"))?;
    let ca = hub.sim.ca_path();
    let child = match client {
        Client::Edgetwin {
            sas_ttl,
            keep_alive,
            telemetry,
        } => {
            let connstr_file = dir.join("module.connstr");
            edgetwin::store::write_atomic(&connstr_file, connstr.as_bytes(), 0o600)?;
            let config = dir.join("edgetwin.toml");
            std::fs::write(
                &config,
                format!(
                    "[hub]\nconnection_string_file = {:?}\ngateway_host = \"127.0.0.1:{}\"\n\
                     ca_file = {:?}\nsas_ttl = \"{sas_ttl}\"\nkeep_alive = \"{keep_alive}\"\n\n\
                     [telemetry]\nenabled = {telemetry}\n\n[state]\ndir = {:?}\n\n\
                     [log]\nlevel = \"info\"\nformat = \"text\"\n",
                    connstr_file.display().to_string(),
                    hub.sim.mqtt_addr().port(),
                    ca.display().to_string(),
                    dir.join("state").display().to_string(),
                ),
            )?;
            Command::new(bin())
                .arg("run")
                .arg("--config")
                .arg(&config)
                .env_remove("NOTIFY_SOCKET")
                .env_remove("EDGETWIN_LOG")
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawning edgetwin")?
        }
        Client::Python { ttl } => Command::new(python().context("no Python")?)
            .arg("-u")
            .arg(Path::new(REPO).join("benches/python_receiver.py"))
            .env("BENCH_CONNECTION_STRING", &connstr)
            .env("SSL_CERT_FILE", &ca)
            .env("BENCH_SASTOKEN_TTL", ttl.to_string())
            // The SDK as shipped: no resync of our own after a reconnect.
            .env("BENCH_RESYNC", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning the Python receiver")?,
    };
    Ok(Running { child })
}

fn python() -> Option<PathBuf> {
    match std::env::var("EDGETWIN_BENCH_PYTHON") {
        Ok(v) if v == "0" => None,
        Ok(v) => Some(PathBuf::from(v)),
        Err(_) => Some(Path::new(REPO).join(".venv/bin/python")),
    }
    .filter(|p| p.exists())
}

/// What one phase counted.
#[derive(Debug, Clone, Copy)]
struct Phase {
    secs: f64,
    /// From spawn until settled (first connect, subscribe, twin read, first report).
    first: Wire,
    /// In the measured window.
    window: Wire,
    billed: Billed,
    connections: u64,
    resumed: u64,
}

/// Runs `client` as `module`: waits until it connected, lets it settle for 5 s (subscribe,
/// twin read, first report), then counts for `secs`.
fn phase(hub: &Hubside, client: &Client, module: &str, secs: u64, work: &Path) -> Result<Phase> {
    let before = hub.last_id();
    let running = spawn(client, hub, module, work)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while hub.billed(module).connects == 0 {
        if Instant::now() > deadline {
            running.stop();
            return Err(anyhow!("{module}: not connected within 60 s"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_secs(5));
    let first = Wire::of(&hub.mqtt_since(before));
    let billed0 = hub.billed(module);
    let t0 = Instant::now();
    let id0 = hub.last_id();
    thread::sleep(Duration::from_secs(secs));
    let conns = hub.mqtt_since(before);
    let window = Wire::of(&conns).minus(first);
    let secs = t0.elapsed().as_secs_f64();
    let billed = hub.billed(module).minus(billed0);
    let opened: Vec<_> = hub.mqtt_since(id0);
    running.stop();
    Ok(Phase {
        secs,
        first,
        window,
        billed,
        connections: opened.len() as u64,
        resumed: opened.iter().filter(|c| c.resumed == Some(true)).count() as u64,
    })
}

fn per_day(count: u64, secs: f64) -> f64 {
    count as f64 / secs * DAY
}

fn print_phase(name: &str, p: &Phase) {
    println!(
        "  {name:<34} {:>6.0} s: first connect {} B up / {} B down ({} segments); window {} B up / {} B down, {} segments; {} new connections ({} resumed); twin GETs {}, reported {}, telemetry {}",
        p.secs, p.first.up, p.first.down, p.first.segments, p.window.up, p.window.down,
        p.window.segments, p.connections, p.resumed, p.billed.twin_gets, p.billed.reported,
        p.billed.telemetry
    );
}

/// One day: the first connect, the steady rate, and the renewals.
#[derive(Clone)]
struct DayModel {
    name: String,
    first: Wire,
    steady_payload_per_s: f64,
    steady_ip_per_s: f64,
    steady_billed_per_day: f64,
    renewal_payload: f64,
    renewal_ip: f64,
    renewal_billed: f64,
    renewals_per_day: f64,
}

impl DayModel {
    fn payload(&self) -> f64 {
        self.first.payload()
            + self.steady_payload_per_s * DAY
            + self.renewal_payload * self.renewals_per_day
    }

    fn ip(&self) -> f64 {
        self.first.ip() + self.steady_ip_per_s * DAY + self.renewal_ip * self.renewals_per_day
    }

    fn billed(&self) -> f64 {
        self.steady_billed_per_day + self.renewal_billed * self.renewals_per_day
    }
}

/// Per renewal: the window's bytes beyond the steady rate, over the renewals seen.
fn renewal(r: &Phase, steady: &Phase) -> (f64, f64, f64) {
    let n = r.connections.max(1) as f64;
    let payload = (r.window.payload() - steady.window.payload() / steady.secs * r.secs) / n;
    let ip = (r.window.ip() - steady.window.ip() / steady.secs * r.secs) / n;
    let billed =
        (r.billed.messages() as f64 - steady.billed.messages() as f64 / steady.secs * r.secs) / n;
    (payload, ip, billed.max(0.0))
}

fn kib(b: f64) -> String {
    format!("{:.1} KiB", b / 1024.0)
}

fn main() -> Result<()> {
    let secs: u64 = std::env::var("EDGETWIN_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "edgetwin idle bench: {secs} s per phase; load average at start: {}",
        load.trim()
    );
    println!("daemon binary: {}", bin().display());
    let work = Path::new(REPO).join(format!("target/bench-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let sim_dir = tempfile::Builder::new()
        .prefix("edgetwin-idle-sim-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })?;
    let port = if python().is_some() { MQTT_PORT } else { 0 };
    let hub = Hubside::start(&sim_dir.path().join("state"), port)?;

    let shipped = Client::Edgetwin {
        sas_ttl: "1h",
        keep_alive: "60s",
        telemetry: true,
    };
    let short = Client::Edgetwin {
        sas_ttl: "60s",
        keep_alive: "60s",
        telemetry: true,
    };
    let quiet = Client::Edgetwin {
        sas_ttl: "1h",
        keep_alive: "60s",
        telemetry: false,
    };
    println!("\nphases (edgetwin):");
    let a_steady = phase(&hub, &shipped, "et-steady", secs, &work)?;
    print_phase("as shipped, steady", &a_steady);
    let a_renew = phase(&hub, &short, "et-renew", secs, &work)?;
    print_phase("as shipped, sas_ttl 60s", &a_renew);
    hub.sim.set_tls_resumption(false);
    let a_full = phase(&hub, &short, "et-renew-full", secs, &work);
    hub.sim.set_tls_resumption(true);
    let a_full = a_full?;
    print_phase("sas_ttl 60s, hub refuses resumption", &a_full);
    let b_steady = phase(&hub, &quiet, "et-quiet", secs, &work)?;
    print_phase("telemetry off, steady", &b_steady);

    let mut days = Vec::new();
    let (rp, ri, rb) = renewal(&a_renew, &a_steady);
    let (fp, fi, fb) = renewal(&a_full, &a_steady);
    println!(
        "\nper renewal (edgetwin): {rp:.0} B payload, {ri:.0} B at IP level, {rb:.2} billed messages \
         (resumed); without resumption {fp:.0} B payload, {fi:.0} B at IP level, {fb:.2} billed"
    );
    days.push(DayModel {
        name: "edgetwin as shipped (keep-alive 60 s, token 1 h, telemetry every 60 s)".into(),
        first: a_steady.first,
        steady_payload_per_s: a_steady.window.payload() / a_steady.secs,
        steady_ip_per_s: a_steady.window.ip() / a_steady.secs,
        steady_billed_per_day: per_day(a_steady.billed.messages(), a_steady.secs),
        renewal_payload: rp,
        renewal_ip: ri,
        renewal_billed: rb,
        renewals_per_day: DAY / (0.8 * DEFAULT_TTL),
    });
    days.push(DayModel {
        name: "  the same, hub without TLS resumption".into(),
        renewal_payload: fp,
        renewal_ip: fi,
        renewal_billed: fb,
        ..days[0].clone()
    });
    // Pings only: one every keep-alive; scaled from the 60 s keep-alive measured.
    let pings_measured = (b_steady.secs / DEFAULT_KEEP_ALIVE).floor().max(1.0);
    let ping_payload = b_steady.window.payload() / pings_measured;
    let ping_ip = b_steady.window.ip() / pings_measured;
    println!(
        "per keep-alive ping (edgetwin, telemetry off): {ping_payload:.0} B payload, {ping_ip:.0} B at IP level \
         ({pings_measured:.0} pings in {:.0} s)",
        b_steady.secs
    );
    days.push(DayModel {
        name: "edgetwin as shipped but telemetry off (keep-alive 60 s, token 1 h)".into(),
        first: b_steady.first,
        steady_payload_per_s: b_steady.window.payload() / b_steady.secs,
        steady_ip_per_s: b_steady.window.ip() / b_steady.secs,
        steady_billed_per_day: 0.0,
        ..days[0].clone()
    });
    days.push(DayModel {
        name: format!(
            "edgetwin for metered links (keep-alive {METERED_KEEP_ALIVE:.0} s, token {:.0} h, telemetry off)",
            METERED_TTL / 3600.0
        ),
        first: b_steady.first,
        steady_payload_per_s: ping_payload / METERED_KEEP_ALIVE,
        steady_ip_per_s: ping_ip / METERED_KEEP_ALIVE,
        steady_billed_per_day: 0.0,
        renewal_payload: rp,
        renewal_ip: ri,
        renewal_billed: rb,
        renewals_per_day: DAY / (0.8 * METERED_TTL),
    });

    if python().is_some() {
        println!("\nphases (Python SDK):");
        let c_steady = phase(
            &hub,
            &Client::Python { ttl: 3600 },
            "py-steady",
            secs,
            &work,
        )?;
        print_phase("defaults, steady", &c_steady);
        let c_renew = phase(&hub, &Client::Python { ttl: 180 }, "py-renew", secs, &work)?;
        print_phase("sastoken_ttl 180", &c_renew);
        let (pp, pi, pb) = renewal(&c_renew, &c_steady);
        println!("per renewal (Python): {pp:.0} B payload, {pi:.0} B at IP level, {pb:.2} billed messages");
        days.push(DayModel {
            name: "Python SDK defaults (keep-alive 60 s, token 1 h)".into(),
            first: c_steady.first,
            steady_payload_per_s: c_steady.window.payload() / c_steady.secs,
            steady_ip_per_s: c_steady.window.ip() / c_steady.secs,
            steady_billed_per_day: per_day(c_steady.billed.messages(), c_steady.secs),
            renewal_payload: pp,
            renewal_ip: pi,
            renewal_billed: pb,
            renewals_per_day: DAY / (DEFAULT_TTL - PYTHON_RENEW_MARGIN),
        });
    } else {
        println!("Python receiver skipped");
    }

    println!(
        "\n| idle day | TCP payload | IP level (+52 B/segment) | renewals | billed messages |"
    );
    println!("|---|---:|---:|---:|---:|");
    for d in &days {
        println!(
            "| {} | {} | {} | {:.1} | {:.0} |",
            d.name,
            kib(d.payload()),
            kib(d.ip()),
            d.renewals_per_day,
            d.billed()
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at end: {}", load.trim());
    let Hubside { rt, sim, .. } = hub;
    rt.block_on(sim.shutdown());
    Ok(())
}
