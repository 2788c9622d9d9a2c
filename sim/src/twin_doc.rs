//! The service-side module twin as the emulated hub stores it: tags, desired and reported
//! sections with their `$version`s, per-key `$metadata`, the etag, and the limits the hub
//! enforces on writes (PROTOCOL §4.5–§4.6). Pure data manipulation; no I/O.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::errors::HubError;

/// Desired and reported sections may each hold this many bytes (as the hub counts them).
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Tags may hold this many bytes.
pub const MAX_TAGS_BYTES: usize = 8 * 1024;
/// Objects may nest this deep below a section's root.
pub const MAX_DEPTH: usize = 10;
/// Keys are at most 1 KB of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// String values are at most 4 KB of UTF-8.
pub const MAX_STRING_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Section {
    pub props: Map<String, Value>,
    pub version: u64,
    /// Mirrors `props`: for each key `{"$lastUpdated": ts, ["$lastUpdatedVersion": v]}`
    /// plus, for objects, the nested keys' metadata.
    pub meta: Map<String, Value>,
    pub last_updated: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModuleTwin {
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
    /// Bumped on every change of tags or desired; the etag is derived from it.
    pub etag_seq: u64,
    /// `configurations.{id}.status` (`targeted` / `applied`), set by the evaluation of
    /// automatic configurations; not a change of the twin (no version or etag bump).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub configurations: std::collections::BTreeMap<String, String>,
}

impl ModuleTwin {
    /// A new module's twin: both sections at version 1, as on the real hub.
    pub fn new(now: &str) -> Self {
        let section = Section {
            version: 1,
            last_updated: now.to_string(),
            ..Section::default()
        };
        ModuleTwin {
            tags: Map::new(),
            desired: section.clone(),
            reported: section,
            etag_seq: 1,
            configurations: Default::default(),
        }
    }

    /// Opaque etag: base64 of the big-endian change counter, like `AAAAAAAAAAQ=`.
    pub fn etag(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.etag_seq.to_be_bytes())
    }

    /// Merges a back-end desired patch (null deletes). Returns the new desired `$version`.
    pub fn patch_desired(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
    ) -> Result<u64, HubError> {
        check_patch(patch, "desired")?;
        let mut next = self.desired.props.clone();
        merge(&mut next, patch);
        check_size(&next, MAX_SECTION_BYTES, "desired")?;
        self.desired.version += 1;
        let v = self.desired.version;
        self.desired.props = next;
        merge_meta(&mut self.desired.meta, patch, now, Some(v));
        self.desired.last_updated = now.to_string();
        self.etag_seq += 1;
        Ok(v)
    }

    /// Replaces the desired section entirely. Returns the new desired `$version`.
    pub fn replace_desired(
        &mut self,
        desired: Map<String, Value>,
        now: &str,
    ) -> Result<u64, HubError> {
        let desired: Map<String, Value> = desired
            .into_iter()
            .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
            .collect();
        check_patch(&desired, "desired")?;
        check_size(&desired, MAX_SECTION_BYTES, "desired")?;
        self.desired.version += 1;
        let v = self.desired.version;
        self.desired.meta = Map::new();
        merge_meta(&mut self.desired.meta, &desired, now, Some(v));
        self.desired.props = desired;
        self.desired.last_updated = now.to_string();
        self.etag_seq += 1;
        Ok(v)
    }

    pub fn patch_tags(&mut self, patch: &Map<String, Value>) -> Result<(), HubError> {
        check_patch(patch, "tags")?;
        let mut next = self.tags.clone();
        merge(&mut next, patch);
        check_size(&next, MAX_TAGS_BYTES, "tags")?;
        self.tags = next;
        self.etag_seq += 1;
        Ok(())
    }

    pub fn replace_tags(&mut self, tags: Map<String, Value>) -> Result<(), HubError> {
        check_patch(&tags, "tags")?;
        check_size(&tags, MAX_TAGS_BYTES, "tags")?;
        self.tags = tags.into_iter().filter(|(_, v)| !v.is_null()).collect();
        self.etag_seq += 1;
        Ok(())
    }

    /// Merges a device-side reported patch. Returns the new reported `$version`.
    pub fn patch_reported(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
    ) -> Result<u64, HubError> {
        check_patch(patch, "reported")?;
        let mut next = self.reported.props.clone();
        merge(&mut next, patch);
        check_size(&next, MAX_SECTION_BYTES, "reported")?;
        self.reported.version += 1;
        self.reported.props = next;
        merge_meta(&mut self.reported.meta, patch, now, None);
        self.reported.last_updated = now.to_string();
        Ok(self.reported.version)
    }

    /// What a device GET returns: the properties without a wrapper and without `$metadata`.
    pub fn device_view(&self) -> Value {
        let mut desired = self.desired.props.clone();
        desired.insert("$version".into(), json!(self.desired.version));
        let mut reported = self.reported.props.clone();
        reported.insert("$version".into(), json!(self.reported.version));
        json!({ "desired": desired, "reported": reported })
    }

    /// The service-side twin document (swagger `Twin`), with `$metadata`.
    pub fn service_view(
        &self,
        device_id: &str,
        module_id: &str,
        connected: bool,
        last_activity: &str,
    ) -> Value {
        let section = |s: &Section, with_version_meta: bool| {
            let mut out = s.props.clone();
            let mut meta = s.meta.clone();
            meta.insert("$lastUpdated".into(), json!(s.last_updated));
            if with_version_meta {
                meta.insert("$lastUpdatedVersion".into(), json!(s.version));
            }
            out.insert("$metadata".into(), Value::Object(meta));
            out.insert("$version".into(), json!(s.version));
            Value::Object(out)
        };
        let mut twin = json!({
            "deviceId": device_id,
            "moduleId": module_id,
            "etag": self.etag(),
            "deviceEtag": base64::engine::general_purpose::STANDARD.encode(self.etag_seq.to_string()),
            "status": "enabled",
            "statusUpdateTime": "0001-01-01T00:00:00Z",
            "connectionState": if connected { "Connected" } else { "Disconnected" },
            "lastActivityTime": last_activity,
            "cloudToDeviceMessageCount": 0,
            "authenticationType": "sas",
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "modelId": "",
            "version": self.desired.version + self.reported.version,
            "properties": {
                "desired": section(&self.desired, true),
                "reported": section(&self.reported, false),
            }
        });
        if !self.tags.is_empty() {
            twin["tags"] = Value::Object(self.tags.clone());
        }
        if !self.configurations.is_empty() {
            twin["configurations"] = self
                .configurations
                .iter()
                .map(|(id, status)| (id.clone(), json!({ "status": status })))
                .collect();
        }
        twin
    }
}

/// JSON merge as the hub does it: objects merge recursively, `null` removes, anything else
/// replaces. A nested patch on an absent key creates the object (nulls inside dropped).
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let entry = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

fn merge_meta(
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    for (k, v) in patch {
        if v.is_null() {
            meta.remove(k);
            continue;
        }
        let entry = meta
            .entry(k.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(m) = entry else { continue };
        if !v.is_object() {
            m.retain(|key, _| key.starts_with('$'));
        }
        m.insert("$lastUpdated".into(), json!(now));
        if let Some(version) = version {
            m.insert("$lastUpdatedVersion".into(), json!(version));
        }
        if let Value::Object(p) = v {
            merge_meta(m, p, now, version);
        }
    }
}

/// Key and depth rules of PROTOCOL §4.6, checked on what a client sent.
pub fn check_patch(patch: &Map<String, Value>, section: &str) -> Result<(), HubError> {
    fn walk(map: &Map<String, Value>, depth: usize, section: &str) -> Result<(), HubError> {
        if depth > MAX_DEPTH {
            return Err(HubError::argument_invalid(format!(
                "{section}: objects are nested deeper than {MAX_DEPTH} levels"
            )));
        }
        for (k, v) in map {
            check_key(k, section)?;
            match v {
                Value::Object(m) => walk(m, depth + 1, section)?,
                Value::String(s) if s.len() > MAX_STRING_BYTES => {
                    return Err(HubError::argument_invalid(format!(
                        "{section}: value of '{k}' is longer than {MAX_STRING_BYTES} bytes"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
    // The section itself is level 0: desired may hold ten nested objects, not eleven.
    walk(patch, 0, section)
}

fn check_key(key: &str, section: &str) -> Result<(), HubError> {
    let bad = key.is_empty()
        || key.len() > MAX_KEY_BYTES
        || key.starts_with('$')
        || key.chars().any(|c| c == '.' || c == ' ' || c.is_control());
    if bad {
        let shown: String = key.chars().take(64).collect();
        return Err(HubError::argument_invalid(format!(
            "{section}: invalid property name '{shown}' (no '.', '$', space or control characters; 1..=1024 bytes)"
        )));
    }
    Ok(())
}

/// Size as the hub accounts it: key lengths plus value sizes, strings by UTF-8 length,
/// numbers 8 bytes, booleans 4 bytes, objects summed.
pub fn accounted_size(map: &Map<String, Value>) -> usize {
    fn value_size(v: &Value) -> usize {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 4,
            Value::Number(_) => 8,
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(value_size).sum(),
            Value::Object(m) => accounted_size(m),
        }
    }
    map.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

fn check_size(map: &Map<String, Value>, limit: usize, section: &str) -> Result<(), HubError> {
    let size = accounted_size(map);
    if size > limit {
        return Err(HubError::too_large(format!(
            "{section} would hold {size} bytes; the limit is {limit}"
        )));
    }
    Ok(())
}

/// UTC timestamp in the hub's format (`2021-09-06T08:52:44.9300429Z`, 7 fractional digits).
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:07}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos() / 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn desired_patch_bumps_version_and_etag_and_records_metadata() {
        let mut t = ModuleTwin::new("t0");
        let etag = t.etag();
        let v = t
            .patch_desired(&obj(json!({"a": 1, "n": {"x": true}})), "t1")
            .unwrap();
        assert_eq!(v, 2);
        assert_ne!(t.etag(), etag);
        let view = t.service_view("d", "m", false, "t1");
        let meta = &view["properties"]["desired"]["$metadata"];
        assert_eq!(meta["a"]["$lastUpdatedVersion"], 2);
        assert_eq!(meta["n"]["x"]["$lastUpdated"], "t1");
        assert_eq!(view["properties"]["desired"]["$version"], 2);
    }

    #[test]
    fn null_in_patch_deletes_and_nested_objects_merge() {
        let mut t = ModuleTwin::new("t0");
        t.patch_desired(&obj(json!({"a": 1, "n": {"x": 1, "y": 2}})), "t1")
            .unwrap();
        t.patch_desired(&obj(json!({"a": null, "n": {"y": null, "z": 3}})), "t2")
            .unwrap();
        assert_eq!(
            Value::Object(t.desired.props.clone()),
            json!({"n": {"x": 1, "z": 3}})
        );
    }

    #[test]
    fn device_view_has_versions_and_no_metadata() {
        let mut t = ModuleTwin::new("t0");
        t.patch_reported(&obj(json!({"r": 1})), "t1").unwrap();
        assert_eq!(
            t.device_view(),
            json!({"desired": {"$version": 1}, "reported": {"r": 1, "$version": 2}})
        );
    }

    #[test]
    fn too_deep_patch_is_rejected_and_twin_unchanged() {
        let mut deep = json!(1);
        for _ in 0..12 {
            deep = json!({ "k": deep });
        }
        let mut t = ModuleTwin::new("t0");
        let before = t.clone();
        let err = t.patch_desired(&obj(deep), "t1").unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(t, before);
    }

    #[test]
    fn oversized_section_is_rejected_with_413() {
        let mut t = ModuleTwin::new("t0");
        let mut patch = Map::new();
        for i in 0..10 {
            patch.insert(format!("k{i}"), json!("x".repeat(4000)));
        }
        let err = t.patch_reported(&patch, "t1").unwrap_err();
        assert_eq!(err.status, 413);
        assert_eq!(t.reported.version, 1);
    }

    #[test]
    fn keys_with_dots_dollars_or_spaces_are_rejected() {
        let mut t = ModuleTwin::new("t0");
        for k in ["a.b", "$x", "a b", ""] {
            let mut patch = Map::new();
            patch.insert(k.into(), json!(1));
            assert_eq!(
                t.patch_desired(&patch, "t").unwrap_err().code,
                400004,
                "{k}"
            );
        }
    }

    #[test]
    fn timestamp_formats_like_the_hub() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_630_918_364, 930_042_900);
        assert_eq!(timestamp(t), "2021-09-06T08:52:44.9300429Z");
    }
}
