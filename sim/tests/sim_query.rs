//! `POST /devices/query` over real TLS (PROTOCOL §14.1): paging with `x-ms-max-item-count`
//! and `x-ms-continuation`, `x-ms-item-type`, projections, COUNT(), the operators, and
//! the hub's error answer for a malformed query.

mod fleet_env;

use fleet_env::Env;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// 12 modules on 12 gateways: sites north/south alternating, tier = i.
async fn fleet() -> Env {
    let env = Env::start().await;
    for i in 0..12 {
        let site = if i % 2 == 0 { "north" } else { "south" };
        env.module_with_tags(
            &format!("gw{i:02}"),
            "edgetwin",
            json!({"site": site, "tier": i}),
        );
    }
    env.t.register("gw00", "other");
    env
}

fn device_ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["deviceId"].as_str().expect("deviceId").to_string())
        .collect()
}

#[tokio::test]
async fn paging_over_several_pages_returns_every_twin_once_in_order() {
    let env = fleet().await;
    let q = "SELECT * FROM devices.modules WHERE moduleId = 'edgetwin'";
    let first = env.query_page(q, Some(5), None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.header("x-ms-item-type"), Some("twin"));
    assert_eq!(
        first.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(first.body.as_array().unwrap().len(), 5);
    assert!(first.header("x-ms-continuation").is_some());
    let twin = &first.body[0];
    assert_eq!(twin["moduleId"], "edgetwin");
    assert_eq!(twin["tags"]["site"], "north");
    assert!(twin["properties"]["desired"]["$version"].is_u64());
    assert!(twin["etag"].is_string());

    let (rows, pages) = env.query_all(q, Some(5)).await;
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..12).map(|i| format!("gw{i:02}")).collect();
    assert_eq!(device_ids(&rows), expected);

    let (all, pages) = env.query_all(q, None).await;
    assert_eq!((all.len(), pages), (12, 1));
}

#[tokio::test]
async fn the_last_page_carries_no_continuation() {
    let env = fleet().await;
    let q = "SELECT deviceId FROM devices.modules WHERE tags.tier >= 10";
    let r = env.query_page(q, Some(2), None).await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    assert_eq!(r.header("x-ms-continuation"), None);
    assert_eq!(r.header("x-ms-item-type"), Some("raw"));
}

#[tokio::test]
async fn projections_and_count_answer_raw_rows() {
    let env = fleet().await;
    let (rows, _) = env
        .query_all(
            "SELECT deviceId, moduleId, tags.site AS where FROM devices.modules \
             WHERE tags.tier < 2",
            None,
        )
        .await;
    assert_eq!(
        rows,
        vec![
            json!({"deviceId": "gw00", "moduleId": "edgetwin", "where": "north"}),
            json!({"deviceId": "gw01", "moduleId": "edgetwin", "where": "south"}),
        ]
    );
    let (count, _) = env
        .query_all(
            "SELECT COUNT() AS numberOfModules FROM devices.modules WHERE tags.site = 'south'",
            None,
        )
        .await;
    assert_eq!(count, vec![json!({"numberOfModules": 6})]);
    let (groups, _) = env
        .query_all(
            "SELECT tags.site, COUNT() AS n FROM devices.modules GROUP BY tags.site",
            None,
        )
        .await;
    assert_eq!(
        groups,
        vec![
            // groups in the order first seen: gw00/edgetwin, gw00/other, gw01/edgetwin
            json!({"site": "north", "n": 6}),
            json!({"n": 1}),
            json!({"site": "south", "n": 6}),
        ]
    );
}

#[tokio::test]
async fn every_operator_filters_as_the_hub_does() {
    let env = fleet().await;
    env.report(
        "gw03",
        "edgetwin",
        json!({"telemetryInterval": {"value": 5, "ac": 400, "av": 2, "ad": "too fast"}}),
    )
    .await;
    let cases: &[(&str, &[&str])] = &[
        ("tags.tier = 3", &["gw03"]),
        ("tags.tier != 3 AND tags.tier > 9", &["gw10", "gw11"]),
        ("tags.tier < 1", &["gw00"]),
        ("tags.tier <= 1", &["gw00", "gw01"]),
        ("tags.tier >= 11", &["gw11"]),
        ("tags.tier > 10 OR deviceId = 'gw02'", &["gw02", "gw11"]),
        ("NOT (tags.tier > 1)", &["gw00", "gw01"]),
        ("deviceId IN ['gw04', 'gw05', 'nope']", &["gw04", "gw05"]),
        (
            "tags.tier NIN [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]",
            &["gw10", "gw11"],
        ),
        (
            "IS_DEFINED(properties.reported.telemetryInterval)",
            &["gw03"],
        ),
        ("properties.reported.telemetryInterval.ac >= 400", &["gw03"]),
        ("devices.modules.moduleId = 'other'", &["gw00"]),
        (
            "tags.site = 'north' AND (tags.tier = 2 OR tags.tier = 4)",
            &["gw02", "gw04"],
        ),
    ];
    for (cond, expected) in cases {
        let q = format!("SELECT deviceId FROM devices.modules WHERE {cond}");
        let (rows, _) = env.query_all(&q, None).await;
        assert_eq!(device_ids(&rows), *expected, "{cond}");
    }
}

#[tokio::test]
async fn a_malformed_query_is_a_400_naming_position_and_token() {
    let env = fleet().await;
    let r = env
        .query_page(
            "SELECT * FROM devices.modules WHERE tags.site == 'x'",
            None,
            None,
        )
        .await;
    let message = r.hub_error(400, "ArgumentInvalid", 400004);
    assert!(message.contains("position 48"), "{message}");
    assert!(message.contains("'='"), "{message}");

    let r = env
        .call(Method::POST, "/devices/query", Some(&json!({"q": 1})), &[])
        .await;
    r.hub_error(400, "ArgumentInvalid", 400004);

    let r = env
        .query_page("SELECT * FROM devices.modules", None, Some("not-a-token"))
        .await;
    let message = r.hub_error(400, "ArgumentInvalid", 400004);
    assert!(message.contains("continuation"), "{message}");

    let r = env
        .call(
            Method::POST,
            "/devices/query",
            Some(&json!({"query": "SELECT * FROM devices.modules"})),
            &[("x-ms-max-item-count", "many")],
        )
        .await;
    r.hub_error(400, "ArgumentInvalid", 400004);
}

#[tokio::test]
async fn queries_need_service_connect() {
    let env = fleet().await;
    let body = json!({"query": "SELECT * FROM devices.modules"});
    let r = env
        .call_as(
            "registryRead",
            Method::POST,
            "/devices/query",
            Some(&body),
            &[],
        )
        .await;
    r.hub_error(401, "IotHubUnauthorizedAccess", 401002);
    let r = env
        .call_as("service", Method::POST, "/devices/query", Some(&body), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}
