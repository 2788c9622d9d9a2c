//! DPS over MQTT (PROTOCOL §12.1) on the emulator's MQTT listener, as Microsoft's
//! `ProvisioningDeviceClient` uses it: CONNECT with client id = registration id, user name
//! `{idScope}/registrations/{registrationId}/api-version=...`, password a SAS token; SUBSCRIBE
//! `$dps/registrations/res/#`; PUBLISH `$dps/registrations/PUT/iotdps-register/?$rid={rid}`
//! and `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`;
//! answers on `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
//!
//! The CONNECT is accepted when it is well-formed; the token is judged on every request,
//! which then answers 401 on the response topic (what real DPS does). Answers go only to a
//! client that subscribed, at QoS 0. Anything else (other topics, QoS 2) closes the
//! connection, as on the hub.

use std::time::Duration;

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Protocol, QoS};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::connect::refuse_in_place;
use super::idle_limit;
use super::packet_io::{packet_name, PacketIo, ReadError};
use crate::dps::{Dps, DpsAnswer};

pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/?";
const STATUS_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";

/// `(scope, registration id)` when `user_name` is a DPS one:
/// `{idScope}/registrations/{registrationId}/api-version=...`. Module user names
/// (`{hub}/{device}/{module}/?api-version=...`) never match: their last part starts with `?`.
pub(super) fn dps_identity(user_name: &str) -> Option<(&str, &str)> {
    let mut parts = user_name.splitn(4, '/');
    let scope = parts.next()?;
    let literal = parts.next()?;
    let registration = parts.next()?;
    let query = parts.next()?;
    (literal == "registrations"
        && !scope.is_empty()
        && !registration.is_empty()
        && query.starts_with("api-version="))
    .then_some((scope, registration))
}

/// Serves one DPS client from its CONNECT on.
pub(super) async fn serve<S>(
    mut io: PacketIo<S>,
    connect: Connect,
    dps: Dps,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hub = dps.hub().clone();
    let client_id = connect.client_id.clone();
    let Some(login) = connect.login.as_ref().filter(|l| !l.password.is_empty()) else {
        let code = ConnectReturnCode::NotAuthorized;
        return refuse_in_place(
            &mut io,
            &hub,
            &client_id,
            code,
            "DPS CONNECT without a password",
            &shutdown,
        )
        .await;
    };
    let Some((scope, registration)) = dps_identity(&login.username) else {
        return;
    };
    let refusal = if connect.protocol != Protocol::V4 {
        Some((ConnectReturnCode::RefusedProtocolVersion, "only MQTT 3.1.1"))
    } else if !client_id.eq_ignore_ascii_case(registration) {
        Some((
            ConnectReturnCode::NotAuthorized,
            "the client id must be the registration id",
        ))
    } else {
        None
    };
    if let Some((code, reason)) = refusal {
        return refuse_in_place(&mut io, &hub, &client_id, code, reason, &shutdown).await;
    }
    let mut client = Client {
        dps,
        scope: scope.to_owned(),
        registration: registration.to_owned(),
        password: login.password.clone(),
        subscribed: false,
    };
    let _ = ConnAck::new(ConnectReturnCode::Success, false).write(&mut io.wbuf);
    if io.flush(&shutdown).await.is_err() {
        return io.shutdown().await;
    }
    debug!(registration = %client.registration, "emulator: DPS MQTT connection accepted");
    let reason = client
        .run(&mut io, idle_limit(connect.keep_alive), &shutdown)
        .await;
    debug!(registration = %client.registration, %reason, "emulator: DPS MQTT connection closed");
    io.shutdown().await;
}

struct Client {
    dps: Dps,
    scope: String,
    registration: String,
    password: String,
    subscribed: bool,
}

impl Client {
    /// Reads and answers packets until the connection ends; returns why it did.
    async fn run<S>(
        &mut self,
        io: &mut PacketIo<S>,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> String
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut deadline = Instant::now() + idle;
        loop {
            let packet = tokio::select! {
                _ = shutdown.cancelled() => return "emulator shutting down".into(),
                _ = sleep_until(deadline) => return format!("nothing received for {idle:?} (keep-alive)"),
                r = io.read_packet() => match r {
                    Ok(p) => p,
                    Err(ReadError::Eof) => return "client closed the connection".into(),
                    Err(e) => return e.to_string(),
                },
            };
            deadline = Instant::now() + idle;
            if let Err(end) = self.on_packet(io, packet).await {
                return end;
            }
            if let Err(e) = io.flush(shutdown).await {
                return format!("write failed: {e}");
            }
        }
    }

    async fn on_packet<S>(&mut self, io: &mut PacketIo<S>, packet: Packet) -> Result<(), String> {
        let encoded = match packet {
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| match (f.path == RESPONSE_FILTER, f.qos) {
                        (false, _) => SubscribeReasonCode::Failure,
                        (true, QoS::AtMostOnce) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                        (true, _) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    })
                    .collect::<Vec<_>>();
                self.subscribed |= s.filters.iter().any(|f| f.path == RESPONSE_FILTER);
                SubAck::new(s.pkid, codes).write(&mut io.wbuf)
            }
            Packet::Unsubscribe(u) => {
                if u.topics.iter().any(|t| t == RESPONSE_FILTER) {
                    self.subscribed = false;
                }
                UnsubAck::new(u.pkid).write(&mut io.wbuf)
            }
            Packet::Publish(p) => return self.on_publish(io, p).await,
            Packet::PingReq => PingResp.write(&mut io.wbuf),
            Packet::Disconnect => return Err("client sent DISCONNECT".into()),
            Packet::PubAck(_) => return Ok(()),
            other => return Err(format!("unexpected {} packet", packet_name(&other))),
        };
        encoded
            .map(drop)
            .map_err(|e| format!("could not encode a reply: {e}"))
    }

    async fn on_publish<S>(&mut self, io: &mut PacketIo<S>, p: Publish) -> Result<(), String> {
        if p.qos == QoS::ExactlyOnce {
            return Err("QoS 2 publish (not supported)".into());
        }
        let (request, query) = if let Some(q) = p.topic.strip_prefix(REGISTER_PREFIX) {
            (None, q)
        } else if let Some(q) = p.topic.strip_prefix(STATUS_PREFIX) {
            (Some(()), q)
        } else {
            return Err(format!("publish to an unsupported topic {}", p.topic));
        };
        let rid = raw_query_value(query, "$rid").ok_or("request topic without $rid")?;
        let password = Some(self.password.as_str());
        let answer = match request {
            None => {
                self.dps
                    .register(&self.scope, &self.registration, password, &p.payload)
                    .await
            }
            Some(()) => {
                let operation = query_value(query, "operationId").unwrap_or_default();
                self.dps
                    .operation_status(&self.scope, &self.registration, password, &operation)
            }
        };
        if p.qos == QoS::AtLeastOnce {
            PubAck::new(p.pkid)
                .write(&mut io.wbuf)
                .map_err(|e| format!("could not encode a PUBACK: {e}"))?;
        }
        // The rid goes back as it came: the client decodes it.
        if self.subscribed {
            response(&answer, rid)
                .write(&mut io.wbuf)
                .map_err(|e| format!("could not encode a response: {e}"))?;
        }
        Ok(())
    }
}

/// The answer as a publish on `$dps/registrations/res/{status}/?$rid=...`.
fn response(answer: &DpsAnswer, raw_rid: &str) -> Publish {
    let mut topic = format!("$dps/registrations/res/{}/?$rid={raw_rid}", answer.status);
    if let Some(secs) = answer.retry_after {
        topic.push_str(&format!("&retry-after={secs}"));
    }
    Publish::from_bytes(topic, QoS::AtMostOnce, Bytes::from(answer.body.to_string()))
}

/// A query parameter as sent.
fn raw_query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A query parameter, percent-decoded (the Python SDK quotes them).
fn query_value(query: &str, key: &str) -> Option<String> {
    raw_query_value(query, key).map(|v| percent_decode_str(v).decode_utf8_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dps_user_names_are_told_apart_from_module_ones() {
        assert_eq!(
            dps_identity("0ne00ABCDEF/registrations/gw-1/api-version=2019-03-31&ClientVersion=x"),
            Some(("0ne00ABCDEF", "gw-1"))
        );
        assert_eq!(
            dps_identity("localhost/registrations/m/?api-version=2021-04-12"),
            None
        );
        assert_eq!(
            dps_identity("localhost/dev/mod/?api-version=2021-04-12"),
            None
        );
        assert_eq!(dps_identity("0ne/registrations//api-version=1"), None);
    }

    #[test]
    fn response_topics_carry_rid_and_retry_after() {
        let answer = DpsAnswer {
            status: 202,
            body: serde_json::json!({"operationId": "op", "status": "assigning"}),
            retry_after: Some(3),
        };
        assert_eq!(
            response(&answer, "a%2Db").topic,
            "$dps/registrations/res/202/?$rid=a%2Db&retry-after=3"
        );
        assert_eq!(
            query_value("$rid=a%2Db&operationId=4.x", "$rid").as_deref(),
            Some("a-b")
        );
        assert_eq!(
            query_value("$rid=1&operationId=4.x", "operationId").as_deref(),
            Some("4.x")
        );
    }
}
