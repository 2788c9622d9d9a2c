//! Scenario 7 of the fault suite: the daemon's state directory unusable, read-only or full.
//! The daemon puts the patches in force but sends no ack for what is not on disk, says so
//! (`persist_failed`), and acknowledges once the disk recovers. That no ack left is shown
//! by order (a `getState` answered before any ack could arrive), never by waiting.
//!
//! Without privileges (runs everywhere, as root too, who ignores file modes): the state
//! directory swapped for a regular file (ENOTDIR). With root, as in CI: a small tmpfs
//! remounted read-only or filled up; without root or mount rights [`Tmpfs::mount`] fails
//! the test and says why, it never skips.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use edgetwin::twin::StateFile;
use rand::Rng;
use serde_json::json;

use crate::daemon_support::fault::StateDirSwapped;
use crate::daemon_support::{acks_at_least, Env, DEVICE, MODULE};
use crate::harness::{
    capture_logs, check_invariant, converge, logged, rng, Figures, Profile, Stream,
};
use crate::{setup, start_watched};

/// A tmpfs mounted on a directory; unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Runs a command; `Err` carries what it said when it failed.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// Mounts a `size_kib` tmpfs on `path` (an empty directory).
    pub fn mount(path: &Path, size_kib: u32) -> Tmpfs {
        assert!(
            is_root(),
            "this test needs root: it mounts a tmpfs on the state directory \
             (run it as root, as scripts/test in CI does)"
        );
        let p = path.to_str().expect("utf-8 path");
        let options = format!("size={size_kib}k,mode=0700");
        if let Err(e) = run(&["mount", "-t", "tmpfs", "-o", &options, "tmpfs", p]) {
            panic!("root without mount rights cannot run this test: {e}");
        }
        Tmpfs {
            path: path.to_owned(),
        }
    }

    pub fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        if let Err(e) = run(&["mount", "-o", opt, self.path.to_str().expect("utf-8")]) {
            panic!("{e}");
        }
    }

    /// Fills the file system; returns the filler to remove when the disk "recovers".
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", self.path.to_str().unwrap_or_default()]);
    }
}

/// With a disk fault injected on a settled daemon: sends a few patches and shows that the
/// last is put in force but none is acknowledged (`getState`, answered after the agent
/// handled them, reaches the hub before any ack of them could), that the failed write is
/// logged, and that `state.json` (read by `on_disk`) is still behind them. Returns the
/// last version.
async fn held_while_unpersisted(
    env: &mut Env,
    stream: &mut Stream,
    fault: &str,
    on_disk: impl Fn() -> Option<u64>,
) -> u64 {
    let failures = logged("persist_failed");
    let first = stream.send(env);
    let more = stream.rng.random_range(0..3);
    let v = stream.send_n(env, more);
    let (seen, state) = env.get_state_marker().await;
    assert_eq!(state["desiredVersion"], json!(v), "{fault}: v{v} in force");
    assert!(
        state["pendingReported"].as_u64() >= Some(1),
        "{fault}: the ack is outstanding: {state}"
    );
    let early: Vec<_> = seen.iter().filter(|e| acks_at_least(e, first)).collect();
    assert!(
        early.is_empty(),
        "{fault}: v{first}..=v{v} acknowledged though not persisted: {early:?}"
    );
    assert!(
        logged("persist_failed") > failures,
        "{fault}: the failed write is logged"
    );
    let disk = on_disk();
    assert!(disk < Some(first), "{fault}: state.json at {disk:?}");
    v
}

fn version_in(state_file: &Path) -> Option<u64> {
    let bytes = std::fs::read(state_file).ok()?;
    StateFile::parse(&bytes, DEVICE, MODULE)
        .ok()?
        .desired_version
}

/// Scenario 7, without privileges (runs everywhere, as root too): the state directory is
/// swapped for a regular file, so every write under it fails with ENOTDIR. The daemon puts
/// the patches in force but sends no ack for what is not on disk, says so
/// (`persist_failed`), and acknowledges once the directory is back.
#[tokio::test]
async fn s7_no_ack_while_the_state_dir_is_unusable() {
    let profile = Profile::from_env();
    let mut figures = Figures::new("7-state-dir-unusable", profile);
    let (mut env, monitor, daemon) = setup(|env| env.settings("")).await;
    let mut stream = Stream::new(rng("7"));
    let warm = stream.send_n(&env, 3);
    converge(&mut env, &monitor, warm).await;

    for _ in 0..profile.pick(2, 10) {
        env.settled().await;
        let swapped = StateDirSwapped::swap(env.state_dir.path());
        figures.faults += 1;
        let parked = swapped.parked_state_file();
        let v = held_while_unpersisted(&mut env, &mut stream, "state dir is a file", || {
            version_in(&parked)
        })
        .await;
        let t = Instant::now();
        swapped.restore();
        converge(&mut env, &monitor, v).await;
        figures.recoveries.push(t.elapsed());
    }
    let last = stream.send(&env);
    converge(&mut env, &monitor, last).await;
    figures.patches = stream.sent;
    figures.note("persist_failed_logged", logged("persist_failed"));
    daemon.stop().await.expect("clean stop");
    check_invariant(&env, &monitor, &mut figures);
}

/// Scenario 7 on a real file system (needs root, as in CI: scripts/test runs it): the
/// state directory is a 256 KiB tmpfs, remounted read-only (EROFS), then filled up
/// (ENOSPC). Same promise: no ack until the state is on disk.
#[tokio::test]
#[ignore = "needs root: mounts a tmpfs (scripts/test runs it, see faults.rs)"]
async fn s7_root_no_ack_while_the_disk_is_read_only_or_full() {
    let profile = Profile::from_env();
    let mut figures = Figures::new("7-disk-read-only-or-full", profile);
    capture_logs();
    let mut env = Env::start().await;
    // Declared after `env`: unmounted before the directory is removed.
    let disk = Tmpfs::mount(env.state_dir.path(), 256);
    let (monitor, daemon) = start_watched(&mut env, |env| env.settings("")).await;
    let mut stream = Stream::new(rng("7-root"));
    let warm = stream.send_n(&env, 3);
    converge(&mut env, &monitor, warm).await;

    for _ in 0..profile.pick(1, 5) {
        for mode in ["read-only", "full"] {
            env.settled().await;
            let filler = if mode == "full" {
                Some(disk.fill())
            } else {
                disk.read_only(true);
                None
            };
            figures.faults += 1;
            let v = held_while_unpersisted(&mut env, &mut stream, mode, || {
                monitor.read().and_then(|f| f.desired_version)
            })
            .await;
            let t = Instant::now();
            match filler {
                Some(f) => std::fs::remove_file(f).expect("filler removed"),
                None => disk.read_only(false),
            }
            converge(&mut env, &monitor, v).await;
            figures.recoveries.push(t.elapsed());
        }
    }
    let last = stream.send(&env);
    converge(&mut env, &monitor, last).await;
    figures.patches = stream.sent;
    figures.note("disk", "tmpfs");
    figures.note("persist_failed_logged", logged("persist_failed"));
    daemon.stop().await.expect("clean stop");
    check_invariant(&env, &monitor, &mut figures);
    drop(disk);
}
