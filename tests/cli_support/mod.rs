//! Running the built `edgetwin` binary as a user would, for the CLI tests: a clean
//! environment (no inherited `EDGETWIN_*` or `CREDENTIALS_DIRECTORY`), a timeout, and its
//! output as text.

use std::process::Output;
use std::time::Duration;

/// Runs the binary with `env` (and no inherited `EDGETWIN_*`), failing the test if it has
/// not finished within `limit`.
pub async fn edgetwin_within(limit: Duration, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgetwin"));
    for (name, _) in std::env::vars() {
        if name.starts_with("EDGETWIN_") || name == "CREDENTIALS_DIRECTORY" {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).envs(env.iter().copied()).kill_on_drop(true);
    tokio::time::timeout(limit, cmd.output())
        .await
        .expect("edgetwin finished in time")
        .expect("edgetwin runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
