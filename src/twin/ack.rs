//! Acknowledgements of desired properties (DESIGN §3 rule 5, PROTOCOL §4.7) and the
//! coalescing of reported patches while they cannot be sent (rule 7).
//!
//! [`super::apply`] builds ack values here; the agent feeds the resulting patches into a
//! [`ReportedCoalescer`] and sends what [`ReportedCoalescer::take`] gives it. Nothing
//! here knows about MQTT, `$rid`s or when a 204 arrives: the caller says so.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::merge::compose;

/// `ac` for a value put in force.
pub const AC_APPLIED: u16 = 200;
/// `ac` for a value refused; the previous good value stays in force.
pub const AC_REJECTED: u16 = 400;

/// How acknowledgements are written into the reported properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStyle {
    /// IoT Plug and Play writable-property convention: `{"value", "ac", "av", "ad"}`.
    #[default]
    Pnp,
    /// The bare value in force, for back ends that read reported values directly.
    Plain,
}

/// Ack for a value now in force. `value` is what the reported `value` must become,
/// already shaped as a replacement patch by the caller (see [`super::merge::replacement`]).
pub fn applied(style: AckStyle, value: Value, version: u64, description: &str) -> Value {
    match style {
        AckStyle::Pnp => json!({
            "value": value,
            "ac": AC_APPLIED,
            "av": version,
            "ad": description,
        }),
        AckStyle::Plain => value,
    }
}

/// Ack for a refused value. `in_force` is what still applies (reported so the back end
/// sees the device did not take the new value); `None` when nothing does.
pub fn rejected(style: AckStyle, in_force: Option<Value>, version: u64, reason: &str) -> Value {
    let value = in_force.unwrap_or(Value::Null);
    match style {
        AckStyle::Pnp => json!({
            "value": value,
            "ac": AC_REJECTED,
            "av": version,
            "ad": reason,
        }),
        AckStyle::Plain => value,
    }
}

/// Ack for a property removed from desired with nothing left in force: the reported
/// member is deleted in both styles.
pub fn removed() -> Value {
    Value::Null
}

/// Pending reported changes, merged so that the newest value of each key wins and
/// their number never exceeds `max_keys`.
#[derive(Debug, Clone)]
pub struct ReportedCoalescer {
    pending: Map<String, Value>,
    max_keys: usize,
    dropped: u64,
}

impl ReportedCoalescer {
    pub fn new(max_keys: usize) -> Self {
        ReportedCoalescer {
            pending: Map::new(),
            max_keys: max_keys.max(1),
            dropped: 0,
        }
    }

    /// Adds newer changes. A key that would exceed the bound is dropped and counted:
    /// acks are derived from state, so the agent can rebuild them when [`Self::dropped`]
    /// grows, whereas an unbounded queue could exhaust a small gateway.
    pub fn push(&mut self, patch: Map<String, Value>) {
        let mut admitted = Map::new();
        for (key, value) in patch {
            if self.pending.contains_key(&key)
                || self.pending.len() + admitted.len() < self.max_keys
            {
                admitted.insert(key, value);
            } else {
                self.dropped += 1;
            }
        }
        compose(&mut self.pending, admitted);
    }

    /// Everything pending, as one patch to send; `None` when there is nothing.
    pub fn take(&mut self) -> Option<Map<String, Value>> {
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }

    /// Puts back a patch the hub never confirmed. It is older than anything pushed since
    /// it was taken, so pending values win over it; its own keys fill the bound last.
    pub fn restore(&mut self, unacked: Map<String, Value>) {
        let newer = std::mem::take(&mut self.pending);
        let mut merged = Map::new();
        for (key, value) in unacked {
            if newer.contains_key(&key) || merged.len() + newer.len() < self.max_keys {
                merged.insert(key, value);
            } else {
                self.dropped += 1;
            }
        }
        compose(&mut merged, newer);
        self.pending = merged;
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Keys refused because the bound was reached, since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn pnp_ack_follows_the_writable_property_convention() {
        let ack = applied(AckStyle::Pnp, json!(122), 7, "applied");
        assert_eq!(
            ack,
            json!({"value": 122, "ac": 200, "av": 7, "ad": "applied"})
        );
    }

    #[test]
    fn pnp_rejection_reports_previous_value_with_400_and_reason() {
        let ack = rejected(
            AckStyle::Pnp,
            Some(json!(60)),
            8,
            "0 is below the minimum 1",
        );
        assert_eq!(
            ack,
            json!({"value": 60, "ac": 400, "av": 8, "ad": "0 is below the minimum 1"})
        );
    }

    #[test]
    fn plain_ack_reports_bare_values() {
        assert_eq!(
            applied(AckStyle::Plain, json!(122), 7, "applied"),
            json!(122)
        );
        assert_eq!(
            rejected(AckStyle::Plain, Some(json!(60)), 8, "too small"),
            json!(60)
        );
        assert_eq!(removed(), Value::Null);
    }

    #[test]
    fn coalescer_keeps_last_value_per_key() {
        let mut c = ReportedCoalescer::new(10);
        c.push(map(json!({"a": 1, "b": {"x": 1}})));
        c.push(map(json!({"a": 2, "b": {"y": null}})));
        assert_eq!(
            c.take(),
            Some(map(json!({"a": 2, "b": {"x": 1, "y": null}})))
        );
        assert_eq!(c.take(), None);
    }

    #[test]
    fn coalescer_is_bounded_by_number_of_keys() {
        let mut c = ReportedCoalescer::new(2);
        c.push(map(json!({"a": 1, "b": 1})));
        c.push(map(json!({"c": 1, "a": 2})));
        assert_eq!(c.len(), 2);
        assert_eq!(c.dropped(), 1);
        assert_eq!(c.take(), Some(map(json!({"a": 2, "b": 1}))));
    }

    #[test]
    fn restored_patch_goes_under_newer_values() {
        let mut c = ReportedCoalescer::new(10);
        c.push(map(json!({"a": 1, "b": 1})));
        let sent = c.take().unwrap();
        c.push(map(json!({"a": 2})));
        c.restore(sent);
        assert_eq!(c.take(), Some(map(json!({"a": 2, "b": 1}))));
    }
}
