//! The optional `hooks.on_change` command: run through `/bin/sh -c` with the new state as
//! JSON on stdin, after each change of the state in force.
//!
//! The agent hands each new state to a [`HookRunner`] and moves on; a [`HookTask`] of the
//! runner's, which the agent spawns on its own tracker and stops when it stops, runs the
//! command, at most one at a time, with the latest state only (changes made while it runs
//! are coalesced), killed after [`HOOK_TIMEOUT`] or when the agent stops. A failing hook
//! is logged here, at the task boundary, and never blocks or stops the agent.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest a hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq)]
struct Run {
    command: String,
    stdin: Vec<u8>,
}

/// The agent's end: hands states to the [`HookTask`].
pub struct HookRunner {
    tx: watch::Sender<Option<Run>>,
}

/// The task's end: runs what the [`HookRunner`] hands it, until stopped.
pub struct HookTask {
    rx: watch::Receiver<Option<Run>>,
    timeout: Duration,
}

impl HookRunner {
    /// The runner and the task to spawn for it (nothing runs until the task does).
    pub fn new(timeout: Duration) -> (HookRunner, HookTask) {
        let (tx, rx) = watch::channel(None);
        (HookRunner { tx }, HookTask { rx, timeout })
    }

    /// Runs `command` with `state_json` on stdin soon; replaces a run not yet started.
    pub fn trigger(&self, command: &str, state_json: Vec<u8>) {
        let _ = self.tx.send(Some(Run {
            command: command.to_owned(),
            stdin: state_json,
        }));
    }
}

impl HookTask {
    /// Runs hooks until `stop` is cancelled (a hook still running is killed) or the
    /// [`HookRunner`] is dropped (after the last state it handed over has run).
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                changed = self.rx.changed() => if changed.is_err() { return },
            }
            let Some(run) = self.rx.borrow_and_update().clone() else {
                continue;
            };
            let finished = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Dropping the run kills the child (`kill_on_drop`).
                    tracing::info!(
                        edgetwin_event = "hook_cancelled",
                        "change hook killed: the agent is stopping"
                    );
                    return;
                }
                finished = tokio::time::timeout(self.timeout, run_once(&run)) => finished,
            };
            log_finished(finished, self.timeout);
        }
    }
}

fn log_finished(
    finished: Result<std::io::Result<std::process::ExitStatus>, tokio::time::error::Elapsed>,
    timeout: Duration,
) {
    match finished {
        Ok(Ok(status)) if status.success() => {
            tracing::debug!(edgetwin_event = "hook_ok", "change hook finished");
        }
        Ok(Ok(status)) => tracing::warn!(
            edgetwin_event = "hook_failed",
            status = %status,
            "change hook exited with failure"
        ),
        Ok(Err(e)) => tracing::warn!(
            edgetwin_event = "hook_failed",
            error = %e,
            "change hook could not be run"
        ),
        Err(_) => tracing::warn!(
            edgetwin_event = "hook_timeout",
            timeout_secs = timeout.as_secs(),
            "change hook took too long and was killed"
        ),
    }
}

async fn run_once(run: &Run) -> std::io::Result<std::process::ExitStatus> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&run.command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(&run.stdin).await;
    }
    child.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio_util::task::TaskTracker;

    /// Bounds every wait of these tests; none is reached unless something is broken.
    const WAIT: Duration = Duration::from_secs(10);

    fn spawned(task: HookTask, stop: &CancellationToken) -> TaskTracker {
        let tasks = TaskTracker::new();
        tasks.spawn(task.run(stop.clone()));
        tasks.close();
        tasks
    }

    #[tokio::test]
    async fn hook_gets_the_state_on_stdin_before_its_task_ends() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("seen.json");
        let (runner, task) = HookRunner::new(HOOK_TIMEOUT);
        let tasks = spawned(task, &CancellationToken::new());
        runner.trigger(&format!("cat > {}", out.display()), b"{\"a\":1}".to_vec());
        drop(runner);
        tokio::time::timeout(WAIT, tasks.wait())
            .await
            .expect("the task ends once its runner is gone");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"a\":1}");
    }

    #[tokio::test]
    async fn stopping_ends_the_task_with_its_hook_still_running() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("started");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo failed");
        // Read-write, so the pipe never reads as closed before the hook opens it.
        let reader = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&fifo)
            .expect("fifo opened");
        let (runner, task) = HookRunner::new(HOOK_TIMEOUT);
        let stop = CancellationToken::new();
        let tasks = spawned(task, &stop);
        runner.trigger(
            &format!("echo started > {}; exec sleep 600", fifo.display()),
            Vec::new(),
        );
        let mut line = String::new();
        tokio::time::timeout(WAIT, tokio::io::BufReader::new(reader).read_line(&mut line))
            .await
            .expect("the hook starts")
            .expect("fifo read");
        assert_eq!(line, "started\n");

        stop.cancel();
        tokio::time::timeout(WAIT, tasks.wait())
            .await
            .expect("a stopped task does not wait for its hook");
        drop(runner);
    }
}
