//! A scripted, recording stand-in for the hub's HTTPS REST API, for what the emulator
//! cannot be made to do on cue: answer 429 or 5xx a set number of times, answer late,
//! send a malformed error body, change the twin between a read and a write.
//!
//! Every request is recorded (method, path, query, headers, body) before the script
//! answers it, so tests count attempts and check exactly what the client sent. TLS uses
//! a certificate for `localhost` signed by a CA written into the server's own temporary
//! directory ([`ScriptedHttps::ca_path`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path as sent (percent-encoding kept).
    pub path: String,
    /// The query string as sent, without `?`.
    pub query: Option<String>,
    /// Header names in lower case; a repeated header keeps its last value.
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body parsed as JSON; panics when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e})"))
    }
}

/// What the script answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (to provoke client timeouts).
    pub delay: Option<Duration>,
}

impl Reply {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![(
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            )],
            body: body.to_string(),
            delay: None,
        }
    }

    /// `status` with `body` as it is (malformed bodies, HTML error pages).
    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
            delay: None,
        }
    }

    /// `status` without a body.
    pub fn empty(status: u16) -> Reply {
        Reply::text(status, "")
    }

    /// An error in the hub's older body format plus the `iothub-errorcode` header.
    pub fn hub_error(status: u16, code_name: &str, message: &str) -> Reply {
        Reply::json(
            status,
            serde_json::json!({
                "Message": format!("ErrorCode:{code_name};{message}"),
                "ExceptionMessage": "Tracking ID:0123456789abcdef-G:1-TimeStamp:01/01/2026 00:00:00"
            }),
        )
        .header("iothub-errorcode", code_name)
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = Some(delay);
        self
    }
}

type Script = Box<dyn FnMut(&Recorded) -> Reply + Send>;

struct Inner {
    script: Mutex<Script>,
    requests: Mutex<Vec<Recorded>>,
}

/// A running scripted server on a free loopback port; stops when dropped.
pub struct ScriptedHttps {
    port: u16,
    dir: tempfile::TempDir,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedHttps {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedHttps {
    /// Serves HTTPS, answering every request with `script(request)`.
    pub async fn start(script: impl FnMut(&Recorded) -> Reply + Send + 'static) -> ScriptedHttps {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = crate::tls::load_or_create(dir.path(), "localhost").expect("certificates");
        let acceptor = TlsAcceptor::from(tls.server_config);
        let inner = Arc::new(Inner {
            script: Mutex::new(Box::new(script)),
            requests: Mutex::new(Vec::new()),
        });
        let shared = inner.clone();
        let app = Router::new().fallback(move |req: Request| answer(shared.clone(), req));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        ScriptedHttps {
            port,
            dir,
            inner,
            task,
        }
    }

    /// Answers the replies in order, then repeats the last one.
    pub async fn replying(replies: Vec<Reply>) -> ScriptedHttps {
        assert!(!replies.is_empty(), "at least one reply");
        let mut replies = std::collections::VecDeque::from(replies);
        Self::start(move |_| {
            if replies.len() > 1 {
                replies.pop_front().expect("non-empty")
            } else {
                replies[0].clone()
            }
        })
        .await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `localhost:<port>`, the HostName of service connection strings for this server.
    pub fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// The PEM file of the CA that signed the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join(crate::tls::CA_FILE)
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_path()).expect("CA file")
    }

    /// A service connection string for `policy` with a fresh random key.
    pub fn service_connection_string(&self, policy: &str) -> String {
        format!(
            "HostName={};SharedAccessKeyName={policy};SharedAccessKey={}",
            self.authority(),
            edgetwin::identity::SharedKey::generate().as_base64()
        )
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().expect("requests").clone()
    }

    /// The only request received; panics if there were more or none.
    pub fn only_request(&self) -> Recorded {
        let mut all = self.requests();
        assert_eq!(all.len(), 1, "expected one request, got {all:#?}");
        all.remove(0)
    }
}

async fn answer(inner: Arc<Inner>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    inner
        .requests
        .lock()
        .expect("requests")
        .push(recorded.clone());
    let reply = (inner.script.lock().expect("script"))(&recorded);
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response =
        Response::builder().status(StatusCode::from_u16(reply.status).expect("valid status"));
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    response
        .body(Body::from(reply.body))
        .expect("valid response")
}
