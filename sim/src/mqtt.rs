//! MQTT 3.1.1 server for module clients (PROTOCOL §3–§5), over TLS ([`serve_tls`]) or any
//! byte stream such as a WebSocket ([`serve_connection`]). A CONNECT whose user name is a
//! DPS one (`{idScope}/registrations/{id}/api-version=...`) on the TLS listener goes to the
//! emulated DPS instead ([`dps`], PROTOCOL §12.1).
//!
//! One task per connection: TLS handshake, CONNECT (authenticated by [`Hub::connect`]),
//! then a loop that reads client packets, drains the hub's outbound channel and watches the
//! keep-alive, the SAS token's expiry and the shutdown token. Behaviour follows the real
//! hub: any refused CONNECT gets CONNACK 5, QoS 2 publishes and publishes to unknown topics
//! close the connection, subscriptions are granted at most QoS 1, everything the hub sends
//! is QoS 0. Packets use rumqttc's MQTT 3.1.1 codec.

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument as _};

mod connect;
mod dps;
mod packet_io;

use self::connect::{authenticate, refuse_in_place, Will};
use self::packet_io::{packet_name, PacketIo, ReadError};
use super::device_side::MAX_TELEMETRY_BYTES;
use super::dps::Dps;
use super::hub::{Accepted, Hub, ModuleKey, Outbound};
use super::topics::{parse_publish_topic, ClientTopic};
use super::wire::{Listener, WireLog};

/// Largest packet read: a maximal telemetry message plus room for its topic and headers.
pub const MAX_PACKET_SIZE: usize = MAX_TELEMETRY_BYTES + 64 * 1024;
/// How long a client has to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send CONNECT once the transport is up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle limit whatever the keep-alive (the Azure load balancer's, PROTOCOL §3.5).
pub const MAX_IDLE: Duration = Duration::from_secs(1767);
/// Longest wait for a token expiry (keeps `Instant` arithmetic far from overflow).
const MAX_TOKEN_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Outbound bytes batched into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Runs hub work that may write `hub.json` (a subscription change, a reported patch)
/// without holding up the other connections' tasks on this worker thread: a hub of many
/// modules takes a while to encode, and a runtime has few workers. Inline where the
/// runtime cannot hand the worker's tasks over (current-thread runtimes, as in tests).
fn durable<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Accepts MQTT-over-TLS connections until `shutdown`; DPS clients go to `dps`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    dps: Option<Dps>,
    wire: WireLog,
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
        let tcp = wire.count(Listener::Mqtt, tcp);
        let acceptor = acceptor.clone();
        let hub = hub.clone();
        let dps = dps.clone();
        let shutdown = shutdown.clone();
        let span = tracing::debug_span!("mqtt", %peer);
        tasks.spawn(
            async move {
                let handshake = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
                };
                match handshake {
                    Ok(Ok(tls)) => {
                        super::wire::handshake_done(&tls);
                        serve_connection_with_dps(tls, hub, dps, shutdown).await
                    }
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
    serve_connection_with_dps(stream, hub, None, shutdown).await;
}

/// [`serve_connection`], handing a DPS client to `dps` when there is one.
pub async fn serve_connection_with_dps<S>(
    stream: S,
    hub: Hub,
    dps: Option<Dps>,
    shutdown: CancellationToken,
) where
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
    let is_dps = connect
        .login
        .as_ref()
        .is_some_and(|l| self::dps::dps_identity(&l.username).is_some());
    if let (true, Some(dps)) = (is_dps, dps) {
        return self::dps::serve(io, connect, dps, shutdown).await;
    }
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
                let granted = durable(|| hub.subscribe(self.conn_id, &self.module, &filters));
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
                durable(|| hub.unsubscribe(self.conn_id, &self.module, &u.topics));
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
            ClientTopic::TwinPatchReported { rid, version } => durable(|| {
                hub.twin_patch_reported(self.conn_id, &self.module, &rid, version, &p.payload)
            }),
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
}
