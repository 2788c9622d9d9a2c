//! Fleet rollouts through IoT Hub (DESIGN §10, PROTOCOL §14): IoT Hub's automatic module
//! configurations are the engine that sets desired properties on every module twin a
//! target condition picks, and its query API counts where they landed. Nothing here fans
//! out to gateways itself.
//!
//! - [`spec`]: the configuration body `fleet apply` creates (pure).
//! - [`status`]: targeted / applied / rejected / pending from the hub's answers (pure).
//! - [`pace`]: the per-minute quotas — 429 backoff with full jitter and `Retry-After`,
//!   the `--wait` poll interval, the injected [`pace::Clock`].
//! - [`watch`]: the `--wait` loop.
//! - [`client`]: [`FleetClient`], over [`crate::registry::RegistryClient`].
//!
//! Library code: typed [`FleetError`]s, nothing printed.

pub mod client;
pub mod pace;
pub mod spec;
pub mod status;
pub mod watch;

pub use client::{Applied, FleetClient};
pub use spec::{RolloutSpec, SpecError};
pub use status::{Rejection, Rollout, RolloutStatus, Verdict};

use crate::registry::RegistryError;

/// Why a fleet operation failed. The CLI maps it to an exit code: a bad rollout is 64,
/// what the hub refused is 65, throttling that never ended is 69.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(
        "configuration `{name}` already exists{}. IoT Hub cannot change a configuration's \
         content: roll a new value out as a new configuration with a higher priority, e.g. \
         `edgetwin fleet apply {name}-2 --priority {next} ...`",
        priority.map(|p| format!(" (priority {p})")).unwrap_or_default()
    )]
    Exists {
        name: String,
        priority: Option<i64>,
        /// The priority a new configuration of the same settings needs to win.
        next: i64,
    },
    #[error("the hub refused configuration `{name}` (nothing was created): {message}")]
    Refused { name: String, message: String },
    #[error(
        "the hub refused configuration `{name}`: {message} (it already holds {count} \
         configurations and IoT Hub allows 100 per hub: remove one with `edgetwin fleet remove NAME`)"
    )]
    TooMany {
        name: String,
        count: usize,
        message: String,
    },
    #[error("no configuration `{0}` in the hub")]
    NotFound(String),
    #[error(
        "configuration `{0}` is not an edgetwin rollout (no module content with applied and \
         rejected metrics): nothing to count"
    )]
    NotARollout(String),
    #[error("the hub rejected the query: {0}")]
    Query(String),
    #[error(transparent)]
    Registry(RegistryError),
}

impl FleetError {
    fn from_registry(e: RegistryError) -> Self {
        FleetError::Registry(e)
    }

    /// Worth another try later: the hub was unavailable or kept throttling.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FleetError::Registry(e) if e.is_retryable())
    }
}
