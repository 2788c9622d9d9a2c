//! `[aziot]` at start: the module identity asked of aziot-identityd once, before the
//! state is loaded (the state belongs to one device and module, and only identityd knows
//! which). Afterwards the session asks again before each connect (`hub::signer`).
//!
//! What each failure does, here and later:
//! - a socket missing: exit 78 (configuration; the unit does not restart it): `[aziot]`
//!   is enabled on a host without IoT Edge configured. The same problem `check-config`
//!   reports, in the same words.
//! - permission denied (not in group aziotid / aziotks) and identityd's 401/404 (no module
//!   principal): exit 77, naming the group or the principal file. systemd restarts the
//!   unit after `RestartSec`, which is what picks up a group added with `usermod` (groups
//!   are set at exec) and a principal file identityd has read meanwhile; it is the one
//!   case that restarts, because without an identity there is nothing to run.
//! - identityd unavailable, too slow, or answering 5xx or nonsense: exit 69, restarted.
//! - any of these once running: never an exit. The connect attempt fails, is logged
//!   once and retried with the reconnect backoff, on persisted state.

use super::AppError;
use crate::aziot::AziotClient;
use crate::config::Settings;
use crate::identity::ModuleIdentity;

/// The identity identityd gives this process now, or why not.
pub(super) async fn first_identity(
    settings: &Settings,
    client: &AziotClient,
) -> Result<ModuleIdentity, AppError> {
    // The very check (and message) of `check-config`, before anything is opened.
    settings
        .check_credentials()
        .map_err(|e| AppError::Config(e.to_string()))?;
    let found = client.identity().await.map_err(AppError::Aziot)?;
    tracing::info!(
        edgetwin_event = "aziot_identity",
        hub = %found.identity.host_name,
        gateway = found.identity.gateway_host_name.as_deref(),
        generation = found.gen_id.as_deref(),
        "module identity from aziot-identityd"
    );
    Ok(found.identity)
}
