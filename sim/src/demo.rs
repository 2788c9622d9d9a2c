//! `edgetwin-sim demo`: Microsoft's module-twin tutorial end to end, in one process, on the
//! embedded emulator — create the device and module over the registry REST API, start the
//! daemon (`app::run_with`, the same path as `edgetwin run`) on a temporary state
//! directory, change `telemetryInterval` from the service side with the twin's etag, and
//! show the daemon apply, persist and acknowledge it and send telemetry at the new
//! interval. Prints each step; fails unless the ack of the final version arrived.

use std::time::Duration;

use std::path::Path;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use crate::hub::ModuleKey;
use crate::{wait_for, wait_pick, Sim, SimConfig, SimEvent};
use edgetwin::app::{self, RunControl};
use edgetwin::config::Settings;
use edgetwin::identity::ServiceCredentials;
use edgetwin::registry::{RegistryClient, RegistryError};
use edgetwin::twin::RuntimeState;

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

    let module_connstr = format!(
        "HostName={};DeviceId={DEVICE};ModuleId={MODULE};SharedAccessKey={}",
        sim.hub_name(),
        module["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .context("module has no primary key")?
    );
    let settings = daemon_settings(dir.path(), &sim, &module_connstr)?;
    let mut events = sim.hub().events();
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let daemon = tokio::spawn(app::run_with(
        settings,
        shutdown.clone(),
        RunControl {
            reloads: None,
            on_ready: Some(ready_tx),
        },
    ));
    let view = ready_rx.await.context("the daemon stopped before READY")?;
    println!(
        "3. daemon started (READY) with telemetryInterval {} in force, before any network I/O",
        interval_of(&view.state.borrow())
    );
    wait_for(&mut events, STEP_TIMEOUT, |e| {
        matches!(e, SimEvent::TwinGet { status: 200, .. })
    })
    .await
    .context("waiting for the daemon to read its twin")?;
    println!(
        "4. daemon connected over MQTT/TLS ({}) and read its twin",
        view.connection.borrow().describe()
    );

    let fast = set_interval(&registry, 2).await?;
    wait_ack(&mut events, fast).await?;
    let telemetry = wait_for(&mut events, STEP_TIMEOUT, |e| {
        matches!(e, SimEvent::Telemetry { .. })
    })
    .await
    .context("waiting for the daemon's telemetry")?;
    let key = ModuleKey {
        device_id: DEVICE.into(),
        module_id: MODULE.into(),
    };
    if let SimEvent::Telemetry { seq, .. } = telemetry {
        let message = sim
            .hub()
            .telemetry_of(&key)
            .into_iter()
            .find(|t| t.seq == seq);
        if let Some(m) = message {
            println!(
                "5. telemetryInterval=2 (desired $version {fast}) applied; telemetry followed within the interval ({}): {}",
                m.property("$.ct").unwrap_or("?"),
                String::from_utf8_lossy(&m.body)
            );
        }
    }

    let version = set_interval(&registry, 122).await?;
    println!("6. service side: PATCH desired telemetryInterval=122 with If-Match etag → desired $version {version}");
    let ack = wait_ack(&mut events, version).await?;
    println!("7. daemon applied it, persisted state.json, then acknowledged: {ack}");

    let twin = registry.get_module_twin(DEVICE, MODULE).await?;
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state").join("state.json"))?)?;
    println!(
        "8. end state: desired {} | in force {} | on disk {} (desired $version {}) | reported {}",
        twin["properties"]["desired"]["telemetryInterval"],
        interval_of(&view.state.borrow()),
        on_disk["properties"]["telemetryInterval"],
        on_disk["desired_version"],
        twin["properties"]["reported"]["telemetryInterval"]
    );
    shutdown.cancel();
    daemon.await?.map_err(|e| anyhow::anyhow!("daemon: {e}"))?;
    sim.shutdown().await;
    let reported = &twin["properties"]["reported"]["telemetryInterval"];
    if reported["av"].as_u64() != Some(version) || reported["ac"] != 200 {
        bail!("the reported ack does not acknowledge desired $version {version}");
    }
    println!("demo ok: the tutorial's patch was applied, persisted, acknowledged and put in force by edgetwin");
    Ok(())
}

/// The daemon's configuration, through the real config loader: the module credential in a
/// 0600 file, the emulator as gateway, its CA trusted.
fn daemon_settings(dir: &Path, sim: &Sim, module_connstr: &str) -> anyhow::Result<Settings> {
    let credential = dir.join("module.connstr");
    edgetwin::store::write_atomic(&credential, module_connstr.as_bytes(), 0o600)?;
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let config = dir.join("edgetwin.toml");
    let text = format!(
        "[hub]\nconnection_string_file = {:?}\ngateway_host = \"{}\"\nca_file = {:?}\n\
         backoff = {{ initial = \"100ms\", max = \"2s\" }}\n\n[state]\ndir = {:?}\n",
        credential.display().to_string(),
        sim.mqtt_addr(),
        sim.ca_path().display().to_string(),
        state.display().to_string(),
    );
    std::fs::write(&config, text)?;
    Settings::load(Some(&config)).map_err(|e| anyhow::anyhow!("demo configuration: {e}"))
}

async fn set_interval(registry: &RegistryClient, seconds: u64) -> anyhow::Result<u64> {
    let etag = registry.get_module_twin(DEVICE, MODULE).await?["etag"]
        .as_str()
        .map(str::to_string);
    let updated = registry
        .patch_desired(
            DEVICE,
            MODULE,
            &json!({"telemetryInterval": seconds}),
            etag.as_deref(),
        )
        .await?;
    updated["properties"]["desired"]["$version"]
        .as_u64()
        .context("twin has no desired $version")
}

/// Waits for the reported ack of `version`; returns the reported patch.
async fn wait_ack(
    events: &mut broadcast::Receiver<SimEvent>,
    version: u64,
) -> anyhow::Result<Value> {
    wait_pick(events, STEP_TIMEOUT, |e| match e {
        SimEvent::ReportedPatched { patch, .. }
            if patch["telemetryInterval"]["av"].as_u64() == Some(version) =>
        {
            Some(patch.clone())
        }
        _ => None,
    })
    .await
    .with_context(|| format!("waiting for the daemon's ack of desired $version {version}"))
}

fn interval_of(state: &RuntimeState) -> String {
    state
        .properties
        .get("telemetryInterval")
        .map_or_else(|| "?".into(), Value::to_string)
}
