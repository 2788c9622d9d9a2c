//! Automatic module configurations (PROTOCOL §14.3): `PUT/GET/DELETE /configurations/{id}`,
//! `GET /configurations?top=n` and `POST /configurations/testQueries`, with the hub's
//! validation and error codes (MicrosoftDocs troubleshoot-error-codes: 400401
//! InvalidConfigurationTargetCondition, 400402 InvalidConfigurationContent, 400403
//! CannotModifyImmutableConfigurationContent, 400404 InvalidConfigurationCustomMetricsQuery,
//! 404301 ConfigurationNotFound, 409401 ConfigurationAlreadyExists, 413101
//! ConfigurationCountLimitExceeded).
//!
//! Only `moduleContent` (desired properties of module twins) is emulated. Content is
//! immutable once created; target condition, priority, labels and metric queries may be
//! updated with `If-Match`. Applying configurations to twins is [`evaluate`].

pub mod evaluate;

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::errors::HubError;
use super::hub::{identity_etag, if_match_allows, now_ts, Hub};
use super::persist::ConfigurationRecord;
use super::query::{self, Query};
use super::twin_doc::check_patch;

pub use evaluate::Evaluation;

/// Automatic configurations a standard hub holds.
pub const MAX_CONFIGURATIONS: usize = 100;
/// Custom metric queries per configuration.
pub const MAX_CUSTOM_METRICS: usize = 5;
/// What a module configuration's target condition must start with (compared ignoring
/// case and spacing), as the hub and the az CLI require.
pub const MODULE_TARGET_PREFIX: &str = "from devices.modules where";
/// The prefix of content keys: the desired properties of the twin.
const DESIRED: &str = "properties.desired";

fn not_found(id: &str) -> HubError {
    HubError::new(
        404,
        404301,
        "ConfigurationNotFound",
        format!("Configuration {id} not found"),
    )
}

fn invalid_target(message: impl Into<String>) -> HubError {
    HubError::new(400, 400401, "InvalidConfigurationTargetCondition", message)
}

fn invalid_content(message: impl Into<String>) -> HubError {
    HubError::new(400, 400402, "InvalidConfigurationContent", message)
}

fn invalid_metric(message: impl Into<String>) -> HubError {
    HubError::new(
        400,
        400404,
        "InvalidConfigurationCustomMetricsQuery",
        message,
    )
}

/// Configuration ids: 1..=128 characters, lowercase, no spaces and none of `&^[]{}\|"<>/`.
pub fn valid_configuration_id(id: &str) -> bool {
    !id.is_empty()
        && id.chars().count() <= 128
        && id.chars().all(|c| {
            c.is_ascii_graphic() && !c.is_ascii_uppercase() && !"&^[]{}\\|\"<>/".contains(c)
        })
}

/// The target condition as a query over module twins; `""` targets nothing.
pub fn target_query(condition: &str) -> Result<Option<Query>, HubError> {
    let trimmed = condition.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let normalised = trimmed
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    if !normalised.starts_with(MODULE_TARGET_PREFIX) {
        return Err(invalid_target(format!(
            "The target condition for a module configuration must start with \
             '{MODULE_TARGET_PREFIX}': '{trimmed}'"
        )));
    }
    const SELECT: &str = "SELECT * ";
    query::parse(&format!("{SELECT}{trimmed}"))
        .map(Some)
        .map_err(|e| {
            invalid_target(format!(
                "Invalid target condition: syntax error at position {}: {}",
                e.position.saturating_sub(SELECT.len()).max(1),
                e.message
            ))
        })
}

/// `content.moduleContent`, checked: keys `properties.desired[.path]`, values a valid
/// desired patch.
fn module_content(body: &Value) -> Result<Map<String, Value>, HubError> {
    let content = body
        .get("content")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid_content("content is required"))?;
    for kind in ["deviceContent", "modulesContent"] {
        if content
            .get(kind)
            .is_some_and(|c| c.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(invalid_content(format!(
                "{kind} is not emulated; only moduleContent (module twin desired properties) is"
            )));
        }
    }
    let module = content
        .get("moduleContent")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid_content("content.moduleContent must be a non-empty object"))?;
    for (key, value) in module {
        let patch = desired_patch(key, value)?;
        check_patch(&patch, "desired").map_err(|e| invalid_content(e.message))?;
    }
    Ok(module.clone())
}

/// The desired patch one content entry stands for: `properties.desired.a.b: v` →
/// `{"a": {"b": v}}`; `properties.desired: {...}` → the object itself.
pub(crate) fn desired_patch(key: &str, value: &Value) -> Result<Map<String, Value>, HubError> {
    let path = content_path(key)?;
    if path.is_empty() {
        return value
            .as_object()
            .cloned()
            .ok_or_else(|| invalid_content(format!("the value of '{DESIRED}' must be an object")));
    }
    let mut v = value.clone();
    for seg in path.iter().skip(1).rev() {
        v = json!({ *seg: v });
    }
    let mut patch = Map::new();
    patch.insert(path[0].to_string(), v);
    Ok(patch)
}

/// The path below `properties.desired` a content key names (empty: the whole section).
pub(crate) fn content_path(key: &str) -> Result<Vec<&str>, HubError> {
    let rest = key.strip_prefix(DESIRED).ok_or_else(|| {
        invalid_content(format!(
            "content key '{key}' must be '{DESIRED}' or start with '{DESIRED}.'"
        ))
    })?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let path: Vec<&str> = rest
        .strip_prefix('.')
        .ok_or_else(|| {
            invalid_content(format!("content key '{key}' must start with '{DESIRED}.'"))
        })?
        .split('.')
        .collect();
    if path.iter().any(|s| s.is_empty() || s.starts_with('$')) {
        return Err(invalid_content(format!(
            "content key '{key}' is not a property path"
        )));
    }
    Ok(path)
}

fn string_map(body: &Value, field: &str) -> Result<BTreeMap<String, String>, HubError> {
    match field.split('.').try_fold(body, |v, f| v.get(f)) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(HubError::argument_invalid(format!(
                    "{field}.{k} must be a string"
                ))),
            })
            .collect(),
        Some(_) => Err(HubError::argument_invalid(format!(
            "{field} must be an object"
        ))),
    }
}

/// Custom metric queries: at most five, each a valid query.
fn metric_queries(body: &Value) -> Result<BTreeMap<String, String>, HubError> {
    let queries = string_map(body, "metrics.queries").map_err(|e| invalid_metric(e.message))?;
    if queries.len() > MAX_CUSTOM_METRICS {
        return Err(invalid_metric(format!(
            "{} custom metrics; a configuration may have at most {MAX_CUSTOM_METRICS}",
            queries.len()
        )));
    }
    for (name, text) in &queries {
        query::parse(text)
            .map_err(|e| invalid_metric(format!("Invalid query in metric '{name}': {e}")))?;
    }
    Ok(queries)
}

fn priority(body: &Value) -> Result<i64, HubError> {
    match body.get("priority") {
        None | Some(Value::Null) => Ok(0),
        Some(p) => p
            .as_i64()
            .filter(|p| (0..=i64::from(i32::MAX)).contains(p))
            .ok_or_else(|| HubError::argument_invalid("priority must be a whole number >= 0")),
    }
}

/// The system metric queries the hub reports for a configuration.
fn system_queries(id: &str, r: &ConfigurationRecord) -> Value {
    let condition = r.target_condition.trim();
    json!({
        "targetedCount": if condition.is_empty() {
            String::new()
        } else {
            format!("SELECT deviceId, moduleId {condition}")
        },
        "appliedCount": format!(
            "SELECT deviceId, moduleId FROM devices.modules WHERE configurations.[[{id}]].status = 'Applied'"
        ),
    })
}

/// The configuration document the hub answers (swagger `Configuration`).
pub fn configuration_doc(id: &str, r: &ConfigurationRecord) -> Value {
    json!({
        "id": id,
        "schemaVersion": r.schema_version,
        "labels": r.labels,
        "content": {"moduleContent": r.module_content},
        "targetCondition": r.target_condition,
        "createdTimeUtc": r.created,
        "lastUpdatedTimeUtc": r.last_updated,
        "priority": r.priority,
        "systemMetrics": {"results": r.system_results, "queries": system_queries(id, r)},
        "metrics": {"results": r.metric_results, "queries": r.metric_queries},
        "etag": identity_etag(r.etag_seq),
    })
}

impl Hub {
    /// `PUT /configurations/{id}`: create (no `If-Match`), or update what may change
    /// (with `If-Match`). Returns the document; a change is evaluated at once.
    pub fn put_configuration(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, HubError> {
        if !valid_configuration_id(id) {
            return Err(HubError::argument_invalid(format!(
                "'{id}' is not a valid configuration id: up to 128 lowercase letters, digits \
                 and punctuation other than & ^ [ ] {{ }} \\ | \" < > /"
            )));
        }
        if body
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|b| b != id)
        {
            return Err(HubError::argument_invalid(
                "id in the body differs from the path",
            ));
        }
        // Content first: a device or edge configuration is refused for what it is.
        let content_given = body.get("content").is_some_and(|c| !c.is_null());
        let content = content_given.then(|| module_content(body)).transpose()?;
        let target_condition = body
            .get("targetCondition")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        target_query(&target_condition)?;
        let metric_queries = metric_queries(body)?;
        let labels = string_map(body, "labels")?;
        let priority = priority(body)?;
        let now = now_ts();
        let mut st = self.state();
        let count = st.data.configurations.len();
        let next_seq = st
            .data
            .configurations
            .values()
            .map(|c| c.created_seq)
            .max()
            .unwrap_or(0)
            + 1;
        match st.data.configurations.get_mut(id) {
            Some(_) if if_match.is_none() => {
                return Err(HubError::new(
                    409,
                    409401,
                    "ConfigurationAlreadyExists",
                    format!("Configuration {id} already exists; its content cannot be changed, create a new configuration (for example with a higher priority)"),
                ))
            }
            Some(existing) => {
                if !if_match_allows(if_match, &identity_etag(existing.etag_seq)) {
                    return Err(HubError::precondition_failed(format!(
                        "configuration etag is {}; If-Match did not match",
                        identity_etag(existing.etag_seq)
                    )));
                }
                if content.as_ref().is_some_and(|c| *c != existing.module_content) {
                    return Err(HubError::new(
                        400,
                        400403,
                        "CannotModifyImmutableConfigurationContent",
                        format!("The content of configuration {id} cannot be changed; create a new configuration (for example with a higher priority)"),
                    ));
                }
                existing.target_condition = target_condition;
                existing.priority = priority;
                existing.labels = labels;
                existing.metric_queries = metric_queries;
                existing.metric_results.retain(|k, _| existing.metric_queries.contains_key(k));
                existing.last_updated = now;
                existing.etag_seq += 1;
            }
            None if count >= MAX_CONFIGURATIONS => {
                return Err(HubError::new(
                    413,
                    413101,
                    "ConfigurationCountLimitExceeded",
                    format!("The hub already has {MAX_CONFIGURATIONS} configurations, its limit"),
                ))
            }
            None => {
                let record = ConfigurationRecord {
                    schema_version: body
                        .get("schemaVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("1.0")
                        .to_string(),
                    labels,
                    module_content: match content {
                        Some(c) => c,
                        None => module_content(body)?,
                    },
                    target_condition,
                    priority,
                    metric_queries,
                    metric_results: BTreeMap::new(),
                    system_results: BTreeMap::new(),
                    created: now.clone(),
                    last_updated: now,
                    created_seq: next_seq,
                    etag_seq: 1,
                };
                st.data.configurations.insert(id.to_string(), record);
            }
        }
        let pending = self.snapshot(&st);
        drop(st);
        self.commit(pending)?;
        // "Run for the first time shortly after the configuration is created": now.
        self.evaluate_configurations()?;
        self.get_configuration(id)
    }

    pub fn get_configuration(&self, id: &str) -> Result<Value, HubError> {
        let st = self.state();
        let r = st
            .data
            .configurations
            .get(id)
            .ok_or_else(|| not_found(id))?;
        Ok(configuration_doc(id, r))
    }

    /// `GET /configurations?top=n`: up to `top` configurations (all when None), by id.
    pub fn list_configurations(&self, top: Option<usize>) -> Value {
        let st = self.state();
        Value::Array(
            st.data
                .configurations
                .iter()
                .take(top.unwrap_or(usize::MAX))
                .map(|(id, r)| configuration_doc(id, r))
                .collect(),
        )
    }

    /// `DELETE /configurations/{id}`. The twins keep the desired values it set, as on the
    /// hub; their `configurations.{id}` entries go at the next evaluation.
    pub fn delete_configuration(&self, id: &str, if_match: Option<&str>) -> Result<(), HubError> {
        let mut st = self.state();
        let r = st
            .data
            .configurations
            .get(id)
            .ok_or_else(|| not_found(id))?;
        if !if_match_allows(if_match, &identity_etag(r.etag_seq)) {
            return Err(HubError::precondition_failed(
                "configuration etag does not match",
            ));
        }
        st.data.configurations.remove(id);
        let pending = self.snapshot(&st);
        drop(st);
        self.commit(pending)
    }

    /// `POST /configurations/testQueries`: `{"targetCondition", "customMetricQueries"}` →
    /// `{"targetConditionError", "customMetricQueryErrors"}` (empty strings when valid).
    pub fn test_configuration_queries(&self, body: &Value) -> Value {
        let target = body
            .get("targetCondition")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let target_error = target_query(target).err().map(|e| e.message);
        let metric_errors: Map<String, Value> = body
            .get("customMetricQueries")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(name, q)| {
                        let text = q.as_str().unwrap_or_default();
                        query::parse(text)
                            .err()
                            .map(|e| (name.clone(), Value::String(e.to_string())))
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "targetConditionError": target_error.unwrap_or_default(),
            "customMetricQueryErrors": metric_errors,
        })
    }
}

#[cfg(test)]
mod tests;
