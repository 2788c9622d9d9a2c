//! Shared helpers for integration tests against the emulator: start a [`Sim`], register
//! a module, connect an MQTT client (rumqttc over TLS, trusting the sim's CA), and await
//! [`SimEvent`]s with a timeout instead of sleeping.

pub mod scripted_https;

use std::sync::Arc;
use std::time::Duration;

pub use crate::events::{wait_for, wait_pick, WaitError};
pub use crate::hub::unix_now;
use crate::hub::ModuleKey;
use crate::{Hub, Sim, SimConfig, SimEvent};
use edgetwin::identity::ModuleCredentials;
use rumqttc::tokio_rustls::rustls;
use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    TlsConfiguration, Transport,
};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running emulator on free loopback ports with its temporary state directory.
pub struct TestSim {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
}

impl TestSim {
    pub async fn start() -> TestSim {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = Sim::start(SimConfig::ephemeral(dir.path()))
            .await
            .expect("sim starts");
        TestSim { sim, dir }
    }

    pub fn hub(&self) -> &Hub {
        self.sim.hub()
    }

    /// Registers `d/m` (creating the device if needed); returns its connection string.
    pub fn register(&self, device_id: &str, module_id: &str) -> String {
        register(self.hub(), device_id, module_id)
    }

    /// Connects `d/m` with a token valid for an hour.
    pub async fn connect(&self, device_id: &str, module_id: &str, clean: bool) -> TestClient {
        let connstr = self
            .hub()
            .module_connection_string(device_id, module_id)
            .expect("module registered");
        let opts = module_options(&self.sim, &connstr, clean, unix_now() + 3600);
        let (client, ack) = TestClient::connect(opts).await;
        assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
        client
    }

    /// Restarts the emulator on the same ports with the state kept.
    pub async fn restart(self) -> TestSim {
        let TestSim { sim, dir } = self;
        let sim = sim.restart().await.expect("sim restarts");
        TestSim { sim, dir }
    }
}

pub fn register(hub: &Hub, device_id: &str, module_id: &str) -> String {
    if hub.get_device(device_id).is_err() {
        hub.put_device(device_id, &json!({}), None)
            .expect("device created");
    }
    hub.put_module(device_id, module_id, &json!({}), None)
        .expect("module created");
    hub.module_connection_string(device_id, module_id)
        .expect("module registered")
}

pub fn key(device_id: &str, module_id: &str) -> ModuleKey {
    ModuleKey {
        device_id: device_id.into(),
        module_id: module_id.into(),
    }
}

/// rustls (rumqttc's re-export) client config trusting only the sim's CA.
pub fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM parses")).expect("CA added");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Options as Microsoft's SDKs connect a module: client id `d/m`, user name
/// `{hub}/d/m/?api-version=...`, SAS password expiring at `expiry`.
pub fn module_options(sim: &Sim, connstr: &str, clean: bool, expiry: u64) -> MqttOptions {
    let creds: ModuleCredentials = connstr.parse().expect("module connection string");
    let mut opts = MqttOptions::new(
        format!("{}/{}", creds.device_id, creds.module_id),
        "localhost",
        sim.mqtt_addr().port(),
    );
    opts.set_credentials(
        format!(
            "{}/{}/{}/?api-version=2021-04-12",
            creds.host_name, creds.device_id, creds.module_id
        ),
        creds.sas_token(expiry),
    );
    opts.set_clean_session(clean);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        client_tls(sim.ca_pem()),
    )));
    opts
}

/// A rumqttc client whose event loop runs in a task until the first connection error
/// (rumqttc would reconnect on the next poll; tests want to see the close instead).
pub struct TestClient {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connects and returns the CONNACK; panics if the connection fails before one.
    pub async fn connect(opts: MqttOptions) -> (TestClient, ConnAck) {
        let (client, ack) = Self::try_connect(opts).await;
        (client, ack.expect("CONNACK"))
    }

    /// Connects; `Err` carries the error the event loop reported before any CONNACK
    /// (a refused CONNACK shows as `ConnectionRefused(code)`).
    pub async fn try_connect(opts: MqttOptions) -> (TestClient, Result<ConnAck, ConnectionError>) {
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(eventloop, tx));
        let mut c = TestClient {
            client,
            events: rx,
            task,
        };
        let ack = loop {
            match c.next_event().await {
                Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break Ok(ack),
                Some(Ok(_)) => continue,
                Some(Err(e)) => break Err(e),
                None => panic!("event loop ended without a result"),
            }
        };
        (c, ack)
    }

    async fn next_event(&mut self) -> Option<Result<Event, ConnectionError>> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("timed out waiting for an MQTT event")
    }

    /// The next incoming packet matching `pick`; panics on timeout or a closed connection.
    pub async fn next_incoming<T>(&mut self, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
        loop {
            match self.next_event().await {
                Some(Ok(Event::Incoming(p))) => {
                    if let Some(t) = pick(p) {
                        return t;
                    }
                }
                Some(Ok(Event::Outgoing(_))) => {}
                Some(Err(e)) => panic!("connection failed while waiting: {e:?}"),
                None => panic!("event loop ended while waiting"),
            }
        }
    }

    /// The next PUBLISH from the hub.
    pub async fn next_publish(&mut self) -> Publish {
        self.next_incoming(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// Subscribes and returns the SUBACK's return codes.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Vec<rumqttc::SubscribeReasonCode> {
        let filters = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
        self.client
            .subscribe_many(filters)
            .await
            .expect("subscribe queued");
        self.next_incoming(|p| match p {
            Packet::SubAck(a) => Some(a.return_codes),
            _ => None,
        })
        .await
    }

    /// Publishes QoS 1 (the hub's PUBACK is handled by the event loop).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
    }

    /// Waits until the hub closes the connection, ignoring other traffic; returns the
    /// error the event loop reported.
    pub async fn closed(&mut self) -> ConnectionError {
        loop {
            match self.next_event().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return e,
                None => panic!("event loop ended without an error"),
            }
        }
    }

    /// Sends DISCONNECT and waits for the event loop to finish.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect queued");
        let _ = self.closed().await;
    }

    /// Drops the TCP connection without DISCONNECT.
    pub fn abort(self) {
        self.task.abort();
    }
}

async fn drive(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Result<Event, ConnectionError>>,
) {
    loop {
        let ev = eventloop.poll().await;
        let stop = ev.is_err();
        if tx.send(ev).is_err() || stop {
            return;
        }
    }
}

/// The next event for which `pick` returns `Some`, within [`WAIT`]; panics otherwise.
pub async fn wait_event<T>(
    events: &mut broadcast::Receiver<SimEvent>,
    pick: impl FnMut(&SimEvent) -> Option<T>,
) -> T {
    wait_pick(events, WAIT, pick)
        .await
        .unwrap_or_else(|e| panic!("waiting for a hub event: {e}"))
}
