//! Waiting on the hub's event stream ([`Hub::events`](crate::Hub::events)) for the first
//! [`SimEvent`] that matches, within a deadline: how the demo, the tests and the
//! benchmarks learn that something happened instead of sleeping.
//!
//! A receiver that fell behind (`Lagged`) skips the events it missed and keeps waiting:
//! the hub never blocks on a slow observer. A caller that must account for every event
//! keeps its own receive loop.

use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};

use crate::hub::SimEvent;

/// Why no matching event arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("no matching hub event within {0:?}")]
    TimedOut(Duration),
    #[error("the hub's event stream ended (the emulator stopped)")]
    Closed,
}

/// The first event from `events` for which `pick` returns `Some`, within `timeout`;
/// returns what `pick` returned. Events that do not match are consumed.
pub async fn wait_pick<T>(
    events: &mut broadcast::Receiver<SimEvent>,
    timeout: Duration,
    mut pick: impl FnMut(&SimEvent) -> Option<T>,
) -> Result<T, WaitError> {
    let found = async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(t) = pick(&event) {
                        return Ok(t);
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(WaitError::Closed),
            }
        }
    };
    tokio::time::timeout(timeout, found)
        .await
        .map_err(|_| WaitError::TimedOut(timeout))?
}

/// The first event from `events` that `matches`, within `timeout`. Events that do not
/// match are consumed.
pub async fn wait_for(
    events: &mut broadcast::Receiver<SimEvent>,
    timeout: Duration,
    mut matches: impl FnMut(&SimEvent) -> bool,
) -> Result<SimEvent, WaitError> {
    wait_pick(events, timeout, |event| {
        matches(event).then(|| event.clone())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ModuleKey;

    fn disconnected(module_id: &str) -> SimEvent {
        SimEvent::Disconnected {
            module: ModuleKey {
                device_id: "d".into(),
                module_id: module_id.into(),
            },
        }
    }

    fn is_module(e: &SimEvent, id: &str) -> bool {
        matches!(e, SimEvent::Disconnected { module } if module.module_id == id)
    }

    #[tokio::test]
    async fn wait_for_returns_the_first_match_and_consumes_what_came_before() {
        let (tx, mut rx) = broadcast::channel(8);
        for id in ["a", "b", "c"] {
            tx.send(disconnected(id)).unwrap();
        }
        let found = wait_for(&mut rx, Duration::from_secs(5), |e| is_module(e, "b"))
            .await
            .unwrap();
        assert_eq!(found, disconnected("b"));
        assert_eq!(rx.try_recv().unwrap(), disconnected("c"));
    }

    #[tokio::test]
    async fn a_lagged_receiver_skips_what_it_missed_and_still_finds_the_match() {
        let (tx, mut rx) = broadcast::channel(2);
        for id in ["a", "b", "c", "d", "e"] {
            tx.send(disconnected(id)).unwrap();
        }
        let found = wait_for(&mut rx, Duration::from_secs(5), |e| is_module(e, "e"))
            .await
            .unwrap();
        assert_eq!(found, disconnected("e"));
    }

    #[tokio::test]
    async fn no_match_within_the_timeout_is_an_error() {
        let (tx, mut rx) = broadcast::channel(8);
        tx.send(disconnected("a")).unwrap();
        let timeout = Duration::from_millis(50);
        let err = wait_for(&mut rx, timeout, |e| is_module(e, "z"))
            .await
            .unwrap_err();
        assert_eq!(err, WaitError::TimedOut(timeout));
    }

    #[tokio::test]
    async fn a_closed_stream_ends_the_wait_at_once() {
        let (tx, mut rx) = broadcast::channel(8);
        tx.send(disconnected("a")).unwrap();
        drop(tx);
        let err = wait_for(&mut rx, Duration::from_secs(3600), |e| is_module(e, "z"))
            .await
            .unwrap_err();
        assert_eq!(err, WaitError::Closed);
    }

    #[tokio::test]
    async fn wait_pick_returns_what_the_picker_extracted() {
        let (tx, mut rx) = broadcast::channel(8);
        tx.send(disconnected("a")).unwrap();
        let id = wait_pick(&mut rx, Duration::from_secs(5), |e| match e {
            SimEvent::Disconnected { module } => Some(module.module_id.clone()),
            _ => None,
        })
        .await
        .unwrap();
        assert_eq!(id, "a");
    }
}
