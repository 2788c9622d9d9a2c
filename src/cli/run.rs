//! `edgetwin run` (the daemon systemd starts) and `edgetwin check-config`.
//!
//! `run` loads the configuration, sets up logging from it, installs the signal handlers on
//! a tracker of its own, runs [`app::run_with`] and reports how the daemon ended, once: a
//! configuration that does not load is printed to stderr (logging is not set up yet); an
//! error of the running daemon is one log line carrying `edgetwin_event` (under systemd
//! stderr and the journal are the same place, so it is never printed besides).

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{config_path, exit, exit_code};
use crate::app::{self, AppError, RunControl};
use crate::config::Settings;

/// `edgetwin run`: the daemon, until SIGTERM/SIGINT or a fatal error.
pub async fn daemon(path: PathBuf) -> u8 {
    let path = config_path(path);
    let settings = match Settings::load(path.as_deref()) {
        Ok(s) => s,
        Err(errors) => {
            eprintln!("edgetwin: {errors}");
            return exit::CONFIG;
        }
    };
    let log = crate::logging::init(&settings.log.level, settings.log.format);
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let signals = match app::handle_signals(path, log, shutdown.clone(), reload_tx) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!(
                edgetwin_event = "internal_error",
                error = %e,
                "cannot install the signal handlers"
            );
            return exit::SOFTWARE;
        }
    };
    let tasks = TaskTracker::new();
    tasks.spawn(signals);
    tasks.close();
    let control = RunControl {
        reloads: Some(reload_rx),
        on_ready: None,
    };
    let result = app::run_with(settings, shutdown.clone(), control).await;
    // The daemon may have stopped by itself; this ends the signal task then.
    shutdown.cancel();
    tasks.wait().await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            // The reason is in the message so that `systemctl status` shows it.
            tracing::error!(edgetwin_event = event(&e), "edgetwin stopped: {e}");
            exit_code(&e)
        }
    }
}

/// The `edgetwin_event` of the daemon's final error, for `journalctl EDGETWIN_EVENT=...`.
fn event(e: &AppError) -> &'static str {
    match e {
        AppError::Config(_) => "config_invalid",
        AppError::StateDir { .. } => "state_dir_failed",
        AppError::Provision(_) => "provision_failed",
        AppError::Aziot(_) => "aziot_failed",
        AppError::Internal(_) => "internal_error",
    }
}

/// `edgetwin check-config`: validate (reading the credentials `run` would read), print
/// the effective config with secrets redacted.
pub fn check_config(path: PathBuf) -> u8 {
    let checked = Settings::load(config_path(path).as_deref())
        .and_then(|s| s.check_credentials().map(|()| s));
    match checked {
        Ok(settings) => {
            print!("{}", settings.redacted_toml());
            exit::OK
        }
        Err(errors) => {
            eprintln!("edgetwin: {errors}");
            exit::CONFIG
        }
    }
}
