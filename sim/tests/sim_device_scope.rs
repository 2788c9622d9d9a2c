//! Device-scoped SAS on the emulator's registry REST API (PROTOCOL §11, DESIGN §8): a
//! device's token manages that device's modules and nothing else; keys pushed with it
//! are the ones MQTT CONNECT then accepts; and every REST answer's `Date` is the hub's
//! clock, the clock-offset fault included.

use std::time::{Duration, SystemTime};

use edgetwin::identity::{token, ModuleCredentials, SharedKey};
use edgetwin::provision::module_keys;
use edgetwin_sim::testing::{module_options, unix_now, TestClient, TestSim};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const API: &str = "api-version=2021-04-12";
/// Upper bound for a request; a hang fails instead of blocking the suite.
const HANG: Duration = Duration::from_secs(30);

struct Env {
    ts: TestSim,
    client: reqwest::Client,
    base: String,
}

impl Env {
    async fn start() -> Env {
        let ts = TestSim::start().await;
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(ts.sim.ca_pem().as_bytes()).unwrap(),
            )
            .resolve("localhost", ts.sim.https_addr())
            .no_proxy()
            .timeout(HANG)
            .build()
            .unwrap();
        let base = format!("https://{}", ts.sim.rest_authority());
        Env { ts, client, base }
    }

    /// Creates `device` through the service API; returns its primary key.
    fn device(&self, device: &str) -> SharedKey {
        let doc = self
            .ts
            .hub()
            .put_device(device, &json!({}), None)
            .expect("device created");
        let key = doc["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("primary key");
        SharedKey::from_base64(key).unwrap()
    }

    /// `device`'s token for audience `{sr_host}/devices/{sr_device}`, valid for an hour.
    fn token(key: &SharedKey, audience: &str) -> String {
        token(key, audience, unix_now() + 3600, None)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut rb = self
            .client
            .request(method, format!("{}{path}?{API}", self.base))
            .header("Authorization", token);
        if let Some(body) = body {
            rb = rb
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.to_string());
        }
        if let Some(tag) = if_match {
            rb = rb.header("If-Match", tag);
        }
        let res = rb.send().await.expect("request sent");
        let (status, headers) = (res.status(), res.headers().clone());
        let bytes = res.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// The hub's error message of a 401.
    async fn refused(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> String {
        let (status, headers, body) = self.call(method.clone(), path, token, body, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        let name = headers
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok());
        assert!(
            matches!(
                name,
                Some("IotHubUnauthorizedAccess" | "IotHubUnauthorized")
            ),
            "{name:?}"
        );
        body["Message"].as_str().unwrap_or_default().to_owned()
    }
}

#[tokio::test]
async fn a_device_token_manages_its_own_modules() {
    let env = Env::start().await;
    let key = env.device("gw1");
    let token = Env::token(&key, "localhost/devices/gw1");
    let module = "/devices/gw1/modules/edgetwin";

    let (status, _, body) = env.call(Method::GET, module, &token, None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Created as the Identity Service creates it: no authentication in the body.
    let create = json!({"moduleId": "edgetwin", "deviceId": "gw1"});
    let (status, _, created) = env
        .call(Method::PUT, module, &token, Some(create), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let generation = created["generationId"]
        .as_str()
        .expect("generationId")
        .to_owned();
    assert!(generation.len() >= 18 && generation.bytes().all(|b| b.is_ascii_digit()));

    let (primary, secondary) = module_keys(&key, "edgetwin", &generation);
    let keys = json!({"moduleId": "edgetwin", "deviceId": "gw1", "authentication": {
        "symmetricKey": {"primaryKey": primary.as_base64(), "secondaryKey": secondary.as_base64()},
        "type": "sas"}});
    let (status, _, keyed) = env
        .call(Method::PUT, module, &token, Some(keys), Some("*"))
        .await;
    assert_eq!(status, StatusCode::OK, "{keyed}");
    assert_eq!(keyed["generationId"], json!(generation), "the same module");
    assert_eq!(
        keyed["authentication"]["symmetricKey"]["primaryKey"],
        json!(primary.as_base64())
    );

    let (status, _, got) = env.call(Method::GET, module, &token, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["etag"], keyed["etag"]);
    let (status, _, list) = env
        .call(Method::GET, "/devices/gw1/modules", &token, None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // identityd lower-cases the audience; the REST listener's authority works too.
    let upper_key = env.device("Gw-Upper2");
    let lowered = Env::token(&upper_key, "localhost/devices/gw-upper2");
    let (status, _, body) = env
        .call(
            Method::GET,
            "/devices/Gw-Upper2/modules",
            &lowered,
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let authority = format!("{}/devices/gw1", env.ts.sim.rest_authority());
    let by_authority = Env::token(&key, &authority);
    let (status, _, _) = env
        .call(Method::GET, module, &by_authority, None, None)
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, _, _) = env
        .call(Method::DELETE, module, &token, None, Some("*"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(env.ts.hub().get_module("gw1", "edgetwin").is_err());
}

#[tokio::test]
async fn a_device_token_is_refused_for_anything_else() {
    let env = Env::start().await;
    let key = env.device("gw1");
    env.device("gw2");
    env.ts.register("gw2", "edgetwin");
    let token = Env::token(&key, "localhost/devices/gw1");

    let other = env
        .refused(Method::GET, "/devices/gw2/modules/edgetwin", &token, None)
        .await;
    assert!(
        other.contains("device 'gw1'") && other.contains("'gw2'"),
        "{other}"
    );
    let create = json!({"moduleId": "m", "deviceId": "gw2"});
    env.refused(Method::PUT, "/devices/gw2/modules/m", &token, Some(create))
        .await;
    assert!(
        env.ts.hub().get_module("gw2", "m").is_err(),
        "nothing created"
    );
    env.refused(
        Method::DELETE,
        "/devices/gw2/modules/edgetwin",
        &token,
        None,
    )
    .await;
    assert!(
        env.ts.hub().get_module("gw2", "edgetwin").is_ok(),
        "nothing deleted"
    );

    for (method, path, body) in [
        (Method::GET, "/devices/gw1", None),
        (
            Method::PUT,
            "/devices/gw9",
            Some(json!({"deviceId": "gw9"})),
        ),
        (Method::DELETE, "/devices/gw1", None),
        (Method::GET, "/twins/gw2/modules/edgetwin", None),
        (
            Method::PATCH,
            "/twins/gw2/modules/edgetwin",
            Some(json!({"properties": {"desired": {"x": 1}}})),
        ),
    ] {
        let message = env.refused(method, path, &token, body).await;
        assert!(
            message.contains("only that device's modules"),
            "{path}: {message}"
        );
    }

    // Wrong key; a disabled device; a module's token is no registry credential.
    let wrong = Env::token(&SharedKey::generate(), "localhost/devices/gw1");
    let message = env
        .refused(Method::GET, "/devices/gw1/modules", &wrong, None)
        .await;
    assert!(message.contains("signature does not match"), "{message}");
    assert!(!message.contains(key.as_base64()));
    let module_key = env.ts.register("gw1", "edgetwin");
    let module: ModuleCredentials = module_key.parse().unwrap();
    let module_token = module.sas_token(unix_now() + 600);
    env.refused(Method::GET, "/devices/gw1/modules", &module_token, None)
        .await;
    env.ts
        .hub()
        .put_device("gw1", &json!({"status": "disabled"}), Some("*"))
        .expect("disabled");
    let message = env
        .refused(Method::GET, "/devices/gw1/modules", &token, None)
        .await;
    assert!(message.contains("disabled"), "{message}");
}

#[tokio::test]
async fn an_expired_device_token_is_judged_by_the_hub_clock_shown_in_date() {
    let env = Env::start().await;
    let key = env.device("gw1");
    let token = Env::token(&key, "localhost/devices/gw1");
    let (status, headers, _) = env
        .call(Method::GET, "/devices/gw1/modules", &token, None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let skew = |headers: &reqwest::header::HeaderMap| {
        let date = headers
            .get("date")
            .and_then(|d| d.to_str().ok())
            .expect("Date");
        let hub = httpdate::parse_http_date(date).expect("an HTTP date");
        match hub.duration_since(SystemTime::now()) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        }
    };
    assert!(skew(&headers).abs() < 60, "no offset: the machine's time");

    env.ts.hub().faults().set_clock_offset(2 * 3600);
    let message = env
        .refused(Method::GET, "/devices/gw1/modules", &token, None)
        .await;
    assert!(message.contains("expired"), "{message}");
    let (_, headers, _) = env
        .call(Method::GET, "/devices/gw1/modules", &token, None, None)
        .await;
    let ahead = skew(&headers);
    assert!(
        (2 * 3600 - 60..=2 * 3600 + 60).contains(&ahead),
        "Date is {ahead} s ahead"
    );
}

#[tokio::test]
async fn keys_pushed_with_a_device_token_are_what_mqtt_connect_accepts() {
    let env = Env::start().await;
    let key = env.device("gw1");
    let token = Env::token(&key, "localhost/devices/gw1");
    let module = "/devices/gw1/modules/edgetwin";
    let (_, _, created) = env
        .call(
            Method::PUT,
            module,
            &token,
            Some(json!({"moduleId": "edgetwin"})),
            None,
        )
        .await;
    let generated = env
        .ts
        .hub()
        .module_connection_string("gw1", "edgetwin")
        .expect("registered with keys the hub generated");
    let generation = created["generationId"].as_str().unwrap();
    let (primary, secondary) = module_keys(&key, "edgetwin", generation);
    let keys = json!({"authentication": {"symmetricKey": {
        "primaryKey": primary.as_base64(), "secondaryKey": secondary.as_base64()}, "type": "sas"}});
    let (status, _, _) = env
        .call(Method::PUT, module, &token, Some(keys), Some("*"))
        .await;
    assert_eq!(status, StatusCode::OK);

    let derived = format!(
        "HostName=localhost;DeviceId=gw1;ModuleId=edgetwin;SharedAccessKey={}",
        primary.as_base64()
    );
    let expiry = unix_now() + 600;
    let (client, ack) =
        TestClient::connect(module_options(&env.ts.sim, &derived, true, expiry)).await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    client.disconnect().await;
    let (_, refused) =
        TestClient::try_connect(module_options(&env.ts.sim, &generated, true, expiry)).await;
    assert!(
        matches!(
            refused,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized
            ))
        ),
        "the key the hub generated no longer connects: {refused:?}"
    );
}
