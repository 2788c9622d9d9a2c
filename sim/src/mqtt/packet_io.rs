//! Framing over the client's byte stream: whole MQTT packets in (rumqttc's codec, bounded
//! by [`MAX_PACKET_SIZE`]), buffered replies out with a write timeout.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::Error as CodecError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::MAX_PACKET_SIZE;

/// A client that does not take our bytes for this long is cut.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn packet_name(p: &Packet) -> &'static str {
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
pub(super) enum ReadError {
    #[error("client closed the connection")]
    Eof,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
    #[error("malformed packet: {0}")]
    Codec(CodecError),
}

/// The stream with its read and write buffers.
pub(super) struct PacketIo<S> {
    pub(super) stream: S,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PacketIo<S> {
    /// The next complete packet. Cancel-safe: bytes read so far stay in `rbuf`.
    pub(super) async fn read_packet(&mut self) -> Result<Packet, ReadError> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET_SIZE) {
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
    pub(super) async fn flush(&mut self, shutdown: &CancellationToken) -> io::Result<()> {
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
    pub(super) async fn shutdown(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Publish;
    use rumqttc::mqttbytes::QoS;

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
