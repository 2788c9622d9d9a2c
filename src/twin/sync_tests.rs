//! Specifications of [`TwinSync`]: DESIGN §3 rules 2–5, one behaviour per test.

use serde_json::{json, Map, Value};

use super::*;

fn sync_with(schema: Schema, ack: AckStyle) -> TwinSync {
    TwinSync::new(schema.clone(), ack, RuntimeState::from_defaults(&schema))
}

fn sync() -> TwinSync {
    sync_with(Schema::default(), AckStyle::Pnp)
}

/// A sync that has applied `desired` as its first full twin.
fn synced(desired: Value) -> TwinSync {
    let mut s = sync();
    s.full_twin(&desired);
    s
}

fn patch(s: &mut TwinSync, doc: Value) -> Outcome {
    let version = doc["$version"].as_u64();
    s.patch(version, doc.to_string().as_bytes())
}

fn props(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn dispositions(out: &Outcome) -> Vec<Disposition> {
    out.handled.iter().map(|h| h.disposition.clone()).collect()
}

#[test]
fn fresh_state_holds_declared_defaults() {
    let s = sync();
    assert_eq!(
        s.state().properties,
        props(json!({"telemetryInterval": 60}))
    );
    assert_eq!(s.telemetry_interval().as_secs(), 60);
}

#[test]
fn first_full_twin_is_applied_and_every_property_acknowledged() {
    let mut s = sync();
    let out = s.full_twin(&json!({"telemetryInterval": 122, "site": "north", "$version": 4}));
    assert!(out.changed);
    assert!(!out.need_full_get);
    assert_eq!(s.state().desired_version, Some(4));
    assert_eq!(
        out.reported,
        props(json!({
            "telemetryInterval": {"value": 122, "ac": 200, "av": 4, "ad": "applied"},
            "site": {"value": "north", "ac": 200, "av": 4, "ad": "applied"},
        }))
    );
    assert_eq!(s.telemetry_interval().as_secs(), 122);
}

#[test]
fn full_twin_removes_absent_properties_and_restores_defaults() {
    let mut s = synced(json!({"telemetryInterval": 122, "site": "north", "$version": 4}));
    let out = s.full_twin(&json!({"other": 1, "$version": 9}));
    assert_eq!(
        s.state().properties,
        props(json!({"telemetryInterval": 60, "other": 1}))
    );
    assert_eq!(out.reported["site"], Value::Null);
    assert_eq!(
        out.reported["telemetryInterval"],
        json!({"value": 60, "ac": 200, "av": 9, "ad": "default"})
    );
}

#[test]
fn repeated_full_twin_at_same_version_changes_nothing() {
    let mut s = synced(json!({"telemetryInterval": 122, "$version": 4}));
    let out = s.full_twin(&json!({"telemetryInterval": 122, "$version": 4}));
    assert!(!out.changed);
    assert!(out.reported.is_empty());
    assert_eq!(dispositions(&out), [Disposition::UpToDate]);
}

#[test]
fn later_full_twin_acknowledges_only_what_changed() {
    let mut s = synced(json!({"telemetryInterval": 122, "site": "north", "$version": 4}));
    let out = s.full_twin(&json!({"telemetryInterval": 122, "site": "south", "$version": 6}));
    assert_eq!(out.reported.keys().collect::<Vec<_>>(), ["site"]);
}

#[test]
fn next_patch_is_applied() {
    let mut s = synced(json!({"$version": 4}));
    let out = patch(&mut s, json!({"telemetryInterval": 30, "$version": 5}));
    assert_eq!(dispositions(&out), [Disposition::Applied]);
    assert!(out.changed);
    assert_eq!(s.state().desired_version, Some(5));
    assert_eq!(
        out.reported["telemetryInterval"],
        json!({"value": 30, "ac": 200, "av": 5, "ad": "applied"})
    );
}

#[test]
fn duplicate_patch_is_ignored() {
    let mut s = synced(json!({"telemetryInterval": 30, "$version": 5}));
    for version in [3, 5] {
        let out = patch(
            &mut s,
            json!({"telemetryInterval": 99, "$version": version}),
        );
        assert_eq!(dispositions(&out), [Disposition::Duplicate { applied: 5 }]);
        assert!(!out.changed && !out.need_full_get && out.reported.is_empty());
    }
    assert_eq!(s.state().integer("telemetryInterval"), Some(30));
}

#[test]
fn patch_with_version_gap_triggers_full_get() {
    let mut s = synced(json!({"$version": 4}));
    let out = patch(&mut s, json!({"telemetryInterval": 30, "$version": 6}));
    assert!(out.need_full_get);
    assert!(!out.changed);
    assert_eq!(dispositions(&out), [Disposition::Gap { applied: Some(4) }]);
    assert_eq!(s.state().integer("telemetryInterval"), Some(60));
}

#[test]
fn patch_before_any_twin_triggers_full_get() {
    let mut s = sync();
    let out = patch(&mut s, json!({"a": 1, "$version": 1}));
    assert!(out.need_full_get);
    assert_eq!(dispositions(&out), [Disposition::Gap { applied: None }]);
}

#[test]
fn patches_during_get_are_queued_then_filtered() {
    let mut s = synced(json!({"$version": 2}));
    s.get_started();
    for (version, value) in [(3, "old"), (6, "newest"), (5, "newer")] {
        let out = patch(&mut s, json!({"site": value, "$version": version}));
        assert_eq!(dispositions(&out), [Disposition::Queued]);
        assert!(!out.need_full_get && !out.changed);
    }
    let out = s.get_response(
        br#"{"desired": {"site": "got", "$version": 4}, "reported": {"$version": 9}}"#,
    );
    assert!(!s.get_in_flight());
    assert_eq!(
        dispositions(&out),
        [
            Disposition::FullTwin,
            Disposition::Duplicate { applied: 4 },
            Disposition::Applied,
            Disposition::Applied,
        ]
    );
    assert_eq!(s.state().properties["site"], json!("newest"));
    assert_eq!(s.state().desired_version, Some(6));
    assert_eq!(s.state().reported_version, Some(9));
    assert_eq!(out.reported["site"]["av"], json!(6));
}

#[test]
fn queued_patch_beyond_the_get_with_a_gap_asks_for_another_get() {
    let mut s = synced(json!({"$version": 2}));
    s.get_started();
    patch(&mut s, json!({"site": "x", "$version": 9}));
    let out = s.full_twin(&json!({"$version": 4}));
    assert!(out.need_full_get);
}

#[test]
fn failed_get_drops_queue_and_asks_again() {
    let mut s = synced(json!({"$version": 2}));
    s.get_started();
    patch(&mut s, json!({"site": "x", "$version": 3}));
    let out = s.get_failed();
    assert!(out.need_full_get);
    assert!(!s.get_in_flight());
    assert_eq!(dispositions(&out), [Disposition::Dropped]);
    assert_eq!(s.state().properties.get("site"), None);
}

#[test]
fn null_deletes_nested_key() {
    let mut s = synced(json!({"site": {"name": "north", "floor": 2}, "$version": 1}));
    let out = patch(&mut s, json!({"site": {"floor": null}, "$version": 2}));
    assert_eq!(s.state().properties["site"], json!({"name": "north"}));
    // The ack's value is a replacement patch, so the reported copy loses `floor` too.
    assert_eq!(
        out.reported["site"]["value"],
        json!({"name": "north", "floor": null})
    );
}

#[test]
fn nested_objects_merge() {
    let mut s = synced(json!({"site": {"name": "north"}, "$version": 1}));
    patch(&mut s, json!({"site": {"floor": 2}, "$version": 2}));
    assert_eq!(
        s.state().properties["site"],
        json!({"name": "north", "floor": 2})
    );
}

#[test]
fn null_deletes_top_level_property_and_reports_null() {
    let mut s = synced(json!({"site": "north", "$version": 1}));
    let out = patch(&mut s, json!({"site": null, "$version": 2}));
    assert_eq!(s.state().properties.get("site"), None);
    assert_eq!(out.reported["site"], Value::Null);
    assert_eq!(out.items[0].verdict, Verdict::Removed);
}

#[test]
fn null_on_declared_property_restores_its_default() {
    let mut s = synced(json!({"telemetryInterval": 5, "$version": 1}));
    let out = patch(&mut s, json!({"telemetryInterval": null, "$version": 2}));
    assert_eq!(s.state().integer("telemetryInterval"), Some(60));
    assert_eq!(out.items[0].verdict, Verdict::DefaultRestored);
}

#[test]
fn rejected_value_keeps_previous_good_value() {
    let mut s = synced(json!({"telemetryInterval": 30, "$version": 1}));
    let out = patch(&mut s, json!({"telemetryInterval": 0, "$version": 2}));
    assert_eq!(s.state().integer("telemetryInterval"), Some(30));
    assert_eq!(s.state().desired_version, Some(2));
    assert_eq!(
        out.reported["telemetryInterval"],
        json!({"value": 30, "ac": 400, "av": 2, "ad": "0 is below the minimum 1"})
    );
    assert_eq!(
        out.items[0].verdict,
        Verdict::Rejected("0 is below the minimum 1".into())
    );
}

#[test]
fn rejected_value_in_full_twin_keeps_previous_good_value() {
    let mut s = synced(json!({"telemetryInterval": 30, "$version": 1}));
    let out = s.full_twin(&json!({"telemetryInterval": "fast", "$version": 3}));
    assert_eq!(s.state().integer("telemetryInterval"), Some(30));
    assert_eq!(out.reported["telemetryInterval"]["ac"], json!(400));
}

#[test]
fn unknown_property_is_rejected_under_reject_policy() {
    let mut s = sync_with(Schema::new(UnknownPolicy::Reject), AckStyle::Pnp);
    let out = s.full_twin(&json!({"colour": "red", "$version": 1}));
    assert_eq!(s.state().properties.get("colour"), None);
    assert_eq!(
        out.reported["colour"],
        json!({"value": null, "ac": 400, "av": 1, "ad": "unknown property"})
    );
}

#[test]
fn plain_mode_reports_bare_values() {
    let mut s = sync_with(Schema::default(), AckStyle::Plain);
    s.full_twin(&json!({"$version": 1}));
    let out = patch(
        &mut s,
        json!({"telemetryInterval": 0, "site": "n", "$version": 2}),
    );
    assert_eq!(
        out.reported,
        props(json!({"telemetryInterval": 60, "site": "n"}))
    );
}

fn assert_malformed_is_ignored(payload: &[u8]) {
    let mut s = synced(json!({"telemetryInterval": 30, "$version": 1}));
    let before = s.state().clone();
    let out = s.patch(Some(2), payload);
    assert!(
        matches!(dispositions(&out)[..], [Disposition::Malformed(_)]),
        "{out:?}"
    );
    assert!(out.need_full_get);
    assert!(!out.changed);
    assert!(out.reported.is_empty());
    assert_eq!(s.state(), &before);
}

#[test]
fn non_json_patch_is_ignored_and_triggers_full_get() {
    assert_malformed_is_ignored(b"{not json");
}

#[test]
fn non_object_patch_is_ignored_and_triggers_full_get() {
    assert_malformed_is_ignored(b"[1, 2]");
    assert_malformed_is_ignored(b"42");
}

#[test]
fn too_deep_patch_is_ignored_and_triggers_full_get() {
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "x": deep });
    }
    assert_malformed_is_ignored(format!("{{\"a\": {deep}, \"$version\": 2}}").as_bytes());
}

#[test]
fn too_big_patch_is_ignored_and_triggers_full_get() {
    let big = "x".repeat(33 * 1024);
    assert_malformed_is_ignored(format!("{{\"a\": \"{big}\", \"$version\": 2}}").as_bytes());
}

#[test]
fn patch_whose_versions_disagree_is_ignored() {
    assert_malformed_is_ignored(br#"{"a": 1, "$version": 7}"#);
}

#[test]
fn ten_levels_of_nesting_are_accepted() {
    let mut deep = json!(1);
    for _ in 0..9 {
        deep = json!({ "x": deep });
    }
    let mut s = synced(json!({"$version": 1}));
    let out = patch(&mut s, json!({"a": deep, "$version": 2}));
    assert_eq!(dispositions(&out), [Disposition::Applied]);
}

#[test]
fn malformed_patch_during_get_asks_for_resync_unless_the_get_covers_it() {
    let mut s = synced(json!({"$version": 1}));
    s.get_started();
    let out = s.patch(Some(5), b"garbage");
    assert!(!out.need_full_get);
    assert!(s.full_twin(&json!({"$version": 4})).need_full_get);

    s.get_started();
    s.patch(Some(5), b"garbage");
    assert!(!s.full_twin(&json!({"$version": 5})).need_full_get);
}

#[test]
fn malformed_get_response_leaves_state_untouched() {
    let mut s = synced(json!({"telemetryInterval": 30, "$version": 1}));
    let before = s.state().clone();
    s.get_started();
    let out = s.get_response(b"<html>");
    assert!(!out.changed && !s.get_in_flight());
    assert_eq!(s.state(), &before);
}

#[test]
fn state_loaded_under_a_changed_schema_is_brought_in_line() {
    let mut schema = Schema::new(UnknownPolicy::Reject);
    let spec = PropertySpec::new(PropertyType::Boolean, None, None, Some(json!(true))).unwrap();
    schema.declare("fan", spec).unwrap();
    let loaded = RuntimeState {
        desired_version: Some(3),
        properties: props(json!({"telemetryInterval": 0, "colour": "red"})),
        reported_version: None,
    };
    let s = TwinSync::new(schema, AckStyle::Pnp, loaded);
    assert_eq!(
        s.state().properties,
        props(json!({"telemetryInterval": 60, "fan": true}))
    );
}

#[test]
fn reported_confirmation_records_the_version() {
    let mut s = sync();
    assert!(s.reported_confirmed(3));
    assert!(!s.reported_confirmed(3));
    assert_eq!(s.state().reported_version, Some(3));
}

#[test]
fn a_twin_whose_reported_version_went_back_is_a_new_twin_even_at_the_same_desired_version() {
    let mut s = synced(json!({"telemetryInterval": 122, "$version": 3}));
    s.reported_confirmed(7);
    // The module was deleted and created again: desired reached $version 3 anew with
    // another value, and the new twin's reported section has none of our acks.
    let out = s.get_response(
        br#"{"desired": {"telemetryInterval": 45, "$version": 3}, "reported": {"$version": 1}}"#,
    );
    assert_eq!(dispositions(&out), [Disposition::FullTwin]);
    assert_eq!(s.telemetry_interval().as_secs(), 45);
    assert_eq!(s.state().reported_version, Some(1));
    assert_eq!(
        out.reported["telemetryInterval"],
        json!({"value": 45, "ac": 200, "av": 3, "ad": "applied"})
    );
}

#[test]
fn a_twin_whose_reported_version_moved_on_at_the_same_desired_version_is_up_to_date() {
    let mut s = synced(json!({"telemetryInterval": 122, "$version": 3}));
    s.reported_confirmed(7);
    let out = s.get_response(
        br#"{"desired": {"telemetryInterval": 122, "$version": 3}, "reported": {"$version": 8}}"#,
    );
    assert_eq!(dispositions(&out), [Disposition::UpToDate]);
    assert!(out.reported.is_empty());
}

#[test]
fn events_lost_during_a_get_wait_for_its_answer_then_ask_once_more() {
    let mut s = synced(json!({"$version": 2}));
    s.get_started();
    let queued = patch(&mut s, json!({"site": "a", "$version": 3}));
    assert_eq!(dispositions(&queued), [Disposition::Queued]);
    let out = s.events_lost();
    assert!(!out.need_full_get, "no second GET while one is in flight");
    assert!(s.get_in_flight());
    let out = s.get_response(br#"{"desired": {"$version": 2}, "reported": {"$version": 1}}"#);
    assert_eq!(
        dispositions(&out),
        [Disposition::UpToDate, Disposition::Applied],
        "the patch queued before the loss is kept"
    );
    assert!(out.need_full_get, "the answer may predate a lost patch");
}

#[test]
fn events_lost_with_no_get_in_flight_ask_for_one() {
    let mut s = synced(json!({"$version": 2}));
    let out = s.events_lost();
    assert!(out.need_full_get);
    assert!(out.handled.is_empty() && !out.changed);
}
