//! Re-provisioning the module identity after repeated refusals, with the `device` and
//! `dps` methods: the module may have been deleted, re-created (a new `generationId`, so
//! new derived keys) or re-keyed by hand in the hub, and the gateway still holds what it
//! needs to get a working credential again (its device key or enrollment key). Once per
//! refusal episode, after [`REPROVISION_AFTER`] refusals in a row, the plan runs again on
//! a task of the supervisor's tracker; the session reads the new `module.connstr` on its
//! next attempt, and is handed it at once.
//!
//! Not with `service` (its key is meant to leave the gateway after the first boot) nor
//! with a module credential the operator supplies (nothing here may overwrite it).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::credential::LiveCredential;
use crate::config::{CredentialSource, ProvisioningMethod, Settings};
use crate::hub::session::ConnectionState;
use crate::provision::{Plan, ProvisionError, Provisioned};

/// Refusals in a row (each after the refused backoff) before the identity is provisioned
/// again: a few, so that a hub outage answering CONNACK 5 is not taken for a lost module.
pub(super) const REPROVISION_AFTER: u32 = 3;

pub(super) struct Reprovision {
    /// Already tried in this refusal episode (until the next connect).
    tried: bool,
    done_tx: mpsc::Sender<Result<Provisioned, ProvisionError>>,
    /// Where the outcome of a run arrives; the supervisor selects on it.
    pub(super) done: mpsc::Receiver<Result<Provisioned, ProvisionError>>,
}

impl Reprovision {
    pub(super) fn new() -> Self {
        let (done_tx, done) = mpsc::channel(1);
        Reprovision {
            tried: false,
            done_tx,
            done,
        }
    }

    /// Sees every connection state; starts one run per refusal episode when allowed.
    pub(super) fn on_state(
        &mut self,
        state: ConnectionState,
        settings: &Settings,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        match state {
            ConnectionState::Connected => self.tried = false,
            ConnectionState::Refused { attempts, .. }
                if attempts >= REPROVISION_AFTER && !self.tried && allowed(settings) =>
            {
                self.tried = true;
                let plan = match Plan::from_settings(settings, None) {
                    Ok(plan) => plan,
                    Err(e) => {
                        tracing::warn!(
                            edgetwin_event = "reprovision_skipped",
                            error = %e,
                            "refused again and again, but the module identity cannot be provisioned anew"
                        );
                        return;
                    }
                };
                tracing::warn!(
                    edgetwin_event = "reprovisioning",
                    attempts,
                    method = plan.method.as_str(),
                    "the hub keeps refusing the module credential; provisioning the module identity again"
                );
                let done = self.done_tx.clone();
                let stop = stop.clone();
                tasks.spawn(
                    async move {
                        // Stopping the daemon does not wait for the hub's answers.
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            outcome = plan.run() => {
                                let _ = done.send(outcome).await;
                            }
                        }
                    }
                    .in_current_span(),
                );
            }
            _ => {}
        }
    }
}

/// The outcome of a run: logged once, here; a new credential goes to the session.
pub(super) fn finished(
    outcome: Result<Provisioned, ProvisionError>,
    settings: &Settings,
    live: &LiveCredential,
) {
    match outcome {
        Ok(done) => {
            tracing::info!(
                edgetwin_event = "reprovisioned",
                module_created = done.module_created,
                keys_set = done.keys_set,
                "module identity provisioned again"
            );
            if let Ok(Some(credential)) = super::module_credentials(settings) {
                live.provisioned(credential);
            }
        }
        Err(e) => tracing::error!(
            edgetwin_event = "reprovision_failed",
            error = %e,
            "provisioning the module identity again failed; retrying with the refused backoff"
        ),
    }
}

fn allowed(settings: &Settings) -> bool {
    matches!(
        settings.provisioning.method,
        ProvisioningMethod::Device | ProvisioningMethod::Dps
    ) && matches!(settings.hub.credentials, CredentialSource::Provisioned(_))
}
