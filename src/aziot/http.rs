//! One HTTP/1.1 request over a Unix socket of the Azure IoT Identity Service, with
//! strict limits: a timeout on the whole exchange, a cap on the answer's body, one
//! connection per request (identityd and keyd close idle ones anyway, and a request
//! every token lifetime does not need a pool).
//!
//! hyper's client, already in the daemon through reqwest, rather than a hand-written
//! parser: it handles `Content-Length` and chunked answers alike, and the bytes a
//! hand-written one would have to get right are the ones nobody tests.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::{AziotError, Service};

/// Largest answer accepted; identities and signatures are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// Sends one request to `service` on `socket` and returns the status and body.
pub async fn exchange(
    service: Service,
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Bytes), AziotError> {
    let unavailable = |reason: String| AziotError::Unavailable {
        service,
        socket: socket.to_path_buf(),
        reason,
    };
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| connect_error(service, socket, e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            // Any host will do on a Unix socket (PROTOCOL §13.2).
            .header(HOST, service.host());
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let body = body.unwrap_or_default();
        let request = request
            .header(CONTENT_LENGTH, body.len())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(e.to_string()))?;
        let answer = async move {
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map(|b| b.to_bytes());
            // Dropping the sender lets the connection future finish.
            drop(sender);
            Ok::<_, hyper::Error>((status, body))
        };
        let (answer, _closed) = tokio::join!(answer, connection);
        let (status, body) = answer.map_err(|e| {
            if e.is_parse() || e.is_parse_status() {
                AziotError::Malformed {
                    service,
                    reason: format!("not an HTTP/1.1 answer: {e}"),
                }
            } else {
                unavailable(e.to_string())
            }
        })?;
        let body = body.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                AziotError::Malformed {
                    service,
                    reason: format!("the answer is longer than {MAX_BODY} bytes"),
                }
            } else {
                unavailable(e.to_string())
            }
        })?;
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(unavailable(format!("no answer within {timeout:?}"))))
}

/// A failed connect, told apart by what the operator must do about it.
fn connect_error(service: Service, socket: &Path, e: std::io::Error) -> AziotError {
    let socket = socket.to_path_buf();
    match e.kind() {
        ErrorKind::NotFound => AziotError::SocketMissing { service, socket },
        ErrorKind::PermissionDenied => AziotError::PermissionDenied { service, socket },
        _ => AziotError::Unavailable {
            service,
            socket,
            reason: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connect_names_the_group_of_the_service() {
        let denied = || std::io::Error::from(ErrorKind::PermissionDenied);
        let e = connect_error(
            Service::Identityd,
            Path::new("/run/aziot/identityd.sock"),
            denied(),
        );
        assert!(matches!(&e, AziotError::PermissionDenied { .. }), "{e:?}");
        assert!(e.to_string().contains("group aziotid"), "{e}");
        let e = connect_error(Service::Keyd, Path::new("/run/aziot/keyd.sock"), denied());
        assert!(e.to_string().contains("group aziotks"), "{e}");
        let e = connect_error(
            Service::Keyd,
            Path::new("/x"),
            std::io::Error::from(ErrorKind::NotFound),
        );
        assert!(matches!(e, AziotError::SocketMissing { .. }), "{e:?}");
    }
}
