//! The effective configuration as TOML for `edgetwin check-config`, secrets replaced.
//!
//! Written by hand because `toml` is not a direct dependency; the output is valid TOML
//! in the layout of DESIGN §4, so an operator can paste it back into a file. Must never
//! print a connection string or proxy password.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::credentials::{CredentialSource, REDACTED};
use super::{duration, DpsKeyKind, Settings};
use crate::hub::options::HttpProxy;

pub(super) fn toml(s: &Settings) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line("# effective edgetwin configuration; secrets are shown as <redacted>".into());
    for file in &s.files {
        line(format!("# read: {}", file.display()));
    }
    // Warnings name keys and files only, never a value that could be a secret.
    for warning in &s.warnings {
        line(format!("# warning: {warning}"));
    }

    let h = &s.hub;
    line("\n[hub]".into());
    line(credential("connection_string", &h.credentials));
    line(format!("transport = {}", name(&h.transport)));
    let gateway = h.gateway_host.as_ref().map(ToString::to_string);
    line(format!(
        "gateway_host = {}",
        quote(gateway.as_deref().unwrap_or(""))
    ));
    let ca = h
        .ca_file
        .as_ref()
        .map_or(String::new(), |ca| ca.path().display().to_string());
    line(format!("ca_file = {}", quote(&ca)));
    line(format!("sas_ttl = {}", quote(&duration::format(h.sas_ttl))));
    line(format!(
        "keep_alive = {}",
        quote(&duration::format(h.keep_alive))
    ));
    line(format!(
        "backoff = {{ initial = {}, max = {} }}",
        quote(&duration::format(h.backoff.initial)),
        quote(&duration::format(h.backoff.max))
    ));
    line(format!(
        "refused_backoff = {{ initial = {}, max = {} }}",
        quote(&duration::format(h.refused_backoff.initial)),
        quote(&duration::format(h.refused_backoff.max))
    ));
    let proxy = h.proxy.as_ref().map_or(String::new(), HttpProxy::redacted);
    line(format!("proxy = {}", quote(&proxy)));

    let p = &s.provisioning;
    line("\n[provisioning]".into());
    line(format!("method = {}", quote(p.method.as_str())));
    for (key, source) in [
        ("service_connection_string", &p.service_credentials),
        ("device_connection_string", &p.device_credentials),
    ] {
        match source {
            Some(source) => line(credential(key, source)),
            None => line(format!("# {key}: not configured")),
        }
    }
    line(format!(
        "device_id = {}",
        quote(p.device_id.as_deref().unwrap_or(""))
    ));
    line(format!("module_id = {}", quote(&p.module_id)));
    let registry = p.registry_endpoint.as_ref().map(ToString::to_string);
    line(format!(
        "registry_endpoint = {}",
        quote(registry.as_deref().unwrap_or(""))
    ));
    let dps = &p.dps;
    line("\n[provisioning.dps]".into());
    line(format!("global_endpoint = {}", quote(&dps.global_endpoint)));
    line(format!("id_scope = {}", quote(&dps.id_scope)));
    line(format!("registration_id = {}", quote(&dps.registration_id)));
    match &dps.key {
        Some((DpsKeyKind::Individual, source)) => line(credential("symmetric_key", source)),
        Some((DpsKeyKind::Group, source)) => line(credential("group_key", source)),
        None => line("# enrollment key: not configured".into()),
    }

    line("\n[aziot]".into());
    line(format!("enabled = {}", s.aziot.is_some()));
    if let Some(aziot) = &s.aziot {
        for (key, socket) in [
            ("identityd_socket", aziot.identityd_socket()),
            ("keyd_socket", aziot.keyd_socket()),
        ] {
            line(format!("{key} = {}", quote(&socket.display().to_string())));
        }
    }

    line("\n[twin]".into());
    line(format!("ack = {}", name(&s.twin.ack)));
    line(format!("unknown = {}", name(&s.twin.schema.unknown())));
    for (prop, spec) in s.twin.schema.properties() {
        line(format!("\n[twin.properties.{}]", key(prop)));
        line(format!("type = {}", quote(spec.kind().as_str())));
        if let Some(min) = spec.min() {
            line(format!("min = {}", number(min)));
        }
        if let Some(max) = spec.max() {
            line(format!("max = {}", number(max)));
        }
        if let Some(default) = spec.default_value().and_then(value) {
            line(format!("default = {default}"));
        }
    }

    line("\n[telemetry]".into());
    line(format!("enabled = {}", s.telemetry.enabled));
    line("\n[state]".into());
    line(format!(
        "dir = {}",
        quote(&s.state.dir.display().to_string())
    ));
    line("\n[hooks]".into());
    line(format!(
        "on_change = {}",
        quote(s.hooks.on_change.as_deref().unwrap_or(""))
    ));
    line("\n[log]".into());
    line(format!("level = {}", quote(&s.log.level)));
    line(format!("format = {}", name(&s.log.format)));
    out
}

/// `<key> = "<redacted>"`, `<key>_file = "path"`, or a comment for the implicit sources.
fn credential(key: &str, source: &CredentialSource) -> String {
    match source {
        CredentialSource::Inline(_) => format!("{key} = {}", quote(REDACTED)),
        CredentialSource::File(path) => {
            format!("{key}_file = {}", quote(&path.display().to_string()))
        }
        CredentialSource::SystemdCredential(path) => {
            format!("# {key}: from systemd credential {}", path.display())
        }
        CredentialSource::Provisioned(path) => {
            format!("# {key}: provisioned, {}", path.display())
        }
    }
}

/// A JSON string literal is a valid TOML basic string for everything we print.
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

/// The config spelling of an enum, as serde writes it.
fn name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => quote(&s),
        _ => quote(""),
    }
}

fn key(text: &str) -> String {
    let bare = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        text.to_owned()
    } else {
        quote(text)
    }
}

fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n:?}")
    }
}

/// A JSON value as a TOML value; `None` for null, which TOML cannot express.
fn value(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => quote(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().filter_map(value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let mut text = String::from("{");
            for (i, (k, v)) in map
                .iter()
                .filter_map(|(k, v)| Some((k, value(v)?)))
                .enumerate()
            {
                let sep = if i == 0 { " " } else { ", " };
                let _ = write!(text, "{sep}{} = {v}", key(k));
            }
            text.push_str(" }");
            text
        }
    })
}
