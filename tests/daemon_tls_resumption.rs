//! The daemon's token-renewal reconnect resumes its TLS session when the hub allows it
//! (one rustls `ClientConfig`, and so one session store, across reconnects), and falls
//! back to a full handshake when the hub does not. The emulator records, per connection,
//! whether the handshake resumed and the bytes it cost (beneath TLS).

mod daemon_support;

use std::time::Duration;

use daemon_support::{Daemon, Env};
use edgetwin_sim::wire::{ConnectionWire, Listener};

/// The MQTT connections so far, once at least `n` have finished their handshake.
async fn wait_handshakes(env: &mut Env, n: usize) -> Vec<ConnectionWire> {
    for _ in 0..n {
        env.wait_connected().await;
    }
    env.sim()
        .wire()
        .connections()
        .into_iter()
        .filter(|c| c.listener == Listener::Mqtt && c.resumed.is_some())
        .collect()
}

#[tokio::test]
async fn the_renewal_reconnect_resumes_the_tls_session() {
    let mut env = Env::start().await;
    let mut settings = env.settings("");
    // Below the configurable minimum on purpose: renew every 2.4 s.
    settings.hub.sas_ttl = Duration::from_secs(3);
    let daemon = Daemon::start(settings).await;
    let conns = wait_handshakes(&mut env, 3).await;
    daemon.stop().await.expect("clean stop");

    assert!(conns.len() >= 3, "{conns:?}");
    assert_eq!(
        conns[0].resumed,
        Some(false),
        "first connect: {:?}",
        conns[0]
    );
    for c in &conns[1..] {
        assert_eq!(c.resumed, Some(true), "renewal reconnect: {c:?}");
    }
    // A resumed handshake sends no certificate chain: the hub's side of it is smaller.
    let closed: Vec<_> = conns.iter().filter(|c| !c.open).collect();
    assert!(closed.len() >= 2, "{conns:?}");
    assert!(
        closed[1].bytes_to_client < closed[0].bytes_to_client,
        "{closed:?}"
    );
}

#[tokio::test]
async fn without_resumption_on_the_hub_every_reconnect_is_a_full_handshake() {
    let mut env = Env::start().await;
    env.sim().set_tls_resumption(false);
    let mut settings = env.settings("");
    settings.hub.sas_ttl = Duration::from_secs(3);
    let daemon = Daemon::start(settings).await;
    let conns = wait_handshakes(&mut env, 3).await;
    daemon.stop().await.expect("clean stop");

    assert!(conns.len() >= 3, "{conns:?}");
    for c in &conns {
        assert_eq!(c.resumed, Some(false), "{c:?}");
    }
}
