//! MQTT 3.1.1 server for module clients (PROTOCOL §3–§5), over TLS ([`serve_tls`]) or any
//! byte stream such as a WebSocket ([`serve_connection`]).
//!
//! One task per connection: TLS handshake, CONNECT (authenticated by [`Hub::connect`]),
//! then a loop that reads client packets, drains the hub's outbound channel and watches the
//! keep-alive, the SAS token's expiry and the shutdown token. Behaviour follows the real
//! hub: any refused CONNECT gets CONNACK 5, QoS 2 publishes and publishes to unknown topics
//! close the connection, subscriptions are granted at most QoS 1, everything the hub sends
//! is QoS 0. Packets use rumqttc's MQTT 3.1.1 codec.

use std::io;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    read, ConnAck, Connect, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument as _};

use super::device_side::MAX_TELEMETRY_BYTES;
use super::hub::{Accepted, Hub, ModuleKey, Outbound, SimEvent};
use super::topics::{parse_publish_topic, ClientTopic};

/// Largest packet read: a maximal telemetry message plus room for its topic and headers.
pub const MAX_PACKET_SIZE: usize = MAX_TELEMETRY_BYTES + 64 * 1024;
/// How long a client has to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send CONNECT once the transport is up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle limit whatever the keep-alive (the Azure load balancer's, PROTOCOL §3.5).
pub const MAX_IDLE: Duration = Duration::from_secs(1767);
/// A client that does not take our bytes for this long is cut.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a token expiry (keeps `Instant` arithmetic far from overflow).
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Outbound bytes batched into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Accepts MQTT-over-TLS connections until `shutdown`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "emulator: MQTT accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("mqtt", %peer);
        tasks.spawn(
            async move {
                let handshake = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
                };
                match handshake {
                    Ok(Ok(tls)) => serve_connection(tls, hub, shutdown).await,
                    Ok(Err(e)) => debug!(error = %e, "emulator: MQTT TLS handshake failed"),
                    Err(_) => debug!("emulator: MQTT TLS handshake timed out"),
                }
            }
            .instrument(span),
        );
    }
}

/// Serves one MQTT client over an already-established byte stream (TLS or WebSocket).
pub async fn serve_connection<S>(stream: S, hub: Hub, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = PacketIo {
        stream,
        rbuf: BytesMut::with_capacity(4096),
        wbuf: BytesMut::with_capacity(4096),
    };
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = timeout(CONNECT_TIMEOUT, io.read_packet()) => r,
    };
    let connect = match first {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(other)) => {
            debug!(
                packet = packet_name(&other),
                "emulator: MQTT closed: first packet is not CONNECT"
            );
            return io.shutdown().await;
        }
        Ok(Err(ReadError::Codec(
            e @ (CodecError::InvalidProtocol | CodecError::InvalidProtocolLevel(_)),
        ))) => {
            return refuse_in_place(
                &mut io,
                &hub,
                "",
                ConnectReturnCode::RefusedProtocolVersion,
                &format!("{e}; only MQTT 3.1.1 is supported"),
                &shutdown,
            )
            .await;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "emulator: MQTT closed before CONNECT");
            return io.shutdown().await;
        }
        Err(_) => {
            debug!("emulator: MQTT closed: no CONNECT within {CONNECT_TIMEOUT:?}");
            return io.shutdown().await;
        }
    };
    let Some((accepted, will)) = authenticate(&mut io, &hub, &connect, &shutdown).await else {
        return;
    };
    let session = Session {
        hub,
        conn_id: accepted.conn_id,
        module: accepted.module.clone(),
    };
    session
        .run(io, accepted, connect.keep_alive, will, shutdown)
        .await;
}

/// Checks the CONNECT, asks the hub, and answers CONNACK. `None` when refused (the
/// connection is then closed).
async fn authenticate<S>(
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

/// CONNACK with a refusal, event, log, close.
async fn refuse_in_place<S>(
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
struct Will {
    properties: Vec<(String, Option<String>)>,
    payload: Bytes,
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

/// Why a connection ended.
struct Ending {
    reason: String,
    /// Ended by DISCONNECT or by the emulator's shutdown: no will.
    graceful: bool,
}

impl Ending {
    fn abrupt(reason: impl Into<String>) -> Self {
        Ending {
            reason: reason.into(),
            graceful: false,
        }
    }
    fn graceful(reason: impl Into<String>) -> Self {
        Ending {
            reason: reason.into(),
            graceful: true,
        }
    }
}

/// An accepted connection.
struct Session {
    hub: Hub,
    conn_id: u64,
    module: ModuleKey,
}

impl Session {
    async fn run<S>(
        &self,
        mut io: PacketIo<S>,
        mut accepted: Accepted,
        keep_alive: u16,
        will: Option<Will>,
        shutdown: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle_limit = idle_limit(keep_alive);
        let expires = deadline_from(accepted.expires_at);
        let mut idle_deadline = Instant::now() + idle_limit;
        let ending = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ending::graceful("emulator shutting down"),
                msg = accepted.outbound.recv() => {
                    if let Some(end) = self.send_outbound(&mut io, msg, &mut accepted, &shutdown).await {
                        break end;
                    }
                }
                _ = sleep_until(expires) => break Ending::abrupt("SAS token expired"),
                _ = sleep_until(idle_deadline) => {
                    break Ending::abrupt(format!("nothing received for {idle_limit:?} (keep-alive)"));
                }
                r = io.read_packet() => {
                    idle_deadline = Instant::now() + idle_limit;
                    let step = match r {
                        Ok(packet) => self.on_packet(&mut io, packet),
                        Err(ReadError::Eof) => Err(Ending::abrupt("client closed the connection")),
                        Err(e) => Err(Ending::abrupt(e.to_string())),
                    };
                    if let Err(end) = step {
                        break end;
                    }
                    if let Err(e) = io.flush(&shutdown).await {
                        break Ending::abrupt(format!("write failed: {e}"));
                    }
                }
            }
        };
        self.hub.disconnect(self.conn_id, &self.module);
        if let (false, Some(w), false) = (ending.graceful, will, shutdown.is_cancelled()) {
            let _ = self.hub.telemetry(&self.module, w.properties, w.payload);
        }
        debug!(
            module = %self.module,
            conn_id = self.conn_id,
            reason = %ending.reason,
            "emulator: MQTT connection closed"
        );
        io.shutdown().await;
    }

    /// Writes one outbound message (and whatever else is already queued). `Some` ends the
    /// connection.
    async fn send_outbound<S>(
        &self,
        io: &mut PacketIo<S>,
        first: Option<Outbound>,
        accepted: &mut Accepted,
        shutdown: &CancellationToken,
    ) -> Option<Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut next = first;
        let mut end = None;
        loop {
            match next {
                Some(Outbound::Publish { topic, payload }) => {
                    let publish = Publish::from_bytes(topic, QoS::AtMostOnce, payload);
                    if let Err(e) = publish.write(&mut io.wbuf) {
                        debug!(module = %self.module, error = %e, "emulator: outbound publish not encodable, skipped");
                    }
                }
                Some(Outbound::Close { reason }) => {
                    end = Some(Ending::abrupt(reason));
                    break;
                }
                None => {
                    end = Some(Ending::abrupt("closed by the hub"));
                    break;
                }
            }
            if io.wbuf.len() >= WRITE_BATCH {
                break;
            }
            match accepted.outbound.try_recv() {
                Ok(m) => next = Some(m),
                Err(_) => break,
            }
        }
        if let Err(e) = io.flush(shutdown).await {
            return Some(Ending::abrupt(format!("write failed: {e}")));
        }
        end
    }

    /// Handles one client packet; replies are queued in the write buffer.
    fn on_packet<S>(&self, io: &mut PacketIo<S>, packet: Packet) -> Result<(), Ending> {
        let hub = &self.hub;
        match packet {
            Packet::Publish(p) => self.on_publish(io, p),
            Packet::Subscribe(s) => {
                let filters: Vec<String> = s.filters.iter().map(|f| f.path.clone()).collect();
                let granted = hub.subscribe(self.conn_id, &self.module, &filters);
                let codes = s
                    .filters
                    .iter()
                    .zip(granted)
                    .map(|(f, ok)| match (ok, f.qos) {
                        (false, _) => SubscribeReasonCode::Failure,
                        (true, QoS::AtMostOnce) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                        (true, _) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    })
                    .collect();
                debug!(module = %self.module, ?filters, "emulator: MQTT SUBSCRIBE");
                encode(SubAck::new(s.pkid, codes).write(&mut io.wbuf))
            }
            Packet::Unsubscribe(u) => {
                hub.unsubscribe(self.conn_id, &self.module, &u.topics);
                encode(UnsubAck::new(u.pkid).write(&mut io.wbuf))
            }
            Packet::PingReq => encode(PingResp.write(&mut io.wbuf)),
            Packet::Disconnect => Err(Ending::graceful("client sent DISCONNECT")),
            // We only send QoS 0, but a stray PUBACK is harmless.
            Packet::PubAck(_) => Ok(()),
            other => Err(Ending::abrupt(format!(
                "unexpected {} packet from the client",
                packet_name(&other)
            ))),
        }
    }

    fn on_publish<S>(&self, io: &mut PacketIo<S>, p: Publish) -> Result<(), Ending> {
        if p.qos == QoS::ExactlyOnce {
            return Err(Ending::abrupt("QoS 2 publish (not supported by the hub)"));
        }
        let topic = parse_publish_topic(&p.topic).map_err(|e| {
            debug!(module = %self.module, topic = %p.topic, error = %e, "emulator: MQTT publish to an unsupported topic");
            Ending::abrupt(format!("publish to an unsupported topic ({e})"))
        })?;
        let hub = &self.hub;
        match topic {
            ClientTopic::TwinGet { rid } => hub.twin_get(self.conn_id, &self.module, &rid),
            ClientTopic::TwinPatchReported { rid, version } => {
                hub.twin_patch_reported(self.conn_id, &self.module, &rid, version, &p.payload)
            }
            ClientTopic::MethodResponse { status, rid } => {
                hub.method_response(&self.module, &rid, status, &p.payload)
            }
            ClientTopic::Telemetry {
                device_id,
                module_id,
                mut properties,
            } => {
                if device_id != self.module.device_id || module_id != self.module.module_id {
                    return Err(Ending::abrupt(format!(
                        "telemetry topic names {device_id}/{module_id}, not the connected identity"
                    )));
                }
                if p.retain {
                    // Not retained; flagged as the real hub does (PROTOCOL §3.6).
                    properties.push(("mqtt-retain".into(), Some("true".into())));
                }
                hub.telemetry(&self.module, properties, p.payload)
                    .map_err(|e| Ending::abrupt(format!("telemetry refused: {}", e.message)))?;
            }
        }
        if p.qos == QoS::AtLeastOnce {
            encode(PubAck::new(p.pkid).write(&mut io.wbuf))?;
        }
        Ok(())
    }
}

fn encode(r: Result<usize, CodecError>) -> Result<(), Ending> {
    r.map(|_| ())
        .map_err(|e| Ending::abrupt(format!("could not encode a reply: {e}")))
}

/// 1.5 × keep-alive, capped at [`MAX_IDLE`]; keep-alive 0 means only the cap applies.
pub fn idle_limit(keep_alive: u16) -> Duration {
    if keep_alive == 0 {
        return MAX_IDLE;
    }
    (Duration::from_secs(u64::from(keep_alive)) * 3 / 2).min(MAX_IDLE)
}

fn deadline_from(expires_at: SystemTime) -> Instant {
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left.min(MAX_TOKEN_WAIT)
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("client closed the connection")]
    Eof,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
    #[error("malformed packet: {0}")]
    Codec(CodecError),
}

/// The stream with its read and write buffers.
struct PacketIo<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PacketIo<S> {
    /// The next complete packet. Cancel-safe: bytes read so far stay in `rbuf`.
    async fn read_packet(&mut self) -> Result<Packet, ReadError> {
        loop {
            match read(&mut self.rbuf, MAX_PACKET_SIZE) {
                Ok(p) => return Ok(p),
                Err(CodecError::InsufficientBytes(n)) => {
                    self.rbuf.reserve(n.max(1024));
                    if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                        return Err(ReadError::Eof);
                    }
                }
                Err(e) => return Err(ReadError::Codec(e)),
            }
        }
    }

    /// Writes out the write buffer; gives up on a client that stops reading.
    async fn flush(&mut self, shutdown: &CancellationToken) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        let r = tokio::select! {
            r = timeout(WRITE_TIMEOUT, write) => r.unwrap_or_else(|_| {
                Err(io::Error::new(io::ErrorKind::TimedOut, "client is not reading"))
            }),
            _ = shutdown.cancelled() => Err(io::Error::other("emulator shutting down")),
        };
        self.wbuf.clear();
        r
    }

    /// Closes the stream (TLS close_notify where applicable), briefly.
    async fn shutdown(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_limits() {
        assert_eq!(idle_limit(60), Duration::from_secs(90));
        assert_eq!(idle_limit(1), Duration::from_millis(1500));
        assert_eq!(idle_limit(0), MAX_IDLE);
        assert_eq!(idle_limit(1177), Duration::from_millis(1765500));
        assert_eq!(idle_limit(1740), MAX_IDLE);
        assert_eq!(idle_limit(u16::MAX), MAX_IDLE);
    }

    #[test]
    fn token_deadline_never_overflows() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40);
        assert!(deadline_from(far) > Instant::now());
        let past = SystemTime::UNIX_EPOCH;
        assert!(deadline_from(past) <= Instant::now());
    }

    #[tokio::test]
    async fn packets_split_across_reads_are_reassembled() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = PacketIo {
            stream: server,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        };
        let mut p = Publish::new("a/b", QoS::AtLeastOnce, vec![7u8; 1000]);
        p.pkid = 9;
        let mut good = BytesMut::new();
        p.write(&mut good).expect("encodes");
        let writer = tokio::spawn(async move {
            let mut client = client;
            for chunk in good.chunks(7) {
                client.write_all(chunk).await.expect("write");
            }
            client
        });
        match io.read_packet().await {
            Ok(Packet::Publish(got)) => {
                assert_eq!(got.pkid, 9);
                assert_eq!(got.payload.len(), 1000);
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(writer.await);
        assert!(matches!(io.read_packet().await, Err(ReadError::Eof)));
    }

    #[tokio::test]
    async fn oversized_packet_is_malformed() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = PacketIo {
            stream: server,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        };
        // PUBLISH with a remaining length of 0x0FFFFFFF.
        client
            .write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F])
            .await
            .expect("write");
        assert!(matches!(
            io.read_packet().await,
            Err(ReadError::Codec(CodecError::PayloadSizeLimitExceeded(_)))
        ));
    }
}
