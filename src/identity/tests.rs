//! Tests of connection strings and SAS tokens, including every PROTOCOL §2.4 vector.

use super::*;
use proptest::prelude::*;

/// PROTOCOL.md §2.4: base64 of bytes 0x00..0x1f.
const VECTOR_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const VECTOR_SE: u64 = 1_700_000_000;
const MODULE_URI: &str = "myhub.azure-devices.net/devices/dev1/modules/mod1";
const MODULE_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1&sig=kA6xjFLkZvk4Cdh0nD8uWAzassq6PB47f7BepMMtmlY%3D&se=1700000000";
const SERVICE_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net&sig=iIzEw6hi6GK79RY5jNXO6QeQkSL/Ax4zTmy44X2G1VY%3D&se=1700000000&skn=iothubowner";

fn vector_key() -> SharedKey {
    SharedKey::from_base64(VECTOR_KEY).unwrap()
}

fn module_string() -> String {
    format!(
        "HostName=myhub.azure-devices.net;DeviceId=dev1;ModuleId=mod1;SharedAccessKey={VECTOR_KEY}"
    )
}

fn err(s: &str) -> ConnectionStringError {
    s.parse::<ConnectionString>().unwrap_err()
}

fn assert_names_without_key(e: &ConnectionStringError, needle: &str) {
    let text = e.to_string();
    assert!(text.contains(needle), "{text:?} should mention {needle:?}");
    assert!(!text.contains(VECTOR_KEY), "{text:?} leaks the key");
    assert!(!text.contains("AAECAwQF"), "{text:?} leaks part of the key");
    assert!(!format!("{e:?}").contains("AAECAwQF"));
}

// --- key derivation (PROTOCOL §11.3, §12.2) ---------------------------------------

#[test]
fn module_keys_derive_from_the_device_key_and_the_generation_id() {
    // Python: base64(hmac.new(key, b"edgetwin:636904759703045768:primary", sha256).digest())
    let device = vector_key();
    let primary = device.derive("edgetwin:636904759703045768:primary");
    let secondary = device.derive("edgetwin:636904759703045768:secondary");
    assert_eq!(
        primary.as_base64(),
        "44kLs5Qu0WbkbNfya4cIRzxkdhDHXShRS6Mrw589lbs="
    );
    assert_eq!(
        secondary.as_base64(),
        "ZO0I2P9zzm2tsVRAxLKGO+GqbxRzfA7YlI5W+//97c8="
    );
    assert_eq!(
        SharedKey::from_base64(primary.as_base64()).unwrap(),
        primary,
        "a derived key round-trips through its base64"
    );
    assert_ne!(
        primary,
        device.derive("edgetwin:636904759703045769:primary")
    );
}

// --- PROTOCOL.md §2.4 vectors ------------------------------------------------------

#[test]
fn vector_key_decodes_to_bytes_0_to_31() {
    assert_eq!(vector_key().bytes, (0u8..32).collect::<Vec<_>>());
    assert_eq!(vector_key().as_base64(), VECTOR_KEY);
}

#[test]
fn module_string_to_sign_matches_python_device_sdk_vector() {
    let sr = encode_resource_uri(MODULE_URI);
    assert_eq!(
        format!("{sr}\n{VECTOR_SE}"),
        "myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1\n1700000000"
    );
}

#[test]
fn module_token_matches_python_device_sdk_vector() {
    assert_eq!(
        token(&vector_key(), MODULE_URI, VECTOR_SE, None),
        MODULE_TOKEN
    );
    let creds: ModuleCredentials = module_string().parse().unwrap();
    assert_eq!(creds.sas_token(VECTOR_SE), MODULE_TOKEN);
}

#[test]
fn python_device_sdk_module_token_parses_and_verifies() {
    let t = SasToken::parse(MODULE_TOKEN).unwrap();
    assert_eq!(t.resource, MODULE_URI);
    assert_eq!(t.signature, "kA6xjFLkZvk4Cdh0nD8uWAzassq6PB47f7BepMMtmlY=");
    assert_eq!(t.key_name, None);
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
    assert!(t.covers(MODULE_URI));
}

#[test]
fn token_with_lower_case_percent_2f_sr_verifies_against_raw_sr() {
    let sr = "myhub.azure-devices.net%2fdevices%2fdev1%2fmodules%2fmod1";
    assert_eq!(
        sign(&vector_key(), sr, VECTOR_SE),
        "bPFfnhAtwCRVWbKipGC3EYoJn5w8lbYcgcffN44jlHU="
    );
    let text = format!(
        "SharedAccessSignature sr={sr}&sig=bPFfnhAtwCRVWbKipGC3EYoJn5w8lbYcgcffN44jlHU%3D&se=1700000000"
    );
    let t = SasToken::parse(&text).unwrap();
    assert_eq!(t.resource, MODULE_URI);
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
    assert!(t.covers(MODULE_URI));
}

#[test]
fn token_with_raw_slash_sr_verifies() {
    assert_eq!(
        sign(&vector_key(), MODULE_URI, VECTOR_SE),
        "I4aVKG2QTuLR9lAIk6VVxJTOm8T3kpO12u6pE2eyRIk="
    );
    // sig field order differs from the SDK's and `=` is left raw: both allowed.
    let text = format!(
        "SharedAccessSignature sig=I4aVKG2QTuLR9lAIk6VVxJTOm8T3kpO12u6pE2eyRIk=&se=1700000000&sr={MODULE_URI}"
    );
    let t = SasToken::parse(&text).unwrap();
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
    assert!(t.covers(MODULE_URI));
}

#[test]
fn service_sdk_token_with_raw_slash_in_sig_parses_and_verifies_with_skn() {
    let t = SasToken::parse(SERVICE_TOKEN).unwrap();
    assert_eq!(t.resource, "myhub.azure-devices.net");
    assert_eq!(t.key_name.as_deref(), Some("iothubowner"));
    assert_eq!(t.signature, "iIzEw6hi6GK79RY5jNXO6QeQkSL/Ax4zTmy44X2G1VY=");
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));

    let creds: ServiceCredentials = format!(
        "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey={VECTOR_KEY}"
    )
    .parse()
    .unwrap();
    // Ours percent-encodes `/` in sig; same signature, so it verifies identically.
    let ours = SasToken::parse(&creds.sas_token(VECTOR_SE)).unwrap();
    assert_eq!(ours.signature, t.signature);
    assert_eq!(ours.key_name.as_deref(), Some("iothubowner"));
    assert_eq!(ours.verify(&vector_key(), VECTOR_SE), Ok(()));
}

#[test]
fn service_token_for_host_with_port_encodes_colon() {
    let creds: ServiceCredentials = format!(
        "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={VECTOR_KEY}"
    )
    .parse()
    .unwrap();
    let text = creds.sas_token(VECTOR_SE);
    assert!(text.starts_with("SharedAccessSignature sr=localhost%3A8443&sig="));
    assert!(text.ends_with("&se=1700000000&skn=iothubowner"));
    let t = SasToken::parse(&text).unwrap();
    assert_eq!(t.resource, "localhost:8443");
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
}

#[test]
fn encode_resource_uri_matches_python_quote_with_nothing_safe() {
    assert_eq!(encode_resource_uri("aZ09_.-~"), "aZ09_.-~");
    assert_eq!(
        encode_resource_uri("a/b:c d+e=f&g%h é"),
        "a%2Fb%3Ac%20d%2Be%3Df%26g%25h%20%C3%A9"
    );
}

// --- connection strings ------------------------------------------------------------

#[test]
fn module_connection_string_parses_and_round_trips() {
    let ConnectionString::Module(m) = module_string().parse().unwrap() else {
        panic!("expected module");
    };
    assert_eq!(m.host_name, "myhub.azure-devices.net");
    assert_eq!(m.device_id, "dev1");
    assert_eq!(m.module_id, "mod1");
    assert_eq!(m.key, vector_key());
    assert_eq!(m.gateway_host_name, None);
    assert_eq!(m.resource_uri(), MODULE_URI);
    assert_eq!(m.connect_host(), "myhub.azure-devices.net");
    assert_eq!(m.to_connection_string(), module_string());
}

#[test]
fn module_connection_string_with_gateway_connects_to_gateway_but_signs_for_hub() {
    let s = format!("{};GatewayHostName=localhost", module_string());
    let m: ModuleCredentials = s.parse().unwrap();
    assert_eq!(m.gateway_host_name.as_deref(), Some("localhost"));
    assert_eq!(m.connect_host(), "localhost");
    assert_eq!(m.resource_uri(), MODULE_URI);
    assert_eq!(m.sas_token(VECTOR_SE), MODULE_TOKEN);
    assert_eq!(m.to_connection_string(), s);
}

#[test]
fn keys_may_appear_in_any_order_and_split_on_first_equals() {
    let s = format!(
        "SharedAccessKey={VECTOR_KEY};ModuleId=mod1;DeviceId=dev1;HostName=myhub.azure-devices.net"
    );
    let m: ModuleCredentials = s.parse().unwrap();
    assert_eq!(m.key.as_base64(), VECTOR_KEY);
    assert_eq!(m.to_connection_string(), module_string());
}

#[test]
fn device_connection_string_parses_with_and_without_gateway() {
    let s = format!("HostName=localhost;DeviceId=dev1;SharedAccessKey={VECTOR_KEY}");
    let ConnectionString::Device(d) = s.parse().unwrap() else {
        panic!("expected device");
    };
    assert_eq!(d.host_name, "localhost");
    assert_eq!(d.device_id, "dev1");
    assert_eq!(d.resource_uri(), "localhost/devices/dev1");
    assert_eq!(d.connect_host(), "localhost");
    assert_eq!(d.to_connection_string(), s);
    let t = SasToken::parse(&d.sas_token(VECTOR_SE)).unwrap();
    assert_eq!(t.resource, "localhost/devices/dev1");
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));

    let gw = format!("{s};GatewayHostName=edge.local");
    let d: DeviceCredentials = gw.parse().unwrap();
    assert_eq!(d.connect_host(), "edge.local");
    assert_eq!(d.to_connection_string(), gw);
}

#[test]
fn service_connection_string_with_port_parses_and_round_trips() {
    let s = format!(
        "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={VECTOR_KEY}"
    );
    let ConnectionString::Service(c) = s.parse().unwrap() else {
        panic!("expected service");
    };
    assert_eq!(c.host_name, "localhost:8443");
    assert_eq!(c.policy_name, "iothubowner");
    assert_eq!(c.to_connection_string(), s);
    assert_eq!(
        s.parse::<ConnectionString>()
            .unwrap()
            .to_connection_string(),
        s
    );
}

#[test]
fn device_string_with_shared_access_key_name_is_still_a_device() {
    let s =
        format!("HostName=h;DeviceId=d;SharedAccessKeyName=ignored;SharedAccessKey={VECTOR_KEY}");
    assert!(matches!(s.parse().unwrap(), ConnectionString::Device(_)));
}

#[test]
fn wrong_kind_says_what_was_expected() {
    let device = format!("HostName=h;DeviceId=d;SharedAccessKey={VECTOR_KEY}");
    let e = device.parse::<ModuleCredentials>().unwrap_err();
    assert_names_without_key(
        &e,
        "expected a module connection string (DeviceId and ModuleId)",
    );
    assert_names_without_key(&e, "found a device connection string");

    let e = module_string().parse::<ServiceCredentials>().unwrap_err();
    assert_names_without_key(&e, "expected a service connection string");
    assert_names_without_key(&e, "found a module connection string");

    let e = module_string().parse::<DeviceCredentials>().unwrap_err();
    assert_names_without_key(&e, "expected a device connection string");
}

#[test]
fn invalid_base64_key_is_named_without_echoing_it() {
    let bad = "AAECAwQF!!notbase64";
    let e = err(&format!("HostName=h;DeviceId=d;SharedAccessKey={bad}"));
    assert_eq!(e, ConnectionStringError::InvalidKey);
    assert_names_without_key(&e, "SharedAccessKey is not valid base64");
    assert!(!e.to_string().contains("notbase64"));
}

#[test]
fn missing_fields_are_named() {
    let e = err(&format!("DeviceId=d;SharedAccessKey={VECTOR_KEY}"));
    assert_names_without_key(&e, "missing HostName");
    let e = err("HostName=h;DeviceId=d");
    assert_names_without_key(&e, "missing SharedAccessKey");
    let e = err(&format!(
        "HostName=h;ModuleId=m;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "missing DeviceId");
    let e = err(&format!("HostName=h;SharedAccessKey={VECTOR_KEY}"));
    assert_names_without_key(&e, "missing DeviceId");
    assert_names_without_key(&e, "SharedAccessKeyName");
}

#[test]
fn empty_values_are_named() {
    let e = err(&format!(
        "HostName=;DeviceId=d;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "HostName is empty");
    let e = err(&format!(
        "HostName=h;DeviceId=d;ModuleId=;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "ModuleId is empty");
    let e = err("HostName=h;DeviceId=d;SharedAccessKey=");
    assert_names_without_key(&e, "SharedAccessKey is empty");
}

#[test]
fn unknown_key_is_named() {
    let e = err(&format!(
        "HostName=h;DeviceId=d;Foo=bar;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "unknown key `Foo`");
    // Keys are case-sensitive.
    let e = err(&format!(
        "hostname=h;DeviceId=d;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "unknown key `hostname`");
}

#[test]
fn key_pasted_without_its_name_is_not_echoed_as_an_unknown_key() {
    let e = err(&format!("HostName=h;DeviceId=d;{VECTOR_KEY}"));
    assert!(matches!(
        e,
        ConnectionStringError::UnknownKey { name: None }
    ));
    assert_names_without_key(&e, "unknown key");
    // Also for a padded key whose head happens to be short and identifier-like.
    let e = err("HostName=h;DeviceId=d;AAECAwQFBgcICQoLDA0ODx==");
    assert!(!e.to_string().contains("AAECAwQF"));
}

#[test]
fn duplicate_key_is_named() {
    let e = err(&format!(
        "HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_eq!(e, ConnectionStringError::DuplicateKey { key: "DeviceId" });
    assert_names_without_key(&e, "duplicate key `DeviceId`");
    let e = err(&format!(
        "HostName=h;DeviceId=d;SharedAccessKey={VECTOR_KEY};SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "duplicate key `SharedAccessKey`");
}

#[test]
fn trailing_or_doubled_semicolon_is_an_empty_segment() {
    let e = err(&format!("{};", module_string()));
    assert_eq!(e, ConnectionStringError::EmptySegment { position: 5 });
    assert_names_without_key(&e, "empty segment");
    let e = err(&format!(
        "HostName=h;;DeviceId=d;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "empty segment (segment 2)");
    assert_eq!(err(""), ConnectionStringError::Empty);
}

#[test]
fn segment_without_equals_is_rejected_by_position() {
    let e = err(&format!("HostName=h;DeviceId;SharedAccessKey={VECTOR_KEY}"));
    assert_eq!(e, ConnectionStringError::NotKeyValue { position: 2 });
    assert_names_without_key(&e, "segment 2");
}

#[test]
fn x509_and_sas_strings_are_refused_by_name() {
    let e = err("HostName=h;DeviceId=d;x509=true");
    assert_names_without_key(&e, "x509 authentication is not supported");
    let e = err(&format!(
        "HostName=h;DeviceId=d;x509=true;SharedAccessKey={VECTOR_KEY}"
    ));
    assert_names_without_key(&e, "mixed authentication");
    let e = err("HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h");
    assert_names_without_key(&e, "SharedAccessSignature authentication is not supported");
}

#[test]
fn gateway_host_name_is_refused_in_a_service_string() {
    let e = err(&format!(
        "HostName=h;SharedAccessKeyName=p;SharedAccessKey={VECTOR_KEY};GatewayHostName=g"
    ));
    assert_names_without_key(&e, "GatewayHostName is not allowed");
}

#[test]
fn debug_of_keys_and_every_credential_type_redacts_the_key() {
    let key = vector_key();
    assert_eq!(format!("{key:?}"), "SharedKey(<redacted>)");
    let module: ConnectionString = format!("{};GatewayHostName=g", module_string())
        .parse()
        .unwrap();
    let device: ConnectionString = format!("HostName=h;DeviceId=d;SharedAccessKey={VECTOR_KEY}")
        .parse()
        .unwrap();
    let service: ConnectionString =
        format!("HostName=h;SharedAccessKeyName=p;SharedAccessKey={VECTOR_KEY}")
            .parse()
            .unwrap();
    for cs in [&module, &device, &service] {
        for text in [format!("{cs:?}"), format!("{cs:#?}")] {
            assert!(!text.contains("AAECAwQF"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }
    let ConnectionString::Module(m) = module else {
        unreachable!()
    };
    assert!(!format!("{m:?}").contains("AAECAwQF"));
}

#[test]
fn generated_keys_are_32_random_bytes_and_round_trip_through_base64() {
    let a = SharedKey::generate();
    let b = SharedKey::generate();
    assert_eq!(a.bytes.len(), 32);
    assert_ne!(a, b);
    assert_eq!(SharedKey::from_base64(a.as_base64()).unwrap(), a);
}

// --- SAS parsing, verification, expiry, scope --------------------------------------

#[test]
fn token_is_valid_through_its_expiry_second_and_expired_after() {
    let t = SasToken::parse(MODULE_TOKEN).unwrap();
    assert_eq!(t.verify(&vector_key(), 0), Ok(()));
    assert_eq!(t.verify(&vector_key(), VECTOR_SE), Ok(()));
    assert_eq!(
        t.verify(&vector_key(), VECTOR_SE + 90),
        Err(SasError::Expired {
            expired_for_secs: 90
        })
    );
}

#[test]
fn wrong_key_or_tampered_fields_give_bad_signature() {
    let t = SasToken::parse(MODULE_TOKEN).unwrap();
    assert_eq!(
        t.verify(&SharedKey::generate(), VECTOR_SE),
        Err(SasError::BadSignature)
    );
    let mut later = t.clone();
    later.expiry += 1;
    assert_eq!(later.verify(&vector_key(), 0), Err(SasError::BadSignature));
    let mut other = t.clone();
    other.sr_raw = other.sr_raw.replace("dev1", "dev2");
    assert_eq!(other.verify(&vector_key(), 0), Err(SasError::BadSignature));
}

#[test]
fn bad_signature_beats_expiry() {
    let t = SasToken::parse(MODULE_TOKEN).unwrap();
    assert_eq!(
        t.verify(&SharedKey::generate(), u64::MAX),
        Err(SasError::BadSignature)
    );
}

#[test]
fn malformed_tokens_are_refused_with_a_named_reason() {
    let cases = [
        ("sr=a&sig=AAAA&se=1", "prefix"),
        ("SharedAccessSignature sig=AAAA&se=1", "missing sr"),
        ("SharedAccessSignature sr=a&se=1", "missing sig"),
        ("SharedAccessSignature sr=a&sig=AAAA", "missing se"),
        (
            "SharedAccessSignature sr=a&sig=AAAA&se=1&foo=x",
            "unknown field `foo`",
        ),
        (
            "SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1",
            "duplicate field `sr`",
        ),
        ("SharedAccessSignature sr=a&sig=AAAA&se=1&", "empty field"),
        ("SharedAccessSignature sr=a&sig&se=1", "field 2"),
        ("SharedAccessSignature sr=a&sig=AAAA&se=-1", "se"),
        ("SharedAccessSignature sr=a&sig=AAAA&se=+1", "se"),
        ("SharedAccessSignature sr=a&sig=AAAA&se=01", "se"),
        (
            "SharedAccessSignature sr=a&sig=AAAA&se=99999999999999999999",
            "se",
        ),
        (
            "SharedAccessSignature sr=a&sig=!!!&se=1",
            "sig is not valid base64",
        ),
        ("SharedAccessSignature sr=&sig=AAAA&se=1", "sr is empty"),
        (
            "SharedAccessSignature sr=a&sig=AAAA&se=1&skn=",
            "skn is empty",
        ),
        (
            "SharedAccessSignature sr=%FF&sig=AAAA&se=1",
            "sr is not UTF-8",
        ),
    ];
    for (text, needle) in cases {
        match SasToken::parse(text) {
            Err(SasError::Malformed(reason)) => {
                assert!(
                    reason.contains(needle),
                    "{text:?}: {reason:?} lacks {needle:?}"
                )
            }
            other => panic!("{text:?} gave {other:?}"),
        }
    }
}

#[test]
fn plus_in_sig_is_not_decoded_as_space() {
    let t = SasToken::parse("SharedAccessSignature sr=a&sig=ab+/&se=1").unwrap();
    assert_eq!(t.signature, "ab+/");
}

#[test]
fn sas_token_debug_redacts_the_signature() {
    let t = SasToken::parse(MODULE_TOKEN).unwrap();
    let text = format!("{t:?}");
    assert!(!text.contains("kA6xjFLk"), "{text}");
    assert!(text.contains("<redacted>"));
    assert!(text.contains("dev1"));
}

#[test]
fn covers_is_a_case_insensitive_path_segment_prefix() {
    let t = SasToken::parse(&token(&vector_key(), "Hub.net/devices/Dev1", 1, None)).unwrap();
    assert!(t.covers("Hub.net/devices/Dev1"));
    assert!(t.covers("hub.NET/devices/dev1"));
    assert!(t.covers("Hub.net/devices/Dev1/modules/m"));
    assert!(!t.covers("Hub.net/devices/Dev10"));
    assert!(!t.covers("Hub.net/devices/Dev1x/modules/m"));
    assert!(!t.covers("Hub.net/devices"));
    assert!(!t.covers("Other.net/devices/Dev1"));
    let hub = SasToken::parse(&token(&vector_key(), "Hub.net", 1, Some("p"))).unwrap();
    assert!(hub.covers("hub.net/devices/x/modules/y"));
    assert!(!hub.covers("hub.network"));
    let slash = SasToken::parse(&token(&vector_key(), "Hub.net/devices/", 1, None)).unwrap();
    assert!(slash.covers("hub.net/devices/x"));
}

// --- properties --------------------------------------------------------------------

/// Characters IoT Hub allows in device and module ids, plus some that need encoding.
const ID: &str = "[A-Za-z0-9\\-.%_*?!(),:=@$' +é]{1,40}";

proptest! {
    #[test]
    fn signed_tokens_parse_verify_and_cover_their_resource(
        key_bytes in proptest::collection::vec(any::<u8>(), 1..80),
        host in "[a-z0-9.-]{1,30}(:[0-9]{1,5})?",
        device in ID,
        module in ID,
        expiry in any::<u64>(),
        policy in proptest::option::of("[A-Za-z0-9_+/ -]{1,20}"),
    ) {
        let key = SharedKey::from_base64(&BASE64.encode(&key_bytes)).unwrap();
        let uri = format!("{host}/devices/{device}/modules/{module}");
        let text = token(&key, &uri, expiry, policy.as_deref());
        let t = SasToken::parse(&text).unwrap();
        prop_assert_eq!(&t.resource, &uri);
        prop_assert_eq!(t.expiry, expiry);
        prop_assert_eq!(&t.key_name, &policy);
        prop_assert_eq!(t.verify(&key, expiry), Ok(()));
        prop_assert!(t.covers(&uri));
        let below = format!("{uri}/more");
        let sibling = format!("{uri}x");
        prop_assert!(t.covers(&below));
        prop_assert!(!t.covers(&sibling));
    }

    #[test]
    fn module_connection_strings_round_trip(
        key_bytes in proptest::collection::vec(any::<u8>(), 1..80),
        host in "[a-z0-9.-]{1,30}",
        device in "[A-Za-z0-9\\-.%_*?!(),:@$']{1,40}",
        module in "[A-Za-z0-9\\-.%_*?!(),:@$']{1,40}",
        gateway in proptest::option::of("[a-z0-9.-]{1,30}"),
    ) {
        let key = SharedKey::from_base64(&BASE64.encode(&key_bytes)).unwrap();
        let creds = ModuleCredentials {
            host_name: host,
            device_id: device,
            module_id: module,
            key,
            gateway_host_name: gateway,
        };
        let parsed: ModuleCredentials = creds.to_connection_string().parse().unwrap();
        prop_assert_eq!(parsed, creds);
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_input(s in "\\PC*") {
        let _ = s.parse::<ConnectionString>();
        let _ = s.parse::<ModuleCredentials>();
        let _ = SasToken::parse(&s);
        let _ = SasToken::parse(&format!("SharedAccessSignature {s}"));
        let _ = SharedKey::from_base64(&s);
    }

    #[test]
    fn parsers_never_panic_on_structured_noise(
        s in "(HostName|DeviceId|ModuleId|SharedAccessKey|SharedAccessKeyName|GatewayHostName|x509|sr|sig|se|skn|[=;& %A-Za-z0-9+/])*"
    ) {
        let _ = s.parse::<ConnectionString>();
        if let Ok(t) = SasToken::parse(&format!("SharedAccessSignature {s}")) {
            let _ = t.verify(&SharedKey::generate(), 0);
            let _ = t.covers(&s);
        }
    }

    #[test]
    fn connection_string_errors_never_contain_the_key(
        key_bytes in proptest::collection::vec(any::<u8>(), 16..64),
        mutation in 0usize..6,
    ) {
        let k = BASE64.encode(&key_bytes);
        let s = match mutation {
            0 => format!("HostName=h;DeviceId=d;{k}"),
            1 => format!("HostName=h;{k};DeviceId=d"),
            2 => format!("HostName=h;DeviceId=d;SharedAccessKey={k};"),
            3 => format!("HostName=h;DeviceId=d;SharedAccessKey={k}!"),
            4 => format!("DeviceId=d;SharedAccessKey={k}"),
            _ => format!("HostName=h;SharedAccessKey={k};Bogus={k}"),
        };
        let e = s.parse::<ConnectionString>().unwrap_err();
        // Any 8-character window of the key would be a leak.
        let text = format!("{e} {e:?}");
        for window in k.as_bytes().windows(8) {
            let w = std::str::from_utf8(window).unwrap();
            prop_assert!(!text.contains(w), "{} leaks {}", text, w);
        }
    }
}
