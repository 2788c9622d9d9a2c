//! MQTT 3.1.1 server for module clients. (being written)

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hub::Hub;

/// Accepts MQTT-over-TLS connections until `shutdown`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let _ = (listener, acceptor, hub, shutdown, tasks);
    todo!()
}

/// Serves one MQTT client over an already-established byte stream (TLS or WebSocket).
pub async fn serve_connection<S>(stream: S, hub: Hub, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = (stream, hub, shutdown);
    todo!()
}
