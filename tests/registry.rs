//! `RegistryClient` (src/registry.rs) on the wire: each REST operation's request (method,
//! path, api-version, headers, body) against a recording HTTPS server, its response
//! handling (404, 409, 412, 401, 429 and 5xx with bounded retries, malformed error
//! bodies), and the whole set of operations against the emulator.

use edgetwin_sim::testing as support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgetwin::identity::{SasToken, ServiceCredentials};
use edgetwin::registry::{RegistryClient, RegistryError, RetryPolicy, API_VERSION};
use serde_json::{json, Value};
use support::scripted_https::{Recorded, Reply, ScriptedHttps};
use support::TestSim;

/// Quick retries, so tests that exhaust them stay fast.
const FAST: RetryPolicy = RetryPolicy {
    attempts: 3,
    first_delay: Duration::from_millis(10),
    max_delay: Duration::from_millis(40),
    total: Duration::from_secs(10),
};

/// A client of `server` as policy `iothubowner`, with `retry`.
fn client_of(server: &ScriptedHttps, retry: RetryPolicy) -> (RegistryClient, ServiceCredentials) {
    let credentials: ServiceCredentials = server
        .service_connection_string("iothubowner")
        .parse()
        .expect("service connection string");
    let client = RegistryClient::new(credentials.clone(), Some(&server.ca_pem()))
        .expect("client")
        .with_retry(retry);
    (client, credentials)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The request carries what every request of PROTOCOL §6.1 carries: `?api-version=`,
/// `Accept: application/json`, and a fresh, short-lived service token
/// `SharedAccessSignature sr=<host>&sig=...&se=...&skn=<policy>` signed with the key.
fn assert_common(req: &Recorded, credentials: &ServiceCredentials) {
    assert_eq!(
        req.query.as_deref(),
        Some(format!("api-version={API_VERSION}").as_str())
    );
    assert_eq!(API_VERSION, "2021-04-12");
    assert_eq!(req.header("accept"), Some("application/json"));
    let auth = req.header("authorization").expect("Authorization header");
    let fields = auth
        .strip_prefix("SharedAccessSignature ")
        .unwrap_or_else(|| panic!("not a SAS token: {auth}"));
    let names: Vec<&str> = fields
        .split('&')
        .map(|f| f.split_once('=').expect("name=value").0)
        .collect();
    assert_eq!(names, ["sr", "sig", "se", "skn"], "{fields}");
    let token = SasToken::parse(auth).expect("token parses");
    assert_eq!(
        token.sr_raw,
        format!("localhost%3A{}", req_port(credentials))
    );
    assert_eq!(token.key_name.as_deref(), Some("iothubowner"));
    token
        .verify(&credentials.key, now())
        .expect("signed with the policy key, not expired");
    assert!(
        token.expiry <= now() + 3600,
        "service tokens are short-lived: se={}",
        token.expiry
    );
}

fn req_port(credentials: &ServiceCredentials) -> &str {
    credentials.host_name.rsplit_once(':').expect("host:port").1
}

fn assert_json_body(req: &Recorded, expected: Value) {
    assert_eq!(
        req.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(req.json(), expected);
}

fn assert_no_body(req: &Recorded) {
    assert!(req.body.is_empty(), "unexpected body {:?}", req.body);
    assert_eq!(req.header("content-type"), None);
}

// --- requests ---------------------------------------------------------------------------

#[tokio::test]
async fn create_device_puts_a_sas_device_with_hub_generated_keys() {
    let server =
        ScriptedHttps::replying(vec![Reply::json(200, json!({"deviceId": "dev 1"}))]).await;
    let (client, credentials) = client_of(&server, FAST);
    let answer = client.create_device("dev 1/$x:@+").await.expect("created");
    assert_eq!(answer["deviceId"], "dev 1");
    let req = server.only_request();
    assert_eq!(req.method, "PUT");
    // Ids percent-encoded with nothing safe, as msrest does (PROTOCOL §6.1).
    assert_eq!(req.path, "/devices/dev%201%2F%24x%3A%40%2B");
    assert_common(&req, &credentials);
    assert_eq!(req.header("if-match"), None, "create sends no If-Match");
    assert_json_body(
        &req,
        json!({"deviceId": "dev 1/$x:@+", "status": "enabled",
               "authentication": {"symmetricKey": {}, "type": "sas"},
               "capabilities": {"iotEdge": false}}),
    );
}

#[tokio::test]
async fn get_device_and_get_module_are_plain_gets() {
    let server = ScriptedHttps::replying(vec![Reply::json(200, json!({"ok": true}))]).await;
    let (client, credentials) = client_of(&server, FAST);
    client.get_device("d1").await.expect("device");
    client.get_module("d1", "m1").await.expect("module");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    for (req, path) in reqs.iter().zip(["/devices/d1", "/devices/d1/modules/m1"]) {
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, path);
        assert_common(req, &credentials);
        assert_no_body(req);
        assert_eq!(req.header("if-match"), None);
    }
}

#[tokio::test]
async fn create_module_puts_a_sas_module() {
    let server = ScriptedHttps::replying(vec![Reply::json(201, json!({"moduleId": "m1"}))]).await;
    let (client, credentials) = client_of(&server, FAST);
    let answer = client
        .create_module("d1", "m1")
        .await
        .expect("201 is success");
    assert_eq!(answer["moduleId"], "m1");
    let req = server.only_request();
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("PUT", "/devices/d1/modules/m1")
    );
    assert_common(&req, &credentials);
    assert_eq!(req.header("if-match"), None);
    assert_json_body(
        &req,
        json!({"moduleId": "m1", "deviceId": "d1",
               "authentication": {"symmetricKey": {}, "type": "sas"}}),
    );
}

#[tokio::test]
async fn deletes_send_a_quoted_if_match_and_accept_204() {
    let server = ScriptedHttps::replying(vec![Reply::empty(204)]).await;
    let (client, credentials) = client_of(&server, FAST);
    client
        .delete_module("d1", "m1", None)
        .await
        .expect("deleted");
    client
        .delete_device("d1", Some("OTg0MjI1NzE1"))
        .await
        .expect("deleted");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("DELETE", "/devices/d1/modules/m1")
    );
    assert_eq!(reqs[0].header("if-match"), Some("\"*\""));
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("DELETE", "/devices/d1")
    );
    assert_eq!(reqs[1].header("if-match"), Some("\"OTg0MjI1NzE1\""));
    for req in &reqs {
        assert_common(req, &credentials);
        assert_no_body(req);
    }
}

#[tokio::test]
async fn twin_get_patch_and_replace() {
    let twin = json!({"etag": "AAAAAAAAAAQ=", "properties": {"desired": {"$version": 4}}});
    let server = ScriptedHttps::replying(vec![Reply::json(200, twin.clone())]).await;
    let (client, credentials) = client_of(&server, FAST);

    assert_eq!(client.get_module_twin("d1", "m1").await.unwrap(), twin);
    let desired = json!({"telemetryInterval": 122, "nested": {"a": 1}, "gone": null});
    client
        .patch_desired("d1", "m1", &desired, Some("AAAAAAAAAAQ="))
        .await
        .unwrap();
    // An etag that already carries quotes is not quoted twice.
    client
        .patch_desired("d1", "m1", &desired, Some("\"AAAAAAAAAAQ=\""))
        .await
        .unwrap();
    client
        .patch_desired("d1", "m1", &desired, None)
        .await
        .unwrap();
    let fragment = json!({"tags": {"t": 1}, "properties": {"desired": {"only": true}}});
    client
        .replace_module_twin("d1", "m1", &fragment, Some("AAAAAAAAAAQ="))
        .await
        .unwrap();

    let reqs = server.requests();
    assert_eq!(reqs.len(), 5);
    for req in &reqs {
        assert_eq!(req.path, "/twins/d1/modules/m1");
        assert_common(req, &credentials);
    }
    assert_eq!(reqs[0].method, "GET");
    assert_no_body(&reqs[0]);
    for (req, if_match) in reqs[1..4]
        .iter()
        .zip(["\"AAAAAAAAAAQ=\"", "\"AAAAAAAAAAQ=\"", "\"*\""])
    {
        assert_eq!(req.method, "PATCH");
        assert_eq!(req.header("if-match"), Some(if_match));
        assert_json_body(req, json!({"properties": {"desired": desired}}));
    }
    assert_eq!(reqs[4].method, "PUT");
    assert_eq!(reqs[4].header("if-match"), Some("\"AAAAAAAAAAQ=\""));
    assert_json_body(&reqs[4], fragment);
}

#[tokio::test]
async fn invoke_module_method_posts_the_method_request() {
    let server = ScriptedHttps::replying(vec![Reply::json(
        200,
        json!({"status": 200, "payload": {"ok": true}}),
    )])
    .await;
    let (client, credentials) = client_of(&server, FAST);
    let result = client
        .invoke_module_method("d1", "m1", "reboot", &json!({"delay": 5}), 30)
        .await
        .unwrap();
    assert_eq!(result["payload"]["ok"], true);
    let req = server.only_request();
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/twins/d1/modules/m1/methods")
    );
    assert_common(&req, &credentials);
    assert_json_body(
        &req,
        json!({"methodName": "reboot", "payload": {"delay": 5},
               "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 0}),
    );
}

// --- responses --------------------------------------------------------------------------

#[tokio::test]
async fn not_found_conflict_and_precondition_failed_are_typed_and_not_retried() {
    let cases = [
        (404, "DeviceNotFound", "NotFound"),
        (409, "DeviceAlreadyExists", "Conflict"),
        (412, "PreconditionFailed", "PreconditionFailed"),
        (400, "ArgumentInvalid", "Invalid"),
    ];
    for (status, code_name, kind) in cases {
        let server =
            ScriptedHttps::replying(vec![Reply::hub_error(status, code_name, "the hub says no")])
                .await;
        let (client, _) = client_of(&server, FAST);
        let err = client
            .patch_desired("d1", "m1", &json!({"a": 1}), Some("e1"))
            .await
            .unwrap_err();
        let got = match &err {
            RegistryError::NotFound(_) => "NotFound",
            RegistryError::Conflict(_) => "Conflict",
            RegistryError::PreconditionFailed(_) => "PreconditionFailed",
            RegistryError::Invalid(_) => "Invalid",
            other => panic!("{status}: unexpected {other:?}"),
        };
        assert_eq!(got, kind, "{status}");
        assert!(!err.is_retryable(), "{status}");
        let text = err.to_string();
        assert!(
            text.contains("PATCH /twins/d1/modules/m1") && text.contains(code_name),
            "{status}: the message names what failed and why: {text}"
        );
        assert_eq!(server.requests().len(), 1, "{status} is not retried");
    }
}

#[tokio::test]
async fn the_newer_nested_error_body_becomes_the_message() {
    let body = json!({
        "Message": "{\"errorCode\":404010,\"trackingId\":\"t\",\"message\":\"Module m1 on device d1 not found\",\"info\":{},\"timestampUtc\":\"2026-01-01T00:00:00Z\"}",
        "ExceptionMessage": ""
    });
    let server = ScriptedHttps::replying(vec![
        Reply::json(404, body).header("iothub-errorcode", "ModuleNotFound")
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    let err = client.get_module("d1", "m1").await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "not found: GET /devices/d1/modules/m1: ModuleNotFound: Module m1 on device d1 not found (error 404010)"
    );
}

#[tokio::test]
async fn malformed_error_bodies_still_give_a_message() {
    let server = ScriptedHttps::replying(vec![
        Reply::text(400, "<html><body>Bad Request</body></html>"),
        Reply::text(400, "{\"Message\": "),
        Reply::empty(400),
        Reply::json(400, json!({"Message": 42})),
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    let mut messages = Vec::new();
    for _ in 0..4 {
        let err = client.get_device("d1").await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{err:?}");
        messages.push(err.to_string());
    }
    assert!(
        messages[0].contains("<html><body>Bad Request"),
        "{}",
        messages[0]
    );
    assert!(messages[1].contains("{\"Message\":"), "{}", messages[1]);
    assert!(
        messages[2].contains("no error details from the hub"),
        "{}",
        messages[2]
    );
    assert!(messages[3].contains("GET /devices/d1"), "{}", messages[3]);
    // A success with a body that is not JSON is refused too, naming the request.
    let server = ScriptedHttps::replying(vec![Reply::text(200, "not json")]).await;
    let (client, _) = client_of(&server, FAST);
    let err = client.get_device("d1").await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Invalid(m) if m.contains("GET /devices/d1") && m.contains("non-JSON")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unauthorized_with_a_clock_off_is_signed_again_once_on_hub_time_then_final() {
    let an_hour_ago = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    let server = ScriptedHttps::replying(vec![Reply::hub_error(
        401,
        "IotHubUnauthorizedAccess",
        "Unauthorized",
    )
    .header("date", &an_hour_ago)])
    .await;
    let (client, _) = client_of(&server, FAST);
    let err = client.create_device("d1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized(_)), "{err:?}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("PUT /devices/d1"), "{text}");
    assert!(text.contains("IotHubUnauthorizedAccess"), "{text}");
    assert!(
        text.contains("clock differs from the hub's by -3600 s"),
        "{text}"
    );
    // Once more, at once, signed an hour earlier; then no more.
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let expiry = |r: &Recorded| {
        SasToken::parse(r.header("authorization").expect("signed"))
            .expect("token parses")
            .expiry
    };
    let (first, second) = (expiry(&requests[0]), expiry(&requests[1]));
    assert!(
        (3590..=3610).contains(&(first - second)),
        "{first} {second}"
    );
}

#[tokio::test]
async fn unauthorized_with_the_clock_right_is_final_at_once() {
    let server = ScriptedHttps::replying(vec![Reply::hub_error(
        401,
        "IotHubUnauthorizedAccess",
        "Unauthorized",
    )
    .header("date", &httpdate::fmt_http_date(SystemTime::now()))])
    .await;
    let (client, _) = client_of(&server, FAST);
    let err = client.create_device("d1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized(_)), "{err:?}");
    assert!(!err.to_string().contains("clock"), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn throttling_is_retried_a_bounded_number_of_times() {
    let server = ScriptedHttps::replying(vec![Reply::hub_error(
        429,
        "ThrottlingException",
        "slow down",
    )])
    .await;
    let (client, _) = client_of(&server, FAST);
    let err = client.get_module_twin("d1", "m1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Throttled(_)), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 3, "FAST allows 3 attempts");
    let text = err.to_string();
    assert!(text.contains("GET /twins/d1/modules/m1"), "{text}");
    assert!(text.contains("ThrottlingException"), "{text}");
    assert!(text.contains("gave up after 3 attempts"), "{text}");
}

#[tokio::test]
async fn server_errors_are_retried_and_a_later_success_wins() {
    let server = ScriptedHttps::replying(vec![
        Reply::hub_error(503, "ServiceUnavailable", "try later"),
        Reply::hub_error(500, "ServerError", "oops"),
        Reply::json(200, json!({"deviceId": "d1"})),
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    let device = client
        .get_device("d1")
        .await
        .expect("third attempt succeeds");
    assert_eq!(device["deviceId"], "d1");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn server_errors_exhaust_the_attempts_with_a_transient_error() {
    let server = ScriptedHttps::replying(vec![Reply::text(502, "<html>Bad Gateway</html>")]).await;
    let (client, _) = client_of(&server, FAST);
    let err = client.create_module("d1", "m1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Transient(_)), "{err:?}");
    assert_eq!(server.requests().len(), 3);
    let text = err.to_string();
    assert!(text.contains("PUT /devices/d1/modules/m1"), "{text}");
    assert!(text.contains("Bad Gateway"), "{text}");
}

#[tokio::test]
async fn retries_stop_at_the_total_time_bound() {
    let server = ScriptedHttps::replying(vec![Reply::empty(503)]).await;
    let policy = RetryPolicy {
        attempts: 1000,
        first_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(100),
        total: Duration::from_millis(400),
    };
    let (client, _) = client_of(&server, policy);
    let started = Instant::now();
    let err = client.get_device("d1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Transient(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let attempts = server.requests().len();
    assert!((2..=9).contains(&attempts), "{attempts} attempts in 400 ms");
}

#[tokio::test]
async fn a_request_that_times_out_is_retried() {
    let server = ScriptedHttps::replying(vec![
        Reply::json(200, json!({"late": true})).delayed(Duration::from_secs(5)),
        Reply::json(200, json!({"late": false})),
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    let client = client.with_request_timeout(Duration::from_millis(300));
    let twin = client
        .get_module_twin("d1", "m1")
        .await
        .expect("second attempt");
    assert_eq!(twin["late"], false);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn unsafe_requests_are_repeated_only_when_the_hub_cannot_have_acted() {
    // A direct method and an unconditional PATCH may have been carried out when a 5xx
    // comes back: not repeated. A 429 means not carried out: repeated.
    let server = ScriptedHttps::replying(vec![Reply::empty(500)]).await;
    let (client, _) = client_of(&server, FAST);
    let err = client
        .invoke_module_method("d1", "m1", "reboot", &json!({}), 5)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Transient(_)), "{err:?}");
    let err = client
        .patch_desired("d1", "m1", &json!({"a": 1}), None)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Transient(_)), "{err:?}");
    assert_eq!(server.requests().len(), 2, "one attempt each");

    let server = ScriptedHttps::replying(vec![
        Reply::hub_error(429, "ThrottlingException", "slow down"),
        Reply::json(200, json!({"status": 200, "payload": null})),
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    client
        .invoke_module_method("d1", "m1", "reboot", &json!({}), 5)
        .await
        .expect("repeated after 429");
    assert_eq!(server.requests().len(), 2);

    // A PATCH with a real etag is safe: if the first went through, the etag moved on.
    let server = ScriptedHttps::replying(vec![
        Reply::empty(503),
        Reply::json(200, json!({"properties": {"desired": {"$version": 5}}})),
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    client
        .patch_desired("d1", "m1", &json!({"a": 1}), Some("e4"))
        .await
        .expect("repeated after 503");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[1].header("if-match"),
        Some("\"e4\""),
        "same etag again"
    );
}

#[tokio::test]
async fn an_unreachable_hub_is_transient_after_bounded_attempts() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let credentials: ServiceCredentials = format!(
        "HostName=localhost:{port};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        edgetwin::identity::SharedKey::generate().as_base64()
    )
    .parse()
    .unwrap();
    let client = RegistryClient::new(credentials, None)
        .unwrap()
        .with_retry(FAST);
    let err = client.get_device("d1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Transient(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("GET /devices/d1"), "{text}");
    assert!(text.contains("gave up after 3 attempts"), "{text}");
    assert!(!text.contains("SharedAccessSignature"), "{text}");
}

// --- against the emulator ---------------------------------------------------------------

fn sim_client(ts: &TestSim, policy: &str) -> RegistryClient {
    let connstr = ts
        .sim
        .service_connection_string(policy)
        .unwrap_or_else(|| panic!("policy {policy}"));
    RegistryClient::new(connstr.parse().unwrap(), Some(ts.sim.ca_pem().as_bytes()))
        .unwrap()
        .with_retry(FAST)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_read_policy_cannot_create() {
    let ts = TestSim::start().await;
    let client = sim_client(&ts, "registryRead");
    let err = client.create_device("gw1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized(_)), "{err:?}");
    assert!(err.to_string().contains("PUT /devices/gw1"), "{err}");
    assert!(ts.hub().get_device("gw1").is_err(), "nothing created");
    // Reading is within its rights: a missing device is 404, not 401.
    let err = client.get_device("gw1").await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_against_the_emulator() {
    let ts = TestSim::start().await;
    let client = sim_client(&ts, "registryReadWrite");
    let owner = sim_client(&ts, "iothubowner");

    let device = client.create_device("gw1").await.expect("device created");
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("hub-generated key");
    assert!(!key.is_empty());
    let err = client.create_device("gw1").await.unwrap_err();
    assert!(matches!(err, RegistryError::Conflict(_)), "{err:?}");
    assert_eq!(client.get_device("gw1").await.unwrap()["deviceId"], "gw1");

    let module = client
        .create_module("gw1", "edgetwin")
        .await
        .expect("module");
    assert!(module["authentication"]["symmetricKey"]["primaryKey"].is_string());
    let err = client.create_module("gw1", "edgetwin").await.unwrap_err();
    assert!(matches!(err, RegistryError::Conflict(_)), "{err:?}");
    assert_eq!(
        client.get_module("gw1", "edgetwin").await.unwrap()["moduleId"],
        "edgetwin"
    );

    let twin = owner
        .get_module_twin("gw1", "edgetwin")
        .await
        .expect("twin");
    let etag = twin["etag"].as_str().expect("etag").to_owned();
    let patched = owner
        .patch_desired(
            "gw1",
            "edgetwin",
            &json!({"telemetryInterval": 122}),
            Some(&etag),
        )
        .await
        .expect("patched with the current etag");
    assert_eq!(patched["properties"]["desired"]["telemetryInterval"], 122);
    let err = owner
        .patch_desired(
            "gw1",
            "edgetwin",
            &json!({"telemetryInterval": 5}),
            Some(&etag),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::PreconditionFailed(_)),
        "{err:?}"
    );
    let patched = owner
        .patch_desired(
            "gw1",
            "edgetwin",
            &json!({"telemetryInterval": null, "x": 1}),
            None,
        )
        .await
        .expect("unconditional patch");
    let desired = &patched["properties"]["desired"];
    assert!(desired.get("telemetryInterval").is_none(), "{desired}");
    assert_eq!(desired["x"], 1);
    let replaced = owner
        .replace_module_twin(
            "gw1",
            "edgetwin",
            &json!({"properties": {"desired": {"only": true}}}),
            None,
        )
        .await
        .expect("replaced");
    let desired = &replaced["properties"]["desired"];
    assert_eq!(desired["only"], true);
    assert!(desired.get("x").is_none(), "PUT replaces: {desired}");

    let err = owner
        .invoke_module_method("gw1", "edgetwin", "ping", &json!({}), 5)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::NotFound(_)),
        "offline module: {err:?}"
    );

    client
        .delete_module("gw1", "edgetwin", None)
        .await
        .expect("module deleted");
    let err = client.get_module("gw1", "edgetwin").await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    client
        .delete_device("gw1", None)
        .await
        .expect("device deleted");
    let err = client.get_device("gw1").await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn retry_after_is_followed_within_the_policy_bounds() {
    let server = ScriptedHttps::replying(vec![
        Reply::hub_error(429, "ThrottlingException", "slow down").header("retry-after", "3600"),
        Reply::json(200, json!({"deviceId": "d1"})),
    ])
    .await;
    let (client, _) = client_of(&server, FAST);
    let started = Instant::now();
    client.get_device("d1").await.expect("second attempt");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an hour's Retry-After is capped by max_delay: {:?}",
        started.elapsed()
    );
    assert_eq!(server.requests().len(), 2);
}
