//! Bytes on the wire per connection, counted beneath TLS: what a metered link would bill
//! (PROTOCOL §15). Every accepted TCP stream is wrapped in a [`Counted`] stream before the
//! TLS handshake, so handshakes, TLS record overhead, MQTT, HTTP and WebSocket framing are
//! all in the counts; the kernel's segment counters (`TCP_INFO`) are kept beside them so a
//! reader can add TCP/IP header bytes without guessing the number of packets. Whether
//! each TLS handshake resumed a session is recorded too.
//!
//! [`WireLog`] keeps the most recent [`MAX_RECORDS`] connections (older ones still count
//! in [`WireLog::totals`]), so an emulator that serves for days does not grow.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Connections whose records are kept (oldest dropped first).
pub const MAX_RECORDS: usize = 4096;

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// MQTT over TLS (8883).
    Mqtt,
    /// HTTPS: REST, DPS and MQTT over WebSocket.
    Https,
}

/// What is known about one connection, as of the moment it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionWire {
    /// Order of acceptance, from 0.
    pub id: u64,
    pub listener: Listener,
    pub peer: SocketAddr,
    pub opened: Instant,
    /// Still open when this was read.
    pub open: bool,
    /// TCP payload bytes from the client (TLS records included).
    pub bytes_from_client: u64,
    /// TCP payload bytes to the client.
    pub bytes_to_client: u64,
    /// TCP segments received and sent (pure ACKs included), from the kernel's `TCP_INFO`
    /// at the last read from the socket and at close.
    pub segments_in: u32,
    pub segments_out: u32,
    /// `Some(true)` when the TLS handshake resumed a session, `None` before it finished
    /// (or when it failed).
    pub resumed: Option<bool>,
}

/// Sums over every connection since the emulator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireTotals {
    pub connections: u64,
    pub resumed_handshakes: u64,
    pub full_handshakes: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

/// The counters of one connection, shared by its stream and the log.
#[derive(Debug)]
struct Counters {
    id: u64,
    listener: Listener,
    peer: SocketAddr,
    opened: Instant,
    open: AtomicU8,
    from_client: AtomicU64,
    to_client: AtomicU64,
    segments_in: AtomicU32,
    segments_out: AtomicU32,
    // 0 unknown, 1 full, 2 resumed.
    handshake: AtomicU8,
}

impl Counters {
    fn snapshot(&self) -> ConnectionWire {
        ConnectionWire {
            id: self.id,
            listener: self.listener,
            peer: self.peer,
            opened: self.opened,
            open: self.open.load(Ordering::Relaxed) == 1,
            bytes_from_client: self.from_client.load(Ordering::Relaxed),
            bytes_to_client: self.to_client.load(Ordering::Relaxed),
            segments_in: self.segments_in.load(Ordering::Relaxed),
            segments_out: self.segments_out.load(Ordering::Relaxed),
            resumed: match self.handshake.load(Ordering::Relaxed) {
                1 => Some(false),
                2 => Some(true),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Default)]
struct LogInner {
    next_id: u64,
    recent: VecDeque<Arc<Counters>>,
    // Of the connections dropped from `recent`.
    retired: WireTotals,
}

/// Every connection's counts; cheap to clone (one shared log per emulator).
#[derive(Debug, Clone, Default)]
pub struct WireLog {
    inner: Arc<Mutex<LogInner>>,
}

impl WireLog {
    /// Wraps a freshly accepted stream so its bytes are counted.
    pub fn count(&self, listener: Listener, tcp: TcpStream) -> Counted {
        let peer = tcp
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let counters = Arc::new(Counters {
            id: inner.next_id,
            listener,
            peer,
            opened: Instant::now(),
            open: AtomicU8::new(1),
            from_client: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            segments_in: AtomicU32::new(0),
            segments_out: AtomicU32::new(0),
            handshake: AtomicU8::new(0),
        });
        inner.next_id += 1;
        if inner.recent.len() == MAX_RECORDS {
            if let Some(old) = inner.recent.pop_front() {
                add(&mut inner.retired, &old.snapshot());
            }
        }
        inner.recent.push_back(Arc::clone(&counters));
        Counted { tcp, counters }
    }

    /// The most recent connections, oldest first.
    pub fn connections(&self) -> Vec<ConnectionWire> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.recent.iter().map(|c| c.snapshot()).collect()
    }

    /// Sums over every connection since start.
    pub fn totals(&self) -> WireTotals {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut totals = inner.retired;
        for c in &inner.recent {
            add(&mut totals, &c.snapshot());
        }
        totals
    }
}

fn add(totals: &mut WireTotals, c: &ConnectionWire) {
    totals.connections += 1;
    match c.resumed {
        Some(true) => totals.resumed_handshakes += 1,
        Some(false) => totals.full_handshakes += 1,
        None => {}
    }
    totals.bytes_from_client += c.bytes_from_client;
    totals.bytes_to_client += c.bytes_to_client;
}

/// A TCP stream whose bytes in and out are counted into its [`WireLog`] record.
#[derive(Debug)]
pub struct Counted {
    tcp: TcpStream,
    counters: Arc<Counters>,
}

/// Records whether the finished server handshake on `tls` resumed a session.
pub fn handshake_done(tls: &tokio_rustls::server::TlsStream<Counted>) {
    let (tcp, conn) = tls.get_ref();
    tcp.handshake_done(conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
}

impl Counted {
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp.set_nodelay(nodelay)
    }

    /// Records how the TLS handshake on this stream ended.
    pub fn handshake_done(&self, resumed: bool) {
        self.counters
            .handshake
            .store(if resumed { 2 } else { 1 }, Ordering::Relaxed);
    }

    fn read_segments(&self) {
        if let Some((segs_in, segs_out)) = tcp_segments(&self.tcp) {
            self.counters.segments_in.store(segs_in, Ordering::Relaxed);
            self.counters
                .segments_out
                .store(segs_out, Ordering::Relaxed);
        }
    }
}

/// The kernel's segment counters of a TCP socket (Linux `TCP_INFO`).
fn tcp_segments(tcp: &TcpStream) -> Option<(u32, u32)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is a live TCP socket owned by `tcp` for the duration of the call;
    // `info` is a zeroed buffer of `len` bytes that the kernel fills at most up to `len`.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised and partly filled by the kernel: every bit pattern is a
    // valid `tcp_info` (plain integers).
    let info = unsafe { info.assume_init() };
    Some((info.tcpi_segs_in, info.tcpi_segs_out))
}

impl Drop for Counted {
    fn drop(&mut self) {
        // The socket is still open here (fields drop after this): last segment counts.
        self.read_segments();
        self.counters.open.store(0, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            self.counters
                .from_client
                .fetch_add(n as u64, Ordering::Relaxed);
            self.read_segments();
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.counters
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counted_streams_count_both_directions_and_are_kept_after_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 3];
            c.read_exact(&mut back).await.unwrap();
        });
        let log = WireLog::default();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut counted = log.count(Listener::Mqtt, tcp);
        let mut got = [0u8; 5];
        counted.read_exact(&mut got).await.unwrap();
        counted.write_all(b"abc").await.unwrap();
        counted.handshake_done(true);
        client.await.unwrap();
        drop(counted);

        let conns = log.connections();
        assert_eq!(conns.len(), 1);
        let c = &conns[0];
        assert_eq!((c.bytes_from_client, c.bytes_to_client), (5, 3));
        assert!(!c.open);
        assert_eq!(c.resumed, Some(true));
        assert!(c.segments_in >= 2 && c.segments_out >= 2, "{c:?}");
        let totals = log.totals();
        assert_eq!(totals.connections, 1);
        assert_eq!(totals.resumed_handshakes, 1);
        assert_eq!(totals.bytes_from_client + totals.bytes_to_client, 8);
    }
}
