//! Raw configuration → typed [`Settings`], with the checks that span fields.
//!
//! Called only by `Settings::load`. Each check records its problem and carries on with a
//! usable stand-in value, so one run reports everything; the stand-ins never leave
//! `load`, because any recorded problem makes it return the errors instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::credentials::{self, CredentialSource};
use super::duration;
use super::errors::ConfigErrors;
use super::raw::{Layers, RawConfig, RawProperty};
use super::{
    Backoff, GatewayHost, HookSettings, HubSettings, LogSettings, ProvisioningSettings, Proxy,
    Settings, StateSettings, TelemetrySettings, TwinSettings,
};
use crate::twin::{PropertySpec, Schema};

/// Below a minute, renewal at 80 % would reconnect every few seconds.
const MIN_SAS_TTL: Duration = Duration::from_secs(60);
/// rumqttc refuses (panics on) less than 5 s; beyond 1177 s the hub's 1.5× grace exceeds
/// the Azure load balancer's idle limit (PROTOCOL §3.5).
const KEEP_ALIVE_RANGE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(1177));

struct Check<'a> {
    layers: &'a Layers,
    errors: &'a mut ConfigErrors,
}

impl Check<'_> {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(key, self.layers.origin(key), message);
    }

    fn duration(&mut self, key: &str, text: &str, fallback: Duration) -> Duration {
        duration::parse(text).unwrap_or_else(|e| {
            self.fail(key, e);
            fallback
        })
    }
}

pub(super) fn settings(raw: RawConfig, layers: &Layers, errors: &mut ConfigErrors) -> Settings {
    let mut check = Check { layers, errors };
    let state_dir = state_dir(&mut check, &raw.state.dir);
    let provisioning = provisioning(&mut check, &raw);
    let hub = hub(&mut check, &raw, &state_dir, provisioning.enabled);
    let twin = twin(&mut check, &raw);
    let log = log(&mut check, &raw);
    Settings {
        files: layers.files.clone(),
        hub,
        provisioning,
        twin,
        telemetry: TelemetrySettings {
            enabled: raw.telemetry.enabled,
        },
        state: StateSettings { dir: state_dir },
        hooks: HookSettings {
            on_change: non_empty(&raw.hooks.on_change).map(str::to_owned),
        },
        log,
    }
}

fn non_empty(text: &str) -> Option<&str> {
    let text = text.trim();
    (!text.is_empty()).then_some(text)
}

fn state_dir(check: &mut Check, dir: &str) -> PathBuf {
    let path = PathBuf::from(dir.trim());
    // A relative state dir would depend on the daemon's working directory.
    if !path.is_absolute() {
        check.fail("state.dir", "must be an absolute path");
    }
    path
}

fn hub(check: &mut Check, raw: &RawConfig, state_dir: &Path, provisioning: bool) -> HubSettings {
    let h = &raw.hub;
    let origin = |key: &str| check.layers.origin(key);
    let before = check.errors.len();
    let chosen = credentials::choose(
        ("hub.connection_string", &h.connection_string),
        ("hub.connection_string_file", &h.connection_string_file),
        credentials::SYSTEMD_MODULE_CREDENTIAL,
        origin,
        check.errors,
    );
    let provisioned = state_dir.join(credentials::PROVISIONED_MODULE_CREDENTIAL);
    let ambiguous = check.errors.len() > before;
    if chosen.is_none() && !ambiguous && !provisioned.exists() && !provisioning {
        check.fail(
            "hub.connection_string_file",
            format!(
                "no module credentials: set hub.connection_string_file or hub.connection_string, \
                 pass the systemd credential {}, or enable [provisioning] to create {}",
                credentials::SYSTEMD_MODULE_CREDENTIAL,
                provisioned.display()
            ),
        );
    }
    let credentials = chosen.unwrap_or(CredentialSource::Provisioned(provisioned));

    let sas_ttl = check.duration("hub.sas_ttl", &h.sas_ttl, MIN_SAS_TTL);
    if sas_ttl < MIN_SAS_TTL {
        check.fail("hub.sas_ttl", "must be at least 60s");
    }
    let keep_alive = check.duration("hub.keep_alive", &h.keep_alive, KEEP_ALIVE_RANGE.0);
    if keep_alive < KEEP_ALIVE_RANGE.0 || keep_alive > KEEP_ALIVE_RANGE.1 {
        check.fail("hub.keep_alive", "must be between 5s and 1177s");
    }
    let initial = check.duration(
        "hub.backoff.initial",
        &h.backoff.initial,
        Duration::from_secs(1),
    );
    let max = check.duration("hub.backoff.max", &h.backoff.max, initial);
    if initial.is_zero() {
        check.fail("hub.backoff.initial", "must be more than 0s");
    }
    if initial > max {
        check.fail(
            "hub.backoff.initial",
            format!(
                "{} is longer than hub.backoff.max ({})",
                duration::format(initial),
                duration::format(max)
            ),
        );
    }

    let gateway_host = non_empty(&h.gateway_host).and_then(|text| {
        parse_host_port(text)
            .map_err(|e| check.fail("hub.gateway_host", e))
            .ok()
    });
    let ca_file = non_empty(&h.ca_file).map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if !ca.is_file() {
            check.fail(
                "hub.ca_file",
                format!("{} is not a readable file", ca.display()),
            );
        }
    }
    let proxy = non_empty(&h.proxy).map(|p| Proxy(p.to_owned()));
    if let Some(proxy) = &proxy {
        let host = proxy.url().strip_prefix("http://").unwrap_or("");
        if host.trim_end_matches('/').is_empty() {
            check.fail(
                "hub.proxy",
                "must be an http:// URL such as \"http://proxy:3128\"",
            );
        }
    }
    HubSettings {
        credentials,
        transport: h.transport,
        gateway_host,
        ca_file,
        sas_ttl,
        keep_alive,
        backoff: Backoff { initial, max },
        proxy,
    }
}

fn parse_host_port(text: &str) -> Result<GatewayHost, String> {
    let bad = || format!("{text:?} is not host or host:port");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
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
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "/@?#[]".contains(c)) {
        return Err(bad());
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(format!("{text:?} has an invalid port")),
        },
    };
    Ok(GatewayHost {
        host: host.to_owned(),
        port,
    })
}

fn provisioning(check: &mut Check, raw: &RawConfig) -> ProvisioningSettings {
    let p = &raw.provisioning;
    let origin = |key: &str| check.layers.origin(key);
    let before = check.errors.len();
    let service = credentials::choose(
        (
            "provisioning.service_connection_string",
            &p.service_connection_string,
        ),
        (
            "provisioning.service_connection_string_file",
            &p.service_connection_string_file,
        ),
        credentials::SYSTEMD_SERVICE_CREDENTIAL,
        origin,
        check.errors,
    );
    // When both were set, `choose` already said so; "none configured" would be false.
    if p.enabled && service.is_none() && check.errors.len() == before {
        check.fail(
            "provisioning.service_connection_string_file",
            "provisioning is enabled but no service connection string is configured",
        );
    }
    let device_id = match non_empty(&p.device_id) {
        Some(id) => id.to_owned(),
        None => hostname().unwrap_or_default(),
    };
    if p.enabled && device_id.is_empty() {
        check.fail(
            "provisioning.device_id",
            "not set, and the hostname could not be read",
        );
    }
    for (key, id) in [
        ("provisioning.device_id", &device_id),
        ("provisioning.module_id", &p.module_id),
    ] {
        if let Err(e) = check_identity_name(id) {
            check.fail(key, e);
        }
    }
    ProvisioningSettings {
        enabled: p.enabled,
        service_credentials: service,
        device_id,
        module_id: p.module_id.trim().to_owned(),
    }
}

/// The machine's hostname, as systemd sets it.
fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
}

/// IoT Hub device and module id rules: ≤ 128 ASCII letters, digits and `-.%_*?!(),:=@$'`.
fn check_identity_name(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Ok(());
    }
    if id.len() > 128 {
        return Err("longer than 128 characters".into());
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(*c)))
    {
        Some(c) => Err(format!("{c:?} is not allowed in an IoT Hub identity name")),
        None => Ok(()),
    }
}

fn twin(check: &mut Check, raw: &RawConfig) -> TwinSettings {
    let mut schema = Schema::new(raw.twin.unknown);
    for (name, p) in &raw.twin.properties {
        let key = format!("twin.properties.{name}");
        if let Err(e) = check_property_name(name) {
            check.fail(&key, e);
            continue;
        }
        let RawProperty {
            kind,
            min,
            max,
            default,
        } = p.clone();
        match PropertySpec::new(kind, min, max, default) {
            Ok(spec) => {
                if let Err(e) = schema.declare(name, spec) {
                    check.fail(&key, e.to_string());
                }
            }
            Err(e) => check.fail(&key, e.to_string()),
        }
    }
    TwinSettings {
        ack: raw.twin.ack,
        schema,
    }
}

/// Twin key rules (PROTOCOL §4.6): the hub would refuse these in desired anyway, so a
/// declaration for one can never match and is a mistake.
fn check_property_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 1024 {
        return Err("property names must have 1 to 1024 bytes".into());
    }
    if name.contains(|c: char| c == '.' || c == '$' || c == ' ' || c.is_control()) {
        return Err("property names may not contain '.', '$', spaces or control characters".into());
    }
    Ok(())
}

fn log(check: &mut Check, raw: &RawConfig) -> LogSettings {
    let level = raw.log.level.trim().to_owned();
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        check.fail("log.level", format!("not a level or filter directive: {e}"));
    }
    LogSettings {
        level,
        format: raw.log.format,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_host_accepts_host_and_host_port() {
        assert_eq!(
            parse_host_port("gw.local:8883"),
            Ok(GatewayHost {
                host: "gw.local".into(),
                port: Some(8883)
            })
        );
        assert_eq!(
            parse_host_port("[::1]:443"),
            Ok(GatewayHost {
                host: "::1".into(),
                port: Some(443)
            })
        );
        assert_eq!(parse_host_port("gw").unwrap().port, None);
        for bad in ["gw:0", "gw:x", ":1", "http://gw", "gw:1:2"] {
            assert!(parse_host_port(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn identity_names_follow_hub_rules() {
        assert!(check_identity_name("gw-01.site_a").is_ok());
        assert!(check_identity_name("gw 01").is_err());
        assert!(check_identity_name(&"x".repeat(129)).is_err());
    }
}
