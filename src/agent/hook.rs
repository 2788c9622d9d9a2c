//! The optional `hooks.on_change` command: run through `/bin/sh -c` with the new state as
//! JSON on stdin, after each change of the state in force.
//!
//! The agent hands each new state to a [`HookRunner`] and moves on; a task of the runner's
//! own runs the command, at most one at a time, with the latest state only (changes made
//! while it runs are coalesced), killed after [`HOOK_TIMEOUT`]. A failing hook is logged
//! and never blocks or stops the agent.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::watch;

/// The longest a hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq)]
struct Run {
    command: String,
    stdin: Vec<u8>,
}

/// Handle to the hook task; dropping it ends the task after the run in progress.
pub struct HookRunner {
    tx: watch::Sender<Option<Run>>,
}

impl HookRunner {
    /// Starts the task. Needs a tokio runtime.
    pub fn spawn(timeout: Duration) -> HookRunner {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(run_hooks(rx, timeout));
        HookRunner { tx }
    }

    /// Runs `command` with `state_json` on stdin soon; replaces a run not yet started.
    pub fn trigger(&self, command: &str, state_json: Vec<u8>) {
        let _ = self.tx.send(Some(Run {
            command: command.to_owned(),
            stdin: state_json,
        }));
    }
}

async fn run_hooks(mut rx: watch::Receiver<Option<Run>>, timeout: Duration) {
    while rx.changed().await.is_ok() {
        let Some(run) = rx.borrow_and_update().clone() else {
            continue;
        };
        match tokio::time::timeout(timeout, run_once(&run)).await {
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

    #[tokio::test]
    async fn hook_gets_the_state_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("seen.json");
        let runner = HookRunner::spawn(HOOK_TIMEOUT);
        runner.trigger(
            &format!("cat > {}.tmp && mv {0}.tmp {0}", out.display()),
            b"{\"a\":1}".to_vec(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&out) {
                assert_eq!(text, "{\"a\":1}");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "hook never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
