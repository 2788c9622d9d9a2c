//! `fleet status --wait`: poll until nothing is pending or the time is up, never faster
//! than [`super::pace::poll_interval`] allows for what the last poll cost. The poll itself
//! is injected (the client's status, or a script in tests), as is the clock.

use std::future::Future;
use std::time::Duration;

use super::pace::{poll_interval, Clock};
use super::status::{overall, RolloutStatus, Verdict};
use super::FleetError;

/// One poll's result and what it cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Poll {
    pub statuses: Vec<RolloutStatus>,
    /// Configurations that are not edgetwin rollouts (no metrics to count), by name.
    pub skipped: Vec<String>,
    pub usage: Usage,
}

/// Quota-metered calls made (each attempt counts, throttled ones too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub queries: u32,
    pub configuration_ops: u32,
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    pub last: Poll,
    /// The deadline came (or the next poll would have come after it) with some pending.
    pub timed_out: bool,
}

/// Polls until [`overall`] is not [`Verdict::Pending`] or `wait` has passed; `on_poll`
/// sees each poll with the pause before the next one (`None` for the last).
///
/// A poll that fails for a reason that may pass (the hub unavailable, throttling that
/// outlasted the client's retries) is tried again at the next interval while time is
/// left, once at least one poll succeeded; any other failure ends the wait.
pub async fn watch<F, Fut>(
    clock: &dyn Clock,
    wait: Duration,
    mut poll: F,
    mut on_poll: impl FnMut(&Poll, Option<Duration>),
) -> Result<Watched, FleetError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll, FleetError>>,
{
    let deadline = clock.now() + wait;
    let mut previous: Option<Poll> = None;
    loop {
        let last = match poll().await {
            Ok(p) => p,
            Err(e) if e.is_retryable() && previous.is_some() => {
                // Pace as the last good poll did; the failed one cost at least as much.
                let last = previous.take().unwrap_or_default();
                let pause = poll_interval(last.usage.queries, last.usage.configuration_ops);
                if clock.now() + pause > deadline {
                    on_poll(&last, None);
                    return Ok(Watched {
                        last,
                        timed_out: true,
                    });
                }
                tracing::warn!(error = %e, "fleet status poll failed; trying again");
                clock.sleep(pause).await;
                previous = Some(last);
                continue;
            }
            Err(e) => return Err(e),
        };
        if overall(&last.statuses) != Verdict::Pending {
            on_poll(&last, None);
            return Ok(Watched {
                last,
                timed_out: false,
            });
        }
        let pause = poll_interval(last.usage.queries, last.usage.configuration_ops);
        if clock.now() + pause > deadline {
            on_poll(&last, None);
            return Ok(Watched {
                last,
                timed_out: true,
            });
        }
        on_poll(&last, Some(pause));
        clock.sleep(pause).await;
        previous = Some(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::pace::ManualClock;

    fn poll(pending: u64) -> Poll {
        Poll {
            statuses: vec![RolloutStatus {
                name: "r".into(),
                priority: 10,
                targeted: 3,
                applied: 3 - pending,
                rejected: 0,
                superseded: 0,
                pending,
                rejections: vec![],
            }],
            skipped: vec![],
            usage: Usage {
                queries: 3,
                configuration_ops: 1,
            },
        }
    }

    #[tokio::test]
    async fn polls_at_the_quota_interval_until_nothing_is_pending() {
        let clock = ManualClock::default();
        let mut script = vec![poll(3), poll(1), poll(0)].into_iter();
        let mut seen = Vec::new();
        let watched = watch(
            &clock,
            Duration::from_secs(60),
            || std::future::ready(Ok(script.next().unwrap())),
            |p, next| seen.push((p.statuses[0].pending, next)),
        )
        .await
        .unwrap();
        assert!(!watched.timed_out);
        assert_eq!(watched.last.statuses[0].applied, 3);
        let nine = Some(Duration::from_secs(9));
        assert_eq!(seen, vec![(3, nine), (1, nine), (0, None)]);
        assert_eq!(clock.sleeps(), vec![Duration::from_secs(9); 2]);
    }

    #[tokio::test]
    async fn stops_when_the_next_poll_would_come_after_the_deadline() {
        let clock = ManualClock::default();
        let mut polls = 0;
        let watched = watch(
            &clock,
            Duration::from_secs(20),
            || {
                polls += 1;
                std::future::ready(Ok(poll(2)))
            },
            |_, _| {},
        )
        .await
        .unwrap();
        assert!(watched.timed_out);
        assert_eq!(polls, 3, "at 0, 9 and 18 s");
        assert_eq!(clock.elapsed(), Duration::from_secs(18));
    }

    #[tokio::test]
    async fn an_unavailable_hub_between_polls_does_not_end_the_wait() {
        use crate::registry::RegistryError;
        let clock = ManualClock::default();
        let mut script = vec![
            Ok(poll(2)),
            Err(FleetError::Registry(RegistryError::Transient("503".into()))),
            Ok(poll(0)),
        ]
        .into_iter();
        let watched = watch(
            &clock,
            Duration::from_secs(60),
            || std::future::ready(script.next().unwrap()),
            |_, _| {},
        )
        .await
        .unwrap();
        assert!(!watched.timed_out);
        assert_eq!(clock.sleeps(), vec![Duration::from_secs(9); 2]);
        // Before any poll succeeded, the same failure ends the wait.
        let failed = watch(
            &clock,
            Duration::from_secs(60),
            || {
                std::future::ready(Err(FleetError::Registry(RegistryError::Transient(
                    "503".into(),
                ))))
            },
            |_, _| {},
        )
        .await;
        assert!(failed.is_err());
    }

    #[tokio::test]
    async fn a_failed_poll_ends_the_wait_with_its_error() {
        let clock = ManualClock::default();
        let got = watch(
            &clock,
            Duration::from_secs(20),
            || std::future::ready(Err(FleetError::NotFound("r".into()))),
            |_, _| {},
        )
        .await;
        assert!(matches!(got, Err(FleetError::NotFound(_))));
    }
}
