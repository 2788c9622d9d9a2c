//! MQTT over WebSocket (PROTOCOL §3.8): bridges an upgraded `/$iothub/websocket`
//! connection's binary frames to [`super::mqtt::serve_connection`] through an in-memory
//! pipe, so the MQTT server sees the same byte stream as over TLS. The REST front end
//! mounts [`upgrade`] on its router and renders its errors; this module knows nothing of
//! the REST API.
//!
//! Closing: when the client closes (or the socket fails) the pipe's write side is shut,
//! the MQTT server sees end-of-stream and finishes; when the MQTT server finishes (the hub
//! dropped the client, or the emulator stops) the bridge sends a WebSocket Close and gives
//! the client [`CLOSE_GRACE`] to answer it (no wait once the emulator is stopping).

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::header::SEC_WEBSOCKET_PROTOCOL;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::errors::HubError;
use super::hub::Hub;

/// Bytes buffered in each direction of the pipe.
const PIPE_CAPACITY: usize = 64 * 1024;
/// Largest binary frame sent to the client.
const FRAME_MAX: usize = 16 * 1024;
/// How long a client gets to answer our Close before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// `GET /$iothub/websocket` with subprotocol `mqtt`: upgrade and hand the byte stream to
/// the MQTT server. The bridge task counts as one of `tasks`, the emulator's tasks.
pub(super) fn upgrade(
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    hub: Hub,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<Response, HubError> {
    if !offers_mqtt(headers) {
        return Err(HubError::argument_invalid(
            "WebSocket connections must request the 'mqtt' subprotocol",
        ));
    }
    let ws = ws.map_err(|e| {
        HubError::argument_invalid(format!("not a valid WebSocket upgrade: {}", e.body_text()))
    })?;
    let token = tasks.token();
    Ok(ws
        .protocols(["mqtt"])
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            let _token = token;
            bridge(socket, hub, shutdown).await;
        }))
}

fn offers_mqtt(headers: &HeaderMap) -> bool {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("mqtt"))
}

/// Serves one MQTT client over an upgraded WebSocket until either side closes.
async fn bridge(socket: WebSocket, hub: Hub, shutdown: CancellationToken) {
    let (ours, theirs) = tokio::io::duplex(PIPE_CAPACITY);
    let (pipe_r, pipe_w) = tokio::io::split(ours);
    let (sink, stream) = socket.split();
    let serve = super::mqtt::serve_connection(theirs, hub, shutdown.clone());
    let pumps = async {
        let inbound = ws_to_pipe(stream, pipe_w);
        let outbound = pipe_to_ws(pipe_r, sink);
        tokio::pin!(inbound, outbound);
        tokio::select! {
            () = &mut inbound => outbound.await,
            () = &mut outbound => {
                // Our Close is out; wait for the client's, but not when the emulator stops.
                tokio::select! {
                    _ = tokio::time::timeout(CLOSE_GRACE, inbound) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
    };
    tokio::join!(serve, pumps);
    tracing::debug!("MQTT-over-WebSocket connection closed");
}

/// Client → MQTT server: binary frames become pipe bytes; ends at Close, error or EOF and
/// then shuts the pipe's write side.
async fn ws_to_pipe(mut stream: SplitStream<WebSocket>, mut pipe: WriteHalf<DuplexStream>) {
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(bytes)) => {
                if pipe.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            Ok(Message::Close(_)) => break,
            Ok(Message::Text(_)) => {
                tracing::debug!("text frame on an MQTT WebSocket; closing");
                break;
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Err(e) => {
                tracing::debug!(error = %e, "MQTT WebSocket read failed");
                break;
            }
        }
    }
    let _ = pipe.shutdown().await;
}

/// MQTT server → client: pipe bytes become binary frames; at end-of-stream sends Close.
async fn pipe_to_ws(mut pipe: ReadHalf<DuplexStream>, mut sink: SplitSink<WebSocket, Message>) {
    let mut buf = vec![0u8; FRAME_MAX];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if sink.send(Message::Binary(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: close_code::NORMAL,
            reason: "".into(),
        })))
        .await;
}
