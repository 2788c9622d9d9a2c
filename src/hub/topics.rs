//! `$iothub` topics as a module client sees them (PROTOCOL §4.1, §5.1, §5.2): the
//! topics it publishes to are formatted here, and the ones the hub publishes to it are
//! parsed here into [`HubTopic`].
//!
//! Used only by the session task. Pure string work: no I/O, no state. A topic that does
//! not parse is reported as `None`, never a panic, because the hub (or an emulator) is
//! outside our control.

use percent_encoding::percent_decode_str;

/// The three filters a module client subscribes to (DESIGN §3 rule 1).
pub const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
pub const DESIRED_PATCHES: &str = "$iothub/twin/PATCH/properties/desired/#";
pub const METHOD_REQUESTS: &str = "$iothub/methods/POST/#";
pub const SUBSCRIPTIONS: [&str; 3] = [TWIN_RESPONSES, DESIRED_PATCHES, METHOD_REQUESTS];

/// A topic the hub publishes to a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubTopic {
    /// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`
    TwinResponse {
        status: u16,
        rid: String,
        version: Option<u64>,
    },
    /// `$iothub/twin/PATCH/properties/desired/?$version={v}`
    DesiredPatch { version: Option<u64> },
    /// `$iothub/methods/POST/{name}/?$rid={rid}`
    MethodRequest { name: String, rid: String },
}

const TWIN_RES: &str = "$iothub/twin/res/";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";
const METHOD_POST: &str = "$iothub/methods/POST/";

/// Parses a topic published by the hub; `None` for anything this client does not use.
pub fn parse(topic: &str) -> Option<HubTopic> {
    let (path, query) = topic.split_once('?').unwrap_or((topic, ""));
    let props = properties(query);
    let get = |key: &str| props.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let version = get("$version").and_then(|v| v.parse::<u64>().ok());
    if let Some(rest) = path.strip_prefix(TWIN_RES) {
        let status = rest.trim_end_matches('/').parse::<u16>().ok()?;
        return Some(HubTopic::TwinResponse {
            status,
            rid: get("$rid")?,
            version,
        });
    }
    if path.starts_with(DESIRED) || path == DESIRED.trim_end_matches('/') {
        return Some(HubTopic::DesiredPatch { version });
    }
    if let Some(rest) = path.strip_prefix(METHOD_POST) {
        let name = rest.trim_end_matches('/');
        if name.is_empty() || name.contains('/') {
            return None;
        }
        return Some(HubTopic::MethodRequest {
            name: percent_decode_str(name).decode_utf8().ok()?.into_owned(),
            rid: get("$rid")?,
        });
    }
    None
}

/// `k=v&k2=v2`, percent-decoded (`+` stays a plus); an item without `=` has an empty value.
fn properties(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// `$iothub/twin/GET/?$rid={rid}`
pub fn twin_get(rid: &str) -> String {
    format!("$iothub/twin/GET/?$rid={rid}")
}

/// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`
pub fn reported_patch(rid: &str) -> String {
    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
}

/// `$iothub/methods/res/{status}/?$rid={rid}`
pub fn method_response(status: u16, rid: &str) -> String {
    format!("$iothub/methods/res/{status}/?$rid={rid}")
}

/// Telemetry of a module with a JSON body (PROTOCOL §5.1): ids are not encoded, the
/// system properties are, as the SDKs send them.
pub fn telemetry(device_id: &str, module_id: &str) -> String {
    format!(
        "devices/{device_id}/modules/{module_id}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_response_yields_status_rid_and_version() {
        assert_eq!(
            parse("$iothub/twin/res/204/?$rid=7&$version=12"),
            Some(HubTopic::TwinResponse {
                status: 204,
                rid: "7".into(),
                version: Some(12)
            })
        );
        assert_eq!(
            parse("$iothub/twin/res/200/?$rid=abc"),
            Some(HubTopic::TwinResponse {
                status: 200,
                rid: "abc".into(),
                version: None
            })
        );
    }

    #[test]
    fn twin_response_without_rid_or_numeric_status_is_ignored() {
        assert_eq!(parse("$iothub/twin/res/200/"), None);
        assert_eq!(parse("$iothub/twin/res/ok/?$rid=1"), None);
    }

    #[test]
    fn desired_patch_yields_topic_version() {
        assert_eq!(
            parse("$iothub/twin/PATCH/properties/desired/?$version=8"),
            Some(HubTopic::DesiredPatch { version: Some(8) })
        );
        assert_eq!(
            parse("$iothub/twin/PATCH/properties/desired/"),
            Some(HubTopic::DesiredPatch { version: None })
        );
    }

    #[test]
    fn method_request_yields_decoded_name_and_rid() {
        assert_eq!(
            parse("$iothub/methods/POST/get%20State/?$rid=1f"),
            Some(HubTopic::MethodRequest {
                name: "get State".into(),
                rid: "1f".into()
            })
        );
        assert_eq!(parse("$iothub/methods/POST//?$rid=1"), None);
    }

    #[test]
    fn percent_encoded_property_names_are_decoded() {
        assert_eq!(
            parse("$iothub/twin/res/200/?%24rid=9"),
            Some(HubTopic::TwinResponse {
                status: 200,
                rid: "9".into(),
                version: None
            })
        );
    }

    #[test]
    fn unrelated_topics_are_not_ours() {
        assert_eq!(parse("devices/d/messages/devicebound/x"), None);
    }

    #[test]
    fn published_topics_match_the_protocol() {
        assert_eq!(twin_get("1"), "$iothub/twin/GET/?$rid=1");
        assert_eq!(
            reported_patch("2"),
            "$iothub/twin/PATCH/properties/reported/?$rid=2"
        );
        assert_eq!(method_response(404, "3"), "$iothub/methods/res/404/?$rid=3");
        assert_eq!(
            telemetry("gw", "edgetwin"),
            "devices/gw/modules/edgetwin/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8"
        );
    }
}
