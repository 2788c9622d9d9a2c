//! Declared desired properties: their type, bounds and default, and the policy for
//! properties nobody declared.
//!
//! Built once from configuration (`config` turns `[twin.properties.*]` into a [`Schema`])
//! and consulted by [`super::apply`] for every desired value. It must never hold runtime
//! values: it says what is acceptable, not what is in force.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The built-in property that drives the telemetry timer (seconds).
pub const TELEMETRY_INTERVAL: &str = "telemetryInterval";

/// Bounds of the built-in `telemetryInterval`: one day is long enough for any gateway
/// vital, and anything below a second would flood the hub's per-unit quota.
pub const TELEMETRY_INTERVAL_MIN: i64 = 1;
pub const TELEMETRY_INTERVAL_MAX: i64 = 86_400;
pub const TELEMETRY_INTERVAL_DEFAULT: i64 = 60;

/// JSON type a declared property must have. Arrays are not offered: a twin array can
/// only be replaced as a whole, which the merge rules of DESIGN §3 cannot express.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    Integer,
    Number,
    String,
    Boolean,
    Object,
}

impl PropertyType {
    pub fn as_str(self) -> &'static str {
        match self {
            PropertyType::Integer => "integer",
            PropertyType::Number => "number",
            PropertyType::String => "string",
            PropertyType::Boolean => "boolean",
            PropertyType::Object => "object",
        }
    }

    fn matches(self, value: &Value) -> bool {
        match self {
            // Only JSON integers: accepting 60.0 would make the reported value differ
            // from what the operator wrote.
            PropertyType::Integer => value.is_i64() || value.is_u64(),
            PropertyType::Number => value.is_number(),
            PropertyType::String => value.is_string(),
            PropertyType::Boolean => value.is_boolean(),
            PropertyType::Object => value.is_object(),
        }
    }
}

impl fmt::Display for PropertyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a desired property that is not declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// Keep it in state and acknowledge it with 200.
    #[default]
    Accept,
    /// Do not keep it; acknowledge it with 400.
    Reject,
}

/// One declared property.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PropertySpec {
    #[serde(rename = "type")]
    kind: PropertyType,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default: Option<Value>,
}

/// Why a [`PropertySpec`] is inconsistent; `config` prefixes it with the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("min/max only apply to integer or number properties, not {0}")]
    BoundsOnNonNumeric(PropertyType),
    #[error("min ({min}) is greater than max ({max})")]
    MinAboveMax { min: f64, max: f64 },
    #[error("default is not acceptable: {0}")]
    BadDefault(String),
    #[error("telemetryInterval must be an integer with min >= 1")]
    TelemetryInterval,
}

impl PropertySpec {
    pub fn new(
        kind: PropertyType,
        min: Option<f64>,
        max: Option<f64>,
        default: Option<Value>,
    ) -> Result<Self, SpecError> {
        let numeric = matches!(kind, PropertyType::Integer | PropertyType::Number);
        if !numeric && (min.is_some() || max.is_some()) {
            return Err(SpecError::BoundsOnNonNumeric(kind));
        }
        if let (Some(min), Some(max)) = (min, max) {
            if min > max {
                return Err(SpecError::MinAboveMax { min, max });
            }
        }
        let spec = PropertySpec {
            kind,
            min,
            max,
            default: None,
        };
        if let Some(default) = &default {
            spec.check(default).map_err(SpecError::BadDefault)?;
        }
        Ok(PropertySpec { default, ..spec })
    }

    /// The built-in `telemetryInterval`: integer seconds, 1..=86400, default 60.
    pub fn telemetry_interval() -> Self {
        PropertySpec {
            kind: PropertyType::Integer,
            min: Some(TELEMETRY_INTERVAL_MIN as f64),
            max: Some(TELEMETRY_INTERVAL_MAX as f64),
            default: Some(Value::from(TELEMETRY_INTERVAL_DEFAULT)),
        }
    }

    pub fn kind(&self) -> PropertyType {
        self.kind
    }
    pub fn min(&self) -> Option<f64> {
        self.min
    }
    pub fn max(&self) -> Option<f64> {
        self.max
    }
    pub fn default_value(&self) -> Option<&Value> {
        self.default.as_ref()
    }

    /// `Err` carries the reason text that goes into the ack's `ad`.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        if !self.kind.matches(value) {
            return Err(format!("expected {}, got {}", self.kind, json_type(value)));
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = self.min {
                if n < min {
                    return Err(format!("{value} is below the minimum {}", Num(min)));
                }
            }
            if let Some(max) = self.max {
                if n > max {
                    return Err(format!("{value} is above the maximum {}", Num(max)));
                }
            }
        }
        Ok(())
    }
}

/// Prints whole bounds without a trailing `.0`, so reasons read like the config.
struct Num(f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            write!(f, "{}", self.0 as i64)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The set of declared properties plus the unknown-property policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schema {
    unknown: UnknownPolicy,
    properties: BTreeMap<String, PropertySpec>,
}

impl Default for Schema {
    fn default() -> Self {
        Schema::new(UnknownPolicy::default())
    }
}

impl Schema {
    /// A schema holding only the built-in `telemetryInterval`.
    pub fn new(unknown: UnknownPolicy) -> Self {
        let mut properties = BTreeMap::new();
        properties.insert(
            TELEMETRY_INTERVAL.to_owned(),
            PropertySpec::telemetry_interval(),
        );
        Schema {
            unknown,
            properties,
        }
    }

    /// Declares (or redeclares) a property. `telemetryInterval` may be narrowed or given
    /// another default, but must stay a positive integer: the telemetry timer relies on it.
    pub fn declare(&mut self, name: &str, spec: PropertySpec) -> Result<(), SpecError> {
        if name == TELEMETRY_INTERVAL
            && (spec.kind != PropertyType::Integer || !matches!(spec.min, Some(m) if m >= 1.0))
        {
            return Err(SpecError::TelemetryInterval);
        }
        self.properties.insert(name.to_owned(), spec);
        Ok(())
    }

    pub fn unknown(&self) -> UnknownPolicy {
        self.unknown
    }

    pub fn get(&self, name: &str) -> Option<&PropertySpec> {
        self.properties.get(name)
    }

    pub fn properties(&self) -> impl Iterator<Item = (&str, &PropertySpec)> {
        self.properties.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether `value` may be put in force for `name`; `Err` is the ack reason.
    pub fn validate(&self, name: &str, value: &Value) -> Result<(), String> {
        match self.properties.get(name) {
            Some(spec) => spec.check(value),
            None => match self.unknown {
                UnknownPolicy::Accept => Ok(()),
                UnknownPolicy::Reject => Err("unknown property".to_owned()),
            },
        }
    }

    /// Default of a declared property, if it has one.
    pub fn default_of(&self, name: &str) -> Option<&Value> {
        self.properties.get(name).and_then(|s| s.default.as_ref())
    }

    /// Every declared default: the properties in force before any twin was seen.
    pub fn defaults(&self) -> Map<String, Value> {
        self.properties
            .iter()
            .filter_map(|(k, s)| s.default.clone().map(|d| (k.clone(), d)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn telemetry_interval_is_built_in_with_bounds_and_default() {
        let schema = Schema::default();
        assert_eq!(schema.default_of(TELEMETRY_INTERVAL), Some(&json!(60)));
        assert!(schema.validate(TELEMETRY_INTERVAL, &json!(1)).is_ok());
        assert!(schema.validate(TELEMETRY_INTERVAL, &json!(86_400)).is_ok());
        let reason = schema.validate(TELEMETRY_INTERVAL, &json!(0)).unwrap_err();
        assert_eq!(reason, "0 is below the minimum 1");
        let reason = schema
            .validate(TELEMETRY_INTERVAL, &json!(86_401))
            .unwrap_err();
        assert_eq!(reason, "86401 is above the maximum 86400");
    }

    #[test]
    fn wrong_type_reason_names_expected_and_actual_type() {
        let schema = Schema::default();
        let reason = schema
            .validate(TELEMETRY_INTERVAL, &json!("fast"))
            .unwrap_err();
        assert_eq!(reason, "expected integer, got string");
        let reason = schema
            .validate(TELEMETRY_INTERVAL, &json!(60.5))
            .unwrap_err();
        assert_eq!(reason, "expected integer, got number");
    }

    #[test]
    fn unknown_policy_decides_undeclared_properties() {
        assert!(Schema::new(UnknownPolicy::Accept)
            .validate("colour", &json!("red"))
            .is_ok());
        assert_eq!(
            Schema::new(UnknownPolicy::Reject)
                .validate("colour", &json!("red"))
                .unwrap_err(),
            "unknown property"
        );
    }

    #[test]
    fn spec_with_default_out_of_bounds_is_refused() {
        let err = PropertySpec::new(PropertyType::Number, Some(0.0), Some(1.0), Some(json!(2)))
            .unwrap_err();
        assert!(matches!(err, SpecError::BadDefault(_)));
    }

    #[test]
    fn spec_with_bounds_on_string_is_refused() {
        let err = PropertySpec::new(PropertyType::String, Some(0.0), None, None).unwrap_err();
        assert_eq!(err, SpecError::BoundsOnNonNumeric(PropertyType::String));
    }

    #[test]
    fn telemetry_interval_cannot_be_redeclared_as_string() {
        let mut schema = Schema::default();
        let spec = PropertySpec::new(PropertyType::String, None, None, None).unwrap();
        assert_eq!(
            schema.declare(TELEMETRY_INTERVAL, spec),
            Err(SpecError::TelemetryInterval)
        );
        let narrower = PropertySpec::new(
            PropertyType::Integer,
            Some(10.0),
            Some(600.0),
            Some(json!(30)),
        )
        .unwrap();
        schema.declare(TELEMETRY_INTERVAL, narrower).unwrap();
        assert!(schema.validate(TELEMETRY_INTERVAL, &json!(5)).is_err());
    }
}
