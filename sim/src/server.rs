//! [`Sim`]: a running emulator — the hub, its MQTT/TLS listener and its HTTPS listener
//! (REST and MQTT over WebSocket) — as started by `edgetwin-sim serve`, the demo and the tests.
//! With `aziot`, also the Identity Service's Unix sockets ([`super::aziot`]).
//! Owns the listener tasks and the periodic evaluation of automatic configurations, and
//! stops them on shutdown; can restart on the same ports with
//! the state kept, which is how tests simulate a hub restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::aziot::{AziotConfig, AziotSim};
use super::dps::Dps;
use super::hub::Hub;
use super::tls;
use super::wire::WireLog;

/// Where and as what the emulator runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// MQTT over TLS; port 0 picks a free port.
    pub mqtt_addr: SocketAddr,
    /// HTTPS: REST API and MQTT over WebSocket; port 0 picks a free port.
    pub https_addr: SocketAddr,
    /// The hub's host name as used in SAS scopes and MQTT user names.
    pub hub_name: String,
    /// Durable state: registry, twins, sessions, certificates.
    pub state_dir: PathBuf,
    /// The Azure IoT Identity Service of an IoT Edge host (`--aziot DIR`), if wanted.
    pub aziot: Option<AziotConfig>,
    /// How often automatic configurations are evaluated (also once at start and after
    /// each change of a configuration). The real hub: five minutes.
    pub configurations_every: Duration,
}

/// Default of [`SimConfig::configurations_every`].
pub const CONFIGURATIONS_EVERY: Duration = Duration::from_secs(5);

impl SimConfig {
    /// Both listeners on free loopback ports, hub name `localhost`.
    pub fn ephemeral(state_dir: impl Into<PathBuf>) -> Self {
        SimConfig {
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            https_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            hub_name: "localhost".into(),
            state_dir: state_dir.into(),
            aziot: None,
            configurations_every: CONFIGURATIONS_EVERY,
        }
    }
}

/// A running emulator.
pub struct Sim {
    config: SimConfig,
    hub: Hub,
    dps: Dps,
    aziot: Option<AziotSim>,
    mqtt_addr: SocketAddr,
    https_addr: SocketAddr,
    ca_pem: String,
    wire: WireLog,
    resumption: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

pub const SERVICE_CONNSTR_FILE: &str = "service.connstr";

impl Sim {
    /// Binds both listeners, loads or creates the state, and writes `ca.pem`,
    /// `service.connstr`, `policies/<name>.connstr` and the DPS instance's `dps/id_scope`,
    /// `dps/group.key` and `dps/endpoint` into the state directory.
    pub async fn start(config: SimConfig) -> anyhow::Result<Sim> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let tls = tls::load_or_create(&config.state_dir, &config.hub_name)?;
        let hub = Hub::open(&config.hub_name, &config.state_dir)?;
        let dps = Dps::open(hub.clone(), &config.state_dir)?;
        let mqtt = TcpListener::bind(config.mqtt_addr)
            .await
            .with_context(|| format!("binding the MQTT listener to {}", config.mqtt_addr))?;
        let https = TcpListener::bind(config.https_addr)
            .await
            .with_context(|| format!("binding the HTTPS listener to {}", config.https_addr))?;
        let mqtt_addr = mqtt.local_addr()?;
        let https_addr = https.local_addr()?;
        let authority = format!("localhost:{}", https_addr.port());
        hub.set_rest_authority(&authority);
        dps.write_endpoint(&config.state_dir, &authority)?;

        let owner = hub
            .policy_connection_string("iothubowner", &authority)
            .context("the iothubowner policy is missing from the state")?;
        let write = |path: &Path, text: &str| {
            edgetwin::store::write_atomic(path, text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))
        };
        write(&config.state_dir.join(SERVICE_CONNSTR_FILE), &owner)?;
        let policies = config.state_dir.join("policies");
        std::fs::create_dir_all(&policies)?;
        for name in hub.policy_names() {
            if let Some(cs) = hub.policy_connection_string(&name, &authority) {
                write(&policies.join(format!("{name}.connstr")), &cs)?;
            }
        }

        let acceptor = TlsAcceptor::from(Arc::clone(&tls.server_config));
        let wire = WireLog::default();
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(super::mqtt::serve_tls(
            mqtt,
            acceptor.clone(),
            hub.clone(),
            Some(dps.clone()),
            wire.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(super::rest::serve(
            https,
            acceptor,
            hub.clone(),
            super::dps::http::router(dps.clone()),
            wire.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
        let aziot = match &config.aziot {
            Some(c) => Some(AziotSim::start(
                hub.clone(),
                c.clone(),
                shutdown.clone(),
                &tasks,
            )?),
            None => None,
        };
        tasks.spawn(evaluate_configurations(
            hub.clone(),
            config.configurations_every,
            shutdown.clone(),
        ));
        Ok(Sim {
            config,
            hub,
            dps,
            aziot,
            mqtt_addr,
            https_addr,
            ca_pem: tls.ca_pem,
            wire,
            resumption: tls.resumption,
            shutdown,
            tasks,
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The emulated Device Provisioning Service (its scope, group key, faults).
    pub fn dps(&self) -> &Dps {
        &self.dps
    }

    /// The emulated Identity Service (`--aziot`): re-create the module, change the principal.
    pub fn aziot(&self) -> Option<&AziotSim> {
        self.aziot.as_ref()
    }

    pub fn faults(&self) -> super::hub::Faults {
        self.hub.faults()
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    pub fn hub_name(&self) -> &str {
        &self.config.hub_name
    }

    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    /// Bytes on the wire of every connection since start (beneath TLS), and whether each
    /// handshake resumed a session. A [`Sim::restart`] starts a new log.
    pub fn wire(&self) -> &WireLog {
        &self.wire
    }

    /// Allows (the default) or refuses TLS session resumption for the handshakes that
    /// follow; refused, the server issues no tickets and every handshake is full.
    pub fn set_tls_resumption(&self, allowed: bool) {
        self.resumption.store(allowed, Ordering::Relaxed);
    }

    /// PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_path(&self) -> PathBuf {
        self.config.state_dir.join(tls::CA_FILE)
    }

    /// `localhost:<port>` of the REST listener, as service connection strings carry it.
    pub fn rest_authority(&self) -> String {
        format!("localhost:{}", self.https_addr.port())
    }

    /// A policy's service connection string (`iothubowner`, `service`, `registryRead`,
    /// `registryReadWrite`, `device`).
    pub fn service_connection_string(&self, policy: &str) -> Option<String> {
        self.hub
            .policy_connection_string(policy, &self.rest_authority())
    }

    /// Stops accepting, closes every connection and waits for the tasks to finish.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    async fn stop(&self) {
        self.shutdown.cancel();
        self.hub.drop_all_connections();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Meters operations at `tier`'s published rates from now on ([`crate::throttle`]);
    /// a [`Sim::restart`] keeps the tier, with full buckets and fresh counts.
    pub fn set_throttle(&self, tier: crate::throttle::Tier, units: u32) {
        self.hub.set_throttle(tier, units);
    }

    /// Operations accepted, delayed and throttled per kind since the tier was set or the
    /// hub (re)started.
    pub fn throttle_counts(&self) -> crate::throttle::Counts {
        self.hub.throttle_counts()
    }

    /// Stops and starts again on the same ports with the same state directory, as a hub
    /// restart: connections drop, registry, twins and sessions survive, and so does the
    /// throttling tier.
    pub async fn restart(self) -> anyhow::Result<Sim> {
        let (tier, units) = self.hub.throttle_tier();
        self.stop().await;
        let config = SimConfig {
            mqtt_addr: self.mqtt_addr,
            https_addr: self.https_addr,
            ..self.config.clone()
        };
        drop(self);
        let sim = Sim::start(config).await?;
        sim.set_throttle(tier, units);
        Ok(sim)
    }
}

/// Evaluates automatic configurations at start and then every `every` until shutdown.
/// Failures are logged here, once per evaluation; the next one retries.
async fn evaluate_configurations(hub: Hub, every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let h = hub.clone();
        match tokio::task::spawn_blocking(move || h.evaluate_configurations()).await {
            Ok(Ok(report)) => {
                for (module, error) in &report.failed {
                    tracing::warn!(%module, %error, "configuration content could not be applied to a twin");
                }
                if !report.patched.is_empty() || report.statuses_changed > 0 {
                    tracing::debug!(
                        patched = report.patched.len(),
                        statuses_changed = report.statuses_changed,
                        "configurations evaluated"
                    );
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "configuration evaluation failed"),
            Err(error) => tracing::warn!(%error, "configuration evaluation panicked"),
        }
    }
}
