//! `edgetwin twin show` and `edgetwin twin set` (DESIGN §1): the service side of the
//! module twin, over [`RegistryClient`]. The replacement for the tutorial's
//! UpdateModuleTwinDesiredProperties.py.
//!
//! The service connection string and the CA come through [`service::connect`] (shared
//! with `fleet`). `twin set --tags` merges tags too: how gateways are picked for a fleet
//! rollout. Every failure is a [`Failure`] carrying its sysexits code, printed once by [`run`].
//! Nothing here ever prints a key, token or connection string.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{exit, service, Failure, ServiceArgs, TwinCommand};
use crate::registry::{RegistryClient, RegistryError};

/// How often `--wait-ack` reads the twin.
const ACK_POLL: Duration = Duration::from_millis(500);

/// Runs one `twin` subcommand; returns the exit code (messages already printed).
pub async fn run(command: TwinCommand) -> u8 {
    let result = match command {
        TwinCommand::Show { service, json } => show(&service, json).await,
        TwinCommand::Set {
            service,
            patch,
            tags,
            wait_ack,
            assignments,
        } => {
            set(
                &service,
                patch.as_deref(),
                tags.as_deref(),
                wait_ack,
                &assignments,
            )
            .await
        }
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("edgetwin twin: {}", f.message);
            f.code
        }
    }
}

/// `twin show`: the twin in readable form, or the raw document with `--json`.
pub async fn show(service: &ServiceArgs, json: bool) -> Result<u8, Failure> {
    let client = service::connect(&service.hub)?.client;
    let twin = client
        .get_module_twin(&service.device, &service.module)
        .await?;
    if json {
        let text = serde_json::to_string_pretty(&twin)
            .map_err(|e| Failure::new(exit::SOFTWARE, e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render_twin(&twin));
    }
    Ok(exit::OK)
}

/// `twin set`: PATCH desired (and tags) with the twin's etag (one retry on 412), print
/// the new desired `$version`, optionally wait for the module's acknowledgements.
pub async fn set(
    service: &ServiceArgs,
    patch: Option<&str>,
    tags: Option<&str>,
    wait_ack: Option<u64>,
    assignments: &[String],
) -> Result<u8, Failure> {
    let usage = |m| Failure::new(exit::USAGE, m);
    let tags = tags.map(parse_tags).transpose().map_err(usage)?;
    let patch = match (&tags, patch, assignments) {
        (Some(_), None, []) => Map::new(),
        _ => build_patch(patch, assignments).map_err(usage)?,
    };
    let client = service::connect(&service.hub)?.client;
    let (device, module) = (service.device.as_str(), service.module.as_str());
    let mut body = Map::new();
    if let Some(tags) = &tags {
        body.insert("tags".into(), Value::Object(tags.clone()));
    }
    if !patch.is_empty() {
        body.insert(
            "properties".into(),
            serde_json::json!({ "desired": patch.clone() }),
        );
    }
    let body = Value::Object(body);

    let twin = client.get_module_twin(device, module).await?;
    let etag = etag_of(&twin)?;
    let updated = match client
        .patch_module_twin(device, module, &body, Some(&etag))
        .await
    {
        Err(RegistryError::PreconditionFailed(_)) => {
            // Someone changed the twin between our read and our write: once more.
            let twin = client.get_module_twin(device, module).await?;
            let etag = etag_of(&twin)?;
            client
                .patch_module_twin(device, module, &body, Some(&etag))
                .await?
        }
        other => other?,
    };
    if tags.is_some() {
        let now = updated.get("tags").cloned().unwrap_or(Value::Null);
        println!("tags {now}");
    }
    if patch.is_empty() {
        return Ok(exit::OK);
    }
    let desired = updated
        .pointer("/properties/desired")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let version = desired
        .get("$version")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            Failure::new(
                exit::DATA,
                "the hub's answer to the PATCH has no desired $version",
            )
        })?;
    println!("desired $version {version}");

    let Some(secs) = wait_ack else {
        return Ok(exit::OK);
    };
    wait_for_acks(&client, device, module, &patch, &desired, version, secs).await
}

/// Polls the twin until every key of `patch` is acknowledged at `version` or later.
async fn wait_for_acks(
    client: &RegistryClient,
    device: &str,
    module: &str,
    patch: &Map<String, Value>,
    desired: &Map<String, Value>,
    version: u64,
    secs: u64,
) -> Result<u8, Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut pending: Vec<String> = patch.keys().cloned().collect();
    loop {
        // The client retries throttling and outages itself; the deadline bounds it.
        let read = tokio::time::timeout_at(deadline, client.get_module_twin(device, module));
        match read.await.unwrap_or_else(|_| {
            Err(RegistryError::Transient(format!(
                "reading the twin of {device}/{module}: no answer in time"
            )))
        }) {
            Ok(twin) => {
                let reported = twin
                    .pointer("/properties/reported")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                match ack_status(&reported, patch, desired, version) {
                    AckStatus::Acknowledged => {
                        println!("acknowledged by {device}/{module}");
                        return Ok(exit::OK);
                    }
                    AckStatus::Rejected(reasons) => {
                        return Err(Failure::new(
                            exit::DATA,
                            format!(
                                "{device}/{module} rejected desired $version {version}: {}",
                                reasons.join("; ")
                            ),
                        ));
                    }
                    AckStatus::Pending(keys) => pending = keys,
                }
            }
            Err(e) if e.is_retryable() => tracing::debug!(error = %e, "reading the twin"),
            Err(e) => return Err(e.into()),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "no acknowledgement of desired $version {version} from {device}/{module} \
                     within {secs} s (still waiting for: {})",
                    pending.join(", ")
                ),
            ));
        }
        tokio::time::sleep(ACK_POLL.min(deadline - now)).await;
    }
}

/// Where the module's acknowledgements stand for one desired patch.
#[derive(Debug, PartialEq, Eq)]
pub enum AckStatus {
    Acknowledged,
    /// Keys not acknowledged yet.
    Pending(Vec<String>),
    /// `key: reason` for each key the module refused (`ac` ≥ 300).
    Rejected(Vec<String>),
}

/// Compares the reported properties with the patch that produced desired `version`.
///
/// A key set to a value is acknowledged by a Plug and Play ack (`{"value","ac","av"}`)
/// with `av` ≥ `version`, or — plain acks carry no version — by reporting the value now
/// in desired (`desired`, the PATCH's answer). A key set to `null` is acknowledged when
/// the reported property is gone.
pub fn ack_status(
    reported: &Map<String, Value>,
    patch: &Map<String, Value>,
    desired: &Map<String, Value>,
    version: u64,
) -> AckStatus {
    let mut pending = Vec::new();
    let mut rejected = Vec::new();
    for (key, value) in patch {
        let current = reported.get(key).filter(|v| !v.is_null());
        let acked = match (value, current) {
            (Value::Null, None) => true,
            (Value::Null, Some(_)) | (_, None) => false,
            (_, Some(r)) => match pnp_ack(r) {
                Some((ac, av, _)) if av >= version && (200..300).contains(&ac) => true,
                Some((ac, av, ad)) if av >= version => {
                    rejected.push(format!("{key}: {ac} {ad}").trim_end().to_owned());
                    true
                }
                Some(_) => false,
                None => desired.get(key) == Some(r),
            },
        };
        if !acked {
            pending.push(key.clone());
        }
    }
    if !rejected.is_empty() {
        AckStatus::Rejected(rejected)
    } else if pending.is_empty() {
        AckStatus::Acknowledged
    } else {
        AckStatus::Pending(pending)
    }
}

/// `(ac, av, ad)` of a Plug and Play writable-property acknowledgement.
fn pnp_ack(reported: &Value) -> Option<(u64, u64, String)> {
    let o = reported.as_object()?;
    o.get("value")?;
    let ac = o.get("ac")?.as_u64()?;
    let av = o.get("av")?.as_u64()?;
    let ad = o.get("ad").and_then(Value::as_str).unwrap_or("").to_owned();
    Some((ac, av, ad))
}

/// The desired patch: `--patch` first, then each `KEY=VALUE` on top. A value is JSON
/// when it parses as JSON, else a string; `null` deletes. `Err` names the bad argument.
pub fn build_patch(
    patch: Option<&str>,
    assignments: &[String],
) -> Result<Map<String, Value>, String> {
    let mut out = match patch {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err("--patch must be a JSON object".into()),
            Err(e) => return Err(format!("--patch is not valid JSON: {e}")),
        },
    };
    for assignment in assignments {
        let (key, value) = parse_assignment(assignment)?;
        out.insert(key, value);
    }
    if out.is_empty() {
        return Err("nothing to set: give KEY=VALUE arguments or --patch".into());
    }
    Ok(out)
}

/// `--tags`: a JSON object merged into the twin's tags (`null` removes one).
pub fn parse_tags(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) if !map.is_empty() => Ok(map),
        Ok(Value::Object(_)) => Err("--tags is empty: give at least one tag".into()),
        Ok(_) => Err("--tags must be a JSON object, e.g. '{\"site\": \"north\"}'".into()),
        Err(e) => Err(format!("--tags is not valid JSON: {e}")),
    }
}

fn parse_assignment(text: &str) -> Result<(String, Value), String> {
    let bad = |why: &str| format!("bad assignment `{text}`: {why}");
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    if key.starts_with('$') || key.contains(['.', ' ']) {
        return Err(bad("a key may not start with `$` or contain `.` or spaces"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

/// The twin for people: identity, etag, then desired and reported with their versions,
/// `$metadata` left out, values as compact JSON.
pub fn render_twin(twin: &Value) -> String {
    let text = |p: &str| twin.pointer(p).and_then(Value::as_str).unwrap_or("?");
    let mut out = format!(
        "module twin {}/{}\n  etag: \"{}\"\n  connection: {}\n",
        text("/deviceId"),
        text("/moduleId"),
        text("/etag"),
        text("/connectionState"),
    );
    for section in ["desired", "reported"] {
        let props = twin
            .pointer(&format!("/properties/{section}"))
            .and_then(Value::as_object);
        let version = props
            .and_then(|p| p.get("$version"))
            .map_or_else(|| "?".to_owned(), Value::to_string);
        out.push_str(&format!("{section} ($version {version}):\n"));
        let mut any = false;
        for (key, value) in props.into_iter().flatten() {
            if key.starts_with('$') {
                continue;
            }
            any = true;
            out.push_str(&format!("  {key}: {value}\n"));
        }
        if !any {
            out.push_str("  (none)\n");
        }
    }
    out
}

fn etag_of(twin: &Value) -> Result<String, Failure> {
    twin.get("etag")
        .and_then(Value::as_str)
        .map(|e| e.trim_matches('"').to_owned())
        .ok_or_else(|| Failure::new(exit::DATA, "the hub's twin has no etag"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn assignments_parse_json_or_fall_back_to_strings() {
        let patch = build_patch(
            None,
            &[
                "telemetryInterval=122".into(),
                "name=gateway one".into(),
                "flags={\"a\":true}".into(),
                "old=null".into(),
                "quoted=\"7\"".into(),
                "eq=a=b".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            Value::Object(patch),
            json!({"telemetryInterval": 122, "name": "gateway one", "flags": {"a": true},
                   "old": null, "quoted": "7", "eq": "a=b"})
        );
    }

    #[test]
    fn tags_are_a_json_object() {
        assert_eq!(
            Value::Object(parse_tags(r#"{"site": "north", "old": null}"#).unwrap()),
            json!({"site": "north", "old": null})
        );
        for bad in ["[1]", "{", "\"x\"", "{}"] {
            assert!(parse_tags(bad).unwrap_err().contains("--tags"), "{bad}");
        }
    }

    #[test]
    fn patch_comes_first_and_assignments_win() {
        let patch = build_patch(Some(r#"{"a": {"x": 1}, "b": 2}"#), &["b=3".into()]).unwrap();
        assert_eq!(Value::Object(patch), json!({"a": {"x": 1}, "b": 3}));
    }

    #[test]
    fn bad_assignments_are_named() {
        for bad in ["noequals", "=5", "$version=3", "a.b=1"] {
            let err = build_patch(None, &["ok=1".into(), bad.into()]).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
        assert!(build_patch(Some("[1]"), &[]).is_err());
        assert!(build_patch(Some("{"), &[]).is_err());
        assert!(build_patch(None, &[]).is_err());
    }

    #[test]
    fn pnp_acks_count_from_the_patched_version() {
        let patch = map(json!({"t": 5}));
        let desired = map(json!({"t": 5, "$version": 4}));
        let old = map(json!({"t": {"value": 3, "ac": 200, "av": 3}}));
        assert_eq!(
            ack_status(&old, &patch, &desired, 4),
            AckStatus::Pending(vec!["t".into()])
        );
        let new = map(json!({"t": {"value": 5, "ac": 200, "av": 4, "ad": "applied"}}));
        assert_eq!(
            ack_status(&new, &patch, &desired, 4),
            AckStatus::Acknowledged
        );
        let refused = map(json!({"t": {"value": 3, "ac": 400, "av": 5, "ad": "too big"}}));
        assert_eq!(
            ack_status(&refused, &patch, &desired, 4),
            AckStatus::Rejected(vec!["t: 400 too big".into()])
        );
    }

    #[test]
    fn plain_acks_and_deletions() {
        let patch = map(json!({"t": 5, "gone": null}));
        let desired = map(json!({"t": 5}));
        let reported = map(json!({"t": 5, "gone": 1}));
        assert_eq!(
            ack_status(&reported, &patch, &desired, 2),
            AckStatus::Pending(vec!["gone".into()])
        );
        let reported = map(json!({"t": 5}));
        assert_eq!(
            ack_status(&reported, &patch, &desired, 2),
            AckStatus::Acknowledged
        );
    }

    #[test]
    fn rendering_leaves_out_metadata() {
        let twin = json!({"deviceId": "d", "moduleId": "m", "etag": "AAAB",
            "connectionState": "Disconnected",
            "properties": {
                "desired": {"t": 5, "$metadata": {}, "$version": 2},
                "reported": {"$metadata": {}, "$version": 1}}});
        let text = render_twin(&twin);
        assert!(text.contains("d/m"), "{text}");
        assert!(text.contains("etag: \"AAAB\""), "{text}");
        assert!(text.contains("desired ($version 2):\n  t: 5\n"), "{text}");
        assert!(
            text.contains("reported ($version 1):\n  (none)\n"),
            "{text}"
        );
        assert!(!text.contains("metadata"), "{text}");
    }
}
