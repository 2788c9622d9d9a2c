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
//!
//! It never blocks the runtime. The manager's queue is bounded
//! (`net.unix.max_dgram_qlen`, often 10) and PID 1 may be stalled, so a blocking send
//! would stop the supervisor — and with it acks and SIGTERM. Sends go out on one
//! non-blocking socket; what finds the queue full waits in a small backlog, in order,
//! where a newer `STATUS=` replaces an older one and repeated `WATCHDOG=1`s are one, and
//! goes out on the next notification (the watchdog feeder makes one every period).
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// Sends notifications to the service manager, if there is one. Clones share one socket
/// and one backlog.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// `None` outside systemd.
    channel: Option<Arc<Channel>>,
}

/// Notifications that found the manager's queue full are kept at most this many; beyond
/// it the oldest are dropped (they are STATUS/WATCHDOG in practice: READY, RELOADING and
/// STOPPING come one at a time).
const BACKLOG: usize = 16;

impl Notifier {
    /// Enabled when `NOTIFY_SOCKET` is set; the environment is left as it is so a test
    /// harness can read it too.
    pub fn from_env() -> Self {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(socket) => Self::with_socket(socket),
            None => Notifier { channel: None },
        }
    }

    /// Sends to `socket` whatever the environment says (a path, or `@name` for an abstract
    /// socket, as in `NOTIFY_SOCKET`). A socket that cannot be set up is logged once and
    /// leaves the notifier disabled: notifications are never worth stopping the daemon.
    pub fn with_socket(socket: impl Into<PathBuf>) -> Self {
        let target = socket.into();
        match Channel::open(&target) {
            Ok(channel) => Notifier {
                channel: Some(Arc::new(channel)),
            },
            Err(e) => {
                tracing::warn!(error = %e, socket = %target.display(), "sd_notify disabled");
                Notifier { channel: None }
            }
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Some(channel) = &self.channel {
            channel.send(Pending::new(states));
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
        self.channel.as_ref()?;
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

/// A notification on its way, and what may be merged with it while it waits.
#[derive(Debug, PartialEq, Eq)]
struct Pending {
    text: String,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `STATUS=` alone: only the newest matters.
    Status,
    /// `WATCHDOG=1` alone: one waiting is as good as many.
    Watchdog,
    /// READY, RELOADING, STOPPING (with their STATUS): each one counts, in order.
    Other,
}

impl Pending {
    fn new(states: &[NotifyState]) -> Pending {
        let kind = match states {
            [NotifyState::Status(_)] => Kind::Status,
            [NotifyState::Watchdog] => Kind::Watchdog,
            _ => Kind::Other,
        };
        Pending {
            text: message(states),
            kind,
        }
    }
}

/// The notifications the manager's queue had no room for yet, oldest first.
#[derive(Debug, Default)]
struct Backlog(VecDeque<Pending>);

impl Backlog {
    /// Adds `next`. Since the last READY/RELOADING/STOPPING waiting, only the newest
    /// STATUS and one WATCHDOG matter, in either order.
    fn push(&mut self, next: Pending) {
        let since = self
            .0
            .iter()
            .rposition(|p| p.kind == Kind::Other)
            .map_or(0, |i| i + 1);
        match next.kind {
            Kind::Watchdog if self.0.range(since..).any(|p| p.kind == Kind::Watchdog) => return,
            Kind::Status => {
                if let Some(i) = self.0.range(since..).position(|p| p.kind == Kind::Status) {
                    self.0.remove(since + i);
                }
            }
            _ => {}
        }
        if self.0.len() == BACKLOG {
            self.0.pop_front();
        }
        self.0.push_back(next);
    }
}

/// One non-blocking, unbound datagram socket for the life of the process.
#[derive(Debug)]
struct Channel {
    socket: UnixDatagram,
    target: Target,
    backlog: Mutex<Backlog>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(SocketAddr),
}

impl Channel {
    /// A leading `@` names an abstract socket.
    fn open(target: &Path) -> io::Result<Channel> {
        use std::os::linux::net::SocketAddrExt as _;
        use std::os::unix::ffi::OsStrExt as _;
        let target = match target.as_os_str().as_bytes().strip_prefix(b"@") {
            Some(name) => Target::Abstract(SocketAddr::from_abstract_name(name)?),
            None => Target::Path(target.to_owned()),
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Channel {
            socket,
            target,
            backlog: Mutex::new(Backlog::default()),
        })
    }

    /// Queues `next` behind whatever is waiting and sends as much as the manager takes.
    fn send(&self, next: Pending) {
        // A panic elsewhere cannot make the backlog inconsistent: it is plain data.
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        backlog.push(next);
        while let Some(front) = backlog.0.front() {
            match self.send_one(&front.text) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // No manager listening (gone, or not yet back after a re-exec): this one
                // is lost, as with libsystemd; the next ones try again.
                Err(e) => tracing::warn!(error = %e, "sd_notify failed"),
            }
            backlog.0.pop_front();
        }
    }

    fn send_one(&self, msg: &str) -> io::Result<()> {
        let sent = match &self.target {
            Target::Path(path) => self.socket.send_to(msg.as_bytes(), path)?,
            Target::Abstract(addr) => self.socket.send_to_addr(msg.as_bytes(), addr)?,
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

    /// Sends on a thread and fails the test, rather than hanging it, if that blocks.
    fn without_blocking(n: &Notifier, what: impl FnOnce(&Notifier) + Send + 'static) {
        let n = n.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            what(&n);
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("notifying blocked on a full manager queue");
    }

    fn drain(manager: &Manager) -> Vec<String> {
        manager.socket.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = manager.socket.recv(&mut buf) {
            got.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        manager.socket.set_nonblocking(false).unwrap();
        got
    }

    #[test]
    fn a_manager_that_does_not_read_never_blocks_and_the_newest_status_wins() {
        let manager = Manager::bind();
        let n = Notifier::with_socket(&manager.path);
        without_blocking(&n, |n| {
            for i in 0..1000 {
                n.status(&format!("twin v{i}"));
                n.watchdog();
            }
        });
        let first = drain(&manager);
        assert!(
            !first.is_empty() && first.len() < 2000,
            "the queue took some, not all: {}",
            first.len()
        );
        // The next notification flushes the backlog first: one WATCHDOG, one STATUS (the
        // newest, sent last), then itself.
        n.ready("connected");
        let rest = drain(&manager);
        assert_eq!(
            rest,
            [
                "WATCHDOG=1\n",
                "STATUS=twin v999\n",
                "READY=1\nSTATUS=connected\n"
            ],
            "after {} in the queue",
            first.len()
        );
    }

    #[test]
    fn ready_reloading_and_stopping_wait_their_turn_behind_a_full_queue() {
        let manager = Manager::bind();
        let n = Notifier::with_socket(&manager.path);
        without_blocking(&n, |n| {
            for i in 0..200 {
                n.status(&format!("s{i}"));
            }
            n.reloading();
            n.ready("again");
            n.status("late");
            n.stopping();
        });
        let mut got = drain(&manager);
        n.watchdog();
        got.extend(drain(&manager));
        let tail: Vec<&str> = got
            .iter()
            .map(|m| m.lines().next().unwrap())
            .skip_while(|l| l.starts_with("STATUS=s"))
            .collect();
        assert_eq!(
            tail,
            [
                "RELOADING=1",
                "READY=1",
                "STATUS=late",
                "STOPPING=1",
                "WATCHDOG=1"
            ],
            "{got:?}"
        );
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
