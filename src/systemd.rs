//! systemd integration: `sd_notify` messages (READY, STATUS, RELOADING, STOPPING,
//! WATCHDOG) and the progress [`Heartbeat`]s the watchdog is fed from.
//!
//! The app supervisor is the only caller of [`Notifier`]; the session and agent loops
//! each hold one [`Heartbeat`] and beat it on every turn. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op. It must never send `WATCHDOG=1` on a timer
//! alone: only when every loop has beaten recently, so a wedged loop gets the daemon
//! restarted.
//!
//! The datagrams are sent here rather than by `sd_notify::notify`, which only knows the
//! environment: a notifier can then be pointed at any socket ([`Notifier::with_socket`]),
//! which is how the unit tests see exactly what systemd would receive.

use std::fmt::Write as _;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
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
    /// The service manager's datagram socket; `None` outside systemd.
    socket: Option<PathBuf>,
}

impl Notifier {
    /// Enabled when `NOTIFY_SOCKET` is set; the environment is left as it is so a test
    /// harness can read it too.
    pub fn from_env() -> Self {
        Notifier {
            socket: std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from),
        }
    }

    /// Sends to `socket` whatever the environment says (a path, or `@name` for an abstract
    /// socket, as in `NOTIFY_SOCKET`).
    pub fn with_socket(socket: impl Into<PathBuf>) -> Self {
        Notifier {
            socket: Some(socket.into()),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        let Some(socket) = &self.socket else {
            return;
        };
        if let Err(e) = send_datagram(socket, &message(states)) {
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
        self.socket.as_ref()?;
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// One notification: each state on its own line, as `sd_notify(3)` expects.
fn message(states: &[NotifyState]) -> String {
    let mut msg = String::new();
    for state in states {
        let _ = writeln!(msg, "{state}");
    }
    msg
}

/// One datagram to the service manager; a leading `@` names an abstract socket.
fn send_datagram(socket: &Path, msg: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sock = UnixDatagram::unbound()?;
    let sent = match socket.as_os_str().as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?
        }
        None => sock.send_to(msg.as_bytes(), socket)?,
    };
    if sent == msg.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "incomplete notification",
        ))
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

    /// The service manager's end: a bound datagram socket that fails a test rather than
    /// hanging it when nothing comes.
    struct Manager {
        socket: UnixDatagram,
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Manager {
        fn bind() -> Manager {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Manager {
                socket,
                path,
                _dir: dir,
            }
        }

        fn next(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("a notification");
            String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
        }
    }

    #[test]
    fn every_notification_is_one_datagram_with_the_states_systemd_expects() {
        let manager = Manager::bind();
        let n = Notifier::with_socket(&manager.path);
        n.ready("connected to IoT Hub");
        assert_eq!(manager.next(), "READY=1\nSTATUS=connected to IoT Hub\n");
        n.status("offline: retrying");
        assert_eq!(manager.next(), "STATUS=offline: retrying\n");
        n.watchdog();
        assert_eq!(manager.next(), "WATCHDOG=1\n");
        n.stopping();
        assert_eq!(manager.next(), "STOPPING=1\nSTATUS=stopping\n");
    }

    #[test]
    fn reloading_carries_the_monotonic_time_it_started() {
        let manager = Manager::bind();
        let before = monotonic_usec();
        Notifier::with_socket(&manager.path).reloading();
        let after = monotonic_usec();
        let msg = manager.next();
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.first(), Some(&"RELOADING=1"), "{msg:?}");
        assert_eq!(lines.len(), 2, "{msg:?}");
        let usec: i128 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("MONOTONIC_USEC line: {msg:?}"));
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
    }

    fn monotonic_usec() -> i128 {
        match NotifyState::monotonic_usec_now().unwrap() {
            NotifyState::MonotonicUsec(usec) => usec,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_at_sign_names_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("edgetwin-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Notifier::with_socket(format!("@{name}")).watchdog();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).expect("a notification");
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
    }
}
