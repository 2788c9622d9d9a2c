//! Throttling tiers on the wire: a CONNECT beyond the connect rate is closed without a
//! CONNACK (or answered late when shaped), twin operations beyond theirs get
//! `$iothub/twin/res/429/`, REST requests beyond theirs get 429 `ThrottlingException` in
//! the hub's error body. Limits are made slow on purpose (rates of one's own) so a test
//! hits them deterministically; the S1 tests drain the real buckets through `Hub::admit`
//! (registry operations, configurations, queries).

use edgetwin_sim::testing as support;

use std::time::Duration;

use edgetwin_sim::throttle::{Admission, Kind, Rate, Throttle};
use edgetwin_sim::{SimEvent, Tier};
use rumqttc::{ConnectReturnCode, ConnectionError};
use serde_json::Value;
use support::{module_options, unix_now, wait_event, TestClient, TestSim};

const RES: &str = "$iothub/twin/res/#";

/// One operation per minute: the second one in a test is always beyond it.
fn one_per_minute() -> Rate {
    Rate::per_min(1)
}

fn slow(kinds: &[Kind], max_wait: Duration) -> Throttle {
    Throttle::with_rates(
        kinds.iter().map(|k| (*k, one_per_minute())),
        max_wait,
        std::time::Instant::now(),
    )
}

async fn twin_answer(client: &mut TestClient, rid: &str) -> (u16, Vec<u8>) {
    let suffix = format!("?$rid={rid}");
    loop {
        let p = client.next_publish().await;
        if let Some(rest) = p.topic.strip_prefix("$iothub/twin/res/") {
            let (status, query) = rest.split_once('/').expect("status segment");
            if query.starts_with(&suffix) {
                return (status.parse().expect("status"), p.payload.to_vec());
            }
        }
    }
}

#[tokio::test]
async fn a_connect_beyond_the_rate_is_closed_without_a_connack() {
    let sim = TestSim::start().await;
    sim.register("d1", "m1");
    sim.register("d1", "m2");
    sim.hub()
        .replace_throttle(slow(&[Kind::DeviceConnect], Duration::ZERO));
    let mut events = sim.hub().events();

    let _first = sim.connect("d1", "m1", false).await;
    let other = sim.hub().module_connection_string("d1", "m2").unwrap();
    let (_c, result) =
        TestClient::try_connect(module_options(&sim.sim, &other, false, unix_now() + 3600)).await;
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => {
            panic!("a throttled CONNECT must not look like refused credentials: CONNACK {code:?}")
        }
        Err(_) => {}
        Ok(ack) => panic!("throttled CONNECT got a CONNACK: {ack:?}"),
    }
    wait_event(&mut events, |e| {
        matches!(
            e,
            SimEvent::Throttled {
                kind: Kind::DeviceConnect
            }
        )
        .then_some(())
    })
    .await;
    let c = sim.sim.throttle_counts().get(Kind::DeviceConnect);
    assert_eq!((c.accepted, c.throttled), (1, 1));
}

#[tokio::test]
async fn a_shaped_connect_is_accepted_late_rather_than_refused() {
    let sim = TestSim::start().await;
    sim.register("d1", "m1");
    sim.register("d1", "m2");
    // One connect a second, queued up to five: the second one waits for its token.
    let throttle = Throttle::with_rates(
        [(Kind::DeviceConnect, Rate::per_sec(1))],
        Duration::from_secs(5),
        std::time::Instant::now(),
    );
    sim.hub().replace_throttle(throttle);
    let _first = sim.connect("d1", "m1", false).await;
    let other = sim.hub().module_connection_string("d1", "m2").unwrap();
    let (_c, ack) =
        TestClient::connect(module_options(&sim.sim, &other, false, unix_now() + 3600)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let c = sim.sim.throttle_counts().get(Kind::DeviceConnect);
    assert_eq!((c.accepted, c.delayed, c.throttled), (2, 1, 0));
}

#[tokio::test]
async fn twin_operations_beyond_the_rate_are_answered_429_over_mqtt() {
    let sim = TestSim::start().await;
    sim.register("d1", "m1");
    let mut client = sim.connect("d1", "m1", false).await;
    client.subscribe(&[RES]).await;
    sim.hub()
        .replace_throttle(slow(&[Kind::TwinRead, Kind::TwinUpdate], Duration::ZERO));

    client.publish("$iothub/twin/GET/?$rid=1", "").await;
    assert_eq!(twin_answer(&mut client, "1").await.0, 200);
    client.publish("$iothub/twin/GET/?$rid=2", "").await;
    let (status, body) = twin_answer(&mut client, "2").await;
    assert_eq!(status, 429);
    let body: Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(body["errorCode"], 429001, "{body}");

    let reported = "$iothub/twin/PATCH/properties/reported/?$rid=";
    client.publish(&format!("{reported}3"), r#"{"a":1}"#).await;
    assert_eq!(twin_answer(&mut client, "3").await.0, 204);
    client.publish(&format!("{reported}4"), r#"{"a":2}"#).await;
    assert_eq!(twin_answer(&mut client, "4").await.0, 429);
    // The throttled patch did not take effect.
    let twin = sim.hub().get_module_twin("d1", "m1").unwrap();
    assert_eq!(twin["properties"]["reported"]["a"], 1);

    let counts = sim.sim.throttle_counts();
    for kind in [Kind::TwinRead, Kind::TwinUpdate] {
        let c = counts.get(kind);
        assert_eq!((c.accepted, c.throttled), (1, 1), "{kind:?}");
    }
}

#[tokio::test]
async fn registry_requests_beyond_the_s1_rate_are_answered_429_throttling_exception() {
    let sim = TestSim::start().await;
    sim.register("d1", "m1");
    sim.sim.set_throttle(Tier::S1, 1);
    // S1: 100 registry operations a minute. Take every token and the shaping queue, so
    // the next request finds none for the next 600 ms.
    while sim.hub().admit(Kind::RegistryOperation) != Admission::Throttled {}

    let client = rest_client(&sim);
    let token = owner_token(&sim);
    let url = format!(
        "https://{}/devices/d1?api-version=2021-04-12",
        sim.sim.rest_authority()
    );
    let res = client
        .get(&url)
        .header("Authorization", &token)
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status().as_u16(), 429);
    assert_eq!(
        res.headers()
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok()),
        Some("ThrottlingException")
    );
    assert!(
        res.headers().get("retry-after").is_none(),
        "nothing documents IoT Hub sending Retry-After"
    );
    let body: Value = res.json().await.expect("JSON body");
    let inner: Value =
        serde_json::from_str(body["Message"].as_str().expect("Message")).expect("nested JSON");
    assert_eq!(inner["errorCode"], 429001, "{body}");
    assert!(
        sim.sim
            .throttle_counts()
            .get(Kind::RegistryOperation)
            .throttled
            >= 2
    );
}

#[tokio::test]
async fn configurations_and_queries_beyond_the_s1_rate_are_answered_429() {
    let sim = TestSim::start().await;
    sim.register("d1", "m1");
    sim.sim.set_throttle(Tier::S1, 1);
    // S1: 20 of each a minute; take them all and the shaping queue (3 s until the next).
    for kind in [Kind::Configuration, Kind::Query] {
        while sim.hub().admit(kind) != Admission::Throttled {}
    }
    let client = rest_client(&sim);
    let token = owner_token(&sim);
    let base = format!("https://{}", sim.sim.rest_authority());
    let body = serde_json::json!({
        "id": "c1", "schemaVersion": "2.0", "labels": {}, "priority": 1,
        "content": {"moduleContent": {"properties.desired.x": 1}},
        "targetCondition": "FROM devices.modules WHERE moduleId = 'm1'",
        "metrics": {"queries": {}},
    });
    let put = client
        .put(format!("{base}/configurations/c1?api-version=2021-04-12"))
        .header("Authorization", &token)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("answered");
    assert_eq!(put.status().as_u16(), 429);
    let query = client
        .post(format!("{base}/devices/query?api-version=2021-04-12"))
        .header("Authorization", &token)
        .header("Content-Type", "application/json")
        .body(r#"{"query":"SELECT * FROM devices.modules"}"#)
        .send()
        .await
        .expect("answered");
    assert_eq!(query.status().as_u16(), 429);
    assert_eq!(
        query
            .headers()
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok()),
        Some("ThrottlingException")
    );
    assert!(
        sim.hub().get_configuration("c1").is_err(),
        "nothing was created"
    );
}

fn owner_token(sim: &TestSim) -> String {
    sim.sim
        .service_connection_string("iothubowner")
        .unwrap()
        .parse::<edgetwin::identity::ServiceCredentials>()
        .unwrap()
        .sas_token(unix_now() + 3600)
}

#[tokio::test]
async fn a_restarted_hub_keeps_its_tier_with_fresh_counts() {
    let sim = TestSim::start().await;
    sim.sim.set_throttle(Tier::S2, 3);
    sim.hub().admit(Kind::Query);
    let sim = sim.restart().await;
    let counts = sim.sim.throttle_counts();
    assert_eq!((counts.tier, counts.units), (Tier::S2, 3));
    assert_eq!(counts.get(Kind::Query).accepted, 0);
    assert_eq!(counts.limit(Kind::Query), Some(Rate::per_min(60)));
}

fn rest_client(sim: &TestSim) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(sim.sim.ca_pem().as_bytes()).expect("CA");
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", sim.sim.https_addr())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}
