//! The topics a module client publishes to (PROTOCOL §4.1, §5.1, §5.2) and their property
//! bags, parsed the way the hub does: names and values are percent-decoded, `+` stays a
//! plus sign, `key` without `=` is a null value and `key=` an empty string.

use std::borrow::Cow;

/// A publish topic the hub understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTopic {
    /// `$iothub/twin/GET/?$rid={rid}`
    TwinGet { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}[&$version={v}]`
    TwinPatchReported { rid: String, version: Option<u64> },
    /// `$iothub/methods/res/{status}/?$rid={rid}`
    MethodResponse { status: i32, rid: String },
    /// `devices/{d}/modules/{m}/messages/events/{property bag}`
    Telemetry {
        device_id: String,
        module_id: String,
        properties: Vec<(String, Option<String>)>,
    },
}

/// Why a topic was not understood; the hub closes the connection for any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("unsupported topic")]
    Unsupported,
    #[error("missing $rid")]
    MissingRid,
    #[error("status is not an integer")]
    BadStatus,
    #[error("$version is not an unsigned integer")]
    BadVersion,
}

const TWIN_GET: &str = "$iothub/twin/GET";
const TWIN_PATCH_REPORTED: &str = "$iothub/twin/PATCH/properties/reported";
const METHOD_RES: &str = "$iothub/methods/res/";

/// Parses the topic of a client PUBLISH.
pub fn parse_publish_topic(topic: &str) -> Result<ClientTopic, TopicError> {
    if topic.starts_with("devices/") {
        return parse_telemetry(topic);
    }
    let (path, query) = topic.split_once('?').unwrap_or((topic, ""));
    let path = path.strip_suffix('/').unwrap_or(path);
    if path == TWIN_GET {
        let rid = find(&parse_property_bag(query), "$rid").ok_or(TopicError::MissingRid)?;
        return Ok(ClientTopic::TwinGet { rid });
    }
    if path == TWIN_PATCH_REPORTED {
        let props = parse_property_bag(query);
        let rid = find(&props, "$rid").ok_or(TopicError::MissingRid)?;
        let version = match find(&props, "$version") {
            None => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| TopicError::BadVersion)?),
        };
        return Ok(ClientTopic::TwinPatchReported { rid, version });
    }
    if let Some(status) = path.strip_prefix(METHOD_RES) {
        if status.is_empty() || status.contains('/') {
            return Err(TopicError::Unsupported);
        }
        let status = status.parse::<i32>().map_err(|_| TopicError::BadStatus)?;
        let rid = find(&parse_property_bag(query), "$rid").ok_or(TopicError::MissingRid)?;
        return Ok(ClientTopic::MethodResponse { status, rid });
    }
    Err(TopicError::Unsupported)
}

/// `devices/{d}/modules/{m}/messages/events/[bag]` (the trailing `/` may be absent when the
/// bag is empty). Ids are not encoded in topics; the bag may contain `/` only encoded, but
/// everything after `events/` is taken as the bag anyway.
fn parse_telemetry(topic: &str) -> Result<ClientTopic, TopicError> {
    let mut parts = topic.splitn(7, '/');
    let (Some("devices"), Some(d), Some("modules"), Some(m), Some("messages"), Some(ev)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TopicError::Unsupported);
    };
    if ev != "events" || d.is_empty() || m.is_empty() {
        return Err(TopicError::Unsupported);
    }
    let bag = parts.next().unwrap_or("");
    Ok(ClientTopic::Telemetry {
        device_id: d.to_string(),
        module_id: m.to_string(),
        properties: parse_property_bag(bag),
    })
}

/// `k1=v1&k2&k3=` → `[("k1", Some("v1")), ("k2", None), ("k3", Some(""))]`, names and
/// values percent-decoded (invalid UTF-8 replaced), `+` kept, empty items skipped.
pub fn parse_property_bag(bag: &str) -> Vec<(String, Option<String>)> {
    bag.split('&')
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (decode(k), Some(decode(v))),
            None => (decode(item), None),
        })
        .collect()
}

fn decode(s: &str) -> String {
    match percent_encoding::percent_decode_str(s).decode_utf8_lossy() {
        Cow::Borrowed(b) => b.to_string(),
        Cow::Owned(o) => o,
    }
}

fn find(props: &[(String, Option<String>)], key: &str) -> Option<String> {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: Option<&str>) -> (String, Option<String>) {
        (k.to_string(), v.map(str::to_string))
    }

    #[test]
    fn twin_get() {
        assert_eq!(
            parse_publish_topic("$iothub/twin/GET/?$rid=4f57ff9a-f0f3"),
            Ok(ClientTopic::TwinGet {
                rid: "4f57ff9a-f0f3".into()
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/GET/?%24rid=7"),
            Ok(ClientTopic::TwinGet { rid: "7".into() })
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/GET/"),
            Err(TopicError::MissingRid)
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/GETX/?$rid=1"),
            Err(TopicError::Unsupported)
        );
    }

    #[test]
    fn twin_patch_reported() {
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=abc"),
            Ok(ClientTopic::TwinPatchReported {
                rid: "abc".into(),
                version: None
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=1&$version=12"),
            Ok(ClientTopic::TwinPatchReported {
                rid: "1".into(),
                version: Some(12)
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=1&$version=x"),
            Err(TopicError::BadVersion)
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/desired/?$rid=1"),
            Err(TopicError::Unsupported)
        );
    }

    #[test]
    fn method_response() {
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?$rid=1"),
            Ok(ClientTopic::MethodResponse {
                status: 200,
                rid: "1".into()
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/-1/?$rid=a%2Bb+c"),
            Ok(ClientTopic::MethodResponse {
                status: -1,
                rid: "a+b+c".into()
            })
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/ok/?$rid=1"),
            Err(TopicError::BadStatus)
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?x=1"),
            Err(TopicError::MissingRid)
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/extra/?$rid=1"),
            Err(TopicError::Unsupported)
        );
    }

    #[test]
    fn telemetry_python_bag() {
        let t = "devices/dev1/modules/mod1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert%20level=hi%2Fthere%26x%3Dy&k=";
        assert_eq!(
            parse_publish_topic(t),
            Ok(ClientTopic::Telemetry {
                device_id: "dev1".into(),
                module_id: "mod1".into(),
                properties: vec![
                    p("$.mid", Some("m-1")),
                    p("$.ct", Some("application/json")),
                    p("$.ce", Some("utf-8")),
                    p("alert level", Some("hi/there&x=y")),
                    p("k", Some("")),
                ],
            })
        );
    }

    #[test]
    fn telemetry_variants() {
        let t = "devices/d/modules/m/messages/events/$.ct=text%2Fplain&a+b=c+d&flag";
        let Ok(ClientTopic::Telemetry { properties, .. }) = parse_publish_topic(t) else {
            panic!("not telemetry");
        };
        assert_eq!(
            properties,
            vec![
                p("$.ct", Some("text/plain")),
                p("a+b", Some("c+d")),
                p("flag", None)
            ]
        );
        for t in [
            "devices/d/modules/m/messages/events",
            "devices/d/modules/m/messages/events/",
        ] {
            assert_eq!(
                parse_publish_topic(t),
                Ok(ClientTopic::Telemetry {
                    device_id: "d".into(),
                    module_id: "m".into(),
                    properties: vec![]
                })
            );
        }
        for bad in [
            "devices/d/messages/events/",
            "devices/d/modules/m/messages/devicebound/",
            "devices//modules/m/messages/events/",
            "devices/d/modules/m/inputs/x",
            "other/topic",
            "",
        ] {
            assert_eq!(
                parse_publish_topic(bad),
                Err(TopicError::Unsupported),
                "{bad}"
            );
        }
    }

    #[test]
    fn property_bag_edge_cases() {
        assert_eq!(parse_property_bag(""), vec![]);
        assert_eq!(
            parse_property_bag("a=1&&b=%FF&c=x=y"),
            vec![
                p("a", Some("1")),
                p("b", Some("\u{FFFD}")),
                p("c", Some("x=y"))
            ]
        );
    }
}
