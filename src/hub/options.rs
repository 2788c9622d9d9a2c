//! How the session reaches the hub: the [`SessionConfig`] built by the app, the CONNECT
//! identity (client id, user name, SAS password; PROTOCOL §3.2–3.3), the TCP/TLS or
//! WebSocket target with SNI on its host part, and an optional HTTP CONNECT proxy.
//!
//! Used by [`super::session`] when it (re)connects. Pure construction of rumqttc options:
//! no I/O. The SAS token it signs goes into the options only, never into a log.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::tokio_rustls::rustls;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use super::backoff::BackoffPolicy;
use crate::identity::ModuleCredentials;

pub const API_VERSION: &str = "2021-04-12";

/// `transport` in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HubTransport {
    #[default]
    Mqtt,
    MqttWs,
}

/// Everything the session needs, built by the app from `Settings`.
#[derive(Clone)]
pub struct SessionConfig {
    pub credentials: ModuleCredentials,
    pub transport: HubTransport,
    /// TCP/TLS target (`host` or `host:port`) when it is not the hub's HostName.
    pub gateway_host: Option<String>,
    pub tls: Arc<rustls::ClientConfig>,
    pub sas_ttl: Duration,
    pub keep_alive: Duration,
    pub backoff: BackoffPolicy,
    /// How long a twin request may stay unanswered before it is sent again.
    pub twin_timeout: Duration,
    /// HTTP CONNECT proxy to tunnel through.
    pub proxy: Option<HttpProxy>,
}

/// An HTTP CONNECT proxy: `http://[user:password@]host[:port]`. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    pub host: String,
    pub port: u16,
    pub basic_auth: Option<(String, String)>,
}

impl std::fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

impl HttpProxy {
    /// Parses a proxy URL; only `http://` is supported (the tunnel carries TLS anyway).
    pub fn parse(url: &str) -> Result<HttpProxy, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| "only http:// proxies are supported".to_owned())?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport, 8080);
        if host.is_empty() {
            return Err("the proxy URL has no host".into());
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let basic_auth = userinfo.map(|u| match u.split_once(':') {
            Some((user, password)) => (decode(user), decode(password)),
            None => (decode(u), String::new()),
        });
        Ok(HttpProxy {
            host,
            port,
            basic_auth,
        })
    }
}

/// `{HostName}/{d}/{m}/?api-version=..&DeviceClientType=edgetwin%2F{version}` (PROTOCOL §3.3).
pub fn user_name(creds: &ModuleCredentials) -> String {
    format!(
        "{}/{}/{}/?api-version={API_VERSION}&DeviceClientType=edgetwin%2F{}",
        creds.host_name,
        creds.device_id,
        creds.module_id,
        env!("CARGO_PKG_VERSION")
    )
}

pub(super) fn credentials(config: &SessionConfig) -> (String, String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Rounded up, so the token lives at least `sas_ttl` and the renewal at 80 % of it
    // always comes before the hub closes the connection.
    let expiry = (now + config.sas_ttl.max(Duration::from_secs(1)))
        .as_secs_f64()
        .ceil() as u64;
    (
        user_name(&config.credentials),
        config.credentials.sas_token(expiry),
    )
}

/// Splits `host` or `host:port` (IPv6 in brackets) into host and port.
pub fn split_host_port(target: &str, default_port: u16) -> (String, u16) {
    if let Some(rest) = target.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            let port = tail
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(default_port);
            return (host.to_owned(), port);
        }
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host.to_owned(), port),
            Err(_) => (target.to_owned(), default_port),
        },
        _ => (target.to_owned(), default_port),
    }
}

pub(super) fn mqtt_options(config: &SessionConfig) -> MqttOptions {
    let creds = &config.credentials;
    let client_id = format!("{}/{}", creds.device_id, creds.module_id);
    let target = config
        .gateway_host
        .as_deref()
        .unwrap_or_else(|| creds.connect_host());
    let tls = TlsConfiguration::Rustls(config.tls.clone());
    let mut opts = match config.transport {
        HubTransport::Mqtt => {
            let (host, port) = split_host_port(target, 8883);
            let mut o = MqttOptions::new(client_id, host, port);
            o.set_transport(Transport::tls_with_config(tls));
            o
        }
        HubTransport::MqttWs => {
            let (host, port) = split_host_port(target, 443);
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            let url = format!("wss://{host}:{port}/$iothub/websocket");
            let mut o = MqttOptions::new(client_id, url, port);
            o.set_transport(Transport::wss_with_config(tls));
            o
        }
    };
    if let Some(proxy) = &config.proxy {
        opts.set_proxy(rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: match &proxy.basic_auth {
                Some((username, password)) => rumqttc::ProxyAuth::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                None => rumqttc::ProxyAuth::None,
            },
            addr: proxy.host.clone(),
            port: proxy.port,
        });
    }
    opts.set_clean_session(false)
        .set_keep_alive(config.keep_alive.max(Duration::from_secs(5)))
        .set_max_packet_size(256 * 1024, 256 * 1024);
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_targets_split_with_defaults() {
        assert_eq!(
            split_host_port("127.0.0.1:4321", 8883),
            ("127.0.0.1".into(), 4321)
        );
        assert_eq!(
            split_host_port("hub.example", 8883),
            ("hub.example".into(), 8883)
        );
        assert_eq!(split_host_port("[::1]:99", 8883), ("::1".into(), 99));
        assert_eq!(split_host_port("[::1]", 443), ("::1".into(), 443));
    }

    #[test]
    fn proxy_urls_parse_with_optional_credentials() {
        let p = HttpProxy::parse("http://proxy.lan:3128").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.basic_auth),
            ("proxy.lan", 3128, None)
        );
        let p = HttpProxy::parse("http://u%40x:s3cret@10.0.0.1:8000/").unwrap();
        assert_eq!(p.basic_auth, Some(("u@x".into(), "s3cret".into())));
        assert!(!format!("{p:?}").contains("s3cret"));
        assert_eq!(HttpProxy::parse("http://p").unwrap().port, 8080);
        assert!(HttpProxy::parse("socks5://p:1").is_err());
    }

    #[test]
    fn user_name_follows_protocol_3_3() {
        let creds: ModuleCredentials =
            "HostName=h.example;DeviceId=d1;ModuleId=m1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
                .parse()
                .unwrap();
        assert_eq!(
            user_name(&creds),
            format!(
                "h.example/d1/m1/?api-version=2021-04-12&DeviceClientType=edgetwin%2F{}",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}
