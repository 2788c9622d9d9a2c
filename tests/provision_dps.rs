//! The daemon's DPS client (`edgetwin::provision::dps`) against the emulator's DPS over
//! HTTPS: registration with a group-derived or individual key, the final answers (refused
//! key, unknown scope, disabled, failed), `Retry-After` on polls and throttling, and the
//! `provisioning.json` record of the outcome.

use std::time::Duration;

use edgetwin::hub::options::HostPort;
use edgetwin::hub::tls::CaBundle;
use edgetwin::identity::SharedKey;
use edgetwin::provision::dps::{
    self, DpsAssignment, DpsClient, DpsError, DpsRequest, EnrollmentKey, PollPolicy,
    ProvisioningRecord,
};
use edgetwin_sim::dps::{DpsCall, DpsCallKind as SimCall};
use edgetwin_sim::testing::TestSim;

/// Short waits, so that only what the emulator asks for (`Retry-After`) takes time.
fn quick() -> PollPolicy {
    PollPolicy {
        min_interval: Duration::from_millis(10),
        max_interval: Duration::from_secs(5),
        default_interval: Duration::from_millis(50),
        attempts: 4,
        total: Duration::from_secs(60),
    }
}

struct Env {
    sim: TestSim,
    client: DpsClient,
}

impl Env {
    /// An emulator whose DPS answers without `Retry-After` pauses unless a test sets them.
    async fn start() -> Env {
        let sim = TestSim::start().await;
        sim.sim.dps().set_retry_after(0);
        let ca = CaBundle::read(&sim.sim.ca_path()).expect("emulator CA");
        let client = DpsClient::new(Some(&ca)).unwrap().with_poll_policy(quick());
        Env { sim, client }
    }

    /// What a gateway is given: the endpoint, scope and group key the emulator wrote.
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.sim.sim.state_dir().join("dps").join(name))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn request(&self, registration_id: &str, key: &EnrollmentKey) -> DpsRequest {
        DpsRequest {
            global_endpoint: HostPort::parse(&self.file("endpoint"), dps::DEFAULT_PORT).unwrap(),
            id_scope: self.file("id_scope"),
            registration_id: registration_id.into(),
            key: key.device_key(registration_id),
        }
    }

    fn group(&self) -> EnrollmentKey {
        EnrollmentKey::Group(SharedKey::from_base64(&self.file("group.key")).unwrap())
    }

    fn calls(&self) -> Vec<DpsCall> {
        self.sim.sim.dps().calls()
    }
}

/// Every pause between consecutive requests is at least `at_least`. The client sleeps
/// at least `Retry-After` before the next request, so this holds whatever the machine's
/// speed; it fails only if the client asks too early.
fn assert_spaced(calls: &[DpsCall], at_least: Duration) {
    for pair in calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= at_least,
            "requests {gap:?} apart, Retry-After was {at_least:?}: {calls:?}"
        );
    }
}

#[tokio::test]
async fn a_gateway_registers_with_the_group_key_and_its_device_holds_the_derived_key() {
    let env = Env::start().await;
    let request = env.request("gateway-0042", &env.group());
    let assignment = env.client.register(&request).await.expect("assigned");
    assert_eq!(
        assignment,
        DpsAssignment {
            assigned_hub: "localhost".into(),
            device_id: "gateway-0042".into(),
        }
    );
    let device = env
        .sim
        .hub()
        .get_device("gateway-0042")
        .expect("device in the registry");
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        request.key.as_base64()
    );
    let credentials = assignment.device_credentials(request.key.clone());
    assert_eq!(credentials.host_name, "localhost");
    assert_eq!(credentials.device_id, "gateway-0042");

    // The outcome survives a reboot as provisioning.json, without the key.
    let state = tempfile::tempdir().unwrap();
    let path = dps::record_path(state.path());
    dps::save(&path, &ProvisioningRecord::new(&request, &assignment)).unwrap();
    let record = dps::load(&path).unwrap().expect("record");
    assert!(record.matches(&request));
    assert_eq!(record.assignment(), assignment);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(request.key.as_base64()));
}

#[tokio::test]
async fn an_individual_enrollment_assigns_its_own_device_id() {
    let env = Env::start().await;
    let key = env
        .sim
        .sim
        .dps()
        .add_individual_enrollment("sensor-7", Some("boiler-room-7"));
    let request = env.request("sensor-7", &EnrollmentKey::Individual(key));
    let assignment = env.client.register(&request).await.expect("assigned");
    assert_eq!(assignment.device_id, "boiler-room-7");
    assert!(env.sim.hub().get_device("boiler-room-7").is_ok());
}

#[tokio::test]
async fn a_wrong_key_is_final_and_the_error_names_the_registration_never_the_key() {
    let env = Env::start().await;
    let wrong = EnrollmentKey::Individual(SharedKey::generate());
    let request = env.request("gateway-0043", &wrong);
    let err = env.client.register(&request).await.unwrap_err();
    assert!(
        matches!(err, DpsError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(text.contains("gateway-0043"), "{text}");
    assert!(!text.contains(request.key.as_base64()), "{text}");
    assert_eq!(env.calls().len(), 1, "a refused key is not retried");
}

#[tokio::test]
async fn an_unknown_scope_is_final_and_names_scope_and_endpoint() {
    let env = Env::start().await;
    let mut request = env.request("gateway-0044", &env.group());
    request.id_scope = "0ne00000000".into();
    let err = env.client.register(&request).await.unwrap_err();
    assert!(
        matches!(&err, DpsError::UnknownScope { id_scope, .. } if id_scope == "0ne00000000"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(&env.file("endpoint")), "{err}");
}

#[tokio::test]
async fn a_disabled_enrollment_is_final() {
    let env = Env::start().await;
    env.sim.sim.dps().set_group_enabled(false);
    let err = env
        .client
        .register(&env.request("gateway-0045", &env.group()))
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::Disabled { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(env.sim.hub().get_device("gateway-0045").is_err());
}

#[tokio::test]
async fn a_failed_registration_is_final_with_the_dps_error() {
    let env = Env::start().await;
    env.sim.sim.dps().fail_next_registrations(1);
    let err = env
        .client
        .register(&env.request("gateway-0046", &env.group()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DpsError::Failed {
                error_code: Some(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn polling_waits_at_least_retry_after_between_requests() {
    let env = Env::start().await;
    let dps_sim = env.sim.sim.dps();
    dps_sim.set_assigning_polls(2);
    dps_sim.set_retry_after(1);
    let assignment = env
        .client
        .register(&env.request("gateway-0047", &env.group()))
        .await
        .expect("assigned");
    assert_eq!(assignment.device_id, "gateway-0047");
    let calls = env.calls();
    let kinds: Vec<_> = calls.iter().map(|c| (c.kind, c.status)).collect();
    assert_eq!(
        kinds,
        vec![
            (SimCall::Register, 202),
            (SimCall::Poll, 202),
            (SimCall::Poll, 202),
            (SimCall::Poll, 200)
        ]
    );
    assert_spaced(&calls, Duration::from_secs(1));
}

#[tokio::test]
async fn throttling_is_waited_out_for_at_least_retry_after() {
    let env = Env::start().await;
    let dps_sim = env.sim.sim.dps();
    dps_sim.set_retry_after(1);
    dps_sim.throttle_next(2);
    env.client
        .register(&env.request("gateway-0048", &env.group()))
        .await
        .expect("assigned after the throttling");
    let calls = env.calls();
    let statuses: Vec<_> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, vec![429, 429, 202, 200]);
    assert_spaced(&calls, Duration::from_secs(1));
}

#[tokio::test]
async fn throttling_that_outlasts_the_attempts_is_a_retryable_error() {
    let env = Env::start().await;
    env.sim.sim.dps().throttle_next(100);
    let err = env
        .client
        .register(&env.request("gateway-0049", &env.group()))
        .await
        .unwrap_err();
    assert!(matches!(err, DpsError::Throttled { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(env.calls().len(), quick().attempts as usize);
}

#[tokio::test]
async fn a_retry_after_beyond_the_bound_is_handed_to_the_caller_at_once() {
    let env = Env::start().await;
    let dps_sim = env.sim.sim.dps();
    dps_sim.set_retry_after(600);
    dps_sim.throttle_next(1);
    let err = env
        .client
        .register(&env.request("gateway-0050", &env.group()))
        .await
        .unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(600)));
    assert_eq!(env.calls().len(), 1, "no request after a 600 s Retry-After");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_error() {
    let env = Env::start().await;
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut request = env.request("gateway-0051", &env.group());
    request.global_endpoint = HostPort::parse(&format!("127.0.0.1:{port}"), 443).unwrap();
    let err = env.client.register(&request).await.unwrap_err();
    assert!(matches!(err, DpsError::Transient(_)), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_clock_two_days_behind_dps_is_corrected_from_its_date_and_registers() {
    let env = Env::start().await;
    // DPS two days ahead of this machine: the first token is long expired for it.
    env.sim.sim.faults().set_clock_offset(2 * 24 * 3600);
    let request = env.request("gateway-late", &env.group());
    let assignment = env.client.register(&request).await.expect("assigned");
    assert_eq!(assignment.device_id, "gateway-late");
    let calls = env.calls();
    assert_eq!(
        calls[0].status, 401,
        "the first token was refused: {calls:?}"
    );
    assert!(
        calls[1..].iter().all(|c| c.status < 400),
        "signed on DPS's time after that: {calls:?}"
    );
}
