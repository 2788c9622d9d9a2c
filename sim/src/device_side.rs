//! What a connected module can do to the hub (PROTOCOL §3–§5): connect with a SAS token,
//! hold persistent subscriptions, GET its twin, patch reported properties, answer direct
//! methods and send telemetry. Called by the MQTT front end, which owns the sockets;
//! replies travel back through the connection's outbound channel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::errors::HubError;
use super::hub::{
    hub_unix_now, is_supported_filter, now_ts, Accepted, Connection, Hub, ModuleKey, Outbound,
    Refused, Right, SimEvent, State, Telemetry, DESIRED_FILTER, MAX_SUBSCRIPTIONS, METHODS_FILTER,
    OUTBOUND_CAPACITY, TELEMETRY_KEEP,
};
use super::throttle::{Admission, Kind};
use edgetwin::identity::{SasError, SasToken, SharedKey};

/// Largest device-to-cloud message the hub accepts (PROTOCOL §3.6).
pub const MAX_TELEMETRY_BYTES: usize = 256 * 1024;

/// How a twin operation's reply is to be delivered, after faults are applied.
enum Delivery {
    Now,
    After(Duration),
    Dropped,
}

impl Hub {
    /// Authenticates a CONNECT (client id `device/module`, user name
    /// `{hub}/{device}/{module}/?api-version=...`, password a SAS token) and registers the
    /// connection, closing any older one of the same identity.
    pub fn connect(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        clean_session: bool,
    ) -> Result<Accepted, Refused> {
        let result = self.try_connect(client_id, username, password, clean_session);
        if let Err(reason) = &result {
            self.emit(SimEvent::ConnectRefused {
                client_id: client_id.to_string(),
                reason: reason.to_string(),
            });
        }
        result
    }

    fn try_connect(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        clean_session: bool,
    ) -> Result<Accepted, Refused> {
        let (device_id, module_id) = client_id
            .split_once('/')
            .filter(|(d, m)| !d.is_empty() && !m.is_empty() && !m.contains('/'))
            .ok_or_else(|| {
                Refused::BadIdentity("client id must be {deviceId}/{moduleId}".into())
            })?;
        let module = ModuleKey {
            device_id: device_id.to_string(),
            module_id: module_id.to_string(),
        };
        let user_path = username.split_once("/?").map_or(username, |(p, _)| p);
        let expected = format!("{}/{}/{}", self.hub_name(), device_id, module_id);
        if !user_path
            .trim_end_matches('/')
            .eq_ignore_ascii_case(&expected)
        {
            return Err(Refused::BadIdentity(format!(
                "user name must start with {expected}/?api-version="
            )));
        }
        let token = SasToken::parse(password).map_err(|e| Refused::BadToken(e.to_string()))?;
        let resource = format!(
            "{}/devices/{}/modules/{}",
            self.hub_name(),
            device_id,
            module_id
        );
        if !token.covers(&resource) {
            return Err(Refused::BadToken(format!(
                "token scope does not cover {resource}"
            )));
        }

        let mut st = self.state();
        if st.faults.refuse_connects > 0 {
            st.faults.refuse_connects -= 1;
            return Err(Refused::Fault);
        }
        let device = st
            .data
            .devices
            .get(device_id)
            .ok_or_else(|| Refused::UnknownModule(module.to_string()))?;
        if !device.enabled {
            return Err(Refused::BadIdentity(format!(
                "device {device_id} is disabled"
            )));
        }
        let record = device
            .modules
            .get(module_id)
            .ok_or_else(|| Refused::UnknownModule(module.to_string()))?;
        let keys: Vec<String> = match &token.key_name {
            None => vec![record.primary_key.clone(), record.secondary_key.clone()],
            Some(policy) => match st.data.policies.get(policy) {
                Some(p) if p.rights.contains(&Right::DeviceConnect) => {
                    vec![p.primary_key.clone(), p.secondary_key.clone()]
                }
                _ => {
                    return Err(Refused::BadToken(format!(
                        "policy {policy} lacks DeviceConnect"
                    )))
                }
            },
        };
        let offset = st.faults.clock_offset_secs;
        let now = hub_unix_now(offset);
        // A genuine but expired token says more than a signature mismatch with the other key.
        let mut outcome = Err(SasError::BadSignature);
        for key in keys.iter().filter_map(|k| SharedKey::from_base64(k).ok()) {
            outcome = token.verify(&key, now);
            if outcome.is_ok() || matches!(outcome, Err(SasError::Expired { .. })) {
                break;
            }
        }
        outcome.map_err(|e| Refused::BadToken(e.to_string()))?;

        // One connection per identity: the newer one wins (400027 on the real hub).
        if let Some(old) = st.connections.remove(&module) {
            let _ = old.tx.try_send(Outbound::Close {
                reason: "superseded by a newer connection of the same identity",
            });
            if old.clean_session {
                st.volatile_sessions.remove(&old.client_id);
            }
        }
        let mut pending = None;
        let session_present = if clean_session {
            if st.data.sessions.remove(client_id).is_some() {
                pending = Some(self.snapshot(&st));
            }
            st.volatile_sessions
                .insert(client_id.to_string(), BTreeSet::new());
            false
        } else {
            st.data.sessions.contains_key(client_id)
        };
        let conn_id = st.next_conn_id;
        st.next_conn_id += 1;
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        st.connections.insert(
            module.clone(),
            Connection {
                conn_id,
                client_id: client_id.to_string(),
                clean_session,
                tx,
            },
        );
        touch(&mut st, &module);
        drop(st);
        if let Some(p) = pending {
            let _ = self.commit(p);
        }
        self.emit(SimEvent::Connected {
            module: module.clone(),
            session_present,
        });
        Ok(Accepted {
            conn_id,
            module,
            session_present,
            // The hub's clock reaches the expiry `offset` seconds earlier than the machine's.
            expires_at: SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(
                    token.expiry.saturating_add_signed(-offset),
                ))
                .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX.into())),
            outbound: rx,
        })
    }

    /// The connection `conn_id` has gone. A newer connection of the same identity is left
    /// alone.
    pub fn disconnect(&self, conn_id: u64, module: &ModuleKey) {
        let mut st = self.state();
        let current = st
            .connections
            .get(module)
            .is_some_and(|c| c.conn_id == conn_id);
        if !current {
            return;
        }
        if let Some(c) = st.connections.remove(module) {
            if c.clean_session {
                st.volatile_sessions.remove(&c.client_id);
            }
        }
        touch(&mut st, module);
        drop(st);
        self.emit(SimEvent::Disconnected {
            module: module.clone(),
        });
    }

    /// SUBSCRIBE: each filter is granted (QoS 1) or refused. Granted filters persist in the
    /// client's session when it connected with clean session 0.
    pub fn subscribe(&self, conn_id: u64, module: &ModuleKey, filters: &[String]) -> Vec<bool> {
        let mut st = self.state();
        let Some((client_id, clean)) = current(&st, conn_id, module) else {
            return vec![false; filters.len()];
        };
        let st_ref = &mut *st;
        let set = if clean {
            st_ref.volatile_sessions.entry(client_id).or_default()
        } else {
            st_ref.data.sessions.entry(client_id).or_default()
        };
        let before = set.clone();
        let granted: Vec<bool> = filters
            .iter()
            .map(|f| {
                let ok =
                    is_supported_filter(f) && (set.contains(f) || set.len() < MAX_SUBSCRIPTIONS);
                if ok {
                    set.insert(f.clone());
                }
                ok
            })
            .collect();
        let changed = *set != before;
        let pending = (changed && !clean).then(|| self.snapshot(&st));
        drop(st);
        if let Some(p) = pending {
            let _ = self.commit(p);
        }
        self.emit(SimEvent::Subscribed {
            module: module.clone(),
            filters: filters.to_vec(),
        });
        granted
    }

    pub fn unsubscribe(&self, conn_id: u64, module: &ModuleKey, filters: &[String]) {
        let mut st = self.state();
        let Some((client_id, clean)) = current(&st, conn_id, module) else {
            return;
        };
        let st_ref = &mut *st;
        let set = if clean {
            st_ref.volatile_sessions.get_mut(&client_id)
        } else {
            st_ref.data.sessions.get_mut(&client_id)
        };
        let changed = set.is_some_and(|s| filters.iter().fold(false, |acc, f| s.remove(f) | acc));
        let pending = (changed && !clean).then(|| self.snapshot(&st));
        drop(st);
        if let Some(p) = pending {
            let _ = self.commit(p);
        }
    }

    /// `$iothub/twin/GET/?$rid=` — answered even without a `twin/res` subscription, as the
    /// Python SDK relies on (PROTOCOL §4.4).
    /// Under a throttling tier the GET may be carried out late (shaping) or answered 429.
    pub fn twin_get(&self, conn_id: u64, module: &ModuleKey, rid: &str) {
        match self.admit(Kind::TwinRead) {
            Admission::Now => self.twin_get_admitted(conn_id, module, rid, false),
            Admission::Throttled => self.twin_get_admitted(conn_id, module, rid, true),
            Admission::After(delay) => {
                let (hub, module, rid) = (self.clone(), module.clone(), rid.to_string());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    hub.twin_get_admitted(conn_id, &module, &rid, false);
                });
            }
        }
    }

    fn twin_get_admitted(&self, conn_id: u64, module: &ModuleKey, rid: &str, throttled: bool) {
        let mut st = self.state();
        if current(&st, conn_id, module).is_none() {
            return;
        }
        st.twin_requests += 1;
        touch(&mut st, module);
        let (status, body) = if throttled || twin_throttled(&mut st) {
            (429, error_body(&HubError::throttled()))
        } else if twin_failed(&mut st) {
            (
                500,
                error_body(&HubError::server_error("internal error (fault)")),
            )
        } else {
            match st
                .data
                .devices
                .get(&module.device_id)
                .and_then(|d| d.modules.get(&module.module_id))
            {
                Some(m) => (200, m.twin.device_view().to_string()),
                None => (
                    404,
                    error_body(&HubError::module_not_found(
                        &module.device_id,
                        &module.module_id,
                    )),
                ),
            }
        };
        let delivery = twin_delivery(&mut st);
        let topic = format!("$iothub/twin/res/{status}/?$rid={rid}");
        self.deliver(&st, module, topic, Bytes::from(body), delivery);
        drop(st);
        self.emit(SimEvent::TwinGet {
            module: module.clone(),
            status,
        });
    }

    /// `$iothub/twin/PATCH/properties/reported/?$rid=[&$version=]` — merged, persisted,
    /// then answered 204 with the new reported `$version`.
    /// Under a throttling tier the patch may be carried out late (shaping) or answered 429.
    pub fn twin_patch_reported(
        &self,
        conn_id: u64,
        module: &ModuleKey,
        rid: &str,
        expected_version: Option<u64>,
        payload: &[u8],
    ) {
        let admission = self.admit(Kind::TwinUpdate);
        if let Admission::After(delay) = admission {
            let (hub, module, rid) = (self.clone(), module.clone(), rid.to_string());
            let payload = payload.to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                hub.patch_reported_admitted(
                    conn_id,
                    &module,
                    &rid,
                    expected_version,
                    &payload,
                    false,
                );
            });
            return;
        }
        let throttled = admission == Admission::Throttled;
        self.patch_reported_admitted(conn_id, module, rid, expected_version, payload, throttled);
    }

    fn patch_reported_admitted(
        &self,
        conn_id: u64,
        module: &ModuleKey,
        rid: &str,
        expected_version: Option<u64>,
        payload: &[u8],
        throttled: bool,
    ) {
        let mut st = self.state();
        if current(&st, conn_id, module).is_none() {
            return;
        }
        st.twin_requests += 1;
        touch(&mut st, module);
        let result = if throttled || twin_throttled(&mut st) {
            Err(HubError::throttled())
        } else if twin_failed(&mut st) {
            Err(HubError::server_error("internal error (fault)"))
        } else {
            apply_reported(&mut st, module, expected_version, payload)
        };
        let pending = result.is_ok().then(|| self.snapshot(&st));
        drop(st);
        let result = match pending {
            Some(p) => self.commit(p).and(result),
            None => result,
        };
        let mut st = self.state();
        let cut = result.is_ok() && st.faults.drop_after_reported > 0;
        let delivery = if cut {
            st.faults.drop_after_reported -= 1;
            Delivery::Dropped
        } else {
            twin_delivery(&mut st)
        };
        let (topic, body, event) = match result {
            Ok((version, patch)) => (
                format!("$iothub/twin/res/204/?$rid={rid}&$version={version}"),
                Bytes::new(),
                SimEvent::ReportedPatched {
                    module: module.clone(),
                    version,
                    patch,
                },
            ),
            Err(e) => (
                format!("$iothub/twin/res/{}/?$rid={rid}", e.status),
                Bytes::from(error_body(&e)),
                SimEvent::ReportedRejected {
                    module: module.clone(),
                    status: e.status,
                },
            ),
        };
        self.deliver(&st, module, topic, body, delivery);
        drop(st);
        self.emit(event);
        if cut {
            self.close_connection(conn_id, module, "connection dropped before the 204 (fault)");
        }
    }

    /// Closes one connection from the hub's side (fault injection).
    fn close_connection(&self, conn_id: u64, module: &ModuleKey, reason: &'static str) {
        let mut st = self.state();
        if current(&st, conn_id, module).is_none() {
            return;
        }
        if let Some(c) = st.connections.remove(module) {
            let _ = c.tx.try_send(Outbound::Close { reason });
            if c.clean_session {
                st.volatile_sessions.remove(&c.client_id);
            }
        }
        drop(st);
        self.emit(SimEvent::Disconnected {
            module: module.clone(),
        });
    }

    /// `$iothub/methods/res/{status}/?$rid=` — completes a pending service invocation.
    pub fn method_response(&self, module: &ModuleKey, rid: &str, status: i32, payload: &[u8]) {
        let mut st = self.state();
        touch(&mut st, module);
        let Some(pending) = st.pending_methods.remove(rid) else {
            return;
        };
        if &pending.module != module {
            // Another module cannot answer this request; keep waiting for the right one.
            st.pending_methods.insert(rid.to_string(), pending);
            return;
        }
        drop(st);
        let body = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
        };
        let _ = pending.reply.send((status, body));
        self.emit(SimEvent::MethodResponded {
            module: module.clone(),
            status,
        });
    }

    /// `devices/{d}/modules/{m}/messages/events/{props}` — stored for inspection.
    pub fn telemetry(
        &self,
        module: &ModuleKey,
        properties: Vec<(String, Option<String>)>,
        body: Bytes,
    ) -> Result<u64, HubError> {
        let size = body.len()
            + properties
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                .sum::<usize>();
        if size > MAX_TELEMETRY_BYTES {
            return Err(HubError::too_large(format!(
                "message of {size} bytes exceeds {MAX_TELEMETRY_BYTES}"
            )));
        }
        let mut st = self.state();
        touch(&mut st, module);
        st.telemetry_seq += 1;
        let seq = st.telemetry_seq;
        if st.telemetry.len() == TELEMETRY_KEEP {
            st.telemetry.pop_front();
        }
        st.telemetry.push_back(Telemetry {
            seq,
            module: module.clone(),
            properties,
            body,
            enqueued_at: SystemTime::now(),
        });
        drop(st);
        self.emit(SimEvent::Telemetry {
            module: module.clone(),
            seq,
        });
        Ok(seq)
    }

    /// Telemetry the hub kept from one module, oldest first.
    pub fn telemetry_of(&self, module: &ModuleKey) -> Vec<Telemetry> {
        self.state()
            .telemetry
            .iter()
            .filter(|t| &t.module == module)
            .cloned()
            .collect()
    }

    /// Whether a module is connected right now.
    pub fn is_connected(&self, module: &ModuleKey) -> bool {
        self.state().connections.contains_key(module)
    }

    /// Closes every client connection (fault injection and shutdown).
    pub fn drop_all_connections(&self) {
        let mut st = self.state();
        let dropped: Vec<ModuleKey> = st
            .connections
            .drain()
            .map(|(module, c)| {
                let _ = c.tx.try_send(Outbound::Close {
                    reason: "connection dropped by the hub",
                });
                module
            })
            .collect();
        st.volatile_sessions.clear();
        drop(st);
        for module in dropped {
            self.emit(SimEvent::Disconnected { module });
        }
    }

    /// Pushes a desired-property notification to the module if it is connected and
    /// subscribed, subject to the notification faults (drop, duplicate, reorder). Returns
    /// whether it was sent (or held back for reordering).
    pub(super) fn notify_desired(
        &self,
        st: &mut State,
        module: &ModuleKey,
        payload: &Value,
        version: u64,
    ) -> bool {
        if !subscribed(st, module, DESIRED_FILTER) {
            return false;
        }
        let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
        let payload = Bytes::from(payload.to_string());
        let f = &mut st.faults;
        if f.drop_desired > 0 {
            f.drop_desired -= 1;
            return false;
        }
        if f.reorder_desired > 0 && f.held_desired.is_none() {
            f.reorder_desired -= 1;
            f.held_desired = Some((module.clone(), topic, payload));
            return true;
        }
        let duplicate = f.duplicate_desired > 0;
        if duplicate {
            f.duplicate_desired -= 1;
        }
        let held = f.held_desired.take();
        let sent = self.push_desired(st, module, topic.clone(), payload.clone());
        if duplicate {
            self.push_desired(st, module, topic, payload);
        }
        if let Some((m, t, p)) = held {
            self.push_desired(st, &m, t, p);
        }
        sent
    }

    /// Delivers one desired notification now.
    pub(super) fn push_desired(
        &self,
        st: &State,
        module: &ModuleKey,
        topic: String,
        payload: Bytes,
    ) -> bool {
        self.deliver(st, module, topic, payload, Delivery::Now)
    }

    /// Sends a method request to the module if it is connected and subscribed.
    pub(super) fn send_method_request(
        &self,
        st: &State,
        module: &ModuleKey,
        name: &str,
        rid: &str,
        payload: &Value,
    ) -> bool {
        if !subscribed(st, module, METHODS_FILTER) {
            return false;
        }
        let name = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
        let topic = format!("$iothub/methods/POST/{name}/?$rid={rid}");
        self.deliver(
            st,
            module,
            topic,
            Bytes::from(payload.to_string()),
            Delivery::Now,
        )
    }

    fn deliver(
        &self,
        st: &State,
        module: &ModuleKey,
        topic: String,
        payload: Bytes,
        how: Delivery,
    ) -> bool {
        let Some(conn) = st.connections.get(module) else {
            return false;
        };
        let msg = Outbound::Publish { topic, payload };
        match how {
            Delivery::Dropped => false,
            Delivery::Now => match conn.tx.try_send(msg) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // A client this far behind is stalled; cut it as the real hub would.
                    tracing::warn!(%module, "emulator: outbound queue full, closing connection");
                    let hub = self.clone();
                    let module = module.clone();
                    let conn_id = conn.conn_id;
                    tokio::spawn(async move { hub.disconnect(conn_id, &module) });
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            Delivery::After(delay) => {
                let tx = conn.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(msg).await;
                });
                true
            }
        }
    }
}

fn current(st: &State, conn_id: u64, module: &ModuleKey) -> Option<(String, bool)> {
    st.connections
        .get(module)
        .filter(|c| c.conn_id == conn_id)
        .map(|c| (c.client_id.clone(), c.clean_session))
}

fn subscribed(st: &State, module: &ModuleKey, filter: &str) -> bool {
    let Some(c) = st.connections.get(module) else {
        return false;
    };
    let sessions = if c.clean_session {
        st.volatile_sessions.get(&c.client_id)
    } else {
        st.data.sessions.get(&c.client_id)
    };
    sessions.is_some_and(|s| s.contains(filter))
}

fn touch(st: &mut State, module: &ModuleKey) {
    if let Some(m) = st
        .data
        .devices
        .get_mut(&module.device_id)
        .and_then(|d| d.modules.get_mut(&module.module_id))
    {
        m.last_activity = now_ts();
    }
}

fn twin_throttled(st: &mut State) -> bool {
    let f = &mut st.faults;
    if f.throttle_twin_ops > 0 {
        f.throttle_twin_ops -= 1;
        return true;
    }
    f.throttle_twin_until
        .is_some_and(|until| Instant::now() < until)
}

fn twin_failed(st: &mut State) -> bool {
    let f = &mut st.faults;
    if f.fail_twin_ops > 0 {
        f.fail_twin_ops -= 1;
        return true;
    }
    false
}

fn twin_delivery(st: &mut State) -> Delivery {
    let f = &mut st.faults;
    if f.drop_twin_responses > 0 {
        f.drop_twin_responses -= 1;
        return Delivery::Dropped;
    }
    f.delay_twin_responses
        .map_or(Delivery::Now, Delivery::After)
}

fn apply_reported(
    st: &mut State,
    module: &ModuleKey,
    expected_version: Option<u64>,
    payload: &[u8],
) -> Result<(u64, Value), HubError> {
    let patch: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(HubError::argument_invalid(
                "reported patch must be a JSON object",
            ))
        }
        Err(e) => {
            return Err(HubError::format_error(format!(
                "reported patch is not JSON: {e}"
            )))
        }
    };
    let record = st
        .data
        .devices
        .get_mut(&module.device_id)
        .and_then(|d| d.modules.get_mut(&module.module_id))
        .ok_or_else(|| HubError::module_not_found(&module.device_id, &module.module_id))?;
    if let Some(v) = expected_version {
        if v != record.twin.reported.version {
            return Err(HubError::precondition_failed(format!(
                "reported $version is {}, not {v}",
                record.twin.reported.version
            )));
        }
    }
    let version = record.twin.patch_reported(&patch, &now_ts())?;
    Ok((version, Value::Object(patch)))
}

fn error_body(e: &HubError) -> String {
    json!({ "errorCode": e.code, "message": e.message }).to_string()
}
