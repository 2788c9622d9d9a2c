//! CONNECT: protocol level, credentials and will checked, the hub asked, CONNACK sent.
//! Every refusal the hub makes is CONNACK 5 (PROTOCOL §3.4); an unsupported protocol level
//! gets CONNACK 1 as MQTT 3.1.1 requires. Under a throttling tier a CONNECT may first wait
//! for its turn, or be closed unanswered ([`crate::throttle`]).

use std::io;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode};
use rumqttc::mqttbytes::Protocol;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::packet_io::PacketIo;
use crate::hub::{Accepted, Hub, SimEvent};
use crate::throttle::{Admission, Kind};
use crate::topics::{parse_publish_topic, ClientTopic};

/// Checks the CONNECT, asks the hub, and answers CONNACK. `None` when refused (the
/// connection is then closed).
pub(super) async fn authenticate<S>(
    io: &mut PacketIo<S>,
    hub: &Hub,
    connect: &Connect,
    shutdown: &CancellationToken,
) -> Option<(Accepted, Option<Will>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let client_id = connect.client_id.as_str();
    let refusal = if connect.protocol != Protocol::V4 {
        Some((
            ConnectReturnCode::RefusedProtocolVersion,
            "MQTT 5 is not supported; only MQTT 3.1.1".to_string(),
        ))
    } else {
        match &connect.login {
            Some(l) if !l.username.is_empty() && !l.password.is_empty() => None,
            _ => Some((
                ConnectReturnCode::NotAuthorized,
                "CONNECT lacks a user name or a password".to_string(),
            )),
        }
    };
    if let Some((code, reason)) = refusal {
        refuse_in_place(io, hub, client_id, code, &reason, shutdown).await;
        return None;
    }
    let will = match Will::from_connect(connect) {
        Ok(w) => w,
        Err(reason) => {
            let code = ConnectReturnCode::NotAuthorized;
            refuse_in_place(io, hub, client_id, code, &reason, shutdown).await;
            return None;
        }
    };
    let login = connect.login.as_ref()?;
    if !admitted(io, hub, client_id, shutdown).await {
        return None;
    }
    match hub.connect(
        client_id,
        &login.username,
        &login.password,
        connect.clean_session,
    ) {
        Ok(accepted) => {
            let ack = ConnAck::new(ConnectReturnCode::Success, accepted.session_present);
            let written = match ack.write(&mut io.wbuf) {
                Ok(_) => io.flush(shutdown).await,
                Err(e) => Err(io::Error::other(e)),
            };
            if let Err(e) = written {
                debug!(client_id, error = %e, "emulator: MQTT CONNACK could not be sent");
                hub.disconnect(accepted.conn_id, &accepted.module);
                io.shutdown().await;
                return None;
            }
            debug!(
                client_id,
                conn_id = accepted.conn_id,
                session_present = accepted.session_present,
                clean_session = connect.clean_session,
                keep_alive = connect.keep_alive,
                "emulator: MQTT connection accepted"
            );
            Some((accepted, will))
        }
        Err(reason) => {
            // The hub already emitted ConnectRefused; never log the password.
            debug!(client_id, %reason, "emulator: MQTT CONNECT refused (CONNACK 5)");
            let _ = ConnAck::new(ConnectReturnCode::NotAuthorized, false).write(&mut io.wbuf);
            let _ = io.flush(shutdown).await;
            io.shutdown().await;
            None
        }
    }
}

/// The tier's connect throttle: a shaped CONNECT waits for its turn; a throttled one is
/// closed without a CONNACK, as the hub does ([`crate::throttle`]), never CONNACK 5, which
/// clients take for bad credentials.
async fn admitted<S>(
    io: &mut PacketIo<S>,
    hub: &Hub,
    client_id: &str,
    shutdown: &CancellationToken,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match hub.admit(Kind::DeviceConnect) {
        Admission::Now => true,
        Admission::After(delay) => tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        },
        Admission::Throttled => {
            debug!(
                client_id,
                "emulator: MQTT CONNECT throttled, connection closed"
            );
            io.shutdown().await;
            false
        }
    }
}

/// CONNACK with a refusal, event, log, close.
pub(super) async fn refuse_in_place<S>(
    io: &mut PacketIo<S>,
    hub: &Hub,
    client_id: &str,
    code: ConnectReturnCode,
    reason: &str,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    debug!(client_id, reason, code = ?code, "emulator: MQTT CONNECT refused");
    hub.emit(SimEvent::ConnectRefused {
        client_id: client_id.to_string(),
        reason: reason.to_string(),
    });
    let _ = ConnAck::new(code, false).write(&mut io.wbuf);
    let _ = io.flush(shutdown).await;
    io.shutdown().await;
}

/// A last will: forwarded as telemetry with `iothub-MessageType=Will` when the connection
/// ends without DISCONNECT (PROTOCOL §3.2).
pub(super) struct Will {
    pub(super) properties: Vec<(String, Option<String>)>,
    pub(super) payload: Bytes,
}

impl Will {
    fn from_connect(connect: &Connect) -> Result<Option<Will>, String> {
        let Some(w) = &connect.last_will else {
            return Ok(None);
        };
        let identity = connect.client_id.split_once('/');
        match parse_publish_topic(&w.topic) {
            Ok(ClientTopic::Telemetry {
                device_id,
                module_id,
                mut properties,
            }) if identity == Some((device_id.as_str(), module_id.as_str())) => {
                properties.push(("iothub-MessageType".into(), Some("Will".into())));
                Ok(Some(Will {
                    properties,
                    payload: w.message.clone(),
                }))
            }
            _ => Err("the will topic must be the module's telemetry topic".into()),
        }
    }
}
