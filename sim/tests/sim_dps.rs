//! The emulated Device Provisioning Service (PROTOCOL §12) over its two transports: the
//! registration REST API on the HTTPS listener (reqwest) and `$dps/registrations/...` on
//! the MQTT listener (rumqttc, shaped like Microsoft's `ProvisioningDeviceClient`).

use std::time::Duration;

use edgetwin::identity::{token, SharedKey};
use edgetwin::provision::dps::derive_device_key;
use edgetwin_sim::testing::{client_tls, unix_now, TestClient, TestSim};
use edgetwin_sim::{Sim, SimConfig};
use reqwest::StatusCode;
use rumqttc::{MqttOptions, Publish, TlsConfiguration, Transport};
use serde_json::{json, Value};

const API: &str = "api-version=2021-06-01";

// ---- harness -------------------------------------------------------------------------

fn http(sim: &Sim) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", sim.https_addr())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A registration token as DPS clients build it (`skn=registration`, as AIS does).
fn sas(scope: &str, registration: &str, key: &SharedKey) -> String {
    token(
        key,
        &format!("{scope}/registrations/{registration}"),
        unix_now() + 3600,
        Some("registration"),
    )
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: Value,
}

struct Rest {
    sim: TestSim,
    client: reqwest::Client,
    base: String,
}

impl Rest {
    async fn start() -> Rest {
        let sim = TestSim::start().await;
        let client = http(&sim.sim);
        let base = format!("https://{}", sim.sim.rest_authority());
        Rest { sim, client, base }
    }

    fn scope(&self) -> String {
        self.sim.sim.dps().id_scope().to_owned()
    }

    fn group_key_for(&self, registration: &str) -> SharedKey {
        derive_device_key(self.sim.sim.dps().group_key(), registration)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = resp.json().await.expect("JSON body");
        Answer {
            status,
            retry_after,
            body,
        }
    }

    async fn register_as(&self, scope: &str, registration: &str, key: &SharedKey) -> Answer {
        let url = format!(
            "{}/{scope}/registrations/{registration}/register?{API}",
            self.base
        );
        self.send(
            self.client
                .put(url)
                .header("Authorization", sas(scope, registration, key))
                .json(&json!({"registrationId": registration})),
        )
        .await
    }

    async fn register(&self, registration: &str) -> Answer {
        let key = self.group_key_for(registration);
        self.register_as(&self.scope(), registration, &key).await
    }

    async fn poll_as(&self, registration: &str, key: &SharedKey, operation: &str) -> Answer {
        let scope = self.scope();
        let url = format!(
            "{}/{scope}/registrations/{registration}/operations/{operation}?{API}",
            self.base
        );
        self.send(
            self.client
                .get(url)
                .header("Authorization", sas(&scope, registration, key)),
        )
        .await
    }

    async fn poll(&self, registration: &str, operation: &str) -> Answer {
        self.poll_as(registration, &self.group_key_for(registration), operation)
            .await
    }
}

fn operation_id(answer: &Answer) -> String {
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(answer.body["status"], "assigning", "{}", answer.body);
    answer.body["operationId"]
        .as_str()
        .expect("operationId")
        .to_owned()
}

// ---- REST ----------------------------------------------------------------------------

#[tokio::test]
async fn a_group_derived_key_registers_and_the_device_is_created_with_it() {
    let rest = Rest::start().await;
    let registered = rest.register("gateway-0001").await;
    assert_eq!(registered.retry_after.as_deref(), Some("1"));
    let op = operation_id(&registered);
    let done = rest.poll("gateway-0001", &op).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.body["operationId"], op.as_str());
    assert_eq!(done.body["status"], "assigned");
    let state = &done.body["registrationState"];
    assert_eq!(state["registrationId"], "gateway-0001");
    assert_eq!(state["assignedHub"], "localhost");
    assert_eq!(state["deviceId"], "gateway-0001");
    assert_eq!(state["status"], "assigned");
    assert_eq!(state["substatus"], "initialAssignment");
    for field in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(state[field].is_string(), "{field} in {state}");
    }
    let device = rest
        .sim
        .hub()
        .get_device("gateway-0001")
        .expect("device created");
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        rest.group_key_for("gateway-0001").as_base64()
    );
}

#[tokio::test]
async fn registering_again_reprovisions_the_same_device() {
    let rest = Rest::start().await;
    let op = operation_id(&rest.register("gateway-0002").await);
    assert_eq!(rest.poll("gateway-0002", &op).await.status, StatusCode::OK);
    let op = operation_id(&rest.register("gateway-0002").await);
    let again = rest.poll("gateway-0002", &op).await;
    assert_eq!(again.body["status"], "assigned");
    assert_eq!(
        again.body["registrationState"]["substatus"],
        "reprovisionedToInitialAssignment"
    );
}

#[tokio::test]
async fn a_wrong_key_is_401_with_the_dps_error_body_and_creates_nothing() {
    let rest = Rest::start().await;
    let wrong = SharedKey::generate();
    let refused = rest
        .register_as(&rest.scope(), "gateway-0003", &wrong)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(refused.body["errorCode"], 401002);
    for field in ["trackingId", "message", "timestampUtc"] {
        assert!(
            refused.body[field].is_string(),
            "{field} in {}",
            refused.body
        );
    }
    assert!(rest.sim.hub().get_device("gateway-0003").is_err());
    // A key of another registration id does not verify either.
    let other = rest.group_key_for("gateway-9999");
    let refused = rest
        .register_as(&rest.scope(), "gateway-0003", &other)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_unknown_id_scope_is_404() {
    let rest = Rest::start().await;
    let key = rest.group_key_for("gateway-0004");
    let unknown = rest.register_as("0ne00000000", "gateway-0004", &key).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
    assert!(unknown.body["errorCode"].is_u64());
}

#[tokio::test]
async fn a_disabled_enrollment_group_ends_in_status_disabled_and_creates_nothing() {
    let rest = Rest::start().await;
    rest.sim.sim.dps().set_group_enabled(false);
    let op = operation_id(&rest.register("gateway-0005").await);
    let done = rest.poll("gateway-0005", &op).await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.body["status"], "disabled", "{}", done.body);
    assert!(done.body["registrationState"].get("assignedHub").is_none());
    assert!(rest.sim.hub().get_device("gateway-0005").is_err());
}

#[tokio::test]
async fn an_individual_enrollment_uses_its_own_key_and_device_id() {
    let rest = Rest::start().await;
    let dps = rest.sim.sim.dps();
    let key = dps.add_individual_enrollment("sensor-7", Some("boiler-room-7"));
    let group_key = rest.group_key_for("sensor-7");
    assert_eq!(
        rest.register_as(&rest.scope(), "sensor-7", &group_key)
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "an individual enrollment takes precedence over the group"
    );
    let op = operation_id(&rest.register_as(&rest.scope(), "sensor-7", &key).await);
    let done = rest.poll_as("sensor-7", &key, &op).await;
    assert_eq!(done.body["registrationState"]["deviceId"], "boiler-room-7");
    assert!(rest.sim.hub().get_device("boiler-room-7").is_ok());

    assert!(dps.set_enrollment_enabled("sensor-7", false));
    let op = operation_id(&rest.register_as(&rest.scope(), "sensor-7", &key).await);
    assert_eq!(
        rest.poll_as("sensor-7", &key, &op).await.body["status"],
        "disabled"
    );
}

#[tokio::test]
async fn polls_answer_assigning_with_retry_after_until_the_configured_count() {
    let rest = Rest::start().await;
    let dps = rest.sim.sim.dps();
    dps.set_assigning_polls(2);
    dps.set_retry_after(4);
    let registered = rest.register("gateway-0006").await;
    assert_eq!(registered.retry_after.as_deref(), Some("4"));
    let op = operation_id(&registered);
    for _ in 0..2 {
        let pending = rest.poll("gateway-0006", &op).await;
        assert_eq!(pending.status, StatusCode::ACCEPTED);
        assert_eq!(pending.retry_after.as_deref(), Some("4"));
        assert_eq!(pending.body["status"], "assigning");
        assert_eq!(
            pending.body["registrationState"]["registrationId"],
            "gateway-0006"
        );
    }
    let done = rest.poll("gateway-0006", &op).await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(done.retry_after.is_none());
    let unknown = rest.poll("gateway-0006", "4.0000000000000000.none").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after_then_recovers() {
    let rest = Rest::start().await;
    rest.sim.sim.dps().throttle_next(1);
    let throttled = rest.register("gateway-0008").await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.retry_after.as_deref(), Some("1"));
    assert_eq!(throttled.body["errorCode"], 429001);
    let op = operation_id(&rest.register("gateway-0008").await);
    assert_eq!(rest.poll("gateway-0008", &op).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_failed_registration_says_so_in_its_state() {
    let rest = Rest::start().await;
    rest.sim.sim.dps().fail_next_registrations(1);
    let op = operation_id(&rest.register("gateway-0009").await);
    let done = rest.poll("gateway-0009", &op).await;
    assert_eq!(done.body["status"], "failed");
    assert!(done.body["registrationState"]["errorCode"].is_u64());
    assert!(done.body["registrationState"]["errorMessage"].is_string());
}

#[tokio::test]
async fn requests_without_api_version_are_400() {
    let rest = Rest::start().await;
    let scope = rest.scope();
    let url = format!("{}/{scope}/registrations/gw/register", rest.base);
    let answer = rest
        .send(rest.client.put(url).json(&json!({"registrationId": "gw"})))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn scope_group_key_and_endpoint_are_in_the_state_dir_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(SimConfig::ephemeral(dir.path())).await.unwrap();
    let read = |name: &str| {
        std::fs::read_to_string(dir.path().join("dps").join(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(read("id_scope"), sim.dps().id_scope());
    assert!(read("id_scope").starts_with("0ne"));
    assert_eq!(read("group.key"), sim.dps().group_key().as_base64());
    assert_eq!(read("endpoint"), sim.rest_authority());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("dps/group.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (scope, key) = (read("id_scope"), read("group.key"));
    let sim = sim.restart().await.unwrap();
    assert_eq!(sim.dps().id_scope(), scope);
    assert_eq!(sim.dps().group_key().as_base64(), key);
    sim.shutdown().await;
}

// ---- MQTT ----------------------------------------------------------------------------

/// CONNECT as azure-iot-device 2.14 does for DPS: client id = registration id, the DPS
/// user name, a token without `skn`, clean session off.
fn dps_options(sim: &Sim, scope: &str, registration: &str, key: &SharedKey) -> MqttOptions {
    let mut opts = MqttOptions::new(registration, "localhost", sim.mqtt_addr().port());
    opts.set_credentials(
        format!("{scope}/registrations/{registration}/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.14.0"),
        token(key, &format!("{scope}/registrations/{registration}"), unix_now() + 3600, None),
    );
    opts.set_clean_session(false);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        client_tls(sim.ca_pem()),
    )));
    opts
}

async fn dps_client(sim: &TestSim, registration: &str, key: &SharedKey) -> TestClient {
    let scope = sim.sim.dps().id_scope().to_owned();
    let (mut client, ack) =
        TestClient::connect(dps_options(&sim.sim, &scope, registration, key)).await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    let granted = client
        .subscribe(&["$dps/registrations/res/#", "$iothub/twin/res/#"])
        .await;
    assert_eq!(
        granted,
        vec![
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            rumqttc::SubscribeReasonCode::Failure,
        ]
    );
    client
}

fn parse_response(p: &Publish) -> (u16, String, Option<String>, Value) {
    let rest = p
        .topic
        .strip_prefix("$dps/registrations/res/")
        .unwrap_or_else(|| panic!("not a DPS response: {}", p.topic));
    let (status, query) = rest.split_once("/?").expect("status and query");
    let value = |k: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_owned())
    };
    let body = serde_json::from_slice(&p.payload).expect("JSON payload");
    (
        status.parse().unwrap(),
        value("$rid").unwrap(),
        value("retry-after"),
        body,
    )
}

#[tokio::test]
async fn mqtt_registration_works_the_way_the_python_sdk_does_it() {
    let sim = TestSim::start().await;
    let key = derive_device_key(sim.sim.dps().group_key(), "gateway-mqtt-1");
    let mut client = dps_client(&sim, "gateway-mqtt-1", &key).await;
    let rid = "5d2c4b0e-1c1e-4d3a-9f5e-0a1b2c3d4e5f";
    client
        .publish(
            &format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
            r#"{"payload": null, "registrationId": "gateway-mqtt-1"}"#,
        )
        .await;
    let (status, got_rid, retry_after, body) = parse_response(&client.next_publish().await);
    assert_eq!((status, got_rid.as_str()), (202, rid));
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["status"], "assigning");
    let op = body["operationId"].as_str().unwrap().to_owned();
    client
        .publish(
            &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op}"),
            " ",
        )
        .await;
    let (status, got_rid, retry_after, body) = parse_response(&client.next_publish().await);
    assert_eq!((status, got_rid.as_str(), retry_after), (200, "2", None));
    assert_eq!(body["status"], "assigned");
    assert_eq!(body["registrationState"]["assignedHub"], "localhost");
    assert_eq!(body["registrationState"]["deviceId"], "gateway-mqtt-1");
    assert!(sim.hub().get_device("gateway-mqtt-1").is_ok());
    client.disconnect().await;
}

#[tokio::test]
async fn mqtt_with_a_wrong_key_connects_but_registration_is_401_on_the_response_topic() {
    let sim = TestSim::start().await;
    let mut client = dps_client(&sim, "gateway-mqtt-2", &SharedKey::generate()).await;
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            r#"{"registrationId": "gateway-mqtt-2"}"#,
        )
        .await;
    let (status, _, _, body) = parse_response(&client.next_publish().await);
    assert_eq!(status, 401);
    assert_eq!(body["errorCode"], 401002);
    assert!(sim.hub().get_device("gateway-mqtt-2").is_err());
}

#[tokio::test]
async fn mqtt_throttling_and_pending_polls_carry_retry_after_in_the_topic() {
    let sim = TestSim::start().await;
    let dps = sim.sim.dps();
    dps.set_assigning_polls(1);
    dps.set_retry_after(2);
    dps.throttle_next(1);
    let key = derive_device_key(dps.group_key(), "gateway-mqtt-3");
    let mut client = dps_client(&sim, "gateway-mqtt-3", &key).await;
    let register = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    client
        .publish(register, r#"{"registrationId":"gateway-mqtt-3"}"#)
        .await;
    let (status, _, retry_after, _) = parse_response(&client.next_publish().await);
    assert_eq!((status, retry_after.as_deref()), (429, Some("2")));
    client
        .publish(register, r#"{"registrationId":"gateway-mqtt-3"}"#)
        .await;
    let (_, _, _, body) = parse_response(&client.next_publish().await);
    let op = body["operationId"].as_str().unwrap().to_owned();
    let poll =
        format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3&operationId={op}");
    client.publish(&poll, " ").await;
    let (status, _, retry_after, body) = parse_response(&client.next_publish().await);
    assert_eq!((status, retry_after.as_deref()), (202, Some("2")));
    assert_eq!(body["status"], "assigning");
    client.publish(&poll, " ").await;
    let (status, _, _, body) = parse_response(&client.next_publish().await);
    assert_eq!((status, body["status"].as_str()), (200, Some("assigned")));
}

#[tokio::test]
async fn mqtt_unknown_scope_is_404_on_the_response_topic() {
    let sim = TestSim::start().await;
    let key = derive_device_key(sim.sim.dps().group_key(), "gateway-mqtt-4");
    let opts = dps_options(&sim.sim, "0ne00000000", "gateway-mqtt-4", &key);
    let (mut client, ack) = TestClient::connect(opts).await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    client.subscribe(&["$dps/registrations/res/#"]).await;
    client
        .publish(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            r#"{"registrationId":"gateway-mqtt-4"}"#,
        )
        .await;
    let (status, _, _, _) = parse_response(&client.next_publish().await);
    assert_eq!(status, 404);
}

#[tokio::test]
async fn mqtt_client_id_other_than_the_registration_id_is_refused() {
    let sim = TestSim::start().await;
    let scope = sim.sim.dps().id_scope().to_owned();
    let key = derive_device_key(sim.sim.dps().group_key(), "gateway-mqtt-5");
    let mut opts = dps_options(&sim.sim, &scope, "gateway-mqtt-5", &key);
    opts.set_client_id("someone-else".to_owned());
    let (_client, result) = TestClient::try_connect(opts).await;
    assert!(
        matches!(
            result,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized
            ))
        ),
        "{result:?}"
    );
}
