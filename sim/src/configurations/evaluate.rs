//! One evaluation of the automatic configurations, as the hub runs it shortly after a
//! configuration changes and then periodically (every `--configurations-every`):
//!
//! 1. each module twin matching a configuration's target condition is *targeted* by it;
//! 2. per desired property, the targeting configuration with the highest priority wins
//!    (ties: the most recently created); a configuration that wins at least one property
//!    of a twin is *applied* there, else only *targeted* (`configurations.{id}.status`);
//! 3. the winning values the twin does not already hold are merged into its desired
//!    properties through the normal desired-update path (new `$version`, a notification
//!    to the connected module);
//! 4. metrics: `targetedCount`, `appliedCount` and each custom query's row count.
//!
//! A twin leaving a configuration's scope, or a configuration deleted, keeps the desired
//! values it was given (the hub does not revert them); only its status entry goes.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::super::errors::HubError;
use super::super::hub::{now_ts, Hub, ModuleKey, SimEvent};
use super::super::query::{self, Collection};
use super::super::twin_doc::merge;
use super::super::twin_query::{collection_docs, module_twin_docs};
use super::{content_path, desired_patch, target_query};

/// What one evaluation did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Evaluation {
    /// Twins whose desired properties changed (each got a new `$version`).
    pub patched: Vec<ModuleKey>,
    /// Twins whose `configurations` statuses changed.
    pub statuses_changed: usize,
    /// Twins a winning value could not be written to (e.g. the section would exceed
    /// 32 KB); they are retried at the next evaluation.
    pub failed: Vec<(ModuleKey, HubError)>,
}

/// A configuration as one evaluation needs it.
struct Candidate {
    id: String,
    priority: i64,
    created_seq: u64,
    target: Option<query::Query>,
    /// (path below `properties.desired`, its patch)
    entries: Vec<(Vec<String>, Map<String, Value>)>,
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

impl Hub {
    /// Evaluates every configuration against every module twin now (see the module
    /// documentation); durable before the modules are notified.
    pub fn evaluate_configurations(&self) -> Result<Evaluation, HubError> {
        let mut report = Evaluation::default();
        let mut notifications = Vec::new();
        let mut st = self.state();
        let mut candidates: Vec<Candidate> = st
            .data
            .configurations
            .iter()
            .map(|(id, r)| Candidate {
                id: id.clone(),
                priority: r.priority,
                created_seq: r.created_seq,
                // Stored conditions were validated on PUT; one that no longer parses
                // (an older emulator's) targets nothing.
                target: target_query(&r.target_condition).ok().flatten(),
                entries: r
                    .module_content
                    .iter()
                    .filter_map(|(k, v)| {
                        let path = content_path(k).ok()?;
                        let path = path.into_iter().map(String::from).collect();
                        Some((path, desired_patch(k, v).ok()?))
                    })
                    .collect(),
            })
            .collect();
        // Highest priority first; among equals the newest.
        candidates.sort_by_key(|c| std::cmp::Reverse((c.priority, c.created_seq)));
        let docs = module_twin_docs(&st);
        let now = now_ts();
        for doc in &docs {
            let (Some(d), Some(m)) = (doc["deviceId"].as_str(), doc["moduleId"].as_str()) else {
                continue;
            };
            let key = ModuleKey {
                device_id: d.to_string(),
                module_id: m.to_string(),
            };
            let mut claimed: Vec<&[String]> = Vec::new();
            let mut statuses = BTreeMap::new();
            let mut patch = Map::new();
            for c in &candidates {
                if !c.target.as_ref().is_some_and(|t| t.matches(doc)) {
                    continue;
                }
                let mut won = false;
                for (path, entry) in &c.entries {
                    if claimed.iter().any(|p| overlaps(p, path)) {
                        continue;
                    }
                    claimed.push(path);
                    merge(&mut patch, entry);
                    won = true;
                }
                statuses.insert(
                    c.id.clone(),
                    if won { "applied" } else { "targeted" }.to_string(),
                );
            }
            let Some(record) = st
                .data
                .devices
                .get_mut(d)
                .and_then(|dev| dev.modules.get_mut(m))
            else {
                continue;
            };
            let mut after = record.twin.desired.props.clone();
            merge(&mut after, &patch);
            if after != record.twin.desired.props {
                match record.twin.patch_desired(&patch, &now) {
                    Ok(version) => {
                        let mut payload = Value::Object(patch);
                        payload["$version"] = json!(version);
                        notifications.push((key.clone(), payload, version));
                        report.patched.push(key);
                    }
                    Err(e) => {
                        // Nothing was applied: the statuses stay as they were until a
                        // later evaluation succeeds.
                        report.failed.push((key, e));
                        continue;
                    }
                }
            }
            if record.twin.configurations != statuses {
                record.twin.configurations = statuses;
                report.statuses_changed += 1;
            }
        }
        let metrics_changed = self.update_metrics(&mut st);
        let changed = !report.patched.is_empty() || report.statuses_changed > 0 || metrics_changed;
        let pending = changed.then(|| self.snapshot(&st));
        drop(st);
        if let Some(pending) = pending {
            self.commit(pending)?;
        }
        // Notify only once durable, as REST twin writes do.
        for (key, payload, version) in notifications {
            let mut st = self.state();
            let notified = self.notify_desired(&mut st, &key, &payload, version);
            drop(st);
            self.emit(SimEvent::DesiredChanged {
                module: key,
                version,
                notified,
            });
        }
        Ok(report)
    }

    /// Recomputes every configuration's metrics over the twins as they are now; returns
    /// whether any result changed.
    fn update_metrics(&self, st: &mut super::super::hub::State) -> bool {
        let docs = module_twin_docs(st);
        let mut changed = false;
        let ids: Vec<String> = st.data.configurations.keys().cloned().collect();
        for id in ids {
            let record = &st.data.configurations[&id];
            let mut system = BTreeMap::new();
            let (mut targeted, mut applied) = (0, 0);
            for doc in &docs {
                match doc["configurations"][&id]["status"].as_str() {
                    Some("applied") => {
                        targeted += 1;
                        applied += 1;
                    }
                    Some(_) => targeted += 1,
                    None => {}
                }
            }
            system.insert("targetedCount".to_string(), targeted);
            system.insert("appliedCount".to_string(), applied);
            let custom: BTreeMap<String, i64> = record
                .metric_queries
                .iter()
                .map(|(name, text)| (name.clone(), metric_value(text, &docs, st)))
                .collect();
            let record = st
                .data
                .configurations
                .get_mut(&id)
                .expect("id taken from the map under the same lock");
            if record.system_results != system || record.metric_results != custom {
                record.system_results = system;
                record.metric_results = custom;
                changed = true;
            }
        }
        changed
    }
}

/// A metric's result: the number of rows its query yields, or for an aggregate the count
/// in its single row. `modules` are the module twins, built once per evaluation.
fn metric_value(text: &str, modules: &[Value], st: &super::super::hub::State) -> i64 {
    let Ok(q) = query::parse(text) else {
        return 0;
    };
    let rows = match q.from {
        Collection::Modules => q.run(modules),
        Collection::Devices => q.run(&collection_docs(st, Collection::Devices)),
    };
    if q.aggregates() && q.group_by.is_empty() {
        return rows
            .first()
            .and_then(Value::as_object)
            .and_then(|r| r.values().find_map(Value::as_i64))
            .unwrap_or(0);
    }
    i64::try_from(rows.len()).unwrap_or(i64::MAX)
}
