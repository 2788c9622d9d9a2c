//! The daemon's signals, through `signal-hook-tokio`: SIGTERM/SIGINT stop it, SIGHUP
//! reloads its configuration. Runs as a task of whoever runs the daemon (`cli::run`),
//! never longer than the daemon: it ends when the shutdown token is cancelled.

use std::path::{Path, PathBuf};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::logging::LogHandle;
use crate::systemd::Notifier;

/// SIGTERM/SIGINT cancel `shutdown`; SIGHUP re-reads the configuration from
/// `config_path`, applies the log level and forwards good settings to `reloads` (a bad
/// configuration is logged and the old one stays).
///
/// The handlers are installed here, before the daemon starts (an error means none is);
/// the returned future handles the signals and ends once `shutdown` is cancelled, by a
/// signal or by whoever runs the daemon when it stopped by itself. Spawn it on a tracker.
pub fn handle_signals(
    config_path: Option<PathBuf>,
    log: LogHandle,
    shutdown: CancellationToken,
    reloads: mpsc::Sender<Settings>,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    Ok(async move {
        let notifier = Notifier::from_env();
        loop {
            let signal = tokio::select! {
                _ = shutdown.cancelled() => break,
                signal = next_signal(&mut signals) => signal,
            };
            match signal {
                Some(SIGHUP) => {
                    let Some(settings) = reread(config_path.as_deref(), &log, &notifier) else {
                        continue;
                    };
                    // The daemon takes reloads while it runs; once it stopped, nobody will.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = reloads.send(settings) => {}
                    }
                }
                Some(signal) => {
                    tracing::info!(edgetwin_event = "signal", signal, "stop requested");
                    shutdown.cancel();
                    break;
                }
                None => break,
            }
        }
        signals.handle().close();
    })
}

async fn next_signal(signals: &mut Signals) -> Option<i32> {
    use futures_core::Stream as _;
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *signals).poll_next(cx)).await
}

/// SIGHUP: `RELOADING=1`, the configuration read again; `None` (and READY=1 with the old
/// one) when it is invalid.
fn reread(config_path: Option<&Path>, log: &LogHandle, notifier: &Notifier) -> Option<Settings> {
    notifier.reloading();
    match Settings::load(config_path) {
        Ok(settings) => {
            if let Err(e) = log.set_level(&settings.log.level) {
                tracing::warn!(error = %e, "log level not changed");
            }
            tracing::info!(edgetwin_event = "reload", "configuration re-read");
            Some(settings)
        }
        Err(errors) => {
            tracing::error!(
                edgetwin_event = "reload_rejected",
                problems = %errors,
                "new configuration is invalid; keeping the old one"
            );
            notifier.ready("configuration reload rejected; running with the old one");
            None
        }
    }
}
