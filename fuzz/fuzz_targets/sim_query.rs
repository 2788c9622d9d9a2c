//! The emulator's query-language parser and evaluator (`POST /devices/query`,
//! configuration target conditions and metrics): no panic, no unbounded recursion, on
//! any text; what parses also runs over a few twins.
#![no_main]

use edgetwin_sim::configurations::target_query;
use edgetwin_sim::query;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let twins = [
        json!({"deviceId": "gw1", "moduleId": "edgetwin", "tags": {"site": "north", "n": 1},
               "properties": {"desired": {"telemetryInterval": 30, "$version": 2},
                              "reported": {"telemetryInterval": {"value": 30, "ac": 200, "av": 2}}},
               "configurations": {"cfg-1": {"status": "applied"}}}),
        json!({"deviceId": "gw2", "moduleId": "other", "tags": {"site": null, "n": [1, 2]},
               "properties": {"desired": {"$version": 1}, "reported": {}}}),
    ];
    if let Ok(q) = query::parse(text) {
        let _ = q.run(&twins);
    }
    if let Ok(Some(q)) = target_query(text) {
        let _ = twins.iter().filter(|t| q.matches(t)).count();
    }
});
