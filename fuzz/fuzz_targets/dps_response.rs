//! DPS answers as the daemon's client reads them (`provision::dps::parse_reply`): no panic
//! on any status, body or `Retry-After`, and an assignment it accepts always makes a device
//! connection string that parses back to the same hub and device (nothing DPS sends can
//! inject a field into the credential).
//!
//! Input: two bytes of HTTP status (big-endian, taken modulo 600), one byte choosing the
//! `Retry-After` text (none, or the next byte's decimal value), then the body.
#![no_main]

use edgetwin::identity::{DeviceCredentials, SharedKey};
use edgetwin::provision::dps::{parse_reply, Reply};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=";

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]) % 600;
    let retry_after = (data[2] & 1 == 1).then(|| data[3].to_string());
    let body = &data[4..];
    let Ok(reply) = parse_reply(status, body, retry_after.as_deref()) else {
        return;
    };
    match reply {
        Reply::Assigned { assignment, .. } => {
            assert!((200..300).contains(&status));
            let key = SharedKey::from_base64(KEY).expect("key");
            let text = assignment.device_credentials(key).to_connection_string();
            let back: DeviceCredentials = text
                .parse()
                .unwrap_or_else(|e| panic!("assignment makes a bad connection string: {e}"));
            assert_eq!(back.host_name, assignment.assigned_hub);
            assert_eq!(back.device_id, assignment.device_id);
            assert!(back.gateway_host_name.is_none());
        }
        Reply::Assigning { operation_id, .. } => {
            assert!(!operation_id.contains(['/', '?', '&', '#', ' ']));
        }
        Reply::Error { http_status, .. } => assert_eq!(http_status, status),
        Reply::Final { .. } => {}
    }
});
