//! How the session reaches the hub: the [`SessionConfig`] built by the app, the CONNECT
//! identity (client id, user name, SAS password; PROTOCOL §3.2–3.3), the TCP/TLS or
//! WebSocket target with SNI on its host part, and an optional HTTP CONNECT proxy.
//!
//! It also owns the connection vocabulary that `config` validation produces and hands
//! over unchanged: [`HubTransport`], [`HostPort`] and [`HttpProxy`], each with its one
//! parser, so what `check-config` accepts is exactly what the session is built from.
//!
//! Used by [`super::session`] when it (re)connects. Pure construction of rumqttc options:
//! no I/O. The SAS token ([`super::signer`] signs it) goes into the options only, never
//! into a log.

use std::fmt;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::rustls;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};

use super::backoff::BackoffPolicy;
use super::signer::Signer;
use crate::identity::{ModuleCredentials, ModuleIdentity};

pub const API_VERSION: &str = "2021-04-12";
/// Port of an HTTP proxy URL that names none: 8080, the usual HTTP proxy port.
pub const DEFAULT_PROXY_PORT: u16 = 8080;

/// `hub.transport`: how MQTT is carried to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HubTransport {
    /// MQTT over TLS, port 8883.
    #[default]
    #[serde(rename = "mqtt")]
    Mqtt,
    /// MQTT over WebSocket over TLS, port 443 (for networks that only pass HTTPS).
    #[serde(rename = "mqtt-ws")]
    MqttWs,
}

impl HubTransport {
    /// The port used when the target names none.
    pub const fn default_port(self) -> u16 {
        match self {
            HubTransport::Mqtt => 8883,
            HubTransport::MqttWs => 443,
        }
    }
}

/// A TCP target: a host name or IP address (an IPv6 address without its brackets) and
/// the port, always resolved (the caller's default applied when the text named none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// Why a `host[:port]` was refused; the text is only ever a host and port, no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    #[error("{0:?} is not host, host:port or [ipv6]:port")]
    Malformed(String),
    #[error("{0:?} has an invalid port (1..65535)")]
    Port(String),
}

impl HostPort {
    /// Parses `host`, `host:port` or `[v6addr][:port]`, taking `default_port` when no
    /// port is written. A bare IPv6 address is refused: without brackets its last group
    /// could be a port.
    pub fn parse(text: &str, default_port: u16) -> Result<HostPort, HostPortError> {
        let bad = || HostPortError::Malformed(text.to_owned());
        // A URL or `user@host` is not a host, whatever its colon suggests.
        let forbidden = |c: char| c.is_whitespace() || c.is_control() || "/@?#".contains(c);
        if text.contains(forbidden) {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            host.parse::<Ipv6Addr>().map_err(|_| bad())?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (host, port)
        } else {
            match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        if host.is_empty() || host.contains(['[', ']']) {
            return Err(bad());
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(HostPortError::Port(text.to_owned())),
            },
        };
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

/// `host:port`, `[v6addr]:port` for IPv6: what [`HostPort::parse`] reads back.
impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Everything the session needs, built by the app from `Settings`.
#[derive(Clone)]
pub struct SessionConfig {
    /// The module the session connects as (its names; no key).
    pub identity: ModuleIdentity,
    /// Who signs its tokens: its module key, or aziot-keyd.
    pub signer: Signer,
    pub transport: HubTransport,
    /// TCP/TLS target when it is not the connection string's host.
    pub gateway_host: Option<HostPort>,
    pub tls: Arc<rustls::ClientConfig>,
    pub sas_ttl: Duration,
    pub keep_alive: Duration,
    pub backoff: BackoffPolicy,
    /// Reconnect backoff after credentials the hub refused and the clock did not explain.
    pub refused_backoff: BackoffPolicy,
    /// How long a twin request may stay unanswered before it is sent again.
    pub twin_timeout: Duration,
    /// HTTP CONNECT proxy to tunnel through.
    pub proxy: Option<HttpProxy>,
    /// Reads the module credential again from where it came from, before each connect
    /// after a refusal; `None` when it cannot change (written in the config itself).
    pub reread: Option<ReadCredential>,
}

/// Reads the module credential from its source (a file, the systemd credential, the
/// provisioned file). The error names the setting and the file, never the content.
pub type ReadCredential = Arc<dyn Fn() -> Result<ModuleCredentials, String> + Send + Sync>;

/// An HTTP CONNECT proxy: `http://[user[:password]@]host[:port][/]`. `Debug` and
/// [`HttpProxy::redacted`] hide the user information.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    pub address: HostPort,
    /// User name and password, percent-decoded.
    pub basic_auth: Option<(String, String)>,
}

/// Why a proxy URL was refused. Never carries the user information.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("only http:// proxies are supported, such as \"http://proxy:3128\"")]
    NotHttp,
    #[error("a proxy URL is scheme, host and port only; remove the path, query or fragment")]
    Path,
    #[error("the proxy URL has no host")]
    NoHost,
    #[error("proxy address: {0}")]
    Address(HostPortError),
}

impl fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl HttpProxy {
    /// Parses a proxy URL; only `http://` is supported (the tunnel carries TLS anyway).
    pub fn parse(url: &str) -> Result<HttpProxy, ProxyError> {
        let rest = url
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
            .map(|_| &url[7..])
            .ok_or(ProxyError::NotHttp)?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if !tail.is_empty() && tail != "/" {
            return Err(ProxyError::Path);
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        if hostport.is_empty() {
            return Err(ProxyError::NoHost);
        }
        let address = HostPort::parse(hostport, DEFAULT_PROXY_PORT).map_err(ProxyError::Address)?;
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
            address,
            basic_auth,
        })
    }

    /// The URL with any user information replaced, for logs and `check-config`; valid
    /// config again (it parses back to the same address).
    pub fn redacted(&self) -> String {
        match self.basic_auth {
            Some(_) => format!(
                "http://{}@{}",
                crate::config::credentials::REDACTED,
                self.address
            ),
            None => format!("http://{}", self.address),
        }
    }
}

/// `{HostName}/{d}/{m}/?api-version=..&DeviceClientType=edgetwin%2F{version}` (PROTOCOL §3.3).
pub fn user_name(creds: &ModuleIdentity) -> String {
    format!(
        "{}/{}/{}/?api-version={API_VERSION}&DeviceClientType=edgetwin%2F{}",
        creds.host_name,
        creds.device_id,
        creds.module_id,
        env!("CARGO_PKG_VERSION")
    )
}

/// Where the connection goes: `gateway_host` from config, else the connection string's
/// `GatewayHostName` or `HostName` on the transport's port.
pub fn target(config: &SessionConfig) -> HostPort {
    if let Some(gateway) = &config.gateway_host {
        return gateway.clone();
    }
    let host = config.identity.connect_host();
    let port = config.transport.default_port();
    // Hub and gateway names carry no port; one that does not parse is still tried as
    // written, and the resolver names the problem.
    HostPort::parse(host, port).unwrap_or_else(|_| HostPort {
        host: host.to_owned(),
        port,
    })
}

pub(super) fn mqtt_options(config: &SessionConfig) -> MqttOptions {
    let creds = &config.identity;
    let client_id = format!("{}/{}", creds.device_id, creds.module_id);
    let target = target(config);
    let tls = TlsConfiguration::Rustls(config.tls.clone());
    let mut opts = match config.transport {
        HubTransport::Mqtt => {
            let mut o = MqttOptions::new(client_id, target.host, target.port);
            o.set_transport(Transport::tls_with_config(tls));
            o
        }
        HubTransport::MqttWs => {
            let url = format!("wss://{target}/$iothub/websocket");
            let mut o = MqttOptions::new(client_id, url, target.port);
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
            addr: proxy.address.host.clone(),
            port: proxy.address.port,
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

    const MODULE: &str = "HostName=h.example;DeviceId=d1;ModuleId=m1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn host_port(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn host_port_targets_parse_with_the_default_port() {
        assert_eq!(
            HostPort::parse("127.0.0.1:4321", 8883),
            Ok(host_port("127.0.0.1", 4321))
        );
        assert_eq!(
            HostPort::parse("hub.example", 8883),
            Ok(host_port("hub.example", 8883))
        );
        assert_eq!(HostPort::parse("[::1]:99", 8883), Ok(host_port("::1", 99)));
        assert_eq!(HostPort::parse("[::1]", 443), Ok(host_port("::1", 443)));
    }

    #[test]
    fn host_port_refuses_what_is_not_a_host_and_port() {
        for bad in [
            "",
            ":1",
            "http://gw",
            "::1",
            "[::1",
            "[gw]:1",
            "[::1]x",
            "g w",
            "u@gw",
        ] {
            assert!(
                matches!(HostPort::parse(bad, 1), Err(HostPortError::Malformed(_))),
                "{bad:?} accepted"
            );
        }
        for bad in ["gw:", "gw:0", "gw:x", "gw:65536", "gw:1:2", "[::1]:-1"] {
            assert_eq!(
                HostPort::parse(bad, 1),
                Err(HostPortError::Port(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn host_port_displays_what_it_parses_back() {
        for text in ["gw.local:8883", "10.0.0.1:1", "[fe80::1]:443"] {
            let parsed = HostPort::parse(text, 1).unwrap();
            assert_eq!(parsed.to_string(), text);
            assert_eq!(HostPort::parse(&parsed.to_string(), 2), Ok(parsed));
        }
    }

    #[test]
    fn transports_name_their_default_ports() {
        assert_eq!(HubTransport::Mqtt.default_port(), 8883);
        assert_eq!(HubTransport::MqttWs.default_port(), 443);
    }

    #[test]
    fn proxy_urls_parse_with_optional_credentials() {
        let p = HttpProxy::parse("http://proxy.lan:3128").unwrap();
        assert_eq!(
            (p.address, p.basic_auth),
            (host_port("proxy.lan", 3128), None)
        );
        let p = HttpProxy::parse("http://u%40x:s3cret@10.0.0.1:8000/").unwrap();
        assert_eq!(p.basic_auth, Some(("u@x".into(), "s3cret".into())));
        assert_eq!(HttpProxy::parse("http://p").unwrap().address.port, 8080);
        assert_eq!(
            HttpProxy::parse("HTTP://[::1]:3128").unwrap().address,
            host_port("::1", 3128)
        );
    }

    #[test]
    fn proxy_urls_that_run_could_not_use_are_refused_without_echoing_the_password() {
        let cases = [
            ("socks5://p:1", ProxyError::NotHttp),
            ("https://p:1", ProxyError::NotHttp),
            ("proxy:3128", ProxyError::NotHttp),
            ("http://", ProxyError::NoHost),
            ("http://user:pw@", ProxyError::NoHost),
            ("http://p:3128/squid", ProxyError::Path),
            ("http://p:3128?x=1", ProxyError::Path),
        ];
        for (url, expected) in cases {
            assert_eq!(HttpProxy::parse(url), Err(expected), "{url}");
        }
        let e = HttpProxy::parse("http://user:hunter2@proxy:notaport").unwrap_err();
        assert!(
            matches!(e, ProxyError::Address(HostPortError::Port(_))),
            "{e}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn proxy_debug_and_redacted_hide_the_user_information() {
        let p = HttpProxy::parse("http://user:hunter2@proxy:3128").unwrap();
        for shown in [format!("{p:?}"), p.redacted()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("user"), "{shown}");
        }
        assert_eq!(p.redacted(), "http://<redacted>@proxy:3128");
        assert_eq!(
            HttpProxy::parse("http://proxy").unwrap().redacted(),
            "http://proxy:8080"
        );
    }

    #[test]
    fn target_is_the_gateway_host_else_the_hub_on_the_transport_port() {
        let creds: ModuleCredentials = MODULE.parse().unwrap();
        let mut config = SessionConfig {
            identity: creds.identity(),
            signer: Signer::Key(creds.key),
            transport: HubTransport::MqttWs,
            gateway_host: None,
            tls: crate::hub::tls::client_config(None),
            sas_ttl: Duration::from_secs(3600),
            keep_alive: Duration::from_secs(60),
            backoff: BackoffPolicy::default(),
            refused_backoff: BackoffPolicy::default(),
            twin_timeout: Duration::from_secs(10),
            proxy: None,
            reread: None,
        };
        assert_eq!(target(&config), host_port("h.example", 443));
        config.transport = HubTransport::Mqtt;
        assert_eq!(target(&config), host_port("h.example", 8883));
        config.gateway_host = Some(host_port("::1", 1884));
        assert_eq!(target(&config), host_port("::1", 1884));
        assert_eq!(
            mqtt_options(&config).broker_address(),
            ("::1".to_owned(), 1884)
        );
    }

    #[test]
    fn user_name_follows_protocol_3_3() {
        let creds: ModuleCredentials = MODULE.parse().unwrap();
        assert_eq!(
            user_name(&creds.identity()),
            format!(
                "h.example/d1/m1/?api-version=2021-04-12&DeviceClientType=edgetwin%2F{}",
                env!("CARGO_PKG_VERSION")
            )
        );
    }
}
