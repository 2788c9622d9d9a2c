//! Unit tests of the DPS client's pure parts: key derivation, answer parsing, what each
//! answer leads to, the waiting bounds, and the provisioning record.

use std::time::Duration;

use super::flow::{next, Next};
use super::*;

const GROUP_KEY: &str = "ZWRnZXR3aW4tZHBzLWdyb3VwLWtleS10ZXN0LTAwMDE=";

fn request() -> DpsRequest {
    DpsRequest {
        global_endpoint: HostPort::parse("dps.example.net", DEFAULT_PORT).unwrap(),
        id_scope: "0ne00012345".into(),
        registration_id: "gateway-0042".into(),
        key: SharedKey::from_base64(GROUP_KEY).unwrap(),
    }
}

fn policy() -> PollPolicy {
    PollPolicy {
        min_interval: Duration::from_secs(1),
        max_interval: Duration::from_secs(30),
        default_interval: Duration::from_secs(2),
        attempts: 3,
        total: Duration::from_secs(120),
    }
}

fn reply(status: u16, body: &str, retry_after: Option<&str>) -> Reply {
    parse_reply(status, body.as_bytes(), retry_after).expect("parses")
}

fn decide(answer: Reply, polling: bool) -> Next {
    next(&request(), &policy(), Ok(answer), polling, 1)
}

// ---- key derivation ----------------------------------------------------------------

#[test]
fn group_key_derivation_matches_openssl() {
    // printf gateway-0042 | openssl sha256 -mac HMAC \
    //   -macopt "hexkey:$(echo GROUP_KEY | base64 -d | xxd -p -c 256)" -binary | base64
    // (the command of PROTOCOL §12.2, AIS ci/e2e-tests/test-run.sh)
    let group = SharedKey::from_base64(GROUP_KEY).unwrap();
    let derived = derive_device_key(&group, "gateway-0042");
    assert_eq!(
        derived.as_base64(),
        "aSF6TNtWxaM8dr3sJ6DrT3oNe7m4z5tLFCKrgtLZ/xo="
    );
    assert_ne!(
        derive_device_key(&group, "gateway-0043").as_base64(),
        derived.as_base64()
    );
}

#[test]
fn an_individual_key_is_used_as_it_is_and_a_group_key_is_derived() {
    let key = SharedKey::from_base64(GROUP_KEY).unwrap();
    assert_eq!(EnrollmentKey::Individual(key.clone()).device_key("gw"), key);
    assert_eq!(
        EnrollmentKey::Group(key.clone()).device_key("gw"),
        derive_device_key(&key, "gw")
    );
}

#[test]
fn a_request_never_shows_its_key() {
    let shown = format!("{:?}", request());
    assert!(!shown.contains(GROUP_KEY), "{shown}");
    assert!(shown.contains("gateway-0042"));
}

#[test]
fn malformed_ids_are_refused_before_anything_is_sent() {
    let mut r = request();
    r.registration_id = "gate way".into();
    assert!(
        matches!(r.validate(), Err(DpsError::InvalidRequest(m)) if m.contains("registration_id"))
    );
    let mut r = request();
    r.id_scope = "0ne/../x".into();
    assert!(matches!(r.validate(), Err(DpsError::InvalidRequest(m)) if m.contains("id_scope")));
    assert!(request().validate().is_ok());
}

// ---- parsing -----------------------------------------------------------------------

#[test]
fn a_202_assigning_carries_the_operation_and_retry_after() {
    let r = reply(
        202,
        r#"{"operationId":"4.d0a671905ea5b2c8.e7173b7b-0e54","status":"assigning"}"#,
        Some("3"),
    );
    assert_eq!(
        r,
        Reply::Assigning {
            operation_id: "4.d0a671905ea5b2c8.e7173b7b-0e54".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
    );
}

#[test]
fn an_assigned_status_gives_hub_and_device() {
    let body = r#"{"operationId":"op","status":"assigned","registrationState":{
        "registrationId":"gateway-0042","createdDateTimeUtc":"2024-01-01T00:00:00Z",
        "assignedHub":"myhub.azure-devices.net","deviceId":"gateway-0042","status":"assigned",
        "substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2024-01-01T00:00:01Z","etag":"x"}}"#;
    assert_eq!(
        reply(200, body, None),
        Reply::Assigned {
            assignment: DpsAssignment {
                assigned_hub: "myhub.azure-devices.net".into(),
                device_id: "gateway-0042".into(),
            },
            substatus: Some("initialAssignment".into()),
        }
    );
}

#[test]
fn an_assigned_hub_that_would_corrupt_a_connection_string_is_refused() {
    for hub in ["hub;SharedAccessKey=x", "hub name", "", "../etc"] {
        let body = format!(
            r#"{{"operationId":"op","status":"assigned","registrationState":{{"assignedHub":"{hub}","deviceId":"d"}}}}"#
        );
        assert!(parse_reply(200, body.as_bytes(), None).is_err(), "{hub:?}");
    }
    let body = r#"{"operationId":"op","status":"assigned","registrationState":{"assignedHub":"h","deviceId":"a;b"}}"#;
    assert!(parse_reply(200, body.as_bytes(), None).is_err());
}

#[test]
fn final_statuses_carry_their_error_details() {
    let body = r#"{"operationId":"op","status":"failed","registrationState":{"registrationId":"r","status":"failed","errorCode":400209,"errorMessage":"Custom allocation failed"}}"#;
    assert_eq!(
        reply(200, body, None),
        Reply::Final {
            status: FinalStatus::Failed,
            error_code: Some(400209),
            message: "Custom allocation failed".into(),
        }
    );
    let body = r#"{"operationId":"op","status":"disabled"}"#;
    assert!(matches!(
        reply(200, body, None),
        Reply::Final {
            status: FinalStatus::Disabled,
            ..
        }
    ));
}

#[test]
fn an_error_body_gives_code_and_message_and_html_is_excerpted() {
    let body =
        r#"{"errorCode":401002,"trackingId":"t","message":"Unauthorized","timestampUtc":"x"}"#;
    assert_eq!(
        reply(401, body, None),
        Reply::Error {
            http_status: 401,
            error_code: Some(401002),
            message: "Unauthorized".into(),
            retry_after: None,
        }
    );
    match reply(502, "<html>\n<b>Bad gateway</b></html>", Some("7")) {
        Reply::Error {
            message,
            retry_after,
            ..
        } => {
            assert_eq!(message, "<html> <b>Bad gateway</b></html>");
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unreadable_successes_are_malformed_not_assignments() {
    assert!(parse_reply(200, b"not json", None).is_err());
    assert!(parse_reply(200, br#"{"status":"assigning"}"#, None).is_err());
    assert!(parse_reply(200, br#"{"operationId":"op","status":"pondering"}"#, None).is_err());
    assert!(parse_reply(202, br#"{"operationId":"a/b","status":"assigning"}"#, None).is_err());
}

// ---- decisions ---------------------------------------------------------------------

#[test]
fn assigning_polls_no_sooner_than_retry_after_with_bounded_jitter() {
    for _ in 0..50 {
        let answer = Reply::Assigning {
            operation_id: "op".into(),
            retry_after: Some(Duration::from_secs(5)),
        };
        match decide(answer, false) {
            Next::Poll { pause, .. } => {
                assert!(pause >= Duration::from_secs(5), "{pause:?}");
                assert!(pause <= Duration::from_secs(6), "{pause:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_retry_after_of_zero_still_waits_the_minimum() {
    let answer = Reply::Assigning {
        operation_id: "op".into(),
        retry_after: Some(Duration::ZERO),
    };
    assert!(
        matches!(decide(answer, true), Next::Poll { pause, .. } if pause >= Duration::from_secs(1))
    );
}

#[test]
fn a_retry_after_beyond_the_bound_ends_the_call_with_the_asked_wait() {
    let throttled = reply(
        429,
        r#"{"errorCode":429001,"message":"slow down"}"#,
        Some("600"),
    );
    match decide(throttled, false) {
        Next::Stop(e) => {
            assert!(e.is_retryable());
            assert_eq!(e.retry_after(), Some(Duration::from_secs(600)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn throttling_is_retried_after_at_least_retry_after() {
    let throttled = reply(
        429,
        r#"{"errorCode":429001,"message":"slow down"}"#,
        Some("4"),
    );
    match decide(throttled, true) {
        Next::Again {
            error,
            pause,
            restart,
        } => {
            assert!(pause >= Duration::from_secs(4), "{pause:?}");
            assert!(error.is_retryable());
            assert!(!restart);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dps_verdicts_are_final_and_name_the_cause() {
    let unauthorized = reply(
        401,
        r#"{"errorCode":401002,"message":"Unauthorized"}"#,
        None,
    );
    let Next::Stop(e) = decide(unauthorized, false) else {
        panic!("401 is final")
    };
    assert!(!e.is_retryable());
    let text = e.to_string();
    assert!(
        text.contains("gateway-0042") && text.contains("401002"),
        "{text}"
    );
    assert!(!text.contains(GROUP_KEY));

    let unknown = reply(
        404,
        r#"{"errorCode":404001,"message":"no such scope"}"#,
        None,
    );
    let Next::Stop(e) = decide(unknown, false) else {
        panic!("404 on register is final")
    };
    assert!(matches!(&e, DpsError::UnknownScope { id_scope, .. } if id_scope == "0ne00012345"));
    assert!(e.to_string().contains("dps.example.net:443"), "{e}");

    for (status, want) in [
        ("disabled", "disabled"),
        ("unassigned", "did not assign"),
        ("failed", "failed"),
    ] {
        let body = format!(r#"{{"operationId":"op","status":"{status}"}}"#);
        let Next::Stop(e) = decide(reply(200, &body, None), true) else {
            panic!("{status} is final")
        };
        assert!(!e.is_retryable(), "{status}");
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[test]
fn server_errors_and_network_failures_are_retried_with_backoff() {
    let Next::Again { error, pause, .. } = decide(reply(503, "", None), true) else {
        panic!("503 is retried")
    };
    assert!(error.is_retryable());
    assert!(pause >= Duration::from_secs(1));
    let failed = next(
        &request(),
        &policy(),
        Err(DpsError::Transient("connection refused".into())),
        false,
        3,
    );
    assert!(
        matches!(failed, Next::Again { pause, .. } if pause >= Duration::from_secs(1) && pause <= Duration::from_secs(4))
    );
}

#[test]
fn a_poll_for_a_forgotten_operation_registers_again() {
    let gone = reply(
        404,
        r#"{"errorCode":404000,"message":"operation not found"}"#,
        None,
    );
    assert!(matches!(
        decide(gone, true),
        Next::Again { restart: true, .. }
    ));
}

// ---- the record ----------------------------------------------------------------------

#[test]
fn the_record_round_trips_without_any_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = record_path(dir.path());
    assert!(load(&path).unwrap().is_none(), "no record yet");
    let assignment = DpsAssignment {
        assigned_hub: "myhub.azure-devices.net".into(),
        device_id: "gateway-0042".into(),
    };
    let record = ProvisioningRecord::new(&request(), &assignment);
    save(&path, &record).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(GROUP_KEY) && !text.contains("Key"), "{text}");
    let back = load(&path).unwrap().expect("record");
    assert_eq!(back, record);
    assert_eq!(back.assignment(), assignment);
    assert!(back.matches(&request()));
    let mut other = request();
    other.registration_id = "gateway-0043".into();
    assert!(!back.matches(&other));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_foreign_or_broken_record_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = record_path(dir.path());
    for text in [
        "{ not json",
        r#"{"schema":9,"source":"dps","id_scope":"s","registration_id":"r","assigned_hub":"h","device_id":"d","registered_at":0}"#,
        r#"{"schema":1,"source":"dps","id_scope":"s","registration_id":"r","assigned_hub":"h;x=y","device_id":"d","registered_at":0}"#,
    ] {
        std::fs::write(&path, text).unwrap();
        let err = load(&path).unwrap_err();
        assert!(matches!(err, DpsError::Record { .. }), "{err}");
        assert!(err.to_string().contains(RECORD_FILE), "{err}");
    }
}

#[test]
fn an_assignment_becomes_a_device_credential_with_the_request_key() {
    let assignment = DpsAssignment {
        assigned_hub: "myhub.azure-devices.net".into(),
        device_id: "gateway-0042".into(),
    };
    let creds = assignment.device_credentials(request().key);
    assert_eq!(
        creds.to_connection_string(),
        format!(
            "HostName=myhub.azure-devices.net;DeviceId=gateway-0042;SharedAccessKey={GROUP_KEY}"
        )
    );
}
