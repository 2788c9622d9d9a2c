//! HTTPS front end: the service REST API (PROTOCOL §6) and the MQTT-over-WebSocket upgrade
//! endpoint (§3.8, bridged in [`super::websocket`]).
//!
//! Every request is authorised first (policy token and the operation's right, or for a
//! device's own modules that device's token), then must carry an `api-version` query
//! parameter (any value). Ids in paths are percent-decoded.
//! Successes return the hub's full JSON document; failures return the hub's newer error
//! body with an `iothub-errorcode` header. Every answer's `Date` is the hub's clock, the
//! clock-offset fault included ([`hub_date`]), as clients read the hub's time from it.
//! Requests are logged at debug with method, path and status, never with their headers.
//! Under a throttling tier, registry, twin, query and configuration requests are metered
//! first ([`throttle`]).

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, DATE, IF_MATCH};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::errors::HubError;
use super::hub::{Hub, Right};
use super::service_side::TwinWrite;
use super::throttle::{Admission, Kind};
use super::twin_doc::timestamp;
use super::wire::{Counted, Listener, WireLog};

mod fleet;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const JSON_UTF8: &str = "application/json; charset=utf-8";

/// What every handler shares.
#[derive(Clone)]
struct App {
    hub: Hub,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Serves HTTPS until `shutdown`; `extra` (the DPS API) is served beside the hub's routes.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    extra: Router,
    wire: WireLog,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let state = App {
        hub,
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    };
    // `Date` on every answer, the merged routes' (DPS) too.
    let app = router(state.clone())
        .merge(extra)
        .layer(middleware::from_fn_with_state(state, stamp_date));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "HTTPS accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        tasks.spawn(serve_tcp(
            wire.count(Listener::Https, tcp),
            acceptor.clone(),
            app.clone(),
            shutdown.clone(),
        ));
        tracing::trace!(%peer, "HTTPS connection accepted");
    }
    tracing::debug!("HTTPS listener stopped");
}

/// One TCP connection: TLS handshake, then HTTP/1.1 with upgrades until the client closes
/// or the emulator stops (in-flight requests finish first).
async fn serve_tcp(tcp: Counted, acceptor: TlsAcceptor, app: Router, shutdown: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let tls = tokio::select! {
        () = shutdown.cancelled() => return,
        r = handshake => match r {
            Ok(Ok(tls)) => {
                super::wire::handshake_done(&tls);
                tls
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTPS TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("HTTPS TLS handshake timed out");
                return;
            }
        },
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTPS connection ended with an error");
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route(
            "/devices/:device",
            methods(get(get_device).put(put_device).delete(delete_device)),
        )
        .route("/devices/:device/modules", methods(get(list_modules)))
        .route(
            "/devices/:device/modules/:module",
            methods(get(get_module).put(put_module).delete(delete_module)),
        )
        .route(
            "/twins/:device/modules/:module",
            methods(get(get_twin).patch(patch_twin).put(replace_twin)),
        )
        .route(
            "/twins/:device/modules/:module/methods",
            methods(post(invoke_method)),
        )
        .route("/$iothub/websocket", methods(get(websocket_upgrade)))
        .merge(fleet::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), throttle))
        .layer(middleware::from_fn(log_request))
        .with_state(app)
}

fn methods(m: MethodRouter<App>) -> MethodRouter<App> {
    m.fallback(method_not_allowed)
}

// ---- responses -----------------------------------------------------------------------

/// A handler's outcome: status and JSON document, or a hub error.
type Outcome = Result<(StatusCode, Option<Value>), HubError>;

async fn respond(f: impl Future<Output = Outcome>) -> Response {
    match f.await {
        Ok((status, Some(doc))) => {
            let mut res = (status, doc.to_string()).into_response();
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8));
            res
        }
        Ok((status, None)) => status.into_response(),
        Err(e) => error_response(&e),
    }
}

/// The hub's error answer: newer body format, `iothub-errorcode` header.
fn error_response(e: &HubError) -> Response {
    let tracking_id = uuid::Uuid::new_v4().simple().to_string();
    let body = e.body(&tracking_id, &timestamp(SystemTime::now()));
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, body.to_string()).into_response();
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8));
    headers.insert("iothub-errorcode", HeaderValue::from_static(e.name));
    res
}

async fn not_found(uri: Uri) -> Response {
    error_response(&HubError::new(
        404,
        404000,
        "NotFound",
        format!("no such resource: {}", uri.path()),
    ))
}

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    error_response(&HubError::new(
        405,
        405000,
        "MethodNotAllowed",
        format!("{method} is not supported on {}", uri.path()),
    ))
}

/// Sets `Date` on every answer (hyper would otherwise set the machine's time).
async fn stamp_date(State(app): State<App>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    res.headers_mut().insert(DATE, hub_date(&app.hub));
    res
}

/// The hub's clock as an HTTP `Date`: the machine's, shifted by the clock-offset fault
/// (`Faults::set_clock_offset`), the same clock SAS tokens are judged by.
fn hub_date(hub: &Hub) -> HeaderValue {
    let offset = hub.state().faults.clock_offset_secs;
    let now = UNIX_EPOCH + Duration::from_secs(super::hub::hub_unix_now(offset));
    HeaderValue::from_str(&httpdate::fmt_http_date(now))
        .expect("an HTTP date is a valid header value")
}

/// The tier's throttles on the service API: a request of a metered kind waits its turn
/// (shaping) or is answered 429 `ThrottlingException` before it is looked at, as the hub
/// meters requests, not outcomes ([`crate::throttle`]).
async fn throttle(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(kind) = metered_kind(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    match app.hub.admit(kind) {
        Admission::Now => next.run(req).await,
        Admission::After(delay) => {
            tokio::time::sleep(delay).await;
            next.run(req).await
        }
        Admission::Throttled => error_response(&HubError::throttled()),
    }
}

/// Which throttle a service request counts against (PROTOCOL §14.4), by method and path.
fn metered_kind(method: &axum::http::Method, path: &str) -> Option<Kind> {
    use axum::http::Method;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["devices", "query"] => Some(Kind::Query),
        ["configurations", ..] => Some(Kind::Configuration),
        ["devices", ..] => Some(Kind::RegistryOperation),
        ["twins", _, "modules", _] | ["twins", _] => Some(if *method == Method::GET {
            Kind::TwinRead
        } else {
            Kind::TwinUpdate
        }),
        _ => None,
    }
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let res = next.run(req).await;
    tracing::debug!(%method, %path, status = res.status().as_u16(), "REST request");
    res
}

// ---- request parsing -----------------------------------------------------------------

/// A REST call as handlers see it: extraction never fails; problems surface as hub errors
/// once the caller is authorised.
struct Call<P> {
    uri: Uri,
    headers: HeaderMap,
    path: Result<P, HubError>,
    body: Result<Bytes, HubError>,
}

#[axum::async_trait]
impl<P> FromRequest<App> for Call<P>
where
    P: DeserializeOwned + Send,
{
    type Rejection = Infallible;

    async fn from_request(req: Request, state: &App) -> Result<Self, Infallible> {
        let (mut parts, body) = req.into_parts();
        let path = Path::<P>::from_request_parts(&mut parts, state)
            .await
            .map(|Path(p)| p)
            .map_err(|e| HubError::argument_invalid(e.body_text()));
        let uri = parts.uri.clone();
        let headers = parts.headers.clone();
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    HubError::too_large("request body is too large")
                } else {
                    HubError::format_error(format!("request body could not be read: {e}"))
                }
            });
        Ok(Call {
            uri,
            headers,
            path,
            body,
        })
    }
}

/// Path ids that start with a device id (`/devices/{d}/modules[/{m}]`).
trait DeviceFirst {
    fn device(&self) -> &str;
}

impl DeviceFirst for String {
    fn device(&self) -> &str {
        self
    }
}

impl DeviceFirst for (String, String) {
    fn device(&self) -> &str {
        &self.0
    }
}

impl<P: DeviceFirst> Call<P> {
    /// [`Call::begin`] for a device's modules, which that device's own token may manage.
    fn begin_for_device(&mut self, app: &App, right: Right) -> Result<P, HubError> {
        match self.path.as_ref().ok().map(|p| p.device().to_owned()) {
            Some(device) => {
                app.hub
                    .authorize_module_request(self.authorization(), right, &device)?;
                self.checked_path()
            }
            // An unreadable path names no device: only a policy may hear why.
            None => self.begin(app, right),
        }
    }
}

impl<P> Call<P> {
    /// Authorises the caller for `right`, then checks `api-version`; returns the path ids.
    fn begin(&mut self, app: &App, right: Right) -> Result<P, HubError> {
        app.hub.authorize(self.authorization(), right)?;
        self.checked_path()
    }

    fn authorization(&self) -> Option<&str> {
        self.headers
            .get(AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("(not text)"))
    }

    /// After authorisation: `api-version` present, then the path ids.
    fn checked_path(&mut self) -> Result<P, HubError> {
        require_api_version(&self.uri)?;
        std::mem::replace(
            &mut self.path,
            Err(HubError::server_error("path already taken")),
        )
    }

    /// `If-Match`, raw (the hub interprets quoting).
    fn if_match(&self) -> Result<Option<String>, HubError> {
        self.headers
            .get(IF_MATCH)
            .map(|v| {
                v.to_str()
                    .map(str::to_owned)
                    .map_err(|_| HubError::argument_invalid("If-Match is not text"))
            })
            .transpose()
    }

    /// The body as JSON, whatever the declared content type.
    fn json(&self) -> Result<Value, HubError> {
        let bytes = self.body.as_ref().map_err(Clone::clone)?;
        serde_json::from_slice(bytes)
            .map_err(|e| HubError::format_error(format!("request body is not valid JSON: {e}")))
    }
}

fn require_api_version(uri: &Uri) -> Result<(), HubError> {
    let present = uri.query().is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .any(|(k, v)| k == "api-version" && !v.is_empty())
    });
    if present {
        Ok(())
    } else {
        Err(HubError::argument_invalid(
            "the api-version query parameter is required",
        ))
    }
}

/// Runs a hub call that may write the state directory off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, HubError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, HubError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| HubError::server_error("the operation failed unexpectedly"))?
}

// ---- devices and modules -------------------------------------------------------------

async fn get_device(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let d = call.begin(&app, Right::RegistryRead)?;
        Ok((StatusCode::OK, Some(app.hub.get_device(&d)?)))
    })
    .await
}

async fn put_device(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let d = call.begin(&app, Right::RegistryWrite)?;
        let body = call.json()?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        let doc = blocking(move || hub.put_device(&d, &body, if_match.as_deref())).await?;
        Ok((StatusCode::OK, Some(doc)))
    })
    .await
}

async fn delete_device(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let d = call.begin(&app, Right::RegistryWrite)?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        blocking(move || hub.delete_device(&d, if_match.as_deref())).await?;
        Ok((StatusCode::NO_CONTENT, None))
    })
    .await
}

async fn list_modules(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let d = call.begin_for_device(&app, Right::RegistryRead)?;
        Ok((StatusCode::OK, Some(app.hub.list_modules(&d)?)))
    })
    .await
}

async fn get_module(State(app): State<App>, mut call: Call<(String, String)>) -> Response {
    respond(async move {
        let (d, m) = call.begin_for_device(&app, Right::RegistryRead)?;
        Ok((StatusCode::OK, Some(app.hub.get_module(&d, &m)?)))
    })
    .await
}

async fn put_module(State(app): State<App>, mut call: Call<(String, String)>) -> Response {
    respond(async move {
        let (d, m) = call.begin_for_device(&app, Right::RegistryWrite)?;
        let body = call.json()?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        let doc = blocking(move || hub.put_module(&d, &m, &body, if_match.as_deref())).await?;
        Ok((StatusCode::OK, Some(doc)))
    })
    .await
}

async fn delete_module(State(app): State<App>, mut call: Call<(String, String)>) -> Response {
    respond(async move {
        let (d, m) = call.begin_for_device(&app, Right::RegistryWrite)?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        blocking(move || hub.delete_module(&d, &m, if_match.as_deref())).await?;
        Ok((StatusCode::NO_CONTENT, None))
    })
    .await
}

// ---- MQTT over WebSocket -------------------------------------------------------------

async fn websocket_upgrade(
    State(app): State<App>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    super::websocket::upgrade(&headers, ws, app.hub, app.shutdown, &app.tasks)
        .unwrap_or_else(|e| error_response(&e))
}

// ---- module twins and methods --------------------------------------------------------

async fn get_twin(State(app): State<App>, mut call: Call<(String, String)>) -> Response {
    respond(async move {
        let (d, m) = call.begin(&app, Right::ServiceConnect)?;
        Ok((StatusCode::OK, Some(app.hub.get_module_twin(&d, &m)?)))
    })
    .await
}

async fn patch_twin(State(app): State<App>, call: Call<(String, String)>) -> Response {
    write_twin(app, call, TwinWrite::Patch).await
}

async fn replace_twin(State(app): State<App>, call: Call<(String, String)>) -> Response {
    write_twin(app, call, TwinWrite::Replace).await
}

async fn write_twin(app: App, mut call: Call<(String, String)>, how: TwinWrite) -> Response {
    respond(async move {
        let (d, m) = call.begin(&app, Right::ServiceConnect)?;
        let body = call.json()?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        let doc = blocking(move || hub.write_module_twin(&d, &m, how, &body, if_match.as_deref()))
            .await?;
        Ok((StatusCode::OK, Some(doc)))
    })
    .await
}

async fn invoke_method(State(app): State<App>, mut call: Call<(String, String)>) -> Response {
    respond(async move {
        let (d, m) = call.begin(&app, Right::ServiceConnect)?;
        let request = call.json()?;
        let result = tokio::select! {
            r = app.hub.invoke_module_method(&d, &m, &request) => r?,
            () = app.shutdown.cancelled() => {
                return Err(HubError::new(
                    503,
                    503001,
                    "ServiceUnavailable",
                    "the hub is shutting down",
                ))
            }
        };
        Ok((StatusCode::OK, Some(result)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_against_the_throttle_of_their_kind() {
        use axum::http::Method;
        let kind = |m: Method, p: &str| metered_kind(&m, p);
        assert_eq!(
            kind(Method::GET, "/twins/d/modules/m"),
            Some(Kind::TwinRead)
        );
        assert_eq!(
            kind(Method::PATCH, "/twins/d/modules/m"),
            Some(Kind::TwinUpdate)
        );
        assert_eq!(
            kind(Method::PUT, "/devices/d/modules/m"),
            Some(Kind::RegistryOperation)
        );
        assert_eq!(kind(Method::POST, "/devices/query"), Some(Kind::Query));
        assert_eq!(
            kind(Method::PUT, "/configurations/c1"),
            Some(Kind::Configuration)
        );
        assert_eq!(kind(Method::POST, "/twins/d/modules/m/methods"), None);
        assert_eq!(kind(Method::GET, "/$iothub/websocket"), None);
    }

    #[test]
    fn the_date_header_shows_the_hubs_clock_with_its_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = Hub::open("localhost", dir.path()).expect("hub");
        let read = |hub: &Hub| {
            let value = hub_date(hub);
            httpdate::parse_http_date(value.to_str().expect("text")).expect("an HTTP date")
        };
        let skew = |t: SystemTime| match t.duration_since(SystemTime::now()) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        };
        assert!(skew(read(&hub)).abs() <= 2);
        let two_days = 2 * 86_400;
        hub.faults().set_clock_offset(two_days);
        assert!((skew(read(&hub)) - two_days).abs() <= 2);
        hub.faults().set_clock_offset(-two_days);
        assert!((skew(read(&hub)) + two_days).abs() <= 2);
    }
}
