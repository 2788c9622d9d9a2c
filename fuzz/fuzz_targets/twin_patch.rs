//! Desired documents (patches and GET answers) fed to the twin core in any order: no
//! panic, a patch never moves the version in force backwards, `state.json` written from
//! any reachable state parses back to the same state, and the telemetry interval stays
//! at least one second.
#![no_main]

use edgetwin::twin::{
    AckStyle, PropertySpec, PropertyType, RuntimeState, Schema, StateFile, TwinSync, UnknownPolicy,
};
use libfuzzer_sys::fuzz_target;

fn schema(unknown: UnknownPolicy) -> Schema {
    let mut schema = Schema::new(unknown);
    let specs = [
        (
            "mode",
            PropertySpec::new(PropertyType::String, None, None, Some("eco".into())),
        ),
        (
            "level",
            PropertySpec::new(PropertyType::Number, Some(-1.5), Some(99.0), None),
        ),
        (
            "fan",
            PropertySpec::new(PropertyType::Integer, Some(0.0), Some(3.0), Some(1.into())),
        ),
        (
            "on",
            PropertySpec::new(PropertyType::Boolean, None, None, None),
        ),
    ];
    for (name, spec) in specs {
        schema
            .declare(name, spec.expect("valid spec"))
            .expect("declared");
    }
    schema
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let unknown = if flags & 1 == 0 {
        UnknownPolicy::Accept
    } else {
        UnknownPolicy::Reject
    };
    let ack = if flags & 2 == 0 {
        AckStyle::Pnp
    } else {
        AckStyle::Plain
    };
    let schema = schema(unknown);
    let mut sync = TwinSync::new(schema.clone(), ack, RuntimeState::from_defaults(&schema));
    for chunk in rest.split(|b| *b == 0xff) {
        let Some((&op, body)) = chunk.split_first() else {
            continue;
        };
        let before = sync.state().desired_version;
        match op % 6 {
            0 => {
                let (version, payload) = match body.split_first() {
                    Some((&v, p)) => (Some(u64::from(v)), p),
                    None => (None, body),
                };
                let _ = sync.patch(version, payload);
                let after = sync.state().desired_version;
                assert!(
                    after >= before,
                    "a patch moved {before:?} back to {after:?}"
                );
            }
            1 => {
                let _ = sync.patch(None, body);
                assert!(sync.state().desired_version >= before);
            }
            2 => {
                let _ = sync.get_response(body);
            }
            3 => sync.get_started(),
            4 => {
                let _ = sync.get_failed();
            }
            _ => {
                let _ = sync.disconnected();
            }
        }
        assert!(sync.telemetry_interval().as_secs() >= 1);
        let file = sync.state().to_file("gw1", "edgetwin", 0);
        let parsed = StateFile::parse(&file.to_json(), "gw1", "edgetwin")
            .expect("state.json written from any state parses");
        assert_eq!(parsed.into_state(), *sync.state());
    }
});
