//! Topics and property bags as the emulator parses a client's PUBLISH, and the
//! `$iothub` topics as the daemon parses the hub's: no panic on any text.
#![no_main]

use edgetwin_sim::topics::{parse_property_bag, parse_publish_topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_publish_topic(text);
    let bag = parse_property_bag(text);
    for (k, v) in &bag {
        let _ = (k.len(), v.as_ref().map(String::len));
    }
    let _ = edgetwin::hub::topics::parse(text);
});
