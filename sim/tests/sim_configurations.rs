//! Automatic module configurations over real TLS (PROTOCOL §14.3): CRUD with etags and the
//! hub's error answers, evaluation onto twins (a connected module is notified with a new
//! `$version`), statuses visible to queries, metrics from the modules' acknowledgements,
//! the periodic evaluation, and persistence across a restart.

mod fleet_env;

use std::time::Duration;

use edgetwin_sim::hub::DESIRED_FILTER;
use edgetwin_sim::testing::{key, wait_event, TestSim};
use edgetwin_sim::{Sim, SimConfig, SimEvent};
use fleet_env::Env;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TARGET: &str = "FROM devices.modules WHERE moduleId = 'edgetwin' AND tags.fleet = 'a'";

/// What `edgetwin fleet apply` (and the az CLI) send for a module configuration.
fn configuration(id: &str, priority: i64, interval: i64) -> Value {
    json!({
        "id": id,
        "schemaVersion": "2.0",
        "labels": {"managedBy": "edgetwin"},
        "content": {"moduleContent": {"properties.desired.telemetryInterval": interval}},
        "targetCondition": TARGET,
        "priority": priority,
        "metrics": {"queries": {
            "applied": format!("SELECT deviceId, moduleId FROM devices.modules WHERE configurations.[[{id}]].status = 'Applied' AND properties.reported.telemetryInterval.ac = 200 AND properties.reported.telemetryInterval.value = {interval}"),
            "rejected": format!("SELECT deviceId, moduleId FROM devices.modules WHERE configurations.[[{id}]].status = 'Applied' AND properties.reported.telemetryInterval.ac >= 400")
        }},
        "etag": "*"
    })
}

async fn put(env: &Env, id: &str, body: &Value, if_match: Option<&str>) -> fleet_env::Reply {
    let headers: Vec<(&str, &str)> = if_match.map(|m| ("If-Match", m)).into_iter().collect();
    env.call(
        Method::PUT,
        &format!("/configurations/{id}"),
        Some(body),
        &headers,
    )
    .await
}

#[tokio::test]
async fn crud_with_etags_and_immutable_content() {
    let env = Env::start().await;
    let body = configuration("interval-30", 10, 30);
    let created = put(&env, "interval-30", &body, None).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    assert_eq!(
        created.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let doc = created.body;
    assert_eq!(doc["id"], "interval-30");
    assert_eq!(doc["priority"], 10);
    assert_eq!(doc["targetCondition"], TARGET);
    assert_eq!(
        doc["content"]["moduleContent"]["properties.desired.telemetryInterval"],
        30
    );
    assert_eq!(doc["labels"]["managedBy"], "edgetwin");
    assert!(doc["createdTimeUtc"].as_str().unwrap().ends_with('Z'));
    assert!(doc["systemMetrics"]["queries"]["appliedCount"].is_string());
    let etag = doc["etag"].as_str().unwrap().to_string();

    let got = env
        .call(Method::GET, "/configurations/interval-30", None, &[])
        .await;
    assert_eq!(got.body, doc);

    put(&env, "interval-30", &body, None).await.hub_error(
        409,
        "ConfigurationAlreadyExists",
        409401,
    );
    let changed = configuration("interval-30", 10, 45);
    let msg = put(&env, "interval-30", &changed, Some(&format!("\"{etag}\"")))
        .await
        .hub_error(400, "CannotModifyImmutableConfigurationContent", 400403);
    assert!(msg.contains("new configuration"), "{msg}");
    put(
        &env,
        "interval-30",
        &configuration("interval-30", 11, 30),
        Some("\"c3RhbGU=\""),
    )
    .await
    .hub_error(412, "PreconditionFailed", 412001);
    let updated = put(
        &env,
        "interval-30",
        &configuration("interval-30", 11, 30),
        Some(&format!("\"{etag}\"")),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["priority"], 11);
    let new_etag = updated.body["etag"].as_str().unwrap().to_string();
    assert_ne!(new_etag, etag);

    put(&env, "other", &configuration("other", 1, 5), None).await;
    let list = env
        .call(
            Method::GET,
            "/configurations?top=1&api-version=2021-04-12",
            None,
            &[],
        )
        .await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    let all = env.call(Method::GET, "/configurations", None, &[]).await;
    assert_eq!(all.body.as_array().unwrap().len(), 2);

    env.call(
        Method::DELETE,
        "/configurations/interval-30",
        None,
        &[("If-Match", &format!("\"{etag}\""))],
    )
    .await
    .hub_error(412, "PreconditionFailed", 412001);
    let deleted = env
        .call(
            Method::DELETE,
            "/configurations/interval-30",
            None,
            &[("If-Match", &format!("\"{new_etag}\""))],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    env.call(Method::GET, "/configurations/interval-30", None, &[])
        .await
        .hub_error(404, "ConfigurationNotFound", 404301);
}

#[tokio::test]
async fn malformed_targets_and_content_get_the_hubs_errors() {
    let env = Env::start().await;
    let mut body = configuration("c1", 1, 30);
    body["targetCondition"] = json!("tags.fleet = 'a'");
    let msg = put(&env, "c1", &body, None).await.hub_error(
        400,
        "InvalidConfigurationTargetCondition",
        400401,
    );
    assert!(msg.contains("from devices.modules where"), "{msg}");
    body["targetCondition"] = json!("FROM devices.modules WHERE tags.fleet = = 'a'");
    let msg = put(&env, "c1", &body, None).await.hub_error(
        400,
        "InvalidConfigurationTargetCondition",
        400401,
    );
    assert!(msg.contains("position 41"), "{msg}");
    let mut body = configuration("c1", 1, 30);
    body["content"] = json!({"deviceContent": {"properties.desired.x": 1}});
    put(&env, "c1", &body, None)
        .await
        .hub_error(400, "InvalidConfigurationContent", 400402);
    let mut body = configuration("c1", 1, 30);
    body["metrics"]["queries"]["broken"] = json!("SELECT deviceId FROM");
    put(&env, "c1", &body, None).await.hub_error(
        400,
        "InvalidConfigurationCustomMetricsQuery",
        400404,
    );
    let r = env
        .call(
            Method::POST,
            "/configurations/testQueries",
            Some(&json!({"targetCondition": "FROM devices.modules WHERE", "customMetricQueries": {}})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["targetConditionError"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    let all = env.call(Method::GET, "/configurations", None, &[]).await;
    assert_eq!(all.body, json!([]));
}

#[tokio::test]
async fn registry_read_may_look_but_not_write() {
    let env = Env::start().await;
    let body = configuration("c1", 1, 30);
    env.call_as(
        "registryRead",
        Method::PUT,
        "/configurations/c1",
        Some(&body),
        &[],
    )
    .await
    .hub_error(401, "IotHubUnauthorizedAccess", 401002);
    let r = env
        .call_as("registryRead", Method::GET, "/configurations", None, &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn a_new_configuration_notifies_connected_modules_and_higher_priority_wins() {
    let env = Env::start().await;
    env.module_with_tags("gw1", "edgetwin", json!({"fleet": "a"}));
    env.module_with_tags("gw2", "edgetwin", json!({"fleet": "b"}));
    let mut module = env.t.connect("gw1", "edgetwin", true).await;
    module.subscribe(&[DESIRED_FILTER]).await;
    let before = env.t.hub().get_module_twin("gw1", "edgetwin").unwrap()["properties"]["desired"]
        ["$version"]
        .as_u64()
        .unwrap();

    put(
        &env,
        "interval-30",
        &configuration("interval-30", 10, 30),
        None,
    )
    .await;
    let p = module.next_publish().await;
    let version = before + 1;
    assert_eq!(
        p.topic,
        format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
    );
    let payload: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(
        payload,
        json!({"telemetryInterval": 30, "$version": version})
    );

    put(
        &env,
        "interval-60",
        &configuration("interval-60", 20, 60),
        None,
    )
    .await;
    let p = module.next_publish().await;
    let payload: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(payload["telemetryInterval"], 60);

    let twin = env
        .call(Method::GET, "/twins/gw1/modules/edgetwin", None, &[])
        .await
        .body;
    assert_eq!(twin["properties"]["desired"]["telemetryInterval"], 60);
    assert_eq!(
        twin["configurations"],
        json!({"interval-30": {"status": "targeted"}, "interval-60": {"status": "applied"}})
    );
    let untouched = env.t.hub().get_module_twin("gw2", "edgetwin").unwrap();
    assert!(untouched["properties"]["desired"]
        .get("telemetryInterval")
        .is_none());
    assert!(untouched.get("configurations").is_none());

    let (rows, _) = env
        .query_all(
            "SELECT deviceId FROM devices.modules WHERE configurations.[[interval-60]].status = 'Applied'",
            None,
        )
        .await;
    assert_eq!(rows, vec![json!({"deviceId": "gw1"})]);
    let doc = env
        .call(Method::GET, "/configurations/interval-30", None, &[])
        .await
        .body;
    assert_eq!(
        doc["systemMetrics"]["results"],
        json!({"appliedCount": 0, "targetedCount": 1})
    );
}

#[tokio::test]
async fn metrics_count_applied_and_rejected_acknowledgements() {
    let env = Env::start().await;
    for gw in ["gw1", "gw2", "gw3"] {
        env.module_with_tags(gw, "edgetwin", json!({"fleet": "a"}));
    }
    put(
        &env,
        "interval-30",
        &configuration("interval-30", 10, 30),
        None,
    )
    .await;
    env.report(
        "gw1",
        "edgetwin",
        json!({"telemetryInterval": {"value": 30, "ac": 200, "av": 2, "ad": "applied"}}),
    )
    .await;
    env.report("gw2", "edgetwin", json!({"telemetryInterval": {"value": 10, "ac": 400, "av": 2, "ad": "30 is above the maximum 20"}}))
        .await;
    env.t.hub().evaluate_configurations().unwrap();
    let doc = env
        .call(Method::GET, "/configurations/interval-30", None, &[])
        .await
        .body;
    assert_eq!(
        doc["metrics"]["results"],
        json!({"applied": 1, "rejected": 1})
    );
    assert_eq!(
        doc["systemMetrics"]["results"],
        json!({"appliedCount": 3, "targetedCount": 3})
    );
}

#[tokio::test]
async fn the_periodic_evaluation_reaches_twins_created_later_and_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(SimConfig {
        configurations_every: Duration::from_millis(50),
        ..SimConfig::ephemeral(dir.path())
    })
    .await
    .unwrap();
    let env = Env::wrap(TestSim { sim, dir });
    put(
        &env,
        "interval-30",
        &configuration("interval-30", 10, 30),
        None,
    )
    .await;

    let mut events = env.t.hub().events();
    env.module_with_tags("late", "edgetwin", json!({"fleet": "a"}));
    let late = key("late", "edgetwin");
    wait_event(&mut events, |e| match e {
        SimEvent::DesiredChanged { module, .. } if *module == late => Some(()),
        _ => None,
    })
    .await;
    let twin = env.t.hub().get_module_twin("late", "edgetwin").unwrap();
    assert_eq!(twin["properties"]["desired"]["telemetryInterval"], 30);

    let Env { t, .. } = env;
    let env = Env::wrap(t.restart().await);
    let doc = env
        .call(Method::GET, "/configurations/interval-30", None, &[])
        .await;
    assert_eq!(doc.status, StatusCode::OK, "{}", doc.body);
    assert_eq!(doc.body["priority"], 10);
    let twin = env.t.hub().get_module_twin("late", "edgetwin").unwrap();
    assert_eq!(twin["configurations"]["interval-30"]["status"], "applied");
}
