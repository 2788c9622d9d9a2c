//! The twin synchronisation rules of DESIGN §3 as a state machine, [`TwinSync`].
//!
//! The agent owns one `TwinSync` and feeds it events (GET started, GET response,
//! desired patch, disconnect, reported 204); each returns an [`Outcome`] saying whether
//! the state changed (persist it before acking, rule 6), which reported patch to send,
//! and whether a full GET is needed. It must never perform I/O, read a clock or log:
//! everything worth logging is in the `Outcome`.

use serde_json::{Map, Value};
use std::time::Duration;

use super::ack::{self, AckStyle};
use super::merge::{depth, merge_patch, replacement, strip_nulls, twin_size};
use super::schema::{Schema, TELEMETRY_INTERVAL, TELEMETRY_INTERVAL_DEFAULT};
use super::state::RuntimeState;

/// Deepest nesting of desired the hub allows (PROTOCOL §4.6).
pub const MAX_DEPTH: usize = 10;
/// Largest desired section the hub allows, in its own accounting (PROTOCOL §4.6).
pub const MAX_DESIRED_SIZE: usize = 32 * 1024;
/// Patches kept while a GET is in flight. Dropping the oldest is safe: the version
/// gap it leaves is detected by rule 3 and answered with another GET.
pub const MAX_QUEUED_PATCHES: usize = 64;

/// What happened to one desired property.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Applied,
    /// Removed from desired; its declared default is in force again.
    DefaultRestored,
    /// Removed from desired; nothing is in force for it any more.
    Removed,
    /// Refused for the given reason; the previous good value stays in force.
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemResult {
    pub property: String,
    /// Desired `$version` that carried the change.
    pub version: u64,
    pub verdict: Verdict,
}

/// What happened to one whole desired document (a GET's desired or a patch).
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// A GET's desired section was put in force as a whole (rule 2).
    FullTwin,
    /// A GET returned the version already in force.
    UpToDate,
    /// Exactly applied + 1 (rule 3).
    Applied,
    /// Held until the GET in flight completes.
    Queued,
    /// At or below the version in force (rule 3).
    Duplicate { applied: u64 },
    /// Beyond applied + 1, or nothing applied yet: a full GET is needed.
    Gap { applied: Option<u64> },
    /// Not JSON, not an object, too deep, too big or without `$version`; state untouched.
    Malformed(String),
    /// Discarded from the queue: too many arrived during one GET, or the GET failed.
    Dropped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub version: Option<u64>,
    pub disposition: Disposition,
}

/// Result of one event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The runtime state changed and must be persisted before `reported` is sent.
    pub changed: bool,
    /// Acknowledgements to send as one reported patch; empty when there are none.
    pub reported: Map<String, Value>,
    /// Issue a full twin GET (then call [`TwinSync::get_started`]).
    pub need_full_get: bool,
    pub handled: Vec<Handled>,
    pub items: Vec<ItemResult>,
}

impl Outcome {
    fn handled(&mut self, version: Option<u64>, disposition: Disposition) {
        self.handled.push(Handled {
            version,
            disposition,
        });
    }
}

/// The twin-synchronisation state machine around the one [`RuntimeState`].
#[derive(Debug, Clone)]
pub struct TwinSync {
    schema: Schema,
    ack: AckStyle,
    state: RuntimeState,
    get_in_flight: bool,
    queue: Vec<(u64, Map<String, Value>)>,
    /// Highest version of a malformed patch seen during the GET (`u64::MAX` when its
    /// version was unreadable, or when patches were lost): the GET may predate it, so
    /// resync unless it covers it.
    malformed_during_get: Option<u64>,
    /// The first GET after start acknowledges everything: acks sent before a crash
    /// may never have reached the hub.
    synced_once: bool,
}

impl TwinSync {
    /// Takes over a state (loaded from disk or fresh) and brings it in line with the
    /// schema, which may have changed since it was written.
    pub fn new(schema: Schema, ack: AckStyle, mut state: RuntimeState) -> Self {
        state
            .properties
            .retain(|name, value| schema.validate(name, value).is_ok());
        for (name, default) in schema.defaults() {
            state.properties.entry(name).or_insert(default);
        }
        TwinSync {
            schema,
            ack,
            state,
            get_in_flight: false,
            queue: Vec::new(),
            malformed_during_get: None,
            synced_once: false,
        }
    }

    pub fn state(&self) -> &RuntimeState {
        &self.state
    }

    pub fn into_state(self) -> RuntimeState {
        self.state
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn get_in_flight(&self) -> bool {
        self.get_in_flight
    }

    /// The telemetry period in force; the schema guarantees a positive integer.
    pub fn telemetry_interval(&self) -> Duration {
        let secs = self
            .state
            .integer(TELEMETRY_INTERVAL)
            .unwrap_or(TELEMETRY_INTERVAL_DEFAULT)
            .max(1);
        Duration::from_secs(secs.unsigned_abs())
    }

    /// A full GET was published; patches are queued until its response.
    pub fn get_started(&mut self) {
        self.get_in_flight = true;
    }

    /// The GET was answered with an error or timed out: queued patches are dropped
    /// (the retried GET covers them) and a new GET is asked for.
    pub fn get_failed(&mut self) -> Outcome {
        let mut out = self.drop_queue();
        out.need_full_get = true;
        out
    }

    /// Events were lost on the way (the agent fell behind), none of them the answer to the
    /// GET in flight: with a GET in flight, its answer is awaited and one more GET follows
    /// (it may predate a lost patch); with none, a GET is asked for. Queued patches stay.
    pub fn events_lost(&mut self) -> Outcome {
        let mut out = Outcome::default();
        if self.get_in_flight {
            self.malformed_during_get = Some(u64::MAX);
        } else {
            out.need_full_get = true;
        }
        out
    }

    /// The connection dropped; a GET in flight will never be answered. Rule 1 GETs
    /// again on reconnect, so nothing queued is worth keeping.
    pub fn disconnected(&mut self) -> Outcome {
        self.drop_queue()
    }

    fn drop_queue(&mut self) -> Outcome {
        let mut out = Outcome::default();
        self.get_in_flight = false;
        self.malformed_during_get = None;
        for (version, _) in self.queue.drain(..) {
            out.handled(Some(version), Disposition::Dropped);
        }
        out
    }

    /// The hub confirmed a reported patch (204 with `$version`).
    pub fn reported_confirmed(&mut self, version: u64) -> bool {
        let changed = self.state.reported_version != Some(version);
        self.state.reported_version = Some(version);
        changed
    }

    /// The body of a 200 answer to a twin GET: `{"desired": {..}, "reported": {..}}`.
    ///
    /// A malformed body does not ask for another GET: the same answer would come back
    /// at once, and the hub is not the place to spin. The next gap or reconnect retries.
    pub fn get_response(&mut self, body: &[u8]) -> Outcome {
        let twin = match serde_json::from_slice::<Value>(body) {
            Ok(twin) => twin,
            Err(e) => return self.full_twin_unusable(format!("GET response is not JSON: {e}")),
        };
        let Some(desired) = twin.get("desired") else {
            return self.full_twin_unusable("GET response has no desired section".into());
        };
        let reported = twin
            .get("reported")
            .and_then(|r| r.get("$version"))
            .and_then(Value::as_u64);
        // A twin's reported `$version` never goes down; when it does, the module was
        // deleted and created again (re-provisioning, aziot re-creation) and the new twin
        // holds none of our acks. Its desired `$version` starts again too and may equal
        // the one in force while carrying other values, so treat it as a first sync.
        if let (Some(now), Some(known)) = (reported, self.state.reported_version) {
            if now < known {
                self.synced_once = false;
            }
        }
        let reported_changed = reported.is_some_and(|v| self.reported_confirmed(v));
        let mut out = self.full_twin(desired);
        out.changed |= reported_changed;
        out
    }

    /// A GET's desired section (rule 2), followed by the patches queued meanwhile.
    pub fn full_twin(&mut self, desired: &Value) -> Outcome {
        let (version, body) = match check_document(desired, None) {
            Ok(ok) => ok,
            Err((_, reason)) => return self.full_twin_unusable(reason),
        };
        self.get_in_flight = false;
        let mut out = Outcome::default();
        if self.synced_once && self.state.desired_version == Some(version) {
            out.handled(Some(version), Disposition::UpToDate);
        } else {
            self.apply_whole(version, &body, !self.synced_once, &mut out);
            out.handled(Some(version), Disposition::FullTwin);
        }
        self.synced_once = true;
        self.drain_queue(&mut out);
        out
    }

    fn full_twin_unusable(&mut self, reason: String) -> Outcome {
        self.get_in_flight = false;
        let mut out = Outcome::default();
        out.handled(None, Disposition::Malformed(reason));
        self.drain_queue(&mut out);
        out
    }

    /// A desired-properties notification. `topic_version` is the `$version` of the
    /// topic when present; the payload's `$version` must agree with it.
    pub fn patch(&mut self, topic_version: Option<u64>, payload: &[u8]) -> Outcome {
        let mut out = Outcome::default();
        let parsed = serde_json::from_slice::<Value>(payload)
            .map_err(|e| (topic_version, format!("not JSON: {e}")))
            .and_then(|doc| check_document(&doc, topic_version));
        match parsed {
            Err((version, reason)) => {
                out.handled(version, Disposition::Malformed(reason));
                if self.get_in_flight {
                    let seen = version.unwrap_or(u64::MAX);
                    self.malformed_during_get =
                        Some(self.malformed_during_get.map_or(seen, |m| m.max(seen)));
                } else {
                    out.need_full_get = true;
                }
            }
            Ok((version, body)) if self.get_in_flight => {
                if self.queue.len() == MAX_QUEUED_PATCHES {
                    let (oldest, _) = self.queue.remove(0);
                    out.handled(Some(oldest), Disposition::Dropped);
                }
                self.queue.push((version, body));
                out.handled(Some(version), Disposition::Queued);
            }
            Ok((version, body)) => self.by_version(version, body, &mut out),
        }
        out
    }

    fn drain_queue(&mut self, out: &mut Outcome) {
        let mut queue = std::mem::take(&mut self.queue);
        queue.sort_by_key(|(version, _)| *version);
        for (version, body) in queue {
            self.by_version(version, body, out);
        }
        if let Some(malformed) = self.malformed_during_get.take() {
            if self
                .state
                .desired_version
                .map_or(true, |applied| applied < malformed)
            {
                out.need_full_get = true;
            }
        }
    }

    /// Rule 3.
    fn by_version(&mut self, version: u64, body: Map<String, Value>, out: &mut Outcome) {
        match self.state.desired_version {
            Some(applied) if version <= applied => {
                out.handled(Some(version), Disposition::Duplicate { applied });
            }
            Some(applied) if applied.checked_add(1) == Some(version) => {
                self.apply_patch(version, body, out);
                out.handled(Some(version), Disposition::Applied);
            }
            applied => {
                out.handled(Some(version), Disposition::Gap { applied });
                out.need_full_get = true;
            }
        }
    }

    /// Rule 4: null deletes, objects merge, a refused value keeps the previous one.
    fn apply_patch(&mut self, version: u64, body: Map<String, Value>, out: &mut Outcome) {
        for (name, value) in body {
            let previous = self.state.properties.get(&name).cloned();
            if value.is_null() {
                self.fall_back(name, previous, version, out);
                continue;
            }
            let mut candidate = match &previous {
                Some(prev @ Value::Object(_)) if value.is_object() => prev.clone(),
                _ => Value::Null,
            };
            merge_patch(&mut candidate, &value);
            self.offer(name, previous, candidate, version, out);
        }
        self.state.desired_version = Some(version);
        out.changed = true;
    }

    /// Rule 2: `body` replaces desired as a whole. With `ack_all`, every desired
    /// property is acknowledged; otherwise only what differs from what was in force.
    fn apply_whole(
        &mut self,
        version: u64,
        body: &Map<String, Value>,
        ack_all: bool,
        out: &mut Outcome,
    ) {
        let before = self.state.clone();
        for (name, value) in body {
            if value.is_null() {
                continue;
            }
            let candidate = strip_nulls(value);
            let previous = self.state.properties.get(name).cloned();
            if ack_all || previous.as_ref() != Some(&candidate) {
                self.offer(name.clone(), previous, candidate, version, out);
            }
        }
        let absent: Vec<String> = self
            .state
            .properties
            .keys()
            .filter(|name| body.get(*name).map_or(true, Value::is_null))
            .cloned()
            .collect();
        for name in absent {
            let previous = self.state.properties.get(&name).cloned();
            if previous.as_ref() != self.schema.default_of(&name) {
                self.fall_back(name, previous, version, out);
            }
        }
        for (name, default) in self.schema.defaults() {
            self.state.properties.entry(name).or_insert(default);
        }
        self.state.desired_version = Some(version);
        out.changed |= self.state != before;
    }

    /// Puts `candidate` in force if the schema accepts it, and acknowledges either way.
    fn offer(
        &mut self,
        name: String,
        previous: Option<Value>,
        candidate: Value,
        version: u64,
        out: &mut Outcome,
    ) {
        match self.schema.validate(&name, &candidate) {
            Ok(()) => {
                let report = replacement(previous.as_ref(), &candidate);
                out.reported.insert(
                    name.clone(),
                    ack::applied(self.ack, report, version, "applied"),
                );
                self.state.properties.insert(name.clone(), candidate);
                out.items.push(item(name, version, Verdict::Applied));
            }
            Err(reason) => {
                // A property refused before it was ever good falls back to its default.
                let kept = previous.or_else(|| self.schema.default_of(&name).cloned());
                if let Some(kept) = &kept {
                    self.state.properties.insert(name.clone(), kept.clone());
                }
                out.reported.insert(
                    name.clone(),
                    ack::rejected(self.ack, kept, version, &reason),
                );
                out.items
                    .push(item(name, version, Verdict::Rejected(reason)));
            }
        }
    }

    /// A property left desired: its default comes back, or it disappears.
    fn fall_back(
        &mut self,
        name: String,
        previous: Option<Value>,
        version: u64,
        out: &mut Outcome,
    ) {
        match self.schema.default_of(&name).cloned() {
            Some(default) => {
                let report = replacement(previous.as_ref(), &default);
                out.reported.insert(
                    name.clone(),
                    ack::applied(self.ack, report, version, "default"),
                );
                self.state.properties.insert(name.clone(), default);
                out.items
                    .push(item(name, version, Verdict::DefaultRestored));
            }
            None => {
                self.state.properties.remove(&name);
                out.reported.insert(name.clone(), ack::removed());
                out.items.push(item(name, version, Verdict::Removed));
            }
        }
    }
}

fn item(property: String, version: u64, verdict: Verdict) -> ItemResult {
    ItemResult {
        property,
        version,
        verdict,
    }
}

/// Why a document was not used, and its version when one could be read.
type Unusable = (Option<u64>, String);

/// Checks a desired document (GET desired or patch) and splits off its `$version`.
/// The error carries the version when one could be read, for resync bookkeeping.
fn check_document(
    doc: &Value,
    topic_version: Option<u64>,
) -> Result<(u64, Map<String, Value>), Unusable> {
    let Value::Object(map) = doc else {
        return Err((topic_version, "not a JSON object".into()));
    };
    let payload_version = map.get("$version").and_then(Value::as_u64);
    let version = match (topic_version, payload_version) {
        (Some(t), Some(p)) if t != p => {
            return Err((
                Some(t.max(p)),
                format!("topic $version {t} disagrees with payload $version {p}"),
            ))
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => return Err((None, "no $version".into())),
    };
    if depth(doc) > MAX_DEPTH {
        return Err((
            Some(version),
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let size = twin_size(doc);
    if size > MAX_DESIRED_SIZE {
        return Err((
            Some(version),
            format!("{size} bytes exceeds the {MAX_DESIRED_SIZE}-byte desired limit"),
        ));
    }
    let body = map
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((version, body))
}
