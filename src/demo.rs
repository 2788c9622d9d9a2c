//! `edgetwin demo`: Microsoft's module-twin tutorial end to end, in one process, on the
//! embedded emulator — create the device and module over the registry REST API, connect
//! as the module over MQTT/TLS, set `telemetryInterval = 122` from the service side, receive
//! the patch on the module, acknowledge it in the reported properties, send one telemetry
//! message, and read the twin back. Prints each step; fails unless the ack arrived.
//!
//! The module side here is a deliberately small client; the daemon (`edgetwin run`)
//! replaces it once it exists.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{json, Value};

use crate::identity::{ModuleCredentials, ServiceCredentials};
use crate::registry::{RegistryClient, RegistryError};
use crate::sim::{Sim, SimConfig};

const DEVICE: &str = "myFirstDevice";
const MODULE: &str = "myFirstModule";
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("edgetwin-demo-")
        .tempdir()?;
    let sim = Sim::start(SimConfig::ephemeral(dir.path())).await?;
    println!(
        "1. emulator up: MQTT mqtts://{} , REST https://{} (state {})",
        sim.mqtt_addr(),
        sim.rest_authority(),
        dir.path().display()
    );

    let service: ServiceCredentials = sim
        .service_connection_string("iothubowner")
        .context("no iothubowner policy")?
        .parse()?;
    let registry = RegistryClient::new(service, Some(sim.ca_pem().as_bytes()))?;
    let device = match registry.create_device(DEVICE).await {
        Err(RegistryError::Conflict(_)) => registry.get_device(DEVICE).await?,
        other => other?,
    };
    let module = match registry.create_module(DEVICE, MODULE).await {
        Err(RegistryError::Conflict(_)) => registry.get_module(DEVICE, MODULE).await?,
        other => other?,
    };
    println!(
        "2. registry: device {} (generation {}) and module {} created with hub-generated keys (not shown)",
        device["deviceId"].as_str().unwrap_or("?"),
        device["generationId"].as_str().unwrap_or("?"),
        module["moduleId"].as_str().unwrap_or("?")
    );

    let creds: ModuleCredentials = format!(
        "HostName={};DeviceId={DEVICE};ModuleId={MODULE};SharedAccessKey={}",
        sim.hub_name(),
        module["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .context("module has no primary key")?
    )
    .parse()?;
    let (client, mut events) = connect(&creds, &sim)?;
    client
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce)
        .await?;
    client
        .publish("$iothub/twin/GET/?$rid=get-1", QoS::AtLeastOnce, false, "")
        .await?;
    let (_, twin) = wait_publish(&mut events, |t| {
        t.starts_with("$iothub/twin/res/200/?$rid=get-1")
    })
    .await?;
    let twin: Value = serde_json::from_slice(&twin)?;
    println!(
        "3. module connected over MQTT/TLS and read its twin: desired $version {}",
        twin["desired"]["$version"]
    );

    let etag = registry.get_module_twin(DEVICE, MODULE).await?["etag"]
        .as_str()
        .map(str::to_string);
    let updated = registry
        .patch_desired(
            DEVICE,
            MODULE,
            &json!({"telemetryInterval": 122}),
            etag.as_deref(),
        )
        .await?;
    let version = updated["properties"]["desired"]["$version"]
        .as_u64()
        .context("twin has no desired $version")?;
    println!("4. service side: PATCH desired telemetryInterval=122 with If-Match etag → desired $version {version}");

    let (topic, patch) = wait_publish(&mut events, |t| {
        t.starts_with("$iothub/twin/PATCH/properties/desired/")
    })
    .await?;
    println!(
        "5. module received the patch on {topic}: {}",
        String::from_utf8_lossy(&patch)
    );
    let patch: Value = serde_json::from_slice(&patch)?;
    let interval = patch["telemetryInterval"]
        .as_u64()
        .context("patch lacks telemetryInterval")?;

    let ack = json!({"telemetryInterval": {"value": interval, "ac": 200, "av": version, "ad": "applied"}});
    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=ack-1",
            QoS::AtLeastOnce,
            false,
            ack.to_string(),
        )
        .await?;
    let (topic, _) = wait_publish(&mut events, |t| t.starts_with("$iothub/twin/res/")).await?;
    if !topic.starts_with("$iothub/twin/res/204/") {
        bail!("the hub refused the reported ack: {topic}");
    }
    println!("6. module reported the ack {ack} → hub answered {topic}");

    let telemetry = json!({"telemetryInterval": interval, "uptimeSeconds": 1});
    client
        .publish(
            format!("devices/{DEVICE}/modules/{MODULE}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8"),
            QoS::AtLeastOnce,
            false,
            telemetry.to_string(),
        )
        .await?;
    wait_puback(&mut events).await?;
    let key = crate::sim::hub::ModuleKey {
        device_id: DEVICE.into(),
        module_id: MODULE.into(),
    };
    let stored = sim.hub().telemetry_of(&key);
    println!(
        "7. telemetry sent and stored by the hub: {} message(s), content-type {}",
        stored.len(),
        stored
            .last()
            .and_then(|t| t.property("$.ct"))
            .unwrap_or("?")
    );

    let twin = registry.get_module_twin(DEVICE, MODULE).await?;
    let reported = &twin["properties"]["reported"]["telemetryInterval"];
    println!(
        "8. end state: desired {} | reported {} (reported $version {})",
        twin["properties"]["desired"]["telemetryInterval"],
        reported,
        twin["properties"]["reported"]["$version"]
    );
    client.disconnect().await.ok();
    sim.shutdown().await;
    if reported["av"].as_u64() != Some(version) || reported["ac"] != 200 {
        bail!("the reported ack does not acknowledge desired $version {version}");
    }
    println!("demo ok: the patch made with the service SDK's REST calls was received, applied and acknowledged");
    Ok(())
}

fn connect(creds: &ModuleCredentials, sim: &Sim) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let client_id = format!("{}/{}", creds.device_id, creds.module_id);
    let mut opts = MqttOptions::new(client_id.clone(), "localhost", sim.mqtt_addr().port());
    opts.set_credentials(
        format!("{}/{client_id}/?api-version=2021-04-12", creds.host_name),
        creds.sas_token(expiry),
    );
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(60));
    let tls = crate::hub::tls::client_config(Some(sim.ca_pem().as_bytes()))?;
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    Ok(AsyncClient::new(opts, 16))
}

async fn wait_publish(
    events: &mut EventLoop,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<(String, bytes::Bytes)> {
    let fut = async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await? {
                if wanted(&p.topic) {
                    return Ok::<_, anyhow::Error>((p.topic, p.payload));
                }
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .context("timed out waiting for the hub")?
}

async fn wait_puback(events: &mut EventLoop) -> anyhow::Result<()> {
    let fut = async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .context("timed out waiting for PUBACK")?
}
