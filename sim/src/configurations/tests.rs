//! Configurations on a hub without sockets: validation and error codes, etags, priority
//! resolution, statuses and metrics from one evaluation to the next.

use serde_json::{json, Value};

use super::*;
use crate::service_side::TwinWrite;
use crate::testing::register;

fn hub() -> (tempfile::TempDir, Hub) {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::open("localhost", dir.path()).unwrap();
    (dir, hub)
}

fn config(target: &str, priority: i64, content: Value) -> Value {
    json!({
        "schemaVersion": "2.0",
        "content": {"moduleContent": content},
        "targetCondition": target,
        "priority": priority,
        "labels": {"by": "test"},
        "metrics": {"queries": {}},
        "etag": "*"
    })
}

fn tagged(hub: &Hub, d: &str, m: &str, tags: Value) {
    register(hub, d, m);
    hub.write_module_twin(d, m, TwinWrite::Patch, &json!({ "tags": tags }), None)
        .unwrap();
}

fn twin(hub: &Hub, d: &str, m: &str) -> Value {
    hub.get_module_twin(d, m).unwrap()
}

fn report(hub: &Hub, d: &str, m: &str, patch: Value) {
    let mut st = hub.state();
    let record = st
        .data
        .devices
        .get_mut(d)
        .and_then(|dev| dev.modules.get_mut(m))
        .unwrap();
    record
        .twin
        .patch_reported(patch.as_object().unwrap(), "t")
        .unwrap();
}

const ALL_GATEWAYS: &str = "FROM devices.modules WHERE moduleId = 'edgetwin'";

#[test]
fn invalid_configurations_get_the_hubs_error_codes() {
    let (_d, hub) = hub();
    let content = json!({"properties.desired.telemetryInterval": 30});
    let cases = [
        ("Upper", config(ALL_GATEWAYS, 1, content.clone()), 400004),
        ("a b", config(ALL_GATEWAYS, 1, content.clone()), 400004),
        (
            "c1",
            config("SELECT * FROM devices.modules", 1, content.clone()),
            400401,
        ),
        (
            "c1",
            config("FROM devices WHERE tags.x = 1", 1, content.clone()),
            400401,
        ),
        (
            "c1",
            config("FROM devices.modules WHERE tags.x = ", 1, content.clone()),
            400401,
        ),
        (
            "c1",
            config(ALL_GATEWAYS, 1, json!({"tags.site": "x"})),
            400402,
        ),
        ("c1", config(ALL_GATEWAYS, 1, json!({})), 400402),
        (
            "c1",
            config(ALL_GATEWAYS, 1, json!({"properties.desired.a.$b": 1})),
            400402,
        ),
        ("c1", config(ALL_GATEWAYS, -1, content.clone()), 400004),
        (
            "c1",
            json!({"content": {"deviceContent": {"properties.desired.x": 1}}, "targetCondition": "tags.x = 1"}),
            400402,
        ),
        (
            "c1",
            json!({"content": {"moduleContent": content.clone()}, "targetCondition": ALL_GATEWAYS,
                   "metrics": {"queries": {"broken": "SELECT FROM"}}}),
            400404,
        ),
    ];
    for (id, body, code) in cases {
        let e = hub
            .put_configuration(id, &body, None)
            .expect_err(&body.to_string());
        assert_eq!(e.code, code, "{id} {body}: {e}");
    }
    assert!(hub.list_configurations(None).as_array().unwrap().is_empty());
}

#[test]
fn a_malformed_target_names_the_position_within_the_condition() {
    let (_d, hub) = hub();
    let body = config(
        "FROM devices.modules WHERE tags.site == 'x'",
        1,
        json!({"properties.desired.x": 1}),
    );
    let e = hub.put_configuration("c1", &body, None).unwrap_err();
    assert_eq!(e.name, "InvalidConfigurationTargetCondition");
    assert!(e.message.contains("position 39"), "{}", e.message);
}

#[test]
fn content_is_immutable_and_updates_need_a_matching_etag() {
    let (_d, hub) = hub();
    let body = config(
        ALL_GATEWAYS,
        1,
        json!({"properties.desired.telemetryInterval": 30}),
    );
    let created = hub.put_configuration("c1", &body, None).unwrap();
    assert_eq!(created["etag"], "MQ==");
    assert_eq!(created["schemaVersion"], "2.0");
    assert_eq!(
        created["systemMetrics"]["queries"]["targetedCount"],
        format!("SELECT deviceId, moduleId {ALL_GATEWAYS}")
    );

    let again = hub.put_configuration("c1", &body, None).unwrap_err();
    assert_eq!((again.status, again.code), (409, 409401));

    let mut changed = body.clone();
    changed["content"]["moduleContent"]["properties.desired.telemetryInterval"] = json!(60);
    let e = hub
        .put_configuration("c1", &changed, Some("*"))
        .unwrap_err();
    assert_eq!(
        (e.code, e.name),
        (400403, "CannotModifyImmutableConfigurationContent")
    );

    let mut higher = body.clone();
    higher["priority"] = json!(7);
    let stale = hub
        .put_configuration("c1", &higher, Some("\"bm9wZQ==\""))
        .unwrap_err();
    assert_eq!(stale.code, 412001);
    let updated = hub
        .put_configuration("c1", &higher, Some("\"MQ==\""))
        .unwrap();
    assert_eq!(updated["priority"], 7);
    assert_eq!(updated["etag"], "Mg==");
    assert_eq!(updated["createdTimeUtc"], created["createdTimeUtc"]);

    let e = hub
        .delete_configuration("c1", Some("\"MQ==\""))
        .unwrap_err();
    assert_eq!(e.code, 412001);
    hub.delete_configuration("c1", Some("\"Mg==\"")).unwrap();
    assert_eq!(hub.get_configuration("c1").unwrap_err().code, 404301);
    assert_eq!(
        hub.delete_configuration("c1", None).unwrap_err().code,
        404301
    );
}

#[test]
fn the_hundred_and_first_configuration_is_refused() {
    let (_d, hub) = hub();
    let body = config("", 0, json!({"properties.desired.x": 1}));
    for i in 0..MAX_CONFIGURATIONS {
        hub.put_configuration(&format!("c{i}"), &body, None)
            .unwrap();
    }
    let e = hub
        .put_configuration("one-too-many", &body, None)
        .unwrap_err();
    assert_eq!(
        (e.status, e.code, e.name),
        (413, 413101, "ConfigurationCountLimitExceeded")
    );
    assert_eq!(
        hub.list_configurations(Some(3)).as_array().unwrap().len(),
        3
    );
}

#[test]
fn the_highest_priority_wins_each_property_and_others_are_only_targeted() {
    let (_d, hub) = hub();
    tagged(&hub, "gw1", "edgetwin", json!({"site": "north"}));
    tagged(&hub, "gw2", "edgetwin", json!({"site": "south"}));
    let low = config(
        ALL_GATEWAYS,
        1,
        json!({
        "properties.desired.telemetryInterval": 10,
        "properties.desired.logLevel": "info"}),
    );
    let high = config(
        "FROM devices.modules WHERE moduleId = 'edgetwin' AND tags.site = 'north'",
        5,
        json!({"properties.desired.telemetryInterval": 20}),
    );
    let loser = config(
        ALL_GATEWAYS,
        0,
        json!({"properties.desired.logLevel": "debug"}),
    );
    hub.put_configuration("low", &low, None).unwrap();
    hub.put_configuration("high", &high, None).unwrap();
    hub.put_configuration("loser", &loser, None).unwrap();

    let north = twin(&hub, "gw1", "edgetwin");
    assert_eq!(north["properties"]["desired"]["telemetryInterval"], 20);
    assert_eq!(north["properties"]["desired"]["logLevel"], "info");
    assert_eq!(
        north["configurations"],
        json!({"high": {"status": "applied"}, "low": {"status": "applied"},
               "loser": {"status": "targeted"}})
    );
    let south = twin(&hub, "gw2", "edgetwin");
    assert_eq!(south["properties"]["desired"]["telemetryInterval"], 10);
    assert!(south["configurations"].get("high").is_none());

    let high = hub.get_configuration("high").unwrap();
    assert_eq!(
        high["systemMetrics"]["results"],
        json!({"appliedCount": 1, "targetedCount": 1})
    );
    let loser = hub.get_configuration("loser").unwrap();
    assert_eq!(
        loser["systemMetrics"]["results"],
        json!({"appliedCount": 0, "targetedCount": 2})
    );

    let version = north["properties"]["desired"]["$version"].clone();
    let again = hub.evaluate_configurations().unwrap();
    assert!(again.patched.is_empty(), "{again:?}");
    assert_eq!(again.statuses_changed, 0);
    assert_eq!(
        twin(&hub, "gw1", "edgetwin")["properties"]["desired"]["$version"],
        version
    );
}

#[test]
fn between_equal_priorities_the_newest_configuration_wins() {
    let (_d, hub) = hub();
    tagged(&hub, "gw1", "edgetwin", json!({}));
    let first = config(
        ALL_GATEWAYS,
        3,
        json!({"properties.desired.telemetryInterval": 10}),
    );
    let second = config(
        ALL_GATEWAYS,
        3,
        json!({"properties.desired.telemetryInterval": 99}),
    );
    // Ids sort the other way round, so the order is creation's, not the id's.
    hub.put_configuration("b-first", &first, None).unwrap();
    hub.put_configuration("a-second", &second, None).unwrap();
    let t = twin(&hub, "gw1", "edgetwin");
    assert_eq!(t["properties"]["desired"]["telemetryInterval"], 99);
    assert_eq!(t["configurations"]["b-first"]["status"], "targeted");
}

#[test]
fn removing_a_configuration_or_leaving_its_scope_keeps_the_values() {
    let (_d, hub) = hub();
    tagged(&hub, "gw1", "edgetwin", json!({"fleet": "a"}));
    let body = config(
        "FROM devices.modules WHERE tags.fleet = 'a'",
        1,
        json!({"properties.desired": {"telemetryInterval": 15, "nested": {"x": 1}}}),
    );
    hub.put_configuration("c1", &body, None).unwrap();
    assert_eq!(
        twin(&hub, "gw1", "edgetwin")["properties"]["desired"]["nested"],
        json!({"x": 1})
    );

    hub.write_module_twin(
        "gw1",
        "edgetwin",
        TwinWrite::Patch,
        &json!({"tags": {"fleet": "b"}}),
        None,
    )
    .unwrap();
    hub.evaluate_configurations().unwrap();
    let t = twin(&hub, "gw1", "edgetwin");
    assert_eq!(t["properties"]["desired"]["telemetryInterval"], 15);
    assert!(t.get("configurations").is_none(), "{t}");

    hub.write_module_twin(
        "gw1",
        "edgetwin",
        TwinWrite::Patch,
        &json!({"tags": {"fleet": "a"}}),
        None,
    )
    .unwrap();
    hub.evaluate_configurations().unwrap();
    hub.delete_configuration("c1", Some("*")).unwrap();
    hub.evaluate_configurations().unwrap();
    let t = twin(&hub, "gw1", "edgetwin");
    assert_eq!(t["properties"]["desired"]["telemetryInterval"], 15);
    assert!(t.get("configurations").is_none(), "{t}");
}

#[test]
fn custom_metrics_count_applied_and_rejected_acknowledgements() {
    let (_d, hub) = hub();
    for gw in ["gw1", "gw2", "gw3"] {
        tagged(&hub, gw, "edgetwin", json!({}));
    }
    let mut body = config(
        ALL_GATEWAYS,
        1,
        json!({"properties.desired.telemetryInterval": 30}),
    );
    let applied = "SELECT deviceId, moduleId FROM devices.modules WHERE \
                   configurations.[[c1]].status = 'Applied' AND \
                   properties.reported.telemetryInterval.ac = 200 AND \
                   properties.reported.telemetryInterval.value = 30";
    let rejected = "SELECT deviceId, moduleId FROM devices.modules WHERE \
                    configurations.[[c1]].status = 'Applied' AND \
                    properties.reported.telemetryInterval.ac >= 400";
    body["metrics"]["queries"] = json!({"applied": applied, "rejected": rejected,
        "counted": "SELECT COUNT() AS n FROM devices.modules WHERE IS_DEFINED(properties.reported.telemetryInterval)"});
    hub.put_configuration("c1", &body, None).unwrap();
    let results = |hub: &Hub| hub.get_configuration("c1").unwrap()["metrics"]["results"].clone();
    assert_eq!(
        results(&hub),
        json!({"applied": 0, "counted": 0, "rejected": 0})
    );

    report(
        &hub,
        "gw1",
        "edgetwin",
        json!({"telemetryInterval": {"value": 30, "ac": 200, "av": 2, "ad": "applied"}}),
    );
    report(
        &hub,
        "gw2",
        "edgetwin",
        json!({"telemetryInterval": {"value": 5, "ac": 400, "av": 2, "ad": "30 is above the maximum 20"}}),
    );
    hub.evaluate_configurations().unwrap();
    assert_eq!(
        results(&hub),
        json!({"applied": 1, "counted": 2, "rejected": 1})
    );
}

#[test]
fn test_queries_report_errors_without_creating_anything() {
    let (_d, hub) = hub();
    let r = hub.test_configuration_queries(&json!({
        "targetCondition": "FROM devices WHERE x = 1",
        "customMetricQueries": {"ok": "SELECT deviceId FROM devices.modules", "bad": "SELECT"}}));
    assert!(r["targetConditionError"]
        .as_str()
        .unwrap()
        .contains("must start with"));
    assert_eq!(r["customMetricQueryErrors"].as_object().unwrap().len(), 1);
    assert!(r["customMetricQueryErrors"]["bad"].is_string());
    let ok = hub.test_configuration_queries(&json!({"targetCondition": ALL_GATEWAYS}));
    assert_eq!(ok["targetConditionError"], "");
}

#[test]
fn content_a_twin_cannot_hold_is_reported_and_leaves_its_status_alone() {
    let (_d, hub) = hub();
    tagged(&hub, "gw1", "edgetwin", json!({}));
    // Fill desired close to its 32 KB limit, then target 4 KB more at it.
    let filler: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("f{i}"), json!("x".repeat(3900))))
        .collect();
    hub.write_module_twin(
        "gw1",
        "edgetwin",
        TwinWrite::Patch,
        &json!({"properties": {"desired": filler}}),
        None,
    )
    .unwrap();
    let body = config(
        ALL_GATEWAYS,
        1,
        json!({"properties.desired.big": "y".repeat(4000)}),
    );
    hub.put_configuration("c1", &body, None).unwrap();
    let report = hub.evaluate_configurations().unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].1.status, 413);
    let t = twin(&hub, "gw1", "edgetwin");
    assert!(t["properties"]["desired"].get("big").is_none());
    assert!(t.get("configurations").is_none(), "{t}");
}
