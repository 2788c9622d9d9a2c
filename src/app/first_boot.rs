//! First boot: the module credential read from the configuration, or provisioned with the
//! configured method while the daemon already runs (READY sent, watchdog fed, reloads kept
//! for later). A refused provisioning secret keeps the daemon waiting, never exiting.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::AppError;
use crate::config::{ProvisioningMethod, Settings};
use crate::hub::backoff::Backoff;
use crate::identity::ModuleCredentials;
use crate::provision::{Plan, ProvisionError};
use crate::systemd::Notifier;

/// The module credential; `None` when it is still to be provisioned (first boot with a
/// `[provisioning] method`).
pub(super) fn module_credentials(
    settings: &Settings,
) -> Result<Option<ModuleCredentials>, AppError> {
    let Some(text) = settings
        .module_credentials()
        .map_err(|e| AppError::Config(e.to_string()))?
    else {
        if settings.provisioning.method != ProvisioningMethod::None {
            return Ok(None);
        }
        return Err(AppError::Config(
            "no module credentials: set hub.connection_string(_file), run `edgetwin provision`, \
             or choose a [provisioning] method"
                .into(),
        ));
    };
    text.trim()
        .parse::<ModuleCredentials>()
        .map(Some)
        .map_err(|e| AppError::Config(format!("module connection string: {e}")))
}

/// First boot: provisions the module identity with the configured method (its secret
/// was read once, into `plan`, and is never read again once `module.connstr` exists),
/// retrying with the hub backoff (or what DPS asked, if longer) while the hub or DPS is
/// unreachable or throttling, and returns the module credential it wrote. A refusal (401:
/// a policy without registry write rights, a wrong device key; or DPS refusing the
/// enrollment key or the enrollment) keeps it waiting with the refused backoff and a plan
/// made anew; other failures are final and returned, not logged. `None` when `shutdown`
/// came first.
///
/// The watchdog is fed on its period meanwhile: every attempt is bounded by the registry
/// client's request timeout and retry limits, so this loop cannot wedge unnoticed.
pub(super) async fn first_boot_credentials(
    settings: &Settings,
    mut plan: Plan,
    waiting: &mut Waiting<'_>,
    shutdown: &CancellationToken,
) -> Result<Option<ModuleCredentials>, AppError> {
    let mut backoff = Backoff::new(settings.hub.backoff);
    let mut refused = Backoff::new(settings.hub.refused_backoff);
    tracing::info!(
        edgetwin_event = "provisioning",
        hub = %plan.host_name,
        method = plan.method.as_str(),
        "no module credential yet; provisioning the module identity"
    );
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = waiting.on(plan.run()) => r,
        };
        match attempt {
            Ok(done) => {
                tracing::info!(
                    edgetwin_event = "provisioned",
                    device_created = done.device_created,
                    module_created = done.module_created,
                    keys_set = done.keys_set,
                    credential = %done.credential_file.display(),
                    "module identity provisioned; the provisioning secret is no longer needed"
                );
                break;
            }
            Err(e) if e.is_retryable() => {
                // DPS may ask for longer than our backoff: what it asked wins.
                let pause = backoff
                    .next_delay()
                    .max(e.retry_after().unwrap_or_default());
                tracing::warn!(
                    edgetwin_event = "provision_retry",
                    error = %e,
                    retry_in_ms = pause.as_millis() as u64,
                    "hub unreachable; provisioning again later"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = waiting.on(tokio::time::sleep(pause)) => {}
                }
            }
            // A refused secret is fixed by someone replacing it: the daemon stays up (a
            // unit that exits here would restart every few seconds against the hub) and
            // tries again after a long backoff, reading the secret anew each time.
            Err(e) if e.is_refused() => {
                let pause = refused.next_delay();
                let minutes = pause.as_secs().div_ceil(60);
                // DPS refusals (a wrong enrollment key, a disabled or unknown enrollment)
                // are treated alike: someone must change the key or the enrollment.
                let by = match &e {
                    ProvisionError::Dps(_) => "DPS",
                    _ => "the hub",
                };
                tracing::error!(
                    edgetwin_event = "provision_refused",
                    error = %e,
                    retry_in_s = pause.as_secs(),
                    refused_by = by,
                    "provisioning refused; trying again later"
                );
                waiting.status = format!(
                    "provisioning refused by {by} {}; retrying in {minutes} min; \
                     fix the provisioning secret",
                    plan.host_name
                );
                waiting.notifier.status(&waiting.status);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = waiting.on(tokio::time::sleep(pause)) => {}
                }
                plan = Plan::from_settings(settings, None).map_err(AppError::Provision)?;
            }
            // Reported once by the caller; the message says what is wrong.
            Err(e) => return Err(AppError::Provision(e)),
        }
    }
    module_credentials(settings)?
        .map(Some)
        .ok_or_else(|| AppError::Internal("the provisioned module credential is missing".into()))
}

/// What goes on while provisioning besides the work itself: the watchdog is fed, and
/// reloads (SIGHUP) are answered with READY=1 and kept, the newest winning, to be applied
/// once the agent runs (so `handle_signals` never blocks on a full reload channel).
pub(super) struct Waiting<'a> {
    pub(super) notifier: &'a Notifier,
    pub(super) reloads: &'a mut mpsc::Receiver<Settings>,
    pub(super) deferred: Option<Settings>,
    /// `STATUS=` while provisioning.
    pub(super) status: String,
}

impl Waiting<'_> {
    pub(super) async fn on<F: std::future::Future>(&mut self, work: F) -> F::Output {
        let work = watchdog_fed(self.notifier, work);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                Some(new) = self.reloads.recv() => {
                    tracing::info!(
                        edgetwin_event = "reload_deferred",
                        "configuration re-read while provisioning; applied once connected"
                    );
                    self.deferred = Some(new);
                    self.notifier.ready(&self.status);
                }
            }
        }
    }
}

/// Awaits `work`, sending `WATCHDOG=1` on the watchdog period meanwhile (when enabled).
async fn watchdog_fed<F: std::future::Future>(notifier: &Notifier, work: F) -> F::Output {
    let Some(period) = notifier.watchdog_period() else {
        return work.await;
    };
    tokio::pin!(work);
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => notifier.watchdog(),
        }
    }
}
