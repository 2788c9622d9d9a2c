//! Connection strings of every kind: no panic, and whatever parses renders back to a
//! string that parses to the same thing.
#![no_main]

use edgetwin::identity::{
    ConnectionString, DeviceCredentials, ModuleCredentials, ServiceCredentials,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<ConnectionString>();
    let _ = text.parse::<DeviceCredentials>();
    let _ = text.parse::<ServiceCredentials>();
    if let Ok(module) = text.parse::<ModuleCredentials>() {
        let rendered = module.to_connection_string();
        let again: ModuleCredentials = rendered
            .parse()
            .unwrap_or_else(|e| panic!("rendered module string does not parse: {e}"));
        assert_eq!(again.to_connection_string(), rendered);
        let _ = module.sas_token(1_700_000_000);
    }
    if let Ok(service) = text.parse::<ServiceCredentials>() {
        let rendered = service.to_connection_string();
        let again: ServiceCredentials = rendered
            .parse()
            .unwrap_or_else(|e| panic!("rendered service string does not parse: {e}"));
        assert_eq!(again.to_connection_string(), rendered);
    }
});
