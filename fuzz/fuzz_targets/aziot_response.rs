//! Answers of the Azure IoT Identity Service as the daemon reads them
//! (`aziot::wire::parse_identity`, `parse_signature`): no panic on any status or body, and
//! an identity it accepts only ever holds names that are safe in MQTT topics, user names
//! and `sr` (no `/`, whitespace or control characters), a gateway that is not the hub
//! itself, and a signature that is base64.
//!
//! Input: one byte choosing the parser (even: identity, odd: signature), two bytes of
//! HTTP status (big-endian, taken modulo 600), then the body.
#![no_main]

use edgetwin::aziot::wire::{parse_identity, parse_signature};
use libfuzzer_sys::fuzz_target;

fn safe(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '#' | '+' | '?'))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = u16::from_be_bytes([data[1], data[2]]) % 600;
    let body = &data[3..];
    if data[0] % 2 == 0 {
        let Ok(found) = parse_identity(status, body) else {
            return;
        };
        assert_eq!(status, 200);
        let id = &found.identity;
        for name in [&id.host_name, &id.device_id, &id.module_id] {
            assert!(safe(name), "{name:?}");
        }
        if let Some(gateway) = &id.gateway_host_name {
            assert!(safe(gateway), "{gateway:?}");
            assert!(!gateway.eq_ignore_ascii_case(&id.host_name));
        }
        assert!(!format!("{found:?}").contains("keyHandle"));
    } else if let Ok(signature) = parse_signature(status, body) {
        assert_eq!(status, 200);
        assert!(!signature.is_empty());
        assert!(
            signature
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
            "{signature:?}"
        );
    }
});
