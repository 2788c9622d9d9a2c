//! Twin requests in flight, correlated by `$rid` (PROTOCOL §4.1): which GET or reported
//! PATCH each response answers, when an unanswered one times out, and when a throttled
//! (429) or failed (5xx) one is sent again.
//!
//! Owned by the session task, which publishes what [`TwinRequests`] hands it and feeds it
//! every `$iothub/twin/res/..` it receives. Pure bookkeeping: no I/O, and the caller
//! passes the clock in. A retry always gets a fresh `$rid`, so a late answer to an old
//! one is ignored rather than taken for the new one.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::backoff::BackoffPolicy;
use super::topics;

/// A 429 means the hub is over its rate for a whole fleet at once (every gateway resyncs
/// after the same outage): its retries are drawn as from attempt number `THROTTLED_SPREAD`
/// on (`[initial, initial·4]` at first, 1–4 s by default), never at exactly `initial`, so
/// throttled gateways do not come back in lockstep; the window keeps doubling after that.
/// A 5xx is one request's bad luck and starts at `initial`.
pub const THROTTLED_SPREAD: u32 = 2;
/// The longest wait before re-sending a throttled request (or `hub.backoff.max` if
/// shorter). A 429 says "later", not "down": the hub answers, and windows that kept
/// doubling to the reconnect maximum (120 s) left the last gateways of a 1,000-gateway
/// rollout waiting long after the hub had capacity again (docs/BENCHMARKS.md, Fleet).
pub const THROTTLED_MAX: Duration = Duration::from_secs(30);

/// What a request asks of the hub.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinOp {
    Get,
    Report(Map<String, Value>),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinReply {
    /// 200 with the twin document.
    Twin(Bytes),
    /// 204 with the new reported `$version`.
    Reported(Option<u64>),
}

/// Why a request will not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinFailure {
    /// The connection dropped (or was down) before an answer; send again after reconnect.
    #[error("connection lost before the hub answered")]
    Lost,
    /// The hub refused it for good (400, 412, ...): retrying the same request won't help.
    #[error("hub answered {status}")]
    Refused { status: u16 },
}

/// Something to publish now.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A request is finished: its kind and result.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub op: TwinOp,
    pub result: Result<TwinReply, TwinFailure>,
}

#[derive(Debug)]
struct Pending {
    op: TwinOp,
    attempt: u32,
    /// Waiting for an answer until then; `None` while waiting to be re-sent.
    deadline: Option<Instant>,
    retry_at: Option<Instant>,
}

/// Capacity kept once the requests are all answered: a few are usual in flight.
const KEEP_CAPACITY: usize = 16;

/// All twin requests of one session.
#[derive(Debug)]
pub struct TwinRequests {
    pending: HashMap<String, Pending>,
    next_rid: u64,
    timeout: Duration,
    retry: BackoffPolicy,
    /// Requests waiting for their retry time, keyed by the `$rid` they were last sent with.
    waiting: Vec<String>,
}

impl TwinRequests {
    pub fn new(timeout: Duration, retry: BackoffPolicy) -> Self {
        TwinRequests {
            pending: HashMap::new(),
            next_rid: 1,
            timeout,
            retry,
            waiting: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Registers a new request and returns what to publish.
    pub fn start(&mut self, op: TwinOp, now: Instant) -> Publish {
        self.send(op, 0, now)
    }

    fn send(&mut self, op: TwinOp, attempt: u32, now: Instant) -> Publish {
        let rid = self.next_rid.to_string();
        self.next_rid += 1;
        let publish = match &op {
            // Some hubs and SDKs choke on an empty payload; Python sends one space.
            TwinOp::Get => Publish {
                topic: topics::twin_get(&rid),
                payload: b" ".to_vec(),
            },
            TwinOp::Report(patch) => Publish {
                topic: topics::reported_patch(&rid),
                payload: serde_json::to_vec(patch).unwrap_or_default(),
            },
        };
        self.pending.insert(
            rid,
            Pending {
                op,
                attempt,
                deadline: Some(now + self.timeout),
                retry_at: None,
            },
        );
        publish
    }

    /// A `$iothub/twin/res/{status}/?$rid=..` arrived. `None`: not ours, or retried later.
    pub fn response(
        &mut self,
        rid: &str,
        status: u16,
        version: Option<u64>,
        body: Bytes,
        now: Instant,
    ) -> Option<Finished> {
        let pending = self.pending.get_mut(rid)?;
        pending.deadline?;
        if status == 429 || (500..600).contains(&status) {
            let mut policy = self.retry;
            if status == 429 {
                pending.attempt = pending.attempt.max(THROTTLED_SPREAD);
                policy.max = policy.max.min(THROTTLED_MAX);
            }
            pending.deadline = None;
            pending.retry_at = Some(now + policy.delay(pending.attempt));
            self.waiting.push(rid.to_owned());
            return None;
        }
        let pending = self.pending.remove(rid)?;
        self.release_capacity();
        let result = match (&pending.op, status) {
            (TwinOp::Get, 200..=299) => Ok(TwinReply::Twin(body)),
            (TwinOp::Report(_), 200..=299) => Ok(TwinReply::Reported(version)),
            (_, status) => Err(TwinFailure::Refused { status }),
        };
        Some(Finished {
            op: pending.op,
            result,
        })
    }

    /// Re-sends what is due: throttled requests whose wait is over, and requests that
    /// were never answered (a lost response looks exactly like that).
    pub fn due(&mut self, now: Instant) -> Vec<Publish> {
        let mut resend = Vec::new();
        let timed_out: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(rid, _)| rid.clone())
            .collect();
        for rid in timed_out {
            if let Some(p) = self.pending.remove(&rid) {
                resend.push((p.op, p.attempt + 1));
            }
        }
        let waiting = std::mem::take(&mut self.waiting);
        for rid in waiting {
            match self.pending.get(&rid).and_then(|p| p.retry_at) {
                Some(at) if at <= now => {
                    if let Some(p) = self.pending.remove(&rid) {
                        resend.push((p.op, p.attempt + 1));
                    }
                }
                Some(_) => self.waiting.push(rid),
                None => {}
            }
        }
        let resend: Vec<Publish> = resend
            .into_iter()
            .map(|(op, attempt)| self.send(op, attempt, now))
            .collect();
        self.release_capacity();
        resend
    }

    /// Once nothing is pending, gives back what a burst grew: in a storm of resyncs the
    /// map held thousands of requests (about 0.8 MiB, heap profile in
    /// docs/BENCHMARKS.md), and a `HashMap` keeps its largest capacity otherwise.
    fn release_capacity(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > KEEP_CAPACITY {
            self.pending.shrink_to(KEEP_CAPACITY);
        }
        if self.waiting.is_empty() && self.waiting.capacity() > KEEP_CAPACITY {
            self.waiting.shrink_to(KEEP_CAPACITY);
        }
    }

    /// When [`Self::due`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter_map(|p| p.deadline.or(p.retry_at))
            .min()
    }

    /// The connection is gone: every request fails with [`TwinFailure::Lost`].
    pub fn fail_all(&mut self) -> Vec<Finished> {
        self.waiting.clear();
        let mut rids: Vec<_> = self.pending.keys().cloned().collect();
        // In sending order, so a caller restoring reported patches restores oldest first.
        rids.sort_by_key(|rid| rid.parse::<u64>().unwrap_or(u64::MAX));
        let failed = rids
            .into_iter()
            .filter_map(|rid| self.pending.remove(&rid))
            .map(|p| Finished {
                op: p.op,
                result: Err(TwinFailure::Lost),
            })
            .collect();
        self.release_capacity();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn requests() -> TwinRequests {
        TwinRequests::new(
            Duration::from_secs(10),
            BackoffPolicy {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
        )
    }

    fn rid_of(p: &Publish) -> String {
        p.topic.rsplit("$rid=").next().unwrap().to_owned()
    }

    #[test]
    fn a_burst_of_requests_leaves_no_large_table_once_all_are_answered() {
        let now = Instant::now();
        let mut r = requests();
        let sent: Vec<_> = (0..5000).map(|_| r.start(TwinOp::Get, now)).collect();
        assert!(r.pending.capacity() >= 5000);
        for p in &sent {
            r.response(&rid_of(p), 200, None, Bytes::new(), now)
                .unwrap();
        }
        assert!(r.is_empty());
        assert!(
            r.pending.capacity() <= 2 * KEEP_CAPACITY,
            "{}",
            r.pending.capacity()
        );
    }

    #[test]
    fn get_is_answered_by_its_rid() {
        let now = Instant::now();
        let mut r = requests();
        let p = r.start(TwinOp::Get, now);
        assert!(p.topic.starts_with("$iothub/twin/GET/?$rid="));
        assert_eq!(r.response("other", 200, None, Bytes::new(), now), None);
        let done = r
            .response(&rid_of(&p), 200, None, Bytes::from_static(b"{}"), now)
            .unwrap();
        assert_eq!(done.result, Ok(TwinReply::Twin(Bytes::from_static(b"{}"))));
        assert!(r.is_empty());
    }

    #[test]
    fn reported_204_carries_the_new_version() {
        let now = Instant::now();
        let mut r = requests();
        let patch = json!({"a": 1}).as_object().cloned().unwrap();
        let p = r.start(TwinOp::Report(patch.clone()), now);
        assert_eq!(p.payload, br#"{"a":1}"#);
        let done = r
            .response(&rid_of(&p), 204, Some(5), Bytes::new(), now)
            .unwrap();
        assert_eq!(done.op, TwinOp::Report(patch));
        assert_eq!(done.result, Ok(TwinReply::Reported(Some(5))));
    }

    #[test]
    fn throttled_request_is_resent_with_a_new_rid_after_the_backoff() {
        let now = Instant::now();
        let mut r = requests();
        let p = r.start(TwinOp::Get, now);
        assert_eq!(r.response(&rid_of(&p), 429, None, Bytes::new(), now), None);
        assert!(r.due(now).is_empty());
        assert_eq!(r.next_wakeup(), Some(now + Duration::from_secs(1)));
        let again = r.due(now + Duration::from_secs(1));
        assert_eq!(again.len(), 1);
        assert_ne!(rid_of(&again[0]), rid_of(&p));
        assert_eq!(
            r.response(&rid_of(&p), 200, None, Bytes::new(), now),
            None,
            "a late answer to the old rid is ignored"
        );
    }

    #[test]
    fn throttled_retries_are_spread_over_a_growing_window_and_server_errors_are_not() {
        let policy = BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(120),
        };
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let now = Instant::now();
            let mut r = TwinRequests::new(Duration::from_secs(10), policy);
            let p = r.start(TwinOp::Get, now);
            r.response(&rid_of(&p), 429, None, Bytes::new(), now);
            let first = r.next_wakeup().unwrap() - now;
            assert!((1..=4).contains(&first.as_secs()), "{first:?}");
            firsts.insert(first.as_millis() / 250);
            let again = r.due(now + first);
            r.response(&rid_of(&again[0]), 429, None, Bytes::new(), now + first);
            let second = r.next_wakeup().unwrap() - (now + first);
            assert!(second <= Duration::from_secs(8), "{second:?}");
        }
        // However many times in a row, never longer than THROTTLED_MAX.
        let now = Instant::now();
        let mut r = TwinRequests::new(Duration::from_secs(10), policy);
        let mut p = r.start(TwinOp::Get, now);
        let mut at = now;
        for _ in 0..12 {
            r.response(&rid_of(&p), 429, None, Bytes::new(), at);
            let next = r.next_wakeup().unwrap();
            assert!(next - at <= THROTTLED_MAX, "{:?}", next - at);
            at = next;
            p = r.due(at).pop().expect("re-sent");
        }
        assert!(firsts.len() > 4, "throttled retries spread: {firsts:?}");

        let now = Instant::now();
        let mut r = TwinRequests::new(Duration::from_secs(10), policy);
        let p = r.start(TwinOp::Get, now);
        r.response(&rid_of(&p), 503, None, Bytes::new(), now);
        assert_eq!(r.next_wakeup(), Some(now + Duration::from_secs(1)));
    }

    #[test]
    fn unanswered_request_is_resent_after_the_timeout() {
        let now = Instant::now();
        let mut r = requests();
        r.start(TwinOp::Get, now);
        assert!(r.due(now + Duration::from_secs(9)).is_empty());
        assert_eq!(r.due(now + Duration::from_secs(10)).len(), 1);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn client_errors_are_final() {
        let now = Instant::now();
        let mut r = requests();
        let p = r.start(TwinOp::Get, now);
        let done = r
            .response(&rid_of(&p), 400, None, Bytes::new(), now)
            .unwrap();
        assert_eq!(done.result, Err(TwinFailure::Refused { status: 400 }));
    }

    #[test]
    fn disconnect_fails_everything_in_sending_order() {
        let now = Instant::now();
        let mut r = requests();
        r.start(TwinOp::Get, now);
        r.start(TwinOp::Report(Map::new()), now);
        let failed = r.fail_all();
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].op, TwinOp::Get);
        assert!(failed.iter().all(|f| f.result == Err(TwinFailure::Lost)));
        assert!(r.is_empty() && r.next_wakeup().is_none());
    }
}
