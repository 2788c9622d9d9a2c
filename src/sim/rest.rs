//! HTTPS front end: service REST API and MQTT over WebSocket. (being written)

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hub::Hub;

/// Serves HTTPS until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let _ = (listener, acceptor, hub, shutdown, tasks);
    todo!()
}
