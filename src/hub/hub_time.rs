//! The hub's time, read from the `Date` header of one HTTPS answer of the hub (or the
//! gateway the session connects through), after the hub refused the credentials: a
//! CONNACK carries no time, and "refused" alone cannot tell a wrong clock from a wrong key.
//!
//! Used by [`super::session`], which spawns [`TimeSource::read`] off its event-loop task
//! and feeds the result to the connection machine. One `HEAD /` per refusal episode, with
//! the session's TLS trust and proxy: any answer carries a `Date`, a 401 or 404 included.
//! Never sends a credential.

use std::time::{Duration, SystemTime};

use super::options::{target, HostPort, HubTransport, SessionConfig};
use crate::identity::clock::hub_time;

/// Limit for the one request: connect, TLS, answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Port of the hub's (and an IoT Edge gateway's) HTTPS endpoint when MQTT goes to 8883.
const HTTPS_PORT: u16 = 443;

/// Why the hub's time could not be read; says nothing secret.
#[derive(Debug, thiserror::Error)]
pub enum HubTimeError {
    #[error("building the HTTPS client: {0}")]
    Client(String),
    #[error("HEAD {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("HEAD {url}: answer {status} without a usable Date header")]
    NoDate { url: String, status: u16 },
}

/// Where and how the hub's time is read.
#[derive(Clone)]
pub struct TimeSource {
    http: reqwest::Client,
    url: String,
}

impl std::fmt::Debug for TimeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeSource")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl TimeSource {
    /// For the session's hub: its HTTPS endpoint, TLS trust and proxy.
    pub fn new(config: &SessionConfig) -> Result<TimeSource, HubTimeError> {
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls((*config.tls).clone())
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("edgetwin/", env!("CARGO_PKG_VERSION")))
            // The MQTT session does not use the environment's proxy either.
            .no_proxy();
        if let Some(proxy) = &config.proxy {
            let mut p = reqwest::Proxy::all(format!("http://{}", proxy.address))
                .map_err(|e| HubTimeError::Client(e.to_string()))?;
            if let Some((user, password)) = &proxy.basic_auth {
                p = p.basic_auth(user, password);
            }
            builder = builder.proxy(p);
        }
        let http = builder
            .build()
            .map_err(|e| HubTimeError::Client(e.to_string()))?;
        Ok(TimeSource {
            http,
            url: format!("https://{}/", https_endpoint(config)),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The hub's time now, from one request's `Date`.
    pub async fn read(&self) -> Result<SystemTime, HubTimeError> {
        let answer = self
            .http
            .head(&self.url)
            .send()
            .await
            .map_err(|e| HubTimeError::Request {
                url: self.url.clone(),
                reason: error_chain(e),
            })?;
        answer
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(hub_time)
            .ok_or_else(|| HubTimeError::NoDate {
                url: self.url.clone(),
                status: answer.status().as_u16(),
            })
    }
}

/// The host the session connects to, on the port that speaks HTTPS: the target itself
/// for MQTT over WebSocket, port 443 of the target's host for MQTT over TLS.
pub fn https_endpoint(config: &SessionConfig) -> HostPort {
    let target = target(config);
    match config.transport {
        HubTransport::MqttWs => target,
        HubTransport::Mqtt => HostPort {
            host: target.host,
            port: HTTPS_PORT,
        },
    }
}

/// The error and its causes, without the URL (the caller names it once).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::backoff::BackoffPolicy;

    fn config(transport: HubTransport, gateway: Option<HostPort>) -> SessionConfig {
        let creds: crate::identity::ModuleCredentials =
            "HostName=h.example;DeviceId=d;ModuleId=m;SharedAccessKey=AAAA"
                .parse()
                .unwrap();
        SessionConfig {
            identity: creds.identity(),
            signer: crate::hub::signer::Signer::Key(creds.key),
            transport,
            gateway_host: gateway,
            tls: crate::hub::tls::client_config(None),
            sas_ttl: Duration::from_secs(3600),
            keep_alive: Duration::from_secs(60),
            backoff: BackoffPolicy::default(),
            refused_backoff: BackoffPolicy::default(),
            twin_timeout: Duration::from_secs(10),
            proxy: None,
            reread: None,
        }
    }

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn over_mqtt_the_hubs_time_comes_from_port_443_of_the_same_host() {
        let c = config(HubTransport::Mqtt, None);
        assert_eq!(https_endpoint(&c), hp("h.example", 443));
        let c = config(HubTransport::Mqtt, Some(hp("gw.local", 8883)));
        assert_eq!(https_endpoint(&c), hp("gw.local", 443));
    }

    #[test]
    fn over_websocket_the_hubs_time_comes_from_the_target_itself() {
        let c = config(HubTransport::MqttWs, Some(hp("127.0.0.1", 8443)));
        assert_eq!(https_endpoint(&c), hp("127.0.0.1", 8443));
        let source = TimeSource::new(&c).expect("client");
        assert_eq!(source.url(), "https://127.0.0.1:8443/");
        let c = config(HubTransport::MqttWs, Some(hp("::1", 443)));
        assert_eq!(
            TimeSource::new(&c).expect("client").url(),
            "https://[::1]:443/"
        );
    }
}
