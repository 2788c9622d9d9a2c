//! The Azure IoT Identity Service of an IoT Edge host, for one module (DESIGN §8,
//! PROTOCOL §13): `DIR/identityd.sock` answers `GET /identities/identity` and
//! `DIR/keyd.sock` answers `POST /sign`, HTTP/1.1 over Unix sockets, backed by the
//! emulator's registry.
//!
//! At start the device and module are created in the hub if missing (keys from the
//! registry, as identityd's own reconciliation would). identityd hands out an opaque key
//! handle per module generation; keyd signs with the key of the module that handle was
//! issued for, and refuses a handle of an earlier generation (the module was deleted and
//! re-created: [`AziotSim::recreate_module`]). identityd answers only its principal: the
//! caller's uid comes from `SO_PEERCRED`, as the real one's does, and any other uid gets
//! the real service's 401.
//!
//! Not emulated: other endpoints (device identity, module management, trust bundle),
//! api-version checks beyond the path, keyd principals, socket throttling.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hub::{lock, Hub};
use edgetwin::identity::SharedKey;

/// File names of the sockets in the `--aziot` directory.
pub const IDENTITYD_SOCKET: &str = "identityd.sock";
pub const KEYD_SOCKET: &str = "keyd.sock";
/// Largest request body read (a sign request is a few hundred bytes).
const MAX_REQUEST: usize = 64 * 1024;

/// What the emulated Identity Service serves.
#[derive(Debug, Clone)]
pub struct AziotConfig {
    /// Where `identityd.sock` and `keyd.sock` are created.
    pub dir: PathBuf,
    pub device_id: String,
    /// The principal's name: the module identity it gets.
    pub module_id: String,
    /// The one uid identityd answers (`[[principal]] uid`).
    pub principal_uid: u32,
    /// `gatewayHost` in the identity; `None`: the hub itself.
    pub gateway_host: Option<String>,
}

impl AziotConfig {
    /// Sockets in `dir`, for `device_id/edgetwin`, principal: this process's uid.
    pub fn new(dir: impl Into<PathBuf>, device_id: &str) -> Self {
        AziotConfig {
            dir: dir.into(),
            device_id: device_id.into(),
            module_id: "edgetwin".into(),
            principal_uid: current_uid(),
            gateway_host: None,
        }
    }

    pub fn identityd_socket(&self) -> PathBuf {
        self.dir.join(IDENTITYD_SOCKET)
    }

    pub fn keyd_socket(&self) -> PathBuf {
        self.dir.join(KEYD_SOCKET)
    }
}

/// The current process's real uid.
fn current_uid() -> u32 {
    // std exposes it through the metadata of what the process creates, not directly;
    // /proc/self is owned by the process's uid.
    std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata("/proc/self").expect("/proc/self is readable"),
    )
}

/// The running Identity Service; cheap to clone.
#[derive(Clone)]
pub struct AziotSim {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    config: AziotConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Key handle → the module generation it was issued for.
    handles: HashMap<String, String>,
    principal_uid: u32,
    gateway_host: Option<String>,
}

impl AziotSim {
    /// Creates the device and module if missing, binds both sockets (replacing stale
    /// ones) and serves them on `tasks` until `shutdown`.
    pub fn start(
        hub: Hub,
        config: AziotConfig,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> anyhow::Result<AziotSim> {
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("creating {}", config.dir.display()))?;
        if hub.get_device(&config.device_id).is_err() {
            hub.put_device(&config.device_id, &json!({}), None)
                .map_err(|e| anyhow::anyhow!("creating the device: {e}"))?;
        }
        if hub
            .get_module(&config.device_id, &config.module_id)
            .is_err()
        {
            hub.put_module(&config.device_id, &config.module_id, &json!({}), None)
                .map_err(|e| anyhow::anyhow!("creating the module: {e}"))?;
        }
        let identityd = bind(&config.identityd_socket())?;
        let keyd = bind(&config.keyd_socket())?;
        let sim = AziotSim {
            inner: Arc::new(Inner {
                hub,
                state: Mutex::new(State {
                    handles: HashMap::new(),
                    principal_uid: config.principal_uid,
                    gateway_host: config.gateway_host.clone(),
                }),
                config,
            }),
        };
        for (listener, service) in [(identityd, Service::Identityd), (keyd, Service::Keyd)] {
            tasks.spawn(serve(
                listener,
                service,
                sim.clone(),
                shutdown.clone(),
                tasks.clone(),
            ));
        }
        Ok(sim)
    }

    pub fn config(&self) -> &AziotConfig {
        &self.inner.config
    }

    /// Deletes the module in the hub and creates it again: a new generation with new
    /// keys, its connections closed. Handles issued before no longer sign.
    pub fn recreate_module(&self) -> anyhow::Result<()> {
        let c = &self.inner.config;
        let hub = &self.inner.hub;
        hub.delete_module(&c.device_id, &c.module_id, None)
            .map_err(|e| anyhow::anyhow!("deleting the module: {e}"))?;
        hub.put_module(&c.device_id, &c.module_id, &json!({}), None)
            .map_err(|e| anyhow::anyhow!("creating the module: {e}"))?;
        Ok(())
    }

    /// identityd answers only `uid` from now on.
    pub fn set_principal_uid(&self, uid: u32) {
        lock(&self.inner.state).principal_uid = uid;
    }

    /// identityd names `gateway` as `gatewayHost` from now on (`None`: the hub itself).
    pub fn set_gateway_host(&self, gateway: Option<String>) {
        lock(&self.inner.state).gateway_host = gateway;
    }

    /// The module's current generation and primary key, from the registry.
    fn module(&self) -> Option<(String, SharedKey)> {
        let c = &self.inner.config;
        let doc = self.inner.hub.get_module(&c.device_id, &c.module_id).ok()?;
        let generation = doc.get("generationId")?.as_str()?.to_owned();
        let connstr = self
            .inner
            .hub
            .module_connection_string(&c.device_id, &c.module_id)?;
        let creds: edgetwin::identity::ModuleCredentials = connstr.parse().ok()?;
        Some((generation, creds.key))
    }

    /// `GET /identities/identity` for the caller `uid`.
    fn identity(&self, uid: u32) -> (StatusCode, Value) {
        let mut st = lock(&self.inner.state);
        if uid != st.principal_uid {
            // What aziot-identityd answers a caller that is no principal.
            return error(StatusCode::UNAUTHORIZED, "authorization error");
        }
        let Some((generation, _)) = self.module() else {
            return error(StatusCode::NOT_FOUND, "module not found in the hub");
        };
        let handle = match st.handles.iter().find(|(_, g)| **g == generation) {
            Some((handle, _)) => handle.clone(),
            None => {
                let handle = format!("sim-{}", uuid::Uuid::new_v4().simple());
                st.handles.insert(handle.clone(), generation.clone());
                handle
            }
        };
        let c = &self.inner.config;
        let hub_name = self.inner.hub.hub_name().to_owned();
        let gateway = st.gateway_host.clone().unwrap_or_else(|| hub_name.clone());
        let body = json!({
            "type": "aziot",
            "spec": {
                "hubName": hub_name,
                "gatewayHost": gateway,
                "deviceId": c.device_id,
                "moduleId": c.module_id,
                "genId": generation,
                "auth": {"type": "sas", "keyHandle": handle},
            }
        });
        (StatusCode::OK, body)
    }

    /// `POST /sign`: HMAC-SHA256 with the key of the handle's module generation.
    fn sign(&self, body: &[u8]) -> (StatusCode, Value) {
        use base64::Engine as _;
        let base64 = base64::engine::general_purpose::STANDARD;
        let request: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => return error(StatusCode::BAD_REQUEST, "malformed request body"),
        };
        let handle = request["keyHandle"].as_str().unwrap_or_default();
        if request["algorithm"] != "HMAC-SHA256" {
            return error(StatusCode::BAD_REQUEST, "unsupported algorithm");
        }
        let message = request["parameters"]["message"]
            .as_str()
            .and_then(|m| base64.decode(m).ok())
            .and_then(|m| String::from_utf8(m).ok());
        let Some(message) = message else {
            return error(StatusCode::BAD_REQUEST, "parameters.message is not base64");
        };
        let issued_for = lock(&self.inner.state).handles.get(handle).cloned();
        match (issued_for, self.module()) {
            (Some(issued), Some((generation, key))) if issued == generation => {
                // HMAC-SHA256(key, message), as base64: what `derive` computes.
                let signature = key.derive(&message).as_base64().to_owned();
                (StatusCode::OK, json!({ "signature": signature }))
            }
            _ => error(StatusCode::NOT_FOUND, "key not found"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Service {
    Identityd,
    Keyd,
}

/// The error body both services send.
fn error(status: StatusCode, message: &str) -> (StatusCode, Value) {
    (status, json!({ "message": message }))
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    // A socket left by an earlier run would make bind fail with EADDRINUSE.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => {}
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

async fn serve(
    listener: UnixListener,
    service: Service,
    sim: AziotSim,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, ?service, "aziot accept failed");
                    continue;
                }
            },
        };
        tasks.spawn(connection(stream, service, sim.clone(), shutdown.clone()));
    }
}

async fn connection(stream: UnixStream, service: Service, sim: AziotSim, stop: CancellationToken) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials on the aziot socket");
            return;
        }
    };
    let handler = service_fn(move |request: Request<Incoming>| {
        let sim = sim.clone();
        async move { Ok::<_, Infallible>(answer(&sim, service, uid, request).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), handler);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "aziot connection ended with an error");
    }
}

async fn answer(
    sim: &AziotSim,
    service: Service,
    uid: u32,
    request: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let body = match axum::body::to_bytes(Body::new(body), MAX_REQUEST).await {
        Ok(b) => b,
        Err(_) => Bytes::new(),
    };
    let (status, value) = match (service, &parts.method, path.as_str()) {
        (Service::Identityd, &Method::GET, "/identities/identity") => sim.identity(uid),
        (Service::Keyd, &Method::POST, "/sign") => sim.sign(&body),
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response
}
