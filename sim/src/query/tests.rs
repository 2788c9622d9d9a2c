//! Parser and evaluator of the query language, without a hub.

use serde_json::{json, Value};

use super::*;

fn twins() -> Vec<Value> {
    vec![
        json!({"deviceId": "gw1", "moduleId": "edgetwin",
               "tags": {"site": "north", "tier": 1},
               "properties": {"desired": {"telemetryInterval": 30, "$version": 3},
                              "reported": {"telemetryInterval": {"value": 30, "ac": 200, "av": 3, "ad": "applied"}}},
               "configurations": {"cfg-a": {"status": "applied"}}}),
        json!({"deviceId": "gw2", "moduleId": "edgetwin",
               "tags": {"site": "south", "tier": 2},
               "properties": {"desired": {"$version": 1},
                              "reported": {"telemetryInterval": {"value": 0, "ac": 400, "av": 2, "ad": "0 is below the minimum 1"}}},
               "configurations": {"cfg-a": {"status": "targeted"}}}),
        json!({"deviceId": "gw3", "moduleId": "other",
               "tags": {"site": "north", "tier": null},
               "properties": {"desired": {"$version": 1}, "reported": {}}}),
    ]
}

fn ids(q: &str) -> Vec<String> {
    let query = parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
    query
        .run(&twins())
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn select_star_with_every_comparison_operator() {
    let base = "SELECT * FROM devices.modules WHERE ";
    assert_eq!(ids(&format!("{base}tags.site = 'north'")), ["gw1", "gw3"]);
    assert_eq!(ids(&format!("{base}tags.site != 'north'")), ["gw2"]);
    assert_eq!(ids(&format!("{base}tags.site <> 'north'")), ["gw2"]);
    assert_eq!(ids(&format!("{base}tags.tier < 2")), ["gw1"]);
    assert_eq!(ids(&format!("{base}tags.tier <= 2")), ["gw1", "gw2"]);
    assert_eq!(ids(&format!("{base}tags.tier > 1")), ["gw2"]);
    assert_eq!(ids(&format!("{base}tags.tier >= 1.0")), ["gw1", "gw2"]);
    assert_eq!(ids(&format!("{base}tags.tier = null")), ["gw3"]);
}

#[test]
fn and_or_not_and_parentheses_follow_precedence() {
    let base = "select * from devices.modules where ";
    assert_eq!(
        ids(&format!(
            "{base}tags.site = 'south' OR tags.site = 'north' AND moduleId = 'other'"
        )),
        ["gw2", "gw3"]
    );
    assert_eq!(
        ids(&format!(
            "{base}(tags.site = 'south' OR tags.site = 'north') AND moduleId = 'edgetwin'"
        )),
        ["gw1", "gw2"]
    );
    assert_eq!(ids(&format!("{base}NOT tags.site = 'north'")), ["gw2"]);
    assert_eq!(
        ids(&format!("{base}not (tags.tier = 1 or tags.tier = 2)")),
        ["gw3"]
    );
}

#[test]
fn in_and_nin_take_bracketed_literal_lists() {
    let base = "SELECT * FROM devices.modules WHERE ";
    assert_eq!(
        ids(&format!("{base}deviceId IN ['gw1', 'gw3']")),
        ["gw1", "gw3"]
    );
    assert_eq!(ids(&format!("{base}deviceId NIN ['gw1', 'gw3']")), ["gw2"]);
    assert_eq!(ids(&format!("{base}tags.tier in [2, 'x', true]")), ["gw2"]);
}

#[test]
fn missing_properties_are_undefined_so_neither_equal_nor_unequal() {
    let base = "SELECT * FROM devices.modules WHERE ";
    let eq = ids(&format!("{base}properties.desired.telemetryInterval = 30"));
    let ne = ids(&format!("{base}properties.desired.telemetryInterval != 30"));
    assert_eq!(eq, ["gw1"]);
    assert!(ne.is_empty(), "{ne:?}");
    assert_eq!(
        ids(&format!(
            "{base}NOT properties.desired.telemetryInterval = 30"
        )),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&format!(
            "{base}IS_DEFINED(properties.desired.telemetryInterval)"
        )),
        ["gw1"]
    );
    assert_eq!(
        ids(&format!("{base}NOT is_defined(configurations.[[cfg-a]])")),
        ["gw3"]
    );
}

#[test]
fn strings_and_numbers_never_order_against_each_other() {
    let base = "SELECT * FROM devices.modules WHERE ";
    assert!(ids(&format!("{base}tags.site > 1")).is_empty());
    assert_eq!(ids(&format!("{base}tags.site != 1")), ["gw1", "gw2", "gw3"]);
    assert_eq!(ids(&format!("{base}tags.site > 'o'")), ["gw2"]);
}

#[test]
fn configuration_status_matches_the_hubs_capitalised_spelling() {
    let q =
        "SELECT deviceId FROM devices.modules WHERE configurations.[[cfg-a]].status = 'Applied'";
    assert_eq!(ids(q), ["gw1"]);
    let q =
        "SELECT deviceId FROM devices.modules WHERE configurations.[[cfg-a]].status = 'targeted'";
    assert_eq!(ids(q), ["gw2"]);
}

#[test]
fn acknowledgement_metrics_read_nested_reported_values() {
    let q = "SELECT deviceId, moduleId FROM devices.modules WHERE \
             properties.reported.telemetryInterval.ac >= 400";
    let rows = parse(q).unwrap().run(&twins());
    assert_eq!(
        rows,
        vec![json!({"deviceId": "gw2", "moduleId": "edgetwin"})]
    );
}

#[test]
fn projections_name_values_by_last_segment_or_alias_and_skip_undefined() {
    let q = "SELECT deviceId, properties.reported.telemetryInterval.ad AS reason, tags.site \
             FROM devices.modules WHERE devices.modules.moduleId = 'edgetwin'";
    let query = parse(q).unwrap();
    assert_eq!(query.item_type(), ItemType::Raw);
    assert_eq!(
        query.run(&twins()),
        vec![
            json!({"deviceId": "gw1", "reason": "applied", "site": "north"}),
            json!({"deviceId": "gw2", "reason": "0 is below the minimum 1", "site": "south"}),
        ]
    );
}

#[test]
fn count_with_and_without_alias_and_group_by() {
    let rows = |q: &str| parse(q).unwrap().run(&twins());
    assert_eq!(
        rows("SELECT COUNT() AS n FROM devices.modules WHERE tags.site = 'north'"),
        vec![json!({"n": 2})]
    );
    assert_eq!(
        rows("SELECT COUNT() FROM devices.modules WHERE tags.site = 'west'"),
        vec![json!({"$1": 0})]
    );
    assert_eq!(
        rows("SELECT tags.site, COUNT() AS n FROM devices.modules GROUP BY tags.site"),
        vec![
            json!({"site": "north", "n": 2}),
            json!({"site": "south", "n": 1})
        ]
    );
}

#[test]
fn top_limits_rows_and_select_star_is_a_twin_query() {
    let query = parse("SELECT TOP 2 * FROM devices.modules").unwrap();
    assert_eq!(query.item_type(), ItemType::Twin);
    assert_eq!(query.run(&twins()).len(), 2);
}

#[test]
fn from_devices_and_devices_prefixed_paths_parse() {
    let q = parse("SELECT * FROM devices WHERE devices.deviceId = 'gw1'").unwrap();
    assert_eq!(q.from, Collection::Devices);
    assert_eq!(
        q.filter,
        Some(Expr::Compare(
            Operand::Path(Path(vec!["deviceId".into()])),
            CmpOp::Eq,
            Operand::Lit(Literal::Str("gw1".into()))
        ))
    );
}

#[test]
fn errors_name_the_position_and_the_token() {
    let cases = [
        (
            "SELECT * FROM devices.modules WHERE",
            36,
            "expected a property path or a literal but found the end of the query",
        ),
        (
            "SELECT * FROM devices.modules WHERE tags.x = ",
            46,
            "end of the query",
        ),
        (
            "SELECT * FRM devices.modules",
            10,
            "expected FROM but found 'FRM'",
        ),
        (
            "SELECT * FROM devices.modules WHERE tags.x 'a'",
            44,
            "expected a comparison",
        ),
        (
            "SELECT * FROM devices.modules WHERE (tags.x = 1",
            48,
            "expected ')'",
        ),
        (
            "SELECT * FROM devices.modules WHERE x IN ('a')",
            42,
            "expected '['",
        ),
        (
            "SELECT * FROM devices.modules WHERE x IN [y]",
            43,
            "only literals",
        ),
        ("SELECT * FROM devices.jobs", 15, "not emulated"),
        (
            "SELECT * FROM devices.modules WHERE STARTSWITH(x, 'a')",
            37,
            "not emulated",
        ),
        ("SELECT AVG(x) FROM devices.modules", 8, "not emulated"),
        (
            "SELECT deviceId, COUNT() FROM devices.modules",
            1,
            "not in GROUP BY",
        ),
        (
            "SELECT * FROM devices.modules extra",
            31,
            "expected the end of the query but found 'extra'",
        ),
        ("SELECT TOP x * FROM devices.modules", 12, "whole number"),
        ("", 1, "expected SELECT"),
    ];
    for (q, pos, text) in cases {
        let e = parse(q).expect_err(q);
        assert_eq!(e.position, pos, "{q}: {e}");
        assert!(e.to_string().contains(text), "{q}: {e}");
    }
}

#[test]
fn overlong_or_deeply_nested_queries_are_refused_not_overflowed() {
    let long = format!(
        "SELECT * FROM devices.modules WHERE x = '{}'",
        "a".repeat(9000)
    );
    assert!(parse(&long).unwrap_err().message.contains("limit is 8192"));
    let deep = format!(
        "SELECT * FROM devices.modules WHERE {}x = 1{}",
        "(".repeat(100),
        ")".repeat(100)
    );
    assert!(parse(&deep).unwrap_err().message.contains("nests deeper"));
    let nots = format!(
        "SELECT * FROM devices.modules WHERE {}x = 1",
        "NOT ".repeat(100)
    );
    assert!(parse(&nots).is_err());
}
