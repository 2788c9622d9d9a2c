//! The fleet client on the wire, against a scripted hub (what the emulator cannot be made
//! to do on cue): a throttled query waits out the hub's `Retry-After` and tries again, the
//! continuation token goes back on the next page, a hub that never stops throttling is
//! given up on within the policy, and `fleet apply` creates without `If-Match`.

use std::sync::Arc;
use std::time::Duration;

use edgetwin::fleet::pace::{QuotaPolicy, SystemClock};
use edgetwin::fleet::FleetClient;
use edgetwin::fleet::FleetError;
use edgetwin::registry::{RegistryClient, RegistryError};
use edgetwin_sim::testing::scripted_https::{Reply, ScriptedHttps};
use serde_json::json;

/// A fleet client for `hub` whose own jitter windows are tiny: the pauses are the hub's
/// `Retry-After` and nothing of ours.
fn client(hub: &ScriptedHttps, attempts: u32) -> FleetClient {
    let registry = RegistryClient::from_connection_string(
        &hub.service_connection_string("iothubowner"),
        Some(&hub.ca_path()),
    )
    .expect("client");
    let policy = QuotaPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(5),
        attempts,
        budget: Duration::from_secs(30),
    };
    FleetClient::new(registry).with_pacing(policy, Arc::new(SystemClock))
}

#[tokio::test]
async fn a_throttled_query_is_retried_after_retry_after_and_pages_are_followed() {
    let mut calls = 0;
    let hub = ScriptedHttps::start(move |req| {
        calls += 1;
        match (calls, req.header("x-ms-continuation")) {
            (1, None) => Reply::hub_error(429, "ThrottlingException", "too many queries")
                .header("retry-after", "1"),
            (2, None) => {
                Reply::json(200, json!([{"deviceId": "gw1"}])).header("x-ms-continuation", "page-2")
            }
            (3, Some("page-2")) => Reply::json(200, json!([{"deviceId": "gw2"}])),
            _ => Reply::hub_error(400, "ArgumentInvalid", "unexpected request"),
        }
    })
    .await;
    let fleet = client(&hub, 3);
    let rows = fleet
        .query("SELECT deviceId FROM devices.modules")
        .await
        .expect("rows after the throttling passed");
    assert_eq!(
        rows,
        vec![json!({"deviceId": "gw1"}), json!({"deviceId": "gw2"})]
    );
    let requests = hub.requests();
    assert_eq!(
        requests.len(),
        3,
        "one retry of the throttled page, then page 2"
    );
    for r in &requests {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/devices/query")
        );
        assert_eq!(r.header("x-ms-max-item-count"), Some("1000"));
        assert_eq!(
            r.json(),
            json!({"query": "SELECT deviceId FROM devices.modules"})
        );
    }
    // Every attempt counts against the quota, the throttled one too.
    assert_eq!(fleet.take_usage().queries, 3);
}

#[tokio::test]
async fn a_hub_that_keeps_throttling_is_given_up_on_within_the_policy() {
    let hub = ScriptedHttps::start(|_| {
        Reply::hub_error(
            429,
            "ThrottlingException",
            "too many configuration operations",
        )
        .header("retry-after", "0")
    })
    .await;
    let got = client(&hub, 4).configurations().await;
    match got {
        Err(FleetError::Registry(RegistryError::Throttled(m))) => {
            assert!(m.contains("after 4 attempts"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        hub.requests().len(),
        4,
        "the registry client does not retry on top"
    );
}

#[tokio::test]
async fn apply_reads_the_configurations_then_creates_without_if_match() {
    let hub = ScriptedHttps::start(|req| match req.method.as_str() {
        "GET" => Reply::json(200, json!([])),
        _ => {
            let mut doc = req.json();
            doc["etag"] = json!("MQ==");
            Reply::json(201, doc)
        }
    })
    .await;
    let settings = json!({"telemetryInterval": 30})
        .as_object()
        .unwrap()
        .clone();
    let applied = client(&hub, 1)
        .apply(
            "interval-30",
            "edgetwin",
            "tags.fleet = 'a'",
            None,
            settings,
        )
        .await
        .expect("created");
    assert_eq!(applied.spec.priority, 10);
    let requests = hub.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        (
            requests[0].method.as_str(),
            requests[0].path.as_str(),
            requests[0].query.as_deref()
        ),
        (
            "GET",
            "/configurations",
            Some("top=100&api-version=2021-04-12")
        )
    );
    let put = &requests[1];
    assert_eq!(
        (put.method.as_str(), put.path.as_str()),
        // Ids are percent-encoded with nothing safe, as the service SDK does.
        ("PUT", "/configurations/interval%2D30")
    );
    assert_eq!(put.header("if-match"), None);
    assert_eq!(put.json(), applied.spec.body());
}
