//! Raw configuration → typed [`Settings`], with the checks that span fields.
//!
//! Called only by `Settings::load`. Each check records its problem and carries on with a
//! usable stand-in value, so one run reports everything; the stand-ins never leave
//! `load`, because any recorded problem makes it return the errors instead.
//!
//! Each value is parsed here by the parser of the type the daemon uses (the hub's
//! `HostPort`, `HttpProxy`, `CaBundle`, `identity`'s connection strings), never by a
//! looser look-alike, so nothing `load` accepts is refused later by `run`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::credentials::{self, CredentialSource};
use super::duration;
use super::errors::{ConfigError, ConfigErrors};
use super::raw::{Layers, RawBackoff, RawConfig, RawProperty};
use super::{
    ConfigWarning, HookSettings, HubSettings, LogSettings, ProvisioningMethod, Settings,
    StateSettings, TelemetrySettings, TwinSettings,
};
use crate::hub::backoff::BackoffPolicy;
use crate::hub::options::{HostPort, HttpProxy};
use crate::hub::tls::CaBundle;
use crate::identity::{ConnectionStringError, ModuleCredentials};
use crate::twin::{PropertySpec, Schema};

mod aziot;
mod provisioning;

use provisioning::{method, provisioning};

/// Below a minute, renewal at 80 % would reconnect every few seconds.
const MIN_SAS_TTL: Duration = Duration::from_secs(60);
/// rumqttc refuses (panics on) less than 5 s; beyond 1177 s the hub's 1.5× grace exceeds
/// the Azure load balancer's idle limit (PROTOCOL §3.5).
const KEEP_ALIVE_RANGE: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(1177));

struct Check<'a> {
    layers: &'a Layers,
    errors: &'a mut ConfigErrors,
    warnings: Vec<ConfigWarning>,
}

impl Check<'_> {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(key, self.layers.origin(key), message);
    }

    fn warn(&mut self, key: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            key: key.to_owned(),
            origin: self.layers.origin(key),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, text: &str, fallback: Duration) -> Duration {
        duration::parse(text).unwrap_or_else(|e| {
            self.fail(key, e);
            fallback
        })
    }
}

pub(super) fn settings(raw: RawConfig, layers: &Layers, errors: &mut ConfigErrors) -> Settings {
    let mut check = Check {
        layers,
        errors,
        warnings: Vec::new(),
    };
    let state_dir = state_dir(&mut check, &raw.state.dir);
    let method = method(&mut check, &raw.provisioning);
    let hub = hub(
        &mut check,
        &raw,
        &state_dir,
        method != ProvisioningMethod::None || raw.aziot.enabled,
    );
    let aziot = aziot::aziot(&mut check, &raw.aziot, &hub.credentials, method);
    // The provisioning secret is used only while the module credential is still to be
    // provisioned; after that it may well be gone (README: remove it after first boot).
    let due = matches!(&hub.credentials, CredentialSource::Provisioned(p) if !p.exists());
    let provisioning = provisioning(&mut check, &raw.provisioning, method, due);
    let twin = twin(&mut check, &raw);
    let log = log(&mut check, &raw);
    Settings {
        files: layers.files.clone(),
        hub,
        provisioning,
        aziot,
        twin,
        telemetry: TelemetrySettings {
            enabled: raw.telemetry.enabled,
        },
        state: StateSettings { dir: state_dir },
        hooks: HookSettings {
            on_change: non_empty(&raw.hooks.on_change).map(str::to_owned),
        },
        log,
        warnings: check.warnings,
    }
}

/// An inline connection string is config text: parse it now, as `run` will. Files are
/// read by `Settings::check_credentials` (see the `config` module documentation).
fn inline_credential<T: FromStr<Err = ConnectionStringError>>(
    check: &mut Check,
    source: &CredentialSource,
    key: &str,
) {
    if let CredentialSource::Inline(secret) = source {
        if let Err(e) = secret.expose().parse::<T>() {
            check.fail(key, e.to_string());
        }
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

/// `elsewhere`: the module credential may come from somewhere else than `[hub]` (first-boot
/// provisioning, or aziot-identityd).
fn hub(check: &mut Check, raw: &RawConfig, state_dir: &Path, elsewhere: bool) -> HubSettings {
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
    if chosen.is_none() && !ambiguous && !provisioned.exists() && !elsewhere {
        check.fail(
            "hub.connection_string_file",
            format!(
                "no module credentials: set hub.connection_string_file or hub.connection_string, \
                 pass the systemd credential {}, or choose a [provisioning] method to create {}",
                credentials::SYSTEMD_MODULE_CREDENTIAL,
                provisioned.display()
            ),
        );
    }
    let credentials = chosen.unwrap_or(CredentialSource::Provisioned(provisioned));
    inline_credential::<ModuleCredentials>(check, &credentials, "hub.connection_string");

    let sas_ttl = check.duration("hub.sas_ttl", &h.sas_ttl, MIN_SAS_TTL);
    if sas_ttl < MIN_SAS_TTL {
        check.fail("hub.sas_ttl", "must be at least 60s");
    }
    let keep_alive = check.duration("hub.keep_alive", &h.keep_alive, KEEP_ALIVE_RANGE.0);
    if keep_alive < KEEP_ALIVE_RANGE.0 || keep_alive > KEEP_ALIVE_RANGE.1 {
        check.fail("hub.keep_alive", "must be between 5s and 1177s");
    }
    let backoff = backoff_policy(check, "hub.backoff", &h.backoff, Duration::from_secs(1));
    let refused_backoff = backoff_policy(
        check,
        "hub.refused_backoff",
        &h.refused_backoff,
        Duration::from_secs(60),
    );

    let transport = h.transport;
    let gateway_host = non_empty(&h.gateway_host).and_then(|text| {
        HostPort::parse(text, transport.default_port())
            .map_err(|e| check.fail("hub.gateway_host", e.to_string()))
            .ok()
    });
    let ca_file = non_empty(&h.ca_file).and_then(|path| {
        CaBundle::read(Path::new(path))
            .map_err(|e| check.fail("hub.ca_file", e.to_string()))
            .ok()
    });
    let proxy = non_empty(&h.proxy).and_then(|url| {
        HttpProxy::parse(url)
            .map_err(|e| check.fail("hub.proxy", e.to_string()))
            .ok()
    });
    HubSettings {
        credentials,
        transport,
        gateway_host,
        ca_file,
        sas_ttl,
        keep_alive,
        backoff,
        refused_backoff,
        proxy,
    }
}

/// `{ initial, max }` under `key`: both durations, `0 < initial <= max`.
fn backoff_policy(
    check: &mut Check,
    key: &str,
    raw: &RawBackoff,
    fallback: Duration,
) -> BackoffPolicy {
    let initial_key = format!("{key}.initial");
    let initial = check.duration(&initial_key, &raw.initial, fallback);
    let max = check.duration(&format!("{key}.max"), &raw.max, initial);
    if initial.is_zero() {
        check.fail(&initial_key, "must be more than 0s");
    }
    if initial > max {
        check.fail(
            &initial_key,
            format!(
                "{} is longer than {key}.max ({})",
                duration::format(initial),
                duration::format(max)
            ),
        );
    }
    BackoffPolicy { initial, max }
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
    // The parser `logging` installs the level with, so a level accepted here is applied.
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
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
    fn identity_names_follow_hub_rules() {
        assert!(check_identity_name("gw-01.site_a").is_ok());
        assert!(check_identity_name("gw 01").is_err());
        assert!(check_identity_name(&"x".repeat(129)).is_err());
    }
}
