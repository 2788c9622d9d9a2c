//! JSON merge-patch arithmetic (RFC 7386), the algebra both twin sections follow:
//! `null` deletes, objects merge, anything else replaces.
//!
//! Used by [`super::apply`] to fold desired patches into values in force and by
//! [`super::ack`] to build and coalesce reported patches. Pure functions on
//! `serde_json::Value`; must never know about versions or acks.

use serde_json::{Map, Value};

/// Applies `patch` to `target` as the hub applies a twin patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The value a patch member denotes on its own: nulls inside objects dropped.
pub fn strip_nulls(value: &Value) -> Value {
    let mut out = Value::Null;
    merge_patch(&mut out, value);
    out
}

/// Folds `later` into `earlier` so that one patch has the effect of both in sequence.
///
/// Exact whenever the two agree on object-ness at each key. When `earlier` set a key to
/// a scalar (or null) and `later` sets it to an object, the result merges into whatever
/// object the receiver still holds there: a merge patch cannot say "replace".
pub fn compose(earlier: &mut Map<String, Value>, later: Map<String, Value>) {
    for (key, value) in later {
        match (earlier.get_mut(&key), value) {
            (Some(Value::Object(old)), Value::Object(new)) => compose(old, new),
            (_, value) => {
                earlier.insert(key, value);
            }
        }
    }
}

/// A patch that turns `old` into `new` when merged onto it: keys that disappeared
/// inside objects become `null`, so a receiver holding `old` ends up with exactly `new`.
pub fn replacement(old: Option<&Value>, new: &Value) -> Value {
    match (old, new) {
        (Some(Value::Object(old)), Value::Object(new)) => {
            let mut patch = Map::new();
            for key in old.keys() {
                if !new.contains_key(key) {
                    patch.insert(key.clone(), Value::Null);
                }
            }
            for (key, value) in new {
                patch.insert(key.clone(), replacement(old.get(key), value));
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

/// Nesting depth below the desired root: `{"a":1}` is 1, `{"a":{"b":1}}` is 2.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| !k.starts_with('$'))
            .map(|(_, v)| 1 + nested_depth(v))
            .max()
            .unwrap_or(0),
        _ => 0,
    }
}

fn nested_depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(nested_depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(nested_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Size as the hub counts it against the 32 KB desired limit (PROTOCOL §4.6): keys and
/// strings by UTF-8 length, numbers 8 bytes, booleans 4; `$version`/`$metadata` excluded.
/// Counting JSON text instead would refuse twins the hub accepted, and loop on resync.
pub fn twin_size(value: &Value) -> usize {
    match value {
        Value::Null => 0,
        Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(twin_size).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| !k.starts_with('$'))
            .map(|(k, v)| k.len() + twin_size(v))
            .sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn null_deletes_and_objects_merge() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut doc, &json!({"a": {"b": null, "e": 4}, "d": null}));
        assert_eq!(doc, json!({"a": {"c": 2, "e": 4}}));
    }

    #[test]
    fn replacement_nulls_keys_that_disappeared() {
        let old = json!({"a": 1, "b": {"c": 1, "d": 2}});
        let new = json!({"b": {"c": 1}});
        let patch = replacement(Some(&old), &new);
        assert_eq!(patch, json!({"a": null, "b": {"d": null, "c": 1}}));
        let mut doc = old.clone();
        merge_patch(&mut doc, &patch);
        assert_eq!(doc, new);
    }

    #[test]
    fn compose_equals_sequence_when_shapes_agree() {
        let p1 = json!({"a": {"x": 1, "y": 2}, "b": 1});
        let p2 = json!({"a": {"y": null}, "c": 3});
        let mut seq = json!({"a": {"z": 0}});
        merge_patch(&mut seq, &p1);
        merge_patch(&mut seq, &p2);
        let mut composed = p1.as_object().cloned().unwrap();
        compose(&mut composed, p2.as_object().cloned().unwrap());
        let mut once = json!({"a": {"z": 0}});
        merge_patch(&mut once, &Value::Object(composed));
        assert_eq!(once, seq);
    }

    #[test]
    fn depth_counts_levels_below_the_root() {
        assert_eq!(depth(&json!({})), 0);
        assert_eq!(depth(&json!({"a": 1, "$version": 3})), 1);
        assert_eq!(depth(&json!({"a": {"b": {"c": 1}}})), 3);
        assert_eq!(depth(&json!({"a": [[1]]})), 3);
    }

    #[test]
    fn twin_size_follows_hub_accounting() {
        assert_eq!(
            twin_size(&json!({"ab": "xyz", "n": 1, "t": true, "$version": 9})),
            2 + 3 + 1 + 8 + 1 + 4
        );
    }
}
