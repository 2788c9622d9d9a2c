//! The emulated hub: registry (devices, modules, keys), module twins, service policies,
//! live MQTT sessions and their persistent subscriptions, pending direct methods, the
//! telemetry log and the scriptable faults.
//!
//! Front ends (`mqtt`, `rest`) call the methods here; the hub answers synchronously and
//! pushes server-initiated traffic (desired notifications, method requests, twin responses,
//! forced closes) into each connection's bounded outbound channel. State sits behind one
//! `std::sync::Mutex` that is never held across an `.await`: every operation is a short,
//! CPU-only critical section, and durable writes happen after the lock is released, in
//! the order the changes were made (a persistence ticket serialises them).
//!
//! The hub never logs secrets and never blocks on a slow client: a client whose outbound
//! channel is full is disconnected, as the real hub would drop a stalled connection.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::errors::HubError;
use super::persist::{self, PersistedHub, Ticket, Writer};
use super::throttle::{self, Admission, Throttle, Tier};
use super::twin_doc::timestamp;
use edgetwin::identity::SharedKey;

/// Depth of each connection's outbound queue; beyond it the client is too slow and is cut.
pub const OUTBOUND_CAPACITY: usize = 1024;
/// How many telemetry messages the hub keeps for inspection (oldest dropped first).
pub const TELEMETRY_KEEP: usize = 10_000;
/// MQTT subscriptions allowed per client, as on the real hub.
pub const MAX_SUBSCRIPTIONS: usize = 5;

pub use super::persist::Right;

/// A module identity, as it appears in client ids, topics and REST paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleKey {
    pub device_id: String,
    pub module_id: String,
}

impl std::fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.device_id, self.module_id)
    }
}

/// Traffic the hub sends to one connected client.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A QoS 0 publish (twin responses, desired notifications, method requests).
    Publish { topic: String, payload: Bytes },
    /// The hub closes the connection (superseded by a newer one, fault, slow client).
    Close { reason: &'static str },
}

/// What a CONNECT gets when it is accepted.
#[derive(Debug)]
pub struct Accepted {
    pub conn_id: u64,
    pub module: ModuleKey,
    pub session_present: bool,
    /// When the client's SAS token expires; the hub closes the connection then.
    pub expires_at: SystemTime,
    pub outbound: mpsc::Receiver<Outbound>,
}

/// Why a CONNECT was refused; always answered with CONNACK 5 on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("malformed identity: {0}")]
    BadIdentity(String),
    #[error("unknown module {0}")]
    UnknownModule(String),
    #[error("SAS token rejected: {0}")]
    BadToken(String),
    #[error("connection refused by fault injection")]
    Fault,
}

/// Something observable that happened inside the hub; tests wait on these instead of
/// sleeping.
#[derive(Debug, Clone, PartialEq)]
pub enum SimEvent {
    Connected {
        module: ModuleKey,
        session_present: bool,
    },
    ConnectRefused {
        client_id: String,
        reason: String,
    },
    Disconnected {
        module: ModuleKey,
    },
    Subscribed {
        module: ModuleKey,
        filters: Vec<String>,
    },
    TwinGet {
        module: ModuleKey,
        status: u16,
    },
    ReportedPatched {
        module: ModuleKey,
        version: u64,
        patch: Value,
    },
    ReportedRejected {
        module: ModuleKey,
        status: u16,
    },
    DesiredChanged {
        module: ModuleKey,
        version: u64,
        notified: bool,
    },
    Telemetry {
        module: ModuleKey,
        seq: u64,
    },
    MethodInvoked {
        module: ModuleKey,
        method: String,
    },
    MethodResponded {
        module: ModuleKey,
        status: i32,
    },
    /// An operation was refused by the tier's throttle (429, or a CONNECT closed).
    Throttled {
        kind: throttle::Kind,
    },
}

/// One device-to-cloud message as the hub stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub seq: u64,
    pub module: ModuleKey,
    /// Decoded property bag: system properties keep their `$.` prefix.
    pub properties: Vec<(String, Option<String>)>,
    pub body: Bytes,
    pub enqueued_at: SystemTime,
}

impl Telemetry {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Scriptable faults. Count-based faults are deterministic for tests; time-based ones
/// exist for demos and soak runs.
#[derive(Debug, Default, Clone)]
pub(super) struct FaultState {
    pub(super) refuse_connects: u32,
    pub(super) throttle_twin_ops: u32,
    pub(super) throttle_twin_until: Option<std::time::Instant>,
    /// The next n twin operations fail with 500 (an internal error of the hub).
    pub(super) fail_twin_ops: u32,
    pub(super) drop_twin_responses: u32,
    pub(super) delay_twin_responses: Option<Duration>,
    /// The next n desired notifications are lost on the way to the module.
    pub(super) drop_desired: u32,
    /// The next n desired notifications are delivered twice.
    pub(super) duplicate_desired: u32,
    /// The next n desired notifications are held back and delivered after the one that
    /// follows them (out of order).
    pub(super) reorder_desired: u32,
    /// A held-back notification: its module, topic and payload.
    pub(super) held_desired: Option<(ModuleKey, String, Bytes)>,
    /// The next n reported patches take effect, then the connection drops before the 204.
    pub(super) drop_after_reported: u32,
    /// Seconds the hub's clock is ahead of (positive) or behind (negative) the machine's;
    /// SAS expiry is judged by the hub's clock.
    pub(super) clock_offset_secs: i64,
}

pub(super) struct Connection {
    pub(super) conn_id: u64,
    pub(super) client_id: String,
    pub(super) clean_session: bool,
    pub(super) tx: mpsc::Sender<Outbound>,
}

pub(super) struct PendingMethod {
    pub(super) module: ModuleKey,
    pub(super) reply: oneshot::Sender<(i32, Value)>,
}

pub(super) struct State {
    pub(super) data: PersistedHub,
    pub(super) connections: HashMap<ModuleKey, Connection>,
    /// Sessions of clean-session clients live only as long as their connection.
    pub(super) volatile_sessions: HashMap<String, BTreeSet<String>>,
    pub(super) next_conn_id: u64,
    pub(super) pending_methods: HashMap<String, PendingMethod>,
    pub(super) next_method_rid: u64,
    pub(super) telemetry: VecDeque<Telemetry>,
    pub(super) telemetry_seq: u64,
    pub(super) faults: FaultState,
    /// Twin requests (GET and reported PATCH) received, answered or not.
    pub(super) twin_requests: u64,
}

/// The hub. Cheap to clone (an `Arc`); every front end holds one.
#[derive(Clone)]
pub struct Hub {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) hub_name: String,
    /// Writes the durable state in the state directory, in the order of the changes.
    pub(super) store: Writer,
    /// `host:port` of the REST listener; service tokens may be scoped to it (PROTOCOL §8.2).
    pub(super) rest_authority: Mutex<Option<String>>,
    pub(super) state: Mutex<State>,
    pub(super) events: broadcast::Sender<SimEvent>,
    /// The tier's throttles; apart from `state` so REST need not take the state lock.
    pub(super) throttle: Mutex<Throttle>,
}

/// Handle to script faults on a running hub.
#[derive(Clone)]
pub struct Faults {
    hub: Hub,
}

/// The machine's clock in Unix seconds (0 if it is set before 1970); SAS token expiries
/// are in these units.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The hub's clock in Unix seconds: the machine's, shifted by the clock-skew fault.
pub(super) fn hub_unix_now(offset_secs: i64) -> u64 {
    unix_now().saturating_add_signed(offset_secs)
}

pub(super) fn now_ts() -> String {
    timestamp(SystemTime::now())
}

/// The subscriptions a module client may hold; anything else is refused in the SUBACK.
pub fn is_supported_filter(filter: &str) -> bool {
    matches!(filter, TWIN_RES_FILTER | DESIRED_FILTER | METHODS_FILTER)
}

pub const TWIN_RES_FILTER: &str = "$iothub/twin/res/#";
pub const DESIRED_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";
pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";

pub(super) fn generation_id() -> String {
    use rand::Rng;
    format!("63{:016}", rand::rng().random_range(0..10u64.pow(16)))
}

pub(super) fn identity_etag(seq: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(seq.to_string())
}

/// `If-Match` as the hub honours it (PROTOCOL §6.4): only quoted etags (optionally `W/`)
/// are checked; `*` matches anything; unquoted values are ignored like the real hub does.
pub(super) fn if_match_allows(if_match: Option<&str>, current: &str) -> bool {
    let Some(raw) = if_match.map(str::trim) else {
        return true;
    };
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    if raw == "*" {
        return true;
    }
    match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some("*") => true,
        Some(tag) => tag == current,
        None => true,
    }
}

pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.+%_#*?!(),:=@$'".contains(c))
}

fn key_or_generate(v: Option<&Value>) -> Result<String, HubError> {
    match v.and_then(Value::as_str) {
        None | Some("") => Ok(SharedKey::generate().as_base64().to_string()),
        Some(k) => SharedKey::from_base64(k)
            .map(|k| k.as_base64().to_string())
            .map_err(|_| {
                HubError::argument_invalid("symmetric key is not valid base64 of 16..=64 bytes")
            }),
    }
}

pub(super) fn sas_keys(body: &Value) -> Result<(String, String), HubError> {
    let auth = &body["authentication"];
    match auth.get("type").and_then(Value::as_str) {
        None | Some("sas") => {}
        Some(other) => {
            return Err(HubError::argument_invalid(format!(
                "authentication type '{other}' is not emulated; only 'sas' is"
            )))
        }
    }
    let sym = &auth["symmetricKey"];
    Ok((
        key_or_generate(sym.get("primaryKey"))?,
        key_or_generate(sym.get("secondaryKey"))?,
    ))
}

impl Hub {
    /// Opens the hub whose durable state lives in `state_dir`, creating it (with fresh
    /// policy keys) on first use.
    pub fn open(hub_name: &str, state_dir: impl Into<PathBuf>) -> anyhow::Result<Hub> {
        let state_dir = state_dir.into();
        let data = match persist::load(&state_dir)? {
            Some(data) => data,
            None => {
                let data = PersistedHub::new();
                persist::save(&state_dir, &data)?;
                data
            }
        };
        let (events, _) = broadcast::channel(4096);
        Ok(Hub {
            inner: Arc::new(Inner {
                hub_name: hub_name.to_string(),
                store: Writer::new(state_dir),
                rest_authority: Mutex::new(None),
                state: Mutex::new(State {
                    data,
                    connections: HashMap::new(),
                    volatile_sessions: HashMap::new(),
                    next_conn_id: 1,
                    pending_methods: HashMap::new(),
                    next_method_rid: 1,
                    telemetry: VecDeque::new(),
                    telemetry_seq: 0,
                    faults: FaultState::default(),
                    twin_requests: 0,
                }),
                events,
                throttle: Mutex::new(Throttle::default()),
            }),
        })
    }

    pub fn hub_name(&self) -> &str {
        &self.inner.hub_name
    }

    pub fn state_dir(&self) -> &std::path::Path {
        self.inner.store.dir()
    }

    /// Records the REST listener's `host:port`, to which service tokens may be scoped.
    pub fn set_rest_authority(&self, authority: &str) {
        *lock(&self.inner.rest_authority) = Some(authority.to_string());
    }

    /// Events from now on. Slow receivers see `Lagged`, never block the hub.
    pub fn events(&self) -> broadcast::Receiver<SimEvent> {
        self.inner.events.subscribe()
    }

    pub fn faults(&self) -> Faults {
        Faults { hub: self.clone() }
    }

    /// The hub's clock: the machine's, shifted by the clock-offset fault. REST answers
    /// carry it in `Date`, as a real hub's tell clients its time.
    pub fn clock(&self) -> SystemTime {
        let offset = self.state().faults.clock_offset_secs;
        let shift = Duration::from_secs(offset.unsigned_abs());
        if offset >= 0 {
            SystemTime::now() + shift
        } else {
            SystemTime::now() - shift
        }
    }

    /// `HostName=<host>;SharedAccessKeyName=<policy>;SharedAccessKey=<key>` for a policy.
    pub fn policy_connection_string(&self, policy: &str, host: &str) -> Option<String> {
        let st = self.state();
        let p = st.data.policies.get(policy)?;
        Some(format!(
            "HostName={host};SharedAccessKeyName={policy};SharedAccessKey={}",
            p.primary_key
        ))
    }

    /// Names of the shared access policies.
    pub fn policy_names(&self) -> Vec<String> {
        self.state().data.policies.keys().cloned().collect()
    }

    /// Module connection string for a registered module (tests and the demo use it).
    pub fn module_connection_string(&self, device_id: &str, module_id: &str) -> Option<String> {
        let st = self.state();
        let m = st.data.devices.get(device_id)?.modules.get(module_id)?;
        Some(format!(
            "HostName={};DeviceId={device_id};ModuleId={module_id};SharedAccessKey={}",
            self.inner.hub_name, m.primary_key
        ))
    }

    /// Meters operations at `tier`'s published rates from now on (full buckets, counts
    /// reset); [`Tier::Off`] meters nothing.
    pub fn set_throttle(&self, tier: Tier, units: u32) {
        *lock(&self.inner.throttle) = Throttle::new(tier, units, std::time::Instant::now());
    }

    /// Meters with `throttle` from now on (rates of one's own, another shaping queue).
    pub fn replace_throttle(&self, throttle: Throttle) {
        *lock(&self.inner.throttle) = throttle;
    }

    /// The tier and units being enforced.
    pub fn throttle_tier(&self) -> (Tier, u32) {
        let t = lock(&self.inner.throttle);
        (t.tier(), t.units())
    }

    /// Operations accepted, delayed and throttled per kind since the tier was set.
    pub fn throttle_counts(&self) -> throttle::Counts {
        lock(&self.inner.throttle).counts()
    }

    /// Asks the tier's throttle about one operation of `kind` arriving now; a refusal is
    /// announced as [`SimEvent::Throttled`].
    pub fn admit(&self, kind: throttle::Kind) -> Admission {
        let admission = lock(&self.inner.throttle).admit(kind, std::time::Instant::now());
        if admission == Admission::Throttled {
            self.emit(SimEvent::Throttled { kind });
        }
        admission
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    pub(super) fn emit(&self, event: SimEvent) {
        let _ = self.inner.events.send(event);
    }

    /// Numbers a change to the durable state; call while holding the state lock.
    pub(super) fn snapshot(&self, _st: &State) -> Ticket {
        self.inner.store.ticket()
    }

    /// Returns once the change is durable (one write may cover many changes). Called
    /// after the state lock is released.
    pub(super) fn commit(&self, ticket: Ticket) -> Result<(), HubError> {
        let current = || {
            // Copy under the lock, encode outside it: copying is several times cheaper
            // than encoding a hub of many modules, and the lock holds up every client.
            let (generation, data) = {
                let st = self.state();
                (self.inner.store.last_change(), st.data.clone())
            };
            self.inner.store.encode(generation, &data)
        };
        self.inner.store.commit(ticket, current).map_err(|e| {
            // The client gets a generic 500; the cause is logged here, once.
            tracing::error!(error = %e, dir = %self.inner.store.dir().display(), "emulator state write failed");
            HubError::server_error("state could not be persisted")
        })
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Faults {
    /// Closes every client connection now, as a network outage would.
    pub fn drop_all_connections(&self) {
        self.hub.drop_all_connections();
    }

    /// The next `n` CONNECTs are refused (CONNACK 5), as during an outage of the hub's
    /// front door.
    pub fn refuse_next_connects(&self, n: u32) {
        self.hub.state().faults.refuse_connects = n;
    }

    /// The next `n` twin operations (GET or reported PATCH) are answered 429.
    pub fn throttle_twin_ops(&self, n: u32) {
        self.hub.state().faults.throttle_twin_ops = n;
    }

    /// The next `n` twin operations (GET or reported PATCH) are answered 500, as during
    /// an internal failure of the hub; the operation does not take effect.
    pub fn fail_twin_ops(&self, n: u32) {
        self.hub.state().faults.fail_twin_ops = n;
    }

    /// Twin operations are answered 429 for `period` from now.
    pub fn throttle_twin_for(&self, period: Duration) {
        self.hub.state().faults.throttle_twin_until = Some(std::time::Instant::now() + period);
    }

    /// The responses to the next `n` twin operations are lost (the operation itself takes
    /// effect, as when a response is lost on the way back).
    pub fn drop_twin_responses(&self, n: u32) {
        self.hub.state().faults.drop_twin_responses = n;
    }

    /// Twin responses are delivered after `delay` (None: promptly).
    pub fn delay_twin_responses(&self, delay: Option<Duration>) {
        self.hub.state().faults.delay_twin_responses = delay;
    }

    /// The next `n` desired-property notifications are lost (the twin still changes, as
    /// when a QoS 0 publish is lost).
    pub fn drop_desired_notifications(&self, n: u32) {
        self.hub.state().faults.drop_desired = n;
    }

    /// The next `n` desired-property notifications are delivered twice.
    pub fn duplicate_desired_notifications(&self, n: u32) {
        self.hub.state().faults.duplicate_desired = n;
    }

    /// The next `n` desired-property notifications are each held back and delivered just
    /// after the notification that follows it, so the module sees versions out of order.
    pub fn reorder_desired_notifications(&self, n: u32) {
        self.hub.state().faults.reorder_desired = n;
    }

    /// The next `n` reported patches are applied and persisted, then the connection is
    /// closed before their 204 leaves: the module cannot know the patch took effect.
    pub fn drop_connection_after_reported(&self, n: u32) {
        self.hub.state().faults.drop_after_reported = n;
    }

    /// The hub's clock runs `offset_secs` ahead of the machine's (negative: behind); SAS
    /// tokens are judged against it, as against a hub whose clock differs from the client's.
    pub fn set_clock_offset(&self, offset_secs: i64) {
        self.hub.state().faults.clock_offset_secs = offset_secs;
    }

    /// Sends `module` a desired-property notification with any topic `$version` and any
    /// payload, as a broken hub or a corrupted link might; the twin itself is unchanged.
    /// Returns whether it was queued for a connected module.
    pub fn send_raw_desired(
        &self,
        module: &ModuleKey,
        version: Option<u64>,
        payload: &[u8],
    ) -> bool {
        let topic = match version {
            Some(v) => format!("$iothub/twin/PATCH/properties/desired/?$version={v}"),
            None => "$iothub/twin/PATCH/properties/desired/".to_string(),
        };
        let st = self.hub.state();
        self.hub
            .push_desired(&st, module, topic, Bytes::copy_from_slice(payload))
    }

    /// Twin requests (GET or reported PATCH) received since the hub started, including
    /// those answered 429 and those whose answer was dropped.
    pub fn twin_requests(&self) -> u64 {
        self.hub.state().twin_requests
    }

    /// Clears every fault (a notification held back for reordering is delivered now).
    pub fn clear(&self) {
        let mut st = self.hub.state();
        let held = st.faults.held_desired.take();
        st.faults = FaultState::default();
        if let Some((module, topic, payload)) = held {
            self.hub.push_desired(&st, &module, topic, payload);
        }
    }
}
