//! The daemon against a throttling hub (`edgetwin-sim --tier`): connects closed without
//! a CONNACK and twin GETs answered 429 are retried until the hub lets them through, the
//! twin is applied and acknowledged, and a hub restart under throttling loses no version.
//! Limits are slow on purpose (rates of one's own) and emptied first, so the daemon meets
//! them; the tests wait on hub events, never on time.

mod daemon_support;

use std::time::{Duration, Instant};

use daemon_support::{acks_at_least, Daemon, Env};
use edgetwin_sim::throttle::{Kind, Rate, Throttle};
use edgetwin_sim::{SimEvent, Tier};
use serde_json::json;

fn every(secs: u64) -> Rate {
    Rate {
        amount: 1,
        period: Duration::from_secs(secs),
    }
}

#[tokio::test]
async fn throttled_connects_and_twin_reads_are_retried_until_the_twin_is_applied() {
    let mut env = Env::start().await;
    let version = env.set_desired(json!({"telemetryInterval": 42}));
    // One connect a second and one twin read every eight, no shaping; both tokens are
    // taken now, so the daemon's first CONNECT is closed and its first GET (right after
    // its connect, well before the read token is back) is answered 429.
    let hub = env.sim().hub().clone();
    hub.replace_throttle(Throttle::with_rates(
        [(Kind::DeviceConnect, every(1)), (Kind::TwinRead, every(8))],
        Duration::ZERO,
        Instant::now(),
    ));
    hub.admit(Kind::DeviceConnect);
    hub.admit(Kind::TwinRead);

    let daemon = Daemon::start(env.settings("")).await;
    env.wait_for("a throttled connect", |e| {
        matches!(
            e,
            SimEvent::Throttled {
                kind: Kind::DeviceConnect
            }
        )
    })
    .await;
    env.wait_for("a throttled twin read", |e| {
        matches!(
            e,
            SimEvent::Throttled {
                kind: Kind::TwinRead
            }
        )
    })
    .await;
    env.wait_ack("telemetryInterval", version).await;

    let counts = env.sim().throttle_counts();
    assert!(counts.get(Kind::DeviceConnect).throttled >= 1);
    assert!(counts.get(Kind::TwinRead).throttled >= 1);
    assert_eq!(
        env.state_file()["desired_version"],
        json!(version),
        "the state in force is the hub's desired"
    );
    daemon.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_hub_restarted_at_s1_with_a_change_made_meanwhile_is_resynced() {
    let mut env = Env::start().await;
    env.sim().set_throttle(Tier::S1, 1);
    let daemon = Daemon::start(env.settings("")).await;
    env.wait_twin_get().await;

    let sim = env.sim.take().expect("sim running");
    let sim = sim.restart().await.expect("sim restarts");
    env.events = sim.hub().events();
    env.sim = Some(sim);
    let version = env.set_desired(json!({"telemetryInterval": 77}));
    let counts = env.sim().throttle_counts();
    assert_eq!(counts.tier, Tier::S1, "the tier survives the restart");

    env.wait_for("the change acknowledged after the restart", |e| {
        acks_at_least(e, version)
    })
    .await;
    assert_eq!(
        env.state_file()["properties"]["telemetryInterval"],
        json!(77)
    );
    daemon.stop().await.expect("clean stop");
}
