//! The emulator's MQTT front end, driven as module clients drive IoT Hub (PROTOCOL §3–§5):
//! rumqttc over TLS for ordinary traffic, a raw TLS socket for what rumqttc cannot send.
//! No fixed ports; no sleeps as synchronisation — tests await hub events or packets.

use edgetwin_sim::testing as support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use edgetwin::identity::{ModuleCredentials, SharedKey};
use edgetwin_sim::service_side::TwinWrite;
use edgetwin_sim::{Sim, SimEvent};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet as RawPacket, PingReq, Publish};
use rumqttc::mqttbytes::{Protocol, QoS as RawQoS};
use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, Packet, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use support::{key, module_options, unix_now, wait_event, TestClient, TestSim, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtLeastOnce);
const RES: &str = "$iothub/twin/res/#";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
const METHODS: &str = "$iothub/methods/POST/#";

fn json_of(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).expect("JSON payload")
}

fn creds(sim: &TestSim, d: &str, m: &str) -> ModuleCredentials {
    sim.hub()
        .module_connection_string(d, m)
        .expect("registered")
        .parse()
        .expect("connection string")
}

/// Connects with `opts`, expecting CONNACK 5 and a `ConnectRefused` event.
async fn expect_refused(sim: &TestSim, opts: rumqttc::MqttOptions) -> String {
    let mut events = sim.hub().events();
    let client_id = opts.client_id();
    let (_client, result) = TestClient::try_connect(opts).await;
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK 5, got {other:?}"),
    }
    wait_event(&mut events, |e| match e {
        SimEvent::ConnectRefused {
            client_id: c,
            reason,
        } if *c == client_id => Some(reason.clone()),
        _ => None,
    })
    .await
}

async fn desired_patch(sim: &TestSim, d: &str, m: &str, desired: Value) {
    sim.hub()
        .write_module_twin(
            d,
            m,
            TwinWrite::Patch,
            &json!({ "properties": { "desired": desired } }),
            None,
        )
        .expect("desired written");
}

// ---- a raw TLS MQTT client, for packets rumqttc will not send ----------------------

struct Raw {
    io: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Raw {
    async fn open(sim: &Sim) -> Raw {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut sim.ca_pem().as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA added");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(sim.mqtt_addr()).await.expect("tcp");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let io = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        Raw {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Opens and sends a CONNECT for `d/m` with a good token; expects CONNACK 0.
    async fn connected(sim: &TestSim, d: &str, m: &str, keep_alive: u16) -> Raw {
        let mut raw = Raw::open(&sim.sim).await;
        raw.send(&connect_packet(sim, d, m, keep_alive)).await;
        match raw.recv().await {
            Some(RawPacket::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    /// The next packet, or `None` once the server has closed the connection.
    async fn recv(&mut self) -> Option<RawPacket> {
        let fut = async {
            loop {
                match RawPacket::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from the hub: {e}"),
                }
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("timed out waiting for the hub")
    }

    /// Asserts the server closes the connection (skipping any packets still in flight).
    async fn expect_closed(&mut self) {
        while let Some(p) = self.recv().await {
            assert!(
                matches!(p, RawPacket::Publish(_)),
                "unexpected {p:?} before close"
            );
        }
    }
}

fn connect_packet(sim: &TestSim, d: &str, m: &str, keep_alive: u16) -> BytesMut {
    let c = creds(sim, d, m);
    let mut connect = Connect::new(format!("{d}/{m}"));
    connect.clean_session = false;
    connect.keep_alive = keep_alive;
    connect.login = Some(Login::new(
        format!("{}/{d}/{m}/?api-version=2021-04-12", c.host_name),
        c.sas_token(unix_now() + 3600),
    ));
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encodes");
    buf
}

fn encode_publish(topic: &str, qos: RawQoS, pkid: u16, dup: bool, payload: &[u8]) -> BytesMut {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    p.dup = dup;
    let mut buf = BytesMut::new();
    p.write(&mut buf).expect("encodes");
    buf
}

// ---- CONNECT ------------------------------------------------------------------------

#[tokio::test]
async fn connack_0_with_a_good_token() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let connstr = sim.hub().module_connection_string("dev1", "mod1").unwrap();
    let opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    let (_client, ack) = TestClient::connect(opts).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present);
    wait_event(&mut events, |e| match e {
        SimEvent::Connected { module, .. } if *module == key("dev1", "mod1") => Some(()),
        _ => None,
    })
    .await;
    assert!(sim.hub().is_connected(&key("dev1", "mod1")));
}

#[tokio::test]
async fn connack_5_for_a_token_signed_with_another_key() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = creds(&sim, "dev1", "mod1");
    c.key = SharedKey::generate();
    let opts = module_options(
        &sim.sim,
        &c.to_connection_string(),
        false,
        unix_now() + 3600,
    );
    expect_refused(&sim, opts).await;
}

#[tokio::test]
async fn connack_5_for_an_expired_token() {
    let sim = TestSim::start().await;
    let connstr = sim.register("dev1", "mod1");
    let opts = module_options(&sim.sim, &connstr, false, unix_now() - 60);
    // The refusal reason is not asserted: the hub reports the secondary key's signature
    // mismatch rather than the primary key's expiry (reported to the hub's owner).
    expect_refused(&sim, opts).await;
}

#[tokio::test]
async fn connack_5_for_an_unknown_module() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = creds(&sim, "dev1", "mod1");
    c.module_id = "ghost".into();
    let opts = module_options(
        &sim.sim,
        &c.to_connection_string(),
        false,
        unix_now() + 3600,
    );
    let reason = expect_refused(&sim, opts).await;
    assert!(reason.contains("ghost"), "{reason}");
}

#[tokio::test]
async fn connack_5_for_a_wrong_user_name() {
    let sim = TestSim::start().await;
    let connstr = sim.register("dev1", "mod1");
    let c = creds(&sim, "dev1", "mod1");
    let mut opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    opts.set_credentials(
        "otherhub/dev1/mod1/?api-version=2021-04-12",
        c.sas_token(unix_now() + 3600),
    );
    expect_refused(&sim, opts).await;
}

#[tokio::test]
async fn connack_5_without_a_password() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut raw = Raw::open(&sim.sim).await;
    let mut connect = Connect::new("dev1/mod1");
    connect.login = Some(Login::new(
        "localhost/dev1/mod1/?api-version=2021-04-12",
        "",
    ));
    let mut buf = BytesMut::new();
    connect.write(&mut buf).unwrap();
    raw.send(&buf).await;
    match raw.recv().await {
        Some(RawPacket::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected CONNACK 5, got {other:?}"),
    }
    raw.expect_closed().await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::ConnectRefused { .. }).then_some(())
    })
    .await;
}

#[tokio::test]
async fn unsupported_protocol_levels_get_connack_1() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    // MQTT 3.1.1 with level 3, and a level-5 CONNECT.
    for level in [3u8, 5] {
        let mut raw = Raw::open(&sim.sim).await;
        let mut buf = connect_packet(&sim, "dev1", "mod1", 60);
        let at = buf.windows(4).position(|w| w == b"MQTT").unwrap() + 4;
        buf[at] = level;
        raw.send(&buf).await;
        match raw.recv().await {
            Some(RawPacket::ConnAck(a)) => {
                assert_eq!(a.code, ConnectReturnCode::RefusedProtocolVersion)
            }
            other => panic!("level {level}: expected CONNACK 1, got {other:?}"),
        }
        raw.expect_closed().await;
    }
    // The codec's own V5 variant is refused the same way.
    let mut raw = Raw::open(&sim.sim).await;
    let mut connect = Connect::new("dev1/mod1");
    connect.protocol = Protocol::V5;
    let mut buf = BytesMut::new();
    connect.write(&mut buf).unwrap();
    raw.send(&buf).await;
    assert!(matches!(
        raw.recv().await,
        Some(RawPacket::ConnAck(a)) if a.code == ConnectReturnCode::RefusedProtocolVersion
    ));
}

#[tokio::test]
async fn a_first_packet_other_than_connect_closes() {
    let sim = TestSim::start().await;
    let mut raw = Raw::open(&sim.sim).await;
    let mut buf = BytesMut::new();
    PingReq.write(&mut buf).unwrap();
    raw.send(&buf).await;
    assert!(raw.recv().await.is_none());
}

#[tokio::test]
async fn fault_refuse_next_connects() {
    let sim = TestSim::start().await;
    let connstr = sim.register("dev1", "mod1");
    sim.sim.faults().refuse_next_connects(2);
    for _ in 0..2 {
        let opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
        expect_refused(&sim, opts).await;
    }
    sim.connect("dev1", "mod1", false).await;
}

#[tokio::test]
async fn a_second_connection_of_the_same_identity_closes_the_first() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut first = sim.connect("dev1", "mod1", false).await;
    let mut second = sim.connect("dev1", "mod1", false).await;
    first.closed().await;
    // The newer connection is unaffected and still served.
    assert!(sim.hub().is_connected(&key("dev1", "mod1")));
    second.publish("$iothub/twin/GET/?$rid=1", " ").await;
    let res = second.next_publish().await;
    assert_eq!(res.topic, "$iothub/twin/res/200/?$rid=1");
}

// ---- sessions -----------------------------------------------------------------------

#[tokio::test]
async fn persistent_subscriptions_survive_a_reconnect() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    assert_eq!(c.subscribe(&[DESIRED, METHODS]).await, vec![GRANTED; 2]);
    c.disconnect().await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Disconnected { .. }).then_some(())
    })
    .await;

    let connstr = sim.hub().module_connection_string("dev1", "mod1").unwrap();
    let opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    let (mut c, ack) = TestClient::connect(opts).await;
    assert!(
        ack.session_present,
        "clean=0 reconnect must find its session"
    );
    // No SUBSCRIBE this time, as Microsoft's Python SDK does.
    desired_patch(&sim, "dev1", "mod1", json!({"a": 1})).await;
    let p = c.next_publish().await;
    assert!(p
        .topic
        .starts_with("$iothub/twin/PATCH/properties/desired/?$version="));
    assert_eq!(json_of(&p.payload)["a"], 1);
}

#[tokio::test]
async fn a_clean_session_loses_the_subscriptions() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[DESIRED]).await;
    c.disconnect().await;

    let connstr = sim.hub().module_connection_string("dev1", "mod1").unwrap();
    let opts = module_options(&sim.sim, &connstr, true, unix_now() + 3600);
    let (_c, ack) = TestClient::connect(opts).await;
    assert!(!ack.session_present);
    desired_patch(&sim, "dev1", "mod1", json!({"a": 1})).await;
    let notified = wait_event(&mut events, |e| match e {
        SimEvent::DesiredChanged { notified, .. } => Some(*notified),
        _ => None,
    })
    .await;
    assert!(!notified);

    // And clean=0 afterwards starts from an empty session too.
    let opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    let (_c, ack) = TestClient::connect(opts).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn subscribe_grants_at_most_qos_1_and_refuses_unsupported_filters() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut raw = Raw::connected(&sim, "dev1", "mod1", 60).await;
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(RES, RawQoS::ExactlyOnce);
    sub.pkid = 3;
    sub.add(
        "devices/dev1/messages/devicebound/#".into(),
        RawQoS::AtLeastOnce,
    );
    sub.add(METHODS.into(), RawQoS::AtMostOnce);
    let mut buf = BytesMut::new();
    sub.write(&mut buf).unwrap();
    raw.send(&buf).await;
    match raw.recv().await {
        Some(RawPacket::SubAck(a)) => {
            assert_eq!(a.pkid, 3);
            assert_eq!(
                a.return_codes,
                vec![
                    GRANTED,
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtMostOnce)
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    raw.io.shutdown().await.ok();

    // Over rumqttc: all three supported filters at once, a repeat, and a wider filter.
    let mut c = sim.connect("dev1", "mod1", false).await;
    assert_eq!(
        c.subscribe(&[RES, DESIRED, METHODS]).await,
        vec![GRANTED; 3]
    );
    assert_eq!(c.subscribe(&[RES]).await, vec![GRANTED]);
    assert_eq!(
        c.subscribe(&["$iothub/twin/#"]).await,
        vec![SubscribeReasonCode::Failure]
    );
}

// ---- twin -----------------------------------------------------------------------------

#[tokio::test]
async fn twin_get_is_answered_without_a_res_subscription() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    desired_patch(&sim, "dev1", "mod1", json!({"interval": 5})).await;
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.publish("$iothub/twin/GET/?$rid=abc-1", " ").await;
    let p = c.next_publish().await;
    assert_eq!(p.topic, "$iothub/twin/res/200/?$rid=abc-1");
    let twin = json_of(&p.payload);
    assert_eq!(twin["desired"]["interval"], 5);
    assert!(twin["desired"]["$version"].as_u64().is_some(), "{twin}");
    assert!(twin["reported"]["$version"].as_u64().is_some(), "{twin}");
    assert!(twin.get("properties").is_none() && twin.get("tags").is_none());
}

#[tokio::test]
async fn reported_patch_is_answered_204_with_version_and_stored() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[RES]).await;
    c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=r1",
        r#"{"a": 1, "b": {"c": "x"}}"#,
    )
    .await;
    let p = c.next_publish().await;
    let version = wait_event(&mut events, |e| match e {
        SimEvent::ReportedPatched { version, .. } => Some(*version),
        _ => None,
    })
    .await;
    assert_eq!(
        p.topic,
        format!("$iothub/twin/res/204/?$rid=r1&$version={version}")
    );
    assert!(p.payload.is_empty());
    let twin = sim.hub().get_module_twin("dev1", "mod1").unwrap();
    assert_eq!(twin["properties"]["reported"]["a"], 1);
    assert_eq!(twin["properties"]["reported"]["b"]["c"], "x");
    assert_eq!(twin["properties"]["reported"]["$version"], version);

    // Java-style optimistic concurrency: a stale $version is 412, the current one works.
    c.publish(
        &format!(
            "$iothub/twin/PATCH/properties/reported/?$rid=r2&$version={}",
            version - 1
        ),
        r#"{"a": 2}"#,
    )
    .await;
    assert_eq!(
        c.next_publish().await.topic,
        "$iothub/twin/res/412/?$rid=r2"
    );
    c.publish(
        &format!("$iothub/twin/PATCH/properties/reported/?$rid=r3&$version={version}"),
        r#"{"a": 3}"#,
    )
    .await;
    assert_eq!(
        c.next_publish().await.topic,
        format!("$iothub/twin/res/204/?$rid=r3&$version={}", version + 1)
    );
    // Not JSON: 400, and the connection stays up.
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=r4", "{nope")
        .await;
    assert_eq!(
        c.next_publish().await.topic,
        "$iothub/twin/res/400/?$rid=r4"
    );
}

#[tokio::test]
async fn desired_notification_carries_version_in_topic_and_payload() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[DESIRED]).await;
    desired_patch(&sim, "dev1", "mod1", json!({"interval": 7, "route": null})).await;
    let version = wait_event(&mut events, |e| match e {
        SimEvent::DesiredChanged {
            version, notified, ..
        } => {
            assert!(notified);
            Some(*version)
        }
        _ => None,
    })
    .await;
    let p = c.next_publish().await;
    assert_eq!(
        p.topic,
        format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
    );
    let body = json_of(&p.payload);
    assert_eq!(body["$version"], version);
    assert_eq!(body["interval"], 7);
}

// ---- direct methods -------------------------------------------------------------------

#[tokio::test]
async fn direct_method_round_trip() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[METHODS]).await;
    let hub = sim.hub().clone();
    let call = tokio::spawn(async move {
        hub.invoke_module_method(
            "dev1",
            "mod1",
            &json!({"methodName": "ping", "payload": {"n": 1}, "responseTimeoutInSeconds": 5}),
        )
        .await
    });
    let req = c.next_publish().await;
    let rid = req
        .topic
        .strip_prefix("$iothub/methods/POST/ping/?$rid=")
        .unwrap_or_else(|| panic!("method topic {}", req.topic))
        .to_string();
    assert_eq!(json_of(&req.payload), json!({"n": 1}));
    c.publish(
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        r#"{"pong": true}"#,
    )
    .await;
    let result = call.await.unwrap().expect("method answered");
    assert_eq!(result, json!({"status": 200, "payload": {"pong": true}}));
}

#[tokio::test]
async fn method_to_an_offline_module_is_404() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let err = sim
        .hub()
        .invoke_module_method(
            "dev1",
            "mod1",
            &json!({"methodName": "ping", "payload": {}, "responseTimeoutInSeconds": 5}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status, 404);
}

#[tokio::test]
async fn method_timeout_is_504() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[METHODS]).await;
    let hub = sim.hub().clone();
    let call = tokio::spawn(async move {
        hub.invoke_module_method(
            "dev1",
            "mod1",
            &json!({"methodName": "slow", "payload": {}, "responseTimeoutInSeconds": 1}),
        )
        .await
    });
    let req = c.next_publish().await;
    assert!(req.topic.starts_with("$iothub/methods/POST/slow/?$rid="));
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.status, 504);
}

// ---- telemetry ------------------------------------------------------------------------

#[tokio::test]
async fn telemetry_is_stored_with_decoded_properties() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let c = sim.connect("dev1", "mod1", false).await;
    c.publish(
        "devices/dev1/modules/mod1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&$.ce=utf-8&alert%20level=hi%2Fthere%26x%3Dy&a%2Bb=c%2Bd&k=&flag",
        r#"{"t": 21.5}"#,
    )
    .await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Telemetry { .. }).then_some(())
    })
    .await;
    let stored = sim.hub().telemetry_of(&key("dev1", "mod1"));
    assert_eq!(stored.len(), 1);
    let t = &stored[0];
    assert_eq!(&t.body[..], br#"{"t": 21.5}"#);
    assert_eq!(t.property("$.mid"), Some("m-1"));
    assert_eq!(t.property("$.ct"), Some("application/json"));
    assert_eq!(t.property("$.ce"), Some("utf-8"));
    assert_eq!(t.property("alert level"), Some("hi/there&x=y"));
    // `+` cannot appear raw in a topic name (a wildcard); encoded, it decodes to `+`.
    assert_eq!(t.property("a+b"), Some("c+d"));
    assert_eq!(t.property("k"), Some(""));
    assert!(t.properties.contains(&("flag".to_string(), None)));
}

#[tokio::test]
async fn qos1_duplicates_and_pings_are_acknowledged() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut raw = Raw::connected(&sim, "dev1", "mod1", 60).await;
    let topic = "devices/dev1/modules/mod1/messages/events/";
    raw.send(&encode_publish(topic, RawQoS::AtLeastOnce, 7, false, b"x"))
        .await;
    raw.send(&encode_publish(topic, RawQoS::AtLeastOnce, 7, true, b"x"))
        .await;
    raw.send(&encode_publish(topic, RawQoS::AtMostOnce, 0, false, b"y"))
        .await;
    let mut buf = BytesMut::new();
    PingReq.write(&mut buf).unwrap();
    raw.send(&buf).await;
    for _ in 0..2 {
        assert!(matches!(raw.recv().await, Some(RawPacket::PubAck(a)) if a.pkid == 7));
    }
    assert!(matches!(raw.recv().await, Some(RawPacket::PingResp)));
    assert_eq!(sim.hub().telemetry_of(&key("dev1", "mod1")).len(), 3);
}

#[tokio::test]
async fn retained_telemetry_is_flagged_not_retained() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let c = sim.connect("dev1", "mod1", false).await;
    let mut events = sim.hub().events();
    c.client
        .publish(
            "devices/dev1/modules/mod1/messages/events/",
            QoS::AtLeastOnce,
            true,
            "r",
        )
        .await
        .unwrap();
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Telemetry { .. }).then_some(())
    })
    .await;
    let t = sim.hub().telemetry_of(&key("dev1", "mod1"));
    assert_eq!(t[0].property("mqtt-retain"), Some("true"));
}

#[tokio::test]
async fn will_is_forwarded_as_telemetry_on_an_abrupt_close() {
    let sim = TestSim::start().await;
    let connstr = sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    opts.set_last_will(LastWill::new(
        "devices/dev1/modules/mod1/messages/events/%24.ct=text%2Fplain",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (c, _) = TestClient::connect(opts).await;
    c.abort();
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Telemetry { .. }).then_some(())
    })
    .await;
    let t = sim.hub().telemetry_of(&key("dev1", "mod1"));
    assert_eq!(&t[0].body[..], b"gone");
    assert_eq!(t[0].property("iothub-MessageType"), Some("Will"));
    assert_eq!(t[0].property("$.ct"), Some("text/plain"));

    // A will aimed elsewhere is refused at CONNECT.
    let mut opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    opts.set_last_will(LastWill::new(
        "status/dev1",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    expect_refused(&sim, opts).await;
}

// ---- closing ----------------------------------------------------------------------------

async fn assert_publish_closes(topic: &str, qos: QoS) {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    sim.register("dev1", "other");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.client.publish(topic, qos, false, "{}").await.unwrap();
    c.closed().await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Disconnected { .. }).then_some(())
    })
    .await;
    assert!(sim.hub().telemetry_of(&key("dev1", "mod1")).is_empty());
    assert!(sim.hub().telemetry_of(&key("dev1", "other")).is_empty());
}

#[tokio::test]
async fn qos2_publish_closes_the_connection() {
    assert_publish_closes(
        "devices/dev1/modules/mod1/messages/events/",
        QoS::ExactlyOnce,
    )
    .await;
}

#[tokio::test]
async fn publish_to_an_unknown_topic_closes_the_connection() {
    assert_publish_closes("$iothub/unknown/?$rid=1", QoS::AtLeastOnce).await;
}

#[tokio::test]
async fn telemetry_as_another_module_closes_the_connection() {
    assert_publish_closes(
        "devices/dev1/modules/other/messages/events/",
        QoS::AtLeastOnce,
    )
    .await;
}

#[tokio::test]
async fn oversized_telemetry_closes_the_connection() {
    let sim = TestSim::start().await;
    let connstr = sim.register("dev1", "mod1");
    let mut opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (mut c, _) = TestClient::connect(opts).await;
    c.publish(
        "devices/dev1/modules/mod1/messages/events/",
        vec![b'x'; 256 * 1024 + 1],
    )
    .await;
    c.closed().await;
    assert!(sim.hub().telemetry_of(&key("dev1", "mod1")).is_empty());
}

#[tokio::test]
async fn keep_alive_timeout_closes_the_connection() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut raw = Raw::connected(&sim, "dev1", "mod1", 1).await;
    // Silent client with keep-alive 1 s: cut after 1.5 s.
    raw.expect_closed().await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Disconnected { .. }).then_some(())
    })
    .await;
}

#[tokio::test]
async fn token_expiry_closes_the_connection() {
    let sim = TestSim::start().await;
    let connstr = sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let opts = module_options(&sim.sim, &connstr, false, unix_now() + 2);
    let (mut c, ack) = TestClient::connect(opts).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    c.closed().await;
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::Disconnected { .. }).then_some(())
    })
    .await;
}

// ---- faults -----------------------------------------------------------------------------

#[tokio::test]
async fn fault_drop_all_connections() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    sim.register("dev1", "mod2");
    let mut a = sim.connect("dev1", "mod1", false).await;
    let mut b = sim.connect("dev1", "mod2", false).await;
    sim.sim.faults().drop_all_connections();
    a.closed().await;
    b.closed().await;
    assert!(!sim.hub().is_connected(&key("dev1", "mod1")));
    // Reconnecting works.
    sim.connect("dev1", "mod1", false).await;
}

#[tokio::test]
async fn fault_throttle_twin_ops() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[RES]).await;
    sim.sim.faults().throttle_twin_ops(2);
    c.publish("$iothub/twin/GET/?$rid=1", " ").await;
    assert_eq!(c.next_publish().await.topic, "$iothub/twin/res/429/?$rid=1");
    c.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", "{}")
        .await;
    assert_eq!(c.next_publish().await.topic, "$iothub/twin/res/429/?$rid=2");
    c.publish("$iothub/twin/GET/?$rid=3", " ").await;
    assert_eq!(c.next_publish().await.topic, "$iothub/twin/res/200/?$rid=3");
}

#[tokio::test]
async fn fault_drop_twin_responses() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[RES]).await;
    sim.sim.faults().drop_twin_responses(1);
    c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=lost",
        r#"{"a":1}"#,
    )
    .await;
    // The patch takes effect although its response is lost.
    wait_event(&mut events, |e| {
        matches!(e, SimEvent::ReportedPatched { .. }).then_some(())
    })
    .await;
    c.publish("$iothub/twin/GET/?$rid=next", " ").await;
    let p = c.next_publish().await;
    assert_eq!(p.topic, "$iothub/twin/res/200/?$rid=next");
    assert_eq!(json_of(&p.payload)["reported"]["a"], 1);
}

#[tokio::test]
async fn fault_delay_twin_responses() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[RES]).await;
    let delay = Duration::from_millis(400);
    sim.sim.faults().delay_twin_responses(Some(delay));
    let sent = Instant::now();
    c.publish("$iothub/twin/GET/?$rid=slow", " ").await;
    let p = c.next_publish().await;
    assert_eq!(p.topic, "$iothub/twin/res/200/?$rid=slow");
    assert!(sent.elapsed() >= delay);
    sim.sim.faults().delay_twin_responses(None);
    c.publish("$iothub/twin/GET/?$rid=fast", " ").await;
    assert_eq!(
        c.next_publish().await.topic,
        "$iothub/twin/res/200/?$rid=fast"
    );
}

#[tokio::test]
async fn restart_keeps_twins_and_sessions() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[RES, DESIRED]).await;
    c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        r#"{"kept": true}"#,
    )
    .await;
    assert!(c
        .next_publish()
        .await
        .topic
        .starts_with("$iothub/twin/res/204/"));

    let sim = sim.restart().await;
    c.closed().await;

    let connstr = sim.hub().module_connection_string("dev1", "mod1").unwrap();
    let opts = module_options(&sim.sim, &connstr, false, unix_now() + 3600);
    let (mut c, ack) = TestClient::connect(opts).await;
    assert!(ack.session_present);
    desired_patch(&sim, "dev1", "mod1", json!({"after": "restart"})).await;
    let p = c.next_publish().await;
    assert!(p
        .topic
        .starts_with("$iothub/twin/PATCH/properties/desired/"));
    c.publish("$iothub/twin/GET/?$rid=2", " ").await;
    let twin = json_of(&c.next_publish().await.payload);
    assert_eq!(twin["reported"]["kept"], true);
    assert_eq!(twin["desired"]["after"], "restart");
}

#[tokio::test]
async fn unsubscribe_stops_notifications() {
    let sim = TestSim::start().await;
    sim.register("dev1", "mod1");
    let mut events = sim.hub().events();
    let mut c = sim.connect("dev1", "mod1", false).await;
    c.subscribe(&[DESIRED]).await;
    c.client.unsubscribe(DESIRED).await.unwrap();
    c.next_incoming(|p| matches!(p, Packet::UnsubAck(_)).then_some(()))
        .await;
    desired_patch(&sim, "dev1", "mod1", json!({"a": 1})).await;
    let notified = wait_event(&mut events, |e| match e {
        SimEvent::DesiredChanged { notified, .. } => Some(*notified),
        _ => None,
    })
    .await;
    assert!(!notified);
}
