//! The emulator's HTTPS front end: service REST API (PROTOCOL §6) and MQTT over WebSocket
//! (§3.8), driven over real TLS with reqwest and rumqttc.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edgetwin::identity::{ServiceCredentials, SharedKey};
use edgetwin_sim::testing::unix_now;
use edgetwin_sim::{Sim, SimConfig};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

const API: &str = "api-version=2021-04-12";
/// Upper bound for operations that should take milliseconds; a hang fails instead of
/// blocking the suite. Never used to wait for something to happen.
const HANG: Duration = Duration::from_secs(30);

// ---- harness -------------------------------------------------------------------------

struct Env {
    sim: Sim,
    client: reqwest::Client,
    base: String,
    _dir: TempDir,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let sim = Sim::start(SimConfig::ephemeral(dir.path())).await.unwrap();
        Env::wrap(sim, dir)
    }

    fn wrap(sim: Sim, dir: TempDir) -> Env {
        let client = http_client(sim.ca_pem(), sim.https_addr());
        let base = format!("https://{}", sim.rest_authority());
        Env {
            sim,
            client,
            base,
            _dir: dir,
        }
    }

    async fn restart(self) -> Env {
        let Env { sim, _dir: dir, .. } = self;
        let sim = sim.restart().await.unwrap();
        Env::wrap(sim, dir)
    }

    fn creds(&self, policy: &str) -> ServiceCredentials {
        self.sim
            .service_connection_string(policy)
            .unwrap_or_else(|| panic!("no policy {policy}"))
            .parse()
            .unwrap()
    }

    /// `SharedAccessSignature ...` for `policy`, valid for an hour.
    fn token(&self, policy: &str) -> String {
        self.creds(policy).sas_token(unix_now() + 3600)
    }

    /// A request as `iothubowner`; `path` may carry its own query, else `api-version` is added.
    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.contains('?') {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{API}", self.base)
        };
        self.client
            .request(method, url)
            .header("Authorization", self.token("iothubowner"))
            .header("Accept", "application/json")
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Reply {
        let mut rb = self.req(method, path);
        if let Some(body) = body {
            rb = with_json(rb, &body);
        }
        if let Some(tag) = if_match {
            rb = rb.header("If-Match", tag);
        }
        send(rb).await
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let r = self.call(method.clone(), path, body, None).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}: {:?}", r.body);
        r.body
    }

    async fn create_device(&self, id: &str) -> Value {
        self.ok(
            Method::PUT,
            &format!("/devices/{id}"),
            Some(python_device_body(id)),
        )
        .await
    }

    /// `d` and `m` are path segments, already percent-encoded; the body carries the ids.
    async fn create_module(&self, d: &str, m: &str) -> Value {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        self.ok(
            Method::PUT,
            &format!("/devices/{d}/modules/{m}"),
            Some(json!({"moduleId": decode(m), "deviceId": decode(d),
                        "authentication": {"symmetricKey": {}, "type": "sas"}})),
        )
        .await
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    /// Parsed JSON, or `Value::Null` for an empty body.
    body: Value,
}

impl Reply {
    /// Asserts the hub's error shape (PROTOCOL §6.7, newer format) and returns the inner
    /// error object.
    fn hub_error(&self, status: u16, name: &str, code: u64) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(
            self.headers
                .get("iothub-errorcode")
                .and_then(|v| v.to_str().ok()),
            Some(name),
            "body: {}",
            self.body
        );
        assert_eq!(
            self.headers.get("content-type").unwrap(),
            "application/json; charset=utf-8"
        );
        assert_eq!(self.body["ExceptionMessage"], "", "body: {}", self.body);
        let inner: Value = serde_json::from_str(
            self.body["Message"]
                .as_str()
                .unwrap_or_else(|| panic!("Message is not a string: {}", self.body)),
        )
        .expect("Message holds JSON text");
        assert_eq!(inner["errorCode"], code, "inner: {inner}");
        let tracking = inner["trackingId"].as_str().unwrap();
        assert_eq!(tracking.len(), 32, "trackingId {tracking}");
        assert!(tracking.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(inner["timestampUtc"].as_str().unwrap().ends_with('Z'));
        assert!(inner["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(inner["info"], json!({}));
        inner
    }
}

fn http_client(ca_pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .no_proxy()
        .timeout(HANG)
        .build()
        .unwrap()
}

fn with_json(rb: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
    rb.header("Content-Type", "application/json; charset=utf-8")
        .body(serde_json::to_vec(body).unwrap())
}

async fn send(rb: reqwest::RequestBuilder) -> Reply {
    let res = rb.send().await.expect("request failed");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("non-JSON body ({e}): {}", String::from_utf8_lossy(&bytes)))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// What `azure-iot-hub`'s `create_device_with_sas(id, None, None, "enabled")` sends.
fn python_device_body(id: &str) -> Value {
    json!({"deviceId": id, "status": "enabled",
           "authentication": {"symmetricKey": {}, "type": "sas"},
           "capabilities": {"iotEdge": false}})
}

fn key_of(doc: &Value, which: &str) -> String {
    let k = doc["authentication"]["symmetricKey"][which]
        .as_str()
        .unwrap_or_else(|| panic!("no {which} in {doc}"))
        .to_string();
    SharedKey::from_base64(&k).expect("a usable base64 key");
    k
}

// ---- devices -------------------------------------------------------------------------

#[tokio::test]
async fn device_create_generates_keys_and_a_second_create_conflicts() {
    let env = Env::start().await;
    let r = env
        .call(
            Method::PUT,
            "/devices/dev1",
            Some(python_device_body("dev1")),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/json; charset=utf-8"
    );
    let doc = r.body;
    assert_eq!(doc["deviceId"], "dev1");
    assert_eq!(doc["status"], "enabled");
    assert_eq!(doc["connectionState"], "Disconnected");
    assert_eq!(doc["authentication"]["type"], "sas");
    assert_eq!(doc["capabilities"]["iotEdge"], false);
    assert!(doc["etag"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(doc["generationId"].as_str().is_some_and(|g| !g.is_empty()));
    let primary = key_of(&doc, "primaryKey");
    let secondary = key_of(&doc, "secondaryKey");
    assert_ne!(primary, secondary);

    let again = env
        .call(
            Method::PUT,
            "/devices/dev1",
            Some(python_device_body("dev1")),
            None,
        )
        .await;
    let inner = again.hub_error(409, "DeviceAlreadyExists", 409001);
    assert!(inner["message"].as_str().unwrap().contains("dev1"));

    let got = env.ok(Method::GET, "/devices/dev1", None).await;
    assert_eq!(key_of(&got, "primaryKey"), primary);
    assert_eq!(key_of(&got, "secondaryKey"), secondary);
    assert_eq!(got["etag"], doc["etag"]);
}

#[tokio::test]
async fn device_with_given_keys_update_and_delete() {
    let env = Env::start().await;
    let k1 = SharedKey::generate().as_base64().to_string();
    let k2 = SharedKey::generate().as_base64().to_string();
    let body = json!({"deviceId": "dev2", "status": "enabled",
                      "authentication": {"symmetricKey": {"primaryKey": k1, "secondaryKey": k2},
                                         "type": "sas"}});
    let doc = env.ok(Method::PUT, "/devices/dev2", Some(body)).await;
    assert_eq!(key_of(&doc, "primaryKey"), k1);
    assert_eq!(key_of(&doc, "secondaryKey"), k2);

    // An update needs If-Match; a stale quoted identity etag is refused.
    let mut upd = python_device_body("dev2");
    upd["status"] = json!("disabled");
    let stale = env
        .call(
            Method::PUT,
            "/devices/dev2",
            Some(upd.clone()),
            Some("\"bm9wZQ==\""),
        )
        .await;
    stale.hub_error(412, "PreconditionFailed", 412001);
    let etag = doc["etag"].as_str().unwrap();
    let r = env
        .call(
            Method::PUT,
            "/devices/dev2",
            Some(upd),
            Some(&format!("\"{etag}\"")),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "disabled");
    assert_ne!(r.body["etag"], doc["etag"]);

    let del = env
        .call(Method::DELETE, "/devices/dev2", None, Some("\"*\""))
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(del.body, Value::Null);
    let gone = env.call(Method::GET, "/devices/dev2", None, None).await;
    gone.hub_error(404, "DeviceNotFound", 404001);
    let gone = env.call(Method::DELETE, "/devices/dev2", None, None).await;
    gone.hub_error(404, "DeviceNotFound", 404001);
}

#[tokio::test]
async fn path_ids_are_percent_decoded() {
    let env = Env::start().await;
    // msrest encodes with nothing safe: "dev+1:x" → "dev%2B1%3Ax".
    let doc = env
        .ok(
            Method::PUT,
            "/devices/dev%2B1%3Ax",
            Some(python_device_body("dev+1:x")),
        )
        .await;
    assert_eq!(doc["deviceId"], "dev+1:x");
    let got = env.ok(Method::GET, "/devices/dev%2B1%3Ax", None).await;
    assert_eq!(got["deviceId"], "dev+1:x");
    let doc = env.create_module("dev%2B1%3Ax", "mod%24%40").await;
    assert_eq!(doc["moduleId"], "mod$@");
    let twin = env
        .ok(Method::GET, "/twins/dev%2B1%3Ax/modules/mod%24%40", None)
        .await;
    assert_eq!(twin["deviceId"], "dev+1:x");
    assert_eq!(twin["moduleId"], "mod$@");
}

// ---- modules -------------------------------------------------------------------------

#[tokio::test]
async fn module_create_conflict_get_list_delete() {
    let env = Env::start().await;
    env.create_device("dev1").await;
    let k = SharedKey::generate().as_base64().to_string();
    // Exactly what create_module_with_sas("dev1", "mod1", None, K, K) sends.
    let body = json!({"moduleId": "mod1", "deviceId": "dev1",
                      "authentication": {"symmetricKey": {"primaryKey": k, "secondaryKey": k},
                                         "type": "sas"}});
    let doc = env
        .ok(
            Method::PUT,
            "/devices/dev1/modules/mod1",
            Some(body.clone()),
        )
        .await;
    assert_eq!(doc["moduleId"], "mod1");
    assert_eq!(doc["deviceId"], "dev1");
    assert_eq!(doc["managedBy"], Value::Null);
    assert_eq!(doc["connectionState"], "Disconnected");
    assert_eq!(key_of(&doc, "primaryKey"), k);

    let again = env
        .call(Method::PUT, "/devices/dev1/modules/mod1", Some(body), None)
        .await;
    again.hub_error(409, "ModuleAlreadyExistsOnDevice", 409301);

    let generated = env.create_module("dev1", "mod2").await;
    key_of(&generated, "primaryKey");

    let got = env
        .ok(Method::GET, "/devices/dev1/modules/mod1", None)
        .await;
    assert_eq!(got, doc);
    let list = env.ok(Method::GET, "/devices/dev1/modules", None).await;
    let mut ids: Vec<&str> = list
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["mod1", "mod2"]);

    // delete_module(d, m) with no etag sends If-Match: "*".
    let del = env
        .call(
            Method::DELETE,
            "/devices/dev1/modules/mod1",
            None,
            Some("\"*\""),
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let gone = env
        .call(Method::GET, "/devices/dev1/modules/mod1", None, None)
        .await;
    let inner = gone.hub_error(404, "ModuleNotFound", 404010);
    assert!(inner["message"].as_str().unwrap().contains("mod1"));
    let gone = env
        .call(Method::DELETE, "/devices/dev1/modules/mod1", None, None)
        .await;
    gone.hub_error(404, "ModuleNotFound", 404010);
    let list = env.ok(Method::GET, "/devices/dev1/modules", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn modules_of_a_missing_device_are_not_found() {
    let env = Env::start().await;
    for (method, path) in [
        (Method::GET, "/devices/ghost/modules"),
        (Method::GET, "/devices/ghost/modules/m"),
        (Method::DELETE, "/devices/ghost/modules/m"),
        (Method::GET, "/twins/ghost/modules/m"),
    ] {
        let r = env.call(method, path, None, None).await;
        r.hub_error(404, "DeviceNotFound", 404001);
    }
    let r = env
        .call(
            Method::PUT,
            "/devices/ghost/modules/m",
            Some(json!({"moduleId": "m", "deviceId": "ghost"})),
            None,
        )
        .await;
    r.hub_error(404, "DeviceNotFound", 404001);
}

// ---- module twins --------------------------------------------------------------------

async fn env_with_module() -> Env {
    let env = Env::start().await;
    env.create_device("dev1").await;
    env.create_module("dev1", "mod1").await;
    env
}

const TWIN: &str = "/twins/dev1/modules/mod1";

fn desired_version(twin: &Value) -> u64 {
    twin["properties"]["desired"]["$version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no desired.$version in {twin}"))
}

#[tokio::test]
async fn twin_get_has_etag_versions_and_metadata() {
    let env = env_with_module().await;
    let twin = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(twin["deviceId"], "dev1");
    assert_eq!(twin["moduleId"], "mod1");
    assert!(twin["etag"].as_str().is_some_and(|e| !e.is_empty()));
    desired_version(&twin);
    assert!(twin["properties"]["desired"]["$metadata"].is_object());
    assert!(twin["properties"]["reported"]["$version"].is_u64());
    assert!(twin["properties"]["reported"]["$metadata"].is_object());
    assert_eq!(twin["authenticationType"], "sas");
    assert_eq!(twin["connectionState"], "Disconnected");
}

#[tokio::test]
async fn twin_patch_honours_quoted_if_match_only() {
    let env = env_with_module().await;
    let twin = env.ok(Method::GET, TWIN, None).await;
    let etag0 = twin["etag"].as_str().unwrap().to_string();
    let v0 = desired_version(&twin);

    // Current quoted etag → merged, version bumped, metadata for the key.
    let patch = json!({"properties": {"desired": {"interval": 5, "nested": {"a": 1}}}});
    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(patch),
            Some(&format!("\"{etag0}\"")),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t1 = r.body;
    assert_eq!(desired_version(&t1), v0 + 1);
    assert_eq!(t1["properties"]["desired"]["interval"], 5);
    assert_eq!(t1["properties"]["desired"]["nested"]["a"], 1);
    assert!(t1["properties"]["desired"]["$metadata"]["interval"]["$lastUpdated"].is_string());
    let etag1 = t1["etag"].as_str().unwrap().to_string();
    assert_ne!(etag1, etag0);

    // The now-stale quoted etag → 412, nothing changes.
    let stale = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"desired": {"interval": 6}}})),
            Some(&format!("\"{etag0}\"")),
        )
        .await;
    stale.hub_error(412, "PreconditionFailed", 412001);
    let same = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(same["properties"]["desired"]["interval"], 5);
    assert_eq!(desired_version(&same), v0 + 1);

    // "*" (what the SDK sends without an etag) → unconditional; null removes.
    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"desired": {"nested": null}}})),
            Some("\"*\""),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(desired_version(&r.body), v0 + 2);
    assert!(r.body["properties"]["desired"].get("nested").is_none());
    assert_eq!(r.body["properties"]["desired"]["interval"], 5);

    // An unquoted stale etag is ignored, as the real hub does.
    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"desired": {"interval": 7}}})),
            Some(&etag0),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["properties"]["desired"]["interval"], 7);
    assert_eq!(desired_version(&r.body), v0 + 3);

    // No If-Match at all → unconditional.
    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"tags": {"site": "a"}})),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["tags"]["site"], "a");
    assert_eq!(desired_version(&r.body), v0 + 3, "tags do not bump desired");
}

#[tokio::test]
async fn twin_put_replaces_desired_and_tags() {
    let env = env_with_module().await;
    env.ok(
        Method::PATCH,
        TWIN,
        Some(json!({"tags": {"t": 0, "old": true},
                    "properties": {"desired": {"keep": 1, "drop": 2}}})),
    )
    .await;
    let r = env
        .call(
            Method::PUT,
            TWIN,
            Some(json!({"tags": {"t": 1}, "properties": {"desired": {"only": true}}})),
            Some("\"*\""),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let desired = &r.body["properties"]["desired"];
    assert_eq!(desired["only"], true);
    assert!(desired.get("keep").is_none(), "{desired}");
    assert!(desired.get("drop").is_none(), "{desired}");
    assert!(desired["$metadata"].get("drop").is_none(), "{desired}");
    assert_eq!(r.body["tags"], json!({"t": 1}));
    let got = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(
        got["properties"]["desired"],
        r.body["properties"]["desired"]
    );
}

#[tokio::test]
async fn twin_writes_that_the_hub_refuses() {
    let env = env_with_module().await;
    let before = env.ok(Method::GET, TWIN, None).await;

    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"reported": {"x": 1}}})),
            None,
        )
        .await;
    r.hub_error(400, "ArgumentInvalid", 400004);

    let mut deep = json!(1);
    for i in 0..12 {
        deep = json!({ format!("l{i}"): deep });
    }
    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"desired": deep}})),
            None,
        )
        .await;
    r.hub_error(400, "ArgumentInvalid", 400004);

    let big: serde_json::Map<String, Value> = (0..10)
        .map(|i| (format!("k{i}"), json!("x".repeat(4000))))
        .collect();
    let r = env
        .call(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"desired": big}})),
            None,
        )
        .await;
    r.hub_error(413, "MessageTooLarge", 413001);

    let r = send(
        env.req(Method::PATCH, TWIN)
            .header("Content-Type", "application/json; charset=utf-8")
            .body("{\"properties\": {\"desired\": "),
    )
    .await;
    r.hub_error(400, "IotHubFormatError", 400006);

    let r = send(env.req(Method::PUT, TWIN)).await;
    r.hub_error(400, "IotHubFormatError", 400006);

    let after = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(after["etag"], before["etag"]);
    assert_eq!(desired_version(&after), desired_version(&before));
}

#[tokio::test]
async fn twin_of_a_missing_module_is_not_found() {
    let env = env_with_module().await;
    let r = env
        .call(Method::GET, "/twins/dev1/modules/nope", None, None)
        .await;
    r.hub_error(404, "ModuleNotFound", 404010);
    let r = env
        .call(
            Method::PATCH,
            "/twins/dev1/modules/nope",
            Some(json!({"properties": {"desired": {"a": 1}}})),
            None,
        )
        .await;
    r.hub_error(404, "ModuleNotFound", 404010);
}

#[tokio::test]
async fn lenient_about_content_type() {
    let env = env_with_module().await;
    let r = send(
        env.req(Method::PATCH, TWIN)
            .header("Content-Type", "text/plain")
            .body(r#"{"properties": {"desired": {"a": 1}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = send(
        env.req(Method::PATCH, TWIN)
            .body(r#"{"properties": {"desired": {"b": 2}}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["properties"]["desired"]["a"], 1);
    assert_eq!(r.body["properties"]["desired"]["b"], 2);
}

// ---- direct methods ------------------------------------------------------------------

#[tokio::test]
async fn method_to_an_offline_module_is_404103() {
    let env = env_with_module().await;
    let req = json!({"methodName": "reboot", "payload": {"delay": 5},
                     "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 0});
    let r = env
        .call(
            Method::POST,
            "/twins/dev1/modules/mod1/methods",
            Some(req.clone()),
            None,
        )
        .await;
    r.hub_error(404, "DeviceNotOnline", 404103);
    let r = env
        .call(
            Method::POST,
            "/twins/dev1/modules/nope/methods",
            Some(req),
            None,
        )
        .await;
    r.hub_error(404, "ModuleNotFound", 404010);
    let r = env
        .call(
            Method::POST,
            "/twins/dev1/modules/mod1/methods",
            Some(json!({"payload": 1})),
            None,
        )
        .await;
    r.hub_error(400, "ArgumentInvalid", 400004);
    let r = send(
        env.req(Method::POST, "/twins/dev1/modules/mod1/methods")
            .body("not json"),
    )
    .await;
    r.hub_error(400, "IotHubFormatError", 400006);
}

// ---- authorisation and request checks ------------------------------------------------

#[tokio::test]
async fn policies_grant_only_their_rights() {
    let env = env_with_module().await;
    let with = |policy: &str, method: Method, path: &str, body: Option<Value>| {
        let mut rb = env
            .client
            .request(method, format!("{}{path}?{API}", env.base))
            .header("Authorization", env.token(policy));
        if let Some(b) = body {
            rb = with_json(rb, &b);
        }
        send(rb)
    };

    // registryRead: reads yes, writes no.
    let r = with("registryRead", Method::GET, "/devices/dev1", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = with("registryRead", Method::GET, "/devices/dev1/modules", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = with(
        "registryRead",
        Method::PUT,
        "/devices/new1",
        Some(python_device_body("new1")),
    )
    .await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);
    let r = with("registryRead", Method::DELETE, "/devices/dev1", None).await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);
    let r = with("registryRead", Method::GET, TWIN, None).await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);

    // service: twins and methods yes, registry writes no.
    let r = with(
        "service",
        Method::PUT,
        "/devices/new1",
        Some(python_device_body("new1")),
    )
    .await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);
    let r = with("service", Method::GET, TWIN, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = with(
        "service",
        Method::PATCH,
        TWIN,
        Some(json!({"properties": {"desired": {"a": 1}}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // registryReadWrite: creates.
    let r = with(
        "registryReadWrite",
        Method::PUT,
        "/devices/new1",
        Some(python_device_body("new1")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // Nothing was created by the refused calls before.
    let got = env.ok(Method::GET, "/devices/new1", None).await;
    assert_eq!(got["deviceId"], "new1");
}

#[tokio::test]
async fn bad_missing_and_expired_tokens_are_401() {
    let env = env_with_module().await;
    let url = format!("{}/devices/dev1?{API}", env.base);

    let r = send(env.client.get(&url)).await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);

    let mut forged = env.creds("iothubowner");
    forged.key = SharedKey::generate();
    let r = send(
        env.client
            .get(&url)
            .header("Authorization", forged.sas_token(unix_now() + 3600)),
    )
    .await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);

    let r = send(
        env.client
            .get(&url)
            .header("Authorization", "SharedAccessSignature garbage"),
    )
    .await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);

    let expired = env.creds("iothubowner").sas_token(unix_now() - 600);
    let r = send(env.client.get(&url).header("Authorization", expired)).await;
    let inner = r.hub_error(401, "IotHubUnauthorized", 401003);
    assert!(
        inner["message"].as_str().unwrap().contains("clock"),
        "{inner}"
    );
    // The Date header lets the caller measure the skew.
    assert!(r.headers.contains_key("date"));
}

#[tokio::test]
async fn authorization_is_checked_before_anything_else() {
    let env = Env::start().await;
    // No token, no api-version, bad JSON, missing device: still 401.
    let r = send(env.client.put(format!("{}/devices/x", env.base)).body("{")).await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);
}

#[tokio::test]
async fn api_version_is_required_with_any_value() {
    let env = env_with_module().await;
    // (`Env::req` adds api-version only to paths without a query.)
    for path in [
        "/devices/dev1?",
        "/devices/dev1?foo=bar",
        "/devices/dev1?api-version=",
    ] {
        let r = env.call(Method::GET, path, None, None).await;
        r.hub_error(400, "ArgumentInvalid", 400004);
    }
    let r = env
        .call(
            Method::GET,
            "/devices/dev1?api-version=2020-03-13",
            None,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = env
        .call(
            Method::GET,
            "/devices/dev1?x=1&api-version=anything",
            None,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let env = env_with_module().await;
    let r = env.call(Method::GET, "/nothing/here", None, None).await;
    r.hub_error(404, "NotFound", 404000);
    let r = env.call(Method::GET, "/devices", None, None).await;
    r.hub_error(404, "NotFound", 404000);
    let r = env
        .call(Method::POST, "/devices/dev1", Some(json!({})), None)
        .await;
    r.hub_error(405, "MethodNotAllowed", 405000);
    let r = env.call(Method::DELETE, TWIN, None, None).await;
    r.hub_error(405, "MethodNotAllowed", 405000);
    let r = env
        .call(Method::GET, "/twins/dev1/modules/mod1/methods", None, None)
        .await;
    r.hub_error(405, "MethodNotAllowed", 405000);
}

#[tokio::test]
async fn every_response_has_a_date_header() {
    let env = env_with_module().await;
    let ok = env.call(Method::GET, "/devices/dev1", None, None).await;
    let err = env.call(Method::GET, "/devices/nope", None, None).await;
    let none = env.call(Method::GET, "/nothing", None, None).await;
    let del = env
        .call(Method::DELETE, "/devices/dev1/modules/mod1", None, None)
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    for r in [&ok, &err, &none, &del] {
        let date = r
            .headers
            .get("date")
            .unwrap_or_else(|| panic!("no Date on {}", r.status))
            .to_str()
            .unwrap();
        let t = httpdate::parse_http_date(date).expect("an HTTP date");
        let skew = t
            .duration_since(SystemTime::now())
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(60), "Date {date}");
    }
}

// ---- persistence ---------------------------------------------------------------------

#[tokio::test]
async fn state_survives_a_restart() {
    let env = env_with_module().await;
    let dev = env.ok(Method::GET, "/devices/dev1", None).await;
    let module = env
        .ok(Method::GET, "/devices/dev1/modules/mod1", None)
        .await;
    let twin = env
        .ok(
            Method::PATCH,
            TWIN,
            Some(json!({"properties": {"desired": {"interval": 9}}})),
        )
        .await;
    let port = env.sim.https_addr().port();

    let env = env.restart().await;
    assert_eq!(env.sim.https_addr().port(), port);
    let dev2 = env.ok(Method::GET, "/devices/dev1", None).await;
    assert_eq!(key_of(&dev2, "primaryKey"), key_of(&dev, "primaryKey"));
    assert_eq!(key_of(&dev2, "secondaryKey"), key_of(&dev, "secondaryKey"));
    assert_eq!(dev2["generationId"], dev["generationId"]);
    let module2 = env
        .ok(Method::GET, "/devices/dev1/modules/mod1", None)
        .await;
    assert_eq!(
        key_of(&module2, "primaryKey"),
        key_of(&module, "primaryKey")
    );
    let twin2 = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(twin2["properties"]["desired"]["interval"], 9);
    assert_eq!(desired_version(&twin2), desired_version(&twin));
    assert_eq!(twin2["etag"], twin["etag"]);
}

// ---- MQTT over WebSocket -------------------------------------------------------------

fn upgrade_request(env: &Env, protocol: Option<&str>) -> reqwest::RequestBuilder {
    let mut rb = env
        .client
        .get(format!("{}/$iothub/websocket", env.base))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(p) = protocol {
        rb = rb.header("Sec-WebSocket-Protocol", p);
    }
    rb
}

#[tokio::test]
async fn websocket_requires_the_mqtt_subprotocol() {
    let env = Env::start().await;
    let r = send(upgrade_request(&env, None)).await;
    r.hub_error(400, "ArgumentInvalid", 400004);
    let r = send(upgrade_request(&env, Some("chat"))).await;
    r.hub_error(400, "ArgumentInvalid", 400004);
    // A plain GET (no upgrade) is not a WebSocket either.
    let r = send(
        env.client
            .get(format!("{}/$iothub/websocket", env.base))
            .header("Sec-WebSocket-Protocol", "mqtt"),
    )
    .await;
    r.hub_error(400, "ArgumentInvalid", 400004);
}

#[tokio::test]
async fn websocket_upgrade_echoes_mqtt() {
    let env = Env::start().await;
    let res = upgrade_request(&env, Some("mqtt")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(res.headers().get("sec-websocket-protocol").unwrap(), "mqtt");
    assert!(res.headers().contains_key("date"));
}

fn rumqttc_tls(ca_pem: &str) -> rumqttc::TlsConfiguration {
    use rumqttc::tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    rumqttc::TlsConfiguration::Rustls(Arc::new(config))
}

/// Connects `dev1/mod1` over `wss://localhost:PORT/$iothub/websocket` as the Python SDK
/// does (clean session 0, SAS password) and waits for CONNACK 0.
async fn connect_ws(env: &Env) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Transport};
    let cs = env
        .sim
        .hub()
        .module_connection_string("dev1", "mod1")
        .unwrap();
    let creds: edgetwin::identity::ModuleCredentials = cs.parse().unwrap();
    let port = env.sim.https_addr().port();
    let mut opts = MqttOptions::new(
        "dev1/mod1",
        format!("wss://localhost:{port}/$iothub/websocket"),
        port,
    );
    opts.set_transport(Transport::wss_with_config(rumqttc_tls(env.sim.ca_pem())))
        .set_credentials(
            format!("{}/dev1/mod1/?api-version=2021-04-12", env.sim.hub_name()),
            creds.sas_token(unix_now() + 3600),
        )
        .set_clean_session(false)
        .set_keep_alive(Duration::from_secs(60));
    let (client, mut events) = AsyncClient::new(opts, 16);
    let connack = async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) =
                events.poll().await.expect("MQTT over WebSocket")
            {
                return ack;
            }
        }
    };
    let ack = tokio::time::timeout(HANG, connack).await.expect("hung");
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    (client, events)
}

/// A module over WebSocket subscribes to methods and answers one invoked through REST,
/// then disconnects cleanly. Needs the real MQTT server.
#[tokio::test]
async fn mqtt_over_websocket_serves_a_module() {
    use edgetwin_sim::SimEvent;
    use rumqttc::{Event, Outgoing, Packet, QoS};

    let env = env_with_module().await;
    let mut hub_events = env.sim.hub().events();
    let (client, mut events) = connect_ws(&env).await;

    let run = async {
        client
            .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        let twin = env.ok(Method::GET, TWIN, None).await;
        assert_eq!(twin["connectionState"], "Connected");

        let invoke = env.call(
            Method::POST,
            "/twins/dev1/modules/mod1/methods",
            Some(json!({"methodName": "echo", "payload": {"n": 1},
                        "responseTimeoutInSeconds": 20})),
            None,
        );
        tokio::pin!(invoke);
        loop {
            tokio::select! {
                r = &mut invoke => break r,
                ev = events.poll() => {
                    if let Event::Incoming(Packet::Publish(p)) = ev.unwrap() {
                        let rid = p.topic.strip_prefix("$iothub/methods/POST/echo/?$rid=")
                            .unwrap_or_else(|| panic!("unexpected topic {}", p.topic));
                        let req: Value = serde_json::from_slice(&p.payload).unwrap();
                        assert_eq!(req, json!({"n": 1}));
                        client
                            .publish(
                                format!("$iothub/methods/res/201/?$rid={rid}"),
                                QoS::AtLeastOnce,
                                false,
                                serde_json::to_vec(&json!({"ok": true})).unwrap(),
                            )
                            .await
                            .unwrap();
                    }
                }
            }
        }
    };
    let reply = tokio::time::timeout(HANG, run).await.expect("hung");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body, json!({"status": 201, "payload": {"ok": true}}));

    // DISCONNECT over the socket: the hub sees the module go.
    client.disconnect().await.unwrap();
    let sent = async {
        while !matches!(
            events.poll().await,
            Ok(Event::Outgoing(Outgoing::Disconnect))
        ) {}
    };
    tokio::time::timeout(HANG, sent).await.expect("hung");
    edgetwin_sim::wait_for(&mut hub_events, HANG, |e| {
        matches!(e, SimEvent::Disconnected { .. })
    })
    .await
    .expect("the hub sees the module disconnect");
    let twin = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(twin["connectionState"], "Disconnected");
    env.sim.shutdown().await;
}

/// When the hub drops a WebSocket client, the client sees its connection end.
#[tokio::test]
async fn hub_dropping_a_websocket_client_closes_it() {
    let env = env_with_module().await;
    let (_client, mut events) = connect_ws(&env).await;
    env.sim.faults().drop_all_connections();
    let ended = async {
        loop {
            if let Err(e) = events.poll().await {
                return e;
            }
        }
    };
    let e = tokio::time::timeout(HANG, ended).await.expect("hung");
    assert!(
        !matches!(e, rumqttc::ConnectionError::ConnectionRefused(_)),
        "{e:?}"
    );
    let twin = env.ok(Method::GET, TWIN, None).await;
    assert_eq!(twin["connectionState"], "Disconnected");
}

/// Stopping the emulator closes WebSocket clients promptly, even ones that never answer
/// the Close frame.
#[tokio::test]
async fn shutdown_does_not_wait_for_silent_websocket_clients() {
    let env = env_with_module().await;
    let (_client, _events) = connect_ws(&env).await;
    // The event loop is never polled again, so the client cannot answer our Close.
    tokio::time::timeout(Duration::from_secs(3), env.sim.shutdown())
        .await
        .expect("shutdown waited for the client");
}
