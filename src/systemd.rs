//! systemd integration: `sd_notify` messages (READY, STATUS, RELOADING, STOPPING,
//! WATCHDOG) and the progress [`Heartbeat`]s the watchdog is fed from.
//!
//! The app supervisor is the only caller of [`Notifier`]; the session and agent loops
//! each hold one [`Heartbeat`] and beat it on every turn. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op. It must never send `WATCHDOG=1` on a timer
//! alone: only when every loop has beaten recently, so a wedged loop gets the daemon
//! restarted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;

/// A loop's proof of life: the time of its last turn.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    pub fn new() -> Self {
        Heartbeat {
            origin: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The loop made a turn.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last turn.
    pub fn age(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// How often a loop beats even when it has nothing else to do.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Sends notifications to the service manager, if there is one.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Enabled when `NOTIFY_SOCKET` is set; the environment is left as it is so a test
    /// harness can read it too.
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Half of `WATCHDOG_USEC` when the watchdog is on for this process: as in
    /// libsystemd, `WATCHDOG_PID` when present must be ours.
    pub fn watchdog_period(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// Sends `WATCHDOG=1` every `period` while every heartbeat is younger than `2 * period`
/// (the watchdog interval itself, but never less than a few beats); runs until dropped.
pub async fn feed_watchdog(notifier: Notifier, period: Duration, hearts: Vec<Heartbeat>) {
    let mut tick = tokio::time::interval(period);
    let limit = (period * 2).max(BEAT_EVERY * 3);
    loop {
        tick.tick().await;
        let stalled: Vec<usize> = hearts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.age() > limit)
            .map(|(i, _)| i)
            .collect();
        if stalled.is_empty() {
            notifier.watchdog();
        } else {
            tracing::error!(
                edgetwin_event = "watchdog_withheld",
                stalled_loops = ?stalled,
                "a loop made no progress; not feeding the watchdog"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_beat_is_young_and_clones_share_it() {
        let h = Heartbeat::new();
        let seen_by_watchdog = h.clone();
        h.beat();
        assert!(seen_by_watchdog.age() < Duration::from_secs(1));
    }

    #[test]
    fn notifier_without_socket_is_silent() {
        let n = Notifier { enabled: false };
        n.ready("x");
        assert_eq!(n.watchdog_period(), None);
    }
}
