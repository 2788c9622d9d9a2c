//! Registration and operation-status requests, whatever the transport: authentication
//! (a SAS token for `{idScope}/registrations/{registrationId}` signed with the enrollment's
//! key for that id), the assignment (the device created or updated in the hub with that
//! key), operations that stay `assigning` for as many polls as the test asked, and the
//! answers as DPS words them (PROTOCOL §12.1).
//!
//! Error answers use DPS's body `{"errorCode","trackingId","message","timestampUtc"}`.
//! `401002` (Unauthorized) and `400004` (BadRequest) are codes real DPS sends; the others
//! are the emulator's choice within the documented HTTP statuses (`how-to-troubleshoot-dps`:
//! 404 for a DPS instance that does not exist, 429 throttled).

use std::time::{Instant, SystemTime};

use edgetwin::identity::{SasError, SasToken, SharedKey};
use edgetwin::provision::dps::derive_device_key;
use serde_json::{json, Value};

use super::{Dps, DpsCall, DpsCallKind, State};
use crate::twin_doc::timestamp;

/// One answer: HTTP status (also the MQTT response topic's), JSON body, `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct DpsAnswer {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u32>,
}

impl DpsAnswer {
    fn error(status: u16, code: u32, message: impl Into<String>) -> Self {
        DpsAnswer {
            status,
            body: json!({
                "errorCode": code,
                "trackingId": uuid::Uuid::new_v4().to_string(),
                "message": message.into(),
                "timestampUtc": timestamp(SystemTime::now()),
            }),
            retry_after: None,
        }
    }
}

/// How an operation ends once its `assigning` polls are used up.
#[derive(Debug, Clone)]
enum Outcome {
    Assigned {
        device_id: String,
        substatus: &'static str,
    },
    Disabled,
    Failed(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Operation {
    registration_id: String,
    polls_left: u32,
    outcome: Outcome,
    created: String,
    updated: String,
}

/// The key and device id a registration id authenticates with.
struct Enrollment {
    key: SharedKey,
    device_id: String,
    enabled: bool,
}

impl Dps {
    /// `PUT .../register` (or its MQTT twin): authenticates, decides the outcome, creates
    /// or updates the device when assigned, and answers 202 `assigning` with an operation.
    pub async fn register(
        &self,
        scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> DpsAnswer {
        let answer = self
            .try_register(scope, registration_id, authorization, body)
            .await;
        self.log(DpsCallKind::Register, registration_id, &answer);
        answer
    }

    async fn try_register(
        &self,
        scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> DpsAnswer {
        let enrollment = {
            let mut st = self.state();
            if let Some(throttled) = throttle(&mut st) {
                return throttled;
            }
            match self.authenticate(&st, scope, registration_id, authorization) {
                Ok(e) => e,
                Err(refused) => return refused,
            }
        };
        if let Err(bad) = check_body(registration_id, body) {
            return bad;
        }
        let outcome = {
            let mut st = self.state();
            if !enrollment.enabled {
                Some(Outcome::Disabled)
            } else if st.faults.fail_next > 0 {
                st.faults.fail_next -= 1;
                Some(Outcome::Failed(
                    "registration failed (fault injected by the emulator)".into(),
                ))
            } else {
                None
            }
        };
        let outcome = match outcome {
            Some(o) => o,
            None => self.assign(registration_id, &enrollment).await,
        };
        let operation_id = format!("4.{:016x}.{}", rand::random::<u64>(), uuid::Uuid::new_v4());
        let now = timestamp(SystemTime::now());
        let mut st = self.state();
        let retry_after = st.faults.retry_after_secs;
        let operation = Operation {
            registration_id: registration_id.to_owned(),
            polls_left: st.faults.assigning_polls,
            outcome,
            created: now.clone(),
            updated: now,
        };
        st.operations.insert(operation_id.clone(), operation);
        DpsAnswer {
            status: 202,
            body: json!({"operationId": operation_id, "status": "assigning"}),
            retry_after: Some(retry_after),
        }
    }

    /// `GET .../operations/{operationId}` (or its MQTT twin): `assigning` with
    /// `Retry-After` while polls are left, then 200 with the final state.
    pub fn operation_status(
        &self,
        scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
        operation_id: &str,
    ) -> DpsAnswer {
        let answer = self.try_operation_status(scope, registration_id, authorization, operation_id);
        self.log(DpsCallKind::Poll, registration_id, &answer);
        answer
    }

    fn try_operation_status(
        &self,
        scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
        operation_id: &str,
    ) -> DpsAnswer {
        let mut st = self.state();
        if let Some(throttled) = throttle(&mut st) {
            return throttled;
        }
        if let Err(refused) = self.authenticate(&st, scope, registration_id, authorization) {
            return refused;
        }
        let retry_after = st.faults.retry_after_secs;
        let hub = self.assigned_hub().to_owned();
        let Some(op) = st
            .operations
            .get_mut(operation_id)
            .filter(|op| op.registration_id.eq_ignore_ascii_case(registration_id))
        else {
            return DpsAnswer::error(
                404,
                404002,
                format!("no operation {operation_id} for registration {registration_id}"),
            );
        };
        if op.polls_left > 0 {
            op.polls_left -= 1;
            return DpsAnswer {
                status: 202,
                body: json!({
                    "operationId": operation_id,
                    "status": "assigning",
                    "registrationState": {"registrationId": op.registration_id, "status": "assigning"},
                }),
                retry_after: Some(retry_after),
            };
        }
        op.updated = timestamp(SystemTime::now());
        let state = match &op.outcome {
            Outcome::Assigned {
                device_id,
                substatus,
            } => json!({
                "registrationId": op.registration_id,
                "createdDateTimeUtc": op.created,
                "assignedHub": hub,
                "deviceId": device_id,
                "status": "assigned",
                "substatus": substatus,
                "lastUpdatedDateTimeUtc": op.updated,
                "etag": uuid::Uuid::new_v4().simple().to_string(),
            }),
            Outcome::Disabled => json!({
                "registrationId": op.registration_id,
                "createdDateTimeUtc": op.created,
                "status": "disabled",
                "errorMessage": "the enrollment is disabled",
                "lastUpdatedDateTimeUtc": op.updated,
            }),
            Outcome::Failed(message) => json!({
                "registrationId": op.registration_id,
                "createdDateTimeUtc": op.created,
                "status": "failed",
                "errorCode": 500000,
                "errorMessage": message,
                "lastUpdatedDateTimeUtc": op.updated,
            }),
        };
        let status = state["status"].clone();
        DpsAnswer {
            status: 200,
            body: json!({"operationId": operation_id, "status": status, "registrationState": state}),
            retry_after: None,
        }
    }

    /// The enrollment `registration_id` authenticates with, if the token is right.
    fn authenticate(
        &self,
        st: &State,
        scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
    ) -> Result<Enrollment, DpsAnswer> {
        if !scope.eq_ignore_ascii_case(self.id_scope()) {
            return Err(DpsAnswer::error(
                404,
                404001,
                format!("no DPS instance has the ID scope {scope}"),
            ));
        }
        if !valid_registration_id(registration_id) {
            return Err(DpsAnswer::error(
                400,
                400004,
                "BadRequest: invalid registration id",
            ));
        }
        let unauthorized =
            |why: &str| DpsAnswer::error(401, 401002, format!("Unauthorized: {why}"));
        let header = authorization.ok_or_else(|| unauthorized("no SharedAccessSignature"))?;
        let token = SasToken::parse(header.trim())
            .map_err(|e| unauthorized(&format!("malformed token: {e}")))?;
        let resource = format!("{scope}/registrations/{registration_id}");
        if !token.resource.eq_ignore_ascii_case(&resource) {
            return Err(unauthorized("the token's sr is not this registration"));
        }
        if token
            .key_name
            .as_deref()
            .is_some_and(|n| n != "registration")
        {
            return Err(unauthorized("skn must be `registration` when given"));
        }
        let enrollment = match st.individuals.get(&registration_id.to_ascii_lowercase()) {
            Some(e) => Enrollment {
                key: e.key.clone(),
                device_id: e
                    .device_id
                    .clone()
                    .unwrap_or_else(|| registration_id.to_owned()),
                enabled: e.enabled,
            },
            None => Enrollment {
                key: derive_device_key(&self.inner.group_key, registration_id),
                device_id: registration_id.to_owned(),
                enabled: st.group_enabled,
            },
        };
        // Judged by the hub's clock, as its `Date` says (the clock-offset fault included).
        let now = self
            .hub()
            .clock()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match token.verify(&enrollment.key, now) {
            Ok(()) => Ok(enrollment),
            Err(SasError::Expired { expired_for_secs }) => Err(unauthorized(&format!(
                "token expired {expired_for_secs} s ago"
            ))),
            Err(_) => Err(unauthorized("signature does not match the enrollment key")),
        }
    }

    /// Creates the device with the enrollment's key, or gives an existing one that key.
    async fn assign(&self, registration_id: &str, enrollment: &Enrollment) -> Outcome {
        let device_id = enrollment.device_id.clone();
        let key = enrollment.key.as_base64().to_owned();
        let hub = self.hub().clone();
        let id = device_id.clone();
        let put = tokio::task::spawn_blocking(move || {
            let body = json!({
                "deviceId": id,
                "status": "enabled",
                "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
            });
            let if_match = hub.get_device(&id).is_ok().then_some("*");
            hub.put_device(&id, &body, if_match)
        })
        .await;
        match put {
            Ok(Ok(_)) => {
                let first = self
                    .state()
                    .registered
                    .insert(
                        registration_id.to_ascii_lowercase(),
                        timestamp(SystemTime::now()),
                    )
                    .is_none();
                let substatus = if first {
                    "initialAssignment"
                } else {
                    "reprovisionedToInitialAssignment"
                };
                Outcome::Assigned {
                    device_id,
                    substatus,
                }
            }
            Ok(Err(e)) => {
                Outcome::Failed(format!("the hub refused device {device_id}: {}", e.message))
            }
            Err(_) => Outcome::Failed("the assignment failed unexpectedly".into()),
        }
    }

    fn log(&self, kind: DpsCallKind, registration_id: &str, answer: &DpsAnswer) {
        tracing::debug!(
            ?kind,
            registration = registration_id,
            status = answer.status,
            "DPS request"
        );
        self.state().calls.push(DpsCall {
            kind,
            registration_id: registration_id.to_owned(),
            status: answer.status,
            at: Instant::now(),
        });
    }
}

/// 429 if the throttling fault is armed.
fn throttle(st: &mut State) -> Option<DpsAnswer> {
    if st.faults.throttle_next == 0 {
        return None;
    }
    st.faults.throttle_next -= 1;
    let mut answer = DpsAnswer::error(429, 429001, "Operations are being throttled");
    answer.retry_after = Some(st.faults.retry_after_secs);
    Some(answer)
}

/// The body is `{"registrationId": ..., "payload": ...}`; its id, when given, is the path's.
fn check_body(registration_id: &str, body: &[u8]) -> Result<(), DpsAnswer> {
    let bad = |why: &str| DpsAnswer::error(400, 400004, format!("BadRequest: {why}"));
    let doc: Value = serde_json::from_slice(body).map_err(|_| bad("body is not JSON"))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| bad("body is not a JSON object"))?;
    match obj.get("registrationId") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(id)) if id.eq_ignore_ascii_case(registration_id) => Ok(()),
        Some(_) => Err(bad("registrationId differs from the path")),
    }
}

/// Up to 128 of alphanumerics and `-._:` (the REST reference's rule).
fn valid_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}
