//! SAS tokens as the emulator parses and verifies them: no panic on any text, and a
//! token this crate signs for any resource and expiry parses, verifies with its key,
//! fails with another key, and covers its resource.
#![no_main]

use edgetwin::identity::SharedKey;
use edgetwin::identity::{token, SasToken};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=";
const OTHER: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODk=";

fuzz_target!(|data: &[u8]| {
    let key = SharedKey::from_base64(KEY).expect("key");
    let other = SharedKey::from_base64(OTHER).expect("key");
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = SasToken::parse(text) {
            let _ = t.verify(&key, 1_700_000_000);
            let _ = t.covers("hub/devices/d/modules/m");
            let _ = format!("{t:?}");
        }
        if data.len() >= 9 {
            let expiry = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) >> 1;
            if !text.is_char_boundary(9) {
                return;
            }
            let resource = &text[9..];
            let policy = (data[8] & 1 == 1).then_some("iothubowner");
            if resource.is_empty() {
                return;
            }
            let signed = token(&key, resource, expiry, policy);
            let parsed = SasToken::parse(&signed)
                .unwrap_or_else(|e| panic!("own token does not parse: {e}: {signed}"));
            assert_eq!(parsed.expiry, expiry);
            assert_eq!(parsed.key_name.as_deref(), policy);
            assert!(parsed.verify(&key, expiry).is_ok(), "own token verifies");
            assert!(parsed.verify(&other, expiry).is_err(), "another key fails");
            assert!(parsed.covers(resource), "token covers its resource");
        }
    }
});
