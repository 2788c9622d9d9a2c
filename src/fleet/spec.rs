//! A rollout as IoT Hub stores it (PROTOCOL §14.3): from NAME, the module, the target's
//! WHERE clause, a priority and the settings, the module configuration body — content
//! `moduleContent` setting `properties.desired.k`, target `FROM devices.modules WHERE
//! moduleId = 'M' AND (WHERE)`, and the custom metrics `applied` and `rejected` that count
//! from the modules' own acknowledgements (PROTOCOL §4.7, written by `crate::twin::ack`).
//! Pure: no I/O; every refusal is a [`SpecError`] naming what is wrong.

use serde_json::{json, Map, Value};

/// Metric name: twins that acknowledged every setting with `ac` 200 at the configured value.
pub const APPLIED: &str = "applied";
/// Metric name: twins that refused a setting (`ac` ≥ 400).
pub const REJECTED: &str = "rejected";
/// Label marking configurations made by `edgetwin fleet apply`.
pub const CREATED_BY: (&str, &str) = ("createdBy", "edgetwin");
/// Priority of a first rollout of its settings (the value IoT Hub's own examples use).
pub const FIRST_PRIORITY: i64 = 10;
/// IoT Hub's limit on a query's (and so a target condition's) length.
const MAX_QUERY: usize = 8192;
/// IoT Hub's limit on a configuration id.
const MAX_NAME: usize = 128;

/// Why a rollout cannot be built; the CLI exits 64 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "configuration name `{0}`: use 1 to 128 lowercase letters, digits or -:+%_#*?!(),=@;$"
    )]
    Name(String),
    #[error("module id `{0}` is not usable in a target condition")]
    Module(String),
    #[error("--target is empty: give the WHERE clause that picks the gateways (e.g. tags.site = 'north')")]
    EmptyTarget,
    #[error("the target condition is longer than IoT Hub's {MAX_QUERY} characters")]
    TargetTooLong,
    #[error("nothing to roll out: give KEY=VALUE arguments")]
    NoSettings,
    #[error("setting `{key}`: {why}")]
    Setting { key: String, why: String },
}

/// What `fleet apply` was asked to create.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub name: String,
    pub module: String,
    /// The WHERE clause as given, without `FROM devices.modules WHERE`.
    pub target: String,
    pub priority: i64,
    pub settings: Map<String, Value>,
}

impl RolloutSpec {
    /// Checks every part; `target` may be a bare WHERE clause, or start with `WHERE` or
    /// with `FROM devices.modules WHERE` (then the prefix is dropped).
    pub fn new(
        name: &str,
        module: &str,
        target: &str,
        priority: i64,
        settings: Map<String, Value>,
    ) -> Result<Self, SpecError> {
        check_name(name)?;
        if module.is_empty() || module.contains(['\'', '"', '\\']) {
            return Err(SpecError::Module(module.to_owned()));
        }
        let target = strip_prefix_ci(target.trim(), "from devices.modules")
            .map(str::trim_start)
            .unwrap_or(target.trim());
        let target = strip_prefix_ci(target, "where").unwrap_or(target).trim();
        if target.is_empty() {
            return Err(SpecError::EmptyTarget);
        }
        if settings.is_empty() {
            return Err(SpecError::NoSettings);
        }
        for (key, value) in &settings {
            check_setting(key, value)?;
        }
        let spec = RolloutSpec {
            name: name.to_owned(),
            module: module.to_owned(),
            target: target.to_owned(),
            priority,
            settings,
        };
        if spec.target_condition().len() > MAX_QUERY {
            return Err(SpecError::TargetTooLong);
        }
        Ok(spec)
    }

    /// `FROM devices.modules WHERE moduleId = 'M' AND (WHERE)`.
    pub fn target_condition(&self) -> String {
        format!(
            "FROM devices.modules WHERE moduleId = {} AND ({})",
            literal_str(&self.module),
            self.target
        )
    }

    /// The configuration body for `PUT /configurations/{name}`.
    pub fn body(&self) -> Value {
        let content: Map<String, Value> = self
            .settings
            .iter()
            .map(|(k, v)| (format!("properties.desired.{k}"), v.clone()))
            .collect();
        json!({
            "id": self.name,
            "schemaVersion": "2.0",
            "labels": { CREATED_BY.0: CREATED_BY.1 },
            "content": { "moduleContent": content },
            "targetCondition": self.target_condition(),
            "priority": self.priority,
            "metrics": { "queries": {
                APPLIED: self.applied_query(),
                REJECTED: self.rejected_query(),
            }},
        })
    }

    /// Twins whose configuration status is Applied and whose every setting is
    /// acknowledged with `ac` 200 at the configured value.
    pub fn applied_query(&self) -> String {
        let mut conditions = vec![self.applied_status()];
        for (key, value) in &self.settings {
            conditions.push(format!("properties.reported.{key}.ac = 200"));
            leaf_conditions(
                &format!("properties.reported.{key}.value"),
                value,
                &mut conditions,
            );
        }
        format!(
            "SELECT deviceId, moduleId FROM devices.modules WHERE {}",
            conditions.join(" AND ")
        )
    }

    /// Twins whose configuration status is Applied and that refused a setting.
    pub fn rejected_query(&self) -> String {
        let refusals: Vec<String> = self
            .settings
            .keys()
            .map(|key| format!("properties.reported.{key}.ac >= 400"))
            .collect();
        format!(
            "SELECT deviceId, moduleId FROM devices.modules WHERE {} AND ({})",
            self.applied_status(),
            refusals.join(" OR ")
        )
    }

    fn applied_status(&self) -> String {
        format!("configurations.[[{}]].status = 'Applied'", self.name)
    }
}

/// The priority a new rollout of `settings` for `module` needs to win over the existing
/// configurations that set any of the same properties: one above the highest of them, or
/// [`FIRST_PRIORITY`] when none does.
pub fn next_priority(existing: &[Value], module: &str, settings: &Map<String, Value>) -> i64 {
    existing
        .iter()
        .filter(|c| targets_module(c, module))
        .filter(|c| {
            c.pointer("/content/moduleContent")
                .and_then(Value::as_object)
                .is_some_and(|content| {
                    content.keys().any(|path| {
                        path.strip_prefix("properties.desired.")
                            .is_some_and(|k| settings.contains_key(k))
                    })
                })
        })
        .filter_map(|c| c.get("priority").and_then(Value::as_i64))
        .max()
        .map_or(FIRST_PRIORITY, |p| p.saturating_add(1).max(FIRST_PRIORITY))
}

/// Whether a configuration's target condition names `module` (or no module at all).
fn targets_module(configuration: &Value, module: &str) -> bool {
    let condition = configuration
        .get("targetCondition")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let named = |q: char| format!("moduleid = {q}{}{q}", module.to_ascii_lowercase());
    !condition.contains("moduleid")
        || condition.contains(&named('\''))
        || condition.contains(&named('"'))
}

/// A query literal for a string: single quotes, or double ones when the text holds a
/// single quote. `None` when it holds both (the query language has no escape for that).
pub fn string_literal(text: &str) -> Option<String> {
    if text.contains('\\') {
        None
    } else if !text.contains('\'') {
        Some(format!("'{text}'"))
    } else if !text.contains('"') {
        Some(format!("\"{text}\""))
    } else {
        None
    }
}

fn literal_str(text: &str) -> String {
    string_literal(text).unwrap_or_else(|| format!("'{text}'"))
}

/// `path = literal` for each primitive leaf of `value` (objects are compared leaf by
/// leaf: the query language compares primitives only).
fn leaf_conditions(path: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                leaf_conditions(&format!("{path}.{k}"), v, out);
            }
        }
        Value::String(s) => out.push(format!("{path} = {}", literal_str(s))),
        other => out.push(format!("{path} = {other}")),
    }
}

fn check_name(name: &str) -> Result<(), SpecError> {
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-:+%_#*?!(),=@;$".contains(c);
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(allowed) {
        return Err(SpecError::Name(name.to_owned()));
    }
    Ok(())
}

/// A setting must be countable by the metrics queries: its name (and nested names) a
/// plain identifier, its value neither null, an array, nor a string the query language
/// cannot quote.
fn check_setting(key: &str, value: &Value) -> Result<(), SpecError> {
    let bad = |why: &str| SpecError::Setting {
        key: key.to_owned(),
        why: why.to_owned(),
    };
    if !is_identifier(key) {
        return Err(bad(
            "a fleet setting's name must be a plain identifier (letters, digits, `_`), so its \
             acknowledgements can be queried",
        ));
    }
    match value {
        Value::Null => Err(bad(
            "a configuration cannot delete a property: remove the configuration that set it \
             (`edgetwin fleet remove`) instead",
        )),
        Value::Array(_) => Err(bad("arrays cannot be set in a twin")),
        Value::String(s) if string_literal(s).is_none() => Err(bad(
            "a string holding both quote characters or a backslash cannot be compared in a query",
        )),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_setting(k, v).map_err(|e| match e {
                SpecError::Setting { key: inner, why } => SpecError::Setting {
                    key: format!("{key}.{inner}"),
                    why,
                },
                other => other,
            })
        }),
        _ => Ok(()),
    }
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    let rest = &text[prefix.len()..];
    (head.eq_ignore_ascii_case(prefix)
        && (rest.is_empty() || rest.starts_with(char::is_whitespace)))
    .then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn spec(target: &str, v: Value) -> Result<RolloutSpec, SpecError> {
        RolloutSpec::new("interval-30", "edgetwin", target, 10, settings(v))
    }

    #[test]
    fn body_sets_desired_targets_the_module_and_counts_acks() {
        let s = spec("tags.site = 'north'", json!({"telemetryInterval": 30})).unwrap();
        assert_eq!(
            s.body(),
            json!({
                "id": "interval-30",
                "schemaVersion": "2.0",
                "labels": {"createdBy": "edgetwin"},
                "content": {"moduleContent": {"properties.desired.telemetryInterval": 30}},
                "targetCondition":
                    "FROM devices.modules WHERE moduleId = 'edgetwin' AND (tags.site = 'north')",
                "priority": 10,
                "metrics": {"queries": {
                    "applied": "SELECT deviceId, moduleId FROM devices.modules WHERE \
                        configurations.[[interval-30]].status = 'Applied' AND \
                        properties.reported.telemetryInterval.ac = 200 AND \
                        properties.reported.telemetryInterval.value = 30",
                    "rejected": "SELECT deviceId, moduleId FROM devices.modules WHERE \
                        configurations.[[interval-30]].status = 'Applied' AND \
                        (properties.reported.telemetryInterval.ac >= 400)"
                }}
            })
        );
    }

    #[test]
    fn target_may_carry_where_or_the_whole_from_clause() {
        for given in [
            "tags.site = 'a'",
            "WHERE tags.site = 'a'",
            "from devices.modules where tags.site = 'a'",
            "  FROM devices.modules WHERE   tags.site = 'a' ",
        ] {
            assert_eq!(
                spec(given, json!({"t": 1})).unwrap().target,
                "tags.site = 'a'"
            );
        }
        assert_eq!(
            spec("  where ", json!({"t": 1})),
            Err(SpecError::EmptyTarget)
        );
        // A clause that merely starts with the letters is kept.
        assert_eq!(
            spec("whereabouts = 1", json!({"t": 1})).unwrap().target,
            "whereabouts = 1"
        );
    }

    #[test]
    fn several_and_nested_settings_are_each_counted() {
        let s = spec("true", json!({"a": "x'y", "b": {"c": true, "d": 1.5}})).unwrap();
        let applied = s.applied_query();
        for part in [
            "properties.reported.a.ac = 200",
            "properties.reported.a.value = \"x'y\"",
            "properties.reported.b.value.c = true",
            "properties.reported.b.value.d = 1.5",
        ] {
            assert!(applied.contains(part), "{applied}");
        }
        assert!(s
            .rejected_query()
            .ends_with("(properties.reported.a.ac >= 400 OR properties.reported.b.ac >= 400)"));
    }

    #[test]
    fn settings_that_cannot_be_rolled_out_are_refused_by_name() {
        for (v, key) in [
            (json!({"gone": null}), "gone"),
            (json!({"list": [1]}), "list"),
            (json!({"a-b": 1}), "a-b"),
            (json!({"o": {"in ner": 1}}), "o.in ner"),
            (json!({"q": "it's \"x\""}), "q"),
        ] {
            match spec("true", v) {
                Err(SpecError::Setting { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert_eq!(spec("true", json!({})), Err(SpecError::NoSettings));
    }

    #[test]
    fn names_follow_iot_hub_configuration_ids() {
        for bad in ["", "Upper", "has space", "a/b", &"x".repeat(129)] {
            assert!(
                matches!(
                    RolloutSpec::new(bad, "m", "true", 1, settings(json!({"t": 1}))),
                    Err(SpecError::Name(_))
                ),
                "{bad}"
            );
        }
        assert!(
            RolloutSpec::new("rollout-2:b_c", "m", "true", 1, settings(json!({"t": 1}))).is_ok()
        );
    }

    #[test]
    fn next_priority_beats_configurations_of_the_same_settings_for_the_module() {
        let config = |module: &str, key: &str, priority: i64| {
            json!({"targetCondition": format!("FROM devices.modules WHERE moduleId = '{module}' AND (true)"),
                   "content": {"moduleContent": {format!("properties.desired.{key}"): 1}},
                   "priority": priority})
        };
        let wanted = settings(json!({"telemetryInterval": 5}));
        assert_eq!(next_priority(&[], "edgetwin", &wanted), FIRST_PRIORITY);
        let existing = [
            config("edgetwin", "telemetryInterval", 12),
            config("edgetwin", "other", 50),
            config("another", "telemetryInterval", 70),
        ];
        assert_eq!(next_priority(&existing, "edgetwin", &wanted), 13);
    }
}
