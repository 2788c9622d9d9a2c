//! Where a rollout stands, computed from what the hub says (pure, no I/O): the
//! configuration as the hub returns it ([`Rollout`]), the queries `fleet status` runs for
//! it, the refusals read from the rejecting twins, and the tally — targeted, applied,
//! rejected, superseded (targeted, but a configuration of higher priority sets the same
//! properties there: the twin's `configurations.[[id]].status` is `Targeted`), and
//! pending = targeted − applied − rejected − superseded.
//!
//! The hub's `rejected` metric counts any refusal on record; a twin whose refusal
//! predates the desired version the configuration wrote is still deciding, so it is
//! counted pending here, not rejected (its ack's `av` tells which).

use serde::Serialize;
use serde_json::{Map, Value};

use super::spec::{APPLIED, REJECTED};

/// A configuration as the hub holds it, with what status needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub name: String,
    pub priority: i64,
    pub target_condition: String,
    /// `properties.desired.k` of `moduleContent`, by `k`.
    pub settings: Map<String, Value>,
    pub applied_query: Option<String>,
    pub rejected_query: Option<String>,
    pub created: Option<String>,
}

impl Rollout {
    /// `None` when `configuration` has no id.
    pub fn from_hub(configuration: &Value) -> Option<Rollout> {
        let text = |p: &str| {
            configuration
                .pointer(p)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let settings = configuration
            .pointer("/content/moduleContent")
            .and_then(Value::as_object)
            .map(|content| {
                content
                    .iter()
                    .filter_map(|(path, v)| {
                        let key = path.strip_prefix("properties.desired.")?;
                        Some((key.to_owned(), v.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Rollout {
            name: text("/id")?,
            priority: configuration
                .get("priority")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            target_condition: text("/targetCondition").unwrap_or_default(),
            settings,
            applied_query: text(&format!("/metrics/queries/{APPLIED}")),
            rejected_query: text(&format!("/metrics/queries/{REJECTED}")),
            created: text("/createdTimeUtc"),
        })
    }

    /// Whether `fleet status` can count it: module content with edgetwin's metrics.
    pub fn is_countable(&self) -> bool {
        !self.settings.is_empty()
            && self.applied_query.is_some()
            && self.rejected_query.is_some()
            && self
                .target_condition
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("from devices.modules")
    }

    /// The queries one status of this rollout runs: targeted, applied and superseded
    /// counts, and the rejecting twins in full. `None` when it is not countable.
    pub fn status_queries(&self) -> Option<StatusQueries> {
        if !self.is_countable() {
            return None;
        }
        Some(StatusQueries {
            targeted: format!("SELECT COUNT() AS n {}", self.target_condition.trim()),
            applied: with_select(self.applied_query.as_deref()?, "COUNT() AS n")?,
            superseded: format!(
                "SELECT COUNT() AS n FROM devices.modules WHERE configurations.[[{}]].status = 'Targeted'",
                self.name
            ),
            rejecting: with_select(self.rejected_query.as_deref()?, "*")?,
        })
    }
}

/// The four queries of one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusQueries {
    pub targeted: String,
    pub applied: String,
    pub superseded: String,
    pub rejecting: String,
}

/// `query` with its select list replaced by `select` (`SELECT <select> FROM ...`).
pub fn with_select(query: &str, select: &str) -> Option<String> {
    let lower = query.to_ascii_lowercase();
    let from = lower.find(" from ")?;
    lower
        .trim_start()
        .starts_with("select ")
        .then(|| format!("SELECT {select}{}", &query[from..]))
}

/// One gateway's refusal of a rollout's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    pub device_id: String,
    pub module_id: String,
    /// `(setting, ac, ad)` for each setting refused.
    pub reasons: Vec<Reason>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub setting: String,
    pub ac: u64,
    pub ad: String,
}

/// The current refusals of `settings` on `twin` (a whole module twin), or `None` when it
/// refused none of them at the desired version it holds now.
///
/// A refusal is current when its `av` is at least the desired version that last wrote
/// the setting (`$metadata.k.$lastUpdatedVersion`, else the desired `$version`).
pub fn current_rejection(twin: &Value, settings: &Map<String, Value>) -> Option<Rejection> {
    let desired = twin.pointer("/properties/desired");
    let reported = twin.pointer("/properties/reported");
    let reasons: Vec<Reason> = settings
        .keys()
        .filter_map(|key| {
            let ack = reported?.get(key)?;
            let ac = ack.get("ac")?.as_u64()?;
            let av = ack.get("av")?.as_u64()?;
            let written = desired
                .and_then(|d| d.pointer(&format!("/$metadata/{key}/$lastUpdatedVersion")))
                .or_else(|| desired?.get("$version"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            (ac >= 400 && av >= written).then(|| Reason {
                setting: key.clone(),
                ac,
                ad: ack
                    .get("ad")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
        })
        .collect();
    if reasons.is_empty() {
        return None;
    }
    let id = |k: &str| {
        twin.get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    Some(Rejection {
        device_id: id("deviceId"),
        module_id: id("moduleId"),
        reasons,
    })
}

/// One rollout's numbers and who refused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutStatus {
    pub name: String,
    pub priority: i64,
    pub targeted: u64,
    pub applied: u64,
    pub rejected: u64,
    /// Targeted, but another configuration of higher priority sets these properties.
    pub superseded: u64,
    pub pending: u64,
    pub rejections: Vec<Rejection>,
}

impl RolloutStatus {
    /// The tally from the counts and the rejecting twins (already reduced to current
    /// refusals by [`current_rejection`]).
    pub fn tally(
        rollout: &Rollout,
        targeted: u64,
        applied: u64,
        superseded: u64,
        mut rejections: Vec<Rejection>,
    ) -> Self {
        rejections.sort_by(|a, b| (&a.device_id, &a.module_id).cmp(&(&b.device_id, &b.module_id)));
        let rejected = rejections.len() as u64;
        RolloutStatus {
            name: rollout.name.clone(),
            priority: rollout.priority,
            targeted,
            applied,
            rejected,
            superseded,
            // Counts come from separate queries a moment apart: never below zero.
            pending: targeted
                .saturating_sub(applied)
                .saturating_sub(rejected)
                .saturating_sub(superseded),
            rejections,
        }
    }

    pub fn verdict(&self) -> Verdict {
        if self.pending > 0 {
            Verdict::Pending
        } else if self.rejected > 0 {
            Verdict::Rejected
        } else {
            Verdict::Applied
        }
    }
}

/// Where a set of rollouts stands, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every targeted gateway applied every rollout.
    Applied,
    /// Nothing pending, and some gateway refused.
    Rejected,
    /// Some gateway has not answered yet.
    Pending,
}

/// The verdict over several rollouts: any refusal counts once nothing is pending.
pub fn overall(statuses: &[RolloutStatus]) -> Verdict {
    if statuses.iter().any(|s| s.pending > 0) {
        Verdict::Pending
    } else if statuses.iter().any(|s| s.rejected > 0) {
        Verdict::Rejected
    } else {
        Verdict::Applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::spec::RolloutSpec;
    use serde_json::json;

    fn rollout() -> Rollout {
        let spec = RolloutSpec::new(
            "fast",
            "edgetwin",
            "tags.fleet = 'a'",
            20,
            json!({"telemetryInterval": 0}).as_object().unwrap().clone(),
        )
        .unwrap();
        Rollout::from_hub(&spec.body()).unwrap()
    }

    #[test]
    fn a_configuration_made_by_apply_is_read_back_with_its_settings_and_metrics() {
        let r = rollout();
        assert_eq!(r.name, "fast");
        assert_eq!(r.priority, 20);
        assert_eq!(
            r.settings,
            *json!({"telemetryInterval": 0}).as_object().unwrap()
        );
        let q = r.status_queries().unwrap();
        assert_eq!(
            q.targeted,
            "SELECT COUNT() AS n FROM devices.modules WHERE moduleId = 'edgetwin' AND (tags.fleet = 'a')"
        );
        assert!(q
            .applied
            .starts_with("SELECT COUNT() AS n FROM devices.modules WHERE configurations.[[fast]]"));
        assert!(q
            .rejecting
            .starts_with("SELECT * FROM devices.modules WHERE"));
        assert_eq!(
            q.superseded,
            "SELECT COUNT() AS n FROM devices.modules WHERE configurations.[[fast]].status = 'Targeted'"
        );
    }

    #[test]
    fn configurations_without_edgetwin_metrics_are_not_counted() {
        let device = json!({"id": "d", "content": {"deviceContent": {"properties.desired.x": 1}},
                            "targetCondition": "tags.a = 1"});
        assert_eq!(Rollout::from_hub(&device).unwrap().status_queries(), None);
        assert_eq!(Rollout::from_hub(&json!({})), None);
    }

    #[test]
    fn only_a_refusal_of_the_current_desired_version_is_a_rejection() {
        let settings = json!({"telemetryInterval": 0}).as_object().unwrap().clone();
        let twin = |av: u64| {
            json!({"deviceId": "gw7", "moduleId": "edgetwin",
                "properties": {
                  "desired": {"telemetryInterval": 0, "$version": 9,
                              "$metadata": {"telemetryInterval": {"$lastUpdatedVersion": 8}}},
                  "reported": {"telemetryInterval":
                      {"value": 30, "ac": 400, "av": av, "ad": "0 is below the minimum 1"}}}})
        };
        assert_eq!(current_rejection(&twin(7), &settings), None);
        assert_eq!(
            current_rejection(&twin(8), &settings),
            Some(Rejection {
                device_id: "gw7".into(),
                module_id: "edgetwin".into(),
                reasons: vec![Reason {
                    setting: "telemetryInterval".into(),
                    ac: 400,
                    ad: "0 is below the minimum 1".into()
                }]
            })
        );
        let mut no_metadata = twin(9);
        no_metadata["properties"]["desired"]
            .as_object_mut()
            .unwrap()
            .remove("$metadata");
        assert!(current_rejection(&no_metadata, &settings).is_some());
    }

    #[test]
    fn pending_is_what_is_neither_applied_nor_rejected() {
        let r = rollout();
        let refusal = |d: &str| Rejection {
            device_id: d.into(),
            module_id: "edgetwin".into(),
            reasons: vec![],
        };
        let s = RolloutStatus::tally(&r, 30, 20, 1, vec![refusal("b"), refusal("a")]);
        assert_eq!(
            (s.targeted, s.applied, s.rejected, s.superseded, s.pending),
            (30, 20, 2, 1, 7)
        );
        assert_eq!(s.rejections[0].device_id, "a");
        assert_eq!(s.verdict(), Verdict::Pending);
        let done = RolloutStatus::tally(&r, 3, 3, 0, vec![]);
        assert_eq!(done.verdict(), Verdict::Applied);
        let refused = RolloutStatus::tally(&r, 3, 2, 0, vec![refusal("a")]);
        assert_eq!(refused.verdict(), Verdict::Rejected);
        assert_eq!(overall(&[done.clone(), refused.clone()]), Verdict::Rejected);
        assert_eq!(overall(&[done, refused, s]), Verdict::Pending);
        // Counts taken a moment apart may overlap: pending never goes negative.
        assert_eq!(
            RolloutStatus::tally(&r, 3, 3, 0, vec![refusal("x")]).pending,
            0
        );
    }

    #[test]
    fn select_lists_are_replaced_only_in_select_queries() {
        assert_eq!(
            with_select("select deviceId from devices.modules where a = 1", "*").unwrap(),
            "SELECT * from devices.modules where a = 1"
        );
        assert_eq!(with_select("FROM devices.modules WHERE a = 1", "*"), None);
    }
}
