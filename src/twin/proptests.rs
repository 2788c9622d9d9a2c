//! Properties of the twin core over generated twins and patches.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

/// Keys drawn from a small set so patches overlap, delete and re-add each other.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c", "telemetryInterval"]).prop_map(str::to_owned)
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        "[a-z]{0,4}".prop_map(Value::from),
    ]
}

/// Patch member values: scalars, nulls and nested objects (which may hold nulls).
fn member() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![scalar(), Just(Value::Null)];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop::collection::btree_map(key(), inner, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    })
}

/// Top-level patch bodies whose `telemetryInterval` is always acceptable, so no value is
/// refused and "previous good value" never diverges between the two routes.
fn valid_body() -> impl Strategy<Value = Map<String, Value>> {
    let interval = prop_oneof![(1i64..=86_400).prop_map(Value::from), Just(Value::Null)];
    (
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned),
            member(),
            0..4,
        ),
        prop::option::of(interval),
    )
        .prop_map(|(m, interval)| {
            let mut body: Map<String, Value> = m.into_iter().collect();
            if let Some(interval) = interval {
                body.insert("telemetryInterval".into(), interval);
            }
            body
        })
}

/// Independent reference of RFC 7386, deliberately not `merge::merge_patch`.
fn reference_merge(target: Option<&Value>, patch: &Value) -> Option<Value> {
    match patch {
        Value::Null => None,
        Value::Object(p) => {
            let mut out = match target {
                Some(Value::Object(t)) => t.clone(),
                _ => Map::new(),
            };
            for (k, v) in p {
                match reference_merge(out.get(k), v) {
                    Some(v) => out.insert(k.clone(), v),
                    None => out.remove(k),
                };
            }
            Some(Value::Object(out))
        }
        other => Some(other.clone()),
    }
}

fn with_version(body: &Map<String, Value>, version: u64) -> Value {
    let mut doc = body.clone();
    doc.insert("$version".into(), json!(version));
    Value::Object(doc)
}

fn fresh() -> TwinSync {
    let schema = Schema::default();
    TwinSync::new(
        schema.clone(),
        AckStyle::Pnp,
        RuntimeState::from_defaults(&schema),
    )
}

proptest! {
    #[test]
    fn patches_in_order_equal_full_twin_of_merged_desired(
        initial in valid_body(),
        patches in prop::collection::vec(valid_body(), 0..8),
    ) {
        let mut by_patches = fresh();
        by_patches.full_twin(&with_version(&initial, 1));
        let mut merged = reference_merge(None, &Value::Object(initial)).unwrap();
        for (i, body) in patches.iter().enumerate() {
            let version = i as u64 + 2;
            let out = by_patches.patch(Some(version), with_version(body, version).to_string().as_bytes());
            prop_assert!(!out.need_full_get);
            merged = reference_merge(Some(&merged), &Value::Object(body.clone())).unwrap();
        }
        let last = patches.len() as u64 + 1;
        let mut by_full = fresh();
        by_full.full_twin(&with_version(merged.as_object().unwrap(), last));
        prop_assert_eq!(by_patches.state(), by_full.state());
    }

    #[test]
    fn apply_never_panics_and_declared_values_stay_valid(
        docs in prop::collection::vec((prop::option::of(0u64..6), member()), 0..10),
        raw in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut s = fresh();
        s.patch(None, &raw);
        s.get_response(&raw);
        for (i, (version, doc)) in docs.iter().enumerate() {
            match i % 4 {
                0 => { s.full_twin(doc); }
                1 => s.get_started(),
                _ => {}
            }
            s.patch(*version, doc.to_string().as_bytes());
            let interval = s.state().properties.get(TELEMETRY_INTERVAL);
            prop_assert!(interval.is_some());
            prop_assert!(s.schema().validate(TELEMETRY_INTERVAL, interval.unwrap()).is_ok());
        }
    }

    #[test]
    fn coalesced_patch_equals_patches_in_sequence(
        patches in prop::collection::vec(
            prop::collection::btree_map(key(), member(), 0..4), 0..6),
    ) {
        let mut sequence: Option<Value> = Some(json!({}));
        let mut coalescer = ReportedCoalescer::new(100);
        for p in &patches {
            let p: Map<String, Value> = p.clone().into_iter().collect();
            sequence = reference_merge(sequence.as_ref(), &Value::Object(p.clone()));
            coalescer.push(p);
        }
        let once = coalescer
            .take()
            .map(|p| reference_merge(Some(&json!({})), &Value::Object(p)))
            .unwrap_or(Some(json!({})));
        prop_assert_eq!(once, sequence);
    }
}
